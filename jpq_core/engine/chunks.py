"""Row epilogues in 16-lane chunks with masked loads and stores (AVX-512).

The kernels' epilogues turn a row of accumulators into stored bytes (and float outputs). Rows in classifiers
are short (8-32 columns, or a run of a few rows of 78-286), and a loop that LLVM vectorises runs whole vectors
only, the rest of the row in 4-lane and scalar remainders with runtime alias checks before them: on ResNet-20's
8 x 8 maps the remainder is the whole row. Here a chunk of up to 16 elements is one masked 512-bit load, the
arithmetic on a full vector, and one masked store: lanes past the row are neither read nor written.

Each chunk computes exactly what the loops in `kernels` compute, operation by operation (subtract, fused
multiply-add, the residual's fused multiply-add, rint, clamp), so that outputs are the same bits either way.
Only where numba compiles for AVX-512 with byte masks (`native()`); elsewhere the kernels keep their loops.
Arrays are addressed by an element offset into their data (C-contiguous arrays of any rank).
"""

from __future__ import annotations

import functools

import numba
from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic
from numba.np.arrayobj import make_array

_I1, _I8, _I32, _F32 = ir.IntType(1), ir.IntType(8), ir.IntType(32), ir.FloatType()
LANES = _LANES = 16  # float32 lanes of an AVX-512 register: elements per chunk
_MATH = ("nnan", "ninf", "nsz", "contract")  # as kernels.CONV_MATH
_NAMES = {_I8: "i8", _I32: "i32", _F32: "f32"}
_BYTES = {_I8: 1, _I32: 4, _F32: 4}


@functools.lru_cache(maxsize=1)
def native() -> bool:
    """Whether numba compiles for a CPU with AVX-512 (F and BW: masked 32-bit and byte loads and stores)."""
    features = numba.config.CPU_FEATURES or llvm.get_host_cpu_features().flatten()
    return {"+avx512f", "+avx512bw"} <= set(features.split(","))


def _vector(element) -> ir.VectorType:
    return ir.VectorType(element, _LANES)


def _splat(builder, value):
    one = builder.insert_element(ir.Constant(_vector(value.type), None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(_vector(value.type), None), ir.Constant(_vector(_I32), [0] * _LANES))


def _lanes_below(builder, count, lanes: int):
    """The mask of a `lanes`-lane vector's lanes below `count` (an int32)."""
    vector = ir.VectorType(_I32, lanes)
    one = builder.insert_element(ir.Constant(vector, None), count, ir.Constant(_I32, 0))
    return builder.icmp_unsigned("<", ir.Constant(vector, list(range(lanes))),
                                 builder.shuffle_vector(one, ir.Constant(vector, None), ir.Constant(vector, [0] * lanes)))


def _call(builder, name: str, result, args):
    fn = builder.module.declare_intrinsic(name, fnty=ir.FunctionType(result, [a.type for a in args]))
    return builder.call(fn, args)


def _load(builder, pointer, mask, element):
    vector = _vector(element)
    return _call(builder, f"llvm.masked.load.v16{_NAMES[element]}.p0", vector,
                 [pointer, ir.Constant(_I32, _BYTES[element]), mask, ir.Constant(vector, None)])


def _store(builder, value, pointer, mask):
    element = value.type.element
    _call(builder, f"llvm.masked.store.v16{_NAMES[element]}.p0", ir.VoidType(),
          [value, pointer, ir.Constant(_I32, _BYTES[element]), mask])


class _Chunk:
    """What a chunk's code generator reads: each argument by name, array arguments as element pointers at their
    offsets, and the mask of lanes below `count`."""

    def __init__(self, context, builder, signature, args, names: str):
        self.builder, self.context = builder, context
        self.values, self.types = dict(zip(names.split(), args)), dict(zip(names.split(), signature.args))
        count = self.values["count"]
        self.count = builder.trunc(count, _I32) if count.type.width > 32 else count
        self.mask = _lanes_below(builder, self.count, _LANES)

    def pointer(self, array: str, offset: str):
        data = make_array(self.types[array])(self.context, self.builder, self.values[array]).data
        return self.builder.gep(data, [self.values[offset]])

    def splat(self, name: str):
        return _splat(self.builder, self.values[name])

    def flag(self, name: str):
        value = self.values[name]
        return value if value.type == _I1 else self.builder.trunc(value, _I1)

    def load_float(self, array: str, offset: str):
        """The lanes of a float32 or int32 array as float32 (int32 converted, as numba's np.float32 does)."""
        dtype = self.types[array].dtype
        loaded = _load(self.builder, self.pointer(array, offset), self.mask, _I32 if dtype == types.int32 else _F32)
        return self.builder.sitofp(loaded, _vector(_F32)) if dtype == types.int32 else loaded

    def affine(self):
        """v = (acc - corr) * mul + bias (+ rmul * res where has_res): the kernels' multiply-adds, contracted."""
        b = self.builder
        v = _call(b, "llvm.fma.v16f32", _vector(_F32),
                  [b.fsub(self.load_float("acc", "a"), self.splat("corr"), flags=_MATH), self.splat("mul"),
                   self.splat("bias")])
        before = b.block
        with b.if_then(self.flag("has_res")):
            with_res = _call(b, "llvm.fma.v16f32", _vector(_F32),
                             [self.splat("rmul"), self.load_float("res", "r"), v])
            res_block = b.block
        merged = b.phi(v.type)
        merged.add_incoming(v, before)
        merged.add_incoming(with_res, res_block)
        return merged

    def as_bytes(self, q, low):
        """rint(min(max(q, low), qmax)) as bytes (low and qmax whole numbers in 0..255): rounded after the clamp,
        by the conversion (`kernels._byte`)."""
        b = self.builder
        low = _splat(b, low)
        q = b.select(b.fcmp_ordered(">", q, low, flags=_MATH), q, low)
        qmax = self.splat("qmax")
        q = b.select(b.fcmp_ordered("<", q, qmax, flags=_MATH), q, qmax)
        q = _call(b, "llvm.rint.v16f32", _vector(_F32), [q])
        return b.trunc(b.fptosi(q, _vector(_I32)), _vector(_I8))

    def store_bytes(self, q, low, array: str, offset: str):
        """`as_bytes(q, low)` into array at offset."""
        _store(self.builder, self.as_bytes(q, low), self.pointer(array, offset), self.mask)

    def store_phases(self, q, array: str, even: str, odd: str):
        """The even lanes of the bytes q at array[even + x / 2], the odd ones at array[odd + (x - 1) / 2]: a row
        split into the two column phases of a stride-2 input, straight from the register."""
        b = self.builder
        half = _LANES // 2
        for first, offset in ((0, even), (1, odd)):
            picked = b.shuffle_vector(q, ir.Constant(q.type, None),
                                      ir.Constant(ir.VectorType(_I32, half), list(range(first, _LANES, 2))))
            # lanes x = 2i + first below count: i < (count - first + 1) / 2
            kept = b.lshr(b.add(self.count, ir.Constant(_I32, 1 - first)), ir.Constant(_I32, 1))
            _call(b, "llvm.masked.store.v8i8.p0", ir.VoidType(),
                  [picked, self.pointer(array, offset), ir.Constant(_I32, 1), _lanes_below(b, kept, half)])


def _contiguous(*arrays) -> bool:
    """Whether every array is C-contiguous (an element offset then addresses it): others fail to type."""
    return all(isinstance(a, types.Array) and a.layout == "C" for a in arrays)


_QUANTIZED = "acc a count corr mul bias res r rmul has_res low qmax dest d"


@intrinsic
def quantized_chunk(typingctx, acc, a, count, corr, mul, bias, res, r, rmul, has_res, low, qmax, dest, d):
    """For lanes x < count (at most 16): dest[d + x] = rint(min(max(v, low), qmax)) with
    v = (acc[a + x] - corr) * mul + bias (+ rmul * res[r + x] where has_res): `kernels._emit_quantized`'s store."""
    def codegen(context, builder, signature, args):
        chunk = _Chunk(context, builder, signature, args, _QUANTIZED)
        chunk.store_bytes(chunk.affine(), chunk.values["low"], "dest", "d")
        return context.get_dummy_value()
    if not _contiguous(acc, res, dest):
        return None
    return types.none(acc, a, count, corr, mul, bias, res, r, rmul, has_res, low, qmax, dest, d), codegen


_WITH_FLOAT = "acc a count corr mul bias res r rmul has_res slope out o keep dest d scale zero qmax"


@intrinsic
def float_and_quantized_chunk(typingctx, acc, a, count, corr, mul, bias, res, r, rmul, has_res, slope, out, o, keep,
                              dest, d, scale, zero, qmax):
    """For lanes x < count (at most 16): y = act(v), v as in `quantized_chunk`, act(v) = v if v > 0 else
    slope * v; out[o + x] = y where keep; dest[d + x] = min(max(rint(y / scale) + zero, 0), qmax):
    `kernels._emit_with_float`'s row."""
    def codegen(context, builder, signature, args):
        chunk = _Chunk(context, builder, signature, args, _WITH_FLOAT)
        b = builder
        v = chunk.affine()
        zero_lanes = ir.Constant(_vector(_F32), [0.0] * _LANES)
        y = b.select(b.fcmp_ordered(">", v, zero_lanes, flags=_MATH), v, b.fmul(v, chunk.splat("slope"), flags=_MATH))
        with b.if_then(chunk.flag("keep")):
            _store(b, y, chunk.pointer("out", "o"), chunk.mask)
        q = _call(b, "llvm.rint.v16f32", _vector(_F32), [b.fdiv(y, chunk.splat("scale"), flags=_MATH)])
        chunk.store_bytes(b.fadd(q, chunk.splat("zero"), flags=_MATH), ir.Constant(_F32, 0.0), "dest", "d")
        return context.get_dummy_value()
    if not _contiguous(acc, res, out, dest):
        return None
    return (types.none(acc, a, count, corr, mul, bias, res, r, rmul, has_res, slope, out, o, keep, dest, d, scale,
                       zero, qmax), codegen)


_SHARED = "acc a count corr mul bias res r rmul has_res low qmax dest_a mode_a even_a odd_a dest_b mode_b even_b odd_b"


@intrinsic
def shared_chunk(typingctx, acc, a, count, corr, mul, bias, res, r, rmul, has_res, low, qmax, dest_a, mode_a, even_a,
                 odd_a, dest_b, mode_b, even_b, odd_b):
    """For lanes x < count (at most 16) of a chunk that starts at an even column: the bytes of `quantized_chunk`,
    computed once, into two destinations (one quantizer), each by its mode: 0 none, 1 dest[even + x] (a stride-1
    input), 2 `store_phases` (a stride-2 input): `kernels._shared_row`."""
    def codegen(context, builder, signature, args):
        chunk = _Chunk(context, builder, signature, args, _SHARED)
        q = chunk.as_bytes(chunk.affine(), chunk.values["low"])
        for dest, mode, even, odd in (("dest_a", "mode_a", "even_a", "odd_a"), ("dest_b", "mode_b", "even_b", "odd_b")):
            value = chunk.values[mode]
            with builder.if_then(builder.icmp_unsigned("==", value, ir.Constant(value.type, 1))):
                _store(builder, q, chunk.pointer(dest, even), chunk.mask)
            with builder.if_then(builder.icmp_unsigned("==", value, ir.Constant(value.type, 2))):
                chunk.store_phases(q, dest, even, odd)
        return context.get_dummy_value()
    if not _contiguous(acc, res, dest_a, dest_b):
        return None
    return (types.none(acc, a, count, corr, mul, bias, res, r, rmul, has_res, low, qmax, dest_a, mode_a, even_a, odd_a,
                       dest_b, mode_b, even_b, odd_b), codegen)
