"""The materialising oracle, ``attnmap.attention_sums(..., backend="reference")``: plain float64
torch, P held whole.

Same contract as the other backends (the same validated call, float32 outputs), but it builds P = softmax(scale * q k^T + mask) as one float64 ``[B, H, Nq, Nk]`` tensor with
``torch.softmax`` and slices it, each reduction written the plain way (``distance`` from every
pair's offset, ``entropy`` as ``-sum P ln P``). It is what every backend is tested against; use it
on small inputs only. :func:`partial` does the same for the partial sums of a shard of the keys.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from attnmap.reduce.contract import AttentionCall, block_grid, group_columns, group_text
from attnmap.reduce.partial import PartialCall

F64 = torch.float64


def probabilities(call: AttentionCall) -> torch.Tensor:
    """The whole P ``[B, H, Nq, Nk]`` in float64 (rows whose keys are all masked are zero; so are the
    rows a query shard does not hold)."""
    h, hk = call.heads, call.kv_heads
    q = call.q.to(F64)
    k = call.k.to(F64).repeat_interleave(h // hk, dim=1)
    logits = (q @ k.transpose(-1, -2)) * call.scale
    if call.bias is not None:
        logits = logits + call.bias[:, :, None, :].to(F64)
    if call.key_range is not None:
        logits = logits.masked_fill(~call.key_range.allowed(slice(None))[:, None], -math.inf)
    if call.lse is not None:
        lse = call.lse.to(F64)
        lse[torch.isneginf(lse)] = math.inf
        p = torch.exp(logits - lse[..., None])
    else:
        dead = torch.isneginf(logits).all(dim=-1, keepdim=True)
        p = torch.softmax(logits, dim=-1)
        p = torch.where(dead, torch.zeros_like(p), p)
    if call.shard is None:
        return p
    whole = p.new_zeros(*p.shape[:2], call.num_queries, p.shape[3])
    whole[:, :, call.rows[0] : call.rows[1]] = p
    return whole


def serves(call: AttentionCall) -> Optional[str]:
    """Every call (on small inputs: P is held whole)."""
    return None


def run(call: AttentionCall) -> dict[str, torch.Tensor]:
    """The contract's outputs of a validated call, from the materialised P."""
    return group_text(call, sums_of(call))


def _offsets(grid: tuple[int, int, int]) -> torch.Tensor:
    """``[Nv, Nv]``: the ``distance`` bin ``(|dt| * H + |dy|) * W + |dx|`` of each video pair."""
    f, h, w = grid
    t, y, x = (
        c.reshape(-1)
        for c in torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij")
    )
    dt, dy, dx = ((c[:, None] - c[None, :]).abs() for c in (t, y, x))
    return (dt * h + dy) * w + dx


def _blocks(call: AttentionCall, p: torch.Tensor) -> torch.Tensor:
    """Mean over each block's query rows of P summed over the block's keys, block by block."""
    grid = block_grid(call)
    query, key = torch.tensor(grid.query), torch.tensor(grid.key)
    out = p.new_zeros(*p.shape[:2], grid.rows, grid.cols)
    for r in range(grid.rows):
        rows = p[:, :, query == r]
        for c in range(grid.cols):
            out[:, :, r, c] = rows[..., key == c].sum(dim=-1).mean(dim=-1)
    return out


def sums_of(call: AttentionCall) -> dict[str, torch.Tensor]:
    """Every requested reduction of a validated call, from the materialised P."""
    p = probabilities(call).cpu()
    lay = call.layout
    b, h = call.batch, call.heads
    out: dict[str, torch.Tensor] = {}
    for name in call.reductions:
        if name == "cross":
            r = p[:, :, lay.video_q, lay.text_k]
        elif name == "text":
            r = p[:, :, lay.text_q, lay.text_k]
        elif name == "temporal":
            f, hw = lay.frames, lay.frame_tokens
            r = p[:, :, lay.video_q, lay.video_k].reshape(b, h, f, hw, f, hw).sum(dim=-1).mean(dim=3)
        elif name == "received":
            r = p.mean(dim=2)
        elif name == "probe":
            assert call.probe is not None
            r = p[:, :, call.probe.cpu()]
        elif name == "blocks":
            r = _blocks(call, p)
        elif name == "distance":
            pairs = p[:, :, lay.video_q, lay.video_k].reshape(b, h, -1)
            bins = _offsets(lay.grid).reshape(-1)
            r = pairs.new_zeros(b, h, lay.num_video).index_add_(-1, bins, pairs) / lay.num_video
            r = r.unflatten(-1, lay.grid)
        elif name == "entropy":
            r = -torch.special.xlogy(p, p).sum(dim=-1)
        else:  # full
            r = p
        r = r if call.per_head else r.mean(dim=1)
        out[name] = r.to(device=call.q.device, dtype=torch.float32).contiguous()
    return out


def partial(call: PartialCall) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The per-row sums of a shard of the keys (see :mod:`attnmap.reduce.partial`), from P over the
    shard materialised in float64: each row's logsumexp over the shard's keys, P = exp(logit - lse)
    (zero for a row whose shard keys are all masked), and its columns summed key by key."""
    lay, wanted = call.layout, set(call.reductions)
    h, hk = call.heads, int(call.k.shape[1])
    k0, k1 = call.keys
    logits = (
        call.q.to(F64) @ call.k.to(F64).repeat_interleave(h // hk, dim=1).transpose(-1, -2)
    ) * call.scale
    if call.bias is not None:
        logits = logits + call.bias[:, :, None, :].to(F64)
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.exp(logits - torch.where(torch.isneginf(lse), math.inf, lse)[..., None]).cpu()
    position = torch.arange(k0, k1)  # each shard key's position in the layout
    sums: dict[str, torch.Tensor] = {}

    def columns(rows: slice, column: torch.Tensor, count: int) -> torch.Tensor:
        """P of ``rows`` summed into ``count`` columns (``column[j]`` of key j, -1: none)."""
        keep = column >= 0
        out = p.new_zeros(*p.shape[:2], rows.stop - rows.start, count)
        return out.index_add_(-1, column[keep], p[:, :, rows][..., keep])

    text_col = torch.full_like(position, -1)
    if lay.text_k is not None:
        tk = lay.text_k
        inside = (position >= tk.start) & (position < tk.stop)
        text_col[inside] = position[inside] - tk.start
    if "cross" in wanted:
        cross = columns(call.row_span("cross"), text_col, lay.text)
        sums["cross"] = cross if call.text_groups is None else group_columns(cross, call.text_groups)
    if "text" in wanted:
        sums["text"] = columns(call.row_span("text"), text_col, lay.text)
    if "temporal" in wanted:
        vk = lay.video_k
        assert vk is not None
        frame = torch.full_like(position, -1)
        inside = (position >= vk.start) & (position < vk.stop)
        frame[inside] = (position[inside] - vk.start) // lay.frame_tokens
        sums["temporal"] = columns(call.row_span("temporal"), frame, lay.frames)
    if "full" in wanted:
        sums["full"] = columns(call.row_span("full"), position, lay.num_keys)
    if "entropy" in wanted:
        sums["entropy"] = -torch.special.xlogy(p, p).sum(dim=-1)
    dev = call.q.device
    return (
        {name: t.to(device=dev, dtype=torch.float32) for name, t in sums.items()},
        lse.to(device=dev, dtype=torch.float32),
    )


def serves_partial(call: PartialCall) -> Optional[str]:
    """Every call's partial sums (on small inputs: the shard's P is held whole)."""
    return None
