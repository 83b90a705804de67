"""attnmap.capture.layouts alone: sites and block numbers, what a forward's inputs say, how a call's
shapes place it, key-padding masks read on the video rows."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from attnmap.capture import layouts
from attnmap.capture.interception import Site
from attnmap.capture.layouts import FamilySpec, Placement, Unplaced, VideoInputs, place
from attnmap.layout import Layout

GRID = (2, 3, 4)  # 24 video tokens
NV = 24
SITE = Site("blocks.0.attn", torch.nn.Identity(), 0)


def inputs(**kw: Any) -> VideoInputs:
    base: dict[str, Any] = {"grid": GRID, "batch": 2, "text_len": 7, "text_real": [7, 5], "joint_context": 7}
    base.update(kw)
    return VideoInputs(**base)


def placed(
    b: int, nq: int, nk: int, spec: FamilySpec = layouts.GENERIC, index: int = 0, **kw: Any
) -> Placement:
    found = place(SITE, index, b, nq, nk, inputs(**kw), spec)
    assert isinstance(found, Placement), found
    return found


def test_self_and_prefixed_self_attention() -> None:
    assert placed(2, NV, NV).layout == Layout.self_attn(GRID)
    assert placed(2, NV + 3, NV + 3).layout == Layout.self_attn(GRID, prefix=3)  # history latents, CLS


def test_cross_attention_is_told_apart_by_the_length_of_its_keys() -> None:
    text = placed(2, NV, 7)
    assert (text.layout, text.context, text.text_len) == (Layout.cross(GRID, text=7), "text", 7)
    assert placed(2, NV, 6, contexts={"image": 6}).context == "image"
    assert placed(2, NV, 9, contexts={"audio": 9}).context == "audio"
    assert placed(2, NV, 11).context == "context"  # keys of no known input
    both = placed(2, NV, 13, contexts={"image": 6})  # [image, text] in one call
    assert (both.context, both.text_start, both.text_len) == ("text", (6,), 7)


def test_joint_attention_follows_the_family_order_and_its_context() -> None:
    first = placed(2, NV + 7, NV + 7)
    assert first.layout == Layout.joint(7, GRID, text_first=True)
    video_first = FamilySpec(family="x", text_first=False)
    assert placed(2, NV + 7, NV + 7, video_first).layout == Layout.joint(7, GRID, text_first=False)
    # [image (4), text (7)] after the video, the text at 4 of the context
    framed = placed(2, NV + 11, NV + 11, video_first, joint_context=11, text_offset=[4, 4])
    assert (framed.layout.text, framed.text_start) == (11, (4, 4))
    history = FamilySpec(family="x", text_first=False, joint_history=True)
    rolled = placed(2, 5 + NV + 11, 5 + NV + 11, history, joint_context=11, text_offset=[4, 4])
    assert (rolled.roll, rolled.layout) == (5, Layout.joint(16, GRID, text_first=False))


def test_a_call_per_batch_row_with_the_rows_real_text() -> None:
    row0 = placed(1, NV + 7, NV + 7, index=0)
    row1 = placed(1, NV + 5, NV + 5, index=1)  # row 1 has 5 real text tokens
    assert (row0.row, row0.layout.text) == (0, 7)
    assert (row1.row, row1.layout, row1.text_len) == (1, Layout.joint(5, GRID), 5)
    assert placed(1, NV, 7, index=3).row == 1


def test_divided_attention_folds_frames_or_positions_into_the_batch() -> None:
    space = placed(2 * 2, 12, 7)
    assert (space.fold, space.layout, space.grid) == ("space", Layout.cross((1, 3, 4), text=7), GRID)
    time = placed(2 * 12, 2, 2)
    assert (time.fold, time.layout) == ("time", Layout.self_attn((2, 1, 1)))


def test_calls_that_are_no_video_attention_pass_quietly_and_misfits_warn() -> None:
    refiner = place(SITE, 0, 2, 7, 7, inputs(), layouts.GENERIC)
    assert isinstance(refiner, Unplaced) and not refiner.warn
    odd = place(SITE, 0, 3, NV, NV, inputs(), layouts.GENERIC)
    assert isinstance(odd, Unplaced) and odd.warn and "batch 3" in odd.reason
    blind = place(SITE, 0, 2, NV, NV, inputs(grid=None), layouts.GENERIC)
    assert isinstance(blind, Unplaced) and "gave no video grid (batch 2, 24 queries, 24 keys)" in blind.reason


class Stacks(torch.nn.Module):
    """Dual- and single-stream stacks of attention modules and a text refiner, as MM-DiTs have."""

    class Attention(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    def __init__(self) -> None:
        super().__init__()
        block = lambda: torch.nn.ModuleDict({"attn": Stacks.Attention()})  # noqa: E731
        self.context_embedder = torch.nn.ModuleDict({"token_refiner": torch.nn.ModuleList([block()])})
        self.transformer_blocks = torch.nn.ModuleList([block(), block()])
        self.single_transformer_blocks = torch.nn.ModuleList([block(), block(), block()])
        self.text_blocks = torch.nn.ModuleList([block()])


def test_block_numbers_are_unique_across_stacks_and_side_modules_are_not_watched() -> None:
    sites = layouts.find_sites(Stacks(), layouts.GENERIC, prefix="net")
    assert [(s.name, s.block) for s in sites] == [
        ("net.transformer_blocks.0.attn", 0),
        ("net.transformer_blocks.1.attn", 1),
        ("net.single_transformer_blocks.0.attn", 2),
        ("net.single_transformer_blocks.1.attn", 3),
        ("net.single_transformer_blocks.2.attn", 4),
        ("net.text_blocks.0.attn", 5),  # a text stack after the video ones
    ]
    everything = layouts.find_sites(
        torch.nn.Sequential(torch.nn.Linear(2, 2)), layouts.GENERIC, everything=True
    )
    assert [(s.name, s.block) for s in everything] == [("<root>", 1), ("0", 0)]


class Latents(torch.nn.Module):
    def __init__(self, **config: Any) -> None:
        super().__init__()
        self.config = config

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: Any = None, **kwargs: Any) -> None:
        return None


@pytest.mark.parametrize(
    ("shape", "axes"), [((1, 4, 3, 8, 10), "BCFHW"), ((1, 3, 4, 8, 10), "BFCHW"), ((1, 3, 8, 10, 4), "BFHWC")]
)
def test_the_grid_comes_from_the_latents_and_the_patch_sizes(shape: tuple[int, ...], axes: str) -> None:
    core = Latents(in_channels=4, patch_size=(1, 2, 2))
    got = layouts.read_inputs(core, layouts.GENERIC, {"hidden_states": torch.zeros(shape)})
    assert (got.latent, got.grid, got.batch) == ((3, 8, 10), (3, 4, 5), 1), axes
    t2 = Latents(in_channels=4, patch_size=2, patch_size_t=3)
    assert layouts.read_inputs(t2, layouts.GENERIC, {"hidden_states": torch.zeros(1, 4, 6, 8, 8)}).grid == (
        2,
        4,
        4,
    )
    ltx = Latents(in_channels=8, patch_size=1, patch_size_t=1)
    packed = {"hidden_states": torch.zeros(1, 3 * 4 * 5, 8), "num_frames": 3, "height": 4, "width": 5}
    assert layouts.read_inputs(ltx, layouts.GENERIC, packed).grid == (3, 4, 5)


def test_text_lengths_come_from_the_mask_or_the_zero_padding() -> None:
    core = Latents(in_channels=4, patch_size=(1, 2, 2))
    text = torch.randn(2, 6, 3)
    text[1, 4:] = 0
    padded = layouts.read_inputs(
        core, layouts.GENERIC, {"hidden_states": torch.zeros(2, 4, 1, 2, 2), "encoder_hidden_states": text}
    )
    assert (padded.text_len, padded.text_real) == (6, [6, 4])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    masked = layouts.read_inputs(
        core,
        layouts.GENERIC,
        {
            "hidden_states": torch.zeros(2, 4, 1, 2, 2),
            "encoder_hidden_states": text,
            "encoder_attention_mask": mask,
        },
    )
    assert masked.text_real == [3, 5]


def test_hunyuan15_puts_its_text_after_the_real_image_and_byt5_tokens_of_each_row() -> None:
    spec = layouts.family_of(type("HunyuanVideo15Transformer3DModel", (torch.nn.Module,), {})())
    args = {
        "hidden_states": torch.zeros(2, 4, 1, 2, 2),
        "encoder_hidden_states": torch.randn(2, 6, 3),
        "encoder_hidden_states_2": torch.randn(2, 4, 3),
        "encoder_attention_mask_2": torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]),
        "image_embeds": torch.ones(2, 3, 3),
    }
    got = layouts.read_inputs(Latents(in_channels=4, patch_size=1), spec, args)
    assert (got.joint_context, got.text_offset) == (13, [3 + 3, 3 + 1])


def test_a_caption_of_one_row_per_batch_row_is_the_text() -> None:
    """Sana-WM / PixArt pass the prompt as [B, 1, L, D]; its mask gives the real tokens."""
    core = Latents(in_channels=4, patch_size=(1, 2, 2))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    args = {"hidden_states": torch.zeros(2, 4, 1, 2, 2), "encoder_hidden_states": torch.randn(2, 1, 6, 3)}
    got = layouts.read_inputs(core, layouts.GENERIC, {**args, "encoder_attention_mask": mask})
    assert (got.text_len, got.text_real, got.joint_context) == (6, [4, 2], 6)


def test_items_side_by_side_on_the_frame_axis_make_one_grid() -> None:
    """JoyImage Edit's latents [B, items, C, F, H, W]; a 5-D video of the same family still reads as BCFHW."""
    spec = layouts.family_of(type("JoyImageEditTransformer3DModel", (torch.nn.Module,), {})())
    core = Latents(in_channels=16, patch_size=[1, 2, 2])
    items = layouts.read_inputs(core, spec, {"hidden_states": torch.zeros(1, 2, 16, 1, 8, 10)})
    assert (items.latent, items.grid, items.batch) == ((2, 8, 10), (2, 4, 5), 1)
    video = layouts.read_inputs(core, spec, {"hidden_states": torch.zeros(1, 16, 3, 8, 10)})
    assert video.grid == (3, 4, 5)


def test_video_tokens_held_tile_by_tile_are_put_back_in_frame_row_order() -> None:
    spec = FamilySpec(family="tiled", tiles=(1, 2, 2))
    grid = (2, 2, 4)  # per frame: 2 tiles of 2 x 2 tokens
    assert placed(1, 16, 16, spec, grid=grid, batch=1).tiles == (1, 2, 2)
    tiled = [f * 8 + r * 4 + c for f in range(2) for c0 in (0, 2) for r in range(2) for c in (c0, c0 + 1)]
    order = layouts.untile(grid, (1, 2, 2), torch.device("cpu"))
    assert torch.equal(torch.tensor(tiled)[order], torch.arange(16))
    found = place(SITE, 0, 1, 24, 24, inputs(grid=(2, 3, 4), batch=1), spec)
    assert isinstance(found, Unplaced) and found.warn and "whole (1, 2, 2) tiles" in found.reason


def test_a_key_padding_mask_is_read_on_the_video_rows() -> None:
    keys = torch.tensor([True, True, False, True, False])
    kp, vary = layouts.key_padding(keys[None, None, None, :], 1, 2, 5, slice(0, 3))  # type: ignore[misc]
    assert not vary and torch.equal(kp[0, 0, 0], keys)
    rows = torch.tensor([True, True, True, False, True])  # an outer product: padded rows see nothing
    outer = rows[:, None] & keys[None, :]
    kp, vary = layouts.key_padding(outer[None, None], 1, 2, 5, slice(0, 3))  # type: ignore[misc]
    assert vary and torch.equal(kp[0, 0, 0], keys)
    bad = outer.clone()
    bad[1, 0] = False
    assert "varies over the video queries" in str(layouts.key_padding(bad[None, None], 1, 2, 5, slice(0, 3)))
    assert "does not broadcast" in str(
        layouts.key_padding(torch.ones(1, 1, 1, 4, dtype=torch.bool), 1, 2, 5, slice(0, 3))
    )


def test_lists_of_per_sample_latents_and_texts_give_the_grid_and_the_real_lengths() -> None:
    core = Latents(in_dim=8, patch_size=(1, 2, 2))  # Wan-Animate-2: in_dim counts its condition latents too
    spec = layouts.family_of(type("WanAnimate2Transformer3DModel", (torch.nn.Module,), {})())
    args = {"hidden_states": [torch.zeros(4, 2, 8, 8)] * 2, "encoder_hidden_states": [torch.randn(5, 3)] * 2}
    got = layouts.read_inputs(core, spec, {**args, "encoder_hidden_states_image": torch.randn(2, 4, 6)})
    assert (got.grid, got.batch, got.text_len, got.text_real) == ((2, 4, 4), 2, None, [5, 5])
    assert place(SITE, 0, 2, 32, 4, got, spec).context == "image"
    assert place(SITE, 0, 2, 32, 16, got, spec).context == "text"


def test_minimax_h3_grid_comes_from_the_rotary_coordinates_of_its_trailing_video_rows() -> None:
    from diffusers.modular_pipelines.minimax_h3.before_denoise import MiniMaxH3PrepareLayoutStep

    spec = layouts.family_of(type("MiniMaxH3Transformer3DModel", (torch.nn.Module,), {})())
    core = Latents(in_channels=4, patch_size=(1, 2, 2))
    grids = []
    for anchors in ((), ("first",)):  # t2va; fl2va puts a keyframe's rows before the audio
        pos, _, video, _, text, _, _ = MiniMaxH3PrepareLayoutStep.build_packed_sequence(
            torch.ones(4, dtype=torch.long), 2, 8, 8, 3, (1, 2, 2), 2, 2, 0, keyframe_anchors=anchors
        )
        args = {"hidden_states": torch.zeros(1, len(video), 16), "position_ids": pos}
        grids.append(
            layouts.read_inputs(core, spec, {**args, "video_indices": video, "text_indices": text}).grid
        )
    assert grids == [(2, 4, 4), None]
