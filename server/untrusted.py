"""Validators for values a client sends (metrics, counts, ids): all untrusted.

A client is free to send anything a MetricRecord can hold: NaN, ±inf,
1.7e308, negative numbers, booleans, strings, lists. Every value the server
uses is passed through one of these functions first. Each returns a clean
Python ``int``/``float`` or raises :class:`UntrustedValue` whose message names
the field, the bad value and the rule it broke, so the caller can drop that
client with the message as its reason and carry on.

Guarantees
----------
- ``finite_float(v)`` is a finite float (never NaN/±inf) with lo <= v <= hi.
- ``int_in_range(v)`` is an int with lo <= v <= hi (an integral float such as
  3.0 is accepted; 3.5, NaN, inf and bool are not).
- ``capped_examples(v, cap)`` is an int with 1 <= v <= cap, so one client's
  share of an example-weighted mean is at most cap / (cap + others).
"""

from __future__ import annotations

import math
from numbers import Integral, Real

from qfl.errors import UntrustedReason, UntrustedValue

__all__ = ["UntrustedValue", "finite_float", "int_in_range", "capped_examples"]


def _show(value: object) -> str:
    """A short repr: client values may be huge (repr of a 10**5000 int even raises)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"<an integer of {value.bit_length()} bits>"
    try:
        text = repr(value)
    except Exception:  # a hostile object's __repr__
        return f"<a {type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def finite_float(value: object, name: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    """``value`` as a finite float in [lo, hi]; else raise UntrustedValue."""
    if not _is_number(value):
        raise UntrustedValue(f"{name!r} must be a number, got {type(value).__name__} {_show(value)}", reason=UntrustedReason.WRONG_TYPE, key=name)
    try:
        out = float(value)  # type: ignore[arg-type]
    except (OverflowError, ValueError) as err:  # an int too large for a float
        raise UntrustedValue(f"{name!r} = {_show(value)} is not representable as a float", reason=UntrustedReason.NOT_FINITE, key=name) from err
    if not math.isfinite(out):
        raise UntrustedValue(f"{name!r} must be finite, got {out!r}", reason=UntrustedReason.NOT_FINITE, key=name)
    if not lo <= out <= hi:
        raise UntrustedValue(f"{name!r} = {out!r} is outside [{lo}, {hi}]", reason=UntrustedReason.OUT_OF_RANGE, key=name)
    return out


def int_in_range(value: object, name: str, lo: int, hi: int) -> int:
    """``value`` as an int in [lo, hi] (an integral float is accepted); else raise UntrustedValue."""
    if not _is_number(value):
        raise UntrustedValue(f"{name!r} must be an integer, got {type(value).__name__} {_show(value)}", reason=UntrustedReason.WRONG_TYPE, key=name)
    if isinstance(value, Integral):
        out = int(value)
    else:
        as_float = float(value)  # type: ignore[arg-type]
        if not math.isfinite(as_float) or not as_float.is_integer():
            raise UntrustedValue(f"{name!r} must be an integer, got {as_float!r}", reason=UntrustedReason.WRONG_TYPE, key=name)
        out = int(as_float)
    if not lo <= out <= hi:
        raise UntrustedValue(f"{name!r} = {_show(value)} is outside [{lo}, {hi}]", reason=UntrustedReason.OUT_OF_RANGE, key=name)
    return out


def capped_examples(value: object, cap: int, name: str = "num-examples") -> int:
    """A client's example count as an int in [1, cap]; else raise UntrustedValue.

    Counts above ``cap`` are rejected rather than clipped: a client claiming
    more examples than the server knows it holds is lying, and clipping would
    still hand it the largest possible weight.
    """
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}; set max_client_examples to a positive integer")
    return int_in_range(value, name, 1, cap)
