"""The checks of numeric arguments: one helper per idea, each an AttnmapError naming the argument and
the range it accepts (the CLI prints it as one ``Error: ...`` line, the flag named for the argument).

A leaf module: it imports nothing of the package but its error.

Example:
    >>> number("fps", 24, low=0.001, high=1000)
    24.0
    >>> integer("size", 2.7, low=1)
    Traceback (most recent call last):
    attnmap.errors.AttnmapError: size: expected an integer >= 1, got 2.7
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from attnmap.errors import AttnmapError

__all__ = ["integer", "integers", "number", "span"]


def span(
    low: Optional[float], high: Optional[float], *, open_low: bool = False, open_high: bool = False
) -> str:
    """The range in words: ``>= 1``, ``> 0``, ``<= 100``, ``in [0, 1]``, ``in (0, 1]``."""
    if low is not None and high is not None:
        return f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    if low is not None:
        return f"{'>' if open_low else '>='} {low:g}"
    if high is not None:
        return f"{'<' if open_high else '<='} {high:g}"
    return ""


def number(
    name: str,
    value: Any,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    open_low: bool = False,
    open_high: bool = False,
) -> float:
    """``value`` as a float when it is a finite real number in the range (not a bool, not NaN, not
    infinite), else an AttnmapError naming ``name`` and the range.

    Args:
        name: the argument, as the caller knows it (``"fps"``, ``"visualization_params.fps"``).
        value: what was given.
        low, high: the bounds (None: unbounded on that side).
        open_low, open_high: exclude the bound itself.
    """
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    x = float(value) if ok else math.nan
    if (
        not math.isfinite(x)
        or (low is not None and (x < low or (open_low and x == low)))
        or (high is not None and (x > high or (open_high and x == high)))
    ):
        where = span(low, high, open_low=open_low, open_high=open_high)
        raise AttnmapError(f"{name}: expected a finite number{' ' + where if where else ''}, got {value!r}")
    return x


def integer(name: str, value: Any, *, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """``value`` as an int when it is an integer (int or numpy integer, not a bool, never a float such
    as 2.7 or 2.0) in ``[low, high]``, else an AttnmapError naming ``name`` and the range."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        where = span(low, high)
        raise AttnmapError(f"{name}: expected an integer{' ' + where if where else ''}, got {value!r}")
    return int(value)


def integers(
    name: str,
    value: Any,
    count: int,
    *,
    low: Optional[int] = None,
    high: Optional[int] = None,
    what: str = "",
) -> tuple[int, ...]:
    """``count`` integers in ``[low, high]`` (a tuple or list: a size, an RGB colour), else an
    AttnmapError naming ``name``, what the values are (``what``, e.g. ``"(H, W)"``) and the range."""
    ok = (
        not isinstance(value, (str, bytes))
        and isinstance(value, (Sequence, np.ndarray))
        and len(value) == count
    )
    if ok:
        try:
            return tuple(integer(name, v, low=low, high=high) for v in value)
        except AttnmapError:
            pass
    where = span(low, high)
    raise AttnmapError(
        f"{name}: expected {what + ': ' if what else ''}{count} integers{' ' + where if where else ''}, got {value!r}"
    )
