"""Render attention maps for a person: heatmap frames, videos of a store, figures.

- :mod:`attnmap.render.heatmap`: ``frames`` / ``iter_frames`` (normalise -> resize -> colormap -> blend,
  fused in Rust), ``normalize``, ``resize``, the colormaps;
- :mod:`attnmap.render.codec`: ``write_video`` / ``read_video`` / ``iter_video`` / ``probe_video`` (PyAV);
- :mod:`attnmap.render.options`: :class:`RenderOptions`, how a rendered video looks;
- :mod:`attnmap.render.videos`: a store's maps as videos and overlays (``render_video``, ``render_store``);
- :mod:`attnmap.render.figures`: matplotlib figures.

Names load lazily: ``import attnmap.render`` pulls in neither torch nor matplotlib nor PyAV.

Example:
    >>> from attnmap import render
    >>> video = render.frames(maps, size=(480, 832), temporal_stride=4, colormap="inferno")
    >>> render.write_video(render.iter_frames(maps, size=(480, 832), temporal_stride=4), "out.mp4")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnmap._lazy import lazy_exports

_MODULES: dict[str, str] = {
    "colorize": "heatmap",
    "colormap_names": "heatmap",
    "colormap_table": "heatmap",
    "frames": "heatmap",
    "iter_frames": "heatmap",
    "normalize": "heatmap",
    "num_output_frames": "heatmap",
    "resize": "heatmap",
    "iter_video": "codec",
    "probe_video": "codec",
    "read_video": "codec",
    "write_video": "codec",
    "RenderOptions": "options",
    "render_token": "videos",
    "render_grid": "videos",
    "render_still": "videos",
    "render_video": "videos",
    "render_store": "videos",
    "render_figures": "videos",
}

__all__ = [
    "RenderOptions",
    "colorize",
    "colormap_names",
    "colormap_table",
    "frames",
    "iter_frames",
    "iter_video",
    "normalize",
    "num_output_frames",
    "probe_video",
    "read_video",
    "render_figures",
    "render_grid",
    "render_still",
    "render_store",
    "render_token",
    "render_video",
    "resize",
    "write_video",
]


__getattr__, __dir__ = lazy_exports(
    __name__, {name: (f"attnmap.render.{module}", name) for name, module in _MODULES.items()}
)


if TYPE_CHECKING:  # pragma: no cover
    from attnmap.render.codec import iter_video, probe_video, read_video, write_video
    from attnmap.render.heatmap import (
        colorize,
        colormap_names,
        colormap_table,
        frames,
        iter_frames,
        normalize,
        num_output_frames,
        resize,
    )
    from attnmap.render.options import RenderOptions
    from attnmap.render.videos import (
        render_figures,
        render_grid,
        render_still,
        render_store,
        render_token,
        render_video,
    )
