"""Rollout: hand-computed cases, an independent loop reference, and real attentions of tiny models."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from attnmap.analysis.rollout import cls_space_time_map, rollout, space_time_rollout, temporal_rollout
from tiny_models import timesformer, videomae, vjepa2


def _softmax_rows(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.normal(size=shape) * 2
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _reference_rollout(
    layers: list[np.ndarray], fusion: str, ratio: float, start: int, cls: int | None
) -> np.ndarray:
    """Entry-by-entry loops in numpy: fuse heads, discard, (A + I) / row sums, later layers on the left."""
    b, n = layers[0].shape[0], layers[0].shape[-1]
    out = np.zeros((b, n, n))
    for bi in range(b):
        r = np.eye(n)
        for a in layers[start:]:
            a = a[bi]
            if a.ndim == 3:
                a = {"mean": a.mean(0), "max": a.max(0), "min": a.min(0)}[fusion]
            a = a.copy()
            k = int(n * n * ratio)
            cand = sorted(
                ((a[i, j], i * n + j) for i in range(n) for j in range(n) if cls is None or j != cls),
                key=lambda t: t[0],
            )
            for _, flat in cand[:k]:
                a[flat // n, flat % n] = 0.0
            a = a + np.eye(n)
            a = a / a.sum(1, keepdims=True)
            r = a @ r
        out[bi] = r
    return out


def test_one_layer_by_hand() -> None:
    a = np.array([[[0.5, 0.5], [0.2, 0.8]]])
    np.testing.assert_allclose(rollout([a]), [[[0.75, 0.25], [0.1, 0.9]]], rtol=1e-6)


def test_two_layers_later_on_the_left_by_hand() -> None:
    a1 = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # A1' = [[.5, .5], [.5, .5]]
    a2 = torch.tensor([[[1.0, 0.0], [0.6, 0.4]]])  # A2' = [[1, 0], [.3, .7]]
    got = rollout([a1, a2])
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    # A2' @ A1' = [[.5, .5], [.5, .5]]; A1' @ A2' would be [[.65, .35], [.65, .35]]
    torch.testing.assert_close(got, torch.tensor([[[0.5, 0.5], [0.5, 0.5]]]))
    a1 = torch.tensor([[[0.8, 0.2], [0.0, 1.0]]])  # A1' = [[.9, .1], [0, 1]]
    got = rollout([a1, a2])
    # A2' @ A1' = [[.9, .1], [.27, .73]]
    torch.testing.assert_close(got, torch.tensor([[[0.9, 0.1], [0.27, 0.73]]]))
    # start_layer=1 keeps only A2'
    torch.testing.assert_close(rollout([a1, a2], start_layer=1), torch.tensor([[[1.0, 0.0], [0.3, 0.7]]]))


def test_head_fusion_by_hand() -> None:
    heads = np.array([[[[0.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [0.5, 0.5]]]])  # (1, 2, 2, 2)
    # max: [[1, 1], [1, .5]] + I = [[2, 1], [1, 1.5]]
    np.testing.assert_allclose(rollout([heads], head_fusion="max"), [[[2 / 3, 1 / 3], [0.4, 0.6]]], rtol=1e-6)
    # min: [[0, 0], [.5, 0]] + I = [[1, 0], [.5, 1]]
    np.testing.assert_allclose(rollout([heads], head_fusion="min"), [[[1.0, 0.0], [1 / 3, 2 / 3]]], rtol=1e-6)
    # mean: [[.5, .5], [.75, .25]] + I
    np.testing.assert_allclose(rollout([heads]), [[[0.75, 0.25], [0.375, 0.625]]], rtol=1e-6)


def test_discard_never_touches_cls_column_by_hand() -> None:
    a = np.array([[[0.01, 0.49, 0.5], [0.02, 0.9, 0.08], [0.03, 0.07, 0.9]]])
    # ratio 2/9 -> 2 entries: the two smallest outside column 0 are 0.07 and 0.08
    got = rollout([a], discard_ratio=2 / 9 + 1e-9)
    kept = a.copy()
    kept[0, 2, 1] = kept[0, 1, 2] = 0.0
    ref = (kept + np.eye(3)) / (kept + np.eye(3)).sum(-1, keepdims=True)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    # without a CLS token the column-0 entries go first
    kept = a.copy()
    kept[0, 0, 0] = kept[0, 1, 0] = 0.0
    ref = (kept + np.eye(3)) / (kept + np.eye(3)).sum(-1, keepdims=True)
    np.testing.assert_allclose(rollout([a], discard_ratio=2 / 9 + 1e-9, cls_index=None), ref, rtol=1e-6)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("ratio,start,cls", [(0.0, 0, 0), (0.5, 1, 0), (0.9, 0, None), (0.3, 2, 0)])
def test_matches_loop_reference(fusion: str, ratio: float, start: int, cls: int | None) -> None:
    rng = np.random.default_rng(7)
    layers = [_softmax_rows(rng, 2, 3, 6, 6) for _ in range(4)]
    got = rollout(layers, head_fusion=fusion, discard_ratio=ratio, start_layer=start, cls_index=cls)  # type: ignore[arg-type]
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_allclose(
        got, _reference_rollout(layers, fusion, ratio, start, cls), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)  # rows stay distributions


def test_rollout_errors() -> None:
    a = np.full((1, 2, 2), 0.5)
    with pytest.raises(ValueError, match="head_fusion must be"):
        rollout([a[:, None]], head_fusion="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^discard_ratio: expected a finite number in \[0, 1\), got 1.0$"):
        rollout([a], discard_ratio=1.0)
    with pytest.raises(ValueError, match=r"^start_layer: expected an integer in \[0, 0\], got 1$"):
        rollout([a], start_layer=1)
    with pytest.raises(ValueError, match="sequence"):
        rollout(a)
    with pytest.raises(ValueError, match="at least one layer"):
        rollout([])
    with pytest.raises(ValueError, match="square and match"):
        rollout([a, np.full((1, 3, 3), 1 / 3)])
    with pytest.raises(ValueError, match=r"\(B, H, N, N\) or \(B, N, N\)"):
        rollout([np.ones((2, 2))])


@pytest.mark.parametrize("builder", [videomae, vjepa2], ids=["videomae", "vjepa2"])
def test_rollout_on_real_eager_attentions(builder: object) -> None:
    model, kwargs = builder(attn="eager")  # type: ignore[operator]
    with torch.no_grad():
        out = model(**kwargs, output_attentions=True)
    atts = list(out.attentions)
    assert len(atts) == 2 and atts[0].shape == (1, 2, 32, 32)
    got = rollout(atts, discard_ratio=0.5, cls_index=None)  # no CLS token in these models
    ref = _reference_rollout([a.double().numpy() for a in atts], "mean", 0.5, 0, None)
    torch.testing.assert_close(got, torch.from_numpy(ref).float(), rtol=1e-5, atol=1e-6)


# -- divided space-time -------------------------------------------------------------------------
def _divided_rollout_reference(space: list[torch.Tensor], time: list[torch.Tensor], t: int) -> torch.Tensor:
    """The published divided space-time rollout of TimeSformer (its loop, restated), batch 1, with j = T."""
    mats = []
    for attn_t, attn_s in zip(time, space):
        attn_t = attn_t.double().mean(dim=1)
        eye_t = torch.eye(attn_t.size(-1), dtype=attn_t.dtype).unsqueeze(0)
        attn_t = torch.cat([eye_t, attn_t], 0)
        attn_t = 0.5 * attn_t + 0.5 * torch.eye(attn_t.size(-1), dtype=attn_t.dtype)[None]
        attn_t = attn_t / attn_t.sum(-1)[..., None]
        attn_s = attn_s.double().mean(dim=1)
        attn_s = 0.5 * attn_s + 0.5 * torch.eye(attn_s.size(-1), dtype=attn_s.dtype)[None]
        attn_s = attn_s / attn_s.sum(-1)[..., None]
        attn_ts = torch.einsum("tpk, ktq -> ptkq", attn_s, attn_t)
        attn_cls_a = attn_ts[0].mean(dim=0)
        attn_cls_a = attn_cls_a.unsqueeze(0).repeat(t, 1, 1)
        mats.append(torch.cat([attn_cls_a.unsqueeze(0), attn_ts[1:]], 0))
    p = mats[0].shape[0]
    result = torch.eye(p * t, dtype=torch.float64)
    for m in mats:
        result = m.reshape(p * t, p * t) @ result
    return result.reshape(p, t, p, t)


def test_space_time_with_one_frame_is_spatial_rollout() -> None:
    rng = np.random.default_rng(3)
    space = [_softmax_rows(rng, 1, 2, 5, 5) for _ in range(3)]
    time = [np.ones((4, 2, 1, 1)) for _ in range(3)]
    got = space_time_rollout(space, time, num_frames=1)
    assert got.shape == (1, 5, 1, 5, 1)
    np.testing.assert_allclose(got[:, :, 0, :, 0], rollout(space), rtol=1e-5)


@pytest.mark.parametrize("frames", [1, 3, 8])
def test_space_time_matches_the_published_divided_rollout(frames: int) -> None:
    rng = np.random.default_rng(frames)
    s = 6
    space = [torch.from_numpy(_softmax_rows(rng, frames, 2, 1 + s, 1 + s)) for _ in range(3)]
    time = [torch.from_numpy(_softmax_rows(rng, s, 2, frames, frames)) for _ in range(3)]
    got = space_time_rollout(space, time, num_frames=frames)
    ref = _divided_rollout_reference(space, time, frames)
    torch.testing.assert_close(got[0], ref.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.sum((-2, -1)), torch.ones(1, 1 + s, frames), rtol=1e-5, atol=1e-6)
    cls = cls_space_time_map(got)
    torch.testing.assert_close(cls[0], ref[0].mean(0)[1:].T.float(), rtol=1e-5, atol=1e-7)
    # start_layer drops the first block
    torch.testing.assert_close(
        space_time_rollout(space, time, num_frames=frames, start_layer=1)[0],
        _divided_rollout_reference(space[1:], time[1:], frames).float(),
        rtol=1e-5,
        atol=1e-7,
    )


def test_space_time_batch_of_two_is_two_batches_of_one() -> None:
    rng = np.random.default_rng(5)
    t, s = 3, 4
    space = [_softmax_rows(rng, 2 * t, 1 + s, 1 + s) for _ in range(2)]  # fused maps (B*T, P, P)
    time = [_softmax_rows(rng, 2 * s, t, t) for _ in range(2)]
    both = space_time_rollout(space, time, num_frames=t)
    for b in range(2):
        one = space_time_rollout(
            [x[b * t : (b + 1) * t] for x in space], [x[b * s : (b + 1) * s] for x in time], num_frames=t
        )
        np.testing.assert_allclose(both[b], one[0], rtol=1e-6)


@contextlib.contextmanager
def _divided_probs(model: torch.nn.Module) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """TimeSformer's (space, time) attention probabilities per block, hooked at attn_drop (as the published divided rollout does)."""
    space: list[torch.Tensor] = []
    time: list[torch.Tensor] = []
    hooks = []
    for name, module in model.named_modules():
        if name.endswith("temporal_attention.attention.attn_drop"):
            hooks.append(module.register_forward_hook(lambda m, i, o: time.append(o.detach())))
        elif name.endswith(".attention.attention.attn_drop"):
            hooks.append(module.register_forward_hook(lambda m, i, o: space.append(o.detach())))
    try:
        yield space, time
    finally:
        for h in hooks:
            h.remove()


def test_space_time_on_timesformer() -> None:
    """Hook the attention probabilities of transformers' TimeSformer (as the published divided rollout hooks attn_drop)."""
    model, kwargs = timesformer()
    with _divided_probs(model) as (space, time), torch.no_grad():
        out = model(**kwargs, output_attentions=True)
    assert len(space) == len(time) == 2
    assert space[0].shape == (4, 2, 17, 17) and time[0].shape == (16, 2, 4, 4)
    for a, b in zip(space, out.attentions):  # the hooked spatial maps are the model's own
        torch.testing.assert_close(a, b)
    got = space_time_rollout(space, time, num_frames=4)
    torch.testing.assert_close(
        got[0], _divided_rollout_reference(space, time, 4).float(), rtol=1e-5, atol=1e-7
    )
    cls = cls_space_time_map(got)
    assert cls.shape == (1, 4, 16) and bool((cls > 0).all())


def test_space_time_errors() -> None:
    sp = [np.full((2, 3, 3), 1 / 3)]
    tm = [np.full((2, 2, 2), 0.5)]
    with pytest.raises(ValueError, match=r"^num_frames: expected an integer >= 1, got 0$"):
        space_time_rollout(sp, tm, num_frames=0)
    with pytest.raises(ValueError, match="one map per block"):
        space_time_rollout(sp, tm + tm, num_frames=2)
    with pytest.raises(ValueError, match=r"space\[0\] must be \[B\*T, 1\+S, 1\+S\] with T=3"):
        space_time_rollout(sp, tm, num_frames=3)
    with pytest.raises(ValueError, match=r"time\[0\] must be \[B\*S, T, T\]"):
        space_time_rollout(sp, [np.full((3, 2, 2), 0.5)], num_frames=2)


# -- temporal rollout ---------------------------------------------------------------------------
def test_temporal_rollout_by_hand() -> None:
    l1 = np.array([[0.0, 1.0], [1.0, 0.0]])
    l2 = np.array([[1.0, 0.0], [0.6, 0.4]])
    np.testing.assert_allclose(temporal_rollout([l1, l2]), [[0.5, 0.5], [0.5, 0.5]], rtol=1e-6)
    # without residual: plain product L2 @ L1 = [[0, 1], [.4, .6]]
    np.testing.assert_allclose(
        temporal_rollout([l1, l2], residual=False), [[0.0, 1.0], [0.4, 0.6]], atol=1e-7
    )
    # unnormalised rows (e.g. mass also on non-frame keys) are renormalised
    np.testing.assert_allclose(temporal_rollout([2 * l2], residual=False), l2, rtol=1e-6)


def test_temporal_rollout_heads_and_leading_dims() -> None:
    rng = np.random.default_rng(2)
    layers = [_softmax_rows(rng, 5, 3, 4, 4) for _ in range(3)]  # (queries, heads, T, T)
    got = temporal_rollout(layers, head_fusion="max")
    for q in range(5):
        ref = np.eye(4)
        for a in layers:
            m = a[q].max(0) + np.eye(4)
            ref = (m / m.sum(1, keepdims=True)) @ ref
        np.testing.assert_allclose(got[q], ref, rtol=1e-5)
    with pytest.raises(ValueError, match="must be"):
        temporal_rollout([np.ones((2, 3))])


# -- through attnmap.capture and the store ------------------------------------------------------
@pytest.mark.parametrize("builder", [videomae, vjepa2], ids=["videomae", "vjepa2"])
def test_rollout_through_capture_and_store(builder: object, tmp_path: object) -> None:
    import attnmap

    model, kwargs = builder()  # type: ignore[operator]  # SDPA: no attention weights from the model
    with attnmap.capture(model, reductions=("full",), per_block=True, store=tmp_path, video_id="clip") as rec:
        with torch.no_grad():
            model(**kwargs)
    eager, _ = builder(attn="eager")  # type: ignore[operator]  # same seed: same weights and input
    with torch.no_grad():
        ref = rollout(list(eager(**kwargs, output_attentions=True).attentions), cls_index=None)
    captured = [rec.get("full", block=b) for b in rec.blocks]
    torch.testing.assert_close(rollout(captured, cls_index=None), ref, rtol=1e-4, atol=1e-5)
    store = attnmap.open_store(tmp_path)
    stored = [store.load("clip", f"full/block{b}", 0)[None] for b in store.metadata("clip")["blocks"]]
    np.testing.assert_allclose(rollout(stored, cls_index=None), ref.numpy(), atol=2e-3)  # float16 storage


def test_space_time_rollout_through_capture(tmp_path: object) -> None:
    import attnmap

    model, kwargs = timesformer()
    with _divided_probs(model) as (space, time):
        with attnmap.capture(
            model, reductions=("full",), per_block=True, store=tmp_path, video_id="ts"
        ) as rec:
            with torch.no_grad():
                model(**kwargs)
    cap_space = [rec.get("full/space", block=b).flatten(0, 1) for b in rec.blocks]  # [B*F, 1+HW, 1+HW]
    cap_time = [rec.get("full/time", block=b).flatten(0, 1) for b in rec.blocks]  # [B*HW, F, F]
    got = space_time_rollout(cap_space, cap_time, num_frames=4)
    torch.testing.assert_close(got, space_time_rollout(space, time, num_frames=4), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        got[0], _divided_rollout_reference(space, time, 4).float(), rtol=1e-5, atol=1e-6
    )
    # and from the store (float16): [F, 1+HW, 1+HW] and [HW, F, F] per block of the one video
    store = attnmap.open_store(tmp_path)
    meta = store.metadata("ts")
    blocks, frames = meta["blocks"], meta["grid"][0]
    stored = space_time_rollout(
        [store.load("ts", f"full/space/block{b}", 0) for b in blocks],
        [store.load("ts", f"full/time/block{b}", 0) for b in blocks],
        num_frames=frames,
    )
    np.testing.assert_allclose(stored, got.numpy(), atol=2e-3)
    np.testing.assert_allclose(cls_space_time_map(stored), cls_space_time_map(got).numpy(), atol=2e-3)


def test_attnmap_rollout_is_callable_whatever_was_imported_first() -> None:
    """``attnmap.analysis.rollout`` stays callable after the submodule of that name was imported
    (e.g. through ``attnmap.analysis.space_time_rollout``), which binds the module over the function."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import numpy as np, attnmap\n"
        "attnmap.analysis.space_time_rollout\n"
        "import attnmap.analysis.rollout\n"
        "a = np.array([[[0.5, 0.5], [0.2, 0.8]]])\n"
        "print(attnmap.analysis.rollout([a], head_fusion='mean', discard_ratio=0.0, start_layer=0).tolist())\n"
    )
    python_dir = str(Path(__file__).resolve().parents[1] / "python")
    env = {**os.environ, "PYTHONPATH": python_dir}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    np.testing.assert_allclose(json.loads(out.stdout), [[[0.75, 0.25], [0.1, 0.9]]], rtol=1e-6)


def test_products_stay_on_the_input_device() -> None:
    """Torch inputs are rolled out where they live (checked on the shape-only "meta" device, the
    stand-in for CUDA here), numpy inputs on the CPU."""
    a = torch.rand(1, 2, 4, 4, device="meta")
    assert rollout([a, a]).device.type == "meta"
    assert temporal_rollout([a, a]).device.type == "meta"
    space, time = torch.rand(2, 5, 5, device="meta"), torch.rand(4, 2, 2, device="meta")
    rolled = space_time_rollout([space], [time], num_frames=2)
    assert rolled.device.type == "meta" and rolled.shape == (1, 5, 2, 5, 2)
    assert cls_space_time_map(rolled).device.type == "meta"
    # a numpy layer after a torch one joins it on the torch layer's device
    got = rollout([torch.eye(3)[None], np.full((1, 3, 3), 1 / 3)])
    assert isinstance(got, torch.Tensor)
    # A1' = (I + I) / 2 = I; A2' = (J/3 + I) / 2: 2/3 on the diagonal, 1/6 off it
    want = torch.full((1, 3, 3), 1 / 6) + torch.eye(3) / 2
    torch.testing.assert_close(got, want)
