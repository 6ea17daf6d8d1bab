"""A Wegman–Carter one-time MAC: a polynomial hash over GF(2^61 − 1) plus a one-time pad.

Hash. The message (``L`` bytes) is cut into ``k = ceil(L/7)`` blocks of 7 bytes
(56 bits, little-endian; the last one zero-padded), each below ``p = 2^61 − 1``,
followed by one block holding ``L``. With these ``D = k + 1`` coefficients
``c_1 .. c_D`` and a secret point ``r`` in ``[1, p)``::

    H_r(M) = c_1 r^D + c_2 r^(D-1) + ... + c_D r   (mod p)

(Horner's rule, times a last ``r``: the polynomial has no constant term.
Without that last factor, 7 zero bytes and the empty message would hash to
``7`` and ``0`` for every ``r``, and an attacker could forge one from the
other by adding 7 to the tag.) The encoding ``M -> (c_1..c_D)`` is injective:
the length block fixes ``k`` and the zero padding.

Tag. ``t = (H_r(M) + s) mod p``, sent as 8 little-endian bytes; ``s`` is a
one-time pad. Both ``r`` and ``s`` come from 16 fresh key bytes
(:func:`mac_key_bytes`): ``r = (first 8 bytes, little-endian) mod (p − 1) + 1``
and ``s = (last 8 bytes) mod p``. Reducing 64 random bits leaves ``r`` within
statistical distance 2^-60 of uniform on ``[1, p)`` and ``s`` within 2^-61 of
uniform on ``[0, p)``. A key authenticates ONE message: with ``s`` reused, the
difference of two tags is ``H_r(M) − H_r(M')``, which gives ``r`` away.

Security (information-theoretic, against an unbounded attacker who has seen
one message and its tag): a forgery ``(M', t') ≠ (M, t)``, both messages of at
most ``L`` bytes, is accepted only if ``r`` is a root of the polynomial
``H_r(M') − H_r(M) − (t' − t)``, which is nonzero (if ``M' = M`` it is the
constant ``t − t'``) and has degree at most ``D = ceil(L/7) + 1``. With exactly
uniform ``r`` and ``s`` the tag says nothing about ``r``, so the forgery works
with probability at most ``D / (p − 1)``; the two small key biases add less than
2^-59::

    P[forgery] <= (ceil(L/7) + 1) / (p − 1) + 2^-59    per attempt

which is about 2^-61 · L/7: below 2^-37 for a 100 MB message. ``q`` attempts
against one key succeed with probability at most ``q`` times that.

Speed. The hash runs in numpy: the blocks are laid out in rows of ``_ROW``,
every row is dotted with the powers ``r^(_ROW-1) .. r^0`` exactly (blocks and
powers cut into pieces of at most 28 bits, so a row of products sums in
uint64 without overflow: two integer matrix products per chunk), and the row
values, reduced mod p, are a polynomial in ``r^_ROW`` evaluated with 61-bit
modular products emulated on 32-bit halves. Short messages take a pure-Python
path.
"""

from __future__ import annotations

import hmac

import numpy as np

__all__ = ["MAC_TAG_BYTES", "P", "mac_key_bytes", "poly_hash", "tag", "verify"]

P = (1 << 61) - 1  # a Mersenne prime: x mod P = (x & P) + (x >> 61), folded
MAC_TAG_BYTES = 8
_KEY_BYTES = 16
_BLOCK_BYTES = 7  # 56-bit blocks are always < P

# Blocks per chunk (2^14 blocks: 128 KiB per reused buffer, in cache);
# coefficients per row of the vectorised evaluation; vectors of at most
# _PY_BLOCKS coefficients use plain Python ints (cheaper than numpy set-up).
_CHUNK_BLOCKS = 1 << 14
_ROW = 1 << 10
_PY_BLOCKS = 1024

_P64 = np.uint64(P)
_M32 = np.uint64(0xFFFFFFFF)
_M29 = np.uint64((1 << 29) - 1)
_S3, _S29, _S32, _S61 = np.uint64(3), np.uint64(29), np.uint64(32), np.uint64(61)


def mac_key_bytes() -> int:
    """Fresh key bytes one tag consumes: 16 (8 for the point ``r``, 8 for the pad ``s``)."""
    return _KEY_BYTES


def _key_parts(key: bytes | bytearray | memoryview) -> tuple[int, int]:
    key = bytes(key)
    if len(key) != _KEY_BYTES:
        raise ValueError(f"a MAC key is exactly {_KEY_BYTES} fresh key bytes, got {len(key)}")
    r = int.from_bytes(key[:8], "little") % (P - 1) + 1  # in [1, p): never the zero point
    s = int.from_bytes(key[8:], "little") % P
    return r, s


def _mulmod(a: np.ndarray, b: np.ndarray | np.uint64) -> np.ndarray:
    """``a · b mod p`` elementwise, exactly, for uint64 inputs below 2^61.

    With ``a = a1·2^32 + a0`` and ``b = b1·2^32 + b0`` (a1, b1 < 2^29):
    ``a·b = a1b1·2^64 + (a1b0 + a0b1)·2^32 + a0b0`` and, as 2^61 ≡ 1 (mod p),
    ``2^64 ≡ 8`` and ``m·2^32 ≡ (m >> 29) + (m mod 2^29)·2^32``. Every
    partial product and the final sum (< 3·2^61 + 2^34) fit in 64 bits.
    """
    a0, a1 = a & _M32, a >> _S32
    b0, b1 = b & _M32, b >> _S32
    lo = a0 * b0  # < 2^64
    mid = a1 * b0
    mid += a0 * b1  # < 2^62
    acc = (a1 * b1) << _S3  # < 2^61
    acc += mid >> _S29
    acc += (mid & _M29) << _S32
    acc += lo & _P64
    acc += lo >> _S61
    acc = (acc & _P64) + (acc >> _S61)  # < 2^61 + 4
    acc -= np.where(acc >= _P64, _P64, np.uint64(0))
    return acc


def _powers(r: int, n: int) -> np.ndarray:
    """``[r^0, r^1, ..., r^(n-1)] mod p`` as uint64, by doubling (log2 n vector products)."""
    pw = np.empty(n, dtype=np.uint64)
    pw[0] = 1
    have = 1
    while have < n:
        take = min(have, n - have)
        pw[have : have + take] = _mulmod(pw[:take], np.uint64(pow(r, have, P)))
        have += take
    return pw


def _row_dots(c: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``Σ_j c[i, j] w[j] mod p`` for every row ``i``; uint64 inputs below 2^61, rows of < 2^32 terms.

    Row sums run on the 32-bit halves of the products (exact in uint64), and
    ``hi·2^32 + lo`` is reduced with 2^61 ≡ 1 like in :func:`_mulmod`.
    """
    t = _mulmod(c, w)
    hi = np.sum(t >> _S32, axis=1, dtype=np.uint64)  # terms < 2^29
    lo = np.sum(t & _M32, axis=1, dtype=np.uint64)  # terms < 2^32
    acc = (hi >> _S29) + ((hi & _M29) << _S32)
    acc += lo >> _S61
    acc += lo & _P64
    acc = (acc & _P64) + (acc >> _S61)
    acc -= np.where(acc >= _P64, _P64, np.uint64(0))
    return acc


def _eval(c: np.ndarray, x: int) -> int:
    """``Σ_i c_i x^(n-1-i) mod p`` (Horner order) for a uint64 vector ``c`` below 2^61.

    Splits ``c`` into rows of ``_ROW`` coefficients (zero-padded at the front,
    which leaves the value unchanged), evaluates every row at once against the
    powers ``x^(_ROW-1) .. x^0``, and recurses on the row values with the
    point ``x^_ROW``: no Python loop over coefficients.
    """
    n = c.size
    if n <= _PY_BLOCKS:
        acc = 0
        for coefficient in c.tolist():
            acc = (acc * x + coefficient) % P
        return acc
    width = min(_ROW, n)
    rows = -(-n // width)
    padded = np.zeros(rows * width, dtype=np.uint64)
    padded[rows * width - n :] = c
    weights = _powers(x, width)[::-1].copy()  # x^(width-1) .. x^0
    values = _row_dots(padded.reshape(rows, width), weights)
    return _eval(values, pow(x, width, P))


# The 56-bit blocks and the 61-bit weights are cut into pieces whose products
# sum exactly in uint64 over a row: blocks into 2 × 28 bits, weights into
# 21 + 20 + 20 bits; a product is < 2^49 and a row of 1024 sums to < 2^59.
_M28 = np.uint64((1 << 28) - 1)
_S28 = np.uint64(28)
_WEIGHT_SHIFTS = (0, 21, 41)
_PIECE_SHIFTS = tuple(a + w for a in (0, 28) for w in _WEIGHT_SHIFTS)  # of sums[:, q], mod 61 below


def _split_weights(w: np.ndarray) -> np.ndarray:
    """The (n, 3) matrix of 21-, 20- and 20-bit pieces of weights below 2^61."""
    return np.stack(
        [w & np.uint64((1 << 21) - 1), (w >> np.uint64(21)) & np.uint64((1 << 20) - 1), w >> np.uint64(41)],
        axis=1,
    )


def _combine(sums: np.ndarray) -> np.ndarray:
    """``Σ_q sums[:, q] · 2^_PIECE_SHIFTS[q] mod p`` per row, for entries below 2^59."""
    acc = np.zeros(sums.shape[0], dtype=np.uint64)
    for q, shift in enumerate(_PIECE_SHIFTS):
        k = shift % 61  # 2^61 ≡ 1
        x = np.ascontiguousarray(sums[:, q])
        low = np.uint64((1 << (61 - k)) - 1)
        # x·2^k = (x >> (61-k))·2^61 + (x mod 2^(61-k))·2^k ≡ (x >> (61-k)) + (x mod 2^(61-k))·2^k
        acc += (x & low) << np.uint64(k)  # < 2^61
        acc += x >> np.uint64(61 - k)  # < 2^(k-2) < 2^59
    acc = (acc & _P64) + (acc >> _S61)  # 6 terms of < 2^61 + 2^59: acc was < 2^64
    acc = (acc & _P64) + (acc >> _S61)
    acc -= np.where(acc >= _P64, _P64, np.uint64(0))
    return acc


def _message_poly(message: bytes, r: int) -> int:
    """``Σ_i c_i r^(n-1-i) mod p`` over the ``n`` 56-bit blocks of ``message`` (numpy path).

    The blocks are laid out in rows of ``_ROW`` (zero blocks in front, which
    leaves the value unchanged) and read straight from a padded copy of the
    message: block ``i`` is the unaligned little-endian word at byte ``7i``,
    its top byte dropped. Each row is dotted with ``r^(_ROW-1) .. r^0`` by two
    uint64 matrix products on the pieces (exact), chunk by chunk into reused
    buffers; the row values are then a polynomial in ``r^_ROW``.
    """
    length = len(message)
    n = -(-length // _BLOCK_BYTES)
    rows = -(-n // _ROW)
    lead = (rows * _ROW - n) * _BLOCK_BYTES
    padded = np.zeros(rows * _ROW * _BLOCK_BYTES + 1, dtype=np.uint8)  # +1: the last word reads past
    padded[lead : lead + length] = np.frombuffer(message, dtype=np.uint8)
    weights = _split_weights(_powers(r, _ROW)[::-1].copy())  # rows of r^(_ROW-1) .. r^0
    sums = np.empty((rows, 6), dtype=np.uint64)
    step = max(1, _CHUNK_BLOCKS // _ROW)  # rows per chunk
    low = np.empty(step * _ROW, dtype=np.uint64)
    high = np.empty(step * _ROW, dtype=np.uint64)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        count = (r1 - r0) * _ROW
        words = np.ndarray(
            shape=(count,), dtype="<u8", buffer=padded, offset=r0 * _ROW * _BLOCK_BYTES, strides=(_BLOCK_BYTES,)
        )
        lo, hi = low[:count], high[:count]
        np.bitwise_and(words, _M28, out=lo)
        np.right_shift(words, _S28, out=hi)
        np.bitwise_and(hi, _M28, out=hi)  # drops the byte that belongs to the next block
        sums[r0:r1, :3] = lo.reshape(-1, _ROW) @ weights
        sums[r0:r1, 3:] = hi.reshape(-1, _ROW) @ weights
    return _eval(_combine(sums), pow(r, _ROW, P))


def poly_hash(message: bytes | bytearray | memoryview, r: int) -> int:
    """``H_r(message)`` (module docstring): the polynomial hash at point ``r`` in ``[1, p)``."""
    message = bytes(message)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r < P:
        raise ValueError(f"the evaluation point r must be an integer in [1, 2^61 - 1), got {r!r}")
    length = len(message)
    nblocks = -(-length // _BLOCK_BYTES)
    if nblocks <= _PY_BLOCKS:
        acc = 0
        for start in range(0, length, _BLOCK_BYTES):
            acc = (acc * r + int.from_bytes(message[start : start + _BLOCK_BYTES], "little")) % P
    else:
        acc = _message_poly(message, r)
    acc = (acc * r + length) % P  # the length block
    return acc * r % P  # no constant term


def tag(message: bytes | bytearray | memoryview, key: bytes | bytearray | memoryview) -> bytes:
    """The 8-byte tag ``(H_r(message) + s) mod p`` under a one-time 16-byte ``key``.

    Use each key for one message only. Forgery probability per attempt is at
    most ``(ceil(L/7) + 1)/(p − 1) + 2^-59`` for messages of up to ``L`` bytes
    (module docstring). Raises ValueError unless ``key`` is exactly 16 bytes.
    """
    r, s = _key_parts(key)
    return ((poly_hash(message, r) + s) % P).to_bytes(MAC_TAG_BYTES, "little")


def verify(
    message: bytes | bytearray | memoryview,
    tag_bytes: bytes | bytearray | memoryview,
    key: bytes | bytearray | memoryview,
) -> bool:
    """Whether ``tag_bytes`` is the tag of ``message`` under ``key`` (constant-time comparison).

    A tag of the wrong length is simply rejected; a key of the wrong length
    raises ValueError (a caller bug, not an attack).
    """
    expected = tag(message, key)
    return hmac.compare_digest(expected, bytes(tag_bytes))
