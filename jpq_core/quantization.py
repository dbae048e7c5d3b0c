"""Uniform quantization of weights and activations, with exact zeros so that pruning and quantization compose.

Weights (`quantize_weight`):
- 3 to 16 bits: uniform affine q = clamp(round(x / s) + z, qmin, qmax), x_hat = s * (q - z) (Jacob et al.
  2018). Symmetric: z = 0, q in [-(2^(b-1) - 1), 2^(b-1) - 1], s = max|x| / qmax. Asymmetric: s = (max - min)
  / (2^b - 1) with an integer zero point, so 0 still maps to an exact 0.
- 2 bits: ternary {-a, 0, +a} with threshold 0.7 * mean|x| and a = mean of |x| above it (Li & Liu 2016, TWN).
- 1 bit: binary {-a, +a} with a = mean|x| (Rastegari et al. 2016, XNOR-Net).
- None: float, unchanged.
Scales are per tensor or per output channel. Pruned weights (exact zeros) stay exactly zero at every width,
binary included (sparse binary: {-a, 0, +a} on the kept weights only).

Activations (`ActivationQuantizer`): asymmetric per tensor, range calibrated on data by min/max, a
percentile, or the MSE-optimal clipping.

Fake quantization in training uses the straight-through estimator (Bengio et al. 2013): the forward pass
sees x_hat, the backward pass treats rounding as the identity.

Learned step size (`learned_step_quantize`, LSQ; Esser et al. 2020): symmetric uniform weights at 3 to 16 bits
can learn their scale s during QAT instead of taking max|x| / qmax, trading clipping error against rounding
error. It starts at max|x| / qmax and is kept at or below it: a wider grid than min/max's only leaves levels
unused, and this bound is what lets anyone recover s from the quantized weights alone (the largest kept
weight sits on a grid end), as the engine and `load_compressed` do.
"""

from __future__ import annotations

import math

import torch

from jpq_core.errors import JPQError

WEIGHT_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16, None)
ACTIVATION_BITS = (4, 5, 6, 7, 8, 10, 12, 16, None)


def check_bits(bits, allowed=WEIGHT_BITS, what="weight") -> int | None:
    if bits in (None, 32, "float") and not isinstance(bits, bool):
        return None
    if isinstance(bits, bool) or bits not in allowed:  # True == 1 would pass as binary weights
        shown = ", ".join("float" if b is None else str(b) for b in allowed)
        raise JPQError(f"{what} bits must be one of {shown}; got {bits}.")
    return int(bits)


def _per_channel_reduce(x: torch.Tensor, per_channel: bool, fn) -> torch.Tensor:
    """fn over the whole tensor, or over each output channel (dim 0) broadcastable back to x."""
    if not per_channel or x.dim() < 2:
        return fn(x.flatten())
    return fn(x.flatten(1), dim=1).view(-1, *([1] * (x.dim() - 1)))


def _amax(v, dim=None):
    return v.abs().amax() if dim is None else v.abs().amax(dim=dim)


def uniform_params(x: torch.Tensor, bits: int, symmetric: bool, per_channel: bool):
    """(scale, zero_point, qmin, qmax) for uniform quantization of x."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = _per_channel_reduce(x, per_channel, _amax) / qmax
        zero = torch.zeros_like(scale)
        qmin = -qmax
    else:
        qmin, qmax = 0, 2**bits - 1
        lo = _per_channel_reduce(x, per_channel, lambda v, dim=None: v.amin() if dim is None else v.amin(dim=dim)).clamp(max=0)
        hi = _per_channel_reduce(x, per_channel, lambda v, dim=None: v.amax() if dim is None else v.amax(dim=dim)).clamp(min=0)
        scale = (hi - lo) / qmax
        zero = torch.round(-lo / torch.where(scale > 0, scale, torch.ones_like(scale)))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero channel stays zero
    return scale, zero, qmin, qmax


def fake_quantize(x: torch.Tensor, scale, zero, qmin: int, qmax: int) -> torch.Tensor:
    """s * (clamp(round(x / s) + z, qmin, qmax) - z)."""
    return scale * (torch.clamp(torch.round(x / scale) + zero, qmin, qmax) - zero)


def _ternary(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    mean_abs = _per_channel_reduce(x, per_channel, lambda v, dim=None: v.abs().mean() if dim is None else v.abs().mean(dim=dim))
    delta = 0.7 * mean_abs
    big = x.abs() > delta
    if per_channel and x.dim() >= 2:
        alpha = (x.abs() * big).flatten(1).sum(1) / big.flatten(1).sum(1).clamp(min=1)
        alpha = alpha.view(-1, *([1] * (x.dim() - 1)))
    else:
        alpha = (x.abs() * big).sum() / big.sum().clamp(min=1)
    return alpha * torch.sign(x) * big


def _binary(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    nonzero = x != 0
    if per_channel and x.dim() >= 2:
        alpha = x.abs().flatten(1).sum(1) / nonzero.flatten(1).sum(1).clamp(min=1)
        alpha = alpha.view(-1, *([1] * (x.dim() - 1)))
    else:
        alpha = x.abs().sum() / nonzero.sum().clamp(min=1)
    return alpha * torch.sign(x)  # sign(0) = 0: pruned weights stay pruned


def quantize_weight(w: torch.Tensor, bits, symmetric: bool = True, per_channel: bool = True) -> torch.Tensor:
    """The de-quantized weight x_hat (same dtype and shape); exact zeros stay exact zeros."""
    bits = check_bits(bits)
    if bits is None:
        return w
    if bits == 1:
        return _binary(w, per_channel)
    if bits == 2:
        return _ternary(w, per_channel)
    scale, zero, qmin, qmax = uniform_params(w, bits, symmetric, per_channel)
    return fake_quantize(w, scale, zero, qmin, qmax) * (w != 0)


def step_bound(x: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
    """The largest step a learned scale may take: symmetric min/max's, max|x| / qmax (per channel or tensor)."""
    scale, _, _, _ = uniform_params(x.detach(), bits, symmetric=True, per_channel=per_channel)
    return scale


def learned_step_quantize(x: torch.Tensor, step: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
    """LSQ: x_hat = s * round(clamp(x / s, -qmax, qmax)), s = min(step, max|x| / qmax), with gradients for x
    (straight through the rounding, zero where clipped) and for step (Esser et al. 2020, eq. 3), the step's
    gradient scaled by 1 / sqrt(weights per scale * qmax) as the paper does for SGD (Adam, which fine-tuning
    uses, is blind to that scale: there it is the step's parametrization that sets its pace)."""
    qmax = 2 ** (bits - 1) - 1
    per_scale = x[0].numel() if per_channel and x.dim() >= 2 else x.numel()
    g = 1.0 / math.sqrt(per_scale * qmax)
    step = step * g + (step - step * g).detach()  # value of step, gradient times g
    # (s * qmax) / qmax: the scale min/max finds again from the quantized weights, to the last bit (in float32
    # it can differ from s by one ulp, once; enough to flip an 8-bit activation's rounding downstream)
    s = torch.minimum(step, step_bound(x, bits, per_channel)) * qmax / qmax
    q = torch.clamp(x / s, -qmax, qmax)
    soft = (q + (torch.round(q) - q).detach()) * s  # the gradients of LSQ
    return soft + (torch.round(q).detach() * s.detach() - soft).detach()  # the value of min/max's formula, exactly


def ste(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: value of x_hat, gradient of x."""
    return x + (x_hat - x).detach()


def _subsample(x: torch.Tensor, count: int) -> torch.Tensor:
    """`count` elements drawn with replacement (seeded): quantiles of millions of activations in milliseconds
    (a permutation of all of them took seconds)."""
    if x.numel() <= count:
        return x
    return x[torch.randint(0, x.numel(), (count,), generator=torch.Generator().manual_seed(0))]


def tail_quantiles(x: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.quantile(x, [q, 1 - q]) (linear interpolation, the same values) from the few order statistics
    at either end, found by topk instead of sorting all of x: 3x faster on a million activations, which a
    live slider change pays once per layer."""
    n = x.numel()
    ranks = torch.tensor([q, 1 - q], dtype=x.dtype).to(torch.float64) * (n - 1)
    below, above = ranks.floor().long().tolist(), ranks.ceil().long().tolist()
    weights = (ranks - ranks.floor()).to(x.dtype)
    k = min(n, max(above[0], n - 1 - below[1]) + 1)
    smallest = torch.topk(x, k, largest=False, sorted=True).values
    largest = torch.topk(x, k, largest=True, sorted=True).values

    def order_statistic(i: int) -> torch.Tensor:
        return smallest[i] if i < k else largest[n - 1 - i]

    return tuple(torch.lerp(order_statistic(b), order_statistic(a), w) for b, a, w in zip(below, above, weights))


class ActivationQuantizer(torch.nn.Module):
    """Per-tensor asymmetric fake quantization of a layer's input, calibrated on data.

    While `calibrating`, it records the inputs' statistics and passes them through; `finish_calibration`
    fixes the range by `method`: "minmax", "percentile" (99.99th of |x| tails), or "mse" (the clipping of
    the min/max range, among 100 candidates, that minimises the squared quantization error).
    """

    def __init__(self, bits: int, method: str = "minmax"):
        super().__init__()
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.reset(bits, method)

    def reset(self, bits: int, method: str = "minmax") -> None:
        """Forget the range and start calibrating again, at `bits` with `method`."""
        self.bits = check_bits(bits, ACTIVATION_BITS, "activation")
        if method not in ("minmax", "percentile", "mse"):
            raise JPQError(f"calibration must be minmax, percentile or mse, not {method!r}.")
        self.method = method
        self.calibrating = True
        self.samples: list[torch.Tensor] = []

    def _error(self, x, lo, hi):
        scale, zero, qmin, qmax = uniform_params(torch.stack([lo, hi]), self.bits, symmetric=False, per_channel=False)
        return ((fake_quantize(x, scale, zero, qmin, qmax) - x) ** 2).mean()

    def finish_calibration(self) -> None:
        if not self.samples:
            raise JPQError("activation calibration saw no data; run calibration batches through the network first.")
        x = torch.cat([s.flatten() for s in self.samples])
        if self.method == "percentile":  # both tails from one sort of the subsample (a live slider move pays this)
            lo, hi = tail_quantiles(_subsample(x, 1_000_000), 1e-4)
        else:
            lo, hi = x.min(), x.max()
        if self.method == "mse":
            sample = _subsample(x, 200_000)
            candidates = torch.linspace(0.05, 1.0, 100)
            errors = torch.stack([self._error(sample, lo * c, hi * c) for c in candidates])
            best = candidates[int(errors.argmin())]
            lo, hi = lo * best, hi * best
        self.lo.fill_(float(min(lo, 0.0)))
        self.hi.fill_(float(max(hi, 0.0)))
        self.samples.clear()
        self.calibrating = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            return x
        if self.calibrating:
            self.samples.append(x.detach()[:, :, ::2, ::2] if x.dim() == 4 else x.detach())
            return x
        scale, zero, qmin, qmax = uniform_params(torch.stack([self.lo, self.hi]), self.bits, symmetric=False, per_channel=False)
        return ste(x, fake_quantize(x, scale, zero, qmin, qmax))
