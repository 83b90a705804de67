"""Every video transformer of the installed diffusers, built from tiny configs, captured by default.

For each family: the output with capture is bit-identical to the output without; every block's
cross and temporal maps equal an independent float64 softmax of the q and k the attention entry
point saw (logged here by this module's own hooks, at diffusers' dispatcher and at torch SDPA), laid
out by hand from what the family's code does; the temporal rows of self-attention sum to 1. The
same for the flex backend.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest
import torch

import attnmap
from tiny_models import VIDEO_TRANSFORMERS, AttentionLog, sana_wm_refiner, softmax64

pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning",
    "ignore::DeprecationWarning",
    "ignore:In CPU autocast:UserWarning",
    "ignore:flex_attention called without torch.compile:UserWarning",  # families that run flex themselves
)

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class Want:
    """What one watched module's calls are, written from the family's code.

    kind: ``self`` (video tokens after ``prefix`` others), ``cross`` (video queries, the prompt's text
    at ``text`` = (start, length) among the keys; ``group`` for another context), ``joint`` (video
    and ``other`` tokens, the text at ``text`` among them; ``text_first``; ``pre`` history tokens before
    the video), ``space`` (frames in the batch, cross to text), ``time`` (positions in the batch).
    """

    kind: str
    block: Callable[[int], int] = lambda i: i
    prefix: int = 0
    text: tuple[int, int] = (0, 0)
    group: str = ""
    text_first: bool = True
    pre: int = 0
    image: int = 0  # a call with this many keys is the image context (group image/)


def wan_like(text: int, image: int = 0) -> list[tuple[str, Want]]:
    return [
        (r"^blocks\.(\d+)\.attn1$", Want("self")),
        (r"^blocks\.(\d+)\.attn2$", Want("cross", text=(image, text))),
    ]


def self_cross(
    text: int, stack: str = "transformer_blocks", names: tuple[str, str] = ("attn1", "attn2")
) -> list[tuple[str, Want]]:
    return [
        (rf"^{stack}\.(\d+)\.{names[0]}$", Want("self")),
        (rf"^{stack}\.(\d+)\.{names[1]}$", Want("cross", text=(0, text))),
    ]


def dual_single(
    layers: int,
    text: tuple[int, int],
    dual: str = "transformer_blocks",
    single: str = "single_transformer_blocks",
) -> list[tuple[str, Want]]:
    return [
        (rf"^{dual}\.(\d+)\.attn$", Want("joint", text=text, text_first=False)),
        (rf"^{single}\.(\d+)\.attn$", Want("joint", text=text, text_first=False, block=lambda i: layers + i)),
    ]


#: family -> (grid, real text tokens per row, [(site regex with the block index as group 1, Want)])
FAMILIES: dict[str, tuple[Grid, list[int], list[tuple[str, Want]]]] = {
    "wan": ((3, 4, 4), [16], wan_like(16)),
    "wan-i2v": (
        (3, 4, 4),
        [512],
        [
            (r"^blocks\.(\d+)\.attn1$", Want("self")),
            (r"^blocks\.(\d+)\.attn2$", Want("cross", text=(0, 512), image=6)),
        ],
    ),
    "wan2.2-ti2v": ((2, 4, 4), [12], wan_like(12)),
    "wan-vace": (
        (2, 4, 4),
        [12],
        [
            *wan_like(12),
            (r"^vace_blocks\.(\d+)\.attn1$", Want("self", block=lambda i: 2 + i)),
            (r"^vace_blocks\.(\d+)\.attn2$", Want("cross", text=(0, 12), block=lambda i: 2 + i)),
        ],
    ),
    # attn2 keys: [image (12), text (512)]; face adapters: each frame's tokens to its 3 motion tokens
    "wan-animate": (
        (21, 4, 4),
        [512],
        [
            (r"^blocks\.(\d+)\.attn1$", Want("self")),
            (r"^blocks\.(\d+)\.attn2$", Want("cross", text=(12, 512))),
            (
                r"^face_adapter\.(\d+)$",
                Want("space", text=(0, 3), group="face_adapter/", block=lambda i: 2 + i),
            ),
        ],
    ),
    "skyreels-v2": ((2, 4, 4), [12], wan_like(12)),
    "chronoedit": ((2, 4, 4), [12], wan_like(12)),
    "anyflow": ((2, 4, 4), [12], wan_like(12)),
    # history: 1 short frame at (1, 2, 2) patches = 16, 1 mid at (2, 4, 4) = 4, 4 long at (4, 8, 8) = 1
    "helios": (
        (2, 4, 4),
        [12],
        [
            (r"^blocks\.(\d+)\.attn1$", Want("self", prefix=21)),
            (r"^blocks\.(\d+)\.attn2$", Want("cross", text=(0, 12))),
        ],
    ),
    "cogvideox": ((3, 4, 4), [16], [(r"^transformer_blocks\.(\d+)\.attn1$", Want("joint", text=(0, 16)))]),
    "cogvideox1.5": ((2, 4, 4), [8], [(r"^transformer_blocks\.(\d+)\.attn1$", Want("joint", text=(0, 8)))]),
    "consisid": ((2, 4, 4), [8], [(r"^transformer_blocks\.(\d+)\.attn1$", Want("joint", text=(0, 8)))]),
    "easyanimate": ((2, 4, 4), [16], [(r"^transformer_blocks\.(\d+)\.attn1$", Want("joint", text=(0, 16)))]),
    "hunyuanvideo": ((3, 4, 4), [9], dual_single(2, (0, 12))),
    "hunyuanvideo-i2v": ((2, 4, 4), [12], dual_single(1, (0, 12))),
    # context [valid image (none: t2v), valid byT5 (3), valid text (4), padding]: the text at 3..7
    "hunyuanvideo1.5": (
        (2, 4, 4),
        [4],
        [(r"^transformer_blocks\.(\d+)\.attn$", Want("joint", text=(3, 6), text_first=False))],
    ),
    # [history 4x (1), 2x (2), clean (8), video (12), image (12), text (12)]
    "hunyuanvideo-framepack": (
        (3, 2, 2),
        [12],
        [
            (r"^transformer_blocks\.(\d+)\.attn$", Want("joint", text=(12, 12), text_first=False, pre=11)),
            (
                r"^single_transformer_blocks\.(\d+)\.attn$",
                Want("joint", text=(12, 12), text_first=False, pre=11, block=lambda i: 1 + i),
            ),
        ],
    ),
    "mochi": (
        (2, 4, 4),
        [16, 10],
        [(r"^transformer_blocks\.(\d+)\.attn1$", Want("joint", text=(0, 16), text_first=False))],
    ),
    "motif-video": ((3, 4, 4), [12], dual_single(1, (0, 12))),
    "allegro": ((2, 4, 4), [16], self_cross(16)),
    "cosmos": ((2, 4, 4), [9], self_cross(12)),
    "kandinsky5": (
        (2, 4, 4),
        [8],
        self_cross(8, "visual_transformer_blocks", ("self_attention", "cross_attention")),
    ),
    "ltx": ((3, 8, 8), [9], self_cross(12)),
    "ltx2": (
        (2, 4, 4),
        [16],
        [
            (r"^transformer_blocks\.(\d+)\.attn1$", Want("self")),
            (r"^transformer_blocks\.(\d+)\.attn2$", Want("cross", text=(0, 16))),
            (r"^transformer_blocks\.(\d+)\.audio_to_video_attn$", Want("cross", text=(0, 9), group="audio/")),
        ],
    ),
    "sana-video": ((2, 4, 4), [12], [(r"^transformer_blocks\.(\d+)\.attn2$", Want("cross", text=(0, 12)))]),
    "latte": (
        (2, 4, 4),
        [8],
        [
            (r"^transformer_blocks\.(\d+)\.attn2$", Want("space", text=(0, 8))),
            (r"^temporal_transformer_blocks\.(\d+)\.attn1$", Want("time", block=lambda i: 1 + i)),
        ],
    ),
    # per block: the main and camera branches of attn (linear in block 0, softmax SDPA in block 1), cross_attn
    "sana-wm": (
        (2, 4, 4),
        [9],
        [
            (r"^blocks\.(\d+)\.attn\.(?:attn|cam_attn)$", Want("self")),
            (r"^blocks\.(\d+)\.cross_attn$", Want("cross", text=(0, 12))),
        ],
    ),
    "joyimage-edit": (
        (2, 4, 4),
        [12],
        [(r"^double_blocks\.(\d+)\.attn$", Want("joint", text=(0, 12), text_first=False))],
    ),
    # per fused block: video self, video -> text (6 of 8 real), video -> audio (9); the audio
    # stream's own self, text and video calls have audio queries
    "kandinsky6": (
        (2, 4, 4),
        [6],
        [
            (r"^visual_transformer_blocks\.(\d+)\.video_dec_block\.self_attention$", Want("self")),
            (
                r"^visual_transformer_blocks\.(\d+)\.video_dec_block\.cross_attention$",
                Want("cross", text=(0, 8)),
            ),
            (
                r"^visual_transformer_blocks\.(\d+)\.va_cross_attention$",
                Want("cross", text=(0, 9), group="audio/"),
            ),
        ],
    ),
    "kandinsky6-sr": (
        (2, 8, 8),
        [0],
        [(r"^visual_transformer_blocks\.(\d+)\.self_attention$", Want("self"))],
    ),
    # attn1: chunk-causal flex attention under a BlockMask (no key-padding mask): capture warns, reads attn2
    "anyflow-far": ((2, 4, 4), [12], [(r"^blocks\.(\d+)\.attn2$", Want("cross", text=(0, 12)))]),
    # cross_attn: the text padded to 16 (8 real), then the 4 CLIP tokens in a call of their own
    "wan-animate-2": (
        (2, 4, 4),
        [8],
        [
            (r"^blocks\.(\d+)\.self_attn$", Want("self")),
            (r"^blocks\.(\d+)\.cross_attn$", Want("cross", text=(0, 16), image=4)),
        ],
    ),
    # one joint call per block over [text (4), audio (6), video]; the token refiner's calls hold no video
    "minimax-h3": (
        (2, 4, 4),
        [4],
        [(r"^transformer_blocks\.(\d+)\.attn$", Want("joint", text=(0, 4)))],
    ),
}
#: families whose capture warns, and what the warning must say
WARNS = {"sana-video": r"2 watched attention module\(s\) of SanaVideoTransformer3DModel ran but produced no map: "
         r"'transformer_blocks.0.attn1', 'transformer_blocks.1.attn1'.*linear attention",
         "sana-wm": r"2 watched attention module\(s\) of SanaWMTransformer3DModel ran but produced no map: "
         r"'blocks.0.attn.attn', 'blocks.0.attn.cam_attn'.*2 of them compute linear attention.*to read$",
         "anyflow-far": r"'blocks\.\d\.attn1': its mask \(diffusers:flex\) is not a tensor attnmap can read"}  # fmt: skip


def test_every_video_transformer_of_diffusers_has_a_tiny_model_here() -> None:
    import diffusers

    names = {n for n in dir(diffusers) if n.endswith("Transformer3DModel")}
    built = {type(build()[0]).__name__ for build in VIDEO_TRANSFORMERS.values()}
    built.add(type(sana_wm_refiner()[0]).__name__)  # no grid in its inputs: tested with a layout below
    # not built: JoyImage Edit Plus is no video: a flat list of patches [B, N, C, pt, ph, pw] of images
    # each of its own size (shape_list). diffusers has no Cosmos3Transformer3DModel: Cosmos 3 is
    # Cosmos3OmniTransformer, one packed sequence (no batch) of causal text then video, sound and action
    # tokens, whose video comes as lists of latents and grid shapes
    later = {"JoyImageEditPlusTransformer3DModel"}
    assert names - later <= built, f"video transformers without a tiny model: {sorted(names - later - built)}"
    assert set(FAMILIES) == set(VIDEO_TRANSFORMERS)


def temporal_of(pv: torch.Tensor, grid: Grid) -> torch.Tensor:
    """[B, H, Nv, Nv] video-to-video probabilities -> [B, F, F]: mass from frame i to frame j, mean
    over frame i's tokens and the heads."""
    f, hw = grid[0], grid[1] * grid[2]
    return pv.reshape(*pv.shape[:2], f, hw, f, hw).sum(-1).mean(3).mean(1)


def own_text(cross: torch.Tensor, reals: list[int]) -> torch.Tensor:
    """Each row's cross map over its own real text tokens, the columns past them NaN (as wide as the
    longest)."""
    out = cross[..., : max(reals)].clone()
    for i, n in enumerate(reals if len(reals) == out.shape[0] else reals[:1] * out.shape[0]):
        out[i, ..., n:] = float("nan")
    return out


def expected_maps(
    want: Want, grid: Grid, real: list[int], p: torch.Tensor, row: Optional[int]
) -> dict[str, torch.Tensor]:
    """The cross / temporal maps of one call with probabilities ``p``, laid out as ``want`` says."""
    nv = grid[0] * grid[1] * grid[2]
    out: dict[str, torch.Tensor] = {}
    start, length = want.text
    reals = real if row is None else [real[row]]
    if want.kind == "self":
        out["temporal"] = temporal_of(p[:, :, want.prefix :, want.prefix :], grid)
        if want.prefix == 0:
            assert torch.allclose(out["temporal"].sum(-1), torch.ones(1, dtype=torch.float64))
    elif want.kind == "cross" and p.shape[-1] == want.image:
        out["image/cross"] = p.mean(1)
    elif want.kind == "cross":
        cross = p[..., start : start + length].mean(1)  # [B, Nv, Nt]
        out[want.group + "cross"] = own_text(cross, reals) if want.group == "" else cross
    elif want.kind == "joint":
        if want.pre:  # [history, video, rest] -> [video, rest, history]
            p = torch.cat([p[:, :, want.pre :], p[:, :, : want.pre]], dim=2)
            p = torch.cat([p[..., want.pre :], p[..., : want.pre]], dim=3)
        other = p.shape[-1] - nv
        v = slice(other, other + nv) if want.text_first else slice(0, nv)
        t0 = 0 if want.text_first else nv
        text = slice(t0 + start, t0 + start + (length if row is None else min(length, p.shape[-1] - nv)))
        out["cross"] = own_text(p[:, :, v, text].mean(1), reals)
        out["temporal"] = temporal_of(p[:, :, v, v], grid)
    elif want.kind == "space":  # rows (batch, frame) of H*W queries
        cross = p[..., start : start + length].mean(1)  # [B*F, HW, Nt]
        out[want.group + "cross"] = cross.reshape(-1, nv, cross.shape[-1])
    elif want.kind == "time":  # rows (batch, position) of F queries
        t = p.mean(1)  # [B*HW, F, F]
        out["temporal"] = t.reshape(-1, grid[1] * grid[2], grid[0], grid[0]).mean(1)
        assert torch.allclose(out["temporal"].sum(-1), torch.ones(1, dtype=torch.float64))
    return out


def watched(model: torch.nn.Module, family: str) -> dict[str, tuple[int, Want]]:
    rules = FAMILIES[family][2]
    found = {}
    for name, _ in model.named_modules():
        for rx, want in rules:
            m = re.match(rx, name)
            if m:
                found[name] = (want.block(int(m.group(1))), want)
    assert found, f"{family}: no module matches the table"
    return found


def run(model: torch.nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**kwargs)
    if isinstance(out, torch.Tensor):
        return out
    out = out[0] if isinstance(out, (tuple, list)) else out.sample
    return torch.stack(out) if isinstance(out, list) else out  # one sample per input latent (Wan-Animate-2)


def close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float = 2e-6) -> None:
    """Equal within ``atol``, NaN where the reference is NaN (the columns past a row's text)."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaN at other places than the reference's"
    err = (got.double() - want.double()).nan_to_num(nan=0.0).abs().max().item()
    assert err <= atol, f"{name}: max abs error {err:.3g} > {atol}"


def check_family(family: str, backend: Optional[str]) -> None:
    grid, real, _ = FAMILIES[family]
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    model, kwargs = VIDEO_TRANSFORMERS[family]()
    active = _AttentionBackendRegistry._active_backend  # set_attention_backend makes it process-wide
    if backend is not None:
        model.set_attention_backend(backend)
    try:
        plain = run(model, kwargs)
        sites = watched(model, family)
        log = AttentionLog(model, list(sites))
        expect = (
            pytest.warns(UserWarning, match=WARNS[family]) if family in WARNS else contextlib.nullcontext()
        )
        with log.dispatch(), expect:
            with (
                attnmap.capture(
                    model, reductions=("cross", "temporal"), per_block=True, keep_cross=True
                ) as rec,
                log,
            ):
                captured = run(model, kwargs)
        log.close()
    finally:
        if backend is not None:
            model.reset_attention_backend()
            _AttentionBackendRegistry.set_active_backend(active)
    assert torch.equal(plain, captured), f"{family}: capture changed the model output"
    batch = plain.shape[0]
    per_block: dict[tuple[str, int], list[torch.Tensor]] = {}
    rows_seen: dict[str, int] = {}
    for name, q, k, mask, scale in log.calls:
        block, want = sites[name]
        per_row = q.shape[0] == 1 and batch > 1 and want.kind not in ("space", "time")
        row = rows_seen.get(name, 0) % batch if per_row else None
        rows_seen[name] = rows_seen.get(name, 0) + 1
        for red, value in expected_maps(want, grid, real, softmax64(q, k, mask, scale), row).items():
            per_block.setdefault((red, block, row if row is not None else -1), []).append(value)
    assert per_block, f"{family}: the log saw no call"
    assert rec.blocks == sorted({b for _, b, _ in per_block}), f"{family}: blocks {rec.blocks}"
    for (red, block, row), values in per_block.items():
        want = torch.stack(values).mean(0)
        got = rec.get(red, block=block)
        if row >= 0:  # a call per batch row: its row of the map, padded to the longest text with NaN
            tail = got[row : row + 1, ..., want.shape[-1] :]
            got = got[row : row + 1, ..., : want.shape[-1]]
            assert tail.isnan().all(), f"{family} {red}: the columns past row {row}'s text must be NaN"
        close(f"{family} {red} block {block}", got, want)
    layouts = rec.metadata["layouts"]
    assert layouts and all(
        v["grid"][1:] == list(grid[1:]) or k in ("time", "space") for k, v in layouts.items()
    )
    assert rec.metadata["grid"] == list(grid)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_maps_equal_a_float64_softmax_of_what_the_entry_point_saw(family: str) -> None:
    check_family(family, None)


def test_kandinsky6_sr_tiles_are_read_in_frame_row_order() -> None:
    """Its tokens run 8 x 8 tile by tile: with 4 tiles a frame, the full map is the softmax of the
    q and k put back in frame, row order (diffusers' own tiling of the token indices)."""
    from diffusers.models.transformers.transformer_kandinsky6_sr import _local_patch

    model, kwargs = VIDEO_TRANSFORMERS["kandinsky6-sr"](size=16)
    grid = (2, 16, 16)
    tiled = _local_patch(torch.arange(512).reshape(grid), grid, (1, 8, 8)).flatten()
    name = "visual_transformer_blocks.0.self_attention"
    log = AttentionLog(model, [name])
    with log.dispatch(), attnmap.capture(model, reductions=("full",), per_block=True) as rec, log:
        run(model, kwargs)
    log.close()
    [(_, q, k, mask, scale)] = log.calls
    p = softmax64(q, k, mask, scale)[:, :, tiled.argsort()][..., tiled.argsort()].mean(1)
    close("kandinsky6-sr full block 0", rec.get("full", block=0), p)


def test_kandinsky6_sr_sparse_blocks_make_capture_warn() -> None:
    """A NABLA mask whose query tiles keep other key tiles (as at video sizes) is no key-padding
    mask: capture says so and makes no map."""
    model, kwargs = VIDEO_TRANSFORMERS["kandinsky6-sr"](size=16, sparse=True)
    site = r"'visual_transformer_blocks\.[01]\.self_attention': its mask \(diffusers:flex\) is not a tensor"
    with pytest.warns(UserWarning, match=site), attnmap.capture(model) as rec:
        run(model, kwargs)
    assert rec.blocks == []


FLEX = ["wan", "ltx", "hunyuanvideo", "helios", "ltx2"]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")
@pytest.mark.parametrize("family", FLEX)
def test_flex_backend_is_seen_at_the_dispatcher(family: str) -> None:
    pytest.importorskip("torch.nn.attention.flex_attention")
    check_family(family, "flex")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")
def test_a_backend_set_process_wide_by_another_model_is_still_seen() -> None:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    other, _ = VIDEO_TRANSFORMERS["wan"]()
    model, kwargs = VIDEO_TRANSFORMERS["wan"](seed=1)
    other.set_attention_backend("flex")  # diffusers also makes it the process' active backend
    try:
        with attnmap.capture(model) as rec:
            run(model, kwargs)
    finally:
        other.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(active)
    assert rec.metadata["entry_points"] == ["diffusers:flex"]
    assert rec.names == ["cross", "temporal"] and rec.blocks == [0, 1]


def test_a_transformer_whose_inputs_give_no_grid_is_warned_then_read_with_a_layout() -> None:
    """SANA-WM's refiner takes pre-packed tokens and a rotary embedding built by its caller: capture says
    that no grid came from the inputs and asks for ``layout=``; given one per attention module, its
    temporal and cross maps equal the float64 softmax of what the entry point saw."""
    grid = (2, 4, 4)
    model, kwargs = sana_wm_refiner()
    plain = run(model, kwargs)
    with pytest.warns(UserWarning) as caught, attnmap.capture(model) as rec:
        run(model, kwargs)
    said = [str(w.message) for w in caught]
    assert all(m.startswith("attnmap.capture: ") for m in said), said
    assert any(
        "'transformer_blocks.0.attn1': the model's forward inputs gave no video grid" in m
        and "pass layout=" in m
        for m in said
    ), said
    assert rec.names == []
    sites = {
        n: n.endswith("attn1")
        for n, _ in model.named_modules()
        if re.fullmatch(r"transformer_blocks\.\d\.attn[12]", n)
    }
    layouts = {
        n: attnmap.Layout.self_attn(grid=grid) if is_self else attnmap.Layout.cross(grid=grid, text=6)
        for n, is_self in sites.items()
    }
    log = AttentionLog(model, list(sites))
    with log.dispatch():
        with attnmap.capture(model, layout=layouts, keep_cross=True) as rec, log:
            captured = run(model, kwargs)
    log.close()
    assert torch.equal(captured, plain)
    assert sorted(name for name, *_ in log.calls) == sorted(sites)
    probs = {name: softmax64(q, k, mask, scale) for name, q, k, mask, scale in log.calls}
    temporal = torch.stack([temporal_of(p, grid) for n, p in probs.items() if sites[n]]).mean(0)
    cross = torch.stack([p.mean(1) for n, p in probs.items() if not sites[n]]).mean(0)
    close("refiner temporal", rec.get("temporal"), temporal)
    close("refiner cross", rec.get("cross"), cross)
