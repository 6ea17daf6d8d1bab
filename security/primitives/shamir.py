"""Shamir secret sharing of byte strings over GF(65537), vectorised with numpy.

The secret (for secure aggregation: a client's packed self-mask) is cut into
16-bit chunks (little-endian; an odd length gets one zero byte of padding),
each an element of the prime field GF(p), ``p = 2^16 + 1 = 65537``. Every
chunk ``s`` gets its own random polynomial of degree ``t − 1``::

    f(x) = s + a_1 x + ... + a_{t−1} x^{t−1}   (mod p),  a_1 .. a_{t−1} uniform in GF(p)

and the share of the party at evaluation point ``x`` (``1 <= x < p``) is
``f(x)`` for every chunk. Coefficients come from the operating system's
CSPRNG (``secrets``) by rejection sampling, so they are exactly uniform.

Guarantees (information-theoretic, per chunk and so for the whole secret):

- any ``t`` shares at distinct points determine ``f`` and so ``s = f(0)``
  (Lagrange interpolation at 0, :func:`combine`);
- any ``t − 1`` shares are uniform on GF(p)^(t−1) whatever the secret: for
  every candidate ``s`` exactly one polynomial of degree ``< t`` passes through
  ``(0, s)`` and the ``t − 1`` given points, and it is as likely as any other.
  ``t − 1`` shares say nothing about the secret, to an unbounded adversary.

Arithmetic: values are below ``p < 2^17``, so a product of two is below
``2^34`` and a sum of up to ``2^29`` such products fits a uint64.

Wire form of a share: its values packed at 17 bits each with
:func:`qfl.security.primitives.masking.pack_ring` (``ceil(17·c/8)`` bytes for ``c``
chunks, :func:`share_bytes`); :func:`unpack_share` also rejects values
``>= p``.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

import numpy as np

from qfl.security.primitives.masking import key_bytes_needed, pack_ring, unpack_ring

__all__ = [
    "SHARE_BITS",
    "P",
    "chunk_count",
    "combine",
    "from_chunks",
    "lagrange_at_zero",
    "pack_share",
    "share_bytes",
    "split",
    "to_chunks",
    "unpack_share",
]

P = 65537  # 2^16 + 1, prime
SHARE_BITS = 17  # a share value is in [0, p) ⊂ [0, 2^17)
_P64 = np.uint64(P)
_BLOCK = 1 << 16  # chunks shared per step of split()


def chunk_count(secret_bytes: int) -> int:
    """Field elements (16-bit chunks) of a secret of ``secret_bytes`` bytes."""
    return (int(secret_bytes) + 1) // 2


def share_bytes(secret_bytes: int) -> int:
    """Bytes of one packed share of a secret of ``secret_bytes`` bytes: ``ceil(17 · chunks / 8)``."""
    return key_bytes_needed(chunk_count(secret_bytes), SHARE_BITS)


def to_chunks(secret: bytes | bytearray | memoryview) -> np.ndarray:
    """The secret as 16-bit little-endian chunks (uint64 values below 2^16 < p)."""
    data = bytes(secret)
    if len(data) % 2:
        data += b"\x00"
    return np.frombuffer(data, dtype="<u2").astype(np.uint64)


def from_chunks(chunks: np.ndarray, length: int) -> bytes:
    """Inverse of :func:`to_chunks`: ``length`` bytes; ValueError if a chunk is ``>= 2^16`` or padding is not zero."""
    chunks = np.asarray(chunks, dtype=np.uint64)
    if chunks.size != chunk_count(length):
        raise ValueError(f"{length} bytes take {chunk_count(length)} chunks, got {chunks.size}")
    if chunks.size and int(chunks.max()) >= 1 << 16:
        raise ValueError("a reconstructed chunk is >= 2^16: the shares are inconsistent")
    data = chunks.astype("<u2").tobytes()
    if len(data) > length and data[length:] != b"\x00":
        raise ValueError("the padding byte of the reconstructed secret is not zero: the shares are inconsistent")
    return data[:length]


def _uniform(shape: tuple[int, ...]) -> np.ndarray:
    """Exactly uniform elements of GF(p) from ``secrets``: 17 random bits, kept if below p (rejection)."""
    need = int(np.prod(shape, dtype=np.int64))
    out = np.empty(0, dtype=np.uint64)
    while out.size < need:
        draw = max(64, 2 * (need - out.size) + 64)  # about half of the 17-bit draws are below p
        raw = np.frombuffer(secrets.token_bytes(4 * draw), dtype="<u4").astype(np.uint64) & np.uint64((1 << 17) - 1)
        out = np.concatenate([out, raw[raw < _P64]])
    return out[:need].reshape(shape)


def _check_points(xs: Sequence[int]) -> list[int]:
    points = [int(x) for x in xs]
    if len(set(points)) != len(points):
        raise ValueError(f"evaluation points must be distinct, got {points}")
    bad = [x for x in points if not 1 <= x < P]
    if bad:
        raise ValueError(f"evaluation points must be in [1, {P}), got {bad}")
    return points


def split(chunks: np.ndarray, xs: Sequence[int], t: int) -> dict[int, np.ndarray]:
    """Shares of the field vector ``chunks`` (values ``< p``) at the points ``xs``, threshold ``t``.

    Returns ``{x: f(x)}`` (uint64 vectors like ``chunks``), ``f`` a fresh
    uniformly random polynomial of degree ``t − 1`` per chunk with ``f(0)`` the
    chunk. Any ``t`` of the shares give the chunks back (:func:`combine`); any
    ``t − 1`` are independent of them. Raises ValueError unless
    ``1 <= t <= len(xs)`` and the points are distinct in ``[1, p)``.
    """
    points = _check_points(xs)
    t = int(t)
    if not 1 <= t <= len(points):
        raise ValueError(f"threshold t = {t} must be in [1, {len(points)}] (the number of shares)")
    s = np.asarray(chunks, dtype=np.uint64).reshape(-1)
    if s.size and int(s.max()) >= P:
        raise ValueError(f"secret chunks must be below p = {P}")
    x = np.asarray(points, dtype=np.uint64)[:, None]
    out = np.empty((len(points), s.size), dtype=np.uint64)
    for start in range(0, s.size, _BLOCK):  # blocks bound the coefficients' memory: (t − 1) · _BLOCK values
        block = s[start : start + _BLOCK]
        acc = np.zeros((len(points), block.size), dtype=np.uint64)
        for a in _uniform((t - 1, block.size))[::-1]:  # Horner over a_{t−1} .. a_1: ((a_{t−1} x + ...) + a_1) x
            acc += a
            acc *= x
            acc %= _P64
        acc += block
        acc %= _P64
        out[:, start : start + block.size] = acc
    return {xv: out[k] for k, xv in enumerate(points)}


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """Weights ``λ_j = Π_{m≠j} x_m / (x_m − x_j) mod p`` with ``f(0) = Σ_j λ_j f(x_j)`` for ``deg f < len(xs)``."""
    points = _check_points(xs)
    weights = []
    for j, xj in enumerate(points):
        num, den = 1, 1
        for m, xm in enumerate(points):
            if m != j:
                num = num * xm % P
                den = den * (xm - xj) % P
        weights.append(num * pow(den, P - 2, P) % P)
    return weights


def combine(shares: Mapping[int, np.ndarray], t: int) -> np.ndarray:
    """The chunks from at least ``t`` shares ``{x: f(x)}``: Lagrange interpolation at 0 over the ``t`` lowest points.

    Raises ValueError with fewer than ``t`` shares or shares of unequal length.
    With ``t`` consistent shares the result is exact; shares that do not lie on
    one polynomial of degree ``< t`` give a wrong (not a failing) result, which
    is why every share is authenticated in transit.
    """
    t = int(t)
    if t < 1 or len(shares) < t:
        raise ValueError(f"{len(shares)} shares cannot reconstruct a secret of threshold {t}")
    points = sorted(int(x) for x in shares)[:t]
    weights = lagrange_at_zero(points)
    first = np.asarray(shares[points[0]], dtype=np.uint64)
    out = np.zeros(first.shape, dtype=np.uint64)
    for x, w in zip(points, weights):
        y = np.asarray(shares[x], dtype=np.uint64)
        if y.shape != first.shape:
            raise ValueError(f"share at x = {x} has {y.size} values, the share at x = {points[0]} has {first.size}")
        out = (out + y % _P64 * np.uint64(w)) % _P64
    return out


def pack_share(values: np.ndarray) -> bytes:
    """A share on the wire: its values packed at 17 bits (``share_bytes`` of the secret's length)."""
    return pack_ring(np.asarray(values, dtype=np.uint64), SHARE_BITS)


def unpack_share(data: bytes | bytearray | memoryview, chunks: int) -> np.ndarray:
    """Inverse of :func:`pack_share` for a share of ``chunks`` values; ValueError if malformed or a value is ``>= p``."""
    values = unpack_ring(data, SHARE_BITS, chunks)
    if values.size and int(values.max()) >= P:
        raise ValueError(f"a share value is >= p = {P}")
    return values
