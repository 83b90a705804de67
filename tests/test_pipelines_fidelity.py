"""Whole diffusers video pipelines under ``attnmap.capture(pipe, branch="both")``, called as people call
them, against an independent oracle (tests/pipeline_oracle.py).

Each family's tiny pipeline (tests/tiny_pipelines.py) runs with its own text padding and masks and
marked words in the prompts, in four variants: guidance with a negative prompt shorter than the
prompt, one longer than it, a batch of two prompts of different lengths and words, and two videos per
prompt. Per variant: the frames equal those of the same run without capture (bit for bit); the
metadata names each row's prompt, real text length and target tokens; and per step, per branch and per
batch row, ``cross``, ``token/<word>`` and ``temporal`` equal the oracle's float64 softmax of the q, k
and mask each attention call got, reduced by hand over the family's own token order.
"""

from __future__ import annotations

import inspect
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
import torch

import attnmap
from pipeline_oracle import Oracle, Row, Site, Text, branch_rows, marked
from tiny_pipelines import KANDINSKY5_TEMPLATE, PIPELINES, RUNS

pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning",
    "ignore::DeprecationWarning",
    "ignore:In CPU autocast:UserWarning",
)

Grid = tuple[int, int, int]
ATOL = 2e-6


def _sana_instruction() -> str:
    """The instruction SanaVideoPipeline puts before a prompt by default."""
    from diffusers import SanaVideoPipeline

    default = inspect.signature(SanaVideoPipeline.__call__).parameters["complex_human_instruction"].default
    return "\n".join(default)


SANA_INSTRUCTION = _sana_instruction()
#: the system message Cosmos2_5_PredictBasePipeline puts before each prompt (in its _get_prompt_embeds)
COSMOS25_SYSTEM = "You are a helpful assistant who will provide prompts to an image generator."


@dataclass(frozen=True)
class Family:
    """What the oracle knows of a family, written from its pipeline's and transformer's code.

    ``cfg``: ``batched`` (one forward per step on [uncond rows, cond rows]) or ``separate`` (a cond
    forward, then an uncond one); ``guidance``: the arguments that turn guidance on.
    """

    sites: tuple[Site, ...]
    grid: Grid
    text: Text
    cfg: str
    guidance: dict[str, Any] = field(default_factory=dict)
    denoisers: tuple[str, ...] = ("transformer",)
    videos_per_prompt: bool = True  # the pipeline honours num_videos_per_prompt (CogVideoX makes it 1)
    per_prompt_arg: str = "num_videos_per_prompt"  # its name for it
    negative_text: Optional[Text] = None  # how it encodes negative prompts, where that differs
    warns: str = ""  # a regex: the one warning capture must give for this family ("": none)
    decodes: bool = True  # its VAE decodes a tiny video (Allegro's decodes only in tiles larger than one)


def wan_sites() -> tuple[Site, ...]:
    return (Site(r"blocks\.\d+\.attn1", "self"), Site(r"blocks\.\d+\.attn2", "cross"))


def self_cross(stack: str = "transformer_blocks") -> tuple[Site, ...]:
    return (Site(rf"{stack}\.\d+\.attn1", "self"), Site(rf"{stack}\.\d+\.attn2", "cross"))


FAMILIES: dict[str, Family] = {
    # umT5 text padded with zero embeddings and no mask; cond then uncond forwards
    "wan": Family(wan_sites(), (3, 2, 2), Text(16), "separate", {"guidance_scale": 5.0}),
    "wan2.2": Family(
        wan_sites(),
        (3, 2, 2),
        Text(16),
        "separate",
        {"guidance_scale": 5.0, "guidance_scale_2": 4.0},
        denoisers=("transformer", "transformer_2"),
    ),
    # T5 padded, the mask made additive (-10000) at attn2; one forward on [uncond, cond]
    "ltx": Family(self_cross(), (3, 8, 8), Text(16), "batched", {"guidance_scale": 3.0}),
    # joint [text (padded, no mask), video]; one video per prompt whatever is asked
    "cogvideox": Family(
        (Site(r"transformer_blocks\.\d+\.attn1", "joint"),),
        (3, 2, 2),
        Text(16),
        "batched",
        {"guidance_scale": 6.0},
        videos_per_prompt=False,
    ),
    # Llama text under a template whose first 5 tokens are cropped (an end-of-turn token after the
    # prompt), padded with a key-padding mask; joint [video, text] in the dual- and single-stream
    # blocks; true CFG runs an uncond forward
    "hunyuanvideo": Family(
        (
            Site(r"transformer_blocks\.\d+\.attn", "joint", text_first=False),
            Site(r"single_transformer_blocks\.\d+\.attn", "joint", text_first=False),
        ),
        (3, 4, 4),
        Text(12, template="describe the video : {} </s>", crop=5),
        "separate",
        {"true_cfg_scale": 2.0},
    ),
    # T5 padded to 16 with a mask; each row's call holds [video, that row's real text]
    "mochi": Family(
        (Site(r"transformer_blocks\.\d+\.attn1", "joint", text_first=False, per_row=True),),
        (3, 2, 2),
        Text(16),
        "batched",
        {"guidance_scale": 4.5},
    ),
    # Wan's layout and padding
    "skyreels-v2": Family(wan_sites(), (3, 2, 2), Text(16), "separate", {"guidance_scale": 6.0}),
    # T5 padded with a mask, additive (-10000) at attn2; [uncond, cond]; one video per prompt
    "allegro": Family(
        self_cross(),
        (3, 2, 2),
        Text(16),
        "batched",
        {"guidance_scale": 6.0},
        videos_per_prompt=False,
        decodes=False,
    ),
    # divided attention: space calls (a row's frames in the batch) cross to the text, time calls (its
    # positions in the batch); T5 padded to 120, then a single prompt keeps its real tokens only and
    # its negative prompt is cut (or padded) to as many; no mask reaches the transformer
    "latte": Family(
        (
            Site(r"transformer_blocks\.\d+\.attn2", "space"),
            Site(r"temporal_transformer_blocks\.\d+\.attn1", "time"),
        ),
        (2, 2, 2),
        Text(120, cut=True),
        "batched",
        {"guidance_scale": 5.0},
        per_prompt_arg="num_images_per_prompt",
    ),
    # T5 padded with zero embeddings, no mask; a cond forward then an uncond one (no cache context)
    "cosmos": Family(self_cross(), (3, 4, 4), Text(16), "separate", {"guidance_scale": 3.0}),
    # Qwen2-VL through a chat template (kept whole), padded to 256 with a mask the transformer never
    # gets; joint [text, video]
    "easyanimate": Family(
        (Site(r"transformer_blocks\.\d+\.attn1", "joint"),),
        (2, 2, 2),
        Text(256, template="describe the video : {} </s>"),
        "batched",
        {"guidance_scale": 6.0},
        per_prompt_arg="num_images_per_prompt",
    ),
    # CogVideoX 1.5: temporal patches of 2 over the latent frames padded to 4
    "cogvideox1.5": Family(
        (Site(r"transformer_blocks\.\d+\.attn1", "joint"),),
        (2, 2, 2),
        Text(16),
        "batched",
        {"guidance_scale": 6.0},
        videos_per_prompt=False,
    ),
    # Qwen2.5-VL under a template whose instruction is cropped, padded to the longest row, no mask;
    # visual self- and cross-attention; a cond forward then an uncond one (no cache context)
    "kandinsky5": Family(
        (
            Site(r"visual_transformer_blocks\.\d+\.self_attention", "self"),
            Site(r"visual_transformer_blocks\.\d+\.cross_attention", "cross"),
        ),
        (2, 2, 2),
        Text(16, template=KANDINSKY5_TEMPLATE["template"], crop=KANDINSKY5_TEMPLATE["crop_start"]),
        "separate",
        {"guidance_scale": 4.0},
    ),
    # Gemma2 text, <s> first; a prompt gets the long instruction before it, of which the pipeline keeps
    # <s> and the last tokens; negative prompts get none; the mask additive at attn2 (its
    # self-attention is linear: no map); one forward on [uncond, cond]
    "sana-video": Family(
        (Site(r"transformer_blocks\.\d+\.attn2", "cross"),),
        (3, 2, 2),
        Text(16, instruction=SANA_INSTRUCTION),
        "batched",
        {"guidance_scale": 6.0},
        negative_text=Text(16),
        warns=r"2 watched attention module\(s\) of SanaVideoTransformer3DModel ran but produced no map: "
        r"'transformer_blocks\.0\.attn1', 'transformer_blocks\.1\.attn1'.*linear attention",
    ),
    # Qwen2.5-VL through a chat template (system message cropped), byT5 for quoted text (none here);
    # joint [video, valid image (none in t2v), valid byT5, valid text, padding] under an outer-product
    # mask; its guider runs a cond forward then an uncond one
    "hunyuanvideo1.5": Family(
        (Site(r"transformer_blocks\.\d+\.attn", "joint", text_first=False),),
        (3, 8, 8),
        Text(16, template="describe the video : {} </s>", crop=4, specials=False),
        "separate",
    ),
    # Gemma3 text, <s> first, padded on the left; its connectors move each row's real tokens to the
    # front and fill the rest with learnable registers under an all-ones mask; video self- and
    # cross-attention (and an audio stream); one forward on [uncond, cond]
    "ltx2": Family(self_cross(), (2, 8, 8), Text(16), "batched", {"guidance_scale": 4.0}),
    # Cosmos 2.5 as text-to-world: Qwen2.5-VL through a chat template whose system message the
    # denoiser's text keeps, padded, no mask; a cond forward then an uncond one (no cache context)
    "cosmos2.5": Family(
        self_cross(),
        (2, 2, 2),
        Text(32, template=COSMOS25_SYSTEM + " : {} </s>", specials=False),
        "separate",
        {"guidance_scale": 3.0},
    ),
    # T5Gemma2 text padded with a key-padding mask; joint [video, text] in dual- and single-stream
    # blocks; its adaptive projected guider runs a cond forward then an uncond one
    "motif-video": Family(
        (
            Site(r"transformer_blocks\.\d+\.attn", "joint", text_first=False),
            Site(r"single_transformer_blocks\.\d+\.attn", "joint", text_first=False),
        ),
        (3, 4, 4),
        Text(16),
        "separate",
    ),
}

#: variant -> the prompts of the call (marked words in parentheses)
VARIANTS: dict[str, dict[str, Any]] = {
    "shorter-negative": {"prompt": "a (cat) on a (mat)", "negative_prompt": "(dragon) sky"},
    "longer-negative": {"prompt": "a (cat) runs", "negative_prompt": "a fierce (dragon) in the blue (sky) with flowers"},
    "two-prompts": {
        "prompt": ["a (cat) on a (mat)", "the red (dog) runs in the (garden)"],
        "negative_prompt": ["", "blue (sky)"],
    },
    "two-videos-per-prompt": {
        "prompt": "a (cat) on a (mat)",
        "negative_prompt": "a fierce (dragon)",
        "num_videos_per_prompt": 2,
    },
}  # fmt: skip

#: (family, variant) -> why the family's pipeline cannot run that variant (checked below: it still fails)
UNSUPPORTED: dict[tuple[str, str], str] = {
    ("hunyuanvideo1.5", "two-videos-per-prompt"): "HunyuanVideo15Pipeline repeats the prompt embeddings per "
    "video but not their masks: its attention processor fails on num_videos_per_prompt=2",
}
CASES = [(f, v) for f in sorted(FAMILIES) for v in sorted(VARIANTS) if (f, v) not in UNSUPPORTED]

_PIPES: dict[str, Any] = {}


def pipeline(family: str) -> Any:
    if family not in _PIPES:
        pipe = PIPELINES[family]()
        pipe.set_progress_bar_config(disable=True)
        _PIPES[family] = pipe
    return _PIPES[family]


def clean(value: Any) -> Any:
    """A prompt (or list of prompts) without its marks."""
    if isinstance(value, str):
        return marked(value)[0]
    if isinstance(value, list):
        return [marked(v)[0] for v in value]
    return value


def as_list(value: Any, n: int) -> list[str]:
    return [value] * n if isinstance(value, str) else list(value)


def differences(name: str, got: Any, want: torch.Tensor) -> Optional[str]:
    """Why ``got`` is not ``want`` (NaN where ``want`` is NaN, within ATOL elsewhere), or None."""
    if not isinstance(got, torch.Tensor):
        return f"{name}: {got}"
    if tuple(got.shape) != tuple(want.shape):
        return f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    nan = want.isnan()
    if not torch.equal(got.isnan(), nan):
        return f"{name}: NaN at {int(got.isnan().sum())} places, expected at {int(nan.sum())}"
    err = (got.double() - want).abs()[~nan]
    worst = float(err.max()) if err.numel() else 0.0
    return None if worst <= ATOL else f"{name}: max abs error {worst:.3g} > {ATOL}"


def run_pipeline(pipe: Any, family: str, kwargs: dict[str, Any]) -> torch.Tensor:
    frames = pipe(**RUNS[family], **kwargs, generator=torch.Generator().manual_seed(0)).frames
    return torch.stack(list(frames)) if isinstance(frames, (list, tuple)) else frames


#: the variant whose frames are decoded (the others compare the denoised latents, which the VAE
#: decodes; one decode per family shows that capture leaves the VAE's own attention alone). Allegro's
#: VAE decodes only in tiles of 24 frames and 240 pixels, so a tiny video decodes to a constant: its
#: latents are compared in every variant.
DECODED = "shorter-negative"


def call_of(family: str, variant: str) -> dict[str, Any]:
    """The pipeline call of a variant (with marks), in the family's own argument names."""
    fam = FAMILIES[family]
    decoded = variant == DECODED and fam.decodes
    call = {**fam.guidance, **VARIANTS[variant], "output_type": "pt" if decoded else "latent"}
    if "num_videos_per_prompt" in call:
        call[fam.per_prompt_arg] = call.pop("num_videos_per_prompt")
    return call


@pytest.mark.parametrize(("family", "variant"), CASES)
def test_pipeline_maps_equal_the_oracle_per_step_branch_and_row(family: str, variant: str) -> None:
    fam, call = FAMILIES[family], call_of(family, variant)
    pipe = pipeline(family)
    plain = run_pipeline(pipe, family, {k: clean(v) for k, v in call.items()})

    oracle = Oracle(pipe, fam.sites, fam.grid, fam.denoisers)
    try:
        # capture's warnings are collected, not raised, so that the maps are checked too
        with warnings.catch_warnings(record=True) as caught, oracle.dispatch():
            warnings.simplefilter("always")
            with attnmap.capture(pipe, branch="both", keep_cross=True) as rec, oracle:
                try:
                    captured = run_pipeline(pipe, family, call)
                except Exception as e:  # the run without capture went through
                    raise AssertionError(
                        f"{family} {variant}: the pipeline raised under capture: {e!r}"
                    ) from e
    finally:
        oracle.close()
    said = [str(w.message) for w in caught if str(w.message).startswith("attnmap")]

    prompts = as_list(call["prompt"], 1)
    per_prompt = int(call.get(fam.per_prompt_arg, 1)) if fam.videos_per_prompt else 1
    negatives = as_list(call["negative_prompt"], len(prompts))
    rows = branch_rows(
        getattr(pipe, fam.text.tokenizer), fam.text, prompts, negatives, per_prompt, fam.negative_text
    )
    steps = int(RUNS[family]["num_inference_steps"])
    want = oracle.maps(rows, cfg=fam.cfg, steps=steps)

    problems = []
    assert plain.shape[0] == len(rows["cond"]), (
        f"{family}: {plain.shape[0]} videos for {len(rows['cond'])} rows"
    )
    assert plain.unique().numel() > 1, f"{family}: the frames are constant, comparing them shows nothing"
    if not torch.equal(plain, captured):
        problems.append("the frames differ from the run without capture")
    expected = [m for m in said if fam.warns and re.search(fam.warns, m)]
    if fam.warns and len(expected) != 1:
        problems.append(f"capture gave {len(expected)} warnings matching {fam.warns!r}, not 1")
    problems += [f"capture warned: {m[:200]}" for m in said if m not in expected]
    keys = ("prompt", "text_len", "targets")
    meta = rec.metadata.get("rows")
    if isinstance(meta, dict):  # the keys the contract names (a row may say more)
        meta = {b: [{k: r.get(k) for k in keys} for r in rs] for b, rs in meta.items()}
    expected_meta = {b: [r.as_dict() for r in rs] for b, rs in rows.items()}
    if meta != expected_meta:
        problems.append(f"metadata['rows'] = {meta}, expected {expected_meta}")
    for (step, branch), maps in sorted(want.items()):
        for name, value in maps.items():
            try:
                got: Any = rec.get(name, step=step, branch=branch)
            except attnmap.AttnmapError as e:
                got = f"not recorded ({str(e).splitlines()[0][:160]})"
            problem = differences(f"step {step} {branch} {name}", got, value)
            if problem:
                problems.append(problem)
    assert not problems, f"{family} {variant}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_oracle_rows_agree_with_the_ids_the_text_encoder_saw(family: str) -> None:
    """Each row's real length and word tokens, which the oracle reads from the tokenizer's offsets, against
    the ids the pipeline gave its text encoder: the tokens the denoiser keeps (after a template's crop,
    Sana's first-and-last selection, LTX-2's left padding moved to the end) that are not padding."""
    fam, pipe = FAMILIES[family], pipeline(family)
    seen: list[torch.Tensor] = []

    def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen.append(kwargs["input_ids"] if "input_ids" in kwargs else args[0])

    variant = VARIANTS["two-prompts"]
    prompts = variant["prompt"]
    handle = pipe.text_encoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        call = {k: clean(v) for k, v in variant.items()}
        run_pipeline(pipe, family, {**fam.guidance, **call, "output_type": "latent"})
    finally:
        handle.remove()
    tok = getattr(pipe, fam.text.tokenizer)
    ids, text = seen[0], fam.text
    assert ids.shape[0] == len(prompts)
    for i, prompt in enumerate(prompts):
        row: Row = text.row(tok, prompt)
        seq = [int(t) for t in ids[i]]
        if text.instruction:  # Sana keeps the first token and the last length - 1
            seq = seq[:1] + seq[len(seq) - text.length + 1 :]
        kept = [t for t in seq[text.crop :] if t != tok.pad_token_id][: text.length]
        assert row.text_len == len(kept), f"{prompt!r}: {row.text_len} != {len(kept)} real tokens"
        for word, positions in row.targets.items():
            assert [tok.convert_ids_to_tokens(kept[p]) for p in positions] == [word], (prompt, word)


@pytest.mark.parametrize(("family", "variant"), sorted(UNSUPPORTED))
def test_a_variant_left_out_is_one_the_pipeline_itself_cannot_run(family: str, variant: str) -> None:
    """The variants left out above fail without capture too (when diffusers fixes one, add it)."""
    call = {k: clean(v) for k, v in call_of(family, variant).items()}
    with pytest.raises(RuntimeError):
        run_pipeline(pipeline(family), family, call)


def test_the_oracle_agrees_with_a_hand_computation() -> None:
    """The oracle's maps of one Wan step, against the same sums written out entry by entry from the
    logged q and k (exp of the scaled dot products over their row sums, in Python floats)."""
    import math

    fam = FAMILIES["wan"]
    pipe = pipeline("wan")
    oracle = Oracle(pipe, fam.sites, fam.grid)
    try:
        with oracle.dispatch(), oracle:
            run_pipeline(
                pipe, "wan", {"prompt": "a cat on a mat", "guidance_scale": 1.0, "output_type": "latent"}
            )
    finally:
        oracle.close()
    rows = branch_rows(pipe.tokenizer, fam.text, ["a (cat) on a (mat)"], None, 1)
    want = oracle.maps(rows, cfg=fam.cfg, steps=2)[(0, "cond")]
    f, h, w = fam.grid
    nv, hw = f * h * w, h * w
    calls = oracle.calls(oracle.forwards[0])
    assert [c[0] for c in calls] == ["blocks.0.attn1", "blocks.0.attn2", "blocks.1.attn1", "blocks.1.attn2"]

    def probs(q: torch.Tensor, k: torch.Tensor, head: int, i: int) -> list[float]:
        scale = q.shape[-1] ** -0.5
        logits = [
            scale * sum(float(a) * float(b) for a, b in zip(q[0, head, i], k[0, head, j]))
            for j in range(k.shape[2])
        ]
        top = max(logits)
        e = [math.exp(x - top) for x in logits]
        return [x / sum(e) for x in e]

    temporal = [[0.0] * f for _ in range(f)]
    cross = [[0.0] * 6 for _ in range(nv)]  # "a cat on a mat </s>"
    for name, q, k, mask, scale in calls:
        assert mask is None and scale is None
        for head in range(2):
            for i in range(nv):
                p = probs(q, k, head, i)
                if name.endswith("attn1"):
                    for j in range(nv):
                        temporal[i // hw][j // hw] += p[j] / (2 * 2 * hw)  # heads, blocks, queries of a frame
                else:
                    for j in range(6):
                        cross[i][j] += p[j] / (2 * 2)
    assert rows["cond"][0] == Row("a cat on a mat", 6, {"cat": [1], "mat": [4]})
    assert differences("temporal", torch.tensor([temporal]), want["temporal"]) is None
    assert differences("cross", torch.tensor([cross]), want["cross"]) is None
    mat = torch.tensor([[c[4] for c in cross]]).reshape(1, f, h, w)
    assert differences("token/mat", mat, want["token/mat"]) is None


def test_consisid_transformer_batch_with_a_zero_padded_row() -> None:
    """ConsisID has no pipeline that runs here (diffusers' ConsisIDPipeline needs OpenCV): its
    transformer alone, on a batch of two rows whose text (CogVideoX's T5 layout: joint [text, video],
    no mask) the second row zero-pads after 5 of its 8 tokens. Per row, ``cross`` over the row's own
    real tokens (NaN past them) and ``temporal`` equal the oracle's; the output equals the uncaptured one."""
    from types import SimpleNamespace

    from tiny_models import consisid

    model, kwargs = consisid()
    text = torch.randn(2, 8, 8)
    text[1, 5:] = 0
    kwargs.update(
        hidden_states=torch.randn(2, 2, 4, 8, 8), encoder_hidden_states=text, timestep=torch.tensor([500, 500]),
        id_vit_hidden=[torch.ones(2, 2, 2)], id_cond=torch.ones(2, 2),
    )  # fmt: skip
    with torch.no_grad():
        plain = model(**kwargs)[0]
    oracle = Oracle(
        SimpleNamespace(transformer=model), (Site(r"transformer_blocks\.\d+\.attn1", "joint"),), (2, 4, 4)
    )
    try:
        with oracle.dispatch():
            with attnmap.capture(model) as rec, oracle, torch.no_grad():
                captured = model(**kwargs)[0]
    finally:
        oracle.close()
    assert torch.equal(plain, captured)
    rows = {"cond": [Row("", 8, {}), Row("", 5, {})]}
    want = oracle.maps(rows, cfg="batched", steps=1)[(0, "cond")]
    problems = [differences(name, rec.get(name, step=0), value) for name, value in want.items()]
    assert not any(problems), problems
