"""The operations of an engine program. Each reads and writes numbered slots of float32 NCHW arrays.

`Conv` (convolution or linear layer, with folded batch norm, requantization, residual add and (leaky) ReLU
fused) carries packed weights; `Glue` ops are the float rest: StereoNet's own ops and the general ones of
traced networks (activations, add, multiply, concatenation, pooling, interpolation, layer norm, reshapes
and permutes, ...). Every op describes
itself as JSON plus named arrays (`describe`, `arrays`), which is all a program file holds.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numba
import numpy as np
import torch

from jpq_core.engine import constants, direct, kernels, packing, quads
from jpq_core.errors import JPQError

INTEGER_WEIGHT_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
INTEGER_ACTIVATION_BITS = (4, 5, 6, 7, 8)


class Planned(NamedTuple):
    """An op's work in a planned run (`Conv.planned`, `Glue.planned`, `Program._run_plan`)."""

    call: Callable[[], None]
    residual: tuple  # (slot, the array bound) where it reads an array made elsewhere (a residual, glue's input): it
    # holds only while that slot has that array
    outputs: tuple  # ((slot, float output),) where it keeps one, else ()
    stores: tuple  # ((slot, store), ...): the inputs it stores itself, each store taking that slot's array
    serial_args: tuple | None  # `kernels.sparse_conv_serial`'s arguments where `call` is that kernel alone


@dataclass
class Conv:
    """y = act((acc - corr[c]) * mul[c] + bias[c] + res_scale * residual), acc = sum_k val[k] * x[off[k] + ...].

    Integer path (weights 1-8 bits, input activations 4-8 bits): x = q_a (uint8), val = k_w (integer
    weight), corr[c] = z_a * sum(k_w[c]), mul[c] = s_w[c] * s_a * gamma[c] / sqrt(var[c] + eps), so
    (acc - corr) is exactly sum k_w * (q_a - z_a) and y equals the fake-quantized PyTorch layer up to
    float32 rounding of one multiply-add. Float path: x and val float32, corr = 0.
    """

    name: str
    inputs: list[int]
    output: int
    shape: tuple[int, int, int, int]  # (C_out, C_in / groups, kh, kw)
    stride: tuple[int, int]  # (height, width); programs of format 2 hold one number for both
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    linear: bool
    integer: bool
    bits: int  # stored value bits: 1..8 (+1 for asymmetric), 16, or 32 (float)
    encoding: str
    entries: int
    values: np.ndarray  # packed
    index: np.ndarray  # packed (bitmask or gaps)
    scale: np.ndarray  # float32 per output channel: s_w * gamma / sqrt(var + eps)
    bias: np.ndarray  # float32 per output channel (folded batch norm and conv bias)
    act: dict | None = None  # input quantizer {"bits", "scale", "zero"} or None
    residual: int | None = None
    res_scale: float = 1.0
    slope: float = 1.0  # 1 = no activation, 0 = ReLU, else LeakyReLU
    targets: list | None = None  # [[op index, channel offset, batch parts]]: convs whose padded input this
    # layer writes directly (at most 2), into the first 1/parts of the batch
    keep: bool = True  # whether the float output is needed too (other uses, residuals, program output)
    fused: list | None = None  # per input: its channels if its producer writes it here directly, else 0
    kind = "conv"
    consumers: list = field(default_factory=list, repr=False)
    steady: np.ndarray | None = field(default=None, repr=False)  # see `steady_channels`
    unread: np.ndarray | None = field(default=None, repr=False)  # per output channel: nothing reads it (`unread`)
    _csr: tuple | None = field(default=None, repr=False)
    _geometry: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for key in ("stride", "padding", "dilation"):
            value = getattr(self, key)
            setattr(self, key, (int(value), int(value)) if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value))

    # --- storage -------------------------------------------------------------------------------------
    def describe(self) -> dict:
        keys = ("name", "inputs", "output", "shape", "stride", "padding", "dilation", "groups", "linear", "integer",
                "bits", "encoding", "entries", "act", "residual", "res_scale", "slope", "targets", "keep", "fused")
        return {"kind": self.kind, **{k: getattr(self, k) for k in keys}}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"values": self.values, "index": self.index, "scale": self.scale, "bias": self.bias}

    @property
    def nbytes(self) -> int:
        """Packed weight bytes: values, index, per-channel scales and biases."""
        return sum(a.nbytes for a in self.arrays().values())

    # --- execution -----------------------------------------------------------------------------------
    def _decoded(self):
        """The kept weights as (output channel, absolute input channel, ky, kx, value), each output channel's
        row ordered as its offsets will be: by (column phase, c_in, ky, kx). Decoded from storage at each call,
        not kept: the positions are needed only to lay out offsets for a new input size and the dense path's
        matrix, and kept for every weight they cost more than the weights (RegNet-Y-128GF: 38 GB)."""
        co, ci_g, kh, kw = self.shape
        size = co * ci_g * kh * kw
        pos, vals = packing.decode(self.encoding, self.values, self.index, self.bits, size, self.entries)
        c, ci, ky, kx = np.unravel_index(pos, self.shape)
        del pos
        ci = ci + (c // (co // self.groups)) * ci_g  # absolute input channel for grouped convolutions
        phase = (kx * self.dilation[1]) % self.stride[1]
        if phase.any():  # rows ordered by (column phase, c_in, ky, kx); decoded positions are (c_in, ky, kx)
            order = np.lexsort((kx, ky, ci, phase, c))
            c, ci, ky, kx, vals = c[order], ci[order], ky[order], kx[order], vals[order]
        return c, ci, ky, kx, vals

    def _kernel_weights(self):
        """CSR over output channels in `_decoded`'s order, as the kernels take it: (ptr, val, corr, mul)."""
        if self._csr is None:
            co = self.shape[0]
            c, _, _, _, vals = self._decoded()
            ptr = np.zeros(co + 1, np.uint64)
            ptr[1:] = np.cumsum(np.bincount(c, minlength=co))
            if self.integer:
                sums = np.bincount(c, weights=vals.astype(np.float64), minlength=co)
                corr = (np.round(self.act["zero"]) * sums).astype(np.int32)
                mul = (self.scale * np.float32(self.act["scale"])).astype(np.float32)
                # The integer sums are exact in float32 while |sum| < 2^24, and float FMAs are faster than
                # int32 multiply-adds (whole stereo network 3-5% faster at 95-99% in an interleaved A/B run):
                # float32 accumulators wherever every channel's bound sum|k_w| * q_max stays below 2^24.
                bound = np.bincount(c, weights=np.abs(vals).astype(np.float64), minlength=co).max(initial=0)
                if bound * (2 ** self.act["bits"] - 1) < FLOAT_EXACT_LIMIT:
                    val, corr = vals.astype(np.float32), corr.astype(np.float32)
                else:
                    val = vals.astype(np.int8 if np.abs(vals).max(initial=0) <= 127 else np.int16)
            else:
                val = vals.astype(np.float32)
                corr = np.zeros(co, np.float32)
                mul = self.scale
            self._csr = (ptr, val, corr, mul)
        return self._csr

    def steady_channels(self) -> np.ndarray:
        """Per output channel, whether no input changes its values (no kept weight, and no residual or a constant
        residual channel: `constants`): the kernel stores it only into new buffers. Set for the whole program by
        `constants.mark_constant_channels`; alone, a layer knows its residual's channels not constant."""
        if self.steady is None:
            self.steady = ~np.isnan(constants.conv_constants(self, None))
        return self.steady

    def channel_states(self) -> np.ndarray:
        """Per output channel what the kernel does with it (uint64, see `kernels._tile_rows`): kernels.UNREAD
        where nothing reads it (`unread`: skipped), kernels.STEADY where steady (stored into new buffers only),
        else 0 (computed)."""
        states = np.where(self.steady_channels(), kernels.STEADY, 0).astype(np.uint64)
        if self.unread is not None:
            states[self.unread] = kernels.UNREAD
        return states

    @property
    def per_sample(self) -> bool:
        """Whether each sample of the output depends on that sample of the input alone (see `Program.run`):
        not for a layer that writes into a part of a consumer's batch (StereoNet's left view)."""
        return all(parts == 1 for _, _, parts in self.targets or [])

    @property
    def dense(self) -> bool:
        """Whether this layer runs as a matrix product (the dense path): a convolution without groups whose
        products are exact (`product_kind`) that keeps at least DENSE_FROM_DENSITY_STRIDED of its weights if it
        has stride > 1 down the rows (QUAD_FROM_DENSITY_STRIDED with int8 products and `quad_weights`), else at
        least DENSE_FROM_DENSITY of them (INT8_FROM_DENSITY with int8 products, QUAD_FROM_DENSITY with quads too,
        and INT8_MIN_CHANNELS output channels) and DENSE_MIN_DEPTH products per output (see their comments); where
        the direct kernel would run it (`by_groups`), DIRECT_FROM_DENSITY(_STRIDED) of them."""
        ptr = self._kernel_weights()[0]
        kind = self.product_kind
        if self.groups != 1 or kind is None or (kind == "int8" and self.shape[0] < INT8_MIN_CHANNELS):
            return False
        density = int(ptr[-1]) / math.prod(self.shape)
        quad = kind == "int8" and self.quad_weights  # the sparse kernel is faster with quads: a later crossover
        if quad and self.by_groups:  # and the direct kernel faster than a product: an earlier one
            return density >= (DIRECT_FROM_DENSITY_STRIDED if self.stride[0] > 1 else DIRECT_FROM_DENSITY)
        if self.stride[0] > 1:
            return density >= (QUAD_FROM_DENSITY_STRIDED if quad else DENSE_FROM_DENSITY_STRIDED)
        threshold = (QUAD_FROM_DENSITY if quad else INT8_FROM_DENSITY) if kind == "int8" else DENSE_FROM_DENSITY
        return density >= threshold and math.prod(self.shape[1:]) >= DENSE_MIN_DEPTH

    @property
    def product_kind(self) -> str | None:
        """How the dense path would compute this layer's accumulators: "int8" (exact int8 x int8 -> int32
        products, `torch._int_mm`, where the CPU has VNNI dot products: integer layers whose weights fit int8),
        "float32" (`torch.mm`, exact where every sum is below 2^24: float layers and integer layers with float32
        accumulators, see `_kernel_weights`), or None."""
        _, val, _, _ = self._kernel_weights()
        if self.integer and int8_products() and np.abs(val).max(initial=0) <= 127:
            return "int8"
        return "float32" if val.dtype == np.float32 else None

    def tap_offsets(self, hp: int, wq: int) -> np.ndarray:
        """The input offset (as `geometry`'s) of every weight position (c_in, ky, kx), kept or not, in that order,
        for a padded input of hp rows of wq columns per phase."""
        c_total, kh, kw = self.shape[1:]
        ci, ky, kx = (a.astype(np.uint64) for a in np.unravel_index(np.arange(c_total * kh * kw), (c_total, kh, kw)))
        (_, s), (dh, d) = self.stride, self.dilation
        return ((((kx * d) % s) * c_total + ci) * hp + ky * dh) * wq + (kx * d) // s

    @functools.cached_property
    def by_groups(self) -> bool:
        """Whether the dense path would compute this layer by `direct`'s groups (see `direct_groups`), judged on
        a wide input, whose kernel rows lie too far apart to share a segment (narrow maps fill groups better)."""
        return self.direct_groups(self.tap_offsets(1 << 12, 1 << 12), self._dense_weights()) is not None

    def _dense_weights(self) -> np.ndarray:
        """The kept weights as a dense float32 (C_out, C_in * kh * kw) matrix, in `_kernel_weights`'s values."""
        val = self._kernel_weights()[1]
        c, ci, ky, kx, _ = self._decoded()
        co, ci_g, kh, kw = self.shape
        weights = np.zeros((co, ci_g * kh * kw), np.float32)
        weights[c, (ci * kh + ky) * kw + kx] = val
        return weights

    @property
    def quad_weights(self) -> bool:
        """Whether the sparse kernel takes this layer's kept weights in quads (groups of up to four, one VNNI dot
        product each, `quads`): integer layers whose weights fit int8, where numba compiles for VNNI and QUADS is
        on. Their accumulators are then int32."""
        if not (self.integer and QUADS and quads.native()):
            return False
        val = self._kernel_weights()[1]
        return val.size == 0 or (val.min() >= -128 and val.max() <= 127)

    @property
    def pixelwise(self) -> bool:
        """Whether this is a 1x1 convolution of stride 1 without padding, whose direct writes (if any) go to
        unpadded stride-1 inputs: then it runs as one row of H * W pixels per sample (the same memory). The
        kernel vectorises along a row, and the small feature maps of classifiers (8 x 8 down to 1 x 1 at 32 x 32
        input) would fill a 16-lane vector by a row each, mostly idle."""
        return (not self.linear and self.shape[2:] == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
                and all(c.padding == (0, 0) and c.stride[1] == 1 for c in self.consumers))

    def geometry(self, h: int, w: int) -> dict:
        """Padded input layout, output size and flat offsets for an h x w input (cached per size)."""
        if (h, w) not in self._geometry:
            _, _, kh, kw = self.shape
            (sh, s), (ph, pw), (dh, d) = self.stride, self.padding, self.dilation
            hp, wtot = h + 2 * ph, w + 2 * pw
            wq = -(-wtot // s)
            out_h, out_w = (hp - dh * (kh - 1) - 1) // sh + 1, (wtot - d * (kw - 1) - 1) // s + 1
            if out_h < 1 or out_w < 1:
                raise JPQError(f"layer {self.name!r}: input {h}x{w} is too small for its kernel; use a larger input.")
            _, ci, ky, kx, _ = self._decoded()
            c_total = self.groups * self.shape[1]
            off = (((kx * d) % s * c_total + ci) * hp + ky * dh) * wq + (kx * d) // s
            ptr, val = self._kernel_weights()[:2]
            off, weight_quads = off.astype(np.uint64), None
            if self.quad_weights:  # the kernel then takes the quads' ptr and offsets, and the quads for val
                ptr, off, weight_quads = quads.group_weights(ptr, off, val)
            # the kernel takes ptr, the channels' states and off as one array (see kernels._sparse_conv)
            index = np.concatenate([ptr, self.channel_states(), off])
            self._geometry[(h, w)] = dict(hp=hp, wq=wq, out_h=out_h, out_w=out_w, index=index, quads=weight_quads,
                                          in_sample=s * c_total * hp * wq, rowstride=sh * wq, c_total=c_total)
        return self._geometry[(h, w)]

    def accumulators(self, x) -> np.ndarray:
        """The integer accumulators sum_k k_w * (q_a - z_a) of this layer for the float input x (N, C, H, W):
        the layer run with mul = 1, bias = 0 and nothing fused (exact while |sum| < 2^24, float32 output)."""
        if not self.integer:
            raise JPQError(f"layer {self.name!r} runs on the float path; it has no integer accumulators.")
        ptr, val, corr, mul = self._kernel_weights()
        plain = copy.copy(self)
        plain._csr, plain._geometry, plain.unread = (ptr, val, corr, np.ones_like(mul)), {}, None
        plain.bias = np.zeros_like(self.bias)
        plain.inputs, plain.output, plain.residual, plain.slope = [0], 1, None, 1.0
        plain.targets, plain.keep, plain.fused, plain.consumers = None, True, None, []
        env = [np.ascontiguousarray(x, np.float32), None]
        plain.run(env, {})
        return np.rint(env[1]).astype(np.int64)

    def store_params(self):
        """(mode, scale, zero, qmax) of how this layer's input is stored: 0 copy, 1 fake-quantize, 2 quantize."""
        if self.act is None:
            return 0, np.float32(1), np.float32(0), np.float32(0)
        a = self.act
        return 2 if self.integer else 1, np.float32(a["scale"]), np.float32(a["zero"]), np.float32(2 ** a["bits"] - 1)

    def input_buffer(self, buffers: dict, n: int, h: int, w: int) -> np.ndarray:
        """This layer's padded, phase-split (quantized) input for this run, created on first request and
        filled with the padding value (what 0.0 stores as)."""
        g = self.geometry(h, w)
        shape = (n, self.stride[1], g["c_total"], g["hp"], g["wq"])
        if id(self) not in buffers or buffers[id(self)][0].shape != shape:
            mode, scale, zero, _ = self.store_params()
            pad = zero if mode == 2 else 0
            # Slack: the kernel computes whole vectors past a row's end (see sparse_conv), by groups of weights
            # from 32-byte loads (`quads`)
            flat = np.full(math.prod(shape) + kernels.VECTOR + quads.READ_BEYOND, pad,
                           np.uint8 if self.integer else np.float32)
            buffers[id(self)] = (flat[:math.prod(shape)].reshape(shape), h, w, flat)
        return buffers[id(self)][0]

    def output_buffer(self, buffers: dict, shape: tuple) -> np.ndarray:
        """The float output array, reused across runs of the same input size (the program copies its result)."""
        key = (id(self), "out")
        if key not in buffers or buffers[key].shape != shape:
            buffers[key] = np.empty(shape, np.float32)
        return buffers[key]

    def run(self, env: list, buffers: dict) -> None:
        xs = [env[i] for i, f in zip(self.inputs, self.fused or [0] * len(self.inputs)) if not f]
        n, h, w = _run_size(self, env, buffers, xs)
        key = (id(self), "step", n, h, w, buffers.get(THREADS) or numba.get_num_threads())
        step = buffers.get(key)
        if step is None:
            step = buffers[key] = self._prepare(xs, buffers, n, h, w)
        kernel, args, buf, store, fill, out_dims, output, residual, products = step
        for slot, c0 in fill:  # inputs that no producer wrote here directly
            x = env[slot]
            pad = kernels.pad_input_serial if kernel is kernels.sparse_conv_serial else kernels.pad_input
            pad(np.ascontiguousarray(x.reshape(n, -1, 1, 1) if self.linear else x, np.float32), buf, c0, *self.padding,
                *store)
        if residual is not None:
            res, (size, shape) = env[self.residual], residual
            if res.size != size:
                raise JPQError(f"layer {self.name!r}: its residual has shape {res.shape}, its output {out_dims}; "
                               "the engine adds residuals of the output's shape only.")
            res = np.ascontiguousarray(res)  # the kernel addresses its rows by flat offsets
            args[_RESIDUAL] = res if shape is None else res.reshape(shape)
        args[-1] = buffers.get(FRESH, True)
        if products is not None:  # the dense path: accumulators piece by piece, then the kernel's epilogue
            dense = args[_PLACES][8:]  # the kernel's `dense`, packed after place_a and place_b
            for accumulate, piece in zip(products.calls(), products.pieces):  # epilogue while they are in cache
                accumulate()
                dense[3:] = piece
                kernel(*args)
        else:
            kernel(*args)
        if output is not None:
            env[self.output] = output

    def planned(self, env: list, buffers: dict) -> Planned | None:
        """This layer's work as a later run of the same buffers can do it without `run`'s Python (see
        `Program._run_plan`), or None where it has not run with these buffers. Made after a complete run,
        whose arguments it copies with `fresh` False. It calls the kernels' compiled entry points, which skip
        numba's dispatch (about 0.5 us per call: type checks of 24 arguments), so it holds only for exactly
        these arguments' types, and only while the residual is the array bound here."""
        n, h, w = _run_size(self, env, buffers)
        step = buffers.get((id(self), "step", n, h, w, buffers.get(THREADS) or numba.get_num_threads()))
        if step is None:
            return None
        kernel, args, buf, store, fill, _, output, residual, products = step
        args = list(args)
        args[-1] = False
        call = functools.partial(entry_point(kernel, args), *args)
        if products is not None:
            call = self._planned_products(products, call)
        pad = kernels.pad_input_serial if kernel is kernels.sparse_conv_serial else kernels.pad_input
        stores = tuple((slot, self._planned_store(pad, env[slot], n, buf, c0, store)) for slot, c0 in fill)
        alone = products is None and kernel is kernels.sparse_conv_serial
        return Planned(call, (self.residual, env[self.residual]) if residual is not None else (),
                       ((self.output, output),) if output is not None else (), stores, tuple(args) if alone else None)

    def _planned_store(self, pad, x, n: int, buf, c0: int, store: tuple):
        """`run`'s store of an input x into this layer's buffer as one function of x, for arrays of x's type."""
        rest = [buf, c0, *self.padding, *store]
        shape = (n, -1, 1, 1) if self.linear else x.shape
        entry = entry_point(pad, [np.ascontiguousarray(x.reshape(shape), np.float32), *rest])

        def store_input(x):
            entry(np.ascontiguousarray(x.reshape(shape), np.float32), *rest)
        return store_input

    @staticmethod
    def _planned_products(products: DenseProducts, epilogue):
        """The dense path's pieces (see `run`) as one call: for each, its accumulators and `epilogue`."""
        calls = products.calls(compiled=True)
        dense = epilogue.args[_PLACES][8:]
        if len(calls) == 1:
            dense[3:] = products.pieces[0]
            accumulate = calls[0]

            def call():
                accumulate()
                epilogue()
        else:
            def call():
                for accumulate, piece in zip(calls, products.pieces):
                    accumulate()
                    dense[3:] = piece
                    epilogue()
        return call

    def _prepare(self, xs: list, buffers: dict, n: int, h: int, w: int) -> tuple:
        """What a run of this input size needs, made once per buffers dict (so that a run costs little Python,
        which at ResNet-20's batch 1 is a third of the time): the kernel and its arguments, the padded input
        buffer, how inputs are stored into it ((mode, scale, zero, qmax) and [(slot, first channel)] of the inputs
        to store), the output's shape, the float output as the program sees it (or None where it is not kept),
        the residual's size and the shape the kernel takes it in (None: as it is), and the dense path's products."""
        fused = self.fused or [0] * len(self.inputs)
        widths = iter(x.reshape(n, -1).shape[1] if self.linear else x.shape[1] for x in xs)
        fill, c0 = [], 0
        for slot, f in zip(self.inputs, fused):
            if not f:
                fill.append((slot, c0))
            c0 += f or next(widths)
        if c0 != self.groups * self.shape[1]:
            raise JPQError(f"layer {self.name!r} expects {self.groups * self.shape[1]} input channels, got {c0}.")
        if self.linear:
            h = w = 1
        g = self.geometry(h, w)
        buf = self.input_buffer(buffers, n, h, w)
        co, out_h, out_w = self.shape[0], g["out_h"], g["out_w"]
        kernel, args, products = self.kernel_args(buffers, n, out_h, out_w)
        out_dims = (n, co) if self.linear else (n, co, out_h, out_w)
        output = args[_OUT].reshape(out_dims) if args[_KEEP] else None
        residual = None if self.residual is None else (math.prod(out_dims), (n, co, 1, 1) if self.linear else
                                                       (n, co, 1, -1) if self.pixelwise else None)
        return kernel, args, buf, self.store_params(), fill, out_dims, output, residual, products

    def kernel_args(self, buffers: dict, n: int, out_h: int, out_w: int) -> tuple:
        """(kernel, arguments, products) of the convolution for this input size (the residual, slot 6, and
        `fresh`, the last, are set per run): made once per buffers dict, so that a run costs little Python
        (ResNet-20 at batch 1). Layers of fewer than SERIAL_OUTPUTS outputs, or one thread, run without a
        parallel region. `products` is None, or for a `dense` layer what computes its accumulators before the
        kernel, which then runs only its epilogue (`_products`)."""
        key = (id(self), "args", n, out_h, out_w, numba.get_num_threads())
        if key in buffers:
            return buffers[key]
        h, w = buffers[id(self)][1:3]
        co, out_w0 = self.shape[0], out_w
        keep = self.keep or not self.consumers
        out = self.output_buffer(buffers, (n, co, out_h, out_w)) if keep else _NO_FLOAT
        dests = [(consumer.input_buffer(buffers, n // parts, out_h, out_w), np.array(consumer.store_params(), np.float32),
                  np.array([c0, consumer.padding[0], 1, consumer.padding[1]], np.int64))
                 for consumer, (_, c0, parts) in zip(self.consumers, self.targets or [])]
        if self.pixelwise:  # one row of h * w pixels: the same memory, seen as (.., 1, h * w)
            h, w, out_h, out_w = 1, h * w, 1, out_h * out_w
            out = out.reshape(n, co, 1, out_w) if keep else out
            dests = [(d.reshape(d.shape[:3] + (1, -1)), store, place) for d, store, place in dests]
        g = self.geometry(h, w)
        unused = np.zeros((1, 1, 1, 1, 1), dests[0][0].dtype if dests else np.uint8)
        dests += [(unused, np.zeros(4, np.float32), np.zeros(4, np.int64))] * (2 - len(dests))
        ptr, val, corr, mul = self._kernel_weights()
        threads = numba.get_num_threads()
        serial = threads == 1 or n * co * out_h * out_w < SERIAL_OUTPUTS
        # A tile's rows accumulate as one run (see kernels._tile_rows), as many as fit PLANE_RUN accumulators,
        # split further only to give each thread about four tiles: rows of stride 1 at any width, strided ones
        # only where narrow (the run computes the columns between rows too, as many again at stride 2).
        plane = out_h > 1 and PLANES and (self.stride[0] == 1 or out_w < STRIDED_PLANE_BELOW_WIDTH)
        products, dense = None, np.zeros(7, np.int64)
        if self.dense and (out_w0 < DENSE_BELOW_WIDTH or self.product_kind == "int8"):
            plane = False
            per_tile = out_h if serial else int(min(4, max(1, n * out_h // (4 * threads))))
            products, acc, dense, corr, per_tile = self._products(buffers, g, n, out_h, out_w, per_tile)
        elif plane:
            per_tile = max(1, min(out_h, PLANE_RUN // g["rowstride"]))
            if not serial:
                per_tile = max(1, min(per_tile, -(-n * out_h // (4 * threads))))
            run = (per_tile - 1) * g["rowstride"] + out_w
        else:  # each row a run of whole vectors, a tile's rows in each pass (see kernels._tile_rows)
            row = -(-out_w // kernels.VECTOR) * kernels.VECTOR
            per_tile = max(1, min(out_h, PLANE_RUN // row))
            if not serial:
                per_tile = max(1, min(per_tile, -(-n * out_h // (4 * threads))))
            run = per_tile * row
        if products is None:
            val = val if g["quads"] is None else g["quads"]
            tiles = n * -(-out_h // per_tile)
            acc = np.empty((tiles, -(-run // kernels.VECTOR) * kernels.VECTOR),
                           np.float32 if val.dtype == np.float32 else np.int32)
        (dest_a, store_a, place_a), (dest_b, store_b, place_b) = dests
        buffers[key] = (kernels.sparse_conv_serial if serial else kernels.sparse_conv,
                        [buffers[id(self)][3], np.uint64(g["in_sample"]), g["index"], val, corr,
                         np.stack([mul, self.bias]).astype(np.float32), _NO_FLOAT, np.float32(self.res_scale),
                         self.residual is not None, np.float32(self.slope), n, out_h, out_w, np.uint64(g["rowstride"]),
                         per_tile, plane, acc, out, keep, dest_a, dest_b, np.stack([store_a, store_b]),
                         np.concatenate([place_a, place_b, dense]), True], products)
        return buffers[key]

    def _products(self, buffers: dict, g: dict, n: int, out_h: int, out_w: int, per_tile: int) -> tuple:
        """The dense path's accumulators for this input size: per piece (a chunk of samples, or a segment of one
        sample's output rows) weights (C_out x K) @ columns (K x chunk * plane), where the columns are the padded
        input's im2col, laid out as `kernels._tile_rows` reads them with `dense`; the kernel's epilogue then runs
        on that piece's tiles while its accumulators are in cache. With stride 1 down the rows a sample's rows are
        one run of pitch `rowstride` (the columns between rows computed, never stored); else each output row is a
        run of out_w. A piece holds at most DENSE_CHUNK_BYTES of columns: as many samples as fit (a divisor of the
        batch, so that every chunk is alike), or, for a sample larger than that, segments of output rows whose
        columns and accumulators fit, all of one size (the last one ends at the last row, overlapping the one
        before), each a whole number of tiles of `per_tile` rows.
        How: where `direct_groups` packs the taps, int32 accumulators straight from the input (`direct`);
        else with int8 products (`product_kind`) the columns (`kernels.gather_columns`) hold q_a - 128 as int8,
        the accumulators are int32 from `torch._int_mm`, and the kernel's corr becomes (z_a - 128) * sum(k_w), so
        that acc - corr is the same exact integer; else float32 columns and `torch.mm`.
        Returns (DenseProducts, accumulators (1, size), dense for the kernel, corr for the kernel, rows per tile)."""
        weights = self._dense_weights()
        co, k = weights.shape
        int8 = self.product_kind == "int8"
        corr = self._kernel_weights()[2]
        off = self.tap_offsets(g["hp"], g["wq"])
        groups = self.direct_groups(off, weights, np.flatnonzero(self.channel_states() != kernels.UNREAD))
        if int8 and groups is None:
            shifted = np.round(self.act["zero"]) - INT8_SHIFT
            corr = (shifted * weights.astype(np.float64).sum(1)).astype(corr.dtype)
        if int8:
            weights = weights.astype(np.int8)
        pitch = g["rowstride"] if self.stride[0] == 1 else out_w
        sample_plane = (out_h - 1) * pitch + out_w if self.stride[0] == 1 else out_h * out_w
        chunk = max([c for c in range(1, n + 1) if n % c == 0 and c * k * sample_plane * 4 <= DENSE_CHUNK_BYTES] or [1])
        # Output rows whose columns and accumulators fit: the epilogue reads the accumulators back, from L2 only
        # if they stay there (stereo's first conv, 28 int8 columns and 24 int32 accumulators per pixel, whole
        # layer: 3.9-4.0 ms with segments of 1 MB of columns, 3.4-3.5 with 1 MB of both, 3.3-3.7 with 0.25-2 MB).
        fit = DENSE_CHUNK_BYTES // (pitch * (k * (1 if int8 else 4) + co * 4))
        if chunk > 1 or fit >= out_h:
            rows_per_segment = out_h
        elif per_tile >= out_h:  # one thread: a segment is a tile
            rows_per_segment = per_tile = max(1, fit)
        else:
            rows_per_segment = min(out_h, max(1, fit // per_tile) * per_tile)
        segments = -(-out_h // rows_per_segment)
        tiles_per_sample = -(-out_h // per_tile)
        if self.stride[0] == 1:
            # whole vectors: BLAS is 10-30% slower on widths like 78 or 286 than on 80 or 288 (measured);
            # the extra columns read into the next rows, the next sample or the buffer's slack, never stored
            rows, run = 1, -(-((rows_per_segment - 1) * pitch + out_w) // kernels.VECTOR) * kernels.VECTOR
            plane = run
        else:
            rows, run = rows_per_segment, out_w
            plane = rows_per_segment * out_w
        pieces = []  # (first sample, first row, first tile, end tile)
        for n0 in range(0, n, chunk):
            for seg in range(segments):
                last = seg == segments - 1
                row0 = out_h - rows_per_segment if last else seg * rows_per_segment
                t0 = n0 * tiles_per_sample + seg * rows_per_segment // per_tile
                t1 = (n0 + chunk) * tiles_per_sample if last else t0 + rows_per_segment // per_tile
                pieces.append((n0, row0, t0, t1))
        inp, in_sample, rowstride = buffers[id(self)][3], int(g["in_sample"]), int(g["rowstride"])
        if groups is not None:
            # planes for the last block's spare lanes, which the direct kernel computes too
            flat = np.empty((co + direct.CHANNELS) * chunk * plane, np.int32)
            acc = flat[:co * chunk * plane].reshape(co, chunk * plane)
            args = [[inp, in_sample, np.uint64(row0 * rowstride), groups.segments, groups.index, groups.weights,
                     groups.planes, n0, chunk, rows, run, rowstride, flat, np.uint64(chunk * plane)]
                    for n0, row0, _, _ in pieces]
            products = DenseProducts(pieces, direct.accumulate, args)
        else:
            # int8 products of a depth that is not a multiple of 4 (VNNI's dot products take 4 bytes) get zero rows
            depth = -(-k // 4) * 4 if int8 else k
            if depth != k:
                weights = np.pad(weights, ((0, 0), (0, depth - k)))
            cols = np.empty(depth * chunk * plane, np.int8 if int8 else np.float32)
            cols[k * chunk * plane:] = 0  # the padded rows (gather_columns writes the first k)
            acc = np.empty((co, chunk * plane), np.int32 if int8 else np.float32)
            shift = np.int16(INT8_SHIFT) if int8 else np.float32(0)
            args = [[inp, in_sample, np.uint64(row0 * rowstride), off.astype(np.uint64), n0, chunk, rows, run,
                     rowstride, cols, shift] for n0, row0, _, _ in pieces]
            # normal tensors even in a caller's inference mode: an inference tensor cannot be written outside it
            with torch.inference_mode(False):
                product = functools.partial(torch._int_mm if int8 else torch.mm, torch.from_numpy(weights),
                                            torch.from_numpy(cols).view(depth, chunk * plane),
                                            out=torch.from_numpy(acc))
            products = DenseProducts(pieces, kernels.gather_columns, args, product)
        return products, acc.reshape(1, -1), np.array([chunk, plane, pitch, 0, 0, 0, 0], np.int64), corr, per_tile

    def direct_groups(self, off: np.ndarray, weights: np.ndarray, channels: np.ndarray | None = None
                      ) -> direct.Groups | None:
        """The taps of this layer's dense weights (C_out x K, at input offsets `off`) in groups for the direct
        kernel (`direct`) to compute output `channels` (default: all), or None where it does not run it: without
        int8 products, AVX-512 VNNI and VBMI, or DIRECT, or where the groups would leave more than a quarter of
        their dot products unused."""
        if not (DIRECT and self.product_kind == "int8" and quads.native()):
            return None
        groups = direct.group_taps(off, weights.astype(np.int8), channels)
        return groups if groups.fill >= DIRECT_MIN_FILL else None


class DenseProducts(NamedTuple):
    """A dense layer's accumulators, piece by piece (see `Conv._products`): `accumulate` (a numba kernel) with
    each piece's arguments, then `product` (a matrix product of the columns `accumulate` gathered) if any."""

    pieces: list  # (first sample, first output row, first tile, end tile) of each piece
    accumulate: Callable
    args: list  # `accumulate`'s arguments per piece
    product: Callable | None = None

    def calls(self, compiled: bool = False) -> list[Callable]:
        """One function per piece computing its accumulators; with `compiled`, through the kernel's compiled
        entry point (see `entry_point`: for a run that has compiled it already)."""
        def call(args):
            accumulate = functools.partial(entry_point(self.accumulate, args) if compiled else self.accumulate, *args)
            if self.product is None:
                return accumulate
            product = self.product

            def gather_then_multiply():
                accumulate()
                product()
            return gather_then_multiply
        return [call(args) for args in self.args]


FLOAT_EXACT_LIMIT = 2**24  # float32 holds every integer below this exactly
INT8_SHIFT = 128  # int8 products take q_a - 128 (q_a is uint8)
# With int8 products a stride-1 layer keeping this much of its weights is faster dense (see docs/engine.md,
# "Exact int8 products").
INT8_FROM_DENSITY = 0.3
DIRECT = True  # whether dense int8 layers may run `direct` (off: gathered columns and torch._int_mm, for comparisons)
DIRECT_MIN_FILL = 0.75  # taps per group / 4 below which a layer's direct groups waste too much (1x1 convs: 0.5)
# Layers the direct kernel runs (`by_groups`) are faster dense from this much kept (ResNet-20, one thread, after
# 0.45 / 0.7: 90% 0.50 -> 0.47 ms at batch 1, 31.1 -> 27.9 at batch 64; docs/engine.md, session 20). With groups
# from two segments the sparse kernel runs stage 1's 34-37% kept at 90% faster: 0.3 -> 0.4, batch 64 at 90%
# 1.10x -> 1.14x the code before them (batch 1 and 50% within noise; session 26).
DIRECT_FROM_DENSITY = 0.4
DIRECT_FROM_DENSITY_STRIDED = 0.15
QUADS = True  # whether `Conv.quad_weights` may hold (off: one product per weight, for comparisons)
# With quads the sparse kernel is faster (`quads`), and the crossovers move up. ResNet-20, one thread, the whole
# network at 0.3 / 0.2 -> 0.45 / 0.7 (Intel Xeon, VNNI): 90% 0.62 -> 0.49 ms at batch 1, 35.6 -> 30.4 at batch 64;
# 95% 0.45 -> 0.40 and 29.9 -> 24.8 (docs/engine.md, "Kept weights in quads"). Dense layers stay dense (0%:
# 0.73 ms with the dense path, 0.82 without).
QUAD_FROM_DENSITY = 0.45
QUAD_FROM_DENSITY_STRIDED = 0.7
# With int8 products rows of any width go dense (stereo at 0%: 195 -> 78 ms; DENSE_BELOW_WIDTH is for float32
# products), but not a layer of few output channels: a product of one row (stereo's refine.4, one output
# channel) was 6x slower than its sparse kernel.
INT8_MIN_CHANNELS = 8
# The dense path's crossovers, from ResNet-20 per layer, sparse against dense, 1 thread, batch 1 and 64, on this
# AVX2 machine (docs/engine.md, "Dense path below the crossover"). Stride 1: at density 1 the dense path is
# 20-55% faster at batch 64 and about even at batch 1, at density 0.5 the sparse kernel is as fast or faster.
# Stride 2 down the rows (row-at-a-time sparse kernel): dense 1.2-1.4x faster at density 0.2-0.4, slower at ~0.1.
# A product of fewer than DENSE_MIN_DEPTH terms per output (ResNet-20's first conv, 27; its fc, 64) was slower
# dense at batch 1 (the call overheads of a small product).
DENSE_FROM_DENSITY = 0.9
DENSE_FROM_DENSITY_STRIDED = 0.2
DENSE_MIN_DEPTH = 128
# Output rows of this many columns or more stay sparse: the sparse kernel's long rows are efficient, and the
# stereo network (rows of 93-370 columns at 370 x 250) ran 571 -> 926 ms at 0% and 116 -> 142 ms at 90% with
# the dense path on; ResNet-20's maps, where it gains, are 8-32 columns wide.
DENSE_BELOW_WIDTH = 64
DENSE_CHUNK_BYTES = 1 << 20  # im2col columns per matrix product, at most (one sample at a time above it)
SERIAL_OUTPUTS = 1 << 16  # below this many outputs a layer is not split across threads
PLANES = True  # a tile's output rows accumulated as one run (off: a row at a time, for comparisons)
# Accumulators of one such run (32 KB). Classifiers' narrow maps (8-32 pixels) are one run a sample either way;
# on stereo's 186-372 pixel rows (before: runs of 2,048, and only below 128 pixels) whole network 90% 1.077x,
# 99% 1.080x, 0% 1.033x with runs of 8,192; 5,000 gained less, 12,000-16,000 no more (interleaved A/B, Zen 4,
# docs/engine.md session 24).
PLANE_RUN = 8192
# Strided rows this wide or wider go one at a time: stereo's stride-2 conv (186-pixel rows) took 2.35 ms at 90%
# row by row, 2.89 ms in runs of rows (half of each run between rows); ResNet-20's 8-16 pixel ones are faster in runs.
STRIDED_PLANE_BELOW_WIDTH = 128
_RESIDUAL, _OUT, _KEEP, _PLACES = 6, 17, 18, 22  # positions in the kernel's arguments (kernels.sparse_conv)
THREADS = "threads"  # key of the buffers dict: numba's thread count for this run (set by the program)
FRESH = "fresh"  # key of the buffers dict: False when its arrays were filled by a complete earlier run
_NO_FLOAT = np.zeros((1, 1, 1, 1), np.float32)  # stands for an absent float array in kernel calls


def entry_point(kernel, args: list):
    """The compiled function of numba dispatcher `kernel` for exactly `args`' types, called without numba's type
    checks; the dispatcher itself where it has none compiled for them."""
    try:
        return kernel.overloads[tuple(kernel.typeof_pyval(a) for a in args)].entry_point
    except KeyError:
        return kernel


def _run_size(conv: Conv, env: list, buffers: dict, xs: list | None = None) -> tuple[int, int, int]:
    """(batch, height, width) of a conv's input in this run: of its first input that no producer stores into
    its buffer, else of the buffer."""
    if xs is None:
        xs = [env[i] for i, f in zip(conv.inputs, conv.fused or [0] * len(conv.inputs)) if not f]
    if xs:
        x = xs[0]
        return x.shape[0], x.shape[-2] if x.ndim == 4 else 1, x.shape[-1] if x.ndim == 4 else 1
    buf, h, w, _ = buffers[id(conv)]
    return buf.shape[0], h, w


@functools.lru_cache(maxsize=1)
def cpuinfo() -> str:
    """/proc/cpuinfo's text ("" where there is none): the CPU's model and flags, which decide the dense path's
    products here and which the benchmark records (`bench.machine`)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


@functools.lru_cache(maxsize=1)
def int8_products() -> bool:
    """Whether the dense path may use exact int8 products (`torch._int_mm`): on a CPU with VNNI dot products
    (avx512_vnni or avx_vnni), where they ran 4-7x faster than float32 `torch.mm` on ResNet-20's shapes, and
    only if a probe at the extremes (sums of 4,096 products of -128 x -128 and -128 x 127) comes out exact.
    Without VNNI, PyTorch's CPU int8 product is a reference loop, 30-100x slower than float32 (measured on an
    AVX2 machine): the float32 path is used there."""
    flags = cpuinfo().split()
    if "avx512_vnni" not in flags and "avx_vnni" not in flags:
        return False
    a = torch.full((16, 4096), -128, dtype=torch.int8)
    b = torch.full((4096, 16), 127, dtype=torch.int8)
    b[:, ::2] = -128
    return bool((torch._int_mm(a, b).long() == a.long() @ b.long()).all())


@dataclass
class Glue:
    """A float op of the networks' glue. `op` names the function in GLUE; `params` its settings."""

    name: str
    op: str
    inputs: list[int]
    output: int
    params: dict = field(default_factory=dict)
    targets: list | None = None  # [[op index, channel offset, 1]]: a conv whose padded input this op writes
    kind = "glue"
    consumers: list = field(default_factory=list, repr=False)
    derived: dict = field(default_factory=dict, repr=False)  # arguments known from the weights (`constants`)

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "op": self.op, "inputs": self.inputs, "output": self.output,
                "params": self.params, "targets": self.targets}

    def arrays(self) -> dict:
        return {}

    nbytes = 0

    @property
    def per_sample(self) -> bool:
        """Whether each sample of the output depends on that sample of the inputs alone (see `Program.run`)."""
        check = PER_SAMPLE.get(self.op)
        return check is not None and bool(check(**self.params))

    def planned(self, env: list, buffers: dict) -> Planned | None:
        """This op's work as a later run of the same buffers can do it without `run`'s Python (see
        `Program._run_plan`): one compiled call where it writes its consumer's input with one kernel
        (`PLANNED_INTO`), holding while its input is the array bound here; else None."""
        if not self.consumers or self.op not in PLANNED_INTO:
            return None
        kernel, make_args = PLANNED_INTO[self.op]
        x = env[self.inputs[0]]
        args = make_args(x, self.consumers[0], self.targets[0][1], buffers)
        if args[0] is not x:  # a copy made per run: nothing fixed to bind
            return None
        return Planned(functools.partial(entry_point(kernel, args), *args), (self.inputs[0], x), (), (), None)

    def run(self, env: list, buffers: dict) -> None:
        xs = [env[i] for i in self.inputs]
        if self.consumers:
            INTO[self.op](xs, self.consumers[0], self.targets[0][1], buffers, **self.params)
            env[self.output] = None
        else:
            env[self.output] = GLUE[self.op](xs, **self.params, **self.derived)


def _normalize_pad(xs, mean, std, multiple):
    """The inputs (x - mean) / std, concatenated along the batch and replicate-padded right and bottom to a
    multiple of `multiple` (StereoNet's input), as float32 (N, C, H, W)."""
    n, c, h, w = xs[0].shape
    out = np.empty((n * len(xs), 1, c, h + (-h) % multiple, w + (-w) % multiple), np.float32)
    _normalize_into(xs, out, 0, (0, 0), (0, 0.0, 0.0, 0.0), mean, std, multiple)
    return out[:, 0]


def _normalize_pad_into_conv(xs, consumer, c0, buffers, mean, std, multiple):
    """`_normalize_pad` written straight into the consuming conv's padded, quantized input."""
    n, _, h, w = xs[0].shape
    dest = consumer.input_buffer(buffers, n * len(xs), h + (-h) % multiple, w + (-w) % multiple)
    _normalize_into(xs, dest, c0, consumer.padding, consumer.store_params(), mean, std, multiple)


def _normalize_into(xs, dest, c0, pad, store, mean, std, multiple):
    mode, scale, zero, qmax = store
    for i, x in enumerate(xs):
        x = np.ascontiguousarray(x, np.float32)
        n, _, h, w = x.shape
        kernels.normalize_into(x, np.float32(mean), np.float32(std), h + (-h) % multiple, w + (-w) % multiple, dest,
                               i * n, c0, pad[0], pad[1], int(mode), np.float32(scale), np.float32(zero), np.float32(qmax))


def _batch_part(xs, part, parts):
    """Part `part` of `parts` equal slices along the batch (a view)."""
    n = xs[0].shape[0] // parts
    return xs[0][part * n:(part + 1) * n]


def _correlation(xs, shifts, channels=None, constant=0.0):
    """StereoNet's cost volume; `channels` and `constant` skip the feature maps' constant channels
    (`constants.correlation_arguments`)."""
    left, right = (np.ascontiguousarray(x) for x in xs)
    out = np.empty((left.shape[0], shifts, left.shape[2], left.shape[3]), np.float32)
    if channels is None:
        channels = np.arange(left.shape[1], dtype=np.int64)
    kernels.correlation(left, right, shifts, channels, np.float32(constant), out)
    return out


def _soft_argmin(xs, factor):
    x = np.ascontiguousarray(xs[0])
    out = np.empty((x.shape[0], 1, x.shape[2], x.shape[3]), np.float32)
    kernels.soft_argmin(x, np.float32(factor), out)
    return out


def _upsample2x(xs, crop_like=None):
    """Bilinear x2 (align_corners=False); cropped to the spatial size of input 1 when `crop_like`."""
    x = np.ascontiguousarray(xs[0])
    h, w = (xs[1].shape[-2:] if crop_like else (2 * x.shape[2], 2 * x.shape[3]))
    out = np.empty((x.shape[0], x.shape[1], h, w), np.float32)
    kernels.upsample2x(x, out)
    return out


def _divide(xs, divisor):
    return xs[0] / np.float32(divisor)


def _global_avg_pool(xs):
    x = np.ascontiguousarray(xs[0])
    out = np.empty((x.shape[0], x.shape[1], 1, 1), np.float32)
    serial = x.size < SERIAL_OUTPUTS or numba.get_num_threads() == 1
    (kernels.global_avg_pool_serial if serial else kernels.global_avg_pool)(x, out)
    return out


def _pool_into_args(x, consumer, c0, buffers) -> list:
    """`kernels.global_avg_pool_into`'s arguments: x's means into channels c0.. of linear layer `consumer`'s input."""
    x = np.ascontiguousarray(x, np.float32)
    mode, scale, zero, qmax = consumer.store_params()
    return [x, consumer.input_buffer(buffers, x.shape[0], 1, 1), c0, int(mode), scale, zero, qmax]


def _global_avg_pool_into_linear(xs, consumer, c0, buffers):
    """`_global_avg_pool` written straight into the consuming linear layer's (quantized) input."""
    kernels.global_avg_pool_into(*_pool_into_args(xs[0], consumer, c0, buffers))


def _channel(xs, index):
    return xs[0][:, index]


def _relu(xs):
    return np.maximum(xs[0], np.float32(0))


# --- the general glue of traced networks (jpq_core.engine.lowering.GraphLowering) ------------------------
def _add(xs):
    return np.add(xs[0], xs[1], dtype=np.float32)  # numpy broadcasting is PyTorch's


def _mul(xs):
    return np.multiply(xs[0], xs[1], dtype=np.float32)


def _scalar(xs, mul, add):
    """x * mul + add (a tensor with a Python number: x + 3, x * 0.5, x / 6, x - 1, 1 - x)."""
    return xs[0] * np.float32(mul) + np.float32(add)


def _concat(xs, dim):
    return np.concatenate(xs, axis=dim)


def _flatten(xs, start, end):
    shape = xs[0].shape
    end = end % len(shape)
    return xs[0].reshape(shape[:start] + (-1,) + shape[end + 1:])


def _affine(xs, scale, shift):
    """Per-channel x * scale[c] + shift[c] (batch norm in inference mode that no convolution absorbs)."""
    view = (1, -1) + (1,) * (xs[0].ndim - 2)
    return xs[0] * np.asarray(scale, np.float32).reshape(view) + np.asarray(shift, np.float32).reshape(view)


def _mean(xs, dims, keepdim):
    return xs[0].mean(axis=tuple(dims), keepdims=keepdim, dtype=np.float32)


def _constant(xs, fn, value, shape):
    """x * c or x + c (`fn` "mul" or "add") with a constant tensor c (its values, row-major, and its shape), broadcast as PyTorch does:
    a per-channel layer scale of shape (C, 1, 1), for one."""
    c = np.asarray(value, np.float32).reshape(shape)
    return (np.multiply if fn == "mul" else np.add)(xs[0], c, dtype=np.float32)


def _layer_norm(xs, axes, weight, bias, eps):
    """Layer normalisation over `axes` (mean and biased variance, as torch.nn.functional.layer_norm), times
    `weight` plus `bias` (each None or the normalised axes' values, row-major). Computed in float64."""
    x = np.asarray(xs[0], np.float64)
    axes = tuple(sorted(a % x.ndim for a in axes))
    mean = x.mean(axis=axes, keepdims=True)
    centred = x - mean
    y = centred / np.sqrt((centred * centred).mean(axis=axes, keepdims=True) + eps)
    view = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]
    if weight is not None:
        y *= np.asarray(weight, np.float64).reshape(view)
    if bias is not None:
        y += np.asarray(bias, np.float64).reshape(view)
    return y.astype(np.float32)


def _permute(xs, axes):
    """The axes reordered: output axis i is input axis axes[i]; axes past len(axes) stay in place (so that a
    transpose of two leading axes does not need the tensor's rank). Contiguous."""
    x = xs[0]
    return np.ascontiguousarray(np.transpose(x, list(axes) + list(range(len(axes), x.ndim))))


def shape_value(expression, xs) -> int:
    """An integer computed from the inputs' shapes: a number, ["dim", input, axis] or [op, a, b] with op one of
    SHAPE_ARITHMETIC (what a traced `x.view(b, g, c // g, h, w)` computes its sizes with)."""
    if isinstance(expression, int):
        return expression
    op, a, b = expression
    if op == "dim":
        return int(xs[a].shape[b])
    return SHAPE_ARITHMETIC[op](shape_value(a, xs), shape_value(b, xs))


SHAPE_ARITHMETIC = {"floordiv": lambda a, b: a // b, "mul": lambda a, b: a * b, "add": lambda a, b: a + b,
                    "sub": lambda a, b: a - b}


def _reshape(xs, shape):
    """Input 0 reshaped (view / reshape) to `shape`, whose sizes may be computed from the inputs' shapes
    (`shape_value`); the other inputs are read for their shapes only."""
    return xs[0].reshape([shape_value(size, xs) for size in shape])


def _split(xs, dim, index, chunks=None, sizes=None):
    """Piece `index` of torch.chunk(x, chunks, dim), or of torch.split(x, sizes, dim) (sizes: one size for
    pieces of that size, the last one smaller, or the list of sizes). A view."""
    x = xs[0]
    dim = dim % x.ndim
    total = x.shape[dim]
    if chunks is not None:
        sizes = -(-total // chunks)
    if isinstance(sizes, int):
        sizes = [min(sizes, total - start) for start in range(0, total, sizes)]
    start = sum(sizes[:index])
    return x[(slice(None),) * dim + (slice(start, start + sizes[index]),)]


ACTIVATIONS = {"relu": kernels.RELU, "clamp": kernels.CLAMP, "leaky_relu": kernels.LEAKY, "hardswish": kernels.HARDSWISH,
               "hardsigmoid": kernels.HARDSIGMOID, "silu": kernels.SILU, "sigmoid": kernels.SIGMOID,
               "gelu": kernels.GELU, "gelu_tanh": kernels.GELU_TANH, "tanh": kernels.TANH}


def _activation(xs, kind, a=0.0, b=0.0):
    x = np.ascontiguousarray(xs[0], np.float32)
    out = np.empty_like(x)
    kernels.activation(x.reshape(-1), ACTIVATIONS[kind], np.float32(a), np.float32(b), out.reshape(-1))
    return out


def _pool_table(size, kernel, stride, pad, dilation, ceil_mode, count_include_pad, adaptive):
    """(index table, divisors) of one spatial axis for `kernels.pool2d` (PyTorch's output sizes and divisors)."""
    if adaptive is not None:
        out = adaptive or size
        starts = [i * size // out for i in range(out)]
        ends = [-(-(i + 1) * size // out) for i in range(out)]
        table = np.full((out, max(e - b for b, e in zip(starts, ends))), -1, np.int64)
        for i, (b, e) in enumerate(zip(starts, ends)):
            table[i, :e - b] = np.arange(b, e)
        return table, np.array([e - b for b, e in zip(starts, ends)], np.float32)
    out = (size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    if out < 1:
        raise JPQError(f"pooling with kernel {kernel} needs an input of at least {kernel - 2 * pad} pixels, got {size}; "
                       "use a larger input.")
    start = np.arange(out)[:, None] * stride - pad
    table = start + np.arange(kernel)[None, :] * dilation
    table[(table < 0) | (table >= size)] = -1
    hend = np.minimum(start[:, 0] + kernel, size + pad)
    div = hend - start[:, 0] if count_include_pad else np.minimum(hend, size) - np.maximum(start[:, 0], 0)
    return table, div.astype(np.float32)


def _pool(xs, mode, kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), ceil_mode=False,
          count_include_pad=True, adaptive=None):
    """Max or average pooling, plain or adaptive (`adaptive` = output size, None in it keeps that axis)."""
    x = np.ascontiguousarray(xs[0], np.float32)
    if x.ndim != 4:
        raise JPQError(f"2D pooling needs N x C x H x W input, got shape {x.shape}.")
    rows, row_div = _pool_table(x.shape[2], kernel[0], stride[0], padding[0], dilation[0], ceil_mode, count_include_pad,
                                None if adaptive is None else adaptive[0] or 0)
    cols, col_div = _pool_table(x.shape[3], kernel[1], stride[1], padding[1], dilation[1], ceil_mode, count_include_pad,
                                None if adaptive is None else adaptive[1] or 0)
    out = np.empty(x.shape[:2] + (len(rows), len(cols)), np.float32)
    kernels.pool2d(x, rows, cols, row_div, col_div, mode == "max", out)
    return out


def _resize_table(size_in, size_out, scale_factor, mode, align_corners):
    """(i0, i1, weight of i1) per output index, as PyTorch's interpolate computes its sources."""
    dst = np.arange(size_out, dtype=np.float64)
    scale = 1.0 / scale_factor if scale_factor else size_in / size_out
    if mode in ("nearest", "nearest-exact"):
        src = np.floor((dst + (0.5 if mode == "nearest-exact" else 0.0)) * np.float32(scale))
        i0 = np.minimum(src, size_in - 1).astype(np.int64)
        return i0, i0, np.zeros(size_out, np.float32)
    if align_corners:
        src = dst * ((size_in - 1) / (size_out - 1) if size_out > 1 else 0.0)
    else:
        src = np.maximum((dst + 0.5) * np.float32(scale) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src), size_in - 1).astype(np.int64)
    return i0, np.minimum(i0 + 1, size_in - 1), (src - i0).astype(np.float32)


def _resize(xs, mode, size=None, scale_factor=None, align_corners=False, recompute=False):
    """F.interpolate of N x C x H x W input: nearest, nearest-exact or bilinear, to `size` or by `scale_factor`."""
    x = np.ascontiguousarray(xs[0], np.float32)
    if size is None:
        size = [int(np.floor(x.shape[2 + i] * scale_factor[i])) for i in range(2)]
    factors = [None, None] if scale_factor is None or recompute else scale_factor
    (y0, y1, ly), (x0, x1, lx) = (_resize_table(x.shape[2 + i], size[i], factors[i], mode, align_corners) for i in range(2))
    out = np.empty(x.shape[:2] + tuple(size), np.float32)
    kernels.resize(x, y0, y1, ly, x0, x1, lx, out)
    return out


GLUE = {
    "normalize_pad": _normalize_pad, "batch_part": _batch_part,
    "correlation": _correlation, "soft_argmin": _soft_argmin, "upsample2x": _upsample2x, "divide": _divide,
    "global_avg_pool": _global_avg_pool, "channel": _channel, "relu": _relu,
    "add": _add, "mul": _mul, "scalar": _scalar, "concat": _concat, "flatten": _flatten, "affine": _affine,
    "mean": _mean, "activation": _activation, "pool": _pool, "resize": _resize,
    "constant": _constant, "layer_norm": _layer_norm, "permute": _permute, "reshape": _reshape, "split": _split,
}


def _after_batch(*axes) -> bool:
    return all(isinstance(a, int) and a >= 1 for a in axes)


def _always(**_) -> bool:
    return True


# Glue that computes each sample from that sample alone, by op, from its params: elementwise and spatial ops
# always; ops with axes when no axis is the batch (axis 0; negative axes only where they count from a known
# end: layer norm's trailing axes); a reshape whose first size is a batch size. Not here, so not per sample:
# StereoNet's normalize_pad (the two views concatenated along the batch) and batch_part.
PER_SAMPLE = {
    **dict.fromkeys(("correlation", "soft_argmin", "upsample2x", "divide", "global_avg_pool", "channel", "relu",
                     "add", "mul", "scalar", "affine", "activation", "pool", "resize"), _always),
    "concat": lambda dim: _after_batch(dim),
    "split": lambda dim, **_: _after_batch(dim),
    "flatten": lambda start, end: _after_batch(start),
    "mean": lambda dims, keepdim: _after_batch(*dims),
    "permute": lambda axes: list(axes[:1]) == [0],
    "reshape": lambda shape: len(shape) > 0 and isinstance(shape[0], list) and shape[0][0] == "dim" and shape[0][2] == 0,
    "layer_norm": lambda axes, **_: all(isinstance(a, int) and a != 0 for a in axes),
    "constant": lambda shape, **_: len(shape) <= 1 or shape[0] == 1,
}


# Glue ops that can write a conv's input directly, and which convs: StereoNet's input normalisation a conv's
# padded input; the global average pool a linear layer's (a classifier's head), one call instead of the pool,
# its float tensor and the layer's store of it.
INTO = {"normalize_pad": _normalize_pad_into_conv, "global_avg_pool": _global_avg_pool_into_linear}
INTO_ACCEPTS = {"normalize_pad": lambda conv: not conv.linear, "global_avg_pool": lambda conv: conv.linear}
# Those among them that a planned run calls compiled (`Glue.planned`): (kernel, its arguments from the op's input).
PLANNED_INTO = {"global_avg_pool": (kernels.global_avg_pool_into, _pool_into_args)}


def op_from(description: dict, arrays: dict):
    """An op from its JSON description and arrays (program loading)."""
    d = dict(description)
    kind = d.pop("kind")
    if kind == "glue":
        if d["op"] not in GLUE:
            raise JPQError(f"program file names an unknown op {d['op']!r}; it was written by another engine version.")
        return Glue(**d)
    if kind == "conv":
        d["shape"] = tuple(d["shape"])
        return Conv(**d, **arrays)
    raise JPQError(f"program file names an unknown op kind {kind!r}.")
