"""Numba kernels of the sparse integer engine.

Direct sparse convolution (no im2col). The input of a convolution is zero-padded, split into `stride`
column phases and flattened per sample, so that a kept weight (c_in, ky, kx) becomes one flat offset

    off = ((phase * C_in + c_in) * H_pad + ky * dilation) * W_phase + (kx * dilation) // stride,
    phase = (kx * dilation) % stride,

and output row oy, column ox of a sample reads input element off + oy * stride * W_phase + ox: a
contiguous run over ox for every kept weight. Weights are stored as CSR over output channels (offsets
sorted). The parallel unit is a tile of a few output rows across all output channels; the accumulator
row stays in L1 and is updated by four kept weights per pass. Indices are unsigned (uint64): with signed
ones numba's negative-index handling blocks vectorisation.

Integer path: the input holds q_a (uint8, padded with the zero point z_a, which represents 0.0), the
weights hold integer k_w, the int32 accumulator is acc = sum k_w * q_a, and the exact integer
sum k_w * (q_a - z_a) = acc - z_a * sum_c(k_w) ("corr"). The epilogue computes
y = (acc - corr[c]) * mul[c] + bias[c] (+ res_scale * residual), then a (leaky) ReLU.
Float path: the same kernel with float32 input and weights and corr = 0.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


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
def _emit(y, w, dest, n, c, oy, c0, pad, mode, scale, zero, qmax):
    """Store the output row y[:w] of sample n, channel c, row oy into dest (N', S, C_total, H_pad, W_phase) at
    channel c0 + c, row oy + pad, column x + pad split into S column phases, each value through `_store`.
    Samples n >= N' are not stored (a consumer that reads only the first part of the batch)."""
    if n >= dest.shape[0]:
        return
    stride = dest.shape[1]
    if stride == 1:
        drow = dest[n, 0, c0 + c, oy + pad]
        shift = np.uint64(pad)
        if mode == 2:  # branches outside the loops, so that each loop vectorises
            for x in range(np.uint64(w)):
                drow[shift + x] = min(max(np.rint(y[x] / scale) + zero, np.float32(0.0)), qmax)
        elif mode == 1:
            for x in range(np.uint64(w)):
                drow[shift + x] = _store(y[x], 1, scale, zero, qmax)
        else:
            for x in range(np.uint64(w)):
                drow[shift + x] = y[x]
        return
    for p in range(stride):  # phase p holds padded columns j * stride + p, i.e. x = j * stride + p - pad
        prow = dest[n, p, c0 + c, oy + pad]
        j_lo = max(0, (pad - p + stride - 1) // stride)
        j_hi = min(prow.shape[0], (w - 1 + pad - p) // stride + 1)
        first = j_lo * stride + p - pad
        if mode == 2 and stride == 2:  # a constant stride lets the loop vectorise
            for j in range(j_hi - j_lo):
                prow[j_lo + j] = min(max(np.rint(y[first + 2 * j] / scale) + zero, np.float32(0.0)), qmax)
        else:
            for j in range(j_hi - j_lo):
                prow[j_lo + j] = _store(y[first + j * stride], mode, scale, zero, qmax)


@njit(parallel=True, cache=True, fastmath=True)
def sparse_conv(inp, in_sample, ptr, off, val, corr, mul, bias, res, res_scale, has_res, slope,
                n_batch, out_h, out_w, rowstride, rows_per_tile, acc_buf, out, keep,
                dest_a, store_a, place_a, dest_b, store_b, place_b):
    """y[n, c, oy, ox] = act((acc - corr[c]) * mul[c] + bias[c] + res_scale * res[n, c, oy, ox]),
    acc = sum_k val[k] * inp[n * in_sample + off[k] + oy * rowstride + ox], act(y) = y if y > 0 else slope * y.

    y goes, in the same pass, to the float output out (N, C, H, W) when `keep`, and to up to two padded,
    phase-split input buffers of consuming convolutions (dest_a, dest_b: (N', S, C_total, H_pad, W_phase)),
    each with its store = (mode, scale, zero, qmax) (see `_store`) and place = (c0, pad, active).
    """
    c_out = ptr.shape[0] - 1
    total_rows = n_batch * out_h
    tiles = (total_rows + rows_per_tile - 1) // rows_per_tile
    w = np.uint64(out_w)
    ma, sa, za, qa = int(store_a[0]), store_a[1], store_a[2], store_a[3]
    mb, sb, zb, qb = int(store_b[0]), store_b[1], store_b[2], store_b[3]
    for t in prange(tiles):
        acc = acc_buf[t]
        y = np.empty(out_w, np.float32)
        r0 = t * rows_per_tile
        r1 = min(r0 + rows_per_tile, total_rows)
        for c in range(c_out):
            m = mul[c]
            b = bias[c]
            cr = corr[c]
            k0 = ptr[c]
            k1 = ptr[c + 1]
            for r in range(r0, r1):
                n = r // out_h
                oy = r - n * out_h
                base = np.uint64(n * in_sample + oy * rowstride)
                for x in range(w):
                    acc[x] = 0
                k = k0
                while k + np.uint64(4) <= k1:
                    v0 = val[k]
                    v1 = val[k + np.uint64(1)]
                    v2 = val[k + np.uint64(2)]
                    v3 = val[k + np.uint64(3)]
                    o0 = base + off[k]
                    o1 = base + off[k + np.uint64(1)]
                    o2 = base + off[k + np.uint64(2)]
                    o3 = base + off[k + np.uint64(3)]
                    for x in range(w):
                        acc[x] += v0 * inp[o0 + x] + v1 * inp[o1 + x] + v2 * inp[o2 + x] + v3 * inp[o3 + x]
                    k += np.uint64(4)
                while k < k1:
                    v0 = val[k]
                    o0 = base + off[k]
                    for x in range(w):
                        acc[x] += v0 * inp[o0 + x]
                    k += np.uint64(1)
                if has_res:
                    rrow = res[n, c, oy]
                    for x in range(w):
                        v = np.float32(acc[x] - cr) * m + b + res_scale * rrow[x]
                        y[x] = v if v > 0 else v * slope
                else:
                    for x in range(w):
                        v = np.float32(acc[x] - cr) * m + b
                        y[x] = v if v > 0 else v * slope
                if keep:
                    orow = out[n, c, oy]
                    for x in range(w):
                        orow[x] = y[x]
                if place_a[2]:
                    _emit(y, out_w, dest_a, n, c, oy, place_a[0], place_a[1], ma, sa, za, qa)
                if place_b[2]:
                    _emit(y, out_w, dest_b, n, c, oy, place_b[0], place_b[1], mb, sb, zb, qb)


@njit(parallel=True, cache=True)
def pad_input(x, out, c0, pad, mode, scale, zero, qmax):
    """Write x (N, C, H, W) float32 into channels c0.. of out (N, S, C_total, H_pad, W_phase): padded by
    `pad`, column phase p of stride S at out[:, p], each value through `_store(mode)`. The padding holds
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
        plane = out[n, ph, c0 + c]
        # valid phase columns j: 0 <= j * stride + ph - pad < w
        j_lo = max(0, (pad - ph + stride - 1) // stride)
        j_hi = min(wq, (w - 1 + pad - ph) // stride + 1) if w - 1 + pad - ph >= 0 else 0
        for r in range(hp):
            y = r - pad
            if y < 0 or y >= h:
                for j in range(wq):
                    plane[r, j] = padval
                continue
            for j in range(j_lo):
                plane[r, j] = padval
            for j in range(j_hi, wq):
                plane[r, j] = padval
            src = x[n, c, y]
            row = plane[r]
            if stride == 1 and mode == 2:  # the common case, written out so that it vectorises
                shift = np.uint64(pad)
                for j in range(np.uint64(w)):
                    row[j + shift] = min(max(np.rint(src[j] / scale) + zero, np.float32(0.0)), qmax)
            elif stride == 1:
                shift = np.uint64(pad)
                for j in range(np.uint64(w)):
                    row[j + shift] = _store(src[j], mode, scale, zero, qmax)
            else:
                first = np.uint64(j_lo * stride + ph - pad)
                step = np.uint64(stride)
                for j in range(np.uint64(j_lo), np.uint64(j_hi)):
                    row[j] = _store(src[first + (j - np.uint64(j_lo)) * step], mode, scale, zero, qmax)


@njit(parallel=True, cache=True)
def normalize_into(x, mean, std, h_out, w_out, dest, n0, c0, pad, mode, scale, zero, qmax):
    """(x - mean) / std, replicate-padded right and bottom to h_out x w_out, stored into samples n0.. of
    dest (N, S, C_total, H_pad, W_phase) as a producer stores its output (`_emit`; dest's padding holds its
    value from creation). Normalisation, padding and the first convolution's input quantization in one
    pass over the image."""
    n_batch, c_in, h, w = x.shape
    for job in prange(n_batch * c_in * h_out):
        n = job // (c_in * h_out)
        c = (job // h_out) % c_in
        r = job % h_out
        src = x[n, c, min(r, h - 1)]
        row = np.empty(w_out, np.float32)
        for j in range(w):
            row[j] = (src[j] - mean) / std
        for j in range(w, w_out):
            row[j] = row[w - 1]
        _emit(row, w_out, dest, n0 + n, c, r, c0, pad, mode, scale, zero, qmax)


@njit(parallel=True, cache=True, fastmath=True)
def correlation(left, right, shifts, out):
    """out[n, d, y, x] = mean_c left[n, c, y, x] * right[n, c, y, x - d]; 0 where x < d (DispNetC)."""
    n_batch, c_in, h, w = left.shape
    inv = np.float32(c_in)
    for job in prange(n_batch * h):
        n = job // h
        y = job % h
        acc = np.zeros(w, np.float32)
        for d in range(shifts):
            acc[:] = 0.0
            shift = np.uint64(d)
            for c in range(c_in):
                lrow = left[n, c, y]
                rrow = right[n, c, y]
                for x in range(np.uint64(w - d)):  # unsigned: lets numba vectorise
                    acc[x + shift] += lrow[x + shift] * rrow[x]
            for x in range(w):
                out[n, d, y, x] = acc[x] / inv if x >= d else np.float32(0.0)


@njit(parallel=True, cache=True)
def soft_argmin(logits, factor, out):
    """out[n, 0, y, x] = factor * sum_d d * softmax_d(logits[n, :, y, x]) (Kendall et al. 2017)."""
    n_batch, shifts, h, w = logits.shape
    for job in prange(n_batch * h):
        n = job // h
        y = job % h
        top = logits[n, 0, y].copy()
        for d in range(1, shifts):
            for x in range(w):
                top[x] = max(top[x], logits[n, d, y, x])
        total = np.zeros(w, np.float32)
        weighted = np.zeros(w, np.float32)
        for d in range(shifts):
            for x in range(w):
                e = np.exp(logits[n, d, y, x] - top[x])
                total[x] += e
                weighted[x] += e * np.float32(d)
        for x in range(w):
            out[n, 0, y, x] = weighted[x] / total[x] * factor


@njit(inline="always")
def _source(dst, size_in):
    """PyTorch's bilinear source index for scale factor 2, align_corners=False: (i0, i1, lambda1)."""
    src = max(np.float32(0.5) * (np.float32(dst) + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    i0 = int(src)
    i1 = i0 + 1 if i0 < size_in - 1 else i0
    return i0, i1, src - np.float32(i0)


@njit(parallel=True, cache=True)
def upsample2x(x, out):
    """Bilinear x2 upsampling (align_corners=False) of x (N, C, H, W) into out (N, C, <=2H, <=2W); a smaller
    out is the top-left crop."""
    n_batch, c_in, h, w = x.shape
    ho, wo = out.shape[2], out.shape[3]
    for job in prange(n_batch * c_in * ho):
        n = job // (c_in * ho)
        c = (job // ho) % c_in
        oy = job % ho
        y0, y1, ly = _source(oy, h)
        for ox in range(wo):
            x0, x1, lx = _source(ox, w)
            top = (np.float32(1.0) - lx) * x[n, c, y0, x0] + lx * x[n, c, y0, x1]
            bottom = (np.float32(1.0) - lx) * x[n, c, y1, x0] + lx * x[n, c, y1, x1]
            out[n, c, oy, ox] = (np.float32(1.0) - ly) * top + ly * bottom


@njit(parallel=True, cache=True, fastmath=True)
def global_avg_pool(x, out):
    """out[n, c, 0, 0] = mean over (y, x) of x[n, c]."""
    n_batch, c_in, h, w = x.shape
    for job in prange(n_batch * c_in):
        n = job // c_in
        c = job % c_in
        s = np.float32(0.0)
        for y in range(h):
            for j in range(w):
                s += x[n, c, y, j]
        out[n, c, 0, 0] = s / np.float32(h * w)
