"""From a (compressed) PyTorch network to engine ops.

Lowering walks the module structure of the networks the project ships (StereoNet, ResNet-20, torchvision
ResNets) and their building blocks (nn.Sequential of Conv2d/Linear -> BatchNorm -> ReLU/LeakyReLU,
BasicBlock, StereoNet's ResidualBlock, adaptive average pooling). A module it does not know is a JPQError
naming the layer: the engine never silently runs something different from the network.

Per convolution or linear layer, from its parametrization (`jpq_core.compressed.MaskedQuantizedWeight`):
- integer weights k = round(w_eff / s_w[c]), with s_w the quantizer's scale (uniform 3-16 bits, from
  `uniform_params` on the masked weight) or the per-channel magnitude a (binary, ternary);
  w_eff = s_w * k is checked to hold up to float rounding;
- batch norm folded: gamma' = gamma / sqrt(var + eps), bias' = beta - mean * gamma' (+ conv bias * gamma'),
  which commutes with per-output-channel weight scales: scale[c] = s_w[c] * gamma'[c];
- the input quantizer's (s_a, z_a) from `uniform_params([lo, hi], b_a, asymmetric, per tensor)`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, ResNet

from jpq_core.compressed import raw_weight, transform
from jpq_core.engine import packing
from jpq_core.engine.ops import INTEGER_ACTIVATION_BITS, INTEGER_WEIGHT_BITS, INTO, Conv, Glue
from jpq_core.errors import JPQError
from jpq_core.models.resnet import ResNet20
from jpq_core.models.stereo import INPUT_MEAN, INPUT_STD, ResidualBlock, StereoNet
from jpq_core.quantization import uniform_params

SUPPORTED = ("Conv2d (zero padding, equal stride/padding/dilation in both directions), Linear, BatchNorm after "
             "a conv, ReLU, LeakyReLU, Identity, Sequential, BasicBlock, AdaptiveAvgPool2d(1), StereoNet, ResNet-20, "
             "torchvision ResNet")


def _square(value, what, name):
    if isinstance(value, str):
        raise JPQError(f"layer {name!r}: padding={value!r} is not supported by the engine; use an explicit number.")
    value = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if value[0] != value[1]:
        raise JPQError(f"layer {name!r}: {what} {value} differs between height and width, which the engine does not support.")
    return int(value[0])


def integer_weights(layer, name: str):
    """(k, s_w, quantizer bits, stored bits) with w_eff = s_w[c] * k exactly; (None, None, None, 32) for a
    float layer. Stored bits: b (symmetric, two's complement), b + 1 (asymmetric: k = q - z), 1 (binary)."""
    w = layer.weight.detach().float()
    co = w.shape[0]
    q = transform(layer)
    if q is None or q.bits is None:
        return None, None, None, 32
    if q.bits in (1, 2):  # binary / ternary: every kept weight of a channel is +-a
        flat = w.abs().flatten(1) if q.per_channel else w.abs().flatten().expand(co, -1)
        scale = flat.amax(1)
        stored, limit = q.bits, 1
    else:
        masked = (raw_weight(layer) * q.mask).detach().float()
        scale = uniform_params(masked, q.bits, q.symmetric, q.per_channel)[0].flatten().expand(co)
        stored, limit = (q.bits, 2 ** (q.bits - 1) - 1) if q.symmetric else (q.bits + 1, 2**q.bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).contiguous()
    view = (-1,) + (1,) * (w.dim() - 1)
    k = torch.round(w / scale.view(view))
    # The parametrization's straight-through estimator returns w + (w_hat - w), which can differ from
    # w_hat = s * k by float rounding: allow a few units in the last place.
    if not torch.allclose(k * scale.view(view), w, rtol=1e-6, atol=1e-6 * float(w.abs().max())) or k.abs().max() > limit:
        raise JPQError(f"layer {name!r}: its weights are not s * integer at {q.bits} bits; the engine cannot pack them.")
    return k.numpy().astype(np.int64), scale.numpy(), q.bits, stored


def _fold(layer, bn):
    """(gamma', bias') of batch norm folded into the layer, as PyTorch computes inference batch norm."""
    co = layer.weight.shape[0]
    conv_bias = layer.bias.detach().float() if layer.bias is not None else torch.zeros(co)
    if bn is None:
        return torch.ones(co), conv_bias
    if not isinstance(bn, (nn.BatchNorm2d, nn.BatchNorm1d)) or not bn.track_running_stats:
        raise JPQError(f"batch norm after {layer!r} needs running statistics to be folded.")
    invstd = 1.0 / torch.sqrt(bn.running_var + bn.eps)
    gamma = (bn.weight if bn.affine else torch.ones(co)).detach() * invstd
    beta = (bn.bias if bn.affine else torch.zeros(co)).detach() - bn.running_mean * gamma
    return gamma, beta + conv_bias * gamma


def _activation(layer):
    """The input quantizer as {"bits", "scale", "zero"}, or None when the input stays float."""
    aq = getattr(layer, "input_quantizer", None)
    if aq is None or aq.bits is None:
        return None
    if aq.calibrating:
        raise JPQError("activation quantizers are not calibrated; run calibration before compiling.")
    scale, zero, _, _ = uniform_params(torch.stack([aq.lo, aq.hi]), aq.bits, symmetric=False, per_channel=False)
    return {"bits": int(aq.bits), "scale": float(scale), "zero": float(zero)}


def _flatten(module) -> list[nn.Module]:
    """The modules of nested Sequentials, in order."""
    if not isinstance(module, nn.Sequential):
        return [module]
    return [m for child in module for m in _flatten(child)]


class Lowering:
    def __init__(self, model: nn.Module):
        self.names = {id(m): n for n, m in model.named_modules()}
        self.ops: list = []
        self.slots = 0

    def new_slot(self) -> int:
        self.slots += 1
        return self.slots - 1

    def name(self, module) -> str:
        return self.names.get(id(module), type(module).__name__)

    def glue(self, name, op, inputs, **params) -> int:
        out = self.new_slot()
        self.ops.append(Glue(name, op, list(inputs), out, params))
        return out

    # --- layers --------------------------------------------------------------------------------------
    def conv(self, layer, inputs, bn=None, slope=1.0, residual=None, res_scale=1.0) -> int:
        name = self.name(layer)
        if isinstance(layer, nn.Conv2d):
            if layer.padding_mode != "zeros":
                raise JPQError(f"layer {name!r}: padding_mode={layer.padding_mode!r}; the engine pads with zeros only.")
            stride, padding, dilation = (_square(getattr(layer, a), a, name) for a in ("stride", "padding", "dilation"))
            groups, linear = layer.groups, False
        else:
            stride, padding, dilation, groups, linear = 1, 0, 1, 1, True
        k, s_w, wbits, bits = integer_weights(layer, name)
        gamma, bias = _fold(layer, bn)
        act = _activation(layer)
        shape = tuple(layer.weight.shape) + (() if layer.weight.dim() == 4 else (1, 1))
        if k is None:
            flat, scale = layer.weight.detach().float().numpy().reshape(-1), gamma
        else:
            flat, scale = k.reshape(-1), torch.from_numpy(s_w) * gamma
        integer = wbits in INTEGER_WEIGHT_BITS and act is not None and act["bits"] in INTEGER_ACTIVATION_BITS
        encoding, values, index, entries = packing.encode(flat, bits)
        out = self.new_slot()
        self.ops.append(Conv(
            name=name, inputs=list(inputs), output=out, shape=shape, stride=stride, padding=padding, dilation=dilation,
            groups=groups, linear=linear, integer=bool(integer), bits=bits, encoding=encoding, entries=int(entries),
            values=values, index=index, scale=scale.float().numpy().astype(np.float32),
            bias=bias.float().numpy().astype(np.float32), act=act, residual=residual, res_scale=float(res_scale),
            slope=float(slope)))
        return out

    def sequence(self, module, inputs: list[int], residual=None, res_scale=1.0, final_slope=None) -> int:
        """Lower a Sequential (or one module). The first conv reads all `inputs` (channel concatenation);
        `residual` (times res_scale) and `final_slope` are fused into the last layer, which must be a conv."""
        mods = _flatten(module)
        x, i = inputs, 0
        while i < len(mods):
            m, last = mods[i], None
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                bn, slope, j = None, 1.0, i + 1
                if j < len(mods) and isinstance(mods[j], (nn.BatchNorm2d, nn.BatchNorm1d)):
                    bn, j = mods[j], j + 1
                if j < len(mods) and isinstance(mods[j], (nn.ReLU, nn.LeakyReLU)):
                    slope, j = (0.0 if isinstance(mods[j], nn.ReLU) else mods[j].negative_slope), j + 1
                last = j == len(mods)
                if last and final_slope is not None:
                    if slope != 1.0:
                        raise JPQError(f"layer {self.name(m)!r}: two activations in a row cannot be fused.")
                    slope = final_slope
                out = self.conv(m, x, bn, slope, residual if last else None, res_scale)
                i = j
            else:
                if len(x) > 1:
                    raise JPQError(f"layer {self.name(m)!r} ({type(m).__name__}) cannot take concatenated inputs in the engine.")
                out = self.module(m, x[0])
                i += 1
                last = i == len(mods)
                if last and (residual is not None or final_slope is not None):
                    raise JPQError(f"layer {self.name(m)!r} ({type(m).__name__}): a residual add can only be fused into a conv.")
            x = [out]
        return x[0]

    def module(self, m, x: int) -> int:
        if isinstance(m, (nn.Sequential, nn.Conv2d, nn.Linear)):
            return self.sequence(m, [x])
        if isinstance(m, nn.Identity):
            return x
        if isinstance(m, nn.ReLU):
            return self.glue(self.name(m), "relu", [x])
        if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
            return self.glue(self.name(m), "global_avg_pool", [x])
        if isinstance(m, BasicBlock):
            h = self.sequence(nn.Sequential(m.conv1, m.bn1, m.relu), [x])
            identity = self.module(m.downsample, x) if m.downsample is not None else x
            return self.sequence(nn.Sequential(m.conv2, m.bn2), [h], residual=identity, final_slope=0.0)
        if isinstance(m, ResidualBlock):
            return self.sequence(m.body, [x], residual=x, final_slope=0.0)
        raise JPQError(f"the engine cannot run layer {self.name(m)!r} ({type(m).__name__}); it supports {SUPPORTED}.")

    # --- networks ------------------------------------------------------------------------------------
    def network(self, model: nn.Module) -> tuple[int, int]:
        """Lower the whole network; returns (number of inputs, output slot)."""
        if isinstance(model, StereoNet):
            return 2, self.stereo(model)
        x = self.new_slot()
        if isinstance(model, ResNet20):
            for part in (model.stem, model.stage1, model.stage2, model.stage3):
                x = self.module(part, x)
            return 1, self.sequence(model.fc, [self.module(model.pool, x)])
        if isinstance(model, ResNet):
            x = self.sequence(nn.Sequential(model.conv1, model.bn1, model.relu), [x])
            for part in (model.maxpool, model.layer1, model.layer2, model.layer3, model.layer4):
                x = self.module(part, x)
            return 1, self.sequence(model.fc, [self.module(model.avgpool, x)])
        return 1, self.module(model, x)

    def stereo(self, net: StereoNet) -> int:
        """StereoNet.forward, with both views through the shared feature extractor as one batch."""
        left, right = self.new_slot(), self.new_slot()
        both = self.glue("normalize", "normalize_pad", [left, right], mean=INPUT_MEAN, std=INPUT_STD, multiple=8)
        half = self.module(net.features.half_res, both)
        quarter = self.module(net.features.quarter_res, half)
        half_left = self.glue("features", "batch_part", [half], part=0, parts=2)
        q_left = self.glue("features", "batch_part", [quarter], part=0, parts=2)
        q_right = self.glue("features", "batch_part", [quarter], part=1, parts=2)
        cost = self.glue("correlation", "correlation", [q_left, q_right], shifts=net.shifts)
        context = self.module(net.context, q_left)
        logits = self.sequence(net.aggregation, [cost, context], residual=cost, res_scale=float(net.cost_scale.detach()))
        coarse = self.glue("soft_argmin", "soft_argmin", [logits], factor=4.0)
        coarse_half = self.glue("upsample", "upsample2x", [coarse])
        scaled = self.glue("refine", "divide", [coarse_half], divisor=float(net.max_disparity))
        refined = self.sequence(net.refine, [half_left, scaled], residual=coarse_half, final_slope=0.0)
        full = self.glue("upsample", "upsample2x", [refined, left], crop_like=True)
        return self.glue("upsample", "channel", [full], index=0)


MAX_TARGETS = 2  # padded inputs one conv can write in its epilogue (kernels.sparse_conv: dest_a, dest_b)


def _uses(ops: list, output: int) -> dict[int, int]:
    uses = {output: 1}
    for op in ops:
        for slot in op.inputs + ([op.residual] if isinstance(op, Conv) and op.residual is not None else []):
            uses[slot] = uses.get(slot, 0) + 1
    return uses


def fuse(ops: list, output: int) -> list:
    """Let producers write their consumers' padded, quantized input buffers directly, so that no float
    tensor and no separate padding pass sits in between: a conv (or the stereo input normalisation) whose
    output is (part of) a conv's input writes that conv's buffer in its epilogue, for up to MAX_TARGETS
    consumers, also through `batch_part` 0 (StereoNet's left-view features: the first part of the batch).
    The float output is kept only where something else still reads it (`Conv.keep`). Returns the ops
    without the `batch_part` glue that fusion made unused."""
    uses = _uses(ops, output)
    producers = {op.output: op for op in ops
                 if (isinstance(op, Conv) and not op.linear) or (isinstance(op, Glue) and op.op in INTO)}
    halves = {op.output: (op.inputs[0], op.params["parts"]) for op in ops
              if isinstance(op, Glue) and op.op == "batch_part" and op.params["part"] == 0}
    links = {id(p): [] for p in producers.values()}
    dead = set()
    for consumer in ops:
        if not isinstance(consumer, Conv) or consumer.linear:
            continue
        total = consumer.groups * consumer.shape[1]
        sources, channels = [], []
        for slot in consumer.inputs:
            src, parts = halves[slot] if slot in halves and uses[slot] == 1 else (slot, 1)
            producer = producers.get(src)
            if isinstance(producer, Glue) and (len(consumer.inputs) > 1 or parts != 1):
                producer = None
            sources.append((producer, parts, slot))
            channels.append(None if producer is None else producer.shape[0] if isinstance(producer, Conv) else total)
        for i, (producer, parts, slot) in enumerate(sources):
            if producer is None or len(links[id(producer)]) >= (MAX_TARGETS if isinstance(producer, Conv) else 1):
                continue
            before, after = channels[:i], channels[i + 1:]
            if None not in before:
                c0 = sum(before)
            elif None not in after:
                c0 = total - channels[i] - sum(after)
            else:
                continue
            links[id(producer)].append((consumer, c0, parts))
            consumer.fused = consumer.fused or [0] * len(consumer.inputs)
            consumer.fused[i] = channels[i]
            uses[producer.output] -= 1
            if parts != 1:
                dead.add(slot)
    ops = [op for op in ops if op.output not in dead]
    for producer in producers.values():
        targets = [[ops.index(c), c0, parts] for c, c0, parts in links[id(producer)]]
        producer.targets = targets or None
        if isinstance(producer, Conv):
            producer.keep = uses[producer.output] > 0
    return ops


def link(ops: list) -> None:
    """Resolve each producer's `targets` to the consuming op objects (after lowering or loading)."""
    for op in ops:
        op.consumers = [ops[t[0]] for t in op.targets or []] if hasattr(op, "targets") else []


def lower(model: nn.Module):
    """(ops, number of inputs, output slot, number of slots) of `model` in eval mode."""
    if model.training:
        raise JPQError("compile the network in eval mode (model.eval()): batch norm must use its running statistics.")
    lowering = Lowering(model)
    with torch.no_grad():
        n_inputs, output = lowering.network(model)
    ops = fuse(lowering.ops, output)
    link(ops)
    return ops, n_inputs, output, lowering.slots
