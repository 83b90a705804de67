"""Accumulation: running means of the maps of one capture, keyed by a frozen :class:`MapKey`.

Each map is a :class:`RunningMean` over the calls that produced it: a float32 sum ``[B, ...]`` and a
count per batch row, so that calls made for some rows only (Mochi calls attention once per row)
count for those rows. A map whose trailing sizes grow between calls is padded with NaN to the largest:
the positions a row had no call for are not its tokens, never silent zeros.
Private to :mod:`attnmap.capture`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

Rows = Union[slice, list[int]]


@dataclass(frozen=True)
class MapKey:
    """One accumulated map: its step, CFG branch, name and block (None: every block's calls)."""

    step: int
    branch: str
    name: str
    block: Optional[int] = None

    def order(self) -> tuple[int, str, str, int]:
        return self.step, self.branch, self.name, -1 if self.block is None else self.block


def _pad_to(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    pad: list[int] = []
    for have, want in zip(reversed(t.shape), reversed(shape)):
        pad += [0, want - have]
    return F.pad(t, pad, value=float("nan")) if any(pad) else t


class RunningMean:
    """The sum over calls of a map ``[B, ...]`` and how many calls each batch row got."""

    __slots__ = ("count", "total")

    def __init__(self, batch: int, shape: tuple[int, ...], device: torch.device) -> None:
        self.total = torch.zeros((batch, *shape), dtype=torch.float32, device=device)
        self.count = torch.zeros(batch, dtype=torch.float32, device=device)

    def add(self, value: torch.Tensor, rows: Rows) -> Optional[str]:
        """Add one call's map for ``rows``; the reason it could not be added, else None."""
        value = value.detach().to(torch.float32)
        if value.dim() != self.total.dim():
            return f"changed shape from {tuple(self.total.shape[1:])} to {tuple(value.shape[1:])}"
        if value.shape[1:] != self.total.shape[1:]:
            grown = tuple(max(a, b) for a, b in zip(self.total.shape[1:], value.shape[1:]))
            # the rows that had calls get NaN where they had none; the others start from zero
            seen = (self.count > 0).reshape(-1, *([1] * (self.total.dim() - 1)))
            padded = _pad_to(self.total, (self.total.shape[0], *grown))
            self.total = torch.where(seen, padded, padded.nan_to_num(nan=0.0))
            value = _pad_to(value, (value.shape[0], *grown))
        if value.device != self.total.device:
            value = value.to(self.total.device)
        if isinstance(rows, slice):
            self.total[rows] += value
            self.count[rows] += 1
        else:
            index = torch.tensor(rows, device=self.total.device)
            self.total.index_add_(0, index, value)
            self.count.index_add_(0, index, torch.ones(len(rows), device=self.total.device))
        return None

    def mean(self) -> torch.Tensor:
        """The mean over the calls, per row (NaN for a row no call reached)."""
        count = self.count.reshape(-1, *([1] * (self.total.dim() - 1)))
        return self.total / count

    def to(self, device: Union[str, torch.device]) -> None:
        self.total, self.count = self.total.to(device), self.count.to(device)

    @property
    def nbytes(self) -> int:
        return self.total.numel() * self.total.element_size()


class Accumulator:
    """Running means keyed by :class:`MapKey`, with reads that average over blocks and steps."""

    def __init__(self) -> None:
        self._maps: dict[MapKey, RunningMean] = {}

    def add(self, key: MapKey, value: torch.Tensor, rows: Rows, batch: int) -> Optional[str]:
        """Add ``value`` ``[len(rows), ...]`` to the rows ``rows`` of a map of ``batch`` rows; returns
        the reason it was refused (a map that changed rank), else None."""
        slot = self._maps.get(key)
        if slot is None:
            slot = self._maps[key] = RunningMean(batch, tuple(value.shape[1:]), value.device)
        return slot.add(value, rows)

    def alias(self, step: int, name: str, new: str, rows: list[int]) -> None:
        """Add a step's map ``name`` (of every branch and block) under the name ``new`` too, for the
        batch ``rows`` that have it (a video LLM's answer under the word it generated)."""
        for key in [k for k in self._maps if (k.step, k.name) == (step, name)]:
            slot = self._maps[key]
            have = [r for r in rows if r < slot.count.shape[0] and bool(slot.count[r] > 0)]
            if have:
                value = slot.mean()[have]
                self.add(MapKey(step, key.branch, new, key.block), value, have, slot.total.shape[0])

    def keys(self, step: Optional[int] = None) -> list[MapKey]:
        keys = [k for k in self._maps if step is None or k.step == step]
        return sorted(keys, key=MapKey.order)

    @property
    def steps(self) -> list[int]:
        return sorted({k.step for k in self._maps})

    @property
    def names(self) -> list[str]:
        return sorted({k.name for k in self._maps})

    @property
    def nbytes(self) -> int:
        return sum(slot.nbytes for slot in self._maps.values())

    def rows(self, step: int) -> int:
        """Batch rows of the maps of a step (0 when none)."""
        return next((slot.total.shape[0] for k, slot in self._maps.items() if k.step == step), 0)

    def running(self, step: int) -> list[tuple[MapKey, RunningMean]]:
        """A step's running means, in key order (the same order on every rank of a capture)."""
        return [(k, self._maps[k]) for k in self.keys(step)]

    def drop(self, step: int) -> None:
        """Forget a step's maps."""
        for key in self.keys(step):
            del self._maps[key]

    def to_cpu(self, step: int) -> None:
        for key, slot in self._maps.items():
            if key.step == step:
                slot.to("cpu")

    def value(
        self, step: int, branch: str, name: str, block: Optional[int], per_block: bool
    ) -> Optional[torch.Tensor]:
        """One step's map: of ``block``, or with ``per_block`` and no block the mean over blocks."""
        if block is not None or not per_block:
            slot = self._maps.get(MapKey(step, branch, name, block))
            return None if slot is None else slot.mean()
        parts = [
            s.mean()
            for k, s in sorted(self._maps.items(), key=lambda i: i[0].order())
            if (k.step, k.branch, k.name) == (step, branch, name)
        ]
        parts = [p for p in parts if p.shape == parts[0].shape]  # blocks of another shape have no common mean
        return torch.stack(parts).mean(0) if parts else None

    def step_maps(self, step: int, row: int, per_block: bool) -> dict[str, torch.Tensor]:
        """The maps of one step for one batch row, named as the store expects (``uncond/`` before the
        name of the other branch, ``/block<b>`` after it); a map no call of the row reached (a word
        of another row's prompt) is not the row's."""
        out: dict[str, torch.Tensor] = {}
        for key in self.keys(step):
            if row >= self._maps[key].count.shape[0] or not bool(self._maps[key].count[row] > 0):
                continue
            prefix = "" if key.branch == "cond" else f"{key.branch}/"
            value = self.value(step, key.branch, key.name, key.block, per_block)
            if value is None:
                continue
            suffix = "" if key.block is None else f"/block{key.block}"
            out[prefix + key.name + suffix] = value[row].contiguous()
            if key.block is not None and prefix + key.name not in out:
                mean = self.value(step, key.branch, key.name, None, per_block)
                if mean is not None:
                    out[prefix + key.name] = mean[row].contiguous()
        return out
