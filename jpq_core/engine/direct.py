"""Dense int8 convolution straight from the padded input: VNNI dot products over windows of taps, no im2col.

The dense path's accumulators are acc[c, x] = sum_k w[c, k] * q_a[base + off[k] + x] over every weight position
k (`ops.Conv._products`; `off` as in `kernels.sparse_conv`, x along a run of output pixels). A matrix product
needs the columns q_a[base + off[k] + x] copied out first (im2col) and, on ResNet-20's shapes, runs
`torch._int_mm` well below what the CPU's dot products can do. Here the taps are taken four at a time, as
VNNI's `vpdpbusd` takes them: four u8 x s8 products summed into each int32 lane.

A **group** is four consecutive taps whose offsets lie in at most two 32-byte **segments** (taps of a 3x3
kernel's row and the next row's first, or all three rows of a narrow map). For 16 output pixels the group's
window holds in lane j the four input bytes q_a[base + off[k_i] + x + j], i < 4: one `vpermi2b` (AVX-512 VBMI)
picks them from the two segments' 32-byte loads by the group's byte index. Then for each output channel c

    acc[c, x .. x + 15] += vpdpbusd(window, broadcast(w[c, k_0..k_3]))

with the group's four weight bytes of channel c (zero for a tap a short group lacks). A 3x3 kernel's nine taps
per input channel fill groups completely (against three of four bytes in `quads`' row groups). One block of
`CHANNELS` output channels x `PIXELS` x 16 pixels keeps its 24 accumulators in registers over all groups, each
window used by 8 channels and each weight broadcast by 3 windows: 17 loads per 24 dot products, which the two
load ports sustain. Exact int32 sums, the same integers as the product's.

Only where numba compiles for AVX-512 VNNI and VBMI (`quads.native()`); the engine packs groups nowhere else.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic
from numba.np.arrayobj import make_array

from jpq_core.engine import kernels, quads  # noqa: F401 (kernels first: it sets the CPU features numba compiles for)

njit = functools.partial(numba.njit, error_model="numpy", nogil=True)

CHANNELS = 8  # output channels per block (the weights are padded to a multiple of this)
PIXELS = 3  # 16-pixel vectors per block; the rest of a run (1-47 pixels) in one block of 1-3 vectors
SPAN = 16  # a tap joins a segment up to this many bytes after its start (its 16 lanes then lie in a 32-byte load)
_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_LANES = ir.VectorType(_I32, 16)
_BYTES, _HALF = ir.VectorType(_I8, 64), ir.VectorType(_I8, 32)
_ZERO_HALF = ir.Constant(_HALF, [0] * 32)
_WIDEN = ir.Constant(ir.VectorType(_I32, 64), list(range(32)) + [32] * 32)  # a 32-byte load, then zeros
_SPLAT = ir.Constant(_LANES, [0] * 16)
_U = np.uint64


class Groups(NamedTuple):
    """A dense layer's taps in groups of four (see the module docstring)."""

    segments: np.ndarray  # uint64 (groups * 2): where each group's two segments start, relative to the run
    index: np.ndarray  # uint8 (groups * 64): window byte 4j + i = segment table byte index[.., 4j + i]
    weights: np.ndarray  # uint32 (blocks, groups, CHANNELS): lane c's four weight bytes of each group
    planes: np.ndarray  # uint64 (blocks * CHANNELS): the accumulator plane of each block's lane c
    fill: float  # taps per group / 4: how much of each dot product is used


def group_taps(off: np.ndarray, weights: np.ndarray, channels: np.ndarray | None = None) -> Groups:
    """The taps at offsets `off` (in the order given) of the dense int8 `weights` (C_out, taps) in groups: each
    group takes the next taps while it has fewer than four and each lies at most SPAN bytes after the start of one
    of its (at most two) segments. Blocks of CHANNELS lanes hold the output `channels` (default: all) in order,
    each lane's accumulators in the plane of its channel; the last block's spare lanes write planes C_out ..
    C_out + CHANNELS - 1 (`accumulate`'s acc has them)."""
    groups = []  # [segment starts, [(tap, segment, shift)]]
    for k, o in enumerate(int(o) for o in off):
        if groups and len(groups[-1][1]) < 4:
            starts, taps = groups[-1]
            segment = next((s for s, start in enumerate(starts) if 0 <= o - start <= SPAN), None)
            if segment is None and len(starts) < 2:
                starts.append(o)
                segment = 1
            if segment is not None:
                taps.append((k, segment, o - starts[segment]))
                continue
        groups.append([[o], [(k, 0, 0)]])
    count, c_out = len(groups), weights.shape[0]
    channels = np.arange(c_out) if channels is None else np.asarray(channels, np.int64)
    blocks = -(-channels.size // CHANNELS)
    planes = np.concatenate([channels, c_out + np.arange(blocks * CHANNELS - channels.size)]).astype(np.uint64)
    segments = np.zeros((count, 2), np.uint64)
    index = np.zeros((count, 16, 4), np.uint8)
    packed = np.zeros((blocks * CHANNELS, count, 4), np.uint8)
    lanes = np.arange(16)
    for g, (starts, taps) in enumerate(groups):
        segments[g] = starts[0], starts[-1]
        for i, (k, segment, shift) in enumerate(taps):
            index[g, :, i] = 64 * segment + shift + lanes  # the second segment's table starts at byte 64
            packed[:channels.size, g, i] = weights[channels, k].view(np.uint8)
    packed = packed.view(np.uint32)[..., 0].reshape(blocks, CHANNELS, count).transpose(0, 2, 1)
    return Groups(segments.reshape(-1), index.reshape(-1), np.ascontiguousarray(packed).reshape(-1), planes,
                  len(off) / (4 * max(count, 1)))


def _block(pixels: int):
    """An intrinsic (acc, a0, out_step, pitch, planes, p0, inp, base, in_step, segments, index, weights, w0, groups,
    lanes, last_lanes): for the CHANNELS lanes c and vectors p < pixels of 16 pixels x,
    acc[a0 + planes[p0 + c] * pitch + p * out_step + x] = the sum over the groups of their dot products (int32; the windows of
    vector p from inp[base + p * in_step + segment start ..], weights from weights[w0 + g * CHANNELS + c]). One
    loop over the groups with the accumulators in registers, stored at its end: of each vector its first `lanes`
    elements, of the last one its first `last_lanes` (masked stores: a row's end, followed by rows computed
    before it). Vectors along a row have steps of 16; rows of at most 16 pixels go one per vector."""
    @intrinsic
    def block(typingctx, acc, a0, out_step, pitch, planes, p0, inp, base, in_step, segments, index, weights, w0,
              groups, lanes, last_lanes):
        def codegen(context, builder, signature, args):
            acc_data, plane_data, inp_data, seg_data, index_data, weight_data = (
                make_array(signature.args[i])(context, builder, args[i]).data for i in (0, 4, 6, 9, 10, 11))
            a0, out_step, pitch, p0, base, in_step, w0, count = (args[i] for i in (1, 2, 3, 5, 7, 8, 12, 13))
            permute = builder.module.declare_intrinsic("llvm.x86.avx512.vpermi2var.qi.512",
                                                       fnty=ir.FunctionType(_BYTES, [_BYTES] * 3))
            entry, loop, done = builder.block, builder.append_basic_block("groups"), builder.append_basic_block("stored")
            builder.branch(loop)
            builder.position_at_end(loop)
            g = builder.phi(_I64)
            g.add_incoming(ir.Constant(_I64, 0), entry)
            totals = [builder.phi(_LANES) for _ in range(CHANNELS * pixels)]
            for total in totals:
                total.add_incoming(ir.Constant(_LANES, [0] * 16), entry)
            at = builder.gep(index_data, [builder.mul(g, ir.Constant(_I64, 64))])
            index = builder.load(builder.bitcast(at, _BYTES.as_pointer()), align=1)
            starts = [builder.add(base, builder.load(builder.gep(seg_data, [builder.add(builder.shl(g, ir.Constant(
                _I64, 1)), ir.Constant(_I64, s))]))) for s in range(2)]
            windows = []
            for p in range(pixels):
                tables = []
                for start in starts:
                    at = builder.gep(inp_data, [builder.add(start, builder.mul(in_step, ir.Constant(_I64, p)))])
                    loaded = builder.load(builder.bitcast(at, _HALF.as_pointer()), align=1)
                    tables.append(builder.shuffle_vector(loaded, _ZERO_HALF, _WIDEN))
                windows.append(builder.call(permute, [tables[0], index, tables[1]]))
            first = builder.add(w0, builder.mul(g, ir.Constant(_I64, CHANNELS)))
            new = []
            for c in range(CHANNELS):
                four = builder.load(builder.gep(weight_data, [builder.add(first, ir.Constant(_I64, c))]))
                one = builder.insert_element(ir.Constant(_LANES, None), four, ir.Constant(_I32, 0))
                broadcast = builder.shuffle_vector(one, ir.Constant(_LANES, None), _SPLAT)
                new += [quads._dot(builder, totals[c * pixels + p], windows[p], broadcast) for p in range(pixels)]
            following = builder.add(g, ir.Constant(_I64, 1))
            g.add_incoming(following, loop)
            for total, value in zip(totals, new):
                total.add_incoming(value, loop)
            builder.cbranch(builder.icmp_unsigned("<", following, count), loop, done)
            builder.position_at_end(done)
            masks = [_first_lanes(builder, args[14]), _first_lanes(builder, args[15])]
            store = builder.module.declare_intrinsic("llvm.masked.store.v16i32.p0", fnty=ir.FunctionType(
                ir.VoidType(), [_LANES, _LANES.as_pointer(), _I32, masks[0].type]))
            for c in range(CHANNELS):
                plane = builder.load(builder.gep(plane_data, [builder.add(p0, ir.Constant(_I64, c))]))
                row = builder.add(a0, builder.mul(pitch, plane))
                for p in range(pixels):
                    at = builder.gep(acc_data, [builder.add(row, builder.mul(out_step, ir.Constant(_I64, p)))])
                    builder.call(store, [new[c * pixels + p], builder.bitcast(at, _LANES.as_pointer()),
                                         ir.Constant(_I32, 4), masks[p == pixels - 1]])
            return context.get_dummy_value()
        return (types.none(acc, a0, out_step, pitch, planes, p0, inp, base, in_step, segments, index, weights, w0,
                           groups, lanes, last_lanes), codegen)
    return block


def _first_lanes(builder, count):
    """The mask of lanes below `count` (an int64) of a 16-lane vector."""
    one = builder.insert_element(ir.Constant(_LANES, None), builder.trunc(count, _I32), ir.Constant(_I32, 0))
    return builder.icmp_unsigned("<", ir.Constant(_LANES, list(range(16))),
                                 builder.shuffle_vector(one, ir.Constant(_LANES, None), _SPLAT))


_one_vector, _two_vectors, _three_vectors = _block(1), _block(2), _block(3)  # PIXELS = 3


@njit(inline="always")
def _vectors(count, acc, a0, out_step, pitch, planes, p0, inp, base, in_step, segments, index, weights, w0, groups,
             lanes, last_lanes):
    """One block of `count` (1 to PIXELS) vectors (see `_block`)."""
    if count == 3:
        _three_vectors(acc, a0, out_step, pitch, planes, p0, inp, base, in_step, segments, index, weights, w0, groups,
                       lanes, last_lanes)
    elif count == 2:
        _two_vectors(acc, a0, out_step, pitch, planes, p0, inp, base, in_step, segments, index, weights, w0, groups,
                     lanes, last_lanes)
    else:
        _one_vector(acc, a0, out_step, pitch, planes, p0, inp, base, in_step, segments, index, weights, w0, groups,
                    lanes, last_lanes)


@njit
def accumulate(inp, in_sample, start, segments, index, weights, planes, n0, count, rows, run, rowstep, acc, pitch):
    """acc[c * pitch + (j * rows + r) * run + x] = sum_k w[c, k] * inp[(n0 + j) * in_sample + start + r * rowstep
    + off[k] + x] for the channels c that `group_taps` put in blocks (`planes`), samples j < count, rows r < rows
    and x below `run`: what `kernels.gather_columns` and a product compute, for int32 accumulators of u8 inputs.
    Reads as far as the quads' loads (`quads.READ_BEYOND`) past a row's whole vectors; acc needs the planes of
    the last block's spare lanes."""
    groups = _U(index.shape[0] // 64)
    end, full, most = _U(run), _U(16), _U(PIXELS)
    row_step = _U(rowstep)
    for block in range(_U(0), _U(weights.shape[0]) // (groups * _U(CHANNELS))):
        w0 = block * groups * _U(CHANNELS)
        p0 = block * _U(CHANNELS)
        for j in range(count):
            sample = _U(n0 + j) * _U(in_sample) + start
            a_sample = _U(j * rows) * end
            if rows > 1 and end <= full:  # short rows (stride 2): a vector per row, PIXELS rows per block
                r = _U(0)
                while r < _U(rows):
                    vectors = min(most, _U(rows) - r)
                    _vectors(vectors, acc, a_sample + r * end, end, pitch, planes, p0, inp, sample + r * row_step,
                             row_step, segments, index, weights, w0, groups, end, end)
                    r += vectors
                continue
            for r in range(rows):
                base = sample + _U(r) * row_step
                a0 = a_sample + _U(r) * end
                x = _U(0)
                while x < end:  # blocks of PIXELS vectors, the rest (1-47 elements) as one of 1-3, its last masked
                    vectors = min(most, (end - x + _U(15)) // full)
                    last = min(full, end - x - (vectors - _U(1)) * full)
                    _vectors(vectors, acc, a0 + x, full, pitch, planes, p0, inp, base + x, full, segments, index,
                             weights, w0, groups, full, last)
                    x += vectors * full
