"""Video LLMs of transformers 5.x: the family of a model, where its video tokens sit, its video grids,
the order of its vision tower's tokens, and which input frames each temporal slot covers.

:func:`spec_of` names the family (:data:`SPECS`, keyed by class name); :func:`read` turns the
inputs the model got (``input_ids``, ``attention_mask``, ``video_grid_thw`` or the pixel tensors, the
compression mask ...) into :class:`VideoLLMInputs`: the token map of each batch row
(:class:`~attnmap.capture.sequence.SequenceMap`: the sequence position of every cell of the LLM's
video grid ``(F, H, W)``), the vision tower's token order (:class:`VisionOrder`: which patch each row
of each vision call is, so that a window permutation or a merge's block-major order is undone) and
the time of each slot (the input frames it covers, the processor's timestamps where its text or its
inputs give them). One video per batch row, every row's on the same grid; anything else is
refused with the reason. Private to :mod:`attnmap.capture`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

from attnmap.capture.sequence import RowTokens, SequenceMap
from attnmap.capture.tokens import run_positions
from attnmap.errors import AttnmapError

Grid = tuple[int, int, int]


def _half_up(cfg: Any, side: int) -> int:
    return -(-side // 2)  # LLaVA-OneVision: bilinear to ceil(side / 2)


def _pool_stride(cfg: Any, side: int) -> int:
    stride = int(getattr(cfg, "spatial_pool_stride", 2))
    return side // stride if stride > 0 else 0  # 0 tokens: the reader says why


def _scale_factor(cfg: Any, side: int) -> int:
    factor = int(getattr(cfg, "scale_factor", 2))
    return side // factor if factor > 0 else 0  # 0 tokens: the reader says why


def _downsample(cfg: Any, side: int) -> int:
    return int(side * float(getattr(cfg, "downsample_ratio", 0.5)))


@dataclass(frozen=True)
class VLMSpec:
    """What capture knows about one video-LLM family.

    ``grid``: where the video grids come from: ``"thw"`` (``video_grid_thw`` in patches, the LLM grid
    merged by ``spatial_merge_size``), ``"compressed"`` (VideoLLaMA3: ``video_grid_thw``,
    ``video_merge_sizes`` and the ``video_compression_mask`` of kept cells), ``"frames"`` (a pixel
    tensor of frames pooled to ``side(config, patches)`` tokens a side), ``"positions"`` (Gemma 4:
    ``video_position_ids`` per patch, pooled ``pooling_kernel_size``). ``vision``: the tower's token
    order: ``"block_major"`` (each slot's merge blocks in raster order, a block's patches together),
    ``"window"`` (Qwen2.5-VL's windows of merged tokens), ``"frames"`` (each call's batch rows are
    frames, raster patches after any CLS token). ``token``: the config attribute of the video token's
    id where the inputs carry no ``mm_token_type_ids``; ``tail``: video-token ids after a video's last
    cell (LLaVA-OneVision's newline). ``time``: where the processor writes each slot's time:
    ``"seconds"`` / ``"mmss"`` in the text before the slot, ``"int_after"`` after it,
    ``"grid_ts"`` from ``second_per_grid_ts``; ``""``: nowhere.
    """

    family: str
    classes: tuple[str, ...]
    grid: str
    vision: str
    token: str = "video_token_id"
    tail: int = 0
    side: Callable[[Any, int], int] = _half_up
    time: str = ""


def _qwen(family: str, prefix: str, vision: str = "block_major", time: str = "") -> VLMSpec:
    return VLMSpec(
        family=family,
        classes=(f"{prefix}ForConditionalGeneration", f"{prefix}Model"),
        grid="thw",
        vision=vision,
        time=time,
    )


#: The video-LLM families capture reads (transformers 5.x class names).
SPECS: tuple[VLMSpec, ...] = (
    _qwen("qwen2_vl", "Qwen2VL"),
    _qwen("qwen2_5_vl", "Qwen2_5_VL", vision="window", time="grid_ts"),
    _qwen("qwen3_vl", "Qwen3VL", time="seconds"),
    _qwen("qwen3_vl_moe", "Qwen3VLMoe", time="seconds"),
    _qwen("glm4v", "Glm4v", time="int_after"),
    _qwen("glm4v_moe", "Glm4vMoe", time="int_after"),
    VLMSpec(
        family="videollama3",
        classes=("VideoLlama3ForConditionalGeneration", "VideoLlama3Model"),
        grid="compressed",
        vision="block_major",
        time="seconds",
    ),
    VLMSpec(
        family="llava_onevision",
        classes=("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel"),
        grid="frames",
        vision="frames",
        tail=1,
        side=_half_up,
    ),
    VLMSpec(
        family="llava_next_video",
        classes=("LlavaNextVideoForConditionalGeneration", "LlavaNextVideoModel"),
        grid="frames",
        vision="frames",
        side=_pool_stride,
    ),
    VLMSpec(
        family="smolvlm",
        classes=("SmolVLMForConditionalGeneration", "SmolVLMModel"),
        grid="frames",
        vision="frames",
        token="image_token_id",
        side=_scale_factor,
        time="mmss",
    ),
    VLMSpec(
        family="internvl",
        classes=("InternVLForConditionalGeneration", "InternVLModel"),
        grid="frames",
        vision="frames",
        token="image_token_id",
        side=_downsample,
    ),
    VLMSpec(
        family="gemma4",
        classes=("Gemma4ForConditionalGeneration", "Gemma4Model"),
        grid="positions",
        vision="frames",
        time="mmss",
    ),
)
_BY_CLASS = {name: spec for spec in SPECS for name in spec.classes}


def spec_of(model: Any) -> Optional[VLMSpec]:
    """The spec of a video LLM (None for any other model)."""
    return _BY_CLASS.get(type(model).__name__)


def parts(model: torch.nn.Module) -> tuple[str, str]:
    """The qualified names of a video LLM's language model and vision tower."""
    names = {n for n, _ in model.named_modules()}
    llm = next(
        (p + n for p in ("model.", "") for n in ("language_model", "text_model") if p + n in names), None
    )
    vision = next(
        (p + n for p in ("model.", "") for n in ("visual", "vision_tower", "vision_model") if p + n in names),
        None,
    )
    if llm is None or vision is None:
        raise AttnmapError(
            f"model: a {type(model).__name__} has no language model (language_model, text_model) or vision "
            "tower (visual, vision_tower, vision_model) among its modules"
        )
    return llm, vision


@dataclass
class VisionOrder:
    """Which patch each row of each vision call is.

    ``"sequence"``: the tower runs every video's patches as one sequence (calls per slot or per
    window take the next rows in turn); ``cells [N, 4]`` holds (batch row, slot, y, x) of each row.
    ``"frames"``: each call's batch rows are frames, in turn; ``frames [Nf, 2]`` holds (batch row,
    slot) of each and ``patches [Nf, P, 2]`` the (y, x) of each patch token (-1: padding), after any
    prefix (CLS) tokens of the call.
    """

    kind: str
    cells: Optional[torch.Tensor] = None
    frames: Optional[torch.Tensor] = None
    patches: Optional[torch.Tensor] = None


@dataclass
class VideoLLMInputs:
    """What a video LLM's inputs say (see the module docstring)."""

    seq: SequenceMap
    vision: VisionOrder
    vision_grid: Grid  # (T, Hv, Wv) patches of one video
    patch: int  # pixels per patch side
    merge: int  # patches per LLM cell side
    temporal: int  # input frames per slot
    slot_frames: list[list[int]]
    timestamps: list[Optional[float]]
    fps: Optional[float] = None

    @property
    def grid(self) -> Grid:
        return self.seq.grid


def block_major(grid: Grid, merge: int) -> torch.Tensor:
    """``[T*H*W, 3]``: the (slot, y, x) patch of each row of a Qwen-style patch sequence: per slot the
    ``merge x merge`` blocks in raster order, each block's patches in raster order."""
    t, h, w = grid
    m = merge
    c = torch.stack(
        torch.meshgrid(
            torch.arange(t), torch.arange(h // m), torch.arange(w // m), torch.arange(m), torch.arange(m),
            indexing="ij",
        ),
        dim=-1,
    ).reshape(-1, 5)  # fmt: skip
    return torch.stack([c[:, 0], c[:, 1] * m + c[:, 3], c[:, 2] * m + c[:, 4]], dim=-1)


def window_order(grid: Grid, merge: int, window: int) -> torch.Tensor:
    """Qwen2.5-VL's tower order: the block-major row at each position of its sequence (per slot,
    windows of ``window x window`` merged tokens in raster order, edge windows cut short, merged
    tokens raster inside a window, each token's ``merge**2`` patches together)."""
    t, h, w = grid
    hm, wm, unit = h // merge, w // merge, merge * merge
    token = torch.arange(t * hm * wm).view(t, hm, wm)
    order = []
    for f in range(t):
        for y0 in range(0, hm, window):
            for x0 in range(0, wm, window):
                for tok in token[f, y0 : y0 + window, x0 : x0 + window].flatten().tolist():
                    order.append(torch.arange(tok * unit, (tok + 1) * unit))
    return torch.cat(order)


def _config(cfg: Any, name: str, default: Any = None) -> Any:
    value = getattr(cfg, name, None)
    return default if value is None else value


def _int(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _video_positions(
    spec: VLMSpec, model: Any, args: Mapping[str, Any], ids: torch.Tensor
) -> list[list[int]]:
    """Per batch row, the positions of every video token (in sequence order)."""
    types = args.get("mm_token_type_ids")
    if isinstance(types, torch.Tensor) and types.shape == ids.shape:
        hit = types == 2
    else:
        token = getattr(model.config, spec.token, None)
        if token is None:
            token = getattr(model.config, spec.token.replace("_id", "_index"), None)
        hit = ids == int(token) if token is not None else torch.zeros_like(ids, dtype=torch.bool)
    return [row.nonzero().flatten().tolist() for row in hit]


def _one_per_row(grids: torch.Tensor, batch: int, with_video: list[int]) -> Optional[str]:
    if grids.dim() != 2 or grids.shape[-1] != 3:
        return f"video_grid_thw of shape {tuple(grids.shape)} (expected [videos, 3])"
    if grids.shape[0] != batch or len(with_video) != batch:
        return f"{grids.shape[0]} video(s) for a batch of {batch} rows ({len(with_video)} with video tokens)"
    if not bool((grids == grids[:1]).all()):
        return f"the rows' videos have different grids {grids.tolist()}"
    return None


@dataclass
class _Layout:
    """The grids and orders one family's inputs give, before the rows are read."""

    llm: Grid
    vision_grid: Grid
    patch: int
    merge: int
    temporal: int
    cells: list[
        torch.Tensor
    ]  # per row [F, H, W]: the index of each cell's token among the row's video tokens
    vision: VisionOrder


def _thw(spec: VLMSpec, model: Any, args: Mapping[str, Any], counts: list[int]) -> Union[_Layout, str]:
    grids = args.get("video_grid_thw")
    if not isinstance(grids, torch.Tensor):
        return "no video_grid_thw among its inputs"
    batch = len(counts)
    reason = _one_per_row(grids, batch, [b for b, n in enumerate(counts) if n])
    if reason:
        return reason
    vc = model.config.vision_config
    t, hv, wv = (int(v) for v in grids[0].tolist())
    patch = _int(_config(vc, "patch_size", 14))
    tp = int(_config(vc, "temporal_patch_size", 1))
    kept: Optional[torch.Tensor] = None
    if spec.grid == "compressed":
        merges = args.get("video_merge_sizes")
        merge = int(merges[0]) if isinstance(merges, torch.Tensor) else 2
        tp = 1
    else:
        merge = int(_config(vc, "spatial_merge_size", 2))
    if merge < 1 or patch < 1:
        return f"a merge size of {merge} and a patch size of {patch} (expected both >= 1)"
    llm = (t, hv // merge, wv // merge)
    n = llm[0] * llm[1] * llm[2]
    if spec.grid == "compressed":
        mask = args.get("video_compression_mask")
        if isinstance(mask, torch.Tensor) and mask.numel() == batch * n:
            kept = mask.reshape(batch, *llm).bool().cpu()
    if kept is None:
        kept = torch.ones(batch, *llm, dtype=torch.bool)
    cells = []
    for b in range(batch):
        index = torch.full((n,), -1, dtype=torch.long)
        flat = kept[b].flatten()
        index[flat] = torch.arange(int(flat.sum()))
        if int(flat.sum()) != counts[b]:
            return f"row {b} has {counts[b]} video tokens, its grid {llm} {int(flat.sum())}"
        cells.append(index.view(llm))
    rows = block_major((t, hv, wv), merge)
    if spec.vision == "window":
        size = _int(_config(vc, "window_size", 112))
        window = size // patch // merge
        if window < 1:
            return (
                f"a window_size of {size} holds no merged token of {patch * merge} x {patch * merge} pixels"
            )
        rows = rows[window_order((t, hv, wv), merge, window)]
    tower = torch.cat([torch.cat([torch.full((rows.shape[0], 1), b), rows], dim=1) for b in range(batch)])
    return _Layout(
        llm=llm, vision_grid=(t, hv, wv), patch=patch, merge=merge, temporal=tp, cells=cells,
        vision=VisionOrder("sequence", cells=tower),
    )  # fmt: skip


def _frames(spec: VLMSpec, model: Any, args: Mapping[str, Any], counts: list[int]) -> Union[_Layout, str]:
    pixels = next(
        (args[n] for n in ("pixel_values_videos", "pixel_values") if isinstance(args.get(n), torch.Tensor)),
        None,
    )
    if pixels is None or pixels.dim() not in (4, 5):
        return "no pixel tensor [B, F, 3, H, W] or [B*F, 3, H, W] among its inputs"
    vc = model.config.vision_config
    patch = _int(_config(vc, "patch_size", 14))
    if patch < 1:
        return f"a patch size of {patch} (expected >= 1)"
    hv, wv = int(pixels.shape[-2]) // patch, int(pixels.shape[-1]) // patch
    nh, nw = spec.side(model.config, hv), spec.side(model.config, wv)
    per = nh * nw
    if per < 1:
        return f"frames of {hv} x {wv} patches give {nh} x {nw} video tokens a frame (expected >= 1 each)"
    frames = {(n - spec.tail) // per for n in counts}
    if len(frames) != 1 or any((n - spec.tail) % per or n <= spec.tail for n in counts):
        return f"rows of {counts} video tokens are not one video of {nh} x {nw} tokens a frame each"
    f = frames.pop()
    llm = (f, nh, nw)
    batch = len(counts)
    cells = [torch.arange(f * per).view(llm) for _ in range(batch)]
    b, t = torch.meshgrid(torch.arange(batch), torch.arange(f), indexing="ij")
    y, x = torch.meshgrid(torch.arange(hv), torch.arange(wv), indexing="ij")
    raster = torch.stack([y.flatten(), x.flatten()], dim=-1)
    order = VisionOrder("frames", frames=torch.stack([b.flatten(), t.flatten()], -1), patches=raster[None])
    return _Layout(
        llm=llm, vision_grid=(f, hv, wv), patch=patch, merge=max(1, hv // max(1, nh)), temporal=1,
        cells=cells, vision=order,
    )  # fmt: skip


def _positions(spec: VLMSpec, model: Any, args: Mapping[str, Any], counts: list[int]) -> Union[_Layout, str]:
    pos, per_video = args.get("video_position_ids"), args.get("num_frames_per_video")
    if not isinstance(pos, torch.Tensor) or pos.dim() != 3 or not isinstance(per_video, torch.Tensor):
        return "no video_position_ids [frames, patches, 2] and num_frames_per_video among its inputs"
    batch = len(counts)
    if per_video.numel() != batch or not bool((per_video == per_video[0]).all()):
        return f"{per_video.tolist()} frames per video for a batch of {batch} rows (one video of each row)"
    vc = model.config.vision_config
    k = int(_config(vc, "pooling_kernel_size", 1))
    real = pos[..., 0] >= 0
    if k < 1 or not bool(real.any()):
        return f"video_position_ids hold no real patch position (all < 0), or a pooling_kernel_size of {k}"
    hv, wv = int(pos[..., 1][real].max()) + 1, int(pos[..., 0][real].max()) + 1
    f = int(per_video[0])
    llm = (f, hv // k, wv // k)
    per = f * llm[1] * llm[2]
    if any(n != per for n in counts):
        return f"rows of {counts} video tokens are not one video of grid {llm} each"
    cells = [torch.arange(per).view(llm) for _ in range(batch)]
    b, t = torch.meshgrid(torch.arange(batch), torch.arange(f), indexing="ij")
    patches = torch.where(real[..., None], pos.flip(-1), torch.full_like(pos, -1)).long().cpu()  # (y, x)
    order = VisionOrder("frames", frames=torch.stack([b.flatten(), t.flatten()], -1), patches=patches)
    patch = _int(_config(vc, "patch_size", 16))
    return _Layout(
        llm=llm, vision_grid=(f, hv, wv), patch=patch, merge=k, temporal=1, cells=cells, vision=order
    )


_READERS = {"thw": _thw, "compressed": _thw, "frames": _frames, "positions": _positions}

_SECONDS = re.compile(r"(\d+(?:\.\d+)?)(?:seconds|s)")
_MMSS = re.compile(r"(\d+):(\d+)")
_INT = re.compile(r"^(\d+)")


def _decode(tokenizer: Any, ids: list[int]) -> str:
    if not ids:
        return ""
    try:
        text = tokenizer.decode(ids, skip_special_tokens=True)
    except Exception:  # a tokenizer that cannot decode these ids says nothing
        return ""
    return re.sub(r"\s+", "", str(text)).lower()


def _timestamps(
    spec: VLMSpec, args: Mapping[str, Any], row: list[int], cells: torch.Tensor, tokenizer: Any
) -> list[Optional[float]]:
    """Each slot's time as the processor gives it (None where it gives none)."""
    frames = cells.shape[0]
    if spec.time == "grid_ts":
        ts = args.get("second_per_grid_ts")
        if isinstance(ts, torch.Tensor) and ts.numel():
            return [round(t * float(ts.flatten()[0]), 6) for t in range(frames)]
        return [None] * frames
    if not spec.time or tokenizer is None:
        return [None] * frames
    out: list[Optional[float]] = []
    starts = [
        int(cells[t][cells[t] >= 0].min()) if bool((cells[t] >= 0).any()) else -1 for t in range(frames)
    ]
    ends = [int(cells[t][cells[t] >= 0].max()) if bool((cells[t] >= 0).any()) else -1 for t in range(frames)]
    for t in range(frames):
        if starts[t] < 0:
            out.append(None)
            continue
        if spec.time == "int_after":
            stop = next((s for s in starts[t + 1 :] if s >= 0), min(len(row), ends[t] + 8))
            found = _INT.search(_decode(tokenizer, row[ends[t] + 1 : stop]))
            out.append(float(found.group(1)) if found else None)
            continue
        begin = max((e for e in ends[:t] if e >= 0), default=-1) + 1
        text = _decode(tokenizer, row[begin : starts[t]])
        if spec.time == "seconds":
            hits = _SECONDS.findall(text)
            out.append(float(hits[-1]) if hits else None)
        else:
            pairs = _MMSS.findall(text)
            out.append(float(int(pairs[-1][0]) * 60 + int(pairs[-1][1])) if pairs else None)
    return out


def read(
    spec: VLMSpec,
    model: Any,
    args: Mapping[str, Any],
    *,
    tokenizer: Any = None,
    words: Callable[[int, list[int], int], dict[str, tuple[int, ...]]] = lambda b, ids, after: {},
) -> Union[VideoLLMInputs, str]:
    """The inputs of a prefill (``input_ids``, ``attention_mask`` and the video inputs) as
    :class:`VideoLLMInputs`, or the reason they cannot be read.

    Args:
        spec: the family.
        model: the model (its config gives the token ids, patch and merge sizes).
        args: the forward's (or generate's) arguments by name.
        tokenizer: decodes the text around each slot for its timestamp (optional).
        words: ``(row, ids, after)`` -> the row's marked words and their positions (``after``: the
            position after the row's last video token).
    """
    ids = args.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return "no input_ids [B, N] among its inputs"
    ids = ids.cpu()
    mask = args.get("attention_mask")
    keep = mask.cpu().bool() if isinstance(mask, torch.Tensor) and mask.shape == ids.shape else None
    positions = _video_positions(spec, model, args, ids)
    counts = [len(p) for p in positions]
    if not any(counts):
        return "its input_ids hold no video token"
    laid = _READERS[spec.grid](spec, model, args, counts)
    if isinstance(laid, str):
        return laid
    if keep is not None and not bool(keep[:, -1].all()):
        return "a right-padded batch (generate() answers after each row's last token: pad on the left)"
    rows, video = [], []
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        pad = 0 if keep is None else int((~keep[b]).cumprod(0).sum())
        at = torch.tensor(positions[b], dtype=torch.long)
        index = laid.cells[b]
        cells = torch.where(index >= 0, at[index.clamp_min(0)], torch.full_like(index, -1))
        after = (max(positions[b]) + 1) if positions[b] else 0
        rows.append(RowTokens(ids=row, pad=pad, cells=cells, words=words(b, row, after)))
        video.append(positions[b])
    seq = SequenceMap(rows, laid.llm, video)
    frames = laid.llm[0]
    slot_frames = [list(range(t * laid.temporal, (t + 1) * laid.temporal)) for t in range(frames)]
    stamps = _timestamps(spec, args, rows[0].ids, rows[0].cells, tokenizer)
    fps: Optional[float] = None
    ts = args.get("second_per_grid_ts")
    if spec.time == "grid_ts" and isinstance(ts, torch.Tensor) and ts.numel() and float(ts.flatten()[0]) > 0:
        fps = laid.temporal / float(ts.flatten()[0])
    else:
        steps = [b - a for a, b in zip(stamps, stamps[1:]) if a is not None and b is not None]
        if steps and all(math.isclose(s, steps[0]) for s in steps) and steps[0] > 0:
            fps = laid.temporal / steps[0]
    return VideoLLMInputs(
        seq=seq, vision=laid.vision, vision_grid=laid.vision_grid, patch=laid.patch, merge=laid.merge,
        temporal=laid.temporal, slot_frames=slot_frames, timestamps=stamps, fps=fps,
    )  # fmt: skip


def word_positions(
    row: Sequence[int], after: int, prompts: Sequence[tuple[list[int], dict[str, list[int]]]]
) -> dict[str, tuple[int, ...]]:
    """A row's marked words: the longest prompt whose tokens (``(ids, {word: indices among them})``)
    run inside the row, looked for after its video first, gives its words' positions."""
    for plain, found in sorted(prompts, key=lambda p: -len(p[0])):
        starts = run_positions(row, plain)
        if not starts:
            continue
        start = next((s for s in starts if s >= after), starts[0])
        return {w: tuple(start + i for i in idx) for w, idx in found.items()}
    return {}
