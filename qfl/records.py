"""Typed reads of Flower record values.

MetricRecord / ConfigRecord values are unions (int | float | str | bytes |
bool | lists of those); these helpers convert one value the way the built-in
`int(...)` / `float(...)` / `str(...)` would, with a return type the checker
can use. A value the built-in cannot convert raises TypeError as before.
"""

from __future__ import annotations


def as_int(value: object) -> int:
    """int(value) for a scalar record value (int, float, bool, str, bytes)."""
    if isinstance(value, int | float | str | bytes):
        return int(value)
    raise TypeError(f"int() argument must be a number or a string, not {type(value).__name__!r}")


def as_float(value: object) -> float:
    """float(value) for a scalar record value (int, float, bool, str, bytes)."""
    if isinstance(value, int | float | str | bytes):
        return float(value)
    raise TypeError(f"float() argument must be a number or a string, not {type(value).__name__!r}")


def as_list(value: object) -> list:
    """A list-valued record entry; anything else raises TypeError."""
    if isinstance(value, list):
        return value
    raise TypeError(f"expected a list, got {type(value).__name__!r}")
