"""The library side of the Learn page: small, fast computations on the real networks that each show one idea.

1. `prune_layer_lesson`: what magnitude (|w|, Han et al. 2015) and Taylor (|g·w|, Molchanov et al. 2017)
   pruning remove from one layer, and the loss change each removal causes, measured.
2. `quantization_lesson`: the uniform grid of `jpq_core.quantization` on a layer's weights and the rounding
   error, as SQNR = 10 log10(sum w^2 / sum (w - w_hat)^2) dB (about 6 dB per bit for a uniform grid).
3. `zero_point_lesson`: an asymmetric grid lo + s*k without an integer zero point puts no level on 0, so a
   pruned weight comes back as lo + s*round(-lo/s), up to s/2 away from zero: the network is dense again.
   With the integer zero point z = round(-lo/s) (Jacob et al. 2018), 0 is the level k = z, exactly.
4. `ste_lesson`: fitting y = Q(w)·x to y = a·x with Q = rounding to a grid. dQ/dw = 0 almost everywhere,
   so plain gradient descent never moves w; the straight-through estimator (Bengio et al. 2013) uses
   dQ/dw := 1 and trains.
5. `memory_lesson`: weight memory and BOPs of one layer over sparsity x bit width, from `jpq_core.costs`:
   BOPs = nnz * positions * b_w * b_a is exactly multiplicative; memory is not quite, because the sparse
   encodings pay index bits (bitmask: 1 per weight; CSR: 2-8 per kept weight plus fillers).
6. `dominators`: which points beat a given point in both objectives (none: it is on the Pareto front,
   `jpq_core.sweeps.pareto_mask`).
7. `recovery_lesson`: the whole network compressed without training, then repaired by each recovery method of
   `jpq_core.recovery` (batch-norm re-estimation; layer-wise least squares on the kept weights, AdaPrune,
   Hubara et al. 2021; OBC, Frantar et al. 2022), and how far each layer's output drifts from the dense
   network's: ||y_compressed - y_dense|| / ||y_dense||, which grows layer by layer without recovery.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from jpq_core.compression import compress_without_training, recover
from jpq_core.costs import FLOAT_BITS, layer_cost
from jpq_core.criteria import Magnitude, Taylor
from jpq_core.layers import first_and_last, layer_weights, prunable_layers
from jpq_core.errors import JPQError
from jpq_core.pipeline import CompressionConfig
from jpq_core.pruning import make_masks
from jpq_core.quantization import quantize_weight, ste, uniform_params

LESSON_CRITERIA = {"magnitude": Magnitude(), "taylor": Taylor("abs")}


def _with_weight(model: torch.nn.Module, layer: str, weight: torch.Tensor) -> torch.nn.Module:
    """A copy of `model` whose `layer` has `weight` (the shared model is never modified)."""
    net = copy.deepcopy(model).eval()
    with torch.no_grad():
        prunable_layers(net)[layer].weight.copy_(weight)
    return net


@torch.inference_mode()
def classifier_loss(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Mean cross-entropy and top-1 accuracy on a batch of held-out images."""
    logits = model.eval()(images)
    return {"loss": float(F.cross_entropy(logits, labels)), "top1": float((logits.argmax(1) == labels).float().mean())}


# ---- 1. what magnitude and Taylor pruning remove -----------------------------------------------------


def prune_layer_lesson(model, stats, layer: str, sparsity: float, images, labels) -> dict:
    """Prune only `layer` to `sparsity` by each lesson criterion (within the layer) and measure the damage.

    Returns per criterion: "mask" (keep-mask), "loss"/"top1" on the given images; plus "dense" metrics,
    "weight" and the "scores" of each criterion for that layer (flattened numpy arrays).
    """
    weights = layer_weights(model)
    if layer not in weights:
        raise JPQError(f"no layer {layer!r}; layers are: {', '.join(weights)}.")
    w = weights[layer]
    out = {"weight": w.flatten().numpy(), "scores": {}, "dense": classifier_loss(model, images, labels)}
    for name, criterion in LESSON_CRITERIA.items():
        scores = criterion.scores({layer: w}, stats)[layer]
        mask = make_masks({layer: scores}, {layer: w.shape}, sparsity, allocation="uniform")[layer]
        out["scores"][name] = scores.flatten().numpy()
        out[name] = dict(classifier_loss(_with_weight(model, layer, w * mask), images, labels), mask=mask.flatten().numpy())
    return out


# ---- 2. the quantization grid ------------------------------------------------------------------------


def grid_levels(w: torch.Tensor, bits: int, symmetric: bool) -> np.ndarray:
    """Every value the per-tensor quantizer of `jpq_core.quantization` can output for `w` at `bits`."""
    if bits <= 2:  # binary {-a, a} and ternary {-a, 0, a}: the levels are the values used
        return np.unique(quantize_weight(w, bits, symmetric, per_channel=False).numpy())
    scale, zero, qmin, qmax = uniform_params(w, bits, symmetric, per_channel=False)
    return (float(scale) * (np.arange(qmin, qmax + 1) - float(zero))).astype(np.float32)


def quantization_lesson(w: torch.Tensor, bits: int, symmetric: bool = True) -> dict:
    """Per-tensor quantization of `w`: the grid, the rounded weights and the rounding error."""
    w_hat = quantize_weight(w, bits, symmetric, per_channel=False)
    err = (w_hat - w).flatten().numpy()
    signal = float((w.double() ** 2).sum())
    noise = float((err.astype(np.float64) ** 2).sum())
    return {"weight": w.flatten().numpy(), "quantized": w_hat.flatten().numpy(), "error": err,
            "levels": grid_levels(w, bits, symmetric), "rmse": float(np.sqrt(np.mean(err.astype(np.float64) ** 2))),
            "max_error": float(np.abs(err).max()), "sqnr_db": 10 * np.log10(signal / noise) if noise > 0 else float("inf")}


# ---- 3. why zero must stay exact ---------------------------------------------------------------------


def _grid_without_zero_point(x: torch.Tensor, bits: int):
    lo, hi = x.min(), x.max()
    return lo, (hi - lo) / (2**bits - 1)


def grid_without_zero_point(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric min/max grid lo + s*k, k = 0 .. 2^b - 1, s = (hi - lo) / (2^b - 1), with no integer zero
    point: the naive quantizer, for contrast with `quantize_weight(..., symmetric=False)`."""
    lo, s = _grid_without_zero_point(x, bits)
    if s <= 0:
        return x.clone()
    return lo + s * torch.clamp(torch.round((x - lo) / s), 0, 2**bits - 1)


def zero_without_zero_point(x: torch.Tensor, bits: int) -> float:
    """What 0 comes back as on `x`'s grid without an integer zero point: lo + s*round(-lo/s)."""
    lo, s = _grid_without_zero_point(x, bits)
    return 0.0 if s <= 0 else float(lo + s * torch.round(-lo / s))


def zero_point_lesson(model, sparsity: float, bits: int, images, labels, geometry) -> dict:
    """Prune every layer by global magnitude (first and last kept dense), quantize each layer per tensor on
    an asymmetric grid with and without an integer zero point, and compare what pruning left.

    Returns per variant ("exact zero", "no zero point"): "nonzero" share of all weights, "loss"/"top1" on the
    images, "memory_bits" (weights, from `jpq_core.costs`), "macs"; plus "pruned_share" and per layer the
    value a pruned weight comes back as ("zero_value", layer -> float)."""

    if not 3 <= bits <= 8:
        raise JPQError(f"this lesson uses uniform grids of 3 to 8 bits, not {bits}.")
    weights = layer_weights(model)
    masks = make_masks({k: w.abs() for k, w in weights.items()}, {k: w.shape for k, w in weights.items()},
                       sparsity, "global", first_and_last(model))
    variants = {
        "exact zero": lambda x: quantize_weight(x, bits, symmetric=False, per_channel=False),
        "no zero point": lambda x: grid_without_zero_point(x, bits),
    }
    layers = prunable_layers(model)
    total = sum(w.numel() for w in weights.values())
    out = {"pruned_share": 1 - sum(int(m.sum()) for m in masks.values()) / total, "zero_value": {}}
    for variant, quantize in variants.items():
        net = copy.deepcopy(model).eval()
        net_layers = prunable_layers(net)
        nonzero, memory, macs = 0, 0.0, 0.0
        with torch.no_grad():
            for name, w in weights.items():
                q = quantize(w * masks[name])
                net_layers[name].weight.copy_(q)
                kept = q != 0
                nonzero += int(kept.sum())
                cost = layer_cost(name, layers[name], kept, bits, None, geometry, per_channel_scales=False)
                memory += cost.weight_bits
                macs += cost.macs
                if variant == "no zero point":
                    out["zero_value"][name] = zero_without_zero_point(w * masks[name], bits)
        out[variant] = dict(classifier_loss(net, images, labels), nonzero=nonzero / total, memory_bits=memory, macs=macs)
    return out


# ---- 4. the straight-through estimator ---------------------------------------------------------------


def ste_lesson(target: float, step: float, lr: float = 0.1, steps: int = 40, start: float = 0.0) -> pd.DataFrame:
    """Gradient descent on w for L(w) = mean_x (Q(w)·x - target·x)^2, Q(w) = step * round(w / step), on
    32 points x in [-1, 1], once with the true gradient (autograd through torch.round: zero) and once with
    the straight-through estimator. One row per (method, iteration): w, Q(w), loss, gradient."""
    if step <= 0:
        raise JPQError("the grid step must be positive.")
    x = torch.linspace(-1, 1, 32)
    rows = []
    for method in ("true gradient", "straight-through"):
        w = torch.tensor(float(start), requires_grad=True)
        for i in range(steps + 1):
            q_hard = step * torch.round(w / step)
            q = ste(w, q_hard.detach()) if method == "straight-through" else q_hard
            loss = ((q * x - target * x) ** 2).mean()
            w.grad = None
            loss.backward()
            grad = float(w.grad) if w.grad is not None else 0.0
            rows.append({"method": method, "iteration": i, "w": float(w.detach()), "q": float(q_hard.detach()), "loss": float(loss.detach()), "gradient": grad})
            with torch.no_grad():
                w -= lr * grad
    return pd.DataFrame(rows)


def ste_landscape(target: float, step: float, span: float = 2.0, points: int = 801) -> pd.DataFrame:
    """L(w) with and without rounding over w in [-span, span] (the staircase and the parabola it follows)."""
    w = np.linspace(-span, span, points)
    mean_x2 = float((torch.linspace(-1, 1, 32) ** 2).mean())
    q = step * np.round(w / step)
    return pd.DataFrame({"w": w, "rounded": mean_x2 * (q - target) ** 2, "float": mean_x2 * (w - target) ** 2})


# ---- 5. sparsity and bits multiply -------------------------------------------------------------------


def memory_lesson(model, layer: str, geometry, sparsities, bits, abits: int | None = 8) -> pd.DataFrame:
    """One layer's cost at each (sparsity, weight bits), magnitude-pruned within the layer.

    Columns: sparsity, wbits (32 = float), weight_bits (cost model: cheapest encoding plus scales and bias),
    values_bits (nnz * b_w, what an index-free format would need), encoding, bops, and both as ratios to the
    dense float32 layer."""
    layers = prunable_layers(model)
    if layer not in layers:
        raise JPQError(f"no layer {layer!r}; layers are: {', '.join(layers)}.")
    module = layers[layer]
    w = module.weight.detach()
    dense = layer_cost(layer, module, torch.ones_like(w, dtype=torch.bool), None, None, geometry, False)
    rows = []
    for s in sparsities:
        mask = make_masks({layer: w.abs()}, {layer: w.shape}, s, allocation="uniform", min_keep=0)[layer]
        for b in bits:
            c = layer_cost(layer, module, mask, b, abits, geometry)
            rows.append({"sparsity": s, "wbits": c.wbits, "weight_bits": c.weight_bits, "values_bits": c.nonzero * c.wbits,
                         "encoding": c.encoding, "bops": c.bops, "memory_ratio": c.weight_bits / dense.weight_bits,
                         "bops_ratio": c.bops / dense.bops,
                         "ideal_ratio": (1 - c.sparsity) * c.wbits / FLOAT_BITS})
    return pd.DataFrame(rows)


# ---- 6. reading a Pareto plot ------------------------------------------------------------------------


def dominators(xs, ys, i: int, x_lower_is_better: bool = True, y_lower_is_better: bool = True) -> list[int]:
    """Indices of the points that dominate point i (empty when i is on the front)."""
    sx = 1 if x_lower_is_better else -1
    sy = 1 if y_lower_is_better else -1
    x, y = sx * xs[i], sy * ys[i]
    return [j for j, (a, b) in enumerate(zip(xs, ys))
            if sx * a <= x and sy * b <= y and (sx * a < x or sy * b < y)]


# ---- 7. repairing a compressed network without training ---------------------------------------------------

RECOVERY_LESSON_METHODS = ("none", "bn", "lsq", "obc+bn")


@torch.inference_mode()
def layer_output_errors(dense: torch.nn.Module, net: torch.nn.Module, images: torch.Tensor) -> dict[str, float]:
    """||y_net - y_dense|| / ||y_dense|| of every prunable layer's output (before batch norm), both networks
    fed `images`: the error each layer receives plus the one it adds, so it shows how damage accumulates."""
    outputs = {}

    def keep(tag, name):
        return lambda module, args, out: outputs.__setitem__((tag, name), out.detach().double())

    handles = [layer.register_forward_hook(keep(tag, name)) for tag, model in (("dense", dense), ("net", net))
               for name, layer in prunable_layers(model).items()]
    try:
        dense.eval()(images)
        net.eval()(images)
    finally:
        for h in handles:
            h.remove()
    return {name: float((outputs["net", name] - outputs["dense", name]).norm() / outputs["dense", name].norm().clamp_min(1e-12))
            for name in prunable_layers(dense)}


def recovery_lesson(model, task, network: str, sparsity: float, wbits: int, images, labels,
                    methods=RECOVERY_LESSON_METHODS, samples: int = 128) -> dict:
    """Compress `model` (global magnitude pruning at `sparsity`, `wbits`-bit weights, 8-bit activations, no
    training) and repair it with each of `methods` (`samples` training images for calibration).

    Returns "dense" (loss/top1 on the images), "methods" (one row per method: top1, loss, seconds of the
    recovery step) and "layer_error" (method -> layer -> relative output error, `layer_output_errors`)."""
    def config(method):
        return CompressionConfig(network=network, criterion="magnitude", sparsity=sparsity, wbits=wbits, abits=8,
                                 finetune="none", steps=0, recovery=method, recovery_samples=samples).check()

    start = time.perf_counter()  # steps 1-3 once (one calibration batch, as the live view), then each recovery on a copy
    raw = compress_without_training(model, task, config("none"), calibration_batches=1, recovery=False)
    compress_s = time.perf_counter() - start
    rows, layer_error = [], {}
    for method in methods:
        timings = {}
        net = recover(copy.deepcopy(raw), model, task, config(method), timings=timings)
        with parametrize.cached():  # the weights are fixed now: quantize each layer once, not per forward
            rows.append({"method": method, **classifier_loss(net, images, labels),
                         "recovery_s": timings.get("recovery", 0.0), "total_s": compress_s + timings.get("recovery", 0.0)})
            layer_error[method] = layer_output_errors(model, net, images)
    return {"dense": classifier_loss(model, images, labels), "methods": pd.DataFrame(rows), "layer_error": layer_error}


class Lessons:
    """The Learn page's lessons on one classifier: what they share computed once (the gradient statistics
    `compress` would use, layer geometry, `held_out` test images for the loss), each lesson's result kept
    (the last 64 per lesson) and handed out as a copy, so callers may change what they get."""

    def __init__(self, model, task, held_out: int = 192, network: str = "resnet20"):
        from jpq_core.analysis import calibration_stats
        from jpq_core.costs import layer_geometry

        self.model, self.task, self.network = model, task, network
        self.stats = calibration_stats(model, task)
        self.geometry = layer_geometry(model, task.example_inputs())
        self.images, self.labels = task.test_x[:held_out], task.test_y[:held_out]
        self.layers = list(layer_weights(model))
        self._kept = {}

    def _remember(self, key, compute):
        if key not in self._kept:
            if len(self._kept) >= 5 * 64:  # five lessons, 64 results each on average
                self._kept.pop(next(iter(self._kept)))
            self._kept[key] = compute()
        return copy.deepcopy(self._kept[key])

    def prune_layer(self, layer: str, sparsity: float) -> dict:
        return self._remember(("prune", layer, sparsity), lambda: prune_layer_lesson(
            self.model, self.stats, layer, sparsity, self.images, self.labels))

    def quantize(self, layer: str, bits: int, symmetric: bool) -> dict:
        return self._remember(("quantize", layer, bits, symmetric), lambda: quantization_lesson(
            layer_weights(self.model)[layer], bits, symmetric))

    def zero_point(self, sparsity: float, bits: int) -> dict:
        return self._remember(("zero_point", sparsity, bits), lambda: zero_point_lesson(
            self.model, sparsity, bits, self.images, self.labels, self.geometry))

    def memory(self, layer: str, sparsities: tuple, bits: tuple) -> pd.DataFrame:
        return self._remember(("memory", layer, tuple(sparsities), tuple(bits)), lambda: memory_lesson(
            self.model, layer, self.geometry, sparsities, bits))

    def recovery(self, sparsity: float, wbits: int) -> dict:
        return self._remember(("recovery", sparsity, wbits), lambda: recovery_lesson(
            self.model, self.task, self.network, sparsity, wbits, self.images, self.labels))

