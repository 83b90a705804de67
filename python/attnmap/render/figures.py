"""Matplotlib figures of attention maps, saved as PNG or SVG (the file's suffix decides).

Every function takes plain numpy arrays (what :mod:`attnmap.analysis` and the store give), draws one
figure with the Agg backend (no display needed), writes it atomically and returns the path.

- :func:`temporal_comparison`: several tokens over the diffusion steps and over the latent frames.
- :func:`temporal_matrix`: the F x F matrix (frame i's queries -> frame j's keys).
- :func:`text_attention`: the text self-attention matrix, with its words.
- :func:`head_locality`: per block and head, the attention mass kept in the query's own frame.
- :func:`rollout_frames`: rollout (or any) maps over the video frames they belong to.
- :func:`colorbar`: a stand-alone colour bar for a colormap and range.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import matplotlib
import matplotlib.cm
import matplotlib.colors
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

from attnmap._checks import integer, number
from attnmap._io import atomic_path
from attnmap.errors import AttnmapError

PathLike = Union[str, "os.PathLike[str]"]

#: Suffixes :func:`save_figure` writes, and the matplotlib format of each.
FORMATS = {".png": "png", ".svg": "svg"}
#: the resolutions a figure is saved at (dots per inch)
DPI_RANGE = (10, 1200)
#: the longest side of a saved figure in pixels (a PNG of 16,384 x 16,384 RGBA is 1 GiB in memory)
MAX_FIGURE_SIDE = 16384
#: the most rows and columns of a block x head grid (Wan 14B has 40 blocks of 40 heads, a 72B video LLM
#: 80 layers of 64)
MAX_GRID = 128
#: the most panels of :func:`rollout_frames`
MAX_PANELS = 32


def _subplots(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
    """A figure and its axes without pyplot: no backend is chosen and no global figure list is kept,
    so drawing a figure changes no state of the process (savefig renders PNG and SVG on its own)."""
    figsize = kwargs.pop("figsize", None)
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save_figure(fig: Figure, path: PathLike, *, dpi: float = 120) -> Path:
    """Write ``fig`` to ``path`` (PNG or SVG by suffix) atomically and close it.

    Args:
        fig: a matplotlib figure.
        path: the output file; its suffix must be ``.png`` or ``.svg``. Missing folders are made.
        dpi: resolution of PNG output, in :data:`DPI_RANGE`; the figure may be at most
            :data:`MAX_FIGURE_SIDE` pixels a side.

    Returns:
        The path written.
    """
    out = Path(path)
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise AttnmapError(f"path must end in .png or .svg, got {str(path)!r}")
    try:
        dpi = number("dpi", dpi, low=DPI_RANGE[0], high=DPI_RANGE[1])
        width, height = (float(v) * dpi for v in fig.get_size_inches())
        if max(width, height) > MAX_FIGURE_SIDE:
            raise AttnmapError(
                f"dpi: the figure would be {width:.0f} x {height:.0f} pixels at {dpi:g} dpi, more than "
                f"{MAX_FIGURE_SIDE} a side; lower dpi"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out, suffix=out.suffix) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
    finally:
        fig.clear()
    return out


def _array(name: str, value: object, ndims: Sequence[int]) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise AttnmapError(f"{name} must be a numeric array, got {type(value).__name__}") from exc
    if arr.ndim not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise AttnmapError(f"{name} must be {want}, got shape {arr.shape}")
    if arr.size == 0:
        raise AttnmapError(f"{name} must not be empty, got shape {arr.shape}")
    return arr


def _square(name: str, value: object, axes: str) -> np.ndarray:
    """``value`` as a square 2-D array (``axes`` says what its sides are, for the error)."""
    arr = _array(name, value, (2,))
    if arr.shape[0] != arr.shape[1]:
        raise AttnmapError(f"{name} must be square [{axes}, {axes}], got shape {arr.shape}")
    return arr


def _check_colormap(colormap: Any) -> str:
    if not isinstance(colormap, str) or colormap not in matplotlib.colormaps:
        raise AttnmapError(f"colormap must be a matplotlib colormap name such as 'hot', got {colormap!r}")
    return colormap


def temporal_comparison(
    series: Mapping[str, object],
    path: PathLike,
    *,
    steps: Optional[Sequence[int]] = None,
    title: Optional[str] = None,
) -> Path:
    """Compare several tokens over the diffusion steps and over the latent frames.

    Left panel: each token's mean attention at each step. Right panel: each token's mean attention
    in each latent frame, averaged over the steps.

    Args:
        series: word -> per-step maps ``[S, F, H, W]`` (or ``[S, F]``, or ``[S]``); every word has the
            same number of steps S.
        path: output ``.png`` or ``.svg``.
        steps: the S step numbers (default 0..S-1).
        title: figure title.

    Returns:
        The path written.

    Example:
        >>> temporal_comparison({"kiss": maps_kiss, "flowers": maps_flowers}, "cmp.png")  # doctest: +SKIP
    """
    if not series:
        raise AttnmapError("series must map at least one word to its per-step maps, got an empty mapping")
    arrays = {word: _array(f"series[{word!r}]", value, (1, 2, 3, 4)) for word, value in series.items()}
    counts = {arr.shape[0] for arr in arrays.values()}
    if len(counts) != 1:
        shapes = {word: arr.shape for word, arr in arrays.items()}
        raise AttnmapError(f"series must have the same number of steps for every word, got shapes {shapes}")
    num_steps = counts.pop()
    xs = np.arange(num_steps) if steps is None else np.asarray(list(steps))
    if xs.shape != (num_steps,):
        raise AttnmapError(f"steps must list {num_steps} step numbers, got {len(xs)}")

    fig, (ax_steps, ax_frames) = _subplots(1, 2, figsize=(11, 4))
    for word, arr in arrays.items():
        flat = arr.reshape(num_steps, -1)
        ax_steps.plot(xs, flat.mean(axis=1), marker="o", label=word)
        per_frame = (
            arr.reshape(num_steps, arr.shape[1], -1).mean(axis=(0, 2)) if arr.ndim >= 2 else flat[:, 0]
        )
        ax_frames.plot(np.arange(per_frame.shape[0]), per_frame, marker="o", label=word)
    ax_steps.set(xlabel="diffusion step", ylabel="mean attention", title="over steps")
    ax_frames.set(xlabel="latent frame", ylabel="mean attention", title="over frames (mean of steps)")
    for ax in (ax_steps, ax_frames):
        ax.xaxis.set_major_locator(_integer_ticks())  # steps and frames are whole numbers
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _integer_ticks() -> matplotlib.ticker.MaxNLocator:
    """Ticks on whole numbers only (at most 10 of them)."""
    return matplotlib.ticker.MaxNLocator(nbins=10, integer=True, min_n_ticks=1)


#: A matrix figure names each row and column up to this many; beyond, every k-th so that they stay legible.
MAX_TICK_LABELS = 48


def _matrix_figure(
    matrix: np.ndarray,
    path: PathLike,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    colormap: str,
    ticklabels: Optional[Sequence[str]] = None,
) -> Path:
    size = max(4.0, min(12.0, 0.35 * matrix.shape[1] + 2.5))
    fig, ax = _subplots(figsize=(size + 1.0, size))
    image = ax.imshow(matrix, cmap=colormap, interpolation="nearest", aspect="equal")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    n = matrix.shape[0]
    every = max(1, math.ceil(n / MAX_TICK_LABELS))
    picks = list(range(0, n, every))
    names = [str(i) for i in picks] if ticklabels is None else [f"{ticklabels[i]}" for i in picks]
    fontsize = 9 if len(picks) <= 24 else 7
    ax.set_xticks(picks, names, rotation=90 if ticklabels is not None else 0, fontsize=fontsize)
    ax.set_yticks(picks, names, fontsize=fontsize)
    return save_figure(fig, path)


def temporal_matrix(
    matrix: object, path: PathLike, *, title: str = "temporal attention", colormap: str = "viridis"
) -> Path:
    """Draw the F x F temporal matrix: row i is the attention mass from frame i's queries to each frame.

    Args:
        matrix: ``[F, F]``.
        path: output ``.png`` or ``.svg``.
        title: figure title.
        colormap: a matplotlib colormap name.

    Returns:
        The path written.
    """
    arr = _square("matrix", matrix, "F")
    return _matrix_figure(
        arr,
        path,
        title=title,
        xlabel="key frame",
        ylabel="query frame",
        colormap=_check_colormap(colormap),
    )


def text_attention(
    matrix: object,
    path: PathLike,
    *,
    labels: Optional[Sequence[str]] = None,
    title: str = "text self-attention",
    colormap: str = "viridis",
) -> Path:
    """Draw the text self-attention matrix, with the tokens' words on both axes.

    Args:
        matrix: ``[Nt, Nt]``.
        path: output ``.png`` or ``.svg``.
        labels: Nt token strings (default: their indices).
        title: figure title.
        colormap: a matplotlib colormap name.

    Returns:
        The path written.
    """
    arr = _square("matrix", matrix, "Nt")
    if labels is not None and len(labels) != arr.shape[0]:
        raise AttnmapError(f"labels must name the {arr.shape[0]} text tokens, got {len(labels)} labels")
    return _matrix_figure(
        arr,
        path,
        title=title,
        xlabel="key token",
        ylabel="query token",
        colormap=_check_colormap(colormap),
        ticklabels=list(labels) if labels is not None else None,
    )


def head_locality(
    locality: object,
    path: PathLike,
    *,
    blocks: Optional[Sequence[int]] = None,
    title: str = "temporal locality per head",
) -> Path:
    """Draw, per block and head, the fraction of attention mass a query keeps in its own frame.

    Spatial heads sit near 1, temporal heads lower; the chance level 1/F is what a head attending
    uniformly over frames would keep.

    Args:
        locality: ``[L, H]`` (blocks x heads) or ``[H]`` for one block, values in [0, 1]; at most
            :data:`MAX_GRID` of each.
        path: output ``.png`` or ``.svg``.
        blocks: the L block numbers for the rows (default 0..L-1).
        title: figure title.

    Returns:
        The path written.
    """
    return block_head_grid(
        locality, path, blocks=blocks, label="mass in own frame", title=title, name="locality"
    )


def block_head_grid(
    values: object,
    path: PathLike,
    *,
    blocks: Optional[Sequence[Any]] = None,
    label: str,
    title: str,
    name: str = "values",
) -> Path:
    """Draw shares in [0, 1] per block (rows) and head (columns), each cell annotated when they are few.

    Args:
        values: ``[L, H]`` or ``[H]`` (one block).
        path: output ``.png`` or ``.svg``.
        blocks: the L row labels (default 0..L-1).
        label: the colour bar's label.
        title: figure title.
        name: what errors call ``values``.

    Returns:
        The path written.
    """
    arr = _array(name, values, (1, 2))
    arr = arr[None, :] if arr.ndim == 1 else arr
    if max(arr.shape) > MAX_GRID:
        raise AttnmapError(
            f"{name}: expected at most {MAX_GRID} blocks (rows) and {MAX_GRID} heads (columns) in one figure, "
            f"got shape {list(arr.shape)}"
        )
    rows = [str(b) for b in range(arr.shape[0])] if blocks is None else [str(b) for b in blocks]
    if len(rows) != arr.shape[0]:
        raise AttnmapError(f"blocks must label the {arr.shape[0]} rows of {name}, got {len(rows)}")
    side = 60.0  # inches (7,200 pixels at the default dpi): a large grid gets smaller cells
    width, height = (
        min(side, max(4.0, 0.6 * arr.shape[1] + 2.5)),
        min(side, max(2.5, 0.45 * arr.shape[0] + 1.5)),
    )
    fig, ax = _subplots(figsize=(width, height))
    image = ax.imshow(arr, cmap="magma", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=label)
    ax.set_xticks(range(arr.shape[1]), [str(h) for h in range(arr.shape[1])])
    ax.set_yticks(range(arr.shape[0]), rows)
    ax.set(xlabel="head", ylabel="block", title=title)
    if arr.size <= 400:
        for (row, col), value in np.ndenumerate(arr):
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if value < 0.6 else "black")  # fmt: skip
    return save_figure(fig, path)


def rollout_frames(
    frames: object,
    maps: object,
    path: PathLike,
    *,
    alpha: float = 0.5,
    colormap: str = "jet",
    max_frames: int = 8,
    title: Optional[str] = None,
) -> Path:
    """Draw maps (rollout or token maps) over the video frames they belong to, one panel per frame.

    Args:
        frames: uint8 video frames ``[T, H, W, 3]``.
        maps: ``[T, h, w]`` (one map per frame, any resolution; stretched over the frame) or ``[h, w]``
            (the same map on every frame).
        path: output ``.png`` or ``.svg``.
        alpha: opacity of the map, in [0, 1].
        colormap: a matplotlib colormap name.
        max_frames: at most this many panels (1 to :data:`MAX_PANELS`), evenly spaced over T.
        title: figure title.

    Returns:
        The path written.
    """
    video = np.asarray(frames)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or video.shape[0] == 0:
        raise AttnmapError(f"frames must be uint8 [T, H, W, 3], got {video.dtype} {video.shape}")
    arr = _array("maps", maps, (2, 3))
    if arr.ndim == 2:
        arr = np.broadcast_to(arr, (video.shape[0], *arr.shape))
    if arr.shape[0] != video.shape[0]:
        raise AttnmapError(f"maps must have one map per frame ({video.shape[0]}), got shape {arr.shape}")
    alpha = number("alpha", alpha, low=0, high=1)
    max_frames = integer("max_frames", max_frames, low=1, high=MAX_PANELS)
    _check_colormap(colormap)
    picks = np.unique(np.linspace(0, video.shape[0] - 1, min(max_frames, video.shape[0])).round().astype(int))
    height, width = video.shape[1:3]
    vmin, vmax = float(np.nanmin(arr)), float(np.nanmax(arr))
    fig, axes = _subplots(
        1, len(picks), figsize=(2.6 * len(picks), 2.6 * height / width + 0.6), squeeze=False
    )
    for ax, t in zip(axes[0], picks):
        ax.imshow(video[t])
        ax.imshow(
            arr[t],
            cmap=colormap,
            alpha=alpha,
            vmin=vmin,
            vmax=vmax,
            extent=(-0.5, width - 0.5, height - 0.5, -0.5),
            interpolation="bilinear",
        )
        ax.set_title(f"frame {t}", fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def colorbar(
    path: PathLike,
    *,
    colormap: str = "hot",
    vmin: float = 0.0,
    vmax: float = 1.0,
    label: str = "attention",
) -> Path:
    """Draw a stand-alone horizontal colour bar.

    Args:
        path: output ``.png`` or ``.svg``.
        colormap: a matplotlib colormap name.
        vmin: value at the low end.
        vmax: value at the high end (greater than vmin).
        label: the bar's label.

    Returns:
        The path written.
    """
    _check_colormap(colormap)
    vmin, vmax = number("vmin", vmin), number("vmax", vmax)
    if not vmax > vmin:
        raise AttnmapError(f"vmin, vmax: expected vmin < vmax, got {vmin} and {vmax}")
    fig, ax = _subplots(figsize=(5, 0.8))
    norm = matplotlib.colors.Normalize(vmin=vmin, vmax=vmax)
    fig.colorbar(
        matplotlib.cm.ScalarMappable(norm=norm, cmap=colormap), cax=ax, orientation="horizontal", label=label
    )
    return save_figure(fig, path)
