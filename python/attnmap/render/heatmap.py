"""Heatmap frames: a thin layer over the Rust render core (``attnmap._native``).

``frames`` and ``iter_frames`` normalise the maps once, then resize (space and time), colour and
blend every output pixel in one parallel pass with the GIL released.

Example:
    >>> import numpy as np
    >>> from attnmap import render
    >>> maps = np.random.rand(21, 30, 52).astype(np.float32)        # (F, h, w) latent token map
    >>> video = render.frames(maps, size=(480, 832), temporal_stride=4, colormap="inferno")
    >>> video.shape
    (81, 480, 832, 3)
    >>> render.write_video(render.iter_frames(maps, size=(480, 832), temporal_stride=4), "out.mp4")
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any, Optional, Union

import numpy as np

from attnmap import _native
from attnmap._checks import integer, integers, number
from attnmap.analysis.normalization import bounds
from attnmap.analysis.normalization import check as check_normalize
from attnmap.errors import AttnmapError

__all__ = [
    "MAX_BYTES",
    "MAX_FRAMES",
    "MAX_FRAME_PIXELS",
    "MAX_SIDE",
    "check_colormap",
    "colorize",
    "colormap_names",
    "colormap_table",
    "frames",
    "iter_frames",
    "normalize",
    "num_output_frames",
    "resize",
]

PathLike = Union[str, "os.PathLike[str]"]

# Bounds of one render, checked before any work starts: beyond them a request is a mistake (a
# stride or a frame count off by orders of magnitude), refused with a message naming the argument.
#: the most output frames of one render (65,536: over an hour at 16 frames a second)
MAX_FRAMES = 1 << 16
#: the longest output side in pixels (the render core's own bound)
MAX_SIDE = 1 << 17
#: the most pixels of one output frame (16,384 x 16,384)
MAX_FRAME_PIXELS = 1 << 28
#: the most bytes of one array a call returns: ``frames``' whole video, a chunk of ``iter_frames``,
#: ``resize``'s floats (16 GiB)
MAX_BYTES = 1 << 34


def colormap_names() -> list[str]:
    """Names of the built-in colormaps (each identical to matplotlib's at all 256 levels).

    Returns:
        list of names, e.g. ``["hot", "jet", "viridis", ...]``.
    """
    return list(_native.colormap_names())


def check_colormap(name: Any, argument: str = "colormap") -> str:
    """``name`` when it is one of :func:`colormap_names`, else an AttnmapError naming ``argument`` and
    the names there are."""
    names = colormap_names()
    if not isinstance(name, str) or name not in names:
        raise AttnmapError(f"{argument}: expected one of {', '.join(names)}, got {name!r}")
    return name


def colormap_table(name: str) -> np.ndarray:
    """The RGB table of a colormap, for colorbars and legends.

    Args:
        name: a name from ``colormap_names()``.

    Returns:
        [256, 3] uint8; level i equals ``matplotlib.colormaps[name](i, bytes=True)[:3]``.
    """
    return _native.colormap_table(check_colormap(name, "name"))


def colorize(values: Any, colormap: str = "hot") -> np.ndarray:
    """Colour values in [0, 1] with matplotlib's quantisation (level ``min(int(x * 256), 255)``).

    Args:
        values: float array [...] of values in [0, 1] (below 0 and NaN take level 0).
        colormap: a name from ``colormap_names()``.

    Returns:
        [..., 3] uint8 RGB.

    Example:
        >>> strip = colorize(np.linspace(0, 1, 512)[None].repeat(16, 0), "viridis")   # (16, 512, 3)
    """
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiu":
        raise AttnmapError(f"values: expected a float array, got dtype {arr.dtype}")
    return _native.colorize(np.ascontiguousarray(arr, dtype=np.float32), check_colormap(colormap))


def _as_maps(maps: Any) -> np.ndarray:
    """(F, h, w) float32 from an array or tensor of shape (F, h, w) or (h, w), copying only if needed."""
    if hasattr(maps, "detach") and hasattr(maps, "cpu"):  # a torch tensor, without importing torch
        maps = maps.detach().float().cpu().numpy()
    arr = np.asarray(maps)
    if arr.dtype.kind != "f":
        raise AttnmapError(
            f"maps: expected a float array of shape (F, h, w) or (h, w), got dtype {arr.dtype}"
        )
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or 0 in arr.shape:
        raise AttnmapError(
            f"maps: expected a non-empty float array of shape (F, h, w) or (h, w), got shape {arr.shape}"
        )
    return arr.astype(np.float32, copy=False)


def num_output_frames(
    latent_frames: int, num_frames: Optional[int] = None, temporal_stride: Optional[int] = None
) -> int:
    """How many video frames ``frames`` makes from ``latent_frames`` map frames.

    Args:
        latent_frames: F, the number of map frames.
        num_frames: an explicit output frame count (linear interpolation in time).
        temporal_stride: a VAE temporal stride s: ``1 + (F - 1) * s`` frames (21 latents, s=4 -> 81).

    Returns:
        the number of output frames (F when neither is given).
    """
    if num_frames is not None and temporal_stride is not None:
        raise AttnmapError("num_frames: give num_frames or temporal_stride, not both")
    latent_frames = integer("latent_frames", latent_frames, low=1)
    if num_frames is not None:
        total, arg = integer("num_frames", num_frames, low=1), "num_frames"
    elif temporal_stride is not None:
        stride = integer("temporal_stride", temporal_stride, low=1)
        total, arg = 1 + (latent_frames - 1) * stride, "temporal_stride"
    else:
        total, arg = latent_frames, "maps"
    if total > MAX_FRAMES:
        raise AttnmapError(
            f"{arg}: expected at most {MAX_FRAMES} output frames (render.heatmap.MAX_FRAMES), got {total}"
            + (f" (1 + ({latent_frames} - 1) x {temporal_stride})" if arg == "temporal_stride" else "")
        )
    return total


def _check_bytes(nbytes: int, arg: str, what: str, hint: str = "") -> None:
    """Refuse an output array of more than :data:`MAX_BYTES`, naming ``arg``."""
    if nbytes > MAX_BYTES:
        raise AttnmapError(
            f"{arg}: {what} would take {nbytes / 2**30:.1f} GiB, more than {MAX_BYTES / 2**30:.0f} GiB "
            f"(render.heatmap.MAX_BYTES) in one array{hint}"
        )


def normalize(
    maps: Any,
    *,
    mode: str = "global",
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    percentile: tuple[float, float] = (1, 99),
    gamma: float = 1.0,
) -> np.ndarray:
    """Normalise maps to [0, 1] in Rust (NaN/inf count as the minimum, a constant map gives zeros).

    Args:
        maps: float [F, h, w] or [h, w].
        mode: a name of :data:`attnmap.analysis.normalization.NORMALIZE`: "global" (one min-max),
            "frame" (min-max per frame), "percentile" (clip to the ``percentile`` range of all
            values), "max" (x / max), "sum" (x / sum), "fixed" (``vmin..vmax``) or "none" (the
            values as they are, clipped to [0, 1]).
        vmin: lower bound; required with "fixed", otherwise it overrides the measured minimum.
        vmax: upper bound; required with "fixed", otherwise it overrides the measured maximum.
        percentile: (lo, hi) in 0..100 for "percentile", numpy's linear method.
        gamma: applied after scaling, ``t ** gamma``.

    Returns:
        [F, h, w] float32 in [0, 1].
    """
    mode = check_normalize(mode)
    if not isinstance(percentile, (tuple, list)) or len(percentile) != 2:
        raise AttnmapError(f"percentile: expected (lo, hi) with 0 <= lo < hi <= 100, got {percentile!r}")
    lo, hi = (number("percentile", p, low=0, high=100) for p in percentile)
    vmin = None if vmin is None else number("vmin", vmin)
    vmax = None if vmax is None else number("vmax", vmax)
    gamma = number("gamma", gamma, low=0, open_low=True)
    arr = _as_maps(maps)
    if mode in ("max", "sum", "none"):  # a fixed range measured here (the core knows the other four)
        vmin, vmax = bounds(arr, mode, vmin=vmin, vmax=vmax)
        if not vmax > vmin:
            vmax = vmin + 1.0  # a map of zeros: its lowest colour
        mode = "fixed"
    return _native.normalize(
        arr,
        mode=mode,
        vmin=None if vmin is None else float(vmin),
        vmax=None if vmax is None else float(vmax),
        percentile=(float(lo), float(hi)),
        gamma=float(gamma),
    )


_normalize = normalize  # `frames` and `iter_frames` take an argument called normalize


def resize(
    maps: Any,
    size: tuple[int, int],
    *,
    num_frames: Optional[int] = None,
    temporal_stride: Optional[int] = None,
) -> np.ndarray:
    """Resize float maps: bilinear in space (torch ``interpolate(mode="bilinear", align_corners=False)``).

    Args:
        maps: float [F, h, w] or [h, w].
        size: output (H, W).
        num_frames: output frame count, linear in time (torch's align_corners=False).
        temporal_stride: VAE stride: frame 0 is latent 0, each later latent frame covers ``stride`` frames.

    Returns:
        [T, H, W] float32.
    """
    arr = _as_maps(maps)
    total = num_output_frames(arr.shape[0], num_frames, temporal_stride)
    h, w = _check_size(size)
    _check_bytes(total * h * w * 4, "size", f"{total} frames of {h} x {w} float32")
    return _native.resize(arr, size=(h, w), num_frames=num_frames, temporal_stride=temporal_stride)


def _check_size(size: Any, arg: str = "size") -> tuple[int, int]:
    h, w = integers(arg, size, 2, low=1, what="(H, W)")
    if max(h, w) > MAX_SIDE or h * w > MAX_FRAME_PIXELS:
        raise AttnmapError(
            f"{arg}: expected at most {MAX_SIDE} pixels a side and {MAX_FRAME_PIXELS} a frame "
            f"(render.heatmap.MAX_SIDE, MAX_FRAME_PIXELS), got {size!r}"
        )
    return h, w


def _check_background(background: Any, frames: int, size: Optional[tuple[int, int]]) -> np.ndarray:
    bg = np.asarray(background)
    if bg.dtype != np.uint8:
        raise AttnmapError(f"background: expected uint8 RGB frames, got dtype {bg.dtype}")
    if bg.ndim not in (3, 4) or bg.shape[-1] != 3:
        raise AttnmapError(f"background: expected shape (T, H, W, 3) or (H, W, 3), got {bg.shape}")
    if bg.ndim == 4 and bg.shape[0] != frames:
        raise AttnmapError(f"background: expected {frames} frames (one per output frame), got {bg.shape[0]}")
    if size is not None and tuple(bg.shape[-3:-1]) != size:
        raise AttnmapError(
            f"background: expected frames of size {size} (the size argument), got {bg.shape[-3:-1]}"
        )
    return bg


def _is_stream(background: Any) -> bool:
    """Whether a background is an iterable of frame chunks (a generator, ``iter_video``) rather than an
    array: arrays, tensors (``__array__``), lists and tuples are arrays."""
    return (
        isinstance(background, Iterable)
        and not isinstance(background, (np.ndarray, list, tuple))
        and not hasattr(background, "__array__")
    )


class _BackgroundStream:
    """Background frames taken from an iterable of uint8 [t, H, W, 3] chunks (or [H, W, 3] frames) in runs
    of any length, so that a decoded video feeds the render chunk by chunk: at most one source chunk is
    held besides the run being handed out. The first chunk is read at once (it fixes the size when the
    render has none); ``finish`` checks that the source has no frames beyond ``total``."""

    def __init__(self, source: Iterable[Any], total: int, size: Optional[tuple[int, int]]) -> None:
        self.source = iter(source)
        self.total, self.size, self.seen = total, size, 0
        try:
            self.pending = self._next()  # frames read but not handed out yet
        except BaseException:
            self.close()
            raise
        if self.pending is None:
            raise AttnmapError(f"background: expected {total} frames (one per output frame), got 0")
        self.size = (self.pending.shape[1], self.pending.shape[2])

    def _next(self) -> Optional[np.ndarray]:
        for part in self.source:
            arr = np.asarray(part)
            if arr.dtype != np.uint8:
                raise AttnmapError(f"background: expected uint8 RGB frame chunks, got dtype {arr.dtype}")
            arr = arr[None] if arr.ndim == 3 else arr
            if arr.ndim != 4 or arr.shape[-1] != 3:
                raise AttnmapError(
                    f"background: expected chunks of shape (t, H, W, 3) or frames (H, W, 3), got {arr.shape}"
                )
            if self.size is not None and arr.shape[1:3] != self.size:
                raise AttnmapError(
                    f"background: expected frames of size {self.size} (the output size), "
                    f"got a chunk of shape {arr.shape}"
                )
            self.seen += arr.shape[0]
            if self.seen > self.total:
                raise AttnmapError(
                    f"background: expected {self.total} frames (one per output frame), got more"
                )
            if arr.shape[0]:
                return arr
        return None

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` frames [n, H, W, 3] (a view when one source chunk holds them)."""
        parts: list[np.ndarray] = []
        while n:
            if self.pending is None:
                self.pending = self._next()
                if self.pending is None:
                    raise AttnmapError(
                        f"background: expected {self.total} frames (one per output frame), got {self.seen}"
                    )
            part, rest = self.pending[:n], self.pending[n:]
            parts.append(part)
            n -= part.shape[0]
            self.pending = rest if rest.shape[0] else None
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def finish(self) -> None:
        """Check that the source is exhausted (``_next`` raises on any frame beyond ``total``)."""
        if self.pending is not None or self._next() is not None:
            raise AttnmapError(f"background: expected {self.total} frames (one per output frame), got more")

    def close(self) -> None:
        close = getattr(self.source, "close", None)
        if callable(close):
            close()


def iter_frames(
    maps: Any,
    *,
    size: Optional[tuple[int, int]] = None,
    num_frames: Optional[int] = None,
    temporal_stride: Optional[int] = None,
    colormap: str = "hot",
    normalize: str = "global",
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    percentile: tuple[float, float] = (1, 99),
    gamma: float = 1.0,
    background: Any = None,
    alpha: float = 0.6,
    alpha_mode: str = "constant",
    outline: Optional[float] = None,
    outline_color: tuple[int, int, int] = (255, 255, 255),
    chunk: int = 16,
) -> Iterator[np.ndarray]:
    """Render heatmap frames chunk by chunk: memory stays bounded by ``chunk`` frames.

    The arguments are those of :func:`frames`, plus:

    Args:
        chunk: frames per yielded array.

    ``background`` may also be an iterable of uint8 [t, H, W, 3] chunks (any t) or [H, W, 3] frames, e.g.
    ``iter_video(path)``: it is read in step with the output chunks (re-chunked as needed), so a video
    overlaid on the heatmap is never held whole. It must hold exactly one frame per output frame; the
    first chunk is read by this call, and the iterator is closed when the render ends.

    Returns:
        an iterator of [t, H, W, 3] uint8 arrays (t <= chunk), in order, covering every output frame.
    """
    chunk = integer("chunk", chunk, low=1)
    arr = _as_maps(maps)
    total = num_output_frames(arr.shape[0], num_frames, temporal_stride)
    out_size = None if size is None else _check_size(size)
    alpha = number("alpha", alpha, low=0, high=1)
    outline = None if outline is None else number("outline", outline, low=0, high=1)
    r, g, b = integers("outline_color", outline_color, 3, low=0, high=255, what="(R, G, B)")
    rgb = (r, g, b)
    check_colormap(colormap)  # an unknown name fails before the first chunk is asked for
    bg: Optional[np.ndarray] = None
    stream: Optional[_BackgroundStream] = None
    if _is_stream(background):
        stream = _BackgroundStream(background, total, out_size)
        out_size = out_size or stream.size
    elif background is not None:
        bg = _check_background(background, total, out_size)
        out_size = out_size or (bg.shape[-3], bg.shape[-2])
    shape = out_size or _check_size((arr.shape[1], arr.shape[2]), "maps")
    try:
        _check_bytes(
            min(chunk, total) * shape[0] * shape[1] * 3,
            "chunk" if chunk < total else "num_frames",
            f"{min(chunk, total)} frames of {shape[0]} x {shape[1]} RGB",
            "; render fewer frames at a time (iter_frames' chunk)",
        )
        normed = _normalize(arr, mode=normalize, vmin=vmin, vmax=vmax, percentile=percentile, gamma=gamma)
    except BaseException:
        if stream is not None:
            stream.close()
        raise

    def chunks() -> Iterator[np.ndarray]:
        try:
            for start in range(0, total, chunk):
                stop = min(start + chunk, total)
                part = bg if bg is None or bg.ndim == 3 else bg[start:stop]
                if stream is not None:
                    part = stream.take(stop - start)
                out = _native.render(
                    normed,
                    size=shape,
                    num_frames=num_frames,
                    temporal_stride=temporal_stride,
                    start=start,
                    stop=stop,
                    colormap=colormap,
                    background=part,
                    alpha=float(alpha),
                    alpha_mode=alpha_mode,
                    outline=None if outline is None else float(outline),
                    outline_color=rgb,
                )
                del part  # not held while the consumer works on the chunk
                yield out
            if stream is not None:
                stream.finish()
        finally:
            if stream is not None:
                stream.close()

    return chunks()


def frames(
    maps: Any,
    *,
    size: Optional[tuple[int, int]] = None,
    num_frames: Optional[int] = None,
    temporal_stride: Optional[int] = None,
    colormap: str = "hot",
    normalize: str = "global",
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    percentile: tuple[float, float] = (1, 99),
    gamma: float = 1.0,
    background: Any = None,
    alpha: float = 0.6,
    alpha_mode: str = "constant",
    outline: Optional[float] = None,
    outline_color: tuple[int, int, int] = (255, 255, 255),
) -> np.ndarray:
    """Render heatmap frames: normalise -> resize -> colormap -> blend, fused in Rust.

    Args:
        maps: float [F, h, w] or [h, w] (numpy, or a torch tensor); float16/64 are converted.
        size: output (H, W); defaults to the background's size, else the maps' (h, w).
        num_frames: output frame count, linear interpolation in time.
        temporal_stride: VAE temporal stride s instead: ``1 + (F - 1) * s`` frames.
        colormap: a name from ``colormap_names()``.
        normalize: a name of the normalisation vocabulary (see :func:`normalize`).
        vmin: lower bound (required with "fixed").
        vmax: upper bound (required with "fixed").
        percentile: (lo, hi) percentiles for "percentile".
        gamma: ``t ** gamma`` after normalising.
        background: uint8 [T, H, W, 3] with T the output frame count, or one [H, W, 3] image, or an
            iterable of [t, H, W, 3] chunks holding T frames in all (e.g. ``iter_video(path)``; see
            :func:`iter_frames`); None renders the colormap alone.
        alpha: heat opacity in [0, 1] over the background.
        alpha_mode: "constant", or "attention" (opacity ``alpha * value``: low attention shows the frame).
        outline: a threshold in [0, 1] on the normalised value; draws the border of that mask.
        outline_color: RGB of the outline.

    Returns:
        [T, H, W, 3] uint8.
    """
    parts = list(
        iter_frames(
            maps,
            size=size,
            num_frames=num_frames,
            temporal_stride=temporal_stride,
            colormap=colormap,
            normalize=normalize,
            vmin=vmin,
            vmax=vmax,
            percentile=percentile,
            gamma=gamma,
            background=background,
            alpha=alpha,
            alpha_mode=alpha_mode,
            outline=outline,
            outline_color=outline_color,
            chunk=1 << 30,
        )
    )
    return parts[0]
