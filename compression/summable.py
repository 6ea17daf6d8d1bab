"""The codec-independent half of masked (secure) sums: flags, ring size, the clip bound.

A codec declares ``commutes_with_sum`` when, given parameters shared by every
client of a round, the sum of the clients' encodings decodes to the sum of
their inputs. Such a codec provides its own ring encoding
(:meth:`~qfl.compression.codec.Codec.encode_ring`, :meth:`~.Codec.ring_levels`,
:meth:`~.Codec.decode_ring_sum`; ``codec.py``): with a round-shared clip bound
``C`` and ``s`` levels, every sent coordinate ``x`` is clipped to ``[-C, C]``
and sent as an integer ``k ∈ [0, s]`` of the grid ``-C + k·Δ``, ``Δ = 2C/s``,
by the codec's own stochastic rounding (QSGD's quantizer with ``m = C``,
TernGrad's with scale ``C``), so ``E[k·Δ − C] = clip(x)`` and
``Var ≤ Δ²/4 = C²/s²``. Codes are non-negative and at most ``s``, so the sum of
``n`` clients' codes is at most ``n·s`` and fits a ring of
``B = bit_length(n·s)`` bits exactly (:func:`ring_bits`); the server decodes
the *sum* as ``Σk·Δ − n·C`` without ever seeing one client's codes.

This module holds what is the same for every codec: the input check
(:func:`ring_input`), the clip flags (:func:`clip_flags`), the ring size, the
grid's sum decoding (:func:`decode_grid_sum`), the 32-bit fixed-point grid of
codecs that have no quantizer of their own (fp32, rand-k with float32 values:
:func:`grid_codes`), and the clip adaptation (:func:`adapt_clip`). It names no
codec; ``qfl.compression.registry.make_summable_codec`` builds a codec for a
masked sum and refuses parameters that have no ring form.

Bits per client and coordinate sent: ``B``; key per pairwise mask: ``B`` bits
per coordinate sent (``qfl.security.primitives.masking``).

Clipping is the only bias: a coordinate with ``|x| > C`` contributes ``±C``.
The clip bound trades that bias against the rounding variance ``C²/s²``: a
coarse grid wants a small ``C`` that clips a few percent, a fine one a ``C``
that clips almost nothing. The target clipped share is ``τ = min(0.2, 0.4/s)``
(13% at s = 3, 2.7% at s = 15, 0.16% at s = 255, none for fp32), close to the
MSE-optimal clip of a Laplace-distributed update for each ``s``.
:func:`clip_flags` reports, per tensor, whether the client clipped more than
``τ`` of the coordinates (*over*) and whether it would clip at most ``τ`` at
``C/2`` (*under*); the server sums those flags inside the masked sum and adapts
``C`` per tensor (:func:`adapt_clip`), learning only how many clients raised
each flag.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "FIXED_POINT_LEVELS",
    "adapt_clip",
    "clip_flags",
    "clip_share",
    "decode_grid_sum",
    "grid_codes",
    "ring_bits",
    "ring_input",
    "summable_codec_names",
]

FIXED_POINT_LEVELS = (1 << 32) - 1  # s of the 32-bit fixed-point grid (fp32, rand-k with float32 values)
MIN_CLIP = 2.0**-100  # adapt_clip keeps C in [MIN_CLIP, MAX_CLIP]: float32 codecs form s/2C finitely
MAX_CLIP = 2.0**100


def summable_codec_names() -> str:
    """What an error message names as the codecs a masked sum accepts."""
    return "fp32, qsgd (codec.bits=1..8), ternary, randk (codec.ratio, codec.bits)"


def ring_bits(levels: int, n_clients: int) -> int:
    """``B = bit_length(n·s)``: the sum of n clients' codes in ``[0, s]`` never wraps a B-bit ring."""
    return max(1, (int(n_clients) * int(levels)).bit_length())


def clip_share(levels: int) -> float:
    """τ = min(0.2, 0.4/s): the share of coordinates a client may clip before the bound should grow."""
    return min(0.2, 0.4 / levels)


def ring_input(x: np.ndarray, clip: float) -> np.ndarray:
    """``x`` flattened to float64, after checking it and the clip bound.

    Raises ValueError on NaN/Inf (a masked sum would hide them from the server)
    and on a clip bound that is not a positive finite number.
    """
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.isfinite(flat).all():
        raise ValueError("the update holds NaN or Inf; refusing to mask it (the sum would hide it)")
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip bound must be a positive finite number, got {clip!r}")
    return flat


def clip_flags(values: np.ndarray, clip: float, levels: int) -> tuple[int, int]:
    """(over, under) of the sent ``values``: over = 1 if more than τ·size exceed ``clip``
    (:func:`clip_share`), under = 1 if at most τ·size exceed ``clip/2``."""
    big = np.abs(values)
    allowed = clip_share(levels) * values.size
    over = int(np.count_nonzero(big > clip) > allowed)
    under = int(np.count_nonzero(big > clip / 2) <= allowed)
    return over, under


def grid_codes(values: np.ndarray, clip: float, levels: int, rng: np.random.Generator) -> np.ndarray:
    """Codes (uint64) of ``values`` on the grid ``-C + k·Δ``, ``Δ = 2C/s``, by stochastic rounding in float64.

    ``t = (clip(x) + C)/Δ ∈ [0, s]``, ``k = ⌊t⌋ + 1`` with probability ``t − ⌊t⌋``, else ``⌊t⌋``:
    ``E[k·Δ − C] = clip(x)``, ``Var ≤ Δ²/4``. One ``rng.random`` per value.
    The ring form of codecs without a quantizer of their own (fp32, rand-k with
    float32 values), at ``s`` = :data:`FIXED_POINT_LEVELS`.
    """
    flat = np.asarray(values, dtype=np.float64)
    t = (np.clip(flat, -clip, clip) + clip) * (levels / (2.0 * clip))
    np.clip(t, 0.0, float(levels), out=t)
    low = np.floor(t)
    codes = low + (rng.random(t.size) < (t - low))
    return codes.astype(np.uint64)


def decode_grid_sum(code_sum: np.ndarray, clip: float, levels: int, n_clients: int) -> np.ndarray:
    """``Σk·Δ − n·C`` (float64): the sum of ``n_clients`` decoded values from the sum of their codes."""
    step = 2.0 * clip / levels
    return np.asarray(code_sum, dtype=np.uint64).astype(np.float64) * step - n_clients * clip


def adapt_clip(clip: float, over: int, under: int, n_clients: int) -> float:
    """Next round's clip bound from the summed flags: double it if any client clipped
    more than its share, halve it if every client would stay within its share at half, else keep it;
    never outside [:data:`MIN_CLIP`, :data:`MAX_CLIP`] (a tensor whose updates stay zero halves C every round)."""
    if over > 0:
        return min(clip * 2.0, MAX_CLIP)
    if n_clients > 0 and under >= n_clients:
        return max(clip / 2.0, MIN_CLIP)
    return clip
