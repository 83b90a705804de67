"""attnmap: where video transformers look.

Capture attention maps from any model that calls ``scaled_dot_product_attention`` without
materialising the N x N map, store them, analyse them and render heatmap videos.

Names are imported lazily, so ``import attnmap`` is cheap and ``attnmap.render`` does not pull
in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, attribute or None for the module itself)
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "Layout": ("attnmap.layout", "Layout"),
    "attention_sums": ("attnmap.ops", "attention_sums"),
    "sdpa_with_lse": ("attnmap.ops", "sdpa_with_lse"),
    "reference": ("attnmap.reference", None),
    "capture": ("attnmap.capture", "capture"),
    "Recorder": ("attnmap.capture", "Recorder"),
    "Config": ("attnmap.config", "Config"),
    "tokens": ("attnmap.tokens", None),
    "open_store": ("attnmap.store", "open_store"),
    "AttentionMap": ("attnmap.store", "AttentionMap"),
    "Store": ("attnmap.store", "Store"),
    "StoreWriter": ("attnmap.store", "StoreWriter"),
    "StoreError": ("attnmap.store", "StoreError"),
    "analysis": ("attnmap.analysis", None),
    "token_map": ("attnmap.analysis", "token_map"),
    "token_mask": ("attnmap.analysis", "token_mask"),
    "temporal_locality": ("attnmap.analysis", "temporal_locality"),
    "summarize": ("attnmap.analysis", "summarize"),
    "write_summary": ("attnmap.analysis", "write_summary"),
    "load_token_map": ("attnmap.analysis", "load_token_map"),
    "frame_matrix": ("attnmap.analysis", "frame_matrix"),
    "text_self_attention": ("attnmap.analysis", "text_self_attention"),
    "classify_heads": ("attnmap.analysis", "classify_heads"),
    "rollout": ("attnmap.rollout", "rollout"),
    "space_time_rollout": ("attnmap.rollout", "space_time_rollout"),
    "temporal_rollout": ("attnmap.rollout", "temporal_rollout"),
    "cls_space_time_map": ("attnmap.rollout", "cls_space_time_map"),
    "render": ("attnmap.render", None),
    "figures": ("attnmap.figures", None),
    "AttnmapError": ("attnmap._native", "AttnmapError"),
}

__all__ = [
    "AttentionMap",
    "AttnmapError",
    "Config",
    "Layout",
    "Recorder",
    "Store",
    "StoreError",
    "StoreWriter",
    "__version__",
    "analysis",
    "attention_sums",
    "capture",
    "classify_heads",
    "cls_space_time_map",
    "figures",
    "frame_matrix",
    "load_token_map",
    "open_store",
    "reference",
    "render",
    "rollout",
    "sdpa_with_lse",
    "space_time_rollout",
    "summarize",
    "temporal_locality",
    "temporal_rollout",
    "text_self_attention",
    "token_map",
    "token_mask",
    "tokens",
    "write_summary",
]


def __getattr__(name: str) -> Any:
    try:
        module_name, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'attnmap' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover
    from attnmap import analysis, figures, reference, render, tokens
    from attnmap._native import AttnmapError
    from attnmap.analysis import (
        classify_heads,
        frame_matrix,
        load_token_map,
        summarize,
        temporal_locality,
        text_self_attention,
        token_map,
        token_mask,
        write_summary,
    )
    from attnmap.capture import Recorder, capture
    from attnmap.config import Config
    from attnmap.layout import Layout
    from attnmap.ops import attention_sums, sdpa_with_lse
    from attnmap.rollout import cls_space_time_map, rollout, space_time_rollout, temporal_rollout
    from attnmap.store import AttentionMap, Store, StoreError, StoreWriter, open_store
