"""Rendering a store: every output decodes with PyAV with the right frame count, size, fps and colours."""

from __future__ import annotations

from pathlib import Path

import av
import matplotlib
import numpy as np
import pytest

from attnmap.render import videos as autorender
from attnmap.render.options import RenderOptions
from attnmap.store import StoreWriter, open_store

VIDEO = {"height": 32, "width": 48, "fps": 8, "frames": 9}


def make_original(path: Path, frames: int = 9, size: tuple[int, int] = (32, 48)) -> Path:
    """A plain grey video written with PyAV directly (independent of attnmap.render)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.height, stream.width, stream.pix_fmt = size[0], size[1], "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((*size, 3), 128, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def make_store(root: Path, *, original: Path | None = None, steps: int = 3) -> Path:
    """Video "vid 1": words cat and dog, latent grid (3, 4, 6), vae stride 4 (9 frames), per-head temporal
    and text maps. cat's map is 1 in the top-left latent token of every frame and 0 elsewhere."""
    meta = {
        "prompt": "a (cat) and a (dog)",
        "targets": {"cat": [1], "dog": [4]},
        "text_tokens": ["a", "cat", "and", "a", "dog"],
        "grid": [3, 4, 6],
        "vae_stride": [4, 8, 8],
        "video": dict(VIDEO, **({"path": str(original)} if original else {})),
    }
    rng = np.random.default_rng(0)
    with StoreWriter(root, "vid 1", meta, dtype="float32") as writer:
        for step in range(steps):
            cat = np.zeros((3, 4, 6), np.float32)
            cat[:, 0, 0] = 1.0
            writer.write_step(
                step,
                {
                    "token/cat": cat,
                    "token/dog": rng.random((3, 4, 6)).astype(np.float32),
                    "temporal": rng.random((2, 3, 3)).astype(np.float32),
                    "text": rng.random((5, 5)).astype(np.float32),
                },
            )
    return root


def decode(path: Path) -> tuple[np.ndarray, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, float(stream.average_rate or 0)


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    original = make_original(tmp_path / "original.mp4")
    return make_store(tmp_path / "attention_maps", original=original)


def test_render_video_writes_attention_and_overlay(store_root: Path, tmp_path: Path) -> None:
    params = RenderOptions(colormap="hot", fps=12)
    paths = autorender.render_video(store_root, "vid 1", tmp_path / "out", params)
    names = sorted(p.name for p in paths)
    assert names == [
        "vid_1_cat_attention.mp4",
        "vid_1_cat_overlay.mp4",
        "vid_1_dog_attention.mp4",
        "vid_1_dog_overlay.mp4",
    ]
    frames, fps = decode(tmp_path / "out" / "vid_1_cat_attention.mp4")
    assert frames.shape == (9, 32, 48, 3)  # 3 latent frames, stride 4 -> 9 frames, the video's size
    assert fps == 12
    # away from the hot top-left token the map is 0: hot's bottom colour
    bottom = np.asarray(matplotlib.colormaps["hot"](0.0, bytes=True)[:3], dtype=int)
    assert np.abs(frames[4, 20, 20].astype(int) - bottom).max() < 20
    overlay, _ = decode(tmp_path / "out" / "vid_1_cat_overlay.mp4")
    assert overlay.shape == (9, 32, 48, 3)
    # alpha 0.6 of hot's bottom (black) over grey 128: about 51
    assert abs(int(overlay[4, 24, 20].mean()) - round(0.4 * 128)) < 12


def test_hot_token_colour_without_labels(store_root: Path, tmp_path: Path) -> None:
    store = open_store(store_root)
    options = RenderOptions(colormap="viridis", labels=False, include_colorbar=False)
    out = autorender.render_token(store, "vid 1", "cat", tmp_path / "cat.mp4", options=options)
    frames, _ = decode(out)
    top = np.asarray(matplotlib.colormaps["viridis"](1.0, bytes=True)[:3], dtype=int)
    bottom = np.asarray(matplotlib.colormaps["viridis"](0.0, bytes=True)[:3], dtype=int)
    assert np.abs(frames[:, 1, 1].astype(int) - top).max() < 25
    assert np.abs(frames[:, 25, 40].astype(int) - bottom).max() < 25


def test_step_evolution_frame_count_and_formats(store_root: Path, tmp_path: Path) -> None:
    store = open_store(store_root)
    options = RenderOptions(interpolation_steps=2, fps=5)
    out = autorender.render_token(
        store, "vid 1", "dog", tmp_path / "dog_steps.webm", options=options, mode="steps"
    )
    frames, fps = decode(out)
    assert frames.shape == (3 + 2 * 2, 32, 48, 3) and fps == 5
    gif = autorender.render_token(store, "vid 1", "dog", tmp_path / "dog.gif", mode="steps", steps=[0, 2])
    assert decode(gif)[0].shape[0] == 2 + 2


def test_one_frame_map_is_a_still(tmp_path: Path) -> None:
    with StoreWriter(tmp_path / "s", "img", {"video": {"height": 16, "width": 16}}) as writer:
        writer.write_step(0, {"token/cat": np.eye(4, dtype=np.float32)[None]})
    options = RenderOptions(static_duration=1.5, fps=4)
    out = autorender.render_token(
        open_store(tmp_path / "s"), "img", "cat", tmp_path / "still.mp4", options=options
    )
    assert decode(out)[0].shape == (6, 16, 16, 3)


def test_grid_puts_tokens_side_by_side(store_root: Path, tmp_path: Path) -> None:
    store = open_store(store_root)
    out = autorender.render_grid(
        store, "vid 1", ["cat", "dog"], tmp_path / "grid.mp4", original_video=tmp_path / "original.mp4"
    )
    frames, _ = decode(out)
    assert frames.shape == (9, 32, 96, 3)


def test_render_store_and_figures(store_root: Path, tmp_path: Path) -> None:
    written = autorender.render_store(store_root, out_dir=tmp_path / "all")
    assert set(written) == {"vid 1"} and len(written["vid 1"]) == 4
    figs = autorender.render_figures(open_store(store_root), "vid 1", tmp_path / "figs")
    assert {p.name for p in figs} == {
        "vid_1_tokens.png",
        "vid_1_locality.png",
        "vid_1_temporal.png",
        "vid_1_text.png",
    }


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"overlay_alpha": 1.5}, "overlay_alpha: expected a number <= 1.0"),
        ({"normalize": "minmax_frame"}, "normalize: expected one of global, frame"),
        ({"threshold": 1.5}, "threshold: expected a number <= 1.0"),
        ({"video_format": "avi"}, "video_format: expected one of"),
    ],
)
def test_bad_options(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RenderOptions(**changes)  # type: ignore[arg-type]


def test_bad_token_and_missing_original(store_root: Path, tmp_path: Path) -> None:
    store = open_store(store_root)
    with pytest.raises(KeyError, match="token 'bird' is not stored"):
        autorender.render_token(store, "vid 1", "bird", tmp_path / "x.mp4")
    with pytest.raises(FileNotFoundError, match="original video"):
        autorender.render_token(store, "vid 1", "cat", tmp_path / "x.mp4", original_video=tmp_path / "no.mp4")
    assert not (tmp_path / "x.mp4").exists()


def test_safe_names() -> None:
    assert autorender.safe_name("../a b/c") == "a_b_c"
    assert autorender.output_path("d", "v/1", "x y", "overlay").name == "v_1_x_y_overlay.mp4"


def test_draw_label_equals_pillow_drawing_the_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cached glyph mask blended in numpy against Pillow drawing onto the darkened box itself."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)
    text = "cat | step 3 (2/5)"
    size = max(9, 90 // 18)
    box_h, box_w = size + 8, min(160, int(size * 0.62 * len(text)) + 12)
    region = Image.fromarray(frame[:box_h, :box_w] // 3)
    ImageDraw.Draw(region).text((5, 3), text, fill=(255, 255, 255), font=ImageFont.load_default(size=size))
    expected = frame.copy()
    expected[:box_h, :box_w] = np.asarray(region)
    for _ in range(2):  # the second call draws from the cache
        drawn = frame.copy()
        autorender.draw_label(drawn, text)
        assert np.abs(drawn.astype(int) - expected.astype(int)).max() <= 1
    assert (drawn[:box_h, :box_w] > 200).all(axis=-1).sum() > 20  # white glyph pixels exist
    np.testing.assert_array_equal(drawn[box_h:], frame[box_h:])  # nothing drawn outside the box


def test_render_video_streams_the_original(store_root: Path, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """No render decodes the whole original: each overlay streams it chunk by chunk with iter_video."""
    import attnmap.render as render

    streamed = []
    iter_video = render.iter_video
    monkeypatch.setattr(render, "read_video", lambda path: pytest.fail("the original was decoded whole"))
    monkeypatch.setattr(
        render, "iter_video", lambda path, chunk: streamed.append(path) or iter_video(path, chunk)
    )
    paths = autorender.render_video(store_root, "vid 1", tmp_path / "out", None)
    assert len(paths) == 4 and len(streamed) == 2  # one decode per overlay
    overlay, _ = decode(tmp_path / "out" / "vid_1_dog_overlay.mp4")
    assert overlay.shape == (9, 32, 48, 3)


def test_streamed_original_picks_the_frames_evenly(tmp_path: Path) -> None:
    """The original's frames, picked by nearest index for another frame count, cropped to even and scaled,
    against numpy indexing of the whole decoded video."""
    import attnmap.render as render

    rng = np.random.default_rng(2)
    video = rng.integers(0, 256, (37, 16, 24, 3), dtype=np.uint8)
    path = render.write_video(video, tmp_path / "v.mp4", crf=0)
    whole, _ = render.read_video(path)
    odd = rng.integers(0, 256, (37, 15, 23, 3), dtype=np.uint8)
    for source, frames in ((path, whole), (odd, odd[:, :14, :22])):
        original = autorender._Original.open(source)
        assert (original.frames, original.size) == (37, frames.shape[1:3])
        for count in (1, 5, 37, 80):
            picks = np.linspace(0, 36, count).round().astype(int)
            got = np.concatenate(list(original.chunks(count)))
            np.testing.assert_array_equal(got, frames[picks])
        scaled = np.concatenate(list(original.chunks(9, (8, 12))))
        rows, cols = np.arange(8) * frames.shape[1] // 8, np.arange(12) * frames.shape[2] // 12
        picked = frames[np.linspace(0, 36, 9).round().astype(int)]
        np.testing.assert_array_equal(scaled, picked[:, rows][:, :, cols])
    # a decoder that gives fewer frames than the container counts: the last frame is held
    short = autorender._Original(odd, 40, (14, 22))
    got = np.concatenate(list(short.chunks(40)))
    picks = np.minimum(np.linspace(0, 39, 40).round().astype(int), 36)
    np.testing.assert_array_equal(got, odd[picks, :14, :22])


def test_overlay_memory_stays_below_the_original(store_root: Path, tmp_path: Path) -> None:
    """An overlay of a 480-frame original never holds it: the traced peak (numpy's arrays, the decoded
    chunks and the render's outputs) stays well below the original's bytes (measured: about a quarter,
    the encoder's queue and the chunks in hand; holding the decoded original alone would exceed it)."""
    import tracemalloc

    original = make_original(tmp_path / "long.mp4", frames=480)
    whole = 480 * 32 * 48 * 3
    store = open_store(store_root)
    options = RenderOptions(labels=False, include_colorbar=False)
    tracemalloc.start()
    try:
        out = autorender.render_token(
            store, "vid 1", "cat", tmp_path / "o.mp4", options=options, original_video=original
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decode(out)[0].shape == (480, 32, 48, 3)
    assert peak < whole / 2, f"peak {peak} bytes for a {whole}-byte original"


def test_a_render_video_stopped_early_keeps_finished_renders(
    store_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    render_token = autorender.render_token
    started: list[str] = []

    def failing(store, video_id, word, target, **kwargs):  # type: ignore[no-untyped-def]
        started.append(Path(target).name)
        if len(started) == 3:
            raise KeyboardInterrupt  # stopped during the third render
        return render_token(store, video_id, word, target, **kwargs)

    monkeypatch.setattr(autorender, "render_token", failing)
    monkeypatch.setattr(autorender, "_WORKERS", 1)
    with pytest.raises(KeyboardInterrupt):
        autorender.render_video(store_root, "vid 1", tmp_path / "out", None)
    assert started == ["vid_1_cat_attention.mp4", "vid_1_cat_overlay.mp4", "vid_1_dog_attention.mp4"]
    kept = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert kept == ["vid_1_cat_attention.mp4", "vid_1_cat_overlay.mp4"]  # no temp files, nothing else
    for name in kept:
        assert decode(tmp_path / "out" / name)[0].shape == (9, 32, 48, 3)
