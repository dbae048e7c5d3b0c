"""Numba kernels of the sparse integer engine.

Direct sparse convolution (no im2col). The input of a convolution is zero-padded, split into `stride`
column phases and flattened per sample, so that a kept weight (c_in, ky, kx) becomes one flat offset

    off = ((phase * C_in + c_in) * H_pad + ky * dilation) * W_phase + (kx * dilation) // stride,
    phase = (kx * dilation) % stride,

and output row oy, column ox of a sample reads input element off + oy * stride * W_phase + ox: a
contiguous run over ox for every kept weight. Weights are stored as CSR over output channels (offsets
sorted). The parallel unit is a tile of a few output rows across all output channels; the accumulator
row stays in L1 and is updated by up to eight kept weights per pass. Indices are unsigned (uint64): with signed
ones numba's negative-index handling blocks vectorisation.

Integer path: the input holds q_a (uint8, padded with the zero point z_a, which represents 0.0), the
weights hold integer k_w, the accumulator is acc = sum k_w * q_a, and the exact integer
sum k_w * (q_a - z_a) = acc - z_a * sum_c(k_w) ("corr"). The accumulator is float32 (weights and corr
as float32 integers) where every partial sum is below 2^24 and so exact, else int32: the same kernel,
compiled for either (float FMAs beat the int32 multiply-add LLVM emits, vpmaddwd + vpaddd, on Zen 4).
The epilogue computes
y = (acc - corr[c]) * mul[c] + bias[c] (+ res_scale * residual), then a (leaky) ReLU; where only
quantized consumers read y, it goes from the accumulators to their bytes in one step (`_emit_quantized`).
Float path: the same kernel with float32 input and weights and corr = 0.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir


def wide_vector_features(host_features) -> str | None:
    """The CPU features numba compiles for where they differ from the host's own: on an AVX-512 CPU, the host's
    features without LLVM's `prefer-256-bit` tuning, so that the kernels' loops use 512-bit registers also where
    LLVM would choose 256-bit ones (Intel's, such as Ice Lake; on AMD's Zen 4 the kernels already used 512-bit
    ones). None without AVX-512. Measured on a Xeon that LLVM takes for Ice Lake, pinned A/B runs, one thread:
    ResNet-20 at batch 1 8-13% faster at 90-99% (0% within 3%), at batch 64 10-20%; stereo no slower
    (docs/engine.md)."""
    if not host_features.get("avx512f") or not numba.config.ENABLE_AVX:
        return None
    return host_features.flatten() + ",-prefer-256-bit"


# Set before numba makes its code generator (the first compiled function or dispatcher of the process: hence
# before `numba.typed` below); a process that compiled numba code earlier keeps LLVM's default, as does one
# whose user chose the CPU or its features (NUMBA_CPU_NAME, NUMBA_CPU_FEATURES: say, for a portable cache).
if numba.config.CPU_FEATURES is None and numba.config.CPU_NAME is None:
    numba.config.CPU_FEATURES = wide_vector_features(llvm.get_host_cpu_features())

from numba import prange, types  # noqa: E402 (after the features: see above)
from numba.core import cgutils
from numba.core.extending import intrinsic, overload
from numba.np.arrayobj import make_array, populate_array
from numba.typed import List

from jpq_core.engine import chunks, numba_cache, quads, shift_blocks  # noqa: E402 (after the features: see above)

# Every kernel uses NumPy's error model: a float division by zero gives inf instead of raising, so numba puts
# no zero check on the divisor inside loops. With the check, loops dividing by a runtime value (the quantized
# stores' v / scale) ran scalar: ResNet-20's residual epilogue took 24 instead of 3 us per layer at batch 1.
# Without the GIL, so that the parts of a batch run on several Python threads at once (`Program.run`).
njit = functools.partial(numba.njit, error_model="numpy", nogil=True)


@intrinsic
def _borrowed(typingctx, array):
    """`array` without its reference count: the same data, shape and strides, no meminfo. Every jitted call that
    takes an array, also one inlined, increments and decrements its count, an atomic operation (on ResNet-20's
    batch-1 layers about 40% of a kernel's time went to these, per channel and row); for a borrowed array they
    are a null test. Only for arrays that outlive the borrowed one: the kernels' arguments, within the call."""
    def codegen(context, builder, signature, args):
        source = make_array(signature.args[0])(context, builder, value=args[0])
        borrowed = make_array(signature.return_type)(context, builder)
        populate_array(borrowed, data=source.data, shape=source.shape, strides=source.strides,
                       itemsize=source.itemsize, meminfo=None)
        return borrowed._getvalue()
    return array(array), codegen


@intrinsic
def _flat(typingctx, array):
    """A C-contiguous `array` as one dimension, borrowed like `_borrowed`. `array.reshape(-1)` calls numba's
    C helper for every view (14% of a stage-3 ResNet-20 layer's time at batch 1, once per channel and row)
    and counts the view's references."""
    if not isinstance(array, types.Array) or array.layout != "C":
        return None
    def codegen(context, builder, signature, args):
        source = make_array(signature.args[0])(context, builder, value=args[0])
        flat = make_array(signature.return_type)(context, builder)
        size = ir.Constant(source.itemsize.type, 1)
        for extent in cgutils.unpack_tuple(builder, source.shape):
            size = builder.mul(size, extent)
        populate_array(flat, data=source.data, shape=[size], strides=[source.itemsize], itemsize=source.itemsize,
                       meminfo=None)
        return flat._getvalue()
    return array.copy(ndim=1)(array), codegen


@intrinsic
def _alive(typingctx, array):
    """A use of `array` that does nothing. numba releases an array after its last use, so an array made in a
    kernel and used through a `_borrowed` alias must be used after the alias's last use: `_alive(owner)` there."""
    def codegen(context, builder, signature, args):
        return context.get_dummy_value()
    return types.none(array), codegen


STEADY, UNREAD = 1, 2  # a channel's state in the kernel's index (`ops.Conv.channel_states`)
VECTOR = 16  # int32 lanes of an AVX-512 register: accumulator rows are computed in whole vectors
SHIFT_BLOCKS = chunks.native()  # the correlation's shifts in blocks of registers (`shift_blocks`), read when compiled
CHUNKED_ROWS = chunks.native()  # epilogue rows in masked 16-lane chunks (`chunks`), read when numba compiles

# The convolution's float arithmetic may contract a multiply and an add into an FMA, but not reassociate or take
# reciprocals: with those, two compilations of one epilogue (say, for int32 and float32 accumulators) rounded a few
# outputs differently, and a stored code could move by one step depending on the product kind. The accumulation
# (`_accumulate_kept`, compiled on its own) keeps every fast-math flag: its sums are exact in any order.
CONV_MATH = {"nnan", "ninf", "nsz", "contract"}


@njit(inline="always")
def _store(v, mode, scale, zero, qmax):
    """mode 0: v; 1: fake-quantized s * (clamp(round(v / s) + z, 0, qmax) - z); 2: q = clamp(round(v / s) + z, 0, qmax)."""
    if mode == 0:
        return v
    q = min(max(np.rint(v / scale) + zero, np.float32(0.0)), qmax)
    if mode == 1:
        return scale * (q - zero)
    return q


@njit(inline="always")
def _byte(v, low, qmax):
    """rint(v) clamped to [low, qmax] (whole numbers), as an integer: clamped first and rounded by the conversion,
    which compiles to one vcvtps2dq where rint and a clamp of the rounded value took a vrndscaleps more
    (the same values: rounding commutes with a clamp to whole numbers)."""
    return np.int32(np.rint(min(max(v, low), qmax)))


@njit(inline="always")
def _offset4(array, i, j, k):
    """The flat index of array[i, j, k, 0] (a C-contiguous 4-d array)."""
    return ((np.uint64(i) * np.uint64(array.shape[1]) + np.uint64(j)) * np.uint64(array.shape[2])
            + np.uint64(k)) * np.uint64(array.shape[3])


@njit(inline="always")
def _offset5(array, i, j, k, m):
    """The flat index of array[i, j, k, m, 0] (a C-contiguous 5-d array)."""
    return (((np.uint64(i) * np.uint64(array.shape[1]) + np.uint64(j)) * np.uint64(array.shape[2]) + np.uint64(k))
            * np.uint64(array.shape[3]) + np.uint64(m)) * np.uint64(array.shape[4])


def _quantized_row(acc, a0, length, corr, mul, bias, low, qmax, res, r0, rmul, has_res, dest, d0):
    """dest.flat[d0 + x] = min(max(rint(v), low), qmax) with v = (acc[a0 + x] - corr) * mul + bias
    (+ rmul * res.flat[r0 + x] where has_res) for x < length. In 16-lane masked chunks (`chunks`) where numba
    compiles for AVX-512 and the arithmetic is float32 (`_by_chunks`), else one loop; chosen when compiled."""
    raise NotImplementedError("called from compiled kernels only")


def _quantized_row_loop(acc, a0, length, corr, mul, bias, low, qmax, res, r0, rmul, has_res, dest, d0):
    flat_res, flat_dest = _flat(res), _flat(dest)
    for x in range(np.uint64(length)):
        # an int32 accumulator becomes float32 before the subtraction (int32 - float32 is float64 in numba:
        # twice the conversions); the same value while |acc| < 2^24, as every float path here assumes
        v = (np.float32(acc[a0 + x]) - corr) * mul + bias
        if has_res:
            v += rmul * flat_res[r0 + x]
        flat_dest[d0 + x] = _byte(v, low, qmax)


def _quantized_row_chunks(acc, a0, length, corr, mul, bias, low, qmax, res, r0, rmul, has_res, dest, d0):
    end = np.uint64(length)
    whole = end & ~np.uint64(chunks.LANES - 1)
    lanes = np.uint64(chunks.LANES)  # whole chunks with a constant count: their masks fold away (a mask per chunk
    for x in range(np.uint64(0), whole, lanes):  # cost 0.124 against 0.098 ns an output, in C)
        chunks.quantized_chunk(acc, a0 + x, lanes, corr, mul, bias, res, r0 + x, rmul, has_res, low, qmax, dest, d0 + x)
    if whole < end:
        chunks.quantized_chunk(acc, a0 + whole, end - whole, corr, mul, bias, res, r0 + whole, rmul, has_res, low,
                               qmax, dest, d0 + whole)


def _float_and_quantized_row(acc, a0, w, corr, mul, bias, res, r0, res_scale, has_res, slope, out, o0, keep, dest, d0,
                             scale, zero, qmax):
    """y = act((acc[a0 + x] - corr) * mul + bias (+ res_scale * res.flat[r0 + x] where has_res)), act(v) = v if
    v > 0 else slope * v, into out.flat[o0 + x] where keep and, quantized (`_store` mode 2), into
    dest.flat[d0 + x], for x < w: in chunks or one loop, as `_quantized_row`."""
    raise NotImplementedError("called from compiled kernels only")


def _float_and_quantized_row_loop(acc, a0, w, corr, mul, bias, res, r0, res_scale, has_res, slope, out, o0, keep, dest,
                                  d0, scale, zero, qmax):
    flat_res, flat_out, flat_dest = _flat(res), _flat(out), _flat(dest)
    for x in range(np.uint64(w)):
        v = (np.float32(acc[a0 + x]) - corr) * mul + bias
        if has_res:
            v += res_scale * flat_res[r0 + x]
        y = v if v > 0 else v * slope
        if keep:
            flat_out[o0 + x] = y
        flat_dest[d0 + x] = min(max(np.rint(y / scale) + zero, np.float32(0.0)), qmax)


def _float_and_quantized_row_chunks(acc, a0, w, corr, mul, bias, res, r0, res_scale, has_res, slope, out, o0, keep,
                                    dest, d0, scale, zero, qmax):
    end = np.uint64(w)
    for x in range(np.uint64(0), end, np.uint64(chunks.LANES)):
        chunks.float_and_quantized_chunk(acc, a0 + x, min(np.uint64(chunks.LANES), end - x), corr, mul, bias, res,
                                         r0 + x, res_scale, has_res, slope, out, o0 + x, keep, dest, d0 + x, scale,
                                         zero, qmax)


def _by_chunks(acc, *scalars) -> bool:
    """Whether a row goes in chunks: AVX-512, and float32 arithmetic as the loop has it (float32 scalars, an
    int32 or float32 accumulator; an int32 corr makes numba's loop compute in float64)."""
    return (CHUNKED_ROWS and acc.dtype in (types.int32, types.float32)
            and all(s == types.float32 for s in scalars))


# The rows' functions compile with the tile functions' float math (`CONV_MATH`), so that the loops and the
# chunks round alike. The chunks are inlined in numba's IR: as a function of their own each row was a call of
# 50 pushed arguments and four reference counts (atomic), on AMD's Zen 4 ~30 ns a row, 2.5-3x the arithmetic of
# ResNet-20's 32-pixel rows (docs/engine.md, session 23).
_ROW_OPTIONS = {"fastmath": CONV_MATH, "error_model": "numpy", "nogil": True}


def _quantized_row_chunked(acc, a0, length, corr, mul, bias, low, qmax, res, r0, rmul, has_res, dest, d0) -> bool:
    return _by_chunks(acc, corr, mul, bias, low, qmax, rmul)


def _float_and_quantized_row_chunked(acc, a0, w, corr, mul, bias, res, r0, res_scale, has_res, slope, out, o0, keep,
                                     dest, d0, scale, zero, qmax) -> bool:
    return _by_chunks(acc, corr, mul, bias, res_scale, slope, scale, zero, qmax)


def _inline_if(predicate):
    """numba's inlining choice for an overload: in its IR where `predicate(*argument types)` holds (the chunks and
    quads inline cleanly; the loops, inlined, raise numba's NumbaIRAssumptionWarning at every compile)."""
    return lambda expr, caller, callee: predicate(*callee.signature.args)


@overload(_quantized_row, jit_options=_ROW_OPTIONS, inline=_inline_if(_quantized_row_chunked))
def _quantized_row_by_type(acc, a0, length, corr, mul, bias, low, qmax, res, r0, rmul, has_res, dest, d0):
    chunked = _quantized_row_chunked(acc, a0, length, corr, mul, bias, low, qmax, res, r0, rmul, has_res, dest, d0)
    return _quantized_row_chunks if chunked else _quantized_row_loop


@overload(_float_and_quantized_row, jit_options=_ROW_OPTIONS, inline=_inline_if(_float_and_quantized_row_chunked))
def _float_and_quantized_row_by_type(acc, a0, w, corr, mul, bias, res, r0, res_scale, has_res, slope, out, o0, keep,
                                     dest, d0, scale, zero, qmax):
    chunked = _float_and_quantized_row_chunked(acc, a0, w, corr, mul, bias, res, r0, res_scale, has_res, slope, out, o0,
                                               keep, dest, d0, scale, zero, qmax)
    return _float_and_quantized_row_chunks if chunked else _float_and_quantized_row_loop


def _shared_row(acc, a0, w, corr, mul, bias, low, qmax, res, r0, rmul, has_res, dest_a, place_a, dest_b, place_b, n, c,
                oy):
    """A row read by two consumers with one quantizer (a ResNet's stage end, stereo's half-resolution features):
    `_quantize_row`'s bytes, computed once per 16-lane chunk and stored from the register into dest_a and dest_b,
    each a stride-1 input (the bytes as they are) or a stride-2 one (even and odd columns to their column phases),
    skipped where inactive or where sample n lies past its part of the batch (`_chunk_target`). Only in chunks
    (`chunks.shared_chunk`), where `_shared_in_chunks` holds; elsewhere it does nothing and the caller takes the
    loops through a scratch row. Through the scratch row, each destination's split was a vectorised loop of its
    own with its setup and remainders, per row: at ResNet-20's 16-32 pixel rows the two splits took 40-60% of a
    stage end's time (docs/engine.md, session 24)."""
    raise NotImplementedError("called from compiled kernels only")


def _shared_in_chunks(acc, corr, mul, bias, low, qmax, rmul) -> bool:
    """Whether `_shared_row` runs (when compiled): as `_by_chunks`."""
    raise NotImplementedError("called from compiled kernels only")


@overload(_shared_in_chunks, inline="always")
def _shared_in_chunks_by_type(acc, corr, mul, bias, low, qmax, rmul):
    chunked = _by_chunks(acc, corr, mul, bias, low, qmax, rmul)
    return lambda acc, corr, mul, bias, low, qmax, rmul: chunked


@njit(inline="always")
def _chunk_target(dest, place, n, c, oy):
    """(mode, even, odd, shift) of `chunks.shared_chunk` for `dest` at `place` (c0, pad_h, active, pad_w) and the
    row (n, c, oy): mode 0 not stored, 1 stride 1 (the row at `even`), 2 stride 2 (even columns from `even`,
    odd ones from `odd`); a chunk at column x starts at offset + (x >> shift). Without branches (each name
    assigned once: the row is inlined in numba's IR)."""
    split = np.uint64(dest.shape[1] == 2)
    active = np.uint64((place[2] != 0) & (n < dest.shape[0]))
    pad = np.uint64(place[3])
    channel, row = np.uint64(place[0] + c), np.uint64(place[1] + oy)
    even_phase = (pad % np.uint64(2)) * split
    even = _offset5(dest, n, even_phase, channel, row) + (pad >> split)
    odd = _offset5(dest, n, (np.uint64(1) - even_phase) * split, channel, row) + ((pad + np.uint64(1)) >> np.uint64(1))
    return active * (np.uint64(1) + split), even, odd, split


def _shared_row_chunks(acc, a0, w, corr, mul, bias, low, qmax, res, r0, rmul, has_res, dest_a, place_a, dest_b, place_b,
                       n, c, oy):
    mode_a, even_a, odd_a, shift_a = _chunk_target(dest_a, place_a, n, c, oy)
    mode_b, even_b, odd_b, shift_b = _chunk_target(dest_b, place_b, n, c, oy)
    end = np.uint64(w)
    for x in range(np.uint64(0), end, np.uint64(chunks.LANES)):
        chunks.shared_chunk(acc, a0 + x, min(np.uint64(chunks.LANES), end - x), corr, mul, bias, res, r0 + x, rmul,
                            has_res, low, qmax, dest_a, mode_a, even_a + (x >> shift_a), odd_a + (x >> shift_a),
                            dest_b, mode_b, even_b + (x >> shift_b), odd_b + (x >> shift_b))


def _shared_row_none(acc, a0, w, corr, mul, bias, low, qmax, res, r0, rmul, has_res, dest_a, place_a, dest_b, place_b,
                     n, c, oy):
    return None


@overload(_shared_row, jit_options=_ROW_OPTIONS, inline="always")
def _shared_row_by_type(acc, a0, w, corr, mul, bias, low, qmax, res, r0, rmul, has_res, dest_a, place_a, dest_b, place_b,
                        n, c, oy):
    return _shared_row_chunks if _by_chunks(acc, corr, mul, bias, low, qmax, rmul) else _shared_row_none


@njit(inline="always")
def _split_pairs(pairs, w, dest, n, c, oy, c0, pad_h, pad):
    """Store a quantized row, held as byte pairs `pairs` (a uint16 view of a row of w bytes), into the two
    column phases of a stride-2 dest (see `_emit`; `pad_h` rows above, `pad` columns left).

    Column phase 0/1 of x is the low/high byte of pair x // 2, so splitting the phases is contiguous loads
    and shifts instead of strided gathers (which took most of a stride-2 consumer's store time)."""
    un, uc, uy = np.uint64(n), np.uint64(c0 + c), np.uint64(oy + pad_h)
    for p in range(2):
        j_lo = max(0, (pad - p + 1) // 2)
        j_hi = min(dest.shape[4], (w - 1 + pad - p) // 2 + 1)
        if j_hi <= j_lo:
            continue
        first = j_lo * 2 + p - pad
        lo = np.uint64(j_lo)
        k0 = np.uint64(first // 2)
        up = np.uint64(p)
        shift = np.uint16(8 * (first % 2))  # one loop for both bytes: two near-identical loops did not vectorise
        for j in range(np.uint64(j_hi - j_lo)):
            dest[un, up, uc, uy, lo + j] = np.uint8((pairs[k0 + j] >> shift) & np.uint16(255))


@njit(inline="always")
def _emit_quantized(acc, a0, w, corr, mul, bias, low, dest, n, c, oy, c0, pad_h, pad, qmax, scratch, pairs, res, rmul, has_res,
                    phases):
    """Store q = clamp(rint((acc[a0 + x] - corr) * mul + bias [+ rmul * res[n, c, oy, x]]), low, qmax) for the row
    acc[a0:a0 + w] into dest (stride 1 or 2) like `_emit`, straight from the accumulators: `mul`, `bias` and `rmul`
    fold the layer's output scale, the residual's scale and the consumer's quantizer (1 / scale, zero point),
    and `low` = the zero point folds a ReLU in. `phases`: the column phases of every destination of the layer,
    1 or 2, known when compiled (a loop per case in one function ran 3x slower, see `_tile_rows`), or 0: this
    dest's own."""
    if n >= dest.shape[0]:
        return
    un, uc, uy, ur = np.uint64(n), np.uint64(c), np.uint64(oy), np.uint64(oy + pad_h)
    if phases == 1 or (phases == 0 and dest.shape[1] == 1):
        _quantized_row(acc, a0, w, corr, mul, bias, low, qmax, res, _offset4(res, un, uc, uy), rmul, has_res, dest,
                       _offset5(dest, un, 0, c0 + c, ur) + np.uint64(pad))
        return
    _quantize_row(acc, a0, w, corr, mul, bias, low, qmax, res, n, c, oy, rmul, has_res, scratch)
    _split_pairs(pairs, w, dest, n, c, oy, c0, pad_h, pad)


@njit(inline="always")
def _copy_row(scratch, w, dest, n, c, oy, c0, pad_h, pad):
    """Store the quantized row scratch[:w] into a stride-1 dest (see `_emit`)."""
    if n >= dest.shape[0]:
        return
    un, ud, ur, shift = np.uint64(n), np.uint64(c0 + c), np.uint64(oy + pad_h), np.uint64(pad)
    for x in range(np.uint64(w)):
        dest[un, 0, ud, ur, shift + x] = scratch[x]


@njit(inline="always")
def _emit_run(acc, a0, w, rows, pitch, corr, mul, bias, low, qmax, dest, n, c, oy, c0, pad_h, pad, pad_value, res):
    """`_emit_quantized` for `rows` rows of a stride-1 dest whose rows lie `pitch` apart, as in acc: one row
    (`_quantized_row`) over the run from row oy's first column to the last row's last, then the padding columns
    between the rows (which it wrote) set back to pad_value. At classifier widths a loop per row cost more than
    its work."""
    if n >= dest.shape[0]:
        return
    flat = _flat(dest)
    step, width = np.uint64(pitch), np.uint64(w)  # unsigned throughout: int64 with uint64 is float64 in numba
    row0 = ((np.uint64(n) * np.uint64(dest.shape[2]) + np.uint64(c0 + c)) * np.uint64(dest.shape[3])
            + np.uint64(oy + pad_h)) * step + np.uint64(pad)
    _quantized_row(acc, a0, np.uint64(rows - 1) * step + width, corr, mul, bias, low, qmax, res, np.uint64(0),
                   np.float32(0.0), False, dest, row0)  # res: an unread float array (no residual here)
    fill = np.uint8(pad_value)
    for x in range(width, step):  # down the rows: a row's few bytes in a loop of their own became a memset call
        for r in range(np.uint64(rows - 1)):  # per row, and each call spilled the vector registers around it
            flat[row0 + r * step + x] = fill


@njit(inline="always")
def _quantize_row(acc, a0, w, corr, mul, bias, low, qmax, res, n, c, oy, rmul, has_res, scratch):
    """scratch[x] = `_emit_quantized`'s q of acc[a0 + x], for x < w. A loop, not chunks: `_split_pairs` reads the
    bytes back as pairs, and loads from masked stores wait for them to retire (the stage ends 27% slower)."""
    un, uc, uy = np.uint64(n), np.uint64(c), np.uint64(oy)
    if not has_res:  # a loop of its own: with the residual's case inside it compiled to scalar code
        for x in range(np.uint64(w)):
            scratch[x] = _byte((np.float32(acc[a0 + x]) - corr) * mul + bias, low, qmax)
        return
    for x in range(np.uint64(w)):
        scratch[x] = _byte((np.float32(acc[a0 + x]) - corr) * mul + bias + rmul * res[un, uc, uy, x], low, qmax)


@njit(inline="always")
def _emit_with_float(acc, a0, w, corr, mul, bias, res, res_scale, has_res, slope, out, keep, dest, n, c, oy, c0, pad_h, pad,
                     scale, zero, qmax):
    """y = act((acc[a0 + x] - corr) * mul + bias [+ res_scale * res[n, c, oy, x]]) for one row, stored as float
    into out (when `keep`) and quantized (`_store` mode 2) into a stride-1 dest, in one pass
    (`_float_and_quantized_row`): at classifier widths a row's loops are short, and three of them (y, out, dest)
    cost three times the loop overhead. One loop with the (row-invariant) cases inside, not a loop per case:
    LLVM merged the near-identical loops of the cases into one that did not vectorise (ResNet-20's residual
    layers 3x slower)."""
    un, uc, uy = np.uint64(n), np.uint64(c), np.uint64(oy)
    _float_and_quantized_row(acc, a0, w, corr, mul, bias, res, _offset4(res, un, uc, uy), res_scale, has_res, slope,
                             out, _offset4(out, un, uc, uy), keep, dest,
                             _offset5(dest, un, 0, c0 + c, oy + pad_h) + np.uint64(pad), scale, zero, qmax)


@njit(inline="always")
def _emit(y, w, dest, n, c, oy, c0, pad_h, pad, mode, scale, zero, qmax, scratch, pairs):
    """Store the output row y[:w] of sample n, channel c, row oy into dest (N', S, C_total, H_pad, W_phase) at
    channel c0 + c, row oy + pad_h, column x + pad split into S column phases, each value through `_store`.
    Samples n >= N' are not stored (a consumer that reads only the first part of the batch).
    `scratch` is a uint8 row of at least w + 2 (even) elements for the stride-2 quantized case, `pairs` its
    uint16 view.

    Rows are addressed by full index, not taken as views: a view of a shared array updates its reference
    count, an atomic operation that two threads writing the same array turn into a contended cache line
    (with views per output row, two threads ran a layer no faster than one)."""
    if n >= dest.shape[0]:
        return
    stride = dest.shape[1]
    un, ud, ur = np.uint64(n), np.uint64(c0 + c), np.uint64(oy + pad_h)
    if stride == 1:
        shift = np.uint64(pad)
        if mode == 2:  # branches outside the loops, so that each loop vectorises
            for x in range(np.uint64(w)):
                dest[un, 0, ud, ur, shift + x] = min(max(np.rint(y[x] / scale) + zero, np.float32(0.0)), qmax)
        elif mode == 1:
            for x in range(np.uint64(w)):
                dest[un, 0, ud, ur, shift + x] = _store(y[x], 1, scale, zero, qmax)
        else:
            for x in range(np.uint64(w)):
                dest[un, 0, ud, ur, shift + x] = y[x]
        return
    if mode == 2 and stride == 2:
        for x in range(np.uint64(w)):
            scratch[x] = np.uint8(min(max(np.rint(y[x] / scale) + zero, np.float32(0.0)), qmax))
        _split_pairs(pairs, w, dest, n, c, oy, c0, pad_h, pad)
        return
    for p in range(stride):  # phase p holds padded columns j * stride + p, i.e. x = j * stride + p - pad
        j_lo = max(0, (pad - p + stride - 1) // stride)
        j_hi = min(dest.shape[4], (w - 1 + pad - p) // stride + 1)
        if j_hi <= j_lo:
            continue
        first = np.uint64(j_lo * stride + p - pad)  # unsigned indices: no negative-index checks, so it vectorises
        lo = np.uint64(j_lo)
        step = np.uint64(stride)
        up = np.uint64(p)
        for j in range(np.uint64(j_hi - j_lo)):
            dest[un, up, ud, ur, lo + j] = _store(y[first + j * step], mode, scale, zero, qmax)


@njit(inline="always")
def _four_products(acc, length, inp, base, off, val, k, add):
    """acc[x] = (acc[x] where `add`, else 0) + sum_{k <= j < k + 4} val[j] * inp[base + off[j] + x], x < length."""
    v0 = val[k]
    v1 = val[k + np.uint64(1)]
    v2 = val[k + np.uint64(2)]
    v3 = val[k + np.uint64(3)]
    o0 = base + off[k]
    o1 = base + off[k + np.uint64(1)]
    o2 = base + off[k + np.uint64(2)]
    o3 = base + off[k + np.uint64(3)]
    if add:
        for x in range(length):
            acc[x] += v0 * inp[o0 + x] + v1 * inp[o1 + x] + v2 * inp[o2 + x] + v3 * inp[o3 + x]
    else:
        for x in range(length):
            acc[x] = v0 * inp[o0 + x] + v1 * inp[o1 + x] + v2 * inp[o2 + x] + v3 * inp[o3 + x]


@njit(inline="always")
def _accumulate(acc, length, inp, base, off, val, k0, k1):
    """acc[x] = sum_{k0 <= k < k1} val[k] * inp[base + off[k] + x] for x < length (a multiple of VECTOR).

    The first pass sets the accumulators (no zeroing pass) and takes the first 1-4 weights, so that the rest is
    a multiple of four and a channel of few kept weights, common at high sparsity, makes one or two passes;
    then four weights where (k1 - k) % 8 leaves four, then eight per pass (one load and store of the
    accumulators per eight products: stereo 4-10% faster at 90-95% than four per pass, ResNet-20 ahead or even,
    docs/engine.md)."""
    first = ((k1 - k0 + np.uint64(3)) % np.uint64(4) + np.uint64(1)) * np.uint64(k1 > k0)
    k = k0 + first
    if k == k0 + np.uint64(1):
        v0 = val[k0]
        o0 = base + off[k0]
        for x in range(length):
            acc[x] = v0 * inp[o0 + x]
    elif k == k0 + np.uint64(2):
        v0 = val[k0]
        v1 = val[k0 + np.uint64(1)]
        o0 = base + off[k0]
        o1 = base + off[k0 + np.uint64(1)]
        for x in range(length):
            acc[x] = v0 * inp[o0 + x] + v1 * inp[o1 + x]
    elif k == k0 + np.uint64(3):
        v0 = val[k0]
        v1 = val[k0 + np.uint64(1)]
        v2 = val[k0 + np.uint64(2)]
        o0 = base + off[k0]
        o1 = base + off[k0 + np.uint64(1)]
        o2 = base + off[k0 + np.uint64(2)]
        for x in range(length):
            acc[x] = v0 * inp[o0 + x] + v1 * inp[o1 + x] + v2 * inp[o2 + x]
    elif k == k0 + np.uint64(4):
        _four_products(acc, length, inp, base, off, val, k0, False)
    else:
        for x in range(length):
            acc[x] = 0
    if (k1 - k) % np.uint64(8) == np.uint64(4):
        _four_products(acc, length, inp, base, off, val, k, True)
        k += np.uint64(4)
    while k < k1:
        v0 = val[k]
        v1 = val[k + np.uint64(1)]
        v2 = val[k + np.uint64(2)]
        v3 = val[k + np.uint64(3)]
        v4 = val[k + np.uint64(4)]
        v5 = val[k + np.uint64(5)]
        v6 = val[k + np.uint64(6)]
        v7 = val[k + np.uint64(7)]
        o0 = base + off[k]
        o1 = base + off[k + np.uint64(1)]
        o2 = base + off[k + np.uint64(2)]
        o3 = base + off[k + np.uint64(3)]
        o4 = base + off[k + np.uint64(4)]
        o5 = base + off[k + np.uint64(5)]
        o6 = base + off[k + np.uint64(6)]
        o7 = base + off[k + np.uint64(7)]
        for x in range(length):
            acc[x] += ((v0 * inp[o0 + x] + v1 * inp[o1 + x] + v2 * inp[o2 + x] + v3 * inp[o3 + x])
                       + (v4 * inp[o4 + x] + v5 * inp[o5 + x] + v6 * inp[o6 + x] + v7 * inp[o7 + x]))
        k += np.uint64(8)


def _accumulate_kept(acc, length, inp, base, off, val, k0, k1, count, in_step, acc_step):
    """The accumulators over kept weights k0 .. k1 - 1 for `count` runs of `length`, run r reading the input
    r * in_step further on and writing acc from r * acc_step: where val holds quads (uint32 of four weight bytes,
    see `quads`), one dot product per quad (`quads.accumulate_groups`, each pass over all runs), else one product
    per weight (`_accumulate`, run by run). Chosen when numba compiles, by val's type: a CPU without VNNI and VBMI
    gets no quads, so never compiles them."""
    raise NotImplementedError("called from compiled kernels only")


def _accumulate_quads(acc, length, inp, base, off, val, k0, k1, count, in_step, acc_step):
    quads.accumulate_groups(acc, length, inp, base, off, val, k0, k1, count, in_step, acc_step)


def _accumulate_weights(acc, length, inp, base, off, val, k0, k1, count, in_step, acc_step):
    for r in range(count):
        _accumulate(acc[r * acc_step:], length, inp, base + r * in_step, off, val, k0, k1)


def _quad_weights(acc, length, inp, base, off, val, k0, k1, count, in_step, acc_step) -> bool:
    return isinstance(val, types.Array) and val.dtype == types.uint32


# The quads inlined in numba's IR (a call per channel or row costs its arguments and reference counts, see
# `_ROW_OPTIONS`); one product per weight compiled as a function of its own: inlined, its loops raise numba's
# NumbaIRAssumptionWarning (a variable out of scope) at every compile.
@overload(_accumulate_kept, jit_options={"fastmath": True, "error_model": "numpy", "nogil": True},
          inline=_inline_if(_quad_weights))
def _accumulate_kept_by_type(acc, length, inp, base, off, val, k0, k1, count, in_step, acc_step):
    quad_weights = _quad_weights(acc, length, inp, base, off, val, k0, k1, count, in_step, acc_step)
    return _accumulate_quads if quad_weights else _accumulate_weights


@njit(inline="always")
def _whole_vectors(count):
    """count rounded up to a multiple of VECTOR, in a form the compiler sees as one (no scalar remainder)."""
    return (count + np.uint64(VECTOR - 1)) & ~np.uint64(VECTOR - 1)


# How a tile's rows leave the accumulators (chosen per layer call, see `_sparse_conv`): straight to quantized
# bytes (`_emit_quantized`) of destinations that all have stride 1, all stride 2 or some of each; for two
# stride-2 destinations with one quantizer (the two consumers of a ResNet's stage end), the bytes once, then
# split into each (two emits in one loop ran 4-6x slower than one, and so did a stride-1 store beside the
# splits, even unused: it stays out of this variant); for a stride-1 and a stride-2 destination with one
# quantizer (stereo's half-resolution features, read by the stride-2 conv and the refinement), the bytes once,
# copied into one and split into the other, in a variant of its own; a float row and one quantized stride-1
# destination in one loop (`_emit_with_float`); or the float row y, then the float output and up to two
# destinations of any store mode (`_emit`).
DIRECT_STRIDE1, DIRECT_STRIDE2, DIRECT_MIXED, DIRECT_SHARED, DIRECT_SHARED_MIXED, FUSED, GENERAL = range(7)


@njit(inline="always")
def _tile_rows(epilogue, t, args):
    """Output rows of tile t (up to rows_per_tile rows of one sample) for every output channel: `_sparse_conv`'s
    parallel unit, written as serial code that the parallel and the serial kernel both call. It addresses rows
    of shared arrays by full index, never as views (see `_emit`): views made two threads no faster than one.

    With `plane` (row oy + 1 reads rowstride elements after row oy, at any stride), a channel's rows of the
    tile are accumulated as one run of (rows - 1) * rowstride + out_w elements, the columns between one row's
    end and the next row's start computed and never stored: at the 8-32 pixel widths of classifiers a row is
    one or two vectors, and one long run per kept weight is 1.5-3.5x faster than a short run per row. With
    stride 2 down the rows about as many columns again lie between rows, and one run is still faster (ResNet-20's
    stride-2 stage3.0.conv1 at 90%, batch 8: 0.28 -> 0.07 ms). Otherwise each row is its own run, and each pass
    over the channel's kept weights covers all rows of the tile (`_accumulate_kept`'s count): wide strided rows,
    where a run would compute as many columns again between the rows.

    With dense = (chunk, plane, pitch, n0, row0, t0, t1), chunk > 0, the accumulators were computed before
    the call by one matrix product (the dense path below the crossover, `gather_columns`) for samples n0 ..
    n0 + chunk - 1 from output row row0 on: acc_buf is one row holding C_out x chunk planes of `plane`
    elements, output row oy at (oy - row0) * pitch; only the epilogue runs here, on tiles t0 .. t1 - 1."""
    (inp, in_sample, rowstride, ptr, states, off, val, corr, mul, bias, res, res_scale, has_res, slope, out_h,
     out_w, rows_per_tile, tiles_per_sample, plane, acc_buf, out, keep, dest_a, place_a, ma, sa, za, qa, low_a,
     dest_b, place_b, mb, sb, zb, qb, low_b, fresh, dense) = args
    c_out = ptr.shape[0] - 1
    chunk = dense[0]
    w = np.uint64(out_w)
    wv = _whole_vectors(w)
    acc = acc_buf[0] if chunk > 0 else acc_buf[t]
    # Rows made here are used through borrowed aliases: every call that takes an array with a reference count, also
    # one inlined, counts it up and down with atomic operations (23% of a two-destination layer's time, per row).
    own_y = np.empty(out_w, np.float32)
    own_scratch = np.empty(out_w + 2 + out_w % 2, np.uint8)
    y, scratch = _borrowed(own_y), _borrowed(own_scratch)
    pairs = scratch.view(np.uint16)
    n = t // tiles_per_sample
    oy0 = (t - n * tiles_per_sample) * rows_per_tile
    oy1 = min(oy0 + rows_per_tile, out_h)
    sample = np.uint64(n * in_sample)
    run = _whole_vectors(np.uint64((oy1 - oy0 - 1) * rowstride) + w)
    un = np.uint64(n)
    pitch = np.uint64(dense[2]) if chunk > 0 else rowstride
    # A channel's rows of the tile as one run where the accumulators' rows lie as far apart as the stride-1
    # destinations' (a 3x3 convolution feeding another): see `_emit_run`.
    as_run = (epilogue == DIRECT_STRIDE1 and not has_res and (chunk > 0 or plane)
              and (not place_a[2] or pitch == dest_a.shape[4]) and (not place_b[2] or pitch == dest_b.shape[4]))
    for c in range(c_out):
        m = mul[c]
        b = bias[c]
        cr = corr[c]
        k0 = ptr[c]
        k1 = ptr[c + 1]
        if states[c] == UNREAD or (states[c] == STEADY and not fresh):
            continue
        if chunk == 0 and plane:
            _accumulate_kept(acc, run, inp, sample + np.uint64(oy0 * rowstride), off, val, k0, k1, np.uint64(1),
                             np.uint64(0), np.uint64(0))
        elif chunk == 0:  # each row a run, the rows of the tile in each pass
            _accumulate_kept(acc, wv, inp, sample + np.uint64(oy0 * rowstride), off, val, k0, k1,
                             np.uint64(oy1 - oy0), rowstride, wv)
        if as_run:
            a0 = np.uint64(0)
            if chunk > 0:
                a0 = np.uint64((c * chunk + n - dense[3]) * dense[1] + (oy0 - dense[4]) * dense[2])
            if place_a[2]:
                _emit_run(acc, a0, out_w, oy1 - oy0, pitch, cr, m / sa, b / sa + za, low_a, qa, dest_a, n, c, oy0,
                          place_a[0], place_a[1], place_a[3], za, res)
            if place_b[2]:
                _emit_run(acc, a0, out_w, oy1 - oy0, pitch, cr, m / sb, b / sb + zb, low_b, qb, dest_b, n, c, oy0,
                          place_b[0], place_b[1], place_b[3], zb, res)
            continue
        for oy in range(oy0, oy1):
            if chunk > 0:
                a0 = np.uint64((c * chunk + n - dense[3]) * dense[1] + (oy - dense[4]) * dense[2])
            elif plane:
                a0 = np.uint64((oy - oy0) * rowstride)
            else:
                a0 = np.uint64((oy - oy0) * wv)
            if ((epilogue == DIRECT_SHARED or epilogue == DIRECT_SHARED_MIXED)
                    and _shared_in_chunks(acc, cr, m / sa, b / sa + za, low_a, qa, res_scale / sa)):
                _shared_row(acc, a0, out_w, cr, m / sa, b / sa + za, low_a, qa, res, _offset4(res, n, c, oy),
                            res_scale / sa, has_res, dest_a, place_a, dest_b, place_b, n, c, oy)
                continue
            if epilogue == DIRECT_SHARED:
                _quantize_row(acc, a0, out_w, cr, m / sa, b / sa + za, low_a, qa, res, n, c, oy, res_scale / sa, has_res,
                              scratch)
                if n < dest_a.shape[0]:
                    _split_pairs(pairs, out_w, dest_a, n, c, oy, place_a[0], place_a[1], place_a[3])
                if n < dest_b.shape[0]:
                    _split_pairs(pairs, out_w, dest_b, n, c, oy, place_b[0], place_b[1], place_b[3])
                continue
            if epilogue == DIRECT_SHARED_MIXED:  # dest_a has stride 1, dest_b stride 2 (see `_sparse_conv`)
                _quantize_row(acc, a0, out_w, cr, m / sa, b / sa + za, low_a, qa, res, n, c, oy, res_scale / sa, has_res,
                              scratch)
                _copy_row(scratch, out_w, dest_a, n, c, oy, place_a[0], place_a[1], place_a[3])
                if n < dest_b.shape[0]:
                    _split_pairs(pairs, out_w, dest_b, n, c, oy, place_b[0], place_b[1], place_b[3])
                continue
            if epilogue <= DIRECT_MIXED:
                phases = 1 if epilogue == DIRECT_STRIDE1 else 2 if epilogue == DIRECT_STRIDE2 else 0
                if place_a[2]:
                    _emit_quantized(acc, a0, out_w, cr, m / sa, b / sa + za, low_a, dest_a, n, c, oy, place_a[0],
                                    place_a[1], place_a[3], qa, scratch, pairs, res, res_scale / sa, has_res, phases)
                if place_b[2]:
                    _emit_quantized(acc, a0, out_w, cr, m / sb, b / sb + zb, low_b, dest_b, n, c, oy, place_b[0],
                                    place_b[1], place_b[3], qb, scratch, pairs, res, res_scale / sb, has_res, phases)
                continue
            uc, uy = np.uint64(c), np.uint64(oy)  # full indices, not row views (see `_emit`)
            if epilogue == FUSED:
                if n < dest_a.shape[0]:
                    _emit_with_float(acc, a0, out_w, cr, m, b, res, res_scale, has_res, slope, out, keep, dest_a, n, c, oy,
                                     place_a[0], place_a[1], place_a[3], sa, za, qa)
                continue
            for x in range(w):  # the case inside the loop: see `_emit_with_float`
                v = (np.float32(acc[a0 + x]) - cr) * m + b
                if has_res:
                    v += res_scale * res[un, uc, uy, x]
                y[x] = v if v > 0 else v * slope
            if keep:
                for x in range(w):
                    out[un, uc, uy, x] = y[x]
            if place_a[2]:
                _emit(y, out_w, dest_a, n, c, oy, place_a[0], place_a[1], place_a[3], ma, sa, za, qa, scratch, pairs)
            if place_b[2]:
                _emit(y, out_w, dest_b, n, c, oy, place_b[0], place_b[1], place_b[3], mb, sb, zb, qb, scratch, pairs)
    _alive(own_y)
    _alive(own_scratch)


# `_tile_rows` compiled once per epilogue, each a function of its own: with the epilogues in one function the row
# loops ran 3-4x slower (LLVM merged near-identical loops and kept fewer values in registers); a call per tile
# costs little. `args`: the layer's arguments, as `_sparse_conv` packs them.
@njit(cache=True, fastmath=CONV_MATH)
def _tile_direct_stride1(t, args):
    _tile_rows(DIRECT_STRIDE1, t, args)


@njit(cache=True, fastmath=CONV_MATH)
def _tile_direct_stride2(t, args):
    _tile_rows(DIRECT_STRIDE2, t, args)


@njit(cache=True, fastmath=CONV_MATH)
def _tile_direct_mixed(t, args):
    _tile_rows(DIRECT_MIXED, t, args)


@njit(cache=True, fastmath=CONV_MATH)
def _tile_direct_shared(t, args):
    _tile_rows(DIRECT_SHARED, t, args)


@njit(cache=True, fastmath=CONV_MATH)
def _tile_direct_shared_mixed(t, args):
    _tile_rows(DIRECT_SHARED_MIXED, t, args)


@njit(cache=True, fastmath=CONV_MATH)
def _tile_fused(t, args):
    _tile_rows(FUSED, t, args)


@njit(cache=True, fastmath=CONV_MATH)
def _tile_general(t, args):
    _tile_rows(GENERAL, t, args)


def _sparse_conv(inp, in_sample, index, val, corr, scale_bias, res, res_scale, has_res, slope,
                 n_batch, out_h, out_w, rowstride, rows_per_tile, plane, acc_buf, out, keep, dest_a, dest_b, stores,
                 places, fresh):
    """y[n, c, oy, ox] = act((acc - corr[c]) * mul[c] + bias[c] + res_scale * res[n, c, oy, ox]),
    acc = sum_k val[k] * inp[n * in_sample + off[k] + oy * rowstride + ox], act(y) = y if y > 0 else slope * y.

    y goes, in the same pass, to the float output out (N, C, H, W) when `keep`, and to up to two padded,
    phase-split input buffers of consuming convolutions (dest_a, dest_b: (N', S, C_total, H_pad, W_phase)),
    each with its store = (mode, scale, zero, qmax) (see `_store`) and place = (c0, pad_h, active, pad_w). Where no
    float output is kept and every destination is quantized, y is never formed: the epilogue goes from the
    accumulators to the stored bytes in one pass (`_emit_quantized`).

    The small arrays arrive packed, since numba's dispatch costs about 55 ns per array argument (a tenth of
    ResNet-20's time at batch 1 went to 29 arguments per layer): index (below); scale_bias = (mul, bias);
    stores = (store_a, store_b); places = place_a, place_b, dense.

    With dense[0] > 0 the accumulators of tiles dense[5] .. dense[6] - 1 are already in acc_buf (see
    `_tile_rows`) and only their epilogue runs.

    index = ptr (C_out + 1, the CSR row starts), states (C_out: STEADY where no input changes the channel, see
    `constants`; UNREAD where nothing reads it, see `unread`), off. A steady channel is stored only when the output
    arrays are `fresh` (new this run); arrays reused from an earlier run of the same program and input size already
    hold it. An unread channel is never computed.
    """
    c_out = scale_bias.shape[1]
    inp, val, corr, res, acc_buf, out = (_borrowed(inp), _borrowed(val), _borrowed(corr), _borrowed(res),
                                         _borrowed(acc_buf), _borrowed(out))
    dest_a, dest_b, index, scale_bias, places = (_borrowed(dest_a), _borrowed(dest_b), _borrowed(index),
                                                 _borrowed(scale_bias), _borrowed(places))
    ptr, states, off = index[:c_out + 1], index[c_out + 1:2 * c_out + 1], index[2 * c_out + 1:]
    mul, bias = scale_bias[0], scale_bias[1]
    store_a, store_b = stores[0], stores[1]
    place_a, place_b, dense = places[0:4], places[4:8], places[8:]
    # Tiles of rows_per_tile rows never cross samples. Accumulator runs are whole vectors (no scalar
    # remainder in the hot loops); the extra columns read into the next row or the input's slack and are
    # never stored.
    tiles_per_sample = (out_h + rows_per_tile - 1) // rows_per_tile
    tiles = n_batch * tiles_per_sample
    ma, sa, za, qa = int(store_a[0]), store_a[1], store_a[2], store_a[3]
    mb, sb, zb, qb = int(store_b[0]), store_b[1], store_b[2], store_b[3]
    # Quantized stores straight from the accumulators, without the float row y, where nothing else needs y:
    # no float output, ReLU or no activation, every destination quantized (mode 2).
    direct = (not keep and (slope == 0 or slope == 1) and (place_a[2] or place_b[2])
              and (not place_a[2] or (ma == 2 and dest_a.shape[1] <= 2))
              and (not place_b[2] or (mb == 2 and dest_b.shape[1] <= 2)))
    low_a = za if slope == 0 else np.float32(0.0)
    low_b = zb if slope == 0 else np.float32(0.0)
    # One quantized stride-1 destination beside the float output: y, the output and the stored bytes in one loop.
    fused = not direct and place_a[2] and not place_b[2] and ma == 2 and dest_a.shape[1] == 1
    phases = max(dest_a.shape[1] if place_a[2] else 0, dest_b.shape[1] if place_b[2] else 0)
    shared = (direct and place_a[2] and place_b[2] and dest_a.shape[1] == 2 and dest_b.shape[1] == 2
              and sa == sb and za == zb and qa == qb and low_a == low_b)
    if place_a[2] and place_b[2] and dest_a.shape[1] != dest_b.shape[1]:
        phases = 0
    shared_mixed = (direct and phases == 0 and place_a[2] and place_b[2] and sa == sb and za == zb and qa == qb
                    and low_a == low_b)
    if shared_mixed and dest_a.shape[1] == 2:  # the variant takes the stride-1 destination as dest_a
        dest_a, place_a, dest_b, place_b = dest_b, place_b, dest_a, place_a
    args = (inp, in_sample, rowstride, ptr, states, off, val, corr, mul, bias, res, res_scale, has_res, slope, out_h,
            out_w, rows_per_tile, tiles_per_sample, plane, acc_buf, out, keep, dest_a, place_a, ma, sa, za, qa, low_a,
            dest_b, place_b, mb, sb, zb, qb, low_b, fresh, dense)
    t0, t1 = (dense[5], dense[6]) if dense[0] > 0 else (0, tiles)
    for i in prange(t1 - t0):
        t = t0 + i
        if shared:
            _tile_direct_shared(t, args)
        elif shared_mixed:
            _tile_direct_shared_mixed(t, args)
        elif direct and phases == 1:
            _tile_direct_stride1(t, args)
        elif direct and phases == 2:
            _tile_direct_stride2(t, args)
        elif direct:
            _tile_direct_mixed(t, args)
        elif fused:
            _tile_fused(t, args)
        else:
            _tile_general(t, args)


sparse_conv = njit(parallel=True, cache=True, fastmath=CONV_MATH)(_sparse_conv)
# The same kernel without threads: for small layers (ResNet-20 at batch 1), where starting a parallel
# region costs more than the layer itself.
sparse_conv_serial = njit(cache=True, fastmath=CONV_MATH)(_sparse_conv)


@njit(cache=True)
def conv_calls(first):
    """A numba typed list of `sparse_convs_serial`'s argument tuples, holding `first` (more: `add_conv_call`).
    Made in compiled code, which numba caches on disk: a typed list made from Python compiled its own code
    for each item type in every process (0.3 s)."""
    calls = List()
    calls.append(first)
    return calls


@njit(cache=True)
def add_conv_call(calls, args):
    calls.append(args)


@njit(cache=True)
def sparse_convs_serial(calls):
    """sparse_conv_serial on each argument tuple of `calls` (a numba typed list), in order: consecutive layers
    as one call from Python (`Program._run_plan`), which unboxes a list once instead of 24 arguments a layer."""
    for i in range(len(calls)):
        a = calls[i]
        sparse_conv_serial(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13],
                           a[14], a[15], a[16], a[17], a[18], a[19], a[20], a[21], a[22], a[23])


@njit(cache=True)
def gather_columns(inp, in_sample, start, off, n0, count, rows, run, rowstep, cols, shift):
    """The columns of a matrix product (im2col) for samples n0 .. n0 + count - 1, in cols' type (float32, or
    int8 for int8 products with shift = 128):
    cols[(k * count + j) * rows * run + r * run + x] = inp[(n0 + j) * in_sample + start + off[k] + r * rowstep + x] - shift
    for every weight position k (`off` as in `sparse_conv`), r < rows, x < run; `start` is where the segment
    of output rows begins. With stride 1 down the rows a segment's output rows are one run (rows = 1, the
    columns between rows computed and never stored, as in `_tile_rows`'s plane mode), so that each
    (k, sample) is one contiguous converting copy."""
    per = np.uint64(rows * run)
    for k in range(off.shape[0]):
        for j in range(count):
            base = np.uint64((n0 + j) * in_sample) + start + off[k]
            dst = np.uint64(k * count + j) * per
            for r in range(rows):
                src = base + np.uint64(r * rowstep)
                d = dst + np.uint64(r * run)
                for x in range(np.uint64(run)):
                    cols[d + x] = inp[src + x] - shift


def _pad_input(x, out, c0, pad_h, pad, mode, scale, zero, qmax):
    """Write x (N, C, H, W) float32 into channels c0.. of out (N, S, C_total, H_pad, W_phase): padded by
    `pad_h` rows and `pad` columns, column phase p of stride S at out[:, p], each value through `_store(mode)`. The padding holds
    what 0.0 stores as: z for quantized (uint8) inputs, 0 otherwise. The producer of an input that has
    one consumer writes it this way itself (sparse_conv's dest); this is for the others."""
    n_batch, c_in, h, w = x.shape
    stride = out.shape[1]
    hp, wq = out.shape[3], out.shape[4]
    padval = _store(np.float32(0.0), mode, scale, zero, qmax)
    for job in prange(n_batch * stride * c_in):
        n = job // (stride * c_in)
        ph = (job // c_in) % stride
        c = job % c_in
        # full indices, not row views, which would update shared reference counts (see `_emit`)
        un, up, uc, ud = np.uint64(n), np.uint64(ph), np.uint64(c), np.uint64(c0 + c)
        # valid phase columns j: 0 <= j * stride + ph - pad < w
        j_lo = max(0, (pad - ph + stride - 1) // stride)
        j_hi = min(wq, (w - 1 + pad - ph) // stride + 1) if w - 1 + pad - ph >= 0 else 0
        for r in range(hp):
            ur = np.uint64(r)
            y = r - pad_h
            if y < 0 or y >= h:
                for j in range(np.uint64(wq)):
                    out[un, up, ud, ur, j] = padval
                continue
            uy = np.uint64(y)
            for j in range(np.uint64(j_lo)):
                out[un, up, ud, ur, j] = padval
            for j in range(np.uint64(j_hi), np.uint64(wq)):
                out[un, up, ud, ur, j] = padval
            if stride == 1 and mode == 2:  # the common case, written out so that it vectorises
                shift = np.uint64(pad)
                for j in range(np.uint64(w)):
                    out[un, up, ud, ur, j + shift] = min(max(np.rint(x[un, uc, uy, j] / scale) + zero, np.float32(0.0)), qmax)
            elif stride == 1:
                shift = np.uint64(pad)
                for j in range(np.uint64(w)):
                    out[un, up, ud, ur, j + shift] = _store(x[un, uc, uy, j], mode, scale, zero, qmax)
            else:
                first = np.uint64(j_lo * stride + ph - pad)
                step = np.uint64(stride)
                for j in range(np.uint64(j_lo), np.uint64(j_hi)):
                    out[un, up, ud, ur, j] = _store(x[un, uc, uy, first + (j - np.uint64(j_lo)) * step], mode, scale,
                                                    zero, qmax)


pad_input = njit(parallel=True, cache=True)(_pad_input)
# Without threads, for one thread or a small input: a parallel region costs 2-3 us to start, as much as
# storing ResNet-20's 3 x 32 x 32 input or its classifier's 64 features.
pad_input_serial = njit(cache=True)(_pad_input)


NORMALIZE_BAND = 16  # rows per normalisation job: the job's two scratch rows are made once for the band


@njit(parallel=True, cache=True, fastmath=CONV_MATH)
def normalize_into(x, mean, std, h_out, w_out, dest, n0, c0, pad_h, pad, mode, scale, zero, qmax):
    """(x - mean) / std, replicate-padded right and bottom to h_out x w_out, stored into samples n0.. of
    dest (N, S, C_total, H_pad, W_phase) as a producer stores its output (`_emit`; dest's padding holds its
    value from creation). Normalisation, padding and the first convolution's input quantization in one
    pass over the image; quantized (mode 2), straight to bytes (`_normalized_bytes`)."""
    n_batch, c_in, h, w = x.shape
    x, dest = _borrowed(x), _borrowed(dest)
    bands = (h_out + NORMALIZE_BAND - 1) // NORMALIZE_BAND
    for job in prange(n_batch * c_in * bands):
        n = job // (c_in * bands)
        c = (job // bands) % c_in
        r0 = (job % bands) * NORMALIZE_BAND
        own_row = np.empty(w_out, np.float32)
        own_scratch = np.empty(w_out + 2 + w_out % 2, np.uint8)
        row, scratch = _borrowed(own_row), _borrowed(own_scratch)
        pairs = scratch.view(np.uint16)
        for r in range(r0, min(h_out, r0 + NORMALIZE_BAND)):
            src = x[n, c, min(r, h - 1)]
            if mode == 2 and dest.shape[1] <= 2:
                _normalized_bytes(src, w, w_out, mean, std, scale, zero, qmax, scratch)
                if dest.shape[1] == 1:
                    _copy_row(scratch, w_out, dest, n0 + n, c, r, c0, pad_h, pad)
                elif n0 + n < dest.shape[0]:
                    _split_pairs(pairs, w_out, dest, n0 + n, c, r, c0, pad_h, pad)
                continue
            for j in range(w):
                row[j] = (src[j] - mean) / std
            for j in range(w, w_out):
                row[j] = row[w - 1]
            _emit(row, w_out, dest, n0 + n, c, r, c0, pad_h, pad, mode, scale, zero, qmax, scratch, pairs)
        _alive(own_row)
        _alive(own_scratch)


@njit(inline="always")
def _normalized_bytes(src, w, w_out, mean, std, scale, zero, qmax, scratch):
    """scratch[j] = clamp(rint(((src[j] - mean) / std) / scale) + zero, 0, qmax) for j < w_out (src[w - 1] past w):
    the reference's float32 divisions, straight to the stored bytes (no float row between; 805 -> 723 us for
    stereo's two views). One multiplication by 1 / (std * scale) instead, exact except near ties, was not faster
    with the check for ties that keeps it exact (numba vectorises no float max reduction)."""
    low, high = np.float32(0.0), qmax
    for j in range(np.uint64(w)):
        scratch[j] = np.uint8(min(max(np.rint(((src[j] - mean) / std) / scale) + zero, low), high))
    for j in range(w, w_out):
        scratch[j] = scratch[w - 1]


# Accumulators per shift in one correlation job (as many image rows as fit): stereo's quarter-resolution rows of
# 186 columns go four to a job; 1.5 ms for its 24 shifts against 2.2 with a row per job (one thread, alone).
CORRELATION_RUN = 768


@njit(inline="always")
def _correlate_channels(left, right, n, c0, c1, c2, c3, p0, shift, count, acc):
    """acc[x] += sum over channels c0..c3 of left[n, c, p0 + x + shift] * right[n, c, p0 + x], x < count
    (left, right: (N, C, H * W))."""
    l0, l1, l2, l3 = left[n, c0], left[n, c1], left[n, c2], left[n, c3]
    r0, r1, r2, r3 = right[n, c0], right[n, c1], right[n, c2], right[n, c3]
    s = p0 + shift
    for x in range(count):
        acc[x] += ((l0[s + x] * r0[p0 + x] + l1[s + x] * r1[p0 + x])
                   + (l2[s + x] * r2[p0 + x] + l3[s + x] * r3[p0 + x]))


@njit(inline="always")
def _correlate_four_shifts(left, right, n, c0, c1, c2, c3, p0, shift, count, a0, a1, a2, a3):
    """`_correlate_channels` for shifts shift .. shift + 3 into a0 .. a3 in one loop, which loads each right
    vector once for the four."""
    l0, l1, l2, l3 = left[n, c0], left[n, c1], left[n, c2], left[n, c3]
    r0, r1, r2, r3 = right[n, c0], right[n, c1], right[n, c2], right[n, c3]
    s0 = p0 + shift
    s1, s2, s3 = s0 + np.uint64(1), s0 + np.uint64(2), s0 + np.uint64(3)
    for x in range(count):
        q0, q1, q2, q3 = r0[p0 + x], r1[p0 + x], r2[p0 + x], r3[p0 + x]
        a0[x] += (l0[s0 + x] * q0 + l1[s0 + x] * q1) + (l2[s0 + x] * q2 + l3[s0 + x] * q3)
        a1[x] += (l0[s1 + x] * q0 + l1[s1 + x] * q1) + (l2[s1 + x] * q2 + l3[s1 + x] * q3)
        a2[x] += (l0[s2 + x] * q0 + l1[s2 + x] * q1) + (l2[s2 + x] * q2 + l3[s2 + x] * q3)
        a3[x] += (l0[s3 + x] * q0 + l1[s3 + x] * q1) + (l2[s3 + x] * q2 + l3[s3 + x] * q3)


@njit(parallel=True, cache=True, fastmath=True)
def correlation(left, right, shifts, channels, constant, out):
    """out[n, d, y, x] = mean_c left[n, c, y, x] * right[n, c, y, x - d]; 0 where x < d (DispNetC), where the
    channels not in `channels` hold one value each on both sides, whose products sum to `constant`
    (`constants.correlation_arguments`; all channels and 0 where none is known constant).

    A job is a few image rows (CORRELATION_RUN accumulators per shift) taken as one flat run per shift: the
    columns whose shifted reads cross into the next row are computed and never stored. Where numba compiles for
    AVX-512, shifts in blocks whose accumulators stay in registers over all channels (`shift_blocks`); the shifts
    left over four channels at a time, four shifts per loop (`_correlate_four_shifts`), each pass in whole
    vectors (a multiple of VECTOR the compiler can see: no scalar remainder); the extra lanes read on into the
    array and are never stored. A job whose reads could pass the array's end is computed exactly by the loops,
    a shift at a time."""
    n_batch, c_in, h, w = left.shape
    inv = np.float32(1.0) / np.float32(c_in)
    d_max = min(shifts, w)
    count = channels.shape[0]
    left = _borrowed(left.reshape(n_batch, c_in, h * w))  # channel planes as flat runs (see `_borrowed`)
    right = _borrowed(right.reshape(n_batch, c_in, h * w))
    left_flat, right_flat, plane = _flat(left), _flat(right), np.uint64(h * w)
    out = _borrowed(out)
    rows = max(1, CORRELATION_RUN // w)
    jobs_per_sample = (h + rows - 1) // rows
    for job in prange(n_batch * jobs_per_sample):
        n = job // jobs_per_sample
        y0 = (job % jobs_per_sample) * rows
        job_rows = min(rows, h - y0)
        length = job_rows * w
        own_acc = np.full((d_max, length + shift_blocks.PIXELS), constant, np.float32)
        acc = _borrowed(own_acc)  # its rows go to inlined calls: see `_tile_rows`
        acc_flat, acc_row = _flat(acc), np.uint64(length + shift_blocks.PIXELS)
        exact = n == n_batch - 1 and (y0 + job_rows) * w + shift_blocks.READ_BEYOND > h * w
        p0 = np.uint64(y0 * w)
        blocked = 0  # shifts below this one done in blocks, the rest by the loops
        if SHIFT_BLOCKS and not exact:
            blocked = d_max - d_max % shift_blocks.SHIFTS
            sample = np.uint64(n * c_in * h * w) + p0
            pixels = np.uint64(shift_blocks.PIXELS)
            for d0 in range(0, blocked, shift_blocks.SHIFTS):
                for x in range(np.uint64(0), (np.uint64(length - d0) + pixels - np.uint64(1)) // pixels * pixels, pixels):
                    shift_blocks.correlate_block(acc_flat, np.uint64(d0) * acc_row + x, acc_row, left_flat, right_flat,
                                                 sample + np.uint64(d0) + x, sample + x, plane, channels, count)
        i = 0
        while i + 4 <= count:
            c0, c1, c2, c3 = channels[i], channels[i + 1], channels[i + 2], channels[i + 3]
            d = blocked
            while not exact and d + 4 <= d_max:
                span = _whole_vectors(np.uint64(length - d))
                _correlate_four_shifts(left, right, n, c0, c1, c2, c3, p0, np.uint64(d), span, acc[d], acc[d + 1],
                                       acc[d + 2], acc[d + 3])
                d += 4
            for d in range(d, d_max):
                span = np.uint64(length - d) if exact else _whole_vectors(np.uint64(length - d))
                _correlate_channels(left, right, n, c0, c1, c2, c3, p0, np.uint64(d), span, acc[d])
            i += 4
        while i < count:
            l0, r0 = left[n, channels[i]], right[n, channels[i]]
            for d in range(blocked, d_max):
                a = acc[d]
                shift = p0 + np.uint64(d)
                for x in range(np.uint64(length - d)):
                    a[x] += l0[shift + x] * r0[p0 + x]
            i += 1
        for d in range(d_max):
            a = acc[d]
            for r in range(job_rows):
                orow = out[n, d, y0 + r]
                for x in range(d):
                    orow[x] = 0.0
                first = np.uint64(r * w)
                for x in range(np.uint64(w - d)):
                    orow[np.uint64(d) + x] = a[first + x] * inv
        for d in range(w, shifts):
            for r in range(job_rows):
                out[n, d, y0 + r, :] = 0.0
        _alive(own_acc)


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float32 whose IEEE bit pattern is the int32 `bits` (a bitcast)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@njit(inline="always")
def _exp(x):
    """exp(x) for float32 x <= 0 as straight-line arithmetic that vectorises (the C library's expf is a
    call per element): Cody-Waite reduction x = k ln2 + r, |r| <= ln2 / 2, and Cephes' degree-7 expf
    polynomial (relative error about 1e-7), times 2^k built from its exponent bits; 0 below -87."""
    x = max(x, np.float32(-87.0))
    k = np.rint(x * np.float32(1.44269504088896341))
    r = x - k * np.float32(0.693359375) - k * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * (r * r) + r + np.float32(1.0)
    return p * _float_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))


@njit(parallel=True, cache=True)
def soft_argmin(logits, factor, out):
    """out[n, 0, y, x] = factor * sum_d d * softmax_d(logits[n, :, y, x]) (Kendall et al. 2017)."""
    n_batch, shifts, h, w = logits.shape
    logits, out = _borrowed(logits), _borrowed(out)  # row views per shift (see `_borrowed`)
    for job in prange(n_batch * h):
        n = job // h
        y = job % h
        top = logits[n, 0, y].copy()
        for d in range(1, shifts):
            row = logits[n, d, y]
            for x in range(w):
                top[x] = max(top[x], row[x])
        total = np.zeros(w, np.float32)
        weighted = np.zeros(w, np.float32)
        for d in range(shifts):
            row = logits[n, d, y]
            fd = np.float32(d)
            for x in range(w):
                e = _exp(row[x] - top[x])
                total[x] += e
                weighted[x] += e * fd
        for x in range(w):
            out[n, 0, y, x] = weighted[x] / total[x] * factor


@njit(inline="always")
def _source(dst, size_in):
    """PyTorch's bilinear source index for scale factor 2, align_corners=False: (i0, i1, lambda1)."""
    src = max(np.float32(0.5) * (np.float32(dst) + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    i0 = int(src)
    i1 = i0 + 1 if i0 < size_in - 1 else i0
    return i0, i1, src - np.float32(i0)


@njit(inline="always")
def _bilinear_column(r0, r1, ox, w, ky, ly):
    """Output column ox of the x2 upsampling of source rows r0, r1 (weights ky, ly), sources from `_source`."""
    x0, x1, lx = _source(ox, w)
    one = np.float32(1.0)
    return ky * ((one - lx) * r0[x0] + lx * r0[x1]) + ly * ((one - lx) * r1[x0] + lx * r1[x1])


@njit(parallel=True, cache=True)
def upsample2x(x, out):
    """Bilinear x2 upsampling (align_corners=False) of x (N, C, H, W) into out (N, C, <=2H, <=2W); a smaller
    out is the top-left crop. Away from the edges, output column 2i is 0.25 * x[i - 1] + 0.75 * x[i] and column
    2i + 1 is 0.75 * x[i] + 0.25 * x[i + 1] (PyTorch's source weights at scale 2, in its order of operations), so a
    row is contiguous loads and one interleaved store, not a gather per output; the edge columns take their
    sources from `_source`. Rows blend their two source rows' results."""
    n_batch, c_in, h, w = x.shape
    ho, wo = out.shape[2], out.shape[3]
    one, quarter, three_quarters = np.float32(1.0), np.float32(0.25), np.float32(0.75)
    inner = max(1, min(w - 1, wo // 2))  # columns 2i, 2i + 1 for 1 <= i < inner have both neighbours of x[i]
    x, out = _borrowed(x), _borrowed(out)  # row views per output row (see `_borrowed`)
    for job in prange(n_batch * c_in * ho):
        n = job // (c_in * ho)
        c = (job // ho) % c_in
        oy = job % ho
        y0, y1, ly = _source(oy, h)
        r0 = x[n, c, y0]
        r1 = x[n, c, y1]
        orow = out[n, c, oy]
        ky = one - ly
        for i in range(1, inner):
            top = quarter * r0[i - 1] + three_quarters * r0[i]
            bottom = quarter * r1[i - 1] + three_quarters * r1[i]
            orow[2 * i] = ky * top + ly * bottom
            top = three_quarters * r0[i] + quarter * r0[i + 1]
            bottom = three_quarters * r1[i] + quarter * r1[i + 1]
            orow[2 * i + 1] = ky * top + ly * bottom
        for ox in range(min(2, wo)):
            orow[ox] = _bilinear_column(r0, r1, ox, w, ky, ly)
        for ox in range(2 * inner, wo):
            orow[ox] = _bilinear_column(r0, r1, ox, w, ky, ly)


@njit(cache=True, fastmath=True)
def _channel_mean(x, n, c):
    """The mean over (y, x) of x[n, c]: a function of its own, so that the pool and the pool into a consumer's
    input (compiled with other flags) sum in the same order."""
    h, w = x.shape[2], x.shape[3]
    s = np.float32(0.0)
    for y in range(h):
        for j in range(w):
            s += x[n, c, y, j]
    return s / np.float32(h * w)


def _global_avg_pool(x, out):
    """out[n, c, 0, 0] = mean over (y, x) of x[n, c]."""
    n_batch, c_in = x.shape[0], x.shape[1]
    for job in prange(n_batch * c_in):
        n = job // c_in
        c = job % c_in
        out[n, c, 0, 0] = _channel_mean(x, n, c)


global_avg_pool = njit(parallel=True, cache=True, fastmath=True)(_global_avg_pool)
# without threads, for small inputs (a classifier's last map at batch 1), where a parallel region costs more
global_avg_pool_serial = njit(cache=True, fastmath=True)(_global_avg_pool)


@njit(cache=True)
def global_avg_pool_into(x, out, c0, mode, scale, zero, qmax):
    """`global_avg_pool` written as `pad_input` writes it (each mean through `_store(mode)`) into channels c0.. of
    out (N, 1, C_total, 1, 1), a linear layer's input (`ops.INTO_ACCEPTS`), without the pooled float tensor and
    a store of it between two calls. Serial: at most a few thousand means."""
    n_batch, c_in = x.shape[0], x.shape[1]
    for n in range(n_batch):
        for c in range(c_in):
            out[n, 0, c0 + c, 0, 0] = _store(_channel_mean(x, n, c), mode, scale, zero, qmax)


@njit(parallel=True, cache=True)
def pool2d(x, rows, cols, row_div, col_div, is_max, out):
    """Max or average pooling of x (N, C, H, W) into out (N, C, Ho, Wo) from index tables: rows[oy, j] is the
    input row of window position j of output row oy, -1 where it falls in the padding or past a shorter
    window (adaptive pooling); cols likewise. Averages divide by row_div[oy] * col_div[ox]. One kernel for
    max/average, plain (kernel, stride, padding, dilation, ceil mode) and adaptive pooling."""
    n_batch, c_in = x.shape[0], x.shape[1]
    ho, wo = out.shape[2], out.shape[3]
    for job in prange(n_batch * c_in):
        n = job // c_in
        c = job % c_in
        for oy in range(ho):
            for ox in range(wo):
                acc = -np.inf if is_max else 0.0
                for a in range(rows.shape[1]):
                    r = rows[oy, a]
                    if r < 0:
                        continue
                    for b in range(cols.shape[1]):
                        q = cols[ox, b]
                        if q < 0:
                            continue
                        v = x[n, c, r, q]
                        if is_max:
                            acc = max(acc, v)
                        else:
                            acc += v
                out[n, c, oy, ox] = acc if is_max else acc / (row_div[oy] * col_div[ox])


@njit(parallel=True, cache=True)
def resize(x, y0, y1, ly, x0, x1, lx, out):
    """out[n, c, oy, ox] = bilinear blend of x at rows (y0, y1) with weight ly on y1, columns (x0, x1) with
    weight lx on x1: interpolation (nearest: y0 = y1) from tables computed once per size."""
    n_batch, c_in = x.shape[0], x.shape[1]
    ho, wo = out.shape[2], out.shape[3]
    one = np.float32(1.0)
    x, out = _borrowed(x), _borrowed(out)  # row views per output row (see `_borrowed`)
    for job in prange(n_batch * c_in * ho):
        n = job // (c_in * ho)
        c = (job // ho) % c_in
        oy = job % ho
        r0 = x[n, c, y0[oy]]
        r1 = x[n, c, y1[oy]]
        wy = ly[oy]
        for ox in range(wo):
            top = (one - lx[ox]) * r0[x0[ox]] + lx[ox] * r0[x1[ox]]
            bottom = (one - lx[ox]) * r1[x0[ox]] + lx[ox] * r1[x1[ox]]
            out[n, c, oy, ox] = (one - wy) * top + wy * bottom


# activation kinds of `activation`
RELU, CLAMP, LEAKY, HARDSWISH, HARDSIGMOID, SILU, SIGMOID, GELU, GELU_TANH, TANH = range(10)


@njit(parallel=True, cache=True)
def activation(x, kind, a, b, out):
    """out = f(x) elementwise on flat float32 arrays: RELU, CLAMP (to [a, b]: ReLU6, Hardtanh), LEAKY (slope a),
    HARDSWISH x * clamp(x + 3, 0, 6) / 6, HARDSIGMOID clamp(x / 6 + 1/2, 0, 1), SILU x * sigmoid(x), SIGMOID,
    GELU 0.5 x (1 + erf(x / sqrt 2)), GELU_TANH (its tanh approximation), TANH; as PyTorch defines them."""
    zero, one, six = np.float32(0.0), np.float32(1.0), np.float32(6.0)
    if kind == RELU:
        for i in prange(x.size):
            out[i] = max(x[i], zero)
    elif kind == CLAMP:
        for i in prange(x.size):
            out[i] = min(max(x[i], a), b)
    elif kind == LEAKY:
        for i in prange(x.size):
            out[i] = x[i] if x[i] > 0 else x[i] * a
    elif kind == HARDSWISH:
        for i in prange(x.size):
            out[i] = x[i] * min(max(x[i] + np.float32(3.0), zero), six) / six
    elif kind == HARDSIGMOID:
        for i in prange(x.size):
            out[i] = min(max(x[i] / six + np.float32(0.5), zero), one)
    elif kind == SILU:
        for i in prange(x.size):
            out[i] = x[i] / (one + np.exp(-x[i]))
    elif kind == SIGMOID:
        for i in prange(x.size):
            out[i] = one / (one + np.exp(-x[i]))
    elif kind == GELU:
        for i in prange(x.size):
            out[i] = np.float32(0.5 * x[i] * (1.0 + math.erf(x[i] * 0.7071067811865476)))
    elif kind == GELU_TANH:
        for i in prange(x.size):
            v = np.float64(x[i])
            out[i] = np.float32(0.5 * v * (1.0 + math.tanh(0.7978845608028654 * (v + 0.044715 * v * v * v))))
    else:
        for i in prange(x.size):
            out[i] = np.tanh(x[i])


numba_cache.drop_stale(sparse_conv)  # before any cached kernel loads: see `numba_cache`
