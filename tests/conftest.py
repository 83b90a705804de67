"""Shared builders of the tests: q/k makers, a closeness check, backends by name, a store factory.

Test modules import them (``from conftest import assert_close, make_qk``) and never each other.
The Triton kernel runs on CUDA when there is one, else on the CPU under TRITON_INTERPRET=1 (set
here, before anything imports the kernel).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from attnmap.layout import Layout
from attnmap.reduce import attention_sums, prepare_call

CUDA = torch.cuda.is_available()
#: where the Triton backend runs in this session
TRITON_DEVICE = "cuda" if CUDA else "cpu"
try:
    import triton  # noqa: F401

    HAS_TRITON = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
except ImportError:  # pragma: no cover
    HAS_TRITON = False

#: small tiles, so that the tests' small inputs cross tile and block boundaries
SMALL_TILES: dict[str, dict[str, int]] = {
    "blocks": {"block_rows": 7},
    "triton": {"block_m": 16, "block_n": 16},
}


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float) -> None:
    """Max error relative to the largest reference value; reports where it is worst and the RMS ratio."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert out.dtype == torch.float32, f"{name}: dtype {out.dtype}"
    assert not out.isnan().any(), f"{name}: NaN in output"
    ref, out = ref.double().cpu(), out.double().cpu()
    err = (ref - out).abs()
    scale = max(float(ref.abs().max()), 1e-30) if ref.numel() else 1.0
    idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape)) if err.numel() else ()
    rms = float(err.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)) if err.numel() else 0.0
    worst = float(err.max()) if err.numel() else 0.0
    assert worst <= ratio * scale, (
        f"{name}: max error {worst:.3g} > {ratio:g} x {scale:.3g} at {idx}, rms ratio {rms:.3g}"
    )


def make_qk(
    lay: Layout,
    *,
    heads: int = 2,
    kv_heads: Optional[int] = None,
    d: int = 32,
    batch: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    spread: float = 1.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, lay.num_queries, d, generator=g) * spread
    k = torch.randn(batch, kv_heads or heads, lay.num_keys, d, generator=g) * spread
    return q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype)


def reduce_with(
    backend: str, q: torch.Tensor, k: torch.Tensor, layout: Layout, reductions: Sequence[str], **kwargs: Any
) -> dict[str, torch.Tensor]:
    """``attention_sums`` through the backend named, with :data:`SMALL_TILES` where it has tiles."""
    if backend in SMALL_TILES:
        import importlib

        module = importlib.import_module(f"attnmap.reduce.{backend}")
        call = prepare_call(q, k, layout, tuple(reductions), **kwargs)
        reason = module.serves(call)
        assert reason is None, reason
        with torch.no_grad():
            out: dict[str, torch.Tensor] = module.run(call, **SMALL_TILES[backend])
        return out
    return attention_sums(q, k, layout, tuple(reductions), backend=backend, **kwargs)


def make_store(
    root: Path,
    video_id: str = "vid",
    *,
    steps: int = 3,
    grid: tuple[int, int, int] = (3, 4, 5),
    tokens: Mapping[str, Sequence[int]] = {"cat": [1], "dog": [2, 3]},
    extra: Optional[Callable[[int, np.random.Generator], Mapping[str, np.ndarray]]] = None,
    metadata: Optional[Mapping[str, Any]] = None,
    seed: int = 0,
    dtype: str = "float32",
    close: bool = True,
    storage: Optional[Mapping[str, Any]] = None,
) -> dict[int, dict[str, np.ndarray]]:
    """Write a video of random token maps (and a temporal matrix) into ``root``; returns what was
    written, step -> name -> array, to check loads against. ``storage``: the writer's
    ``storage_format``, ``aggregated_format``, ``compress``."""
    from attnmap.store import StoreWriter

    rng = np.random.default_rng(seed)
    meta = {"model": "test", "targets": {w: list(i) for w, i in tokens.items()}, "grid": list(grid)}
    meta.update(metadata or {})
    written: dict[int, dict[str, np.ndarray]] = {}
    writer = StoreWriter(root, video_id, meta, dtype=dtype, **(storage or {}))
    for step in range(steps):
        maps = {f"token/{w}": rng.random(grid, dtype=np.float32) for w in tokens}
        maps["temporal"] = rng.random((grid[0], grid[0]), dtype=np.float32)
        if extra is not None:
            maps.update(extra(step, rng))
        writer.write_step(step, maps)
        written[step] = maps
    if close:
        writer.close()
    return written


def read_png(path: Path) -> np.ndarray:
    """A PNG file's pixels [H, W, 3] uint8 (asserting that it is a PNG)."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def has_colour(pixels: np.ndarray, rgb: np.ndarray, tol: int = 2) -> bool:
    """Whether some pixel is within ``tol`` levels of ``rgb`` in every channel."""
    return bool((np.abs(pixels.astype(int) - rgb.astype(int)).max(axis=-1) <= tol).any())


def colormap_rgb(name: str, x: float) -> np.ndarray:
    """matplotlib's colour of ``x`` in colormap ``name``, RGB uint8 (the reference of figure colours)."""
    import matplotlib

    return np.asarray(matplotlib.colormaps[name](x, bytes=True))[:3]


def page_data(path: Path) -> dict[str, Any]:
    """The data a report page carries (its JSON script), as the page's script reads it."""
    import json
    import re

    text = path.read_text(encoding="utf-8")
    found = re.search(r'<script type="application/json" id="[^"]+-data">(.*?)</script>', text, re.S)
    assert found is not None
    return json.loads(found.group(1).replace("<\\/", "</"))  # type: ignore[no-any-return]
