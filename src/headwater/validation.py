"""Argument checks at the public boundary, one message shape everywhere (after scikit-learn's ``check_scalar``).

Each helper returns the cleaned value or raises with ``"{name} must be {expected}, got {value!r}"``
plus, where it helps, what to do. A value of the wrong type raises ``TypeError``, a value of the
right type outside its range ``ValueError``. ``bool`` is never accepted as a number: ``True``
as a batch size is a bug, not a 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["check_int", "check_number", "check_choice", "check_seed"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_phrase(low: int | None) -> str:
    if low == 1:
        return "a positive integer"
    if low == 0:
        return "a non-negative integer"
    return "an integer" if low is None else f"an integer >= {low}"


def check_int(value: Any, name: str, *, low: int | None = 1, high: int | None = None, allow_none: bool = False) -> Any:
    """``value`` as an int in ``[low, high]`` (None allowed with ``allow_none``)."""
    if value is None and allow_none:
        return None
    expected = ("None or " if allow_none else "") + _int_phrase(low) + (f" <= {high}" if high is not None else "")
    if not _is_int(value):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_number(
    value: Any,
    name: str,
    *,
    low: float | None = 0.0,
    low_inclusive: bool = True,
    high: float | None = None,
    allow_none: bool = False,
    hint: str = "",
) -> Any:
    """``value`` as a finite float in the given range (None allowed with ``allow_none``).

    NaN and infinity are always refused: a damping of ``inf`` silently turns every score into 0.
    """
    if value is None and allow_none:
        return None
    if low is None:
        phrase = "a number"
    elif low == 0:
        phrase = "a non-negative number" if low_inclusive else "a positive number"
    else:
        phrase = f"a number {'>=' if low_inclusive else '>'} {low}"
    expected = ("None or " if allow_none else "") + phrase + (f" <= {high}" if high is not None else "")
    tail = f"; {hint}" if hint else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {expected}, got {value!r}{tail}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be {expected}, got {value!r} (it must be finite){tail}")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    if too_low or (high is not None and value > high):
        raise ValueError(f"{name} must be {expected}, got {value!r}{tail}")
    return float(value)


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``."""
    if value not in tuple(choices):
        raise ValueError(f"{name}={value!r} is unknown; choose one of {tuple(choices)}")
    return value


def check_seed(value: Any, name: str = "seed", allow_none: bool = False) -> Any:
    """An int seed (any sign); None allowed with ``allow_none``."""
    if value is None and allow_none:
        return None
    if not _is_int(value):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {type(value).__name__}")
    return value
