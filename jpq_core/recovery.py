"""One-shot recovery: repair a pruned and quantized network in seconds, without training.

A compressed network (masks and weight quantizers attached by `jpq_core.pipeline.attach`, input quantizers
by `add_activation_quantizers`) is repaired on a few calibration samples by one or more methods:

    bn    re-estimate batch-norm statistics (and correct biases where no batch norm follows)
    lsq   layer-wise least squares on the kept weights (AdaPrune)
    obc   mask selection and quantization with second-order error feedback (OBC / SparseGPT / GPTQ)
    scale the network's own scalar parameters refitted to the dense network's outputs (stereo: the cost scale)

Methods combine with "+": "lsq+bn", "obc+bn", "lsq+scale". At most one method refits weights; scale runs last.

How it runs (fast because the network runs only twice, never once per layer):
1. the dense network runs once on the calibration data; each prunable layer's output (before batch norm) is
   kept at a regular subset of output positions: the targets Y (cached per network and data);
2. the compressed network runs once with hooks. When a layer is about to run, its input X has been produced
   by the layers before it, already repaired: the hook quantizes X as the layer will (with the ranges
   calibrated before recovery, or recalibrated on X with `recalibrate=True`), unfolds it at the same output
   positions, accumulates H = X Xᵀ and B = Y Xᵀ once, solves, writes the new weights,
   and lets the layer run with them. A batch-norm layer re-estimates its statistics from its input as it
   arrives. Least squares is ridge-damped: H + λ·mean(diag H)·I, λ = `damping`, raised ×10 (up to 1) while
   the system is not positive definite, then a JPQError.
The stereo network runs its feature extractor on both views; the calibration pass stacks both views into one
call, so every layer there is fitted and every batch norm re-estimated on left and right crops together.

Guarantees after every method: pruned weights are exactly zero (the mask multiplies the weight) and the
effective weights lie on the layer's quantization grid (the parametrization quantizes what is written).

    from jpq_core import recovery
    report = recovery.apply(net, dense, task, "lsq+bn", samples=8)   # {"method", "seconds", "samples"}

Measured (docs/recovery.md): stereo 80/90/95%, w4/a8, no fine-tuning, bad-3 73.0/94.8/89.1% -> lsq 19.1/41.0/84.0%,
obc 20.4/43.0/71.8%; ResNet-20 on digits at 90/95/98/99%: 9.6% -> obc+bn 99.4/98.3/87.8/75.0% top-1.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from jpq_core.layers import prunable_layers
from jpq_core.errors import JPQError
from jpq_core.quantization import uniform_params

DEFAULT_SAMPLES = {"stereo": 8, "classification": 512}  # stereo: crops of 192 x 384, both views
MIN_SAMPLES = {"stereo": 2, "classification": 32}
# At most: stereo crops take about 0.5 s each to render and 1.8 MB each; a huge count (a typo, a fuzzer's 2**40)
# must be refused before any rendering, not run out of memory hours later (issue 22).
MAX_SAMPLES = {"stereo": 256, "classification": 10_000}
COLUMNS_PER_INPUT = 24  # sampled output positions per input dimension of a layer: enough for a damped fit
MAX_DAMPING = 1.0  # damping is raised ×10 up to this (a ridge as large as the mean input energy)


# --------------------------------------------------------------------------------------------------------
# Methods: one small class each, one shared interface.


@dataclass
class LayerProblem:
    """What a weight-refitting method sees for one layer, weights flattened to rows (C_out x K).

    H = X Xᵀ over the sampled inputs X (K x n) of the compressed network; B = Y Xᵀ with Y (C_out x n) the
    dense layer's outputs before batch norm. With `intercept`, X carries a last row of ones (K includes it):
    its column of the solution is the per-channel intercept, never masked nor quantized."""

    weight: torch.Tensor  # the layer's current weights (C_out x K, without the intercept column)
    mask: torch.Tensor  # bool, same shape
    H: torch.Tensor
    B: torch.Tensor
    intercept: bool
    bits: int | None
    symmetric: bool
    per_channel: bool
    damping: float
    name: str


class RecoveryMethod:
    """Shared interface. `fits_weights`: `fit(problem) -> (weight, mask, intercept or None)`;
    `renormalizes`: batch norm and biases are re-estimated in the calibration pass."""

    name = ""
    fits_weights = False
    renormalizes = False
    refits_scalars = False

    def fit(self, problem: LayerProblem):
        raise NotImplementedError


class BatchNormReestimation(RecoveryMethod):
    """Batch-norm statistics re-estimated on calibration data (Li et al. 2016, AdaBN; Nagel et al. 2019 for
    bias correction): for every batch norm, μ = E[z], σ² = E[(z - μ)²] (population variance) over the batch and
    spatial positions of its input z in the compressed network. Where a layer has a bias and no batch norm
    follows it (the batch norm is folded, or there is none), bias correction: b += E[y_dense] - E[y], per
    output channel."""

    name = "bn"
    renormalizes = True


class LeastSquares(RecoveryMethod):
    """Layer-wise least squares on the kept weights (AdaPrune, Hubara et al. 2021, "Accelerated sparse neural
    training"): per output channel r with kept inputs S,
        w_S = argmin ||w_S X_S - y_r||² + λ||w_S||²  =>  (H_SS + λI) w_S = B_r,S,
    X from the compressed network (layers before already refitted, in forward order), y the dense layer's
    output before batch norm. The intercept (per-channel offset) goes into the bias or the following batch
    norm's mean. The layer's quantizer then rounds the solution to its grid."""

    name = "lsq"
    fits_weights = True

    def fit(self, p: LayerProblem):
        return _split(solve_kept(p.H, p.B, _with_intercept(p.mask, p.intercept), p.damping, p.name), p)


class OptimalBrainCompression(RecoveryMethod):
    """Joint pruning and quantization per layer with second-order error feedback (Frantar & Alistarh,
    "Optimal Brain Compression", NeurIPS 2022; "SparseGPT", ICML 2023; "GPTQ", ICLR 2023).

    1. Mask: from the dense least-squares optimum on the compressed inputs, W* = B H⁻¹ (||W X - Y||² =
       ||(W - W*) X||² + const), keep the layer's number of weights with the largest OBS saliency
       w*² / [H⁻¹]ᵢᵢ (the loss increase of removing one weight, halved), over the whole layer.
    2. Pruning: the OBS update of all removed weights P at once, δw = -H⁻¹ E_P (E_Pᵀ H⁻¹ E_P)⁻¹ w*_P, which
       is the least-squares optimum on the kept weights: solved per channel on its kept inputs.
    3. Quantization (GPTQ): the kept weights of each channel are rounded to the grid one at a time, each
       error spread over the channel's weights not yet rounded, with U the upper Cholesky factor of that
       channel's inverse Hessian H_SS⁻¹:  w[i:] -= ((w_i - q_i) / U_ii) U[i, i:].
       The intercept comes last: never quantized, it absorbs what is left."""

    name = "obc"
    fits_weights = True

    def fit(self, p: LayerProblem):
        K = p.H.shape[0]
        weights = p.weight.shape[1]
        L = damped_cholesky(p.H, torch.eye(K) * _diag_mean(p.H), p.damping, p.name)
        optimum = torch.cholesky_solve(p.B.T.double(), L).T  # W* = B H⁻¹
        saliency = (optimum ** 2 / torch.cholesky_inverse(L).diagonal())[:, :weights]
        kept = int(p.mask.sum())
        mask = torch.zeros(saliency.numel(), dtype=torch.bool)
        mask[saliency.flatten().topk(kept).indices] = True
        mask = mask.view_as(p.mask)
        # GPTQ's grid: scales from the channel's refitted weights before rounding
        unrounded = solve_kept(p.H, p.B, _with_intercept(mask, p.intercept), p.damping, p.name)[:, :weights]
        rounder = _GridRounder(unrounded, p.bits, p.symmetric, p.per_channel)
        solution = solve_kept(p.H, p.B, _with_intercept(mask, p.intercept), p.damping, p.name,
                              rounder if rounder.params is not None else None, weights)
        weight, _, intercept = _split(solution, p)
        return weight, mask, intercept


class ScalarRefit(RecoveryMethod):
    """The network's own scalar parameters (0-dim, registered on its root module; on the stereo network the
    cost volume's scale s in logits = aggregation + s · cost) refitted after the layers, one at a time, as a
    multiplier found by golden-section search on a log scale:
        s ← m* s,   m* = argmin over m in [1/2, 8] of E|f(x; m s) - f_dense(x)|
    over SCALAR_SAMPLES calibration inputs (f: the network's `scalar_stage` where it has one, the stereo
    network's coarse disparity, from one partial pass; else its output; m = 1 is always a candidate, so the fit
    never does worse on them). Temperature scaling (Guo et al. 2017, "On calibration of modern neural
    networks") with the dense network as the teacher: pruning flattens the matching logits, and a flatter
    softmax pulls the soft-argmin towards the middle of the disparity range; a larger s sharpens it again."""

    name = "scale"
    refits_scalars = True


SCALAR_SAMPLES = 4  # calibration inputs the scalar search runs on (a forward pass of them per step, or one partial pass)
SCALAR_RANGE = (0.5, 8.0)  # multipliers searched (stereo at 95%, w4/a8, lsq: 3.7 was the best of [1/2, 4])
SCALAR_STEPS = 9  # golden-section evaluations: the multiplier to within about 4%


def scalar_parameters(net: nn.Module) -> dict[str, nn.Parameter]:
    """The network's own scalar parameters: 0-dim, registered on its root module (not in a layer)."""
    return {n: p for n, p in net.named_parameters(recurse=False) if p.dim() == 0}


def _scalar_output(net: nn.Module, inputs):
    """A function of no arguments giving what ScalarRefit compares: the network's `scalar_stage` where it has
    one (the output nearest the scalars, from one partial pass; the stereo network's coarse disparity),
    else its whole output (a forward pass per call)."""
    stage = getattr(net, "scalar_stage", None)
    return stage(*inputs) if stage is not None else lambda: net(*inputs)


def refit_scalars(net: nn.Module, dense: nn.Module, inputs) -> dict[str, float]:
    """ScalarRefit on `inputs` (a batch of the network's inputs); returns {parameter: multiplier applied}."""
    scalars = scalar_parameters(net)
    if not scalars:
        return {}
    with torch.no_grad():
        reference = _scalar_output(dense.eval(), inputs)()
        with parametrize.cached():
            output = _scalar_output(net, inputs)

    def distance() -> float:
        with torch.no_grad(), parametrize.cached():  # without a scalar stage, each step is a whole forward pass
            value = float((output() - reference).abs().mean())
        return value if math.isfinite(value) else math.inf

    factors = {}
    for name, p in scalars.items():
        start = p.detach().clone()
        seen = {}

        def at(log_m: float) -> float:
            if log_m not in seen:
                with torch.no_grad():
                    p.copy_(start * math.exp(log_m))
                seen[log_m] = distance()
            return seen[log_m]

        at(0.0)
        lo, hi = (math.log(v) for v in SCALAR_RANGE)
        ratio = (math.sqrt(5) - 1) / 2
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        for _ in range(SCALAR_STEPS - 2):
            if at(a) <= at(b):
                hi, b = b, a
                a = hi - ratio * (hi - lo)
            else:
                lo, a = a, b
                b = lo + ratio * (hi - lo)
        best = min(seen, key=seen.get)
        with torch.no_grad():
            p.copy_(start * math.exp(best))
        factors[name] = round(math.exp(best), 4)
    return factors


def _with_intercept(mask: torch.Tensor, intercept: bool) -> torch.Tensor:
    return torch.cat([mask, torch.ones(len(mask), 1, dtype=torch.bool)], 1) if intercept else mask


def solve_kept(H, B, keep, damping: float, name: str, rounder=None, weights: int | None = None) -> torch.Tensor:
    """Per output channel r: argmin over w with support keep[r] of ||w X - y_r||² + λ||w||², i.e.
    (H_SS + λ·mean(diag H)·I) w_S = B_r,S, all channels as one batched Cholesky (each channel's kept inputs
    first, padded with identity rows). With `rounder`, the kept weights among the first `weights` columns are
    then rounded to the grid in order with GPTQ error feedback on the channel's own inverse Hessian.
    Returns C_out x K (float32), exactly zero outside `keep`."""
    H, B = H.double(), B.double()
    C, K = keep.shape
    counts = keep.sum(1)
    M = max(int(counts.max()), 1)
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :M]  # kept inputs first
    valid = torch.arange(M)[None] < counts[:, None]
    pair = valid[:, :, None] & valid[:, None, :]
    system = torch.where(pair, H[order[:, :, None], order[:, None, :]], torch.zeros((), dtype=H.dtype))
    system = system + torch.diag_embed((~valid).to(H.dtype))
    L = damped_cholesky(system, torch.diag_embed(valid.to(H.dtype)) * _diag_mean(H), damping, name)
    W = torch.cholesky_solve((torch.gather(B, 1, order) * valid)[:, :, None], L)[:, :, 0]
    if rounder is not None:
        U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        rounded = valid & (order < (weights if weights is not None else K))
        for j in range(M):
            w = W[:, j]
            q = torch.where(rounded[:, j], rounder.round(w), w)
            error = (w - q) / U[:, j, j]
            W[:, j:] -= error[:, None] * U[:, j, j:]
            W[:, j] = q
    out = torch.zeros(C, K, dtype=H.dtype)
    out.scatter_(1, order, W * valid)  # padded places point at removed inputs: they get zeros
    return out.float()


class _GridRounder:
    """Rounds a column (one weight per output channel) to a layer's uniform grid, scales from the weights it
    starts from, as GPTQ does; widths without a uniform grid (1-2 bits, float) have no rounder (params None)."""

    def __init__(self, weight, bits, symmetric, per_channel):
        self.params = None
        if bits is not None and bits >= 3:
            scale, zero, qmin, qmax = uniform_params(weight.float(), bits, symmetric, per_channel)
            self.params = (scale.reshape(-1).double(), zero.reshape(-1).double(), qmin, qmax)

    def round(self, column):
        scale, zero, qmin, qmax = self.params
        q = scale * (torch.clamp(torch.round(column / scale) + zero, qmin, qmax) - zero)
        return q * (column != 0)


METHODS = {m.name: m for m in (BatchNormReestimation, LeastSquares, OptimalBrainCompression, ScalarRefit)}
CHOICES = ("none", "bn", "lsq", "obc", "lsq+bn", "obc+bn", "scale", "lsq+scale", "obc+scale", "obc+bn+scale")
# The method that measured best per task without fine-tuning (docs/recovery.md): stereo, lsq+scale (bad-3
# 17.1/32.6% at 80/90%, w4/a8, 8 samples, against lsq's 19.1/41.0%); ResNet-20 on digits, obc+bn (top-1
# 99.4/98.3% at 90/95%; it has no scalar of its own to refit). What "auto" means.
BEST = {"stereo": "lsq+scale", "classification": "obc+bn"}


def best_method(task_name: str) -> str:
    """The recovery method "auto" stands for on a task ("stereo" or "classification")."""
    return BEST.get(task_name, "none")


def parse_methods(spec: str | None) -> list[RecoveryMethod]:
    """"lsq+bn" -> [LeastSquares(), BatchNormReestimation()]; "none" or None -> []."""
    if spec in (None, "", "none"):
        return []
    if not isinstance(spec, str):
        raise JPQError(f"recovery must be a method name such as lsq+bn, not {spec!r}.")
    names = [n.strip() for n in spec.split("+")]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise JPQError(f"unknown recovery method {', '.join(unknown)}; choose from {', '.join(METHODS)} or "
                       f"combine them with '+', e.g. lsq+bn (or none).")
    methods = [METHODS[n]() for n in dict.fromkeys(names)]
    if sum(m.fits_weights for m in methods) > 1:
        raise JPQError(f"{spec}: lsq and obc both refit the weights; choose one of them (each combines with bn).")
    return methods


def check_methods(spec) -> str:
    """The canonical spelling of a recovery spec ("bn+lsq" -> "lsq+bn"), or a JPQError."""
    methods = parse_methods(spec)
    return "+".join(sorted((m.name for m in methods), key=lambda n: {"bn": 1, "scale": 2}.get(n, 0))) or "none"


# --------------------------------------------------------------------------------------------------------
# Linear algebra


def _diag_mean(H: torch.Tensor) -> torch.Tensor:
    return H.diagonal().mean().clamp(min=1e-12)


def damped_cholesky(system: torch.Tensor, ridge: torch.Tensor, damping: float, name: str) -> torch.Tensor:
    """Cholesky factor (float64, batched) of system + λ·ridge, λ = `damping`, raised ×10 while the system is not
    positive definite; a JPQError beyond MAX_DAMPING. Float64: calibration Hessians span many decades."""
    A, R = system.double(), ridge.double()
    lam = damping
    while lam <= MAX_DAMPING:
        L, info = torch.linalg.cholesky_ex(A + lam * R)
        if not bool(info.any()):
            return L
        lam *= 10
    raise JPQError(f"layer {name}: the least-squares system stays singular even with damping {lam / 10:g}; the "
                   "calibration inputs of this layer carry too little information. Use more calibration samples "
                   "or a larger damping.")


def _split(solution, p: LayerProblem):
    weights = p.weight.shape[1]
    intercept = solution[:, weights] if p.intercept else None
    return solution[:, :weights], p.mask, intercept


# --------------------------------------------------------------------------------------------------------
# Calibration data (cached per task, count and seed: rendering stereo crops costs about 0.5 s each)

_INPUTS: dict = {}
_TARGETS: dict = {}


def calibration_inputs(task, count: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """The network's inputs for `count` calibration samples, as one batch: synthetic training crops (left and
    right views) for stereo, training images for classifiers."""
    name = getattr(task, "name", None)
    if name not in MIN_SAMPLES:
        raise JPQError(f"recovery needs calibration data, and the {name!r} task has none; it works for stereo "
                       "(synthetic training crops) and classifiers (their training split).")
    if isinstance(count, bool) or not isinstance(count, int) or count < MIN_SAMPLES[name]:
        raise JPQError(f"recovery needs at least {MIN_SAMPLES[name]} calibration samples for {name}, got {count!r}.")
    if count > MAX_SAMPLES[name]:
        raise JPQError(f"recovery takes at most {MAX_SAMPLES[name]:,} calibration samples for {name}, got {count:,}; "
                       f"ask for fewer (the default is {DEFAULT_SAMPLES[name]}).")
    if name == "classification" and count > len(task.train_x):
        raise JPQError(f"recovery asked for {count} calibration images but the training split of {task.data} has "
                       f"{len(task.train_x)}; ask for fewer.")
    key = (name, task.data_key, count, seed)
    if key not in _INPUTS:
        if name == "stereo":
            batches = -(-count // task.batch_size)
            parts = [task.batch(i, seed=seed + 29) for i in range(batches)]
            _INPUTS[key] = tuple(torch.cat([p[v] for p in parts])[:count] for v in (0, 1))
        else:
            idx = torch.randperm(len(task.train_x), generator=torch.Generator().manual_seed(seed + 29))[:count]
            _INPUTS[key] = (task.train_x[idx],)
    return _INPUTS[key]


def _fingerprint(model: nn.Module) -> tuple:
    """Identifies a dense network's weights well enough to cache its targets (sums of every parameter)."""
    with torch.no_grad():
        return tuple(round(float(p.double().sum()), 9) for p in model.state_dict().values() if p.is_floating_point())


# --------------------------------------------------------------------------------------------------------
# The calibration pass


def _sampling(layer: nn.Module, y: torch.Tensor, inputs_dim: int) -> int:
    """Every how many output positions (in each direction) the fit samples: at most about
    COLUMNS_PER_INPUT · K positions for a layer with K inputs per output."""
    if isinstance(layer, nn.Linear):
        return 1
    n, _, h, w = y.shape
    return max(1, math.ceil(math.sqrt(n * h * w / (COLUMNS_PER_INPUT * inputs_dim))))


def _columns(layer: nn.Module, x: torch.Tensor, every: int) -> torch.Tensor:
    """The layer's inputs at its sampled output positions, N x K x L (a conv's patches, unfolded)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]).T[None]
    if layer.groups != 1:
        raise JPQError(f"recovery fits ordinary convolutions; {type(layer).__name__} with groups={layer.groups} is not supported.")
    stride = tuple(s * every for s in layer.stride)
    return F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, stride)


def _outputs(y: torch.Tensor, every: int) -> torch.Tensor:
    """A layer's outputs at the sampled positions, N x C_out x L (the positions of `_columns`)."""
    if y.dim() == 2:
        return y.T[None]
    return y[:, :, ::every, ::every].flatten(2)


def normal_equations(X: torch.Tensor, Y: torch.Tensor, intercept: bool):
    """H = X Xᵀ and B = Y Xᵀ summed over the batch (X: N x K x L, Y: N x C x L); with `intercept`, X gets a last
    row of ones (H: K+1 square). No copy of the unfolded inputs is made."""
    H = torch.einsum("nkl,njl->kj", X, X)
    B = torch.einsum("ncl,nkl->ck", Y, X)
    if intercept:
        sums = X.sum((0, 2))
        H = torch.cat([torch.cat([H, sums[:, None]], 1), torch.cat([sums, sums.new_tensor([X.shape[0] * X.shape[2]])])[None]])
        B = torch.cat([B, Y.sum((0, 2))[:, None]], 1)
    return H, B


class _StackedCalls:
    """Runs a module that the network calls several times per forward (the stereo feature extractor: left,
    then right view) once on all its inputs stacked, and hands each call its share. The inputs are found by
    a capture pass first (before any calibration hook is in place), in which the module sees tiny stand-ins
    (its calls do not depend on each other's outputs); the stacked call happens at the first call of the
    real pass, so the hooks inside the module see both views, in forward order."""

    def __init__(self, model: nn.Module, name: str, calls: int, inputs):
        self.module, self.calls = model.get_submodule(name), calls
        self.captured = []

        class _Captured(Exception):
            pass

        def capture(_, args):
            self.captured.append(args[0])
            if len(self.captured) == calls:
                raise _Captured
            return (args[0][:1, ..., :8, :8],)

        handle = self.module.register_forward_pre_hook(capture)
        try:
            with torch.no_grad():
                model(*inputs)
        except _Captured:
            pass
        finally:
            handle.remove()
        if len(self.captured) != calls:
            raise JPQError(f"the calibration pass expected {calls} calls of {name} and saw {len(self.captured)}.")

    @contextlib.contextmanager
    def stacked(self):
        original = self.module.forward
        shares = []

        def forward(*args, **kwargs):
            if not shares:
                sizes = [len(c) for c in self.captured]
                out = original(torch.cat(self.captured))
                parts = [torch.split(t, sizes) for t in out] if isinstance(out, tuple) else [torch.split(out, sizes)]
                shares.extend(tuple(p[i] for p in parts) if isinstance(out, tuple) else parts[0][i] for i in range(len(sizes)))
                shares.reverse()
            return shares.pop()

        self.module.forward = forward
        try:
            yield
        finally:
            del self.module.forward  # the class's forward again


def _shared_modules(model: nn.Module, example) -> dict[str, int]:
    """Outermost modules that hold prunable layers and are called more than once per forward."""
    counts: dict[str, int] = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: counts.__setitem__(n, counts.get(n, 0) + 1))
               for n, m in model.named_modules() if n and any(isinstance(c, (nn.Conv2d, nn.Linear)) for c in m.modules())]
    _forward_with(model, example, handles)
    shared = {n: c for n, c in counts.items() if c > 1}
    return {n: c for n, c in shared.items() if not any(n.startswith(o + ".") for o in shared)}


def _forward_with(model: nn.Module, example, handles) -> None:
    """One inference pass of `model` on `example` with the hooks `handles` attached; they are removed after."""
    try:
        with torch.inference_mode():
            model(*example)
    finally:
        for h in handles:
            h.remove()


def _followers(model: nn.Module, example) -> dict[str, str]:
    """{layer: the batch norm that takes its output directly}, found by watching a forward pass."""
    outputs, follows = {}, {}
    layers = prunable_layers(model)
    names = {id(m): n for n, m in layers.items()}
    bns = {id(m): n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    handles = [m.register_forward_hook(lambda mod, a, out: outputs.__setitem__(id(out), names[id(mod)])) for m in layers.values()]
    handles += [m.register_forward_pre_hook(lambda mod, a: follows.__setitem__(outputs[id(a[0])], bns[id(mod)])
                                            if id(a[0]) in outputs else None)
                for n, m in model.named_modules() if id(m) in bns]
    _forward_with(model, example, handles)
    return follows


def _calibration_pass(model: nn.Module, inputs, shared: dict[str, int], hooks) -> None:
    """One forward pass over the calibration batch with `hooks()` (a list of handles it registers) in place,
    modules called several times per forward stacked into one call (see `_StackedCalls`)."""
    stackers = [_StackedCalls(model, name, calls, inputs) for name, calls in shared.items()]
    handles = hooks()
    try:
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for s in stackers:
                stack.enter_context(s.stacked())
            model(*inputs)
    finally:
        for h in handles:
            h.remove()


def dense_targets(dense: nn.Module, inputs, shared, key) -> dict:
    """{layer: (sampling stride, sampled outputs C_out x n, per-channel mean output)} of the dense network;
    cached by `key` (one network at a time: they are tens of MB)."""
    if key in _TARGETS:
        return _TARGETS[key]
    targets = {}

    def keep(name, layer):
        def hook(_, args, y):
            every = _sampling(layer, y, layer.weight[0].numel() + 1)
            mean = y.mean(0) if y.dim() == 2 else y.mean((0, 2, 3))
            targets[name] = (every, _outputs(y, every).clone(), mean, layer.weight.detach().flatten(1),
                             layer.bias.detach() if layer.bias is not None else None)
        return hook

    dense.eval()
    _calibration_pass(dense, inputs, shared, lambda: [l.register_forward_hook(keep(n, l))
                                                       for n, l in prunable_layers(dense).items()])
    _TARGETS.clear()
    _TARGETS[key] = targets
    return targets


def _check_pair(net, dense):
    mine, theirs = prunable_layers(net), prunable_layers(dense)
    bad = [n for n in mine if n not in theirs or theirs[n].weight.shape != mine[n].weight.shape]
    bad += [n for n in theirs if n not in mine]
    if bad:
        raise JPQError(f"recovery needs the dense network the compressed one came from; layers {', '.join(bad[:5])} "
                       "differ between them.")
    missing = [n for n, l in mine.items() if not parametrize.is_parametrized(l, "weight")]
    if missing:
        raise JPQError(f"layers {', '.join(missing[:5])} carry no mask; attach masks (jpq_core.pipeline.attach) first.")


def apply(net: nn.Module, dense: nn.Module, task, methods: str = "lsq+bn", samples: int | None = None,
          seed: int = 0, damping: float = 0.01, recalibrate: bool = False) -> dict:
    """Repair the compressed `net` in place with `methods` ("bn", "lsq", "obc", or combinations with "+");
    `dense` is the network it was compressed from. `samples` calibration samples (default per task, see
    DEFAULT_SAMPLES). `recalibrate`: also recalibrate the input quantizers in the same pass, in forward order
    (measured worse: stereo 90%, w4/a8, lsq, 8 samples: bad-3 47.8% against 41.0% keeping the ranges the
    pipeline calibrated before recovery).

    Returns {"method", "seconds", "samples"}, with scale also "scalars" ({parameter: multiplier applied}).
    Weights stay masked (obc chooses its own mask per layer, at the layer's density) and on their quantization
    grid."""
    spec = check_methods(methods)
    chosen = parse_methods(spec)
    if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping > 0):
        raise JPQError(f"damping must be a positive number, got {damping!r}.")
    samples = samples if samples is not None else DEFAULT_SAMPLES.get(getattr(task, "name", None), 0)
    if not chosen:
        return {"method": "none", "seconds": 0.0, "samples": 0}
    per_layer = [m for m in chosen if not m.refits_scalars]
    seconds = _calibrate_and_fit(net, dense, task, per_layer, samples, seed, damping, recalibrate) if per_layer else 0.0
    report = {"method": spec, "seconds": seconds, "samples": samples}
    if any(m.refits_scalars for m in chosen):
        inputs = calibration_inputs(task, samples, seed)
        start, was_training = time.perf_counter(), net.training
        try:
            report["scalars"] = refit_scalars(net.eval(), dense, tuple(x[:SCALAR_SAMPLES] for x in inputs))
        finally:
            net.train(was_training)
        report["seconds"] = round(seconds + time.perf_counter() - start, 3)
    return report


class _Recorder(RecoveryMethod):
    """A "method" that keeps every layer's least-squares problem and changes nothing (for scans that refit one
    layer at a time, see `layer_problems`)."""

    fits_weights = True

    def __init__(self):
        self.problems: dict[str, LayerProblem] = {}

    def fit(self, p: LayerProblem):
        self.problems[p.name] = p
        return p.weight, p.mask, None


def layer_problems(net: nn.Module, dense: nn.Module, task, samples: int | None = None, seed: int = 0,
                   damping: float = 0.01) -> dict[str, LayerProblem]:
    """{layer: its least-squares problem} on the calibration data, `net` left as it was: what each layer
    sees in `net` (H) against what the dense layer produces (B). One calibration pass."""
    samples = samples if samples is not None else DEFAULT_SAMPLES.get(getattr(task, "name", None), 0)
    recorder = _Recorder()
    _calibrate_and_fit(net, dense, task, [recorder], samples, seed, damping, False)
    return recorder.problems


def _calibrate_and_fit(net, dense, task, chosen: list[RecoveryMethod], samples, seed, damping, recalibrate) -> float:
    """The calibration pass of `apply` with the methods `chosen`; its seconds (rendering data excluded)."""
    _check_pair(net, dense)
    inputs = calibration_inputs(task, samples, seed)
    start = time.perf_counter()  # rendering the data is cached and not part of recovery's time
    fitter = next((m for m in chosen if m.fits_weights), None)
    renormalize = any(m.renormalizes for m in chosen)
    was_training = net.training
    net.eval()
    dense.eval()
    example = task.trace_inputs()
    follows = _followers(dense, example)  # probed on the dense copy: same names, no quantizers to disturb
    shared = _shared_modules(dense, example)
    targets = dense_targets(dense, inputs, shared, (task.data_key, samples, seed, _fingerprint(dense)))
    bn_modules = {n: m for n, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}

    def hooks():
        handles = []
        for name, layer in prunable_layers(net).items():
            fit = _LayerFit(name, fitter, targets[name], damping, bn_modules.get(follows.get(name)), recalibrate)
            handles.append(layer.register_forward_pre_hook(fit, prepend=True))
            if renormalize and layer.bias is not None and name not in follows:
                handles.append(layer.register_forward_hook(_bias_correction(targets[name][2])))
        if renormalize:
            handles += [bn.register_forward_pre_hook(_reestimate) for bn in bn_modules.values()]
        return handles

    try:
        _calibration_pass(net, inputs, shared, hooks)
    finally:
        net.train(was_training)
    bad = [n for n, l in prunable_layers(net).items() if not bool(torch.isfinite(l.weight).all())]
    bad += [n for n, m in bn_modules.items() if not (torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all())]
    if bad:
        raise JPQError(f"recovery produced non-finite values in {', '.join(bad[:5])}; use more calibration samples "
                       "or a larger damping.")
    return round(time.perf_counter() - start, 3)


def following_batch_norms(net: nn.Module, dense: nn.Module, task) -> dict[str, nn.Module]:
    """{layer: the batch norm of `net` that takes the layer's output directly} (where a fitted intercept goes)."""
    follows = _followers(dense.eval(), task.trace_inputs())
    modules = dict(net.named_modules())
    return {layer: modules[bn] for layer, bn in follows.items()}


def install(layer: nn.Module, weight: torch.Tensor, mask: torch.Tensor, intercept: torch.Tensor | None, bn=None) -> None:
    """Write a fitted layer into the network: kept weights and mask into the parametrization (whose quantizer
    rounds them to the grid), the intercept into the bias, else into the following batch norm's mean."""
    t = layer.parametrizations.weight[0]
    original = layer.parametrizations.weight.original
    t.mask.copy_(mask.reshape(t.mask.shape))
    original.data.copy_((weight * mask).reshape(original.shape))
    if intercept is not None:
        if layer.bias is not None:
            layer.bias.data.copy_(intercept)
        else:  # BN(Wx + c) with mean μ equals BN(Wx) with mean μ - c
            bn.running_mean.sub_(intercept)


class _LayerFit:
    """Forward pre-hook of one layer in the calibration pass: calibrate its input quantizer, then refit."""

    def __init__(self, name, fitter, target, damping, bn, recalibrate):
        self.name, self.fitter, self.target, self.damping, self.bn = name, fitter, target, damping, bn
        self.recalibrate = recalibrate

    def __call__(self, layer, args):
        x = args[0]
        quantizer = getattr(layer, "input_quantizer", None)
        if quantizer is not None and quantizer.bits is not None and self.recalibrate:
            quantizer.reset(quantizer.bits, quantizer.method)
            quantizer(x)
            quantizer.finish_calibration()
        if quantizer is not None and quantizer.bits is not None and self.fitter is not None:
            x = quantizer(x)  # what the layer will see
        if self.fitter is None:
            return None
        t = layer.parametrizations.weight[0]
        mask = t.mask.reshape(len(t.mask), -1)
        if not bool(mask.any()):
            raise JPQError(f"layer {self.name} keeps no weights, so there is nothing to refit; lower the sparsity or "
                           "protect this layer.")
        every, y, _, dense_weight, dense_bias = self.target
        X = _columns(layer, x, every)
        if X.shape[0] * X.shape[2] != y.shape[0] * y.shape[2]:
            raise JPQError(f"layer {self.name}: {X.shape[0] * X.shape[2]} calibration inputs against "
                           f"{y.shape[0] * y.shape[2]} dense outputs; the dense and compressed networks must see the "
                           "same calibration data.")
        # an intercept where it has somewhere to go: the bias, or the batch norm's mean
        intercept = layer.bias is not None or self.bn is not None
        H, B = normal_equations(X, y, intercept)
        original = layer.parametrizations.weight.original
        problem = LayerProblem(original.detach().reshape(len(mask), -1) * mask, mask, H, B, intercept, t.bits,
                               t.symmetric, t.per_channel, self.damping, self.name)
        install(layer, *self.fitter.fit(problem), self.bn)
        return None


def _reestimate(bn, args):
    """Running statistics := the input's batch statistics (momentum 1: PyTorch's fused kernel computes them;
    the variance is the unbiased one, as PyTorch keeps it)."""
    momentum = bn.momentum
    F.batch_norm(args[0], bn.running_mean, bn.running_var, None, None, True, 1.0, bn.eps)
    bn.momentum = momentum


def _bias_correction(dense_mean):
    def hook(layer, args, y):
        mean = y.mean(0) if y.dim() == 2 else y.mean((0, 2, 3))
        layer.bias.data.add_(dense_mean - mean)
        shape = (1, -1) + (1,) * (y.dim() - 2)
        return y + (dense_mean - mean).view(shape)
    return hook
