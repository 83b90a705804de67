"""Heatmap frames and videos: a thin layer over the Rust render core (``attnmap._native``).

``frames`` and ``iter_frames`` normalise the maps once, then resize (space and time), colour and
blend every output pixel in one parallel pass with the GIL released. ``write_video`` encodes with
PyAV on a thread fed by a bounded queue, so rendering and encoding overlap, and writes atomically.

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

import fractions
import os
import pathlib
import queue
import threading
from collections.abc import Generator, Iterable, Iterator, Mapping
from typing import Any, Optional, Union

import numpy as np

from attnmap import _native
from attnmap._io import atomic_path
from attnmap._native import AttnmapError

__all__ = [
    "AttnmapError",
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
    "resize",
    "write_video",
]

PathLike = Union[str, "os.PathLike[str]"]

# suffix -> (container format, codec, pixel format)
_CONTAINERS: dict[str, tuple[str, str, str]] = {
    ".mp4": ("mp4", "libx264", "yuv420p"),
    ".mov": ("mov", "libx264", "yuv420p"),
    ".mkv": ("matroska", "libx264", "yuv420p"),
    ".webm": ("webm", "libvpx-vp9", "yuv420p"),
    ".gif": ("gif", "gif", "pal8"),
}
_DEFAULT_CRF = {"libx264": 18, "libvpx-vp9": 32}
_QUEUE_CHUNKS = 4
_NORMALIZE_MODES = ("global", "frame", "percentile", "fixed")


def colormap_names() -> list[str]:
    """Names of the built-in colormaps (each identical to matplotlib's at all 256 levels).

    Returns:
        list of names, e.g. ``["hot", "jet", "viridis", ...]``.
    """
    return list(_native.colormap_names())


def colormap_table(name: str) -> np.ndarray:
    """The RGB table of a colormap, for colorbars and legends.

    Args:
        name: a name from ``colormap_names()``.

    Returns:
        [256, 3] uint8; level i equals ``matplotlib.colormaps[name](i, bytes=True)[:3]``.
    """
    return _native.colormap_table(name)


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
    return _native.colorize(np.ascontiguousarray(arr, dtype=np.float32), colormap)


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
    if num_frames is not None:
        if num_frames < 1:
            raise AttnmapError(f"num_frames: expected a positive number of frames, got {num_frames}")
        return int(num_frames)
    if temporal_stride is not None:
        if temporal_stride < 1:
            raise AttnmapError(f"temporal_stride: expected a positive stride, got {temporal_stride}")
        return 1 + (latent_frames - 1) * int(temporal_stride)
    return latent_frames


def normalize(
    maps: Any,
    *,
    mode: str = "global",
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    percentile: tuple[float, float] = (1, 99),
    gamma: float = 1.0,
) -> np.ndarray:
    """Normalise maps to [0, 1] (Rust; NaN/inf count as the minimum, a constant map gives zeros).

    Args:
        maps: float [F, h, w] or [h, w].
        mode: "global" (one min-max), "frame" (min-max per frame), "percentile" (clip to the
            ``percentile`` range of all values) or "fixed" (``vmin..vmax``, nothing else rescaled).
        vmin: lower bound; required with "fixed", otherwise it overrides the measured minimum.
        vmax: upper bound; required with "fixed", otherwise it overrides the measured maximum.
        percentile: (lo, hi) in 0..100 for "percentile", numpy's linear method.
        gamma: applied after scaling, ``t ** gamma``.

    Returns:
        [F, h, w] float32 in [0, 1].
    """
    if mode not in _NORMALIZE_MODES:
        raise AttnmapError(
            f"normalize: expected one of {', '.join(map(repr, _NORMALIZE_MODES))}, got {mode!r}"
        )
    try:
        lo, hi = (float(p) for p in percentile)
    except (TypeError, ValueError):
        raise AttnmapError(f"percentile: expected (lo, hi) in 0..100, got {percentile!r}") from None
    return _native.normalize(
        _as_maps(maps),
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
    num_output_frames(arr.shape[0], num_frames, temporal_stride)
    return _native.resize(arr, size=_check_size(size), num_frames=num_frames, temporal_stride=temporal_stride)


def _check_size(size: Any) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise AttnmapError(f"size: expected (H, W), got {size!r}") from None
    if h < 1 or w < 1:
        raise AttnmapError(f"size: expected positive (H, W), got {size!r}")
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
    if chunk < 1:
        raise AttnmapError(f"chunk: expected a positive number of frames, got {chunk}")
    normed = _normalize(maps, mode=normalize, vmin=vmin, vmax=vmax, percentile=percentile, gamma=gamma)
    total = num_output_frames(normed.shape[0], num_frames, temporal_stride)
    out_size = None if size is None else _check_size(size)
    if not 0.0 <= alpha <= 1.0:
        raise AttnmapError(f"alpha: expected a value in [0, 1], got {alpha}")
    r, g, b = (int(c) for c in outline_color)
    rgb = (r, g, b)
    _native.colormap_table(colormap)  # fail on an unknown name before the first chunk is asked for
    bg: Optional[np.ndarray] = None
    stream: Optional[_BackgroundStream] = None
    if _is_stream(background):
        stream = _BackgroundStream(background, total, out_size)
        out_size = out_size or stream.size
    elif background is not None:
        bg = _check_background(background, total, out_size)
        out_size = out_size or (bg.shape[-3], bg.shape[-2])
    shape = out_size or (normed.shape[1], normed.shape[2])

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
        normalize: "global", "frame", "percentile" or "fixed" (see :func:`normalize`).
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


# ---------------------------------------------------------------------------------------------------
# Video files


def _gif_palette(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantise one RGB frame to 256 colours: the most used 15-bit colours, averaged.

    Args:
        frame: [H, W, 3] uint8.

    Returns:
        ([H, W] uint8 indices, [256, 4] uint8 ARGB palette), as PyAV's pal8 expects.
    """
    q = (frame >> 3).astype(np.int32)
    key = ((q[..., 0] << 10) | (q[..., 1] << 5) | q[..., 2]).ravel()
    counts = np.bincount(key, minlength=1 << 15)
    used = np.flatnonzero(counts)
    top = used[np.argsort(counts[used])[::-1][:256]]
    sums = np.stack([np.bincount(key, weights=frame[..., c].ravel(), minlength=1 << 15) for c in range(3)], 1)
    palette = np.floor(sums[top] / counts[top, None] + 0.5)
    centres = np.stack([(used >> 10) & 31, (used >> 5) & 31, used & 31], 1) * 8 + 4
    nearest = np.empty(1 << 15, np.uint8)
    for s in range(0, len(used), 4096):  # bounded memory for the distance matrix
        d = ((centres[s : s + 4096, None, :] - palette[None]) ** 2).sum(-1)
        nearest[used[s : s + 4096]] = d.argmin(1)
    argb = np.zeros((256, 4), np.uint8)
    argb[:, 0] = 255
    argb[: len(top), 1:] = palette.astype(np.uint8)
    return nearest[key].reshape(frame.shape[:2]), argb


def _chunks(frames: Any) -> Iterator[np.ndarray]:
    """[t, H, W, 3] uint8 chunks from an array or an iterable of chunks or single frames."""
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise AttnmapError(f"frames: expected uint8 (T, H, W, 3), got shape {frames.shape}")
        for s in range(0, frames.shape[0], 16):
            yield frames[s : s + 16]
        return
    for part in frames:
        arr = np.asarray(part)
        if arr.ndim == 3:
            arr = arr[None]
        yield arr


class _Encoder:
    """Encodes chunks on a thread; the container opens on the first chunk (which fixes the size)."""

    def __init__(
        self, tmp: pathlib.Path, fmt: str, codec: str, pix_fmt: str, fps: float, options: dict[str, str]
    ):
        self.tmp, self.fmt, self.codec, self.pix_fmt, self.options = tmp, fmt, codec, pix_fmt, options
        self.rate = fractions.Fraction(fps).limit_denominator(1001)
        self.queue: queue.Queue[Optional[np.ndarray]] = queue.Queue(maxsize=_QUEUE_CHUNKS)
        self.error: Optional[BaseException] = None
        self.frames = 0
        self.thread = threading.Thread(target=self._run, name="attnmap-encode", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import av

        container = None
        try:
            stream: Any = None
            while (chunk := self.queue.get()) is not None:
                if container is None:
                    container = av.open(str(self.tmp), "w", format=self.fmt)
                    stream = container.add_stream(self.codec, rate=self.rate, options=self.options)
                    h, w = chunk.shape[1:3]
                    if self.pix_fmt == "yuv420p":
                        h, w = h + h % 2, w + w % 2
                    stream.width, stream.height, stream.pix_fmt = w, h, self.pix_fmt
                assert stream is not None
                if self.pix_fmt == "yuv420p":
                    if chunk.shape[1:3] != (stream.height, stream.width):
                        pad = (
                            (0, 0),
                            (0, stream.height - chunk.shape[1]),
                            (0, stream.width - chunk.shape[2]),
                        )
                        chunk = np.pad(chunk, (*pad, (0, 0)), mode="edge")
                    # Rust's parallel BT.601 conversion: swscale's rgb24 path costs more than x264 itself
                    for planes in _native.rgb_to_yuv420(np.ascontiguousarray(chunk)):
                        container.mux(stream.encode(av.VideoFrame.from_ndarray(planes, format="yuv420p")))
                        self.frames += 1
                    continue
                for frame in chunk:
                    pal8: Any = _gif_palette(frame)  # (indices, ARGB palette): PyAV's pal8 input
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(pal8, format="pal8")))
                    self.frames += 1
            if container is not None and stream is not None:
                container.mux(stream.encode(None))
        except BaseException as e:
            self.error = e
            while self.queue.get() is not None:  # drain so the producer never blocks
                pass
        finally:
            if container is not None:
                container.close()

    def put(self, chunk: Optional[np.ndarray]) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(chunk, timeout=0.1)
                return
            except queue.Full:
                continue


_MAX_CRF = {"libx264": 51, "libvpx-vp9": 63}  # 8-bit libx264's crf range, and vp9's


def _check_codec(codec: str) -> None:
    import av

    try:
        av.codec.Codec(codec, "w")
    except Exception:  # av's UnknownCodecError, or a decoder-only name
        raise AttnmapError(f"codec: {codec!r} is not an encoder this FFmpeg build has") from None


def write_video(
    frames: Any,
    path: PathLike,
    *,
    fps: float = 16,
    codec: Optional[str] = None,
    crf: Optional[int] = None,
    options: Optional[Mapping[str, str]] = None,
) -> pathlib.Path:
    """Encode frames to a video file with PyAV, atomically (a temporary name, then a rename).

    The suffix picks the container: .mp4/.mov/.mkv (libx264, yuv420p), .webm (libvpx-vp9) or .gif
    (pal8, a 256-colour palette per frame). yuv420p needs even sizes: odd heights/widths are padded by
    one row/column repeating the edge. Encoding runs on a thread fed by a bounded queue, so an
    iterator of chunks (e.g. ``iter_frames``) renders while earlier chunks encode.

    Args:
        frames: uint8 [T, H, W, 3], or an iterable of [t, H, W, 3] chunks or [H, W, 3] frames.
        path: the output file; its folder must exist.
        fps: frames per second (gif stores delays in 1/100 s, so 16 fps plays at 100/6).
        codec: override the codec (e.g. "libx265", "mpeg4").
        crf: quality for libx264 (default 18) and libvpx-vp9 (default 32).
        options: extra codec options, e.g. ``{"preset": "veryfast"}``.

    Returns:
        the path written.
    """
    out = pathlib.Path(path)
    suffix = out.suffix.lower()
    if suffix not in _CONTAINERS:
        raise AttnmapError(f"path: expected a suffix in {', '.join(_CONTAINERS)}, got {str(out)!r}")
    if not (isinstance(fps, (int, float)) and fps > 0):
        raise AttnmapError(f"fps: expected a positive number, got {fps!r}")
    parent = out.parent if str(out.parent) else pathlib.Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"path: cannot write {str(out)!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"path: cannot write {str(out)!r}: folder {str(parent)!r} is not writable")
    fmt, default_codec, pix_fmt = _CONTAINERS[suffix]
    codec = codec or default_codec
    _check_codec(codec)
    top = _MAX_CRF.get(codec, 63)
    if crf is not None and (isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= top):
        raise AttnmapError(f"crf: expected an integer in 0..{top} for {codec} (lower is better), got {crf!r}")
    opts = {k: str(v) for k, v in (options or {}).items()}
    quality = crf if crf is not None else _DEFAULT_CRF.get(codec)
    if quality is not None and codec in _DEFAULT_CRF:
        opts.setdefault("crf", str(int(quality)))
        if codec == "libvpx-vp9":
            opts.setdefault("b", "0")
    size: Optional[tuple[int, int]] = None
    with atomic_path(out, suffix=suffix) as tmp:
        encoder = _Encoder(tmp, fmt, codec, pix_fmt, float(fps), opts)
        try:
            for chunk in _chunks(frames):
                if chunk.dtype != np.uint8 or chunk.ndim != 4 or chunk.shape[-1] != 3:
                    raise AttnmapError(
                        f"frames: expected uint8 (t, H, W, 3) chunks, got dtype {chunk.dtype} shape {chunk.shape}"
                    )
                if size is None:
                    size = (chunk.shape[1], chunk.shape[2])
                elif chunk.shape[1:3] != size:
                    raise AttnmapError(
                        f"frames: every frame must be {size}, got a chunk of {chunk.shape[1:3]}"
                    )
                if chunk.shape[0]:
                    encoder.put(chunk)
            if size is None:
                raise AttnmapError("frames: expected at least one frame, got none")
            encoder.put(None)
            encoder.thread.join()
            if encoder.error is not None:
                raise encoder.error
        except BaseException:
            if encoder.thread.is_alive():
                encoder.queue.put(None)
                encoder.thread.join()
            raise
    return out


def _open_video(path: PathLike) -> Any:
    import av

    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"path: no video file at {str(p)!r}")
    try:
        container = av.open(str(p))
    except av.error.FFmpegError as e:
        raise AttnmapError(f"path: cannot read {str(p)!r} as a video: {e}") from None
    if not container.streams.video:
        container.close()
        raise AttnmapError(f"path: {str(p)!r} has no video stream")
    return container


def _fps(stream: Any) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def iter_video(path: PathLike, chunk: int = 16) -> Generator[np.ndarray, None, None]:
    """Decode a video chunk by chunk (bounded memory), e.g. as a background source.

    Args:
        path: a video file PyAV can read.
        chunk: frames per yielded array.

    Returns:
        an iterator of [t, H, W, 3] uint8 arrays.
    """
    container = _open_video(path)

    def gen() -> Generator[np.ndarray, None, None]:
        try:
            buf: list[np.ndarray] = []
            for frame in container.decode(video=0):
                buf.append(frame.to_ndarray(format="rgb24"))
                if len(buf) == chunk:
                    yield np.stack(buf)
                    buf = []
            if buf:
                yield np.stack(buf)
        finally:
            container.close()

    return gen()


def probe_video(path: PathLike) -> tuple[int, tuple[int, int], float]:
    """A video's frame count, frame size and rate without decoding it (the count is that of the
    container's frame packets, skipping those marked to be discarded).

    Args:
        path: a video file PyAV can read.

    Returns:
        (frames T, (H, W), fps): what ``read_video`` would give as ``frames.shape[:3]`` and fps.
    """
    container = _open_video(path)
    try:
        stream = container.streams.video[0]
        size = (int(stream.codec_context.height), int(stream.codec_context.width))
        count = sum(1 for p in container.demux(stream) if p.size and not p.is_discard)
        return count, size, _fps(stream)
    finally:
        container.close()


def read_video(path: PathLike) -> tuple[np.ndarray, float]:
    """Decode a whole video.

    Args:
        path: a video file PyAV can read (mp4, webm, gif, ...).

    Returns:
        (frames [T, H, W, 3] uint8, fps).
    """
    container = _open_video(path)
    try:
        fps = _fps(container.streams.video[0])
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    finally:
        container.close()
    if not decoded:
        raise AttnmapError(f"path: {str(path)!r} has no decodable frames")
    return np.stack(decoded), fps
