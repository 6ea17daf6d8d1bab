"""The integer form of codecs that commute with sum, for masked (secure) sums.

A codec declares ``commutes_with_sum`` when, given parameters shared by every
client of a round, the sum of the clients' encodings decodes to the sum of
their inputs. This module makes that concrete. With a round-shared clip bound
``C`` and ``s`` quantization steps, every coordinate ``x`` is clipped to
``[-C, C]`` and sent as an integer code on the grid ``-C + k·Δ``, ``Δ = 2C/s``:

    t = (clip(x) + C) / Δ ∈ [0, s],   k = ⌊t⌋ + 1 with probability t − ⌊t⌋, else ⌊t⌋.

So ``E[k·Δ − C] = clip(x)`` (unbiased inside the clip bound) and
``Var ≤ Δ²/4``. Codes are non-negative and at most ``s``, so the sum of ``n``
clients' codes is at most ``n·s`` and fits a ring of
``B = bit_length(n·s)`` bits exactly; the server decodes the *sum* as
``Σk·Δ − n·C`` without ever seeing one client's codes.

The codecs and their forms (:func:`sum_form`):

    fp32           s = 2^32 − 1 (32-bit fixed point)       every coordinate
    qsgd bits=b    s = 2^b − 1  (QSGD's grid, shared scale) every coordinate
    ternary        s = 2        ({−C, 0, C}, TernGrad)      every coordinate
    randk          s from its ``bits`` (32 → 2^32 − 1)      k coordinates from the
                   round-shared seed, values scaled by d/k before clipping

Bits per client and coordinate sent: ``B``; key per pairwise mask: ``B`` bits
per coordinate sent (``qfl.security.primitives.masking``).

Clipping is the only bias: a coordinate with ``|x| > C`` contributes ``±C``.
The clip bound trades that bias against the rounding variance ``C²/s²``: a
coarse grid wants a small ``C`` that clips a few percent, a fine one a ``C``
that clips almost nothing. The target clipped share is ``τ = min(0.2, 0.4/s)``
(13% at s = 3, 2.7% at s = 15, 0.16% at s = 255, none for fp32), close to the
MSE-optimal clip of a Laplace-distributed update for each ``s``.
:func:`encode_codes` reports, per tensor, whether the client clipped more than
``τ`` of the coordinates (*over*) and whether it would clip at most ``τ`` at
``C/2`` (*under*); the server sums those flags inside the masked sum and adapts
``C`` per tensor (:func:`adapt_clip`), learning only how many clients raised
each flag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .codec import Codec
from .sparsify import randk_support, support_size

__all__ = ["SumForm", "adapt_clip", "decode_code_sum", "encode_codes", "sum_form", "summable_codec_names"]

_FP32_LEVELS = (1 << 32) - 1


def summable_codec_names() -> str:
    """What an error message names as the codecs a masked sum accepts."""
    return "fp32, qsgd (codec.bits=1..8), ternary, randk (codec.ratio, codec.bits)"


@dataclass(frozen=True)
class SumForm:
    """How a codec's update becomes integers that add up across clients.

    ``levels``: codes are integers in ``[0, levels]``.
    ``ratio``: rand-k's share of coordinates (None: all coordinates).
    """

    levels: int
    ratio: float | None = None

    def ring_bits(self, n_clients: int) -> int:
        """``B = bit_length(n·s)``: the n clients' code sum never wraps a B-bit ring."""
        return max(1, (n_clients * self.levels).bit_length())

    def support(self, seed: int, d: int) -> np.ndarray | None:
        """The coordinates sent for a tensor of ``d`` elements (None: all)."""
        if self.ratio is None:
            return None
        return randk_support(int(seed) & ((1 << 64) - 1), d, support_size(self.ratio, d))

    @property
    def clip_share(self) -> float:
        """τ: the share of coordinates a client may clip before the bound should grow."""
        return min(0.2, 0.4 / self.levels)

    def coords(self, seed: int, d: int) -> int:
        """How many codes a tensor of ``d`` elements contributes."""
        return d if self.ratio is None else support_size(self.ratio, d)


def sum_form(codec: Codec) -> SumForm:
    """The integer form of ``codec``; ValueError naming the accepted codecs if it has none."""
    name = getattr(codec, "name", type(codec).__name__)
    if not codec.traits.commutes_with_sum or codec.traits.stateful:
        raise ValueError(
            f"codec {name!r} does not commute with sum (its encodings cannot be added under masks); "
            f"masked sums accept {summable_codec_names()}; use security=channel-pad for any codec"
        )
    if name == "fp32":
        return SumForm(_FP32_LEVELS)
    if name == "qsgd":
        return SumForm((1 << int(codec.bits)) - 1)
    if name == "ternary":
        return SumForm(2)
    if name == "randk":
        bits = int(getattr(codec, "bits", 32))
        return SumForm(_FP32_LEVELS if bits >= 32 else (1 << bits) - 1, float(codec.ratio))
    raise ValueError(f"codec {name!r} declares commutes_with_sum but has no integer form here; add it to sum_form")


def encode_codes(
    x: np.ndarray, form: SumForm, clip: float, seed: int, rng: np.random.Generator
) -> tuple[np.ndarray, int, int]:
    """One tensor's codes (uint64, on the support) and its two flags (over, under).

    ``over`` = 1 if more than ``form.clip_share`` of the sent values exceed ``clip``;
    ``under`` = 1 if at most that share exceeds ``clip/2``.
    Raises ValueError on NaN/Inf (a masked sum would hide them from the server).
    """
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.isfinite(flat).all():
        raise ValueError("the update holds NaN or Inf; refusing to mask it (the sum would hide it)")
    support = form.support(seed, flat.size)
    if support is not None:
        flat = flat[support] * (flat.size / max(len(support), 1))
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip bound must be a positive finite number, got {clip!r}")
    big = np.abs(flat)
    allowed = form.clip_share * flat.size
    over = int(np.count_nonzero(big > clip) > allowed)
    under = int(np.count_nonzero(big > clip / 2) <= allowed)
    t = (np.clip(flat, -clip, clip) + clip) * (form.levels / (2.0 * clip))
    np.clip(t, 0.0, float(form.levels), out=t)
    low = np.floor(t)
    codes = low + (rng.random(t.size) < (t - low))
    return codes.astype(np.uint64), over, under


def decode_code_sum(
    code_sum: np.ndarray, form: SumForm, clip: float, n_clients: int, seed: int, shape: tuple[int, ...]
) -> np.ndarray:
    """The sum of ``n_clients`` decoded tensors (float64, dense) from the sum of their codes."""
    d = math.prod(shape)
    step = 2.0 * clip / form.levels
    values = np.asarray(code_sum, dtype=np.uint64).astype(np.float64) * step - n_clients * clip
    support = form.support(seed, d)
    if support is None:
        return values.reshape(shape)
    out = np.zeros(d, dtype=np.float64)
    out[support] = values
    return out.reshape(shape)


def adapt_clip(clip: float, over: int, under: int, n_clients: int) -> float:
    """Next round's clip bound from the summed flags: double it if any client clipped
    more than its share, halve it if every client would stay within its share at half, else keep it."""
    if over > 0:
        return clip * 2.0
    if n_clients > 0 and under >= n_clients:
        return clip / 2.0
    return clip
