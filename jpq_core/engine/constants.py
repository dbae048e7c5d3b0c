"""Channels that hold one value at every pixel, whatever the input.

At extreme sparsity a global magnitude threshold leaves whole output channels without a kept weight (the
stereo network at 99%: 26 of 32 in features.quarter_res.0.0, 31 of 32 in the residual layer after it). Such a
channel is act(bias[c]) everywhere, and a residual layer's channel without weights is act(bias[c] + res_scale *
r) where its residual's channel is the constant r. The engine stores these channels once, in the first run over
new buffers, and skips them in later runs (`Conv.steady`); the correlation of two feature maps adds the products
of their constant channels as one number instead of multiplying them pixel by pixel (`Glue.derived`).

    mark_constant_channels(ops)   # after linking, before the first run (`lowering.link`)
"""

from __future__ import annotations

import numpy as np


def conv_constants(conv, residual: np.ndarray | None) -> np.ndarray:
    """Per output channel of `conv`, its value where it is the same at every pixel of every input, else NaN.
    `residual`: the same for the layer's residual (None where the residual's channels are not known constant)."""
    ptr = conv._kernel_weights()[0]
    constant = np.diff(ptr.astype(np.int64)) == 0  # no kept weight: the accumulator is 0 (and so is corr)
    y = conv.bias.astype(np.float32)
    if conv.residual is not None:
        if residual is None or residual.shape != constant.shape:
            return np.full(constant.shape, np.nan, np.float32)
        constant &= ~np.isnan(residual)
        y = y + np.float32(conv.res_scale) * np.nan_to_num(residual)
    y = np.where(y > 0, y, y * np.float32(conv.slope)).astype(np.float32)
    return np.where(constant, y, np.float32(np.nan))


def mark_constant_channels(ops: list) -> None:
    """Follow constant channels through the ops (in run order, so producers come first): set each conv's
    `steady` (its channels that need storing only into new buffers) and the correlation's `derived` arguments
    (the channels to correlate, the constant channels' summed products)."""
    values: dict[int, np.ndarray] = {}  # slot -> per channel: its constant value, NaN where it varies
    for op in ops:
        if op.kind == "conv":
            out = conv_constants(op, values.get(op.residual) if op.residual is not None else None)
            op.steady = ~np.isnan(out)
            values[op.output] = out
        elif op.op == "batch_part" and op.inputs[0] in values:
            values[op.output] = values[op.inputs[0]]
        elif op.op == "correlation":
            left, right = (values.get(slot) for slot in op.inputs)
            op.derived = correlation_arguments(left, right)


def correlation_arguments(left: np.ndarray | None, right: np.ndarray | None) -> dict:
    """`kernels.correlation`'s `channels` and `constant` for feature maps whose constant channels are known:
    the channels where either side varies, and the sum over the others of left * right."""
    if left is None or right is None or left.shape != right.shape:
        return {}
    both = ~np.isnan(left) & ~np.isnan(right)
    return {"channels": np.flatnonzero(~both).astype(np.int64),
            "constant": np.float32(np.sum(left[both].astype(np.float64) * right[both]))}
