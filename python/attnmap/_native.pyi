"""Type stubs for attnmap._native, the Rust core: rendering and the CPU attention kernel (rust/src/lib.rs)."""

from collections.abc import Sequence
from typing import Any, Literal, Optional, overload

import numpy as np

__version__: str
__all__ = [
    "AttnmapError",
    "__version__",
    "attention_groups",
    "attention_stats",
    "colorize",
    "colormap_names",
    "colormap_table",
    "kernel_info",
    "normalize",
    "render",
    "resize",
    "rgb_to_yuv420",
    "set_kernel_build",
    "set_kernel_pool",
]

class AttnmapError(ValueError):
    """Bad input to attnmap's render core; a ValueError subclass."""

def normalize(
    maps: np.ndarray,
    *,
    mode: str = "global",
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    percentile: tuple[float, float] = ...,  # (1.0, 99.0)
    gamma: float = 1.0,
) -> np.ndarray: ...
def resize(
    maps: np.ndarray,
    *,
    size: tuple[int, int],
    num_frames: Optional[int] = None,
    temporal_stride: Optional[int] = None,
) -> np.ndarray: ...
def render(
    maps: np.ndarray,
    *,
    size: tuple[int, int],
    num_frames: Optional[int] = None,
    temporal_stride: Optional[int] = None,
    start: int = 0,
    stop: Optional[int] = None,
    colormap: str = "hot",
    background: Optional[np.ndarray] = None,
    alpha: float = 0.6,
    alpha_mode: str = "constant",
    outline: Optional[float] = None,
    outline_color: tuple[int, int, int] = ...,  # (255, 255, 255)
) -> np.ndarray: ...
def colorize(values: np.ndarray, colormap: str = "hot") -> np.ndarray: ...
def colormap_table(name: str) -> np.ndarray: ...
def colormap_names() -> list[str]: ...
def rgb_to_yuv420(frames: np.ndarray) -> np.ndarray: ...
@overload
def attention_groups(
    q: np.ndarray,
    k: np.ndarray,
    columns: np.ndarray,
    num_columns: int,
    *,
    scale: float,
    bias: Optional[np.ndarray] = None,
    per_head: bool = False,
    lse: Optional[np.ndarray] = None,
    return_lse: Literal[False] = False,
) -> np.ndarray: ...
@overload
def attention_groups(
    q: np.ndarray,
    k: np.ndarray,
    columns: np.ndarray,
    num_columns: int,
    *,
    scale: float,
    bias: Optional[np.ndarray] = None,
    per_head: bool = False,
    lse: Optional[np.ndarray] = None,
    return_lse: Literal[True],
) -> tuple[np.ndarray, np.ndarray]: ...
def attention_stats(
    q: np.ndarray,
    k: np.ndarray,
    *,
    scale: float,
    bias: Optional[np.ndarray] = None,
    per_head: bool = False,
    dense: Optional[tuple[int, int]] = None,
    received: bool = False,
    entropy: bool = False,
    blocks: Optional[Sequence[tuple[np.ndarray, np.ndarray, int, int]]] = None,
    distance: Optional[tuple[int, int, int, int, int]] = None,
    lse: Optional[np.ndarray] = None,
    return_lse: bool = False,
) -> dict[str, Any]: ...
def kernel_info() -> dict[str, Any]: ...
def set_kernel_pool(rayon_only: bool) -> None: ...
def set_kernel_build(name: Optional[str] = None) -> None: ...
