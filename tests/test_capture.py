"""attnmap.capture on tiny real models: output unchanged, maps equal eager softmax maps, steps, CFG
branches, targets, stores, errors and clean-up."""

from __future__ import annotations

import sys
import types
from typing import Any, Callable, Optional

import pytest
import torch

import attnmap
from attnmap import Config, Layout
from attnmap.store import open_store
from tiny_models import AttentionLog as SdpaLog
from tiny_models import (
    cogvideox,
    cogvideox_pipeline,
    hunyuan,
    ltx,
    softmax64,
    timesformer,
    timm_vit,
    tokenizer,
    videomae,
    vjepa2,
    wan,
    wan_pipeline,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def eager_probs(q: torch.Tensor, k: torch.Tensor, mask: Any, scale: Optional[float]) -> torch.Tensor:
    """softmax(scale q k^T + mask), computed in float64 and given in float32, [B, H, Nq, Nk]."""
    return softmax64(q, k, mask, scale).float()


def maps_of(p: torch.Tensor, lay: Layout) -> dict[str, torch.Tensor]:
    """Expected head-mean cross/temporal/text maps of probabilities p [B, H, Nq, Nk]."""
    out = {}
    f, hw = lay.frames, lay.frame_tokens
    if lay.text_k is not None:
        out["cross"] = p[:, :, lay.video_q, lay.text_k].mean(1)
    if lay.video_k is not None:
        pv = p[:, :, lay.video_q, lay.video_k]
        out["temporal"] = pv.reshape(*pv.shape[:2], f, hw, f, hw).sum(-1).mean(3).mean(1)
    if lay.kind == "joint":
        out["text"] = p[:, :, lay.text_q, lay.text_k].mean(1)
    return out


def close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float = 2e-6) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    assert err <= atol, f"{name}: max abs error {err:.3g} > {atol}"


def run(model: torch.nn.Module, kwargs: dict[str, Any]) -> Any:
    with torch.no_grad():
        out = model(**kwargs)
    if isinstance(out, tuple):
        return out[0]
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


# -- diffusers models: the sites, their layouts and block numbers, per family --------------------
GRID = (3, 4, 4)
DIFFUSERS: dict[str, tuple[Callable[..., Any], dict[str, tuple[int, Layout]]]] = {
    "wan": (
        wan,
        {
            "blocks.0.attn1": (0, Layout.self_attn(GRID)),
            "blocks.0.attn2": (0, Layout.cross(GRID, text=16)),
            "blocks.1.attn1": (1, Layout.self_attn(GRID)),
            "blocks.1.attn2": (1, Layout.cross(GRID, text=16)),
        },
    ),
    "cogvideox": (
        cogvideox,
        {f"transformer_blocks.{i}.attn1": (i, Layout.joint(16, GRID, text_first=True)) for i in range(2)},
    ),
    "hunyuan": (
        hunyuan,
        {
            **{
                f"transformer_blocks.{i}.attn": (i, Layout.joint(12, GRID, text_first=False))
                for i in range(2)
            },
            **{
                f"single_transformer_blocks.{i}.attn": (2 + i, Layout.joint(12, GRID, text_first=False))
                for i in range(2)
            },
        },
    ),
    "ltx": (
        ltx,
        {
            **{f"transformer_blocks.{i}.attn1": (i, Layout.self_attn((3, 8, 8))) for i in range(2)},
            **{f"transformer_blocks.{i}.attn2": (i, Layout.cross((3, 8, 8), text=12)) for i in range(2)},
        },
    ),
}


@pytest.mark.parametrize("one_pass", [False, True], ids=["two-pass", "one-pass"])
@pytest.mark.parametrize("family", sorted(DIFFUSERS))
def test_diffusers_maps_equal_eager_softmax_per_block(family: str, one_pass: bool) -> None:
    build, sites = DIFFUSERS[family]
    # the masks keep 9 of LTX's and of HunyuanVideo's 12 text tokens: cross and text hold the real ones
    real = {"ltx": 9, "hunyuan": 9}.get(family)
    model, kwargs = build()
    plain = run(model, kwargs)
    log = SdpaLog(model, list(sites))
    with (
        attnmap.capture(
            model, reductions=("cross", "temporal", "text"), per_block=True, one_pass=one_pass
        ) as rec,
        log,
    ):
        captured = run(model, kwargs)
    log.close()
    assert torch.equal(plain, captured), "capture changed the model output"
    assert len(log.calls) == len(sites)
    assert rec.blocks == sorted({b for b, _ in sites.values()})
    per_block: dict[tuple[str, int], list[torch.Tensor]] = {}
    for name, q, k, mask, scale in log.calls:
        block, lay = sites[name]
        for red, value in maps_of(eager_probs(q, k, mask, scale), lay).items():
            if red == "cross" and real is not None:
                value = value[..., :real]
            if red == "text" and real is not None:
                value = value[..., :real, :real]
            per_block.setdefault((red, block), []).append(value)
    for (red, block), values in per_block.items():
        want = torch.stack(values).mean(0)
        close(f"{family} {red} block {block}", rec.get(red, block=block), want)
    # the block mean
    for red in {r for r, _ in per_block}:
        blocks = sorted(b for r, b in per_block if r == red)
        want = torch.stack([torch.stack(per_block[(red, b)]).mean(0) for b in blocks]).mean(0)
        close(f"{family} {red} mean", rec.get(red), want)


def test_hunyuan_key_padding_mask_excludes_padded_text() -> None:
    model, kwargs = hunyuan()
    with attnmap.capture(model, reductions=("cross",)) as rec:
        run(model, kwargs)
    cross = rec.get("cross")  # [1, 48, 12]; text tokens 9..11 are masked out
    assert torch.all(cross[..., 9:] == 0)
    assert cross[..., :9].sum() > 0


def test_wan_zero_padded_text_reports_padding_mass_and_keeps_real_tokens() -> None:
    model, kwargs = wan(text_len=16)
    kwargs["encoder_hidden_states"][:, 10:] = 0  # 10 real tokens, zero-padded to 16 like umT5's 512
    log = SdpaLog(model, ["blocks.0.attn2", "blocks.1.attn2"])
    with attnmap.capture(model, reductions=("cross",)) as rec, log:
        run(model, kwargs)
    log.close()
    probs = torch.stack([eager_probs(q, k, m, s).mean(1) for _, q, k, m, s in log.calls]).mean(
        0
    )  # [1, 48, 16]
    close("cross real tokens", rec.get("cross"), probs[..., :10])
    close("padding mass", rec.get("padding"), probs[..., 10:].sum(-1).reshape(1, *GRID))


# -- transformers and timm: against eager attention probabilities ------------------------------
@pytest.mark.parametrize("one_pass", [False, True], ids=["two-pass", "one-pass"])
@pytest.mark.parametrize("build", [vjepa2, videomae], ids=["vjepa2", "videomae"])
def test_transformers_maps_equal_output_attentions(build: Callable[..., Any], one_pass: bool) -> None:
    model, kwargs = build(attn="sdpa")
    eager, _ = build(attn="eager")
    plain = run(model, kwargs)
    with attnmap.capture(
        model, reductions=("temporal", "received"), per_block=True, one_pass=one_pass
    ) as rec:
        captured = run(model, kwargs)
    assert torch.equal(plain, captured)
    with torch.no_grad():
        eager_out = eager(**kwargs, output_attentions=True)
    probs = eager_out.attentions[:2]  # the encoder's layers (VJEPA2 appends the predictor's)
    lay = Layout.self_attn((2, 4, 4))
    assert rec.blocks == [0, 1]
    for block, p in enumerate(probs):
        close(f"temporal block {block}", rec.get("temporal", block=block), maps_of(p, lay)["temporal"], 1e-5)
        close(f"received block {block}", rec.get("received", block=block), p.mean(2).mean(1), 1e-5)


def test_timesformer_space_and_time_attention_from_eager_softmax() -> None:
    model, kwargs = timesformer()
    plain = run(model, kwargs)
    # time attention, recomputed from the temporal attention module's own input and weights
    times: list[torch.Tensor] = []

    def time_probs(mod: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]
        qkv = mod.qkv(x).reshape(x.shape[0], x.shape[1], 3, mod.num_heads, -1).permute(2, 0, 3, 1, 4)
        times.append(torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) * mod.scale, dim=-1))

    hooks = [
        layer.temporal_attention.attention.register_forward_pre_hook(time_probs)
        for layer in model.encoder.layer
    ]
    with attnmap.capture(model, reductions=("temporal",), per_block=True) as rec:
        captured = run(model, kwargs)
    for h in hooks:
        h.remove()
    assert torch.equal(plain, captured)
    with torch.no_grad():
        space = model(**kwargs, output_attentions=True).attentions  # [B*F, heads, 17, 17] per layer
    for block in range(2):
        want_space = space[block].mean(1).reshape(1, 4, 17, 17)
        close(f"space block {block}", rec.get("full/space", block=block), want_space)
        want_time = times[block].mean(1).reshape(1, 16, 4, 4)  # patches in (h, w) order
        close(f"time block {block}", rec.get("full/time", block=block), want_time)
        close(f"temporal block {block}", rec.get("temporal", block=block), want_time.mean(1))


def test_timesformer_divided_attention_feeds_space_time_rollout() -> None:
    from attnmap.analysis.rollout import space_time_rollout

    model, kwargs = timesformer()
    with attnmap.capture(model, per_block=True, per_head=True) as rec:
        run(model, kwargs)
    space, time = rec.divided_attention()
    assert [tuple(t.shape) for t in space] == [(4, 2, 17, 17)] * 2
    assert [tuple(t.shape) for t in time] == [(16, 2, 4, 4)] * 2
    with torch.no_grad():
        eager_space = model(**kwargs, output_attentions=True).attentions
    for got, want in zip(space, eager_space):
        close("space per head", got, want)
    rolled = space_time_rollout(space, time, num_frames=4)
    assert rolled.shape == (1, 17, 4, 17, 4)


def test_timm_vit_with_cls_prefix() -> None:
    model, kwargs = timm_vit()
    plain = run(model, kwargs)
    probs: list[torch.Tensor] = []
    with attnmap.capture(model, reductions=("received", "full"), per_block=True) as rec:
        captured = run(model, kwargs)
    assert torch.equal(plain, captured)
    for blk in model.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_pre_hook(lambda m, a: probs.append(a[0]))
    with torch.no_grad():
        model(**kwargs)
    assert rec.metadata["layout"] == Layout.self_attn((1, 4, 4), prefix=1).to_dict()
    for block, p in enumerate(probs):
        close(f"full block {block}", rec.get("full", block=block), p.mean(1), 1e-5)


# -- steps, targets, branches, pipelines -------------------------------------------------------
def test_steps_are_kept_apart_and_averaged_and_selected() -> None:
    model, kwargs = cogvideox()
    inputs = [torch.randn_like(kwargs["hidden_states"]) for _ in range(3)]
    log = SdpaLog(model, ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"])
    lay = Layout.joint(16, GRID)
    with attnmap.capture(model, reductions=("temporal",), steps=[0, 2], blocks=[1]) as rec, log:
        for x in inputs:
            run(model, {**kwargs, "hidden_states": x})
            rec.step()
    log.close()
    assert rec.steps == [0, 2] and rec.blocks == [1]
    want = [
        maps_of(eager_probs(q, k, m, s), lay)["temporal"]
        for n, q, k, m, s in log.calls
        if n.endswith("1.attn1")
    ]
    close("step 0", rec.get("temporal", step=0), want[0])
    close("step 2", rec.get("temporal", step=2), want[2])
    close("mean over steps", rec.get("temporal"), (want[0] + want[2]) / 2)
    with pytest.raises(ValueError, match="no map 'temporal' recorded for step=1"):
        rec.get("temporal", step=1)


def test_targets_by_index_give_token_maps_without_the_full_cross_map() -> None:
    model, kwargs = wan()
    log = SdpaLog(model, ["blocks.0.attn2", "blocks.1.attn2"])
    with attnmap.capture(model, targets={"red": [1], "ball": [2, 3]}) as rec, log:
        run(model, kwargs)
    log.close()
    cross = torch.stack([eager_probs(q, k, m, s).mean(1) for _, q, k, m, s in log.calls]).mean(0)
    assert rec.tokens == ["red", "ball"]
    close("red", rec.get("cross", token="red"), cross[..., 1].reshape(1, *GRID))
    close("ball", rec.get("token/ball"), cross[..., 2:4].sum(-1).reshape(1, *GRID))
    assert "cross" not in rec.names


def test_a_target_past_the_text_tokens_is_skipped_with_one_warning_per_module() -> None:
    model, kwargs = wan()  # 16 text tokens
    with (
        pytest.warns(UserWarning) as caught,
        attnmap.capture(model, targets={"red": [1], "far": [3, 16]}) as rec,
    ):
        run(model, kwargs)
    assert sorted(str(w.message) for w in caught) == [
        f"attnmap.capture: skipping the attention of module 'blocks.{b}.attn2': "
        "target 'far' has token index 16 >= 16 text tokens"
        for b in (0, 1)
    ]
    assert "token/red" in rec.names and "token/far" not in rec.names


def test_wan_pipeline_cfg_steps_and_prompt_targets(tmp_path: Any) -> None:
    pipe = wan_pipeline()
    sites = ["blocks.0.attn2", "blocks.1.attn2"]
    log = SdpaLog(pipe.transformer, sites)
    rec = attnmap.capture(
        pipe, prompt="a (red) ball and a (dog)", branch="both", store=tmp_path, video_id="v0"
    )
    assert rec.prompt == "a red ball and a dog"
    assert rec.targets == {"red": [1], "dog": [5]}
    with rec, log:
        pipe(
            rec.prompt, num_frames=9, height=32, width=32, num_inference_steps=2, guidance_scale=5.0,
            callback_on_step_end=rec.callback, output_type="pt",
        )  # fmt: skip
    log.close()
    assert rec.steps == [0, 1]
    assert len(log.calls) == 2 * 2 * 2  # steps x branches (separate forwards, cond first) x blocks
    for step in range(2):
        calls = log.calls[4 * step : 4 * step + 2]  # the cond forward
        cross = torch.stack([eager_probs(q, k, m, s).mean(1) for _, q, k, m, s in calls]).mean(0)
        want = cross[..., 1].reshape(1, 3, 2, 2)
        close(f"red step {step}", rec.get("token/red", step=step), want)
        # the negative prompt ("") holds no target word: its branch has no word map, only its padding
        with pytest.raises(ValueError, match="no map 'token/red'"):
            rec.get("token/red", step=step, branch="uncond")
        calls = log.calls[4 * step + 2 : 4 * step + 4]
        uncond = torch.stack([eager_probs(q, k, m, s).mean(1) for _, q, k, m, s in calls]).mean(0)
        close(
            f"uncond padding {step}",
            rec.get("padding", step=step, branch="uncond"),
            uncond[..., 1:].sum(-1).reshape(1, 3, 2, 2),
        )
    assert rec.metadata["rows"] == {
        "cond": [{"prompt": "a red ball and a dog", "text_len": 7, "targets": {"red": [1], "dog": [5]}}],
        "uncond": [{"prompt": "", "text_len": 1, "targets": {}}],
    }
    store = open_store(tmp_path)
    assert store.steps("v0") == [0, 1] and store.is_complete("v0")
    stored = torch.from_numpy(store.load("v0", "token/red", step=1))
    close("stored red", stored, rec.get("token/red", step=1)[0], 1e-3)
    assert "uncond/padding" in store.names("v0", step=0) and "uncond/token/red" not in store.names(
        "v0", step=0
    )
    meta = store.metadata("v0")
    assert meta["targets"] == {"red": [1], "dog": [5]} and meta["grid"] == [3, 2, 2]
    assert meta["video"] == {"fps": None, "frames": 9, "height": 32, "width": 32}  # what the pipeline made
    assert meta["vae_stride"] == [4, 8, 8] and meta["patch_size"] == [1, 2, 2] and meta["branch"] == "both"


def test_cogvideox_pipeline_batched_cfg_keeps_the_cond_half() -> None:
    pipe = cogvideox_pipeline()
    log = SdpaLog(pipe.transformer, ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"])
    with attnmap.capture(pipe, prompt="the (dog) runs", reductions=("cross", "temporal")) as rec, log:
        pipe(
            rec.prompt, num_frames=9, height=32, width=32, num_inference_steps=2, guidance_scale=5.0,
            max_sequence_length=16, callback_on_step_end=rec.callback, output_type="pt",
        )  # fmt: skip
    log.close()
    assert rec.steps == [0, 1]
    lay = Layout.joint(16, (3, 2, 2))
    for step in range(2):
        calls = log.calls[2 * step : 2 * step + 2]
        assert calls[0][1].shape[0] == 2  # batched [uncond, cond]
        maps = [maps_of(eager_probs(q, k, m, s)[1:], lay) for _, q, k, m, s in calls]
        want = torch.stack([m["cross"][..., 1] for m in maps]).mean(0).reshape(1, 3, 2, 2)
        close(f"dog step {step}", rec.get("token/dog", step=step), want)
        want_t = torch.stack([m["temporal"] for m in maps]).mean(0)
        close(f"temporal step {step}", rec.get("temporal", step=step), want_t)


def test_pipeline_output_is_unchanged_by_capture() -> None:
    pipe = wan_pipeline()
    args = {"num_frames": 9, "height": 32, "width": 32, "num_inference_steps": 2, "output_type": "pt"}
    plain = pipe("a red ball", generator=torch.Generator().manual_seed(0), **args).frames
    with attnmap.capture(pipe, targets=["ball"], prompt="a red ball") as rec:
        captured = pipe(
            "a red ball",
            generator=torch.Generator().manual_seed(0),
            callback_on_step_end=rec.callback,
            **args,
        ).frames
    assert torch.equal(plain, captured)
    assert rec.blocks == [0, 1]  # the text encoder's attention is not counted
    # CFG is on (guidance 5): by default only the conditional forwards are kept
    assert rec.branch == "cond" and rec.steps == [0, 1]
    with pytest.raises(
        ValueError, match="no map 'token/ball' recorded for step=None, block=None, branch='uncond'"
    ):
        rec.get("token/ball", branch="uncond")


# -- store, config, auto-render ----------------------------------------------------------------
def test_save_writes_every_step_and_the_aggregate(tmp_path: Any) -> None:
    model, kwargs = wan()
    with attnmap.capture(
        model, targets={"red": [1]}, reductions=("cross", "temporal"), per_block=True
    ) as rec:
        for _ in range(2):
            run(model, {**kwargs, "hidden_states": torch.randn_like(kwargs["hidden_states"])})
            rec.step()
    rec.save(tmp_path, "vid")
    store = open_store(tmp_path)
    assert store.steps("vid") == [0, 1]
    assert {"token/red", "token/red/block0", "token/red/block1", "temporal", "temporal/block1"} <= set(
        store.names("vid", step=0)
    )
    close(
        "block 1",
        torch.from_numpy(store.load("vid", "temporal/block1", step=0)),
        rec.get("temporal", step=0, block=1)[0],
        1e-3,
    )
    close("aggregate", torch.from_numpy(store.load("vid", "token/red")), rec.get("token/red")[0], 1e-3)


def test_config_auto_renders_each_video_into_its_folder(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Any, ...]] = []
    fake = types.ModuleType("attnmap.render.videos")
    fake.render_video = lambda root, vid, out, params: calls.append(("video", root, vid, out, params)) or []  # type: ignore[attr-defined]
    fake.render_store = lambda root, params: calls.append(("store", root, params)) or {}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "attnmap.render.videos", fake)
    cfg = Config.from_dict(
        {"auto_generate_per_video": True, "auto_generate_videos": True, "storage_dtype": "float32"}
    )
    model, kwargs = wan()
    with attnmap.capture(model, targets={"red": [1]}, store=tmp_path, video_id="clip 1", config=cfg):
        run(model, kwargs)
    from attnmap.store import video_dirname

    assert calls[0] == (
        "video",
        tmp_path,
        "clip 1",
        tmp_path / video_dirname("clip 1") / "attention_videos",
        cfg.visualization_params,
    )
    assert calls[1] == ("store", tmp_path, cfg.visualization_params)
    assert open_store(tmp_path).is_complete("clip 1")


# -- errors and clean-up -----------------------------------------------------------------------
def test_bad_input_is_refused_before_the_run() -> None:
    model, _ = wan()
    with pytest.raises(ValueError, match="target word 'cat' is not in the prompt"):
        attnmap.capture(model, prompt="a red ball", targets=["cat"], tokenizer=tokenizer())
    with pytest.raises(ValueError, match="has no attention module"):
        attnmap.capture(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="reductions \\['fancy'\\] are unknown"):
        attnmap.capture(model, reductions=("fancy",))
    with pytest.raises(ValueError, match="branch must be one of"):
        attnmap.capture(model, branch="left")
    with pytest.raises(ValueError, match="store= needs video_id="):
        attnmap.capture(model, store="x")


class Attn(torch.nn.Module):
    """An attention module attnmap knows nothing about: 2 heads of 4 over [B, N, 8] tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x.unflatten(-1, (2, 4)).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q).transpose(1, 2).flatten(2)


def test_a_layout_that_does_not_fit_warns_once_per_module_with_its_name() -> None:
    model = torch.nn.Sequential(Attn(), Attn())
    with pytest.warns(UserWarning) as caught:
        with attnmap.capture(model, layout=Layout.self_attn((1, 3, 3))) as rec:
            with torch.no_grad():
                model(torch.randn(1, 8, 8))
                model(torch.randn(1, 8, 8))
    messages = sorted(str(w.message) for w in caught)
    assert messages == [
        f"attnmap.capture: skipping the attention of module '{i}': layout Layout.self_attn(grid=(1, 3, 3), "
        "prefix=0) expects 9 queries and 9 keys, the call has 8 and 8"
        for i in (0, 1)
    ]  # once per module, not once per call
    assert rec.steps == []


def test_one_layout_applies_to_the_calls_it_fits_and_the_others_are_inferred() -> None:
    model, kwargs = wan()
    log = SdpaLog(model, ["blocks.0.attn1", "blocks.0.attn2", "blocks.1.attn1", "blocks.1.attn2"])
    with attnmap.capture(model, layout=Layout.self_attn(GRID), reductions=("cross", "temporal")) as rec, log:
        run(model, kwargs)
    log.close()
    self_calls = [c for c in log.calls if c[0].endswith("attn1")]
    cross_calls = [c for c in log.calls if c[0].endswith("attn2")]
    lay = Layout.self_attn(GRID)
    temporal = torch.stack(
        [maps_of(eager_probs(q, k, m, s), lay)["temporal"] for _, q, k, m, s in self_calls]
    )
    cross = torch.stack([eager_probs(q, k, m, s).mean(1) for _, q, k, m, s in cross_calls])
    close("temporal from the given layout", rec.get("temporal"), temporal.mean(0))
    close("cross from the inferred one", rec.get("cross"), cross.mean(0))


class Block(torch.nn.Module):
    """A block that calls SDPA itself; its class name does not say attention."""

    forward = Attn.forward


@pytest.mark.parametrize("cls", [Attn, Block], ids=["attention-module", "any-module"])
def test_explicit_layout_on_an_unknown_module(cls: type[torch.nn.Module]) -> None:
    model = torch.nn.Sequential(cls(), cls())
    x = torch.randn(1, 8, 8)
    lay = Layout.self_attn((2, 2, 2))
    with attnmap.capture(model, layout=lay, reductions=("temporal",), per_block=True) as rec:
        with torch.no_grad():
            out = model(x)
    q0 = x.unflatten(-1, (2, 4)).transpose(1, 2)
    want = maps_of(eager_probs(q0, q0, None, None), lay)["temporal"]
    close("block 0", rec.get("temporal", block=0), want)
    assert rec.blocks == [0, 1] and torch.equal(out, model(x))
    bare = cls()  # a model that calls attention itself is watched as itself
    with torch.no_grad(), attnmap.capture(bare, layout=lay, reductions=("temporal",)) as alone:
        bare(x)
    close("the model itself", alone.get("temporal"), want)


def test_capture_warns_once_per_step_naming_the_module_with_nan() -> None:
    model = torch.nn.Sequential(Attn(), Attn())
    x = torch.randn(1, 8, 8)
    x[0, 3, 0] = float("nan")  # reaches the first module's q and k; its output carries NaN onwards
    with pytest.warns(UserWarning) as caught:
        with attnmap.capture(model, layout=Layout.self_attn((2, 2, 2)), reductions=("temporal",)) as rec:
            with torch.no_grad():
                model(x)
            rec.step()
            model(torch.randn(1, 8, 8))  # a clean step: no warning
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "step 0" in messages[0] and "module(s) '0', '1' got NaN or inf" in messages[0]
    assert rec.get("temporal", step=0).isnan().any() and not rec.get("temporal", step=1).isnan().any()


def test_explicit_layout_on_a_bare_attention_module() -> None:
    class SelfAttention(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, k)

    lay = Layout.cross((2, 2, 2), text=5)
    q, k = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 5, 8)
    with attnmap.capture(SelfAttention(), layout=lay, targets={"cat": [1, 2]}) as unwatched:
        SelfAttention()(q, k)  # another instance's call is not recorded
    assert unwatched.steps == []
    model = SelfAttention()
    with attnmap.capture(model, layout=lay, targets={"cat": [1, 2]}, keep_cross=True) as rec:
        model(q, k)
    cross = eager_probs(q, k, None, None).mean(1)
    close("cross", rec.get("cross"), cross)
    close("cat", rec.get("token/cat"), cross[..., 1:3].sum(-1).reshape(1, 2, 2, 2))
    assert rec.blocks == [0]


def test_hooks_and_mode_are_removed_on_exit_and_on_error_and_nesting_is_safe() -> None:
    model, kwargs = wan()
    sites = [model.blocks[0].attn1, model.blocks[1].attn2]
    stack_depth = torch._C._len_torch_function_stack()
    with pytest.raises(RuntimeError, match="boom"):
        with attnmap.capture(model):
            raise RuntimeError("boom")
    with attnmap.capture(model, reductions=("temporal",)) as outer:
        with attnmap.capture(model, reductions=("temporal",)) as inner:
            run(model, kwargs)
    # the outer capture reduces in one pass (it sees SDPA itself), the inner one in two
    close("nested", inner.get("temporal"), outer.get("temporal"), 1e-6)
    assert torch._C._len_torch_function_stack() == stack_depth
    for m in sites:
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert not model._forward_pre_hooks and "cache_context" not in model.__dict__


def test_wan_i2v_image_context_is_kept_apart_from_the_text() -> None:
    model, kwargs = wan(i2v=True)
    log = SdpaLog(model, ["blocks.0.attn2", "blocks.1.attn2"])
    with attnmap.capture(model, reductions=("cross",), targets={"red": [1]}, keep_cross=True) as rec, log:
        run(model, kwargs)
    log.close()
    assert [k.shape[2] for _, _, k, _, _ in log.calls] == [6, 512, 6, 512]  # image call first, then text
    image = torch.stack([eager_probs(q, k, m, s).mean(1) for _, q, k, m, s in log.calls[0::2]]).mean(0)
    text = torch.stack([eager_probs(q, k, m, s).mean(1) for _, q, k, m, s in log.calls[1::2]]).mean(0)
    close("image cross", rec.get("image/cross"), image)
    close("text cross", rec.get("cross"), text)
    close("red", rec.get("token/red"), text[..., 1].reshape(1, *GRID))


def test_per_head_keeps_heads_after_the_batch_dim() -> None:
    model, kwargs = cogvideox()
    log = SdpaLog(model, ["transformer_blocks.0.attn1"])
    with attnmap.capture(model, reductions=("temporal", "text"), per_head=True, blocks=[0]) as rec, log:
        run(model, kwargs)
    log.close()
    _, q, k, m, s = log.calls[0]
    p = eager_probs(q, k, m, s)  # [1, 2, 64, 64], text first
    pv = p[:, :, 16:, 16:].reshape(1, 2, 3, 16, 3, 16).sum(-1).mean(3)
    close("temporal per head", rec.get("temporal"), pv)
    close("text per head", rec.get("text"), p[:, :, :16, :16])


def test_memory_holds_only_the_per_step_maps_on_the_cpu() -> None:
    model, kwargs = wan()
    with attnmap.capture(model, targets={"red": [1], "ball": [2]}) as rec:
        sizes = []
        for _ in range(3):
            run(model, kwargs)
            rec.step()
            sizes.append(rec.nbytes)
    # per step: two token maps [1, 3, 4, 4] and temporal [1, 3, 3], float32; nothing else grows
    one_step = (2 * 48 + 9) * 4
    assert sizes == [one_step, 2 * one_step, 3 * one_step]
    assert rec.names == ["temporal", "token/ball", "token/red"]
    assert all(slot.total.device.type == "cpu" for slot in rec._acc._maps.values())


def test_a_pipeline_that_never_encodes_the_prompt_warns_that_targets_may_not_match() -> None:
    pipe = wan_pipeline()
    args = {"num_frames": 9, "height": 32, "width": 32, "num_inference_steps": 1, "output_type": "pt"}
    with pytest.warns(UserWarning, match=r"never saw the tokens of 'a red ball'.*pass rec.prompt"):
        with attnmap.capture(pipe, prompt="a (red) ball") as rec:
            pipe("the dog runs", **args)
    assert rec.targets == {"red": [1]}


def test_a_forward_that_fails_inside_attention_leaves_the_capture_usable() -> None:
    model, kwargs = wan()
    attn = model.blocks[1].attn2
    processor = attn.processor

    def boom(*args: Any, **kw: Any) -> None:
        raise RuntimeError("boom")

    with attnmap.capture(model, reductions=("temporal",)) as rec:
        attn.processor = boom
        with pytest.raises(RuntimeError, match="boom"):
            run(model, kwargs)  # fails inside a watched attention module
        attn.processor = processor
        assert not rec._stack
        rec.step()
        run(model, kwargs)
    with attnmap.capture(model, reductions=("temporal",)) as again:  # repeated use
        run(model, kwargs)
    close("after a failed forward", rec.get("temporal", step=1), again.get("temporal"), 0)
    with pytest.raises(RuntimeError, match="already open"):
        with again, again:
            pass


def test_a_capture_that_ends_by_an_exception_keeps_its_steps_and_frees_the_video_id(tmp_path: Any) -> None:
    model, kwargs = wan()
    with pytest.raises(RuntimeError, match="interrupted"):
        with attnmap.capture(model, targets={"red": [1]}, store=tmp_path, video_id="v") as rec:
            run(model, kwargs)
            rec.step()  # step 0 is written
            run(model, kwargs)
            raise RuntimeError("interrupted")  # during step 1, e.g. a KeyboardInterrupt
    store = open_store(tmp_path)
    assert store.steps("v") == [0] and not store.is_complete("v")
    torch.testing.assert_close(
        torch.from_numpy(store.load("v", "token/red", 0)),
        rec.get("token/red", step=0)[0],
        rtol=1e-3,
        atol=1e-6,
    )
    with attnmap.capture(model, targets={"red": [1]}, store=tmp_path, video_id="v"):  # the lock was dropped
        run(model, kwargs)
    assert open_store(tmp_path).is_complete("v")


def test_config_without_aggregated_maps_keeps_only_the_steps(tmp_path: Any) -> None:
    cfg = Config.from_dict({"store_aggregated_attention": False, "store_per_block": True})
    model, kwargs = wan()
    with attnmap.capture(model, targets={"red": [1]}, store=tmp_path, video_id="v", config=cfg) as rec:
        run(model, kwargs)
    store = open_store(tmp_path)
    assert store.is_complete("v") and store.steps("v") == [0]
    assert "token/red/block1" in store.names("v", step=0)  # store_per_block from the config
    assert rec.per_block
    with pytest.raises(KeyError, match="token/red"):
        store.load("v", "token/red")


def test_cogvideox_pipeline_uncond_branch_keeps_the_uncond_half_and_the_video_size() -> None:
    pipe = cogvideox_pipeline()
    log = SdpaLog(pipe.transformer, ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"])
    with (
        attnmap.capture(pipe, prompt="the (dog) runs", reductions=("temporal",), branch="uncond") as rec,
        log,
    ):
        pipe(
            rec.prompt, num_frames=9, height=32, width=32, num_inference_steps=2, guidance_scale=5.0,
            max_sequence_length=16, callback_on_step_end=rec.callback, output_type="pt",
        )  # fmt: skip
    log.close()
    lay = Layout.joint(16, (3, 2, 2))
    for step in range(2):
        calls = log.calls[2 * step : 2 * step + 2]
        probs = [eager_probs(q, k, m, s) for _, q, k, m, s in calls]  # batched [uncond, cond]
        uncond = torch.stack([maps_of(p[:1], lay)["temporal"] for p in probs]).mean(0)
        cond = torch.stack([maps_of(p[1:], lay)["temporal"] for p in probs]).mean(0)
        close(f"uncond temporal step {step}", rec.get("temporal", step=step), uncond)
        assert (uncond - cond).abs().max() > 1e-4  # the halves differ, so the test tells them apart
    with pytest.raises(
        ValueError, match="no map 'temporal' recorded for step=None, block=None, branch='cond'"
    ):
        rec.get("temporal", branch="cond")  # only the uncond branch was kept
    # the pixel size the latents decode to, through the pipeline's VAE strides
    assert rec.metadata["video"] == {"fps": None, "frames": 9, "height": 32, "width": 32}


def test_blocks_steps_and_layout_names_are_checked_before_the_run() -> None:
    model, _ = wan()
    with pytest.raises(
        ValueError, match=r"blocks \[2, 7\] are not blocks of the model; its attention blocks are 0..1"
    ):
        attnmap.capture(model, blocks=[0, 2, 7])
    with pytest.raises(ValueError, match="steps must be indices >= 0 \\(or None for all\\), got -1"):
        attnmap.capture(model, steps=[0, -1])
    with pytest.raises(ValueError, match="blocks must be indices >= 0 \\(or None for all\\), got 'x'"):
        attnmap.capture(model, blocks=["x"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"layout names modules \['blocks.9.attn1'\] that are not attention"):
        attnmap.capture(model, layout={"blocks.9.attn1": Layout.self_attn(GRID)})
    with pytest.raises(ValueError, match=r"layout\['blocks.0.attn1'\] must be an attnmap.Layout, got str"):
        attnmap.capture(model, layout={"blocks.0.attn1": "self"})  # type: ignore[dict-item]
    assert attnmap.capture(model, blocks=range(2), steps=3)._steps == {3}


def test_one_video_id_per_batch_row(tmp_path: Any) -> None:
    model, kwargs = wan()
    kwargs = {
        **kwargs,
        "hidden_states": torch.randn(2, 4, 3, 8, 8),
        "encoder_hidden_states": torch.randn(2, 16, 32),
        "timestep": torch.tensor([500, 500]),
    }
    with attnmap.capture(model, targets={"red": [1]}, store=tmp_path, video_id=["a", "b"]) as rec:
        run(model, kwargs)
    store = open_store(tmp_path)
    for row, vid in enumerate(("a", "b")):
        stored = torch.from_numpy(store.load(vid, "token/red", step=0))
        close(f"row {row}", stored, rec.get("token/red")[row], 1e-3)
    assert not torch.allclose(rec.get("token/red")[0], rec.get("token/red")[1])
    with pytest.raises(ValueError, match=r"video_id gives 1 id\(s\) \['c'\] but the model ran 2 video\(s\)"):
        with attnmap.capture(model, targets={"red": [1]}, store=tmp_path, video_id="c"):
            run(model, kwargs)
    rec.save(tmp_path / "saved", video_id="b", batch_index=1)
    close("saved row 1", torch.from_numpy(open_store(tmp_path / "saved").load("b", "token/red", step=0)),
          rec.get("token/red")[1], 1e-3)  # fmt: skip
    with pytest.raises(ValueError, match=r"batch_index must be an int in \[0, 2\)"):
        rec.save(tmp_path / "saved", video_id="c", batch_index=2)


def test_metadata_video_path_lets_auto_render_overlay_the_exported_video(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from attnmap.render.videos import known_original

    found: list[Any] = []
    fake = types.ModuleType("attnmap.render.videos")
    fake.render_video = lambda root, vid, out, params: (
        found.append(known_original(open_store(root), vid)) or []
    )  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "attnmap.render.videos", fake)
    pipe = wan_pipeline()
    cfg = Config.from_dict({"auto_generate_per_video": True})
    meta = {"video": {"path": "videos/v0.mp4", "fps": 16}}
    with attnmap.capture(
        pipe, prompt="a (red) ball", store=tmp_path, video_id="v0", config=cfg, metadata=meta
    ) as rec:
        pipe(rec.prompt, num_frames=9, height=32, width=32, num_inference_steps=1, output_type="pt",
             callback_on_step_end=rec.callback)  # fmt: skip
        (tmp_path / "videos").mkdir()
        (tmp_path / "videos" / "v0.mp4").write_bytes(b"exported inside the with block")
    assert found == [tmp_path / "videos" / "v0.mp4"]
    video = open_store(tmp_path).metadata("v0")["video"]
    assert video == {"fps": 16, "frames": 9, "height": 32, "width": 32, "path": "videos/v0.mp4"}


@pytest.mark.parametrize(("outer_one_pass", "inner_one_pass"), [(False, True), (True, False), (True, True)])
def test_nested_captures_both_record_in_either_mode(
    outer_one_pass: bool, inner_one_pass: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import attnmap.reduce

    one_pass_calls: list[int] = []
    sdpa_with_lse = attnmap.reduce.sdpa_with_lse
    monkeypatch.setattr(
        attnmap.reduce, "sdpa_with_lse", lambda *a, **k: one_pass_calls.append(1) or sdpa_with_lse(*a, **k)
    )
    model, kwargs = wan()
    plain = run(model, kwargs)
    lay = Layout.self_attn(GRID)
    log = SdpaLog(model, ["blocks.0.attn1", "blocks.1.attn1"])
    with log:
        run(model, kwargs)
    log.close()
    want = torch.stack(
        [maps_of(eager_probs(q, k, m, s), lay)["temporal"] for _, q, k, m, s in log.calls]
    ).mean(0)
    with (
        attnmap.capture(model, reductions=("temporal",), one_pass=outer_one_pass) as outer,
        attnmap.capture(model, reductions=("temporal",), one_pass=inner_one_pass) as inner,
    ):
        captured = run(model, kwargs)
    assert torch.equal(plain, captured)
    # only the capture opened first may take the one-pass path (what it calls is no SDPA call to
    # those opened after it)
    assert len(one_pass_calls) == (4 if outer_one_pass else 0)  # attn1 and attn2 of 2 blocks
    close("outer", outer.get("temporal"), want)
    close("inner", inner.get("temporal"), want)
    # a user's function mode, entered before or after, still sees the SDPA calls: no one-pass then
    for before in (True, False):
        user = SdpaLog(model, ["blocks.0.attn1", "blocks.1.attn1"])
        rec = attnmap.capture(model, reductions=("temporal",), one_pass=True)
        first, second = (user, rec) if before else (rec, user)
        with first, second:
            run(model, kwargs)
        user.close()
        assert len(user.calls) == 2 and len(one_pass_calls) == (4 if outer_one_pass else 0)
        close("beside a mode", rec.get("temporal"), want)
