"""One way to check a callback's or function's arguments.

Every checker raises :class:`TypeError` for a value of the wrong type and :class:`ValueError` for a value of the
right type outside its range, and every message names the argument and what it accepts. Booleans are rejected
where numbers are meant (``True`` is an ``int`` to Python, never to a user) and NaN is rejected wherever a number
is meant.

>>> check_int("warmup_epochs", 3, minimum=0)
3
>>> check_int("warmup_epochs", True, minimum=0)
Traceback (most recent call last):
...
TypeError: `warmup_epochs` must be an int >= 0, got True (bool).
>>> check_float("target", "0.5", low=0.0, high=1.0)
Traceback (most recent call last):
...
TypeError: `target` must be a number in (0.0, 1.0], got '0.5' (str).
>>> check_choice("placement", "middle", ("curvature", "uniform"))
Traceback (most recent call last):
...
ValueError: `placement` must be one of 'curvature', 'uniform', got 'middle'.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["check_bool", "check_choice", "check_float", "check_int", "check_optional", "describe"]


def describe(value: Any) -> str:
    """``repr`` of ``value`` with its type name, for error messages."""
    return f"{value!r} ({type(value).__name__})"


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is exactly ``True`` or ``False``; ``TypeError`` otherwise (``"yes"``, ``1`` included)."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {describe(value)}.")
    return value


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` if it is an int (not a bool, not a float) within ``[minimum, maximum]``."""
    accepted = _int_range(minimum, maximum)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be {accepted}, got {describe(value)}.")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}.")
    return value


def check_float(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = False,
    high_inclusive: bool = True,
) -> float:
    """``value`` as a float if it is a finite real number (not a bool, NaN or infinite) within the given bounds.

    ``low``/``high`` are exclusive/inclusive by default: ``check_float("x", v, low=0.0)`` means ``v > 0``.
    """
    accepted = _float_range(low, high, low_inclusive, high_inclusive)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be {accepted}, got {describe(value)}.")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"`{name}` must be {accepted}, got nan.")
    too_low = low is not None and (value < low or (value == low and not low_inclusive))
    too_high = high is not None and (value > high or (value == high and not high_inclusive))
    if too_low or too_high or math.isinf(value):
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}.")
    return value


def check_choice(name: str, value: Any, choices: Sequence[T]) -> T:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {listed}, got {value!r}.")
    return value


def check_name(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of the string ``choices``; ``TypeError`` for a value that is not a string.

    >>> check_name("operator", "copy", ("zero_init", "copy"))
    'copy'
    """
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}.")
    return check_choice(name, value, choices)


def check_optional(value: Any, check: Any, *args: Any, **kwargs: Any) -> Any:
    """``None`` passes; anything else goes through ``check(*args, value, **kwargs)``.

    >>> check_optional(None, check_int, "blocks_per_step", minimum=1) is None
    True
    """
    if value is None:
        return None
    name, *rest = args
    return check(name, value, *rest, **kwargs)


def _int_range(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"an int in [{minimum}, {maximum}]"
    if minimum is not None:
        return f"an int >= {minimum}"
    if maximum is not None:
        return f"an int <= {maximum}"
    return "an int"


def _float_range(low: float | None, high: float | None, low_inclusive: bool, high_inclusive: bool) -> str:
    if low is None and high is None:
        return "a finite number"
    if high is None:
        return f"a finite number {'>=' if low_inclusive else '>'} {low}"
    if low is None:
        return f"a finite number {'<=' if high_inclusive else '<'} {high}"
    return f"a number in {'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
