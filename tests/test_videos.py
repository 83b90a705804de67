"""A store's maps as videos (attnmap.render.videos): every output decodes with PyAV with the right frame count,
size, fps and colours; names never collide; labels and colour bars stay legible at any size."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from attnmap.render import videos as autorender
from attnmap.render.options import RenderOptions
from attnmap.store import StoreWriter, open_store, video_dirname
from render_builders import decode, make_original, make_store


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    original = make_original(tmp_path / "original.mp4")
    return make_store(tmp_path / "attention_maps", original=original)


def test_render_video_writes_attention_and_overlay(store_root: Path, tmp_path: Path) -> None:
    params = RenderOptions(colormap="hot", fps=12)
    paths = autorender.render_video(store_root, "vid 1", tmp_path / "out", params)
    cat, dog = autorender.output_stem("vid 1", "cat"), autorender.output_stem("vid 1", "dog")
    names = sorted(p.name for p in paths)
    assert names == sorted(f"{s}_{k}.mp4" for s in (cat, dog) for k in ("attention", "overlay"))
    frames, fps = decode(tmp_path / "out" / f"{cat}_attention.mp4")
    assert frames.shape == (9, 32, 48, 3)  # 3 latent frames, stride 4 -> 9 frames, the video's size
    assert fps == 12
    # away from the hot top-left token the map is 0: hot's bottom colour
    bottom = np.asarray(matplotlib.colormaps["hot"](0.0, bytes=True)[:3], dtype=int)
    assert np.abs(frames[4, 20, 20].astype(int) - bottom).max() < 20
    overlay, _ = decode(tmp_path / "out" / f"{cat}_overlay.mp4")
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
    stem = video_dirname("vid 1")
    assert {p.name for p in figs} == {f"{stem}_{n}.png" for n in ("tokens", "locality", "temporal", "text")}


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


def test_output_names_never_collide() -> None:
    ids = ["a/b", "a b", "a:b", "a_b", "a", "../a", "x" * 85 + "1", "x" * 85 + "2", "a_b-0123456789abcdef"]
    tokens = ["cat s", "cat_s", "cat", "b_cat s", "s"]
    names = {autorender.output_path("d", v, t, "overlay").name for v in ids for t in tokens}
    assert len(names) == len(ids) * len(tokens)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) and len(n) < 200 for n in names)
    # a plain pair keeps its plain name; the meeting point of a_b + c and a + b_c is told apart by a hash
    assert autorender.output_path("d", "shapes", "ball", "overlay").name == "shapes_ball_overlay.mp4"
    assert autorender.output_stem("a_b", "c") != autorender.output_stem("a", "b_c")


def test_draw_label_equals_pillow_drawing_the_text() -> None:
    """The cached glyph mask blended in numpy against Pillow drawing onto the darkened box itself."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (200, 320, 3), dtype=np.uint8)
    text = "cat | step 3 (2/5)"
    size = 10  # a twentieth of the short side
    font = ImageFont.load_default(size=size)
    pad = 3
    box_h, box_w = size + 2 * pad, int(np.ceil(font.getlength(text))) + 2 * pad
    region = Image.fromarray(frame[:box_h, :box_w] // 3)
    ImageDraw.Draw(region).text((pad, box_h / 2), text, fill=(255, 255, 255), font=font, anchor="lm")
    expected = frame.copy()
    expected[:box_h, :box_w] = np.asarray(region)
    for _ in range(2):  # the second call draws from the cache
        drawn = frame.copy()
        assert autorender.draw_label(drawn, text) == box_h
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
    overlay, _ = decode(tmp_path / "out" / f"{autorender.output_stem('vid 1', 'dog')}_overlay.mp4")
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
    cat, dog = autorender.output_stem("vid 1", "cat"), autorender.output_stem("vid 1", "dog")
    assert started == [f"{cat}_attention.mp4", f"{cat}_overlay.mp4", f"{dog}_attention.mp4"]
    kept = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert kept == [f"{cat}_attention.mp4", f"{cat}_overlay.mp4"]  # no temp files, nothing else
    for name in kept:
        assert decode(tmp_path / "out" / name)[0].shape == (9, 32, 48, 3)
