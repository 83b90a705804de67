"""Reading one intercepted call: its placement, mask and rows, the reduction, and the maps it makes.

A :class:`CallReader` turns each call that an :class:`~attnmap.capture.interception.Interceptor`
emits into named maps (``token/<word>``, ``padding``, ``cross``, ``temporal``, ``<name>/text`` ...)
for the rows of each CFG branch, through :func:`attnmap.attention_sums` on the same q and k the model
used, and hands them to its ``add`` callback. What the current forward says (grid, batch, branch
rows, family) is its :class:`Forward`; what the capture asks for is its :class:`Options`. Private
to :mod:`attnmap.capture`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch

from attnmap import reduce
from attnmap.capture import layouts
from attnmap.capture.accumulate import Rows
from attnmap.capture.interception import Intercepted, Site, unreadable
from attnmap.capture.layouts import FamilySpec, Placement, Unplaced, VideoInputs
from attnmap.layout import Layout

#: reductions that read only the video query rows (exact under a mask that varies over the others)
_VIDEO_ROWS = frozenset({"cross", "temporal", "distance"})
_GROUP = {"text": "", "image": "image/", "audio": "audio/", "context": "context/"}

Add = Callable[[Site, str, dict[str, torch.Tensor], Rows, int], None]  # site, branch, maps, rows, batch
Warn = Callable[[Site, str], None]


@dataclass(frozen=True)
class Options:
    """What a capture asks of each call."""

    reductions: tuple[str, ...]
    per_head: bool = False
    keep_cross: bool = False
    backend: str = "auto"
    block_size: Any = None  # forwarded to attention_sums only when given
    layouts: Mapping[str, Layout] = field(default_factory=dict)  # module name -> explicit layout
    layout: Optional[Layout] = None  # one explicit layout, for the calls it fits


@dataclass
class Forward:
    """What the watched model's current forward says: its inputs, the model rows of each kept CFG
    branch, its family."""

    inputs: VideoInputs = field(default_factory=VideoInputs)
    rows: list[tuple[str, list[int]]] = field(default_factory=lambda: [("cond", [0])])
    spec: FamilySpec = layouts.GENERIC


def _as_slice(rows: list[int]) -> Rows:
    if rows and rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return rows


def _misfit(lay: Layout, nq: int, nk: int) -> str:
    return (
        f"layout {lay} expects {lay.num_queries} queries and {lay.num_keys} keys, the call has {nq} and {nk}"
    )


class CallReader:
    """Reduces the calls of one capture into named maps (see the module docstring)."""

    def __init__(self, options: Options, *, warn: Warn, add: Add) -> None:
        self.options, self.warn, self.add = options, warn, add
        self.forward = Forward()
        self.layouts: dict[str, dict[str, Any]] = {}  # map group + kind -> the layout's dict, as first seen
        self.nonfinite: dict[str, torch.Tensor] = {}  # module name -> a NaN flag on its device, this step
        self._targets: dict[str, list[int]] = {}
        self._target_indices: dict[torch.device, list[tuple[str, int, torch.Tensor]]] = {}

    @property
    def targets(self) -> dict[str, list[int]]:
        return self._targets

    @targets.setter
    def targets(self, targets: dict[str, list[int]]) -> None:
        self._targets = targets
        self._target_indices.clear()

    def _place(self, site: Site, call: Intercepted, b: int, nq: int, nk: int) -> Union[Placement, Unplaced]:
        named = self.options.layouts.get(site.name)
        if named is not None:
            if layouts.fits(named, nq, nk):
                return Placement(named, text_len=named.text or None)
            return Unplaced(_misfit(named, nq, nk))
        if self.options.layout is not None and layouts.fits(self.options.layout, nq, nk):
            return Placement(self.options.layout, text_len=self.options.layout.text or None)
        found = layouts.place(site, call.index, b, nq, nk, self.forward.inputs, self.forward.spec)
        if isinstance(found, Unplaced) and self.options.layout is not None:
            return Unplaced(
                _misfit(self.options.layout, nq, nk), warn=found.warn or self.forward.inputs.grid is None
            )
        return found

    def read(self, site: Site, call: Intercepted) -> None:
        """Reduce one call of ``site`` and hand its maps to ``add``; a call that fits nothing is
        skipped with one warning per module and reason."""
        q, k = call.query, call.key
        if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() != 4 or k.dim() != 4:
            self.warn(site, "query/key are not [B, H, N, D] tensors")
            return
        if call.is_causal:
            self.warn(site, "causal attention is not supported")
            return
        if unreadable(call.attn_mask):
            self.warn(site, f"its mask ({call.entry}) is not a tensor attnmap can read")
            return
        b, h, nq, _ = (int(s) for s in q.shape)
        nk = int(k.shape[2])
        place = self._place(site, call, b, nq, nk)
        if isinstance(place, Unplaced):
            if place.warn:
                self.warn(site, place.reason)
            return
        rows = self._call_rows(place, b)
        if rows is None:
            return
        lay = place.layout
        mask: Optional[torch.Tensor] = None
        vary = False
        if call.attn_mask is not None:
            kp = layouts.key_padding(call.attn_mask, b, h, nk, lay.video_q)
            if isinstance(kp, str):
                self.warn(site, kp)
                return
            mask, vary = kp
        wanted = [r for r in self.options.reductions if lay.supports(r)]
        if vary:
            dropped = [r for r in wanted if r not in _VIDEO_ROWS]
            if dropped:
                self.warn(site, f"its mask varies over the non-video query rows, so {dropped} are not read")
            wanted = [r for r in wanted if r in _VIDEO_ROWS]
        if place.fold == "space" and lay.kind == "self":
            wanted = [r for r in wanted if r != "temporal"]  # one frame: nothing to compare
        if not wanted:
            return
        group = self._group(site, place)
        self.layouts.setdefault(group + (place.fold or lay.kind), lay.to_dict())
        order = layouts.token_order(place, nq, q.device)
        if order is not None:  # a self or joint call: queries and keys are the same tokens
            q, k = q[:, :, order], k[:, :, order]
            mask = None if mask is None else mask[..., order]
        sel, branches = rows
        cpu = q.device.type == "cpu"
        groups = self._text_groups(site, place, group) if cpu and "cross" in wanted else None
        extra: dict[str, Any] = (
            {} if self.options.block_size is None else {"block_size": self.options.block_size}
        )
        with torch.no_grad():
            out = reduce.attention_sums(
                q.detach()[sel],
                k.detach()[sel],
                lay,
                tuple(wanted),
                per_head=self.options.per_head,
                scale=call.scale,
                key_padding_mask=None if mask is None else mask[sel],
                # on the CPU the native kernel forms each row's softmax itself, whatever the reductions
                lse=None if call.lse is None or cpu or order is not None else call.lse[sel],
                backend=self.options.backend,
                check_finite=False,  # no device sync per call: NaN is flagged on the device instead
                text_groups=None if groups is None else groups[0],
                **extra,
            )
            named: dict[str, torch.Tensor] = {}
            if groups is not None:  # the cross map arrives as one column per kept map
                cross = out.pop("cross")
                for col, name in enumerate(groups[1]):
                    named[name] = cross[..., col].unflatten(-1, lay.grid)
            out = self._unfold(place, out)
            bad = torch.stack([t.isnan().any() for t in (*out.values(), *named.values())]).any()
            seen = self.nonfinite.get(site.name)
            self.nonfinite[site.name] = bad if seen is None else seen | bad
            for branch, (out_rows, acc_rows, batch) in branches.items():
                maps = {n: t[out_rows] for n, t in named.items()}
                maps.update(
                    self._named_maps(
                        site, place, group, {n: t[out_rows] for n, t in out.items()}, acc_rows, branch
                    )
                )
                self.add(site, branch, maps, acc_rows, batch)

    @staticmethod
    def _group(site: Site, place: Placement) -> str:
        """The name prefix of a cross call's maps: none for text, ``image/`` or ``audio/`` for those
        contexts, the module's name without list indices (``face_adapter/``) for keys of another kind."""
        if place.layout.kind != "cross":
            return ""
        if place.context != "context":
            return _GROUP[place.context]
        parts = [p for p in site.name.split(".") if not p.isdigit()]
        return "/".join(parts[-1:] or ["context"]) + "/"

    def _call_rows(self, place: Placement, b: int) -> Optional[tuple[Any, dict[str, tuple[Rows, Rows, int]]]]:
        """The call rows to reduce (a slice) and, per kept branch, (output rows, accumulator rows,
        branch batch); None when no kept branch has a row in the call."""
        batch = self.forward.inputs.batch or (b if place.fold is None else None)
        if batch is None:
            return None
        fold = 1
        if place.fold is not None and place.grid is not None:
            f, h, w = place.grid
            fold = f if place.fold == "space" else h * w
        kept = (
            sorted(r for _, rows in self.forward.rows for r in rows)
            if self.forward.inputs.batch
            else list(range(b))
        )
        if place.row is not None:
            kept = [place.row] if place.row in kept else []
        if not kept:
            return None
        lo, hi = kept[0], kept[-1] + 1
        if place.row is not None:
            sel: Any = slice(None)
        elif hi - lo == len(kept):
            sel = slice(lo * fold, hi * fold) if (lo, hi) != (0, batch) else slice(None)
        else:
            sel, lo = slice(None), 0
        out: dict[str, tuple[Rows, Rows, int]] = {}
        for branch, rows in self.forward.rows if self.forward.inputs.batch else [("cond", list(range(b)))]:
            mine = [r for r in rows if r in kept]
            if not mine:
                continue
            out_rows = [0] if place.row is not None else [r - lo for r in mine]
            out[branch] = (_as_slice(out_rows), _as_slice([r - rows[0] for r in mine]), len(rows))
        return (sel, out) if out else None

    def _unfold(self, place: Placement, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Divided attention's outputs per model row: space ``[B, F, ...]``, time ``[B, HW, ...]``;
        a space call's cross map becomes one over the whole grid."""
        if place.fold is None or place.grid is None:
            return out
        f, h, w = place.grid
        per = f if place.fold == "space" else h * w
        done: dict[str, torch.Tensor] = {}
        for name, t in out.items():
            t = t.unflatten(0, (-1, per))  # [B, F or HW, (H,) ...]
            if place.fold == "space" and name == "cross":
                if self.options.per_head:
                    t = t.transpose(1, 2)  # [B, H, F, HW, Nt]
                done[name] = t.flatten(-3, -2)  # [B, (H,) F*HW, Nt]
            elif place.fold == "time" and name == "temporal":
                done[name] = t.mean(1)  # mean over the positions: [B, (H,) F, F]
            else:
                done[f"{name}/{place.fold}"] = t.transpose(1, 2) if self.options.per_head else t
        return done

    def _real_text(self, rows: Rows, place: Placement) -> Optional[int]:
        """The real (unpadded) text length of these accumulator rows, if the inputs tell it."""
        real = self.forward.inputs.text_real
        if real is None:
            return None
        lens = (
            [real[place.row]]
            if place.row is not None
            else real[rows]
            if isinstance(rows, slice)
            else [real[r] for r in rows]
        )
        return max(lens) if lens else None

    def _text_groups(
        self, site: Site, place: Placement, group: str
    ) -> Optional[tuple[list[list[int]], list[str]]]:
        """With targets and no full cross map to keep: each target's text keys and the padded tail as
        ``attention_sums``'s ``text_groups``, and the map each column becomes, so that the call
        reduces into those few columns instead of every text key. None: reduce the full map."""
        if (
            self.options.keep_cross
            or not self._targets
            or group
            or place.fold
            or len(set(place.text_start)) != 1
        ):
            return None
        lay = place.layout
        start, length = place.text_start[0], place.text_len or lay.text
        groups: list[list[int]] = []
        names: list[str] = []
        for word, indices in self._targets.items():
            if max(indices) >= length or start + max(indices) >= lay.text:
                self.warn(site, f"target {word!r} has token index {max(indices)} >= {length} text tokens")
                continue
            groups.append([start + i for i in indices])
            names.append(f"token/{word}")
        if lay.kind == "cross" and place.row is None:
            reals = {self._real_text(rows, place) for _, rows in self.forward.rows}
            if len(reals) != 1:
                return None  # branches with different text lengths: each finds its padding below
            real = reals.pop()
            if real is not None and 0 < real < length:
                groups.append(list(range(start + real, start + length)))
                names.append("padding")
        return (groups, names) if groups else None

    def _target_index(self, device: torch.device) -> list[tuple[str, int, torch.Tensor]]:
        """``(word, its largest token index, its token indices on device)`` per target, made once per
        device (indexing with a list would copy it to the device on every call)."""
        found = self._target_indices.get(device)
        if found is None:
            found = [(w, max(i), torch.tensor(i, device=device)) for w, i in self._targets.items()]
            self._target_indices[device] = found
        return found

    def _named_maps(
        self, site: Site, place: Placement, group: str, out: dict[str, torch.Tensor], rows: Rows, branch: str
    ) -> dict[str, torch.Tensor]:
        """One call's outputs under their map names (token maps and padding from the cross map)."""
        lay = place.layout
        grid = place.grid or lay.grid
        maps: dict[str, torch.Tensor] = {}
        for name, value in out.items():
            if (
                name == "text"
                and lay.kind == "joint"
                and place.text_len is not None
                and len(set(place.text_start)) == 1
            ):
                s = place.text_start[0]
                maps[name] = value[..., s : s + place.text_len, s : s + place.text_len]
                continue
            if name != "cross":
                if lay.kind == "cross":  # over the call's keys: kept apart from self-attention's
                    maps[f"{group}{name}" if group else f"{name}/text"] = value
                else:
                    maps[name] = value
                continue
            if group:
                maps[f"{group}cross"] = value
                continue
            maps.update(self._text_maps(site, place, value, rows, grid))
        return maps

    def _text_maps(
        self, site: Site, place: Placement, value: torch.Tensor, rows: Rows, grid: tuple[int, int, int]
    ) -> dict[str, torch.Tensor]:
        """Token maps, padding and the kept cross map from a cross map ``[r, (H,) Nv, Nk]``."""
        lay = place.layout
        length = min(place.text_len or value.shape[-1], value.shape[-1])
        starts = (
            place.text_start
            if len(place.text_start) == value.shape[0]
            else place.text_start[:1] * value.shape[0]
        )
        uniform = len(set(starts)) == 1
        maps: dict[str, torch.Tensor] = {}

        def segment(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
            if uniform:
                return t[..., starts[0] + lo : starts[0] + hi]
            return torch.stack([t[i, ..., s + lo : s + hi] for i, s in enumerate(starts)])

        real = self._real_text(rows, place) if lay.kind == "cross" else None
        if real is not None and 0 < real < length:
            maps["padding"] = segment(value, real, length).sum(-1).unflatten(-1, grid)
        for word, last, idx in self._target_index(value.device):
            if last >= length:
                self.warn(site, f"target {word!r} has token index {last} >= {length} text tokens")
                continue
            cols = segment(value, 0, length)
            maps[f"token/{word}"] = cols[..., idx].sum(-1).unflatten(-1, grid)
        if self.options.keep_cross or not self._targets:
            maps["cross"] = segment(value, 0, real if real is not None and 0 < real < length else length)
        return maps

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
            for branch, rows in self.forward.rows:
                self.add(
                    site,
                    branch,
                    {k: v[rows[0] : rows[-1] + 1] for k, v in out.items()},
                    slice(None),
                    len(rows),
                )
