"""attnmap.capture on whole diffusers pipelines, called the way people call them.

``with attnmap.capture(pipe) as rec: pipe("a (cat) on a mat")``: the marks are stripped from the
prompt the pipeline encodes, the targets found there, steps advance at the scheduler's step; a
prompt template and its crop move the tokens (HunyuanVideo); the video size comes from the
pipeline's own VAE factors (LTX names them differently); Wan 2.2's two experts merged or apart.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch

import attnmap
from tiny_models import (
    HUNYUAN_TEMPLATE,
    hunyuan_pipeline,
    ltx_pipeline,
    softmax64,
    tokenizer,
    wan22_pipeline,
    wan_pipeline,
)
from tiny_models import AttentionLog as SdpaLog

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

ARGS = {"num_frames": 9, "height": 32, "width": 32, "num_inference_steps": 2, "output_type": "pt"}


def probs(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) in float64, mean over heads: [B, Nq, Nk]."""
    return softmax64(q, k, mask).mean(1)


def close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float = 2e-6) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.double() - want.double()).abs().max().item()
    assert err <= atol, f"{name}: max abs error {err:.3g} > {atol}"


def test_a_pipeline_called_with_a_marked_prompt_is_captured_as_it_is() -> None:
    pipe = wan_pipeline()
    plain = pipe("a red ball and a dog", generator=torch.Generator().manual_seed(0), **ARGS).frames
    log = SdpaLog(pipe.transformer, ["blocks.0.attn2", "blocks.1.attn2"])
    with attnmap.capture(pipe) as rec, log:
        captured = pipe("a (red) ball and a (dog)", generator=torch.Generator().manual_seed(0), **ARGS).frames
    log.close()
    assert torch.equal(plain, captured), "the pipeline must encode the prompt without the marks"
    assert rec.prompt == "a red ball and a dog" and rec.targets == {"red": [1], "dog": [5]}
    assert rec.steps == [0, 1]  # advanced at each scheduler step, no callback needed
    assert len(log.calls) == 2 * 2 * 2  # steps x CFG branches (cond first) x blocks
    for step in range(2):
        cond = log.calls[4 * step : 4 * step + 2]
        cross = torch.stack([probs(q, k, m) for _, q, k, m, _ in cond]).mean(0)
        close(f"red step {step}", rec.get("token/red", step=step), cross[..., 1].reshape(1, 3, 2, 2))
        close(f"dog step {step}", rec.get("token/dog", step=step), cross[..., 5].reshape(1, 3, 2, 2))


def test_a_callback_and_the_scheduler_step_advance_the_step_once() -> None:
    pipe = wan_pipeline()
    seen: list[int] = []
    with attnmap.capture(pipe, targets=["ball"]) as rec:

        def callback(p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            seen.append(rec.current_step)
            return rec.callback(p, i, t, kwargs)

        pipe("a red ball", callback_on_step_end=callback, guidance_scale=1.0, **ARGS)
    assert seen == [1, 2] and rec.steps == [0, 1]


def test_a_prompt_template_and_its_crop_move_the_targets_to_the_words_the_denoiser_sees() -> None:
    pipe = hunyuan_pipeline()
    tok = tokenizer(bos=True)
    assert tok("a red ball")["input_ids"][0] == tok.bos_token_id  # Llama-like: <s> first
    log = SdpaLog(pipe.transformer, ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"])
    with attnmap.capture(pipe, reductions=("cross",)) as rec, log:
        pipe(
            "a (red) ball",
            prompt_template=HUNYUAN_TEMPLATE,
            max_sequence_length=8,
            guidance_scale=1.0,
            **ARGS,
        )
    log.close()
    # the encoder sees <s> describe the video : a red ball; the pipeline crops the first 5 tokens,
    # so the denoiser's text is "a red ball ..." and red is its token 1 (2 in the prompt alone, after <s>)
    assert rec.targets == {"red": [1]}
    nv = 3 * 4 * 4
    step0 = log.calls[:2]
    cross = torch.stack([probs(q, k, m)[:, :nv, nv:] for _, q, k, m, _ in step0]).mean(0)  # video first
    close("red", rec.get("token/red", step=0), cross[..., 1].reshape(1, 3, 4, 4))
    assert (cross[..., 1] - cross[..., 2]).abs().max() > 1e-4  # the next word would differ


def test_the_video_size_comes_from_the_pipelines_own_vae_factors() -> None:
    pipe = ltx_pipeline()  # vae_temporal_compression_ratio = vae_spatial_compression_ratio = 4
    with attnmap.capture(pipe) as rec:
        frames = pipe("a (red) ball", max_sequence_length=8, **ARGS).frames
    f, h, w = frames.shape[1], frames.shape[3], frames.shape[4]
    assert rec.metadata["video"] == {"fps": None, "frames": f, "height": h, "width": w}
    assert rec.metadata["vae_stride"] == [4, 4, 4] and rec.metadata["grid"] == [3, 8, 8]


@pytest.mark.parametrize("experts", ["merge", "apart"])
def test_wan22_experts_are_merged_or_kept_apart(experts: str) -> None:
    pipe = wan22_pipeline()
    high = SdpaLog(pipe.transformer, ["blocks.0.attn2", "blocks.1.attn2"])
    low = SdpaLog(pipe.transformer_2, ["blocks.0.attn2", "blocks.1.attn2"])
    with attnmap.capture(pipe, experts=experts) as rec, high, low:
        pipe("a (red) ball", guidance_scale=1.0, **ARGS)
    high.close()
    low.close()
    assert len(high.calls) == len(low.calls) == 2  # step 0 by the high-noise expert, step 1 by the other
    second = "token/red" if experts == "merge" else "transformer_2/token/red"
    assert "token/red" in rec.names and (second in rec.names)
    assert any(n.startswith("transformer_2/") for n in rec.names) == (experts == "apart")
    for step, log, name in ((0, high, "token/red"), (1, low, second)):
        cross = torch.stack([probs(q, k, m) for _, q, k, m, _ in log.calls]).mean(0)
        close(f"step {step}", rec.get(name, step=step), cross[..., 1].reshape(1, 3, 2, 2))
    if experts == "apart":
        with pytest.raises(ValueError, match="no map 'token/red' recorded for step=1"):
            rec.get("token/red", step=1)
