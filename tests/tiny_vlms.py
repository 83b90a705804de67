"""Tiny, randomly initialised video LLMs of transformers 5.x, built offline from their config classes.

Each builder lays a video question out as that family's processor would and returns a
:class:`TinyVLM`, which unpacks as ``model, inputs = qwen2_vl()``;
``model.generate(**inputs, max_new_tokens=3, do_sample=False)`` runs in 25-80 ms on one CPU thread.
Beside the model and its inputs it keeps what the builder placed where, as an independent
reference for tests: the sequence position of every video token on the LLM's grid
(``cells[b][t, h, w]``), the positions of each segment of the prompt (system prompt, question,
timestamps ...), the marked question words, and which input frames each temporal slot covers.

Options shared by every builder:
    attn: ``"sdpa"`` or ``"eager"``, the attention implementation of every part of the model.
    batch: 1, or 2 for a left-padded batch of two prompts of different lengths (one video each).
    question: the question; words marked in parentheses (``"what is the (dog) doing ?"``) are
        found in :attr:`TinyVLM.words` (the model sees the question without parentheses).
    seed: the seed of the weights and the pixels.

Families: :data:`BUILDERS` maps each name to its builder. The text is a word-level vocabulary of
:data:`VOCAB_SIZE` ids (:data:`WORDS`, then each family's special tokens from 100 up), so that no
token id exceeds the tiny embedding table.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB_SIZE = 128
PAD, BOS, EOS = 0, 1, 2
#: the text vocabulary: a word's id is its index here (specials of a family start at 100)
WORDS = (
    "<pad> <s> </s> <|im_start|> <|im_end|> \n system user assistant you are a helpful what is the dog "
    "doing ? where it cat ball red runs < > seconds . : , time s frame from provided following series "
    "of frames video 0 1 2 3 4 5 6 7 8 9 USER ASSISTANT two four eight"
).split(" ")
WORD_IDS = {w: i for i, w in enumerate(WORDS)}
assert len(WORDS) < 100, "the word ids must stay below the special tokens"

#: the short question of the second prompt of a batch of two
SECOND_QUESTION = "the (dog) ?"


def tokenize(text: str) -> list[int]:
    """Word-level ids of ``text``: words split on spaces, digits and ``< > . : , ?`` one token each,
    ``"\\n"`` a token of its own."""
    ids: list[int] = []
    for piece in re.findall(r"<\|[^|]+\|>|\n|[0-9]|[<>.:,?]|[^\s0-9<>.:,?]+", text):
        if piece not in WORD_IDS:
            raise KeyError(f"{piece!r} is not in the tiny vocabulary")
        ids.append(WORD_IDS[piece])
    return ids


def tokenizer() -> Any:
    """A Hugging Face fast tokenizer of the tiny vocabulary (what a processor's tokenizer does for
    capture: a question's ids as :func:`tokenize` gives them, and any id decoded). Every id past
    :data:`WORDS` is a special token ``<extra_<id>>`` (the families' special tokens among them), which
    ``decode(..., skip_special_tokens=True)`` drops."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    extra = [f"<extra_{i}>" for i in range(len(WORDS), VOCAB_SIZE)]
    vocab = {**WORD_IDS, **{t: len(WORDS) + i for i, t in enumerate(extra)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(r"<\|[^|]+\|>|[0-9]|[<>.:,?]|[^0-9<>.:,?]+"), "isolated"),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=extra,
    )


@dataclass
class TinyVLM:
    """A tiny video LLM, its inputs for one video question, and where the builder put each token."""

    family: str
    model: torch.nn.Module
    #: keyword arguments of ``model.generate`` / ``model(...)``
    inputs: dict[str, Any]
    #: per batch row: [F, H, W] sequence positions of the video tokens on the LLM's grid; -1 where
    #: the model has no token for a cell (VideoLLaMA3's compression dropped it)
    cells: list[torch.Tensor]
    #: per batch row: {segment: positions}, a partition of the row: ``pad`` (left padding),
    #: ``system``, ``template`` (chat markup), ``video`` (the tokens on ``cells``), ``video_extra``
    #: (a video-token id on no cell: LLaVA-OneVision's trailing newline), ``video_text``
    #: (timestamps, frame markers, begin/end tokens of the video), ``question``
    segments: list[dict[str, list[int]]]
    #: per batch row: {marked word: positions of its tokens}
    words: list[dict[str, list[int]]]
    #: per temporal slot of the LLM grid: the input frame indices it covers
    slot_frames: list[list[int]]
    #: per temporal slot: the seconds the processor writes into the prompt (None where it writes none)
    timestamps: list[Optional[float]]
    #: the vision tower's own grid of one video (T, H, W) in patches, and its spatial merge factor
    vision_grid: tuple[int, int, int]
    merge: int
    #: frames per second of the input video
    fps: float = 2.0
    #: the name prefixes of the LLM's and the vision tower's modules (``"model.language_model."`` ...)
    llm: str = ""
    vision: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        yield self.model
        yield self.inputs

    @property
    def grid(self) -> tuple[int, int, int]:
        """The LLM's video grid (F, H, W)."""
        f, h, w = self.cells[0].shape
        return (int(f), int(h), int(w))


class _Row:
    """One prompt, built piece by piece, remembering each token's segment."""

    def __init__(self, cells_shape: tuple[int, int, int]) -> None:
        self.ids: list[int] = []
        self.segments: dict[str, list[int]] = defaultdict(list)
        self.cells = torch.full(cells_shape, -1, dtype=torch.long)
        self.words: dict[str, list[int]] = {}

    def add(self, segment: str, ids: Sequence[int]) -> None:
        self.segments[segment] += range(len(self.ids), len(self.ids) + len(ids))
        self.ids += list(ids)

    def text(self, segment: str, text: str) -> None:
        self.add(segment, tokenize(text))

    def cell(self, token: int, t: int, h: int, w: int) -> None:
        self.cells[t, h, w] = len(self.ids)
        self.add("video", [token])

    def question(self, question: str) -> None:
        for piece in re.split(r"(\([^()]*\))", question):
            marked = piece.startswith("(")
            ids = tokenize(piece.strip("()"))
            if marked:
                self.words.setdefault(piece.strip("()").strip(), []).extend(
                    range(len(self.ids), len(self.ids) + len(ids))
                )
            self.add("question", ids)


def _chat(
    video: Callable[[_Row], None], question: str, cells: tuple[int, int, int], style: str = "chatml"
) -> _Row:
    """A chat prompt: system prompt, the user turn (video, then the question), the assistant header."""
    row = _Row(cells)
    if style == "chatml":
        row.text("template", "<|im_start|>")
        row.text("system", "system \n you are a helpful assistant")
        row.text("template", "<|im_end|> \n <|im_start|> user \n")
        video(row)
        row.question(question)
        row.text("template", "<|im_end|> \n <|im_start|> assistant \n")
    else:  # "USER: ... ASSISTANT:" (LLaVA-NeXT-Video, SmolVLM)
        row.add("template", [BOS])
        row.text("system", "you are a helpful assistant .")
        row.text("template", "USER :")
        video(row)
        row.question(question)
        row.text("template", "ASSISTANT :")
    return row


def _batch(rows: list[_Row]) -> tuple[torch.Tensor, torch.Tensor, list[_Row]]:
    """Left-pads the rows to one length: (input_ids, attention_mask, rows with shifted positions)."""
    n = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), n), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for b, r in enumerate(rows):
        pad = n - len(r.ids)
        ids[b, pad:] = torch.tensor(r.ids)
        mask[b, pad:] = 1
        r.segments = {k: [p + pad for p in v] for k, v in r.segments.items()}
        r.segments["pad"] = list(range(pad))
        r.cells = torch.where(r.cells >= 0, r.cells + pad, r.cells)
        r.words = {k: [p + pad for p in v] for k, v in r.words.items()}
    return ids, mask, rows


def _questions(question: str, batch: int) -> list[str]:
    if batch not in (1, 2):
        raise ValueError(f"batch must be 1 or 2, got {batch}")
    return [question, SECOND_QUESTION][:batch]


def _finish(
    family: str,
    model: torch.nn.Module,
    rows: list[_Row],
    inputs: dict[str, Any],
    **info: Any,
) -> TinyVLM:
    ids, mask, rows = _batch(rows)
    model.eval()
    gen = model.generation_config
    gen.eos_token_id = None  # random weights: never stop early, every run makes max_new_tokens steps
    gen.pad_token_id = PAD
    gen.bos_token_id = BOS
    names = {n for n, _ in model.named_modules()}
    llm = next(n for n in ("model.language_model", "model.text_model") if n in names)
    vision = next(n for n in ("model.visual", "model.vision_tower", "model.vision_model") if n in names)
    return TinyVLM(
        family=family,
        model=model,
        inputs={"input_ids": ids, "attention_mask": mask, **inputs},
        cells=[r.cells for r in rows],
        segments=[dict(r.segments) for r in rows],
        words=[r.words for r in rows],
        llm=llm + ".",
        vision=vision + ".",
        **info,
    )


def _seconds(t: float) -> str:
    """``2.5`` -> ``"2 . 5"`` (one decimal, as the Qwen3-VL and VideoLLaMA3 processors write them)."""
    return " ".join(f"{t:.1f}")


def _pairs(frames: int, temporal_patch: int) -> list[list[int]]:
    return [
        list(range(t * temporal_patch, (t + 1) * temporal_patch)) for t in range(frames // temporal_patch)
    ]


def _text(vocab: int = VOCAB_SIZE, **kw: Any) -> dict[str, Any]:
    """A tiny text config: 2 layers, 4 query heads over 2 KV heads (GQA), head_dim 16."""
    cfg = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    cfg.update(kw)
    return cfg


def _build(cls: Any, config: Any, attn: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model: torch.nn.Module = cls._from_config(config, attn_implementation=attn)
    return model


# -- the Qwen family: one patch sequence per video, 2 frames per temporal slot ------------------------
_Q_IMAGE, _Q_VIDEO, _Q_START, _Q_END = 100, 101, 102, 103


def _qwen_video(
    family: str,
    cls: Any,
    config: Any,
    *,
    attn: str,
    batch: int,
    question: str,
    seed: int,
    grid: tuple[int, int, int],
    patch: int,
    merge: int,
    temporal_patch: int,
    per_frame_spans: bool,
    fps: float = 2.0,
) -> TinyVLM:
    t_slots, vh, vw = grid
    llm = (t_slots, vh // merge, vw // merge)
    frames = t_slots * temporal_patch
    slot_frames = _pairs(frames, temporal_patch)
    # the Qwen3-VL processor's timestamps: the mean time of each slot's first and last frame
    stamps = [(f[0] + f[-1]) / 2 / fps for f in slot_frames]

    def video(row: _Row) -> None:
        if not per_frame_spans:
            row.add("video_text", [_Q_START])
        for t in range(llm[0]):
            if per_frame_spans:
                row.text("video_text", f"< {_seconds(stamps[t])} seconds >")
                row.add("video_text", [_Q_START])
            for h in range(llm[1]):
                for w in range(llm[2]):
                    row.cell(_Q_VIDEO, t, h, w)
            if per_frame_spans:
                row.add("video_text", [_Q_END])
        if not per_frame_spans:
            row.add("video_text", [_Q_END])

    rows = [_chat(video, q, llm) for q in _questions(question, batch)]
    model = _build(cls, config, attn, seed)
    g = torch.Generator().manual_seed(seed + 1)
    pixels = torch.randn(batch * t_slots * vh * vw, 3 * temporal_patch * patch * patch, generator=g)
    finished = _finish(
        family,
        model,
        rows,
        {
            "pixel_values_videos": pixels,
            "video_grid_thw": torch.tensor([list(grid)] * batch),
        },
        slot_frames=slot_frames,
        timestamps=stamps if per_frame_spans else [None] * t_slots,
        vision_grid=grid,
        merge=merge,
        fps=fps,
    )
    ids = finished.inputs["input_ids"]
    finished.inputs["mm_token_type_ids"] = (ids == _Q_VIDEO).long() * 2
    if family == "qwen2_5_vl":  # the processor's seconds per temporal slot (the M-RoPE time axis)
        finished.inputs["second_per_grid_ts"] = torch.tensor([temporal_patch / fps] * batch)
    return finished


def _qwen_ids() -> dict[str, int]:
    return dict(
        image_token_id=_Q_IMAGE,
        video_token_id=_Q_VIDEO,
        vision_start_token_id=_Q_START,
        vision_end_token_id=_Q_END,
    )


_QWEN_ROPE = {"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 1e4}  # sums to head_dim / 2


def qwen2_vl(
    *, attn: str = "sdpa", batch: int = 1, question: str = "what is the (dog) doing ?", seed: int = 0
) -> TinyVLM:
    """Qwen2-VL: one span ``<|vision_start|> video*F*H*W <|vision_end|>``; vision tower per frame."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(
        text_config=_text(rope_parameters=dict(_QWEN_ROPE)),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            mlp_ratio=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        **_qwen_ids(),
    )
    return _qwen_video(
        "qwen2_vl",
        Qwen2VLForConditionalGeneration,
        cfg,
        attn=attn,
        batch=batch,
        question=question,
        seed=seed,
        grid=(2, 6, 8),
        patch=4,
        merge=2,
        temporal_patch=2,
        per_frame_spans=False,
    )


def qwen2_5_vl(
    *, attn: str = "sdpa", batch: int = 1, question: str = "what is the (dog) doing ?", seed: int = 0
) -> TinyVLM:
    """Qwen2.5-VL: as Qwen2-VL; its vision tower attends in windows of 2x2 merged tokens (block 0)
    and per frame (block 1), in window order."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=_text(rope_parameters=dict(_QWEN_ROPE)),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=64,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=16,
            fullatt_block_indexes=[1],
        ),
        **_qwen_ids(),
    )
    return _qwen_video(
        "qwen2_5_vl",
        Qwen2_5_VLForConditionalGeneration,
        cfg,
        attn=attn,
        batch=batch,
        question=question,
        seed=seed,
        grid=(2, 6, 8),
        patch=4,
        merge=2,
        temporal_patch=2,
        per_frame_spans=False,
    )


def _qwen3_parts() -> tuple[dict[str, Any], dict[str, Any]]:
    text = _text(rope_parameters={**_QWEN_ROPE, "mrope_interleaved": True})
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=64,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0],
    )
    return text, vision


def qwen3_vl(
    *, attn: str = "sdpa", batch: int = 1, question: str = "what is the (dog) doing ?", seed: int = 0
) -> TinyVLM:
    """Qwen3-VL: one span per temporal slot, ``< 0.2 seconds > <|vision_start|> video*H*W <|vision_end|>``."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text, vision = _qwen3_parts()
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_ids())
    return _qwen_video(
        "qwen3_vl",
        Qwen3VLForConditionalGeneration,
        cfg,
        attn=attn,
        batch=batch,
        question=question,
        seed=seed,
        grid=(2, 6, 8),
        patch=4,
        merge=2,
        temporal_patch=2,
        per_frame_spans=True,
    )


def qwen3_vl_moe(
    *, attn: str = "sdpa", batch: int = 1, question: str = "what is the (dog) doing ?", seed: int = 0
) -> TinyVLM:
    """Qwen3-VL-MoE: Qwen3-VL's layout; the LLM's MLPs are 4 experts, 2 per token."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    text, vision = _qwen3_parts()
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    cfg = Qwen3VLMoeConfig(text_config=text, vision_config=vision, **_qwen_ids())
    return _qwen_video(
        "qwen3_vl_moe",
        Qwen3VLMoeForConditionalGeneration,
        cfg,
        attn=attn,
        batch=batch,
        question=question,
        seed=seed,
        grid=(2, 6, 8),
        patch=4,
        merge=2,
        temporal_patch=2,
        per_frame_spans=True,
    )


# -- LLaVA-OneVision, LLaVA-NeXT-Video: frames through an image tower, pooled 2x2 ---------------------
_L_IMAGE, _L_VIDEO = 100, 101


def _frames(batch: int, frames: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(batch, frames, 3, *size, generator=g)


def llava_onevision(
    *, attn: str = "sdpa", batch: int = 1, question: str = "what is the (dog) doing ?", seed: int = 0
) -> TinyVLM:
    """LLaVA-OneVision: one span ``<video>*(F*h*w + 1)``: every frame's pooled (ceil(6/2))^2 = 3x3 grid,
    frame after frame, then one trailing newline token (the learned ``image_newline``)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    frames, side, patch = 4, 24, 4
    cfg = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **_text()),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=side,
            patch_size=patch,
            vision_use_head=False,
        ),
        image_token_index=_L_IMAGE,
        video_token_index=_L_VIDEO,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    n = -(-side // patch // 2)
    llm = (frames, n, n)

    def video(row: _Row) -> None:
        for t in range(frames):
            for h in range(n):
                for w in range(n):
                    row.cell(_L_VIDEO, t, h, w)
        row.add("video_extra", [_L_VIDEO])  # the newline after the last frame

    rows = [_chat(video, q, llm) for q in _questions(question, batch)]
    model = _build(LlavaOnevisionForConditionalGeneration, cfg, attn, seed)
    return _finish(
        "llava_onevision",
        model,
        rows,
        {"pixel_values_videos": _frames(batch, frames, (side, side), seed)},
        slot_frames=[[t] for t in range(frames)],
        timestamps=[None] * frames,
        vision_grid=(frames, side // patch, side // patch),
        merge=2,
    )


def llava_next_video(
    *, attn: str = "sdpa", batch: int = 1, question: str = "what is the (dog) doing ?", seed: int = 0
) -> TinyVLM:
    """LLaVA-NeXT-Video: ``USER: <video>*(F*h*w) question ASSISTANT:``; CLIP patches (its CLS token dropped)
    average-pooled 2x2 per frame, no newline."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    frames, side, patch = 4, 24, 4
    n = side // patch // 2
    cfg = LlavaNextVideoConfig(
        text_config=dict(model_type="llama", **_text()),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=side,
            patch_size=patch,
            projection_dim=32,
        ),
        image_token_index=_L_IMAGE,
        video_token_index=_L_VIDEO,
        spatial_pool_stride=2,
        image_seq_length=(side // patch) ** 2,
        video_seq_length=n * n * frames,
    )
    llm = (frames, n, n)

    def video(row: _Row) -> None:
        for t in range(frames):
            for h in range(n):
                for w in range(n):
                    row.cell(_L_VIDEO, t, h, w)

    rows = [_chat(video, q, llm, style="user") for q in _questions(question, batch)]
    model = _build(LlavaNextVideoForConditionalGeneration, cfg, attn, seed)
    return _finish(
        "llava_next_video",
        model,
        rows,
        {"pixel_values_videos": _frames(batch, frames, (side, side), seed)},
        slot_frames=[[t] for t in range(frames)],
        timestamps=[None] * frames,
        vision_grid=(frames, side // patch, side // patch),
        merge=2,
    )


# -- SmolVLM2 and InternVL: each frame an image of its own, with text between ------------------------
_S_IMAGE, _S_FAKE, _S_GLOBAL = 100, 101, 102


def smolvlm(
    *, attn: str = "sdpa", batch: int = 1, question: str = "what is the (dog) doing ?", seed: int = 0
) -> TinyVLM:
    """SmolVLM2 (SmolVLM / Idefics3 classes): an intro line, then per frame ``\\n frame from 00:0s :
    <fake_token_around_image> <global-img> <image>*h*w <fake_token_around_image>``, then ``\\n \\n``;
    the pixel shuffle merges 2x2 patches into one token, raster order."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    frames, side, patch, scale, fps = 4, 24, 4, 2, 1.0
    n = side // patch // scale
    cfg = SmolVLMConfig(
        text_config=dict(model_type="llama", **_text()),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=side,
            patch_size=patch,
        ),
        image_token_id=_S_IMAGE,
        scale_factor=scale,
    )
    llm = (frames, n, n)
    stamps = [t / fps for t in range(frames)]

    def video(row: _Row) -> None:
        row.text(
            "video_text",
            "you are provided the following series of four frames from a 0 : 0 0 : 0 4 video . \n",
        )
        for t in range(frames):
            row.text("video_text", f"\n frame from 0 0 : 0 {int(stamps[t])} :")
            row.add("video_text", [_S_FAKE, _S_GLOBAL])
            for h in range(n):
                for w in range(n):
                    row.cell(_S_IMAGE, t, h, w)
            row.add("video_text", [_S_FAKE])
        row.text("video_text", "\n \n")

    rows = [_chat(video, q, llm, style="user") for q in _questions(question, batch)]
    model = _build(SmolVLMForConditionalGeneration, cfg, attn, seed)
    return _finish(
        "smolvlm",
        model,
        rows,
        {"pixel_values": _frames(batch, frames, (side, side), seed)},
        slot_frames=[[t] for t in range(frames)],
        timestamps=list(stamps),
        vision_grid=(frames, side // patch, side // patch),
        merge=scale,
        fps=fps,
    )


_I_CONTEXT, _I_START, _I_END = 100, 101, 102


def internvl(
    *, attn: str = "sdpa", batch: int = 1, question: str = "what is the (dog) doing ?", seed: int = 0
) -> TinyVLM:
    """InternVL: per frame ``frame 1 : <img> <IMG_CONTEXT>*h*w </img>``, frames joined by ``\\n``; the
    pixel shuffle (ratio 0.5) merges 2x2 patches (CLS dropped) into one token, raster order."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    frames, side, patch = 4, 24, 4
    n = side // patch // 2
    cfg = InternVLConfig(
        text_config=dict(model_type="qwen2", **_text()),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=[side, side],
            patch_size=[patch, patch],
        ),
        image_token_id=_I_CONTEXT,
        image_seq_length=n * n,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    llm = (frames, n, n)

    def video(row: _Row) -> None:
        for t in range(frames):
            if t:
                row.text("video_text", "\n")
            row.text("video_text", f"frame {t + 1} :")
            row.add("video_text", [_I_START])
            for h in range(n):
                for w in range(n):
                    row.cell(_I_CONTEXT, t, h, w)
            row.add("video_text", [_I_END])
        row.text("video_text", "\n")

    rows = [_chat(video, q, llm) for q in _questions(question, batch)]
    model = _build(InternVLForConditionalGeneration, cfg, attn, seed)
    pixels = _frames(batch, frames, (side, side), seed).flatten(0, 1)  # [B*F, 3, H, W]
    return _finish(
        "internvl",
        model,
        rows,
        {"pixel_values": pixels},
        slot_frames=[[t] for t in range(frames)],
        timestamps=[None] * frames,
        vision_grid=(frames, side // patch, side // patch),
        merge=2,
    )


# -- VideoLLaMA3: one frame per slot, static patches dropped -------------------------------------------
_V_IMAGE, _V_VIDEO = 100, 101


def videollama3(
    *, attn: str = "sdpa", batch: int = 1, question: str = "what is the (dog) doing ?", seed: int = 0
) -> TinyVLM:
    """VideoLLaMA3: per frame ``time 0 . 5 s :`` then one video token per kept cell, frames joined by
    ``,``. The processor's compression mask keeps a merged 2x2 cell when its pixels differ from the
    previous frame's (frame 0 whole); here each frame t >= 1 repeats frame t-1 over a different
    block of cells, so that those are dropped and the grid is ragged."""
    from transformers import VideoLlama3Config, VideoLlama3ForConditionalGeneration
    from transformers.models.video_llama_3.video_processing_video_llama_3 import VideoLlama3VideoProcessor

    frames, vh, vw, patch, merge, fps = 4, 6, 8, 4, 2, 2.0
    cfg = VideoLlama3Config(
        text_config=dict(model_type="qwen2", **_text()),
        vision_config=dict(
            hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=patch
        ),
        image_token_id=_V_IMAGE,
        video_token_id=_V_VIDEO,
    )
    llm = (frames, vh // merge, vw // merge)
    g = torch.Generator().manual_seed(seed + 1)
    # patches in the processor's order: frame, merged row, merged column, row and column inside the cell
    pixels = torch.randn(batch, frames, llm[1], llm[2], merge * merge, 3 * patch * patch, generator=g)
    for t in range(1, frames):  # static cells: row (t - 1) % H of frame t, columns 0..t
        pixels[:, t, (t - 1) % llm[1], : t + 1] = pixels[:, t - 1, (t - 1) % llm[1], : t + 1]
    pixels = pixels.reshape(batch * frames * vh * vw, -1)
    grid = torch.tensor([[frames, vh, vw]] * batch)
    merges = torch.full((batch,), merge)
    keep = VideoLlama3VideoProcessor()._get_compression_mask(pixels, grid, merges)
    kept = keep.view(batch, *llm)
    stamps = [t / fps for t in range(frames)]

    def video_for(b: int) -> Callable[[_Row], None]:
        def video(row: _Row) -> None:
            for t in range(frames):
                if t:
                    row.text("video_text", ",")
                row.text("video_text", f"time {_seconds(stamps[t])} s :")
                for h in range(llm[1]):
                    for w in range(llm[2]):
                        if kept[b, t, h, w]:
                            row.cell(_V_VIDEO, t, h, w)

        return video

    rows = [_chat(video_for(b), q, llm) for b, q in enumerate(_questions(question, batch))]
    model = _build(VideoLlama3ForConditionalGeneration, cfg, attn, seed)
    return _finish(
        "videollama3",
        model,
        rows,
        {
            "pixel_values_videos": pixels,
            "video_grid_thw": grid,
            "video_merge_sizes": merges,
            "video_compression_mask": keep,
        },
        slot_frames=[[t] for t in range(frames)],
        timestamps=list(stamps),
        vision_grid=(frames, vh, vw),
        merge=merge,
        fps=fps,
        extra={"kept": kept},
    )


# -- GLM-4.1V: frames as image spans inside a video span, an integer second after each -----------------
_G_IMAGE, _G_VIDEO, _G_BOI, _G_EOI, _G_BOV, _G_EOV = 100, 101, 102, 103, 104, 105


def glm4v(
    *, attn: str = "sdpa", batch: int = 1, question: str = "what is the (dog) doing ?", seed: int = 0
) -> TinyVLM:
    """GLM-4.1V: ``<|begin_of_video|>`` then per temporal slot ``<|begin_of_image|> <|image|>*h*w
    <|end_of_image|> 0`` (the integer second of the slot's first frame), ``<|end_of_video|>``. The video's
    tokens are the IMAGE token id; ``mm_token_type_ids`` (2 inside the video span) tells them apart."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    t_slots, vh, vw, patch, merge, temporal, fps = 2, 6, 8, 4, 2, 2, 1.0
    cfg = Glm4vConfig(
        text_config=_text(
            rope_parameters={
                "rope_type": "default",
                "mrope_section": [2, 1, 1],
                "partial_rotary_factor": 0.5,
                "rope_theta": 1e4,
            },
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=64,
            patch_size=patch,
            spatial_merge_size=merge,
            temporal_patch_size=temporal,
            image_size=vw * patch,
        ),
        image_token_id=_G_IMAGE,
        video_token_id=_G_VIDEO,
        image_start_token_id=_G_BOI,
        image_end_token_id=_G_EOI,
        video_start_token_id=_G_BOV,
        video_end_token_id=_G_EOV,
    )
    llm = (t_slots, vh // merge, vw // merge)
    slot_frames = _pairs(t_slots * temporal, temporal)
    stamps = [f[0] / fps for f in slot_frames]

    def video(row: _Row) -> None:
        row.add("video_text", [_G_BOV])
        for t in range(t_slots):
            row.add("video_text", [_G_BOI])
            for h in range(llm[1]):
                for w in range(llm[2]):
                    row.cell(_G_IMAGE, t, h, w)
            row.add("video_text", [_G_EOI])
            row.text("video_text", str(int(stamps[t])))
        row.add("video_text", [_G_EOV])

    rows = [_chat(video, q, llm) for q in _questions(question, batch)]
    model = _build(Glm4vForConditionalGeneration, cfg, attn, seed)
    g = torch.Generator().manual_seed(seed + 1)
    pixels = torch.randn(batch * t_slots * vh * vw, 3 * temporal * patch * patch, generator=g)
    out = _finish(
        "glm4v",
        model,
        rows,
        {"pixel_values_videos": pixels, "video_grid_thw": torch.tensor([[t_slots, vh, vw]] * batch)},
        slot_frames=slot_frames,
        timestamps=stamps,
        vision_grid=(t_slots, vh, vw),
        merge=merge,
        fps=fps,
    )
    types = torch.zeros_like(out.inputs["input_ids"])
    for b, seg in enumerate(out.segments):
        types[b, seg["video"]] = 2
    out.inputs["mm_token_type_ids"] = types
    return out


# -- Gemma 4: one span per frame, bidirectional inside each span on the sliding layers --------------
_GM_IMAGE, _GM_VIDEO, _GM_BOI, _GM_EOI, _GM_AUDIO, _GM_BOA, _GM_EOA = 100, 101, 102, 103, 104, 105, 106


def gemma4(
    *, attn: str = "sdpa", batch: int = 1, question: str = "what is the (dog) doing ?", seed: int = 0
) -> TinyVLM:
    """Gemma 4: per frame ``0 0 : 0 1 <boi> <|video|>*h*w <eoi>`` (mm:ss of the frame), frames joined by
    spaces; the vision tower pools 2x2 patches into one token, raster order. Layer 0 slides (window
    16) and is bidirectional inside each frame's span (``use_bidirectional_attention="vision"``);
    layer 1 is global and causal."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    frames, ph, pw, patch, pool, fps = 4, 4, 6, 4, 2, 1.0
    text = _text(
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=16,
        global_head_dim=16,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=VOCAB_SIZE,
        use_bidirectional_attention="vision",
        hidden_activation="gelu_pytorch_tanh",
    )
    text.pop("max_position_embeddings")
    cfg = Gemma4Config(
        text_config=text,
        vision_config=dict(
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            patch_size=patch,
            pooling_kernel_size=pool,
            position_embedding_size=64,
        ),
        audio_config=None,
        image_token_id=_GM_IMAGE,
        video_token_id=_GM_VIDEO,
        boi_token_id=_GM_BOI,
        eoi_token_id=_GM_EOI,
        audio_token_id=_GM_AUDIO,
        boa_token_id=_GM_BOA,
        eoa_token_index=_GM_EOA,
    )
    llm = (frames, ph // pool, pw // pool)
    stamps = [t / fps for t in range(frames)]

    def video(row: _Row) -> None:
        for t in range(frames):
            row.text("video_text", f"0 0 : 0 {int(stamps[t])}")
            row.add("video_text", [_GM_BOI])
            for h in range(llm[1]):
                for w in range(llm[2]):
                    row.cell(_GM_VIDEO, t, h, w)
            row.add("video_text", [_GM_EOI])

    rows = [_chat(video, q, llm) for q in _questions(question, batch)]
    model = _build(Gemma4ForConditionalGeneration, cfg, attn, seed)
    g = torch.Generator().manual_seed(seed + 1)
    # patches in raster order, positions (x, y) per patch, as the video processor gives them
    pixels = torch.rand(batch * frames, ph * pw, patch * patch * 3, generator=g)
    ys, xs = torch.meshgrid(torch.arange(ph), torch.arange(pw), indexing="ij")
    positions = torch.stack([xs.flatten(), ys.flatten()], dim=-1).expand(batch * frames, -1, -1).contiguous()
    out = _finish(
        "gemma4",
        model,
        rows,
        {
            "pixel_values_videos": pixels,
            "video_position_ids": positions,
            "num_frames_per_video": torch.tensor([frames] * batch),
        },
        slot_frames=[[t] for t in range(frames)],
        timestamps=stamps,
        vision_grid=(frames, ph, pw),
        merge=pool,
        fps=fps,
    )
    out.inputs["mm_token_type_ids"] = (out.inputs["input_ids"] == _GM_VIDEO).long() * 2
    return out


BUILDERS: dict[str, Callable[..., TinyVLM]] = {
    "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_5_vl,
    "qwen3_vl": qwen3_vl,
    "qwen3_vl_moe": qwen3_vl_moe,
    "llava_onevision": llava_onevision,
    "llava_next_video": llava_next_video,
    "smolvlm": smolvlm,
    "internvl": internvl,
    "videollama3": videollama3,
    "glm4v": glm4v,
    "gemma4": gemma4,
}
