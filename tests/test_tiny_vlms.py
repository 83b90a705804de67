"""The tiny video LLMs (tests/tiny_vlms.py) and the float64 oracle of their attention (tests/vlm_oracle.py).

For every family and for a batch of one and a left-padded batch of two:
- the builder laid the prompt out consistently (video tokens where ``cells`` says, segments that
  partition each row, the marked words where ``words`` says);
- the oracle's softmax of the q, k and mask seen at transformers' attention interface equals eager
  attention's ``output_attentions`` under ``generate()`` for every LLM layer and step, from the eager
  run's calls (float masks) and from the SDPA run's calls (no mask and ``is_causal``, or bool masks);
- the answer, word and temporal maps read from it keep the mass they should;
- SDPA and eager generate the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tiny_vlms import BUILDERS, PAD, SECOND_QUESTION, TinyVLM, gemma4, qwen2_5_vl, tokenize
from vlm_oracle import (
    Call,
    answer_map,
    block_major_cells,
    logged,
    mass,
    probs,
    temporal,
    window_order,
    word_map,
)

FAMILIES = sorted(BUILDERS)
STEPS = 3


def _run(vlm: TinyVLM, **kw: Any) -> tuple[Any, list[Call]]:
    model, inputs = vlm
    with torch.no_grad(), logged(model) as log:
        out = model.generate(
            **inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, **kw
        )
    return out, log.of(vlm.llm)


def _key_offset(call: Call, total: int) -> int:
    """The sequence position of a call's key 0: a sliding-window cache keeps the last keys only."""
    return total - call.key.shape[2]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is faster than two that wait for each other (the module's runtime halves)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(
    scope="module", params=[(f, b) for f in FAMILIES for b in (1, 2)], ids=lambda p: f"{p[0]}-B{p[1]}"
)
def runs(request: pytest.FixtureRequest) -> dict[str, Any]:
    family, batch = request.param
    eager = BUILDERS[family](attn="eager", batch=batch)
    sdpa = BUILDERS[family](attn="sdpa", batch=batch)
    out_e, calls_e = _run(eager, output_attentions=True)
    out_s, calls_s = _run(sdpa)
    return {
        "eager": eager,
        "sdpa": sdpa,
        "out_e": out_e,
        "out_s": out_s,
        "calls_e": calls_e,
        "calls_s": calls_s,
    }


def _valid_rows(vlm: TinyVLM, step: int) -> torch.Tensor:
    """[B, q] bool: the query rows of a step that are real tokens (the prefill's pads are not)."""
    mask = vlm.inputs["attention_mask"].bool()
    return mask if step == 0 else torch.ones(mask.shape[0], 1, dtype=torch.bool)


def _compare(vlm: TinyVLM, calls: list[Call], attentions: Any, tol: float) -> None:
    layers = len(attentions[0])
    assert len(calls) == STEPS * layers, f"{len(calls)} LLM calls for {STEPS} steps of {layers} layers"
    for step in range(STEPS):
        for layer in range(layers):
            call, ref = calls[step * layers + layer], attentions[step][layer].double()
            p = probs(call)
            assert p.shape == ref.shape, f"step {step} layer {layer}: {tuple(p.shape)} != {tuple(ref.shape)}"
            rows = _valid_rows(vlm, step)
            err = (p - ref).abs().permute(0, 2, 1, 3)[rows]
            assert not err.isnan().any(), f"step {step} layer {layer}: NaN on a real row"
            assert float(err.max()) <= tol, (
                f"step {step} layer {layer} ({call.name}): max error {float(err.max()):.3g}"
            )


def test_layout(runs: dict[str, Any]) -> None:
    vlm: TinyVLM = runs["eager"]
    ids = vlm.inputs["input_ids"]
    batch, n = ids.shape
    video_id = int(ids[0, vlm.cells[0][vlm.cells[0] >= 0][0]])
    for b in range(batch):
        cells = vlm.cells[b]
        kept = cells[cells >= 0]
        assert (ids[b, kept] == video_id).all()
        assert sorted(kept.tolist()) == vlm.segments[b]["video"]
        # the video-token id sits only on the cells and the extras (LLaVA-OneVision's newline)
        extras = vlm.segments[b].get("video_extra", [])
        assert sorted((ids[b] == video_id).nonzero().flatten().tolist()) == sorted(kept.tolist() + extras)
        # cells in raster order along the sequence (frame, row, column)
        assert (kept.diff() > 0).all()
        # the segments partition the row; pads sit on the left with attention_mask 0
        every = sorted(p for seg in vlm.segments[b].values() for p in seg)
        assert every == list(range(n))
        pads = vlm.segments[b].get("pad", [])
        assert pads == list(range(len(pads)))
        assert (vlm.inputs["attention_mask"][b, pads] == 0).all() and (ids[b, pads] == PAD).all()
        assert int(vlm.inputs["attention_mask"][b].sum()) == n - len(pads)
        assert (ids[b, vlm.words[b]["dog"]] == tokenize("dog")[0]).all()
    assert vlm.grid == tuple(vlm.cells[0].shape)
    assert len(vlm.slot_frames) == len(vlm.timestamps) == vlm.grid[0]
    if batch == 2:  # the second prompt is the shorter one, left-padded by the difference of the questions
        short = len(tokenize(SECOND_QUESTION.replace("(", "").replace(")", "")))
        assert len(vlm.segments[1]["pad"]) == len(tokenize("what is the dog doing ?")) - short
        assert vlm.segments[0].get("pad", []) == []


def test_oracle_equals_eager_output_attentions(runs: dict[str, Any]) -> None:
    _compare(runs["eager"], runs["calls_e"], runs["out_e"].attentions, tol=1e-6)


def test_oracle_of_sdpa_calls_equals_eager(runs: dict[str, Any]) -> None:
    """The SDPA run's calls carry no mask and ``is_causal`` (one prompt) or a bool mask (padding,
    sliding windows, bidirectional blocks): the oracle reads each as the eager run's float mask."""
    _compare(runs["eager"], runs["calls_s"], runs["out_e"].attentions, tol=2e-5)


def test_sdpa_and_eager_generate_the_same_tokens(runs: dict[str, Any]) -> None:
    assert torch.equal(runs["out_e"].sequences, runs["out_s"].sequences)


def test_maps_keep_the_mass(runs: dict[str, Any]) -> None:
    vlm: TinyVLM = runs["eager"]
    calls, n = runs["calls_e"], vlm.inputs["input_ids"].shape[1]
    layers = len(calls) // STEPS
    for i, call in enumerate(calls):
        step = i // layers
        total = n + step
        p = probs(call)
        offset = _key_offset(call, total)
        maps, rest = answer_map(p, vlm.cells, key_offset=offset)
        assert maps.shape == (p.shape[0], *vlm.grid)
        parts = {
            name: mass(p, [seg.get(name, []) for seg in vlm.segments], key_offset=offset)
            for name in ("pad", "system", "template", "video", "video_extra", "video_text", "question")
        }
        # the generated tokens before this step's query are keys too
        new = [list(range(n, total))] * p.shape[0]
        parts["answer"] = mass(p, new, key_offset=offset)
        torch.testing.assert_close(parts["video"], maps.flatten(1).sum(-1), rtol=0, atol=1e-12)
        torch.testing.assert_close(rest, 1 - parts["video"], rtol=0, atol=1e-12)
        torch.testing.assert_close(
            sum(parts.values()), torch.ones(p.shape[0], dtype=torch.float64), rtol=0, atol=1e-12
        )
        assert float(parts["pad"].abs().max()) == 0.0
        if step == 0:
            assert offset == 0
            w = word_map(p, vlm.cells, [words["dog"] for words in vlm.words])
            assert w.shape == maps.shape and (w >= 0).all()
            assert ((w.flatten(1).sum(-1) > 0) & (w.flatten(1).sum(-1) <= 1 + 1e-12)).all()
            # the prompt's last token as a word is the answer's step 0
            last = word_map(p, vlm.cells, [[n - 1]] * p.shape[0])
            torch.testing.assert_close(last, maps, rtol=0, atol=1e-15)
            t = temporal(p, vlm.cells)
            frames = vlm.grid[0]
            assert t.shape == (p.shape[0], frames, frames)
            # causal across frames: no video token of a frame sees a later frame's tokens
            assert float(t.triu(1).abs().max()) == 0.0
            assert (t.diagonal(dim1=-2, dim2=-1) > 0).all()


def test_qwen_vision_rows_are_block_major() -> None:
    """The rotary positions the Qwen-style towers give their rows are the cells of block_major_cells."""
    from transformers.vision_utils import get_vision_position_ids

    grid = (2, 6, 8)
    ids = get_vision_position_ids(torch.tensor([grid]), 2)
    cells = block_major_cells(grid, 2)
    assert torch.equal(ids, cells[:, 1:])
    assert torch.equal(cells[:, 0], torch.arange(2).repeat_interleave(48))


def test_qwen2_5_vl_vision_tower_runs_in_window_order() -> None:
    """Every block of Qwen2.5-VL's tower sees the patches in window order: the windowed block one
    call per window, the full-attention block one call per frame; argsort undoes it."""
    vlm = qwen2_5_vl()
    model, inputs = vlm
    visual = model.model.visual
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, x: torch.Tensor) -> None:
        seen.setdefault(name, x)

    hooks = [
        visual.patch_embed.register_forward_hook(lambda m, a, out: keep("embed", out)),
        visual.blocks[0].register_forward_pre_hook(
            lambda m, a, kw: keep("block", a[0] if a else kw["hidden_states"]), with_kwargs=True
        ),
    ]
    try:
        with torch.no_grad(), logged(model) as log:
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    embed, block = seen["embed"], seen["block"]
    same = (block[:, None] == embed[None]).all(-1)
    assert (same.sum(-1) == 1).all(), "every row of the block's input is one patch"
    cfg = visual.config
    order, lengths = window_order(vlm.vision_grid, vlm.merge, cfg.window_size // cfg.patch_size // vlm.merge)
    assert torch.equal(same.float().argmax(-1), order)
    assert torch.equal(block[order.argsort()], embed)
    assert [c.key.shape[2] for c in log.of(vlm.vision + "blocks.0.")] == lengths
    frame = vlm.vision_grid[1] * vlm.vision_grid[2]
    assert [c.key.shape[2] for c in log.of(vlm.vision + "blocks.1.")] == [frame] * vlm.vision_grid[0]
    # the windows are not the frames: this grid's are ragged (2 x 2 merged tokens cut at the edge)
    assert lengths == [16, 16, 8, 8] * vlm.vision_grid[0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gemma4_sliding_layer_masks_and_cache(attn: str) -> None:
    """Gemma 4's sliding layer: in the prefill each frame's video span sees itself both ways within
    the window, every other pair causally; at decode its cache holds the last W keys only."""
    vlm = gemma4(attn=attn, batch=2)
    _, calls = _run(vlm)
    window = vlm.model.config.text_config.sliding_window
    sliding = [c for c in calls if c.kwargs.get("sliding_window") == window]
    assert len(sliding) == STEPS
    prefill, decode = sliding[0], sliding[1:]
    n = vlm.inputs["input_ids"].shape[1]
    mask = prefill.mask if prefill.mask.dtype == torch.bool else prefill.mask == 0
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    for b in range(2):
        span = torch.full((n,), -1)
        for f, frame in enumerate(vlm.cells[b]):
            span[frame.flatten()] = f
        same = (span[:, None] == span[None, :]) & (span[:, None] >= 0)
        real = vlm.inputs["attention_mask"][b].bool()
        expected = ((j <= i) | same) & (i - j < window) & real[None, :]
        rows = real  # pad query rows are masked whole
        assert torch.equal(mask[b, 0][rows], expected[rows])
        assert int((same & (j > i))[rows].sum()) > 0
    for s, call in enumerate(decode, start=1):
        assert call.key.shape[2] == window
        # key j is sequence position n + s - W + j: the last W - 1 prefill (or earlier) keys, then the new one
        kept = n - (window - s)
        torch.testing.assert_close(call.key[:, :, : window - s], prefill.key[:, :, kept:], rtol=0, atol=0)
