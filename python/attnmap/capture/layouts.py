"""Layouts: which tokens of an attention call are video, text or other context, from shapes.

A watched model's forward inputs give the video grid: the 5-D latent (or pixel) input (a 6-D one
of items side by side on the frame axis: JoyImage), or a list of one 4-D latent per sample
(Wan-Animate-2), divided by the model's patch sizes (``config.patch_size`` / ``patch_size_t`` /
``tubelet_size``), or the latent sizes a model takes as ``num_frames`` / ``height`` / ``width`` (LTX),
plus the lengths of its text and other contexts (``encoder_hidden_states``, [B, 1, L, D] captions too;
image and audio inputs) and the real text length of each row (from its mask, from zero padding, or
from the lengths of a list of per-sample texts). :func:`place` then classifies each call by its
shapes alone:

- self-attention over the ``Nv`` video tokens, after ``prefix`` extra tokens (history latents, CLS);
- cross-attention from the video queries to other keys: text, image or audio context, told apart by
  their lengths;
- joint attention over the video tokens and the text (plus the family's other context tokens),
  the text first or last;
- divided attention (Latte): space calls batch the frames (``B*F`` rows of ``H*W`` tokens), time
  calls the positions (``B*H*W`` rows of ``F`` tokens);
- calls over fewer tokens than the video that are not divided (a text refiner, an audio stream, an
  attention pooler) are not video attention and are passed over quietly.

A :class:`FamilySpec` (keyword fields) adds what shapes cannot say for a known family: the order of
a joint call's text and video, the inputs that make its context, where the prompt's tokens sit in
it, the VAE strides, the axes of its latent input, the grid of pre-patchified rows that only its
other inputs say (MiniMax-H3's rotary coordinates). A new family whose calls fit the shapes needs
none. Private to :mod:`attnmap.capture`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch

from attnmap.capture.interception import Site
from attnmap.layout import Layout

Grid = tuple[int, int, int]


#: Modules of a denoiser that never see video tokens: text refiners, timestep and caption embedders.
_SIDE_MODULES = r"(^|\.)(context_embedder|time_embed|time_text_embed|token_refiner|caption_projection)(\.|$)"


@dataclass(frozen=True)
class FamilySpec:
    """What capture knows about one model family beyond the shapes of its calls."""

    family: str
    classes: tuple[str, ...] = ()  # class names of the family's core module
    video_input: str = ""  # the forward argument holding the latents (default: the first 5-D one)
    video_axes: str = ""  # "BCFHW", "BFCHW", "BFHWC" or "BNCFHW"; "" infers it from the config's in_channels
    text_first: bool = True  # joint calls put the text before the video
    context: tuple[str, ...] = (
        "encoder_hidden_states",
    )  # inputs whose tokens a joint call holds besides the video
    text_input: str = "encoder_hidden_states"
    joint_history: bool = False  # joint calls also hold extra tokens (history latents) before the video
    vae_stride: tuple[int, int, int] = (4, 8, 8)
    vae_by_channels: tuple[
        tuple[int, tuple[int, int, int]], ...
    ] = ()  # (latent channels, stride) of wider VAEs
    causal_vae: bool = True  # F latent frames decode to (F - 1) * stride + 1 frames
    pixel_input: bool = False  # the video input is pixels (video encoders), not latents
    text_offset: Optional[Callable[[Mapping[str, Any]], Optional[list[int]]]] = None  # per row
    grid_of: Optional[Callable[[Mapping[str, Any]], Optional[Grid]]] = None  # pre-patchified rows' grid
    roles: tuple[tuple[str, str], ...] = ()  # (regex on a module name, role) read from softmax calls
    linear: tuple[str, ...] = ()  # processor or module classes computing linear attention (no softmax)
    tiles: Optional[Grid] = None  # its calls hold the video tile by tile, (t, h, w) tokens each
    watch: str = ""  # a regex: only modules whose names match it are watched ("" = every attention module)
    ignore: str = (
        _SIDE_MODULES  # a regex: modules not watched (text refiners, timestep poolers: no video tokens)
    )


def _hunyuan15_text_offset(args: Mapping[str, Any]) -> Optional[list[int]]:
    """HunyuanVideo 1.5 orders its context per row as [valid image, valid byT5, valid text, padding]."""
    image, byt5 = args.get("image_embeds"), args.get("encoder_attention_mask_2")
    if not isinstance(byt5, torch.Tensor):
        return None
    n_byt5 = (byt5 != 0).sum(-1)
    n_image = 0 if not isinstance(image, torch.Tensor) or bool((image == 0).all()) else int(image.shape[1])
    return [n_image + int(n) for n in n_byt5.tolist()]


def _minimax_h3_grid(args: Mapping[str, Any]) -> Optional[Grid]:
    """MiniMax-H3 packs [text, audio, video] rows as its index tensors say; the video rows' (h, w)
    rotary coordinates give the patch grid. None for another order (keyframe rows before the audio)."""
    video, text, pos = args.get("video_indices"), args.get("text_indices"), args.get("position_ids")
    if not (
        isinstance(video, torch.Tensor) and isinstance(text, torch.Tensor) and isinstance(pos, torch.Tensor)
    ):
        return None
    n, nv, nt = int(pos.shape[0]), int(video.numel()), int(text.numel())
    tail, head = torch.arange(n - nv, n, device=video.device), torch.arange(nt, device=text.device)
    if pos.dim() != 2 or not torch.equal(video, tail) or not torch.equal(text, head):
        return None
    h, w = (int(pos[video, axis].unique().numel()) for axis in (1, 2))
    return (nv // (h * w), h, w) if h * w and nv % (h * w) == 0 else None


#: The families whose calls need more than their shapes; keyed by their core's class name.
FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(
        family="wan",
        vae_by_channels=((48, (4, 16, 16)),),  # Wan 2.2 TI2V-5B's VAE
        classes=(
            "WanTransformer3DModel",
            "WanVACETransformer3DModel",
            "ChronoEditTransformer3DModel",
            "SkyReelsV2Transformer3DModel",
            "WanAnimateTransformer3DModel",
            "HeliosTransformer3DModel",
        ),
    ),
    FamilySpec(  # its in_dim counts the condition latents it concatenates: no axis to infer from it
        family="wan-animate-2", classes=("WanAnimate2Transformer3DModel",), video_axes="BCFHW"
    ),
    FamilySpec(
        family="anyflow",
        classes=("AnyFlowTransformer3DModel", "AnyFlowFARTransformer3DModel"),
        video_axes="BFCHW",
    ),
    FamilySpec(family="cogvideox", classes=("CogVideoXTransformer3DModel",), video_axes="BFCHW"),
    FamilySpec(
        family="consisid",
        classes=("ConsisIDTransformer3DModel",),
        video_axes="BFCHW",
        ignore=_SIDE_MODULES + r"|(^|\.)(local_facial_extractor|perceiver_cross_attention)\.",
    ),
    FamilySpec(family="easyanimate", classes=("EasyAnimateTransformer3DModel",)),
    FamilySpec(family="hunyuanvideo", classes=("HunyuanVideoTransformer3DModel",), text_first=False),
    FamilySpec(
        family="hunyuanvideo-framepack",
        classes=("HunyuanVideoFramepackTransformer3DModel",),
        text_first=False,
        context=("image_embeds", "encoder_hidden_states"),
        joint_history=True,
    ),
    FamilySpec(
        family="hunyuanvideo1.5",
        classes=("HunyuanVideo15Transformer3DModel",),
        text_first=False,
        context=("image_embeds", "encoder_hidden_states_2", "encoder_hidden_states"),
        vae_stride=(4, 16, 16),
        text_offset=_hunyuan15_text_offset,
    ),
    FamilySpec(family="mochi", classes=("MochiTransformer3DModel",), text_first=False, vae_stride=(6, 8, 8)),
    FamilySpec(family="motif-video", classes=("MotifVideoTransformer3DModel",), text_first=False),
    FamilySpec(family="allegro", classes=("AllegroTransformer3DModel",)),
    FamilySpec(family="cosmos", classes=("CosmosTransformer3DModel",), vae_stride=(8, 8, 8)),
    FamilySpec(
        family="kandinsky5",
        classes=("Kandinsky5Transformer3DModel",),
        video_axes="BFHWC",
        ignore=_SIDE_MODULES + r"|^text_transformer_blocks\.",
    ),
    FamilySpec(
        family="kandinsky6",
        classes=("Kandinsky6Transformer3DModel",),
        video_axes="BFHWC",  # its input has 2 * in_visual_dim + 1 channels (noisy, condition, mask)
        # the text branches and the audio stream's calls (audio queries) hold no video queries
        ignore=_SIDE_MODULES + r"|_text_transformer_blocks\.|\.audio_dec_block\.|\.av_cross_attention$",
    ),
    FamilySpec(
        family="kandinsky6-sr",
        classes=("Kandinsky6SRTransformer3DModel",),
        video_axes="BFHWC",
        tiles=(1, 8, 8),  # NABLA's order: each frame's 8 x 8 token tiles, one after another
    ),
    FamilySpec(
        family="ltxvideo",
        classes=("LTXVideoTransformer3DModel", "LTX2VideoTransformer3DModel"),
        vae_stride=(8, 32, 32),
    ),
    FamilySpec(
        family="minimax-h3",
        classes=("MiniMaxH3Transformer3DModel",),
        context=("encoder_hidden_states", "audio_hidden_states"),
        vae_stride=(4, 16, 16),
        grid_of=_minimax_h3_grid,
    ),
    FamilySpec(
        family="sana-video", classes=("SanaVideoTransformer3DModel",), linear=("SanaLinearAttnProcessor3_0",)
    ),
    FamilySpec(  # gated-delta-net self-attention (a softmax one only every softmax_every_n-th block)
        family="sana-wm",
        classes=("SanaWMTransformer3DModel",),
        linear=("SanaWMBidirectionalGDNAttention", "SanaWMBidirectionalGDNCamAttention"),
    ),
    FamilySpec(family="latte", classes=("LatteTransformer3DModel",), vae_stride=(1, 8, 8), causal_vae=False),
    FamilySpec(  # latents [B, items, C, F, H, W]: the target's and the reference images' frames, one sequence
        family="joyimage-edit",
        classes=("JoyImageEditTransformer3DModel",),
        video_axes="BNCFHW",
        text_first=False,
    ),
    FamilySpec(
        family="vjepa2",
        classes=("VJEPA2Model",),
        video_input="pixel_values_videos",
        video_axes="BFCHW",
        vae_stride=(1, 1, 1),
        pixel_input=True,
        watch=r"^encoder\.",  # not the predictor
    ),
    FamilySpec(
        family="videomae",
        classes=("VideoMAEModel",),
        video_input="pixel_values",
        video_axes="BFCHW",
        vae_stride=(1, 1, 1),
        pixel_input=True,
    ),
    FamilySpec(
        family="timesformer",
        classes=("TimesformerModel",),
        video_input="pixel_values",
        video_axes="BFCHW",
        vae_stride=(1, 1, 1),
        pixel_input=True,
        roles=((r"\.temporal_attention\.attention$", "time"), (r"\.attention\.attention$", "space")),
    ),
    FamilySpec(
        family="timm-vit",
        classes=("VisionTransformer",),
        video_input="x",
        vae_stride=(1, 1, 1),
        pixel_input=True,
    ),
)
_BY_CLASS = {name: spec for spec in FAMILIES for name in spec.classes}
GENERIC = FamilySpec(family="generic")


def family_of(module: torch.nn.Module) -> FamilySpec:
    """The spec of a module's class (the generic one for a class attnmap has no spec for)."""
    spec = _BY_CLASS.get(type(module).__name__)
    if spec is not None:
        return spec
    name = type(module).__name__
    return FamilySpec(family=name, classes=(name,)) if name.endswith("Transformer3DModel") else GENERIC


# -- which modules are watched, and their block numbers --------------------------------------------
_ATTN_NAME = re.compile(r"attention|attn", re.IGNORECASE)
_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_SIDE_STACK = re.compile(r"text|audio|refiner|context", re.IGNORECASE)


def is_attention(module: torch.nn.Module) -> bool:
    """A module that runs attention: a diffusers attention module (it has a processor) or one whose
    class name says attention."""
    return (hasattr(module, "processor") and hasattr(module, "set_processor")) or bool(
        _ATTN_NAME.search(type(module).__name__)
    )


def find_sites(
    core: torch.nn.Module, spec: FamilySpec, *, prefix: str = "", everything: bool = False
) -> list[Site]:
    """The watched modules of ``core``, named as inside the whole model (``prefix``).

    Attention modules by default; with ``everything`` (an explicit layout on a model without any)
    every module, the model itself included as ``<root>``, so that a call belongs to whichever
    module made it. Block numbers come from the first list index in a name, unique across stacks:
    stacks nearer the top come first, a text, audio or refiner stack after the video ones, each
    numbered after the one before (HunyuanVideo: dual-stream 0..19, single-stream 20..59).
    """
    found = [
        (n, m)
        for n, m in core.named_modules()
        if everything
        or (n and is_attention(m) and re.search(spec.watch, n) and not re.search(spec.ignore, n))
    ]
    if not found and not everything:
        found = [("", core)] if is_attention(core) else []
    stacks: dict[str, int] = {}  # stack path -> highest index
    placed: list[tuple[str, torch.nn.Module, Optional[str], int]] = []
    for name, module in found:
        match = _INDEX.search(name)
        if match is None:
            placed.append((name, module, None, 0))
            continue
        stack = name[: match.start(1)].rstrip(".")
        index = int(match.group(1))
        stacks[stack] = max(stacks.get(stack, -1), index)
        placed.append((name, module, stack, index))
    order = sorted(
        stacks,
        key=lambda s: (s.count(".") + (1 if s else 0), bool(_SIDE_STACK.search(s)), list(stacks).index(s)),
    )
    base, offset = {}, 0
    for stack in order:
        base[stack] = offset
        offset += stacks[stack] + 1
    sites = []
    for name, module, stack, index in placed:
        role = next((r for rx, r in spec.roles if re.search(rx, name)), "auto")
        block = base[stack] + index if stack is not None else (offset if stacks else 0)
        full = ".".join(p for p in (prefix, name) if p) or "<root>"
        sites.append(Site(full, module, block, role))
    return sites


# -- what a forward's inputs say ---------------------------------------------------------------------
@dataclass
class VideoInputs:
    """What the watched model's forward inputs say about the tokens of this forward."""

    grid: Optional[Grid] = None
    batch: Optional[int] = None
    latent: Optional[Grid] = None  # the input's (F, H, W) before patching
    text_len: Optional[int] = None  # text tokens of the text input (padded)
    text_real: Optional[list[int]] = None  # real (unpadded) text tokens per batch row
    text_offset: Optional[list[int]] = (
        None  # where the prompt's tokens start in a joint call's context, per row
    )
    contexts: dict[str, int] = field(default_factory=dict)  # context name -> tokens (image, audio ...)
    joint_context: Optional[int] = None  # tokens a joint call holds besides the video (and history)


def bind_arguments(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """A call's arguments by name, its ``**kwargs`` spread among them (the keywords alone where the
    signature cannot be read or does not take them)."""
    try:
        bound = inspect.signature(fn).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return dict(kwargs)
    out = dict(bound.arguments)
    extra = out.pop("kwargs", None)
    if isinstance(extra, dict):
        out.update(extra)
    return out


def bind_inputs(core: torch.nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The core's forward arguments by name."""
    return bind_arguments(core.forward, args, kwargs)


def _config(core: torch.nn.Module, *names: str) -> Any:
    cfg = getattr(core, "config", None)
    for name in names:
        value = cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)
        if value is not None:
            return value
    return None


def patch_size(core: torch.nn.Module) -> tuple[int, int, int]:
    """The (t, h, w) patch of a model: diffusers' patch_size / patch_size_t, transformers'
    tubelet_size / patch_size, timm's patch_embed."""
    p = _config(core, "patch_size")
    if p is None:
        embed = getattr(core, "patch_embed", None)
        p = getattr(embed, "patch_size", None)
    pt = _config(core, "patch_size_t", "tubelet_size")
    if isinstance(p, (list, tuple)):
        values = [int(v) for v in p]
        if len(values) == 3:
            return values[0], values[1], values[2]
        if len(values) == 2:
            return int(pt or 1), values[0], values[1]
    size = int(p or 1)
    return int(pt or 1), size, size


def _axes(shape: Sequence[int], spec: FamilySpec, channels: Optional[int]) -> str:
    if len(spec.video_axes) == len(shape):
        return spec.video_axes
    for axes, axis in (("BCFHW", 1), ("BFCHW", 2), ("BFHWC", 4)):
        if channels is not None and shape[axis] == channels:
            return axes
    return "BCFHW"


def _real_lengths(text: torch.Tensor, mask: Any) -> list[int]:
    """Real text tokens per row: the mask's kept count, else the last non-zero embedding row."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape == text.shape[:2]:
        return [int(n) for n in (mask != 0).sum(-1).tolist()]
    nonzero = text.detach().abs().amax(dim=-1) > 0  # (B, L)
    pos = torch.arange(1, text.shape[1] + 1, device=text.device)
    return [int(v) for v in (nonzero * pos).amax(dim=1).tolist()]


def _tokens(value: Any) -> Optional[torch.Tensor]:
    """A context input as [B, L, D]: as given, or squeezed from [B, 1, L, D] (PixArt and Sana's captions)."""
    if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[1] == 1:
        value = value[:, 0]
    return value if isinstance(value, torch.Tensor) and value.dim() == 3 else None


def _shape(value: Any) -> Optional[tuple[int, ...]]:
    """A tensor's shape; for a list of same-shaped tensors (one per sample, as Wan-Animate-2 takes its
    latents), the shape of their stack."""
    if isinstance(value, torch.Tensor):
        return tuple(int(s) for s in value.shape)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        if all(v.shape == value[0].shape for v in value):
            return (len(value), *(int(s) for s in value[0].shape))
    return None


def _length(value: Any) -> Optional[int]:
    return int(value.shape[1]) if isinstance(value, torch.Tensor) and value.dim() == 3 else None


def text_input(args: Mapping[str, Any], spec: FamilySpec) -> Optional[torch.Tensor]:
    """A forward's text input as [B, L, D] (None where it has none of that form)."""
    return _tokens(args.get(spec.text_input))


def read_inputs(core: torch.nn.Module, spec: FamilySpec, args: Mapping[str, Any]) -> VideoInputs:
    """The grid, batch and contexts of one forward of ``core`` (empty where the inputs do not say)."""
    out = VideoInputs()
    names = (
        [spec.video_input]
        if spec.video_input
        else ["hidden_states", "pixel_values_videos", "pixel_values", "x", "sample"]
    )
    video = next((args[n] for n in names if _shape(args.get(n)) is not None), None)
    shape = _shape(video)
    if shape is None or len(shape) not in (3, 4, 5, len(spec.video_axes)):
        video = next((v for v in args.values() if len(_shape(v) or ()) == 5), None)
        shape = _shape(video)
    pt, ph, pw = patch_size(core)
    if shape is not None:
        latent: Optional[Grid] = None
        if len(shape) == 5:
            axes = _axes(shape, spec, _config(core, "in_channels", "in_visual_dim", "in_dim", "num_channels"))
            f, h, w = (shape[axes.index(a)] for a in "FHW")
            latent = (f, h, w)
        elif len(shape) == 6 and spec.video_axes == "BNCFHW":  # N items side by side on the frame axis
            latent = (shape[1] * shape[3], shape[4], shape[5])
        elif len(shape) == 4 and spec.pixel_input:  # an image model: (B, C, H, W)
            latent = (1, shape[2], shape[3])
        elif len(shape) == 3 and all(isinstance(args.get(n), int) for n in ("num_frames", "height", "width")):
            latent = (int(args["num_frames"]), int(args["height"]), int(args["width"]))  # LTX: pre-patchified
        elif len(shape) == 3 and spec.grid_of is not None:
            grid_of = spec.grid_of(args)
            latent = None if grid_of is None else (grid_of[0] * pt, grid_of[1] * ph, grid_of[2] * pw)
        if latent is not None:
            out.latent = latent
            out.batch = shape[0]
            grid = (max(latent[0] // pt, 1), latent[1] // ph, latent[2] // pw)
            out.grid = grid if min(grid) >= 1 else None
    given = args.get(spec.text_input)
    text = _tokens(given)
    if text is not None:
        out.text_len = int(text.shape[1])
        mask = args.get("encoder_attention_mask", args.get("attention_mask"))
        out.text_real = _real_lengths(text, mask)
    elif (
        isinstance(given, (list, tuple))
        and given
        and all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in given)
    ):
        # one [L, D] tensor per sample, padded by the model to a length of its own: only the real lengths
        out.text_real = [_real_lengths(t[None], None)[0] for t in given]
    for name, value in args.items():
        n = _length(value)
        if n is None or "mask" in name or name == spec.text_input or value is video:
            continue
        for kind in ("image", "audio"):
            if kind in name and kind not in out.contexts:
                out.contexts[kind] = n
    lengths = [_length(_tokens(args.get(n))) for n in spec.context]
    if all(n is not None for n in lengths):
        out.joint_context = sum(n for n in lengths if n is not None)
        before = (
            spec.context[: spec.context.index(spec.text_input)] if spec.text_input in spec.context else ()
        )
        start = sum(_length(_tokens(args.get(n))) or 0 for n in before)
        offsets = spec.text_offset(args) if spec.text_offset is not None else None
        if out.batch is not None:
            out.text_offset = offsets if offsets is not None else [start] * out.batch
    return out


def vae_stride(core: torch.nn.Module, spec: FamilySpec) -> tuple[int, int, int]:
    """The family's VAE stride [t, h, w] for this model (by its latent channels where they differ)."""
    channels = _config(core, "in_channels")
    return next((stride for c, stride in spec.vae_by_channels if c == channels), spec.vae_stride)


def pixels(latent: Grid, stride: Sequence[int], causal: bool) -> dict[str, int]:
    """The pixel size ``{frames, height, width}`` a latent (F, H, W) decodes to through a VAE of
    ``stride`` [t, h, w]."""
    f, h, w = latent
    frames = (f - 1) * stride[0] + 1 if causal else f * stride[0]
    return {"frames": frames, "height": h * stride[1], "width": w * stride[2]}


# -- placing one call ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    """How one call's tokens map onto a :class:`Layout`, and its rows onto the model's batch.

    ``context`` names the layout's non-video keys (``"text"``, ``"image"``, ``"audio"``,
    ``"context"``); ``text_start`` (per call row) and ``text_len`` locate the prompt's tokens among
    them; ``row`` is the model batch row of a call made per row (Mochi); ``fold`` marks divided
    attention (``"space"``: call rows are (batch, frame); ``"time"``: (batch, position)), over
    ``grid`` the model's grid; ``roll`` tokens (history latents before the video of a joint call)
    move from the front to the back before reducing; ``tiles``: the call's video tokens run tile by
    tile, (t, h, w) tokens each, and are put back in frame, row order before reducing.
    """

    layout: Layout
    context: str = "text"
    text_start: tuple[int, ...] = (0,)
    text_len: Optional[int] = None
    row: Optional[int] = None
    fold: Optional[str] = None
    grid: Optional[Grid] = None
    roll: int = 0
    tiles: Optional[Grid] = None


@dataclass(frozen=True)
class Unplaced:
    """A call no layout fits (``warn``) or one that is not video attention (quietly passed over)."""

    reason: str
    warn: bool = True


def _context_of(nk: int, inputs: VideoInputs) -> str:
    if nk == inputs.text_len:
        return "text"
    for kind, n in inputs.contexts.items():
        if n == nk:
            return kind
    unknown = inputs.text_len is None  # no text input, or one the model pads to a length of its own
    return "text" if unknown or (inputs.text_real and nk in inputs.text_real) else "context"


def place(
    site: Site,
    index: int,
    b: int,
    nq: int,
    nk: int,
    inputs: VideoInputs,
    spec: FamilySpec,
    context: Optional[int] = None,
) -> Union[Placement, Unplaced]:
    """The placement of a call with ``b`` batch rows, ``nq`` queries and ``nk`` keys (the
    ``index``-th of its module in this forward); ``context``: the tokens of the
    ``encoder_hidden_states`` the module was given (-1: it takes them and was given none; None: it
    takes none), which decides a call whose shapes fit self-attention and cross-attention alike (a
    text as long as the video)."""
    grid, batch = inputs.grid, inputs.batch
    shapes = f"batch {b}, {nq} queries, {nk} keys"
    if grid is None or batch is None:
        return Unplaced(
            f"the model's forward inputs gave no video grid ({shapes}); pass layout=attnmap.Layout..."
        )
    f, h, w = grid
    nv = f * h * w
    grid_s = f"grid {grid} ({nv} video tokens)"
    # divided attention: frames or positions folded into the batch (Latte)
    given = context is not None and 0 <= nk <= context  # keys from the context the module was given
    if f > 1 and b == batch * f and nq in (h * w, h * w + 1):
        self_ = nk == nq and not given  # a text as long as a frame (Latte's cut negative prompt) is cross
        lay = Layout.self_attn((1, h, w), prefix=nq - h * w) if self_ else Layout.cross((1, h, w), text=nk)
        return Placement(lay, _context_of(nk, inputs), text_len=inputs.text_len, fold="space", grid=grid)
    if h * w > 1 and b == batch * h * w and nq == nk == f:
        return Placement(Layout.self_attn((f, 1, 1)), fold="time", grid=grid)
    if nq < nv:
        return Unplaced(
            f"{shapes}: fewer queries than the {nv} video tokens (not video attention)", warn=False
        )
    row: Optional[int] = None
    if b != batch:
        if b != 1:
            return Unplaced(f"{shapes} does not fit the model's batch of {batch} and {grid_s}")
        row = index % batch  # one call per batch row (Mochi)
    extra = nq - nv
    real = inputs.text_real
    # video queries alone, from a module given a context no shorter than the keys: keys from the
    # context, even where their number equals the queries' (Wan 2.2 TI2V-5B's tiny config: 12 text
    # tokens, 12 video; a joint call's queries hold the text too: Mochi's [video, real text])
    given_cross = given and extra == 0
    if nk != nq or given_cross:  # video queries attending to other keys
        image = inputs.contexts.get("image")
        if image is not None and inputs.text_len is not None and nk == image + inputs.text_len:
            # the image context before the text in one call (Wan's I2V layout without added k/v)
            lay = Layout.cross(grid, text=nk, prefix=extra)
            return Placement(lay, text_start=(image,), text_len=inputs.text_len, row=row)
        context_name = _context_of(nk, inputs)
        return Placement(
            Layout.cross(grid, text=nk, prefix=extra),
            context_name,
            text_len=min(nk, inputs.text_len or nk),
            row=row,
        )
    if extra == 0 and context is None and inputs.text_len == nv:
        # a text as long as the video, and no word from the module on where its keys came from
        return Unplaced(
            f"{shapes}: self-attention or cross-attention to the {nv} text tokens? The module was given no "
            "encoder_hidden_states to tell; pass layout={module name: attnmap.Layout...}"
        )
    if extra == 0 and spec.tiles:
        if any(n % t for n, t in zip(grid, spec.tiles)):
            return Unplaced(f"{shapes}: {grid_s} is not made of whole {spec.tiles} tiles")
        return Placement(Layout.self_attn(grid), row=row, tiles=spec.tiles)
    if extra == 0:
        return Placement(Layout.self_attn(grid), row=row)
    ctx = inputs.joint_context
    alone = spec.context == (spec.text_input,)  # the joint call's context is the text alone
    rows_real = [real[row]] if row is not None and real else list(real or ())
    if alone and rows_real and all(extra == n for n in rows_real) and (ctx is None or extra != ctx):
        # the text trimmed to the row's real tokens (Mochi: one call per row, or one row)
        starts = (0,) * (1 if row is not None else len(rows_real))
        lay = Layout.joint(extra, grid, text_first=spec.text_first)
        return Placement(lay, text_start=starts, text_len=extra, row=row)
    if ctx is not None and extra == ctx:
        starts = tuple(inputs.text_offset or (0,))
        starts = starts if row is None else (starts[row % len(starts)],)
        return Placement(
            Layout.joint(extra, grid, text_first=spec.text_first),
            text_start=starts,
            text_len=inputs.text_len,
            row=row,
        )
    if ctx is not None and spec.joint_history and extra > ctx and not spec.text_first:
        # [history, video, context] -> [video, context, history]: one joint layout, video first
        starts = tuple(inputs.text_offset or (0,))
        lay = Layout.joint(extra, grid, text_first=False)
        return Placement(lay, text_start=starts, text_len=inputs.text_len, row=row, roll=extra - ctx)
    text_like = {inputs.text_len, ctx, *rows_real} - {None}
    if extra in text_like or (context is not None and context >= 0):
        # as many extra tokens as a text, or a module given a context: a joint call this family's
        # spec does not describe; reading them as prefix tokens would be a guess
        return Unplaced(
            f"{shapes}: {extra} tokens beside the {grid_s} match no joint layout of this family "
            f"(text {inputs.text_len}, real {rows_real or None}, context {ctx}, given context {context}); "
            "pass layout={module name: attnmap.Layout...}"
        )
    return Placement(Layout.self_attn(grid, prefix=extra), row=row)  # prefix tokens: history latents, CLS


def untile(grid: Grid, tiles: Grid, device: torch.device) -> torch.Tensor:
    """The position, in a tile-by-tile token order, of each video token in frame, row order."""
    (f, h, w), (tf, th, tw) = grid, tiles
    tiled = torch.arange(f * h * w, device=device).reshape(f // tf, tf, h // th, th, w // tw, tw)
    return tiled.permute(0, 2, 4, 1, 3, 5).flatten().argsort()


def token_order(place: Placement, n: int, device: torch.device) -> Optional[torch.Tensor]:
    """Where, among a call's ``n`` tokens, each token of the placed layout's order sits: the history
    latents of ``roll`` moved from the front to the back, or the video put back in frame, row order
    from ``tiles``; None when the call's order is the layout's already."""
    if place.roll:
        return torch.cat(
            [torch.arange(place.roll, n, device=device), torch.arange(place.roll, device=device)]
        )
    if place.tiles:
        return untile(place.layout.grid, place.tiles, device)
    return None


def key_padding(
    mask: torch.Tensor, b: int, h: int, nk: int, video: slice
) -> Union[tuple[torch.Tensor, bool], str]:
    """An attention mask as a key-padding mask ``[B, 1 or H, 1, Nk]``, read on the video query rows.

    Returns ``(mask, rows_vary)`` (``rows_vary``: other query rows have other masks, e.g. the padded
    text rows of an outer-product mask), or the reason it is no key-padding mask there.
    """
    m = mask
    if m.dim() == 2:  # [B, Nk] (diffusers' native backend reshapes it so)
        m = m[:, None, None, :]
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.shape[-1] != nk or m.shape[1] not in (1, h) or m.shape[0] not in (1, b):
        return f"attn_mask of shape {tuple(mask.shape)} does not broadcast to keys [B, H, 1, {nk}]"
    if m.shape[-2] == 1:
        return m.expand(b, m.shape[1], 1, nk), False
    rows = m[..., video, :]
    first = rows[..., :1, :]
    if not bool((rows == first).all()):
        return "attn_mask varies over the video queries (only key-padding masks on the video query rows are read)"
    return first.expand(b, m.shape[1], 1, nk), not bool((m == first).all())


def fits(layout: Layout, nq: int, nk: int) -> bool:
    return layout.num_queries == nq and layout.num_keys == nk
