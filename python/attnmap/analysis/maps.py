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
    if top_fraction is not None and not 0.0 < float(top_fraction) <= 1.0:
        raise AttnmapError(f"top_fraction must be in (0, 1], got {top_fraction!r}")
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
    number = ~np.isnan(a)
    if not number.any():
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
    k = min(math.ceil(float(top_fraction) * flat.size - 1e-9), int(number.sum()))
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
    f, h, w = (int(g) for g in grid)
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
    if num_frames < 1:
        raise AttnmapError(f"num_frames must be >= 1, got {num_frames!r}")
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
    mass = a.reshape(a.shape[0], -1).sum(-1)
    total = mass.sum()
    order = np.argsort(-mass, kind="stable")[: max(0, int(k))]
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
    flat = a.reshape(-1)
    order = np.argsort(-flat, kind="stable")[: max(0, int(k))]
    peaks = []
    for i in order:
        f, r, c = np.unravel_index(int(i), a.shape)
        peaks.append({"frame": int(f), "row": int(r), "col": int(c), "value": float(flat[i])})
    mask = token_mask(a, top_fraction=mask_top_fraction, normalize_first="none")
    where = np.nonzero(mask)
    box = {name: [int(w.min()), int(w.max())] for name, w in zip(("frames", "rows", "cols"), where)}
    return {"peaks": peaks, "box": box}


_BLOCK = re.compile(r"^temporal/block(\d+)$")


def summarize(store: Store, video_id: str, *, k: int = 3, mask_top_fraction: float = 0.1) -> dict[str, Any]:
    """A JSON-safe summary of one video .

    Args:
        store: an open store.
        video_id: the video.
        k: how many frames and peaks per token.
        mask_top_fraction: the fraction of positions in each token's region box.

    Returns:
        ``{"video_id", "model", "prompt", "grid", "steps",
        "tokens": {word: {"frames": [{"frame", "share"}], "peaks": [...], "box": {...}}},
        "temporal_locality": {"mean": float | None, "blocks": {b: [per-head] or float}}}``
    """
    meta = store.metadata(video_id)
    tokens: dict[str, Any] = {}
    for word in store.tokens(video_id):
        m = aggregated_map(store, video_id, store.map_name(video_id, word))
        m = m.mean(0) if m.ndim == 4 else m  # per-head [H, F, H, W]
        tokens[word] = {"frames": top_frames(m, k), **top_regions(m, k, mask_top_fraction=mask_top_fraction)}
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
