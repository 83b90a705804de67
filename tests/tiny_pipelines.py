"""Tiny, randomly initialised diffusers video pipelines, built offline from their config classes.

Each ``<family>_pipeline()`` returns a pipeline of tiny random parts whose text side is real: a
word-level tokenizer (:func:`tiny_models.tokenizer`) and a real text encoder class of the family, so
that the pipeline pads, masks and templates its prompts as it does at full size. :data:`RUNS` gives
the keyword arguments of one short run of each (a few latent frames of a few tokens, two steps);
every run takes about a tenth of a second of CPU time (the VAE's decoding as much again). Each
family keeps its own padding (``padding="max_length"`` and its mask, or none), to a short
``max_sequence_length``. Import from tests as
``from tiny_pipelines import PIPELINES, RUNS``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from tiny_models import (
    cogvideox_pipeline,
    hunyuan_pipeline,
    ltx_pipeline,
    tokenizer,
    wan22_pipeline,
    wan_pipeline,
)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


def _t5(seed: int, d_model: int = 32) -> Any:
    from transformers import T5Config, T5EncoderModel

    _seed(seed)
    return T5EncoderModel(
        T5Config(vocab_size=64, d_model=d_model, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    ).eval()  # fmt: skip


def mochi_pipeline(seed: int = 0) -> Any:
    """A diffusers MochiPipeline (its VAE and pipeline hard-code 12 latent channels): 13 frames of
    32x32 make the grid (3, 2, 2)."""
    from diffusers import (
        AutoencoderKLMochi,
        FlowMatchEulerDiscreteScheduler,
        MochiPipeline,
        MochiTransformer3DModel,
    )

    _seed(seed)
    transformer = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=12, out_channels=None, qk_norm="rms_norm", text_embed_dim=32, time_embed_dim=4,
        activation_fn="swiglu", max_sequence_length=16,
    ).eval()  # fmt: skip
    vae = AutoencoderKLMochi(
        latent_channels=12, out_channels=3, encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1),
    ).eval()  # fmt: skip
    return MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=_t5(seed), tokenizer=tokenizer(),
        transformer=transformer,
    )  # fmt: skip


#: HunyuanVideo's prompt template shaped for :func:`tiny_models.tokenizer` as its real one is for Llama:
#: the prompt between an instruction (<s> and 4 tokens, cropped by the pipeline) and an end-of-turn token
HUNYUAN_TEMPLATE_EOT = {"template": "describe the video : {} </s>", "crop_start": 5}

_VIDEO = {"num_inference_steps": 2}

#: family -> builder of its tiny pipeline
PIPELINES: dict[str, Callable[[], Any]] = {
    "wan": wan_pipeline,
    "wan2.2": wan22_pipeline,
    "ltx": ltx_pipeline,
    "cogvideox": cogvideox_pipeline,
    "hunyuanvideo": hunyuan_pipeline,
    "mochi": mochi_pipeline,
}

#: family -> the keyword arguments of one run (size, steps, the family's text length)
RUNS: dict[str, dict[str, Any]] = {
    "wan": {**_VIDEO, "num_frames": 9, "height": 32, "width": 32, "max_sequence_length": 16},
    "wan2.2": {**_VIDEO, "num_frames": 9, "height": 32, "width": 32, "max_sequence_length": 16},
    "ltx": {**_VIDEO, "num_frames": 9, "height": 32, "width": 32, "max_sequence_length": 16},
    "cogvideox": {**_VIDEO, "num_frames": 9, "height": 32, "width": 32, "max_sequence_length": 16},
    "hunyuanvideo": {
        **_VIDEO,
        "num_frames": 9,
        "height": 32,
        "width": 32,
        "max_sequence_length": 12,
        "prompt_template": HUNYUAN_TEMPLATE_EOT,
    },
    "mochi": {**_VIDEO, "num_frames": 13, "height": 32, "width": 32, "max_sequence_length": 16},
}
