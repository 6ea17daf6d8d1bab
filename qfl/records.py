"""Typed reads of Flower record values.

MetricRecord / ConfigRecord values are unions (int | float | str | bytes |
bool | lists of those); these helpers convert one value the way the built-in
`int(...)` / `float(...)` / a `for` loop would, with a type the checker can
use. A value the built-in cannot take raises TypeError, as the built-in does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, SupportsFloat, SupportsIndex, SupportsInt

# What a ConfigRecord holds (flwr's ConfigRecordValues).
ConfigValue = int | float | str | bytes | bool | list[int] | list[float] | list[str] | list[bytes] | list[bool]


def as_int(value: object) -> int:
    """int(value): a number or a string; TypeError for anything else (a list, ...)."""
    if isinstance(value, str | bytes | bytearray | SupportsInt | SupportsIndex):
        return int(value)
    raise TypeError(f"int() argument must be a string, a bytes-like object or a real number, not {type(value).__name__!r}")


def as_float(value: object) -> float:
    """float(value): a number or a string; TypeError for anything else (a list, ...)."""
    if isinstance(value, str | bytes | bytearray | SupportsFloat | SupportsIndex):
        return float(value)
    raise TypeError(f"float() argument must be a string or a real number, not {type(value).__name__!r}")


def as_iterable(value: object) -> Iterable[Any]:
    """value itself, for a `for` loop; TypeError if it is not iterable."""
    if isinstance(value, Iterable):
        return value
    raise TypeError(f"{type(value).__name__!r} object is not iterable")
