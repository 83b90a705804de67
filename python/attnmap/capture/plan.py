"""Plans: one attention call, placed once into everything its reduction needs.

:func:`plan_call` turns an intercepted call, the forward it belongs to (:class:`Forward`) and what the
capture asks for (:class:`Options`) into a :class:`CallPlan`: the layout the reducer works on, the
token order, the key-padding mask, the reductions that apply, and the call's batch rows in groups
that are read alike (:class:`RowGroup`): one CFG branch, one text span (where the row's prompt sits
among the keys, how many of its tokens are real) and one set of target words. The
:class:`~attnmap.capture.calls.CallReader` executes a plan without coming back here.

Each model batch row is a :class:`ModelRow`: its branch, its place among the branch's rows and its
text (:class:`RowText`: the prompt it holds, its real length, its target words), so rows that differ
(the positive and the negative prompt under guidance, a batch of prompts, padded text) are each read
over their own tokens. A call of
a context-parallel rank (:mod:`attnmap.capture.parallel`) is placed as the whole call it is a shard of
(its :class:`~attnmap.capture.parallel.Shard`, or its rows found at the rank's chunk of the video) and
read at its rows. Private to :mod:`attnmap.capture`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

import attnmap.capture.layouts as layouts
from attnmap.capture.interception import Intercepted, Site, unreadable
from attnmap.capture.layouts import FamilySpec, Placement, Unplaced, VideoInputs
from attnmap.capture.parallel import Shard, Split
from attnmap.layout import SUPPORTED, Layout

#: reductions that read only the video query rows (exact under a mask that varies over the others)
VIDEO_ROWS = frozenset({"cross", "temporal", "distance"})
#: the map-name prefix of cross-attention to each kind of context (text has none)
GROUP = {"text": "", "image": "image/", "audio": "audio/", "context": "context/"}

Rows = Union[slice, list[int]]
Words = tuple[tuple[str, tuple[int, ...]], ...]  # (word, token indices), hashable


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


@dataclass(frozen=True)
class RowText:
    """One model batch row's prompt as the denoiser sees it: the clean prompt (None: unknown), its real
    (unpadded) text tokens (None: every text key is real) and its target words' token indices."""

    prompt: Optional[str] = None
    real: Optional[int] = None
    targets: Words = ()


@dataclass(frozen=True)
class ModelRow:
    """One model batch row of a forward: its CFG branch, its row among that branch's ``of`` rows."""

    index: int
    branch: str
    out: int
    of: int
    text: RowText = RowText()


@dataclass
class Forward:
    """What the watched model's current forward says: its inputs, its kept batch rows, its family."""

    inputs: VideoInputs = field(default_factory=VideoInputs)
    rows: list[ModelRow] = field(default_factory=lambda: [ModelRow(0, "cond", 0, 1)])
    spec: FamilySpec = layouts.GENERIC
    split: Optional[Split] = None  # the model's context-parallel split (its calls see local chunks)

    @property
    def targets(self) -> bool:
        """Some row has target words (then the text maps are those words, not the whole ``cross``)."""
        return any(r.text.targets for r in self.rows)


@dataclass(frozen=True)
class Span:
    """Where one row's prompt sits among a call's keys: ``length`` text keys from ``start``, the first
    ``real`` of them its real tokens (the rest padding)."""

    start: int
    length: int
    real: int


@dataclass(frozen=True)
class RowGroup:
    """Rows of one call read alike.

    ``rows``: their positions among the call's reduced rows (one per selected model row); ``out``
    their rows in the branch's accumulator of ``of`` rows; ``span`` the text they hold (None: no
    text among the keys, or keys of another context); ``targets`` the target words, token indices
    relative to the span; ``width``: the widest real text of the branch in this forward, to which
    their ``cross`` and ``text`` maps are padded (with NaN: not a token of the row).
    """

    branch: str
    rows: Rows
    out: Rows
    of: int
    span: Optional[Span] = None
    targets: Words = ()
    width: Optional[int] = None


@dataclass(frozen=True)
class CallPlan:
    """One call placed: reduce ``q[select]``, ``k[select]`` (tokens put in ``order``, keys masked by
    ``mask``) over ``layout`` for ``reductions``, then name and hand over the maps of each group.

    ``group`` prefixes the map names (``image/`` ...); ``kind`` names the layout in the metadata;
    ``fold`` marks divided attention over the model's ``grid`` (the call's rows are (row, frame) or
    (row, position)); ``text_groups``: whether the cross map may be reduced into target columns.
    """

    layout: Layout
    group: str
    kind: str
    reductions: tuple[str, ...]
    select: Any
    groups: tuple[RowGroup, ...]
    order: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    fold: Optional[str] = None
    grid: Optional[layouts.Grid] = None
    text_groups: bool = False
    shard: Optional[Shard] = None  # a context-parallel rank's rows and heads of the whole call
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Skip:
    """A call that is not read: ``warn`` it (once per module and reason; ``anywhere``: once per
    capture, a reason that is the same for every module), or pass it over quietly."""

    reason: str
    warn: bool = True
    anywhere: bool = False


def _misfit(lay: Layout, nq: int, nk: int) -> str:
    return (
        f"layout {lay} expects {lay.num_queries} queries and {lay.num_keys} keys, the call has {nq} and {nk}"
    )


def _as_rows(rows: list[int]) -> Rows:
    if rows and rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return rows


def _place(
    site: Site, call: Intercepted, b: int, nq: int, nk: int, forward: Forward, options: Options
) -> Union[Placement, Unplaced]:
    named = options.layouts.get(site.name)
    if named is not None:
        if layouts.fits(named, nq, nk):
            return Placement(named, text_len=named.text or None)
        return Unplaced(_misfit(named, nq, nk))
    if options.layout is not None and layouts.fits(options.layout, nq, nk):
        return Placement(options.layout, text_len=options.layout.text or None)
    found = layouts.place(site, call.index, b, nq, nk, forward.inputs, forward.spec, call.context)
    if isinstance(found, Unplaced) and options.layout is not None:
        return Unplaced(_misfit(options.layout, nq, nk), warn=found.warn or forward.inputs.grid is None)
    return found


def group_of(site: Site, place: Placement) -> str:
    """The name prefix of a cross call's maps: none for text, ``image/`` or ``audio/`` for those
    contexts, the module's name without list indices (``face_adapter/``) for keys of another kind."""
    if place.layout.kind != "cross":
        return ""
    if place.context != "context":
        return GROUP[place.context]
    parts = [p for p in site.name.split(".") if not p.isdigit()]
    return "/".join(parts[-1:] or ["context"]) + "/"


def _reductions(
    place: Placement, options: Options, vary: bool, notes: dict[str, set[str]], site: Site
) -> Union[list[str], str]:
    """The reductions that apply to a placed call (a reason string where the mask forbids some)."""
    lay = place.layout
    wanted = []
    for r in options.reductions:
        if lay.supports(r, block_size=options.block_size):
            wanted.append(r)
        elif r in SUPPORTED[lay.kind]:  # blocks as video cubes on a call without video keys
            notes.setdefault(f"{r} with video cubes {tuple(options.block_size)} (no video keys)", set()).add(
                site.name
            )
    if vary:
        dropped = [r for r in wanted if r not in VIDEO_ROWS]
        if dropped:
            return f"its mask varies over the non-video query rows, so {dropped} are not read"
    if place.fold == "space" and lay.kind == "self":
        wanted = [r for r in wanted if r != "temporal"]  # one frame: nothing to compare
    return wanted


def _model_rows(forward: Forward, place: Placement, b: int) -> list[tuple[int, ModelRow]]:
    """``(position among the call's rows before folding, model row)`` of each kept row in the call."""
    if forward.inputs.batch is None:  # no grid from the inputs: the call's rows are the rows
        return [
            (i, ModelRow(i, "cond", i, b, forward.rows[0].text if forward.rows else RowText()))
            for i in range(b)
        ]
    if place.row is not None:
        return [(0, r) for r in forward.rows if r.index == place.row]
    return [(r.index, r) for r in forward.rows]


def _span(place: Placement, position: int, row: ModelRow) -> Optional[Span]:
    """Where a call row's prompt sits among its keys (None for keys that are not text)."""
    lay = place.layout
    if place.context != "text" or lay.text == 0:
        return None
    starts = place.text_start
    start = starts[position] if len(starts) > position and place.row is None else starts[0]
    length = min(place.text_len or lay.text, lay.text - start)
    real = length if row.text.real is None else max(0, min(row.text.real, length))
    return Span(start, length, real)


def _widths(rows: Sequence[ModelRow], span: Optional[Span], *, trimmed: bool) -> dict[str, int]:
    """Per branch, the widest real text among the forward's rows (``span``: the call's text, whose
    length caps a row's real tokens unless each row's call holds its own trimmed text)."""
    if span is None:
        return {}
    out: dict[str, int] = {}
    for r in rows:
        real = span.length if r.text.real is None else r.text.real
        real = real if trimmed else min(real, span.length)
        out[r.branch] = max(out.get(r.branch, 0), real)
    return out


def _local_shard(call: Intercepted, forward: Forward, h: int, nq: int, nk: int) -> Union[Shard, str, None]:
    """Where a call a context-parallel rank makes outside diffusers' templated attention sits in the
    whole call: its chunk of the video rows against keys it was given whole from the module's context
    (Wan's cross-attention: the local video rows, the whole text), or a whole call of the video every
    rank makes alike (kept by rank 0 alone). None: no split; a reason where the rows cannot be placed
    (local rows against local keys, or a sequence attnmap does not know to be whole or chunked): such a
    call read as whole would be a part of its maps, or counted once per rank."""
    split, grid = forward.split, forward.inputs.grid
    if split is None:
        return None
    if grid is None:
        return "a call on a context-parallel rank outside a forward whose video grid attnmap read"
    whole = grid[0] * grid[1] * grid[2]
    given = call.context is not None and 0 <= nk <= call.context  # keys from the module's context
    shard = split.local(nq, h, whole) if given or nq == nk == whole else None
    if shard is None:
        return (
            f"a call of {nq} queries against {nk} keys on context-parallel rank {split.rank} of {split.world} "
            "made outside diffusers' templated attention: attnmap cannot tell where its rows sit in the whole "
            "sequence, nor that another rank does not hold the same call (it is not read)"
        )
    return shard


def _unshardable(place: Placement) -> Optional[str]:
    """Why a context-parallel rank's shard of a call cannot be read at its rows, None if it can: the
    sequence diffusers splits is the video (self-attention) or the video against a context."""
    lay = place.layout
    if lay.kind not in ("self", "cross") or lay.prefix or place.fold or place.row is not None:
        return (
            f"a context-parallel shard of a {lay.kind} call (prefix {lay.prefix}) is not read: the order "
            "of its gathered tokens in the whole sequence is not known"
        )
    if place.roll or place.tiles:
        return "a context-parallel shard of a call whose tokens are reordered is not read"
    return None


def plan_call(
    site: Site, call: Intercepted, forward: Forward, options: Options, notes: dict[str, set[str]]
) -> Union[CallPlan, Skip]:
    """Place one call (see the module docstring); ``notes`` collects reductions that do not apply to
    a kind of call (reason -> module names), for one note when the capture closes."""
    if call.refused is not None:
        return Skip(call.refused, anywhere=True)
    q, k = call.query, call.key
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() != 4 or k.dim() != 4:
        return Skip("query/key are not [B, H, N, D] tensors")
    if call.is_causal:
        return Skip("causal attention is not supported")
    if call.softcap is not None:
        return Skip("its scores are soft-capped (softcap), which attention_sums does not reproduce")
    if unreadable(call.attn_mask):
        return Skip(f"its mask ({call.entry}) is not a tensor attnmap can read")
    b, h, nq, _ = (int(s) for s in q.shape)
    nk = int(k.shape[2])
    if call.shard is not None and forward.split is None:
        return Skip(
            "a context-parallel rank's shard of a call in a model whose split attnmap did not find (its "
            "parallel config is not on the watched model): the ranks' maps could not be added up",
            anywhere=True,
        )
    shard = call.shard if call.shard is not None else _local_shard(call, forward, h, nq, nk)
    if isinstance(shard, str):
        return Skip(shard)
    place = _place(site, call, b, nq if shard is None else shard.queries, nk, forward, options)
    if isinstance(place, Unplaced):
        return Skip(place.reason, place.warn)
    lay = place.layout
    if shard is not None:
        reason = _unshardable(place)
        if reason is not None:
            return Skip(reason)
    mask: Optional[torch.Tensor] = None
    vary = False
    if call.attn_mask is not None:
        video = lay.video_q if shard is None else slice(0, nq)  # a shard's rows: all video (no prefix)
        kp = layouts.key_padding(call.attn_mask, b, h, nk, video)
        if isinstance(kp, str):
            return Skip(kp)
        mask, vary = kp
    wanted = _reductions(place, options, vary, notes, site)
    if isinstance(wanted, str):
        return Skip(wanted)
    if not wanted:
        return Skip("no requested reduction applies", warn=False)
    members = _model_rows(forward, place, b)
    if not members:
        return Skip("no kept batch row", warn=False)
    fold = 1
    if place.fold is not None and place.grid is not None:
        f, gh, gw = place.grid
        fold = f if place.fold == "space" else gh * gw
    positions = [p for p, _ in members]
    lo, hi = positions[0], positions[-1] + 1
    if place.row is not None:
        select: Any = slice(None)
    elif hi - lo == len(positions):
        full = (lo, hi * fold) == (0, b)
        select = slice(None) if full else slice(lo * fold, hi * fold)
    else:
        select, lo = slice(None), 0
    group = group_of(site, place)
    spans = [_span(place, p, r) for p, r in members]
    widths = _widths(forward.rows, spans[0], trimmed=place.row is not None)
    buckets: dict[tuple[Any, ...], tuple[list[int], list[int], ModelRow, Optional[Span]]] = {}
    warnings: list[str] = []
    for (position, row), span in zip(members, spans):
        targets: Words = ()
        if span is not None and not group:
            targets = tuple((w, i) for w, i in row.text.targets if max(i) < span.length)
            warnings += [
                f"target {w!r} has token index {max(i)} >= {span.length} text tokens"
                for w, i in row.text.targets
                if max(i) >= span.length
            ]
        key = (row.branch, span, targets)
        found = buckets.setdefault(key, ([], [], row, span))
        found[0].append(0 if place.row is not None else position - lo)
        found[1].append(row.out)
    groups = tuple(
        RowGroup(
            branch=row.branch,
            rows=_as_rows(rows),
            out=_as_rows(out),
            of=row.of,
            span=span,
            targets=key[2],
            width=widths.get(row.branch) if span is not None else None,
        )
        for key, (rows, out, row, span) in buckets.items()
    )
    order = layouts.token_order(place, nq, q.device)
    if order is not None and mask is not None:  # a self or joint call: queries and keys are the same tokens
        mask = mask[..., order]
    return CallPlan(
        layout=lay,
        group=group,
        kind=group + (place.fold or lay.kind),
        reductions=tuple(wanted),
        select=select,
        groups=groups,
        order=order,
        mask=None if mask is None else mask[select],
        fold=place.fold,
        grid=place.grid or lay.grid,
        text_groups=not group and place.fold is None and all(g.span is not None for g in groups),
        shard=shard,
        warnings=tuple(dict.fromkeys(warnings)),
    )
