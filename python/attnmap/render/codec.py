"""Video files: encode frames with PyAV (atomically, on an encoder thread), decode, probe.

Example:
    >>> from attnmap.render import frames, write_video, read_video
    >>> write_video(frames(maps, size=(480, 832), temporal_stride=4), "out.mp4", fps=16)
    >>> video, fps = read_video("out.mp4")
"""

from __future__ import annotations

import fractions
import os
import pathlib
import queue
import threading
from collections.abc import Generator, Iterator, Mapping
from typing import Any, Optional, Union

import numpy as np

from attnmap import _native
from attnmap._checks import integer, number
from attnmap._io import atomic_path
from attnmap.errors import AttnmapError

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
#: the frame rates a video is written at: a rate is kept as a fraction of denominator at most 1001
#: (NTSC's 30000/1001), so slower than one frame in 1000 s would be 0 fps; faster than 1000 fps no
#: player shows
FPS_RANGE = (0.001, 1000.0)
#: a GIF stores each frame's delay in whole 1/100 s (at most 65,535): its rates
GIF_FPS_RANGE = (0.002, 100.0)
_QUEUE_CHUNKS = 4


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
    """Encodes chunks on a thread; the container opens on the first chunk (which fixes the size).

    The producer calls :meth:`put` for each chunk, then :meth:`finish`, or :meth:`abort` when it fails.
    Any error of the thread (a full disk in ``mux`` or in the container's ``close``) is kept in
    ``error`` and raised to the producer: by ``put``, which never blocks on a thread that stopped
    taking chunks, and by ``finish``. The thread drains the queue up to the end marker only while the
    end marker is still to come, so neither side ever waits for the other.
    """

    def __init__(
        self, tmp: pathlib.Path, fmt: str, codec: str, pix_fmt: str, fps: float, options: dict[str, str]
    ):
        self.tmp, self.fmt, self.codec, self.pix_fmt, self.options = tmp, fmt, codec, pix_fmt, options
        self.rate = fractions.Fraction(fps).limit_denominator(1001)
        self.queue: queue.Queue[Optional[np.ndarray]] = queue.Queue(maxsize=_QUEUE_CHUNKS)
        self.error: Optional[BaseException] = None
        self.cancelled = False
        self.frames = 0
        self.thread = threading.Thread(target=self._run, name="attnmap-encode", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import av

        container: Any = None
        ended = False  # the end marker was taken from the queue
        try:
            stream: Any = None
            while True:
                chunk = self.queue.get()
                if chunk is None:
                    ended = True
                    break
                if self.cancelled:
                    continue
                if container is None:
                    container = av.open(str(self.tmp), "w", format=self.fmt)
                    stream = self._add_stream(container, chunk)
                self._encode(av, container, stream, chunk)
            if container is not None and not self.cancelled:
                container.mux(stream.encode(None))
        except BaseException as e:
            self.error = e
        finally:
            if container is not None:
                try:
                    container.close()  # writes the trailer: a full disk fails here too
                except BaseException as e:
                    self.error = self.error or e
            if not ended:  # drain so that the producer's last put (the end marker) finds room
                while self.queue.get() is not None:
                    pass

    def _add_stream(self, container: Any, chunk: np.ndarray) -> Any:
        stream = container.add_stream(self.codec, rate=self.rate, options=self.options)
        h, w = chunk.shape[1:3]
        if self.pix_fmt == "yuv420p":
            h, w = h + h % 2, w + w % 2
        stream.width, stream.height, stream.pix_fmt = w, h, self.pix_fmt
        return stream

    def _encode(self, av: Any, container: Any, stream: Any, chunk: np.ndarray) -> None:
        if self.pix_fmt == "yuv420p":
            if chunk.shape[1:3] != (stream.height, stream.width):
                pad = ((0, 0), (0, stream.height - chunk.shape[1]), (0, stream.width - chunk.shape[2]))
                chunk = np.pad(chunk, (*pad, (0, 0)), mode="edge")
            # Rust's parallel BT.601 conversion: swscale's rgb24 path costs more than x264 itself
            for planes in _native.rgb_to_yuv420(np.ascontiguousarray(chunk)):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(planes, format="yuv420p")))
                self.frames += 1
            return
        for frame in chunk:
            pal8: Any = _gif_palette(frame)  # (indices, ARGB palette): PyAV's pal8 input
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pal8, format="pal8")))
            self.frames += 1

    def put(self, chunk: Optional[np.ndarray]) -> None:
        """Queue a chunk (None: the end marker); raises the thread's error as soon as there is one."""
        while True:
            if self.error is not None:
                raise self.error
            if not self.thread.is_alive():
                raise RuntimeError("the encoder thread stopped without an error")  # pragma: no cover
            try:
                self.queue.put(chunk, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Send the end marker, wait for the thread, and raise its error if it had one."""
        self.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Stop the thread after a failure of the producer: what is queued is dropped, the end marker
        sent (unless the thread already stopped) and the thread joined."""
        self.cancelled = True
        while self.thread.is_alive():
            try:
                self.queue.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        self.thread.join()


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
    low, high = GIF_FPS_RANGE if suffix == ".gif" else FPS_RANGE
    fps = number("fps", fps, low=low, high=high)
    parent = out.parent if str(out.parent) else pathlib.Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"path: cannot write {str(out)!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"path: cannot write {str(out)!r}: folder {str(parent)!r} is not writable")
    fmt, default_codec, pix_fmt = _CONTAINERS[suffix]
    codec = codec or default_codec
    _check_codec(codec)
    top = _MAX_CRF.get(codec, 63)
    if crf is not None:
        try:
            crf = integer("crf", crf, low=0, high=top)
        except AttnmapError as exc:
            raise AttnmapError(f"{exc} (the range of {codec}; lower is better)") from None
    opts = {k: str(v) for k, v in (options or {}).items()}
    quality = crf if crf is not None else _DEFAULT_CRF.get(codec)
    if quality is not None and codec in _DEFAULT_CRF:
        opts.setdefault("crf", str(int(quality)))
        if codec == "libvpx-vp9":
            opts.setdefault("b", "0")
    size: Optional[tuple[int, int]] = None
    # An error anywhere (the frames, the encoder, the container's close) leaves `out` as it was:
    # atomic_path removes the temp file and renames nothing into place.
    with atomic_path(out, suffix=suffix) as tmp:
        encoder = _Encoder(tmp, fmt, codec, pix_fmt, fps, opts)
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
            encoder.finish()
        except BaseException:
            encoder.abort()
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
    chunk = integer("chunk", chunk, low=1)
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


__all__ = ["iter_video", "probe_video", "read_video", "write_video"]
