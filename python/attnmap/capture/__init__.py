"""Capture attention maps from a model or pipeline while it runs: :func:`capture`, :class:`Recorder`.

``attnmap.capture`` is this package and, called, the :func:`capture` function.
"""

from __future__ import annotations

from attnmap._callable import make_module_callable
from attnmap.capture.recorder import REDUCTIONS, Recorder, capture

__all__ = ["REDUCTIONS", "Recorder", "capture"]

make_module_callable(__name__, capture)
