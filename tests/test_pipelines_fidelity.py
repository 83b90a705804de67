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

from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
import torch

import attnmap
from pipeline_oracle import Oracle, Row, Site, Text, branch_rows, marked
from tiny_pipelines import PIPELINES, RUNS

pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning",
    "ignore::DeprecationWarning",
    "ignore:In CPU autocast:UserWarning",
)

Grid = tuple[int, int, int]
ATOL = 2e-6


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
    return pipe(**RUNS[family], **kwargs, generator=torch.Generator().manual_seed(0)).frames


#: the variant whose frames are decoded (the others compare the denoised latents, which the VAE
#: decodes; one decode per family shows that capture leaves the VAE's own attention alone)
DECODED = "shorter-negative"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pipeline_maps_equal_the_oracle_per_step_branch_and_row(family: str, variant: str) -> None:
    fam = FAMILIES[family]
    call = {**fam.guidance, **VARIANTS[variant], "output_type": "pt" if variant == DECODED else "latent"}
    pipe = pipeline(family)
    plain = run_pipeline(pipe, family, {k: clean(v) for k, v in call.items()})

    oracle = Oracle(pipe, fam.sites, fam.grid, fam.denoisers)
    try:
        with oracle.dispatch():
            with attnmap.capture(pipe, branch="both", keep_cross=True) as rec, oracle:
                captured = run_pipeline(pipe, family, call)
    finally:
        oracle.close()

    prompts = as_list(call["prompt"], 1)
    per_prompt = int(call.get("num_videos_per_prompt", 1)) if fam.videos_per_prompt else 1
    negatives = as_list(call["negative_prompt"], len(prompts))
    rows = branch_rows(getattr(pipe, fam.text.tokenizer), fam.text, prompts, negatives, per_prompt)
    steps = int(RUNS[family]["num_inference_steps"])
    want = oracle.maps(rows, cfg=fam.cfg, steps=steps)

    problems = []
    assert plain.shape[0] == len(rows["cond"]), (
        f"{family}: {plain.shape[0]} videos for {len(rows['cond'])} rows"
    )
    if not torch.equal(plain, captured):
        problems.append("the frames differ from the run without capture")
    meta = rec.metadata.get("rows")
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


def test_the_oracle_rows_agree_with_what_the_text_encoder_saw() -> None:
    """The oracle's real length and word tokens per row, from the tokenizer, against the ids and mask the
    pipeline gave its text encoder (HunyuanVideo: a template whose first tokens are cropped)."""
    pipe = pipeline("hunyuanvideo")
    text = FAMILIES["hunyuanvideo"].text
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = pipe.text_encoder.register_forward_pre_hook(
        lambda m, a, k: seen.append((k["input_ids"], k["attention_mask"])), with_kwargs=True
    )
    prompts = ["a (cat) on a (mat)", "the red (dog) runs in the (garden)", ""]
    run = RUNS["hunyuanvideo"]
    try:
        pipe.encode_prompt(
            [marked(p)[0] for p in prompts],
            prompt_template=run["prompt_template"],
            max_sequence_length=run["max_sequence_length"],
        )
    finally:
        handle.remove()
    ids, mask = seen[0]
    tok = pipe.tokenizer
    assert ids.shape[1] == text.crop + text.length
    for i, prompt in enumerate(prompts):
        row: Row = text.row(tok, prompt)
        assert row.text_len == int(mask[i, text.crop :].sum()) == len(marked(prompt)[0].split()) + 1
        for word, positions in row.targets.items():
            assert [tok.convert_ids_to_tokens(int(ids[i, text.crop + p])) for p in positions] == [word]


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
