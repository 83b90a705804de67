"""The ``native`` backend: every reduction of CPU tensors in the Rust kernels, one pass over the keys.

Both kernels form each query row's P with an online softmax (one q k^T product and one exp per key;
no block of P in memory beyond a task's rows):

- :func:`attnmap._native.attention_groups` sums it into key columns, one per text key (or per atom
  of text groups) and one per frame: ``cross``, ``temporal`` and ``text`` alone take this path,
  memory O(rows x columns);
- :func:`attnmap._native.attention_stats` keeps each task's rows of P whole (up to 60 rows x Nk)
  and folds them into everything else: ``received`` (column sums), ``blocks`` and ``temporal`` (sums
  over pairs of query and key blocks), ``distance``, ``entropy`` (from the row's sums in the same
  pass), and the dense rows of ``cross``, ``text``, ``full`` and ``probe``.

With the rows' logsumexp given (``lse``, e.g. from :func:`attnmap.reduce.sdpa_with_lse`), both take
P = exp(logit - lse) as it stands: no running max, no rescaling, no row sums.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Union

import numpy as np
import torch

from attnmap.layout import Layout
from attnmap.reduce.contract import (
    AttentionCall,
    BlockGrid,
    block_grid,
    finish,
    frame_grid,
    frame_sums,
    group_columns,
    group_text,
    place_rows,
)
from attnmap.reduce.partial import PartialCall

#: The reductions the grouped kernel forms alone (its columns: text keys and frames).
GROUPED = frozenset({"cross", "temporal", "text"})


def serves(call: AttentionCall) -> Optional[str]:
    """None when the kernels can reduce the call, else the reason they cannot."""
    if call.q.device.type != "cpu":
        return f"q is on {call.q.device}, the native kernel runs on the CPU"
    vq = call.layout.video_q
    if "distance" in call.reductions and not call.rows[0] <= vq.start <= vq.stop <= call.rows[1]:
        return "distance needs every video query row in q (the kernel reads the grid from the first one)"
    if call.key_range is not None:
        return "per-row key ranges (key_range) are reduced by the blocks backend"
    return None


def run(call: AttentionCall) -> dict[str, torch.Tensor]:
    """The contract's outputs of a validated call that :func:`serves` accepts."""
    if not set(call.reductions) <= GROUPED:
        return group_text(call, finish(call, stats_sums(call)))
    if call.text_groups is not None and "text" in call.reductions:  # text needs every key
        return group_text(call, finish(call, sums(call, grouped=False)))
    return finish(call, sums(call))  # the groups formed in the kernel


@functools.lru_cache(maxsize=16)
def _key_columns(
    lay: Layout, text: bool, frames: bool, groups: Optional[tuple[tuple[int, ...], ...]]
) -> tuple[np.ndarray, int, Optional[torch.Tensor]]:
    """Each key's column for :func:`attnmap._native.attention_groups` (-1: none), the number of text
    columns, and the 0/1 matrix ``[text columns, groups]`` that turns them into text groups.

    Text keys get a column each (with ``text``), or, with ``groups``, one column per *atom*: the keys
    that belong to the same set of groups, so that overlapping groups still give each key one
    column. Video keys of frame ``f`` get column ``f`` after the text columns (with ``frames``).
    """
    cols = np.full(lay.num_keys, -1, dtype=np.int64)
    ntext, merge = 0, None
    if text and lay.text_k is not None:
        if groups is None:
            cols[lay.text_k] = np.arange(lay.text)
            ntext = lay.text
        else:
            member = np.zeros((lay.text, len(groups)), dtype=bool)
            for g, keys in enumerate(groups):
                member[list(keys), g] = True
            atoms, inverse = np.unique(member, axis=0, return_inverse=True)
            atom_of = np.asarray(inverse).reshape(-1)
            used = np.asarray(atoms.any(axis=1))  # the atom of keys in no group is no column
            ids = np.cumsum(used) - 1
            cols[lay.text_k] = np.where(used[atom_of], ids[atom_of], -1)
            ntext = int(used.sum())
            merge = torch.from_numpy(atoms[used].astype(np.float32))  # cached: never mutate
    if frames and lay.video_k is not None:
        cols[lay.video_k] = ntext + np.arange(lay.num_video) // lay.frame_tokens
    cols.flags.writeable = False
    return cols, ntext, merge


def _cpu_array(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).numpy()


def _lse_rows(call: AttentionCall, rows: Union[slice, torch.Tensor]) -> Optional[np.ndarray]:
    """The caller's logsumexp of q's rows ``rows`` (``[B, H, R]``), or None."""
    return None if call.lse is None else np.ascontiguousarray(_cpu_array(call.lse[:, :, rows]))


def sums(call: AttentionCall, grouped: bool = True) -> dict[str, torch.Tensor]:
    """``cross``, ``temporal`` and ``text`` as raw sums (see :func:`finish`) from the Rust kernel:
    each row's P summed into one column per text key and one per frame, in one pass over the keys
    with an online softmax (a q k^T product and an exp per key; no block of P in memory)."""
    from attnmap import _native

    lay, wanted = call.layout, set(call.reductions)
    text, frames = bool(wanted & {"cross", "text"}), "temporal" in wanted
    cols, t, merge = _key_columns(lay, text, frames, call.text_groups if grouped else None)
    lo, hi = call.row_range()
    out = _native.attention_groups(
        _cpu_array(call.q[:, :, call.local(lo, hi)]),
        _cpu_array(call.k),
        cols,
        t + (lay.frames if frames else 0),
        scale=call.scale,
        bias=None if call.bias is None else _cpu_array(call.bias),
        per_head=call.per_head,
        lse=_lse_rows(call, call.local(lo, hi)),
    )
    rows = torch.from_numpy(out)  # [B, Hs, hi - lo, C]
    sums: dict[str, torch.Tensor] = {}
    if "cross" in wanted:
        video = place_rows(rows[..., :t], lo, lay.video_q)
        sums["cross"] = video.contiguous() if merge is None else video @ merge
    if frames:
        sums["temporal"] = frame_sums(rows[..., t:], lo, lay)
    if "text" in wanted and lay.text_q is not None:
        assert merge is None
        sums["text"] = place_rows(rows[..., :t], lo, lay.text_q).contiguous()
    return sums


def _blocks_of(grid: BlockGrid, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """A block grid as the kernel takes it, for the query rows ``lo..hi``."""
    return np.ascontiguousarray(grid.query[lo:hi]), grid.key, grid.rows, grid.cols


def stats_sums(call: AttentionCall) -> dict[str, torch.Tensor]:
    """Every requested reduction as raw sums (see :func:`finish`) from
    :func:`attnmap._native.attention_stats`, one pass over the keys for the rows that need it
    (and one more for the ``probe`` rows)."""
    from attnmap import _native

    lay, wanted = call.layout, set(call.reductions)
    nk = call.num_keys
    bias = None if call.bias is None else _cpu_array(call.bias)
    common: dict[str, Any] = {"scale": call.scale, "bias": bias, "per_head": call.per_head}
    sums: dict[str, torch.Tensor] = {}
    k = _cpu_array(call.k)
    if "probe" in wanted:
        assert call.probe is not None
        probes = _cpu_array(call.q[:, :, call.probe])
        lse = _lse_rows(call, call.probe)
        probe = _native.attention_stats(probes, k, dense=(0, nk), lse=lse, **common)
        sums["probe"] = torch.from_numpy(probe["dense"])
    if not wanted - {"probe"}:
        return sums
    lo, hi = call.row_range()
    tk = lay.text_k
    if "full" in wanted:
        dense: Optional[tuple[int, int]] = (0, nk)
    elif wanted & {"cross", "text"} and tk is not None:
        dense = (tk.start, tk.stop)
    else:
        dense = None
    blocks = []
    if "temporal" in wanted:
        blocks.append(_blocks_of(frame_grid(lay), lo, hi))
    if "blocks" in wanted:
        blocks.append(_blocks_of(block_grid(call), lo, hi))
    vk = lay.video_k
    distance = None
    if "distance" in wanted and vk is not None:
        distance = (lay.video_q.start - lo, vk.start, *lay.grid)
    out = _native.attention_stats(
        _cpu_array(call.q[:, :, call.local(lo, hi)]),
        k,
        dense=dense,
        received="received" in wanted,
        entropy="entropy" in wanted,
        blocks=blocks or None,
        distance=distance,
        lse=_lse_rows(call, call.local(lo, hi)),
        **common,
    )
    every = slice(0, call.num_queries)
    if dense is not None:
        rows = torch.from_numpy(out["dense"])
        vq, tq = lay.video_q, lay.text_q
        if "full" in wanted:
            sums["full"] = place_rows(rows, lo, every)
        if "cross" in wanted and tk is not None:
            sums["cross"] = place_rows(rows[..., tk.start - dense[0] : tk.stop - dense[0]], lo, vq)
        if "text" in wanted and tk is not None and tq is not None:
            sums["text"] = place_rows(rows[..., tk.start - dense[0] : tk.stop - dense[0]], lo, tq)
    found = iter(out.get("blocks", []))
    for name in ("temporal", "blocks"):
        if name in wanted:
            sums[name] = torch.from_numpy(next(found))
    for name in ("received", "distance"):
        if name in out:
            sums[name] = torch.from_numpy(out[name])
    if "entropy" in out:
        sums["entropy"] = place_rows(torch.from_numpy(out["entropy"]), lo, every)
    return {name: t.contiguous() for name, t in sums.items()}


def partial(call: PartialCall) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The per-row sums of a shard of the keys, per head, normalised over the shard, and each row's
    logsumexp over it (see :mod:`attnmap.reduce.partial`): the grouped kernel for ``cross``,
    ``temporal`` and ``text``, the statistics kernel for ``full`` and ``entropy``."""
    from attnmap import _native

    lay, wanted = call.layout, set(call.reductions)
    k0, k1 = call.keys
    q, k = _cpu_array(call.q), _cpu_array(call.k)
    common: dict[str, Any] = {
        "scale": call.scale,
        "bias": None if call.bias is None else _cpu_array(call.bias),
        "per_head": True,
    }
    sums: dict[str, torch.Tensor] = {}
    lse: Optional[np.ndarray] = None
    if wanted & GROUPED:
        text, frames = bool(wanted & {"cross", "text"}), "temporal" in wanted
        groups = call.text_groups if "text" not in wanted else None  # text needs every text key
        cols, t, merge = _key_columns(lay, text, frames, groups)
        num = t + (lay.frames if frames else 0)
        out, lse = _native.attention_groups(
            q, k, np.ascontiguousarray(cols[k0:k1]), num, return_lse=True, **common
        )
        rows = torch.from_numpy(out)  # [B, H, R, C]
        if "cross" in wanted:
            cross = rows[:, :, call.row_span("cross"), :t]
            if merge is not None:  # the kernel's columns are atoms of the groups
                cross = cross @ merge
            elif call.text_groups is not None:  # every text key's column (text wants them)
                cross = group_columns(cross, call.text_groups)
            sums["cross"] = cross.contiguous()
        if frames:
            sums["temporal"] = rows[:, :, call.row_span("temporal"), t:].contiguous()
        if "text" in wanted:
            sums["text"] = rows[:, :, call.row_span("text"), :t].contiguous()
    if wanted & {"full", "entropy"}:
        found = _native.attention_stats(
            q,
            k,
            dense=(0, k1 - k0) if "full" in wanted else None,
            entropy="entropy" in wanted,
            return_lse=lse is None,
            **common,
        )
        if "full" in wanted:
            dense = torch.from_numpy(found["dense"])
            full = dense.new_zeros(*dense.shape[:3], lay.num_keys)
            full[..., k0:k1] = dense
            sums["full"] = full
        if "entropy" in wanted:
            sums["entropy"] = torch.from_numpy(found["entropy"])
        if lse is None:
            lse = found["lse"]
    assert lse is not None
    return sums, torch.from_numpy(lse)


def serves_partial(call: PartialCall) -> Optional[str]:
    """None when the kernels form the call's partial sums (CPU tensors), else why not."""
    if call.q.device.type != "cpu":
        return f"q is on {call.q.device}, the native kernel runs on the CPU"
    return None
