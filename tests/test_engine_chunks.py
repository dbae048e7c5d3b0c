"""Epilogue rows in masked 16-lane chunks (`jpq_core.engine.chunks`) against the loops they replace: the same bytes
and floats, bit for bit, for rows of any length, with and without a residual and a kept float output."""

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jpq_core.engine import chunks, kernels

pytestmark = pytest.mark.skipif(not chunks.native(), reason="chunks need AVX-512 (the kernels keep their loops)")

_jit = numba.njit(fastmath=kernels.CONV_MATH, error_model="numpy")
quantized = {kind: _jit(getattr(kernels, f"_quantized_row_{kind}")) for kind in ("loop", "chunks")}
with_float = {kind: _jit(getattr(kernels, f"_float_and_quantized_row_{kind}")) for kind in ("loop", "chunks")}

rows = dict(length=st.integers(1, 70), offset=st.integers(0, 20), seed=st.integers(0, 2**16),
            has_res=st.booleans(), int_acc=st.booleans())


def _arrays(seed: int, length: int, offset: int, int_acc: bool):
    rng = np.random.default_rng(seed)
    size = length + offset + 40  # room past the row: lanes beyond it must stay untouched
    acc = rng.integers(-5000, 5000, size).astype(np.int32 if int_acc else np.float32)
    # values that land on quantizer ties too: halves after the affine map
    scalars = [np.float32(v) for v in (rng.integers(-300, 300), rng.choice([0.01, 0.05, 0.125]), rng.normal() * 3)]
    res = (rng.normal(size=(2, 3, 4, size)) * 4).astype(np.float32)
    return acc, scalars, res


@settings(max_examples=60, deadline=None)
@given(**rows)
def test_quantized_rows_in_chunks_equal_the_loop(length, offset, seed, has_res, int_acc):
    acc, (corr, mul, bias), res = _arrays(seed, length, offset, int_acc)
    low, qmax, rmul = np.float32(3.0), np.float32(255.0), np.float32(0.37)
    outputs = {}
    for kind, row in quantized.items():
        dest = np.full((2, 1, 3, 5, length + offset + 40), 7, np.uint8)
        r0 = np.uint64(res[1, 2, 3].ctypes.data - res.ctypes.data) // np.uint64(4)
        d0 = np.uint64(((1 * 3 + 2) * 5 + 1) * dest.shape[4] + offset)
        row(acc, np.uint64(offset), length, corr, mul, bias, low, qmax, res, r0, rmul, has_res, dest, d0)
        outputs[kind] = dest
    np.testing.assert_array_equal(outputs["chunks"], outputs["loop"])
    flat = outputs["chunks"].reshape(-1)
    assert (flat[:int(d0)] == 7).all() and (flat[int(d0) + length:] == 7).all()  # the mask: nothing else written


@settings(max_examples=60, deadline=None)
@given(keep=st.booleans(), slope=st.sampled_from([0.0, 0.1, 1.0]), **rows)
def test_float_and_quantized_rows_in_chunks_equal_the_loop(length, offset, seed, has_res, int_acc, keep, slope):
    acc, (corr, mul, bias), res = _arrays(seed, length, offset, int_acc)
    scale, zero, qmax = np.float32(0.05), np.float32(17.0), np.float32(255.0)
    outputs = {}
    for kind, row in with_float.items():
        out = np.full_like(res, -1.5)
        dest = np.full((1, 1, 2, 3, length + offset + 40), 9, np.uint8)
        r0 = np.uint64(res[0, 1, 2].ctypes.data - res.ctypes.data) // np.uint64(4)
        row(acc, np.uint64(offset), length, corr, mul, bias, res, r0, np.float32(0.7), has_res, np.float32(slope), out,
            r0 + np.uint64(offset), keep, dest, np.uint64(offset), scale, zero, qmax)
        outputs[kind] = (out, dest)
    np.testing.assert_array_equal(outputs["chunks"][0], outputs["loop"][0])
    np.testing.assert_array_equal(outputs["chunks"][1], outputs["loop"][1])


shared = _jit(kernels._shared_row_chunks)


def _expected_row(q: np.ndarray, dest: np.ndarray, n: int, channel: int, row: int, pad: int) -> None:
    """q stored as the scratch-row loops store it: padded column x + pad of a stride-1 or stride-2 input, column
    phase (x + pad) % 2 of the latter."""
    stride = dest.shape[1]
    for x, value in enumerate(q):
        column = x + pad
        dest[n, column % stride, channel, row, column // stride] = value


@settings(max_examples=80, deadline=None)
@given(strides=st.tuples(st.sampled_from([0, 1, 2]), st.sampled_from([1, 2])), pads=st.tuples(st.integers(0, 1),
       st.integers(0, 1)), past_batch=st.booleans(), **rows)
def test_stage_end_rows_in_chunks_equal_the_loop(length, offset, seed, has_res, int_acc, strides, pads, past_batch):
    """A row quantized once and stored into two destinations (`kernels._shared_row`): each stride-1 or stride-2
    (0: inactive), the second one's batch part ending before the sample (`past_batch`), against the loop's
    bytes laid out by hand; nothing else written."""
    acc, (corr, mul, bias), res = _arrays(seed, length, offset, int_acc)
    low, qmax, rmul = np.float32(3.0), np.float32(255.0), np.float32(0.37)
    n, c, oy, c0 = 1, 2, 1, 1
    r0 = np.uint64(res[1, 2, 3].ctypes.data - res.ctypes.data) // np.uint64(4)
    q = np.zeros((1, 1, 1, 1, length), np.uint8)
    quantized["loop"](acc, np.uint64(offset), length, corr, mul, bias, low, qmax, res, r0, rmul, has_res, q, np.uint64(0))
    dests, expected, places = [], [], []
    for stride, pad, part in zip(strides, pads, (2, 1 if past_batch else 2)):
        shape = (part, max(stride, 1), 4, oy + pad + 2, -(-(length + 2 * pad) // max(stride, 1)) + 1)
        dests.append(np.full(shape, 7, np.uint8))
        expected.append(dests[-1].copy())
        places.append(np.array([c0, pad, stride > 0, pad], np.int64))
        if stride > 0 and n < part:
            _expected_row(q.reshape(-1), expected[-1], n, c0 + c, oy + pad, pad)
    shared(acc, np.uint64(offset), length, corr, mul, bias, low, qmax, res, r0, rmul, has_res, dests[0], places[0],
           dests[1], places[1], n, c, oy)
    np.testing.assert_array_equal(dests[0], expected[0])
    np.testing.assert_array_equal(dests[1], expected[1])
