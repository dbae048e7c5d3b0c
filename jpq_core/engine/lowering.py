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
  (residuals, squeeze-excitation), a tensor with a number, concatenation, max and average pooling (also
  adaptive), mean over axes, flatten, upsampling / interpolation (nearest, bilinear);
- identity in inference: dropout, Identity, stochastic depth, contiguous.
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

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from jpq_core.compressed import raw_weight, transform
from jpq_core.engine import packing
from jpq_core.engine.ops import INTEGER_ACTIVATION_BITS, INTEGER_WEIGHT_BITS, INTO, Conv, Glue
from jpq_core.errors import JPQError
from jpq_core.models.stereo import INPUT_MEAN, INPUT_STD, StereoNet
from jpq_core.quantization import uniform_params

SUPPORTED = ("Conv2d (zero padding), Linear, BatchNorm, ReLU, ReLU6, Hardtanh, LeakyReLU, Hardswish, Hardsigmoid, "
             "SiLU, Sigmoid, GELU, Tanh, add, multiply, cat, max/avg pooling (also adaptive), mean, flatten, "
             "interpolate/Upsample (nearest, bilinear), Dropout, Identity")


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


def trace(module: nn.Module, label: str) -> fx.GraphModule:
    try:
        with _TRACING:
            graph = _Tracer().trace(module)
    except Exception as exc:  # torch.fx raises many kinds on forwards it cannot follow
        raise JPQError(f"the engine could not trace {label}'s forward with torch.fx ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); networks with data-dependent control "
                       "flow cannot be compiled.") from None
    return fx.GraphModule(module, graph)


def _arg(node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _fn(node) -> str:
    """What a call_function / call_method node calls, by name ("relu", "add", "view", ...)."""
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", str(node.target))


class _Shape:
    """A value computed from a tensor's shape (x.size(0), x.shape[0]): only a flattening view may use one."""

    def __init__(self, source, index=None):
        self.source, self.index = source, index


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
            (stride, padding, dilation), groups, linear = _conv_geometry(layer, name), layer.groups, False
        else:
            stride, padding, dilation, groups, linear = (1, 1), (0, 0), (1, 1), 1, True
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
              traced: fx.GraphModule | None = None) -> int:
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
                values[node] = self.node(node, mods, [values.get(real(a), a) if isinstance(a, fx.Node) else a
                                                      for a in node.args], real, values)
        out = values[result]
        if not isinstance(out, int):
            raise JPQError(f"{label}'s forward returns a shape, not a tensor.")
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

    def _chain(self, chain, values, real) -> int:
        x = values[real(chain["conv"].args[0])]
        if isinstance(chain["layer"], nn.Linear):
            inputs = [self.flattened.get(x, x)]
        else:
            inputs = self.concat_parts.get(x, [x])
        residual = chain["residual"]
        if isinstance(residual, fx.Node):
            residual = values[real(residual)]
        return self.conv(chain["layer"], inputs, chain["bn"], chain["slope"], residual, chain["res_scale"])

    def concat(self, name, inputs, dim) -> int:
        out = self.glue(name, "concat", inputs, dim=dim)
        if dim == 1:
            self.concat_parts[out] = [p for i in inputs for p in self.concat_parts.get(i, [i])]
        return out

    def node(self, node, mods, args, real, values):
        """The slot of one graph node's result (a _Shape for shape arithmetic)."""
        module = mods.get(node.target) if node.op == "call_module" else None
        where = f"layer {self.name(module)!r} ({type(module).__name__})" if module is not None \
            else f"{_fn(node) if node.op != 'get_attr' else 'constant ' + str(node.target)} (graph node {node.name!r})"
        name = self.name(module) if module is not None else node.name

        def unsupported(why=""):
            return JPQError(f"the engine cannot run {where}{': ' + why if why else ''}; it supports {SUPPORTED}.")

        def tensor(i):
            if i >= len(args) or not isinstance(args[i], int) or isinstance(args[i], bool) or not isinstance(node.args[i], fx.Node):
                raise unsupported("an input is not a tensor the engine computes")
            return args[i]

        if module is not None:
            return self._module(module, name, tensor(0), unsupported)
        if node.op == "get_attr":
            raise unsupported("constant tensors inside the network")
        fn = _fn(node)
        if fn == "size" or (fn == "getattr" and len(node.args) > 1 and node.args[1] == "shape"):
            return _Shape(node.args[0], node.args[1] if fn == "size" and len(node.args) > 1 else None)
        if fn == "getitem" and isinstance(args[0], _Shape) and args[0].index is None:
            return _Shape(args[0].source, node.args[1])
        if any(isinstance(a, _Shape) for a in args) and fn not in ("view", "reshape"):
            raise unsupported("it computes with the tensor's shape, which the engine does not follow")
        kind = _function_activation(node)
        if kind is not None:
            return self.glue(name, "activation", [tensor(0)], kind=kind[0], a=kind[1], b=kind[2])
        if (fn in ("add", "add_", "iadd", "mul", "mul_", "imul", "truediv", "div", "sub", "rsub")):
            return self._arithmetic(node, fn, args, name, unsupported)
        if fn in ("cat", "concat"):
            parts = node.args[0] if node.args else node.kwargs.get("tensors")
            if not isinstance(parts, (list, tuple)) or not all(isinstance(p, fx.Node) for p in parts):
                raise unsupported("its inputs are not tensors")
            slots = [values.get(real(p)) for p in parts]
            if not all(isinstance(s, int) for s in slots):
                raise unsupported("an input is not a tensor the engine computes")
            dim = _arg(node, 1, "dim", 0)
            return self.concat(name, slots, dim)
        if fn == "flatten":
            return self._flatten(name, tensor(0), _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        if fn in ("view", "reshape"):
            shape = list(node.args[1:]) if len(node.args) > 2 or not isinstance(_arg(node, 1, "shape"), (list, tuple)) \
                else list(node.args[1])
            batch = args[1] if len(args) > 1 else None
            if len(shape) == 2 and shape[1] == -1 and isinstance(batch, _Shape) and batch.index == 0 \
                    and real(batch.source) is real(node.args[0]):
                return self._flatten(name, tensor(0), 1, -1)
            raise unsupported("only x.view(x.size(0), -1) (flattening) is supported among reshapes")
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
        op = fn.rstrip("_").lstrip("i") if fn not in ("div",) else "truediv"
        op = {"add": "add", "mul": "mul", "truediv": "truediv", "div": "truediv", "sub": "sub", "rsub": "rsub"}.get(op, op)
        if all(tensors) and op in ("add", "mul"):
            return self.glue(name, op, [a, b])
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


def unused_glue_removed(ops: list, output: int) -> list:
    """The ops without glue whose result nothing reads (a concatenation or flatten that its convolutions
    read through)."""
    while True:
        used = set(_uses(ops, output))
        kept = [op for op in ops if isinstance(op, Conv) or op.output in used]
        if len(kept) == len(ops):
            return kept
        ops = kept


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
    ops = fuse(unused_glue_removed(lowering.ops, output), output)
    link(ops)
    return ops, n_inputs, output, lowering.slots
