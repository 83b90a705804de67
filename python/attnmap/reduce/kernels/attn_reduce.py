# mypy: disable-error-code="no-untyped-def"
"""Fused attention reduction: softmax(q k^T) formed tile by tile and reduced on chip, never stored.

Two kernels and their launcher :func:`attn_reduce`:

- ``_attn_stats_kernel`` (pass 1, skipped when the caller has the rows' logsumexp): one program per
  (query block, batch, head) runs over every key block and keeps the row max ``m`` and the sum of
  ``exp(s - m)`` on chip; it writes ``shift = m`` and ``inv = 1 / sum`` per row. Keeping the exact
  max (not ``m + log(sum)``) keeps P exact for huge logits.
- ``_attn_reduce_kernel`` (pass 2): one program per (query block, batch, head group) walks the key
  blocks of the needed columns; for each it recomputes the logit tile of every head of its group,
  forms ``P = exp(s - shift) * inv`` and sums the heads in registers. Then, per tile: the dense
  columns (``cross``/``text``/``full``) are stored once (no atomics: the program owns those rows),
  the column sums (``received``) take one atomic per key, and the (query frame, key frame) sums
  (``temporal``) take one scalar atomic per pair of frames the tile touches. The statistics of
  sparse-attention design: each row's entropy ``sum P (lse - s)`` accumulates per head in registers
  and is stored once; ``blocks`` (token tiles or video cubes) reduces the tile by two one-hot
  products (keys to the tile's key blocks, then rows to its row blocks; the launcher numbers the
  blocks each tile touches) and adds the small result with one atomic per pair of blocks;
  ``distance`` adds each video pair's P to a ``[F, H, W, W]`` table by ``(|dt|, |dy|, x_q, x_k)``
  (distinct addresses within a tile), which the launcher folds into ``|dx|``. Head groups other
  than one (for parallelism, or one group per head with ``per_head``) write separate slots that the
  launcher sums.

The plain fp32 torch twin is :mod:`attnmap.reduce.reference`; :mod:`attnmap.reduce.triton` turns an
``attention_sums`` call into the launcher's arguments. Under ``TRITON_INTERPRET=1`` (set before this
module is imported) the kernels run on CPU tensors; there the tiles are upcast to fp32 before
``tl.dot`` because the interpreter's bf16 dot is wrong.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from attnmap.errors import AttnmapError

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_GRID_Y = 65535  # CUDA's limit on grid dims y and z


@triton.jit
def _load_q(q_base, offs_m, offs_d, stride_qm, stride_qd, Nq, D, UPCAST: tl.constexpr):
    """The query tile [BLOCK_M, BLOCK_D] (zero past the last row and past D)."""
    q = tl.load(
        q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :].to(tl.int64) * stride_qd,
        mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < D),
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    return q


@triton.jit
def _scores(
    q,
    k_base,
    bias_base,
    offs_n,
    offs_d,
    stride_kn,
    stride_kd,
    stride_bn,
    Nk,
    D,
    scale,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """The logit tile ``scale * q k^T + bias`` [BLOCK_M, BLOCK_N] in fp32 (natural-log units, the
    ones of SDPA's logsumexp); -inf past the last key."""
    kt = tl.load(
        k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None].to(tl.int64) * stride_kd,
        mask=(offs_n[None, :] < Nk) & (offs_d[:, None] < D),
        other=0.0,
    )
    if UPCAST:
        kt = kt.to(tl.float32)
    if IEEE:
        s = tl.dot(q, kt, input_precision="ieee")
    else:
        s = tl.dot(q, kt)
    s = s * scale
    if HAS_BIAS:
        bias = tl.load(bias_base + offs_n.to(tl.int64) * stride_bn, mask=offs_n < Nk, other=0.0)
        s = s + bias[None, :]
    return tl.where(offs_n[None, :] < Nk, s, float("-inf"))


@triton.jit
def _attn_stats_kernel(
    Q,
    K,
    Bias,
    Shift,
    Inv,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_bb,
    stride_bh,
    stride_bn,
    H,
    GROUP,
    Nq,
    Nk,
    D,
    scale,
    row_lo,
    row_hi,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = (h // GROUP).to(tl.int64)
    offs_m = row_lo + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    bias_base = Bias + b * stride_bb + h.to(tl.int64) * stride_bh
    q = _load_q(q_base, offs_m, offs_d, stride_qm, stride_qd, Nq, D, UPCAST)  # once, not per key block
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(0, Nk, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = _scores(
            q, k_base, bias_base, offs_n, offs_d, stride_kn, stride_kd, stride_bn, Nk, D, scale,
            HAS_BIAS, IEEE, UPCAST,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: nothing to rescale
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    # every key masked (l_i == 0): P = exp(s - inf) = 0. A NaN logit (NaN in q or k) leaves l_i NaN,
    # which must stay alive so that the row's P is NaN, never a silent zero
    alive = l_i != 0.0
    shift = tl.where(alive, m_i, float("inf"))
    inv = tl.where(alive, 1.0 / tl.where(alive, l_i, 1.0), 0.0)
    out = pid_bh.to(tl.int64) * Nq + offs_m
    ok = offs_m < row_hi
    tl.store(Shift + out, shift, mask=ok)
    tl.store(Inv + out, inv, mask=ok)


@triton.jit
def _attn_reduce_kernel(
    Q,
    K,
    Bias,
    Shift,
    Inv,
    Dense,
    Received,
    Temporal,
    Entropy,
    QSlot,
    KSlot,
    QTab,
    KTab,
    Blocks,
    Dist,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_bb,
    stride_bh,
    stride_bn,
    stride_db,
    stride_dg,
    stride_dm,
    H,
    GROUP,
    G,
    HEADS_PER_PROG,
    Nq,
    Nk,
    D,
    scale,
    row_lo,
    row_hi,
    k_lo,
    k_hi,
    dense_c_lo,
    dense_c_hi,
    vq_lo,
    vk_lo,
    Nv,
    HW,
    F,
    RB,
    CB,
    dq_lo,
    dk_lo,
    DF,
    DH,
    DW,
    HAS_BIAS: tl.constexpr,
    USE_INV: tl.constexpr,
    DENSE: tl.constexpr,
    RECEIVED: tl.constexpr,
    TEMPORAL: tl.constexpr,
    ENTROPY: tl.constexpr,
    BLOCKS: tl.constexpr,
    QS: tl.constexpr,
    KS: tl.constexpr,
    DISTANCE: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // G
    g = pid_bg % G
    b64 = b.to(tl.int64)
    m0 = row_lo + pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < row_hi
    slot = b64 * G + g  # the [B, G] slot of this program's outputs
    # query frame of each row (-1: not a video query) and the frames this block touches
    qv = offs_m - vq_lo
    q_frame = tl.where(row_ok & (qv >= 0) & (qv < Nv), qv // HW, -1)
    qf_first = (tl.maximum(m0, vq_lo) - vq_lo) // HW
    qf_last = (tl.minimum(tl.minimum(m0 + BLOCK_M, row_hi), vq_lo + Nv) - 1 - vq_lo) // HW
    ent = tl.zeros([BLOCK_M], tl.float32)
    if BLOCKS:  # this tile's rows: one-hot [BLOCK_M, QS] of their local block, and those blocks' numbers
        q_slot = tl.load(QSlot + offs_m, mask=row_ok, other=-1)
        q_hot = (q_slot[:, None] == tl.arange(0, QS)[None, :]).to(tl.float32)
        q_tab = tl.load(QTab + pid_m.to(tl.int64) * QS + tl.arange(0, QS))
    if DISTANCE:  # the video rows' (t, y, x)
        dq = offs_m - dq_lo
        dq_ok = row_ok & (dq >= 0) & (dq < DF * DH * DW)
        tq, yq, xq = dq // (DH * DW), (dq // DW) % DH, dq % DW
    for n0 in range(k_lo, k_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for j in range(0, HEADS_PER_PROG):
            h = g * HEADS_PER_PROG + j
            h64 = h.to(tl.int64)
            hk = (h // GROUP).to(tl.int64)
            # q is reloaded per key block (an L2 hit): the tiles of every head of the group would not
            # fit in registers at once
            q = _load_q(
                Q + b64 * stride_qb + h64 * stride_qh, offs_m, offs_d, stride_qm, stride_qd, Nq, D, UPCAST
            )
            s = _scores(
                q, K + b64 * stride_kb + hk * stride_kh, Bias + b64 * stride_bb + h64 * stride_bh, offs_n,
                offs_d, stride_kn, stride_kd, stride_bn, Nk, D, scale, HAS_BIAS, IEEE, UPCAST,
            )  # fmt: skip
            stats = (b64 * H + h64) * Nq + offs_m
            shift = tl.load(Shift + stats, mask=row_ok, other=float("inf"))
            p = tl.exp(s - shift[:, None])
            if USE_INV:
                inv = tl.load(Inv + stats, mask=row_ok, other=0.0)
                p = p * inv[:, None]
            if ENTROPY:  # -P ln P = P (lse - s), with lse = shift + ln(1 / inv) unless given
                if USE_INV:
                    lse = shift - tl.log(tl.where(inv > 0.0, inv, 1.0))
                else:
                    lse = shift
                # a row with no key (lse = inf) has P = 0; P = 0 too where s < lse - 104 (fp32
                # underflow), so clamping s there keeps 0 * inf (s = -inf) out of the sum
                lse = tl.where(lse < float("inf"), lse, 0.0)
                s_low = tl.maximum(s, lse[:, None] - 200.0)
                ent += tl.sum(p * (lse[:, None] - s_low), 1)
            acc += p
        acc = tl.where(row_ok[:, None], acc, 0.0)
        if DENSE:
            cols_ok = (offs_n >= dense_c_lo) & (offs_n < dense_c_hi)
            ptr = (
                Dense
                + b64 * stride_db
                + g.to(tl.int64) * stride_dg
                + (offs_m - row_lo)[:, None].to(tl.int64) * stride_dm
                + (offs_n - dense_c_lo)[None, :]
            )
            tl.store(ptr, acc, mask=row_ok[:, None] & cols_ok[None, :])
        if RECEIVED:
            tl.atomic_add(Received + slot * Nk + offs_n, tl.sum(acc, 0), mask=offs_n < Nk)
        if TEMPORAL:
            kv = offs_n - vk_lo
            k_frame = tl.where((kv >= 0) & (kv < Nv) & (offs_n < Nk), kv // HW, -1)
            kf_first = (tl.maximum(n0, vk_lo) - vk_lo) // HW
            kf_last = (tl.minimum(tl.minimum(n0 + BLOCK_N, Nk), vk_lo + Nv) - 1 - vk_lo) // HW
            for fj in range(kf_first, kf_last + 1):
                seg = tl.sum(tl.where(k_frame[None, :] == fj, acc, 0.0), 1)
                for fi in range(qf_first, qf_last + 1):
                    mass = tl.sum(tl.where(q_frame == fi, seg, 0.0), 0)
                    tl.atomic_add(Temporal + (slot * F + fi) * F + fj, mass)
        if BLOCKS:  # keys -> the tile's key blocks, rows -> its row blocks: [QS, KS], one atomic each
            k_slot = tl.load(KSlot + offs_n, mask=offs_n < Nk, other=-1)
            k_hot = (k_slot[:, None] == tl.arange(0, KS)[None, :]).to(tl.float32)
            by_key = tl.dot(acc, k_hot, input_precision="ieee")
            pairs = tl.dot(tl.trans(q_hot), by_key, input_precision="ieee")
            k_tab = tl.load(KTab + ((n0 - k_lo) // BLOCK_N).to(tl.int64) * KS + tl.arange(0, KS))
            ptr = Blocks + (slot * RB + q_tab[:, None].to(tl.int64)) * CB + k_tab[None, :]
            tl.atomic_add(ptr, pairs, mask=(q_tab[:, None] >= 0) & (k_tab[None, :] >= 0))
        if DISTANCE:
            dk = offs_n - dk_lo
            dk_ok = (dk >= 0) & (dk < DF * DH * DW) & (offs_n < Nk)
            tk, yk, xk = dk // (DH * DW), (dk // DW) % DH, dk % DW
            dt = tl.abs(tq[:, None] - tk[None, :])
            dy = tl.abs(yq[:, None] - yk[None, :])
            cell = ((dt * DH + dy) * DW + xq[:, None]) * DW + xk[None, :]
            ptr = Dist + slot * (DF * DH * DW * DW) + cell.to(tl.int64)
            tl.atomic_add(ptr, acc, mask=dq_ok[:, None] & dk_ok[None, :])
    if ENTROPY:
        tl.store(Entropy + slot * Nq + offs_m, ent, mask=row_ok)


def _pow2(n: int, low: int) -> int:
    return max(low, triton.next_power_of_2(n))


def _blocks(dtype: torch.dtype, d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for a dtype and head dim.

    A fixed table, not ``triton.autotune``: the output slots are sized from BLOCK_M (see
    :func:`_head_groups`) before the launch, the atomics would need ``reset_to_zero`` between trial
    runs, and each new (Nq, Nk) of a model (text length) would retune. Shared memory of the reduce
    kernel compiled for sm_80/sm_90 (``triton.compile``, no GPU needed): 48 KiB for half inputs (128 x 64
    tiles at D <= 128, 64 x 32 at D = 256), 96 KiB for fp32 64 x 32 at D = 128, and 128 KiB for fp32
    32 x 32 at D = 256 (64 x 32 there would need 192 KiB, more than an A100's 163 KiB); no spills.
    """
    if INTERPRET:
        return 32, 32, 4
    if dtype == torch.float32:
        return (32, 32, 4) if d > 128 else (64, 32, 4)
    if d > 128:
        return 64, 32, 4
    return 128, 64, 8


def _head_groups(q: torch.Tensor, per_head: bool, m_blocks: int) -> int:
    """Split the heads into groups (separate output slots) until the grid fills the GPU twice."""
    b, h = int(q.shape[0]), int(q.shape[1])
    if per_head:
        return h
    if INTERPRET or not q.is_cuda:
        return 1
    target = 2 * torch.cuda.get_device_properties(q.device).multi_processor_count
    for g in range(1, h + 1):
        if h % g == 0 and m_blocks * b * g >= target:
            return g
    return h


def _tile_slots(ids: torch.Tensor, lo: int, hi: int, tile: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Number the blocks each tile of positions ``lo..hi`` (tiles of ``tile`` from ``lo``) touches.

    Args:
        ids: ``[N]`` int64, each position's block (-1: none).

    Returns:
        ``(slot [N] int32``: each position's block among its tile's (-1 outside ``lo..hi`` or in
        none), ``table [tiles, S] int32``: the blocks of each tile by slot (-1 past its last),
        ``S)``, a power of two >= 16 (``tl.dot`` needs 16).
    """
    n, tiles = hi - lo, max(1, triton.cdiv(hi - lo, tile))
    seg = torch.full((tiles * tile,), -1, dtype=torch.int64, device=ids.device)
    seg[:n] = ids[lo:hi]
    ordered, order = seg.view(tiles, tile).sort(dim=1)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first &= ordered >= 0
    rank = first.cumsum(dim=1) - 1
    width = _pow2(int(first.sum(dim=1).max()), 16)
    table = torch.full((tiles, width), -1, dtype=torch.int32, device=ids.device)
    row = torch.arange(tiles, device=ids.device)[:, None].expand_as(rank)
    table[row[first], rank[first]] = ordered[first].to(torch.int32)
    slot = torch.empty_like(rank).scatter_(1, order, torch.where(ordered >= 0, rank, -1))
    full = torch.full((ids.numel(),), -1, dtype=torch.int32, device=ids.device)
    full[lo:hi] = slot.view(-1)[:n].to(torch.int32)
    return full, table.contiguous(), width


def attn_reduce(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    rows: tuple[int, int],
    keys: tuple[int, int],
    dense: tuple[int, int] = (0, 0),
    received: bool = False,
    temporal: Optional[tuple[int, int, int, int, int]] = None,
    entropy: bool = False,
    blocks: Optional[tuple[torch.Tensor, torch.Tensor, int, int]] = None,
    distance: Optional[tuple[int, int, int, int, int]] = None,
    bias: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    per_head: bool = False,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    head_groups: Optional[int] = None,
    return_lse: bool = False,
) -> dict[str, torch.Tensor]:
    """Reduce softmax(scale * q k^T + bias) over query rows ``rows`` without storing it.

    Args:
        q: ``[B, H, Nq, D]`` and k: ``[B, Hk, Nk, D]`` (any strides; fp32, fp16 or bf16; H % Hk == 0).
        scale: the logit scale.
        rows: the query rows ``[lo, hi)`` to reduce; each row's softmax is over every key.
        keys: the key columns ``[lo, hi)`` the reductions read (the row statistics use every key).
        dense: the key columns ``[lo, hi)`` of P stored densely (empty: none).
        received: sum P over the rows into one value per key.
        temporal: ``(vq_lo, vk_lo, Nv, HW, F)``: sum P over (query frame, key frame) pairs of the
            video tokens at query positions ``vq_lo..vq_lo+Nv`` and key positions ``vk_lo..``.
        entropy: each row's ``-sum P ln P``.
        blocks: ``(query ids [Nq], key ids [Nk], RB, CB)``: sum P over (query block, key block)
            pairs, ids int64 in ``0..RB`` and ``0..CB`` (-1: in none).
        distance: ``(vq_lo, vk_lo, F, H, W)``: sum P of the video pairs by ``(|dt|, |dy|, |dx|)``.
        bias: additive fp32 key bias ``[B, 1 or H, Nk]`` (``-inf`` excludes a key), or None.
        lse: ``[B, H, Nq]`` fp32 logsumexp of each row; the statistics pass is then skipped.
        per_head: keep heads apart (Hs = H), else sum them (Hs = 1).
        block_m, block_n: tile sizes (powers of two >= 16); chosen from dtype and D when None.
        head_groups: output slots the heads are split into (a divisor of H; H with ``per_head``).
        return_lse: also return ``lse`` ``[B, H, Nq]``, each row's logsumexp over the keys (the given
            one where ``lse`` was given; ``-inf`` for a row with no key and outside ``rows``).

    Returns:
        raw sums in fp32, by name, of what was asked: ``dense`` ``[B, Hs, hi - lo, dense columns]``,
        ``received`` ``[B, Hs, Nk]``, ``temporal`` ``[B, Hs, F, F]``, ``entropy`` ``[B, Hs, Nq]``
        (zero outside ``rows``), ``blocks`` ``[B, Hs, RB, CB]``, ``distance`` ``[B, Hs, F, H, W]``;
        ``lse`` ``[B, H, Nq]`` with ``return_lse``.
    """
    b, h, nq, d = (int(s) for s in q.shape)
    nk = int(k.shape[2])
    hk = int(k.shape[1])
    if not (q.is_cuda or INTERPRET):
        raise AttnmapError(
            f"q must be a CUDA tensor for the Triton kernel (or set TRITON_INTERPRET=1), got {q.device}"
        )
    if d > 256:
        raise AttnmapError(f"q and k: head dim D must be at most 256 for the Triton kernel, got {d}")
    dev, f32 = q.device, torch.float32
    bm_default, bn_default, warps = _blocks(q.dtype, d)
    bm, bn = block_m or bm_default, block_n or bn_default
    for name, value in (("block_m", bm), ("block_n", bn)):
        if value < 16 or value & (value - 1):
            raise AttnmapError(f"{name} must be a power of two >= 16, got {value}")
    bd = _pow2(d, 16)
    ieee = q.dtype == torch.float32
    upcast = INTERPRET
    row_lo, row_hi = rows
    k_lo, k_hi = keys
    c_lo, c_hi = dense
    has_dense = c_hi > c_lo

    m_blocks = triton.cdiv(max(row_hi - row_lo, 0), bm)
    groups = head_groups or _head_groups(q, per_head, m_blocks)
    if groups < 1 or h % groups:
        raise AttnmapError(f"head_groups must divide the {h} heads, got {groups}")
    if b * h > _GRID_Y:  # grid axis 1 carries (batch, head); axis 0 (query blocks) has 2**31 - 1
        raise AttnmapError(
            f"q: batch x heads = {b * h} exceeds the Triton grid limit {_GRID_Y}; split the batch"
        )
    per_prog = h // groups

    bias_t = bias if bias is not None else torch.zeros(1, 1, 1, dtype=f32, device=dev)
    bias_strides = (bias_t.stride(0), bias_t.stride(1) if bias_t.shape[1] > 1 else 0, bias_t.stride(2))
    if lse is not None:
        shift = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse).contiguous()
        inv = shift  # unused (USE_INV is off)
    else:
        shift = torch.full((b, h, nq), float("inf"), dtype=f32, device=dev)
        inv = torch.zeros((b, h, nq), dtype=f32, device=dev)
        if m_blocks:
            _attn_stats_kernel[(m_blocks, b * h)](
                q, k, bias_t, shift, inv, *q.stride(), *k.stride(), *bias_strides,
                h, h // hk, nq, nk, d, scale, row_lo, row_hi,
                HAS_BIAS=bias is not None, IEEE=ieee, UPCAST=upcast,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps,
            )  # fmt: skip

    n_rows = max(row_hi - row_lo, 0)
    dense_buf = torch.zeros(
        (b, groups, n_rows, c_hi - c_lo) if has_dense else (1, 1, 1, 1), dtype=f32, device=dev
    )
    received_buf = torch.zeros((b, groups, nk) if received else (1,), dtype=f32, device=dev)
    vq_lo, vk_lo, nv, hw, frames = temporal if temporal is not None else (0, 0, 0, 1, 1)
    temporal_buf = torch.zeros(
        (b, groups, frames, frames) if temporal is not None else (1,), dtype=f32, device=dev
    )
    one = torch.zeros(1, dtype=f32, device=dev)
    entropy_buf = torch.zeros((b, groups, nq), dtype=f32, device=dev) if entropy else one
    ids = torch.full((1,), -1, dtype=torch.int32, device=dev)
    q_slot, k_slot, q_tab, k_tab, qs, ks, rb, cb = ids, ids, ids, ids, 16, 16, 1, 1
    blocks_buf = one
    if blocks is not None:
        block_q, block_k, rb, cb = blocks
        q_slot, q_tab, qs = _tile_slots(block_q.to(dev), row_lo, row_hi, bm)
        k_slot, k_tab, ks = _tile_slots(block_k.to(dev), k_lo, k_hi, bn)
        blocks_buf = torch.zeros((b, groups, rb, cb), dtype=f32, device=dev)
    dq_lo, dk_lo, df, dh, dw = distance if distance is not None else (0, 0, 1, 1, 1)
    dist_buf = torch.zeros((b, groups, df, dh, dw, dw), dtype=f32, device=dev) if distance else one
    if m_blocks and k_hi > k_lo:
        _attn_reduce_kernel[(m_blocks, b * groups)](
            q, k, bias_t, shift, inv, dense_buf, received_buf, temporal_buf,
            entropy_buf, q_slot, k_slot, q_tab, k_tab, blocks_buf, dist_buf,
            *q.stride(), *k.stride(), *bias_strides,
            dense_buf.stride(0), dense_buf.stride(1), dense_buf.stride(2),
            h, h // hk, groups, per_prog, nq, nk, d, scale,
            row_lo, row_hi, k_lo, k_hi, c_lo, c_hi,
            vq_lo, vk_lo, nv, hw, frames, rb, cb, dq_lo, dk_lo, df, dh, dw,
            HAS_BIAS=bias is not None, USE_INV=lse is None, DENSE=has_dense,
            RECEIVED=received, TEMPORAL=temporal is not None, ENTROPY=entropy,
            BLOCKS=blocks is not None, QS=qs, KS=ks, DISTANCE=distance is not None,
            IEEE=ieee, UPCAST=upcast, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps,
        )  # fmt: skip

    def slots(t: torch.Tensor) -> torch.Tensor:
        """[B, G, ...] group slots -> [B, Hs, ...]: per head as is, else summed."""
        return t if per_head else t.sum(dim=1, keepdim=True)

    out = {"dense": dense_buf} if has_dense else {}
    if received:
        out["received"] = received_buf
    if temporal is not None:
        out["temporal"] = temporal_buf
    if entropy:
        out["entropy"] = entropy_buf
    if blocks is not None:
        out["blocks"] = blocks_buf
    if distance is not None:  # (x_q, x_k) -> |x_q - x_k|
        x = torch.arange(dw, device=dev)
        bins = (x[:, None] - x[None, :]).abs().reshape(-1)
        out["distance"] = dist_buf.new_zeros(b, groups, df, dh, dw).index_add_(-1, bins, dist_buf.flatten(-2))
    found = {name: slots(t) for name, t in out.items()}
    if return_lse:
        if lse is not None:
            found["lse"] = lse
        else:  # shift + ln(1 / inv): -inf where no key (inv 0), NaN for a NaN row (inv NaN)
            dead = torch.full_like(shift, float("-inf"))
            found["lse"] = torch.where(inv == 0, dead, shift - torch.log(inv))
    return found
