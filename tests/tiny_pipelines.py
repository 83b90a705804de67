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


def _umt5_like(seed: int) -> Any:
    from transformers import UMT5Config, UMT5EncoderModel

    _seed(seed)
    return UMT5EncoderModel(
        UMT5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    ).eval()  # fmt: skip


def _retext(transformer: Any, dim: int) -> Any:
    """``transformer`` rebuilt from its config with text of ``dim`` channels (same seed, same weights elsewhere)."""
    torch.manual_seed(0)
    return type(transformer)(**{**transformer.config, "text_dim": dim}).eval()


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


def skyreels_v2_pipeline(seed: int = 0) -> Any:
    """A diffusers SkyReelsV2Pipeline (Wan's layout, UniPC flow scheduler): 9 frames of 32x32 make the
    grid (3, 2, 2)."""
    from types import SimpleNamespace

    import diffusers.pipelines.skyreels_v2.pipeline_skyreels_v2 as module
    from diffusers import AutoencoderKLWan, SkyReelsV2Pipeline, UniPCMultistepScheduler

    from tiny_models import skyreels_v2

    if not hasattr(
        module, "ftfy"
    ):  # its prompt_clean calls ftfy.fix_text unguarded; on ASCII text it is the identity
        module.ftfy = SimpleNamespace(fix_text=lambda text: text)
    encoder = _umt5_like(seed)
    _seed(seed)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    ).eval()  # fmt: skip
    transformer, _ = skyreels_v2(seed)
    transformer = _retext(transformer, 32)
    return SkyReelsV2Pipeline(
        tokenizer=tokenizer(), text_encoder=encoder, transformer=transformer, vae=vae,
        scheduler=UniPCMultistepScheduler(flow_shift=8.0, use_flow_sigmas=True),
    )  # fmt: skip


def allegro_pipeline(seed: int = 0) -> Any:
    """A diffusers AllegroPipeline: 9 frames of 32x32 make the grid (3, 2, 2) (its VAE tiles, as
    diffusers' own tests run it)."""
    from diffusers import AllegroPipeline, AllegroTransformer3DModel, AutoencoderKLAllegro, DDIMScheduler

    _seed(seed)
    transformer = AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, num_layers=2,
        cross_attention_dim=24, sample_width=8, sample_height=8, sample_frames=8, caption_channels=32,
    ).eval()  # fmt: skip
    vae = AutoencoderKLAllegro(
        in_channels=3, out_channels=3, down_block_types=("AllegroDownBlock3D",) * 4,
        up_block_types=("AllegroUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    ).eval()  # fmt: skip
    vae.enable_tiling()
    return AllegroPipeline(
        tokenizer=tokenizer(),
        text_encoder=_t5(seed),
        vae=vae,
        transformer=transformer,
        scheduler=DDIMScheduler(),
    )


def latte_pipeline(seed: int = 0) -> Any:
    """A diffusers LattePipeline (an image VAE, frame by frame): 2 frames of 32x32 make the grid (2, 2, 2)."""
    from diffusers import AutoencoderKL, DDIMScheduler, LattePipeline, LatteTransformer3DModel

    _seed(seed)
    transformer = LatteTransformer3DModel(
        sample_size=4, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=32,
        in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        video_length=2,
    ).eval()  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), latent_channels=4, norm_num_groups=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    ).eval()  # fmt: skip
    return LattePipeline(
        tokenizer=tokenizer(),
        text_encoder=_t5(seed),
        vae=vae,
        transformer=transformer,
        scheduler=DDIMScheduler(),
    )


def _safety_checker() -> Any:
    """Cosmos' guardrail stand-in: every prompt and video passes (its real checker is a large model)."""
    from diffusers.configuration_utils import ConfigMixin
    from diffusers.models.modeling_utils import ModelMixin

    class SafetyChecker(ModelMixin, ConfigMixin):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("_device", torch.zeros(1), persistent=False)

        def check_text_safety(self, prompt: str) -> bool:
            return True

        def check_video_safety(self, frames: Any) -> Any:
            return frames

    return SafetyChecker()


def cosmos_pipeline(seed: int = 0) -> Any:
    """A diffusers CosmosTextToWorldPipeline (EDM Euler): 9 frames of 32x32 make the grid (3, 4, 4)."""
    from diffusers import (
        AutoencoderKLCosmos,
        CosmosTextToWorldPipeline,
        CosmosTransformer3DModel,
        EDMEulerScheduler,
    )

    _seed(seed)
    transformer = CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2,
        text_embed_dim=32, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=True, extra_pos_embed_type="learnable",
    ).eval()  # fmt: skip
    vae = AutoencoderKLCosmos(
        in_channels=3, out_channels=3, latent_channels=4, encoder_block_out_channels=(8, 8, 8, 8),
        decode_block_out_channels=(8, 8, 8, 8), attention_resolutions=(8,), resolution=64, num_layers=2,
        patch_size=4, patch_type="haar", scaling_factor=1.0, spatial_compression_ratio=4,
        temporal_compression_ratio=4,
    ).eval()  # fmt: skip
    scheduler = EDMEulerScheduler(
        sigma_min=0.002, sigma_max=80, sigma_data=0.5, sigma_schedule="karras", num_train_timesteps=1000,
        prediction_type="epsilon", rho=7.0, final_sigmas_type="sigma_min",
    )  # fmt: skip
    return CosmosTextToWorldPipeline(
        text_encoder=_t5(seed), tokenizer=tokenizer(), transformer=transformer, vae=vae, scheduler=scheduler,
        safety_checker=_safety_checker(),
    )  # fmt: skip


#: a chat template of a system message and a user prompt, for :func:`tiny_models.tokenizer`
SYSTEM_CHAT_TEMPLATE = (
    "{% for m in messages %}{% set c = m['content'] if m['content'] is string else m['content'][0]['text'] %}"
    "{% if m['role'] == 'system' %}{{ c }} : {% else %}{{ c }} </s>{% endif %}{% endfor %}"
)


def cosmos25_pipeline(seed: int = 0) -> Any:
    """A diffusers Cosmos2_5_PredictBasePipeline run as text-to-world (no image or video): Qwen2.5-VL
    text through a chat template with its system message (kept whole, every layer's states
    normalised and concatenated), no mask: 5 frames of 32x32 make the grid (2, 2, 2)."""
    from diffusers import (
        AutoencoderKLWan,
        Cosmos2_5_PredictBasePipeline,
        CosmosTransformer3DModel,
        UniPCMultistepScheduler,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    _seed(seed)
    transformer = CosmosTransformer3DModel(
        in_channels=17, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2,
        text_embed_dim=32, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=True, extra_pos_embed_type="learnable",
    ).eval()  # fmt: skip
    _seed(seed)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    _seed(seed)
    encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config=_qwen_config(), vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16,
            "num_heads": 2, "out_hidden_size": 16}, vision_end_token_id=63, vision_start_token_id=62,
            image_token_id=61, video_token_id=60,
        )
    ).eval()  # fmt: skip
    tok = tokenizer()
    tok.chat_template = SYSTEM_CHAT_TEMPLATE
    return Cosmos2_5_PredictBasePipeline(
        transformer=transformer, vae=vae, scheduler=UniPCMultistepScheduler(), text_encoder=encoder, tokenizer=tok,
        safety_checker=_safety_checker(),
    )  # fmt: skip


#: a chat template for :func:`tiny_models.tokenizer`, shaped as a chat model's: an instruction, the
#: user's prompt, an end-of-turn token
CHAT_TEMPLATE = (
    "{% for m in messages %}describe the video : {{ m['content'][0]['text'] if m['content'] is not string "
    "else m['content'] }} </s>{% endfor %}"
)


def easyanimate_pipeline(seed: int = 0) -> Any:
    """A diffusers EasyAnimatePipeline (a Qwen2-VL text encoder through a chat template): 5 frames of
    32x32 make the grid (2, 2, 2)."""
    from diffusers import (
        AutoencoderKLMagvit,
        EasyAnimatePipeline,
        EasyAnimateTransformer3DModel,
        FlowMatchEulerDiscreteScheduler,
    )
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    _seed(seed)
    transformer = EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=16, num_layers=2, sample_width=16, sample_height=16, patch_size=2,
    ).eval()  # fmt: skip
    vae = AutoencoderKLMagvit(
        in_channels=3, out_channels=3,
        down_block_types=("SpatialDownBlock3D",) + ("SpatialTemporalDownBlock3D",) * 3,
        up_block_types=("SpatialUpBlock3D",) + ("SpatialTemporalUpBlock3D",) * 3,
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
        spatial_group_norm=False,
    ).eval()  # fmt: skip
    _seed(seed)
    encoder = Qwen2VLForConditionalGeneration(
        Qwen2VLConfig(
            text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "num_key_value_heads": 1, "vocab_size": 64, "rope_parameters": {"rope_type": "default",
                         "mrope_section": [2, 1, 1], "rope_theta": 1e4}},
            vision_config={"depth": 1, "embed_dim": 16, "hidden_size": 16, "num_heads": 2, "in_chans": 3,
                           "patch_size": 4, "spatial_merge_size": 1, "temporal_patch_size": 1},
            image_token_id=60, video_token_id=61, vision_start_token_id=62, vision_end_token_id=63,
        )
    ).eval()  # fmt: skip
    tok = tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return EasyAnimatePipeline(
        vae=vae, text_encoder=encoder, tokenizer=tok, transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )  # fmt: skip


def cogvideox15_pipeline(seed: int = 0) -> Any:
    """CogVideoX 1.5's shape in a CogVideoXPipeline: temporal patches of 2, rotary embeddings, no
    positional ones; 9 frames of 32x32 make the latent (3, 4, 4), padded by the pipeline to 4 frames:
    the grid (2, 2, 2)."""
    from diffusers import CogVideoXTransformer3DModel

    pipe = cogvideox_pipeline(seed)
    _seed(seed)
    pipe.transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
        patch_size_t=2, temporal_compression_ratio=4, max_text_seq_length=16, use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=False,
    ).eval()  # fmt: skip
    return pipe


def _clip(seed: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    _seed(seed)
    return CLIPTextModel(
        CLIPTextConfig(bos_token_id=3, eos_token_id=1, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                       num_hidden_layers=2, pad_token_id=0, vocab_size=64, projection_dim=8)
    ).eval()  # fmt: skip


def _qwen_config(hidden: int = 16) -> dict[str, Any]:
    """A tiny Qwen2.5-VL text config (its multimodal rotary sections sum to half a head)."""
    return {
        "hidden_size": hidden, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "vocab_size": 64, "rope_parameters": {"rope_type": "default",
        "mrope_section": [1, 1, 2], "rope_theta": 1e4},
    }  # fmt: skip


def kandinsky5_pipeline(seed: int = 0) -> Any:
    """A diffusers Kandinsky5T2VPipeline (Qwen2.5-VL text under a prompt template whose instruction it
    crops, a CLIP pooled prompt): 5 frames of 32x32 make the grid (2, 2, 2). Its template and crop are
    instance attributes sized for Qwen's tokenizer; here they are the same shape for :func:`tokenizer`."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        Kandinsky5T2VPipeline,
        Kandinsky5Transformer3DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    _seed(seed)
    vae = AutoencoderKLHunyuanVideo(
        act_fn="silu", block_out_channels=[8, 8], down_block_types=["HunyuanVideoDownBlock3D"] * 2, in_channels=3,
        latent_channels=16, layers_per_block=1, mid_block_add_attention=False, norm_num_groups=4, out_channels=3,
        scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
        up_block_types=["HunyuanVideoUpBlock3D"] * 2,
    ).eval()  # fmt: skip
    _seed(seed)
    encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config=_qwen_config(), vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16,
            "num_heads": 2, "out_hidden_size": 16}, vision_end_token_id=63, vision_start_token_id=62,
            image_token_id=61, video_token_id=60,
        )
    ).eval()  # fmt: skip
    _seed(seed)
    transformer = Kandinsky5Transformer3DModel(
        in_visual_dim=16, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=16, patch_size=(1, 2, 2),
        model_dim=16, ff_dim=32, num_text_blocks=1, num_visual_blocks=2, axes_dims=(1, 1, 2), visual_cond=False,
        attention_type="regular",
    ).eval()  # fmt: skip
    pipe = Kandinsky5T2VPipeline(
        transformer=transformer, vae=vae, text_encoder=encoder, tokenizer=tokenizer(), text_encoder_2=_clip(seed),
        tokenizer_2=tokenizer(bos=True), scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )  # fmt: skip
    pipe.prompt_template = KANDINSKY5_TEMPLATE["template"]
    pipe.prompt_template_encode_start_idx = KANDINSKY5_TEMPLATE["crop_start"]
    return pipe


#: Kandinsky 5's prompt template and crop, shaped for :func:`tiny_models.tokenizer`
KANDINSKY5_TEMPLATE = {"template": "describe the video : {} </s>", "crop_start": 4}


def sana_video_pipeline(seed: int = 0) -> Any:
    """A diffusers SanaVideoPipeline (a Gemma2 text encoder whose tokenizer puts <s> first; its prompts
    get its long default instruction before them, of which it keeps <s> and the tail; linear
    self-attention): 9 frames of 32x32 make the grid (3, 2, 2)."""
    from diffusers import (
        AutoencoderKLWan,
        DPMSolverMultistepScheduler,
        SanaVideoPipeline,
        SanaVideoTransformer3DModel,
    )
    from transformers import Gemma2Config, Gemma2Model

    _seed(seed)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
    ).eval()  # fmt: skip
    _seed(seed)
    encoder = Gemma2Model(
        Gemma2Config(head_dim=8, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                     num_key_value_heads=2, vocab_size=64, pad_token_id=0, bos_token_id=3, eos_token_id=1,
                     attn_implementation="eager")
    ).eval()  # fmt: skip
    _seed(seed)
    transformer = SanaVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=16,
        mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=8, patch_size=(1, 2, 2),
        norm_elementwise_affine=False, norm_eps=1e-6, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()  # fmt: skip
    return SanaVideoPipeline(
        tokenizer=tokenizer(bos=True), text_encoder=encoder, vae=vae, transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )  # fmt: skip


def hunyuan15_pipeline(seed: int = 0) -> Any:
    """A diffusers HunyuanVideo15Pipeline (Qwen2.5-VL text through a chat template of a system message,
    cropped; byT5 for quoted text; CFG through its guider, on): 5 frames of 32x32 make the grid (3, 8, 8).
    Its system message, crop, text lengths and image tokens are instance attributes sized for Qwen's tokenizer; here
    they are the same shape for :func:`tokenizer`."""
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    _seed(seed)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=32,
        image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v",
    ).eval()  # fmt: skip
    _seed(seed)
    vae = AutoencoderKLHunyuanVideo15(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16), layers_per_block=1,
        spatial_compression_ratio=4, temporal_compression_ratio=2, downsample_match_channel=False,
        upsample_match_channel=False,
    ).eval()  # fmt: skip
    _seed(seed)
    encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(**_qwen_config())).eval()
    tok = tokenizer()
    tok.chat_template = SYSTEM_CHAT_TEMPLATE
    pipe = HunyuanVideo15Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder=encoder, tokenizer=tok, text_encoder_2=_t5(seed), tokenizer_2=ByT5Tokenizer(),
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )  # fmt: skip
    pipe.system_message = "describe the video"
    pipe.prompt_template_encode_start_idx = 4  # "describe the video :"
    pipe.tokenizer_max_length = 16
    pipe.tokenizer_2_max_length = 8
    pipe.vision_num_semantic_tokens = 4  # the image context's tokens (zeros in text-to-video)
    return pipe


def ltx2_pipeline(seed: int = 0) -> Any:
    """A diffusers LTX2Pipeline (a Gemma3 text encoder, <s> first and padded on the left; text
    connectors that move each row's real tokens to the front and fill the rest with learnable
    registers, as the released models do; an audio stream): 9 frames of 32x32 make the grid (2, 4, 4)."""
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2Pipeline,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors, LTX2Vocoder
    from transformers import Gemma3TextConfig, Gemma3TextModel

    _seed(seed)
    encoder = Gemma3TextModel(
        Gemma3TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, pad_token_id=0, bos_token_id=3,
                         eos_token_id=1, sliding_window=16)
    ).eval()  # fmt: skip
    _seed(seed)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, qk_norm="rms_norm_across_heads",
        caption_channels=16, rope_double_precision=False, rope_type="split",
    ).eval()  # fmt: skip
    _seed(seed)
    connectors = LTX2TextConnectors(
        caption_channels=16, text_proj_in_factor=3, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=8, video_connector_num_layers=1, video_connector_num_learnable_registers=8,
        audio_connector_num_attention_heads=2, audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=8, connector_rope_base_seq_len=32, rope_theta=10000.0,
        rope_double_precision=False, causal_temporal_positioning=False, rope_type="split",
    ).eval()  # fmt: skip
    _seed(seed)
    vae = AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), layers_per_block=(1, 1), decoder_layers_per_block=(1, 1, 1),
        spatio_temporal_scaling=(True, True), decoder_spatio_temporal_scaling=(True, True),
        decoder_inject_noise=(False, False, False), downsample_type=("spatial", "spatial"),
        upsample_residual=(False, False), upsample_factor=(1, 1), timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False,
    ).eval()  # fmt: skip
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    _seed(seed)
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8,
    ).eval()  # fmt: skip
    _seed(seed)
    vocoder = LTX2Vocoder(
        in_channels=16, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2],
        resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]], leaky_relu_negative_slope=0.1,
        output_sampling_rate=16000,
    ).eval()  # fmt: skip
    return LTX2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, audio_vae=audio_vae, text_encoder=encoder,
        tokenizer=tokenizer(bos=True), connectors=connectors, transformer=transformer, vocoder=vocoder,
    )  # fmt: skip


def motif_video_pipeline(seed: int = 0) -> Any:
    """A diffusers MotifVideoPipeline (a T5Gemma2 encoder, padded with a mask; dual- then single-stream
    joint blocks; guidance through its adaptive projected guider, on): 9 frames of 32x32 make the grid
    (3, 4, 4)."""
    from diffusers import (
        AdaptiveProjectedGuidance,
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        MotifVideoPipeline,
        MotifVideoTransformer3DModel,
    )
    from transformers import T5Gemma2Encoder, T5Gemma2EncoderConfig, T5Gemma2TextConfig

    _seed(seed)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    _seed(seed)
    encoder = T5Gemma2Encoder(
        T5Gemma2EncoderConfig(
            text_config=T5Gemma2TextConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=64, vocab_size=64, max_position_embeddings=128,
                                           head_dim=16, num_key_value_heads=2, dropout_rate=0.0)
        )
    ).eval()  # fmt: skip
    _seed(seed)
    transformer = MotifVideoTransformer3DModel(
        in_channels=33, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=1,
        num_single_layers=1, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm", text_embed_dim=32,
        rope_axes_dim=(4, 4, 4),
    ).eval()  # fmt: skip
    return MotifVideoPipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder=encoder,
        tokenizer=tokenizer(), feature_extractor=None, guider=AdaptiveProjectedGuidance(),
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
    "skyreels-v2": skyreels_v2_pipeline,
    "allegro": allegro_pipeline,
    "latte": latte_pipeline,
    "cosmos": cosmos_pipeline,
    "easyanimate": easyanimate_pipeline,
    "cogvideox1.5": cogvideox15_pipeline,
    "kandinsky5": kandinsky5_pipeline,
    "sana-video": sana_video_pipeline,
    "hunyuanvideo1.5": hunyuan15_pipeline,
    "ltx2": ltx2_pipeline,
    "cosmos2.5": cosmos25_pipeline,
    "motif-video": motif_video_pipeline,
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
    "skyreels-v2": {**_VIDEO, "num_frames": 9, "height": 32, "width": 32, "max_sequence_length": 16},
    "allegro": {
        **_VIDEO,
        "num_frames": 9,
        "height": 32,
        "width": 32,
        "max_sequence_length": 16,
        "clean_caption": False,
    },
    "latte": {**_VIDEO, "video_length": 2, "height": 32, "width": 32, "clean_caption": False},
    "cosmos": {**_VIDEO, "num_frames": 9, "height": 32, "width": 32, "max_sequence_length": 16},
    "easyanimate": {**_VIDEO, "num_frames": 5, "height": 32, "width": 32},  # text padded to 256, fixed
    "cogvideox1.5": {**_VIDEO, "num_frames": 9, "height": 32, "width": 32, "max_sequence_length": 16},
    "kandinsky5": {**_VIDEO, "num_frames": 5, "height": 32, "width": 32, "max_sequence_length": 16},
    "sana-video": {
        **_VIDEO,
        "frames": 9,
        "height": 32,
        "width": 32,
        "max_sequence_length": 16,
        "use_resolution_binning": False,
    },
    "hunyuanvideo1.5": {**_VIDEO, "num_frames": 5, "height": 32, "width": 32},
    # plain guidance only: its spatio-temporal and modality guidance (on by default) run more forwards
    "ltx2": {
        **_VIDEO,
        "num_frames": 5,
        "height": 32,
        "width": 32,
        "max_sequence_length": 16,
        "frame_rate": 25.0,
        "stg_scale": 0.0,
        "audio_stg_scale": 0.0,
        "modality_scale": 1.0,
        "audio_modality_scale": 1.0,
        "guidance_rescale": 0.0,
        "audio_guidance_rescale": 0.0,
        "use_cross_timestep": False,
    },
    "cosmos2.5": {**_VIDEO, "num_frames": 5, "height": 32, "width": 32, "max_sequence_length": 32},
    "motif-video": {**_VIDEO, "num_frames": 9, "height": 32, "width": 32, "max_sequence_length": 16},
}
