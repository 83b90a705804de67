"""Tiny, randomly initialised real models and pipelines, built offline from their config classes.

Each ``<family>()`` builder returns ``(model, kwargs)``: the model in eval mode and the keyword
arguments of one forward. Import from tests as ``from tiny_models import wan, wan_pipeline``.
Sizes follow /work/shared/TINY_MODELS.md; every model runs in a few milliseconds on a CPU.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = (
    "a romantic kiss between man and woman with flowers the red ball dog cat runs in garden "
    "heroic warrior fighting fierce dragon sky blue describe video : on mat"
).split()


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


# -- an independent reference: what each attention entry point saw ------------------------------------
_SDPA = torch.nn.functional.scaled_dot_product_attention
_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class AttentionLog(torch.overrides.TorchFunctionMode):
    """Logs ``(module name, q, k [B, H, N, D], mask, scale)`` of each attention call made inside the
    named modules of ``model``: at torch SDPA, and inside :meth:`dispatch` also at diffusers'
    ``dispatch_attention_fn`` (where a non-SDPA backend such as flex runs). Use it as a context
    manager (after the capture, so that it sees the calls the capture passes on), then ``close()``."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor, Any, Any]] = []
        self.active: list[str] = []
        self.handles: list[Any] = []
        self.inside_dispatch = 0
        mods = dict(model.named_modules())
        for name in names:
            self.handles.append(
                mods[name].register_forward_pre_hook(lambda m, a, n=name: self.active.append(n))
            )
            self.handles.append(mods[name].register_forward_hook(self._pop))

    def _pop(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.active.pop()

    @contextmanager
    def dispatch(self) -> Iterator[None]:
        """Also log at ``dispatch_attention_fn``, where diffusers' modules look it up."""
        import diffusers.models.attention_dispatch as ad

        original = ad.dispatch_attention_fn
        modules = [
            m for m in list(sys.modules.values()) if getattr(m, "dispatch_attention_fn", None) is original
        ]

        def logged(query: Any, key: Any, value: Any, attn_mask: Any = None, *args: Any, **kwargs: Any) -> Any:
            self.inside_dispatch += 1
            try:
                return original(query, key, value, attn_mask, *args, **kwargs)
            finally:
                self.inside_dispatch -= 1
                if self.active:
                    scale = kwargs.get("scale", args[2] if len(args) > 2 else None)
                    self.calls.append(
                        (self.active[-1], query.transpose(1, 2), key.transpose(1, 2), attn_mask, scale)
                    )

        for m in modules:
            m.dispatch_attention_fn = logged
        try:
            yield
        finally:
            for m in modules:
                m.dispatch_attention_fn = original

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        # by name: while a capture is open, torch hands a mode its wrapper of SDPA
        if getattr(func, "__name__", None) == _SDPA.__name__ and self.active and not self.inside_dispatch:
            call = {**dict(zip(_SDPA_NAMES, args)), **kwargs}
            self.calls.append(
                (self.active[-1], call["query"], call["key"], call.get("attn_mask"), call.get("scale"))
            )
        return func(*args, **kwargs)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def softmax64(
    q: torch.Tensor, k: torch.Tensor, mask: Any = None, scale: Optional[float] = None
) -> torch.Tensor:
    """softmax(scale q k^T + mask) in float64, ``[B, H, Nq, Nk]`` (bool masks keep True, float ones add;
    a flex BlockMask keeps its blocks)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    if mask is not None and not isinstance(mask, torch.Tensor):  # a flex BlockMask of whole blocks
        bq, bk = mask.BLOCK_SIZE
        dense = mask.to_dense().bool().repeat_interleave(bq, dim=-2).repeat_interleave(bk, dim=-1)
        mask = dense[..., : q.shape[-2], : k.shape[-2]]
    if mask is not None:
        m = mask if mask.dim() == 4 else mask[:, None, None, :]
        logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.double()
    return torch.softmax(logits, dim=-1)


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


def _wan_like(cls: Any, seed: int, frames: int = 2, **config: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A Wan-shaped transformer (Wan's block layout under another class): grid (frames, 4, 4), text 12."""
    _seed(seed)
    defaults = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                    out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True)  # fmt: skip
    model = cls(**{**defaults, **config}).eval()
    channels = int(model.config.in_channels)
    kwargs = {
        "hidden_states": torch.randn(1, channels, frames, 8, 8),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 12, int(model.config.text_dim)),
        "return_dict": False,
    }
    return model, kwargs


def wan22_ti2v(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Wan 2.2 TI2V-5B's shape: 48 latent channels (its VAE compresses 16x), per-token timesteps."""
    from diffusers import WanTransformer3DModel

    model, kwargs = _wan_like(
        WanTransformer3DModel, seed, in_channels=48, out_channels=48, qk_norm="rms_norm_across_heads"
    )
    kwargs["timestep"] = torch.full((1, 2 * 4 * 4), 500.0)  # expand_timesteps: one per video token
    return model, kwargs


def wan_vace(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers WanVACETransformer3DModel: Wan blocks plus VACE blocks on control latents."""
    from diffusers import WanVACETransformer3DModel

    model, kwargs = _wan_like(
        WanVACETransformer3DModel, seed, qk_norm="rms_norm_across_heads", vace_layers=[0], vace_in_channels=8
    )
    kwargs["control_hidden_states"] = torch.randn(1, 8, 2, 8, 8)
    return model, kwargs


def skyreels_v2(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import SkyReelsV2Transformer3DModel

    return _wan_like(SkyReelsV2Transformer3DModel, seed, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def chronoedit(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import ChronoEditTransformer3DModel

    return _wan_like(ChronoEditTransformer3DModel, seed, attention_head_dim=8, freq_dim=16, qk_norm="rms_norm_across_heads",
                     rope_max_seq_len=64, rope_temporal_skip_len=8)  # fmt: skip


def anyflow(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers AnyFlowTransformer3DModel: Wan-shaped, latents [B, F, C, H, W], per-frame timesteps."""
    from diffusers import AnyFlowTransformer3DModel

    model, kwargs = _wan_like(
        AnyFlowTransformer3DModel, seed, rope_max_seq_len=32, gate_value=0.25, deltatime_type="r"
    )
    kwargs["hidden_states"] = kwargs["hidden_states"].transpose(1, 2).contiguous()
    kwargs["timestep"] = torch.full((1, 2), 500.0)
    kwargs["r_timestep"] = torch.full((1, 2), 250.0)
    return model, kwargs


def helios(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers HeliosTransformer3DModel: history latents (short, mid, long) before the video tokens."""
    from diffusers import HeliosTransformer3DModel

    model, kwargs = _wan_like(
        HeliosTransformer3DModel, seed, qk_norm="rms_norm_across_heads", rope_dim=(4, 4, 4),
        has_multi_term_memory_patch=True, guidance_cross_attn=True, zero_history_timestep=True, is_amplify_history=False,
    )  # fmt: skip
    kwargs.update(
        indices_hidden_states=torch.ones(1, 2), indices_latents_history_short=torch.ones(1, 1),
        indices_latents_history_mid=torch.ones(1, 1), indices_latents_history_long=torch.ones(1, 4),
        latents_history_short=torch.randn(1, 4, 1, 8, 8), latents_history_mid=torch.randn(1, 4, 1, 8, 8),
        latents_history_long=torch.randn(1, 4, 4, 8, 8),
    )  # fmt: skip
    return model, kwargs


def wan_animate(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers WanAnimateTransformer3DModel: Wan blocks with an image context and face adapters."""
    from diffusers import WanAnimateTransformer3DModel

    _seed(seed)
    model = WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12, latent_channels=4,
        out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", image_dim=16, rope_max_seq_len=32,
        motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16, motion_style_dim=8,
        motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
        inject_face_latents_blocks=2,
    ).eval()  # fmt: skip
    kwargs = {
        "hidden_states": torch.randn(1, 12, 21, 8, 8),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(
            1, 512, 16
        ),  # its processor takes the text as the last 512 tokens
        "encoder_hidden_states_image": torch.randn(1, 12, 16),
        "pose_hidden_states": torch.randn(1, 4, 20, 8, 8),
        "face_pixel_values": torch.randn(1, 3, 77, 16, 16),
        "return_dict": False,
    }
    return model, kwargs


def cogvideox15(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """CogVideoX 1.5's shape: temporal patches of 2 and rotary embeddings; grid (2, 4, 4), text 8."""
    from diffusers import CogVideoXTransformer3DModel

    _seed(seed)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2, text_embed_dim=8,
        num_layers=2, sample_width=8, sample_height=8, sample_frames=8, patch_size=2, patch_size_t=2,
        temporal_compression_ratio=4, max_text_seq_length=8, use_rotary_positional_embeddings=True,
    ).eval()  # fmt: skip
    kwargs = {
        "hidden_states": torch.randn(1, 4, 4, 8, 8),
        "encoder_hidden_states": torch.randn(1, 8, 8),
        "timestep": torch.tensor([500]),
        "return_dict": False,
    }
    return model, kwargs


def consisid(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers ConsisIDTransformer3DModel: CogVideoX's joint blocks plus face-identity cross blocks."""
    from diffusers import ConsisIDTransformer3DModel

    _seed(seed)
    model = ConsisIDTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2, text_embed_dim=8,
        num_layers=1, sample_width=8, sample_height=8, sample_frames=8, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=8, cross_attn_interval=1, is_kps=False, is_train_face=True, cross_attn_dim_head=1,
        cross_attn_num_heads=1, LFE_id_dim=2, LFE_vit_dim=2, LFE_depth=5, LFE_dim_head=8, LFE_num_heads=2,
        LFE_num_id_token=1, LFE_num_querie=1, LFE_output_dim=10, LFE_ff_mult=1, LFE_num_scale=1,
    ).eval()  # fmt: skip
    kwargs = {
        "hidden_states": torch.randn(1, 2, 4, 8, 8),
        "encoder_hidden_states": torch.randn(1, 8, 8),
        "timestep": torch.tensor([500]),
        "id_vit_hidden": [torch.ones(1, 2, 2)],
        "id_cond": torch.ones(1, 2),
        "return_dict": False,
    }
    return model, kwargs


def easyanimate(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers EasyAnimateTransformer3DModel: joint text-first; grid (2, 4, 4), text 16."""
    from diffusers import EasyAnimateTransformer3DModel

    _seed(seed)
    model = EasyAnimateTransformer3DModel(
        attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=2, num_layers=2, out_channels=4,
        patch_size=2, sample_height=60, sample_width=90, text_embed_dim=16, time_embed_dim=8,
        time_position_encoding_type="3d_rope", timestep_activation_fn="silu",
    ).eval()  # fmt: skip
    kwargs = {
        "hidden_states": torch.randn(1, 4, 2, 8, 8),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 16, 16),
        "return_dict": False,
    }
    return model, kwargs


def mochi(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers MochiTransformer3DModel, batch 2 with 16 and 10 real text tokens: it calls attention
    once per row, over the video then that row's real text."""
    from diffusers import MochiTransformer3DModel

    _seed(seed)
    model = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4,
        activation_fn="swiglu", max_sequence_length=16,
    ).eval()  # fmt: skip
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 10:] = False
    kwargs = {
        "hidden_states": torch.randn(2, 4, 2, 8, 8),
        "encoder_hidden_states": torch.randn(2, 16, 16),
        "timestep": torch.tensor([500, 500]),
        "encoder_attention_mask": mask,
        "return_dict": False,
    }
    return model, kwargs


def motif_video(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers MotifVideoTransformer3DModel: dual- then single-stream joint blocks, video first."""
    from diffusers import MotifVideoTransformer3DModel

    _seed(seed)
    model = MotifVideoTransformer3DModel(
        in_channels=33, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=1,
        num_single_layers=1, num_decoder_layers=0, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm",
        norm_type="layer_norm", text_embed_dim=32, image_embed_dim=4, rope_theta=256.0, rope_axes_dim=(4, 4, 4),
        enable_text_cross_attention_dual=False, enable_text_cross_attention_single=False,
    ).eval()  # fmt: skip
    kwargs = {
        "hidden_states": torch.randn(1, 33, 3, 4, 4),
        "encoder_hidden_states": torch.randn(1, 12, 32),
        "timestep": torch.tensor([500]),
        "return_dict": False,
    }
    return model, kwargs


def allegro(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers AllegroTransformer3DModel: self + cross through torch SDPA; grid (2, 4, 4), text 16."""
    from diffusers import AllegroTransformer3DModel

    _seed(seed)
    model = AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1,
        cross_attention_dim=16, sample_width=8, sample_height=8, sample_frames=8, caption_channels=8,
    ).eval()  # fmt: skip
    kwargs = {
        "hidden_states": torch.randn(1, 4, 2, 8, 8),
        "encoder_hidden_states": torch.randn(1, 16, 8),
        "timestep": torch.tensor([500]),
        "return_dict": False,
    }
    return model, kwargs


def cosmos(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers CosmosTransformer3DModel: self + cross with an additive text mask; grid (2, 4, 4), text 12."""
    from diffusers import CosmosTransformer3DModel

    _seed(seed)
    model = CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2,
        text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=True, extra_pos_embed_type="learnable",
    ).eval()  # fmt: skip
    mask = torch.ones(1, 12)
    mask[:, 9:] = 0
    kwargs = {
        "hidden_states": torch.randn(1, 4, 2, 8, 8),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 12, 16),
        "attention_mask": mask,
        "fps": 30,
        "padding_mask": torch.zeros(1, 1, 8, 8),
        "return_dict": False,
    }
    return model, kwargs


def kandinsky5(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers Kandinsky5Transformer3DModel: latents [B, F, H, W, C]; text blocks, then visual
    self + cross blocks; grid (2, 4, 4), text 8."""
    from diffusers import Kandinsky5Transformer3DModel

    _seed(seed)
    model = Kandinsky5Transformer3DModel(
        in_visual_dim=16, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=16, patch_size=(1, 2, 2),
        model_dim=16, ff_dim=32, num_text_blocks=1, num_visual_blocks=2, axes_dims=(1, 1, 2), visual_cond=False,
        attention_type="regular",
    ).eval()  # fmt: skip
    kwargs = {
        "hidden_states": torch.randn(1, 2, 8, 8, 16),
        "encoder_hidden_states": torch.randn(1, 8, 16),
        "timestep": torch.tensor([500.0]),
        "pooled_projections": torch.randn(1, 8),
        "visual_rope_pos": [torch.arange(2), torch.arange(4), torch.arange(4)],
        "text_rope_pos": torch.arange(8),
        "return_dict": False,
    }
    return model, kwargs


def ltx2(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers LTX2VideoTransformer3DModel: video and audio streams; video self, video -> text and
    video -> audio cross-attention; grid (2, 4, 4), text 16, audio 9."""
    from diffusers import LTX2VideoTransformer3DModel

    _seed(seed)
    model = LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, qk_norm="rms_norm_across_heads",
        caption_channels=16, rope_double_precision=False,
    ).eval()  # fmt: skip
    kwargs = {
        "hidden_states": torch.randn(1, 2 * 4 * 4, 4),
        "audio_hidden_states": torch.randn(1, 9, 4),
        "encoder_hidden_states": torch.randn(1, 16, 16),
        "audio_encoder_hidden_states": torch.randn(1, 16, 16),
        "timestep": torch.tensor([500.0]),
        "encoder_attention_mask": torch.ones(1, 16, dtype=torch.bool),
        "num_frames": 2,
        "height": 4,
        "width": 4,
        "audio_num_frames": 9,
        "fps": 25.0,
        "return_dict": False,
    }
    return model, kwargs


def sana_video(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers SanaVideoTransformer3DModel: linear self-attention (no softmax) + softmax cross-attention."""
    from diffusers import SanaVideoTransformer3DModel

    _seed(seed)
    model = SanaVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=16,
        mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=8, patch_size=(1, 2, 2),
        norm_elementwise_affine=False, norm_eps=1e-6, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()  # fmt: skip
    kwargs = {
        "hidden_states": torch.randn(1, 16, 2, 8, 8),
        "encoder_hidden_states": torch.randn(1, 12, 16),
        "timestep": torch.tensor([500]),
        "return_dict": False,
    }
    return model, kwargs


def latte(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers LatteTransformer3DModel: divided attention, space (frames in the batch, + text cross)
    then time (positions in the batch); grid (2, 4, 4), text 8."""
    from diffusers import LatteTransformer3DModel

    _seed(seed)
    model = LatteTransformer3DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=4, num_attention_heads=2, caption_channels=8,
        in_channels=4, cross_attention_dim=8, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        video_length=2,
    ).eval()  # fmt: skip
    kwargs = {
        "hidden_states": torch.randn(1, 4, 2, 8, 8),
        "encoder_hidden_states": torch.randn(1, 8, 8),
        "timestep": torch.tensor([500]),
        "enable_temporal_attentions": True,
        "return_dict": False,
    }
    return model, kwargs


def hunyuan_i2v(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """HunyuanVideo I2V's shape (image latents concatenated on the channels); grid (1, 8, 8), text 12."""
    from diffusers import HunyuanVideoTransformer3DModel

    _seed(seed)
    model = HunyuanVideoTransformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=False,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type="latent_concat",
    ).eval()  # fmt: skip
    kwargs = {
        "hidden_states": torch.randn(1, 9, 2, 8, 8),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 12, 16),
        "pooled_projections": torch.randn(1, 8),
        "encoder_attention_mask": torch.ones(1, 12),
        "return_dict": False,
    }
    return model, kwargs


def hunyuan15(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers HunyuanVideo15Transformer3DModel: joint video-first over [image, byT5, text] with an
    outer-product mask; 4 of 6 text and 3 of 4 byT5 tokens real; grid (2, 4, 4)."""
    from diffusers import HunyuanVideo15Transformer3DModel

    _seed(seed)
    model = HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v",
    ).eval()  # fmt: skip
    mask, mask2 = torch.ones(1, 6), torch.ones(1, 4)
    mask[:, 4:] = 0
    mask2[:, 3:] = 0
    kwargs = {
        "hidden_states": torch.randn(1, 4, 2, 4, 4),
        "timestep": torch.tensor([1.0]),
        "encoder_hidden_states": torch.randn(1, 6, 16),
        "encoder_hidden_states_2": torch.randn(1, 4, 8),
        "encoder_attention_mask": mask,
        "encoder_attention_mask_2": mask2,
        "image_embeds": torch.zeros(1, 3, 12),
        "return_dict": False,
    }
    return model, kwargs


def framepack(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers HunyuanVideoFramepackTransformer3DModel: history latents before the video, image and
    text context after it; grid (3, 2, 2)."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    _seed(seed)
    model = HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=None,
        has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True,
    ).eval()  # fmt: skip
    kwargs = {
        "hidden_states": torch.randn(1, 4, 3, 4, 4),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 12, 16),
        "pooled_projections": torch.randn(1, 8),
        "encoder_attention_mask": torch.ones(1, 12),
        "guidance": torch.tensor([500.0]),
        "image_embeds": torch.randn(1, 12, 16),
        "indices_latents": torch.ones(3),
        "latents_clean": torch.randn(1, 4, 2, 4, 4),
        "indices_latents_clean": torch.ones(2),
        "latents_history_2x": torch.randn(1, 4, 2, 4, 4),
        "indices_latents_history_2x": torch.ones(2),
        "latents_history_4x": torch.randn(1, 4, 8, 4, 4),
        "indices_latents_history_4x": torch.ones(8),
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


def tokenizer(words: tuple[str, ...] = WORDS, *, bos: bool = False) -> Any:
    """A word-level fast tokenizer: <pad>=0, </s>=1, <unk>=2, <s>=3, then ``words``; appends </s>
    (``bos``: puts <s> first instead, as Llama's does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<s>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>",
        model_max_length=512,
    )  # fmt: skip


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


def _umt5(seed: int) -> Any:
    from transformers import UMT5Config, UMT5EncoderModel

    _seed(seed)
    return UMT5EncoderModel(
        UMT5Config(
            vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
        )
    ).eval()  # fmt: skip


def wan22_pipeline(seed: int = 0) -> Any:
    """Wan 2.2 A14B's shape: a WanPipeline with two experts, ``transformer`` for the high-noise steps
    (t >= 875) and ``transformer_2`` for the others; 2 steps (t = 1000, 750) run one each."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    encoder = _umt5(seed)
    _seed(seed)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    ).eval()  # fmt: skip
    high, _ = wan(seed)
    low, _ = wan(seed + 1)
    return WanPipeline(
        tokenizer=tokenizer(), text_encoder=encoder, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=high, transformer_2=low, boundary_ratio=0.875,
    )  # fmt: skip


def ltx_pipeline(seed: int = 0) -> Any:
    """A diffusers LTXPipeline of tiny random parts; its VAE compresses 4x in time and space, which the
    pipeline names ``vae_temporal_compression_ratio`` / ``vae_spatial_compression_ratio``."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    _seed(seed)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=1, caption_channels=32,
    ).eval()  # fmt: skip
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False), upsample_factor=(1, 1, 1, 1), timestep_conditioning=False,
        patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False,
    ).eval()  # fmt: skip
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    encoder = T5EncoderModel(
        T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    ).eval()  # fmt: skip
    return LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=encoder, tokenizer=tokenizer(),
        transformer=transformer,
    )  # fmt: skip


#: HunyuanVideo's prompt template, shaped for :func:`tokenizer`: <s>, then 4 template tokens, then the prompt
HUNYUAN_TEMPLATE = {"template": "describe the video : {}", "crop_start": 5}


def hunyuan_pipeline(seed: int = 0) -> Any:
    """A diffusers HunyuanVideoPipeline of tiny random parts (a Llama text encoder whose tokenizer puts
    <s> first, a CLIP one for the pooled prompt); run it with ``prompt_template=HUNYUAN_TEMPLATE``."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    _seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    ).eval()  # fmt: skip
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True,
    ).eval()  # fmt: skip
    llama = LlamaModel(
        LlamaConfig(bos_token_id=3, eos_token_id=1, hidden_size=16, intermediate_size=37, num_attention_heads=4,
                    num_hidden_layers=2, pad_token_id=0, vocab_size=64, hidden_act="gelu")
    ).eval()  # fmt: skip
    clip = CLIPTextModel(
        CLIPTextConfig(bos_token_id=3, eos_token_id=1, hidden_size=8, intermediate_size=37, num_attention_heads=4,
                       num_hidden_layers=2, pad_token_id=0, vocab_size=64, hidden_act="gelu", projection_dim=32)
    ).eval()  # fmt: skip
    return HunyuanVideoPipeline(
        text_encoder=llama, tokenizer=tokenizer(bos=True), transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip, tokenizer_2=tokenizer(),
    )  # fmt: skip


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


def sana_wm(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers SanaWMTransformer3DModel: per block a camera-controlled self-attention (a main and a
    camera branch: gated-delta-net linear attention, softmax SDPA in every 2nd block) and a cross-attention
    to the text (9 of 12 tokens real); identity cameras; grid (2, 4, 4)."""
    from diffusers import SanaWMTransformer3DModel

    _seed(seed)
    model = SanaWMTransformer3DModel(
        in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2, patch_size=(1, 2, 2), softmax_every_n=2,
        linear_head_dim=16, conv_kernel_size=2, use_chunk_plucker_post_attn=False, chunk_plucker_post_attn_blocks=0,
        caption_channels=16, mlp_ratio=2.0,
    ).eval()  # fmt: skip
    camera = torch.zeros(1, 2, 20)  # per frame: camera-to-world 4x4, then fx, fy, cx, cy in pixels
    camera[..., :16] = torch.eye(4).flatten()
    camera[..., 16:] = torch.tensor([8.0, 8.0, 4.0, 4.0])
    mask = torch.ones(1, 12)
    mask[:, 9:] = 0
    kwargs = {
        "hidden_states": torch.randn(1, 4, 2, 8, 8),
        "timestep": torch.full((1, 1, 2), 500.0),  # one per frame
        "encoder_hidden_states": torch.randn(1, 1, 12, 16),
        "encoder_attention_mask": mask,
        "camera_conditions": camera,
        "return_dict": False,
    }
    return model, kwargs


def joyimage_edit(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers JoyImageEditTransformer3DModel: joint attention over [video, text] (no mask); latents
    [B, items, C, F, H, W] as its pipeline passes them ([reference image, target]; the model puts the
    target's frames first on one frame axis); grid (2, 4, 4), text 12."""
    from diffusers import JoyImageEditTransformer3DModel

    _seed(seed)
    model = JoyImageEditTransformer3DModel(
        patch_size=[1, 2, 2], in_channels=16, hidden_size=32, num_attention_heads=2, text_dim=16, num_layers=2,
        rope_dim_list=[4, 6, 6], theta=256,
    ).eval()  # fmt: skip
    kwargs = {
        "hidden_states": torch.randn(1, 2, 16, 1, 8, 8),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 12, 16),
        "return_dict": False,
    }
    return model, kwargs


def kandinsky6(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers Kandinsky6Transformer3DModel: latents [B, F, H, W, C] (noisy, condition, mask); text
    blocks, then fused blocks of video self + cross to text, audio self + cross, and video <-> audio
    cross-attention; grid (2, 4, 4), 6 of 8 text tokens real, audio 9."""
    from diffusers import Kandinsky6Transformer3DModel

    _seed(seed)
    model = Kandinsky6Transformer3DModel(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, patch_size=(1, 2, 2),
        model_dim=24, ff_dim=32, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 4, 4), visual_cond=True,
        in_audio_dim=4, out_audio_dim=4, text_token_padding=True, ca_rope=True, cross_gates=True, fix_modulation=True,
    ).eval()  # fmt: skip
    mask = torch.ones(1, 8, dtype=torch.bool)
    mask[:, 6:] = False
    kwargs = {
        "hidden_states": torch.randn(1, 2, 8, 8, 2 * 4 + 1),
        "encoder_hidden_states": torch.randn(1, 8, 16),
        "pooled_projections": torch.randn(1, 8),
        "timestep": torch.tensor([500.0]),
        "audio_hidden_states": torch.randn(1, 9, 4),
        "encoder_attention_mask": mask,
        "return_dict": False,
    }
    return model, kwargs


def kandinsky6_sr(
    seed: int = 0, *, size: int = 8, sparse: bool = False
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers Kandinsky6SRTransformer3DModel: text-free video self-attention on the flex backend
    under a NABLA block mask, the tokens tile by tile (8 x 8 per frame); grid (2, size, size), few
    enough tiles that its sliding-tile prior keeps every block (``sparse``: a prior of one tile and
    a low threshold, so that each query tile keeps keys of its own)."""
    from diffusers import Kandinsky6SRTransformer3DModel

    _seed(seed)
    model = Kandinsky6SRTransformer3DModel(
        in_visual_dim=4, out_visual_dim=4, time_dim=16, patch_size=(1, 1, 1), model_dim=24, ff_dim=32,
        num_visual_blocks=2, axes_dims=(4, 4, 4), **({"nabla_window": (1, 1, 1), "nabla_threshold": 0.2} if sparse else {}),
    ).eval()  # fmt: skip
    kwargs = {
        "hidden_states": torch.randn(1, 2, size, size, 2 * 4 + 1),
        "timestep": torch.tensor([500.0]),
        "return_dict": False,
    }
    return model, kwargs


def anyflow_far(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers AnyFlowFARTransformer3DModel (training rollout, two chunks of one frame): chunk-causal
    self-attention through flex under a BlockMask (tokens padded to 128), cross to text 12; grid (2, 4, 4)."""
    from diffusers import AnyFlowFARTransformer3DModel

    model, kwargs = _wan_like(
        AnyFlowFARTransformer3DModel, seed, compressed_patch_size=(1, 4, 4), full_chunk_limit=3, rope_max_seq_len=32,
        gate_value=0.25, deltatime_type="r",
    )  # fmt: skip
    kwargs.update(
        hidden_states=kwargs["hidden_states"].transpose(1, 2).contiguous(), timestep=torch.full((1, 2), 500.0),
        r_timestep=torch.full((1, 2), 250.0), chunk_partition=[1, 1],
    )  # fmt: skip
    return model, kwargs


def wan_animate2(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers WanAnimate2Transformer3DModel, its reference pass (kv_cache_mode "extract"): latents and
    text as lists of per-sample tensors; dense self-attention, cross to the text (8 real of the 16 it pads
    to) and, in a call of its own, to 4 CLIP tokens; grid (2, 4, 4). (Its generation pass attends to the
    cached reference through a flex BlockMask.)"""
    from diffusers import WanAnimate2Transformer3DModel
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    _seed(seed)
    model = WanAnimate2Transformer3DModel(
        patch_size=(1, 2, 2), text_len=16, in_dim=8, dim=24, ffn_dim=32, freq_dim=32, text_dim=16, out_dim=4,
        num_heads=2, num_layers=2,
    ).eval()  # fmt: skip
    kwargs = {
        "hidden_states": [torch.randn(4, 2, 8, 8)],
        "timestep": torch.tensor([1.0]),
        "encoder_hidden_states": [torch.randn(8, 16)],
        "condition_latents": [torch.randn(4, 2, 8, 8)],
        "encoder_hidden_states_image": torch.randn(1, 4, 1280),  # its image projection takes CLIP's 1280
        "kv_cache": WanAnimate2KVCache(2),
        "kv_cache_mode": "extract",
        "seq_len": 2 * 4 * 4,
        "offset_grid_sizes": torch.tensor([[2, 4, 4]]),
        "return_dict": False,
    }
    return model, kwargs


def minimax_h3(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers MiniMaxH3Transformer3DModel: one joint self-attention over the rows its pipeline packs as
    [text (4), audio (2 channels x 3), video] (pre-patchified rows; the grid is in their rotary
    coordinates); grid (2, 4, 4)."""
    from diffusers import MiniMaxH3Transformer3DModel
    from diffusers.modular_pipelines.minimax_h3.before_denoise import MiniMaxH3PrepareLayoutStep

    _seed(seed)
    model = MiniMaxH3Transformer3DModel(
        num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=2, num_refiner_layers=1, ffn_dim=32,
        in_channels=4, audio_in_channels=6, patch_size=(1, 2, 2), text_dim=8, freq_dim=8, time_embed_hidden_dim=24,
        time_embed_dim=16, rope_freq_dim=2,
    ).eval()  # fmt: skip
    position_ids, tags, video, audio, text, _, _ = MiniMaxH3PrepareLayoutStep.build_packed_sequence(
        torch.ones(4, dtype=torch.long), num_latent_frames=2, latent_height=8, latent_width=8, num_audio_latents=3,
        patch_size=(1, 2, 2), audio_channels=2, audio_tag=2, video_tag=0,
    )  # fmt: skip
    timestep_indices = torch.zeros(len(tags), dtype=torch.long)
    timestep_indices[audio] = 1  # the audio rows step down a schedule of their own
    kwargs = {
        "hidden_states": torch.randn(1, 2 * 4 * 4, 4 * 2 * 2),
        "audio_hidden_states": torch.randn(1, 6, 6),
        "encoder_hidden_states": torch.randn(1, 4, 8),
        "timestep": torch.tensor([0.7, 0.3]),
        "timestep_indices": timestep_indices,
        "token_tags": tags,
        "position_ids": position_ids,
        "video_indices": video,
        "audio_indices": audio,
        "text_indices": text,
        "return_dict": False,
    }
    return model, kwargs


def sana_wm_refiner(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """diffusers SanaWMLTX2RefinerTransformer3DModel: self + cross to the text (6) over pre-packed
    tokens [B, N, C] and a rotary embedding its caller builds; nothing in the inputs gives the grid
    (2, 4, 4), so capture needs ``layout=``. Not in :data:`VIDEO_TRANSFORMERS` for that reason."""
    from diffusers import SanaWMLTX2RefinerTransformer3DModel

    _seed(seed)
    model = SanaWMLTX2RefinerTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4,
        audio_cross_attention_dim=8, num_layers=2, caption_channels=16,
    ).eval()  # fmt: skip
    f, h, w = 2, 4, 4
    rope = model.build_rotary_emb_for_absolute_positions(1, list(range(f)), h, w, torch.device("cpu"), 24.0)
    kwargs = {
        "hidden_states": torch.randn(1, f * h * w, 8),
        "encoder_hidden_states": torch.randn(1, 6, 16),
        "timestep": torch.full((1, f * h * w), 500.0),
        "video_rotary_emb": rope,
        "return_dict": False,
    }
    return model, kwargs


def wan_i2v(seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    return wan(seed, i2v=True)


#: every video transformer of diffusers, by family name
VIDEO_TRANSFORMERS = {
    "wan": wan,
    "wan-i2v": wan_i2v,
    "wan2.2-ti2v": wan22_ti2v,
    "wan-vace": wan_vace,
    "wan-animate": wan_animate,
    "skyreels-v2": skyreels_v2,
    "chronoedit": chronoedit,
    "anyflow": anyflow,
    "helios": helios,
    "cogvideox": cogvideox,
    "cogvideox1.5": cogvideox15,
    "consisid": consisid,
    "easyanimate": easyanimate,
    "hunyuanvideo": hunyuan,
    "hunyuanvideo-i2v": hunyuan_i2v,
    "hunyuanvideo1.5": hunyuan15,
    "hunyuanvideo-framepack": framepack,
    "mochi": mochi,
    "motif-video": motif_video,
    "allegro": allegro,
    "cosmos": cosmos,
    "kandinsky5": kandinsky5,
    "ltx": ltx,
    "ltx2": ltx2,
    "sana-video": sana_video,
    "latte": latte,
    "sana-wm": sana_wm,
    "joyimage-edit": joyimage_edit,
    "kandinsky6": kandinsky6,
    "kandinsky6-sr": kandinsky6_sr,
    "anyflow-far": anyflow_far,
    "wan-animate-2": wan_animate2,
    "minimax-h3": minimax_h3,
}

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
