"""Packed weight storage: values at their bit width and the cheapest of three index encodings.

The encodings are those of the cost model (`jpq_core.costs`, after Han et al., Deep Compression 2016),
so that a program's size is a measured counterpart of the model's `weight_bits`:
    dense    every position's value, N * b bits
    bitmask  one bit per position, then the kept values: N + nnz * b bits
    csrG     per kept value a G-bit gap to the previous one (gap - 1 in 0..2^G - 1) and the value; a gap over
             2^G inserts a zero-valued filler that advances 2^G positions: (nnz + fillers) * (b + G) bits,
             G = 2..8, whichever is cheapest for the layer (Deep Compression used 8 bits for convolutions and
             5 for fully connected layers: the sparser the layer, the wider the cheapest gap field).
Values are b-bit two's complement integers (b = 4 packs two per byte), or float32 bit patterns (b = 32).
Binary weights (b = 1: bit 1 = +1, bit 0 = -1) cannot store a zero, so dense is not an option for a
sparse binary layer and a CSR filler is marked by the gap field alone (2^G - 1 = advance 2^G - 1, no value).
Programs saved before the gap width was chosen per layer call 4-bit CSR "csr".
"""

from __future__ import annotations

import numpy as np

from jpq_core.costs import INDEX_WIDTHS as GAP_WIDTHS  # the cost model's index widths: packing matches it


def gap_bits(encoding: str) -> int:
    """The gap field width of a CSR encoding name ("csr5" -> 5; "csr", from older programs, -> 4)."""
    return int(encoding[3:] or 4)


CHUNK = 1 << 19  # values per slice of the bit-plane path (a multiple of 8: slices start on byte boundaries)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """The low `bits` bits of each value, little-endian, concatenated into bytes.

    8, 16 and 32 bits are the values' own little-endian bytes; other widths go through bit planes, CHUNK
    values at a time (all at once, a 37M-weight float layer took 9.6 GB of planes and two minutes)."""
    u = np.asarray(values).astype(np.int64).view(np.uint64) & np.uint64((1 << bits) - 1)
    if bits in (8, 16, 32):
        return u.astype(f"<u{bits // 8}").view(np.uint8)
    shifts = np.arange(bits, dtype=np.uint64)
    parts = [np.packbits(((u[i:i + CHUNK, None] >> shifts) & np.uint64(1)).astype(np.uint8).reshape(-1), bitorder="little")
             for i in range(0, u.size, CHUNK)]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def unpack_bits(data: np.ndarray, bits: int, count: int, signed: bool) -> np.ndarray:
    """Inverse of pack_bits: `count` integers of `bits` bits (sign-extended when `signed`)."""
    if bits in (8, 16, 32):
        u = np.asarray(data, np.uint8)[:count * bits // 8].view(f"<u{bits // 8}").astype(np.int64)
    else:
        shifts = np.arange(bits, dtype=np.int64)
        parts = []
        for i in range(0, count, CHUNK):
            n = min(CHUNK, count - i)
            planes = np.unpackbits(data[i * bits // 8:], count=n * bits, bitorder="little").reshape(n, bits)
            parts.append((planes.astype(np.int64) << shifts).sum(1))
        u = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if signed:
        u = np.where(u >= 1 << (bits - 1), u - (1 << bits), u)
    return u


def _to_codes(values: np.ndarray, bits: int) -> np.ndarray:
    if bits == 32:
        return values.astype(np.float32).view(np.uint32).astype(np.int64)
    if bits == 1:
        return (values > 0).astype(np.int64)
    return values.astype(np.int64)


def _from_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    if bits == 32:
        return codes.astype(np.uint32).view(np.float32)
    if bits == 1:
        return np.where(codes > 0, 1, -1)
    return codes


def _csr_entries(positions: np.ndarray, binary: bool, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(gap fields, is_real) of the `width`-bit relative-index stream for sorted kept positions."""
    top = 2**width - 1
    step = top if binary else top + 1  # how far a filler advances
    gaps = np.diff(positions, prepend=-1)
    fillers = (gaps - 1) // step
    real_gap = gaps - fillers * step
    count = len(positions) + int(fillers.sum())
    fields = np.full(count, top, np.int64)
    is_real = np.zeros(count, bool)
    real_at = np.cumsum(fillers + 1) - 1
    fields[real_at] = real_gap - 1
    is_real[real_at] = True
    return fields, is_real


def encoding_sizes(flat: np.ndarray, bits: int) -> dict[str, int]:
    """Size in bits of each encoding that can represent `flat` (the cost model's three, less the ones
    that cannot hold its zeros)."""
    n = flat.size
    nonzero = np.flatnonzero(flat)
    sizes = {}
    if bits != 1 or nonzero.size == n:
        sizes["dense"] = n * bits
    if nonzero.size < n:
        sizes["bitmask"] = n + nonzero.size * bits
        for width in GAP_WIDTHS:
            fields, _ = _csr_entries(nonzero, bits == 1, width)
            sizes[f"csr{width}"] = fields.size * (bits + width)
    return sizes


def encode(flat: np.ndarray, bits: int) -> tuple[str, np.ndarray, np.ndarray, int]:
    """(encoding, packed values, packed index, number of stored values) of the weights `flat` (integers,
    or floats when bits = 32)."""
    sizes = encoding_sizes(flat, bits)
    encoding = min(sizes, key=sizes.get)
    nonzero = np.flatnonzero(flat)
    if encoding == "dense":
        return encoding, pack_bits(_to_codes(flat, bits), bits), np.zeros(0, np.uint8), flat.size
    if encoding == "bitmask":
        mask = np.packbits(flat != 0, bitorder="little")
        return encoding, pack_bits(_to_codes(flat[nonzero], bits), bits), mask, nonzero.size
    width = gap_bits(encoding)
    fields, is_real = _csr_entries(nonzero, bits == 1, width)
    values = np.zeros(fields.size, flat.dtype)
    values[is_real] = flat[nonzero]
    return encoding, pack_bits(_to_codes(values, bits), bits), pack_bits(fields, width), fields.size


def decode(encoding: str, values: np.ndarray, index: np.ndarray, bits: int, size: int, entries: int):
    """(kept positions in ascending order, their values) from `encode`'s output; `entries` = number of stored values."""
    signed = bits not in (1, 32)
    vals = _from_codes(unpack_bits(values, bits, entries, signed), bits)
    if encoding == "dense":
        positions = np.flatnonzero(vals)
        return positions, vals[positions]
    if encoding == "bitmask":
        return np.flatnonzero(np.unpackbits(index, count=size, bitorder="little")), vals
    width = gap_bits(encoding)
    top = 2**width - 1
    fields = unpack_bits(index, width, entries, signed=False)
    if bits == 1:
        is_real = fields < top
        positions = np.cumsum(np.where(is_real, fields + 1, top)) - 1
    else:
        positions = np.cumsum(fields + 1) - 1
        is_real = vals != 0
    return positions[is_real], vals[is_real]
