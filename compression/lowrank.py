"""PowerSGD: low-rank compression by one warm-started power iteration.

Vogels, Karimireddy & Jaggi, "PowerSGD: Practical Low-Rank Gradient
Compression for Distributed Optimization", NeurIPS 2019.
"""

from __future__ import annotations

import math
import numbers
import struct

import numpy as np

from .codec import Codec, CodecError, CodecReason, CodecTraits, EncodeContext
from .wire import pack_header, unpack_header


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(n, m) = (shape[0], prod(shape[1:])): a conv kernel (out, in, kh, kw) is out × (in·kh·kw)."""
    return int(shape[0]), math.prod(shape[1:])


class PowerSGDCodec(Codec):
    """Rank-r approximation M ≈ P Qᵀ of each tensor by one power iteration.

    A tensor with ndim ≥ 2 is viewed as the matrix M of shape n × m with
    n = shape[0], m = prod(shape[1:]) (conv kernels are reshaped), and
    r = min(rank, n, m). Each round::

        Q ← ctx.state["q"] if it is a finite, non-zero (m, r) array,
            else a standard normal (m, r) matrix drawn from ctx.seed
        P ← orthonormalise(M Q)          (reduced QR)
        Q ← Mᵀ P;  ctx.state["q"] ← Q    (warm start for the next round)
        decode = P Qᵀ = P Pᵀ M           (M projected on span(P))

    Reusing Q makes successive rounds continue the subspace iteration, so on a
    slowly changing M the approximation approaches the best rank-r one; a
    matrix of rank ≤ r is reproduced up to float32 rounding. Tensors with
    ndim < 2 (biases, norms, scalars) are sent as raw float32 by this same
    codec: they are small, and a rank-1 "matrix" of a vector saves nothing.

    Wire body after the header (little-endian; the header's ndim says which)::

        ndim < 2:   numel × float32   the tensor as is
        ndim ≥ 2:   uint32 r
                    n·r × float32     P, row-major (n × r, orthonormal columns)
                    m·r × float32     Q, row-major (m × r)

    Bits per matrix: 32·r·(n + m) + 32 for r, plus 8·(6 + 4·ndim) for the
    header; a vector costs 32 bits per coordinate. The decoder refuses a rank
    above its own ``rank`` (so a payload cannot make it multiply at full rank).

    Algebra: biased; contractive in practice (an orthogonal projection never
    increases the norm, and the error shrinks as the iteration converges, but
    δ > 0 is not guaranteed round by round); stateful (it keeps Q per tensor in
    ``ctx.state``; without a context, each call starts cold); does not commute
    with sum (each client's P and Q are its own).
    """

    name = "powersgd"
    codec_id = 9
    traits = CodecTraits(
        unbiased=False, contractive=True, commutes_with_sum=False, stateful=True, lossless=False
    )

    def __init__(self, rank: int = 2) -> None:
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
            raise ValueError(f"powersgd rank must be an integer >= 1, got {rank!r}")
        if rank < 1:
            raise ValueError(f"powersgd rank must be >= 1, got {rank}")
        self.rank: int = int(rank)

    def __repr__(self) -> str:
        return f"PowerSGDCodec(rank={self.rank})"

    def _warm_start(self, ctx: EncodeContext, m: int, r: int) -> np.ndarray:
        q = ctx.state.get("q")
        if (
            isinstance(q, np.ndarray)
            and q.shape == (m, r)
            and np.isfinite(q).all()
            and np.any(q)  # an all-zero Q (after an all-zero M) would stay zero forever
        ):
            return q.astype(np.float32, copy=False)
        rng = np.random.default_rng(int(ctx.seed) & ((1 << 64) - 1))
        return rng.standard_normal((m, r), dtype=np.float32)

    def encode(self, x: np.ndarray, ctx: EncodeContext | None = None) -> bytes:
        x = np.asarray(x, dtype="<f4")
        header = pack_header(self.codec_id, x.dtype, x.shape)
        if x.ndim < 2:
            return header + x.tobytes(order="C")
        n, m = _matrix_shape(x.shape)
        r = min(self.rank, n, m)
        if r == 0:
            return header + struct.pack("<I", 0)
        ctx = ctx if ctx is not None else EncodeContext()
        matrix = x.reshape(n, m)
        p = matrix @ self._warm_start(ctx, m, r)
        if np.isfinite(p).all():
            p, _ = np.linalg.qr(p)  # reduced: n × r, orthonormal columns
        # else: leave the NaN/Inf in P so the server's non-finite check refuses it
        p = np.ascontiguousarray(p, dtype="<f4")
        q = np.ascontiguousarray(matrix.T @ p, dtype="<f4")
        ctx.state["q"] = q
        return b"".join((header, struct.pack("<I", r), p.tobytes(), q.tobytes()))

    def decode(self, payload: bytes) -> np.ndarray:
        header = unpack_header(payload, self.codec_id)
        body = memoryview(payload)[header.size :]
        shape = header.shape
        if len(shape) < 2:
            expected = 4 * header.numel
            if len(body) != expected:
                raise CodecError(
                    f"powersgd payload for the {len(shape)}-d shape {shape} needs {expected} "
                    f"raw float32 body bytes, got {len(body)}", reason=CodecReason.WRONG_LENGTH
                )
            return np.frombuffer(body, dtype="<f4").astype(np.float32).reshape(shape)
        n, m = _matrix_shape(shape)
        if len(body) < 4:
            raise CodecError(f"powersgd body of {len(body)} bytes is shorter than its 4-byte rank field", reason=CodecReason.TRUNCATED)
        (r,) = struct.unpack_from("<I", body)
        top = min(self.rank, n, m)  # the encoder sends r = min(rank, n, m); the decode costs O(n·m·r)
        if r > top or (r == 0 and min(n, m) > 0):
            raise CodecError(
                f"powersgd payload has rank {r} for a {n} × {m} matrix; this decoder (rank={self.rank}) "
                f"accepts 1 ≤ r ≤ {top}", reason=CodecReason.BAD_PARAMETER
            )
        expected = 4 + 4 * r * (n + m)
        if len(body) != expected:
            raise CodecError(
                f"powersgd payload of rank {r} for a {n} × {m} matrix needs a {expected}-byte body, got {len(body)}", reason=CodecReason.WRONG_LENGTH
            )
        if r == 0:
            return np.zeros(shape, dtype=np.float32)
        p = np.frombuffer(body, dtype="<f4", count=n * r, offset=4).reshape(n, r)
        q = np.frombuffer(body, dtype="<f4", count=m * r, offset=4 + 4 * n * r).reshape(m, r)
        # A tampered P or Q may overflow: the Inf/NaN goes to the caller's finiteness check.
        with np.errstate(over="ignore", invalid="ignore"):
            return np.asarray(p @ q.T, dtype=np.float32).reshape(shape)
