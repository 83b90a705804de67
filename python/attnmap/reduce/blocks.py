"""The ``blocks`` backend: P formed in blocks of query rows with torch, on any device.

Each block holds ``[B, H, rows, Nk]`` fp32 logits (at most ``BLOCK_ENTRIES`` of them), all heads at
once: one batched matmul per key head, then ``torch.softmax``; the block is reduced into the running
sums and dropped. Extra memory is O(rows per block x Nk), never O(Nq x Nk). It serves every
reduction, honours a caller's ``lse`` and per-row key ranges (``key_range``), and is what ``auto``
falls back to where no faster backend serves a call.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from attnmap.reduce.contract import AttentionCall, block_grid, finish, group_text

#: Entries of the fp32 logit block worked on at a time (B * H * rows * Nk).
BLOCK_ENTRIES = 2**22


def serves(call: AttentionCall) -> Optional[str]:
    """Every call: None (no reason to refuse)."""
    return None


def run(call: AttentionCall, *, block_rows: Optional[int] = None) -> dict[str, torch.Tensor]:
    """The contract's outputs of a validated call.

    Args:
        call: from :func:`attnmap.reduce.contract.prepare_call`.
        block_rows: query rows per block (default: as many as ``BLOCK_ENTRIES`` allow).
    """
    return group_text(call, finish(call, sums(call, block_rows=block_rows)))


def keys_t(call: AttentionCall) -> torch.Tensor:
    """``k`` in fp32 as ``[B * Hk, D, Nk]`` (a transposed view; one copy at most, for the dtype or strides)."""
    b, hk, nk, d = call.k.shape
    return call.k.to(torch.float32).reshape(b * hk, nk, d).transpose(1, 2)


def key_window(call: AttentionCall, rows: Union[slice, torch.Tensor]) -> tuple[int, int]:
    """The keys ``[k0, k1)`` (in the call's key order) that some of ``rows`` may attend under its
    ``key_range``: every key without one. A causal block of rows in sequence order attends about
    half the keys; the rest of its row are zeros, never computed."""
    if call.key_range is None:
        return 0, call.num_keys
    some = call.key_range.allowed(rows).any(dim=1).any(dim=0).nonzero()
    return (int(some[0]), int(some[-1]) + 1) if some.numel() else (0, 0)


def block_probs(
    call: AttentionCall,
    rows: Union[slice, torch.Tensor],
    kt: torch.Tensor,
    window: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """P for some query rows, every head at once: ``[B, H, R, Nk]`` fp32 (``[B, H, R, k1 - k0]``:
    the keys of ``window`` only, every other key of these rows masked).

    One batched matmul per k head with the scale (and the bias) fused in, then ``torch.softmax``,
    which walks each row in cache: about 1.6x faster on the CPU than separate max, exp, sum and
    divide passes over the block.

    Args:
        call: the validated call.
        rows: a slice of the layout's query positions (within the rows q holds) or a LongTensor of q's rows.
        kt: :func:`keys_t` of the call, ``[B * Hk, D, Nk]``.
        window: keys ``(k0, k1)`` that hold every key these rows may attend (:func:`key_window`).
    """
    b, h, hk, d = call.batch, call.heads, call.kv_heads, int(call.q.shape[3])
    if isinstance(rows, slice):
        rows = call.local(rows.start, rows.stop)
    k0, k1 = window or (0, call.num_keys)
    kt, nk = kt[..., k0:k1], k1 - k0
    qb = call.q[:, :, rows].to(torch.float32)
    r = int(qb.shape[2])
    # heads h = j * g + i share k head j (repeat_interleave order): one batched matmul per k head
    q3 = qb.reshape(b * hk, (h // hk) * r, d)
    if call.bias is None:
        s = torch.baddbmm(q3.new_zeros(()), q3, kt, beta=0, alpha=call.scale).view(b, h, r, nk)
    else:
        s = torch.bmm(q3, kt).view(b, h, r, nk)
        torch.add(call.bias[:, :, None, k0:k1], s, alpha=call.scale, out=s)
    allowed = None
    if call.key_range is not None:
        allowed = call.key_range.allowed(rows)[..., k0:k1]
        s.masked_fill_(~allowed[:, None], -math.inf)
    if call.lse is not None:
        shift = call.lse[:, :, rows]
        # a row whose lse is -inf (every key masked) has no mass: shift by +inf
        shift = torch.where(torch.isneginf(shift), torch.full_like(shift, math.inf), shift)
        return s.sub_(shift[..., None]).exp_()
    p = torch.softmax(s, dim=-1)  # subtracts the row max: huge logits stay exact
    if allowed is not None:  # a row no key is left to: zero (a NaN row stays NaN)
        keep = allowed[:, None]
        if call.bias is not None:
            keep = keep & ~torch.isneginf(call.bias[:, :, None, k0:k1])
        p.masked_fill_(~keep.any(dim=-1, keepdim=True), 0.0)
    elif call.bias is not None:
        # q and k finite: a row is all -inf exactly when its bias is; zero there (softmax gives NaN).
        # A NaN row (NaN in q or k with check_finite=False) stays NaN, never a silent zero
        dead = torch.isneginf(call.bias).all(dim=-1)
        p.masked_fill_(dead[:, :, None, None], 0.0)
    return p


def _head_sum(call: AttentionCall, p: torch.Tensor) -> torch.Tensor:
    return p if call.per_head else p.sum(dim=1, keepdim=True)


def probe_rows(call: AttentionCall, kt: torch.Tensor) -> torch.Tensor:
    """The ``probe`` rows summed over heads (or per head): ``[B, Hs, Q, Nk]`` fp32."""
    assert call.probe is not None
    step = max(1, BLOCK_ENTRIES // max(1, call.batch * call.heads * call.num_keys))
    parts = []
    for i in range(0, len(call.probe), step):
        rows = call.probe[i : i + step]
        k0, k1 = key_window(call, rows)
        part = _head_sum(call, block_probs(call, rows, kt, (k0, k1)))
        parts.append(torch.nn.functional.pad(part, (k0, call.num_keys - k1)))
    return torch.cat(parts, dim=2)


def _folds(n: int, device: torch.device) -> torch.Tensor:
    """``[n, n, n]``: ``M[c, k, d] = 1`` where ``|c - k| = d``, which folds an axis of keys into the
    distances from a query at coordinate ``c``."""
    c, k, d = torch.meshgrid(*(torch.arange(n, device=device),) * 3, indexing="ij")
    return ((c - k).abs() == d).to(torch.float32)


class _Distance:
    """``distance`` of blocks of video rows: each row's P over the video keys, folded axis by axis
    (frames, rows, columns) into the distances from the row's own position."""

    def __init__(self, call: AttentionCall) -> None:
        dev = call.q.device
        self.grid = call.layout.grid
        _, h, w = self.grid
        pos = torch.arange(call.layout.num_video, device=dev)
        self.coords = (pos // (h * w), pos // w % h, pos % w)
        self.folds = tuple(_folds(n, dev) for n in self.grid)

    def __call__(self, p: torch.Tensor, rows: slice) -> torch.Tensor:
        """P ``[B, Hs, R, Nv]`` of the video rows ``rows`` -> their sum ``[B, Hs, F, H, W]``."""
        ft, fy, fx = (fold[c[rows]] for fold, c in zip(self.folds, self.coords))
        return torch.einsum("bsrfhw,rfa,rhc,rwe->bsace", p.unflatten(-1, self.grid), ft, fy, fx)


def sums(call: AttentionCall, block_rows: Optional[int] = None) -> dict[str, torch.Tensor]:
    lay = call.layout
    b, hs, nq, nk = call.batch, call.out_heads, call.num_queries, call.num_keys
    dev, f32 = call.q.device, torch.float32
    wanted = set(call.reductions)
    kt = keys_t(call)
    sums: dict[str, torch.Tensor] = {}
    vq, vk, tq, tk = lay.video_q, lay.video_k, lay.text_q, lay.text_k
    if "cross" in wanted:
        sums["cross"] = torch.zeros(b, hs, lay.num_video, lay.text, dtype=f32, device=dev)
    if "text" in wanted:
        sums["text"] = torch.zeros(b, hs, lay.text, lay.text, dtype=f32, device=dev)
    if "temporal" in wanted:
        sums["temporal"] = torch.zeros(b, hs, lay.frames, lay.frames, dtype=f32, device=dev)
    if "received" in wanted:
        sums["received"] = torch.zeros(b, hs, nk, dtype=f32, device=dev)
    if "full" in wanted:
        sums["full"] = torch.zeros(b, hs, nq, nk, dtype=f32, device=dev)
    if "probe" in wanted:
        sums["probe"] = probe_rows(call, kt)
    if "entropy" in wanted:
        sums["entropy"] = torch.zeros(b, hs, nq, dtype=f32, device=dev)
    if "distance" in wanted:
        sums["distance"] = torch.zeros(b, hs, *lay.grid, dtype=f32, device=dev)
        distance = _Distance(call)
    if "blocks" in wanted:
        grid = block_grid(call)
        sums["blocks"] = torch.zeros(b, hs, grid.rows, grid.cols, dtype=f32, device=dev)
        block_q, block_k = (torch.tensor(a, device=dev) for a in (grid.query, grid.key))
        keyed = torch.nonzero(block_k >= 0).squeeze(1)

    lo, hi = call.row_range()
    step = block_rows or max(1, BLOCK_ENTRIES // max(1, b * call.heads * nk))
    hw = lay.frame_tokens
    for r0 in range(lo, hi, step):
        r1 = min(r0 + step, hi)
        k0, k1 = key_window(call, slice(r0, r1))
        heads = block_probs(call, slice(r0, r1), kt, (k0, k1))  # [B, H, R, k1 - k0]
        if "entropy" in wanted:  # per head, before the head sum
            sums["entropy"][:, :, r0:r1] = _head_sum(call, torch.special.entr(heads).sum(dim=-1))
        p = _head_sum(call, heads)  # [B, Hs, R, Nk]: the keys outside the window are zeros
        p = p if (k0, k1) == (0, nk) else torch.nn.functional.pad(p, (k0, nk - k1))
        del heads
        if "blocks" in wanted:
            ids = block_q[r0:r1]
            rows = torch.nonzero(ids >= 0).squeeze(1)
            seg = p.new_zeros(b, hs, r1 - r0, grid.cols).index_add_(-1, block_k[keyed], p[..., keyed])
            sums["blocks"].index_add_(2, ids[rows], seg[:, :, rows])
        if "received" in wanted:
            sums["received"] += p.sum(dim=2)
        if "full" in wanted:
            sums["full"][:, :, r0:r1] = p
        v0, v1 = max(r0, vq.start), min(r1, vq.stop)
        if v0 < v1 and "cross" in wanted and tk is not None:
            sums["cross"][:, :, v0 - vq.start : v1 - vq.start] = p[:, :, v0 - r0 : v1 - r0, tk]
        if v0 < v1 and "distance" in wanted and vk is not None:
            video = slice(v0 - vq.start, v1 - vq.start)
            sums["distance"] += distance(p[:, :, v0 - r0 : v1 - r0, vk], video)
        if v0 < v1 and "temporal" in wanted and vk is not None:
            seg = p[:, :, v0 - r0 : v1 - r0, vk].unflatten(-1, (lay.frames, hw)).sum(dim=-1)
            frame = torch.arange(v0 - vq.start, v1 - vq.start, device=dev) // hw
            sums["temporal"].index_add_(2, frame, seg)
        if tq is not None and tk is not None and "text" in wanted:
            t0, t1 = max(r0, tq.start), min(r1, tq.stop)
            if t0 < t1:
                sums["text"][:, :, t0 - tq.start : t1 - tq.start] = p[:, :, t0 - r0 : t1 - r0, tk]
    return sums
