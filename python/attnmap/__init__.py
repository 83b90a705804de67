"""attnmap: where video transformers look.

Capture attention maps from video transformers without materialising the N x N map, store them,
analyse them and render them. The main verbs are here; the rest lives in its module:

- :func:`capture` (a model or pipeline, as it runs) -> :class:`Recorder`; :func:`capture_video`
  (where a pipeline's transformer looks in a real video: encoded, noised, one step per timestep);
- :func:`attention_sums` (one attention call's q, k and :class:`Layout` -> small maps), with the
  float64 oracle ``backend="reference"`` (:mod:`attnmap.reference`); backends and ``sdpa_with_lse`` in
  :mod:`attnmap.reduce`;
- :func:`open_store` (read what capture stored; writing: :mod:`attnmap.store`);
- :func:`render_video` (a stored video's heatmap videos and overlays) with :class:`RenderOptions`;
  :func:`show` (the interactive viewer of a store or a Recorder, inline in a notebook);
  frames, video files and figures in :mod:`attnmap.render`;
- :mod:`attnmap.analysis`: token maps, masks, frame-to-frame matrices, rollout, summaries;
- :class:`Config` (a YAML ``attention_analysis`` block) and :class:`AttnmapError`, the one error root
  (a ``ValueError``; a store fault is its subclass :class:`attnmap.store.StoreError`, also an ``OSError``).

Names load lazily: ``import attnmap`` is cheap, and ``attnmap.render`` does not pull in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnmap._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> (module, attribute or None for the module itself)
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "AttnmapError": ("attnmap.errors", "AttnmapError"),
    "capture": ("attnmap.capture", None),  # the package, callable as the function
    "Recorder": ("attnmap.capture", "Recorder"),
    "capture_video": ("attnmap.capture.real_video", "capture_video"),
    "Config": ("attnmap.config", "Config"),
    "Layout": ("attnmap.layout", "Layout"),
    "attention_sums": ("attnmap.reduce", "attention_sums"),
    "reference": ("attnmap.reduce.reference", None),
    "open_store": ("attnmap.store", "open_store"),
    "RenderOptions": ("attnmap.render.options", "RenderOptions"),
    "render_video": ("attnmap.render.videos", "render_video"),
    "show": ("attnmap.render.report", "show"),
    "analysis": ("attnmap.analysis", None),
    "reduce": ("attnmap.reduce", None),
    "render": ("attnmap.render", None),
    "store": ("attnmap.store", None),
}

__all__ = [
    "AttnmapError",
    "Config",
    "Layout",
    "Recorder",
    "RenderOptions",
    "__version__",
    "analysis",
    "attention_sums",
    "capture",
    "capture_video",
    "open_store",
    "reduce",
    "reference",
    "render",
    "render_video",
    "show",
    "store",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # pragma: no cover
    from attnmap import analysis, reduce, render, store
    from attnmap.capture import Recorder, capture
    from attnmap.capture.real_video import capture_video
    from attnmap.config import Config
    from attnmap.errors import AttnmapError
    from attnmap.layout import Layout
    from attnmap.reduce import attention_sums
    from attnmap.reduce import reference as reference
    from attnmap.render.options import RenderOptions
    from attnmap.render.report import show
    from attnmap.render.videos import render_video
    from attnmap.store import open_store
