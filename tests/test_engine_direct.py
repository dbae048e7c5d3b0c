"""The direct dense int8 convolution (`jpq_core.engine.direct`): groups of four taps, VNNI dot products straight
from the padded input, against the convolution computed in int64."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jpq_core.engine import direct, quads

pytestmark = pytest.mark.skipif(not quads.native(), reason="the direct kernel needs AVX-512 VNNI and VBMI")


def _layout(x: np.ndarray, pad: int, stride: int) -> tuple[np.ndarray, int, int]:
    """x (N, C, H, W) uint8 padded with `pad` on every side in the engine's input layout (N, phase, C, H_pad,
    W_phase), flat with the slack the engine leaves past it; returns (flat, H_pad, W_phase)."""
    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=7)
    hp, wtot = h + 2 * pad, w + 2 * pad
    wq = -(-wtot // stride)
    buf = np.zeros((n, stride, c, hp, wq), np.uint8)
    for p in range(stride):
        columns = padded[..., p::stride]
        buf[:, p, :, :, :columns.shape[-1]] = columns
    return np.concatenate([buf.reshape(-1), np.full(16 + quads.READ_BEYOND, 255, np.uint8)]), hp, wq


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3), c_in=st.integers(1, 20), c_out=st.integers(1, 20),
       k=st.sampled_from([(1, 1), (3, 3), (1, 3), (3, 1), (5, 5)]), stride=st.sampled_from([1, 2]),
       dilation=st.sampled_from([1, 2]), size=st.integers(1, 40), pad=st.integers(0, 2), some=st.booleans())
def test_accumulators_are_the_exact_convolution(seed, batch, c_in, c_out, k, stride, dilation, size, pad, some):
    """Any kernel, stride, dilation and channel count (the last block's channels padded), runs of one row per
    sample (stride 1) or of rows one by one (stride 2, runs that end mid-vector: masked stores), weights at the
    int8 extremes, all channels or `some` of them (the others unread): the computed channels' accumulators are
    the convolution's exact sums, and nothing else is written but the spare lanes' planes."""
    rng = np.random.default_rng(seed)
    kh, kw = k
    h, w = size + 4, size + (seed % 7)
    if h + 2 * pad < dilation * (kh - 1) + 1 or w + 2 * pad < dilation * (kw - 1) + 1:
        return
    x = rng.integers(0, 256, (batch, c_in, h, w), dtype=np.uint8)
    weights = rng.choice(np.array([-128, 127, 0, 1, -1, 55], np.int8), (c_out, c_in, kh, kw))
    inp, hp, wq = _layout(x, pad, stride)
    ci, ky, kx = (a.astype(np.uint64) for a in np.unravel_index(np.arange(c_in * kh * kw), (c_in, kh, kw)))
    d, s = np.uint64(dilation), np.uint64(stride)
    off = ((((kx * d) % s) * np.uint64(c_in) + ci) * np.uint64(hp) + ky * d) * np.uint64(wq) + (kx * d) // s
    channels = np.sort(rng.choice(c_out, rng.integers(0, c_out + 1), replace=False)) if some else np.arange(c_out)
    groups = direct.group_taps(off, weights.reshape(c_out, -1), channels if some else None)
    assert 0.25 <= groups.fill <= 1.0
    out_h = (hp - dilation * (kh - 1) - 1) // stride + 1
    out_w = (w + 2 * pad - dilation * (kw - 1) - 1) // stride + 1
    if stride == 1:  # a sample's rows as one run of pitch wq, whole vectors
        rows, run, rowstep = 1, -(-((out_h - 1) * wq + out_w) // 16) * 16, wq
    else:
        rows, run, rowstep = out_h, out_w, stride * wq
    plane = batch * rows * run
    spare = -(-channels.size // direct.CHANNELS) * direct.CHANNELS - channels.size
    acc = np.full((c_out + spare) * plane + 40, -7, np.int32)
    direct.accumulate(inp, stride * c_in * hp * wq, np.uint64(0), groups.segments, groups.index, groups.weights,
                      groups.planes, 0, batch, rows, run, rowstep, acc, np.uint64(plane))
    assert (acc[(c_out + spare) * plane:] == -7).all()
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=7).astype(np.float64)
    ref = torch.nn.functional.conv2d(torch.from_numpy(padded), torch.from_numpy(weights.astype(np.float64)),
                                     stride=stride, dilation=dilation).numpy().astype(np.int64)
    got = acc[:c_out * plane].reshape(c_out, batch, rows * run)
    assert (np.delete(got, channels, 0) == -7).all()
    got, ref = got[channels], ref[:, channels]
    if stride == 1:
        got = np.stack([got[..., y * wq:y * wq + out_w] for y in range(out_h)], 2)
    else:
        got = got.reshape(channels.size, batch, out_h, out_w)
    np.testing.assert_array_equal(got.transpose(1, 0, 2, 3), ref)


def test_groups_fill_whole_dot_products_for_3x3_kernels_and_not_for_pointwise_ones():
    """Nine taps per input channel in groups of four: a 3x3 kernel's rows and the next row's first tap share a
    group (two segments), 16 input channels make 36 full groups; 1x1 taps lie a plane apart, two per group."""
    hp = wq = 34
    ci, ky, kx = np.unravel_index(np.arange(16 * 9), (16, 3, 3))
    off = ((ci * hp + ky) * wq + kx).astype(np.uint64)
    groups = direct.group_taps(off, np.ones((16, 16 * 9), np.int8))
    assert groups.segments.size == 2 * 36 and groups.fill == 1.0
    pointwise = direct.group_taps((np.arange(16) * hp * wq).astype(np.uint64), np.ones((16, 16), np.int8))
    assert pointwise.fill == 0.5
