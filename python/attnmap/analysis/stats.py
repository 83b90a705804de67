"""Attention statistics for sparse-attention design: what a block mask, a window or a sink would keep.

Array functions take the maps of :func:`attnmap.attention_sums` (or of a store) as numpy arrays or
torch tensors, with any leading dims (heads, blocks) kept in the result:

- ``distance`` ``[..., F, H, W]`` (mass by offset ``(|dt|, |dy|, |dx|)`` between video query and
  key, per query): :func:`energy_decay` (mass by offset along each axis), :func:`coverage_table`
  and :func:`window_coverage` (the share a window ``(t, h, w)`` centred on each query keeps) and
  :func:`smallest_window` (the smallest window that keeps a given share);
- ``blocks`` ``[..., R, C]``: :func:`recall_curve` (the share of mass the top k% blocks of each
  query tile keep: the recall of a block-sparse mask);
- ``received`` ``[..., N]``: :func:`sink_keys` (the keys that take the most mass);
- all of them: :func:`head_classes` (``spatial``, ``temporal``, ``global`` or ``sink``).

A window ``(t, h, w)`` has odd extents centred on the query: it keeps the keys with
``|dt| <= t // 2``, ``|dy| <= h // 2`` and ``|dx| <= w // 2`` (``(1, 1, 1)`` is the query's own
token). Shares are of the video-to-video mass (the sum of ``distance``) unless said otherwise.

:func:`summarize_stats` reads a store (the names capture writes: ``blocks``, ``distance``,
``entropy``, ``received``, with ``<name>/block<b>`` per block and ``<name>/text`` from cross calls)
and returns a JSON-safe summary per block and head.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from attnmap._checks import integer, integers, number
from attnmap.analysis.maps import _np, aggregated_map
from attnmap.errors import AttnmapError
from attnmap.layout import Layout

if TYPE_CHECKING:  # pragma: no cover
    from attnmap.store import Store

ArrayLike = Any  # torch.Tensor or numpy array

#: Fractions of each query tile's blocks at which :func:`summarize_stats` reports the recall.
RECALL_AT = (0.05, 0.1, 0.2, 0.5)


def _distance(distance: ArrayLike) -> np.ndarray:
    d = _np(distance, "distance")
    if d.ndim < 3 or 0 in d.shape[-3:]:
        raise AttnmapError(f"distance must be [..., F, H, W] (mass by |dt|, |dy|, |dx|), got shape {d.shape}")
    return d


def _shares(x: np.ndarray, total: np.ndarray) -> np.ndarray:
    """``x / total`` over the trailing dims ``total`` was taken over, 0 where the total is 0."""
    safe = np.where(total > 0, total, 1.0)
    return np.where(total > 0, x / safe, 0.0)


def energy_decay(distance: ArrayLike) -> dict[str, np.ndarray]:
    """The attention mass by offset along each axis: how fast it decays away from the query.

    Args:
        distance: ``[..., F, H, W]``.

    Returns:
        ``{"time": [..., F], "height": [..., H], "width": [..., W]}`` float32: the share of the
        video-to-video mass at ``|dt|`` (summed over ``dy``, ``dx``), at ``|dy|`` and at ``|dx|``.
        Each curve sums to 1 (0 for a map without mass).
    """
    d = _distance(distance)
    total = d.sum(axis=(-3, -2, -1))[..., None]
    curves = {"time": d.sum(axis=(-2, -1)), "height": d.sum(axis=(-3, -1)), "width": d.sum(axis=(-3, -2))}
    return {axis: _shares(c, total).astype(np.float32) for axis, c in curves.items()}


def coverage_table(distance: ArrayLike) -> np.ndarray:
    """The share every window keeps: entry ``(a, b, c)`` is the share of the video-to-video mass
    with ``|dt| <= a``, ``|dy| <= b`` and ``|dx| <= c`` (the window ``(2a+1, 2b+1, 2c+1)``).

    Args:
        distance: ``[..., F, H, W]``.

    Returns:
        ``[..., F, H, W]`` float64, non-decreasing along each of the three axes, 1 at the far corner.
    """
    d = _distance(distance)
    table = d.cumsum(axis=-3).cumsum(axis=-2).cumsum(axis=-1)
    return np.asarray(_shares(table, table[..., -1:, -1:, -1:]))


def _window(window: Sequence[int], grid: Sequence[int]) -> tuple[int, int, int]:
    window = integers("window", window, 3, low=1, what="(t, h, w)")
    return (
        min(int(window[0]) // 2, grid[0] - 1),
        min(int(window[1]) // 2, grid[1] - 1),
        min(int(window[2]) // 2, grid[2] - 1),
    )


def window_coverage(distance: ArrayLike, window: Sequence[int]) -> np.ndarray:
    """The share of the video-to-video mass a window ``(t, h, w)`` centred on each query keeps
    (what a sliding-tile or sliding-window mask of that size keeps).

    Args:
        distance: ``[..., F, H, W]``.
        window: odd extents ``(t, h, w)``; an even extent counts as the next smaller odd one.

    Returns:
        ``[...]`` float32 in [0, 1].
    """
    d = _distance(distance)
    a, b, c = _window(window, d.shape[-3:])
    return np.asarray(coverage_table(d)[..., a, b, c], dtype=np.float32)


def smallest_window(distance: ArrayLike, share: float = 0.9) -> np.ndarray:
    """The smallest window ``(t, h, w)`` (fewest keys, ``t * h * w``) that keeps ``share`` of the
    video-to-video mass; among windows of equal size, the one that keeps the most.

    Args:
        distance: ``[..., F, H, W]``.
        share: in (0, 1].

    Returns:
        ``[..., 3]`` int64: the odd extents ``(t, h, w)`` (up to ``2F-1``, ``2H-1``, ``2W-1``: the
        whole grid from any query).
    """
    share = number("share", share, low=0, high=1, open_low=True)
    table = coverage_table(distance)
    f, h, w = table.shape[-3:]
    extents = np.stack(
        np.meshgrid(2 * np.arange(f) + 1, 2 * np.arange(h) + 1, 2 * np.arange(w) + 1, indexing="ij"), axis=-1
    ).reshape(-1, 3)
    size = extents.prod(axis=-1).astype(np.float64)
    flat = table.reshape(*table.shape[:-3], -1)
    # fp rounding may leave the whole grid a hair under 1: it always counts as keeping the share
    enough = flat >= float(share) - 1e-9
    enough[..., -1] = True
    # the smallest size first, then the largest share: one key that orders both
    rank = np.where(enough, size - flat / 2.0, np.inf)
    return np.asarray(extents[rank.argmin(axis=-1)], dtype=np.int64)


def recall_curve(
    blocks: ArrayLike, fractions: Optional[Sequence[float]] = None
) -> tuple[np.ndarray, np.ndarray]:
    """The recall of block-sparse attention: the share of each query tile's mass kept by its top
    ``k`` blocks, ``k = ceil(fraction * C)``, averaged over the query tiles that have mass.

    Args:
        blocks: ``[..., R, C]`` (``attention_sums(..., ("blocks",))``: rows are query tiles).
        fractions: in (0, 1], default 1%, 2%, ..., 100%.

    Returns:
        ``(fractions [K], recall [..., K])`` float32; recall rises to 1 at fraction 1.
    """
    b = _np(blocks, "blocks")
    if b.ndim < 2 or 0 in b.shape[-2:]:
        raise AttnmapError(f"blocks must be [..., R, C], got shape {b.shape}")
    if fractions is not None and (isinstance(fractions, (str, bytes)) or not list(fractions)):
        raise AttnmapError(f"fractions: expected finite numbers in (0, 1], got {fractions!r}")
    fr = (
        np.arange(1, 101) / 100.0
        if fractions is None
        else np.asarray([number("fractions", f, low=0, high=1, open_low=True) for f in fractions])
    )
    c = b.shape[-1]
    kept = np.cumsum(-np.sort(-b, axis=-1), axis=-1)  # mass of the top 1, 2, ... blocks per row
    total = kept[..., -1:]
    shares = _shares(kept, total)
    top = np.clip(np.ceil(fr * c - 1e-9).astype(np.int64), 1, c) - 1
    live = (total > 0).astype(np.float64)  # [..., R, 1]
    rows = np.maximum(live.sum(axis=-2), 1.0)  # [..., 1]
    recall = (shares[..., top] * live).sum(axis=-2) / rows
    return fr.astype(np.float32), recall.astype(np.float32)


def _token_kind(layout: Optional[Layout], key: int) -> dict[str, Any]:
    if layout is None:
        return {}
    vk, tk = layout.video_k, layout.text_k
    if vk is not None and vk.start <= key < vk.stop:
        v = key - vk.start
        _, h, w = layout.grid
        return {"kind": "video", "frame": v // (h * w), "row": v // w % h, "col": v % w}
    if tk is not None and tk.start <= key < tk.stop:
        return {"kind": "text", "index": key - tk.start}
    return {"kind": "prefix", "index": key}


def sink_keys(received: ArrayLike, k: int = 5, *, layout: Optional[Layout] = None) -> list[Any]:
    """The keys that take the most attention: the top ``k`` of ``received`` and their mass.

    Args:
        received: ``[N]`` (the mean attention each key receives; it sums to 1) or ``[H, N]``.
        k: how many keys.
        layout: the call's layout, to say where each key sits (video ``frame``/``row``/``col``,
            ``text`` or ``prefix`` index).

    Returns:
        ``[{"key", "mass", ...}]`` for ``[N]``, one such list per head for ``[H, N]``.
    """
    r = _np(received, "received")
    if r.ndim not in (1, 2) or r.shape[-1] == 0:
        raise AttnmapError(f"received must be [N] or [H, N], got shape {r.shape}")
    k = integer("k", k, low=1)
    if layout is not None and layout.num_keys != r.shape[-1]:
        raise AttnmapError(f"layout {layout} has {layout.num_keys} keys, received has {r.shape[-1]}")
    if r.ndim == 2:
        return [sink_keys(row, k, layout=layout) for row in r]
    order = np.argsort(-r, kind="stable")[: int(k)]
    return [{"key": int(j), "mass": float(r[j]), **_token_kind(layout, int(j))} for j in order]


def sink_mass(received: ArrayLike, k: int = 1) -> np.ndarray:
    """The share of the attention the top ``k`` keys take: ``[...]`` from ``received`` ``[..., N]``."""
    r = _np(received, "received")
    if r.ndim < 1 or r.shape[-1] == 0:
        raise AttnmapError(f"received must be [..., N], got shape {r.shape}")
    top = -np.sort(-r, axis=-1)[..., : integer("k", k, low=1)].sum(axis=-1)
    return np.asarray(_shares(top, r.sum(axis=-1)), dtype=np.float32)


def head_classes(
    distance: ArrayLike,
    received: Optional[ArrayLike] = None,
    *,
    margin: float = 0.5,
    sink_share: float = 0.5,
    sink_keys_count: int = 4,
) -> np.ndarray:
    """Label heads by where their mass goes: ``sink`` (a few keys take most of it), ``spatial``
    (the query's own frame), ``temporal`` (the query's own position, or close, across frames) or
    ``global`` (neither).

    The cuts are the chance level plus ``margin`` of the way to 1, as in
    :func:`attnmap.analysis.classify_heads`: own frame ``1/F + margin (1 - 1/F)``; own spatial
    neighbourhood (``|dy| <= H // 8``, ``|dx| <= W // 8``) its share of the frame's tokens plus
    ``margin`` of the rest. A head passing both is ``spatial`` when its own-frame share is the
    further above its cut.

    Args:
        distance: ``[..., F, H, W]``.
        received: ``[..., N]`` with the same leading dims, or None (no sink test).
        margin: in [0, 1].
        sink_share: a head whose top ``sink_keys_count`` keys take at least this share of
            ``received`` is a sink head.
        sink_keys_count: how many keys a sink may be.

    Returns:
        ``[...]`` array of str.
    """
    d = _distance(distance)
    margin = number("margin", margin, low=0, high=1)
    sink_share = number("sink_share", sink_share, low=0, high=1)
    sink_keys_count = integer("sink_keys_count", sink_keys_count, low=1)
    f, h, w = d.shape[-3:]
    ry, rx = h // 8, w // 8
    table = coverage_table(d)
    own_frame = table[..., 0, -1, -1]
    near = table[..., -1, ry, rx]
    # the share of a frame's positions within |dy| <= ry, |dx| <= rx of a query, over all queries
    chance_near = float(_near_pairs(h, ry) * _near_pairs(w, rx)) / float(h * h * w * w)
    frame_cut = 1.0 / f + margin * (1.0 - 1.0 / f)
    near_cut = chance_near + margin * (1.0 - chance_near)
    spatial = own_frame > frame_cut
    temporal = near > near_cut
    both = spatial & temporal
    by_frame = (own_frame - frame_cut) / max(1.0 - frame_cut, 1e-12) >= (near - near_cut) / max(
        1.0 - near_cut, 1e-12
    )
    out = np.full(own_frame.shape, "global", dtype=object)
    out[temporal] = "temporal"
    out[spatial] = "spatial"
    out[both & ~by_frame] = "temporal"
    if received is not None:
        sink = sink_mass(received, sink_keys_count) >= sink_share
        if sink.shape != out.shape:
            raise AttnmapError(
                f"received must have the leading dims of distance {out.shape}, got {sink.shape}"
            )
        out[sink] = "sink"
    return out.astype(str)


def _near_pairs(n: int, r: int) -> int:
    """Ordered pairs of positions on an axis of ``n`` at most ``r`` apart."""
    return sum(n if d == 0 else 2 * (n - d) for d in range(min(r, n - 1) + 1))


def entropy_summary(entropy: ArrayLike, num_keys: Optional[int] = None) -> dict[str, Any]:
    """Mean, min and max of the rows' entropy ``[..., Nq]`` per leading index; with ``num_keys``
    also the mean relative to uniform attention (``ln Nk``: 1 = as flat as possible)."""
    e = _np(entropy, "entropy")
    num_keys = None if num_keys is None else integer("num_keys", num_keys, low=1)
    if e.ndim < 1 or e.shape[-1] == 0:
        raise AttnmapError(f"entropy must be [..., Nq], got shape {e.shape}")
    out: dict[str, Any] = {
        "mean": e.mean(axis=-1).tolist(),
        "min": e.min(axis=-1).tolist(),
        "max": e.max(axis=-1).tolist(),
    }
    if num_keys is not None and num_keys > 1:
        out["relative_to_uniform"] = (e.mean(axis=-1) / math.log(num_keys)).tolist()
    return out


# ------------------------------------------------------------------------------------------
# a store's statistics
# ------------------------------------------------------------------------------------------
STATS_NAMES = ("blocks", "distance", "entropy", "received")
_NAME = re.compile(r"^(blocks|distance|entropy|received)(/text)?(?:/block(\d+))?$")


def stats_maps(store: Store, video_id: str) -> dict[str, dict[Optional[int], str]]:
    """The statistics a video holds: ``{"distance": {None: "distance", 3: "distance/block3"}, ...}``
    (``None``: the mean over blocks), with ``received/text`` etc. under ``"received/text"``."""
    found: dict[str, dict[Optional[int], str]] = {}
    for name in store.names(video_id):
        hit = _NAME.match(name)
        if hit:
            kind = hit.group(1) + (hit.group(2) or "")
            block = None if hit.group(3) is None else int(hit.group(3))
            found.setdefault(kind, {})[block] = name
    return {
        kind: dict(sorted(found[kind].items(), key=lambda kv: -1 if kv[0] is None else kv[0]))
        for kind in sorted(found)
    }


def load_stat(store: Store, video_id: str, name: str, trailing: int) -> np.ndarray:
    """A stored statistic as ``[heads, ...]``: a map without a head dim (mean over heads) gets one
    of size 1; ``trailing`` is the number of dims after the heads (3 for distance, 2 for blocks)."""
    m = np.asarray(aggregated_map(store, video_id, name), dtype=np.float64)
    if m.ndim == trailing:
        return m[None]
    if m.ndim == trailing + 1:
        return m
    raise AttnmapError(
        f"map {name!r} of video {video_id!r} has shape {m.shape}; expected {trailing} or {trailing + 1} dims"
    )


def _layouts(meta: Mapping[str, Any]) -> dict[str, Layout]:
    out = {}
    for kind, spec in (meta.get("layouts") or {}).items():
        try:
            out[kind] = Layout.from_dict(spec)
        except (AttnmapError, KeyError, TypeError, ValueError):
            continue
    return out


def summarize_stats(
    store: Store,
    video_id: str,
    *,
    share: float = 0.9,
    window: Optional[Sequence[int]] = None,
    k: int = 5,
) -> dict[str, Any]:
    """A JSON-safe summary of a video's attention statistics, per block (``"mean"``: over blocks)
    and head.

    Args:
        store: an open store.
        video_id: the video.
        share: the share of mass :func:`smallest_window` must keep.
        window: the window whose coverage is reported, default ``(1, H // 4 * 2 + 1, W // 4 * 2 + 1)``
            (the own frame, half the height and width around the query).
        k: how many sink keys per head.

    Returns:
        ``{"video_id", "grid", "share", "window", "distance": {block: {"energy_decay",
        "smallest_window", "window_coverage", "head_classes"}}, "blocks": {block: {"recall_at":
        {fraction: [per head]}}}, "received": {block: {"sinks": [per head]}}, "entropy": {block:
        {...}}}`` with only the statistics stored; ``.../text`` keys for cross calls.
    """
    meta = store.metadata(video_id)
    grid = meta.get("grid")
    found = stats_maps(store, video_id)
    if not found:
        raise AttnmapError(
            f"video {video_id!r} holds no attention statistics ({', '.join(STATS_NAMES)}); capture them "
            "with reductions such as ('blocks', 'distance', 'entropy', 'received')"
        )
    layouts = _layouts(meta)
    if window is None and grid:
        window = (1, int(grid[1]) // 4 * 2 + 1, int(grid[2]) // 4 * 2 + 1)
    out: dict[str, Any] = {"video_id": video_id, "grid": grid, "share": share, "window": list(window or [])}

    def key(block: Optional[int]) -> str:
        return "mean" if block is None else str(block)

    received = {b: load_stat(store, video_id, n, 1) for b, n in found.get("received", {}).items()}
    for kind, names in found.items():
        section: dict[str, Any] = {}
        for block, name in names.items():
            if kind == "distance":
                d = load_stat(store, video_id, name, 3)
                rec = received.get(block)
                sinks = rec if rec is not None and rec.shape[0] == d.shape[0] else None
                entry: dict[str, Any] = {
                    "energy_decay": {a: c.tolist() for a, c in energy_decay(d).items()},
                    "smallest_window": smallest_window(d, share).tolist(),
                    "head_classes": head_classes(d, sinks).tolist(),
                }
                if window is not None:
                    entry["window_coverage"] = window_coverage(d, window).tolist()
            elif kind.startswith("blocks"):
                fr, recall = recall_curve(load_stat(store, video_id, name, 2), RECALL_AT)
                entry = {"recall_at": {f"{f:g}": recall[..., i].tolist() for i, f in enumerate(fr)}}
            elif kind.startswith("received"):
                r = received[block] if kind == "received" else load_stat(store, video_id, name, 1)
                lay = layouts.get("cross" if kind.endswith("/text") else "self") or layouts.get("joint")
                lay = lay if lay is not None and lay.num_keys == r.shape[-1] else None
                entry = {"sinks": sink_keys(r, k, layout=lay), "top_share": sink_mass(r, k).tolist()}
            else:  # entropy
                e = load_stat(store, video_id, name, 1)
                entry = entropy_summary(e)
            section[key(block)] = entry
        out[kind] = section
    return out
