"""Figures and the JSON summary of a video's attention statistics (:mod:`attnmap.analysis.stats`).

- :func:`energy_decay_figure`: per head, the share of mass at each offset in time, height and width;
- :func:`recall_figure`: per head, the share of mass the top k% blocks of each query tile keep;
- :func:`coverage_figure`: per block and head, the share a window around each query keeps;
- :func:`render_stats`: all of them for one stored video, and ``<video>_stats.json``.

Each figure function takes numpy arrays, writes one PNG or SVG atomically (the suffix decides) and
returns its path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import matplotlib
import numpy as np

from attnmap._io import atomic_write
from attnmap.analysis import stats
from attnmap.errors import AttnmapError
from attnmap.render.figures import PathLike, _array, _subplots, block_head_grid, save_figure
from attnmap.store.naming import safe_component

if TYPE_CHECKING:  # pragma: no cover
    from attnmap.store import Store

#: The axes of :func:`attnmap.analysis.stats.energy_decay`, with their offset labels.
AXES = {"time": "|dt| (latent frames)", "height": "|dy| (token rows)", "width": "|dx| (token columns)"}


def _heads_label(n: int, i: int) -> str:
    return "mean over heads" if n == 1 else f"head {i}"


def energy_decay_figure(
    curves: Mapping[str, object], path: PathLike, *, title: str = "energy decay by offset"
) -> Path:
    """Draw the share of attention mass at each offset from the query, one line per head.

    Args:
        curves: ``{"time": [H, F], "height": [H, Hg], "width": [H, W]}`` (or 1-D per axis), as
            :func:`attnmap.analysis.stats.energy_decay` gives for ``[H, F, Hg, W]``.
        path: output ``.png`` or ``.svg``.
        title: figure title.

    Returns:
        The path written.
    """
    missing = [a for a in AXES if a not in curves]
    if missing:
        raise AttnmapError(f"curves must hold {', '.join(AXES)}; missing {', '.join(missing)}")
    arrays = {a: _array(f"curves[{a!r}]", curves[a], (1, 2)) for a in AXES}
    arrays = {a: c[None] if c.ndim == 1 else c for a, c in arrays.items()}
    heads = {c.shape[0] for c in arrays.values()}
    if len(heads) != 1:
        raise AttnmapError(f"curves must have the same number of heads on each axis, got {sorted(heads)}")
    n = heads.pop()
    fig, axes = _subplots(1, 3, figsize=(13, 3.6), sharey=True)
    colours = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, n))
    for ax, (axis, label) in zip(axes, AXES.items()):
        c = arrays[axis]
        for i in range(n):
            ax.plot(
                np.arange(c.shape[1]),
                np.maximum(c[i], 1e-12),
                marker=".",
                color=colours[i],
                label=_heads_label(n, i),
            )
        ax.set(xlabel=label, yscale="log", ylim=(max(1e-6, float(c[c > 0].min(initial=1.0)) / 2), 1.05))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of mass")
    if n <= 16:
        axes[-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(title)
    return save_figure(fig, path)


def recall_figure(
    fractions: object, recall: object, path: PathLike, *, title: str = "block-sparse recall"
) -> Path:
    """Draw the recall of block-sparse attention: the share of mass kept against the share of
    blocks kept per query tile, one line per head (the diagonal is uniform attention).

    Args:
        fractions: ``[K]`` in (0, 1].
        recall: ``[H, K]`` or ``[K]``, from :func:`attnmap.analysis.stats.recall_curve`.
        path: output ``.png`` or ``.svg``.
        title: figure title.

    Returns:
        The path written.
    """
    fr = _array("fractions", fractions, (1,))
    rc = _array("recall", recall, (1, 2))
    rc = rc[None] if rc.ndim == 1 else rc
    if rc.shape[1] != fr.size:
        raise AttnmapError(
            f"recall must have {fr.size} values per head (one per fraction), got {rc.shape[1]}"
        )
    n = rc.shape[0]
    fig, ax = _subplots(figsize=(5.2, 4.2))
    colours = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, n))
    ax.plot([0, 100], [0, 1], color="grey", linestyle=":", label="uniform")
    for i in range(n):
        ax.plot(100 * fr, rc[i], color=colours[i], label=_heads_label(n, i))
    ax.set(
        xlabel="blocks kept per query tile (%)", ylabel="share of mass kept", xlim=(0, 100), ylim=(0, 1.02)
    )
    ax.grid(alpha=0.3)
    if n <= 16:
        ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title)
    return save_figure(fig, path)


def coverage_figure(
    coverage: object,
    path: PathLike,
    *,
    blocks: Optional[Sequence[str]] = None,
    window: Optional[Sequence[int]] = None,
    title: Optional[str] = None,
) -> Path:
    """Draw, per block and head, the share of mass a window centred on each query keeps.

    Args:
        coverage: ``[L, H]`` (blocks x heads) or ``[H]``, values in [0, 1], from
            :func:`attnmap.analysis.stats.window_coverage`.
        path: output ``.png`` or ``.svg``.
        blocks: the L row labels (default 0..L-1).
        window: the window ``(t, h, w)``, for the title.
        title: figure title (default names the window).

    Returns:
        The path written.
    """
    size = "x".join(str(int(v)) for v in window) if window is not None else "window"
    return block_head_grid(
        coverage,
        path,
        blocks=blocks,
        label="share of mass in the window",
        title=title or f"coverage of a {size} (t x h x w) window",
        name="coverage",
    )


def render_stats(
    store: Store,
    video_id: str,
    out_dir: PathLike,
    *,
    fmt: str = "png",
    share: float = 0.9,
    window: Optional[Sequence[int]] = None,
    k: int = 5,
) -> list[Path]:
    """Draw every statistics figure the stored maps of one video allow, and write its summary.

    Writes into ``out_dir``: ``<video>_energy_decay.<fmt>`` (per head, from ``distance``),
    ``<video>_recall.<fmt>`` (from ``blocks``; ``_recall_text`` from cross calls),
    ``<video>_coverage.<fmt>`` (per block and head, from ``distance/block<b>``, else the block
    mean) and ``<video>_stats.json`` (:func:`attnmap.analysis.stats.summarize_stats`).

    Returns:
        The paths written, the JSON summary last.
    """
    if fmt not in ("png", "svg"):
        raise AttnmapError(f"fmt must be 'png' or 'svg', got {fmt!r}")
    summary = stats.summarize_stats(store, video_id, share=share, window=window, k=k)
    found = stats.stats_maps(store, video_id)
    out, stem = Path(out_dir), safe_component(video_id)
    written: list[Path] = []
    distance = found.get("distance", {})
    # the distance figures draw what the summary computed from those maps (float32 lists)
    summarized = summary.get("distance", {})
    if None in distance:
        curves = {a: np.asarray(c, dtype=np.float32) for a, c in summarized["mean"]["energy_decay"].items()}
        title = f"{video_id}: attention mass by offset from the query"
        written.append(energy_decay_figure(curves, out / f"{stem}_energy_decay.{fmt}", title=title))
    for kind, suffix in (("blocks", ""), ("blocks/text", "_text")):
        names = found.get(kind, {})
        if None in names:
            fr, recall = stats.recall_curve(stats.load_stat(store, video_id, names[None], 2))
            written.append(
                recall_figure(
                    fr, recall, out / f"{stem}_recall{suffix}.{fmt}", title=f"{video_id}: {kind} recall"
                )
            )
    if distance and summary.get("window"):
        per_block: dict[Optional[int], str] = {b: n for b, n in distance.items() if b is not None}
        per_block = per_block or dict(distance)  # the block mean where no block is stored alone
        labels = ["mean" if b is None else str(b) for b in per_block]
        shares = [np.asarray(summarized[label]["window_coverage"], dtype=np.float32) for label in labels]
        if len({m.shape for m in shares}) == 1:
            coverage = np.stack(shares)
            path = out / f"{stem}_coverage.{fmt}"
            written.append(coverage_figure(coverage, path, blocks=labels, window=summary["window"]))
    json_path = out / f"{stem}_stats.json"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(json_path, json.dumps(_json_safe(summary), indent=1).encode("utf-8"))
    written.append(json_path)
    return written


def _json_safe(value: Any) -> Any:
    """NaN and inf (a map of a NaN call) as null: JSON has neither."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
