"""The reduction contract: one validated call of ``attention_sums`` and the finishing of its outputs.

A leaf module (it imports nothing of attnmap but the layout and the error root): every backend
imports it, and it imports no backend. :func:`prepare_call` checks the arguments (an
:class:`~attnmap.errors.AttnmapError` naming the argument) and returns an :class:`AttentionCall`;
a backend turns the call into *raw sums* ``[B, Hs, ...]`` (``Hs`` = H with ``per_head``, else 1:
summed over heads; ``temporal`` summed over the query frame's rows, ``blocks`` over the block's
query rows, ``received`` and ``distance`` over all (video) rows, ``entropy`` per row), and
:func:`finish` divides them into the contract's means. :func:`block_grid` says which block each
query and key belongs to (token tiles or video cubes; also the frames of ``temporal``).

A call's q may hold a shard of the layout's query rows (``rows``, the query range of one rank under
context parallelism): the raw sums then have the whole layout's shapes, zero outside those rows, and
the means divide by the whole layout's counts, so that the outputs of the shards add up to the
whole call's. :func:`place_rows` puts a backend's per-row sums where their layout positions are.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from attnmap.errors import AttnmapError
from attnmap.layout import Layout

#: Every reduction ``attention_sums`` knows, in output order.
REDUCTIONS: tuple[str, ...] = (
    "cross",
    "temporal",
    "text",
    "received",
    "probe",
    "full",
    "blocks",
    "distance",
    "entropy",
)
#: Largest ``full`` output (entries over batch, heads and rows) that is allowed.
FULL_LIMIT = 2**26
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

Reductions = Union[str, Sequence[str]]
#: ``block_size`` of ``blocks``: an int or (bq, bk) token tiles, or (t, h, w) video cubes.
BlockSize = Union[int, Sequence[int]]


@dataclass(frozen=True)
class KeyRange:
    """Which keys each query row may attend: those whose position lies in ``[lo, hi)`` of the row.

    ``lo``, ``hi`` ``[B, Nq]`` and ``positions`` ``[B, Nk]`` are int64 (expanded views where the
    caller gave one row for the batch). A causal row ``i`` with offset ``o`` is ``[0, i + o + 1)``, a
    sliding window of ``W`` keys ``[i + o - W + 1, i + o + 1)``; a bidirectional span reaches its last
    key. Positions let the keys come in any order (a layout's order), still masked by where they sit
    in the sequence; a key at a position no range holds (e.g. -1) is never attended.
    """

    lo: torch.Tensor
    hi: torch.Tensor
    positions: torch.Tensor

    def allowed(self, rows: Union[slice, torch.Tensor]) -> torch.Tensor:
        """``[B, R, Nk]`` bool: the keys each of the query ``rows`` may attend."""
        pos = self.positions[:, None, :]
        return (pos >= self.lo[:, rows, None]) & (pos < self.hi[:, rows, None])


@dataclass(frozen=True)
class AttentionCall:
    """One validated call of :func:`attention_sums` (shared by every backend).

    ``bias`` is the key padding mask as an additive fp32 bias ``[B, Hm, Nk]`` with ``Hm`` 1 or H
    (``-inf`` for excluded keys); ``lse`` the caller's logsumexp ``[B, H, Nq]`` in fp32;
    ``text_groups`` the text-key positions summed into each column of ``cross``; ``block_size``
    the blocks of ``blocks``: ``(bq, bk)`` token tiles or ``(t, h, w)`` video cubes; ``shard`` the
    layout's query positions ``[lo, hi)`` that q holds (None: all of them); ``key_range`` the keys each
    query row may attend (:class:`KeyRange`; None: every key the bias keeps).
    """

    q: torch.Tensor
    k: torch.Tensor
    layout: Layout
    reductions: tuple[str, ...]
    per_head: bool
    scale: float
    bias: Optional[torch.Tensor]
    probe: Optional[torch.Tensor]
    lse: Optional[torch.Tensor]
    text_groups: Optional[tuple[tuple[int, ...], ...]] = None
    block_size: Optional[tuple[int, ...]] = None
    shard: Optional[tuple[int, int]] = None  # the query positions q holds, None: all of them
    key_range: Optional[KeyRange] = None

    @property
    def batch(self) -> int:
        return int(self.q.shape[0])

    @property
    def heads(self) -> int:
        return int(self.q.shape[1])

    @property
    def kv_heads(self) -> int:
        return int(self.k.shape[1])

    @property
    def num_queries(self) -> int:
        """The layout's query positions (q holds ``rows`` of them)."""
        return self.layout.num_queries

    @property
    def rows(self) -> tuple[int, int]:
        """The layout's query positions ``[lo, hi)`` that q holds."""
        return (0, self.layout.num_queries) if self.shard is None else self.shard

    def local(self, lo: int, hi: int) -> slice:
        """q's rows at the layout positions ``lo..hi`` (within :attr:`rows`)."""
        return slice(lo - self.rows[0], hi - self.rows[0])

    @property
    def num_keys(self) -> int:
        return int(self.k.shape[2])

    @property
    def out_heads(self) -> int:
        """Head dimension of the raw sums: H with ``per_head``, else 1 (summed)."""
        return self.heads if self.per_head else 1

    @property
    def all_pairs(self) -> bool:
        """Some requested reduction needs every query row and every key (``received``, ``full``,
        ``entropy``, ``blocks`` over token tiles)."""
        wanted = set(self.reductions)
        return bool(wanted & {"received", "full", "entropy"}) or ("blocks" in wanted and not self.cubes)

    def row_range(self) -> tuple[int, int]:
        """The layout's query positions ``[lo, hi)`` that some requested reduction needs (probe rows
        aside), within the rows q holds (``lo == hi`` when none)."""
        lay, wanted = self.layout, set(self.reductions)
        if self.all_pairs:
            lo, hi = 0, self.num_queries
        else:
            spans = []
            if wanted & {"cross", "temporal", "distance", "blocks"}:  # blocks here: video cubes
                spans.append(lay.video_q)
            if "text" in wanted and lay.text_q is not None:
                spans.append(lay.text_q)
            if not spans:
                return 0, 0
            lo, hi = min(s.start for s in spans), max(s.stop for s in spans)
        lo, hi = max(lo, self.rows[0]), min(hi, self.rows[1])
        return (lo, hi) if lo < hi else (self.rows[0], self.rows[0])

    @property
    def cubes(self) -> bool:
        """``blocks`` over video cubes ``(t, h, w)`` (else token tiles ``(bq, bk)``)."""
        return self.block_size is not None and len(self.block_size) == 3


@dataclass(frozen=True)
class BlockGrid:
    """Which block of ``blocks`` each query and key belongs to.

    ``query`` ``[Nq]`` and ``key`` ``[Nk]`` hold block numbers (int64, -1: in no block: a text or
    prefix token under video cubes); ``counts`` ``[rows]`` the query tokens of each block row,
    what :func:`finish` divides by. Arrays are read-only (the grid is cached per layout).
    """

    query: np.ndarray
    key: np.ndarray
    rows: int
    cols: int
    counts: np.ndarray


def _cube_ids(grid: tuple[int, int, int], cube: tuple[int, int, int]) -> tuple[np.ndarray, int]:
    """The cube of each video token (raster order of cubes, edge cubes smaller) and the count."""
    (f, h, w), (ct, ch, cw) = grid, cube
    nh, nw = -(-h // ch), -(-w // cw)
    t, y, x = np.meshgrid(np.arange(f) // ct, np.arange(h) // ch, np.arange(w) // cw, indexing="ij")
    return ((t * nh + y) * nw + x).reshape(-1), -(-f // ct) * nh * nw


@functools.lru_cache(maxsize=32)
def _block_grid(layout: Layout, block_size: tuple[int, ...]) -> BlockGrid:
    nq, nk = layout.num_queries, layout.num_keys
    if len(block_size) == 2:
        bq, bk = block_size
        query, key = np.arange(nq, dtype=np.int64) // bq, np.arange(nk, dtype=np.int64) // bk
        rows, cols = -(-nq // bq), -(-nk // bk)
    else:
        ids, cols = _cube_ids(layout.grid, (block_size[0], block_size[1], block_size[2]))
        query, key = np.full(nq, -1, dtype=np.int64), np.full(nk, -1, dtype=np.int64)
        query[layout.video_q] = ids
        if layout.video_k is not None:
            key[layout.video_k] = ids
        rows = cols
    counts = np.bincount(query[query >= 0], minlength=rows).astype(np.float32)
    for a in (query, key, counts):
        a.flags.writeable = False
    return BlockGrid(query=query, key=key, rows=rows, cols=cols, counts=counts)


def block_grid(call: AttentionCall) -> BlockGrid:
    """The blocks of a call's ``blocks`` reduction (its ``block_size``)."""
    assert call.block_size is not None
    return _block_grid(call.layout, call.block_size)


def frame_grid(layout: Layout) -> BlockGrid:
    """The frames of ``temporal`` as blocks: cubes ``(1, H, W)``."""
    return _block_grid(layout, (1, layout.grid[1], layout.grid[2]))


def place_rows(t: torch.Tensor, lo: int, span: slice) -> torch.Tensor:
    """Per-row sums ``t`` ``[B, Hs, R, ...]`` of the layout positions ``lo..lo + R`` as the rows of
    ``span`` (the layout positions a reduction keeps: its video or text queries), zero at the
    positions ``t`` does not hold: ``[B, Hs, len(span), ...]``. A view where ``t`` holds them all."""
    first, last = max(span.start, lo), min(span.stop, lo + int(t.shape[2]))
    if (first, last) == (span.start, span.stop):
        return t[:, :, first - lo : last - lo]
    out = t.new_zeros(*t.shape[:2], span.stop - span.start, *t.shape[3:])
    if first < last:
        out[:, :, first - span.start : last - span.start] = t[:, :, first - lo : last - lo]
    return out


def frame_sums(t: torch.Tensor, lo: int, layout: Layout) -> torch.Tensor:
    """Per-row sums over key frames ``t`` ``[B, Hs, R, F]`` of the layout positions ``lo..lo + R``
    summed into their query frames: ``[B, Hs, F, F]`` (the raw sums of ``temporal``)."""
    video = place_rows(t, lo, layout.video_q)  # [B, Hs, Nv, F]
    return video.unflatten(2, (layout.frames, layout.frame_tokens)).sum(dim=3)


def _check_qk(q: object, k: object) -> tuple[torch.Tensor, torch.Tensor]:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise AttnmapError(f"{name} must be a torch.Tensor [B, H, N, D], got {type(t).__name__}")
        if t.dim() != 4:
            raise AttnmapError(
                f"{name} must be 4-D [B, H, N, D] (the SDPA layout), got shape {tuple(t.shape)}"
            )
        if t.dtype not in _FLOATS:
            raise AttnmapError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.shape[3] == 0:
            raise AttnmapError(f"{name} must have a head dim D >= 1, got shape {tuple(t.shape)}")
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
    if q.dtype != k.dtype:
        raise AttnmapError(f"q and k must have the same dtype, got q {q.dtype} and k {k.dtype}")
    if q.device != k.device:
        raise AttnmapError(f"q and k must be on the same device, got q on {q.device} and k on {k.device}")
    bq, hq, _, dq = q.shape
    bk, hk, _, dk = k.shape
    if bq != bk or dq != dk or hk < 1 or hq % hk != 0:
        raise AttnmapError(
            f"k {tuple(k.shape)} does not match q {tuple(q.shape)}: expected the same batch and head dim, "
            "and q heads a multiple of k heads (grouped-query attention)"
        )
    return q, k


def _check_finite(q: torch.Tensor, k: torch.Tensor) -> None:
    """AttnmapError naming q or k if it holds NaN or inf.

    One fp32 sum per tensor and one device sync: a sum is finite exactly when every element is,
    unless finite values overflow it (then the exact per-element test decides). That reads q and k
    once, about 10x faster on the CPU than ``isfinite(t).all()``, which also writes a bool copy.
    """
    sums = torch.stack([q.sum(dtype=torch.float32), k.sum(dtype=torch.float32)])
    if bool(torch.isfinite(sums).all()):
        return
    for name, t in (("q", q), ("k", k)):
        if not bool(torch.isfinite(t).all()):
            raise AttnmapError(
                f"{name} contains NaN or inf; attention maps of such inputs are meaningless "
                "(check_finite=False skips this test and its device sync; the maps then hold NaN)"
            )


def _check_reductions(reductions: Reductions, layout: Layout) -> tuple[str, ...]:
    names = (reductions,) if isinstance(reductions, str) else tuple(reductions)
    if not names:
        raise AttnmapError(f"reductions must name at least one of {REDUCTIONS}, got an empty tuple")
    for name in names:
        if name not in REDUCTIONS:
            raise AttnmapError(f"reductions: unknown reduction {name!r}; expected some of {REDUCTIONS}")
        if not layout.supports(name):
            raise AttnmapError(f"reductions: {name!r} is not defined for {layout}")
    return tuple(name for name in REDUCTIONS if name in names)


def _check_mask(mask: object, q: torch.Tensor, num_keys: int, check_finite: bool) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise AttnmapError(f"key_padding_mask must be a torch.Tensor, got {type(mask).__name__}")
    b, h = int(q.shape[0]), int(q.shape[1])
    shape = tuple(mask.shape)
    ok_2d = len(shape) == 2 and shape[0] in (1, b) and shape[1] == num_keys
    ok_4d = (
        len(shape) == 4
        and shape[0] in (1, b)
        and shape[1] in (1, h)
        and shape[2] == 1
        and shape[3] == num_keys
    )
    if not (ok_2d or ok_4d):
        raise AttnmapError(
            f"key_padding_mask must have shape (B, Nk), (B, 1, 1, Nk) or (B, H, 1, Nk) = "
            f"({b}, {num_keys}), ({b}, 1, 1, {num_keys}) or ({b}, {h}, 1, {num_keys}), got {shape}"
        )
    flat = mask.reshape(shape[0], 1, num_keys) if ok_2d else mask.reshape(shape[0], shape[1], num_keys)
    flat = flat.to(q.device)
    if flat.dtype == torch.bool:
        bias = torch.zeros(flat.shape, dtype=torch.float32, device=q.device).masked_fill_(~flat, -math.inf)
    elif flat.is_floating_point():
        bias = flat.to(torch.float32)
        if check_finite and bool((torch.isnan(bias) | (bias == math.inf)).any()):
            raise AttnmapError("key_padding_mask (an additive bias) must not contain NaN or +inf")
    else:
        raise AttnmapError(
            f"key_padding_mask must be bool (True = keep) or an additive float bias, got {flat.dtype}"
        )
    return bias.expand(b, bias.shape[1], num_keys).contiguous()


def _check_rows(rows: object, layout: Layout, size: int) -> tuple[int, int]:
    """``rows``: the layout's query positions ``(lo, hi)`` that q's ``size`` rows hold."""
    n = layout.num_queries
    ok = (
        isinstance(rows, (tuple, list))
        and len(rows) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in rows)
        and 0 <= rows[0] <= rows[1] <= n
    )
    if not ok:
        raise AttnmapError(
            f"rows must be a pair (lo, hi) with 0 <= lo <= hi <= {n} (the layout's queries), got {rows!r}"
        )
    lo, hi = int(rows[0]), int(rows[1])  # type: ignore[index]
    if hi - lo != size:
        raise AttnmapError(f"rows ({lo}, {hi}) holds {hi - lo} query positions, but q holds {size} rows")
    return lo, hi


def _check_probe(
    probe: object, wanted: bool, num_queries: int, device: torch.device
) -> Optional[torch.Tensor]:
    if probe is None:
        if wanted:
            raise AttnmapError("probe: the 'probe' reduction needs probe=<LongTensor of query indices>")
        return None
    if not wanted:
        raise AttnmapError("probe was given but 'probe' is not in reductions; add it or drop probe")
    idx = probe if isinstance(probe, torch.Tensor) else torch.as_tensor(probe)
    if idx.dtype in (torch.bool,) or idx.is_floating_point() or idx.is_complex() or idx.dim() != 1:
        raise AttnmapError(
            f"probe must be a 1-D integer tensor of query indices, got {idx.dtype} {tuple(idx.shape)}"
        )
    if idx.numel() == 0:
        raise AttnmapError("probe must hold at least one query index")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= num_queries:
        raise AttnmapError(f"probe indices must lie in [0, {num_queries}), got values in [{lo}, {hi}]")
    return idx.to(device=device, dtype=torch.long)


def _check_lse(lse: object, q: torch.Tensor, check_finite: bool) -> Optional[torch.Tensor]:
    if lse is None:
        return None
    if not isinstance(lse, torch.Tensor) or not lse.is_floating_point():
        raise AttnmapError("lse must be a float tensor [B, H, Nq], the logsumexp of the attention forward")
    expected = tuple(q.shape[:3])
    if tuple(lse.shape) != expected:
        raise AttnmapError(f"lse must have shape [B, H, Nq] = {expected}, got {tuple(lse.shape)}")
    lse = lse.to(device=q.device, dtype=torch.float32)
    if check_finite and bool(torch.isnan(lse).any()):
        raise AttnmapError("lse contains NaN")
    return lse


def _check_text_groups(groups: object, layout: Layout) -> Optional[tuple[tuple[int, ...], ...]]:
    if groups is None:
        return None
    if layout.text_k is None:
        raise AttnmapError(f"text_groups: layout {layout} has no text keys to group")

    def bad() -> AttnmapError:  # its text only where it is raised: capture passes groups every call
        return AttnmapError(
            f"text_groups must be a sequence of non-empty sequences of text positions in [0, {layout.text}), "
            f"got {groups!r}"
        )

    if isinstance(groups, (str, bytes, torch.Tensor)) or not isinstance(groups, Sequence) or not groups:
        raise bad()
    out = []
    for g in groups:
        if isinstance(g, (str, bytes)) or not isinstance(g, Sequence) or not g:
            raise bad()
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in g):
            raise bad()
        keys = set(g)  # a key counts once in its group
        if min(keys) < 0 or max(keys) >= layout.text:
            raise bad()
        out.append(tuple(sorted(int(i) for i in keys)))
    return tuple(out)


def _check_block_size(block_size: object, wanted: bool, layout: Layout) -> Optional[tuple[int, ...]]:
    if block_size is None:
        if wanted:
            raise AttnmapError(
                "block_size: the 'blocks' reduction needs block_size=<int>, (bq, bk) token tiles or "
                "(t, h, w) video cubes"
            )
        return None
    if not wanted:
        raise AttnmapError(
            "block_size was given but 'blocks' is not in reductions; add it or drop block_size"
        )
    values = (block_size,) if not isinstance(block_size, (tuple, list)) else tuple(block_size)
    ok = len(values) in (1, 2, 3) and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in values
    )
    if not ok:
        raise AttnmapError(
            "block_size must be a positive int, a pair (bq, bk) of token tiles or a triple (t, h, w) of "
            f"video cubes, got {block_size!r}"
        )
    size = tuple(int(v) for v in values)
    if len(size) == 3 and layout.video_k is None:
        raise AttnmapError(
            f"block_size: video cubes {size} need video keys, and {layout} has none; "
            "give token tiles (bq, bk) instead"
        )
    return size * 2 if len(size) == 1 else size


def _check_key_range(
    key_range: object, positions: object, q: torch.Tensor, num_keys: int
) -> Optional[KeyRange]:
    if key_range is None:
        if positions is not None:
            raise AttnmapError("key_positions was given without key_range; pass key_range=(lo, hi) too")
        return None
    b, nq = int(q.shape[0]), int(q.shape[2])
    if not isinstance(key_range, (tuple, list)) or len(key_range) != 2:
        raise AttnmapError(f"key_range must be a pair (lo, hi) of integer tensors [B, Nq], got {key_range!r}")

    def rows(name: str, t: object, width: int, what: str) -> torch.Tensor:
        ok = isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dtype != torch.bool
        if not ok or not isinstance(t, torch.Tensor):
            raise AttnmapError(
                f"{name} must be an integer tensor [{what}] or [B, {what}], got {type(t).__name__}"
            )
        if t.dim() not in (1, 2) or t.shape[-1] != width or (t.dim() == 2 and t.shape[0] not in (1, b)):
            raise AttnmapError(
                f"{name} must be an integer tensor [{what}] or [B, {what}] = [{b}, {width}], got {tuple(t.shape)}"
            )
        t = t.to(device=q.device, dtype=torch.long)
        return t.reshape(-1 if t.dim() == 2 else 1, width).expand(b, width)

    lo = rows("key_range[0] (lo)", key_range[0], nq, "Nq")
    hi = rows("key_range[1] (hi)", key_range[1], nq, "Nq")
    if positions is None:
        pos = torch.arange(num_keys, device=q.device).expand(b, num_keys)
    else:
        pos = rows("key_positions", positions, num_keys, "Nk")
    return KeyRange(lo=lo, hi=hi, positions=pos)


def group_columns(t: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """The text-key columns of ``t`` (last dim) summed into one column per group."""
    return torch.stack([t[..., list(g)].sum(dim=-1) for g in groups], dim=-1)


def group_text(call: AttentionCall, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``cross`` with one column per text group (the sum of its keys' columns)."""
    if call.text_groups is not None and "cross" in out:
        out["cross"] = group_columns(out["cross"], call.text_groups)
    return out


def prepare_call(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: Layout,
    reductions: Reductions = ("cross", "temporal"),
    *,
    per_head: bool = False,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    probe: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    check_finite: bool = True,
    text_groups: Optional[Sequence[Sequence[int]]] = None,
    block_size: Optional[BlockSize] = None,
    rows: Optional[tuple[int, int]] = None,
    key_range: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    key_positions: Optional[torch.Tensor] = None,
) -> AttentionCall:
    """Validate the arguments of :func:`attention_sums` (ValueError naming the argument)."""
    if not isinstance(layout, Layout):
        raise AttnmapError(f"layout must be an attnmap.Layout, got {type(layout).__name__}")
    q, k = _check_qk(q, k)
    b, h, nq, d = (int(s) for s in q.shape)
    nk = int(k.shape[2])
    if check_finite:
        _check_finite(q, k)
    shard = None if rows is None else _check_rows(rows, layout, nq)
    layout.check(layout.num_queries if rows is not None else nq, nk, argument="layout")
    nq = layout.num_queries
    names = _check_reductions(reductions, layout)
    if rows is not None and key_range is not None:
        raise AttnmapError(
            "rows: not with key_range (a shard of the query rows with per-row key ranges is not supported); "
            "pass every query (rows=None)"
        )
    if rows is not None and "probe" in names:
        raise AttnmapError(
            "rows: 'probe' reads rows by their query index; ask attention_sums for the probe rows with "
            "every query (rows=None)"
        )
    if scale is None:
        scale = d**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise AttnmapError(f"scale must be a finite float or None (D**-0.5), got {scale!r}")
    if "full" in names:
        entries = b * (h if per_head else 1) * nq * nk
        if entries > FULL_LIMIT:
            raise AttnmapError(
                f"reductions: 'full' would hold {entries} entries (limit {FULL_LIMIT}); it is meant for small "
                "maps such as ViT rollout. Use 'cross', 'temporal', 'text', 'received' or 'probe' instead"
            )
    size = _check_block_size(block_size, "blocks" in names, layout)
    if size is not None:
        grid = _block_grid(layout, size)
        entries = b * (h if per_head else 1) * grid.rows * grid.cols
        if entries > FULL_LIMIT:
            raise AttnmapError(
                f"block_size {size} gives {grid.rows} x {grid.cols} blocks, {entries} entries in all "
                f"(limit {FULL_LIMIT}); choose larger blocks"
            )
    return AttentionCall(
        q=q,
        k=k,
        layout=layout,
        reductions=names,
        per_head=bool(per_head),
        scale=float(scale),
        bias=_check_mask(key_padding_mask, q, nk, check_finite),
        probe=_check_probe(probe, "probe" in names, nq, q.device),
        lse=_check_lse(lse, q, check_finite),
        text_groups=_check_text_groups(text_groups, layout),
        block_size=size,
        shard=shard,
        key_range=_check_key_range(key_range, key_positions, q, nk),
    )


def finish(call: AttentionCall, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn raw sums ``[B, Hs, ...]`` (summed over heads when ``Hs == 1``) into the contract's means.

    ``temporal`` arrives as the sum over the query frame's rows, ``blocks`` over the block's query
    rows, ``received`` over all rows and ``distance`` over the video rows; they are divided here, as
    is the head sum (``entropy`` and the rest arrive per row).
    """
    counts = block_grid(call).counts if "blocks" in call.reductions else None
    return means(
        sums,
        call.reductions,
        call.layout,
        heads=call.heads,
        per_head=call.per_head,
        num_queries=call.num_queries,
        block_counts=counts,
    )


def means(
    sums: dict[str, torch.Tensor],
    reductions: Sequence[str],
    layout: Layout,
    *,
    heads: int,
    per_head: bool,
    num_queries: int,
    block_counts: Optional[np.ndarray] = None,
) -> dict[str, torch.Tensor]:
    """:func:`finish` for raw sums described by their parts: the ``layout``, ``heads`` (the divisor of
    a head sum), ``num_queries`` (of ``received``) and ``block_counts`` (the query rows of each block
    row of ``blocks``)."""
    out: dict[str, torch.Tensor] = {}
    for name in reductions:
        t = sums[name]
        if name == "temporal":
            t = t / layout.frame_tokens
        elif name == "received":
            t = t / num_queries
        elif name == "distance":
            t = t / layout.num_video
        elif name == "blocks":
            assert block_counts is not None
            counts = torch.tensor(block_counts, device=t.device)
            t = t / counts.clamp_min(1.0)[:, None]
        if not per_head:
            t = t.squeeze(1) / heads
        out[name] = t.to(torch.float32)
    return out
