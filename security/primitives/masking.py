"""Secure-aggregation primitives: one-time-pad pairwise masks on the ring Z_{2^B} and their wire packing.

Pure functions on numpy arrays and bytes: nothing here talks to Flower or to a
key store. Key material comes in as ``bytes`` (from
:meth:`qfl.security.keys.source.KeySource.enc_keys` / ``dec_keys`` in the caller).

The ring
--------
Every client's update arrives here as ring elements of Z_{2^B}
(``1 <= B <= 64``), held as ``numpy.uint64`` arrays: the integer codes of the
round's codec (``qfl.compression.summable`` picks ``B`` so that the sum over
all clients cannot wrap). uint64 arithmetic wraps mod 2^64, and 2^B divides
2^64, so sums and differences may run in uint64 and be reduced mod 2^B by a
final ``& (2^B - 1)``.

Pairwise one-time-pad masks
---------------------------
Pairwise cancelling masks as in Bonawitz et al. (CCS 2017), except that every
mask is read straight from QKD key bytes (a one-time pad) instead of being
expanded from an agreed seed by a PRG. Clients ``i`` and ``j`` share a key on
their link and derive the same mask ``m_ij = m_ji`` from it
(:func:`mask_from_key`). Client ``i`` uploads::

    y_i = q_i + sum_{j > i} m_ij - sum_{j < i} m_ij    (mod 2^B)

Each mask is added once and subtracted once, so ``sum_i y_i = sum_i q_i``. A
single upload ``y_i`` is uniform on (Z_{2^B})^d whatever ``q_i`` is, as long as
one of its masks is uniform and unknown to the observer: information-theoretic
hiding, provided the QKD key is (treated as) uniform and secret.

Key cost: each mask is ``d`` ring elements of ``B`` bits, so each client spends
``(n - 1) · d · B`` bits of key per round (``key_bytes_needed(d, B)`` bytes per
peer) and a round spends ``n(n-1)/2 · d · B`` bits over all links. Key bytes
are consumed, never reused: reusing a mask across rounds leaks the difference
of the two masked updates.

Dropouts: if client ``k`` uploads nothing, the survivors' masks shared with
``k`` no longer cancel. The server then subtracts them from its running sum
(:func:`add_packed` with ``subtract``), from reveals whose protocol (double
masking, so that a lying server learns nothing) lives in
``qfl.security.secagg``.

Wire layout
-----------
:func:`pack_ring` puts ``d`` ring elements on the wire in exactly
``ceil(d·B/8)`` bytes, and :func:`unpack_ring` inverts it. :func:`mask_from_key`
reads a mask from as many key bytes, in the same layout: the mask is the
unpacking of its key bytes, padding bits ignored, a bijection between those
``d·B`` key bits and (Z_{2^B})^d (so uniform key bytes give a uniform mask).

The ``B`` bits of an element are cut into fields whose widths are the binary
digits of ``B``, largest first, from the least significant bit up:
``B = 37 = 32 + 4 + 1`` gives the fields ``[0, 32)``, ``[32, 36)``, ``[36, 37)``;
``B = 12`` gives ``[0, 8)``, ``[8, 12)``; ``B = 64`` is one field. The stream
is one part per field, in that order, then a tail:

- a field of ``w`` = 8, 16, 32 or 64 bits: ``d`` little-endian ``w``-bit
  words, element ``i`` in word ``i`` (``d·w/8`` bytes);
- a field of ``w`` = 4, 2 or 1 bits covers the first ``m = d − d mod 8``
  elements only (``m·w/8`` bytes). They are cut into groups of 131072
  consecutive elements (the last group may be shorter; its size ``g`` is a
  multiple of 8), whose parts follow one another. In a group of ``g``
  elements, byte ``j`` of the 4-bit part holds element ``j`` in its low and
  element ``j + g/2`` in its high nibble; byte ``j`` of the 2-bit part holds
  element ``j + t·g/4`` in bits ``2t, 2t+1`` (t = 0..3); byte ``j`` of the
  1-bit part holds elements ``8j .. 8j+7``, lowest bit first;
- the tail: for the last ``d mod 8`` elements, their bits covered by the 4-,
  2- and 1-bit fields (the top ``r = B mod 8`` bits), ``r`` bits per element,
  as one little-endian bit string (tail element ``k`` in bits
  ``[k·r, (k+1)·r)``, bit ``t`` in bit ``t mod 8`` of byte ``t // 8``).

Only the last byte can hold padding bits (its top ``8·ceil(d·B/8) − d·B``);
they are zero, and :func:`unpack_ring` rejects them otherwise, so every
sequence of elements has exactly one encoding. For ``B`` in 8, 16, 32, 64 the
stream is simply the elements as little-endian words.

The layout is built for numpy: every part is a whole-array operation on native
words (a 4-bit part is ``low | high << 4`` of the two halves of a group), so
:func:`masked_pack` (a client's mask + add + pack, never materialising the
masks) and :func:`add_packed` (a server's unpack + add into its running sum)
stream ``q``, the key bytes, the upload and the sum once each, one group at a
time, through small temporaries reused from group to group (single-threaded).

Other helpers: :func:`xor_pad` one-time-pads a byte string, and
:func:`expand_key` stretches a short key with ChaCha20 (computationally
secure only; see its docstring).
"""

from __future__ import annotations

import mmap
import numbers
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "add_packed",
    "expand_key",
    "key_bytes_needed",
    "mask_from_key",
    "masked_pack",
    "pack_ring",
    "unpack_ring",
    "xor_pad",
]

MAX_RING_BITS = 64

# --------------------------------------------------------------------------- validation


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        span = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {span}, got {value}")
    return value


def _check_B(B: object) -> int:
    return _check_int("ring size B (bits)", B, 1, MAX_RING_BITS)


def _ring_mask(B: int) -> np.uint64:
    return np.uint64((1 << B) - 1)


def _as_ring_array(name: str, a: Any) -> np.ndarray:
    """``a`` as a uint64 array; refuses other dtypes (uint64 + int64 would go to float64)."""
    arr = np.asarray(a)
    if arr.dtype != np.uint64:
        raise TypeError(f"{name} must be a numpy uint64 array, got dtype {arr.dtype}")
    return arr


# --------------------------------------------------------------------------- masks


def key_bytes_needed(d: int, B: int) -> int:
    """Key bytes one pairwise mask of ``d`` ring elements takes: ``ceil(d · B / 8)``."""
    d = _check_int("d", d, 0)
    B = _check_B(B)
    return (d * B + 7) // 8


def mask_from_key(key: bytes | bytearray | memoryview, d: int, B: int) -> np.ndarray:
    """The pairwise mask read from ``key``: ``d`` ring elements of ``B`` bits.

    Consumes exactly the first ``key_bytes_needed(d, B)`` bytes of ``key``,
    read in the wire layout of :func:`pack_ring` (module docstring): the mask
    is ``unpack_ring`` of those bytes, except that the padding bits of the
    last byte, if any, are discarded instead of checked. That is a bijection
    between the ``d·B`` key bits used and (Z_{2^B})^d, so uniform key bytes
    give a mask uniform on (Z_{2^B})^d. Bytes after those are ignored; the
    caller must not use the consumed bytes for anything else (one-time pad).
    Raises ValueError if ``key`` is shorter. Both ends of a link derive the
    same mask from the same key; :func:`masked_pack` adds exactly this mask
    without materialising it.
    """
    d = _check_int("d", d, 0)
    B = _check_B(B)
    need = key_bytes_needed(d, B)
    buf = np.frombuffer(key, dtype=np.uint8)
    if buf.size < need:
        raise ValueError(
            f"a mask of {d} elements of {B} bits needs {need} key bytes, got {buf.size}"
        )
    return _unpack_add(buf[:need], B, d, None)


# --------------------------------------------------------------------------- wire packing
#
# The layout (module docstring, "Wire layout") cuts every B-bit element into
# fields whose widths are the binary digits of B: a low field of 8, 16, 32 or
# 64 bits and byte-wide high fields, stored as arrays of native little-endian
# words, then the sub-byte fields (4, 2, 1 bits), interleaved within groups of
# _GROUP elements so that packing them takes a few whole-array operations. The
# loops run one group at a time: the temporaries stay in cache and the big
# arrays (q, the keys, the output, the running sum) are streamed once.

_GROUP = 1 << 17  # part of the format (sub-byte fields interleave per group); also the block size

_UINT: dict[int, np.dtype] = {8: np.dtype(np.uint8), 16: np.dtype(np.uint16), 32: np.dtype(np.uint32), 64: np.dtype(np.uint64)}
_WIRE = {w: dt.newbyteorder("<") for w, dt in _UINT.items()}  # the stream's words: little-endian on any host

# Some steps view a uint64 as bytes (its bits 32.. at byte 4, the lanes of a word in memory order);
# on a big-endian host they take a portable, slower route instead.
_LITTLE = sys.byteorder == "little"

# unpacking a 1-bit field, eight bits per uint64 at a time: spread the byte over the eight lanes,
# keep bit t in lane t, turn a nonzero lane into 0x80, move that bit to where it belongs
_SPREAD, _SELECT = 0x0101010101010101, 0x8040201008040201
_ROUND, _TOP = 0x7F7F7F7F7F7F7F7F, 0x8080808080808080


class _Layout:
    """The fields of a B-bit element; see the module docstring."""

    __slots__ = ("B", "lo", "hi", "hi_dtype", "wide", "wide_bits", "r", "small", "work")

    def __init__(self, B: int) -> None:
        self.B = B
        self.lo = next(w for w in (64, 32, 16, 8, 0) if w <= B)  # the top binary digit of B (0 if B < 8)
        self.hi = hi = B - self.lo  # the bits above the low field: 0..31
        self.hi_dtype = None if hi == 0 else _UINT[8 if hi <= 8 else 16 if hi <= 16 else 32]
        self.wide = [w for w in (16, 8) if hi & w]  # byte-wide high fields, from bit lo up
        self.wide_bits = sum(self.wide)
        self.r = hi & 7  # == B % 8: the sub-byte bits, above the wide fields
        shift, self.small = 0, []  # (shift within the r sub-byte bits, width)
        for w in (4, 2, 1):
            if self.r & w:
                self.small.append((shift, w))
                shift += w
        # the arithmetic width of the loops for B < 32: the smallest native word holding B bits
        self.work = _UINT[64 if B > 32 else 32 if B > 16 else 16 if B > 8 else 8]


_LAYOUTS: list[_Layout | None] = [None] + [_Layout(B) for B in range(1, MAX_RING_BITS + 1)]


class _Stream:
    """Views of the fields of a packed stream of ``d`` elements held in ``buf`` (uint8)."""

    __slots__ = ("lay", "d", "body", "lo", "wide", "planes", "tail")

    def __init__(self, lay: _Layout, d: int, buf: np.ndarray) -> None:
        self.lay, self.d = lay, d
        self.body = d - d % 8  # the sub-byte fields cover elements [0, body); the rest is the tail
        pos = d * lay.lo // 8
        # None when the layout has no low field (B < 8); every read of it is under lay.lo != 0,
        # which the checker cannot follow, so the attribute is typed as the array it is when read
        self.lo: np.ndarray = buf[:pos].view(_WIRE[lay.lo]) if lay.lo else None  # type: ignore[assignment]
        self.wide = []
        for w in lay.wide:
            self.wide.append(buf[pos : pos + d * w // 8].view(_WIRE[w]))
            pos += d * w // 8
        self.planes = []  # per sub-byte field: the parts of all groups, one after the other
        for _, w in lay.small:
            self.planes.append(buf[pos : pos + self.body * w // 8])
            pos += self.body * w // 8
        self.tail = buf[pos:]


class _Scratch:
    """Temporaries of one group (allocated once per call, reused for every group)."""

    __slots__ = ("a", "b", "x")

    def __init__(self, C: int) -> None:
        self.a, self.b = np.empty(C, np.uint8), np.empty(C, np.uint8)
        self.x = np.empty(C // 8, np.uint64)


def _get_small(st: _Stream, s: int, nb: int, v: np.ndarray, ws: _Scratch, into: bool) -> np.ndarray:
    """The sub-byte bits (``r`` of them) of the ``nb`` elements of the group at ``s``, as uint8.

    Fills ``v`` (``nb`` elements) and returns it, or (``into=False``, only one
    1-bit field) returns a view of ``ws``.
    """
    for k, (sh, w) in enumerate(st.lay.small):
        p = st.planes[k][s * w // 8 : (s + nb) * w // 8]
        dst = v if k == 0 else ws.a[:nb]
        if w == 4:  # always the first field: byte j holds elements j, j + nb/2
            half = nb // 2
            np.bitwise_and(p, 15, out=dst[:half])
            np.right_shift(p, 4, out=dst[half:])
        elif w == 2:  # byte j holds elements j + t·nb/4 in bits 2t, 2t+1
            quarter = nb // 4
            for t in range(4):
                part = dst[t * quarter : (t + 1) * quarter]
                if 2 * t > sh:
                    np.right_shift(p, 2 * t - sh, out=part)
                elif 2 * t < sh:
                    np.multiply(p, 1 << (sh - 2 * t), out=part)  # a left shift (uint8 wraps)
                if t < 3 or sh:  # else the shift itself isolated the two bits
                    np.bitwise_and(p if 2 * t == sh else part, 3 << sh, out=part)
        elif _LITTLE:  # byte j holds elements 8j .. 8j+7, lowest bit first
            x = ws.x[: nb // 8]
            np.copyto(x, p)
            np.multiply(x, _SPREAD, out=x)
            np.bitwise_and(x, _SELECT, out=x)
            np.add(x, _ROUND, out=x)
            np.bitwise_and(x, _TOP, out=x)
            np.right_shift(x, 7 - sh, out=x)
            dst = x.view(np.uint8)
        else:
            dst = np.unpackbits(p, bitorder="little")
            if sh:
                np.multiply(dst, 1 << sh, out=dst)
        if k:
            np.bitwise_or(v, dst, out=v)
        elif dst is not v:  # a lone 1-bit field
            if not into:
                return dst
            np.copyto(v, dst)
    return v


def _put_small(st: _Stream, s: int, nb: int, v: np.ndarray, ws: _Scratch) -> None:
    """Inverse of :func:`_get_small`: ``v`` (uint8; bits from ``r`` up are ignored)."""
    for k, (sh, w) in enumerate(st.lay.small):
        out = st.planes[k][s * w // 8 : (s + nb) * w // 8]
        if w == 4:
            half = nb // 2
            lo, hi = ws.a[:half], ws.b[:half]
            np.bitwise_and(v[:half], 15, out=lo)
            np.multiply(v[half:], 16, out=hi)  # a left shift: the bits above the field fall off
            np.bitwise_or(lo, hi, out=out)
        elif w == 2:
            quarter = nb // 4
            for t in range(4):
                part = v[t * quarter : (t + 1) * quarter]
                dst = out if t == 0 else ws.a[:quarter]
                if 2 * t > sh:
                    np.multiply(part, 1 << (2 * t - sh), out=dst)
                elif 2 * t < sh:
                    np.right_shift(part, sh - 2 * t, out=dst)
                if t < 3 or sh:
                    np.bitwise_and(part if 2 * t == sh else dst, 3 << (2 * t), out=dst)
                if t:
                    np.bitwise_or(out, dst, out=out)
        else:
            bits = np.bitwise_and(v, 1 << sh, out=ws.a[:nb])
            out[:] = np.packbits(bits, bitorder="little")  # any nonzero value packs as a 1


def _get_tail(st: _Stream, count: int, out: np.ndarray) -> None:
    r = st.lay.r
    acc = int.from_bytes(st.tail.tobytes(), "little")
    out[:] = [(acc >> (r * i)) & ((1 << r) - 1) for i in range(count)]


def _put_tail(st: _Stream, v: np.ndarray) -> None:
    r, acc = st.lay.r, 0
    for i, x in enumerate(v.tolist()):
        acc |= (x & ((1 << r) - 1)) << (r * i)
    st.tail[:] = np.frombuffer(acc.to_bytes(st.tail.size, "little"), np.uint8)


def _read_high(st: _Stream, s: int, e: int, out: np.ndarray, ws: _Scratch) -> np.ndarray:
    """The high bits (above the low field) of the group ``[s, e)``, in the high dtype.

    Returns ``out[:e - s]``, or a view of the stream or of ``ws``: use it
    before the next call.
    """
    lay, n = st.lay, e - s
    hd = lay.hi_dtype
    if lay.wide:
        if not lay.small and len(lay.wide) == 1 and st.wide[0].dtype == hd:
            return st.wide[0][s:e]
        h = out[:n]
        np.copyto(h, st.wide[0][s:e])
        if len(lay.wide) == 2:  # 16 + 8 bits in a uint32
            t = st.wide[1][s:e].astype(np.uint32)
            t <<= 16
            h |= t
        if not lay.small:
            return h
        sv = np.empty(n, np.uint8)
    else:
        sv = out[:n]
    nb = max(0, min(e, st.body) - s)
    if nb == n and not lay.wide:
        return _get_small(st, s, nb, sv, ws, into=False)
    if nb:
        _get_small(st, s, nb, sv[:nb], ws, into=True)
    if nb < n:
        _get_tail(st, n - nb, sv[nb:])
    if not lay.wide:
        return sv
    t = np.multiply(sv, 1 << lay.wide_bits, dtype=hd)
    h |= t
    return h


def _write_high(st: _Stream, s: int, e: int, h: np.ndarray, ws: _Scratch) -> None:
    """Inverse of :func:`_read_high`: ``h`` (contiguous) for the group ``[s, e)``; bits from ``hi`` up are ignored."""
    lay, n = st.lay, e - s
    if lay.wide:
        np.copyto(st.wide[0][s:e], h, casting="unsafe")  # truncates to the field
        if len(lay.wide) == 2:
            np.copyto(st.wide[1][s:e], h >> 16, casting="unsafe")
        if not lay.small:
            return
        sv = np.empty(n, np.uint8)
        np.copyto(sv, h >> lay.wide_bits, casting="unsafe")
    else:
        sv = h
    nb = max(0, min(e, st.body) - s)
    if nb:
        _put_small(st, s, nb, sv[:nb], ws)
    if nb < n:
        _put_tail(st, sv[nb:])


_MMAP_MIN = 1 << 22  # below this, malloc's heap serves both the buffer and the bytes cheaply


def _scratch_bytes(n: int) -> np.ndarray:
    """A writable uint8 buffer of ``n`` bytes for an output that ends up copied into a ``bytes``.

    Large ones are mapped straight from the kernel (2 MiB pages where
    available), outside the C heap: that keeps the heap's free block for the
    ``bytes`` object the caller gets, instead of making it fault in fresh
    4 KiB pages every call (which can cost more than the packing itself).
    """
    if n < _MMAP_MIN or not hasattr(mmap, "MAP_PRIVATE"):
        return np.empty(n, np.uint8)
    area = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            area.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # pragma: no cover - kernels without transparent huge pages
            pass
    return np.frombuffer(area, np.uint8)


def _range_error(B: int) -> ValueError:
    return ValueError(f"q holds values >= 2^{B}; ring elements must be < 2^{B}")


def _mask_pack(q: np.ndarray, keys: list[tuple[bool, np.ndarray]], B: int, *, check: bool) -> bytes:
    """``pack(q ± masks)``: ``keys`` are (added?, key bytes) pairs; ``q`` flat, contiguous uint64.

    With ``check``, raise ValueError if a value of ``q`` is ``>= 2^B``;
    otherwise ``q`` is taken mod 2^B.
    """
    d = q.size
    lay = _LAYOUTS[B]
    assert lay is not None  # _LAYOUTS[0] is a placeholder: B >= 1
    if d == 0:
        return b""
    out = _scratch_bytes(key_bytes_needed(d, B))
    st = _Stream(lay, d, out)
    ks = [(plus, _Stream(lay, d, kb)) for plus, kb in keys]
    C = min(_GROUP, (d + 7) & ~7)
    if lay.hi == 0:  # B in (8, 16, 32, 64): one native field, added in its own width
        for s in range(0, d, C):
            e = min(d, s + C)
            qc = q[s:e]
            if check and B < 64 and int(qc.max()) >> B:
                raise _range_error(B)
            y = st.lo[s:e]
            np.copyto(y, qc, casting="unsafe")
            for plus, k in ks:
                (np.add if plus else np.subtract)(y, k.lo[s:e], y)
        return out.tobytes()
    ws = _Scratch(C)
    hd = lay.hi_dtype
    assert hd is not None  # lay.hi != 0
    hbuf, kbuf = np.empty(C, hd), np.empty(C, hd)
    if B < 8:  # sub-byte fields only, added in uint8
        for s in range(0, d, C):
            e = min(d, s + C)
            qc = q[s:e]
            if check and int(qc.max()) >> B:
                raise _range_error(B)
            h = hbuf[: e - s]
            np.copyto(h, qc, casting="unsafe")
            for plus, k in ks:
                (np.add if plus else np.subtract)(h, _read_high(k, s, e, kbuf, ws), h)
            _write_high(st, s, e, h, ws)
        return out.tobytes()
    # the low field (8, 16 or 32 bits) and the high bits, each added in its own width, with the
    # carries between them; q's high bits come from a cast to the work width (B < 32) or a strided view
    W = lay.work
    wbuf = np.empty(C, W) if B < 32 else None
    q_high = q.view(hd)[4 // hd.itemsize :: 8 // hd.itemsize] if B > 32 and _LITTLE else None
    carry = np.empty(C, np.bool_)
    cbuf = np.empty(C, hd) if hd.itemsize > 1 else None
    for s in range(0, d, C):
        e = min(d, s + C)
        n = e - s
        qc = q[s:e]
        if check and int(qc.max()) >> B:
            raise _range_error(B)
        lo, h = st.lo[s:e], hbuf[:n]
        if B < 32:
            assert wbuf is not None  # allocated for B < 32
            yw = wbuf[:n]
            np.copyto(yw, qc, casting="unsafe")
            np.copyto(lo, yw, casting="unsafe")
            np.right_shift(yw, lay.lo, out=h, casting="unsafe")
        else:
            np.copyto(lo, qc, casting="unsafe")
            if q_high is not None:  # bytes 4.. of each word
                np.copyto(h, q_high[s:e])
            else:
                np.right_shift(qc, 32, out=h, casting="unsafe")
        c = carry[:n]
        cu = c.view(np.uint8) if cbuf is None else cbuf[:n]
        for plus, k in ks:
            klo = k.lo[s:e]
            kh = _read_high(k, s, e, kbuf, ws)
            if plus:
                np.add(lo, klo, lo)
                np.less(lo, klo, c)  # it wrapped: carry one into the high bits
                np.add(h, kh, h)
            else:
                np.less(lo, klo, c)  # it will wrap: borrow one from the high bits
                np.subtract(lo, klo, lo)
                np.subtract(h, kh, h)
            if cbuf is not None:
                np.copyto(cu, c)
            (np.add if plus else np.subtract)(h, cu, h)
        _write_high(st, s, e, h, ws)  # keeps the low hi bits of h: the reduction mod 2^B
    return out.tobytes()


def _unpack_add(buf: np.ndarray, B: int, d: int, total: np.ndarray | None, subtract: bool = False) -> np.ndarray:
    """Unpack ``d`` elements from ``buf`` (exactly their bytes; padding bits ignored).

    ``total is None``: return them as a new uint64 array. Otherwise add (or
    subtract) them into the flat uint64 array ``total`` in place, mod 2^B.
    """
    out = np.empty(d, np.uint64) if total is None else total
    if d == 0:
        return out
    lay = _LAYOUTS[B]
    assert lay is not None  # _LAYOUTS[0] is a placeholder: B >= 1
    st = _Stream(lay, d, buf)
    op = np.subtract if subtract else np.add
    C = min(_GROUP, (d + 7) & ~7)
    W = lay.work
    if lay.hi == 0:  # one native field
        t = np.empty(C, W) if total is not None and B < 64 else None
        for s in range(0, d, C):
            e = min(d, s + C)
            if total is None:
                np.copyto(out[s:e], st.lo[s:e])
            elif B == 64:
                op(out[s:e], st.lo[s:e], out[s:e])
            else:  # in the native width, where the wrap is the reduction mod 2^B
                assert t is not None  # allocated for a running total and B < 64
                tc = t[: e - s]
                np.copyto(tc, out[s:e], casting="unsafe")
                op(tc, st.lo[s:e], tc)
                np.copyto(out[s:e], tc)
        return out
    ws = _Scratch(C)
    hbuf = np.empty(C, lay.hi_dtype)
    if B < 32:  # the work width W holds B bits: build y there, add, reduce, widen
        y, t = np.empty(C, W), np.empty(C, W)
        wmask = (1 << B) - 1
        for s in range(0, d, C):
            e = min(d, s + C)
            n = e - s
            h = _read_high(st, s, e, hbuf, ws)
            if lay.lo:
                yc = np.multiply(h, 1 << lay.lo, out=y[:n], dtype=W)  # h << lo
            else:  # B < 8: W is uint8 and h is y
                yc = h
            if total is None:
                if lay.lo:
                    np.bitwise_or(yc, st.lo[s:e], out=yc, dtype=W)
                np.copyto(out[s:e], yc)
            else:
                tc = t[:n]
                np.copyto(tc, out[s:e], casting="unsafe")
                op(tc, yc, tc)
                if lay.lo:
                    op(tc, st.lo[s:e], tc, dtype=W)
                np.bitwise_and(tc, wmask, tc)
                np.copyto(out[s:e], tc)
        return out
    # 32 < B < 64: uint64 words built from the low field and the high bits
    hd = lay.hi_dtype
    assert hd is not None  # lay.hi != 0
    ring = _ring_mask(B)
    step, first = 8 // hd.itemsize, 4 // hd.itemsize
    y = np.empty(C, np.uint64)
    y_high = y.view(hd)[first::step]  # bytes 4.. of each word, on a little-endian host
    out_high = out.view(hd)[first::step]
    t = None if _LITTLE else np.empty(C, np.uint64)
    for s in range(0, d, C):
        e = min(d, s + C)
        n = e - s
        yc = out[s:e] if total is None else y[:n]  # unpacking: straight into the result
        np.copyto(yc, st.lo[s:e])
        h = _read_high(st, s, e, hbuf, ws)
        if t is not None:
            np.bitwise_or(yc, np.multiply(h, 1 << 32, out=t[:n], dtype=np.uint64), out=yc)
        elif total is None:
            out_high[s:e] = h
        else:
            y_high[:n] = h
        if total is not None:
            oc = out[s:e]
            op(oc, yc, oc)
            np.bitwise_and(oc, ring, oc)
    return out


def _check_packed(data: bytes | bytearray | memoryview, B: int, d: int) -> np.ndarray:
    """``data`` as uint8, after checking its length and its padding bits."""
    buf = np.frombuffer(data, dtype=np.uint8)
    need = key_bytes_needed(d, B)
    if buf.size != need:
        raise ValueError(f"{d} ring elements of {B} bits take {need} bytes, got {buf.size}")
    tail = (d * B) % 8
    if tail and int(buf[-1]) >> tail:
        raise ValueError(f"the {8 - tail} padding bits of the last byte must be zero")
    return buf


def pack_ring(q: np.ndarray, B: int) -> bytes:
    """Ring elements to exactly ``ceil(d·B/8)`` bytes in the wire layout (module docstring).

    ``q`` (uint64, any shape) is read flattened in C order. The unused high
    bits of the last byte are zero. Raises TypeError unless ``q`` is uint64,
    ValueError if a value is ``>= 2^B``.
    """
    B = _check_B(B)
    q = np.ascontiguousarray(_as_ring_array("q", q)).reshape(-1)
    return _mask_pack(q, [], B, check=True)


def unpack_ring(data: bytes | bytearray | memoryview, B: int, d: int) -> np.ndarray:
    """Inverse of :func:`pack_ring`: ``d`` ring elements as a 1-D uint64 array.

    Raises ValueError unless ``data`` is exactly ``ceil(d·B/8)`` bytes with zero
    padding bits (so every element has one encoding).
    """
    B = _check_B(B)
    d = _check_int("d", d, 0)
    return _unpack_add(_check_packed(data, B, d), B, d, None)


def masked_pack(q: np.ndarray, own_id: int, peer_keys: Mapping[int, bytes | bytearray | memoryview], B: int) -> bytes:
    """A client's whole upload in one pass: ``pack_ring(q + Σ_{j > own} m_j − Σ_{j < own} m_j)`` mod 2^B.

    ``masks[j] = mask_from_key(peer_keys[j], q.size, B)``, but the masks are
    never materialised: the key bytes, ``q`` and the output are streamed
    block by block. Consumes (only reads) the first ``key_bytes_needed(q.size,
    B)`` bytes of every key; raises ValueError if one is shorter, or if a peer
    id equals ``own_id``. ``q`` (uint64, any shape,
    read in C order) is taken mod 2^B. Returns ``ceil(q.size·B/8)`` bytes.
    """
    B = _check_B(B)
    own_id = _check_int("own_id", own_id, -(1 << 63))
    q = np.ascontiguousarray(_as_ring_array("q", q)).reshape(-1)
    need = key_bytes_needed(q.size, B)
    keys = []
    for j, key in peer_keys.items():
        j = _check_int("peer id", j, -(1 << 63))
        if j == own_id:
            raise ValueError(f"client {own_id} cannot share a mask with itself")
        buf = np.frombuffer(key, dtype=np.uint8)
        if buf.size < need:
            raise ValueError(
                f"a mask of {q.size} elements of {B} bits needs {need} key bytes, got {buf.size} for peer {j}"
            )
        keys.append((j > own_id, buf[:need]))
    return _mask_pack(q, keys, B, check=False)


def add_packed(
    total: np.ndarray, data: bytes | bytearray | memoryview, B: int, *, subtract: bool = False
) -> np.ndarray:
    """Add one packed upload into a running sum, in place: ``total = total ± unpack_ring(data)`` mod 2^B.

    ``total`` is a writable, C-contiguous uint64 array (any shape; ``d =
    total.size``); it is updated in place and returned, reduced mod 2^B. A
    server sums ``n`` uploads with one ``np.zeros(d, np.uint64)`` and ``n``
    calls, without unpacking any of them into an array of its own. For
    dropout recovery, a revealed mask ``m_ik`` (survivor ``i``, dropped ``k``,
    packed with :func:`pack_ring`) goes in with ``subtract=(k > i)``:
    survivor ``i`` had added ``+m_ik`` if ``k > i`` and ``−m_ik`` otherwise,
    (module docstring). ``data`` is checked as by
    :func:`unpack_ring` (ValueError); ``total`` is left untouched if it fails.
    """
    B = _check_B(B)
    total = _as_ring_array("total", total)
    if not (total.flags.c_contiguous and total.flags.writeable):
        raise ValueError("total must be a writable, C-contiguous uint64 array")
    buf = _check_packed(data, B, total.size)
    _unpack_add(buf, B, total.size, total.reshape(-1), subtract=bool(subtract))
    return total


# --------------------------------------------------------------------------- byte pads


def xor_pad(payload: bytes | bytearray | memoryview, key: bytes | bytearray | memoryview) -> bytes:
    """One-time pad: ``payload XOR key``. Its own inverse.

    ``key`` must be exactly as long as ``payload`` (ValueError otherwise) and
    must never be used again: two payloads padded with one key leak their XOR.
    """
    a = np.frombuffer(payload, dtype=np.uint8)
    b = np.frombuffer(key, dtype=np.uint8)
    if a.size != b.size:
        raise ValueError(f"one-time pad of {b.size} bytes for a payload of {a.size} bytes; they must be equal")
    return np.bitwise_xor(a, b).tobytes()


_CHACHA_MAX_BYTES = 64 << 32  # 2^32 blocks of 64 bytes under a 32-bit block counter


def expand_key(seed_key: bytes, nbytes: int, nonce: bytes) -> bytes:
    """``nbytes`` of ChaCha20 keystream (RFC 8439) from a 32-byte key and a 12-byte nonce.

    COMPUTATIONALLY SECURE ONLY. The output is pseudorandom, not random: a pad
    or mask made from it is as strong as ChaCha20, not information-theoretically
    secure like a pad read straight from QKD key. Use it only where the key
    budget cannot cover ``(n−1)·d·B`` bits and the weaker guarantee is accepted.

    Deterministic in ``(seed_key, nonce)``; never use one pair twice (the
    keystreams would repeat). The block counter starts at 0; at most
    ``2^32 · 64`` bytes (256 GiB) per pair.
    """
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    seed_key, nonce = bytes(seed_key), bytes(nonce)
    if len(seed_key) != 32:
        raise ValueError(f"ChaCha20 needs a 32-byte key, got {len(seed_key)} bytes")
    if len(nonce) != 12:
        raise ValueError(f"the nonce must be 12 bytes (RFC 8439), got {len(nonce)}")
    nbytes = _check_int("nbytes", nbytes, 0, _CHACHA_MAX_BYTES)
    # cryptography takes OpenSSL's 16-byte IV: 4-byte little-endian block counter, then the nonce
    encryptor = Cipher(algorithms.ChaCha20(seed_key, b"\x00\x00\x00\x00" + nonce), mode=None).encryptor()
    return encryptor.update(bytes(nbytes)) + encryptor.finalize()
