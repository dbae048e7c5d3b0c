"""Kept weights in groups of up to four from two segments: one VNNI dot product per group and 16 output pixels.

The sparse kernel's accumulators are acc[x] = sum_k k_w[k] * q_a[base + off[k] + x] (`kernels._accumulate`), one
product per kept weight: load 16 input bytes, widen, multiply-add. Here up to four kept weights of one output
channel form a group, with weight bytes b_0..b_3 (zero in an unused slot): slot i reads its input at o_i + x, and
for 16 pixels at once

    acc[x] += sum_{i<4} b_i * q_a[base + o_i + x]

is one `vpdpbusd` (AVX-512 VNNI: per 32-bit lane, four u8 x s8 products summed) of a window whose lane j holds
the four slots' input bytes of pixel j, with the group's four bytes broadcast. The window is one `vpermi2b`
(a byte permute over two registers) of two 32-byte loads, one per *segment*: a segment is a run of kept weights
whose offsets lie within SPAN bytes of its first, o_i = segment start + s_i, s_i <= SPAN (the taps of one kernel
row, dilated or not, and on small maps the next row's first). A group takes one or two segments, so that two
kernel rows of one kept tap each (the usual case at 90% sparsity) cost one dot product, not two. The input bytes
go in as they are stored (no widening). Sums are exact int32, as the integer path's accumulators
(`ops.Conv._kernel_weights`).

Only for a CPU with AVX-512 VNNI and VBMI (`native()`): the engine makes groups nowhere else, so these kernels
are never compiled there (`kernels._accumulate_kept` picks them by the weights' type). Imported by `kernels`,
after it has set the CPU features numba compiles for.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic
from numba.np.arrayobj import make_array

njit = functools.partial(numba.njit, error_model="numpy", nogil=True)

_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_LANES = ir.VectorType(_I32, 16)  # one AVX-512 register of int32 accumulators
_BYTES = ir.VectorType(_I8, 64)
_LOAD = ir.VectorType(_I8, 32)  # a segment's input bytes (up to SPAN + 16 of them) in one 32-byte load
SPAN = 16  # the most a slot's offset may lie past its segment's start: pixel 15 then reads load byte 31
# Window byte 4j + i (lane j, slot i) = j plus the slot's shift (byte i of the group's shifts, broadcast).
_PIXEL = ir.Constant(_BYTES, [j for j in range(16) for _ in range(4)])
_SPLAT = ir.Constant(ir.VectorType(_I32, 16), [0] * 16)
_WIDEN = ir.Constant(ir.VectorType(_I32, 64), list(range(64)))  # a 32-byte load as the low half of a register
READ_BEYOND = 16  # bytes a group's loads read past what a product per weight would: 32-byte loads every 16


@functools.lru_cache(maxsize=1)
def native() -> bool:
    """Whether numba compiles for a CPU with AVX-512 VNNI and VBMI (its features, else the host's), where the
    groups run as `vpdpbusd` and `vpermi2b`. The engine uses groups only there."""
    features = numba.config.CPU_FEATURES or llvm.get_host_cpu_features().flatten()
    flags = set(features.split(","))
    return {"+avx512vnni", "+avx512vbmi", "+avx512bw"} <= flags


def _dot(builder, total, window, weights):
    """total + per lane j: sum_i u8(window[4j + i]) * s8(weights[4j + i]) (`vpdpbusd`)."""
    fn = builder.module.declare_intrinsic("llvm.x86.avx512.vpdpbusd.512", fnty=ir.FunctionType(_LANES, [_LANES] * 3))
    return builder.call(fn, [total, builder.bitcast(window, _LANES), weights])


def _broadcast(builder, word):
    """A uint32 in all 16 lanes."""
    one = builder.insert_element(ir.Constant(_LANES, None), word, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(_LANES, None), _SPLAT)


def _group_pass(count: int, first: bool):
    """An intrinsic (acc, a, inp, at, offsets, words): acc[a:a + 16] (int32) = (0 if first else acc[a:a + 16])
    plus the `count` groups' dot products. Group g's segments are inp[offsets[2g] + at:][:32] and
    inp[offsets[2g + 1] + at:][:32], its weights words[2g] (four int8) and its slots' shifts words[2g + 1] (byte i:
    slot i's input byte within the two loads, 0-31 the first, 64-95 the second). Two chains of dot products, so
    that their latency overlaps."""
    @intrinsic
    def group_pass(typingctx, acc, a, inp, at, offsets, words):
        def codegen(context, builder, signature, args):
            acc_data = make_array(signature.args[0])(context, builder, args[0]).data
            inp_data = make_array(signature.args[2])(context, builder, args[2]).data
            target = builder.bitcast(builder.gep(acc_data, [args[1]]), _LANES.as_pointer())
            permute = builder.module.declare_intrinsic("llvm.x86.avx512.vpermi2var.qi.512",
                                                       fnty=ir.FunctionType(_BYTES, [_BYTES] * 3))

            def segment(k):
                start = builder.gep(inp_data, [builder.add(builder.extract_value(args[4], k), args[3])])
                loaded = builder.load(builder.bitcast(start, _LOAD.as_pointer()), align=1)
                return builder.shuffle_vector(loaded, ir.Constant(_LOAD, None), _WIDEN)

            zero = ir.Constant(_LANES, [0] * 16)
            chains = [zero if first else builder.load(target, align=4), zero]
            for g in range(count):
                shifts = builder.bitcast(_broadcast(builder, builder.extract_value(args[5], 2 * g + 1)), _BYTES)
                window = builder.call(permute, [segment(2 * g), builder.add(_PIXEL, shifts), segment(2 * g + 1)])
                weights = _broadcast(builder, builder.extract_value(args[5], 2 * g))
                chains[g % 2] = _dot(builder, chains[g % 2], window, weights)
            builder.store(builder.add(chains[0], chains[1]) if count > 1 else chains[0], target, align=4)
            return context.get_dummy_value()
        return types.none(acc, a, inp, at, offsets, words), codegen
    return group_pass


def _take(count: int):
    """An intrinsic (array, k) -> the tuple array[2k], ..., array[2k + 2 * count - 1]: a pass's offsets or words,
    read once before its loops."""
    @intrinsic
    def take(typingctx, array, k):
        def codegen(context, builder, signature, args):
            data = make_array(signature.args[0])(context, builder, args[0]).data
            first = builder.mul(args[1], ir.Constant(_I64, 2))
            items = [builder.load(builder.gep(data, [builder.add(first, ir.Constant(_I64, i))]))
                     for i in range(2 * count)]
            return context.make_tuple(builder, signature.return_type, items)
        return types.UniTuple(array.dtype, 2 * count)(array, k), codegen
    return take


_set1, _set2, _set3, _set4 = _group_pass(1, True), _group_pass(2, True), _group_pass(3, True), _group_pass(4, True)
_add4, _add8 = _group_pass(4, False), _group_pass(8, False)
_take1, _take2, _take3, _take4, _take8 = _take(1), _take(2), _take(3), _take(4), _take(8)
_U = np.uint64
_STEP = _U(16)


@njit(inline="always")
def accumulate_groups(acc, length, inp, base, off, words, k0, k1, count, in_step, acc_step):
    """For each of `count` runs r: acc[r * acc_step + x] = the dot products of groups k0 .. k1 - 1 (`_group_pass`:
    offsets off[2g], off[2g + 1], words[2g], words[2g + 1]) over inp from base + r * in_step, for x < length (a
    multiple of 16), in passes like `kernels._accumulate`'s: the first 1-4 groups set the accumulators (a zeroing
    pass before four groups cost a `memset` call: ResNet-20 at batch 1 3.6-7% faster without), then four groups
    where eight would leave four, then eight per pass. A pass covers every run, so that its offsets and broadcast
    weights are set up once for several rows (a strided layer's rows, which cannot be one run)."""
    # each name assigned once: inlined in numba's IR (`kernels._accumulate_kept`), a name assigned again raises
    # numba's NumbaIRAssumptionWarning at every compile
    first = ((k1 - k0 + _U(3)) % _U(4) + _U(1)) * _U(k1 > k0)
    k = k0 + first
    if first == _U(1):
        o1, w1 = _take1(off, k0), _take1(words, k0)
        for r1 in range(count):
            for x in range(_U(0), length, _STEP):
                _set1(acc, r1 * acc_step + x, inp, base + r1 * in_step + x, o1, w1)
    elif first == _U(2):
        o2, w2 = _take2(off, k0), _take2(words, k0)
        for r2 in range(count):
            for x in range(_U(0), length, _STEP):
                _set2(acc, r2 * acc_step + x, inp, base + r2 * in_step + x, o2, w2)
    elif first == _U(3):
        o3, w3 = _take3(off, k0), _take3(words, k0)
        for r3 in range(count):
            for x in range(_U(0), length, _STEP):
                _set3(acc, r3 * acc_step + x, inp, base + r3 * in_step + x, o3, w3)
    elif first == _U(4):
        s4, v4 = _take4(off, k0), _take4(words, k0)
        for r5 in range(count):
            for x in range(_U(0), length, _STEP):
                _set4(acc, r5 * acc_step + x, inp, base + r5 * in_step + x, s4, v4)
    else:
        for r0 in range(count):
            for x in range(length):
                acc[r0 * acc_step + x] = 0
    four = (k1 - k) % _U(8)  # 0 or 4
    if four == _U(4):
        o4, w4 = _take4(off, k), _take4(words, k)
        for r4 in range(count):
            for x in range(_U(0), length, _STEP):
                _add4(acc, r4 * acc_step + x, inp, base + r4 * in_step + x, o4, w4)
    for g in range(k + four, k1, _U(8)):
        o8, w8 = _take8(off, g), _take8(words, g)
        for r8 in range(count):
            for x in range(_U(0), length, _STEP):
                _add8(acc, r8 * acc_step + x, inp, base + r8 * in_step + x, o8, w8)


# (segment size, partner's size) in the order groups are made; partner 0: the segment alone
_PAIRINGS = ((4, 0), (3, 1), (3, 0), (2, 2), (2, 1), (2, 0), (1, 1), (1, 0))


@njit(cache=True)
def group_weights(ptr, off, val):
    """Each output channel's kept weights (CSR: ptr, off, integer val in -128..127, offsets ascending within a
    channel) in groups of one or two segments. A segment starts at a weight's offset o and takes the following
    weights with offsets up to o + SPAN, at most four; each channel's segments then pair up into groups of at most
    four weights (`_PAIRINGS`: three with one, two with two, two with one, one with one).
    Returns (group ptr, offsets, words): group g's segments start at offsets[2g] and offsets[2g + 1] (the same
    offset for a group of one segment); words[2g] holds its four int8 weights as bytes, words[2g + 1] its slots'
    shifts (`_group_pass`), both zero in an unused slot."""
    channels = ptr.shape[0] - 1
    n = off.shape[0]
    gptr = np.zeros(channels + 1, np.uint64)
    goff = np.empty(2 * n, np.uint64)
    words = np.zeros(2 * n, np.uint32)
    seg_start = np.empty(n, np.int64)
    seg_size = np.empty(n, np.int64)
    paired = np.empty(n, np.bool_)
    g = 0
    for c in range(channels):
        segments = 0
        k, end = ptr[c], ptr[c + 1]
        while k < end:  # segments, greedy over ascending offsets
            seg_start[segments] = k
            first = off[k]
            while k < end and off[k] - first <= _U(SPAN) and k - _U(seg_start[segments]) < _U(4):
                k += _U(1)
            seg_size[segments] = k - _U(seg_start[segments])
            segments += 1
        paired[:segments] = False
        for size, partner in _PAIRINGS:
            u = 0  # the partner cursor: what it passes is paired or of another size for good, so it never goes back
            for s in range(segments):
                if paired[s] or seg_size[s] != size:
                    continue
                t = s  # a group of one segment reads it twice, its second load unused
                if partner > 0:
                    while u < segments and (u == s or paired[u] or seg_size[u] != partner):
                        u += 1
                    if u == segments:
                        break  # no partner left: the rest wait for a later pairing
                    t = u
                paired[s] = paired[t] = True
                slot = 0
                for which, segment in ((0, s), (1, t)):
                    first = off[seg_start[segment]]
                    goff[2 * g + which] = first
                    if which == 1 and t == s:
                        continue
                    for j in range(seg_start[segment], seg_start[segment] + seg_size[segment]):
                        shift = np.uint32(64 * which) + np.uint32(off[j] - first)
                        words[2 * g] |= np.uint32(np.uint8(np.int8(val[j]))) << np.uint32(8 * slot)
                        words[2 * g + 1] |= shift << np.uint32(8 * slot)
                        slot += 1
                g += 1
        gptr[c + 1] = g
    return gptr, goff[:2 * g].copy(), words[:2 * g].copy()
