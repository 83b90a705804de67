"""The ``triton`` backend: an ``attention_sums`` call as launches of the fused kernel.

The kernel (:mod:`attnmap.reduce.kernels.attn_reduce`) is imported on the first call, so that
``TRITON_INTERPRET=1`` (the kernel on CPU tensors) can still be set before it. ``probe`` is the same
kernel on the gathered probe rows, with every key stored densely.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

from attnmap.reduce.contract import AttentionCall, block_grid, finish, group_columns, group_text, place_rows
from attnmap.reduce.partial import PartialCall


def serves(call: AttentionCall) -> Optional[str]:
    """None for CUDA tensors with Triton installed (or CPU tensors under ``TRITON_INTERPRET=1``)."""
    if not call.q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            f"the Triton kernel needs CUDA tensors (q is on {call.q.device}); set TRITON_INTERPRET=1 before "
            "the first call to run it on the CPU"
        )
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install attnmap[triton])"
    if call.key_range is not None:
        return "per-row key ranges (key_range) are reduced by the blocks backend"
    if int(call.q.shape[3]) > 256:
        return f"the Triton kernel takes head dims up to 256, q has {int(call.q.shape[3])}"
    return None


def run(call: AttentionCall, **tiles: Optional[int]) -> dict[str, torch.Tensor]:
    """The contract's outputs of a validated call; ``tiles`` (``block_m``, ``block_n``,
    ``head_groups``) go to the launcher."""
    return group_text(call, finish(call, sums(call, **tiles)))


def sums(call: AttentionCall, **tiles: Optional[int]) -> dict[str, torch.Tensor]:
    """Raw sums (see :func:`attnmap.reduce.contract.finish`) from the kernel."""
    from attnmap.reduce.kernels.attn_reduce import attn_reduce

    lay, wanted = call.layout, set(call.reductions)
    nk = call.num_keys
    row_lo, row_hi = call.row_range()  # layout positions; the kernel indexes q's rows from ``off``
    off = call.rows[0]
    if call.all_pairs:
        keys = (0, nk)
    else:
        spans = []
        if wanted & {"cross", "text"} and lay.text_k is not None:
            spans.append(lay.text_k)
        if wanted & {"temporal", "distance", "blocks"} and lay.video_k is not None:  # blocks: cubes
            spans.append(lay.video_k)
        keys = (min(s.start for s in spans), max(s.stop for s in spans)) if spans else (0, 0)
    if "full" in wanted:
        dense = (0, nk)
    elif wanted & {"cross", "text"} and lay.text_k is not None:
        dense = (lay.text_k.start, lay.text_k.stop)
    else:
        dense = (0, 0)
    temporal = distance = blocks = None
    vq_lo = lay.video_q.start - off  # q's row of the first video query (< 0 when a shard starts past it)
    if "temporal" in wanted and lay.video_k is not None:
        temporal = (vq_lo, lay.video_k.start, lay.num_video, lay.frame_tokens, lay.frames)
    if "distance" in wanted and lay.video_k is not None:
        distance = (vq_lo, lay.video_k.start, *lay.grid)
    if "blocks" in wanted:
        grid = block_grid(call)
        query = grid.query[off : call.rows[1]]  # q's rows' blocks
        ids = tuple(torch.tensor(a, device=call.q.device) for a in (query, grid.key))
        blocks = (ids[0], ids[1], grid.rows, grid.cols)
    common: dict[str, Any] = {"scale": call.scale, "bias": call.bias, "per_head": call.per_head, **tiles}
    out: dict[str, torch.Tensor] = {}
    if wanted - {"probe"}:
        found = attn_reduce(
            call.q,
            call.k,
            rows=(row_lo - off, row_hi - off),
            keys=keys,
            dense=dense,
            received="received" in wanted,
            temporal=temporal,
            entropy="entropy" in wanted,
            blocks=blocks,
            distance=distance,
            lse=call.lse,
            **common,
        )
        c_lo = dense[0]
        every = slice(0, call.num_queries)
        if "cross" in wanted:
            tk = lay.text_k
            assert tk is not None
            out["cross"] = place_rows(
                found["dense"][..., tk.start - c_lo : tk.stop - c_lo], row_lo, lay.video_q
            )
        if "text" in wanted:
            tq, tk = lay.text_q, lay.text_k
            assert tq is not None and tk is not None
            out["text"] = place_rows(found["dense"][..., tk.start - c_lo : tk.stop - c_lo], row_lo, tq)
        if "full" in wanted:
            out["full"] = place_rows(found["dense"], row_lo, every)
        if "entropy" in wanted:  # [B, Hs, q's rows]
            out["entropy"] = place_rows(found["entropy"], off, every)
        for name in ("received", "temporal", "blocks", "distance"):
            if name in wanted:
                out[name] = found[name]
    if "probe" in wanted:
        assert call.probe is not None
        rows = call.q[:, :, call.probe]
        lse = None if call.lse is None else call.lse[:, :, call.probe]
        out["probe"] = attn_reduce(
            rows, call.k, rows=(0, int(rows.shape[2])), keys=(0, nk), dense=(0, nk), lse=lse, **common
        )["dense"]
    return {name: t.contiguous() for name, t in out.items()}


def serves_partial(call: PartialCall) -> Optional[str]:
    """None where the kernel forms the call's partial sums (its dense rows and entropy), else why not."""
    if not call.q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the Triton kernel needs CUDA tensors (q is on {call.q.device})"
    if "temporal" in call.reductions:
        return "the Triton kernel keeps no per-row frame sums; temporal partial sums run on the CPU"
    if int(call.q.shape[3]) > 256:
        return f"the Triton kernel takes head dims up to 256, q has {int(call.q.shape[3])}"
    return None


def partial(call: PartialCall) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The per-row sums of a shard of the keys (``cross``, ``text``, ``full``, ``entropy``; see
    :mod:`attnmap.reduce.partial`) from one launch: the shard's P stored densely per head over the
    columns asked for, each row's entropy and logsumexp over the shard."""
    from attnmap.reduce.kernels.attn_reduce import attn_reduce

    lay, wanted = call.layout, set(call.reductions)
    k0, k1 = call.keys
    nk, rows = k1 - k0, int(call.q.shape[2])
    tk = lay.text_k
    text_lo = text_hi = 0  # the shard's text keys, as the shard's columns
    if tk is not None:
        text_lo, text_hi = min(max(tk.start, k0), k1) - k0, max(min(tk.stop, k1), k0) - k0
    if "full" in wanted:
        dense = (0, nk)
    elif wanted & {"cross", "text"}:
        dense = (text_lo, text_hi)
    else:
        dense = (0, 0)
    found = attn_reduce(
        call.q,
        call.k,
        scale=call.scale,
        rows=(0, rows),
        keys=(0, nk),
        dense=dense,
        entropy="entropy" in wanted,
        bias=call.bias,
        per_head=True,
        return_lse=True,
    )
    b, h, dev = int(call.q.shape[0]), call.heads, call.q.device
    sums: dict[str, torch.Tensor] = {}
    for name in ("cross", "text"):
        if name in wanted:
            assert tk is not None
            span = call.row_span(name)
            out = torch.zeros(b, h, span.stop - span.start, lay.text, dtype=torch.float32, device=dev)
            if text_hi > text_lo:
                got = found["dense"][:, :, span, text_lo - dense[0] : text_hi - dense[0]]
                out[..., text_lo + k0 - tk.start : text_hi + k0 - tk.start] = got
            if name == "cross" and call.text_groups is not None:
                out = group_columns(out, call.text_groups)
            sums[name] = out
    if "full" in wanted:
        full = torch.zeros(b, h, rows, lay.num_keys, dtype=torch.float32, device=dev)
        full[..., k0:k1] = found["dense"]
        sums["full"] = full
    if "entropy" in wanted:
        sums["entropy"] = found["entropy"]
    return sums, found["lse"]
