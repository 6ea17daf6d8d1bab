"""Codec names and parameters from the config to codec objects.

``make_codec(name, params)`` is the one place a codec is built. Parameters
(``codec.NAME`` keys in the config) are checked here, so a bad value stops a
run before round 1:

    fp32, fp16, bf16, ternary     no parameters
    qsgd       bits (1..8, default 4), bucket (>= 1, default 512)
    sign       —                          error feedback on by default
    topk       ratio (0 < ratio <= 1), values (fp16|fp32)   error feedback on
    randk      ratio (0 < ratio <= 1), bits (32 = float32 values, default; 1..8 = QSGD grid)
    powersgd   rank (>= 1)                error feedback on by default
    stc        ratio (0 < ratio <= 1)     error feedback on by default (Sattler et al. 2019)
    every codec: entropy (none|zstd|zlib), feedback (true|false)
    with feedback, DGC's options (``feedback.DgcOptions``): momentum ([0, 1)), clip (>= 0),
    momentum_masking (true|false), warmup_rounds (>= 0; topk and stc only), warmup_start ((0, 1])

Stochastic codecs (qsgd, ternary, randk with bits < 32) draw their rounding noise from ``seed``;
callers pass one per client and round so runs are reproducible and clients'
noise is independent.

``make_summable_codec(name, params)`` builds the codec of a masked sum (its
ring form, ``Codec.encode_ring``) and refuses, naming the parameter and the
fix, what has no ring form: a codec that does not commute with sum,
``codec.entropy``, ``codec.feedback=true`` and the codec's own
``ring_refuses`` (qsgd's ``codec.bucket``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .codec import Codec
from .entropy import EntropyCodec
from .feedback import DgcOptions, ErrorFeedback
from .identity import Fp32Codec
from .lowrank import PowerSGDCodec
from .quantizers import Bf16Codec, Fp16Codec, QsgdCodec, SignCodec, TernaryCodec
from .sparsify import RandKCodec, STCCodec, TopKCodec
from .summable import summable_codec_names

# name -> (class, {parameter: type}, error feedback by default)
_CODECS: dict[str, tuple[type[Codec], dict[str, type], bool]] = {
    "fp32": (Fp32Codec, {}, False),
    "fp16": (Fp16Codec, {}, False),
    "bf16": (Bf16Codec, {}, False),
    "qsgd": (QsgdCodec, {"bits": int, "bucket": int}, False),
    "ternary": (TernaryCodec, {}, False),
    "sign": (SignCodec, {}, True),
    "topk": (TopKCodec, {"ratio": float, "values": str}, True),
    "stc": (STCCodec, {"ratio": float}, True),
    "randk": (RandKCodec, {"ratio": float, "bits": int}, False),
    "powersgd": (PowerSGDCodec, {"rank": int}, True),
}
_FEEDBACK_OPTIONS = {
    "momentum": float, "clip": float, "momentum_masking": bool, "warmup_rounds": int, "warmup_start": float,
}
_COMMON = {"entropy": str, "feedback": bool, **_FEEDBACK_OPTIONS}
_STOCHASTIC = {"qsgd", "ternary", "randk"}
ENTROPY_METHODS = ("none", "zstd", "zlib")


def codec_names() -> list[str]:
    """Names accepted by the ``codec`` config key."""
    return list(_CODECS)


def _typed(codec: str, key: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"codec.{key} for {codec} must be {kind.__name__}, got {value!r}")
    return value


def make_codec(name: str, params: Mapping[str, Any] | None = None, seed: int | None = None) -> Codec:
    """Build the codec called ``name``; raise ValueError naming the valid choices."""
    if name not in _CODECS:
        raise ValueError(f"unknown codec {name!r}; choose one of: {', '.join(codec_names())}")
    cls, accepted, feedback_default = _CODECS[name]
    params = dict(params or {})
    unknown = sorted(set(params) - set(accepted) - set(_COMMON))
    if unknown:
        valid = ", ".join(f"codec.{k}" for k in [*accepted, *_COMMON])
        raise ValueError(f"codec {name!r} does not take {', '.join('codec.' + k for k in unknown)}; it takes {valid}")
    kwargs = {k: _typed(name, k, v, accepted[k]) for k, v in params.items() if k in accepted}
    if name in _STOCHASTIC:
        kwargs["seed"] = seed
    codec: Codec = cls(**kwargs)
    dgc = {k: _typed(name, k, v, _FEEDBACK_OPTIONS[k]) for k, v in params.items() if k in _FEEDBACK_OPTIONS}
    if _typed(name, "feedback", params.get("feedback", feedback_default), bool):
        codec = ErrorFeedback(codec, DgcOptions(**dgc))
    elif dgc:
        raise ValueError(
            f"codec.{sorted(dgc)[0]} is an option of error feedback, which is off for {name!r}; "
            "set codec.feedback=true or remove it"
        )
    entropy = _typed(name, "entropy", params.get("entropy", "none"), str)
    if entropy not in ENTROPY_METHODS:
        raise ValueError(f"codec.entropy must be one of {', '.join(ENTROPY_METHODS)}, got {entropy!r}")
    if entropy != "none":
        codec = EntropyCodec(codec, entropy)
    return codec


def make_summable_codec(name: str, params: Mapping[str, Any] | None = None, seed: int | None = None) -> Codec:
    """The codec ``name`` for a masked sum, every parameter checked for a ring form.

    Raises ValueError naming the cause and the fix if the codec does not
    commute with sum, or a parameter would be ignored by its ring form:
    ``codec.entropy`` other than none (the server adds ring codes, never
    compressed bytes), ``codec.feedback=true`` (a per-client residual is
    state the sum cannot carry), or one of the codec's ``ring_refuses``.
    """
    params = dict(params or {})
    if name in _CODECS and not _CODECS[name][0].traits.commutes_with_sum:
        raise ValueError(
            f"codec {name!r} does not commute with sum (its encodings cannot be added under masks); "
            f"masked sums accept {summable_codec_names()}; use security=channel-pad for any codec"
        )
    codec = make_codec(name, params, seed)  # unknown names and bad values first
    entropy = params.get("entropy", "none")
    if entropy != "none":
        raise ValueError(
            f"codec.entropy={entropy} has no ring form: a masked sum adds integer codes, never compressed "
            "bytes; remove codec.entropy (or use security=channel-pad to compress)"
        )
    if codec.traits.stateful:
        raise ValueError(
            f"codec.feedback=true keeps a per-client residual, which a masked sum of codec {name!r} cannot "
            "carry; set codec.feedback=false (or use security=channel-pad)"
        )
    refused = sorted(set(params) & set(type(codec).ring_refuses))
    if refused:
        raise ValueError(f"codec.{refused[0]} for {name}: {type(codec).ring_refuses[refused[0]]}")
    codec.ring_levels()  # ValueError if the codec declares commutes_with_sum but has no ring form
    return codec
