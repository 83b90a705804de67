"""Render a store's maps to videos: one token, a grid of tokens, one video's every token, a whole store.

The kinds of output (all streamed in chunks through :func:`attnmap.render.iter_frames`, the original video
decoded chunk by chunk in step, so memory stays bounded, then encoded by :func:`attnmap.render.write_video`):

- the step evolution: each diffusion step's map (mean over latent frames) in turn, with
  ``interpolation_steps`` blended frames between consecutive steps (:func:`render_token`, ``mode="steps"``);
- the aggregated map following the video's own frames: latent frames mapped to video frames by the VAE
  temporal stride, or onto the original video's frames; a map with one frame is held as a still for
  ``static_duration`` seconds (``mode="aggregated"``);
- the overlay of either on the original video (``original_video=``), with an optional outline of the
  thresholded mask;
- a grid of several tokens side by side with their words (:func:`render_grid`);
- a colour bar and labels of the token, step and time drawn into the frames (:mod:`attnmap.render.decor`),
  and one progress display per command (:mod:`attnmap.render.progress`).

:func:`render_video` is what capture calls at the end of a video when ``auto_generate_per_video`` is set:
it writes ``<video_id>_<token>_attention.<fmt>`` and, when an original video is known,
``<video_id>_<token>_overlay.<fmt>`` for every token. :func:`render_store` does it for every video.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import numpy as np

from attnmap._checks import integer
from attnmap.analysis.maps import (
    aggregated_map,
    on_input_frames,
    positive_int,
    real_text_length,
    real_text_words,
    vae_stride,
    video_info,
)
from attnmap.analysis.normalization import bounds
from attnmap.errors import AttnmapError
from attnmap.render.codec import FPS_RANGE
from attnmap.render.decor import Decor, decor_layout, decorate
from attnmap.render.heatmap import MAX_FRAMES, MAX_SIDE
from attnmap.render.options import DEFAULT_FPS, RenderOptions
from attnmap.render.progress import Progress, Task, display, render_task
from attnmap.store.naming import safe_component

if TYPE_CHECKING:  # pragma: no cover
    from attnmap.store import Store

PathLike = Union[str, "os.PathLike[str]"]
Mode = Literal["aggregated", "steps"]
VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".mkv", ".mov")
_CHUNK = 16
_WORKERS = 2  # renders of one video encoded at the same time (render_video)
_MIN_SIDE = 256  # a map with no known video size is scaled up to at least this many pixels high
#: The most pixels one render may have, frames x height x width (about 40,000 frames of 480 x 832);
#: its frames and frame sides are bounded by the core's MAX_FRAMES and MAX_SIDE, all checked before a
#: map loads.
MAX_PIXELS = 1 << 34


_HASHED = re.compile(r"-[0-9a-f]{16}$")


def output_stem(video_id: str, token: str) -> str:
    """The file-name stem of a video's token, ``<video id>_<token>``, distinct for distinct pairs.

    The pair goes through the store's hashed sanitiser. A plain pair (both parts kept as they are, no
    ``_`` in either) gives ``<video id>_<token>``; any other (a part the sanitiser changed, or a ``_``
    that makes the meeting point ambiguous: ``a_b`` + ``c`` and ``a`` + ``b_c``) ends in ``-`` and a
    hash of the exact pair instead. So ``a/b``, ``a b``, ``a:b``, ``a_b`` and ids that differ after the
    sanitiser's length limit all stay apart.
    """
    joined = f"{video_id}_{token}"
    readable = safe_component(joined)
    if readable == joined and "_" not in video_id and "_" not in token:
        return readable
    base = _HASHED.sub("", readable) if readable != joined else readable
    pair = json.dumps([video_id, token], ensure_ascii=False).encode("utf-8", "surrogatepass")
    return f"{base}-{hashlib.sha256(pair).hexdigest()[:16]}"


def output_path(out_dir: PathLike, video_id: str, token: str, kind: str, video_format: str = "mp4") -> Path:
    """``<out_dir>/<output_stem>_<kind>.<video_format>``: distinct videos and tokens never share a file."""
    return Path(out_dir) / f"{output_stem(video_id, token)}_{kind}.{video_format.lower()}"


# -- what to draw ------------------------------------------------------------------------------
@dataclass
class _Plan:
    """One token's maps and how they map to output frames."""

    maps: np.ndarray  # [M, h, w] float32
    num_frames: Optional[int]  # output frames (linear in time), or None with a stride
    temporal_stride: Optional[int]
    labels: list[str]  # one label per output frame
    background: Optional[_Original]  # streamed, one frame per output frame
    vmin: Optional[float]
    vmax: Optional[float]
    fps: float  # frames per second of the output

    @property
    def frames(self) -> int:
        return len(self.labels)


def _video_meta(store: Store, video_id: str) -> dict[str, Any]:
    return video_info(store.metadata(video_id))


def size_from_meta(meta: Mapping[str, Any], map_hw: tuple[int, int]) -> tuple[int, int]:
    """The frame size (H, W) of a video's renders: the generated video's size from the metadata, else the
    map scaled up to at least 256 pixels high; both rounded up to even (what H.264 needs)."""
    video = video_info(meta)
    height, width = positive_int(video.get("height")), positive_int(video.get("width"))
    if height is None or width is None:
        scale = max(1, math.ceil(_MIN_SIDE / max(1, map_hw[0])))
        height, width = map_hw[0] * scale, map_hw[1] * scale
    for key, value in (("video.height", height), ("video.width", width)):
        if value > MAX_SIDE:
            raise AttnmapError(f"{key}: expected at most {MAX_SIDE} pixels, got {value}")
    return height + height % 2, width + width % 2


def output_size(store: Store, video_id: str, map_hw: tuple[int, int]) -> tuple[int, int]:
    """:func:`size_from_meta` of a stored video."""
    return size_from_meta(store.metadata(video_id), map_hw)


def original_path(meta: Mapping[str, Any], root: Optional[PathLike] = None) -> Optional[Path]:
    """The original (generated) video recorded in the metadata (``video.path``, a relative path taken
    from ``root``), when it exists on disk."""
    video = video_info(meta)
    for value in (video.get("path"), meta.get("video_path"), meta.get("original_video")):
        if isinstance(value, str) and value:
            path = Path(value)
            path = path if path.is_absolute() or root is None else Path(root) / path
            if path.is_file():
                return path
    return None


def known_original(store: Store, video_id: str) -> Optional[Path]:
    """The original video of a stored video (:func:`original_path`, relative to the store root)."""
    return original_path(store.metadata(video_id), store.root)


def map_range(
    maps: np.ndarray, normalize: str, vmin: Optional[float] = None, vmax: Optional[float] = None
) -> tuple[Optional[float], Optional[float], str]:
    """The range a render shows and the normalisation it passes on, measured on the small maps: a
    whole-map name of the vocabulary becomes ``"fixed"`` over its :func:`bounds` (a constant map: its
    lowest colour); ``"frame"`` stays per frame (``vmin``/``vmax`` still override each frame's)."""
    if normalize == "frame":
        return vmin, vmax, "frame"
    lo, hi = bounds(maps, normalize, vmin=vmin, vmax=vmax)
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi, "fixed"


def output_fps(options: RenderOptions, original_fps: Optional[float], meta: Mapping[str, Any]) -> float:
    """The output frame rate: the options', else the original video's, else the metadata's
    ``video.fps`` (each when a video can be written at it, :data:`attnmap.render.codec.FPS_RANGE`),
    else 10."""
    if options.fps is not None:
        return float(options.fps)
    for rate in (original_fps, video_info(meta).get("fps")):  # a rate no video is written at is unknown
        if (
            isinstance(rate, (int, float))
            and not isinstance(rate, bool)
            and FPS_RANGE[0] <= rate <= FPS_RANGE[1]
        ):
            return float(rate)
    return float(DEFAULT_FPS)


def frame_plan(
    meta: Mapping[str, Any],
    latent_frames: int,
    *,
    fps: float,
    options: RenderOptions,
    background_frames: Optional[int] = None,
) -> tuple[Optional[int], Optional[int]]:
    """How the aggregated map's latent frames become output frames: ``(num_frames, temporal_stride)``,
    one of them None. Onto an original video: its frames (by the VAE stride when it has exactly the
    frames the stride gives: frame 0 is latent frame 0, each later latent frame covers ``stride``
    frames, as the VAE encoded them); a one-frame map: a still held for ``static_duration`` seconds;
    else the VAE stride, or the metadata's ``video.frames`` when the stride does not give that count.
    Checked against :data:`MAX_FRAMES` before any work.

    Raises:
        AttnmapError: an output frame count above the limit, naming where it came from.
    """
    stride = vae_stride(meta)
    if background_frames is not None and latent_frames > 1:
        if stride is not None and background_frames == 1 + (latent_frames - 1) * stride:
            _bounded(background_frames, "original video frames")
            return None, stride
        return _bounded(background_frames, "original video frames"), None
    if latent_frames == 1:
        frames = max(1, round(options.static_duration * fps))
        return _bounded(frames, "static_duration"), None
    meta_frames = positive_int(video_info(meta).get("frames"))
    if meta_frames is not None and (stride is None or meta_frames != 1 + (latent_frames - 1) * stride):
        return _bounded(meta_frames, "metadata video.frames"), None
    if stride is None:
        return latent_frames, None
    _bounded(1 + (latent_frames - 1) * stride, "metadata vae_stride")
    return None, stride


def _bounded(frames: int, what: str) -> int:
    if frames > MAX_FRAMES:
        raise AttnmapError(f"{what}: {frames} output frames is more than the {MAX_FRAMES} a render may have")
    return frames


def _fps(options: RenderOptions, store: Store, video_id: str, original: Optional[_Original]) -> float:
    return output_fps(options, None if original is None else original.fps, store.metadata(video_id))


def _select_steps(available: list[int], steps: Optional[Sequence[int]], video_id: str) -> list[int]:
    if steps is None:
        return available
    have = set(available)
    missing = [s for s in steps if s not in have]
    if missing:
        shown = f"{missing[:10]}" + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise AttnmapError(f"steps {shown} are not stored for video {video_id!r}; it has steps {available}")
    return list(steps)


Original = Union[PathLike, np.ndarray]  # a video file, or its frames [T, H, W, 3] uint8 already decoded


def load_original(path: PathLike) -> np.ndarray:
    """Decode a whole original video into memory (the renders stream a file themselves; frames decoded
    here can still be passed as ``original_video``).

    Returns:
        [T, H, W, 3] uint8.
    """
    import attnmap.render as render

    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"original video {str(path)!r} does not exist")
    video, _ = render.read_video(source)
    if video.shape[0] == 0:
        raise AttnmapError(f"original video {str(path)!r} has no frames")
    return video


@dataclass(frozen=True)
class _Original:
    """An original video to overlay on, streamed chunk by chunk: a file is decoded anew by each render
    (sharing one decode between renders would hold its frames), frames in hand are sliced."""

    source: Union[Path, np.ndarray]
    frames: int  # T, its frame count
    size: tuple[int, int]  # (H, W) of the renders: the video's size cropped to even
    fps: Optional[float] = None  # its frame rate, when the file says

    @classmethod
    def open(cls, original: Original) -> _Original:
        """Check an original video and read its frame count and size (a file is probed, not decoded)."""
        import attnmap.render as render

        if isinstance(original, np.ndarray):
            video = original
            if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] == 0:
                raise AttnmapError(
                    f"original_video: expected a file or uint8 frames (T, H, W, 3), got {video.dtype} "
                    f"{video.shape}"
                )
            frames, (height, width) = video.shape[0], video.shape[1:3]
            source: Union[Path, np.ndarray] = video
            fps = None
        else:
            source = Path(original)
            if not source.is_file():
                raise FileNotFoundError(f"original video {str(original)!r} does not exist")
            frames, (height, width), rate = render.probe_video(source)
            fps = rate if rate > 0 else None
            if frames == 0:
                raise AttnmapError(f"original video {str(original)!r} has no frames")
        return cls(source, frames, (height - height % 2, width - width % 2), fps)

    def _decoded(self) -> Generator[np.ndarray, None, None]:
        import attnmap.render as render

        if isinstance(self.source, np.ndarray):
            for start in range(0, self.frames, _CHUNK):
                yield self.source[start : start + _CHUNK]
            return
        decoded = render.iter_video(self.source, _CHUNK)
        try:
            yield from decoded
        finally:
            decoded.close()

    def chunks(self, count: int, size: Optional[tuple[int, int]] = None) -> Iterator[np.ndarray]:
        """``count`` frames [t, H, W, 3] uint8 in chunks: the video's frames picked evenly (nearest, so a
        longer output repeats frames and a shorter one skips some), cropped to even and, for a ``size``
        other than :attr:`size`, scaled to it (nearest)."""
        height, width = self.size
        picks = np.linspace(0, self.frames - 1, count).round().astype(np.int64)
        served = 0
        last: Optional[np.ndarray] = None
        offset = 0
        decoded = self._decoded()
        try:
            for part in decoded:
                stop = int(np.searchsorted(picks, offset + part.shape[0]))
                if stop > served:
                    first, last_pick = int(picks[served]) - offset, int(picks[stop - 1]) - offset
                    if last_pick - first == stop - served - 1:  # consecutive frames (T in, T out): a view
                        out = part[first : last_pick + 1, :height, :width]
                    else:
                        out = part[picks[served:stop] - offset, :height, :width]
                    yield out if size is None or size == self.size else _resize_frames(out, size)
                    served = stop
                offset += part.shape[0]
                last = part[-1:, :height, :width]
                if served == count:
                    return
        finally:
            decoded.close()
        # a decoder gave fewer frames than the container counts: hold the last one
        if last is not None and served < count:
            tail = np.repeat(last, count - served, axis=0)
            yield tail if size is None or size == self.size else _resize_frames(tail, size)


def plan_token(
    store: Store,
    video_id: str,
    token: str,
    *,
    options: RenderOptions,
    mode: Mode = "aggregated",
    steps: Optional[Sequence[int]] = None,
    original_video: Optional[Original] = None,
    block: Optional[int] = None,
    head: Optional[int] = None,
    branch: Optional[str] = None,
) -> tuple[_Plan, tuple[int, int]]:
    """Load one token's maps and decide the output frames (see the module docstring).

    The output's frames, size and pixels are checked against :data:`MAX_FRAMES`, :data:`MAX_SIDE` and
    :data:`MAX_PIXELS` before a map is loaded, so an absurd request fails at once with an error naming
    its cause.

    Args:
        block: one block's maps (stored with per_block), or None for the mean over blocks.
        head: one head of per-head maps, or None for the mean over heads.
        branch: ``"cond"`` or ``"uncond"`` (see :meth:`attnmap.store.Store.map_name`).
    """
    if mode not in ("aggregated", "steps"):
        raise AttnmapError(f"mode must be 'aggregated' or 'steps', got {mode!r}")
    head = None if head is None else integer("head", head, low=0)
    tokens = store.tokens(video_id)
    if token not in tokens:
        raise KeyError(f"token {token!r} is not stored for video {video_id!r}; it has {tokens}")
    meta = store.metadata(video_id)
    background = None if original_video is None else _Original.open(original_video)
    fps = _fps(options, store, video_id, background)
    name = store.map_name(video_id, token, block=block, branch=branch)
    if mode == "steps":
        available = [s for s in store.steps(video_id) if name in store.names(video_id, s)]
        if not available:
            raise KeyError(f"token {token!r} has no step maps {name!r} in video {video_id!r}")
        chosen = _select_steps(available, steps, video_id)
        k = options.interpolation_steps
        total = len(chosen) + max(0, len(chosen) - 1) * k
        _bounded(total, "interpolation_steps")
        # a step whose map fails its checksum is skipped (the store names its file in a warning)
        loaded = [
            (s, _pick_head(m, head, name).mean(axis=0)) for s, m in store.step_maps(video_id, name, chosen)
        ]
        if not loaded:
            raise KeyError(f"token {token!r} has no good step map {name!r} in video {video_id!r}")
        chosen = [s for s, _ in loaded]
        per_step = np.stack([m for _, m in loaded])
        if len(chosen) > 1 and k > 0:
            weights = np.arange(1, k + 1, dtype=np.float32) / (k + 1)
            parts = []
            for a, b in zip(per_step[:-1], per_step[1:]):
                parts.append(a[None])
                parts.append(a[None] * (1 - weights[:, None, None]) + b[None] * weights[:, None, None])
            parts.append(per_step[-1:])
            maps = np.concatenate(parts).astype(np.float32)
            owners = [chosen[i // (k + 1)] for i in range(maps.shape[0])]
        else:
            maps, owners = per_step.astype(np.float32), list(chosen)
        labels = [f"{token} | step {s} ({chosen.index(s) + 1}/{len(chosen)})" for s in owners]
        num_frames: Optional[int] = maps.shape[0]
        stride = None
    else:
        if steps is not None:
            chosen = _select_steps(store.steps(video_id), steps, video_id)
            maps = _pick_head(store.mean(video_id, name, chosen), head, name)
            what = f"mean of steps {chosen[0]}..{chosen[-1]}" if len(chosen) > 1 else f"step {chosen[0]}"
        else:
            maps = _pick_head(aggregated_map(store, video_id, name), head, name)
            what = "mean of steps"
        maps = on_input_frames(maps.astype(np.float32), meta)  # a video LLM's slots onto its input frames
        frames = None if background is None else background.frames
        num_frames, stride = frame_plan(
            meta, maps.shape[0], fps=fps, options=options, background_frames=frames
        )
        total = num_frames if num_frames is not None else 1 + (maps.shape[0] - 1) * int(stride or 1)
        labels = [f"{token} | {what}" for _ in range(total)]
    if block is not None:
        labels = [f"{label} | block {block}" for label in labels]
    if head is not None:
        labels = [f"{label} | head {head}" for label in labels]
    size = background.size if background is not None else size_from_meta(meta, (maps.shape[1], maps.shape[2]))
    if len(labels) * size[0] * size[1] > MAX_PIXELS:
        raise AttnmapError(
            f"the render of {token!r} would have {len(labels)} frames of {size[0]} x {size[1]}: more than "
            f"the {MAX_PIXELS} pixels a render may have"
        )
    if options.include_timestamp:
        labels = [f"{label} | t={i / fps:.2f}s" for i, label in enumerate(labels)]
    vmin, vmax, _ = map_range(maps, options.normalize, options.vmin, options.vmax)
    return _Plan(maps, num_frames, stride, labels, background, vmin, vmax, fps), size


def _pick_head(arr: np.ndarray, head: Optional[int], name: str) -> np.ndarray:
    """A token map [F, h, w] from a stored one: per-head [H, F, h, w] averaged, or the one ``head``."""
    if arr.ndim == 4:
        if head is None:
            return arr.mean(axis=0)
        if not 0 <= head < arr.shape[0]:
            raise AttnmapError(f"head: expected 0..{arr.shape[0] - 1} for {name!r}, got {head}")
        return arr[head]
    if head is not None:
        raise AttnmapError(f"head: {name!r} was stored without per-head maps (shape {arr.shape})")
    if arr.ndim != 3:
        raise AttnmapError(f"token map {name!r} has shape {arr.shape}, expected [F, H, W]")
    return arr


def _chunks(plan: _Plan, size: tuple[int, int], options: RenderOptions) -> Iterator[np.ndarray]:
    import attnmap.render as render

    _, _, how = map_range(plan.maps, options.normalize, options.vmin, options.vmax)
    kwargs: dict[str, Any] = {
        "size": size,
        "colormap": options.colormap,
        "normalize": how,
        "chunk": _CHUNK,
    }
    if how == "fixed" or plan.vmin is not None or plan.vmax is not None:
        kwargs.update(vmin=plan.vmin, vmax=plan.vmax)
    if plan.temporal_stride is not None:
        kwargs["temporal_stride"] = plan.temporal_stride
    else:
        kwargs["num_frames"] = plan.frames
    if plan.background is not None:
        kwargs.update(background=plan.background.chunks(plan.frames, size), alpha=options.overlay_alpha)
    if options.threshold is not None:
        kwargs["outline"] = options.threshold
    yield from render.iter_frames(plan.maps, **kwargs)


def _decorated(
    chunks: Iterable[np.ndarray],
    labels: Sequence[str],
    decor: Optional[Decor],
    colormap: str,
    task: Optional[Task],
) -> Iterator[np.ndarray]:
    index = 0
    for chunk in chunks:
        if decor is not None:
            for frame in chunk:
                decorate(frame, decor, labels[min(index, len(labels) - 1)] if labels else None, colormap)
                index += 1
        if task is not None:
            task.advance(chunk.shape[0])
        yield chunk


def _plan_decor(plan: _Plan, size: tuple[int, int], options: RenderOptions) -> Optional[Decor]:
    vrange = None if plan.vmin is None or plan.vmax is None else (plan.vmin, plan.vmax)
    return decor_layout(
        size[0], size[1], labels=options.labels, colorbar=options.include_colorbar, vrange=vrange
    )


def _target(output: PathLike, options: RenderOptions) -> Path:
    out = Path(output)
    if out.suffix.lower() not in VIDEO_SUFFIXES:
        if out.suffix:
            names = ", ".join(VIDEO_SUFFIXES)
            raise AttnmapError(f"output must end in one of {names}, got {str(output)!r}")
        out = out.with_suffix("." + options.video_format.lower())
    return out


#: libx264 settings of the renders: "ultrafast" encodes ~5x faster than the default "medium" at crf 18
#: (files about 2x larger); heatmaps, smooth maps over a video, lose nothing visible.
X264_OPTIONS = {"preset": "ultrafast"}


def _make_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"output: cannot make the folder {str(out.parent)!r}: {e.strerror or e}") from None


def _write(chunks: Iterable[np.ndarray], out: Path, fps: float, frames: int) -> Path:
    """Encode, then check that the file holds its frames: a render whose file cannot be read back (a full
    disk, a failed close) is an error, and its file is removed."""
    import attnmap.render as render

    options = X264_OPTIONS if out.suffix.lower() in (".mp4", ".mkv", ".mov") else None
    path = Path(render.write_video(chunks, out, fps=fps, options=options))
    try:
        count = render.probe_video(path)[0]
    except (OSError, ValueError) as exc:
        count, cause = -1, f": {exc}"
    else:
        cause = f": it holds {count}"
    if count != frames:
        path.unlink(missing_ok=True)
        raise AttnmapError(
            f"output: the render wrote {str(path)!r} but it does not hold its {frames} frames{cause}"
        )
    return path


def render_token(
    store: Store,
    video_id: str,
    token: str,
    output: PathLike,
    *,
    options: Optional[RenderOptions] = None,
    mode: Mode = "aggregated",
    steps: Optional[Sequence[int]] = None,
    original_video: Optional[Original] = None,
    block: Optional[int] = None,
    head: Optional[int] = None,
    branch: Optional[str] = None,
    quiet: bool = True,
    progress: Optional[Progress] = None,
) -> Path:
    """Render one token of a stored video to a video file.

    Args:
        store: an opened store (:func:`attnmap.open_store`).
        video_id: the video.
        token: one of ``store.tokens(video_id)``.
        output: the video file (``.mp4``, ``.webm``, ``.gif``, ``.mkv``, ``.mov``; no suffix: the options'
            ``video_format``).
        options: how it looks (:class:`RenderOptions`).
        mode: ``"aggregated"`` (the step mean following the video's frames) or ``"steps"`` (the step
            evolution).
        steps: the steps to use (default: all stored).
        original_video: a video file to overlay the heatmap on (decoded chunk by chunk as the render
            goes), or its frames [T, H, W, 3] uint8 in hand (:func:`load_original`).
        block: one block's maps (stored with per_block); None: the mean over blocks.
        head: one head of per-head maps; None: the mean over heads.
        branch: ``"cond"`` or ``"uncond"``; None: the branch the video recorded.
        quiet: no progress display on stderr (unless ``progress`` is given).
        progress: the command's :class:`Progress`, shared with other renders.

    Returns:
        The path written.
    """
    options = options or RenderOptions()
    out = _target(output, options)
    plan, size = plan_token(
        store,
        video_id,
        token,
        options=options,
        mode=mode,
        steps=steps,
        original_video=original_video,
        block=block,
        head=head,
        branch=branch,
    )
    decor = _plan_decor(plan, size, options)
    _make_parent(out)
    with render_task(progress, quiet, f"{video_id}/{token} -> {out.name}", plan.frames) as task:
        chunks = _decorated(_chunks(plan, size, options), plan.labels, decor, options.colormap, task)
        return _write(chunks, out, plan.fps, plan.frames)


def render_grid(
    store: Store,
    video_id: str,
    tokens: Sequence[str],
    output: PathLike,
    *,
    options: Optional[RenderOptions] = None,
    mode: Mode = "aggregated",
    steps: Optional[Sequence[int]] = None,
    original_video: Optional[Original] = None,
    block: Optional[int] = None,
    head: Optional[int] = None,
    branch: Optional[str] = None,
    max_width: int = 1920,
    quiet: bool = True,
    progress: Optional[Progress] = None,
) -> Path:
    """Render several tokens side by side, each panel labelled with its word and with a colour bar of its
    own range (each is normalised on its own).

    Args:
        store: an opened store.
        video_id: the video.
        tokens: two or more stored words (one works too).
        output: the video file.
        options: how it looks.
        mode: as in :func:`render_token`.
        steps: as in :func:`render_token`.
        original_video: overlay every panel on this video.
        block: as in :func:`render_token`.
        head: as in :func:`render_token`.
        branch: as in :func:`render_token`.
        max_width: panels are scaled down so that the grid is at most this wide.
        quiet: no progress display.
        progress: as in :func:`render_token`.

    Returns:
        The path written.
    """
    options = options or RenderOptions()
    if not tokens:
        raise AttnmapError("tokens must name at least one stored word, got none")
    max_width = integer("max_width", max_width, low=2 * len(tokens), high=MAX_SIDE)
    out = _target(output, options)
    choice: dict[str, Any] = {"block": block, "head": head, "branch": branch}
    plans = [
        plan_token(
            store,
            video_id,
            t,
            options=options,
            mode=mode,
            steps=steps,
            original_video=original_video,
            **choice,
        )
        for t in tokens
    ]
    height, width = plans[0][1]
    scale = min(1.0, max_width / (width * len(tokens)))
    panel = (max(2, int(height * scale) // 2 * 2), max(2, int(width * scale) // 2 * 2))
    frames = plans[0][0].frames
    streams = [
        _decorated(
            _chunks(p, panel, options), p.labels, _plan_decor(p, panel, options), options.colormap, None
        )
        for p, _ in plans
    ]

    def grid_chunks() -> Iterator[np.ndarray]:
        for parts in zip(*streams):
            n = min(p.shape[0] for p in parts)
            yield np.concatenate([p[:n] for p in parts], axis=2)

    _make_parent(out)
    with render_task(progress, quiet, f"{video_id} grid -> {out.name}", frames) as task:
        return _write(
            _decorated(grid_chunks(), [], None, options.colormap, task), out, plans[0][0].fps, frames
        )


def render_still(
    store: Store,
    video_id: str,
    token: str,
    output: PathLike,
    *,
    frame: Optional[int] = None,
    options: Optional[RenderOptions] = None,
    steps: Optional[Sequence[int]] = None,
    original_video: Optional[Original] = None,
    block: Optional[int] = None,
    head: Optional[int] = None,
    branch: Optional[str] = None,
) -> Path:
    """One still overlay image (PNG) of a token, with its label and colour bar: frame ``frame`` of its
    aggregated video, exactly as the video shows it, or (``frame=None``) the map's mean over the latent
    frames over the original's middle frame.

    Args:
        store: an opened store.
        video_id: the video.
        token: a stored word.
        output: the image file (``.png``).
        frame: an output frame (0 .. the video's frames - 1), or None for the mean over frames.
        options: how it looks.
        steps: the steps averaged (default: the step-aggregated map).
        original_video: the video to overlay on (None: the colormap alone).
        block: as in :func:`render_token`.
        head: as in :func:`render_token`.
        branch: as in :func:`render_token`.

    Returns:
        The path written.
    """
    from PIL import Image

    from attnmap._io import atomic_path

    options = options or RenderOptions()
    out = Path(output)
    if out.suffix.lower() != ".png":
        raise AttnmapError(f"output: expected a file ending in .png, got {str(output)!r}")
    choice: dict[str, Any] = {"block": block, "head": head, "branch": branch, "steps": steps}
    plan, size = plan_token(store, video_id, token, options=options, original_video=original_video, **choice)
    if frame is None:
        background = None
        if plan.background is not None:
            middle = _nth(plan.background.chunks(plan.background.frames, size), plan.background.frames // 2)
            background = _Original(middle[None], 1, size)
        mean = plan.maps.mean(axis=0, keepdims=True)
        vmin, vmax, _ = map_range(mean, options.normalize, options.vmin, options.vmax)
        label = f"{plan.labels[0]} | mean over frames"
        plan = replace(plan, maps=mean, num_frames=1, temporal_stride=None, labels=[label], background=background,
                       vmin=vmin, vmax=vmax)  # fmt: skip
        frame = 0
    elif isinstance(frame, bool) or not isinstance(frame, int) or not 0 <= frame < plan.frames:
        raise AttnmapError(f"frame: expected an output frame 0..{plan.frames - 1}, got {frame!r}")
    image = np.ascontiguousarray(_nth(_chunks(plan, size, options), frame))
    decor = _plan_decor(plan, size, options)
    if decor is not None:
        decorate(
            image,
            decor,
            f"{plan.labels[frame]}" + ("" if plan.frames == 1 else f" | frame {frame}"),
            options.colormap,
        )
    _make_parent(out)
    with atomic_path(out, suffix=".png") as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return out


def _nth(chunks: Iterator[np.ndarray], index: int) -> np.ndarray:
    """Frame ``index`` of a stream of frame chunks (the stream is closed after it)."""
    start = 0
    try:
        for chunk in chunks:
            if index < start + chunk.shape[0]:
                return chunk[index - start]
            start += chunk.shape[0]
    finally:
        close = getattr(chunks, "close", None)
        if callable(close):
            close()
    raise AttnmapError(f"frame: expected a frame below {start}, got {index}")


def _resize_frames(video: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of uint8 frames ``[T, H, W, 3]`` to ``size`` (for grid panels)."""
    rows = (np.arange(size[0]) * video.shape[1] / size[0]).astype(np.int64)
    cols = (np.arange(size[1]) * video.shape[2] / size[1]).astype(np.int64)
    return np.ascontiguousarray(video[:, rows][:, :, cols])


def render_video(
    root: PathLike,
    video_id: str,
    out_dir: PathLike,
    options: Optional[RenderOptions] = None,
    *,
    original_video: Optional[PathLike] = None,
    tokens: Optional[Sequence[str]] = None,
    quiet: bool = True,
    progress: Optional[Progress] = None,
    on_done: Optional[Callable[[Path], None]] = None,
) -> list[Path]:
    """Render every token of one stored video into ``out_dir``.

    Writes ``<video_id>_<token>_attention.<fmt>`` (the step-aggregated map following the video's frames)
    and, when an original video is known (``original_video`` or the metadata's ``video.path``),
    ``<video_id>_<token>_overlay.<fmt>``. This is what capture runs at the end of each video with
    ``auto_generate_per_video``. Each overlay streams the original video, decoding it chunk by chunk as
    it renders, so no render holds the whole video; two renders run at a time; a failure stops the renders
    not yet started, and every finished file stays.

    Args:
        root: the store root.
        video_id: the video.
        out_dir: the output folder (made if missing).
        options: how the renders look (a config's ``visualization_params``; default: the defaults).
        original_video: the generated video to overlay on.
        tokens: the words to render (default: every stored word).
        quiet: no progress display (unless ``progress`` is given).
        progress: one :class:`Progress` for both render threads (default: one of this call's own).
        on_done: called with each path as soon as its file is finished (from the render threads), so a
            caller can report finished files even when a later render fails.

    Returns:
        The paths written, attention then overlay for each token.
    """
    from attnmap.store import open_store

    store = open_store(root)
    options = options or RenderOptions()
    original = Path(original_video) if original_video is not None else known_original(store, video_id)
    if original is not None and not original.is_file():
        raise FileNotFoundError(f"original video {str(original)!r} does not exist")
    words = list(tokens) if tokens is not None else store.tokens(video_id)
    jobs: list[tuple[str, Path, Optional[Path]]] = []
    for word in words:
        jobs.append((word, output_path(out_dir, video_id, word, "attention", options.video_format), None))
        if original is not None:
            target = output_path(out_dir, video_id, word, "overlay", options.video_format)
            jobs.append((word, target, original))

    stopped = threading.Event()  # set by the first failure (or Ctrl-C): no render starts after it

    def run(job: tuple[str, Path, Optional[Path]]) -> Optional[Path]:
        word, target, original_frames = job
        if stopped.is_set():
            return None
        try:
            path = render_token(
                store, video_id, word, target, options=options, original_video=original_frames, progress=shown
            )
        except BaseException:
            stopped.set()
            raise
        if on_done is not None:
            on_done(path)
        return path

    # Two renders at a time: the Rust render, the colour conversion and libx264 all release the GIL, and
    # one render alone leaves a core idle while its encoder waits on its producer (and back). A failure
    # stops the renders not yet started; finished ones stay, each written atomically.
    with display(progress, quiet) as shown:
        pool = ThreadPoolExecutor(max_workers=_WORKERS)
        try:
            futures = [pool.submit(run, job) for job in jobs]
            return [path for future in futures if (path := future.result()) is not None]
        except BaseException:
            stopped.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def render_store(
    root: PathLike,
    options: Optional[RenderOptions] = None,
    *,
    out_dir: Optional[PathLike] = None,
    quiet: bool = True,
    progress: Optional[Progress] = None,
) -> dict[str, list[Path]]:
    """Render every video of a store (:func:`render_video` for each; what ``auto_generate_videos`` runs at
    the end of a batch).

    Args:
        root: the store root.
        options: how the renders look.
        out_dir: the output folder; default ``<root's parent>/attention_videos``.
        quiet: no progress display (unless ``progress`` is given).
        progress: one :class:`Progress` for every render.

    Returns:
        video id -> the paths written for it.
    """
    from attnmap.store import open_store

    store = open_store(root)
    target = Path(out_dir) if out_dir is not None else Path(root).resolve().parent / "attention_videos"
    with display(progress, quiet) as shown:
        return {
            video_id: render_video(root, video_id, target, options, progress=shown)
            for video_id in store.videos()
        }


def render_figures(
    store: Store,
    video_id: str,
    out_dir: PathLike,
    *,
    fmt: str = "png",
    tokens: Optional[Sequence[str]] = None,
) -> list[Path]:
    """Draw every figure the stored maps of one video allow into ``out_dir`` (see :mod:`attnmap.figures`):
    tokens over steps and frames, the F x F temporal matrix, the per-head temporal locality (per block when
    stored per block) and the text self-attention (with the metadata's ``text_tokens`` as labels).

    Returns:
        The paths written.
    """
    import attnmap.render.figures as figures
    from attnmap.analysis.maps import temporal_locality

    if fmt not in ("png", "svg"):
        raise AttnmapError(f"fmt must be 'png' or 'svg', got {fmt!r}")
    out = Path(out_dir)
    stem = safe_component(video_id)
    stored = store.tokens(video_id)
    words = list(tokens) if tokens else stored
    unknown = [w for w in words if w not in stored]
    if unknown:
        raise KeyError(f"token {unknown[0]!r} is not stored for video {video_id!r}; it has {stored}")
    written: list[Path] = []
    if words and store.steps(video_id):
        # each word's good steps (a step that fails its checksum is skipped, named in a warning); the
        # figure compares the words over the steps they all have
        loaded = [{m.metadata["step"]: m.map for m in store.load_all_steps(video_id, w)} for w in words]
        steps = sorted(set.intersection(*(set(one) for one in loaded)))
        if not steps:
            raise AttnmapError(f"video {video_id!r}: the words {words} share no good step to compare")
        series = {w: np.stack([one[s] for s in steps]) for w, one in zip(words, loaded)}
        title = f"{video_id}: tokens over steps and frames"
        written.append(
            figures.temporal_comparison(series, out / f"{stem}_tokens.{fmt}", steps=steps, title=title)
        )
    names = store.names(video_id)
    if "temporal" in names:
        temporal = aggregated_map(store, video_id, "temporal")
        if temporal.ndim == 3:  # per head [H, F, F]
            written.append(figures.head_locality(temporal_locality(temporal), out / f"{stem}_locality.{fmt}"))
            temporal = temporal.mean(axis=0)
        written.append(figures.temporal_matrix(temporal, out / f"{stem}_temporal.{fmt}"))
    blocks = sorted(int(n.rsplit("block", 1)[1]) for n in names if re.fullmatch(r"temporal/block\d+", n))
    per_block = [aggregated_map(store, video_id, f"temporal/block{b}") for b in blocks]
    if per_block and all(t.ndim == 3 for t in per_block):
        locality = np.stack([temporal_locality(t) for t in per_block])
        path = out / f"{stem}_locality_blocks.{fmt}"
        written.append(figures.head_locality(locality, path, blocks=blocks))
    if "text" in names:
        text = aggregated_map(store, video_id, "text")
        text = text.mean(axis=0) if text.ndim == 3 else text
        meta = store.metadata(video_id)
        real, how = real_text_length(meta, text.shape[-1])
        names_of = real_text_words(meta, real)
        title = f"text self-attention: {real} real tokens of {text.shape[-1]} ({how})"
        path = out / f"{stem}_text.{fmt}"
        written.append(figures.text_attention(text[:real, :real], path, labels=names_of, title=title))
    if not written:
        raise AttnmapError(f"video {video_id!r} has no maps to draw figures from")
    return written
