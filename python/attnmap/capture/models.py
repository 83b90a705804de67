"""Which modules of a known model are attention, which block and role each has, and how the video
grid follows from the model's forward inputs. Private to :mod:`attnmap.capture`.

Roles: ``self`` (video self-attention, optional prefix tokens), ``cross`` (video -> text),
``joint`` (text and video in one sequence), ``space`` / ``time`` (TimeSformer's divided attention,
captured from its eager softmax), ``any`` (the caller's explicit layout).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

Grid = tuple[int, int, int]


@dataclass
class Site:
    """One watched attention module."""

    name: str
    module: torch.nn.Module
    block: int
    role: str
    calls: int = 0  # SDPA calls inside the module's current forward


@dataclass
class InputInfo:
    """What the watched model's forward inputs say about the tokens of this forward."""

    grid: Optional[Grid] = None
    batch: Optional[int] = None
    text_len: Optional[list[int]] = None  # real (unpadded) text tokens per batch row
    video: Optional[dict[str, Any]] = None  # pixel size {frames, height, width}


@dataclass
class ModelSpec:
    """How capture reads one model family."""

    family: str
    core: torch.nn.Module  # the module whose forward inputs give the grid
    sites: list[Site]
    inputs: Callable[[dict[str, Any]], InputInfo] = field(default=lambda a: InputInfo())
    text_first: bool = True
    prefix: Optional[int] = 0  # prefix tokens of self-attention (None: any)
    patch_size: Optional[list[int]] = None
    vae_stride: Optional[list[int]] = None
    eager_softmax: bool = False  # attention probabilities come from softmax calls (TimeSformer)

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The core's forward arguments by name."""
        try:
            bound = inspect.signature(self.core.forward).bind_partial(*args, **kwargs)
        except TypeError:
            return dict(kwargs)
        out = dict(bound.arguments)
        extra = out.pop("kwargs", None)
        if isinstance(extra, dict):
            out.update(extra)
        return out


def _tuple3(value: Any) -> tuple[int, int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) == 3:
            return int(value[0]), int(value[1]), int(value[2])
        if len(value) == 2:
            return 1, int(value[0]), int(value[1])
    return 1, int(value), int(value)


def _shape(x: Any) -> Optional[tuple[int, ...]]:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else None


def _sites(core: torch.nn.Module, patterns: list[tuple[str, str]]) -> list[Site]:
    """Sites whose qualified names match ``(regex with the block number as group 1, role)``;
    blocks of a later pattern list are numbered after those of an earlier one."""
    sites: list[Site] = []
    offset = 0
    by_list: dict[str, int] = {}
    for pattern, role in patterns:
        rx = re.compile(pattern)
        list_key = pattern.split(r"\.(\d+)")[0]
        if list_key not in by_list:
            by_list[list_key] = offset
        base = by_list[list_key]
        top = -1
        for name, module in core.named_modules():
            m = rx.match(name)
            if m:
                idx = int(m.group(1))
                top = max(top, idx)
                sites.append(Site(name, module, base + idx, role))
        offset = max(offset, base + top + 1)
    return sites


def _real_text(ehs: Any) -> Optional[list[int]]:
    """Unpadded length of each row of zero-padded text embeddings (B, L, D) (Wan pads with zeros)."""
    if not isinstance(ehs, torch.Tensor) or ehs.dim() != 3:
        return None
    nonzero = ehs.detach().abs().amax(dim=-1) > 0  # (B, L)
    pos = torch.arange(1, ehs.shape[1] + 1, device=ehs.device)
    return [int(v) for v in (nonzero * pos).amax(dim=1).tolist()]


def _pixels(latent: tuple[int, ...], stride: list[int]) -> dict[str, Any]:
    """Pixel size of a latent (F, H, W) through a causal video VAE of ``stride`` [t, h, w] (read
    when the forward runs, so a pipeline's own VAE factors, set on the spec, take effect)."""
    f, h, w = latent
    return {"frames": (f - 1) * stride[0] + 1, "height": h * stride[1], "width": w * stride[2]}


def _wan(core: Any) -> ModelSpec:
    patch = _tuple3(core.config.patch_size)

    def inputs(a: dict[str, Any]) -> InputInfo:
        s = _shape(a.get("hidden_states"))
        if s is None or len(s) != 5:
            return InputInfo()
        grid = (s[2] // patch[0], s[3] // patch[1], s[4] // patch[2])
        return InputInfo(grid, s[0], _real_text(a.get("encoder_hidden_states")), _pixels(s[2:], stride))

    # Wan 2.2 TI2V-5B's VAE (48 latent channels) compresses 16x in space, the others 8x
    stride = [4, 16, 16] if int(core.config.in_channels) == 48 else [4, 8, 8]
    sites = _sites(core, [(r"^blocks\.(\d+)\.attn1$", "self"), (r"^blocks\.(\d+)\.attn2$", "cross")])
    return ModelSpec("wan", core, sites, inputs, patch_size=list(patch), vae_stride=stride)


def _cogvideox(core: Any) -> ModelSpec:
    p = int(core.config.patch_size)
    pt = int(core.config.patch_size_t or 1)
    ratio = int(getattr(core.config, "temporal_compression_ratio", 4))

    def inputs(a: dict[str, Any]) -> InputInfo:
        s = _shape(a.get("hidden_states"))  # (B, F, C, H, W)
        if s is None or len(s) != 5:
            return InputInfo()
        return InputInfo((s[1] // pt, s[3] // p, s[4] // p), s[0], None, _pixels((s[1], s[3], s[4]), stride))

    stride = [ratio, 8, 8]
    sites = _sites(core, [(r"^transformer_blocks\.(\d+)\.attn1$", "joint")])
    return ModelSpec("cogvideox", core, sites, inputs, True, 0, [pt, p, p], stride)


def _hunyuan(core: Any) -> ModelSpec:
    p = int(core.config.patch_size)
    pt = int(core.config.patch_size_t)

    def inputs(a: dict[str, Any]) -> InputInfo:
        s = _shape(a.get("hidden_states"))  # (B, C, F, H, W)
        if s is None or len(s) != 5:
            return InputInfo()
        return InputInfo((s[2] // pt, s[3] // p, s[4] // p), s[0], None, _pixels(s[2:], stride))

    stride = [4, 8, 8]

    sites = _sites(
        core,
        [
            (r"^transformer_blocks\.(\d+)\.attn$", "joint"),
            (r"^single_transformer_blocks\.(\d+)\.attn$", "joint"),
        ],
    )
    return ModelSpec("hunyuanvideo", core, sites, inputs, False, 0, [pt, p, p], stride)


def _ltx(core: Any) -> ModelSpec:
    p = int(core.config.patch_size)
    pt = int(core.config.patch_size_t)

    def inputs(a: dict[str, Any]) -> InputInfo:
        f, h, w = a.get("num_frames"), a.get("height"), a.get("width")
        s = _shape(a.get("hidden_states"))
        if f is None or h is None or w is None or s is None:
            return InputInfo()
        video = _pixels((int(f), int(h), int(w)), stride)
        return InputInfo((int(f) // pt, int(h) // p, int(w) // p), s[0], None, video)

    stride = [8, 32, 32]

    sites = _sites(
        core,
        [(r"^transformer_blocks\.(\d+)\.attn1$", "self"), (r"^transformer_blocks\.(\d+)\.attn2$", "cross")],
    )
    return ModelSpec("ltxvideo", core, sites, inputs, True, 0, [pt, p, p], stride)


def _tubelets(key: str, tubelet: int, patch: int) -> Callable[[dict[str, Any]], InputInfo]:
    def inputs(a: dict[str, Any]) -> InputInfo:
        s = _shape(a.get(key))  # (B, T, C, H, W)
        if s is None or len(s) != 5:
            return InputInfo()
        video = {"frames": s[1], "height": s[3], "width": s[4]}
        return InputInfo((s[1] // tubelet, s[3] // patch, s[4] // patch), s[0], None, video)

    return inputs


def _vjepa2(core: Any) -> ModelSpec:
    t, p = int(core.config.tubelet_size), int(core.config.patch_size)
    sites = _sites(core, [(r"^encoder\.layer\.(\d+)\.attention$", "self")])
    return ModelSpec(
        "vjepa2", core, sites, _tubelets("pixel_values_videos", t, p), True, 0, [t, p, p], [1, 1, 1]
    )


def _videomae(core: Any) -> ModelSpec:
    t, p = int(core.config.tubelet_size), int(core.config.patch_size)
    sites = _sites(core, [(r"^encoder\.layer\.(\d+)\.attention\.attention$", "self")])
    return ModelSpec("videomae", core, sites, _tubelets("pixel_values", t, p), True, 0, [t, p, p], [1, 1, 1])


def _timesformer(core: Any) -> ModelSpec:
    p = int(core.config.patch_size)
    sites = _sites(
        core,
        [
            (r"^encoder\.layer\.(\d+)\.attention\.attention$", "space"),
            (r"^encoder\.layer\.(\d+)\.temporal_attention\.attention$", "time"),
        ],
    )
    return ModelSpec(
        "timesformer", core, sites, _tubelets("pixel_values", 1, p), True, 1, [1, p, p], [1, 1, 1], True
    )


def _timm_vit(core: Any) -> ModelSpec:
    patch = core.patch_embed.patch_size
    ph, pw = (int(patch[0]), int(patch[1])) if isinstance(patch, (tuple, list)) else (int(patch), int(patch))

    def inputs(a: dict[str, Any]) -> InputInfo:
        s = _shape(a.get("x"))  # (B, C, H, W)
        if s is None or len(s) != 4:
            return InputInfo()
        return InputInfo(
            (1, s[2] // ph, s[3] // pw), s[0], None, {"frames": 1, "height": s[2], "width": s[3]}
        )

    sites = _sites(core, [(r"^blocks\.(\d+)\.attn$", "self")])
    prefix = int(getattr(core, "num_prefix_tokens", 0))
    return ModelSpec("timm-vit", core, sites, inputs, True, prefix, [1, ph, pw], [1, 1, 1])


_FAMILIES: dict[str, Callable[[Any], ModelSpec]] = {
    "WanTransformer3DModel": _wan,
    "WanVACETransformer3DModel": _wan,
    "CogVideoXTransformer3DModel": _cogvideox,
    "HunyuanVideoTransformer3DModel": _hunyuan,
    "LTXVideoTransformer3DModel": _ltx,
    "VJEPA2Model": _vjepa2,
    "VideoMAEModel": _videomae,
    "TimesformerModel": _timesformer,
    "VisionTransformer": _timm_vit,
}


def infer(model: torch.nn.Module) -> Optional[ModelSpec]:
    """The spec of the first known model family inside ``model`` (itself or a submodule), with the
    site names relative to the whole ``model``; None for an unknown model."""
    for prefix, module in model.named_modules():
        build = _FAMILIES.get(type(module).__name__)
        if build is None:
            continue
        spec = build(module)
        if not spec.sites:
            continue
        if prefix:
            for site in spec.sites:
                site.name = f"{prefix}.{site.name}"
        return spec
    return None


_ATTN_NAME = re.compile(r"attention|attn", re.IGNORECASE)
_BLOCK_NAME = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def generic(model: torch.nn.Module) -> ModelSpec:
    """Every module whose class name says attention (the model itself included, named ``<root>``), for
    a model with an explicit layout; the block is the first list index in the module's name (0 when it
    has none). A call inside nested ones counts for the innermost."""
    sites = []
    for name, module in model.named_modules():
        if _ATTN_NAME.search(type(module).__name__):
            m = _BLOCK_NAME.search(name)
            sites.append(Site(name or "<root>", module, int(m.group(1)) if m else 0, "any"))
    return ModelSpec("generic", model, sites, prefix=None)
