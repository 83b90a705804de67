"""A store's maps as videos (attnmap.render.videos): every output decodes with PyAV with the right frame count,
size, fps and colours; names never collide; labels and colour bars stay legible at any size."""

from __future__ import annotations

import re
import time
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from attnmap.render import videos as autorender
from attnmap.render.decor import decor_layout
from attnmap.render.options import RenderOptions
from attnmap.render.progress import Progress
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
        ({"overlay_alpha": 1.5}, "overlay_alpha: expected a finite number in \\[0, 1\\], got 1.5"),
        ({"normalize": "minmax_frame"}, "normalize: expected one of global, frame"),
        ({"threshold": 1.5}, "threshold: expected a finite number in \\[0, 1\\], got 1.5"),
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


def test_demo_sized_overlay_labels_are_readable(store_root: Path, tmp_path: Path) -> None:
    """96 x 128 frames: the label's white glyphs sit in their box, above the bar and its ticks."""
    store = open_store(store_root)
    meta_video = {"height": 96, "width": 128, "fps": 8, "frames": 9}
    with StoreWriter(tmp_path / "s", "small", {"video": meta_video, "vae_stride": [4, 8, 8]}) as writer:
        writer.write_step(0, {"token/ball": store.aggregated("vid 1", "cat").map})
    out = autorender.render_token(open_store(tmp_path / "s"), "small", "ball", tmp_path / "b.mp4")
    frames, fps = decode(out)
    assert frames.shape == (9, 96, 128, 3) and fps == 8
    decor = decor_layout(96, 128, labels=True, colorbar=True, vrange=(0.0, 1.0))
    assert decor is not None and decor.bar is not None
    label_rows = frames[4, : decor.label_h]
    assert (label_rows.min(-1) > 200).sum() > 30  # white text drawn (and decoded) in the label row
    assert decor.bar[0] > decor.label_h


# -- frame rate, bounds, selection, failed renders ------------------------------------------------------
def test_overlays_play_at_the_original_rate(tmp_path: Path) -> None:
    import attnmap.render as render

    original = render.write_video(np.full((9, 32, 48, 3), 90, np.uint8), tmp_path / "o.mp4", fps=8)
    for meta_fps, want_attention in ((12, 12.0), (None, 10.0)):
        video = {"height": 32, "width": 48, "frames": 9, "path": str(original)}
        if meta_fps:
            video["fps"] = meta_fps
        root = tmp_path / f"s{meta_fps}"
        with StoreWriter(root, "v", {"video": video, "vae_stride": [4, 8, 8]}) as writer:
            writer.write_step(0, {"token/cat": np.random.default_rng(0).random((3, 4, 6), dtype=np.float32)})
        paths = autorender.render_video(root, "v", tmp_path / f"out{meta_fps}")
        rates = {p.name.rsplit("_", 1)[1]: decode(p)[1] for p in paths}
        assert rates == {"overlay.mp4": 8.0, "attention.mp4": want_attention}
        forced = autorender.render_video(root, "v", tmp_path / "forced", RenderOptions(fps=5))
        assert {decode(p)[1] for p in forced} == {5.0}


def test_an_overlay_on_the_vaes_own_frames_follows_its_stride(tmp_path: Path) -> None:
    """An original of exactly the 1 + (F - 1) s frames the VAE encoded: frame 0 shows latent frame 0 and
    each later latent frame covers s frames (a linear map would show latent frame 0 on frame 1)."""
    import attnmap.render as render

    original = make_original(tmp_path / "o.mp4")  # 9 frames: 3 latent frames of a stride-4 VAE
    levels = np.array([0.0, 1.0, 0.5], np.float32)
    maps = np.broadcast_to(levels[:, None, None], (3, 4, 6)).copy()
    with StoreWriter(tmp_path / "s", "v", {"video": {"frames": 9}, "vae_stride": [4, 8, 8]}) as writer:
        writer.write_step(0, {"token/cat": maps})
    options = RenderOptions(labels=False, include_colorbar=False, colormap="viridis")
    plan, size = autorender.plan_token(
        open_store(tmp_path / "s"), "v", "cat", options=options, original_video=original
    )
    assert (plan.num_frames, plan.temporal_stride, size) == (None, 4, (32, 48))
    out = autorender.render_token(
        open_store(tmp_path / "s"), "v", "cat", tmp_path / "cat.mp4", options=options, original_video=original
    )
    got, _ = decode(out)
    background = decode(original)[0]
    kwargs = {"size": size, "colormap": "viridis", "background": background, "alpha": options.overlay_alpha}
    want = render.frames(maps, temporal_stride=4, **kwargs)
    linear = render.frames(maps, num_frames=9, **kwargs)
    assert np.abs(got.astype(int) - want.astype(int)).max() < 12
    assert np.abs(linear[1].astype(int) - want[1].astype(int)).max() > 60  # the rules differ on frame 1


def test_the_store_refuses_sizes_no_render_could_have(tmp_path: Path) -> None:
    # beyond the schema's bounds (frames <= 2**20, sides <= 2**17) nothing is written at all
    for video in ({"frames": 10**7}, {"height": 10**6, "width": 4}):
        with pytest.raises(ValueError, match=r"^metadata: key 'video' must be"):
            StoreWriter(tmp_path / "s", "v", {"video": video})


@pytest.mark.parametrize(
    ("meta", "options", "mode", "message"),
    [
        ({"video": {"frames": 10**6}}, {}, "aggregated", "metadata video.frames: 1000000 output frames"),
        ({}, {"interpolation_steps": 40000}, "steps", "interpolation_steps: 80003 output frames"),
        (
            {"video": {"height": 4000, "width": 8000, "frames": 9000}},
            {},
            "aggregated",
            "more than the 17179869184 pixels",
        ),
    ],
)
def test_bounds_are_checked_before_any_work(
    tmp_path: Path, meta: dict, options: dict, mode: str, message: str
) -> None:  # type: ignore[type-arg]
    with StoreWriter(tmp_path / "s", "v", {"vae_stride": [4, 8, 8], **meta}) as writer:
        for step in range(3):
            writer.write_step(step, {"token/cat": np.ones((3, 4, 6), np.float32)})
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        autorender.render_token(
            open_store(tmp_path / "s"),
            "v",
            "cat",
            tmp_path / "x.mp4",
            options=RenderOptions(**options),
            mode=mode,
        )
    assert time.perf_counter() - start < 1.0
    assert not (tmp_path / "x.mp4").exists()


def test_block_head_and_branch_select_the_stored_map(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    maps = {f"token/cat/block{b}": rng.random((2, 3, 4, 6), dtype=np.float32) for b in range(2)}
    maps["token/cat"] = (maps["token/cat/block0"] + maps["token/cat/block1"]) / 2
    maps["uncond/token/cat"] = rng.random((2, 3, 4, 6), dtype=np.float32)
    with StoreWriter(tmp_path / "s", "v", {"video": {"height": 32, "width": 48}, "branch": "both"}) as writer:
        writer.write_step(0, maps)
    store = open_store(tmp_path / "s")
    for kwargs, want in (
        ({"block": 1, "head": 0}, maps["token/cat/block1"][0]),
        ({"head": 1}, maps["token/cat"][1]),
        ({"block": 0}, maps["token/cat/block0"].mean(0)),
        ({"branch": "uncond"}, maps["uncond/token/cat"].mean(0)),
    ):
        plan, _ = autorender.plan_token(store, "v", "cat", options=RenderOptions(), **kwargs)
        np.testing.assert_allclose(plan.maps, want, rtol=1e-3, atol=1e-3)  # stored as float16
    with pytest.raises(ValueError, match=r"head: expected 0\.\.1"):
        autorender.plan_token(store, "v", "cat", options=RenderOptions(), head=2)


@pytest.mark.parametrize("normalize", ["global", "frame", "percentile", "max", "sum", "none"])
def test_videos_follow_the_normalisation_vocabulary(store_root: Path, normalize: str) -> None:
    import attnmap.render as render

    store = open_store(store_root)
    options = RenderOptions(normalize=normalize, labels=False, include_colorbar=False)
    plan, size = autorender.plan_token(store, "vid 1", "dog", options=options)
    got = np.concatenate(list(autorender._chunks(plan, size, options)))
    want = render.frames(plan.maps, size=size, temporal_stride=4, normalize=normalize, colormap="hot")
    np.testing.assert_array_equal(got, want)


def test_a_render_that_does_not_read_back_fails_and_leaves_no_file(
    store_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import attnmap.render as render

    write_video = render.write_video

    def truncated(chunks, path, **kwargs):  # type: ignore[no-untyped-def]
        out = write_video(chunks, path, **kwargs)
        data = Path(out).read_bytes()
        Path(out).write_bytes(data[: len(data) // 3])  # what a full disk leaves behind
        return out

    monkeypatch.setattr(render, "write_video", truncated)
    with pytest.raises(ValueError, match="does not hold its 9 frames"):
        autorender.render_token(open_store(store_root), "vid 1", "cat", tmp_path / "c.mp4")
    assert list(tmp_path.glob("c*")) == []


def test_one_progress_display_writes_whole_lines(store_root: Path, tmp_path: Path) -> None:
    import io

    stream = io.StringIO()
    with Progress(stream=stream) as progress:
        paths = autorender.render_video(store_root, "vid 1", tmp_path / "out", progress=progress)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 * len(paths) == 8
    for line in lines:
        assert re.fullmatch(r"(rendering .+: 9 frames|done .+: 9/9 frames in \d+\.\d s)", line), line
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()


def test_still_overlay_is_the_video_frame(store_root: Path, tmp_path: Path) -> None:
    from PIL import Image

    import attnmap.render as render

    store = open_store(store_root)
    original = tmp_path / "original.mp4"
    out = autorender.render_still(
        store, "vid 1", "dog", tmp_path / "dog.png", frame=5, original_video=original
    )
    with Image.open(out) as image:
        still = np.asarray(image.convert("RGB"))
    background, _ = render.read_video(original)
    maps = store.aggregated("vid 1", "dog").map
    # the original has the 9 frames the VAE stride gives: frame 5 is latent frame 2's
    want = render.frames(maps, size=(32, 48), temporal_stride=4, background=background, alpha=0.6)[5]
    np.testing.assert_array_equal(still, want)  # 32 x 48: below the size that gets decorations
    mean = autorender.render_still(store, "vid 1", "dog", tmp_path / "mean.png", original_video=original)
    with Image.open(mean) as image:
        got = np.asarray(image.convert("RGB"))
    want = render.frames(maps.mean(0), size=(32, 48), background=background[4], alpha=0.6)[0]
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"frame: expected an output frame 0..8, got 9"):
        autorender.render_still(store, "vid 1", "dog", tmp_path / "x.png", frame=9, original_video=original)
    with pytest.raises(ValueError, match=r"output: expected a file ending in \.png"):
        autorender.render_still(store, "vid 1", "dog", tmp_path / "x.jpg")


def test_real_text_length_and_cropped_text_figure(tmp_path: Path) -> None:
    assert autorender.real_text_length({"text_length": 7}, 512) == (7, "metadata text_length")
    assert autorender.real_text_length({"text_tokens": ["a", "b"]}, 512)[0] == 2
    assert autorender.real_text_length({"targets": {"cat": [3], "dog": [9, 10]}}, 512)[0] == 11
    assert autorender.real_text_length({}, 512)[0] == 512
    text = np.random.default_rng(0).random((512, 512), dtype=np.float32)
    meta = {"targets": {"cat": [1], "dog": [4]}, "text_tokens": ["a", "cat", "and", "the", "dog"]}
    with StoreWriter(tmp_path / "s", "wan", meta) as writer:
        writer.write_step(0, {"text": text})
    start = time.perf_counter()
    (path,) = autorender.render_figures(open_store(tmp_path / "s"), "wan", tmp_path / "f")
    assert time.perf_counter() - start < 5
    assert path.name == "wan_text.png"
