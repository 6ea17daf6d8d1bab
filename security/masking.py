"""Secure-aggregation primitives: fixed-point ring encoding and one-time-pad pairwise masks.

Pure functions on numpy arrays and bytes: nothing here talks to Flower or to a
key store. Key material comes in as ``bytes`` (from
:meth:`qfl.security.keys.KeySource.enc_keys` / ``dec_keys`` in the caller).

The ring
--------
Every client maps its update into the ring Z_{2^B} (``1 <= B <= 64``), held
as ``numpy.uint64`` arrays. uint64 arithmetic wraps mod 2^64, and 2^B divides
2^64, so sums and differences may run in uint64 and be reduced mod 2^B by a
final ``& (2^B - 1)``. A ring element ``v`` is read as signed: ``v`` if
``v < 2^(B-1)``, else ``v - 2^B`` (two's complement).

Range condition: decoding is exact only if the *sum* over the ``n`` clients
of their signed integers lies in the open interval ``(-2^(B-1), 2^(B-1))``.
With each client's integer bounded by ``|v_i| < 2^value_bits``,
:func:`ring_bits` gives ``B = value_bits + ceil(log2 n) + headroom``; the
default ``headroom = 1`` is the sign bit and is exactly enough.

Fixed point
-----------
:func:`encode_fixed_point` maps ``x`` to ``round(x · 2^s)`` with stochastic
rounding (up with probability equal to the fractional part), so
``E[v] = x · 2^s``: the encoding is unbiased, and the server's decoded sum is an
unbiased estimate of the sum of the (clipped) inputs. With a clip bound ``C``
(``|x| <= C`` after clipping), :func:`scale_bits_for_clip` picks the largest
``s`` with ``n · ceil(C · 2^s) < 2^(B-1)``, which implies the range condition
for every input. Clipping is the only source of bias: a coordinate with
``|x| > C`` contributes ``sign(x) · C`` instead of ``x`` (a bias of
``sign(x)(|x| - C)`` towards zero); coordinates inside ``[-C, C]`` are untouched.

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
``k`` no longer cancel. Each survivor ``i`` then reveals ``m_ik`` to the server,
which removes it (:func:`remove_dropped`). That costs no new mask key (an
authenticated reveal costs a 16-byte MAC key, see ``mac.py``) but
``|dropped| · d · B`` bits of upload per survivor, and it burns the revealed
masks. Two caveats the protocol using these primitives must handle:

- Bonawitz et al. add a self-mask so that a *late* upload of a client declared
  dropped stays hidden; here there is none. A server that receives ``y_k``
  after collecting the reveals for ``k`` learns ``q_k`` in clear. The server
  must commit to the dropped set before the reveals and discard late uploads;
  against a malicious server that lies about dropouts, this is not enough.
- A survivor that leaves between uploading and revealing makes the round
  unrecoverable (its own masks with the dropped cannot be removed).

Helpers :func:`pack_ring` / :func:`unpack_ring` put ring elements on the wire
at ``B`` bits each, :func:`xor_pad` one-time-pads a byte string, and
:func:`expand_key` stretches a short key with ChaCha20 (computationally
secure only; see its docstring).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "aggregate",
    "apply_masks",
    "decode_fixed_point",
    "encode_fixed_point",
    "expand_key",
    "key_bytes_needed",
    "mask_from_key",
    "pack_ring",
    "remove_dropped",
    "ring_bits",
    "ring_to_signed",
    "scale_bits_for_clip",
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


def _check_in_ring(name: str, q: np.ndarray, B: int) -> None:
    if B < 64 and q.size and int(q.max()) >> B:
        raise ValueError(f"{name} holds values >= 2^{B}; ring elements must be < 2^{B}")


# --------------------------------------------------------------------------- ring and fixed point


def ring_bits(value_bits: int, n_clients: int, headroom: int = 1) -> int:
    """Ring size ``B = value_bits + ceil(log2 n_clients) + headroom``.

    ``value_bits``: each client's integer satisfies ``|v_i| < 2^value_bits``.
    The sum of ``n`` of them is then below ``n · 2^value_bits <=
    2^(value_bits + ceil(log2 n))`` in magnitude, so ``headroom = 1`` (the sign
    bit) makes it fit in ``(-2^(B-1), 2^(B-1))``; more headroom is a margin.
    Raises ValueError if B would exceed 64 (the uint64 arithmetic used here).
    """
    value_bits = _check_int("value_bits", value_bits, 0)
    n_clients = _check_int("n_clients", n_clients, 1)
    headroom = _check_int("headroom", headroom, 0)
    B = value_bits + (n_clients - 1).bit_length() + headroom
    if B > MAX_RING_BITS:
        raise ValueError(
            f"ring of {B} bits needed ({value_bits} value bits + ceil(log2 {n_clients}) = "
            f"{(n_clients - 1).bit_length()} for the sum + {headroom} headroom), but at most "
            f"{MAX_RING_BITS} are supported; lower the fixed-point scale or the clip bound"
        )
    return max(B, 1)


def scale_bits_for_clip(clip: float, n_clients: int, B: int) -> int:
    """The largest scale ``s`` such that ``n · ceil(C · 2^s) < 2^(B-1)``.

    With every coordinate clipped to ``[-C, C]`` (``clip=C`` in
    :func:`encode_fixed_point`), each client's integer is at most
    ``ceil(C · 2^s)`` in magnitude (stochastic rounding may round up), so the sum
    over ``n`` clients lies in ``(-2^(B-1), 2^(B-1))`` and decodes exactly. This
    is the bound ``n · C · 2^s < 2^(B-1)`` with room for the rounding. The grid
    step is ``2^-s``; ``s`` may be negative when ``C`` is large. Raises
    ValueError if no scale fits (``n >= 2^(B-1)``).
    """
    B = _check_B(B)
    n_clients = _check_int("n_clients", n_clients, 1)
    if isinstance(clip, bool) or not isinstance(clip, numbers.Real):
        raise ValueError(f"clip bound must be a positive finite number, got {clip!r}")
    C = float(clip)
    if not (math.isfinite(C) and C > 0.0):
        raise ValueError(f"clip bound must be a positive finite number, got {clip!r}")
    limit = 1 << (B - 1)  # need n * ceil(C 2^s) < limit
    if n_clients >= limit:
        raise ValueError(f"{n_clients} clients cannot share a {B}-bit ring: even 1 per client overflows")

    def fits(s: int) -> bool:
        try:
            scaled = math.ldexp(C, s)  # exact: C is a double, s an integer
        except OverflowError:
            return False
        return n_clients * math.ceil(scaled) < limit

    # start just above the real-valued answer, then walk down (a few steps at most)
    s = math.floor(math.log2((limit - 1) / n_clients) - math.log2(C)) + 2
    while fits(s + 1):
        s += 1
    while not fits(s):
        s -= 1
    return s


def ring_to_signed(q: np.ndarray, B: int) -> np.ndarray:
    """Ring elements read as signed integers (top half negative), as int64. Exact."""
    B = _check_B(B)
    q = _as_ring_array("q", q) & _ring_mask(B)
    if B == 64:
        return q.view(np.int64)
    half = np.uint64(1 << (B - 1))
    # v ^ half maps [0, half) -> [half, 2 half) and [half, 2 half) -> [0, half)
    return (q ^ half).astype(np.int64) - np.int64(1 << (B - 1))


def encode_fixed_point(
    x: np.ndarray,
    scale_bits: int,
    B: int,
    rng: np.random.Generator | int | None,
    *,
    clip: float | None = None,
) -> np.ndarray:
    """``x`` (float32) to ring elements: ``round(x · 2^scale_bits)`` in two's complement mod 2^B.

    The rounding is stochastic: with ``y = x · 2^s`` (exact in float64), the
    result is ``floor(y) + 1`` with probability ``y - floor(y)`` and ``floor(y)``
    otherwise, so ``E[v] = y`` (unbiased up to the 2^-53 resolution of the
    uniform draws). ``rng`` is a ``numpy.random.Generator`` or a seed for one;
    this randomness needs no secrecy (the masks hide the result).

    ``clip=C`` first clips ``x`` to ``[-C, C]``; that biases only the clipped
    coordinates (towards zero, by ``|x| - C``). Choose ``scale_bits`` with
    :func:`scale_bits_for_clip` so that the *sum* over all clients decodes
    exactly; one client cannot check that. It can and does check its own
    values: raises ValueError if ``x`` holds NaN/Inf (which clipping would
    hide from the server) or a rounded value outside ``(-2^(B-1), 2^(B-1))``.

    Returns a uint64 array of ``x``'s shape with values in ``[0, 2^B)``.
    """
    B = _check_B(B)
    s = _check_int("scale_bits", scale_bits, -1074, 1074)
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise ValueError(f"encode_fixed_point takes real values, got dtype {x.dtype}")
    shape = x.shape
    y = np.array(x, dtype=np.float64).reshape(-1)  # a fresh 1-D array, also for 0-d input
    if y.size and not np.isfinite(y).all():
        raise ValueError("input holds NaN or Inf; refusing to encode (the masked sum would hide it)")
    if clip is not None:
        if isinstance(clip, bool) or not isinstance(clip, numbers.Real) or not (
            math.isfinite(float(clip)) and float(clip) > 0.0
        ):
            raise ValueError(f"clip bound must be a positive finite number, got {clip!r}")
        np.clip(y, -float(clip), float(clip), out=y)
    np.ldexp(y, s, out=y)  # exact unless it overflows (caught below) or underflows below 2^-1074
    low = np.floor(y)
    frac = np.subtract(y, low)  # exact, in [0, 1)
    gen = np.random.default_rng(rng)
    np.add(low, gen.random(y.size) < frac, out=low)
    limit = float(1 << (B - 1))  # a power of two: exact in float64
    if low.size and not (np.abs(low) < limit).all():
        worst = float(np.abs(low).max())
        raise ValueError(
            f"a rounded value of magnitude {worst:.6g} does not fit a {B}-bit ring "
            f"(|v| < 2^{B - 1} needed); lower scale_bits ({s}) or pass clip="
        )
    return (low.astype(np.int64).view(np.uint64) & _ring_mask(B)).reshape(shape)


def decode_fixed_point(total: np.ndarray, scale_bits: int, B: int) -> np.ndarray:
    """A ring element (typically the aggregate) as float64: ``signed(total) / 2^scale_bits``.

    Exact (the float64 equals the integer sum of the rounded values divided by
    2^s) whenever the signed sum is below 2^53 in magnitude; beyond that the
    int64 → float64 conversion rounds. Use :func:`ring_to_signed` for the
    exact integers. Correct only under the range condition (module docstring).
    """
    B = _check_B(B)
    s = _check_int("scale_bits", scale_bits, -1074, 1074)
    return np.ldexp(ring_to_signed(total, B).astype(np.float64), -s)


# --------------------------------------------------------------------------- masks


def key_bytes_needed(d: int, B: int) -> int:
    """Key bytes one pairwise mask of ``d`` ring elements takes: ``ceil(d · B / 8)``."""
    d = _check_int("d", d, 0)
    B = _check_B(B)
    return (d * B + 7) // 8


def mask_from_key(key: bytes | bytearray | memoryview, d: int, B: int) -> np.ndarray:
    """The pairwise mask read from ``key``: ``d`` ring elements of ``B`` bits.

    Consumes exactly the first ``key_bytes_needed(d, B)`` bytes of ``key``,
    read as a little-endian bit stream (element ``i`` is bits
    ``[i·B, (i+1)·B)``; the same layout as :func:`pack_ring`); the unused high
    bits of the last byte, if any, are discarded. Uniform key bytes give a
    mask uniform on (Z_{2^B})^d. Bytes after those are ignored; the caller must
    not use the consumed bytes for anything else (one-time pad). Raises
    ValueError if ``key`` is shorter. Both ends of a link derive the same
    mask from the same key.
    """
    d = _check_int("d", d, 0)
    B = _check_B(B)
    need = key_bytes_needed(d, B)
    buf = np.frombuffer(key, dtype=np.uint8)
    if buf.size < need:
        raise ValueError(
            f"a mask of {d} elements of {B} bits needs {need} key bytes, got {buf.size}"
        )
    return _unpack(buf[:need], B, d)


def apply_masks(q: np.ndarray, own_id: int, peer_masks: Mapping[int, np.ndarray], B: int) -> np.ndarray:
    """Client ``own_id``'s masked upload: ``q + Σ_{j > own} m_j − Σ_{j < own} m_j`` mod 2^B.

    ``peer_masks[j]`` is the mask this client shares with peer ``j`` (the same
    array peer ``j`` passes under ``own_id``). Every mask must have ``q``'s
    shape. With ``n`` clients this uses ``n − 1`` masks, i.e. ``(n−1)·d·B``
    bits of key. Returns a new uint64 array; ``q`` is not modified.
    """
    B = _check_B(B)
    own_id = _check_int("own_id", own_id, -(1 << 63))
    q = _as_ring_array("q", q)
    out: np.ndarray | None = None  # the first mask allocates the result (one pass fewer than a copy)
    for j, m in peer_masks.items():
        j = _check_int("peer id", j, -(1 << 63))
        if j == own_id:
            raise ValueError(f"client {own_id} cannot share a mask with itself")
        m = _as_ring_array(f"mask for peer {j}", m)
        if m.shape != q.shape:
            raise ValueError(f"mask for peer {j} has shape {m.shape}, the update has {q.shape}")
        op = np.add if j > own_id else np.subtract
        out = op(q, m) if out is None else op(out, m, out=out)
    if out is None:
        out = q.copy()
    if B < 64:  # uint64 arithmetic is already mod 2^64
        np.bitwise_and(out, _ring_mask(B), out=out)
    return out


def aggregate(masked: Sequence[np.ndarray] | Iterable[np.ndarray], B: int) -> np.ndarray:
    """The sum of the uploads mod 2^B (the masks of clients that all uploaded cancel)."""
    B = _check_B(B)
    it = iter(masked)
    try:
        first = _as_ring_array("upload 0", next(it))
    except StopIteration:
        raise ValueError("aggregate needs at least one upload") from None
    total: np.ndarray | None = None  # the second upload allocates the result
    for idx, y in enumerate(it, start=1):
        y = _as_ring_array(f"upload {idx}", y)
        if y.shape != first.shape:
            raise ValueError(f"upload {idx} has shape {y.shape}, upload 0 has {first.shape}")
        total = np.add(first, y) if total is None else np.add(total, y, out=total)
    if total is None:
        total = first.copy()
    if B < 64:
        np.bitwise_and(total, _ring_mask(B), out=total)
    return total


def remove_dropped(
    total: np.ndarray,
    survivor_masks_with_dropped: Mapping[tuple[int, int], np.ndarray],
    B: int,
    *,
    survivors: Iterable[int] | None = None,
    dropped: Iterable[int] | None = None,
) -> np.ndarray:
    """Dropout recovery: cancel what survivors added for peers that never uploaded.

    ``survivor_masks_with_dropped[(i, k)]`` is the mask ``m_ik`` survivor ``i``
    shared with dropped client ``k`` and revealed to the server. Survivor ``i``
    added ``+m_ik`` if ``k > i`` and ``−m_ik`` if ``k < i``; this subtracts
    exactly that, so the result is the sum of the survivors' ``q_i`` mod 2^B.

    Pass ``survivors`` and ``dropped`` to have the reveals checked: they must be
    exactly ``survivors × dropped`` (a missing reveal would leave a uniform mask
    in the result; an extra one would corrupt it). Revealing costs each
    survivor ``|dropped| · d · B`` bits of upload and burns those masks; see the
    module docstring for why late uploads of a dropped client must be refused.
    """
    B = _check_B(B)
    total = _as_ring_array("aggregate", total)
    if survivors is not None or dropped is not None:
        if survivors is None or dropped is None:
            raise ValueError("pass both survivors and dropped, or neither")
        surv, drop = set(survivors), set(dropped)
        if surv & drop:
            raise ValueError(f"clients {sorted(surv & drop)} are listed as both survivors and dropped")
        expected = {(i, k) for i in surv for k in drop}
        got = set(survivor_masks_with_dropped)
        if got != expected:
            missing, extra = sorted(expected - got), sorted(got - expected)
            raise ValueError(f"reveals do not match survivors × dropped: missing {missing}, unexpected {extra}")
    out = total.copy()
    for pair, m in survivor_masks_with_dropped.items():
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise ValueError(f"reveal keys are (survivor_id, dropped_id) pairs, got {pair!r}")
        i = _check_int("survivor id", pair[0], -(1 << 63))
        k = _check_int("dropped id", pair[1], -(1 << 63))
        if i == k:
            raise ValueError(f"reveal {pair!r} pairs a client with itself")
        m = _as_ring_array(f"revealed mask {pair!r}", m)
        if m.shape != out.shape:
            raise ValueError(f"revealed mask {pair!r} has shape {m.shape}, the aggregate has {out.shape}")
        if k > i:  # survivor i added +m_ik
            np.subtract(out, m, out=out)
        else:  # survivor i added −m_ik
            np.add(out, m, out=out)
    if B < 64:  # uint64 arithmetic is already mod 2^64
        np.bitwise_and(out, _ring_mask(B), out=out)
    return out


# --------------------------------------------------------------------------- wire packing


# Groups of 8 values per block in the generic packer: 2^13 groups are 512 KiB
# of uint64 values plus at most 64 KiB of packed bytes, well inside L2.
_BLOCK_GROUPS = 1 << 13


def _slots(B: int) -> list[tuple[int, int]]:
    """For each of the 8 values of a group (8 values = B bytes): (first byte, bit offset in it)."""
    return [((j * B) >> 3, (j * B) & 7) for j in range(8)]


def _window(buf: np.ndarray, offset: int, groups: int, B: int) -> np.ndarray:
    """The unaligned little-endian 64-bit words at bytes ``offset + g·B`` of ``buf``, g < groups."""
    return np.ndarray(shape=(groups,), dtype="<u8", buffer=buf, offset=offset, strides=(B,))


def _pack(v: np.ndarray, B: int) -> bytes:
    """Pack a flat uint64 array of values < 2^B, B bits each, little-endian bit order.

    Eight values take exactly B bytes, so the stream is a sequence of B-byte
    groups and value ``j`` of every group starts at the same byte and bit
    offset: each of the 8 slots is one numpy operation on a strided view, run
    over blocks of groups small enough to stay in cache.
    """
    d = v.size
    nbytes = (d * B + 7) // 8
    if d == 0:
        return b""
    if B in (8, 16, 32, 64):
        return v.astype(f"<u{B // 8}").tobytes()
    if B < 8:  # groups narrower than a word: the dense small-width packer
        from qfl.compression.bitpack import pack_bits

        return pack_bits(v.astype(np.uint8), B)
    groups = -(-d // 8)
    out = np.zeros(groups * B + 8, dtype=np.uint8)  # +8: the last window may reach past the data
    slots = _slots(B)
    for g0 in range(0, groups, _BLOCK_GROUPS):
        g1 = min(groups, g0 + _BLOCK_GROUPS)
        vals = np.zeros((g1 - g0) * 8, dtype=np.uint64)
        chunk = v[g0 * 8 : g1 * 8]
        vals[: chunk.size] = chunk
        cols = vals.reshape(g1 - g0, 8).T.copy()  # one contiguous row per slot
        # B > 8, so the 8-byte windows of one slot never overlap and each |= is a
        # plain read-modify-write; slots of a group share at most a boundary byte,
        # whose other bits |= keeps.
        for j, (first, off) in enumerate(slots):
            col = cols[j]
            base = g0 * B + first
            win = _window(out, base, g1 - g0, B)
            win |= col << np.uint64(off) if off else col
            if off + B > 64:  # the value's top bits spill into a ninth byte
                spill = out[base + 8 : base + 8 + (g1 - g0) * B : B]
                spill |= (col >> np.uint64(64 - off)).astype(np.uint8)
    return out[:nbytes].tobytes()


def _unpack(buf: np.ndarray, B: int, d: int) -> np.ndarray:
    """Inverse of :func:`_pack`: ``buf`` (uint8, ceil(d·B/8) bytes) to ``d`` uint64 values.

    Bits past ``d·B`` in the last byte are ignored.
    """
    if d == 0:
        return np.zeros(0, dtype=np.uint64)
    if B in (8, 16, 32, 64):
        return np.frombuffer(buf, dtype=f"<u{B // 8}").astype(np.uint64)
    groups = -(-d // 8)
    padded = np.zeros(groups * B + 8, dtype=np.uint8)
    padded[: buf.size] = buf
    out = np.empty((groups, 8), dtype=np.uint64)
    ring = _ring_mask(B)
    slots = _slots(B)
    for g0 in range(0, groups, _BLOCK_GROUPS):
        g1 = min(groups, g0 + _BLOCK_GROUPS)
        cols = np.empty((8, g1 - g0), dtype=np.uint64)
        for j, (first, off) in enumerate(slots):
            col = cols[j]
            base = g0 * B + first
            np.right_shift(_window(padded, base, g1 - g0, B), np.uint64(off), out=col)
            if off + B > 64:
                spill = padded[base + 8 : base + 8 + (g1 - g0) * B : B].astype(np.uint64)
                col |= spill << np.uint64(64 - off)
            col &= ring
        out[g0:g1] = cols.T
    return out.reshape(-1)[:d]


def pack_ring(q: np.ndarray, B: int) -> bytes:
    """Ring elements to ``ceil(d·B/8)`` bytes: ``B`` bits each, little-endian bit stream.

    Element ``i`` (of ``q`` flattened in C order) occupies stream bits
    ``[i·B, (i+1)·B)``, least significant first; stream bit ``t`` is bit
    ``t % 8`` of byte ``t // 8``; the unused high bits of the last byte are
    zero. Raises TypeError unless ``q`` is uint64, ValueError if a value is
    ``>= 2^B``.
    """
    B = _check_B(B)
    q = _as_ring_array("q", q).reshape(-1)
    _check_in_ring("q", q, B)
    return _pack(q, B)


def unpack_ring(data: bytes | bytearray | memoryview, B: int, d: int) -> np.ndarray:
    """Inverse of :func:`pack_ring`: ``d`` ring elements as a 1-D uint64 array.

    Raises ValueError unless ``data`` is exactly ``ceil(d·B/8)`` bytes with zero
    padding bits (so every element has one encoding).
    """
    B = _check_B(B)
    d = _check_int("d", d, 0)
    buf = np.frombuffer(data, dtype=np.uint8)
    need = key_bytes_needed(d, B)
    if buf.size != need:
        raise ValueError(f"{d} ring elements of {B} bits take {need} bytes, got {buf.size}")
    tail = (d * B) % 8
    if tail and int(buf[-1]) >> tail:
        raise ValueError(f"the {8 - tail} padding bits of the last byte must be zero")
    return _unpack(buf, B, d)


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
