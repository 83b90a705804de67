"""Analysis of captured maps: token maps, masks, frame-to-frame matrices, rollout, summaries.

- :mod:`attnmap.analysis.normalization`: the one normalisation vocabulary (``global``, ``frame``, ...);
- :mod:`attnmap.analysis.maps`: token maps, masks, temporal matrices and locality, summaries; a word's
  mask on each frame of the video and its track (the masks' centroids), in the JSON summary;
- :mod:`attnmap.analysis.rollout`: attention rollout, plain, divided space-time and temporal.

Names load lazily (rollout needs torch, the rest only numpy).

Example:
    >>> from attnmap import analysis
    >>> mask = analysis.token_mask(heat, threshold=0.5)      # heat [F, H, W], min-max normalised first
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnmap._lazy import lazy_exports

_MODULES: dict[str, str] = {
    "NORMALIZE": "normalization",
    "normalize": "normalization",
    "aggregated_map": "maps",
    "token_map": "maps",
    "token_mask": "maps",
    "frame_latents": "maps",
    "word_masks": "maps",
    "mask_track": "maps",
    "mask_rle": "maps",
    "rle_mask": "maps",
    "load_token_map": "maps",
    "on_input_frames": "maps",
    "frame_matrix": "maps",
    "temporal_locality": "maps",
    "classify_heads": "maps",
    "text_self_attention": "maps",
    "top_frames": "maps",
    "top_regions": "maps",
    "summarize": "maps",
    "write_summary": "maps",
    "rollout": "rollout",
    "space_time_rollout": "rollout",
    "temporal_rollout": "rollout",
    "cls_space_time_map": "rollout",
}

__all__ = [
    "NORMALIZE",
    "aggregated_map",
    "classify_heads",
    "cls_space_time_map",
    "frame_latents",
    "frame_matrix",
    "load_token_map",
    "mask_rle",
    "mask_track",
    "normalize",
    "on_input_frames",
    "rle_mask",
    "rollout",
    "space_time_rollout",
    "summarize",
    "temporal_locality",
    "temporal_rollout",
    "text_self_attention",
    "token_map",
    "token_mask",
    "top_frames",
    "top_regions",
    "word_masks",
    "write_summary",
]


__getattr__, __dir__ = lazy_exports(
    __name__, {name: (f"attnmap.analysis.{module}", name) for name, module in _MODULES.items()}
)


if TYPE_CHECKING:  # pragma: no cover
    from attnmap.analysis.maps import (
        aggregated_map,
        classify_heads,
        frame_latents,
        frame_matrix,
        load_token_map,
        mask_rle,
        mask_track,
        on_input_frames,
        rle_mask,
        summarize,
        temporal_locality,
        text_self_attention,
        token_map,
        token_mask,
        top_frames,
        top_regions,
        word_masks,
        write_summary,
    )
    from attnmap.analysis.normalization import NORMALIZE, normalize
    from attnmap.analysis.rollout import cls_space_time_map, rollout, space_time_rollout, temporal_rollout
