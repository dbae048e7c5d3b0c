"""The correlation's shifts in blocks held in registers (AVX-512): one pass over the channels per 16 pixels.

StereoNet's cost volume is, per shift d and pixel x, a sum over channels of left[c, x + d] * right[c, x]
(`kernels.correlation`, in the frame of the right image). Shift by shift, every product needs its own
unaligned load of the left row, and the accumulators go to memory between channels: on stereo's 32 channels
x 24 shifts x 126 x 186 pixels that loop ran at about three cycles a vector product, bound by its loads.

Here the accumulators of SHIFTS consecutive shifts for 16 pixels (VECTORS x 16) stay in registers while the
channels pass: per channel one load of the right row, two of the left (its 32 values from x + d0 on), and
per shift the window left[x + d0 + s .. + 15] cut from those two registers by one two-source permute
(`vpermt2ps`), then one fused multiply-add. The sums run channel by channel in the channels' order. Stereo's
correlation alone, one thread: 1.09 -> 0.72-0.75 ms (more shifts or pixels per block, or channels in passes of
4-8, measured no faster on this machine).

Only where numba compiles for AVX-512 (`chunks.native()`); elsewhere the kernel keeps its loops.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic
from numba.np.arrayobj import make_array

SHIFTS = 8  # shifts per block
VECTORS = 1  # 16-pixel vectors per block: VECTORS * SHIFTS accumulators in registers
PIXELS = 16 * VECTORS
_LEFT_LOADS = (SHIFTS - 1) // 16 + 1 + VECTORS
READ_BEYOND = 16 * _LEFT_LOADS  # how far past a run's end (rounded up to PIXELS) the blocks may read

_LANES = 16
_F32, _I32, _I64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
_VECTOR = ir.VectorType(_F32, _LANES)
_INTS = ir.VectorType(_I32, _LANES)


def _as_i64(context, builder, value, typ):
    return context.cast(builder, value, typ, types.int64)


@intrinsic
def correlate_block(typingctx, acc, a, row, left, right, left_at, right_at, plane, channels, count):
    """For s < SHIFTS and j < 16: acc[a + s * row + j] += sum over i < count, c = channels[i], of
    left[left_at + c * plane + s + j] * right[right_at + c * plane + j] (acc, left, right: C-contiguous float32
    arrays, addressed by element offsets; channels: int64), for VECTORS vectors of 16 pixels (acc and right
    from a, right_at on; left from left_at on). Reads left up to left_at + c * plane + READ_BEYOND - 1."""
    def codegen(context, builder, signature, args):
        acc_data, left_data, right_data, channel_data = (
            make_array(signature.args[k])(context, builder, args[k]).data for k in (0, 3, 4, 8))
        a, row, left_at, right_at, plane, count = (_as_i64(context, builder, args[k], signature.args[k])
                                                     for k in (1, 2, 5, 6, 7, 9))
        targets = [builder.bitcast(builder.gep(acc_data, [builder.add(a, builder.add(
            builder.mul(row, ir.Constant(_I64, s)), ir.Constant(_I64, b * _LANES)))]), _VECTOR.as_pointer())
            for b in range(VECTORS) for s in range(SHIFTS)]
        start = [builder.load(t, align=4) for t in targets]
        entry = builder.block
        header = builder.append_basic_block("shifts.channel")
        body = builder.append_basic_block("shifts.products")
        done = builder.append_basic_block("shifts.done")
        builder.branch(header)

        builder.position_at_end(header)
        i = builder.phi(_I64)
        sums = [builder.phi(_VECTOR) for _ in range(VECTORS * SHIFTS)]
        builder.cbranch(builder.icmp_signed("<", i, count), body, done)

        builder.position_at_end(body)
        channel = builder.mul(builder.load(builder.gep(channel_data, [i])), plane)

        def load(data, at, extra):
            pointer = builder.gep(data, [builder.add(builder.add(at, channel), ir.Constant(_I64, extra))])
            return builder.load(builder.bitcast(pointer, _VECTOR.as_pointer()), align=4)

        rights = [load(right_data, right_at, b * _LANES) for b in range(VECTORS)]
        lefts = [load(left_data, left_at, k * _LANES) for k in range(_LEFT_LOADS)]
        fma = builder.module.declare_intrinsic("llvm.fma.v16f32", fnty=ir.FunctionType(_VECTOR, [_VECTOR] * 3))
        updated = []
        for (b, s), total in zip([(b, s) for b in range(VECTORS) for s in range(SHIFTS)], sums):
            r = rights[b]
            low, high, cut = lefts[b + s // _LANES], lefts[b + s // _LANES + 1], s % _LANES
            window = builder.shuffle_vector(low, high, ir.Constant(_INTS, list(range(cut, cut + _LANES))))
            updated.append(builder.call(fma, [window, r, total]))
        following = builder.add(i, ir.Constant(_I64, 1))
        body_end = builder.block
        builder.branch(header)

        i.add_incoming(ir.Constant(_I64, 0), entry)
        i.add_incoming(following, body_end)
        for total, initial, last in zip(sums, start, updated):
            total.add_incoming(initial, entry)
            total.add_incoming(last, body_end)

        builder.position_at_end(done)
        for total, target in zip(sums, targets):
            builder.store(total, target, align=4)
        return context.get_dummy_value()

    ints = (a, row, left_at, right_at, plane, count)
    if not all(isinstance(t, types.Integer) for t in ints) or channels.dtype != types.int64:
        return None
    return types.none(acc, a, row, left, right, left_at, right_at, plane, channels, count), codegen
