"""Analysis: hand-computed small cases for token maps, normalisation, masks, frame matrices, locality, summaries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from attnmap.analysis import (
    NORMALIZE,
    classify_heads,
    frame_latents,
    frame_matrix,
    load_token_map,
    mask_rle,
    mask_track,
    normalize,
    rle_mask,
    summarize,
    temporal_locality,
    text_self_attention,
    token_map,
    token_mask,
    top_frames,
    top_regions,
    word_masks,
    write_summary,
)
from attnmap.errors import AttnmapError
from attnmap.store import StoreWriter, open_store


def test_normalize_by_hand() -> None:
    x = np.array([[[1.0, 3.0]], [[5.0, 5.0]]])  # (F=2, H=1, W=2)
    np.testing.assert_allclose(normalize(x, "global"), [[[0.0, 0.5]], [[1.0, 1.0]]])
    np.testing.assert_allclose(normalize(x, "frame"), [[[0.0, 1.0]], [[0.0, 0.0]]])  # constant frame -> 0
    np.testing.assert_allclose(normalize(x, "max"), [[[0.2, 0.6]], [[1.0, 1.0]]])
    np.testing.assert_allclose(normalize(x, "sum"), [[[1 / 14, 3 / 14]], [[5 / 14, 5 / 14]]], rtol=1e-6)
    np.testing.assert_array_equal(normalize(torch.ones(2, 2, 2), "global"), np.zeros((2, 2, 2)))
    assert normalize(x, "none").dtype == np.float32
    with pytest.raises(ValueError, match="normalize: expected one of global, frame, percentile"):
        normalize(x, "l2")  # type: ignore[arg-type]


def test_token_mask_threshold_and_top_fraction_by_hand() -> None:
    x = np.array([[[0.0, 1.0], [2.0, 4.0]]])  # global -> 0, .25, .5, 1
    np.testing.assert_array_equal(token_mask(x, threshold=0.3), [[[False, False], [True, True]]])
    np.testing.assert_array_equal(
        token_mask(x, threshold=0.5), [[[False, False], [False, True]]]
    )  # strictly >
    np.testing.assert_array_equal(token_mask(x, top_fraction=0.25), [[[False, False], [False, True]]])
    np.testing.assert_array_equal(token_mask(x, top_fraction=0.5), [[[False, False], [True, True]]])
    np.testing.assert_array_equal(
        token_mask(x, top_fraction=0.3), [[[False, False], [True, True]]]
    )  # ceil(1.2)
    # ties: the earlier position wins
    np.testing.assert_array_equal(token_mask(np.ones((1, 1, 3)), top_fraction=0.33), [[[True, False, False]]])
    # per frame: each frame keeps its own top
    y = np.array([[[1.0, 2.0]], [[10.0, 0.0]]])
    np.testing.assert_array_equal(
        token_mask(y, top_fraction=0.5, per_frame=True), [[[False, True]], [[True, False]]]
    )
    np.testing.assert_array_equal(token_mask(y, top_fraction=0.5), [[[False, True]], [[True, False]]])
    np.testing.assert_array_equal(token_mask(y, top_fraction=0.25), [[[False, False]], [[True, False]]])
    with pytest.raises(ValueError, match="exactly one"):
        token_mask(x)
    with pytest.raises(ValueError, match="exactly one"):
        token_mask(x, threshold=0.1, top_fraction=0.1)
    with pytest.raises(ValueError, match=r"^top_fraction: expected a finite number in \(0, 1\], got 0.0$"):
        token_mask(x, top_fraction=0.0)


def test_token_map_by_hand() -> None:
    # 1 CLS-like prefix row, grid (F=2, H=1, W=2) -> 4 video rows, 3 text columns
    cross = np.array(
        [
            [9.0, 9.0, 9.0],  # prefix, dropped
            [0.1, 0.2, 0.7],
            [0.3, 0.3, 0.4],
            [0.5, 0.1, 0.4],
            [0.0, 0.6, 0.4],
        ]
    )
    got = token_map(cross, [1, 2], (2, 1, 2), prefix=1)
    np.testing.assert_allclose(got, [[[0.9, 0.7]], [[0.5, 1.0]]], rtol=1e-6)
    got = token_map(cross, [1, 2], (2, 1, 2), prefix=1, combine="mean")
    np.testing.assert_allclose(got, [[[0.45, 0.35]], [[0.25, 0.5]]], rtol=1e-6)
    # leading dims (steps, heads) are averaged
    stack = torch.from_numpy(np.stack([cross, 3 * cross]))
    np.testing.assert_allclose(
        token_map(stack, [0], (2, 1, 2), prefix=1), [[[0.2, 0.6]], [[1.0, 0.0]]], rtol=1e-6
    )
    np.testing.assert_allclose(
        token_map(cross, [0], (2, 1, 2), prefix=1, normalize_by="global"),
        [[[0.2, 0.6]], [[1.0, 0.0]]],
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="cross must be"):
        token_map(cross, [0], (2, 2, 2))
    with pytest.raises(ValueError, match="token_indices must be"):
        token_map(cross, [3], (2, 1, 2), prefix=1)


def test_frame_matrix_by_hand_and_against_torch() -> None:
    # grid (F=2, H=1, W=2): tokens f0:{0,1}, f1:{2,3}
    a = np.array(
        [
            [0.5, 0.5, 0.0, 0.0],
            [0.2, 0.2, 0.3, 0.3],
            [0.1, 0.0, 0.9, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    np.testing.assert_allclose(frame_matrix(a, (2, 1, 2)), [[0.7, 0.3], [0.05, 0.95]], rtol=1e-6)
    # reference: a loop over random softmax maps with a CLS prefix
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(2, 3, 1 + 12, 1 + 12), -1)
    got = frame_matrix(p, (3, 2, 2), prefix=1)
    ref = torch.zeros(2, 3, 3, 3, dtype=torch.float64)
    v = p[..., 1:, 1:].double()
    for i in range(3):
        for j in range(3):
            ref[..., i, j] = v[..., i * 4 : (i + 1) * 4, j * 4 : (j + 1) * 4].sum(-1).mean(-1)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="attn must be"):
        frame_matrix(a, (2, 2, 2))
    # a joint layout with the text after the video: the same matrix from the video slice
    joint = torch.softmax(torch.randn(2, 12 + 3, 12 + 3), -1)  # 12 video tokens, then 3 text tokens
    want = frame_matrix(joint[:, :12, :12], (3, 2, 2))
    np.testing.assert_allclose(frame_matrix(joint, (3, 2, 2), video=slice(0, 12)), want, rtol=1e-6)
    with pytest.raises(ValueError, match="video must be a slice of F\\*H\\*W = 12 positions"):
        frame_matrix(joint, (3, 2, 2), video=slice(0, 11))


def test_temporal_locality_by_hand() -> None:
    spatial = np.eye(3)
    even = np.full((3, 3), 1 / 3)
    t = np.stack([spatial, even, np.array([[0.5, 0.5, 0], [0, 1, 0], [0.2, 0.2, 0.6]])])
    np.testing.assert_allclose(temporal_locality(t), [1.0, 1 / 3, (0.5 + 1 + 0.6) / 3], rtol=1e-6)
    # rows that also send mass to text: relative divides by the frame mass
    part = np.array([[0.4, 0.1], [0.0, 0.5]])
    np.testing.assert_allclose(temporal_locality(part), 0.9, rtol=1e-6)
    np.testing.assert_allclose(temporal_locality(part, relative=False), 0.45, rtol=1e-6)
    # cut = 1/3 + margin * 2/3: 0.667 at the default margin, 0.733 at margin 0.6; the third head has 0.7
    np.testing.assert_array_equal(classify_heads(temporal_locality(t), 3), ["spatial", "temporal", "spatial"])
    np.testing.assert_array_equal(
        classify_heads(temporal_locality(t), 3, margin=0.6), ["spatial", "temporal", "temporal"]
    )
    with pytest.raises(ValueError, match=r"\[\.\.\., F, F\]"):
        temporal_locality(np.ones((2, 3)))


def test_text_self_attention_by_hand() -> None:
    # joint layout: text first (2 tokens) then 2 video tokens; two heads
    h0 = np.array([[0.5, 0.3, 0.1, 0.1], [0.2, 0.2, 0.3, 0.3], [0, 0, 1, 0], [0, 0, 0, 1]])
    h1 = np.array([[0.1, 0.1, 0.4, 0.4], [0.0, 0.6, 0.2, 0.2], [0, 0, 1, 0], [0, 0, 0, 1]])
    both = np.stack([h0, h1])
    np.testing.assert_allclose(text_self_attention(both, slice(0, 2)), [[0.3, 0.2], [0.1, 0.4]], rtol=1e-6)
    np.testing.assert_allclose(
        text_self_attention(both, [0, 1], renormalize=True), [[0.6, 0.4], [0.2, 0.8]], rtol=1e-6
    )
    with pytest.raises(ValueError, match="text must select"):
        text_self_attention(both, [7])


def test_top_frames_and_regions_by_hand() -> None:
    m = np.zeros((3, 2, 2))
    m[1, 0, 1] = 3.0
    m[2, 1, 0] = 1.0
    m[2, 1, 1] = 0.5
    frames = top_frames(m, 2)
    assert frames == [{"frame": 1, "share": 3 / 4.5}, {"frame": 2, "share": 1.5 / 4.5}]
    reg = top_regions(m, 2, mask_top_fraction=3 / 12)
    assert reg["peaks"] == [
        {"frame": 1, "row": 0, "col": 1, "value": 3.0},
        {"frame": 2, "row": 1, "col": 0, "value": 1.0},
    ]
    assert reg["box"] == {"frames": [1, 2], "rows": [0, 1], "cols": [0, 1]}


def _small_store(root: Path, *, aggregated: bool = True) -> None:
    rng = np.random.default_rng(0)
    meta = {"model": "tiny", "prompt": "a (cat)", "targets": {"cat": [1, 2]}, "grid": [3, 2, 2]}
    w = StoreWriter(root, "v", meta, dtype="float32")
    for s in range(2):
        cat = np.zeros((3, 2, 2))
        cat[2, 1, 1] = 1.0 + s
        cat[0, 0, 0] = 0.5
        w.write_step(
            s,
            {
                "token/cat": cat,
                "token/cat/block0": cat * 2,
                "token/cat/block1": cat * 0,
                "temporal": np.eye(3),
                "temporal/block0": np.stack([np.eye(3), np.full((3, 3), 1 / 3)]),  # per head
                "temporal/block1": np.stack([np.eye(3), np.eye(3)]),
                "text": rng.random((4, 4)),
            },
        )
    w.close(None if aggregated else {})  # {}: store_aggregated_attention false


def test_load_token_map_over_steps_and_blocks(tmp_path: Path) -> None:
    _small_store(tmp_path)
    store = open_store(tmp_path)
    agg = load_token_map(store, "v", "cat")
    assert agg[2, 1, 1] == pytest.approx(1.5) and agg[0, 0, 0] == pytest.approx(0.5)
    assert load_token_map(store, "v", "cat", steps=[1])[2, 1, 1] == pytest.approx(2.0)
    assert load_token_map(store, "v", "cat", steps=[1], combine="mean")[2, 1, 1] == pytest.approx(1.0)
    # blocks 0 and 1 over both steps: mean of (2, 4) and (0, 0) at the peak
    assert load_token_map(store, "v", "cat", blocks=[0, 1])[2, 1, 1] == pytest.approx(1.5)
    assert load_token_map(store, "v", "cat", blocks=[0], steps=[0])[2, 1, 1] == pytest.approx(2.0)
    np.testing.assert_allclose(load_token_map(store, "v", "cat", normalize_by="max").max(), 1.0)


def test_summarize_and_write(tmp_path: Path) -> None:
    _small_store(tmp_path / "maps")
    store = open_store(tmp_path / "maps")
    s = summarize(store, "v", k=1)
    assert s["video_id"] == "v" and s["model"] == "tiny" and s["steps"] == [0, 1]
    assert s["tokens"]["cat"]["frames"] == [{"frame": 2, "share": pytest.approx(1.5 / 2.0)}]
    assert s["tokens"]["cat"]["peaks"][0] == {"frame": 2, "row": 1, "col": 1, "value": 1.5}
    assert s["temporal_locality"]["blocks"] == {"0": [1.0, pytest.approx(1 / 3)], "1": [1.0, 1.0]}
    assert s["temporal_locality"]["mean"] == 1.0
    out = write_summary(store, "v", tmp_path / "out" / "summary.json", k=1)
    assert json.loads(out.read_text())["tokens"]["cat"]["frames"][0]["frame"] == 2


def test_summary_and_token_map_without_stored_aggregated_maps(tmp_path: Path) -> None:
    """A run that stored no aggregated maps: the same summary and maps, from the mean of the steps."""
    _small_store(tmp_path / "with")
    _small_store(tmp_path / "without", aggregated=False)
    with_agg, without = open_store(tmp_path / "with"), open_store(tmp_path / "without")
    with pytest.raises(KeyError):
        without.load("v", "token/cat")
    assert summarize(without, "v", k=2) == summarize(with_agg, "v", k=2)
    np.testing.assert_array_equal(load_token_map(without, "v", "cat"), load_token_map(with_agg, "v", "cat"))
    assert load_token_map(without, "v", "cat")[2, 1, 1] == pytest.approx(1.5)


# -- word masks and tracks on the video's frames ---------------------------------------------------
def test_frame_latents_by_hand() -> None:
    causal = {"video": {"frames": 9}, "vae_stride": [4, 8, 8]}
    assert frame_latents(causal, 3).tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    whole = {"video": {"frames": 12}, "vae_stride": [4, 8, 8]}  # 3 x 4: a VAE without the first-frame rule
    assert frame_latents(whole, 3).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    # 6 frames of 3 latent frames, no stride gives it: the nearest of torch's linear map
    src = (np.arange(6) + 0.5) * 3 / 6 - 0.5
    assert frame_latents({"video": {"frames": 6}}, 3).tolist() == np.clip(np.floor(src + 0.5), 0, 2).tolist()
    assert frame_latents({}, 4).tolist() == [0, 1, 2, 3]  # no video: one frame per latent frame
    with pytest.raises(AttnmapError, match="latent_frames must be an int >= 1"):
        frame_latents(causal, 0)


def test_word_masks_and_their_track_by_hand() -> None:
    m = np.zeros((2, 4, 4))
    m[0, 1, 2] = 5.0  # latent frame 0: one cell
    m[1, 2:4, 0:2] = 3.0  # latent frame 1: a 2 x 2 block
    masks = word_masks(m, [0, 1, 1], top_fraction=1 / 16)
    assert masks.shape == (3, 4, 4) and masks[0].sum() == 1 and masks[0, 1, 2]
    assert np.array_equal(masks[1], masks[2]) and masks[1].sum() == 1  # the top 1/16 of frame 1
    block = word_masks(m, [0, 1, 1], threshold=0.5)  # each latent frame normalised on its own
    assert block[1].sum() == 4 and block[1, 2:4, 0:2].all()
    track = mask_track(block, size=(40, 80))  # a 4 x 4 grid over a 40 x 80 video: cells of 10 x 20 pixels
    assert track[0] == {"x": (2 + 0.5) * 20, "y": (1 + 0.5) * 10, "area": 1 / 16}
    assert track[1] == track[2] == {"x": (0.5 + 0.5) * 20, "y": (2.5 + 0.5) * 10, "area": 4 / 16}
    assert mask_track(np.zeros((1, 2, 2), dtype=bool)) == [None]
    with pytest.raises(AttnmapError, match="latents must be latent frames in"):
        word_masks(m, [0, 2], top_fraction=0.1)


def test_mask_rle_is_cocos_column_major_runs() -> None:
    mask = np.array([[False, True], [True, True]])  # column-major: 0, 1, 1, 1
    assert mask_rle(mask) == {"size": [2, 2], "counts": [1, 3]}
    starts_set = np.array([[True, False, False]])  # starts with a one: a zero-length run of zeros first
    assert mask_rle(starts_set) == {"size": [1, 3], "counts": [0, 1, 2]}
    rng = np.random.default_rng(0)
    for shape in ((1, 1), (3, 5), (7, 4)):
        m = rng.random(shape) > 0.5
        assert np.array_equal(rle_mask(mask_rle(m)), m)
    with pytest.raises(AttnmapError, match="sum to H\\*W = 4"):
        rle_mask({"size": [2, 2], "counts": [1, 2]})


def test_the_summary_has_each_words_mask_and_track_on_every_video_frame(tmp_path: Path) -> None:
    cat = np.zeros((3, 2, 2))
    cat[0, 0, 0] = 1.0
    cat[1, 1, 1] = 1.0
    cat[2, 0, 1] = 1.0
    meta = {
        "targets": {"cat": [1]},
        "grid": [3, 2, 2],
        "vae_stride": [4, 8, 8],
        "video": {"frames": 9, "height": 16, "width": 32},
    }
    w = StoreWriter(tmp_path, "v", meta, dtype="float32")
    w.write_step(0, {"token/cat": cat})
    w.close()
    s = summarize(open_store(tmp_path), "v", mask_top_fraction=0.25)["tokens"]["cat"]
    assert s["masks"]["rule"] == {"top_fraction": 0.25, "per": "latent frame"}
    cells = [(0, 0)] + [(1, 1)] * 4 + [(0, 1)] * 4  # frame 0 alone, then 4 frames per latent frame
    assert len(s["masks"]["frames"]) == 9 and s["track"]["size"] == [16, 32]
    for i, (frame, (r, c)) in enumerate(zip(s["masks"]["frames"], cells)):
        want = np.zeros((2, 2), dtype=bool)
        want[r, c] = True
        assert np.array_equal(rle_mask(frame), want)
        latent = 0 if i == 0 else (i - 1) // 4 + 1
        assert s["track"]["points"][i] == {
            "frame": i, "latent_frame": latent, "x": (c + 0.5) * 16, "y": (r + 0.5) * 8, "area": 0.25,
        }  # fmt: skip
    json.dumps(s)  # JSON-safe


# -- NaN stays visible ----------------------------------------------------------------------------
def _reference(x: np.ndarray, method: str) -> np.ndarray:
    """Each method by hand on the finite values (the NaN left where it is)."""
    finite = x[np.isfinite(x)]
    if method == "global":
        return (x - finite.min()) / (finite.max() - finite.min())
    if method == "frame":
        return np.stack([(f - np.nanmin(f)) / (np.nanmax(f) - np.nanmin(f)) for f in x])
    if method == "percentile":
        lo, hi = np.percentile(finite, [1, 99])
        return np.clip((x - lo) / (hi - lo), 0, 1)
    if method == "max":
        return x / finite.max()
    if method == "sum":
        return x / finite.sum()
    if method == "fixed":
        return np.clip((x - 0.25) / 0.5, 0, 1)
    return x


@pytest.mark.parametrize("method", list(NORMALIZE))
def test_one_nan_stays_nan_with_one_warning_naming_the_map(method: str) -> None:
    x = np.random.default_rng(3).random((2, 3, 4))
    x[0, 1, 2] = np.nan
    kwargs = {"vmin": 0.25, "vmax": 0.75} if method == "fixed" else {}
    with pytest.warns(
        RuntimeWarning, match=r"^token 'cat' holds 1 NaN value\(s\) of 24; they stay NaN"
    ) as caught:
        got = normalize(x, method, name="token 'cat'", **kwargs)
    assert len(caught) == 1
    assert np.isnan(got[0, 1, 2]) and np.isnan(got).sum() == 1
    np.testing.assert_allclose(got, _reference(x, method), rtol=1e-6, atol=1e-7, equal_nan=True)
    with pytest.raises(ValueError, match=r"^token 'cat' holds 1 NaN value\(s\) of 24"):
        normalize(x, method, name="token 'cat'", nan="raise", **kwargs)


def test_token_mask_never_hides_a_nan() -> None:
    x = np.array([[[0.0, 1.0], [2.0, np.nan]], [[4.0, 3.0], [0.5, 1.5]]])
    with pytest.warns(RuntimeWarning, match=r"^cat holds 1 NaN"):
        mask = token_mask(x, threshold=0.5, name="cat")
    np.testing.assert_array_equal(mask, [[[False, False], [False, False]], [[True, True], [False, False]]])
    with pytest.warns(RuntimeWarning, match=r"^cat holds 1 NaN"):
        top = token_mask(x, top_fraction=1.0, name="cat")
    np.testing.assert_array_equal(top, ~np.isnan(x))  # every number, never the NaN
    with pytest.warns(RuntimeWarning, match=r"^cat \(frame 0\) holds 1 NaN"):
        per_frame = token_mask(x, top_fraction=0.25, per_frame=True, name="cat")
    np.testing.assert_array_equal(
        per_frame, [[[False, False], [True, False]], [[True, False], [False, False]]]
    )
    with (
        pytest.warns(RuntimeWarning, match="holds 4 NaN"),
        pytest.raises(ValueError, match=r"^dog: all of its 4"),
    ):
        token_mask(np.full((1, 2, 2), np.nan), threshold=0.5, name="dog")


def test_a_mask_that_keeps_nothing_warns() -> None:
    with pytest.warns(
        RuntimeWarning, match=r"^cat: the mask is empty: no value is above threshold 0.5 after 'global'"
    ):
        mask = token_mask(np.zeros((2, 2, 2)), threshold=0.5, name="cat")
    assert not mask.any()


def test_a_stored_nan_is_named_in_the_warning(tmp_path: Path) -> None:
    x = np.ones((2, 2, 2), np.float32)
    x[1, 0, 1] = np.nan
    with StoreWriter(tmp_path, "v", {"targets": {"cat": [1]}}, dtype="float32") as w:
        w.write_step(0, {"token/cat": x})
    store = open_store(tmp_path)
    with pytest.warns(RuntimeWarning, match=r"^token map 'cat' of video 'v' holds 1 NaN"):
        got = load_token_map(store, "v", "cat", normalize_by="max")
    assert np.isnan(got[1, 0, 1]) and np.nansum(got) == 7.0
