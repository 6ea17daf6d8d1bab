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
"""

from __future__ import annotations

import numpy as np

from .codec import Codec, CodecTraits, EncodeContext

RESIDUAL = "residual"


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
        y = np.asarray(x, dtype=np.float64)
        residual = ctx.state.get(RESIDUAL)
        if residual is not None and residual.shape == y.shape:
            y = y + residual
        payload = self.inner.encode(y.astype(np.float32), ctx)
        ctx.state[RESIDUAL] = y - self.inner.decode(payload)
        return payload

    def decode(self, payload: bytes) -> np.ndarray:
        return self.inner.decode(payload)

    def __repr__(self) -> str:
        return f"ErrorFeedback({self.inner!r})"
