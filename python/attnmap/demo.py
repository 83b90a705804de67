"""The demo: attnmap end to end on something a person can check by eye, with nothing downloaded.

1. A short synthetic video of moving coloured shapes (a red ball, a blue square, a green triangle)
   with known masks (:func:`make_video`).
2. A small attention model (:class:`ShapeAttentionModel`) whose text tokens ("red ball", "blue
   square", ...) have keys that match the colour features of their shapes, so a video token's
   attention to a word is high inside that shape. It runs joint text+video attention through
   ``torch.nn.functional.scaled_dot_product_attention`` for real, for a few "denoising" steps whose
   input gets cleaner step by step, under :func:`attnmap.capture` with an explicit layout.
3. The store is saved, overlays, a grid and the figures are rendered, and for each word the IoU of
   its thresholded map with the true shape mask is printed (it should be 0.8 or more).
4. A tiny randomly initialised diffusers ``WanTransformer3DModel`` runs a few steps under capture,
   to show the real-model path end to end (its maps come from random weights).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attnmap.errors import AttnmapError

# word -> (colour word, RGB in [0, 1], shape)
OBJECTS: dict[str, tuple[str, tuple[float, float, float], str]] = {
    "ball": ("red", (1.0, 0.1, 0.1), "circle"),
    "square": ("blue", (0.15, 0.3, 1.0), "square"),
    "triangle": ("green", (0.1, 0.9, 0.2), "triangle"),
}
PROMPT = "a (red ball) , a (blue square) and a (green triangle) on black"
#: The demo's text tokens: a whitespace split of the prompt without its parentheses.
TEXT_TOKENS: tuple[str, ...] = tuple(PROMPT.replace("(", "").replace(")", "").split())
#: word -> its token indices (the colour word and the noun).
TARGETS: dict[str, list[int]] = {
    noun: [TEXT_TOKENS.index(colour), TEXT_TOKENS.index(noun)] for noun, (colour, _, _) in OBJECTS.items()
}
#: The demo "VAE": latent frame 0 is video frame 0, each later latent frame covers 4 frames, and a
#: latent token covers 4 x 4 pixels (Wan's temporal stride, a finer spatial one).
VAE_STRIDE = (4, 4, 4)
IOU_TARGET = 0.8


@dataclass
class SyntheticVideo:
    """A video of moving shapes and the true mask of each.

    Attributes:
        frames: uint8 ``[T, H, W, 3]``.
        masks: word -> bool ``[T, H, W]``, True inside that word's shape.
        fps: frames per second.
    """

    frames: np.ndarray
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    fps: int = 8


def _shape_mask(kind: str, cy: float, cx: float, radius: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    if kind == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    if kind == "square":
        return (np.abs(yy - cy) <= radius * 0.9) & (np.abs(xx - cx) <= radius * 0.9)
    # an upward triangle: apex at (cy - r, cx), base at y = cy + r
    inside_y = (yy >= cy - radius) & (yy <= cy + radius)
    half_width = (yy - (cy - radius)) / 2.0 * 1.15
    return inside_y & (np.abs(xx - cx) <= half_width)


def make_video(frames: int = 17, height: int = 96, width: int = 128, *, seed: int = 0) -> SyntheticVideo:
    """Make the demo's video: three coloured shapes moving on a dark, slightly noisy background.

    Args:
        frames: T, the number of video frames (>= 1).
        height: H in pixels (>= 32).
        width: W in pixels (>= 32).
        seed: seed of the background noise.

    Returns:
        A :class:`SyntheticVideo` with frames ``[T, H, W, 3]`` uint8 and one mask per word.
    """
    if frames < 1 or height < 32 or width < 32:
        raise AttnmapError(f"frames must be >= 1 and height, width >= 32, got {frames}, {height}, {width}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    radius = 0.16 * min(height, width)
    # start position (fraction of H, W) and velocity (pixels per frame) of each shape
    paths = {
        "ball": ((0.3, 0.2), (0.6, 1.6)),
        "square": ((0.7, 0.75), (-0.5, -1.2)),
        "triangle": ((0.35, 0.75), (0.9, -0.4)),
    }
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    masks = {word: np.zeros((frames, height, width), dtype=bool) for word in OBJECTS}
    for t in range(frames):
        canvas = np.clip(rng.normal(0.06, 0.02, (height, width, 3)), 0, 1).astype(np.float32)
        for word, (_colour, rgb, kind) in OBJECTS.items():
            (fy, fx), (vy, vx) = paths[word]
            cy = _bounce(fy * height + vy * t, radius, height)
            cx = _bounce(fx * width + vx * t, radius, width)
            mask = _shape_mask(kind, cy, cx, radius, yy, xx)
            for other in masks.values():  # later shapes are drawn on top
                other[t] &= ~mask
            masks[word][t] = mask
            canvas[mask] = rgb
        video[t] = (canvas * 255.0 + 0.5).astype(np.uint8)
    return SyntheticVideo(video, masks)


def _bounce(pos: float, radius: float, size: int) -> float:
    lo, hi = radius, size - 1 - radius
    span = hi - lo
    x = (pos - lo) % (2 * span)
    return lo + (x if x <= span else 2 * span - x)


def latent_frame_groups(frames: int, stride: int) -> list[range]:
    """The video frames each latent frame covers: frame 0 alone, then ``stride`` frames each."""
    groups = [range(0, 1)]
    start = 1
    while start < frames:
        groups.append(range(start, min(start + stride, frames)))
        start += stride
    return groups


def encode(video: np.ndarray, stride: Sequence[int] = VAE_STRIDE) -> np.ndarray:
    """The demo's "VAE": average pixels over each latent token's frames and patch.

    Args:
        video: ``[T, H, W, C]`` (uint8 frames, or float such as masks).
        stride: (t, h, w) strides; H and W must be multiples of h and w.

    Returns:
        float32 ``[F, H/h, W/w, C]`` with ``F = 1 + ceil((T - 1) / t)``, values in [0, 1] for uint8 input.
    """
    arr = np.asarray(video, dtype=np.float32)
    if arr.dtype != np.float32 or arr.ndim != 4:
        raise AttnmapError(f"video must be [T, H, W, C], got shape {arr.shape}")
    if np.asarray(video).dtype == np.uint8:
        arr = arr / 255.0
    st, sh, sw = stride
    t, h, w, c = arr.shape
    if h % sh or w % sw:
        raise AttnmapError(f"video height and width must be multiples of the stride {sh}x{sw}, got {h}x{w}")
    pooled = arr.reshape(t, h // sh, sh, w // sw, sw, c).mean(axis=(2, 4))
    return np.stack([pooled[list(g)].mean(axis=0) for g in latent_frame_groups(t, st)])


class JointAttention(nn.Module):
    """One block: joint text+video attention with hand-set projections, through torch's SDPA.

    Token features (channels of ``hidden``): ``[r, g, b, is_text, is_filler, f, f^2, is_video]``, the
    last channel the block's own output. Per head, the logit of query i to key j is
    ``gain * <colour_i, colour_j>`` for text keys, ``filler`` for filler text keys (words that name no
    shape, so that background tokens have somewhere to look), ``-locality * (f_i - f_j)^2`` between video
    tokens (a spatial head keeps its attention in its own frame, a temporal head spreads it), and a bias
    making text queries look at text.
    """

    CHANNELS = 9

    def __init__(self, gains: Sequence[float], localities: Sequence[float], head_dim: int = 16) -> None:
        super().__init__()
        if len(gains) != len(localities):
            raise AttnmapError(
                f"gains and localities must have one value per head, got {gains}, {localities}"
            )
        self.heads = len(gains)
        self.head_dim = head_dim
        c, inner = self.CHANNELS, self.heads * head_dim
        self.to_q = nn.Linear(c, inner, bias=False)
        self.to_k = nn.Linear(c, inner, bias=False)
        self.to_v = nn.Linear(c, inner, bias=False)
        self.to_out = nn.Linear(inner, c, bias=False)
        filler, text_bias = 2.0, 6.0
        root = math.sqrt(head_dim)  # SDPA divides the logits by sqrt(head_dim)
        with torch.no_grad():
            for w in (self.to_q.weight, self.to_k.weight, self.to_v.weight, self.to_out.weight):
                w.zero_()
            for h, (gain, locality) in enumerate(zip(gains, localities)):
                q, k, o = self.to_q.weight, self.to_k.weight, h * head_dim
                for ch in range(3):  # colour match against text keys only
                    q[o + ch, ch] = gain * root
                    k[o + ch, ch] = 1.0
                q[o + 3, 7] = filler * root  # video queries: filler keys get `filler`
                q[o + 3, 3] = filler * root  # text queries too
                k[o + 3, 4] = 1.0
                q[o + 4, 3] = text_bias * root  # text queries look at text keys
                k[o + 4, 3] = 1.0
                q[o + 5, 5] = 2.0 * locality * root  # -locality * (f_q - f_k)^2, up to a row constant
                k[o + 5, 5] = 1.0
                q[o + 6, 7] = -locality * root
                k[o + 6, 6] = 1.0
                q[o + 7, 6] = locality * root  # the row constant, also given to text keys
                k[o + 7, 3] = 1.0
                self.to_v.weight[o : o + 3, :3] = torch.eye(3)
            self.to_out.weight[8, :] = 1.0 / inner

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        b, n, _ = hidden.shape
        is_text = hidden[..., 3:4]
        keys_in = torch.cat([hidden[..., :3] * is_text, hidden[..., 3:]], dim=-1)  # video keys: no colour
        q = self.to_q(hidden).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.to_k(keys_in).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        v = self.to_v(hidden).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class ShapeAttentionModel(nn.Module):
    """The demo's attention model: text tokens first, then the latent video tokens, two blocks.

    Args:
        grid: the latent grid (F, H, W).
        text_tokens: the words of the prompt.

    Block 0 has a colour-matching head that keeps to its own frame and a temporal head; block 1 a
    colour-matching head and a head that spreads over frames. The colour gain is set so that a latent
    token half covered by a shape gives that shape's words about half of its top attention.
    """

    def __init__(self, grid: tuple[int, int, int], text_tokens: Sequence[str] = TEXT_TOKENS) -> None:
        super().__init__()
        self.grid = tuple(int(g) for g in grid)
        self.text_tokens = tuple(text_tokens)
        frames, height, width = self.grid
        # Z: roughly what a video query's softmax sums over besides its shape's two words.
        z = height * width * 1.1 + len(self.text_tokens)
        gain = 2.0 * math.log(z / 2.0)
        self.blocks = nn.ModuleList(
            [JointAttention([gain, 0.0], [3.0, 0.3]), JointAttention([gain, 0.0], [2.0, 0.05])]
        )
        colours = {colour: rgb for colour, rgb, _ in OBJECTS.values()}
        colours.update({noun: rgb for noun, (_, rgb, _) in OBJECTS.items()})
        text = torch.zeros(len(self.text_tokens), JointAttention.CHANNELS)
        for i, word in enumerate(self.text_tokens):
            if word in colours:
                text[i, :3] = torch.tensor(colours[word])
            else:
                text[i, 4] = 1.0
            text[i, 3] = 1.0
        self.text: torch.Tensor
        self.register_buffer("text", text)
        f = torch.arange(frames, dtype=torch.float32).view(frames, 1, 1).expand(self.grid).reshape(-1)
        pos = torch.zeros(frames * height * width, JointAttention.CHANNELS)
        pos[:, 5], pos[:, 6], pos[:, 7] = f, f * f, 1.0
        self.video_pos: torch.Tensor
        self.register_buffer("video_pos", pos)

    @property
    def num_text(self) -> int:
        return len(self.text_tokens)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Args:
            latents: ``[B, F, H, W, 3]`` colour features.

        Returns:
            ``[B, Nt + F*H*W, 9]`` the hidden states after the blocks.
        """
        b = latents.shape[0]
        video = self.video_pos.expand(b, -1, -1).clone()
        video[..., :3] = latents.reshape(b, -1, 3)
        hidden = torch.cat([self.text.expand(b, -1, -1), video], dim=1)
        for block in self.blocks:
            hidden = hidden + block(hidden)
        return hidden


#: Noise level of each demo "denoising" step: the input gets cleaner step by step.
NOISE_LEVELS = (0.12, 0.08, 0.04, 0.0)


def noisy_latents(clean: np.ndarray, level: float, *, seed: int) -> torch.Tensor:
    """``clean`` ``[F, H, W, 3]`` plus Gaussian noise of std ``level``, as a ``[1, F, H, W, 3]`` tensor."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(clean)).unsqueeze(0)
    return x + level * torch.randn(x.shape, generator=gen)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks of one shape (1.0 when both are empty)."""
    if a.shape != b.shape:
        raise AttnmapError(f"masks must have the same shape, got {a.shape} and {b.shape}")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def true_latent_masks(video: SyntheticVideo) -> dict[str, np.ndarray]:
    """Each word's true mask on the latent grid: tokens more than half covered by the shape."""
    return {
        word: encode(mask[..., None].astype(np.float32))[..., 0] > 0.5 for word, mask in video.masks.items()
    }


Log = Callable[[str], None]
VIDEO_ID = "shapes"
WAN_VIDEO_ID = "wan_tiny_random"


def _run_shapes(root: Path, original: Path, video: SyntheticVideo) -> tuple[ShapeAttentionModel, float]:
    """Capture the shape model's maps for every demo step into the store at ``root``; returns the model
    and the seconds it took."""
    import attnmap
    from attnmap.layout import Layout

    start = time.perf_counter()
    clean = encode(video.frames)
    grid = (clean.shape[0], clean.shape[1], clean.shape[2])
    model = ShapeAttentionModel(grid).eval()
    frames, height, width = video.frames.shape[:3]
    metadata = {
        "model": "ShapeAttentionModel (hand-set weights: each word's keys match its shape's colour)",
        "prompt": PROMPT,
        "text_tokens": list(TEXT_TOKENS),
        "grid": list(grid),
        "patch_size": [1, 1, 1],
        "vae_stride": list(VAE_STRIDE),
        "video": {
            "height": height,
            "width": width,
            "fps": video.fps,
            "frames": frames,
            "path": str(original),
        },
    }
    layout = Layout.joint(text=model.num_text, grid=grid)
    with attnmap.capture(
        model,
        reductions=("cross", "temporal", "text"),
        targets=TARGETS,
        layout=layout,
        per_head=True,
        per_block=True,
        store=root,
        video_id=VIDEO_ID,
        metadata=metadata,
    ) as rec:
        for step, level in enumerate(NOISE_LEVELS):
            with torch.no_grad():
                model(noisy_latents(clean, level, seed=step))
            rec.step()
    return model, time.perf_counter() - start


def _tiny_wan_transformer(seed: int = 0) -> Any:
    """A tiny randomly initialised diffusers WanTransformer3DModel (2 blocks of 2 heads, 4 latent channels)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model: Any = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    return model.eval()


def tiny_wan_pipeline(seed: int = 0, words: Sequence[str] = TEXT_TOKENS) -> Any:
    """A diffusers ``WanPipeline`` of tiny randomly initialised parts, built offline from config classes:
    a word-level tokenizer of ``words`` (others are unknown tokens), a 2-layer UMT5 text encoder, Wan's
    VAE (strides 4 in time, 8 in space, 4 latent channels) and :func:`_tiny_wan_transformer`. Its maps
    come from random weights: it shows the real pipeline path, not where a trained model looks.

    Example:
        >>> pipe = tiny_wan_pipeline()  # doctest: +SKIP
        >>> attnmap.capture_video(pipe, make_video().frames, PROMPT)  # doctest: +SKIP
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    torch.manual_seed(seed)
    encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=max(64, len(vocab)),
            d_model=32,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    ).eval()
    vae: Any = AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=encoder,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae.eval(),
        transformer=_tiny_wan_transformer(seed),
    )


def _run_wan(root: Path, steps: int = 3) -> float:
    """A tiny randomly initialised diffusers WanTransformer3DModel for a few steps under capture (its
    layouts inferred: attn1 video self-attention, attn2 video->text); returns the seconds it took."""
    import attnmap

    start = time.perf_counter()
    model = _tiny_wan_transformer()
    latents = torch.randn(1, 4, 3, 8, 8)  # [B, C, F, H, W]: 9 video frames of 64 x 64 through Wan's VAE
    text = torch.randn(1, 16, 32)
    metadata = {"video": {"height": 64, "width": 64, "fps": 8, "frames": 9}, "random_weights": True}
    with attnmap.capture(
        model,
        reductions=("cross", "temporal"),
        targets={"cat": [1], "dog": [4, 5]},
        per_head=True,
        store=root,
        video_id=WAN_VIDEO_ID,
        metadata=metadata,
    ) as rec:
        for step in range(steps):
            t = torch.tensor([1000.0 * (1 - step / steps)])
            with torch.no_grad():
                velocity = model(hidden_states=latents, timestep=t, encoder_hidden_states=text).sample
            latents = latents - velocity / steps
            rec.step()
    return time.perf_counter() - start


#: the tiny video LLM's text: chat markup and the words its demo questions and answers use
_VLM_WORDS = (
    "<pad> <|im_start|> <|im_end|> <|vision_start|> <|vision_end|> <|video_pad|> <|image_pad|> system user "
    "assistant you are a helpful what is the dog cat ball doing where does it go ? , . runs jumps"
).split()


def tiny_video_llm(
    question: str = "what is the dog doing ?", *, frames: int = 4, seed: int = 0
) -> tuple[torch.nn.Module, Any, dict[str, torch.Tensor]]:
    """A tiny randomly initialised Qwen2-VL, a tokenizer of its vocabulary and the inputs of one video
    question, built offline (nothing is downloaded).

    The model has 2 LLM layers of 4 query heads over 2 KV heads and a 2-block vision tower; the video
    is ``frames`` random frames of 24 x 32 pixels, two per temporal slot, so the LLM's grid is
    ``(frames / 2, 3, 4)``. The prompt is laid out as Qwen2-VL's processor lays it out:
    ``<|im_start|> system ... <|im_end|> <|im_start|> user <|vision_start|> <|video_pad|> * F*H*W
    <|vision_end|> <question> <|im_end|> <|im_start|> assistant``.

    Args:
        question: words of the demo vocabulary (:data:`_VLM_WORDS`), separated by spaces.
        frames: input frames, an even number >= 2.
        seed: the weights' and the pixels' seed.

    Returns:
        ``(model, tokenizer, inputs)``: ``model.generate(**inputs, max_new_tokens=4)`` answers.

    Example:
        >>> model, tokenizer, inputs = tiny_video_llm()
        >>> inputs["video_grid_thw"].tolist()
        [[2, 6, 8]]
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    if frames < 2 or frames % 2:
        raise AttnmapError(f"frames must be an even number >= 2 (two per temporal slot), got {frames!r}")
    vocab = {w: i for i, w in enumerate(_VLM_WORDS)}
    unknown = [w for w in question.split() if w not in vocab]
    if unknown:
        raise AttnmapError(f"question: the words {unknown} are not in the tiny vocabulary {_VLM_WORDS}")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = [w for w in _VLM_WORDS if w.startswith("<")]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", additional_special_tokens=specials
    )
    ids = {w: vocab[w] for w in specials}
    cfg = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(_VLM_WORDS), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
            bos_token_id=None, eos_token_id=None,
            rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 1e4},
        ),
        vision_config=dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
            spatial_merge_size=2, temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None  # random weights: answer max_new_tokens tokens
    model.generation_config.pad_token_id = 0
    grid = (frames // 2, 6, 8)  # patches of 4 pixels: 24 x 32 pixel frames
    video = ["<|video_pad|>"] * (grid[0] * (grid[1] // 2) * (grid[2] // 2))
    text = (
        "<|im_start|> system you are a helpful assistant . <|im_end|> <|im_start|> user <|vision_start|> "
        + " ".join(video)
        + f" <|vision_end|> {question} <|im_end|> <|im_start|> assistant"
    )
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    g = torch.Generator().manual_seed(seed + 1)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values_videos": torch.randn(grid[0] * grid[1] * grid[2], 3 * 2 * 4 * 4, generator=g),
        "video_grid_thw": torch.tensor([list(grid)]),
        "mm_token_type_ids": (input_ids == ids["<|video_pad|>"]).long() * 2,
    }
    return model, tokenizer, inputs


def run(output: Path, *, quiet: bool = False, log: Optional[Log] = None, wan: bool = True) -> dict[str, Any]:
    """Run the whole demo into ``output`` (see the module docstring).

    Args:
        output: the output folder: ``shapes.mp4`` (the synthetic video), ``attention_maps/`` (the store),
            ``videos/`` (overlays, heatmaps, the step evolution, the grid), ``figures/`` (figures and a
            still overlay per word) and ``report.html`` (the interactive report of both videos).
        quiet: no progress bars.
        log: where the report lines go (default: print).
        wan: also run the tiny random Wan transformer.

    Returns:
        ``{"iou": {word: IoU}, "passed": bool, "outputs": [paths], "seconds": float}``.
    """
    import attnmap.render as render
    import attnmap.render.videos as autorender
    from attnmap.analysis import token_mask
    from attnmap.render.options import RenderOptions
    from attnmap.store import open_store

    say: Log = log or print
    start = time.perf_counter()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    root = out / "attention_maps"
    video = make_video()
    original = Path(render.write_video(video.frames, out / "shapes.mp4", fps=video.fps)).resolve()
    say(
        f"synthetic video: {original} ({video.frames.shape[0]} frames of {video.frames.shape[2]}x"
        f"{video.frames.shape[1]}, a red ball, a blue square and a green triangle)"
    )
    _, seconds = _run_shapes(root, original, video)
    say(
        f"captured {len(NOISE_LEVELS)} steps of the shape model through torch SDPA in {seconds:.1f} s: "
        f"store {root}"
    )

    store = open_store(root)
    truth = true_latent_masks(video)
    scores: dict[str, float] = {}
    say(
        f"IoU of each word's thresholded map (normalised > 0.5) with its true shape mask (need >= {IOU_TARGET}):"
    )
    for word in TARGETS:
        mask = token_mask(store.aggregated(VIDEO_ID, word).map, threshold=0.5)
        scores[word] = iou(mask, truth[word])
        colour = OBJECTS[word][0]
        verdict = "ok" if scores[word] >= IOU_TARGET else "LOW"
        say(f"  {colour + ' ' + word:<16} IoU {scores[word]:.3f}  {verdict}")

    videos = out / "videos"
    options = RenderOptions(colormap="jet", fps=video.fps, overlay_alpha=0.5, threshold=0.5)
    outputs = autorender.render_video(root, VIDEO_ID, videos, quiet=quiet)
    outputs.append(
        autorender.render_grid(
            store,
            VIDEO_ID,
            list(TARGETS),
            videos / f"{VIDEO_ID}_grid_overlay.mp4",
            options=options,
            original_video=original,
            quiet=quiet,
        )
    )
    outputs.append(
        autorender.render_token(
            store,
            VIDEO_ID,
            "ball",
            videos / f"{VIDEO_ID}_ball_steps.mp4",
            mode="steps",
            options=replace_options(options, threshold=None, fps=4),
            quiet=quiet,
        )
    )
    outputs.extend(autorender.render_figures(store, VIDEO_ID, out / "figures"))
    outputs.append(figures_colorbar(out / "figures" / "colorbar_jet.png"))
    for word in TARGETS:  # one still overlay per word: its map's mean over the frames on the middle frame
        still = out / "figures" / f"{VIDEO_ID}_{word}_still.png"
        outputs.append(
            autorender.render_still(store, VIDEO_ID, word, still, options=options, original_video=original)
        )

    if wan:
        seconds = _run_wan(root)
        say(
            f"tiny diffusers WanTransformer3DModel, RANDOM weights, 3 steps under capture in {seconds:.1f} s: "
            "its maps show that the real-model path works end to end, not where a trained model looks"
        )
        wan_video = videos / f"{WAN_VIDEO_ID}_cat_attention.mp4"
        outputs.append(autorender.render_token(store, WAN_VIDEO_ID, "cat", wan_video, quiet=quiet))
        outputs.extend(autorender.render_figures(store, WAN_VIDEO_ID, out / "figures"))
    from attnmap.render.report import write_report

    outputs.append(write_report(root, out / "report.html"))
    for path in outputs:
        say(f"wrote {path}")
    passed = all(v >= IOU_TARGET for v in scores.values())
    total = time.perf_counter() - start
    say(
        f"demo {'passed' if passed else 'FAILED'} in {total:.1f} s; open {out / 'report.html'} in a browser, "
        f"or {videos} for the videos"
    )
    return {"iou": scores, "passed": passed, "outputs": outputs, "seconds": total}


def replace_options(options: Any, **changes: Any) -> Any:
    """A copy of frozen render options with some fields changed."""
    from dataclasses import replace

    return replace(options, **changes)


def figures_colorbar(path: Path) -> Path:
    import attnmap.render.figures as figures

    return figures.colorbar(path, colormap="jet", vmin=0.0, vmax=1.0, label="normalised attention")
