"""Analysis of captured maps: token maps, normalisation, masks, temporal matrices, locality, summaries.

Array functions take torch tensors or numpy arrays and return numpy arrays (float32 unless said
otherwise). Store functions read through :class:`attnmap.store.Store`.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import numpy as np

from attnmap._checks import integer, integers, number
from attnmap._io import atomic_write
from attnmap.analysis.normalization import Normalize, normalize
from attnmap.errors import AttnmapError

if TYPE_CHECKING:  # pragma: no cover
    from attnmap.store import Store

ArrayLike = Any  # torch.Tensor or numpy array


def _np(x: ArrayLike, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().to("cpu").double().numpy()
    arr = np.asarray(x)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise AttnmapError(f"{name} must be a numeric array or tensor, got dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


# ------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------
def token_mask(
    x: ArrayLike,
    *,
    threshold: Optional[float] = None,
    top_fraction: Optional[float] = None,
    normalize_first: Normalize = "global",
    per_frame: bool = False,
    name: str = "x",
) -> np.ndarray:
    """A boolean mask of where a token map is high (the thresholded token masks of attention-map recorders).

    Exactly one rule: ``threshold`` keeps positions whose normalised value is > threshold;
    ``top_fraction`` keeps the ``ceil(top_fraction * n)`` highest positions (n = all positions,
    or those of one frame with ``per_frame``), ties broken by position order. NaN positions are never
    in the mask and never silent: normalising warns about them (naming the map), a map without a
    single number is an error, and a threshold that keeps nothing warns.

    Args:
        x: ``[F, H, W]`` map.
        threshold: a value in the normalised scale (e.g. 0.5 after ``global``).
        top_fraction: in (0, 1].
        normalize_first: normalisation applied before thresholding (see :func:`normalize`).
        per_frame: apply the rule to each frame separately (normalisation too, for ``global``).
        name: what the warnings and errors call the map.

    Returns:
        bool array of the same shape.
    """
    a = _np(x, name)
    if (threshold is None) == (top_fraction is None):
        raise AttnmapError("give exactly one of threshold= or top_fraction=")
    if top_fraction is not None:
        top_fraction = number("top_fraction", top_fraction, low=0, high=1, open_low=True)
    if threshold is not None:
        threshold = number("threshold", threshold)
    if per_frame and a.ndim < 2:
        raise AttnmapError(f"per_frame needs a map [F, ...], got shape {a.shape}")
    if per_frame:
        return np.stack(
            [
                token_mask(
                    f,
                    threshold=threshold,
                    top_fraction=top_fraction,
                    normalize_first=normalize_first,
                    name=f"{name} (frame {i})",
                )
                for i, f in enumerate(a)
            ]
        )
    a = normalize(a, normalize_first, name=name).astype(np.float64)
    numeric = ~np.isnan(a)
    if not numeric.any():
        raise AttnmapError(f"{name}: all of its {a.size} values are NaN; there is nothing to mask")
    if threshold is not None:
        mask = a > float(threshold)  # NaN compares False
        if not mask.any():
            warnings.warn(
                f"{name}: the mask is empty: no value is above threshold {threshold} after "
                f"{normalize_first!r} normalisation (the highest is {np.nanmax(a):.3g})",
                RuntimeWarning,
                stacklevel=2,
            )
        return mask
    assert top_fraction is not None
    flat = a.reshape(-1)
    k = min(math.ceil(float(top_fraction) * flat.size - 1e-9), int(numeric.sum()))
    order = np.argsort(-flat, kind="stable")[:k]  # NaN sorts last
    mask = np.zeros(flat.size, dtype=bool)
    mask[order] = True
    return mask.reshape(a.shape)


# ------------------------------------------------------------------------------------------
# token maps
# ------------------------------------------------------------------------------------------
def token_map(
    cross: ArrayLike,
    token_indices: Sequence[int],
    grid: Sequence[int],
    *,
    combine: Literal["sum", "mean"] = "sum",
    normalize_by: Normalize = "none",
    prefix: int = 0,
) -> np.ndarray:
    """The ``[F, H, W]`` map of one word from video->text cross attention.

    Args:
        cross: ``[..., Nv, Nt]``: rows are video tokens (after ``prefix`` extra query tokens,
            dropped), columns text tokens; leading dims (steps, blocks, heads) are averaged.
        token_indices: the word's sub-token columns (from the metadata's ``targets``).
        grid: (F, H, W) with F*H*W == Nv.
        combine: ``"sum"`` or ``"mean"`` of the sub-token columns.
        normalize_by: see :func:`normalize`.
        prefix: leading query rows that are not video tokens.

    Returns:
        ``[F, H, W]`` float32.
    """
    a = _np(cross, "cross")
    f, h, w = (int(g) for g in grid)
    if a.ndim < 2 or a.shape[-2] - prefix != f * h * w:
        raise AttnmapError(
            f"cross must be [..., {prefix}+F*H*W, Nt] with (F, H, W) = {(f, h, w)}, got {a.shape}"
        )
    idx = [int(i) for i in token_indices]
    if not idx or any(not -a.shape[-1] <= i < a.shape[-1] for i in idx):
        raise AttnmapError(
            f"token_indices must be non-empty positions < {a.shape[-1]}, got {list(token_indices)}"
        )
    if combine not in ("sum", "mean"):
        raise AttnmapError(f"combine must be 'sum' or 'mean', got {combine!r}")
    cols = a[..., prefix:, idx]
    m = cols.sum(-1) if combine == "sum" else cols.mean(-1)
    m = m.reshape(-1, f * h * w).mean(0).reshape(f, h, w)
    return normalize(m, normalize_by, name="token map")


def slot_of_frames(meta: Mapping[str, Any], slots: int) -> Optional[list[int]]:
    """For each input frame, the temporal slot of a video LLM's grid that covers it, from the
    metadata's ``time.slot_frames`` (``[[0, 1], [2, 3]]``: two frames a slot); None where the metadata
    has none, or not one list of consecutive frames per slot of a grid of ``slots``."""
    time = meta.get("time")
    groups = time.get("slot_frames") if isinstance(time, Mapping) else None
    if (
        not isinstance(groups, list)
        or len(groups) != slots
        or not all(isinstance(g, list) and g for g in groups)
    ):
        return None
    frames = [f for g in groups for f in g]
    if frames != list(range(len(frames))) or not all(isinstance(f, int) for f in frames):
        return None
    return [slot for slot, g in enumerate(groups) for _ in g]


def on_input_frames(maps: np.ndarray, meta: Mapping[str, Any]) -> np.ndarray:
    """A video LLM's map ``[..., F, H, W]`` over its temporal slots as ``[..., frames, H, W]`` over the
    input frames, each frame the map of the slot that covers it (``time.slot_frames``); unchanged
    where the metadata says nothing of slots (a diffusion model's latents)."""
    slots = slot_of_frames(meta, maps.shape[-3]) if maps.ndim >= 3 else None
    if slots is None or len(slots) == maps.shape[-3]:
        return maps
    return np.take(maps, slots, axis=-3)


def aggregated_map(store: Store, video_id: str, name: str) -> np.ndarray:
    """The step-aggregated map ``name``: the aggregated file's, or :meth:`Store.mean` over the good
    steps when the run stored no aggregated maps (``store_aggregated_attention: false``)."""
    try:
        return store.load(video_id, name)
    except KeyError:
        return store.mean(video_id, name)


def load_token_map(
    store: Store,
    video_id: str,
    word: str,
    *,
    steps: Optional[Sequence[int]] = None,
    blocks: Optional[Sequence[int]] = None,
    combine: Literal["sum", "mean"] = "sum",
    normalize_by: Normalize = "none",
) -> np.ndarray:
    """The ``[F, H, W]`` map of a stored word over chosen steps and blocks.

    Args:
        store: an open store.
        video_id: the video.
        word: a word of ``store.tokens(video_id)``.
        steps: steps to average, through :meth:`Store.mean` (None: the aggregated map, or every good
            step when ``blocks`` is given); steps left out are never read.
        blocks: blocks to average (their ``token/<word>/block<b>`` maps must be stored); None:
            the map averaged over all blocks.
        combine: the store holds sub-tokens summed; ``"mean"`` divides by the word's sub-token
            count (``len(metadata["targets"][word])``).
        normalize_by: see :func:`normalize`.

    Returns:
        ``[F, H, W]`` float32.
    """
    if combine not in ("sum", "mean"):
        raise AttnmapError(f"combine must be 'sum' or 'mean', got {combine!r}")
    names = (
        [store.map_name(video_id, word)]
        if blocks is None
        else [store.map_name(video_id, word, block=int(b)) for b in blocks]
    )
    if not names:
        raise AttnmapError("blocks must name at least one block")
    if steps is not None:
        steps = list(steps)
        if not steps:
            raise AttnmapError(f"steps: no steps to load for {word!r} of video {video_id!r}")
    maps = [
        aggregated_map(store, video_id, name)
        if steps is None and blocks is None
        else store.mean(video_id, name, steps)
        for name in names
    ]
    m = np.mean([x.mean(0) if x.ndim == 4 else x for x in maps], axis=0)
    if combine == "mean":
        n = len((store.metadata(video_id).get("targets") or {}).get(word) or [])
        if n == 0:
            raise AttnmapError(
                f"combine='mean' needs the sub-token count of {word!r} in the metadata's targets"
            )
        m = m / n
    return normalize(m, normalize_by, name=f"token map {word!r} of video {video_id!r}")


# ------------------------------------------------------------------------------------------
# temporal matrices and text self-attention
# ------------------------------------------------------------------------------------------
def frame_matrix(
    attn: ArrayLike, grid: Sequence[int], *, prefix: int = 0, video: Optional[slice] = None
) -> np.ndarray:
    """The F x F frame matrix of a full attention map over video tokens.

    Entry (i, j) is the attention mass from frame i's query tokens to frame j's key tokens,
    averaged over the query tokens of frame i (the ``temporal`` reduction of attnmap).

    Args:
        attn: ``[..., N, N]`` attention probabilities (rows sum to 1); the F*H*W video tokens at
            ``video``, position f*H*W + h*W + w within it.
        grid: (F, H, W).
        prefix: leading non-video tokens (CLS, registers, text first) when ``video`` is None.
        video: the video tokens' positions, e.g. ``Layout.video_q`` of a joint layout with the
            text after the video; None: ``prefix`` to the end. Other tokens are dropped as
            queries and as keys.

    Returns:
        ``[..., F, F]`` float32.

    Example:
        >>> lay = Layout.joint(text=226, grid=(13, 30, 45), text_first=True)
        >>> frame_matrix(probs, lay.grid, video=lay.video_q)  # probs [B, H, N, N]
    """
    a = _np(attn, "attn")
    f, h, w = integers("grid", grid, 3, low=1, what="(F, H, W)")
    prefix = integer("prefix", prefix, low=0)
    nv = f * h * w
    if video is None:
        if a.ndim < 2 or a.shape[-1] != a.shape[-2] or a.shape[-1] != prefix + nv:
            raise AttnmapError(
                f"attn must be [..., N, N] with N = {prefix} + F*H*W = {prefix + nv}, got {a.shape}"
            )
        video = slice(prefix, prefix + nv)
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise AttnmapError(f"attn must be [..., N, N], got {a.shape}")
    if not isinstance(video, slice) or len(range(a.shape[-1])[video]) != nv:
        raise AttnmapError(f"video must be a slice of F*H*W = {nv} positions < {a.shape[-1]}, got {video!r}")
    v = a[..., video, video]
    v = v.reshape(*v.shape[:-2], f, h * w, f, h * w)
    return v.sum(-1).mean(-2).astype(np.float32)


def temporal_locality(temporal: ArrayLike, *, relative: bool = True) -> np.ndarray:
    """The fraction of attention mass a head keeps in the query's own frame.

    Args:
        temporal: ``[..., F, F]`` frame matrices (per block, per head).
        relative: divide each row by its sum (the mass on video frames), so attention to text
            or prefix tokens does not count; False: the raw diagonal mass.

    Returns:
        ``[...]`` float32: the mean over query frames i of T[i, i] (/ sum_j T[i, j]). 1 for a
        purely spatial head, 1/F for a head that spreads evenly over frames.
    """
    t = _np(temporal, "temporal")
    if t.ndim < 2 or t.shape[-1] != t.shape[-2]:
        raise AttnmapError(f"temporal must be [..., F, F], got {t.shape}")
    diag = np.diagonal(t, axis1=-2, axis2=-1)
    if relative:
        sums = t.sum(-1)
        diag = np.where(sums > 0, diag / np.where(sums > 0, sums, 1.0), 0.0)
    return np.asarray(diag.mean(-1), dtype=np.float32)


def classify_heads(locality: ArrayLike, num_frames: int, *, margin: float = 0.5) -> np.ndarray:
    """Label heads ``"spatial"`` (locality above 1/F + margin * (1 - 1/F)) or ``"temporal"``.

    Args:
        locality: ``[...]`` from :func:`temporal_locality`.
        num_frames: F.
        margin: in [0, 1]; 0.5 puts the cut halfway between an even spread and all-in-own-frame.

    Returns:
        ``[...]`` array of str.
    """
    loc = _np(locality, "locality")
    num_frames = integer("num_frames", num_frames, low=1)
    margin = number("margin", margin, low=0, high=1)
    cut = 1.0 / num_frames + margin * (1.0 - 1.0 / num_frames)
    return np.where(loc > cut, "spatial", "temporal")


def real_text_length(meta: Mapping[str, Any], stored: int) -> tuple[int, str]:
    """How many of ``stored`` text tokens are real (not padding), and how that was known: the
    metadata's ``text_length`` (or ``text_len``), else its ``text_tokens``, else the last target token."""
    for key in ("text_length", "text_len"):
        value = meta.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= stored:
            return value, f"metadata {key}"
    words = meta.get("text_tokens")
    if isinstance(words, list) and 0 < len(words) <= stored:
        return len(words), "metadata text_tokens"
    targets = meta.get("targets")
    if isinstance(targets, dict):
        indices = [int(i) for v in targets.values() if isinstance(v, list) for i in v if isinstance(i, int)]
        if indices and 0 <= max(indices) < stored:
            return max(indices) + 1, "the last target token (the metadata has no text length)"
    return stored, "every stored token (the metadata has no text length)"


def real_text_words(meta: Mapping[str, Any], real: int) -> Optional[list[str]]:
    """The words of the first ``real`` text tokens from the metadata's ``text_tokens``; None where it
    does not name that many."""
    words = meta.get("text_tokens")
    return [str(w) for w in words[:real]] if isinstance(words, list) and len(words) >= real else None


def text_self_attention(
    attn: ArrayLike, text: Union[slice, Sequence[int]], *, renormalize: bool = False
) -> np.ndarray:
    """Text->text attention, averaged over leading dims.

    Args:
        attn: ``[..., N, N]`` full (joint) attention, or an already reduced ``[..., Nt, Nt]``.
        text: the text positions (``Layout.text_q``/``text_k`` slice, or indices).
        renormalize: divide each row by its text mass (rows then sum to 1).

    Returns:
        ``[Nt, Nt]`` float32.
    """
    a = _np(attn, "attn")
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise AttnmapError(f"attn must be [..., N, N], got {a.shape}")
    idx = np.arange(a.shape[-1])[text] if isinstance(text, slice) else np.asarray(list(text), dtype=np.int64)
    if idx.size == 0 or idx.max() >= a.shape[-1] or idx.min() < -a.shape[-1]:
        raise AttnmapError(f"text must select positions < {a.shape[-1]}, got {text!r}")
    t = a[..., idx[:, None], idx[None, :]].reshape(-1, idx.size, idx.size).mean(0)
    if renormalize:
        s = t.sum(-1, keepdims=True)
        t = np.where(s > 0, t / np.where(s > 0, s, 1.0), 0.0)
    return t.astype(np.float32)


# ------------------------------------------------------------------------------------------
# summaries
# ------------------------------------------------------------------------------------------
def top_frames(m: ArrayLike, k: int = 3) -> list[dict[str, float]]:
    """The k frames with the most mass of a ``[F, H, W]`` map, with their share of the total."""
    a = _np(m, "map")
    if a.ndim != 3:
        raise AttnmapError(f"map must be [F, H, W], got {a.shape}")
    k = integer("k", k, low=1)
    mass = a.reshape(a.shape[0], -1).sum(-1)
    total = mass.sum()
    order = np.argsort(-mass, kind="stable")[:k]
    return [{"frame": int(i), "share": float(mass[i] / total) if total else 0.0} for i in order]


def top_regions(m: ArrayLike, k: int = 3, *, mask_top_fraction: float = 0.1) -> dict[str, Any]:
    """The k highest positions of a ``[F, H, W]`` map and the bounding box of its top-fraction mask.

    Returns:
        ``{"peaks": [{"frame", "row", "col", "value"}...], "box": {"frames", "rows", "cols"}}``
        (inclusive [first, last] ranges in latent grid cells).
    """
    a = _np(m, "map")
    if a.ndim != 3:
        raise AttnmapError(f"map must be [F, H, W], got {a.shape}")
    k = integer("k", k, low=1)
    mask_top_fraction = number("mask_top_fraction", mask_top_fraction, low=0, high=1, open_low=True)
    flat = a.reshape(-1)
    order = np.argsort(-flat, kind="stable")[:k]
    peaks = []
    for i in order:
        f, r, c = np.unravel_index(int(i), a.shape)
        peaks.append({"frame": int(f), "row": int(r), "col": int(c), "value": float(flat[i])})
    mask = token_mask(a, top_fraction=mask_top_fraction, normalize_first="none")
    where = np.nonzero(mask)
    box = {name: [int(w.min()), int(w.max())] for name, w in zip(("frames", "rows", "cols"), where)}
    return {"peaks": peaks, "box": box}


# ------------------------------------------------------------------------------------------
# word masks and tracks on the video's own frames
# ------------------------------------------------------------------------------------------
def positive_int(value: Any) -> Optional[int]:
    """``value`` as an int when it is an integer >= 1 (not a bool), else None."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1
    return int(value) if ok else None


def video_info(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The ``video`` dict of a video's metadata (empty when missing or malformed)."""
    video = meta.get("video")
    return video if isinstance(video, dict) else {}


def vae_stride(meta: Mapping[str, Any]) -> Optional[int]:
    """The VAE temporal stride of the metadata's ``vae_stride`` [t, h, w], or None."""
    stride = meta.get("vae_stride")
    return positive_int(stride[0]) if isinstance(stride, (list, tuple)) and stride else None


def frame_latents(meta: Mapping[str, Any], latent_frames: int) -> np.ndarray:
    """The latent frame each frame of the video in the metadata is encoded in.

    The video has ``video.frames`` frames (one per latent frame when the metadata does not say); with
    the VAE's temporal stride ``s`` (``vae_stride[0]``): ``1 + (F - 1) s`` frames are a causal VAE's
    (frame 0 alone in latent frame 0, then ``s`` frames each, as Wan's, HunyuanVideo's, CogVideoX's and
    LTX's VAEs encode them), ``F s`` frames a non-causal one's (``s`` each); any other count is spread
    evenly (the nearest latent frame of a linear map, as a render without the stride interpolates).

    Args:
        meta: a video's metadata (``video.frames``, ``vae_stride``).
        latent_frames: F, the maps' frame count.

    Returns:
        int64 ``[T]``: latent frame per video frame, non-decreasing, 0 first and F - 1 last.
    """
    f = positive_int(latent_frames)
    if f is None:
        raise AttnmapError(f"latent_frames must be an int >= 1, got {latent_frames!r}")
    frames, s = positive_int(video_info(meta).get("frames")), vae_stride(meta)
    t = np.arange(frames or f)
    if frames is None or frames == f:
        return t
    if s is not None and frames == 1 + (f - 1) * s:
        return np.where(t == 0, 0, (t - 1) // s + 1)
    if s is not None and frames == f * s:
        return t // s
    return np.clip(np.floor((t + 0.5) * f / frames), 0, f - 1).astype(np.int64)


def word_masks(
    m: ArrayLike,
    latents: Union[Sequence[int], np.ndarray],
    *,
    threshold: Optional[float] = None,
    top_fraction: Optional[float] = None,
    normalize_first: Normalize = "global",
    name: str = "map",
) -> np.ndarray:
    """A word's mask on each frame of the video: its latent frame's mask (:func:`token_mask` with
    ``per_frame``: each latent frame normalised and cut on its own).

    Args:
        m: the word's ``[F, H, W]`` map.
        latents: the latent frame of each video frame (:func:`frame_latents`).
        threshold, top_fraction, normalize_first: the rule of :func:`token_mask`.
        name: what the warnings call the map.

    Returns:
        bool ``[T, H, W]`` at the latent grid's resolution, one per video frame.
    """
    a = _np(m, name)
    if a.ndim != 3:
        raise AttnmapError(f"{name} must be [F, H, W], got {a.shape}")
    index = np.asarray(list(latents), dtype=np.int64)
    if index.ndim != 1 or index.size == 0 or index.min() < 0 or index.max() >= a.shape[0]:
        raise AttnmapError(f"latents must be latent frames in [0, {a.shape[0]}), one per video frame")
    masks = token_mask(
        a,
        threshold=threshold,
        top_fraction=top_fraction,
        normalize_first=normalize_first,
        per_frame=True,
        name=name,
    )
    return masks[index]


def mask_track(masks: ArrayLike, size: Optional[Sequence[int]] = None) -> list[Optional[dict[str, float]]]:
    """The centroid of each frame's mask: where the word is, frame by frame (a track).

    Args:
        masks: bool ``[T, H, W]`` (:func:`word_masks`).
        size: (height, width) of the video the grid covers (the whole frame): x and y in its pixels;
            None: in grid cells.

    Returns:
        per frame ``{"x", "y", "area"}`` (cell centres ``(col + 0.5, row + 0.5)`` scaled to ``size``;
        ``area`` the fraction of the frame in the mask), or None for an empty mask.
    """
    a = np.asarray(masks)
    if a.dtype != bool or a.ndim != 3:
        raise AttnmapError(f"masks must be bool [T, H, W], got {a.dtype} {a.shape}")
    rows, cols = a.shape[1:]
    height, width = (rows, cols) if size is None else (float(size[0]), float(size[1]))
    out: list[Optional[dict[str, float]]] = []
    for frame in a:
        r, c = np.nonzero(frame)
        if r.size == 0:
            out.append(None)
            continue
        out.append(
            {
                "x": float((c.mean() + 0.5) * width / cols),
                "y": float((r.mean() + 0.5) * height / rows),
                "area": float(r.size / frame.size),
            }
        )
    return out


def mask_rle(mask: ArrayLike) -> dict[str, Any]:
    """A 2-D mask as COCO's uncompressed run-length encoding: ``{"size": [H, W], "counts": [...]}``,
    runs in column-major order, the first one of zeros (0 when the mask starts set)."""
    a = np.asarray(mask)
    if a.dtype != bool or a.ndim != 2:
        raise AttnmapError(f"mask must be bool [H, W], got {a.dtype} {a.shape}")
    flat = a.reshape(-1, order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    counts = ([0] if flat[0] else []) + runs
    return {"size": [int(a.shape[0]), int(a.shape[1])], "counts": [int(n) for n in counts]}


def rle_mask(rle: Mapping[str, Any]) -> np.ndarray:
    """The bool ``[H, W]`` mask of a :func:`mask_rle` encoding."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = [int(n) for n in rle["counts"]]
    except (KeyError, TypeError, ValueError):
        raise AttnmapError(f"rle must be {{'size': [H, W], 'counts': [...]}}, got {rle!r}") from None
    if min(counts, default=0) < 0 or sum(counts) != h * w:
        raise AttnmapError(f"rle counts must be >= 0 and sum to H*W = {h * w}, got {sum(counts)}")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape((h, w), order="F")


_BLOCK = re.compile(r"^temporal/block(\d+)$")


def summarize(
    store: Store,
    video_id: str,
    *,
    k: int = 3,
    mask_top_fraction: float = 0.1,
    mask_threshold: Optional[float] = None,
) -> dict[str, Any]:
    """A JSON-safe summary of one video.

    Args:
        store: an open store.
        video_id: the video.
        k: how many frames and peaks per token.
        mask_top_fraction: the fraction of positions in each token's region box, and the rule of its
            masks on each frame (the top fraction of each latent frame).
        mask_threshold: cut the masks at this value of each latent frame's ``global`` normalisation
            instead of ``mask_top_fraction``.

    Returns:
        ``{"video_id", "model", "prompt", "grid", "steps",
        "tokens": {word: {"frames": [{"frame", "share"}], "peaks": [...], "box": {...},
        "masks": {"rule", "frames": [COCO RLE per video frame]},
        "track": {"size": [H, W], "points": [{"frame", "latent_frame", "x", "y", "area"}]}}},
        "temporal_locality": {"mean": float | None, "blocks": {b: [per-head] or float}}}``: ``masks``
        has one mask per frame of the video (``video.frames``, each its latent frame's, see
        :func:`frame_latents`) at the latent grid's resolution, and ``track`` its centroid in the
        video's pixels (``x``, ``y`` None where the mask is empty).
    """
    meta = store.metadata(video_id)
    video = video_info(meta)
    height, width = positive_int(video.get("height")), positive_int(video.get("width"))
    rule: dict[str, Any] = (
        {"threshold": float(mask_threshold), "normalize": "global", "per": "latent frame"}
        if mask_threshold is not None
        else {"top_fraction": float(mask_top_fraction), "per": "latent frame"}
    )
    tokens: dict[str, Any] = {}
    for word in store.tokens(video_id):
        m = aggregated_map(store, video_id, store.map_name(video_id, word))
        m = m.mean(0) if m.ndim == 4 else m  # per-head [H, F, H, W]
        latents = frame_latents(meta, m.shape[0])
        masks = word_masks(
            m,
            latents,
            threshold=mask_threshold,
            top_fraction=None if mask_threshold is not None else mask_top_fraction,
            name=f"token map {word!r} of video {video_id!r}",
        )
        size = (height, width) if height is not None and width is not None else m.shape[1:]
        points = [
            {"frame": i, "latent_frame": int(j), **(p or {"x": None, "y": None, "area": 0.0})}
            for i, (j, p) in enumerate(zip(latents, mask_track(masks, size)))
        ]
        tokens[word] = {
            "frames": top_frames(m, k),
            **top_regions(m, k, mask_top_fraction=mask_top_fraction),
            "masks": {"rule": rule, "frames": [mask_rle(f) for f in masks]},
            "track": {"size": [int(size[0]), int(size[1])], "points": points},
        }
    names = store.names(video_id)
    blocks: dict[str, Any] = {}
    for name in names:
        hit = _BLOCK.match(name)
        if hit:
            loc = temporal_locality(aggregated_map(store, video_id, name))
            blocks[hit.group(1)] = loc.tolist() if loc.ndim else float(loc)
    mean = None
    if "temporal" in names:
        mean = float(np.mean(temporal_locality(aggregated_map(store, video_id, "temporal"))))
    ordered = {b: blocks[b] for b in sorted(blocks, key=int)}
    return {
        "video_id": video_id,
        "model": meta.get("model"),
        "prompt": meta.get("prompt"),
        "grid": meta.get("grid"),
        "steps": store.steps(video_id),
        "tokens": tokens,
        "temporal_locality": {"mean": mean, "blocks": ordered},
    }


def write_summary(store: Store, video_id: str, path: Union[str, os.PathLike[str]], **kwargs: Any) -> Path:
    """Write :func:`summarize` as JSON to ``path`` atomically; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(summarize(store, video_id, **kwargs), indent=1).encode("utf-8"))
    return out
