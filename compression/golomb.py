"""Golomb–Rice coding of non-negative integers (sparse-support gaps), vectorised.

A value ``v`` with Rice parameter ``k`` is its quotient ``q = v >> k`` in unary
(``q`` zero bits, then a one) and its remainder ``v & (2**k - 1)`` in ``k``
bits, most significant first. Bits per value ≈ ``k + 1 + v / 2**k``; for gaps
that are roughly geometric with mean ``μ`` the best ``k`` is about
``log2(μ·ln 2)`` (:func:`best_rice_parameter`), which costs about
``k + 1 + 1/ln 2 ≈ k + 2.44`` bits per value.

Stream layout. The bit count is exactly that of interleaved Rice codes, but the
two parts are stored one after the other so both halves encode and decode with
array operations (no per-value Python loop)::

    unary part:     for each value i: q_i zero bits, then a one bit
    remainder part: for each value i: k bits of v_i & (2**k - 1), MSB first
    padding:        zero bits up to the next byte boundary

Decoding finds the ``count`` first one bits (the unary terminators; the
remainder part only starts after the last of them), then reads ``count·k``
remainder bits. The stream must be used exactly: a byte too many, a non-zero
padding bit, or a unary run or remainder past the end raises
:class:`~.codec.CodecError`.
"""

from __future__ import annotations

import math

import numpy as np

from .codec import CodecError, CodecReason

MAX_RICE_PARAMETER = 63
# An encoder refuses to emit more unary bits than this (a k far too small for
# the values would otherwise allocate gigabytes); 2**33 bits = 1 GiB.
_MAX_UNARY_BITS = 1 << 33


def _as_uint64(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values)
    if v.dtype.kind == "u":
        return v.astype(np.uint64, copy=False).ravel()
    if v.dtype.kind == "i":
        if v.size and int(v.min()) < 0:
            raise ValueError("Rice coding takes non-negative integers; got a negative value")
        return v.astype(np.uint64, copy=False).ravel()
    if v.size == 0:
        return np.zeros(0, dtype=np.uint64)
    raise ValueError(f"Rice coding takes an integer array, got dtype {v.dtype}")


def _check_parameter(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"Rice parameter must be an int in [0, {MAX_RICE_PARAMETER}], got {k!r}")
    k = int(k)
    if not 0 <= k <= MAX_RICE_PARAMETER:
        raise ValueError(f"Rice parameter must be in [0, {MAX_RICE_PARAMETER}], got {k}")
    return k


def best_rice_parameter(values: np.ndarray) -> int:
    """The Rice parameter that codes ``values`` in the fewest bits.

    Starts from ``k ≈ log2(mean · ln 2)`` (optimal for geometric gaps) and
    keeps the cheapest of its neighbours by exact bit count. Empty or all-zero
    input gives 0.
    """
    v = _as_uint64(values)
    if v.size == 0:
        return 0
    candidates = rice_parameter_candidates(float(v.mean(dtype=np.float64)))
    quotient_bits = [float((v >> np.uint64(k)).sum(dtype=np.float64)) for k in candidates]
    return cheapest_rice_parameter(candidates, quotient_bits, v.size)


def rice_parameter_candidates(mean: float) -> list[int]:
    """The parameters worth costing for values of mean ``mean``: ⌊log2(mean·ln 2)⌋ (0 when mean·ln 2 ≤ 1)
    and its neighbours −1, +1, +2, within [0, 63], sorted."""
    guess = 0 if mean * math.log(2) <= 1.0 else int(math.floor(math.log2(mean * math.log(2))))
    return sorted({min(max(guess + delta, 0), MAX_RICE_PARAMETER) for delta in (-1, 0, 1, 2)})


def cheapest_rice_parameter(candidates: list[int], quotient_bits: list[float], count: int) -> int:
    """The candidate k with the fewest bits, Σ(v >> k) + count·(1 + k) (``quotient_bits[i]`` = Σ(v >> candidates[i]));
    ties go to the smaller k."""
    return min(zip(candidates, quotient_bits), key=lambda c: (c[1] + count * (1 + c[0]), c[0]))[0]


def rice_bits(values: np.ndarray, k: int) -> int:
    """Exact number of bits :func:`rice_encode` emits before byte padding."""
    v = _as_uint64(values)
    k = _check_parameter(k)
    return int((v >> np.uint64(k)).sum(dtype=np.uint64)) + v.size * (1 + k)


def rice_encode(values: np.ndarray, k: int) -> bytes:
    """Rice-code non-negative integers with parameter ``k`` (see module docstring).

    Returns ``ceil(bits / 8)`` bytes. Raises ValueError on negative or
    non-integer input, on ``k`` outside [0, 63], or when ``k`` is so small for
    the values that the unary part would exceed 2**33 bits.
    """
    v = _as_uint64(values)
    k = _check_parameter(k)
    n = v.size
    if n == 0:
        return b""
    q = v >> np.uint64(k)
    unary_bits = float(q.sum(dtype=np.float64)) + n
    if unary_bits > _MAX_UNARY_BITS:
        raise ValueError(
            f"Rice parameter {k} is too small for these values ({unary_bits:.3g} unary bits); "
            "use best_rice_parameter(values)"
        )
    q = q.astype(np.int64)
    terminators = np.cumsum(q + 1) - 1  # position of each value's one bit
    total_unary = int(terminators[-1]) + 1
    bits = np.zeros(total_unary + n * k, dtype=np.uint8)
    bits[terminators] = 1
    if k:
        remainders = v & np.uint64((1 << k) - 1)
        shifts = np.arange(k - 1, -1, -1, dtype=np.uint64)
        bits[total_unary:] = ((remainders[:, None] >> shifts[None, :]) & np.uint64(1)).ravel()
    return np.packbits(bits).tobytes()


def rice_decode(data: bytes | bytearray | memoryview, k: int, count: int) -> np.ndarray:
    """Decode exactly ``count`` values made by :func:`rice_encode`; uint64 array.

    Raises :class:`CodecError` when the stream is truncated (fewer than
    ``count`` unary terminators, remainder bits past the end), has bytes or
    non-zero padding bits after the last value, or decodes to a value that
    does not fit 64 bits.

    Memory: 24 bytes per value (terminators, quotients, values) plus chunks
    of at most :data:`_CHUNK_BITS` unpacked bits, whatever the stream's length
    or content; the stream is never unpacked whole.
    """
    try:
        k = _check_parameter(k)
    except ValueError as exc:
        raise CodecError(str(exc), reason=CodecReason.BAD_PARAMETER) from None
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise CodecError(f"Rice value count must be a non-negative int, got {count!r}", reason=CodecReason.BAD_PARAMETER)
    count = int(count)
    buf = np.frombuffer(data, dtype=np.uint8)
    if count == 0:
        if buf.size:
            raise CodecError(f"Rice stream for 0 values must be empty, got {buf.size} bytes", reason=CodecReason.WRONG_LENGTH)
        return np.zeros(0, dtype=np.uint64)
    # Each value takes at least 1 + k bits: refuse before unpacking anything.
    if count * (1 + k) > 8 * buf.size:
        raise CodecError(
            f"Rice stream of {buf.size} bytes is too short for {count} values with k={k}", reason=CodecReason.TRUNCATED
        )
    terminators = _first_ones(buf, count)
    remainder_start = int(terminators[-1]) + 1
    end = remainder_start + count * k
    if end > 8 * buf.size:
        raise CodecError(
            f"Rice stream is truncated: remainders need {end} bits, the stream has {8 * buf.size}", reason=CodecReason.TRUNCATED
        )
    if buf.size != (end + 7) // 8:
        raise CodecError(
            f"Rice stream has {buf.size - (end + 7) // 8} byte(s) after its last value", reason=CodecReason.WRONG_LENGTH
        )
    if end % 8 and int(buf[-1]) & ((1 << (8 - end % 8)) - 1):  # bits after `end`, MSB first
        raise CodecError("Rice stream has non-zero padding bits", reason=CodecReason.BAD_VALUE)
    q = np.diff(terminators, prepend=-1) - 1  # int64, >= 0
    if k and int(q.max()) >> (64 - k):
        raise CodecError("Rice stream decodes to a value that does not fit 64 bits", reason=CodecReason.BAD_VALUE)
    values = q.astype(np.uint64) << np.uint64(k)
    if k:
        shifts = np.arange(k - 1, -1, -1, dtype=np.uint64)
        rows = max(1, _CHUNK_BITS // k)
        for lo in range(0, count, rows):
            hi = min(lo + rows, count)
            first, last = remainder_start + lo * k, remainder_start + hi * k
            skip = first % 8
            bits = np.unpackbits(buf[first // 8 : (last + 7) // 8])[skip : skip + (hi - lo) * k]
            rbits = bits.reshape(hi - lo, k).astype(np.uint64)
            values[lo:hi] |= (rbits << shifts[None, :]).sum(axis=1, dtype=np.uint64)
    return values


# Bits unpacked at a time (1 MiB of bits; at most 8 MiB of positions per chunk).
_CHUNK_BITS = 1 << 20


def _first_ones(buf: np.ndarray, count: int) -> np.ndarray:
    """Bit positions (MSB-first order) of the first ``count`` one bits of ``buf``, int64.

    Scans ``_CHUNK_BITS`` bits at a time and stops at the chunk holding the
    ``count``-th one, so memory is 8 bytes per value plus one chunk.
    """
    step = _CHUNK_BITS // 8
    found: list[np.ndarray] = []
    total = 0
    for lo in range(0, buf.size, step):
        ones = np.flatnonzero(np.unpackbits(buf[lo : lo + step]))
        if total + ones.size >= count:
            ones = ones[: count - total]
        ones += 8 * lo
        found.append(ones)
        total += ones.size
        if total == count:
            return found[0] if len(found) == 1 else np.concatenate(found)
    raise CodecError(f"Rice stream is truncated: {total} unary terminators for {count} values", reason=CodecReason.TRUNCATED)
