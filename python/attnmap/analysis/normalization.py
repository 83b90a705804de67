"""One normalisation vocabulary for analysis, rendering, the CLI and the report.

========== ===========================================================================
name       what a map becomes
========== ===========================================================================
global     (x - min) / (max - min) over the whole map
frame      the same for each frame (the first axis) on its own
percentile clipped to its ``percentile`` range (default 1st..99th), then as ``global``
max        x / max (zero stays zero; a distribution's shape is kept)
sum        x / sum (a distribution that sums to 1)
fixed      (x - vmin) / (vmax - vmin), clipped to [0, 1]
none       the values as they are
========== ===========================================================================

A constant map (max == min, or a zero sum) becomes zeros. NaN never disappears into a number: it
stays NaN where it was, the statistics are taken over the finite values, and one warning names the
map (or ``nan="raise"`` makes it an error).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Optional

import numpy as np

from attnmap._checks import number
from attnmap.errors import AttnmapError

Normalize = Literal["global", "frame", "percentile", "max", "sum", "fixed", "none"]
#: name -> one line saying what it does (for help texts and the report).
NORMALIZE: dict[str, str] = {
    "global": "min-max over the whole map",
    "frame": "min-max per frame",
    "percentile": "clip to the 1st-99th percentile, then min-max",
    "max": "divide by the maximum",
    "sum": "divide by the sum (a distribution)",
    "fixed": "vmin..vmax mapped to 0..1",
    "none": "the values as they are",
}
#: names of older versions, for the error message only
_RENAMED = {"minmax": "global", "minmax_frame": "frame"}


def check(method: Any, argument: str = "normalize") -> str:
    """``method`` if it is a name of :data:`NORMALIZE`, else an AttnmapError naming ``argument``."""
    if method in NORMALIZE:
        return str(method)
    hint = f" ({method!r} is now called {_RENAMED[method]!r})" if method in _RENAMED else ""
    raise AttnmapError(f"{argument}: expected one of {', '.join(NORMALIZE)}, got {method!r}{hint}")


def bounds(
    x: np.ndarray,
    method: str,
    *,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    percentile: tuple[float, float] = (1.0, 99.0),
) -> tuple[float, float]:
    """The (lo, hi) that a whole-map ``method`` maps to (0, 1), from the finite values of ``x``
    (``frame`` has one pair per frame: use :func:`normalize`). A map with no finite value gives (0, 1)."""
    method = check(method)
    vmin = None if vmin is None else number("vmin", vmin)
    vmax = None if vmax is None else number("vmax", vmax)
    if method == "frame":
        raise AttnmapError("normalize: 'frame' has bounds per frame, not one pair for the map")
    if method == "fixed":
        if vmin is None or vmax is None or not vmax > vmin:
            raise AttnmapError(f"vmin, vmax: 'fixed' needs vmin < vmax, got {vmin} and {vmax}")
        return float(vmin), float(vmax)
    finite = x[np.isfinite(x)]
    if method == "none" or finite.size == 0:
        return 0.0, 1.0
    if method == "percentile":
        if not isinstance(percentile, (tuple, list)) or len(percentile) != 2:
            raise AttnmapError(f"percentile: expected (lo, hi) with 0 <= lo < hi <= 100, got {percentile!r}")
        lo, hi = (number("percentile", p, low=0, high=100) for p in percentile)
        if not lo < hi:
            raise AttnmapError(f"percentile: expected (lo, hi) with 0 <= lo < hi <= 100, got {percentile!r}")
        low, high = (float(v) for v in np.percentile(finite, [lo, hi]))
    elif method == "global":
        low, high = float(finite.min()), float(finite.max())
    elif method == "max":
        low, high = 0.0, float(finite.max())
    else:  # sum
        low, high = 0.0, float(finite.sum())
    low = float(vmin) if vmin is not None else low
    high = float(vmax) if vmax is not None else high
    return low, high


def normalize(
    x: Any,
    method: str = "global",
    *,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    percentile: tuple[float, float] = (1.0, 99.0),
    name: str = "map",
    nan: Literal["warn", "raise"] = "warn",
) -> np.ndarray:
    """Normalise a map by a name of :data:`NORMALIZE`.

    Args:
        x: ``[F, H, W]`` or any shape (``frame`` needs the frames first); numpy or torch.
        method: a name of :data:`NORMALIZE`.
        vmin: the value mapped to 0 (required with ``fixed``; otherwise it overrides the measured one).
        vmax: the value mapped to 1 (likewise).
        percentile: (lo, hi) in 0..100 for ``percentile``.
        name: what the warning about NaN calls the map.
        nan: ``"warn"`` (NaN stays NaN, one warning) or ``"raise"`` (an AttnmapError).

    Returns:
        float32 array of the same shape; NaN where ``x`` was NaN.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().to("cpu").double().numpy()
    a = np.asarray(x)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise AttnmapError(f"{name}: expected a numeric array or tensor, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    method = check(method)
    bad = np.isnan(a)
    if bad.any():
        message = f"{name} holds {int(bad.sum())} NaN value(s) of {a.size}; they stay NaN after normalising"
        if nan == "raise":
            raise AttnmapError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    if method == "none" or a.size == 0:
        return a.astype(np.float32)
    if method == "frame":
        if a.ndim < 2:
            raise AttnmapError(f"{name}: 'frame' needs a map [F, ...], got shape {a.shape}")
        return np.stack([_scale(f, *bounds(f, "global", vmin=vmin, vmax=vmax)) for f in a]).astype(np.float32)
    lo, hi = bounds(a, method, vmin=vmin, vmax=vmax, percentile=percentile)
    out = _scale(a, lo, hi)
    if method in ("global", "percentile", "fixed"):
        out = np.clip(out, 0.0, 1.0)
    return out.astype(np.float32)


def _scale(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(a - lo) / (hi - lo), zeros when hi <= lo (a constant map); NaN stays NaN."""
    if not hi > lo:
        return np.where(np.isnan(a), np.nan, 0.0)
    return (a - lo) / (hi - lo)
