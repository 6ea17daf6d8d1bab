"""Codec names from the config to codec objects."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .codec import Codec
from .identity import Fp32Codec

_CODECS: dict[str, type[Codec]] = {cls.name: cls for cls in (Fp32Codec,)}


def codec_names() -> list[str]:
    """Names accepted by the ``codec`` config key."""
    return sorted(_CODECS)


def make_codec(name: str, params: Mapping[str, Any] | None = None) -> Codec:
    """Build the codec called ``name``; raise ValueError naming the valid choices."""
    cls = _CODECS.get(name)
    if cls is None:
        raise ValueError(f"unknown codec {name!r}; choose one of: {', '.join(codec_names())}")
    if params:
        raise ValueError(f"codec {name!r} takes no parameters, got: {', '.join(sorted(params))}")
    return cls()
