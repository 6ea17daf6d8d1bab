"""Error feedback (EF): make a biased, contractive codec converge.

Karimireddy et al. 2019 (EF-SGD); Stich et al. 2018. With residual e (0 at
the start), each round a client sends C(x + e) and keeps what was lost:

    y   = x + e
    out = C(y)                 (what the server receives)
    e  ← y − decode(out)

So Σ_t decode(out_t) + e_T = Σ_t x_t: nothing is lost, only delayed. The
residual is kept in float64 (``ctx.state["residual"]``, the client's state for
the tensor, kept between rounds by the caller), so the identity holds to
float64 rounding, including the float32 cast of y. The wrapper is invisible on the
wire: payloads are the inner codec's.

Cost: besides one inner encode and one inner decode, two passes over the
float64 residual, with no float64 temporaries: float32(e + x) is formed in one
pass straight into the buffer the inner codec reads, and e ← (e + x) − decode
in a second, blocked so each block of e stays in cache between its two
operations. The residual is updated in place and only after the inner codec has
succeeded, so a failed encode leaves the state exactly as it was.
"""

from __future__ import annotations

import numpy as np

from .codec import Codec, CodecTraits, EncodeContext

RESIDUAL = "residual"
_BLOCK = 1 << 15  # float64 elements per block of the residual update (256 KiB)


class ErrorFeedback(Codec):
    """``inner`` with error feedback; stateful."""

    def __init__(self, inner: Codec) -> None:
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]
        self.codec_id = inner.codec_id  # type: ignore[misc]
        t = inner.traits
        self.traits = CodecTraits(  # type: ignore[misc]
            unbiased=t.unbiased, contractive=t.contractive, commutes_with_sum=False, stateful=True, lossless=t.lossless
        )

    def encode(self, x: np.ndarray, ctx: EncodeContext | None = None) -> bytes:
        ctx = ctx if ctx is not None else EncodeContext()
        x = np.ascontiguousarray(x, dtype=np.float32)
        residual = ctx.state.get(RESIDUAL)
        if residual is None or residual.shape != x.shape:
            # The first round (or a changed shape): e = 0, so y = x.
            payload = self.inner.encode(x, ctx)
            ctx.state[RESIDUAL] = x.astype(np.float64) - self.inner.decode(payload)
            return payload
        if residual.dtype != np.float64 or not residual.flags.writeable or not residual.flags.c_contiguous:
            residual = np.array(residual, dtype=np.float64, order="C")  # e.g. a read-only array from a record
        y32 = np.add(residual, x, out=np.empty_like(x), casting="same_kind")  # float32(e + x), summed in float64
        payload = self.inner.encode(y32, ctx)
        decoded = np.asarray(self.inner.decode(payload), dtype=np.float32).reshape(-1)
        _update_residual(residual.reshape(-1), x.reshape(-1), decoded)
        ctx.state[RESIDUAL] = residual
        return payload

    def decode(self, payload: bytes) -> np.ndarray:
        return self.inner.decode(payload)

    def __repr__(self) -> str:
        return f"ErrorFeedback({self.inner!r})"


def _update_residual(e: np.ndarray, x: np.ndarray, decoded: np.ndarray) -> None:
    """e ← (e + x) − decoded, in place, in float64, block by block."""
    for start in range(0, e.size, _BLOCK):
        block = e[start : start + _BLOCK]
        np.add(block, x[start : start + _BLOCK], out=block)
        np.subtract(block, decoded[start : start + _BLOCK], out=block)
