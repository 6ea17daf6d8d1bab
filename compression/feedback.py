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

Deep Gradient Compression (Lin et al. 2018) adds four techniques on top; each
is an option here, off by default (:class:`DgcOptions`). With x the client's
update of this round, u its momentum (0 at the start), m ∈ [0, 1) and C the
clip norm:

1. local clipping: x ← x·min(1, C/||x||₂) (per tensor, before anything else);
2. momentum correction: u ← m·u + x, and the residual accumulates u, not x:
   y = e + u (so a coordinate held back keeps its momentum, as in dense
   momentum SGD, instead of losing it to the delay);
3. momentum-factor masking: after sending, u_i ← 0 where decode(out)_i ≠ 0,
   so a coordinate just sent does not keep pushing with stale momentum;
4. sparsity warm-up: the inner codec keeps ratio r_t of the coordinates at the
   client's t-th encode of this tensor (t = 0, 1, ...), falling exponentially
   from r_0 = ``warmup_start`` to the codec's own ratio r over
   ``warmup_rounds`` encodes: r_t = r_0·(r/r_0)^(t/W) for t < W, r after. The
   inner codec must offer ``with_ratio`` (topk, stc); t is counted per client
   in the state (``steps``), so a client that skips rounds continues its own
   schedule.

The conservation identity becomes Σ_t decode(out_t) + e_T = Σ_t u_t (with
clipping applied to x): what the momentum adds is sent, or still held, never
lost. With every option off the wrapper is plain EF, byte for byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .codec import Codec, CodecTraits, EncodeContext

RESIDUAL = "residual"
MOMENTUM = "momentum"
STEPS = "steps"
_BLOCK = 1 << 15  # float64 elements per block of the residual update (256 KiB)


@dataclass(frozen=True)
class DgcOptions:
    """DGC's techniques (module docstring); the defaults turn every one off.

    ``momentum``: m of momentum correction, in [0, 1) (0: off).
    ``clip``: the L2 norm each tensor's update is clipped to (0: off).
    ``momentum_masking``: zero the momentum where the codec sent a value (needs momentum > 0).
    ``warmup_rounds``: W, encodes over which the kept ratio falls to the codec's (0: off).
    ``warmup_start``: r_0, the kept ratio at the first encode, in (0, 1].
    """

    momentum: float = 0.0
    clip: float = 0.0
    momentum_masking: bool = False
    warmup_rounds: int = 0
    warmup_start: float = 0.25

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"codec.momentum must be in [0, 1) (0 turns momentum correction off), got {self.momentum}")
        if not (math.isfinite(self.clip) and self.clip >= 0.0):
            raise ValueError(f"codec.clip must be a finite norm >= 0 (0 turns clipping off), got {self.clip}")
        if self.momentum_masking and self.momentum == 0.0:
            raise ValueError("codec.momentum_masking needs momentum correction; set codec.momentum > 0 (DGC uses 0.9)")
        if self.warmup_rounds < 0:
            raise ValueError(f"codec.warmup_rounds must be >= 0 (0 turns the warm-up off), got {self.warmup_rounds}")
        if not 0.0 < self.warmup_start <= 1.0:
            raise ValueError(f"codec.warmup_start must be a ratio in (0, 1], got {self.warmup_start}")

    @property
    def active(self) -> bool:
        return self.momentum > 0.0 or self.clip > 0.0 or self.warmup_rounds > 0


def warmup_ratio(final: float, start: float, rounds: int, step: int) -> float:
    """r_t = r_0·(r/r_0)^(t/W) for t < W, else r (exponential decay of the kept ratio)."""
    if step >= rounds or start <= final:
        return final
    return start * (final / start) ** (step / rounds)


class ErrorFeedback(Codec):
    """``inner`` with error feedback and, optionally, DGC's techniques (:class:`DgcOptions`); stateful."""

    def __init__(self, inner: Codec, dgc: DgcOptions | None = None) -> None:
        self.inner = inner
        self.dgc = dgc if dgc is not None else DgcOptions()
        if self.dgc.warmup_rounds and not hasattr(inner, "with_ratio"):
            raise ValueError(
                f"codec.warmup_rounds needs a sparsifier with a kept ratio (topk, stc); {inner.name!r} has none; "
                "remove codec.warmup_rounds"
            )
        self.name = inner.name  # type: ignore[misc]
        self.codec_id = inner.codec_id  # type: ignore[misc]
        t = inner.traits
        self.traits = CodecTraits(  # type: ignore[misc]
            unbiased=t.unbiased, contractive=t.contractive, commutes_with_sum=False, stateful=True, lossless=t.lossless
        )

    def encode(self, x: np.ndarray, ctx: EncodeContext | None = None) -> bytes:
        ctx = ctx if ctx is not None else EncodeContext()
        if self.dgc.active:
            return self._encode_dgc(np.asarray(x, dtype=np.float32), ctx)
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

    def _encode_dgc(self, x: np.ndarray, ctx: EncodeContext) -> bytes:
        """EF with DGC's options (module docstring), in float64; the state changes only on success."""
        dgc, state = self.dgc, ctx.state
        g = x.astype(np.float64)
        if dgc.clip > 0.0:
            norm = float(np.linalg.norm(g))
            if norm > dgc.clip:  # NaN/Inf norms pass through, so the server still sees a diverged client
                g *= dgc.clip / norm
        residual, momentum, steps = state.get(RESIDUAL), state.get(MOMENTUM), state.get(STEPS)
        if dgc.momentum > 0.0:
            u = g if momentum is None or momentum.shape != x.shape else dgc.momentum * momentum + g
        else:
            u = g
        y = u if residual is None or residual.shape != x.shape else residual + u
        step = int(steps[0]) if steps is not None and steps.shape == (1,) else 0
        inner = self.inner
        if dgc.warmup_rounds:
            ratio = warmup_ratio(inner.ratio, dgc.warmup_start, dgc.warmup_rounds, step)  # type: ignore[attr-defined]
            inner = inner.with_ratio(ratio)  # type: ignore[attr-defined]
        payload = inner.encode(y.astype(np.float32), ctx)
        decoded = np.asarray(inner.decode(payload), dtype=np.float64).reshape(x.shape)
        state[RESIDUAL] = y - decoded
        if dgc.momentum > 0.0:
            state[MOMENTUM] = np.where(decoded != 0.0, 0.0, u) if dgc.momentum_masking else u
        state[STEPS] = np.array([step + 1], dtype=np.int64)
        return payload

    def decode(self, payload: bytes) -> np.ndarray:
        return self.inner.decode(payload)

    def __repr__(self) -> str:
        options = "" if not self.dgc.active else f", {self.dgc!r}"
        return f"ErrorFeedback({self.inner!r}{options})"


def _update_residual(e: np.ndarray, x: np.ndarray, decoded: np.ndarray) -> None:
    """e ← (e + x) − decoded, in place, in float64, block by block."""
    for start in range(0, e.size, _BLOCK):
        block = e[start : start + _BLOCK]
        np.add(block, x[start : start + _BLOCK], out=block)
        np.subtract(block, decoded[start : start + _BLOCK], out=block)
