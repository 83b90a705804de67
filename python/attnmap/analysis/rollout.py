"""Attention rollout (Abnar & Zuidema, 2020): plain, divided space-time (TimeSformer) and temporal.

Every layer's attention A (rows sum to 1) is fused over heads, mixed with the residual path as
A' = (A + I) normalised by rows, and the layers are multiplied with later layers on the left:
R = A'_L ... A'_{s+1} A'_s. Row i of R says how much each input token flows into token i.

Functions take torch tensors or numpy arrays and return the same kind (float32); the products
run in float64, on the device of the first torch input (CPU for numpy, and for MPS, which has no
float64).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Optional

import numpy as np
import torch

from attnmap._callable import make_module_callable
from attnmap._checks import integer, number
from attnmap.errors import AttnmapError

HeadFusion = Literal["mean", "max", "min"]
ArrayLike = Any  # torch.Tensor or numpy array


def _device(maps: Sequence[ArrayLike]) -> torch.device:
    """Where the products run: the first map's device when it is a torch tensor (not MPS)."""
    first = maps[0] if len(maps) else None
    if isinstance(first, torch.Tensor) and first.device.type != "mps":
        return first.device
    return torch.device("cpu")


def _as_tensor(x: ArrayLike, name: str, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach().to(device)
    else:
        try:
            t = torch.from_numpy(np.asarray(x))
        except TypeError as exc:
            raise AttnmapError(
                f"{name} must be a torch tensor or numpy array, got {type(x).__name__}"
            ) from exc
        t = t.to(device)
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise AttnmapError(f"{name} must hold floats, got dtype {t.dtype}")
    return t.to(torch.float64)


def _like(out: torch.Tensor, template: Sequence[ArrayLike]) -> ArrayLike:
    out = out.to(torch.float32)
    if template and isinstance(template[0], torch.Tensor):
        return out
    return out.numpy()


def _fuse(a: torch.Tensor, head_fusion: str, name: str) -> torch.Tensor:
    """(B, H, N, N) -> (B, N, N) by the head fusion; (B, N, N) passes through."""
    if a.ndim == 3:
        return a
    if a.ndim != 4:
        raise AttnmapError(f"{name} must have shape (B, H, N, N) or (B, N, N), got {tuple(a.shape)}")
    if head_fusion == "mean":
        return a.mean(dim=1)
    if head_fusion == "max":
        return a.amax(dim=1)
    if head_fusion == "min":
        return a.amin(dim=1)
    raise AttnmapError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")


def _residual_normalise(a: torch.Tensor) -> torch.Tensor:
    """A' = (A + I) divided by its row sums."""
    n = a.shape[-1]
    a = a + torch.eye(n, dtype=a.dtype, device=a.device)
    return a / a.sum(dim=-1, keepdim=True)


def _check_layers(attentions: Sequence[ArrayLike], start_layer: int) -> None:
    if isinstance(attentions, (torch.Tensor, np.ndarray)) or not isinstance(attentions, Sequence):
        raise AttnmapError("attentions must be a sequence (list/tuple) of per-layer maps, first layer first")
    if len(attentions) == 0:
        raise AttnmapError("attentions must hold at least one layer")
    integer("start_layer", start_layer, low=0, high=len(attentions) - 1)


def _discard(a: torch.Tensor, ratio: float, keep_column: Optional[int]) -> torch.Tensor:
    """Zero the ``ratio`` fraction of smallest entries of each (N, N) map, never in ``keep_column``."""
    b, n, _ = a.shape
    k = int(n * n * ratio)
    if k == 0:
        return a
    flat = a.reshape(b, n * n).clone()
    scores = flat.clone()
    if keep_column is not None:
        scores.view(b, n, n)[:, :, keep_column] = float("inf")
        k = min(k, n * (n - 1))
    idx = scores.topk(k, dim=-1, largest=False).indices
    flat.scatter_(-1, idx, 0.0)
    return flat.view(b, n, n)


def rollout(
    attentions: Sequence[ArrayLike],
    *,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    start_layer: int = 0,
    cls_index: Optional[int] = 0,
) -> ArrayLike:
    """Attention rollout over layers.

    Args:
        attentions: per layer, first layer first, ``[B, H, N, N]`` or ``[B, N, N]`` attention
            probabilities (rows sum to 1), torch or numpy.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        discard_ratio: in [0, 1): per layer, the fraction of all N*N entries of the fused map
            that are zeroed, smallest first, before the residual is added; entries of the CLS
            column (``cls_index``) are never discarded.
        start_layer: first layer included.
        cls_index: the CLS token's position (None when the model has no CLS token).

    Returns:
        ``[B, N, N]`` float32 rollout matrix, same kind as the input (torch or numpy).
        ``result[:, cls_index, 1:]`` is the usual CLS relevance of the patches.

    Example:
        >>> out = model(x, output_attentions=True)          # transformers, eager
        >>> r = rollout(out.attentions, discard_ratio=0.9)
        >>> mask = r[0, 0, 1:].reshape(14, 14)
    """
    _check_layers(attentions, start_layer)
    device = _device(attentions)
    discard_ratio = number("discard_ratio", discard_ratio, low=0, high=1, open_high=True)
    result: Optional[torch.Tensor] = None
    for i, layer in enumerate(attentions):
        a = _fuse(_as_tensor(layer, f"attentions[{i}]", device), head_fusion, f"attentions[{i}]")
        if a.shape[-1] != a.shape[-2] or (result is not None and a.shape != result.shape):
            raise AttnmapError(
                f"attentions[{i}] must be square and match the other layers, got {tuple(a.shape)}"
            )
        if cls_index is not None and (
            isinstance(cls_index, bool)
            or not isinstance(cls_index, (int, np.integer))
            or not -a.shape[-1] <= cls_index < a.shape[-1]
        ):
            raise AttnmapError(
                f"cls_index must be a token position < {a.shape[-1]} or None, got {cls_index!r}"
            )
        if i < start_layer:
            continue
        a = _residual_normalise(_discard(a, float(discard_ratio), cls_index))
        result = a if result is None else a @ result
    assert result is not None
    return _like(result, attentions)


def space_time_rollout(
    space: Sequence[ArrayLike],
    time: Sequence[ArrayLike],
    *,
    num_frames: int,
    head_fusion: HeadFusion = "mean",
    start_layer: int = 0,
) -> ArrayLike:
    """Rollout of TimeSformer's divided space-time attention, with its CLS handling.

    In each block, time attention (each patch p attends to itself at the T frames) runs
    before space attention (each frame's CLS copy and patches attend within the frame). On the
    (P, T) grid of tokens (P = 1 + S, CLS at p = 0, one CLS copy per frame) the block's flow is
    W[p, t, k, q] = S'[t, p, k] * T'[k, t, q], where S' and T' are the residual-normalised
    maps and the CLS copies attend only to themselves in time (identity). The CLS token is
    averaged over frames after each block, so its rows W[0, t] are replaced by their mean over t.

    Args:
        space: per block, ``[B*T, H, 1+S, 1+S]`` or ``[B*T, 1+S, 1+S]`` spatial attention, the
            batch-major ``(b, t)`` order of transformers' ``TimesformerLayer``.
        time: per block, ``[B*S, H, T, T]`` or ``[B*S, T, T]`` temporal attention, order
            ``(b, s)`` (patches row-major), without the CLS token.
        num_frames: T (any number of frames).
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        start_layer: first block included.

    Returns:
        ``[B, P, T, P, T]`` float32 rollout, R[b, p, t, k, q] = flow from token (k, q) into
        (p, t). :func:`cls_space_time_map` turns it into the CLS map ``[B, T, S]``.
    """
    _check_layers(space, start_layer)
    device = _device(space)
    if len(time) != len(space):
        raise AttnmapError(f"space and time must have one map per block, got {len(space)} and {len(time)}")
    t_ = integer("num_frames", num_frames, low=1)
    result: Optional[torch.Tensor] = None
    for i, (s_map, t_map) in enumerate(zip(space, time)):
        s = _fuse(_as_tensor(s_map, f"space[{i}]", device), head_fusion, f"space[{i}]")
        tm = _fuse(_as_tensor(t_map, f"time[{i}]", device), head_fusion, f"time[{i}]")
        bt, p, p2 = s.shape
        if p != p2 or bt % t_:
            raise AttnmapError(f"space[{i}] must be [B*T, 1+S, 1+S] with T={t_}, got {tuple(s.shape)}")
        b = bt // t_
        if tm.shape != (b * (p - 1), t_, t_):
            raise AttnmapError(
                f"time[{i}] must be [B*S, T, T] = {(b * (p - 1), t_, t_)}, got {tuple(tm.shape)}"
            )
        if i < start_layer:
            continue
        s = _residual_normalise(s).reshape(b, t_, p, p)  # [b, t, p, k]
        tm = tm.reshape(b, p - 1, t_, t_)
        eye = torch.eye(t_, dtype=tm.dtype, device=device).expand(b, 1, t_, t_)
        tm = _residual_normalise(torch.cat([eye, tm], dim=1))  # [b, k, t, q]; the CLS rows are I
        w = torch.einsum("btpk,bktq->bptkq", s, tm)
        w[:, 0] = w[:, 0].mean(dim=1, keepdim=True)  # the CLS is averaged over frames
        w = w.reshape(b, p * t_, p * t_)
        result = w if result is None else w @ result
    assert result is not None
    return _like(result.reshape(result.shape[0], -1, t_, result.shape[-1] // t_, t_), space)


def cls_space_time_map(rolled: ArrayLike) -> ArrayLike:
    """The CLS token's relevance of each patch at each frame, from :func:`space_time_rollout`.

    The CLS rows are averaged over the query frames and its own column is dropped, as the divided
    space-time rollout of TimeSformer does.

    Args:
        rolled: ``[B, P, T, P, T]`` rollout.

    Returns:
        ``[B, T, S]`` float32 (S = P - 1 patches, row-major); reshape to ``[B, T, h, w]``.
    """
    r = _as_tensor(rolled, "rolled", _device([rolled]))
    if r.ndim != 5:
        raise AttnmapError(f"rolled must have shape [B, P, T, P, T], got {tuple(r.shape)}")
    cls = r[:, 0].mean(dim=1)[:, 1:]  # [B, S, T]
    return _like(cls.transpose(1, 2), [rolled])


def temporal_rollout(
    attentions: Sequence[ArrayLike],
    *,
    head_fusion: HeadFusion = "mean",
    residual: bool = True,
    start_layer: int = 0,
) -> ArrayLike:
    """Temporal rollout across refiner layers of a video tracker, or across the blocks' F x F
    temporal maps of a video model.

    Each layer's frame-to-frame attention is fused over heads, (with ``residual``) mixed with the
    identity, normalised by rows and multiplied with later layers on the left.

    Args:
        attentions: per layer, first first, ``[..., H, T, T]`` (4-D) or ``[..., T, T]`` (2-D or
            3-D) frame-to-frame attention; leading dims (batch, instance queries) are kept.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over the heads of 4-D maps.
        residual: add the identity before normalising (the layers have skip connections).
        start_layer: first layer included.

    Returns:
        ``[..., T, T]`` float32: entry (i, j) is how much frame j flows into frame i.
    """
    _check_layers(attentions, start_layer)
    device = _device(attentions)
    result: Optional[torch.Tensor] = None
    for i, layer in enumerate(attentions):
        a = _as_tensor(layer, f"attentions[{i}]", device)
        if a.ndim < 2 or a.ndim > 4 or a.shape[-1] != a.shape[-2]:
            raise AttnmapError(
                f"attentions[{i}] must be [T, T], [B, T, T] or [B, H, T, T], got {tuple(a.shape)}"
            )
        a = _fuse(a, head_fusion, f"attentions[{i}]") if a.ndim == 4 else a
        if result is not None and a.shape != result.shape:
            raise AttnmapError(
                f"attentions[{i}] has shape {tuple(a.shape)}, the layers before {tuple(result.shape)}"
            )
        if i < start_layer:
            continue
        if residual:
            a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=device)
        sums = a.sum(dim=-1, keepdim=True)
        a = a / torch.where(sums == 0, torch.ones_like(sums), sums)
        result = a if result is None else a @ result
    assert result is not None
    return _like(result, attentions)


make_module_callable(__name__, rollout)
