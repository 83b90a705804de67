"""The token map of a video LLM's text sequence, per batch row, and the keys each query row may attend.

A :class:`SequenceMap` says what each position of each batch row is: a video token (its cell on the
LLM's video grid ``(F, H, W)``), the row's first real token (``sink``: the key LLMs park attention
on), the prompt before the video (``system``: system prompt, chat markup), text inside the video
(``video_text``: timestamps, frame markers, begin/end tokens, a video token on no cell such as
LLaVA-OneVision's trailing newline), the prompt after it (``text``: the question), a generated token
(``generated``), or left padding. It is built at the prefill from ``input_ids`` and where the video
tokens sit, and grows by one position per decode step. A call of ``nk`` keys and ``nq`` queries in a
sequence of ``total`` positions holds positions ``total - nk ..`` as keys (a sliding-window cache
keeps the last ones) and ``total - nq ..`` as queries (a decode step's query is the last).

:func:`key_ranges` reads, from a call's mask as transformers passes it (None with a causal module, a
bool mask, or an additive float mask of 0 and the dtype's minimum, ``[B, 1, nq, nk]``; a flash-attention
call's key-padding mask ``[B, nk]`` with the call's causality and sliding window), the keys each
query row attends as one range ``[lo, hi)`` of key indices: the contract of
``attnmap.attention_sums(key_range=...)``. Private to :mod:`attnmap.capture`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

#: the parts of a row, in the order of :attr:`SequenceMap.segments`' indices (padding is -1)
SEGMENTS = ("sink", "system", "video", "video_text", "text", "generated")
_INDEX = {name: i for i, name in enumerate(SEGMENTS)}
#: rows of a mask read at a time (entries of a chunk: at most this many)
_CHUNK = 1 << 22

Grid = tuple[int, int, int]


@dataclass
class RowTokens:
    """One batch row's prompt: its ids, its left padding, where each cell's video token sits
    (``cells [F, H, W]``, -1 where the model has no token for the cell) and its marked words
    (``{word: positions}``)."""

    ids: list[int]
    pad: int
    cells: torch.Tensor
    words: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def segments(self, video: Sequence[int]) -> torch.Tensor:
        """``[N]`` segment index of each position (see :data:`SEGMENTS`; -1 for padding); ``video``: the
        positions of every video-token id of the row (cells and those on no cell)."""
        n = len(self.ids)
        seg = torch.full((n,), _INDEX["text"], dtype=torch.long)
        seg[: self.pad] = -1
        if self.pad < n:
            seg[self.pad] = _INDEX["sink"]
        if video:
            first, last = min(video), max(video)
            seg[self.pad + 1 : first] = _INDEX["system"]
            seg[first : last + 1] = _INDEX["video_text"]
        on = self.cells[self.cells >= 0]
        seg[on] = _INDEX["video"]
        return seg


class SequenceMap:
    """The token map of every batch row (see the module docstring).

    Args:
        rows: one :class:`RowTokens` per batch row, all of the same length ``N`` (left-padded).
        grid: the LLM's video grid ``(F, H, W)``.
        video: per row, the positions of every video-token id (cells, and those on no cell).
    """

    def __init__(self, rows: Sequence[RowTokens], grid: Grid, video: Sequence[Sequence[int]]) -> None:
        self.rows = list(rows)
        self.grid = grid
        self.prefill = len(self.rows[0].ids)
        self._segments = torch.stack([r.segments(v) for r, v in zip(self.rows, video)])  # [B, N]
        self._cells = torch.stack([r.cells.flatten() for r in self.rows])  # [B, F*H*W]
        self.generated: list[list[int]] = [[] for _ in self.rows]

    @property
    def batch(self) -> int:
        return len(self.rows)

    @property
    def total(self) -> int:
        """Positions so far: the prompt and the generated tokens fed back."""
        return self.prefill + len(self.generated[0])

    def extend(self, ids: torch.Tensor) -> None:
        """Append one decode step's input tokens ``[B, q]`` (the tokens generated before it)."""
        for row, new in zip(self.generated, ids.tolist()):
            row.extend(int(t) for t in new)

    def ids(self, row: int) -> list[int]:
        """A row's ids so far (prompt, then the generated tokens fed back)."""
        return self.rows[row].ids + self.generated[row]

    @property
    def cells(self) -> torch.Tensor:
        """``[B, F*H*W]`` sequence positions of the cells (-1: no token)."""
        return self._cells

    def segments(self, key0: int, nk: int, device: torch.device) -> torch.Tensor:
        """``[B, nk]`` segment index of the keys at positions ``key0 .. key0 + nk - 1`` (-1: padding)."""
        seg = self._segments
        if key0 + nk > self.prefill:
            tail = torch.full((self.batch, key0 + nk - self.prefill), _INDEX["generated"], dtype=torch.long)
            seg = torch.cat([seg, tail], dim=1)
        return seg[:, key0 : key0 + nk].to(device)

    def on_grid(self, values: torch.Tensor, key0: int) -> torch.Tensor:
        """``values [B, ..., nk]`` (one per key of a call whose key 0 is position ``key0``) read at the
        cells: ``[B, ..., F, H, W]``; a cell outside the keys (a sliding window's) reads 0, a cell the
        model has no token for (VideoLLaMA3's compression) NaN."""
        nk = values.shape[-1]
        cells = self._cells.to(values.device)
        index = cells - key0
        inside = (cells >= 0) & (index >= 0) & (index < nk)
        shape = (values.shape[0],) + (1,) * (values.dim() - 2) + (cells.shape[1],)
        gathered = values.gather(-1, index.clamp(0, nk - 1).view(shape).expand(*values.shape[:-1], -1))
        out = torch.where(inside.view(shape), gathered, torch.zeros((), device=values.device))
        out = torch.where((cells >= 0).view(shape), out, torch.full((), float("nan"), device=values.device))
        return out.unflatten(-1, self.grid)

    def masses(self, values: torch.Tensor, key0: int) -> torch.Tensor:
        """``values [B, ..., nk]`` summed per segment: ``[B, ..., len(SEGMENTS)]`` (padding dropped)."""
        nk = values.shape[-1]
        seg = self.segments(key0, nk, values.device)
        onehot = torch.nn.functional.one_hot(seg.clamp_min(0), len(SEGMENTS)).to(values.dtype)
        onehot = onehot * (seg >= 0)[..., None].to(values.dtype)  # [B, nk, S]
        flat = values.reshape(values.shape[0], -1, nk) @ onehot  # [B, rest, S]
        return flat.reshape(*values.shape[:-1], len(SEGMENTS))


def _rows_of(mask: torch.Tensor, batch: int, nq: int, nk: int) -> Union[torch.Tensor, str]:
    """A call's mask as ``[B or 1, nq or 1, nk]`` (its head axis checked and dropped)."""
    m = mask
    if m.dim() == 2:  # [B, nk]: keys only
        m = m[:, None, None, :]
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.dim() != 4 or m.shape[-1] != nk or m.shape[-2] not in (1, nq) or m.shape[0] not in (1, batch):
        return f"its mask of shape {tuple(mask.shape)} does not broadcast to [B, 1, {nq}, {nk}]"
    if m.shape[1] != 1:
        if not bool((m == m[:, :1]).all()):
            return "its mask differs between heads"
        m = m[:, :1]
    return m[:, 0]


def key_ranges(
    mask: Optional[torch.Tensor],
    *,
    batch: int,
    nq: int,
    nk: int,
    causal: bool,
    rows: Optional[torch.Tensor] = None,
    window: Optional[int] = None,
) -> Union[tuple[torch.Tensor, torch.Tensor], str]:
    """The keys each query row of a call attends, as ``(lo, hi)`` ``[B, R]`` key indices (R = ``nq``,
    or the chosen ``rows``), or the reason the mask is not one range per row.

    Without a mask a causal call's query ``i`` sees keys ``0 .. i + nk - nq`` (a decode step's query is
    the last row), a non-causal call every key. A bool mask keeps True; a float mask keeps its 0
    entries and masks those at or below half the dtype's minimum (transformers' eager masks); any
    other value is an additive bias, which one range cannot say. A row that keeps no key gets the
    empty range ``[0, 0)`` (a left pad's query row).

    A 2-D mask ``[B, nk]`` is a key-padding mask (what transformers passes a flash-attention
    function, which adds causality and the sliding window itself): the call's causality and
    ``window`` (the ``sliding_window`` its keyword arguments name: a query sees its last ``window``
    keys, itself included; either side of it when not causal) narrow each row's range as they do with
    no mask. A 4-D mask is the whole pattern (transformers' SDPA and eager functions ignore both).
    """
    index = torch.arange(nq) if rows is None else rows.cpu()
    at = index + (nk - nq)  # each query row's own key: a decode step's query is the last row
    if mask is None:
        lo, hi = _bounded(torch.zeros_like(index), torch.full_like(index, nk), at, nk, causal, window)
        return lo.expand(batch, -1), hi.expand(batch, -1)
    padding = mask.dim() == 2
    m = _rows_of(mask, batch, nq, nk)
    if isinstance(m, str):
        return m
    if m.shape[1] == 1:
        index = torch.zeros_like(index)
    los, his = [], []
    step = max(1, _CHUNK // max(1, m.shape[0] * nk))
    for r0 in range(0, index.shape[0], step):
        chunk = m[:, index[r0 : r0 + step].to(m.device)]
        if chunk.dtype == torch.bool:
            keep = chunk
        elif chunk.is_floating_point():
            masked = chunk <= torch.finfo(chunk.dtype).min / 2
            if bool(((chunk != 0) & ~masked).any()):
                return "its float mask holds additive biases (values other than 0 and the dtype's minimum)"
            keep = ~masked
        else:
            return f"its mask has dtype {chunk.dtype} (expected bool or float)"
        some = keep.any(dim=-1)
        lo = keep.to(torch.uint8).argmax(dim=-1)
        hi = nk - keep.flip(-1).to(torch.uint8).argmax(dim=-1)
        if bool(((keep.sum(dim=-1) != hi - lo) & some).any()):
            return "its mask keeps keys that are not one contiguous range per query row"
        los.append(torch.where(some, lo, 0))
        his.append(torch.where(some, hi, 0))
    lo_all = torch.cat(los, dim=1).cpu().expand(batch, -1)
    hi_all = torch.cat(his, dim=1).cpu().expand(batch, -1)
    if padding:
        lo_all, hi_all = _bounded(lo_all, hi_all, at.expand(batch, -1), nk, causal, window)
    return lo_all, hi_all


def _bounded(
    lo: torch.Tensor, hi: torch.Tensor, at: torch.Tensor, nk: int, causal: bool, window: Optional[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key ranges ``[lo, hi)`` narrowed to what a query at key position ``at`` sees under causality
    and a sliding ``window``; a range left empty becomes ``[0, 0)``."""
    first, last = torch.zeros_like(at), torch.full_like(at, nk)
    if causal:
        last = at + 1
    if window is not None:
        first = at + 1 - window
        if not causal:
            last = at + window
    lo, hi = torch.maximum(lo, first.clamp(0, nk)), torch.minimum(hi, last.clamp(0, nk))
    empty = hi <= lo
    return lo.masked_fill(empty, 0), hi.masked_fill(empty, 0)
