"""Tiny, randomly initialised real models and pipelines, built offline from their config classes.

Each ``<family>()`` builder returns ``(model, kwargs)``: the model in eval mode and the keyword
arguments of one forward. Import from tests as ``from tiny_models import wan, wan_pipeline``.
Sizes follow /work/shared/TINY_MODELS.md; every model runs in a few milliseconds on a CPU.
"""

from __future__ import annotations

import os
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = (
    "a romantic kiss between man and woman with flowers the red ball dog cat runs in garden "
    "heroic warrior fighting fierce dragon sky blue"
).split()


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


def wan(seed: int = 0, *, text_len: int = 16, i2v: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers WanTransformer3DModel: 2 blocks, 2 heads of 16; grid (3, 4, 4), text 16.

    ``i2v``: the image-to-video variant, with 6 image-context tokens (its attention processor
    takes the text as the last 512 context tokens, so the text is 512 long).
    """
    from diffusers import WanTransformer3DModel

    _seed(seed)
    extra: dict[str, Any] = {"image_dim": 24, "added_kv_proj_dim": 32} if i2v else {}
    text_len = 512 if i2v else text_len
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, **extra,
    ).eval()  # fmt: skip
    kwargs = {
        "hidden_states": torch.randn(1, 4, 3, 8, 8),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, text_len, 32),
        "return_dict": False,
    }
    if i2v:
        kwargs["encoder_hidden_states_image"] = torch.randn(1, 6, 24)
    return model, kwargs


def cogvideox(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers CogVideoXTransformer3DModel: joint text-first; grid (3, 4, 4), text 16."""
    from diffusers import CogVideoXTransformer3DModel

    _seed(seed)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16,
    ).eval()  # fmt: skip
    kwargs = {
        "hidden_states": torch.randn(1, 3, 4, 8, 8),
        "encoder_hidden_states": torch.randn(1, 16, 32),
        "timestep": torch.tensor([500]),
        "return_dict": False,
    }
    return model, kwargs


def hunyuan(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers HunyuanVideoTransformer3DModel: joint video-first with a key-padding mask; grid (3, 4, 4)."""
    from diffusers import HunyuanVideoTransformer3DModel

    _seed(seed)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=16,
        rope_axes_dim=(4, 6, 6),
    ).eval()  # fmt: skip
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[:, 9:] = False
    kwargs = {
        "hidden_states": torch.randn(1, 4, 3, 8, 8),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 12, 32),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(1, 16),
        "guidance": torch.tensor([3000.0]),
        "return_dict": False,
    }
    return model, kwargs


def ltx(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers LTXVideoTransformer3DModel: self + cross with an additive mask; grid (3, 8, 8), text 12."""
    from diffusers import LTXVideoTransformer3DModel

    _seed(seed)
    model = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=16, cross_attention_dim=32, num_layers=2, caption_channels=24,
    ).eval()  # fmt: skip
    mask = torch.ones(1, 12)
    mask[:, 9:] = 0
    kwargs = {
        "hidden_states": torch.randn(1, 192, 8),
        "encoder_hidden_states": torch.randn(1, 12, 24),
        "timestep": torch.tensor([500]),
        "encoder_attention_mask": mask,
        "num_frames": 3,
        "height": 8,
        "width": 8,
        "return_dict": False,
    }
    return model, kwargs


def vjepa2(seed: int = 0, attn: str = "sdpa") -> tuple[torch.nn.Module, dict[str, Any]]:
    """transformers VJEPA2Model: tubelet 2x8x8 on 4x32x32 -> grid (2, 4, 4)."""
    from transformers import VJEPA2Config, VJEPA2Model

    _seed(seed)
    cfg = VJEPA2Config(
        patch_size=8, crop_size=32, frames_per_clip=4, tubelet_size=2, hidden_size=32, num_attention_heads=2,
        num_hidden_layers=2, mlp_ratio=2.0, num_pooler_layers=1, pred_hidden_size=32,
        pred_num_attention_heads=2, pred_num_hidden_layers=2, pred_num_mask_tokens=2, pred_mlp_ratio=2.0,
    )  # fmt: skip
    model = VJEPA2Model._from_config(cfg, attn_implementation=attn).eval()
    return model, {"pixel_values_videos": torch.randn(1, 4, 3, 32, 32)}


def videomae(seed: int = 0, attn: str = "sdpa") -> tuple[torch.nn.Module, dict[str, Any]]:
    """transformers VideoMAEModel: tubelet 2x8x8 on 4x32x32 -> grid (2, 4, 4)."""
    from transformers import VideoMAEConfig, VideoMAEModel

    _seed(seed)
    cfg = VideoMAEConfig(
        image_size=32, patch_size=8, num_channels=3, num_frames=4, tubelet_size=2, hidden_size=32,
        num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    )  # fmt: skip
    model = VideoMAEModel._from_config(cfg, attn_implementation=attn).eval()
    return model, {"pixel_values": torch.randn(1, 4, 3, 32, 32)}


def timesformer(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """transformers TimesformerModel (eager only): divided space-time, grid (4, 4, 4) + CLS."""
    from transformers import TimesformerConfig, TimesformerModel

    _seed(seed)
    cfg = TimesformerConfig(
        image_size=32, patch_size=8, num_channels=3, num_frames=4, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64,
    )  # fmt: skip
    model = TimesformerModel._from_config(cfg, attn_implementation="eager").eval()
    return model, {"pixel_values": torch.randn(1, 4, 3, 32, 32)}


def timm_vit(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """timm VisionTransformer with a CLS token: 32x32 image, patch 8 -> grid (1, 4, 4), prefix 1."""
    from timm.models.vision_transformer import VisionTransformer

    _seed(seed)
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=0
    ).eval()
    return model, {"x": torch.randn(1, 3, 32, 32)}


# -- whole pipelines -----------------------------------------------------------------------


def tokenizer(words: tuple[str, ...] = WORDS) -> Any:
    """A word-level fast tokenizer: <pad>=0, </s>=1, <unk>=2, then ``words``; appends </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def wan_pipeline(seed: int = 0) -> Any:
    """A diffusers WanPipeline of tiny random parts (run 9 frames of 32x32: grid (3, 2, 2))."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    _seed(seed)
    encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
        )
    ).eval()  # fmt: skip
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    ).eval()  # fmt: skip
    transformer, _ = wan(seed)
    return WanPipeline(
        tokenizer=tokenizer(),
        text_encoder=encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )


def cogvideox_pipeline(seed: int = 0) -> Any:
    """A diffusers CogVideoXPipeline of tiny random parts (9 frames of 32x32, max_sequence_length=16)."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    _seed(seed)
    encoder = T5EncoderModel(
        T5Config(
            vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
        )
    ).eval()  # fmt: skip
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()  # fmt: skip
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16,
    ).eval()  # fmt: skip
    return CogVideoXPipeline(
        tokenizer=tokenizer(), text_encoder=encoder, vae=vae, transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(),
    )  # fmt: skip


FAMILIES = {
    "wan": wan,
    "cogvideox": cogvideox,
    "hunyuan": hunyuan,
    "ltx": ltx,
    "vjepa2": vjepa2,
    "videomae": videomae,
    "timesformer": timesformer,
    "timm_vit": timm_vit,
}
