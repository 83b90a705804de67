"""Capture attention maps from a model or pipeline while it runs: :func:`capture`, :class:`Recorder`.

``attnmap.capture`` is this package and, called, the :func:`capture` function. Its parts follow the
data flow: ``interception`` (entry points, hooks, the module stack) -> ``layouts`` (family specs,
shape inference) -> ``accumulate`` (typed keys, running means) -> ``sinks`` (the store, auto-render);
``pipeline`` adapts diffusers pipelines, ``tokens`` maps target words to token indices, and
``recorder`` holds the :class:`Recorder` facade.
"""

from __future__ import annotations

from attnmap._callable import make_module_callable
from attnmap.capture.recorder import REDUCTIONS, Recorder, capture

__all__ = ["REDUCTIONS", "Recorder", "capture"]

make_module_callable(__name__, capture)
