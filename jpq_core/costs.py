"""Cost model: memory, MACs, bit operations, and estimates of energy and hardware cost.

Per layer (convolution or linear), with N weights of which nnz are kept, b_w weight bits, b_a input
activation bits (32 for float), and H_out x W_out output positions (1 for linear):

- MACs = nnz * H_out * W_out (dense: N * H_out * W_out).                       [counted]
- BOPs = MACs * b_w * b_a (Baskin et al. 2018; van Baalen et al., DJPQ, ECCV 2020).   [counted]
- Weight memory in bits, the cheapest of three encodings (Han et al., Deep Compression, ICLR 2016):
    dense   N * b_w
    bitmask N + nnz * b_w
    CSR     (nnz + fillers) * (b_w + g): g-bit relative indices, one zero filler per 2^g positions of a
            gap, g = 2..8 chosen per layer (at 95% sparsity the mean gap is 20, so 5-7 bits beat 4),
  plus 32 bits per quantization scale (one per output channel, or one per tensor) and 32-bit biases.
- Activation memory: the layer's input, H_in * W_in * C_in * b_a bits (batch 1).
- Energy [ESTIMATE, 45 nm, 0.9 V, Horowitz ISSCC 2014 as commonly cited]: per MAC, a multiply scaled from
  int8 (0.2 pJ) by b_w*b_a/64 plus an add scaled from int32 (0.1 pJ) by accumulator width/32; float32
  uses 3.7 pJ + 0.9 pJ. Weights read once from DRAM at 640 pJ per 32 bits (Han et al.), activations read
  and written through SRAM at 10 pJ per 64 bits.
- Hardware cost [ESTIMATE]: MACs x multiplier area, area(b_w, b_a) = 282 um^2 * b_w*b_a/64 (array
  multiplier from the 45 nm int8 figure); float32 uses 7,700 um^2. An area-time proxy, in mm^2 * MAC.

Everything is reported against the dense float32 network, whose ratios are 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from jpq_core.layers import prunable_layers

FLOAT_BITS = 32
INDEX_WIDTHS = range(2, 9)  # relative-index widths a CSR layer may use (the cheapest is taken)
ASSUMPTIONS = {
    "energy": "estimate, 45 nm 0.9 V (Horowitz 2014): int8 mult 0.2 pJ scaled by b_w*b_a/64, int32 add 0.1 pJ, "
              "fp32 mult+add 4.6 pJ; DRAM 640 pJ/32 bit for weights, SRAM 10 pJ/64 bit for activations",
    "hardware_cost": "estimate: MACs x multiplier area, 282 um^2 * b_w*b_a/64 (int8 array multiplier, 45 nm); fp32 7700 um^2",
    "memory": "cheapest of dense, bitmask, relative-index CSR (2-8 bit indices) per layer, plus 32-bit scales and biases",
}


@dataclass
class LayerCost:
    name: str
    kind: str
    weights: int
    nonzero: int
    wbits: int
    abits: int
    positions: int  # output positions per sample (H_out * W_out)
    input_elements: int
    encoding: str
    weight_bits: float
    activation_bits: float
    macs: float
    dense_macs: float
    bops: float
    energy_pj: float
    hardware_cost: float

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / max(1, self.weights)


def layer_geometry(model: nn.Module, example_inputs: tuple) -> dict[str, tuple[int, int]]:
    """{layer: (output positions per sample, input elements per sample)} from one forward pass."""
    geometry, hooks = {}, []
    for name, m in prunable_layers(model).items():
        def hook(mod, inputs, output, name=name):
            # A layer run several times per inference (the shared feature extractor) adds up.
            positions, elements = geometry.get(name, (0, 0))
            out_positions = output.shape[2] * output.shape[3] if output.dim() == 4 else 1
            geometry[name] = (positions + out_positions, elements + inputs[0][0].numel())
        hooks.append(m.register_forward_hook(hook))
    try:
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            model(*example_inputs)
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    return geometry


def csr_bits(mask: torch.Tensor, value_bits: int, index_bits: int = 4) -> int:
    """Relative-index CSR size: each kept weight stores its gap to the previous one in `index_bits` bits;
    a gap over 2^index_bits inserts zero-valued fillers (Han et al. 2016)."""
    idx = torch.nonzero(mask.flatten()).flatten()
    if idx.numel() == 0:
        return 0
    gaps = torch.diff(idx, prepend=torch.tensor([-1]))
    fillers = int(((gaps - 1) // (2**index_bits)).clamp(min=0).sum())
    return (idx.numel() + fillers) * (value_bits + index_bits)


def _mult_energy(wbits, abits):
    return 3.7 + 0.9 if wbits >= FLOAT_BITS and abits >= FLOAT_BITS else 0.2 * wbits * abits / 64 + 0.1


def _mult_area(wbits, abits):
    return 7700.0 if wbits >= FLOAT_BITS and abits >= FLOAT_BITS else 282.0 * wbits * abits / 64


def layer_cost(name, module, mask, wbits, abits, geometry, per_channel_scales=True) -> LayerCost:
    n = module.weight.numel()
    nnz = int(mask.sum()) if mask is not None else int((module.weight != 0).sum())
    wb = FLOAT_BITS if wbits is None else wbits
    ab = FLOAT_BITS if abits is None else abits
    positions, inputs = geometry[name]
    encodings = {"dense": n * wb}
    if nnz < n:
        m = mask if mask is not None else module.weight != 0
        encodings["bitmask"] = n + nnz * wb
        encodings.update({f"csr{g}": csr_bits(m, wb, g) for g in INDEX_WIDTHS})
    encoding = min(encodings, key=encodings.get)
    overhead = 0
    if wbits is not None:
        overhead += FLOAT_BITS * (module.weight.shape[0] if per_channel_scales else 1)
    if module.bias is not None:
        overhead += FLOAT_BITS * module.bias.numel()
    macs = float(nnz) * positions
    energy = macs * _mult_energy(wb, ab) + encodings[encoding] * 640.0 / 32 + inputs * ab * 10.0 / 64
    return LayerCost(
        name=name, kind=type(module).__name__, weights=n, nonzero=nnz, wbits=wb, abits=ab, positions=positions,
        input_elements=inputs, encoding=encoding, weight_bits=float(encodings[encoding] + overhead),
        activation_bits=float(inputs * ab), macs=macs, dense_macs=float(n) * positions, bops=macs * wb * ab,
        energy_pj=energy, hardware_cost=macs * _mult_area(wb, ab) * 1e-6,
    )


def network_cost(model, masks, wbits, abits, geometry, per_channel_scales=True) -> dict:
    """Per-layer and total cost against the dense float32 network, plus the assumptions behind estimates.

    `wbits`/`abits` are one width for all layers or {layer: width} (None = float).
    """
    layers = prunable_layers(model)
    def width(spec, name):
        return spec.get(name) if isinstance(spec, dict) else spec
    costs = [layer_cost(k, m, masks.get(k) if masks else None, width(wbits, k), width(abits, k), geometry, per_channel_scales)
             for k, m in layers.items()]
    dense = [layer_cost(k, m, torch.ones_like(m.weight, dtype=torch.bool), None, None, geometry, False) for k, m in layers.items()]
    total = {f: sum(getattr(c, f) for c in costs) for f in ("weight_bits", "activation_bits", "macs", "bops", "energy_pj", "hardware_cost")}
    base = {f: sum(getattr(c, f) for c in dense) for f in total}
    kept, count = sum(c.nonzero for c in costs), sum(c.weights for c in costs)
    return {
        "weight_bits": total["weight_bits"], "dense_weight_bits": base["weight_bits"],
        "memory_ratio": total["weight_bits"] / base["weight_bits"],
        "activation_bits": total["activation_bits"], "dense_activation_bits": base["activation_bits"],
        "macs": total["macs"], "dense_macs": base["macs"], "macs_ratio": total["macs"] / base["macs"],
        "bops": total["bops"], "dense_bops": base["bops"], "bops_ratio": total["bops"] / base["bops"],
        "energy_pj": total["energy_pj"], "dense_energy_pj": base["energy_pj"], "energy_ratio": total["energy_pj"] / base["energy_pj"],
        "hardware_cost": total["hardware_cost"], "dense_hardware_cost": base["hardware_cost"],
        "hardware_cost_ratio": total["hardware_cost"] / base["hardware_cost"],
        "sparsity": 1.0 - kept / max(1, count),
        "layers": [dict(asdict(c), sparsity=c.sparsity) for c in costs],
        "assumptions": ASSUMPTIONS,
    }
