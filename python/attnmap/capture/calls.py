"""Reading one intercepted call: execute its plan, reduce it, and name the maps of each row group.

A :class:`CallReader` turns each call that an :class:`~attnmap.capture.interception.Interceptor`
emits into named maps (``token/<word>``, ``padding``, ``cross``, ``temporal``, ``<name>/text`` ...):
:func:`~attnmap.capture.plan.plan_call` places it once (layout, token order, mask, reductions, and
the call's rows in groups read alike), then the reader runs :func:`attnmap.attention_sums` on the same
q and k the model used and hands each group's maps to its ``add`` callback. Each row's text maps are
taken over its own prompt: its target words and its real tokens (the ``cross`` and ``text`` columns
past them are NaN, never silent zeros). Private to :mod:`attnmap.capture`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from attnmap import reduce
from attnmap.capture.interception import Intercepted, Site
from attnmap.capture.parallel import widen
from attnmap.capture.plan import CallPlan, Forward, ModelRow, Options, RowGroup, Rows, Skip, plan_call

Add = Callable[[Site, str, dict[str, torch.Tensor], Rows, int], None]  # site, branch, maps, rows, batch
Warn = Callable[[Optional[Site], str], None]  # None: a reason the same for every module

__all__ = ["CallReader", "Forward", "Options"]


def _pad(t: torch.Tensor, width: Optional[int], dims: int) -> torch.Tensor:
    """``t`` with its last ``dims`` dims padded with NaN up to ``width`` (not tokens of the row)."""
    if width is None:
        return t
    pad: list[int] = []
    for size in list(t.shape[::-1])[:dims]:
        pad += [0, max(0, width - size)]
    return torch.nn.functional.pad(t, pad, value=float("nan")) if any(pad) else t


def _columns(group: RowGroup) -> tuple[list[list[int]], list[str]]:
    """A group's target words and padded tail as ``attention_sums``'s ``text_groups``, and the map
    each column becomes."""
    span = group.span
    assert span is not None
    cols: list[list[int]] = []
    names: list[str] = []
    for word, indices in group.targets:
        cols.append([span.start + i for i in indices])
        names.append(f"token/{word}")
    if span.real < span.length:
        cols.append(list(range(span.start + span.real, span.start + span.length)))
        names.append("padding")
    return cols, names


class CallReader:
    """Reduces the calls of one capture into named maps (see the module docstring)."""

    def __init__(self, options: Options, *, warn: Warn, add: Add) -> None:
        self.options, self.warn, self.add = options, warn, add
        self.forward = Forward()
        self.layouts: dict[str, dict[str, Any]] = {}  # map group + kind -> the layout's dict, as first seen
        self.nonfinite: dict[str, torch.Tensor] = {}  # module name -> a NaN flag on its device, this step
        self.notes: dict[str, set[str]] = {}  # reductions that did not apply -> module names
        self._indices: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}

    def read(self, site: Site, call: Intercepted) -> None:
        """Reduce one call of ``site`` and hand its maps to ``add``; a call that fits nothing is
        skipped with one warning per module and reason."""
        plan = plan_call(site, call, self.forward, self.options, self.notes)
        if isinstance(plan, Skip):
            if plan.warn:
                self.warn(None if plan.anywhere else site, plan.reason)
            return
        for reason in plan.warnings:
            self.warn(site, reason)
        done, bad = self.run(plan, call)
        seen = self.nonfinite.get(site.name)
        self.nonfinite[site.name] = bad if seen is None else seen | bad
        for group, maps in done:
            self.add(site, group.branch, maps, group.out, group.of)

    def run(
        self, plan: CallPlan, call: Intercepted
    ) -> tuple[list[tuple[RowGroup, dict[str, torch.Tensor]]], torch.Tensor]:
        """Execute a plan: the maps of each of its row groups, and whether any got NaN (on the device)."""
        self.layouts.setdefault(plan.kind, plan.layout.to_dict())
        q, k = call.query.detach()[plan.select], call.key.detach()[plan.select]
        if plan.order is not None:  # a self or joint call: queries and keys are the same tokens
            q, k = q[:, :, plan.order], k[:, :, plan.order]
        cpu = q.device.type == "cpu"
        lse = None  # the rows' logsumexp from the attention itself (one pass), in the plan's token order
        if call.lse is not None:
            lse = (call.lse if plan.order is None else call.lse[:, :, plan.order])[plan.select]
        columns = plan.text_groups and cpu and "cross" in plan.reductions and not self.options.keep_cross
        columns = columns and self.forward.targets
        done: list[tuple[RowGroup, dict[str, torch.Tensor]]] = []
        flags: list[torch.Tensor] = []
        with torch.no_grad():
            if columns:  # each group reduces into its own target columns instead of every text key
                for group in plan.groups:
                    cols, names = _columns(group)
                    wanted = plan.reductions if cols else tuple(r for r in plan.reductions if r != "cross")
                    if not wanted:
                        continue
                    rows = group.rows
                    out = self._reduce(plan, call, q[rows], k[rows], rows, lse, wanted, cols or None)
                    cross = out.pop("cross", None)
                    maps = {}
                    if cross is not None:
                        maps = {n: cross[..., i].unflatten(-1, plan.layout.grid) for i, n in enumerate(names)}
                    flags += [t.isnan().any() for t in (*out.values(), *maps.values())]
                    maps.update(self._named(plan, group, out))
                    done.append((group, maps))
            else:
                out = self._reduce(plan, call, q, k, slice(None), lse, plan.reductions, None)
                flags += [t.isnan().any() for t in out.values()]
                out = self._unfold(plan, out)
                for group in plan.groups:
                    done.append((group, self._named(plan, group, {n: t[group.rows] for n, t in out.items()})))
            bad = torch.stack(flags).any() if flags else torch.zeros((), dtype=torch.bool, device=q.device)
        return done, bad

    def _reduce(
        self,
        plan: CallPlan,
        call: Intercepted,
        q: torch.Tensor,
        k: torch.Tensor,
        rows: Rows,
        lse: Optional[torch.Tensor],
        reductions: tuple[str, ...],
        text_groups: Optional[list[list[int]]],
    ) -> dict[str, torch.Tensor]:
        cubes = self.options.block_size is not None and "blocks" in reductions
        extra: dict[str, Any] = {"block_size": self.options.block_size} if cubes else {}
        if plan.shard is not None:  # a context-parallel rank's rows of the whole call
            extra["rows"] = (plan.shard.rows[0], plan.shard.rows[0] + int(q.shape[2]))
        out = reduce.attention_sums(
            q,
            k,
            plan.layout,
            reductions,
            per_head=self.options.per_head,
            scale=call.scale,
            key_padding_mask=None if plan.mask is None else plan.mask[rows],
            lse=None if lse is None else lse[rows],
            backend=self.options.backend,
            check_finite=False,  # no device sync per call: NaN is flagged on the device instead
            text_groups=text_groups,
            **extra,
        )
        return out if plan.shard is None else widen(out, plan.shard, self.options.per_head)

    def _unfold(self, plan: CallPlan, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Divided attention's outputs per model row: space ``[B, F, ...]``, time ``[B, HW, ...]``;
        a space call's cross map becomes one over the whole grid."""
        if plan.fold is None or plan.grid is None:
            return out
        f, h, w = plan.grid
        per = f if plan.fold == "space" else h * w
        done: dict[str, torch.Tensor] = {}
        for name, t in out.items():
            t = t.unflatten(0, (-1, per))  # [B, F or HW, (H,) ...]
            if plan.fold == "space" and name == "cross":
                if self.options.per_head:
                    t = t.transpose(1, 2)  # [B, H, F, HW, Nt]
                done[name] = t.flatten(-3, -2)  # [B, (H,) F*HW, Nt]
            elif plan.fold == "time" and name == "temporal":
                done[name] = t.mean(1)  # mean over the positions: [B, (H,) F, F]
            else:
                done[f"{name}/{plan.fold}"] = t.transpose(1, 2) if self.options.per_head else t
        return done

    def _named(
        self, plan: CallPlan, group: RowGroup, out: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """One group's outputs under their map names (token maps and padding from the cross map)."""
        lay, span, prefix = plan.layout, group.span, plan.group
        maps: dict[str, torch.Tensor] = {}
        for name, value in out.items():
            if name == "text" and lay.kind == "joint" and span is not None:
                s = span.start
                maps[name] = _pad(value[..., s : s + span.real, s : s + span.real], group.width, 2)
            elif name == "cross" and span is not None and not prefix:
                maps.update(self._text_maps(plan, group, value))
            elif name == "cross" and prefix:
                maps[f"{prefix}cross"] = value
            elif lay.kind == "cross":  # over the call's keys: kept apart from self-attention's
                maps[f"{prefix}{name}" if prefix else f"{name}/text"] = value
            else:
                maps[name] = value
        return maps

    def _text_maps(self, plan: CallPlan, group: RowGroup, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """Token maps, padding and the cross map from a cross map ``[r, (H,) Nv, Nk]`` over the group's
        own text."""
        span, grid = group.span, plan.grid
        assert span is not None
        text = value[..., span.start : span.start + span.length]
        maps: dict[str, torch.Tensor] = {}
        if span.real < span.length:
            maps["padding"] = text[..., span.real :].sum(-1).unflatten(-1, grid)
        for word, indices in group.targets:
            maps[f"token/{word}"] = text[..., self._index(indices, text.device)].sum(-1).unflatten(-1, grid)
        if self.options.keep_cross or not self.forward.targets:
            maps["cross"] = _pad(text[..., : span.real], group.width, 1)
        return maps

    def _index(self, indices: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Token indices as a tensor on ``device``, made once (indexing with a list would copy it to
        the device on every call)."""
        found = self._indices.get((indices, device))
        if found is None:
            found = self._indices[(indices, device)] = torch.tensor(indices, device=device)
        return found

    def read_probs(self, site: Site, probs: torch.Tensor) -> None:
        """TimeSformer: attention probabilities ``[B*F, heads, 1+HW, 1+HW]`` (space) or
        ``[B*HW, heads, F, F]`` (time), from its eager softmax."""
        if probs.dim() != 4:
            return
        site.seen += 1
        grid, batch = self.forward.inputs.grid, self.forward.inputs.batch
        if grid is None or batch is None:
            self.warn(site, "the model's forward inputs gave no video grid")
            return
        f, hw = grid[0], grid[1] * grid[2]
        n = probs.shape[-1]
        expect = (batch * f, 1 + hw) if site.role == "space" else (batch * hw, f)
        if (probs.shape[0], n) != expect:
            self.warn(site, f"{site.role} attention of shape {tuple(probs.shape)} does not fit grid {grid}")
            return
        with torch.no_grad():
            p = probs.detach().float()
            p = p if self.options.per_head else p.mean(dim=1, keepdim=True)
            p = p.unflatten(0, (batch, -1))  # [B, F or HW, h, n, n]
            p = p.transpose(1, 2) if self.options.per_head else p.squeeze(2)
            out = {f"full/{site.role}": p}
            if site.role == "time" and "temporal" in self.options.reductions:
                out["temporal"] = p.mean(dim=-3)
            self.layouts.setdefault(site.role, {"kind": site.role, "grid": list(grid), "prefix": 1})
            branches: dict[str, list[ModelRow]] = {}
            for row in self.forward.rows:
                branches.setdefault(row.branch, []).append(row)
            for branch, rows in branches.items():
                index = [r.index for r in rows]
                self.add(
                    site, branch, {k: v[index] for k, v in out.items()}, [r.out for r in rows], rows[0].of
                )
