"""attnmap._native against independent references: torch interpolate, matplotlib, numpy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib import colormaps

from attnmap import _native
from attnmap._native import AttnmapError

REQUIRED = ["hot", "jet", "viridis", "inferno", "magma", "plasma", "turbo", "gray", "coolwarm", "RdBu_r"]


def torch_resize(maps: np.ndarray, size: tuple[int, int], frames: int | None = None) -> np.ndarray:
    x = torch.from_numpy(maps)[None]
    if frames is None:
        return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)[0].numpy()
    out = torch.nn.functional.interpolate(
        x[None], size=(frames, *size), mode="trilinear", align_corners=False
    )
    return out[0, 0].numpy()


def test_error_is_a_value_error() -> None:
    assert issubclass(AttnmapError, ValueError)


@pytest.mark.parametrize("name", _native.colormap_names())
def test_colormap_table_equals_matplotlib_at_every_level(name: str) -> None:
    want = np.asarray(colormaps[name](np.arange(256), bytes=True))[:, :3]
    np.testing.assert_array_equal(_native.colormap_table(name), want)


def test_required_colormaps_exist() -> None:
    assert set(REQUIRED) <= set(_native.colormap_names())


@pytest.mark.parametrize("name", REQUIRED)
def test_colorize_quantises_floats_like_matplotlib(name: str) -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.random(4000), np.arange(257) / 256, np.nextafter(np.arange(1, 257) / 256, 0)])
    x = x.astype(np.float32)
    want = np.asarray(colormaps[name](x, bytes=True))[:, :3]
    np.testing.assert_array_equal(_native.colorize(x, name), want)


def test_unknown_colormap_lists_valid_names() -> None:
    with pytest.raises(
        AttnmapError, match=r'colormap: unknown colormap "nope"; expected one of hot, jet, viridis'
    ):
        _native.colormap_table("nope")


@settings(max_examples=40, deadline=None)
@given(
    f=st.integers(1, 3),
    h=st.integers(1, 17),
    w=st.integers(1, 17),
    oh=st.integers(1, 40),
    ow=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_resize_matches_torch_bilinear(f: int, h: int, w: int, oh: int, ow: int, seed: int) -> None:
    maps = np.random.default_rng(seed).standard_normal((f, h, w)).astype(np.float32)
    got = _native.resize(maps, size=(oh, ow))
    np.testing.assert_allclose(got, torch_resize(maps, (oh, ow)), atol=1e-5, rtol=0)


@settings(max_examples=25, deadline=None)
@given(f=st.integers(1, 6), t=st.integers(1, 20), oh=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_time_linear_matches_torch_trilinear(f: int, t: int, oh: int, seed: int) -> None:
    maps = np.random.default_rng(seed).random((f, 5, 7)).astype(np.float32)
    got = _native.resize(maps, size=(oh, 9), num_frames=t)
    np.testing.assert_allclose(got, torch_resize(maps, (oh, 9), frames=t), atol=1e-5, rtol=0)


def test_wan_shape_matches_torch() -> None:
    maps = np.random.default_rng(1).random((21, 30, 52)).astype(np.float32)
    got = _native.resize(maps[:3], size=(480, 832))
    np.testing.assert_allclose(got, torch_resize(maps[:3], (480, 832)), atol=1e-5, rtol=0)


def test_temporal_stride_repeats_latent_frames() -> None:
    maps = np.arange(21, dtype=np.float32).reshape(21, 1, 1)
    got = _native.resize(maps, size=(1, 1), temporal_stride=4)[:, 0, 0]
    assert got.shape == (81,)
    want = np.concatenate([[0.0], np.repeat(np.arange(1, 21), 4)])
    np.testing.assert_array_equal(got, want)


def np_normalize(maps: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    x = np.where(np.isfinite(maps), maps, np.nan).astype(np.float64)
    span = hi - lo
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.clip((x - lo) / np.where(span > 0, span, 1), 0, 1)
    t = np.where(span > 0, t, 0)
    return np.nan_to_num(t, nan=0.0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), f=st.integers(1, 4), bad=st.booleans())
def test_normalize_modes_match_numpy(seed: int, f: int, bad: bool) -> None:
    rng = np.random.default_rng(seed)
    maps = (rng.standard_normal((f, 6, 5)) * 10).astype(np.float32)
    if bad:
        maps.flat[rng.integers(0, maps.size, 4)] = [np.nan, np.inf, -np.inf, np.nan]
    finite = np.where(np.isfinite(maps), maps, np.nan)
    cases = {
        "global": (np.nanmin(finite), np.nanmax(finite)),
        "frame": (
            np.nanmin(finite, axis=(1, 2), keepdims=True),
            np.nanmax(finite, axis=(1, 2), keepdims=True),
        ),
        "percentile": tuple(np.nanpercentile(finite.astype(np.float64), [1, 99])),
    }
    for mode, (lo, hi) in cases.items():
        got = _native.normalize(maps, mode=mode)
        assert not np.isnan(got).any()
        np.testing.assert_allclose(
            got, np_normalize(maps, np.asarray(lo), np.asarray(hi)), atol=1e-6, err_msg=mode
        )
    got = _native.normalize(maps, mode="fixed", vmin=-5.0, vmax=5.0, gamma=0.5)
    np.testing.assert_allclose(got, np_normalize(maps, np.asarray(-5.0), np.asarray(5.0)) ** 0.5, atol=1e-6)


def test_constant_map_gives_zeros() -> None:
    for mode in ("global", "frame", "percentile"):
        assert not _native.normalize(np.full((2, 3, 3), 7.0, np.float32), mode=mode).any()


def test_strided_input_is_read_without_a_copy_and_correctly() -> None:
    base = np.random.default_rng(2).random((4, 8, 10)).astype(np.float32)
    view = base[::2, :, ::-1]
    np.testing.assert_allclose(
        _native.resize(view, size=(5, 6)), torch_resize(view.copy(), (5, 6)), atol=1e-5
    )


def test_render_equals_resize_then_matplotlib_then_blend() -> None:
    rng = np.random.default_rng(3)
    maps = rng.random((3, 7, 9)).astype(np.float32)
    bg = rng.integers(0, 256, (5, 20, 30, 3), dtype=np.uint8)
    got = _native.render(maps, size=(20, 30), num_frames=5, colormap="viridis", background=bg, alpha=0.4)
    heat = torch_resize(maps, (20, 30), frames=5)
    color = np.asarray(colormaps["viridis"](heat, bytes=True))[..., :3].astype(np.float64)
    want = np.floor(bg * 0.6 + color * 0.4 + 0.5)
    diff = np.abs(got.astype(np.float64) - want)
    # heat within 1e-5 of torch may sit across a level boundary in a few pixels; the blend rounds alike
    assert diff.max() <= 1 or (diff > 1).mean() < 1e-3
    assert (diff == 0).mean() > 0.99


def test_render_attention_alpha_shows_the_background_where_attention_is_low() -> None:
    maps = np.zeros((1, 4, 4), np.float32)
    maps[0, :2] = 1.0
    bg = np.full((4, 4, 3), 50, np.uint8)
    got = _native.render(maps, size=(4, 4), background=bg, alpha=1.0, alpha_mode="attention", colormap="gray")
    np.testing.assert_array_equal(got[0, 2:], bg[2:])
    np.testing.assert_array_equal(got[0, :2], 255)
    assert matplotlib.colormaps["gray"](1.0, bytes=True)[0] == 255


def test_render_outline_marks_the_mask_border() -> None:
    maps = np.zeros((1, 9, 9), np.float32)
    maps[0, 2:7, 2:7] = 1.0
    got = _native.render(maps, size=(9, 9), colormap="gray", outline=0.5, outline_color=(0, 255, 0))
    green = (got[0] == [0, 255, 0]).all(-1)
    inside = np.zeros((9, 9), bool)
    inside[2:7, 2:7] = True
    interior = np.zeros((9, 9), bool)
    interior[3:6, 3:6] = True
    np.testing.assert_array_equal(green, inside & ~interior)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 1.5}, "alpha: expected a value in [0, 1], got 1.5"),
        ({"alpha_mode": "linear"}, 'alpha_mode: expected "constant" or "attention", got "linear"'),
        ({"num_frames": 3, "temporal_stride": 4}, "num_frames: give num_frames or temporal_stride, not both"),
        ({"start": 2, "stop": 1}, "start: expected start <= stop, got 2 > 1"),
        ({"background": np.zeros((2, 2, 3), np.uint8)}, "background: expected uint8 (1, 4, 4, 3) frames"),
        ({"outline": 3.0}, "outline: expected a threshold in [0, 1], got 3"),
    ],
)
def test_render_rejects_bad_arguments_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(AttnmapError) as info:
        _native.render(np.zeros((1, 2, 2), np.float32), size=(4, 4), **kwargs)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    "call",
    [
        lambda m: _native.render(m, size=(131072, 131072), num_frames=2**14),  # 786,432 GiB of frames
        lambda m: _native.render(m, size=(131072, 131072), num_frames=2**24),
        lambda m: _native.resize(m, size=(131072, 131072), num_frames=2**24),
    ],
    ids=["render", "render-2^24-frames", "resize"],
)
def test_an_output_beyond_memory_is_an_error_naming_its_argument(call: object) -> None:
    """numpy's MemoryError (the render's output) and a failed reservation in Rust (resize) both become
    the same AttnmapError, never a process abort or a bare MemoryError."""
    with pytest.raises(AttnmapError, match=r"^size: cannot allocate \d+ bytes \(\d+\.\d GiB\) for it$"):
        call(np.zeros((2, 2, 2), np.float32))  # type: ignore[operator]


def test_normalize_rejects_bad_arguments_by_name() -> None:
    maps = np.zeros((1, 2, 2), np.float32)
    with pytest.raises(
        AttnmapError, match=r'^normalize: expected "global", "frame", "percentile" or "fixed"'
    ):
        _native.normalize(maps, mode="minmax")
    with pytest.raises(AttnmapError, match=r'^vmin: normalize="fixed" needs both vmin and vmax'):
        _native.normalize(maps, mode="fixed", vmax=1.0)
    with pytest.raises(AttnmapError, match=r"^percentile: expected 0 <= lo < hi <= 100"):
        _native.normalize(maps, mode="percentile", percentile=(50.0, 10.0))


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_rgb_to_yuv420_matches_swscale(n: int, hh: int, hw: int, seed: int) -> None:
    """The encoder's colour conversion against FFmpeg's own (PyAV reformat, BT.601 limited range)."""
    import av

    rng = np.random.default_rng(seed)
    h, w = 2 * hh, 2 * hw
    # smooth content, as heatmaps and video are (chroma is a 2x2 mean here and a filter in swscale)
    base = rng.integers(0, 256, (n, 1, 1, 3))
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = (2 * yy + xx)[None, :, :, None]  # a gentle slope: a 2x2 block spans 3 levels
    rgb = np.clip(base + ramp, 0, 255).astype(np.uint8)
    out = _native.rgb_to_yuv420(rgb)
    assert out.shape == (n, h * 3 // 2, w) and out.dtype == np.uint8
    for frame, planes in zip(rgb, out):
        ref = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p").to_ndarray()
        diff = np.abs(planes.astype(int) - ref.astype(int))
        assert diff[:h].max() <= 1, diff[:h].max()  # luma
        assert diff[h:].max() <= 2, diff[h:].max()  # chroma


def test_rgb_to_yuv420_rejects_odd_sizes_by_name() -> None:
    with pytest.raises(AttnmapError, match=r"^frames: expected uint8 \(n, H, W, 3\) with H and W even"):
        _native.rgb_to_yuv420(np.zeros((1, 3, 4, 3), np.uint8))


# -- the CPU attention kernels' bindings ----------------------------------------------------------


def test_attention_stats_returns_what_was_asked() -> None:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 5, 8), dtype=np.float32)
    k = rng.standard_normal((1, 2, 6, 8), dtype=np.float32)
    rows, keys = np.array([0, 0, 1, 1, -1]), np.array([0, 1, 1, 2, 2, -1])
    out = _native.attention_stats(
        q, k, scale=0.5, dense=(1, 4), received=True, entropy=True, blocks=[(rows, keys, 2, 3)]
    )
    assert sorted(out) == ["blocks", "dense", "entropy", "received"]
    logits = np.einsum("bhid,bhjd->bhij", q.astype(np.float64), k.astype(np.float64)) * 0.5
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(out["dense"], p.sum(1, keepdims=True)[..., 1:4], rtol=1e-5)
    np.testing.assert_allclose(out["received"], p.sum((1, 2))[:, None], rtol=1e-5)
    np.testing.assert_allclose(out["entropy"], -(p * np.log(p)).sum((1, 3))[:, None], rtol=1e-5)
    blocks = np.zeros((2, 3))
    for i, a in enumerate(rows):
        for j, c in enumerate(keys):
            if a >= 0 and c >= 0:
                blocks[a, c] += p[0, :, i, j].sum()
    np.testing.assert_allclose(out["blocks"][0][0, 0], blocks, rtol=1e-5)
    assert _native.attention_stats(q, k, scale=0.5) == {}


def test_attention_stats_names_bad_arguments() -> None:
    q = np.zeros((1, 2, 4, 8), np.float32)
    k = np.zeros((1, 2, 5, 8), np.float32)
    rows, keys = np.zeros(4, np.int64), np.zeros(5, np.int64)
    cases = [
        ({"dense": (3, 6)}, r"^dense: expected key columns lo\.\.hi within 0\.\.5"),
        (
            {"blocks": [(rows[:3], keys, 1, 1)]},
            r"^blocks: expected a block per query row \(4\) and per key \(5\)",
        ),
        (
            {"blocks": [(rows, keys + 1, 1, 1)]},
            r"^blocks: expected row blocks in -1\.\.1 and key blocks in -1\.\.1",
        ),
        (
            {"blocks": [(rows, keys, 2**40, 2**40)]},
            r"^blocks: the output \[1, 1, 1099511627776, 1099511627776\]",
        ),
        (
            {"distance": (2, 0, 1, 1, 3)},
            r"^distance: expected a grid of F x H x W >= 1 video tokens from row 2",
        ),
        ({"distance": (0, 0, 0, 1, 1)}, r"^distance: expected a grid"),
        ({"bias": np.zeros((1, 3, 5), np.float32)}, r"^bias: expected \[B, 1 or H, Nk\]"),
        ({"scale": float("inf")}, r"^scale: expected a finite number"),
    ]
    for kwargs, message in cases:
        args: dict = {"scale": 1.0, **kwargs}
        with pytest.raises(_native.AttnmapError, match=message):
            _native.attention_stats(q, k, **args)
    with pytest.raises(_native.AttnmapError, match=r"^k: expected \[B, Hk, Nk, D\]"):
        _native.attention_stats(q, np.zeros((1, 3, 5, 8), np.float32), scale=1.0)


def test_kernel_info_names_the_kernels_threads_and_build() -> None:
    # rayon's pool takes RAYON_NUM_THREADS when it starts: a fresh process, as the benches record it
    code = "from attnmap import _native; import json; print(json.dumps(_native.kernel_info()))"
    env = {**os.environ, "RAYON_NUM_THREADS": "3", "PYTHONPATH": str(Path(_native.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    info = json.loads(done.stdout)
    assert info["threads"] == 3
    flags: set[str] = set()
    if Path("/proc/cpuinfo").exists():  # the build follows the CPU's instruction sets
        flags = {f for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
                 for f in line.split(":", 1)[1].split()}  # fmt: skip
        # AMX needs Linux to hand the process its tile state too, which a Linux with AMX flags does
        sets = [("avx2", {"avx2", "fma"}), ("avx512", {"avx512f"}), ("amx", {"amx_tile", "amx_bf16"})]
        want = ["plain"]
        for name, needs in sets:
            if not needs <= flags:
                break
            want.append(name)
        assert info["builds"] == want, flags & {"avx512f", "avx2", "fma", "amx_tile", "amx_bf16"}
        assert info["build"] == want[-1]
    assert _native.kernel_info()["build"] == info["build"]
    assert info["pool"] == "rayon"  # no OpenMP runtime in a process without torch


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the OpenMP team is looked up on Linux")
def test_kernels_run_on_torchs_threads_and_give_the_same_bits_on_either_pool() -> None:
    # with torch loaded, the kernels run on its OpenMP team, as many threads as torch.set_num_threads
    code = (
        "import torch, json; from attnmap import _native; torch.set_num_threads(1); a = _native.kernel_info(); "
        "_native.set_kernel_pool(True); print(json.dumps([a, _native.kernel_info()]))"
    )
    env = {**os.environ, "RAYON_NUM_THREADS": "3", "PYTHONPATH": str(Path(_native.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    team, rayon = json.loads(done.stdout)
    assert (team["pool"], team["threads"]) == ("openmp", 1)
    assert (rayon["pool"], rayon["threads"]) == ("rayon", 3)
    # the tasks and their order do not depend on the pool: the same bits, and the f64 reference's numbers
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 3, 131, 32), dtype=np.float32)
    k = rng.standard_normal((1, 3, 200, 32), dtype=np.float32)
    cols = np.arange(200, dtype=np.int64) // 50  # four groups of 50 keys
    logits = np.einsum("bhrd,bhkd->bhrk", q.astype(np.float64), k.astype(np.float64)) * 0.2
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.stack([p[..., cols == c].sum(-1) for c in range(4)], -1)
    torch_threads = torch.get_num_threads()
    try:
        _native.set_kernel_pool(True)
        torch.set_num_threads(_native.kernel_info()["threads"])  # the same thread count: the same pieces
        got = {}
        for rayon_only in (False, True):
            _native.set_kernel_pool(rayon_only)
            assert _native.kernel_info()["pool"] == ("rayon" if rayon_only else "openmp")
            got[rayon_only] = _native.attention_groups(q, k, cols, 4, scale=0.2, per_head=True)
            stats = _native.attention_stats(q, k, scale=0.2, per_head=True, received=True, entropy=True)
            got[rayon_only, "stats"] = (stats["received"], stats["entropy"])
    finally:
        _native.set_kernel_pool(False)
        torch.set_num_threads(torch_threads)
    np.testing.assert_array_equal(got[False], got[True])
    for a, b in zip(got[False, "stats"], got[True, "stats"]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(got[False], want, rtol=0, atol=2e-6)


def test_every_build_gives_the_float64_sums_and_a_named_error_for_another() -> None:
    # the AMX build's products come from bf16 parts of q and k: as exact as the FMA builds' f32 ones
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 2, 77, 80), dtype=np.float32) * 2
    k = rng.standard_normal((2, 1, 300, 80), dtype=np.float32) * 2
    k[1, 0, 7, 3] = np.nan  # batch element 1 has a NaN key: every row there is NaN, in every build
    cols = (np.arange(300, dtype=np.int64) * 7) % 5 - 1  # -1: keys in no group
    scale = 80**-0.5
    logits = np.einsum("bhrd,bkd->bhrk", q.astype(np.float64), k[:, 0].astype(np.float64)) * scale
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.stack([p[..., cols == c].sum(-1) for c in range(4)], -1)
    builds = _native.kernel_info()["builds"]
    try:
        for build in builds:
            _native.set_kernel_build(build)
            assert _native.kernel_info()["build"] == build
            got = _native.attention_groups(q, k, cols, 4, scale=scale, per_head=True)
            np.testing.assert_allclose(got[0], want[0], rtol=0, atol=2e-6, err_msg=build)
            assert np.isnan(got[1]).all(), build
            stats = _native.attention_stats(q[:1], k[:1], scale=scale, entropy=True)
            ent = -(p[0] * np.log(np.maximum(p[0], 1e-300))).sum(-1).sum(0)
            np.testing.assert_allclose(stats["entropy"][0, 0], ent, rtol=1e-5, err_msg=build)
    finally:
        _native.set_kernel_build(None)
    assert _native.kernel_info()["build"] == builds[-1]
    with pytest.raises(
        _native.AttnmapError, match=r"^name: expected one of the builds this CPU runs \(plain"
    ):
        _native.set_kernel_build("sse9")
