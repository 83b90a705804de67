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
    "analysis": ("attnmap.analysis", None),
    "token_map": ("attnmap.analysis", "token_map"),
    "token_mask": ("attnmap.analysis", "token_mask"),
    "temporal_locality": ("attnmap.analysis", "temporal_locality"),
    "summarize": ("attnmap.analysis", "summarize"),
    "rollout": ("attnmap.rollout", "rollout"),
    "space_time_rollout": ("attnmap.rollout", "space_time_rollout"),
    "temporal_rollout": ("attnmap.rollout", "temporal_rollout"),
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
    "__version__",
    "analysis",
    "attention_sums",
    "capture",
    "figures",
    "open_store",
    "reference",
    "render",
    "rollout",
    "sdpa_with_lse",
    "space_time_rollout",
    "summarize",
    "temporal_locality",
    "temporal_rollout",
    "token_map",
    "token_mask",
    "tokens",
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
    from attnmap.analysis import summarize, temporal_locality, token_map, token_mask
    from attnmap.capture import Recorder, capture
    from attnmap.config import Config
    from attnmap.layout import Layout
    from attnmap.ops import attention_sums, sdpa_with_lse
    from attnmap.rollout import rollout, space_time_rollout, temporal_rollout
    from attnmap.store import AttentionMap, open_store
