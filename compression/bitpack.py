"""Dense packing of small unsigned integers (1..8 bits each), vectorised with numpy.

Bit order (little-endian throughout): value ``i`` occupies bits
``[i*bits, (i+1)*bits)`` of the stream, least significant bit first, and bit
``j`` of the stream is bit ``j % 8`` (counting from the least significant) of
byte ``j // 8``. So with ``bits=4`` byte ``k`` holds value ``2k`` in its low
nibble and value ``2k+1`` in its high nibble, and ``bits=1`` is exactly
``np.packbits(values, bitorder="little")``. The unused high bits of the last
byte are zero. ``count`` values take ``ceil(count*bits/8)`` bytes.

Speed: the arrays are processed in cache-sized blocks. ``bits`` in {2, 4} and
{3, 5, 6, 7} use shift-and-or ladders on 32-, 16- and 64-bit lanes (a group
of 4, 2 or 8 values per lane), ``bits=1`` uses ``np.packbits``/``np.unpackbits``
and ``bits=8`` is a copy; every step is a whole-array numpy operation, never a
Python loop over values. The lane tricks assume a little-endian host; on a
big-endian host the portable (slower) bit-matrix path is used instead.
"""

from __future__ import annotations

import sys

import numpy as np

from .codec import CodecError, CodecReason

__all__ = ["pack_bits", "packed_size", "unpack_bits"]

# Values per block: a multiple of 8 (so every block but the last ends on a
# byte boundary for every width), small enough for the temporaries (64 KiB at
# most here) to stay in cache and below glibc's 128 KiB mmap threshold, above
# which every temporary would be fresh, page-faulting memory.
BLOCK = 1 << 16

_LITTLE = sys.byteorder == "little"


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` values of ``bits`` bits take: ceil(count*bits/8)."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    return int(bits)


def _group(bits: int) -> tuple[int, int]:
    """(values, bytes) of the smallest whole-byte group of values."""
    if bits in (1, 2, 4, 8):
        return 8 // bits, 1
    return 8, bits


def _rep(pattern: int, width: int) -> int:
    """``pattern`` repeated in every ``width``-bit lane of a 64-bit word."""
    return sum(pattern << shift for shift in range(0, 64, width))


# The 64-bit ladders for widths 3, 5, 6, 7: per level (low mask, shift, bits
# per half-lane); level L joins the two halves of each (16 << L)-bit lane.
def _ladder(bits: int) -> list[tuple[int, int, int]]:
    levels = []
    for level, lane in enumerate((16, 32, 64)):
        have = bits << level  # bits held by each half-lane before this level
        low = _rep((1 << have) - 1, lane)
        levels.append((low, lane // 2 - have, have))
    return levels


_LADDERS = {bits: _ladder(bits) for bits in (3, 5, 6, 7)}


def _pack_portable(values: np.ndarray, bits: int) -> np.ndarray:
    """Reference implementation: a (count, bits) bit matrix, then np.packbits."""
    matrix = np.unpackbits(values.reshape(-1, 1), axis=1, bitorder="little")[:, :bits]
    return np.packbits(matrix.reshape(-1), bitorder="little")


def _unpack_portable(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    stream = np.unpackbits(data, count=count * bits, bitorder="little").reshape(count, bits)
    return np.packbits(stream, axis=1, bitorder="little").reshape(count)


def _pack_groups(v: np.ndarray, bits: int, out: np.ndarray) -> None:
    """Pack ``v`` (a whole number of groups) into ``out`` (exactly its bytes)."""
    if bits == 8:
        np.copyto(out, v)
    elif bits == 1:
        out[:] = np.packbits(v, bitorder="little")
    elif bits == 4:
        w = v.view("<u2")  # value 2k in bits 0..3, value 2k+1 in bits 8..11
        t = w >> 4
        t |= w
        np.copyto(out, t, casting="unsafe")  # keeps the low byte
    elif bits == 2:
        w = v.view("<u4")  # values at bits 0, 8, 16, 24
        t = w >> 6
        t |= w  # pairs in bits 0..3 and 16..19
        u = t >> 12
        u |= t
        np.copyto(out, u, casting="unsafe")
    else:
        t = v.view("<u8")  # 8 values at bits 0, 8, ..., 56
        for low, shift, have in _LADDERS[bits]:
            hi = t >> shift
            hi &= low << have
            t = t & low
            t |= hi
        src, dst = t.view(np.uint8).reshape(-1, 8), out.reshape(-1, bits)
        for j in range(bits):  # byte by byte: long strided loops, ~6x faster than one [:, :bits] copy
            dst[:, j] = src[:, j]


def _unpack_groups(data: np.ndarray, bits: int, out: np.ndarray) -> None:
    """Inverse of :func:`_pack_groups`: ``out`` is a whole number of groups."""
    if bits == 8:
        np.copyto(out, data)
    elif bits == 1:
        out[:] = np.unpackbits(data, bitorder="little")
    elif bits == 4:
        w = data.astype("<u2")
        t = w << 4
        t |= w
        t &= 0x0F0F
        np.copyto(out, t.view(np.uint8))
    elif bits == 2:
        w = data.astype("<u4")
        t = w << 12
        t |= w
        t &= 0x000F000F
        u = t << 6
        u |= t
        u &= 0x03030303
        np.copyto(out, u.view(np.uint8))
    else:
        groups = out.size // 8
        lanes = np.zeros((groups, 8), np.uint8)
        src = data.reshape(groups, bits)
        for j in range(bits):
            lanes[:, j] = src[:, j]
        t = lanes.view("<u8").reshape(groups)
        for low, shift, have in reversed(_LADDERS[bits]):
            hi = t << shift
            hi &= low << (shift + have)
            t = t & low
            t |= hi
        np.copyto(out, t.view(np.uint8))


def _pack_into(values: np.ndarray, bits: int, out: np.ndarray) -> None:
    """Pack a 1-D uint8 array (each value < 2**bits) into ``out``.

    ``out`` is a uint8 array of exactly ``packed_size(values.size, bits)`` bytes.
    Codecs call this on one block at a time; it does no range check.
    """
    if not _LITTLE:
        out[:] = _pack_portable(values, bits)
        return
    per, nbytes = _group(bits)
    full = values.size - values.size % per
    head = full // per * nbytes
    if full:
        _pack_groups(values[:full], bits, out[:head])
    if full < values.size:
        tail = np.zeros(per, np.uint8)
        tail[: values.size - full] = values[full:]
        packed = np.empty(nbytes, np.uint8)
        _pack_groups(tail, bits, packed)
        out[head:] = packed[: out.size - head]


def _unpack_into(data: np.ndarray, bits: int, out: np.ndarray) -> None:
    """Unpack ``out.size`` values from ``data`` (at least their bytes; extra ignored)."""
    count = out.size
    if not _LITTLE:
        out[:] = _unpack_portable(data[: packed_size(count, bits)], bits, count)
        return
    per, nbytes = _group(bits)
    full = count - count % per
    head = full // per * nbytes
    if full:
        _unpack_groups(data[:head], bits, out[:full])
    if full < count:
        tail = np.zeros(nbytes, np.uint8)
        rest = data[head : packed_size(count, bits)]
        tail[: rest.size] = rest
        values = np.empty(per, np.uint8)
        _unpack_groups(tail, bits, values)
        out[full:] = values[: count - full]


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integers ``< 2**bits`` densely, ``bits`` (1..8) each.

    ``values`` is any integer array (flattened in C order); a uint8 array is
    used without conversion. Raises ValueError if ``bits`` is not in 1..8 or a
    value does not fit in ``bits`` bits. Returns ``ceil(count*bits/8)`` bytes,
    in the little-endian bit order described in the module docstring.
    """
    bits = _check_bits(bits)
    v = np.asarray(values)
    if v.dtype.kind not in "biu":
        raise ValueError(f"pack_bits takes integer values, got dtype {v.dtype}")
    v = v.reshape(-1)
    if v.size:
        low, high = (0, int(v.max())) if v.dtype == np.uint8 else (int(v.min()), int(v.max()))
        if low < 0 or high >= 1 << bits:
            raise ValueError(
                f"values must be in 0..{(1 << bits) - 1} for {bits}-bit packing, got {low}..{high}"
            )
    v = np.ascontiguousarray(v, dtype=np.uint8)
    out = np.empty(packed_size(v.size, bits), np.uint8)
    step = BLOCK * bits // 8
    for start in range(0, v.size, BLOCK):
        chunk = v[start : start + BLOCK]
        first = start // BLOCK * step
        _pack_into(chunk, bits, out[first : first + packed_size(chunk.size, bits)])
    return out.tobytes()


def unpack_bits(data: bytes | bytearray | memoryview, bits: int, count: int) -> np.ndarray:
    """Unpack ``count`` values of ``bits`` bits from the start of ``data``.

    Returns a new uint8 array of ``count`` values. Raises CodecError if
    ``data`` holds fewer than ``ceil(count*bits/8)`` bytes; bytes after those
    are ignored (callers that own the framing check the exact length).
    """
    bits = _check_bits(bits)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    count = int(count)
    buf = np.frombuffer(data, dtype=np.uint8)
    need = packed_size(count, bits)
    if buf.size < need:
        raise CodecError(
            f"packed data of {buf.size} bytes is too short for {count} values of {bits} bits "
            f"({need} bytes needed)", reason=CodecReason.TRUNCATED
        )
    out = np.empty(count, np.uint8)
    step = BLOCK * bits // 8
    for start in range(0, count, BLOCK):
        chunk = out[start : start + BLOCK]
        first = start // BLOCK * step
        _unpack_into(buf[first : first + packed_size(chunk.size, bits)], bits, chunk)
    return out
