"""attnmap.render: the Python API over _native, and video files decoded back with PyAV."""

from __future__ import annotations

import os
import pathlib

import av
import numpy as np
import pytest
import torch
from matplotlib import colormaps

from attnmap import render
from attnmap._native import AttnmapError
from attnmap.render import codec


def reference_frames(maps: np.ndarray, size: tuple[int, int], frames: int, cmap: str) -> np.ndarray:
    """numpy global min-max -> torch trilinear -> matplotlib colormap."""
    t = (maps - maps.min()) / (maps.max() - maps.min())
    x = torch.from_numpy(t.astype(np.float32))[None, None]
    heat = torch.nn.functional.interpolate(x, size=(frames, *size), mode="trilinear", align_corners=False)[
        0, 0
    ]
    return np.asarray(colormaps[cmap](heat.numpy(), bytes=True))[..., :3]


def test_frames_match_the_reference_pipeline() -> None:
    maps = np.random.default_rng(0).random((4, 6, 10)).astype(np.float64)  # float64 is accepted
    got = render.frames(maps, size=(24, 40), num_frames=7, colormap="inferno")
    want = reference_frames(maps, (24, 40), 7, "inferno")
    assert got.shape == (7, 24, 40, 3) and got.dtype == np.uint8
    # a heat value within 1e-5 of torch's may fall on the other side of a level boundary
    assert (got == want).all(-1).mean() > 0.995


def test_two_dimensional_map_and_torch_tensor() -> None:
    m = torch.rand(5, 8, dtype=torch.float16)
    got = render.frames(m, colormap="gray")
    assert got.shape == (1, 5, 8, 3)
    np.testing.assert_array_equal(got, render.frames(m.float().numpy()[None], colormap="gray"))


def test_iter_frames_chunks_equal_frames() -> None:
    rng = np.random.default_rng(1)
    maps = rng.random((5, 6, 7)).astype(np.float32)
    bg = rng.integers(0, 256, (17, 12, 14, 3), dtype=np.uint8)
    kw = dict(
        temporal_stride=4, normalize="frame", background=bg, alpha=0.7, alpha_mode="attention", outline=0.6
    )
    whole = render.frames(maps, **kw)
    parts = list(render.iter_frames(maps, chunk=5, **kw))
    assert [p.shape[0] for p in parts] == [5, 5, 5, 2]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert whole.shape == (17, 12, 14, 3)


def test_fixed_range_is_not_rescaled() -> None:
    maps = np.full((1, 2, 2), 0.25, np.float32)
    got = render.frames(maps, normalize="fixed", vmin=0.0, vmax=1.0, colormap="viridis")
    want = np.asarray(colormaps["viridis"](np.float32(0.25), bytes=True))[:3]
    assert (got == want).all()


def test_colorbar_helpers() -> None:
    assert render.colormap_table("turbo").shape == (256, 3)
    strip = render.colorize(np.linspace(0, 1, 300)[None].repeat(4, 0), "plasma")
    assert strip.shape == (4, 300, 3)
    np.testing.assert_array_equal(strip[0, -1], render.colormap_table("plasma")[255])
    assert "RdBu_r" in render.colormap_names()
    assert render.num_output_frames(21, temporal_stride=4) == 81


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((np.zeros((2, 2), np.int32),), {}, "maps: expected a float array"),
        ((np.zeros((1, 1, 2, 2), np.float32),), {}, "maps: expected a non-empty float array of shape"),
        (
            (np.zeros((2, 2), np.float32),),
            {"background": np.zeros((2, 2, 3), np.float32)},
            "background: expected uint8",
        ),
        (
            (np.zeros((2, 2, 2), np.float32),),
            {"background": np.zeros((3, 2, 2, 3), np.uint8)},
            "background: expected 2 frames",
        ),
        (
            (np.zeros((2, 2), np.float32),),
            {"size": (4, 4), "background": np.zeros((2, 2, 3), np.uint8)},
            "background: expected frames of size (4, 4)",
        ),
        (
            (np.zeros((2, 2), np.float32),),
            {"alpha": -0.1},
            "alpha: expected a finite number in [0, 1], got -0.1",
        ),
        (
            (np.zeros((2, 2), np.float32),),
            {"colormap": "Hot"},
            "colormap: expected one of hot, jet, viridis",
        ),
        ((np.zeros((2, 2), np.float32),), {"normalize": "minmax"}, "normalize: expected one of"),
        (
            (np.zeros((2, 2), np.float32),),
            {"size": (0, 3)},
            "size: expected (H, W): 2 integers >= 1, got (0, 3)",
        ),
        (
            (np.zeros((2, 2), np.float32),),
            {"percentile": (1,)},
            "percentile: expected (lo, hi) with 0 <= lo < hi <= 100, got (1,)",
        ),
        ((np.zeros((2, 2), np.float32),), {"size": (200_000, 3)}, "size: expected at most 131072 pixels"),
        (
            (np.zeros((2, 2, 2), np.float32),),
            {"num_frames": 10**10},
            "num_frames: expected at most 65536 output frames",
        ),
        (
            (np.zeros((2, 2, 2), np.float32),),
            {"num_frames": 2**24},
            "num_frames: expected at most 65536 output frames (render.heatmap.MAX_FRAMES), got 16777216",
        ),
        (
            (np.zeros((3, 2, 2), np.float32),),
            {"temporal_stride": 100_000},
            "temporal_stride: expected at most 65536 output frames (render.heatmap.MAX_FRAMES), got 200001",
        ),
        (
            (np.zeros((2, 2), np.float32),),
            {"size": (20_000, 20_000)},
            "size: expected at most 131072 pixels a side and 268435456 a frame",
        ),
        (
            (np.zeros((2, 2), np.float32),),
            {"size": (4096, 4096), "num_frames": 400},
            "num_frames: 400 frames of 4096 x 4096 RGB would take 18.8 GiB, more than 16 GiB",
        ),
        (
            (np.zeros((2, 2), np.float32),),
            {"num_frames": 2.5},
            "num_frames: expected an integer >= 1, got 2.5",
        ),
    ],
)
def test_bad_input_names_the_argument(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        render.frames(*args, **kwargs)
    assert isinstance(info.value, AttnmapError)
    assert str(info.value).startswith(message)


def smooth_video(t: int, h: int, w: int) -> np.ndarray:
    """Flat colour blocks that survive lossy coding: the round trip checks colours."""
    maps = np.zeros((t, 4, 4), np.float32)
    for i in range(t):
        maps[i, :, (i // 4) % 4] = 0.5
        maps[i, i % 4, :] = 1.0  # 16 distinct frames before repeating
    return render.frames(maps, size=(h, w), colormap="viridis", normalize="fixed", vmin=0.0, vmax=1.0)


@pytest.mark.parametrize(("suffix", "tol"), [(".mp4", 6.0), (".webm", 6.0), (".gif", 3.0)])
def test_write_read_round_trip(tmp_path: pathlib.Path, suffix: str, tol: float) -> None:
    video = smooth_video(12, 64, 96)
    path = render.write_video(iter([video[:5], video[5:]]), tmp_path / f"clip{suffix}", fps=8)
    assert path == tmp_path / f"clip{suffix}" and os.listdir(tmp_path) == [path.name]
    frames, fps = render.read_video(path)
    assert frames.shape == video.shape
    assert fps == pytest.approx(8 if suffix != ".gif" else 100 / 12, rel=1e-6)
    err = np.abs(frames.astype(int) - video.astype(int))
    assert err.mean() <= tol, f"mean abs error {err.mean():.2f}"
    # every decoded frame is nearest to the frame it encodes (order and content survive)
    dist = np.abs(frames[:, None].astype(int) - video[None].astype(int)).mean(axis=(2, 3, 4))
    np.testing.assert_array_equal(dist.argmin(1), np.arange(len(video)))
    with av.open(str(path)) as c:
        assert (
            c.streams.video[0].codec_context.name
            in {".mp4": ("h264",), ".webm": ("vp9", "libvpx-vp9"), ".gif": ("gif",)}[suffix]
        )


def test_odd_sizes_are_padded_for_yuv420p(tmp_path: pathlib.Path) -> None:
    video = smooth_video(3, 31, 45)
    frames, _ = render.read_video(render.write_video(video, tmp_path / "odd.mp4"))
    assert frames.shape == (3, 32, 46, 3)
    assert np.abs(frames[:, :31, :45].astype(int) - video.astype(int)).mean() <= 8
    # the padding repeats the edge row and column
    assert np.abs(frames[:, 31, :45].astype(int) - video[:, 30].astype(int)).mean() <= 8
    assert np.abs(frames[:, :31, 45].astype(int) - video[:, :, 44].astype(int)).mean() <= 8


def test_failed_write_leaves_nothing_behind(tmp_path: pathlib.Path) -> None:
    video = smooth_video(4, 16, 16)

    def chunks():  # type: ignore[no-untyped-def]
        yield video[:2]
        yield video[:2, :8]  # a chunk of the wrong size

    with pytest.raises(AttnmapError, match=r"^frames: every frame must be \(16, 16\)"):
        render.write_video(chunks(), tmp_path / "bad.mp4")
    assert os.listdir(tmp_path) == []
    target = tmp_path / "keep.mp4"
    target.write_bytes(b"old")
    with pytest.raises(AttnmapError, match=r"^frames: expected uint8"):
        render.write_video(video.astype(np.float32), target)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["keep.mp4"]


def test_unwritable_paths_are_os_errors(tmp_path: pathlib.Path) -> None:
    video = smooth_video(2, 16, 16)
    with pytest.raises(FileNotFoundError, match=r"^path: cannot write"):
        render.write_video(video, tmp_path / "missing" / "a.mp4")
    with pytest.raises(AttnmapError, match=r"^path: expected a suffix in"):
        render.write_video(video, tmp_path / "a.avi2")
    with pytest.raises(FileNotFoundError, match=r"^path: no video file"):
        render.read_video(tmp_path / "none.mp4")


def test_write_video_streams_from_iter_frames(tmp_path: pathlib.Path) -> None:
    maps = np.random.default_rng(2).random((3, 5, 5)).astype(np.float32)
    path = render.write_video(
        render.iter_frames(maps, size=(32, 32), temporal_stride=4, chunk=2), tmp_path / "s.mp4"
    )
    frames, fps = render.read_video(path)
    assert frames.shape == (9, 32, 32, 3) and fps == 16
    chunks = list(render.iter_video(path, chunk=4))
    assert [c.shape[0] for c in chunks] == [4, 4, 1]
    np.testing.assert_array_equal(np.concatenate(chunks), frames)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"crf": -5}, "crf: expected an integer in [0, 51], got -5 (the range of libx264"),
        ({"crf": 60}, "crf: expected an integer in [0, 51], got 60 (the range of libx264"),
        ({"codec": "nonexistent"}, "codec: 'nonexistent' is not an encoder"),
    ],
)
def test_bad_encoder_arguments_name_the_argument(tmp_path: pathlib.Path, kwargs: dict, message: str) -> None:
    with pytest.raises(AttnmapError) as info:
        render.write_video(np.zeros((2, 4, 4, 3), np.uint8), tmp_path / "x.mp4", **kwargs)
    assert str(info.value).startswith(message)
    assert list(tmp_path.iterdir()) == []


class TrackedChunks:
    """Yields ``count`` uint8 chunks of ``shape`` (chunk i filled with i) and records ``peak``, the most
    earlier chunks still alive when the next one is asked for: what a streaming consumer holds."""

    def __init__(self, count: int, shape: tuple[int, ...]) -> None:
        self.count, self.shape, self.peak = count, shape, 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        import weakref

        refs: list[weakref.ref] = []
        for i in range(self.count):
            self.peak = max(self.peak, sum(r() is not None for r in refs))
            chunk = np.full(self.shape, i, np.uint8)
            refs.append(weakref.ref(chunk))
            yield chunk


def test_write_video_holds_a_bounded_number_of_chunks(tmp_path: pathlib.Path) -> None:
    """A long render streams: at any time only the queue's chunks plus those in hand are alive."""
    chunks = TrackedChunks(120, (2, 16, 16, 3))
    path = render.write_video(iter(chunks), tmp_path / "long.mp4")
    assert render.read_video(path)[0].shape == (240, 16, 16, 3)
    assert chunks.peak <= codec._QUEUE_CHUNKS + 3, chunks.peak


def test_streamed_background_equals_the_array_background() -> None:
    """Chunks of any length (and single frames) are re-chunked to the output chunks, bit for bit."""
    rng = np.random.default_rng(3)
    maps = rng.random((5, 6, 7)).astype(np.float32)
    bg = rng.integers(0, 256, (17, 12, 14, 3), dtype=np.uint8)
    kw = dict(temporal_stride=4, normalize="frame", alpha=0.7, alpha_mode="attention", outline=0.6)
    whole = render.frames(maps, background=bg, **kw)

    def pieces(sizes: list[int]):  # type: ignore[no-untyped-def]
        start = 0
        for n in sizes:
            yield bg[start] if n == 0 else bg[start : start + n]  # 0: one (H, W, 3) frame
            start += max(n, 1)

    for sizes in ([17], [3] * 5 + [2], [0] * 17, [16, 1], [4, 0, 0, 12]):
        parts = list(render.iter_frames(maps, background=pieces(sizes), chunk=5, **kw))
        assert [p.shape[0] for p in parts] == [5, 5, 5, 2]
        np.testing.assert_array_equal(np.concatenate(parts), whole)
    np.testing.assert_array_equal(render.frames(maps, background=pieces([6, 11]), **kw), whole)


def test_iter_video_as_background_equals_read_video(tmp_path: pathlib.Path) -> None:
    video = smooth_video(11, 32, 48)
    path = render.write_video(video, tmp_path / "bg.mp4")
    maps = np.random.default_rng(4).random((3, 4, 6)).astype(np.float32)
    decoded, _ = render.read_video(path)
    assert render.probe_video(path) == (11, (32, 48), 16.0)
    want = render.frames(maps, num_frames=11, background=decoded, alpha=0.5)
    got = np.concatenate(
        list(
            render.iter_frames(maps, num_frames=11, background=render.iter_video(path, 4), alpha=0.5, chunk=3)
        )
    )
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("sizes", "frame_hw", "message"),
    [
        ([4, 4], (12, 14), "background: expected 9 frames (one per output frame), got 8"),
        ([], (12, 14), "background: expected 9 frames (one per output frame), got 0"),
        ([4, 4, 2], (12, 14), "background: expected 9 frames (one per output frame), got more"),
        ([9, 1], (12, 14), "background: expected 9 frames (one per output frame), got more"),
        ([9], (12, 15), "background: expected frames of size (12, 14) (the output size), got a chunk"),
    ],
)
def test_streamed_background_with_wrong_frames(sizes: list[int], frame_hw: tuple, message: str) -> None:
    maps = np.zeros((3, 4, 4), np.float32)
    chunks = (np.zeros((n, *frame_hw, 3), np.uint8) for n in sizes)
    with pytest.raises(AttnmapError) as info:
        list(render.iter_frames(maps, size=(12, 14), temporal_stride=4, background=chunks, chunk=4))
    assert str(info.value).startswith(message), str(info.value)


def test_streamed_background_bad_chunks_name_the_argument(tmp_path: pathlib.Path) -> None:
    maps = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(
        AttnmapError, match=r"^background: expected uint8 RGB frame chunks, got dtype float32"
    ):
        render.frames(maps, background=iter([np.zeros((2, 4, 4, 3), np.float32)]))
    with pytest.raises(AttnmapError, match=r"^background: expected chunks of shape \(t, H, W, 3\)"):
        render.frames(maps, background=iter([np.zeros((2, 4, 4), np.uint8)]))
    # the size comes from the first chunk when none is given; a later chunk must keep it
    with pytest.raises(AttnmapError, match=r"^background: expected frames of size \(4, 4\)"):
        render.frames(
            maps, background=iter([np.zeros((1, 4, 4, 3), np.uint8), np.zeros((1, 4, 6, 3), np.uint8)])
        )
    # a stream that runs short mid-render leaves no video behind
    short = iter([np.zeros((3, 16, 16, 3), np.uint8)])
    with pytest.raises(AttnmapError, match=r"^background: expected 5 frames"):
        render.write_video(
            render.iter_frames(maps, num_frames=5, background=short, chunk=2), tmp_path / "x.mp4"
        )
    assert os.listdir(tmp_path) == []


def test_streamed_background_holds_a_bounded_number_of_chunks() -> None:
    """A long background streams: the render holds at most the source chunk in hand and one run."""
    chunks = TrackedChunks(100, (3, 8, 8, 3))
    maps = np.random.default_rng(5).random((2, 4, 4)).astype(np.float32)
    closed = False

    def source():  # type: ignore[no-untyped-def]
        nonlocal closed
        try:
            yield from chunks
        finally:
            closed = True

    count = 0
    for out in render.iter_frames(maps, num_frames=300, background=source(), alpha=0.0, chunk=4):
        assert (out == (np.arange(count, count + out.shape[0]) // 3)[:, None, None, None]).all()
        count += out.shape[0]
    assert count == 300 and closed
    assert chunks.peak <= 2, chunks.peak


def test_a_map_shrunk_from_40000_rows_to_2_renders() -> None:
    """A 1.5 MB output from a tall map: the column pass reads only the 4 rows the 2 output rows use
    (the old pass resized all 40,000 rows, 20 GB, and aborted)."""
    maps = np.random.default_rng(5).random((1, 40000, 1), dtype=np.float32)
    got = render.frames(maps, size=(2, 131072), colormap="viridis")
    assert got.shape == (1, 2, 131072, 3)
    t = torch.from_numpy((maps - maps.min()) / (maps.max() - maps.min()))[None]
    heat = torch.nn.functional.interpolate(t, size=(2, 131072), mode="bilinear", align_corners=False)[0]
    want = np.asarray(colormaps["viridis"](heat.numpy(), bytes=True))[..., :3]
    assert (got == want).all(-1).mean() > 0.999
    resized = render.resize(maps, (2, 131072))
    np.testing.assert_allclose(
        resized,
        torch.nn.functional.interpolate(
            torch.from_numpy(maps)[None], size=(2, 131072), mode="bilinear", align_corners=False
        )[0].numpy(),
        atol=1e-6,
        rtol=0,
    )


def test_the_limits_are_named_constants() -> None:
    from attnmap.render import heatmap

    assert (heatmap.MAX_FRAMES, heatmap.MAX_SIDE) == (1 << 16, 1 << 17)
    assert render.num_output_frames(21, temporal_stride=4) == 81
    assert render.num_output_frames(2, num_frames=heatmap.MAX_FRAMES) == heatmap.MAX_FRAMES
    with pytest.raises(AttnmapError, match=r"^num_frames: expected at most 65536 output frames"):
        render.num_output_frames(2, num_frames=heatmap.MAX_FRAMES + 1)
    # refused when iter_frames is called, before any work
    with pytest.raises(AttnmapError, match=r"^chunk: 96 frames of 8192 x 8192 RGB would take 18.0 GiB"):
        render.iter_frames(np.zeros((2, 2, 2), np.float32), size=(8192, 8192), num_frames=200, chunk=96)
    with pytest.raises(AttnmapError, match=r"^chunk: expected an integer >= 1, got 0"):
        render.iter_frames(np.zeros((2, 2, 2), np.float32), chunk=0)
