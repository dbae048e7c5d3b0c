"""From a (compressed) PyTorch network to engine ops, through its traced graph.

The network's forward is traced with torch.fx (`symbolic_trace`: PyTorch's layers are leaves, everything
else, torchvision's blocks and a user's own modules included, is traced through), and every graph node
becomes an engine op:
- a convolution or linear layer -> `Conv`, which absorbs what follows it where nothing else reads the
  intermediate result: batch norm (folded), then a residual add (the other operand is read in the
  epilogue), then ReLU or LeakyReLU. A convolution of a channel concatenation reads the pieces (no copy);
  a linear layer of flatten(x, 1) reads x;
- the other supported ops -> float `Glue` (ops.GLUE): activations (ReLU, ReLU6/Hardtanh, LeakyReLU,
  Hardswish, Hardsigmoid, SiLU, Sigmoid, GELU, Tanh), batch norm no convolution absorbs, add and multiply
  (residuals, squeeze-excitation), a tensor with a number or with a constant tensor (a layer scale),
  concatenation, max and average pooling (also adaptive), mean over axes, flatten, upsampling /
  interpolation (nearest, bilinear), layer norm, reshape (view), permute / transpose, chunk / split;
- identity in inference: dropout, Identity, stochastic depth, contiguous.
Shape arithmetic (x.size(), x.shape, // * + - of sizes) is followed into reshapes, whose sizes are then
computed when the program runs (any input size): ShuffleNet's channel shuffle. A permute is not run where
what follows works on the unpermuted tensor (`_Permuted`): elementwise ops, layer norm over the permuted
last axis, and a linear layer over the channels, a 1x1 convolution: ConvNeXt's channels-last block stays NCHW.
After lowering, a per-channel multiply-add (layer scale, batch norm) that follows a convolution is folded into
its scale and bias, and an add of its output becomes its residual (`scales_folded`, `residuals_folded`).
Any other op is a JPQError naming it and its layer: the engine never runs something else than the network.
StereoNet's own ops (normalisation and padding, correlation, soft-argmin, x2 upsampling and crop) depend
on the input's shape, so its forward is written out in `Lowering.stereo`, which lowers its sub-networks
through their traced graphs.

Integer where producer and consumer are quantized, float otherwise, per op: a `Conv` runs the integer path
when its weights (1-8 bits) and its input quantizer (4-8 bits) are; glue runs in float32, and the consuming
convolution quantizes what it reads, as the fake-quantized PyTorch network does.

Per convolution or linear layer, from its compression (`compression_of`):
- integer weights k = round(w_eff / s_w[c]), with s_w the quantizer's scale (uniform 3-16 bits, from
  `uniform_params` on the masked weight) or the per-channel magnitude a (binary, ternary);
  w_eff = s_w * k is checked to hold up to float rounding;
- batch norm folded: gamma' = gamma / sqrt(var + eps), bias' = beta - mean * gamma' (+ conv bias * gamma'),
  which commutes with per-output-channel weight scales: scale[c] = s_w[c] * gamma'[c];
- the input quantizer's (s_a, z_a) from `uniform_params([lo, hi], b_a, asymmetric, per tensor)`.
"""

from __future__ import annotations

import operator
import threading
from typing import NamedTuple

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from jpq_core.compressed import raw_weight, transform
from jpq_core.engine import packing
from jpq_core.engine.constants import mark_constant_channels
from jpq_core.engine.unread import mark_unread_channels
from jpq_core.engine.ops import (INTEGER_ACTIVATION_BITS, INTEGER_WEIGHT_BITS, INTO, INTO_ACCEPTS, SHAPE_ARITHMETIC,
                                 Conv, Glue)
from jpq_core.errors import JPQError
from jpq_core.models.stereo import INPUT_MEAN, INPUT_STD, StereoNet
from jpq_core.quantization import uniform_params

SUPPORTED = ("Conv2d (zero padding), Linear, BatchNorm, LayerNorm, ReLU, ReLU6, Hardtanh, LeakyReLU, Hardswish, "
             "Hardsigmoid, SiLU, Sigmoid, GELU, Tanh, add, multiply, cat, max/avg pooling (also adaptive), mean, flatten, "
             "view/reshape, permute/transpose, chunk/split, interpolate/Upsample (nearest, bilinear), Dropout, Identity")


def compression_of(layer):
    """(weight quantizer or None, unmasked weight, input quantizer or None) of a conv or linear layer. The
    weight quantizer has mask, bits, symmetric, per_channel; the input quantizer bits, lo, hi, calibrating."""
    return transform(layer), raw_weight(layer), getattr(layer, "input_quantizer", None)


def _pair(value) -> tuple[int, int]:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value), int(value))


def _conv_geometry(layer, name):
    """(stride, padding, dilation) of a Conv2d as (height, width) pairs; padding="same"/"valid" made explicit."""
    if layer.padding_mode != "zeros":
        raise JPQError(f"layer {name!r}: padding_mode={layer.padding_mode!r}; the engine pads with zeros only.")
    padding = layer.padding
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        total = [d * (k - 1) for d, k in zip(_pair(layer.dilation), _pair(layer.kernel_size))]
        if any(t % 2 for t in total):
            raise JPQError(f"layer {name!r}: padding='same' with an even kernel pads one side more, which the engine "
                           "does not support; use an odd kernel or explicit padding.")
        padding = tuple(t // 2 for t in total)
    return _pair(layer.stride), _pair(padding), _pair(layer.dilation)


def integer_weights(layer, name: str):
    """(k, s_w, quantizer bits, stored bits) with w_eff = s_w[c] * k exactly; (None, None, None, 32) for a
    float layer. Stored bits: b (symmetric, two's complement), b + 1 (asymmetric: k = q - z), 1 (binary)."""
    w = layer.weight.detach().float()
    co = w.shape[0]
    q, original, _ = compression_of(layer)
    if q is None or q.bits is None:
        return None, None, None, 32
    if q.bits in (1, 2):  # binary / ternary: every kept weight of a channel is +-a
        flat = w.abs().flatten(1) if q.per_channel else w.abs().flatten().expand(co, -1)
        scale = flat.amax(1)
        stored, limit = q.bits, 1
    else:
        masked = (original * q.mask).detach().float()
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
    gamma, beta = _bn_affine(bn)
    return gamma, beta + conv_bias * gamma


def _bn_affine(bn):
    """Inference batch norm as y = gamma * x + beta per channel."""
    if not bn.track_running_stats or bn.running_var is None:
        raise JPQError(f"batch norm {bn!r} needs running statistics for inference.")
    invstd = 1.0 / torch.sqrt(bn.running_var + bn.eps)
    gamma = (bn.weight if bn.affine else torch.ones_like(invstd)).detach() * invstd
    beta = (bn.bias if bn.affine else torch.zeros_like(invstd)).detach() - bn.running_mean * gamma
    return gamma.float(), beta.float()


def activation_quantization(layer):
    """The input quantizer as {"bits", "scale", "zero"}, or None when the input stays float."""
    aq = compression_of(layer)[2]
    if aq is None or aq.bits is None:
        return None
    if aq.calibrating:
        raise JPQError("activation quantizers are not calibrated; run calibration before compiling.")
    scale, zero, _, _ = uniform_params(torch.stack([aq.lo, aq.hi]), aq.bits, symmetric=False, per_channel=False)
    return {"bits": int(aq.bits), "scale": float(scale), "zero": float(zero)}


# --- the traced graph ---------------------------------------------------------------------------------
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid,
                      nn.GELU, nn.Tanh)
POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout)
LEAVES = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.Flatten, nn.Upsample) + ACTIVATION_MODULES \
    + POOL_MODULES + IDENTITY_MODULES
ADDS, MULS = (operator.add, operator.iadd, torch.add), (operator.mul, operator.imul, torch.mul)
ARITHMETIC = ("add", "add_", "iadd", "mul", "mul_", "imul", "truediv", "div", "sub", "rsub")
IDENTITY_FUNCTIONS = ("dropout", "dropout1d", "dropout2d", "alpha_dropout", "stochastic_depth")


class _Tracer(fx.Tracer):
    """PyTorch's layers (compressed ones included) are leaves; everything else is traced through.

    torch.fx traces by patching `nn.Module.__call__` and `__getattr__` for the whole process while it runs, so in
    the app's server (one thread per session) another session's forward, or its compilation, went through this
    tracer and failed with `NameError: module is not installed as a submodule` (issue 22, found by
    scripts/many_users.py: 3 of 4 sessions on Depth maps). Calls from other threads are passed through
    untouched here, and `trace` lets one thread trace at a time (two overlapping patchers would restore each
    other's patches, leaving `Module.__call__` patched for good)."""

    def __init__(self):
        super().__init__()
        self.thread = threading.get_ident()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, LEAVES) or (not isinstance(m, nn.Sequential) and super().is_leaf_module(m, qualname))

    def call_module(self, m, forward, args, kwargs):
        if threading.get_ident() != self.thread:  # another thread's module, called while this one traces
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if threading.get_ident() != self.thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


_TRACING = threading.Lock()  # one torch.fx trace at a time in this process (see _Tracer)


class Traced(NamedTuple):
    """A module's forward as a torch.fx graph, with the module its nodes name. Not an fx.GraphModule: lowering
    reads the graph and never runs it, and building a GraphModule (Python code generated and compiled) took
    two thirds of the trace's time on every live slider move."""

    graph: fx.Graph
    root: nn.Module

    def named_modules(self):
        return self.root.named_modules()


def trace(module: nn.Module, label: str) -> Traced:
    try:
        with _TRACING:
            graph = _Tracer().trace(module)
    except Exception as exc:  # torch.fx raises many kinds on forwards it cannot follow
        raise JPQError(f"the engine could not trace {label}'s forward with torch.fx ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); networks with data-dependent control "
                       "flow cannot be compiled.") from None
    return Traced(graph, module)


def _arg(node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _fn(node) -> str:
    """What a call_function / call_method node calls, by name ("relu", "add", "view", ...)."""
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", str(node.target))


class _Shape:
    """A value computed from tensors' shapes, followed so that a reshape can compute its sizes when it runs:
    x.size() or x.shape (`index` None), one size x.size(i) or x.shape[i], or integer arithmetic on sizes and
    numbers (`op`, one of ops.SHAPE_ARITHMETIC, on two `operands`). Only reshapes read one."""

    def __init__(self, source=None, index=None, op=None, operands=()):
        self.source, self.index, self.op, self.operands = source, index, op, tuple(operands)


class _Permuted:
    """A tensor with its axes reordered, the permute not yet run: slot `base` seen with view axis i = base axis
    axes[i] (axes past len(axes) in place); `rank`, its number of axes where known (a permute names them all).
    Elementwise ops, layer norm and a linear layer over the channels run on the base, so that ConvNeXt's
    NCHW -> NHWC -> LayerNorm -> Linear -> GELU -> Linear -> NCHW block stays NCHW with 1x1 convolutions; the
    permute runs (`Lowering.materialized`) only when anything else reads the tensor."""

    def __init__(self, base: int, axes, rank: int | None, name: str):
        self.base, self.axes, self.rank, self.name = base, tuple(axes), rank, name
        self.slot = None  # the permute's output, once it runs

    def base_axis(self, axis: int) -> int | None:
        """The base axis of view axis `axis` (None: a negative axis of unknown rank)."""
        if axis < 0:
            if self.rank is None:
                return None
            axis += self.rank
        return self.axes[axis] if axis < len(self.axes) else axis


class _Pieces:
    """torch.chunk(x, chunks, dim) or torch.split(x, sizes, dim) of slot x: each item read becomes `split` glue."""

    def __init__(self, slot: int, dim: int, chunks=None, sizes=None):
        self.slot, self.dim, self.chunks, self.sizes = slot, dim, chunks, sizes


def _tensor_args(node, args) -> list:
    """The values of `node`'s arguments that are computed tensors (slots or permuted tensors)."""
    return [v for v, a in zip(args, node.args) if isinstance(a, fx.Node) and isinstance(v, (int, _Permuted))
            and not isinstance(v, bool)]


def _elementwise(node, module) -> bool:
    """Whether the node computes each output element from the inputs' elements at the same place alone
    (activations; arithmetic on tensors and numbers), so that it can run on permuted tensors' bases."""
    if module is not None:
        return isinstance(module, ACTIVATION_MODULES)
    return node.op != "get_attr" and (_function_activation(node) is not None or _fn(node) in ARITHMETIC)


def _channels_last(layer, x) -> bool:
    """Whether `layer` is a linear layer over the channels of an NCHW tensor x seen as NHWC (a 1x1 convolution)."""
    return isinstance(layer, nn.Linear) and isinstance(x, _Permuted) and x.rank == 4 and x.base_axis(-1) == 1


def _parameter(mods, target: str) -> torch.Tensor:
    """The parameter or buffer a get_attr node reads (a layer scale, a layer norm's weights), detached."""
    owner, _, attr = target.rpartition(".")
    return getattr(mods[owner], attr).detach()


def _numbers(t) -> list | None:
    """A constant tensor's values as a flat list (JSON for glue parameters); None stays None."""
    return None if t is None else t.detach().float().flatten().tolist()


def _shape_value(node, fn, args) -> _Shape | None:
    """x.size(), x.shape, their items, and integer arithmetic of sizes and numbers, as _Shape (None: the node
    computes none of these)."""
    if fn == "size" or (fn == "getattr" and len(node.args) > 1 and node.args[1] == "shape"):
        return _Shape(node.args[0], node.args[1] if fn == "size" and len(node.args) > 1 else None)
    if fn == "getitem" and isinstance(args[0], _Shape) and args[0].index is None and args[0].op is None:
        return _Shape(args[0].source, node.args[1])
    if fn in SHAPE_ARITHMETIC and len(args) == 2 and any(isinstance(a, _Shape) for a in args) and all(
            isinstance(v, _Shape) if isinstance(a, fx.Node) else isinstance(a, int) and not isinstance(a, bool)
            for v, a in zip(args, node.args)):
        return _Shape(op=fn, operands=args)
    return None


def _composed(first, second) -> tuple:
    """The permutation of permuting by `first`, then by `second` (each extended by the axes it leaves in place)."""
    n = max(len(first), len(second))
    a, b = (tuple(p) + tuple(range(len(p), n)) for p in (first, second))
    return tuple(a[i] for i in b)


def _is_identity(node, module) -> bool:
    if node.op == "call_module":
        return isinstance(module, IDENTITY_MODULES)
    if node.op == "call_method":
        return node.target == "contiguous"
    if node.op == "call_function" and _fn(node) in IDENTITY_FUNCTIONS:
        training = _arg(node, 3, "training") if _fn(node) == "stochastic_depth" else _arg(node, 2, "training", True)
        return training is False
    return False


def _module_activation(m) -> tuple[str, float, float]:
    """(kind, a, b) of an activation layer for ops._activation."""
    if isinstance(m, nn.ReLU):
        return "relu", 0.0, 0.0
    if isinstance(m, nn.Hardtanh):  # also ReLU6
        return "clamp", float(m.min_val), float(m.max_val)
    if isinstance(m, nn.LeakyReLU):
        return "leaky_relu", float(m.negative_slope), 0.0
    if isinstance(m, nn.GELU):
        return ("gelu_tanh" if m.approximate == "tanh" else "gelu"), 0.0, 0.0
    for cls, kind in ((nn.Hardswish, "hardswish"), (nn.Hardsigmoid, "hardsigmoid"), (nn.SiLU, "silu"),
                      (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh")):
        if isinstance(m, cls):
            return kind, 0.0, 0.0
    raise JPQError(f"no engine activation for {type(m).__name__}.")


def _function_activation(node):
    """(kind, a, b) of an activation function or method call, or None when the node is none."""
    name = _fn(node)
    if name in ("relu", "relu_"):
        return "relu", 0.0, 0.0
    if name == "relu6":
        return "clamp", 0.0, 6.0
    if name == "hardtanh":
        return "clamp", float(_arg(node, 1, "min_val", -1.0)), float(_arg(node, 2, "max_val", 1.0))
    if name == "leaky_relu":
        return "leaky_relu", float(_arg(node, 1, "negative_slope", 0.01)), 0.0
    if name == "gelu":
        return ("gelu_tanh" if _arg(node, 1, "approximate", "none") == "tanh" else "gelu"), 0.0, 0.0
    if name in ("hardswish", "hardsigmoid", "silu", "sigmoid", "tanh"):
        return name, 0.0, 0.0
    return None


class Lowering:
    def __init__(self, model: nn.Module):
        self.names = {id(m): n for n, m in model.named_modules()}
        self.ops: list = []
        self.slots = 0
        self.concat_parts: dict[int, list[int]] = {}  # slot of a channel concatenation -> its pieces
        self.flattened: dict[int, int] = {}  # slot of flatten(x, 1) -> slot of x
        self.root = model
        self.origins: dict[int, str] = {}  # slot -> name of the node of model's own traced graph that it holds

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
    def conv(self, layer, inputs, bn=None, slope=1.0, residual=None, res_scale=1.0, pointwise=False) -> int:
        """A Conv op of a convolution or linear layer; `pointwise`: a linear layer over the channels of NCHW
        input, run as a 1x1 convolution."""
        name = self.name(layer)
        if isinstance(layer, nn.Conv2d):
            (stride, padding, dilation), groups, linear = _conv_geometry(layer, name), layer.groups, False
        else:
            stride, padding, dilation, groups, linear = (1, 1), (0, 0), (1, 1), 1, not pointwise
        k, s_w, wbits, bits = integer_weights(layer, name)
        gamma, bias = _fold(layer, bn)
        act = activation_quantization(layer)
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

    # --- a traced module -----------------------------------------------------------------------------
    def graph(self, module: nn.Module, inputs: list[int], residual=None, res_scale=1.0, final_slope=None,
              traced: Traced | None = None) -> int:
        """Lower `module`'s traced forward, its inputs in the slots `inputs` (several for one placeholder: their
        channel concatenation); `residual` (times res_scale) and `final_slope` are fused into the convolution
        that produces the output. Returns the output slot."""
        label = self.names.get(id(module)) or type(module).__name__
        gm = traced or trace(module, label)
        mods = dict(gm.named_modules())
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) == 1 and len(inputs) > 1:
            inputs = [self.concat(f"{label}.input", inputs, 1)]
        if len(placeholders) != len(inputs):
            raise JPQError(f"{label}'s forward takes {len(placeholders)} inputs; the engine was given {len(inputs)}.")
        alias = {}  # identity nodes -> what they pass on
        for node in gm.graph.nodes:
            if _is_identity(node, mods.get(node.target) if node.op == "call_module" else None):
                alias[node] = node.args[0]

        def real(n):
            while n in alias:
                n = alias[n]
            return n

        users = {}
        for node in gm.graph.nodes:
            if node in alias:
                continue
            for used in node.all_input_nodes:
                users.setdefault(real(used), []).append(node)

        def sole_user(n):
            u = users.get(n, [])
            return u[0] if len(u) == 1 and sum(real(a) is n for a in u[0].all_input_nodes) == 1 else None

        chains = self._chains(gm, mods, real, sole_user)
        output = next(n for n in gm.graph.nodes if n.op == "output")
        result = output.args[0]
        if not isinstance(result, fx.Node):
            raise JPQError(f"{label}'s forward returns {type(result).__name__}, not one tensor; the engine runs "
                           "networks whose output is a single tensor.")
        result = real(result)
        if residual is not None or final_slope is not None:
            chain = chains.get(result)
            if chain is None or (residual is not None and chain["residual"] is not None) or chain["slope"] != 1.0:
                raise JPQError(f"{label}: a residual add or activation can only be fused into a conv that ends it.")
            if residual is not None:
                chain["residual"], chain["res_scale"] = residual, res_scale
            if final_slope is not None:
                chain["slope"] = final_slope
        inside = {n for c in chains.values() for n in c["members"]}
        values = dict(zip(placeholders, inputs))
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output") or node in alias or node in inside:
                continue
            if node in chains:
                values[node] = self._chain(chains[node], values, real)
            else:
                values[node] = self.node(node, mods, list(fx.node.map_arg(node.args, lambda a: values.get(real(a), a))),
                                         real, values)
        out = self.materialized(values[result])
        if not isinstance(out, int):
            raise JPQError(f"{label}'s forward returns a shape, not a tensor.")
        if module is self.root:
            for node, value in values.items():
                if isinstance(value, int):
                    self.origins.setdefault(value, node.name)
        return out

    def _chains(self, gm, mods, real, sole_user) -> dict:
        """Convolution chains, keyed by the node that ends each: conv -> [batch norm] -> [+ residual] ->
        [ReLU / LeakyReLU], every intermediate result read by the next step alone."""
        chains = {}
        for node in gm.graph.nodes:
            if node.op != "call_module" or not isinstance(mods[node.target], (nn.Conv2d, nn.Linear)):
                continue
            chain = {"conv": node, "layer": mods[node.target], "bn": None, "residual": None, "res_scale": 1.0,
                     "slope": 1.0, "members": [node]}
            nxt = sole_user(node)
            if nxt is not None and nxt.op == "call_module" and isinstance(mods[nxt.target], (nn.BatchNorm1d, nn.BatchNorm2d)):
                chain["bn"] = mods[nxt.target]
                chain["members"].append(nxt)
            chains[chain["members"][-1]] = chain
        for node in gm.graph.nodes:
            if not (node.op == "call_function" and node.target in ADDS or node.op == "call_method" and node.target in ("add", "add_")):
                continue
            if len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1 or not all(isinstance(a, fx.Node) for a in node.args):
                continue
            a, b = real(node.args[0]), real(node.args[1])
            for mine, other in ((a, b), (b, a)):
                chain = chains.get(mine)
                if chain is not None and other is not mine and sole_user(mine) is node:
                    chain["residual"] = other
                    chain["members"].append(node)
                    chains[node] = chains.pop(mine)
                    break
        for end in list(chains):
            nxt = sole_user(end)
            if nxt is None:
                continue
            if nxt.op == "call_module" and isinstance(mods[nxt.target], ACTIVATION_MODULES):
                kind, a, _ = _module_activation(mods[nxt.target])
            elif nxt.op in ("call_function", "call_method"):
                kind, a, _ = _function_activation(nxt) or (None, 0, 0)
            else:
                continue
            if kind in ("relu", "leaky_relu"):
                chain = chains.pop(end)
                chain["slope"] = 0.0 if kind == "relu" else a
                chain["members"].append(nxt)
                chains[nxt] = chain
        for end, chain in chains.items():
            chain["members"] = [m for m in chain["members"] if m is not end]
        return chains

    def _chain(self, chain, values, real):
        x = values[real(chain["conv"].args[0])]
        residual = chain["residual"]
        if isinstance(residual, fx.Node):
            residual = values[real(residual)]
        if _channels_last(chain["layer"], x) and chain["bn"] is None and (
                residual is None or isinstance(residual, _Permuted) and (residual.axes, residual.rank) == (x.axes, x.rank)):
            out = self.conv(chain["layer"], [x.base], None, chain["slope"], None if residual is None else residual.base,
                            chain["res_scale"], pointwise=True)
            return _Permuted(out, x.axes, x.rank, x.name)
        x, residual = self.materialized(x), self.materialized(residual)
        if isinstance(chain["layer"], nn.Linear):
            inputs = [self.flattened.get(x, x)]
        else:
            inputs = self.concat_parts.get(x, [x])
        return self.conv(chain["layer"], inputs, chain["bn"], chain["slope"], residual, chain["res_scale"])

    def materialized(self, value):
        """The slot of a value: a permuted tensor's permute is run (once), anything else is passed on."""
        if not isinstance(value, _Permuted):
            return value
        if value.slot is None:
            value.slot = self.glue(value.name, "permute", [value.base], axes=list(value.axes))
        return value.slot

    def concat(self, name, inputs, dim) -> int:
        out = self.glue(name, "concat", inputs, dim=dim)
        if dim == 1:
            self.concat_parts[out] = [p for i in inputs for p in self.concat_parts.get(i, [i])]
        return out

    def node(self, node, mods, args, real, values):
        """The value of one graph node's result: a slot, or a permuted tensor (_Permuted), a shape value (_Shape),
        a chunked tensor (_Pieces), a constant tensor (a parameter the graph reads)."""
        module = mods.get(node.target) if node.op == "call_module" else None
        where = f"layer {self.name(module)!r} ({type(module).__name__})" if module is not None \
            else f"{_fn(node) if node.op != 'get_attr' else 'constant ' + str(node.target)} (graph node {node.name!r})"
        name = self.name(module) if module is not None else node.name

        def unsupported(why=""):
            return JPQError(f"the engine cannot run {where}{': ' + why if why else ''}; it supports {SUPPORTED}.")

        def tensor(i, permuted=False):
            """Argument i, a tensor the engine computes: its slot (or, with `permuted`, a _Permuted as it is)."""
            value = args[i] if i < len(args) else None
            if isinstance(value, torch.Tensor):
                raise unsupported("constant tensors inside the network (other than a multiplier, addend or layer "
                                  "norm weights)")
            if not isinstance(value, (int, _Permuted)) or isinstance(value, bool) or not isinstance(node.args[i], fx.Node):
                raise unsupported("an input is not a tensor the engine computes")
            return value if permuted else self.materialized(value)

        def argument(i, key, default=None):
            value = _arg(node, i, key, default)
            return values.get(real(value), value) if isinstance(value, fx.Node) else value

        if node.op == "get_attr":
            return _parameter(mods, node.target)
        if (lead := self._permuted_elementwise(node, module, args)) is not None:
            bases = [a.base if isinstance(a, _Permuted) else a for a in args]
            return _Permuted(self.node(node, mods, bases, real, values), lead.axes, lead.rank, lead.name)
        if isinstance(module, nn.LayerNorm):
            return self._layer_norm(name, tensor(0, True), module.normalized_shape, module.weight, module.bias, module.eps)
        if module is not None:
            return self._module(module, name, tensor(0), unsupported)
        fn = _fn(node)
        if (shape := _shape_value(node, fn, args)) is not None:
            return shape
        if fn in ("view", "reshape"):
            return self._reshape(node, name, tensor(0, True), values, real, unsupported)
        if any(isinstance(a, _Shape) for a in args):
            raise unsupported("it computes with the tensor's shape, which the engine follows into reshapes only")
        if fn in ("permute", "transpose"):
            return self._permute(node, fn, name, tensor(0, True), unsupported)
        if fn == "layer_norm":
            return self._layer_norm(name, tensor(0, True), argument(1, "normalized_shape"), argument(2, "weight"),
                                    argument(3, "bias"), argument(4, "eps", 1e-5))
        if fn in ("chunk", "split"):
            return self._pieces(node, fn, tensor(0), unsupported)
        if fn == "getitem" and isinstance(args[0], _Pieces):
            pieces, index = args[0], node.args[1]
            if not isinstance(index, int) or index < 0:
                raise unsupported("a chunk read by a negative or computed index")
            return self.glue(name, "split", [pieces.slot], dim=pieces.dim, index=index, chunks=pieces.chunks,
                             sizes=pieces.sizes)
        args = [self.materialized(a) for a in args]  # what follows reads tensors as they are
        kind = _function_activation(node)
        if kind is not None:
            return self.glue(name, "activation", [tensor(0)], kind=kind[0], a=kind[1], b=kind[2])
        if fn in ARITHMETIC:
            return self._arithmetic(node, fn, args, name, unsupported)
        if fn in ("cat", "concat"):
            parts = node.args[0] if node.args else node.kwargs.get("tensors")
            if not isinstance(parts, (list, tuple)) or not all(isinstance(p, fx.Node) for p in parts):
                raise unsupported("its inputs are not tensors")
            slots = [self.materialized(values.get(real(p))) for p in parts]
            if not all(isinstance(s, int) for s in slots):
                raise unsupported("an input is not a tensor the engine computes")
            dim = _arg(node, 1, "dim", 0)
            return self.concat(name, slots, dim)
        if fn == "flatten":
            return self._flatten(name, tensor(0), _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        if fn == "mean":
            dims = _arg(node, 1, "dim")
            if dims is None:
                raise unsupported("mean over all axes")
            return self.glue(name, "mean", [tensor(0)], dims=list(dims) if isinstance(dims, (list, tuple)) else [dims],
                             keepdim=bool(_arg(node, 2, "keepdim", False)))
        if fn in ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d"):
            return self._function_pool(node, fn, name, tensor(0), unsupported)
        if fn == "interpolate":
            return self._resize(name, tensor(0), _arg(node, 1, "size"), _arg(node, 2, "scale_factor"),
                                _arg(node, 3, "mode", "nearest"), _arg(node, 4, "align_corners"),
                                _arg(node, 5, "recompute_scale_factor"), _arg(node, 6, "antialias", False), unsupported)
        if fn == "batch_norm":
            raise unsupported("batch norm as a function; use nn.BatchNorm2d")
        raise unsupported()

    def _permuted_elementwise(self, node, module, args) -> _Permuted | None:
        """The first permuted input of an elementwise node whose tensor inputs are all permuted alike (same
        axes, and the same known rank if several: broadcasting aligns axes from the right), without constant
        tensors: the node then runs on their bases. None otherwise."""
        tensors = _tensor_args(node, args)
        lead = next((t for t in tensors if isinstance(t, _Permuted)), None)
        if lead is None or not _elementwise(node, module) or any(isinstance(a, torch.Tensor) for a in args):
            return None
        alike = all(isinstance(t, _Permuted) and t.axes == lead.axes and (len(tensors) == 1 or
                                                                         (t.rank == lead.rank and t.rank is not None))
                    for t in tensors)
        return lead if alike else None

    def _permute(self, node, fn, name, x, unsupported):
        """permute / transpose of x: a _Permuted (the permute runs only where something needs it moved), or x
        itself when it undoes x's permute."""
        rank = x.rank if isinstance(x, _Permuted) else None
        if fn == "permute":
            dims = _arg(node, 1, "dims")
            dims = list(dims) if isinstance(dims, (list, tuple)) else list(node.args[1:])
            if not all(isinstance(d, int) for d in dims) or sorted(d % len(dims) for d in dims) != list(range(len(dims))):
                raise unsupported("its axes are not a permutation given as numbers")
            rank, axes = len(dims), [d % len(dims) for d in dims]
        else:
            pair = [_arg(node, 1, "dim0"), _arg(node, 2, "dim1")]
            if not all(isinstance(d, int) for d in pair) or (min(pair) < 0 and rank is None):
                raise unsupported("a transpose of axes given by negative or computed numbers")
            d0, d1 = (d % rank if d < 0 else d for d in pair)
            axes = list(range(max(d0, d1) + 1))
            axes[d0], axes[d1] = d1, d0
        base = x
        if isinstance(x, _Permuted):
            base, axes, rank = x.base, _composed(x.axes, axes), rank or x.rank
        return base if tuple(axes) == tuple(range(len(axes))) else _Permuted(base, axes, rank, name)

    def _layer_norm(self, name, x, normalized_shape, weight, bias, eps):
        """Layer norm over the last len(normalized_shape) axes; of a permuted tensor over its last axis, over
        that axis of its base (ConvNeXt's channels), the result staying permuted."""
        count = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
        params = dict(weight=_numbers(weight), bias=_numbers(bias), eps=float(eps))
        if isinstance(x, _Permuted) and count == 1 and x.base_axis(-1) is not None:
            out = self.glue(name, "layer_norm", [x.base], axes=[x.base_axis(-1)], **params)
            return _Permuted(out, x.axes, x.rank, x.name)
        return self.glue(name, "layer_norm", [self.materialized(x)], axes=list(range(-count, 0)), **params)

    def _reshape(self, node, name, x, values, real, unsupported) -> int:
        """view / reshape: x.view(x.size(0), -1) is a flatten (which a linear layer reads through); any other
        shape is `reshape` glue, its sizes numbers or computed from tensors' shapes when it runs."""
        given = _arg(node, 1, "shape")
        sizes = []
        for size in (list(given) if isinstance(given, (list, tuple)) else list(node.args[1:])):
            value = values.get(real(size)) if isinstance(size, fx.Node) else size
            if isinstance(size, fx.Node) and not isinstance(value, _Shape) or isinstance(value, bool) \
                    or not isinstance(value, (int, _Shape)):
                raise unsupported("a size that is neither a number nor computed from tensors' shapes")
            sizes.append(value)
        batch = sizes[0] if sizes else None
        x = self.materialized(x)
        if len(sizes) == 2 and sizes[1] == -1 and isinstance(batch, _Shape) and batch.op is None and batch.index == 0 \
                and real(batch.source) is real(node.args[0]):
            return self._flatten(name, x, 1, -1)
        sources = [x]
        shape = [self._size(size, sources, values, real, unsupported) for size in sizes]
        return self.glue(name, "reshape", sources, shape=shape)

    def _size(self, size, sources: list, values, real, unsupported):
        """A reshape's size as ops.shape_value reads it; the slots whose shapes it reads are added to `sources`."""
        if not isinstance(size, _Shape):
            return size
        if size.op is not None:
            return [size.op] + [self._size(s, sources, values, real, unsupported) for s in size.operands]
        if not isinstance(size.index, int):
            raise unsupported("a reshape by a whole shape or a slice of one")
        value, axis = values.get(real(size.source)), size.index
        if isinstance(value, _Permuted):
            mapped = value.base_axis(axis)
            value, axis = (value.base, mapped) if mapped is not None else (self.materialized(value), axis)
        if not isinstance(value, int) or isinstance(value, bool):
            raise unsupported("a size of something that is not a tensor the engine computes")
        if value not in sources:
            sources.append(value)
        return ["dim", sources.index(value), axis]

    def _pieces(self, node, fn, x, unsupported) -> _Pieces:
        """torch.chunk / torch.split of x (its items become `split` glue)."""
        dim = _arg(node, 2, "dim", 0)
        if fn == "chunk":
            chunks, sizes = _arg(node, 1, "chunks"), None
        else:
            chunks, sizes = None, _arg(node, 1, "split_size_or_sections", node.kwargs.get("split_size"))
            sizes = list(sizes) if isinstance(sizes, (list, tuple)) else sizes
        numbers = [dim, chunks] if fn == "chunk" else [dim] + (sizes if isinstance(sizes, list) else [sizes])
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in numbers):
            raise unsupported("sizes or axis given by computed values")
        return _Pieces(x, dim, chunks, sizes)

    def _module(self, m, name, x, unsupported) -> int:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return self.conv(m, [self.flattened.get(x, x)] if isinstance(m, nn.Linear) else self.concat_parts.get(x, [x]))
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            gamma, beta = _bn_affine(m)
            return self.glue(name, "affine", [x], scale=gamma.tolist(), shift=beta.tolist())
        if isinstance(m, ACTIVATION_MODULES):
            kind, a, b = _module_activation(m)
            return self.glue(name, "relu", [x]) if kind == "relu" else self.glue(name, "activation", [x], kind=kind, a=a, b=b)
        if isinstance(m, nn.Flatten):
            return self._flatten(name, x, m.start_dim, m.end_dim)
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            if getattr(m, "return_indices", False):
                raise unsupported("pooling indices")
            return self._adaptive(name, x, "avg" if isinstance(m, nn.AdaptiveAvgPool2d) else "max", m.output_size)
        if isinstance(m, nn.MaxPool2d):
            if m.return_indices:
                raise unsupported("pooling indices")
            return self._pool(name, x, "max", m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, True)
        if isinstance(m, nn.AvgPool2d):
            if m.divisor_override:
                raise unsupported("divisor_override")
            return self._pool(name, x, "avg", m.kernel_size, m.stride, m.padding, 1, m.ceil_mode, m.count_include_pad)
        if isinstance(m, nn.Upsample):
            return self._resize(name, x, m.size, m.scale_factor, m.mode, m.align_corners, m.recompute_scale_factor,
                                False, unsupported)
        raise unsupported()

    def _flatten(self, name, x, start, end) -> int:
        out = self.glue(name, "flatten", [x], start=int(start), end=int(end))
        if start == 1 and end == -1:
            self.flattened[out] = self.flattened.get(x, x)
        return out

    def _adaptive(self, name, x, mode, size) -> int:
        size = list(size) if isinstance(size, (tuple, list)) else [size, size]
        if mode == "avg" and size == [1, 1]:
            return self.glue(name, "global_avg_pool", [x])
        return self.glue(name, "pool", [x], mode=mode, adaptive=size)

    def _pool(self, name, x, mode, kernel, stride, padding, dilation, ceil_mode, count_include_pad) -> int:
        kernel = _pair(kernel)
        return self.glue(name, "pool", [x], mode=mode, kernel=kernel, stride=_pair(stride) if stride else kernel,
                         padding=_pair(padding), dilation=_pair(dilation), ceil_mode=bool(ceil_mode),
                         count_include_pad=bool(count_include_pad))

    def _function_pool(self, node, fn, name, x, unsupported) -> int:
        if fn.startswith("adaptive"):
            return self._adaptive(name, x, "avg" if "avg" in fn else "max", _arg(node, 1, "output_size"))
        if fn == "max_pool2d":
            if _arg(node, 6, "return_indices", False):
                raise unsupported("pooling indices")
            return self._pool(name, x, "max", _arg(node, 1, "kernel_size"), _arg(node, 2, "stride"),
                              _arg(node, 3, "padding", 0), _arg(node, 4, "dilation", 1), _arg(node, 5, "ceil_mode", False), True)
        if _arg(node, 6, "divisor_override"):
            raise unsupported("divisor_override")
        return self._pool(name, x, "avg", _arg(node, 1, "kernel_size"), _arg(node, 2, "stride"), _arg(node, 3, "padding", 0),
                          1, _arg(node, 4, "ceil_mode", False), _arg(node, 5, "count_include_pad", True))

    def _resize(self, name, x, size, scale_factor, mode, align_corners, recompute, antialias, unsupported) -> int:
        if mode not in ("nearest", "nearest-exact", "bilinear") or antialias:
            raise unsupported(f"interpolation mode {mode!r}{' with antialias' if antialias else ''} (nearest, nearest-exact "
                              "and bilinear are supported)")
        if (size is None) == (scale_factor is None):
            raise unsupported("give either size or scale_factor")
        return self.glue(name, "resize", [x], mode=mode,
                         size=None if size is None else list(_pair(size)),
                         scale_factor=None if scale_factor is None else [float(v) for v in (
                             scale_factor if isinstance(scale_factor, (tuple, list)) else (scale_factor, scale_factor))],
                         align_corners=bool(align_corners), recompute=bool(recompute))

    def _arithmetic(self, node, fn, args, name, unsupported) -> int:
        a, b = (args + [None, None])[:2]
        if node.kwargs.get("alpha", 1) != 1:
            raise unsupported("alpha")
        tensors = [isinstance(v, int) and not isinstance(v, bool) and isinstance(n, fx.Node)
                   for v, n in zip((a, b), node.args[:2])]
        numbers = [isinstance(n, (int, float)) and not isinstance(n, bool) for n in node.args[:2]]
        constants = [isinstance(v, torch.Tensor) for v in (a, b)]
        op = fn.rstrip("_").lstrip("i") if fn not in ("div",) else "truediv"
        op = {"add": "add", "mul": "mul", "truediv": "truediv", "div": "truediv", "sub": "sub", "rsub": "rsub"}.get(op, op)
        if all(tensors) and op in ("add", "mul"):
            return self.glue(name, op, [a, b])
        if any(tensors) and any(constants) and (op in ("add", "mul") or op == "sub" and tensors[0]):
            x, c = (a, b) if tensors[0] else (b, a)
            c = -c if op == "sub" else c
            return self.glue(name, "constant", [x], fn="mul" if op == "mul" else "add", value=_numbers(c),
                             shape=list(c.shape))
        if (tensors[0] and numbers[1]) or (tensors[1] and numbers[0] and op in ("add", "mul", "sub")):
            x, c = (a, float(node.args[1])) if tensors[0] else (b, float(node.args[0]))
            mul, add = {"add": (1.0, c), "mul": (c, 0.0), "sub": (1.0, -c), "rsub": (-1.0, c),
                        "truediv": (1.0 / c if c else float("inf"), 0.0)}[op]
            if op == "sub" and tensors[1]:
                mul, add = -1.0, c
            return self.glue(name, "scalar", [x], mul=mul, add=add)
        raise unsupported("only tensor + tensor, tensor * tensor, and a tensor with a number are supported")

    # --- networks ------------------------------------------------------------------------------------
    def network(self, model: nn.Module) -> tuple[int, int]:
        """Lower the whole network; returns (number of inputs, output slot)."""
        if isinstance(model, StereoNet):
            return 2, self.stereo(model)
        traced = trace(model, type(model).__name__)
        inputs = [self.new_slot() for n in traced.graph.nodes if n.op == "placeholder"]
        return len(inputs), self.graph(model, inputs, traced=traced)

    def stereo(self, net: StereoNet) -> int:
        """StereoNet.forward, with both views through the shared feature extractor as one batch."""
        left, right = self.new_slot(), self.new_slot()
        both = self.glue("normalize", "normalize_pad", [left, right], mean=INPUT_MEAN, std=INPUT_STD, multiple=8)
        half = self.graph(net.features.half_res, [both])
        quarter = self.graph(net.features.quarter_res, [half])
        half_left = self.glue("features", "batch_part", [half], part=0, parts=2)
        q_left = self.glue("features", "batch_part", [quarter], part=0, parts=2)
        q_right = self.glue("features", "batch_part", [quarter], part=1, parts=2)
        cost = self.glue("correlation", "correlation", [q_left, q_right], shifts=net.shifts)
        context = self.graph(net.context, [q_left])
        logits = self.graph(net.aggregation, [cost, context], residual=cost, res_scale=float(net.cost_scale.detach()))
        coarse = self.glue("soft_argmin", "soft_argmin", [logits], factor=4.0)
        coarse_half = self.glue("upsample", "upsample2x", [coarse])
        scaled = self.glue("refine", "divide", [coarse_half], divisor=float(net.max_disparity))
        refined = self.graph(net.refine, [half_left, scaled], residual=coarse_half, final_slope=0.0)
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
    consumers, also through `batch_part` 0 (StereoNet's left-view features: the first part of the batch); so does
    a global average pool read by a linear layer alone (`ops.INTO_ACCEPTS`).
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
        if not isinstance(consumer, Conv):
            continue
        total = consumer.groups * consumer.shape[1]
        sources, channels = [], []
        for slot in consumer.inputs:
            src, parts = halves[slot] if slot in halves and uses[slot] == 1 else (slot, 1)
            producer = producers.get(src)
            if isinstance(producer, Glue) and (len(consumer.inputs) > 1 or parts != 1 or uses[src] != 1
                                               or not INTO_ACCEPTS[producer.op](consumer)):
                producer = None
            if isinstance(producer, Conv) and consumer.linear:
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


def _channel_factors(op, conv: Conv):
    """(multiplier, addend) per output channel of `conv` if glue `op` applied to its output is one (batch norm's
    `affine`, a `constant` of one value per channel: a layer scale of shape (C, 1, 1)), else None."""
    channels = conv.shape[0]
    if op.op == "affine":
        return np.asarray(op.params["scale"], np.float32), np.asarray(op.params["shift"], np.float32)
    if op.op != "constant":
        return None
    shape, rank = list(op.params["shape"]), 2 if conv.linear else 4
    if len(shape) > rank or [1] * (rank - len(shape)) + shape not in ([1, channels] + [1] * (rank - 2), [1] * rank):
        return None
    value = np.broadcast_to(np.asarray(op.params["value"], np.float32).reshape(-1), channels)
    return (value, np.zeros(channels, np.float32)) if op.params["fn"] == "mul" else (np.ones(channels, np.float32), value)


def _sole_plain_conv(ops: list, slot: int, uses: dict) -> Conv | None:
    """The convolution that produces `slot`, when nothing else reads it and it adds no residual and applies no
    activation (so that what follows can be folded into its epilogue)."""
    conv = next((op for op in ops if isinstance(op, Conv) and op.output == slot), None)
    if conv is None or uses.get(slot) != 1 or conv.residual is not None or conv.slope != 1.0:
        return None
    return conv


def scales_folded(ops: list, output: int) -> list:
    """The ops with every per-channel multiply-add (`affine`, a per-channel `constant`: ConvNeXt's layer scale)
    that follows a convolution folded into the convolution's scale and bias (see _sole_plain_conv)."""
    uses, kept = _uses(ops, output), []
    for op in ops:
        conv = _sole_plain_conv(ops, op.inputs[0], uses) if isinstance(op, Glue) and op.op in ("affine", "constant") else None
        factors = conv and _channel_factors(op, conv)
        if factors is None:
            kept.append(op)
            continue
        mul, add = factors
        conv.scale, conv.bias = (conv.scale * mul).astype(np.float32), (conv.bias * mul + add).astype(np.float32)
        conv.output = op.output
    return kept


def residuals_folded(ops: list, output: int) -> list:
    """The ops with every `add` of a convolution's output and another tensor made the convolution's residual
    (see _sole_plain_conv), the convolution moved to the add's place, where the other operand exists: a
    residual the traced graph shows only through glue (ConvNeXt's block, its layer scale folded)."""
    uses, ops = _uses(ops, output), list(ops)
    for add in [op for op in ops if isinstance(op, Glue) and op.op == "add"]:
        for mine, other in ((0, 1), (1, 0)):
            conv = _sole_plain_conv(ops, add.inputs[mine], uses)
            if conv is not None and add.inputs[other] != conv.output:
                ops.remove(conv)
                ops[ops.index(add)] = conv
                conv.residual, conv.res_scale, conv.output = add.inputs[other], 1.0, add.output
                break
    return ops


def unused_glue_removed(ops: list, output: int) -> list:
    """The ops without glue whose result nothing reads (a concatenation or flatten that its convolutions
    read through)."""
    while True:
        used = set(_uses(ops, output))
        kept = [op for op in ops if isinstance(op, Conv) or op.output in used]
        if len(kept) == len(ops):
            return kept
        ops = kept


def link(ops: list, output: int) -> None:
    """Resolve each producer's `targets` to the consuming op objects and mark the channels that no input changes
    (`constants`) and those that nothing reads (`unread`; `output`: the program's output slot), after lowering or
    loading."""
    for op in ops:
        op.consumers = [ops[t[0]] for t in op.targets or []] if hasattr(op, "targets") else []
    mark_constant_channels(ops)
    mark_unread_channels(ops, output)


def lower(model: nn.Module, fused: bool = True):
    """(ops, number of inputs, output slot, number of slots, origins) of `model` in eval mode. `origins` maps
    a slot to the node of the model's traced graph whose value it holds (none for StereoNet, lowered by
    hand). `fused=False` leaves every op reading and writing float tensors in its slots, no producer writing
    a consumer's input buffer: what a layer-by-layer comparison with PyTorch feeds and reads
    (`zoo.layer_by_layer`)."""
    if model.training:
        raise JPQError("compile the network in eval mode (model.eval()): batch norm must use its running statistics.")
    lowering = Lowering(model)
    with torch.no_grad():
        n_inputs, output = lowering.network(model)
    ops = residuals_folded(scales_folded(unused_glue_removed(lowering.ops, output), output), output)
    if fused:
        ops = fuse(ops, output)
    link(ops, output)
    return ops, n_inputs, output, lowering.slots, lowering.origins
