"""Reductions over shards of the keys that merge exactly, as attention outputs merge.

When a query row meets its keys one shard at a time (ring context parallelism: each step attends the
local queries to another rank's keys), the attention output of the row merges across the shards by
their logsumexp: with ``lse = logsumexp_i lse_i``, ``out = sum_i exp(lse_i - lse) out_i``. A map merges
the same way when it is kept per query row and per head, each shard's P normalised over the shard's
own keys. :func:`attnmap.reduce.partial_sums` gives that (a :class:`Partial`: the rows' sums and
their lse), :func:`merge_partials` merges the shards of the keys, and :func:`finish_partial` turns
the merged rows into :func:`attnmap.reduce.attention_sums`' outputs::

    parts = [partial_sums(q, k[:, :, lo:hi], layout, ("cross", "temporal"), keys=(lo, hi))
             for lo, hi in shards]
    maps = finish_partial(merge_partials(parts))

Only the reductions kept per query row merge this way (:data:`PARTIAL`): ``cross``, ``temporal``
(each row's mass on each key frame), ``text``, ``full`` and ``entropy``. ``received``, ``blocks`` and
``distance`` sum over rows per key and need every row's global lse: the merged :attr:`Partial.lse`,
given to ``attention_sums(..., lse=...)`` over all the keys, makes them exact in one pass.

The query rows may be a shard too (``rows=(lo, hi)``: Ulysses, or a ring's local queries): the
outputs of :func:`finish_partial` have the whole layout's shapes, zero outside those rows, and add up
over the query shards.

A leaf beside :mod:`attnmap.reduce.contract`: it imports nothing of attnmap but the contract, the
layout and the error root; the backends implement ``partial(call) -> (sums, lse)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from attnmap.errors import AttnmapError
from attnmap.layout import Layout
from attnmap.reduce.contract import (
    FULL_LIMIT,
    _check_finite,
    _check_mask,
    _check_qk,
    _check_reductions,
    _check_text_groups,
    frame_sums,
    means,
    place_rows,
)

#: The reductions that stay per query row, so that key shards merge exactly.
PARTIAL: tuple[str, ...] = ("cross", "temporal", "text", "full", "entropy")


@dataclass(frozen=True)
class PartialCall:
    """One validated call of :func:`attnmap.reduce.partial_sums`.

    ``q`` holds the layout's query positions ``rows[0]..rows[1]``, ``k`` its keys ``keys[0]..keys[1]``;
    ``bias`` is the shard's key padding mask as an additive fp32 bias ``[B, Hm, hi - lo]``.
    """

    q: torch.Tensor
    k: torch.Tensor
    layout: Layout
    reductions: tuple[str, ...]
    scale: float
    bias: Optional[torch.Tensor]
    text_groups: Optional[tuple[tuple[int, ...], ...]]
    rows: tuple[int, int]
    keys: tuple[int, int]

    @property
    def heads(self) -> int:
        return int(self.q.shape[1])

    def row_span(self, name: str) -> slice:
        """The rows of ``q`` that reduction ``name`` keeps (:func:`row_span`)."""
        return row_span(self.layout, self.rows, name)


def row_span(layout: Layout, rows: tuple[int, int], name: str) -> slice:
    """The rows of a query shard (the layout's positions ``rows``) that reduction ``name`` keeps, as
    indices into the shard: the video queries for ``cross`` and ``temporal``, the text queries for
    ``text``, every row for ``full`` and ``entropy`` (maybe empty)."""
    lo, hi = rows
    spans = {"cross": layout.video_q, "temporal": layout.video_q, "text": layout.text_q}
    span = spans.get(name, slice(lo, hi))
    if span is None:
        return slice(0, 0)
    return slice(min(max(span.start, lo), hi) - lo, max(min(span.stop, hi), lo) - lo)


@dataclass(frozen=True, eq=False)
class Partial:
    """The per-row sums of a shard of the keys (or of several, merged) and each row's lse.

    ``sums`` maps each reduction to ``[B, H, R, C]`` fp32, the rows of :meth:`PartialCall.row_span`
    (``entropy``: ``[B, H, R]``): each row's P over the keys covered, normalised over them, summed into
    the reduction's columns (``cross``: text keys, or one per text group; ``temporal``: key frames;
    ``text``: text keys; ``full``: every key of the layout, zero outside ``keys``). ``lse`` is
    ``[B, H, R]``, each row's logsumexp over the keys covered (``-inf`` where all are masked).
    """

    layout: Layout
    reductions: tuple[str, ...]
    rows: tuple[int, int]
    keys: tuple[tuple[int, int], ...]
    text_groups: Optional[tuple[tuple[int, ...], ...]]
    sums: dict[str, torch.Tensor]
    lse: torch.Tensor


def _span(name: str, value: object, length: int, size: int) -> tuple[int, int]:
    """A ``(lo, hi)`` of positions of the layout (``length`` of them) that holds ``size`` tokens."""
    if value is None:
        value = (0, length)
    ok = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and 0 <= value[0] <= value[1] <= length
    )
    if not ok:
        raise AttnmapError(f"{name} must be a pair (lo, hi) with 0 <= lo <= hi <= {length}, got {value!r}")
    lo, hi = int(value[0]), int(value[1])  # type: ignore[index]
    if hi - lo != size:
        raise AttnmapError(f"{name} ({lo}, {hi}) holds {hi - lo} tokens, but the tensor holds {size}")
    return lo, hi


def prepare_partial(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: Layout,
    reductions: Sequence[str] = ("cross", "temporal"),
    *,
    rows: Optional[tuple[int, int]] = None,
    keys: Optional[tuple[int, int]] = None,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    check_finite: bool = True,
    text_groups: Optional[Sequence[Sequence[int]]] = None,
) -> PartialCall:
    """Validate the arguments of :func:`attnmap.reduce.partial_sums` (ValueError naming the argument)."""
    if not isinstance(layout, Layout):
        raise AttnmapError(f"layout must be an attnmap.Layout, got {type(layout).__name__}")
    q, k = _check_qk(q, k)
    b, h, r, d = (int(s) for s in q.shape)
    nk = int(k.shape[2])
    if check_finite:
        _check_finite(q, k)
    names = _check_reductions(reductions, layout)
    other = [n for n in names if n not in PARTIAL]
    if other:
        raise AttnmapError(
            f"reductions: {other} sum over the query rows per key, so shards of the keys cannot be merged "
            f"into them; ask partial_sums for some of {PARTIAL}, and for these run attention_sums over every "
            "key with lse=<the merged Partial.lse>"
        )
    row_span = _span("rows", rows, layout.num_queries, r)
    key_span = _span("keys", keys, layout.num_keys, nk)
    if scale is None:
        scale = d**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise AttnmapError(f"scale must be a finite float or None (D**-0.5), got {scale!r}")
    if "full" in names and b * h * r * layout.num_keys > FULL_LIMIT:
        raise AttnmapError(
            f"reductions: 'full' would hold B x H x rows x Nk = {b * h * r * layout.num_keys} entries "
            f"(limit {FULL_LIMIT}); it is meant for small maps"
        )
    return PartialCall(
        q=q,
        k=k,
        layout=layout,
        reductions=names,
        scale=float(scale),
        bias=_check_mask(key_padding_mask, q, nk, check_finite),
        text_groups=_check_text_groups(text_groups, layout),
        rows=row_span,
        keys=key_span,
    )


def _weights(lse: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``exp(lse - total)``: a shard's share of each row's mass (0 for a shard with no key of the row;
    NaN for a NaN row, never a silent number)."""
    w = torch.exp(lse - total)
    return torch.where(torch.isneginf(lse), torch.zeros_like(w), w)


def merge_partials(parts: Sequence[Partial]) -> Partial:
    """Merge partial sums of disjoint shards of the keys, for the same query rows, exactly as attention
    outputs merge: ``lse = logsumexp_i lse_i``, ``sums = sum_i exp(lse_i - lse) sums_i``; the entropy
    ``sum_i w_i (H_i + lse - lse_i)`` with ``w_i = exp(lse_i - lse)``.

    Args:
        parts: :class:`Partial` of one layout, the same rows, reductions and text groups, and key
            ranges that do not overlap.

    Returns:
        one :class:`Partial` over the union of their keys.
    """
    parts = list(parts)
    if not parts:
        raise AttnmapError("parts must hold at least one Partial")
    first = parts[0]
    for p in parts[1:]:
        same = (p.layout, p.reductions, p.rows, p.text_groups) == (
            first.layout,
            first.reductions,
            first.rows,
            first.text_groups,
        )
        if not same or p.lse.shape != first.lse.shape:
            raise AttnmapError(
                "parts must share the layout, query rows, reductions, text groups and shape: got "
                f"{p.layout} rows {p.rows} {p.reductions} {tuple(p.lse.shape)} against {first.layout} rows "
                f"{first.rows} {first.reductions} {tuple(first.lse.shape)}"
            )
    spans = sorted(s for p in parts for s in p.keys)
    for (_, hi), (lo, _) in zip(spans, spans[1:]):
        if lo < hi:
            raise AttnmapError(f"parts must cover disjoint key ranges, got {spans}")
    lses = torch.stack([p.lse for p in parts])  # [S, B, H, R]
    total = torch.logsumexp(lses, dim=0)  # -inf where every shard is empty; NaN stays NaN
    weights = [_weights(p.lse, total) for p in parts]
    sums: dict[str, torch.Tensor] = {}
    for name in first.reductions:
        rows = row_span(first.layout, first.rows, name)
        if name == "entropy":
            # a shard with no key of the row weighs 0 (its lse is -inf: the term itself would be NaN)
            terms = [
                torch.where(w == 0, torch.zeros_like(w), w * (p.sums[name] + total - p.lse))
                for p, w in zip(parts, weights)
            ]
        else:
            terms = [w[:, :, rows, None] * p.sums[name] for p, w in zip(parts, weights)]
        sums[name] = torch.stack(terms).sum(dim=0)
    return Partial(
        layout=first.layout,
        reductions=first.reductions,
        rows=first.rows,
        keys=tuple(spans),
        text_groups=first.text_groups,
        sums=sums,
        lse=total,
    )


def finish_partial(part: Partial, *, per_head: bool = False) -> dict[str, torch.Tensor]:
    """The outputs of :func:`attnmap.reduce.attention_sums` from partial sums over every key.

    Args:
        part: a :class:`Partial` whose keys cover the whole layout (merge every shard first).
        per_head: keep heads (``H`` after ``B``), else the mean over heads.

    Returns:
        the reductions by name, in the whole layout's shapes; for a shard of the query rows they are
        zero outside its rows (``temporal`` summed over its rows only), so that the outputs of every
        query shard add up to the whole.
    """
    lay = part.layout
    if _covered(part.keys) != (0, lay.num_keys):
        raise AttnmapError(
            f"part covers the keys {list(part.keys)} of 0..{lay.num_keys}: merge the partial sums of "
            "every shard of the keys first (merge_partials)"
        )
    lo, h = part.rows[0], int(part.lse.shape[1])
    every = slice(0, lay.num_queries)
    raw: dict[str, torch.Tensor] = {}
    for name in part.reductions:
        t = part.sums[name]
        at = row_span(lay, part.rows, name).start + lo  # the layout position of t's first row
        if name == "temporal":
            out = frame_sums(t, at, lay)
        else:
            out = place_rows(t, at, {"cross": lay.video_q, "text": lay.text_q}.get(name) or every)
        raw[name] = out.clone() if per_head else out.sum(dim=1, keepdim=True)  # never a view of part
    return means(raw, part.reductions, lay, heads=h, per_head=per_head, num_queries=lay.num_queries)


def _covered(spans: tuple[tuple[int, int], ...]) -> Optional[tuple[int, int]]:
    """The one range that sorted, touching spans make up, or None where they leave a gap."""
    lo, hi = spans[0]
    for a, z in spans[1:]:
        if a != hi:
            return None
        hi = z
    return lo, hi


__all__ = [
    "PARTIAL",
    "Partial",
    "PartialCall",
    "finish_partial",
    "merge_partials",
    "prepare_partial",
    "row_span",
]
