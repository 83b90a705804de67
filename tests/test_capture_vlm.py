"""Capture of transformers' video LLMs under ``generate()`` and a plain forward, against the float64
oracle of tests/vlm_oracle.py (which imports nothing of attnmap) for every family of tests/tiny_vlms.py,
one prompt and a left-padded batch of two:

- the generated tokens are the same with and without capture;
- every step's ``answer`` and the rest of its row's mass, every marked word's ``token/<word>``, the
  prefill's ``temporal`` and ``received`` and the vision tower's ``vision/received`` and
  ``vision/entropy`` equal the oracle's softmax of the q and k logged at transformers' attention
  interface in a run without capture (KV heads repeated, the call's mask or causal offset);
- with eager attention the answer and word maps also equal the rows of ``output_attentions``;
- each generated token's word is a token map of its step; the slots' frames and timestamps are in
  the metadata (Qwen3-VL's per-frame spans, VideoLLaMA3's compression mask and ragged grid included).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

import attnmap
from tiny_vlms import BUILDERS, SECOND_QUESTION, TinyVLM, qwen3_vl, tokenizer, videollama3
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
QUESTION = "what is the (dog) doing ?"
REDUCTIONS = ("cross", "temporal", "received", "entropy")
TOKENIZER = tokenizer()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _generate(vlm: TinyVLM, **kw: Any) -> Any:
    model, inputs = vlm
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, **kw)


def _captured(vlm: TinyVLM, **kw: Any) -> tuple[Any, Any]:
    batch = vlm.inputs["input_ids"].shape[0]
    with attnmap.capture(
        vlm.model, prompt=[QUESTION, SECOND_QUESTION][:batch], tokenizer=TOKENIZER, reductions=REDUCTIONS,
        per_block=True,
    ) as rec:  # fmt: skip
        out = _generate(vlm, **kw)
    return rec, out


@pytest.fixture(
    scope="module", params=[(f, b) for f in FAMILIES for b in (1, 2)], ids=lambda p: f"{p[0]}-B{p[1]}"
)
def sdpa(request: pytest.FixtureRequest) -> dict[str, Any]:
    family, batch = request.param
    vlm = BUILDERS[family](attn="sdpa", batch=batch)
    with logged(vlm.model) as log:
        plain = _generate(vlm)
    rec, out = _captured(vlm)
    return {"vlm": vlm, "log": log, "plain": plain, "rec": rec, "out": out}


def _llm_steps(vlm: TinyVLM, calls: list[Call]) -> list[list[Call]]:
    llm = [c for c in calls if c.name.startswith(vlm.llm)]
    layers = len(llm) // STEPS
    assert len(llm) == STEPS * layers
    return [llm[s * layers : (s + 1) * layers] for s in range(STEPS)]


def _close(got: torch.Tensor, ref: torch.Tensor, what: str, atol: float = 2e-6) -> None:
    """Equal up to float32 rounding, NaN exactly where the reference has no value."""
    ref = ref.to(got.dtype)
    assert got.shape == ref.shape, f"{what}: {tuple(got.shape)} != {tuple(ref.shape)}"
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=atol, equal_nan=True, msg=what)


def _grid_ref(vlm: TinyVLM, ref: torch.Tensor) -> torch.Tensor:
    """The oracle's map with NaN on the cells the model has no token for (it reads them as 0)."""
    none = torch.stack([c < 0 for c in vlm.cells])
    return ref.masked_fill(none, float("nan"))


def _parts(vlm: TinyVLM, total: int) -> dict[str, list[list[int]]]:
    """Per part of the row's keys (as capture names them), per batch row, the sequence positions."""
    n = vlm.inputs["input_ids"].shape[1]
    out: dict[str, list[list[int]]] = {p: [] for p in ("sink", "system", "video_text", "text", "generated")}
    for seg in vlm.segments:
        video_ids = sorted(seg["video"] + seg.get("video_extra", []))
        first, last = video_ids[0], video_ids[-1]
        start = len(seg.get("pad", []))
        out["sink"].append([start])
        out["system"].append(list(range(start + 1, first)))
        out["video_text"].append([p for p in range(first, last + 1) if p not in seg["video"]])
        out["text"].append(list(range(last + 1, n)))
        out["generated"].append(list(range(n, total)))
    return out


def test_capture_leaves_the_answer_unchanged(sdpa: dict[str, Any]) -> None:
    assert torch.equal(sdpa["out"], sdpa["plain"])
    assert sdpa["rec"].steps == list(range(STEPS))
    # every call seen once, at the interface (never again at the torch SDPA call inside it)
    assert sdpa["rec"].metadata["entry_points"] == ["transformers:sdpa"]


def test_answer_and_its_rest_equal_the_oracle(sdpa: dict[str, Any]) -> None:
    _answer_equals_the_oracle(sdpa["vlm"], sdpa["log"].calls, sdpa["rec"])


def _answer_equals_the_oracle(vlm: TinyVLM, log: list[Call], rec: Any) -> None:
    n = vlm.inputs["input_ids"].shape[1]
    for step, calls in enumerate(_llm_steps(vlm, log)):
        total = n + step
        maps, rests, parts = [], [], {p: [] for p in ("sink", "system", "video_text", "text", "generated")}
        for layer, call in enumerate(calls):
            p = probs(call)
            offset = total - call.key.shape[2]
            m, rest = answer_map(p, vlm.cells, key_offset=offset)
            maps.append(m)
            rests.append(rest)
            _close(
                rec.get("answer", step=step, block=layer),
                _grid_ref(vlm, m),
                f"answer step {step} layer {layer}",
            )
            for part, positions in _parts(vlm, total).items():
                parts[part].append(mass(p, positions, key_offset=offset))
        ref = torch.stack(maps).mean(0)
        _close(rec.get("answer", step=step), _grid_ref(vlm, ref), f"answer step {step}")
        total_rest = torch.zeros(ref.shape[0], dtype=torch.float64)
        for part, values in parts.items():
            got = rec.get(f"answer/{part}", step=step)
            _close(got, torch.stack(values).mean(0), f"answer/{part} step {step}")
            total_rest = total_rest + got.double()
        # nothing hidden: the video's mass and the named parts make the whole row
        _close(total_rest, torch.stack(rests).mean(0), f"rest of step {step}")
        video = rec.get("answer", step=step).double().nansum((1, 2, 3))
        _close(video + total_rest, torch.ones_like(video), f"whole row of step {step}", atol=1e-5)


def test_prompt_words_temporal_and_received_equal_the_oracle(sdpa: dict[str, Any]) -> None:
    _prefill_equals_the_oracle(sdpa["vlm"], sdpa["log"].calls, sdpa["rec"])


def _prefill_equals_the_oracle(vlm: TinyVLM, log: list[Call], rec: Any) -> None:
    prefill = _llm_steps(vlm, log)[0]
    real = vlm.inputs["attention_mask"].bool()
    words, temporals, received = [], [], []
    for call in prefill:
        p = probs(call)
        words.append(word_map(p, vlm.cells, [w["dog"] for w in vlm.words]))
        temporals.append(temporal(p, vlm.cells))
        ph = p.mean(
            1
        )  # [B, N, N]; a pad row is NaN (bool mask) or uniform (float mask): not a query of the row
        ph = torch.where(real[:, :, None], ph, torch.zeros_like(ph))
        got = ph.sum(1) / real.sum(1, keepdim=True)
        received.append(got.masked_fill(~real, float("nan")))
    _close(rec.get("token/dog", step=0), _grid_ref(vlm, torch.stack(words).mean(0)), "token/dog")
    _close(rec.get("temporal", step=0), torch.stack(temporals).mean(0), "temporal")
    ref = torch.stack(received).mean(0)
    _close(rec.get("received", step=0), ref, "received")
    cells = torch.stack([c.clamp_min(0) for c in vlm.cells]).flatten(1)
    on_grid = ref.gather(1, cells).view(-1, *vlm.grid)
    _close(rec.get("received/video", step=0), _grid_ref(vlm, on_grid), "received/video")
    assert "token/dog" in rec.names and rec.steps == list(range(STEPS))
    for step in range(1, STEPS):  # prompt words are read in the prefill only
        with pytest.raises(attnmap.AttnmapError, match=f"no map 'token/dog' recorded for step={step}"):
            rec.get("token/dog", step=step)


def _vision_rows(vlm: TinyVLM, calls: list[Call]) -> list[torch.Tensor]:
    """Per vision call, ``[b, P, 4]``: (batch row, slot, y, x) of each patch token of its rows, from
    the builder's grid and the oracle's own orders; ``-1`` for a CLS token."""
    t, hv, wv = vlm.vision_grid
    batch = vlm.inputs["input_ids"].shape[0]
    family = vlm.family
    if family in ("qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "videollama3", "qwen2_5_vl"):
        cells = block_major_cells(vlm.vision_grid, vlm.merge)
        if family == "qwen2_5_vl":
            cfg = vlm.model.config.vision_config
            cells = cells[
                window_order(vlm.vision_grid, vlm.merge, cfg.window_size // cfg.patch_size // vlm.merge)[0]
            ]
        seq = torch.cat([torch.cat([torch.full((cells.shape[0], 1), b), cells], 1) for b in range(batch)])
        out, taken = [], {}
        for c in calls:
            off = taken.get(c.name, 0)
            n = c.key.shape[2]
            out.append(seq[off : off + n][None])
            taken[c.name] = off + n
        return out
    out = []
    for c in calls:
        frames, n = c.key.shape[0], c.key.shape[2]
        assert frames == batch * t
        if family == "gemma4":
            xy = vlm.inputs["video_position_ids"]
            yx = xy.flip(-1)
        else:
            y, x = torch.meshgrid(torch.arange(hv), torch.arange(wv), indexing="ij")
            yx = torch.stack([y.flatten(), x.flatten()], -1).expand(frames, -1, -1)
        cls = n - yx.shape[1]
        yx = torch.cat([torch.full((frames, cls, 2), -1), yx], 1)
        fr = torch.stack([torch.arange(frames) // t, torch.arange(frames) % t], -1)
        out.append(torch.cat([fr[:, None].expand(-1, n, -1), yx], -1))
    return out


def _vision_ref(vlm: TinyVLM, calls: list[Call], name: str) -> torch.Tensor:
    batch = vlm.inputs["input_ids"].shape[0]
    blocks = sorted(
        {c.name for c in calls}, key=lambda s: [int(x) if x.isdigit() else x for x in s.split(".")]
    )
    per_block = []
    rows = _vision_rows(vlm, calls)
    for block in blocks:
        total = torch.zeros(batch, *vlm.vision_grid, dtype=torch.float64)
        count = torch.zeros(batch, *vlm.vision_grid, dtype=torch.float64)
        for c, where in zip(calls, rows):
            if c.name != block:
                continue
            p = probs(c)  # [b, H, n, n]
            value = p.mean(2).mean(1) if name == "received" else (-torch.special.xlogy(p, p).sum(-1)).mean(1)
            keep = where[..., 2] >= 0
            w = where[keep]
            total.index_put_((w[:, 0], w[:, 1], w[:, 2], w[:, 3]), value[keep], accumulate=True)
            count.index_put_(
                (w[:, 0], w[:, 1], w[:, 2], w[:, 3]),
                torch.ones(w.shape[0], dtype=torch.float64),
                accumulate=True,
            )
        per_block.append(total / count)
    return torch.stack(per_block).mean(0)


def test_vision_tower_per_slot_in_raster_order(sdpa: dict[str, Any]) -> None:
    vlm, rec = sdpa["vlm"], sdpa["rec"]
    calls = sdpa["log"].of(vlm.vision)
    for name in ("received", "entropy"):
        got = rec.get(f"vision/{name}", step=0)
        assert got.shape == (vlm.inputs["input_ids"].shape[0], *vlm.vision_grid)
        _close(got, _vision_ref(vlm, calls, name), f"vision/{name}", atol=1e-5)


def test_generated_words_are_token_maps_of_their_steps(sdpa: dict[str, Any]) -> None:
    vlm, rec, out = sdpa["vlm"], sdpa["rec"], sdpa["out"]
    n = vlm.inputs["input_ids"].shape[1]
    for b in range(out.shape[0]):
        words = rec.video_metadata(b)["answer"]["words"]
        assert rec.video_metadata(b)["answer"]["tokens"] == out[b, n:].tolist()
        for step in range(STEPS):
            token = int(out[b, n + step])
            word = TOKENIZER.decode([token]).strip() or f"#{token}"  # a blank token goes by its id
            name = f"answer:{word}" if word in ("dog", "answer") else word  # the names taken before
            assert words[step] == name
            _close(rec.get(f"token/{name}", step=step)[b], rec.get("answer", step=step)[b], f"token/{name}")
            assert n + step in rec.video_metadata(b)["targets"][name]
            _close(rec.get("token/answer", step=step)[b], rec.get("answer", step=step)[b], "token/answer")
        assert list(rec.video_metadata(b)["targets"])[:2] == ["answer", "dog"]


def test_metadata_puts_the_slots_on_the_input_frames(sdpa: dict[str, Any]) -> None:
    vlm, rec = sdpa["vlm"], sdpa["rec"]
    meta = rec.video_metadata(0)
    assert meta["family"] == vlm.family
    assert meta["grid"] == list(vlm.grid)
    assert meta["time"]["slot_frames"] == vlm.slot_frames
    # the seconds as the processor wrote them into the prompt (one decimal: 0.25 s reads "0.2")
    stamps = [None if s is None else float(f"{s:.1f}") for s in vlm.timestamps]
    if vlm.family == "qwen2_5_vl":  # no text: its second_per_grid_ts times each slot's first frame
        stamps = [f[0] / vlm.fps for f in vlm.slot_frames]
    assert meta["time"]["timestamps"] == stamps
    frames = sum(len(f) for f in vlm.slot_frames)
    assert meta["video"]["frames"] == frames
    assert meta["vae_stride"][0] == len(vlm.slot_frames[0])
    if any(s is not None for s in stamps) and len(stamps) > 1:
        assert meta["video"]["fps"] == pytest.approx(vlm.fps)
    assert meta["targets"]["dog"] == vlm.words[0]["dog"]


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_output_attentions_rows(family: str) -> None:
    """With eager attention the answer and word maps are the rows of ``output_attentions``."""
    vlm = BUILDERS[family](attn="eager", batch=2)
    rec, out = _captured(vlm, output_attentions=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, _generate(vlm))
    assert rec.metadata["entry_points"] == ["transformers:eager"]
    n = vlm.inputs["input_ids"].shape[1]
    for step, layers in enumerate(out.attentions):
        total = n + step
        maps = [answer_map(a.double(), vlm.cells, key_offset=total - a.shape[-1])[0] for a in layers]
        _close(rec.get("answer", step=step), _grid_ref(vlm, torch.stack(maps).mean(0)), f"answer step {step}")
    words = [word_map(a.double(), vlm.cells, [w["dog"] for w in vlm.words]) for a in out.attentions[0]]
    _close(rec.get("token/dog", step=0), _grid_ref(vlm, torch.stack(words).mean(0)), "token/dog")


def test_qwen3_per_frame_spans_and_their_timestamps() -> None:
    vlm = qwen3_vl(batch=2)
    rec, _ = _captured(vlm)
    meta = rec.video_metadata(1)
    assert vlm.timestamps == [0.25, 1.25]  # the mean time of each slot's two frames at 2 fps
    assert meta["time"]["timestamps"] == [0.2, 1.2]  # as its processor writes them: one decimal
    # the video tokens of each slot sit in a span of their own, timestamp text between them
    cells = vlm.cells[1]
    assert int(cells[1].min()) - int(cells[0].max()) > 1
    ids = vlm.inputs["input_ids"][1]
    between = ids[int(cells[0].max()) + 1 : int(cells[1].min())].tolist()
    assert "<1.2seconds>" in TOKENIZER.decode(between, skip_special_tokens=True).replace(" ", "")


def test_videollama3_compression_leaves_dropped_cells_empty() -> None:
    vlm = videollama3(batch=2)
    rec, _ = _captured(vlm)
    kept = vlm.extra["kept"]
    assert not bool(kept.all()), "the builder drops static cells"
    for name in ("answer", "token/dog", "received/video"):
        value = rec.get(name, step=0)
        assert torch.equal(value.isnan(), ~kept), name  # NaN exactly where no token is
    # a frame's temporal row is the mean over its kept tokens only: each row sums to at most 1
    t = rec.get("temporal", step=0)
    assert bool((t.sum(-1) <= 1 + 1e-5).all()) and bool((t.triu(1) == 0).all())


def test_a_prompt_without_video_is_named_once() -> None:
    vlm = BUILDERS["qwen2_vl"](batch=1)
    model, inputs = vlm
    ids = inputs["input_ids"][:, :5]
    with pytest.warns(UserWarning) as seen, attnmap.capture(model) as rec, torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    messages = [str(w.message) for w in seen]
    assert messages == [
        "attnmap.capture: skipping the attention of module 'model.language_model.layers.0.self_attn': the "
        "model's inputs give no video to map its tokens onto: its input_ids hold no video token"
    ]
    assert rec.steps == []


def test_a_right_padded_batch_is_refused_with_the_reason() -> None:
    vlm = BUILDERS["qwen2_vl"](batch=2)
    model, inputs = vlm
    right = dict(inputs)
    right["attention_mask"] = inputs["attention_mask"].flip(-1)  # the pads of row 1 now on the right
    with pytest.warns(UserWarning, match="a right-padded batch") as seen, attnmap.capture(model) as rec:
        with torch.no_grad():
            model(**right)
    assert len(seen) == 1 and rec.steps == []


def test_beam_search_is_named_and_left_alone() -> None:
    vlm = BUILDERS["qwen2_vl"](batch=1)
    plain = _generate(vlm, num_beams=2)
    with pytest.warns(UserWarning, match=r"generate\(\) runs 2 rows for a prompt of 1 \(beam search"):
        rec, out = _captured(vlm, num_beams=2)
    assert torch.equal(out, plain)
    assert rec.names == ["vision/entropy", "vision/received"]  # read before generate() expanded the rows


def test_plain_forward_records_step_zero() -> None:
    vlm = BUILDERS["qwen2_vl"](batch=1)
    model, inputs = vlm
    with logged(model) as log, torch.no_grad():
        ref = model(**inputs).logits
    with attnmap.capture(model, targets={"dog": vlm.words[0]["dog"]}) as rec, torch.no_grad():
        logits = model(**inputs).logits
    assert torch.equal(logits, ref)
    assert rec.steps == [0]
    calls = log.of(vlm.llm)
    m = torch.stack([answer_map(probs(c), vlm.cells)[0] for c in calls]).mean(0)
    _close(rec.get("answer"), m, "answer")
    w = torch.stack([word_map(probs(c), vlm.cells, [vlm.words[0]["dog"]]) for c in calls]).mean(0)
    _close(rec.get("token/dog"), w, "token/dog")
    assert rec.tokens == ["answer", "dog"]  # the whole answer (one step, no word generated) and the word
    _close(rec.get("token/answer"), rec.get("answer"), "token/answer")
    with attnmap.capture(model.model, targets={"dog": vlm.words[0]["dog"]}) as base, torch.no_grad():
        model.model(**inputs)  # the base model (no generate, no LM head): the same maps
    _close(base.get("answer"), m, "answer of the base model")
    _close(base.get("token/dog"), w, "token/dog of the base model")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "videollama3"])
def test_a_video_llm_store_opens_in_the_render_and_the_report(family: str, tmp_path: Any) -> None:
    """``store=`` with one id per row: every answer step is a store step, the answer's words are its
    tokens, the slots go onto the input frames they cover, and the report walks the answer."""
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from attnmap.cli import app
    from attnmap.render.report import store_viewer

    vlm = BUILDERS[family](batch=2)
    slot_of = [t for t, group in enumerate(vlm.slot_frames) for _ in group]
    root = tmp_path / "maps"
    with attnmap.capture(
        vlm.model, prompt=[QUESTION, SECOND_QUESTION], tokenizer=TOKENIZER, store=root, video_id=["a", "b"]
    ) as rec:
        out = _generate(vlm)
    rec.save(tmp_path / "saved", "b", batch_index=1)
    n = vlm.inputs["input_ids"].shape[1]
    for root_, vid, row in ((root, "a", 0), (root, "b", 1), (tmp_path / "saved", "b", 1)):
        store = attnmap.open_store(root_)
        meta = store.metadata(vid)
        words = meta["answer"]["words"]
        assert store.steps(vid) == list(range(STEPS)) and meta["answer"]["tokens"] == out[row, n:].tolist()
        assert store.tokens(vid)[:2] == ["answer", "dog"] and set(words) <= set(store.tokens(vid))
        for step in range(STEPS):
            want = rec.get("answer", step=step)[row].numpy()
            np.testing.assert_allclose(store.load(vid, "token/answer", step), want, rtol=2e-3, atol=1e-4)
            np.testing.assert_allclose(
                store.load(vid, f"token/{words[step]}", step), want, rtol=2e-3, atol=1e-4
            )
            assert store.load(vid, "answer/sink", step).size == 1
        assert store.load(vid, "vision/received", 0).shape == vlm.vision_grid
        assert meta["time"]["slot_frames"] == vlm.slot_frames and meta["grid"] == list(vlm.grid)

    # the input video: as many frames as the slots cover, of the size the model saw
    frames = sum(len(f) for f in vlm.slot_frames)
    meta = attnmap.open_store(root).metadata("a")
    size = (meta["video"]["height"], meta["video"]["width"])
    rng = np.random.default_rng(0)
    video = tmp_path / "input.mp4"
    attnmap.render.write_video(rng.integers(0, 255, (frames, *size, 3), dtype=np.uint8), video, fps=2)
    runner = CliRunner()
    stills = []
    for frame in range(frames):  # lossless stills of the heat alone: one per input frame
        png = tmp_path / f"still_{frame}.png"
        result = runner.invoke(
            app, ["still", "--attention-dir", str(root), "--video-id", "a", "--token", "answer", "--frame",
                  str(frame), "--output", str(png)],  # 24 x 32 pixels: too small for labels
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        stills.append(np.asarray(Image.open(png)))
    # each input frame shows the map of the slot that covers it (not a blend with the next slot's)
    for f in range(1, frames):
        same = slot_of[f] == slot_of[f - 1]
        assert np.array_equal(stills[f], stills[f - 1]) == same, f"frames {f - 1} and {f}"
    result = runner.invoke(
        app, ["video", "--attention-dir", str(root), "--video-id", "a", "--token", "answer", "--use-aggregated",
              "--original-video", str(video), "--output", str(tmp_path / "answer.mp4"), "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert attnmap.render.read_video(tmp_path / "answer.mp4")[0].shape[:3] == (frames, *size)
    viewer = store_viewer(attnmap.open_store(root), ["a"])
    data = viewer.payload["videos"][0]
    assert data["tokens"][:2] == ["answer", "dog"] and data["steps"] == list(range(STEPS))
    assert data["frames"] == frames and data["grid"][0] == frames


def test_key_ranges_read_from_a_mask_and_what_they_cannot_say() -> None:
    """One key range per query row from a call's mask; masks no range can say are named."""
    from attnmap.capture.sequence import key_ranges

    n = 6
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    causal[:, :2] &= torch.tensor([False, True])  # key 0 is a pad
    causal[0] = False  # the pad's own query row
    found = key_ranges(causal[None, None], batch=1, nq=n, nk=n, causal=True)
    assert not isinstance(found, str)
    lo, hi = found
    assert lo.tolist() == [[0, 1, 1, 1, 1, 1]] and hi.tolist() == [[0, 2, 3, 4, 5, 6]]
    additive = torch.zeros(n, n).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert [t.tolist() for t in key_ranges(additive[None, None], batch=1, nq=n, nk=n, causal=True)] == [
        lo.tolist(),
        hi.tolist(),
    ]
    found = key_ranges(None, batch=2, nq=2, nk=5, causal=True)
    assert not isinstance(found, str)
    lo, hi = found
    assert lo.tolist() == [[0, 0]] * 2 and hi.tolist() == [[4, 5]] * 2  # the decode offset kv - q
    holes = causal.clone()
    holes[5, 3] = False
    assert key_ranges(holes[None, None], batch=1, nq=n, nk=n, causal=True) == (
        "its mask keeps keys that are not one contiguous range per query row"
    )
    biased = additive.clone()
    biased[5, 5] = -0.5
    assert "additive biases" in str(key_ranges(biased[None, None], batch=1, nq=n, nk=n, causal=True))
    heads = torch.stack([causal, causal.T])[None]
    assert key_ranges(heads, batch=1, nq=n, nk=n, causal=True) == "its mask differs between heads"
    assert "does not broadcast" in str(key_ranges(causal[None, None], batch=1, nq=n, nk=n + 1, causal=True))


def test_marked_words_come_from_the_longest_prompt_in_the_row() -> None:
    """A row holding a prompt that runs inside another's tokens takes the words of the longer one;
    a prompt seen twice gives the run after the row's video."""
    from attnmap.capture.vlm import word_positions

    short, long = ([3, 4], {"dog": [1]}), ([1, 2, 3, 4, 5], {"cat": [1], "dog": [3]})
    for prompts in ([short, long], [long, short]):
        assert word_positions([9, 1, 2, 3, 4, 5, 7], 1, prompts) == {"cat": (2,), "dog": (4,)}
        assert word_positions([9, 3, 4, 7], 1, prompts) == {"dog": (2,)}
    assert word_positions([3, 4, 8, 3, 4], 3, [short]) == {"dog": (4,)}  # after the video first
    assert word_positions([3, 4, 8, 3, 4], 5, [short]) == {"dog": (1,)}  # else the first run
    assert word_positions([9, 8], 0, [short, long]) == {}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma4"])
def test_per_head_maps(family: str) -> None:
    """``per_head=True``: the answer, its rest and the words keep the LLM's query heads (each reads
    its KV head), the vision tower's its own."""
    vlm = BUILDERS[family](batch=2)
    with logged(vlm.model) as log:
        _generate(vlm)
    with attnmap.capture(
        vlm.model,
        prompt=[QUESTION, SECOND_QUESTION],
        tokenizer=TOKENIZER,
        reductions=REDUCTIONS,
        per_head=True,
    ) as rec:
        _generate(vlm)
    n = vlm.inputs["input_ids"].shape[1]
    heads = vlm.model.config.text_config.num_attention_heads
    for step, calls in enumerate(_llm_steps(vlm, log.calls)):
        maps, rests = zip(*(answer_map(probs(c), vlm.cells, key_offset=n + step - c.key.shape[2], per_head=True)
                            for c in calls))  # fmt: skip
        got = rec.get("answer", step=step)
        assert got.shape == (2, heads, *vlm.grid)
        none = torch.stack([c < 0 for c in vlm.cells])[:, None]
        _close(
            got, torch.stack(maps).mean(0).masked_fill(none, float("nan")), f"answer per head, step {step}"
        )
        rest = sum(
            rec.get(f"answer/{p}", step=step) for p in ("sink", "system", "video_text", "text", "generated")
        )
        _close(rest, torch.stack(rests).mean(0), f"rest per head, step {step}")
    prefill = _llm_steps(vlm, log.calls)[0]
    words = []
    for c in prefill:
        p = probs(c)
        words.append(torch.stack([p[b, :, vlm.words[b]["dog"]].mean(1) for b in range(2)]))  # [B, H, N]
    cells = torch.stack([cl.clamp_min(0).flatten() for cl in vlm.cells])
    ref = torch.stack(words).mean(0).gather(2, cells[:, None].expand(-1, heads, -1)).unflatten(-1, vlm.grid)
    _close(rec.get("token/dog", step=0), ref, "token/dog per head")
    vision_heads = rec.get("vision/received", step=0)
    assert vision_heads.shape[:2] == (2, log.of(vlm.vision)[0].query.shape[1])
    _close(
        vision_heads.mean(1),
        _vision_ref(vlm, log.of(vlm.vision), "received"),
        "vision/received per head",
        atol=1e-5,
    )


# -- what a flash-attention function is given ---------------------------------------------------
def _flash_like(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: Any = None,
    sliding_window: Any = None,
    softcap: Any = None,
    is_causal: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """What transformers' flash-attention function computes from what it is given: a 2-D key-padding
    mask ``[B, nk]`` (or None), causality aligned to the last query and the sliding window added by
    the function itself (here through an explicit mask to SDPA; a row that keeps no key gives 0)."""
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    b, h, nq, _ = query.shape
    nk = key.shape[2]
    keep = torch.ones(b, nk, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    at = torch.arange(nq)[:, None] + nk - nq
    j = torch.arange(nk)[None]
    allowed = keep[:, None, None, :] & ((j <= at) if causal else torch.ones(nq, nk, dtype=torch.bool))
    if sliding_window is not None:
        allowed = allowed & (j > at - sliding_window)
    rep = h // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key.repeat_interleave(rep, 1),
        value.repeat_interleave(rep, 1),
        attn_mask=allowed,
        scale=scaling,
    )
    return torch.nan_to_num(out).transpose(1, 2).contiguous(), None


@pytest.fixture
def flash_like() -> Iterator[str]:
    """An attention implementation that transformers gives its flash-attention masks (2-D padding)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register("attnmap_flash_like", _flash_like)
    AttentionMaskInterface.register("attnmap_flash_like", flash_attention_mask)
    try:
        yield "attnmap_flash_like"
    finally:
        del AttentionInterface._global_mapping["attnmap_flash_like"]
        del AttentionMaskInterface._global_mapping["attnmap_flash_like"]


def test_a_padding_mask_under_a_causal_call_reads_causal_rows_as_the_oracle(flash_like: str) -> None:
    """A left-padded batch whose language model gets flash attention's 2-D padding mask: its prefill
    rows are causal (the call's causality on top of the padding), as the SDPA run's 4-D masks say."""
    vlm = BUILDERS["qwen2_vl"](attn="sdpa", batch=2)
    with logged(vlm.model) as log:
        plain = _generate(vlm)
    vlm.model.config.text_config._attn_implementation = flash_like  # the language model only
    with logged(vlm.model) as seen:
        assert torch.equal(_generate(vlm), plain)
    masks = [c.mask for c in seen.of(vlm.llm)]
    assert all(isinstance(m, torch.Tensor) and m.dim() == 2 for m in masks)  # [B, nk]: padding only
    rec, out = _captured(vlm)
    assert torch.equal(out, plain)
    assert sorted(rec.metadata["entry_points"]) == sorted([f"transformers:{flash_like}", "transformers:sdpa"])
    _prefill_equals_the_oracle(vlm, log.calls, rec)
    _answer_equals_the_oracle(vlm, log.calls, rec)


def test_key_ranges_of_a_padding_mask_or_none_add_causality_and_the_sliding_window() -> None:
    """A 2-D padding mask (or none) with a causal call and a sliding window: the ranges a dense 4-D
    mask of the same pattern gives (as transformers builds it for SDPA: padding, causal, window)."""
    from attnmap.capture.sequence import key_ranges

    nk = 9
    pad = torch.tensor([[False] * 3 + [True] * 6, [True] * 9])  # row 0 left-padded by 3
    for nq in (nk, 1, 4):  # a prefill, a decode step, a chunk after a cache
        for causal in (True, False):
            for window in (None, 2, 4):
                at = torch.arange(nq)[:, None] + nk - nq
                j = torch.arange(nk)[None]
                dense = pad[:, None, None, :] & (
                    (j <= at) if causal else torch.ones(nq, nk, dtype=torch.bool)
                )
                if window is not None:
                    dense = dense & (j > at - window) & ((j < at + window) if not causal else True)
                want = key_ranges(dense, batch=2, nq=nq, nk=nk, causal=causal)
                got = key_ranges(pad, batch=2, nq=nq, nk=nk, causal=causal, window=window)
                what = f"nq={nq} causal={causal} window={window}"
                assert isinstance(got, tuple) and isinstance(want, tuple), what
                assert [t.tolist() for t in got] == [t.tolist() for t in want], what
                # no mask: row 1's pattern (it has no padding)
                none = key_ranges(None, batch=1, nq=nq, nk=nk, causal=causal, window=window)
                whole = key_ranges(dense[1:], batch=1, nq=nq, nk=nk, causal=causal)
                assert isinstance(none, tuple) and isinstance(whole, tuple), what
                assert [t.tolist() for t in none] == [t.tolist() for t in whole], what


# -- what reaches the interface, by its own signature ---------------------------------------------
def _interface_calls(register: Any, call: Any) -> list[Any]:
    """The calls an :class:`Interceptor` hands over when a module calls the attention function
    ``register`` (registered in transformers' ``AttentionInterface``) as ``call(fn, module, q, k)``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    from attnmap.capture.interception import Interceptor, Site

    class Attention(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor) -> Any:
            return call(ALL_ATTENTION_FUNCTIONS["attnmap_probe"], self, q, k)

    seen: list[Any] = []
    AttentionInterface.register("attnmap_probe", register)
    try:
        model = Attention()
        with Interceptor([Site("attn", model, 0)], lambda site, c: seen.append(c)):
            model(torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4))
    finally:
        del AttentionInterface._global_mapping["attnmap_probe"]
    return seen


def test_a_varlen_call_keeps_its_softcap() -> None:
    def packed(module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, **kw: Any) -> Any:
        return v, None  # stands for flash-attn's varlen kernel

    cu = torch.tensor([0, 3, 7])
    seen = _interface_calls(
        packed,
        lambda fn, m, q, k: fn(
            m, q, k, k, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, scaling=0.5, softcap=30.0
        ),
    )
    assert [(c.entry, c.softcap) for c in seen] == [("transformers:attnmap_probe:varlen", 30.0)] * 2


def test_positional_arguments_are_named_by_the_called_functions_signature() -> None:
    def eager(
        module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, scaling: float,
        dropout: float = 0.0, **kw: Any,
    ) -> Any:  # fmt: skip
        return v, None  # transformers' eager_attention_forward takes (scaling, dropout) in this order

    seen = _interface_calls(eager, lambda fn, m, q, k: fn(m, q, k, k, None, 0.25, 0.0))
    assert [c.scale for c in seen] == [0.25]


def test_a_refused_call_is_skipped_with_its_reason() -> None:
    """A call a framework computes its own way (a ParaAttention function mode) is not read as whole."""
    from torch.overrides import TorchFunctionMode

    class UlyssesAttnMode(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            return func(*args, **(kwargs or {}))

    UlyssesAttnMode.__module__ = "para_attn.para_attn_interface"
    vlm = BUILDERS["qwen2_vl"](batch=1)
    model, inputs = vlm
    with torch.no_grad():
        ref = model(**inputs).logits
        with pytest.warns(UserWarning, match="ParaAttention's UlyssesAttnMode") as seen:
            with attnmap.capture(model) as rec, UlyssesAttnMode():
                logits = model(**inputs).logits
    assert torch.equal(logits, ref)
    assert all("ParaAttention" in str(w.message) for w in seen)
    assert rec.names == [] and rec.steps == []  # nothing of the refused calls recorded as whole


# -- inputs the reader cannot place: a reason, never an error inside the model's forward -----------
def test_a_model_without_a_language_model_is_refused_naming_the_argument() -> None:
    from attnmap.capture import vlm

    with pytest.raises(attnmap.AttnmapError, match=r"^model: a Linear has no language model"):
        vlm.parts(torch.nn.Linear(2, 2))


def test_a_window_of_no_merged_token_is_a_reason_and_generate_runs_on() -> None:
    vlm = BUILDERS["qwen2_5_vl"](batch=1)
    plain = _generate(vlm)
    vlm.model.config.vision_config.window_size = 1  # smaller than one merged token (the tower read its own)
    with pytest.warns(UserWarning, match="a window_size of 1 holds no merged token") as seen:
        rec, out = _captured(vlm)
    assert torch.equal(out, plain)
    assert len(seen) == 1 and rec.steps == []


@pytest.mark.parametrize(
    ("family", "change", "reason"),
    [
        ("llava_next_video", {"spatial_pool_stride": 0}, "give 0 x 0 video tokens a frame"),
        ("smolvlm", {"scale_factor": 0}, "give 0 x 0 video tokens a frame"),
        ("gemma4", {"video_position_ids": -1}, "video_position_ids hold no real patch position"),
    ],
)
def test_inputs_that_give_no_token_grid_are_a_reason(
    family: str, change: dict[str, int], reason: str
) -> None:
    import copy
    import types

    from attnmap.capture import vlm as vlm_inputs

    vlm = BUILDERS[family](batch=1)
    spec = vlm_inputs.spec_of(vlm.model)
    assert spec is not None
    config = copy.deepcopy(vlm.model.config)
    args = dict(vlm.inputs)
    for name, value in change.items():
        if name in args:
            args[name] = torch.full_like(args[name], value)
        else:
            setattr(config, name, value)
    found = vlm_inputs.read(spec, types.SimpleNamespace(config=config), args)
    assert isinstance(found, str) and reason in found, found


def test_a_second_prompt_says_what_the_store_keeps(tmp_path: Any) -> None:
    """Two generate() calls in one capture: memory holds the two answers' average step by step, the
    store each step as the first answer wrote it, as the warning says."""
    import numpy as np

    first = BUILDERS["qwen2_vl"](batch=1)
    other = BUILDERS["qwen2_vl"](batch=1, question="where is the (dog) ?")  # the same weights
    alone = []
    for inputs in (first.inputs, other.inputs):
        with attnmap.capture(first.model, tokenizer=TOKENIZER) as rec:
            with torch.no_grad():
                first.model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
        alone.append(rec)
    root = tmp_path / "maps"
    with pytest.warns(UserWarning) as seen:
        with attnmap.capture(first.model, tokenizer=TOKENIZER, store=root, video_id="a") as rec:
            with torch.no_grad():
                for inputs in (first.inputs, other.inputs):
                    first.model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    [warning] = [str(w.message) for w in seen]
    assert (
        "a store keeps each step as it was first written: the first answer's steps hold its maps alone"
        in warning
    )
    store = attnmap.open_store(root)
    assert store.steps("a") == list(range(STEPS))
    for step in range(STEPS):
        a, b = (r.get("answer", step=step) for r in alone)
        assert not torch.allclose(a, b, equal_nan=True), "the two answers differ"
        _close(rec.get("answer", step=step), (a + b) / 2, f"answer in memory, step {step}")
        np.testing.assert_allclose(store.load("a", "answer", step), a[0].numpy(), rtol=2e-3, atol=1e-4)
