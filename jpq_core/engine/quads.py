"""Kept weights in quads (groups of up to four bytes): one VNNI dot product per quad and 16 output pixels.

The sparse kernel's accumulators are acc[x] = sum_k k_w[k] * q_a[base + off[k] + x] (`kernels._accumulate`), one
product per kept weight: load 16 input bytes, widen, multiply-add. Kept weights whose offsets lie within four
bytes of each other (taps of one kernel row: kx = 0, 1, 2 of a 3x3, or 0 and 2 of a dilated one) form a group
(a quad) with offset o and weight bytes b_0..b_3 (zero where a tap is pruned), and

    acc[x] += sum_{i<4} b_i * q_a[base + o + i + x]

is, for 16 pixels at once, one `vpdpbusd` (AVX-512 VNNI: per 32-bit lane, four u8 x s8 products summed) of the
input window (lane j holding q_a[.. + j .. + j + 3], one `vpermb` of a 32-byte load) with the group's four
bytes broadcast. The input bytes go in as they are stored (no widening), and a group of two kept taps costs no
more than one of one. Sums are exact int32, as the integer path's accumulators (`ops.Conv._kernel_weights`).

Only for a CPU with AVX-512 VNNI and VBMI (`native()`): the engine makes quads nowhere else, so these kernels are
never compiled there (`kernels._accumulate_kept` picks them by the weights' type). Imported by `kernels`, after it
has set the CPU features numba compiles for.
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

_I8, _I32 = ir.IntType(8), ir.IntType(32)
_LANES = ir.VectorType(_I32, 16)  # one AVX-512 register of int32 accumulators
_LOAD = ir.VectorType(_I8, 32)  # the input bytes a window needs (19 of them) in one 32-byte load
# Window byte 4j + i = input byte j + i: lane j sees the four inputs of output pixel j.
_WINDOW = ir.Constant(ir.VectorType(_I32, 64), [j + i for j in range(16) for i in range(4)])
_SPLAT = ir.Constant(ir.VectorType(_I32, 16), [0] * 16)
READ_BEYOND = 16  # bytes a group's loads read past what a product per weight would: 32-byte loads every 16


@functools.lru_cache(maxsize=1)
def native() -> bool:
    """Whether numba compiles for a CPU with AVX-512 VNNI and VBMI (its features, else the host's), where the
    groups run as `vpdpbusd` and `vpermb`. The engine uses groups only there."""
    features = numba.config.CPU_FEATURES or llvm.get_host_cpu_features().flatten()
    flags = set(features.split(","))
    return {"+avx512vnni", "+avx512vbmi", "+avx512bw"} <= flags


def _dot(builder, total, window, weights):
    """total + per lane j: sum_i u8(window[4j + i]) * s8(weights[4j + i]) (`vpdpbusd`)."""
    fn = builder.module.declare_intrinsic("llvm.x86.avx512.vpdpbusd.512", fnty=ir.FunctionType(_LANES, [_LANES] * 3))
    return builder.call(fn, [total, builder.bitcast(window, _LANES), weights])


def _group_pass(count: int, first: bool):
    """An intrinsic (acc, a, inp, offsets, quads): acc[a:a + 16] (int32) = (0 if first else acc[a:a + 16]) plus
    the `count` groups' dot products, group g reading inp[offsets[g]:offsets[g] + 19] with weights quads[g]
    (a uint32 of four int8). Two chains of dot products, so that their latency overlaps."""
    @intrinsic
    def group_pass(typingctx, acc, a, inp, offsets, quads):
        def codegen(context, builder, signature, args):
            acc_data = make_array(signature.args[0])(context, builder, args[0]).data
            inp_data = make_array(signature.args[2])(context, builder, args[2]).data
            target = builder.bitcast(builder.gep(acc_data, [args[1]]), _LANES.as_pointer())
            zero = ir.Constant(_LANES, [0] * 16)
            chains = [zero if first else builder.load(target, align=4), zero]
            for g in range(count):
                at = builder.gep(inp_data, [builder.extract_value(args[3], g)])
                loaded = builder.load(builder.bitcast(at, _LOAD.as_pointer()), align=1)
                window = builder.shuffle_vector(loaded, ir.Constant(_LOAD, None), _WINDOW)
                one = builder.insert_element(ir.Constant(_LANES, None), builder.extract_value(args[4], g),
                                             ir.Constant(_I32, 0))
                weights = builder.shuffle_vector(one, ir.Constant(_LANES, None), _SPLAT)
                chains[g % 2] = _dot(builder, chains[g % 2], window, weights)
            builder.store(builder.add(chains[0], chains[1]) if count > 1 else chains[0], target, align=4)
            return context.get_dummy_value()
        return types.none(acc, a, inp, offsets, quads), codegen
    return group_pass


_set1, _set2, _set3 = _group_pass(1, True), _group_pass(2, True), _group_pass(3, True)
_add4, _add8 = _group_pass(4, False), _group_pass(8, False)
_U = np.uint64
_STEP = _U(16)


@njit(inline="always")
def accumulate_groups(acc, length, inp, base, off, quad, k0, k1, count, in_step, acc_step):
    """For each of `count` runs r: acc[r * acc_step + x] = sum_{k0 <= g < k1} sum_i byte_i(quad[g]) *
    inp[base + r * in_step + off[g] + i + x] for x < length (a multiple of 16), in passes like
    `kernels._accumulate`'s: the (k1 - k0) % 4 odd groups set the accumulators, then four groups where eight
    would leave four, then eight per pass. A pass covers every run, so that its offsets and broadcast weights are
    set up once for several rows (a strided layer's rows, which cannot be one run)."""
    k = k0 + (k1 - k0) % _U(4)  # each name assigned once: inlined in numba's IR (`kernels._accumulate_kept`),
    if k == k0 + _U(1):  # a name assigned again raises numba's NumbaIRAssumptionWarning at every compile
        o0, q0 = base + off[k0], quad[k0]
        for r1 in range(count):
            for x in range(_U(0), length, _STEP):
                _set1(acc, r1 * acc_step + x, inp, (o0 + r1 * in_step + x,), (q0,))
    elif k == k0 + _U(2):
        o0, o1, q0, q1 = base + off[k0], base + off[k0 + _U(1)], quad[k0], quad[k0 + _U(1)]
        for r2 in range(count):
            i2 = r2 * in_step
            for x in range(_U(0), length, _STEP):
                _set2(acc, r2 * acc_step + x, inp, (o0 + i2 + x, o1 + i2 + x), (q0, q1))
    elif k == k0 + _U(3):
        o0, o1, o2 = base + off[k0], base + off[k0 + _U(1)], base + off[k0 + _U(2)]
        q0, q1, q2 = quad[k0], quad[k0 + _U(1)], quad[k0 + _U(2)]
        for r3 in range(count):
            i3 = r3 * in_step
            for x in range(_U(0), length, _STEP):
                _set3(acc, r3 * acc_step + x, inp, (o0 + i3 + x, o1 + i3 + x, o2 + i3 + x), (q0, q1, q2))
    else:
        for r0 in range(count):
            for x in range(length):
                acc[r0 * acc_step + x] = 0
    four = (k1 - k) % _U(8)  # 0 or 4
    if four == _U(4):
        o0, o1, o2, o3 = base + off[k], base + off[k + _U(1)], base + off[k + _U(2)], base + off[k + _U(3)]
        q0, q1, q2, q3 = quad[k], quad[k + _U(1)], quad[k + _U(2)], quad[k + _U(3)]
        for r4 in range(count):
            i4 = r4 * in_step
            for x in range(_U(0), length, _STEP):
                _add4(acc, r4 * acc_step + x, inp, (o0 + i4 + x, o1 + i4 + x, o2 + i4 + x, o3 + i4 + x), (q0, q1, q2, q3))
    for g in range(k + four, k1, _U(8)):
        o0, o1, o2, o3 = base + off[g], base + off[g + _U(1)], base + off[g + _U(2)], base + off[g + _U(3)]
        o4, o5, o6, o7 = base + off[g + _U(4)], base + off[g + _U(5)], base + off[g + _U(6)], base + off[g + _U(7)]
        q0, q1, q2, q3 = quad[g], quad[g + _U(1)], quad[g + _U(2)], quad[g + _U(3)]
        q4, q5, q6, q7 = quad[g + _U(4)], quad[g + _U(5)], quad[g + _U(6)], quad[g + _U(7)]
        for r8 in range(count):
            i8 = r8 * in_step
            for x in range(_U(0), length, _STEP):
                _add8(acc, r8 * acc_step + x, inp, (o0 + i8 + x, o1 + i8 + x, o2 + i8 + x, o3 + i8 + x, o4 + i8 + x,
                                                    o5 + i8 + x, o6 + i8 + x, o7 + i8 + x),
                      (q0, q1, q2, q3, q4, q5, q6, q7))


@njit(cache=True)
def group_weights(ptr, off, val):
    """Each output channel's kept weights (CSR: ptr, off, integer val in -128..127, offsets ascending within a
    channel) in groups: a group starts at a weight's offset o and takes the following weights with offsets below
    o + 4. Returns (group ptr, group offsets, groups as uint32 of four int8 weight bytes, byte i for offset o + i)."""
    channels = ptr.shape[0] - 1
    gptr = np.zeros(channels + 1, np.uint64)
    goff = np.empty(off.shape[0], np.uint64)
    quad = np.zeros(off.shape[0], np.uint32)
    g = 0
    for c in range(channels):
        k, end = ptr[c], ptr[c + 1]
        while k < end:
            o = off[k]
            goff[g] = o
            while k < end and off[k] - o < _U(4):
                quad[g] |= np.uint32(np.uint8(np.int8(val[k]))) << np.uint32(_U(8) * (off[k] - o))
                k += _U(1)
            g += 1
        gptr[c + 1] = g
    return gptr, goff[:g].copy(), quad[:g].copy()
