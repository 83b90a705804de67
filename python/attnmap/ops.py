"""Attention reductions without the N x N map: ``attention_sums`` and ``sdpa_with_lse``.

``attention_sums`` takes the q and k of one attention call (SDPA layout ``[B, H, N, D]``) and a
:class:`~attnmap.layout.Layout`, forms P = softmax(scale * q k^T + mask) in fp32 and reduces it into
small maps (see the module map in DEVELOPERS.md). Three backends share one contract:

- ``"triton"``: the fused kernel of :mod:`attnmap.kernels.attn_reduce` (CUDA, or CPU under
  ``TRITON_INTERPRET=1``); imported lazily, so ``TRITON_INTERPRET`` can be set before that import.
- ``"torch"``: on the CPU, ``cross``, ``temporal`` and ``text`` come from the Rust kernel
  ``attnmap._native.attention_groups`` (each row's P summed into one column per text key and one
  per frame, with an online softmax; O(rows x columns) memory). Other reductions, and every
  reduction on other devices, stream blocks of query rows, all heads at once; extra memory
  O(rows per block x Nk), never O(Nq x Nk).
- ``"reference"``: :mod:`attnmap.reference`, which materialises P (the oracle of the tests).

``"auto"`` picks Triton for CUDA tensors and torch otherwise.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from attnmap.layout import Layout

#: Every reduction ``attention_sums`` knows, in output order.
REDUCTIONS: tuple[str, ...] = ("cross", "temporal", "text", "received", "probe", "full")
#: Largest ``full`` output (entries over batch, heads and rows) that is allowed.
FULL_LIMIT = 2**26
#: Entries of the fp32 logit block the torch backend works on at a time (B * H * rows * Nk).
TORCH_BLOCK_ENTRIES = 2**22
#: Reductions the torch backend forms on the CPU in the native extension (:func:`_native_sums`).
GROUPED = frozenset({"cross", "temporal", "text"})
BACKENDS = ("auto", "triton", "torch", "reference")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

Reductions = Union[str, Sequence[str]]


@dataclass(frozen=True)
class AttentionCall:
    """One validated call of :func:`attention_sums` (shared by every backend).

    ``bias`` is the key padding mask as an additive fp32 bias ``[B, Hm, Nk]`` with ``Hm`` 1 or H
    (``-inf`` for excluded keys); ``lse`` the caller's logsumexp ``[B, H, Nq]`` in fp32;
    ``text_groups`` the text-key positions summed into each column of ``cross``.
    """

    q: torch.Tensor
    k: torch.Tensor
    layout: Layout
    reductions: tuple[str, ...]
    per_head: bool
    scale: float
    bias: Optional[torch.Tensor]
    probe: Optional[torch.Tensor]
    lse: Optional[torch.Tensor]
    text_groups: Optional[tuple[tuple[int, ...], ...]] = None

    @property
    def batch(self) -> int:
        return int(self.q.shape[0])

    @property
    def heads(self) -> int:
        return int(self.q.shape[1])

    @property
    def kv_heads(self) -> int:
        return int(self.k.shape[1])

    @property
    def num_queries(self) -> int:
        return int(self.q.shape[2])

    @property
    def num_keys(self) -> int:
        return int(self.k.shape[2])

    @property
    def out_heads(self) -> int:
        """Head dimension of the raw sums: H with ``per_head``, else 1 (summed)."""
        return self.heads if self.per_head else 1

    def row_range(self) -> tuple[int, int]:
        """The query rows ``[lo, hi)`` that some requested reduction needs (probe rows aside)."""
        lay, wanted = self.layout, set(self.reductions)
        if wanted & {"received", "full"}:
            return 0, self.num_queries
        spans = []
        if wanted & {"cross", "temporal"}:
            spans.append(lay.video_q)
        if "text" in wanted and lay.text_q is not None:
            spans.append(lay.text_q)
        if not spans:
            return 0, 0
        return min(s.start for s in spans), max(s.stop for s in spans)


def _check_qk(q: object, k: object) -> tuple[torch.Tensor, torch.Tensor]:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor [B, H, N, D], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D] (the SDPA layout), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOATS:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.shape[3] == 0:
            raise ValueError(f"{name} must have a head dim D >= 1, got shape {tuple(t.shape)}")
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must have the same dtype, got q {q.dtype} and k {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on the same device, got q on {q.device} and k on {k.device}")
    bq, hq, _, dq = q.shape
    bk, hk, _, dk = k.shape
    if bq != bk or dq != dk or hk < 1 or hq % hk != 0:
        raise ValueError(
            f"k {tuple(k.shape)} does not match q {tuple(q.shape)}: expected the same batch and head dim, "
            "and q heads a multiple of k heads (grouped-query attention)"
        )
    return q, k


def _check_finite(q: torch.Tensor, k: torch.Tensor) -> None:
    """ValueError naming q or k if it holds NaN or inf.

    One fp32 sum per tensor and one device sync: a sum is finite exactly when every element is,
    unless finite values overflow it (then the exact per-element test decides). That reads q and k
    once, about 10x faster on the CPU than ``isfinite(t).all()``, which also writes a bool copy.
    """
    sums = torch.stack([q.sum(dtype=torch.float32), k.sum(dtype=torch.float32)])
    if bool(torch.isfinite(sums).all()):
        return
    for name, t in (("q", q), ("k", k)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"{name} contains NaN or inf; attention maps of such inputs are meaningless "
                "(check_finite=False skips this test and its device sync; the maps then hold NaN)"
            )


def _check_reductions(reductions: Reductions, layout: Layout) -> tuple[str, ...]:
    names = (reductions,) if isinstance(reductions, str) else tuple(reductions)
    if not names:
        raise ValueError(f"reductions must name at least one of {REDUCTIONS}, got an empty tuple")
    for name in names:
        if name not in REDUCTIONS:
            raise ValueError(f"reductions: unknown reduction {name!r}; expected some of {REDUCTIONS}")
        if not layout.supports(name):
            raise ValueError(f"reductions: {name!r} is not defined for {layout}")
    return tuple(name for name in REDUCTIONS if name in names)


def _check_mask(mask: object, q: torch.Tensor, num_keys: int, check_finite: bool) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"key_padding_mask must be a torch.Tensor, got {type(mask).__name__}")
    b, h = int(q.shape[0]), int(q.shape[1])
    shape = tuple(mask.shape)
    ok_2d = len(shape) == 2 and shape[0] in (1, b) and shape[1] == num_keys
    ok_4d = (
        len(shape) == 4
        and shape[0] in (1, b)
        and shape[1] in (1, h)
        and shape[2] == 1
        and shape[3] == num_keys
    )
    if not (ok_2d or ok_4d):
        raise ValueError(
            f"key_padding_mask must have shape (B, Nk), (B, 1, 1, Nk) or (B, H, 1, Nk) = "
            f"({b}, {num_keys}), ({b}, 1, 1, {num_keys}) or ({b}, {h}, 1, {num_keys}), got {shape}"
        )
    flat = mask.reshape(shape[0], 1, num_keys) if ok_2d else mask.reshape(shape[0], shape[1], num_keys)
    flat = flat.to(q.device)
    if flat.dtype == torch.bool:
        bias = torch.zeros(flat.shape, dtype=torch.float32, device=q.device).masked_fill_(~flat, -math.inf)
    elif flat.is_floating_point():
        bias = flat.to(torch.float32)
        if check_finite and bool((torch.isnan(bias) | (bias == math.inf)).any()):
            raise ValueError("key_padding_mask (an additive bias) must not contain NaN or +inf")
    else:
        raise ValueError(
            f"key_padding_mask must be bool (True = keep) or an additive float bias, got {flat.dtype}"
        )
    return bias.expand(b, bias.shape[1], num_keys).contiguous()


def _check_probe(
    probe: object, wanted: bool, num_queries: int, device: torch.device
) -> Optional[torch.Tensor]:
    if probe is None:
        if wanted:
            raise ValueError("probe: the 'probe' reduction needs probe=<LongTensor of query indices>")
        return None
    if not wanted:
        raise ValueError("probe was given but 'probe' is not in reductions; add it or drop probe")
    idx = probe if isinstance(probe, torch.Tensor) else torch.as_tensor(probe)
    if idx.dtype in (torch.bool,) or idx.is_floating_point() or idx.is_complex() or idx.dim() != 1:
        raise ValueError(
            f"probe must be a 1-D integer tensor of query indices, got {idx.dtype} {tuple(idx.shape)}"
        )
    if idx.numel() == 0:
        raise ValueError("probe must hold at least one query index")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= num_queries:
        raise ValueError(f"probe indices must lie in [0, {num_queries}), got values in [{lo}, {hi}]")
    return idx.to(device=device, dtype=torch.long)


def _check_lse(lse: object, q: torch.Tensor, check_finite: bool) -> Optional[torch.Tensor]:
    if lse is None:
        return None
    if not isinstance(lse, torch.Tensor) or not lse.is_floating_point():
        raise ValueError("lse must be a float tensor [B, H, Nq], the logsumexp of the attention forward")
    expected = tuple(q.shape[:3])
    if tuple(lse.shape) != expected:
        raise ValueError(f"lse must have shape [B, H, Nq] = {expected}, got {tuple(lse.shape)}")
    lse = lse.to(device=q.device, dtype=torch.float32)
    if check_finite and bool(torch.isnan(lse).any()):
        raise ValueError("lse contains NaN")
    return lse


def _check_text_groups(groups: object, layout: Layout) -> Optional[tuple[tuple[int, ...], ...]]:
    if groups is None:
        return None
    if layout.text_k is None:
        raise ValueError(f"text_groups: layout {layout} has no text keys to group")
    bad = ValueError(
        f"text_groups must be a sequence of non-empty sequences of text positions in [0, {layout.text}), "
        f"got {groups!r}"
    )
    if isinstance(groups, (str, bytes, torch.Tensor)) or not isinstance(groups, Sequence) or not groups:
        raise bad
    out = []
    for g in groups:
        if isinstance(g, (str, bytes)) or not isinstance(g, Sequence) or not g:
            raise bad
        if not all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) and 0 <= i < layout.text for i in g
        ):
            raise bad
        out.append(tuple(sorted({int(i) for i in g})))  # a key counts once in its group
    return tuple(out)


def group_text(call: AttentionCall, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``cross`` with one column per text group (the sum of its keys' columns)."""
    if call.text_groups is not None and "cross" in out:
        t = out["cross"]
        out["cross"] = torch.stack([t[..., list(g)].sum(dim=-1) for g in call.text_groups], dim=-1)
    return out


def prepare_call(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: Layout,
    reductions: Reductions = ("cross", "temporal"),
    *,
    per_head: bool = False,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    probe: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    check_finite: bool = True,
    text_groups: Optional[Sequence[Sequence[int]]] = None,
) -> AttentionCall:
    """Validate the arguments of :func:`attention_sums` (ValueError naming the argument)."""
    if not isinstance(layout, Layout):
        raise ValueError(f"layout must be an attnmap.Layout, got {type(layout).__name__}")
    q, k = _check_qk(q, k)
    b, h, nq, d = (int(s) for s in q.shape)
    nk = int(k.shape[2])
    if check_finite:
        _check_finite(q, k)
    layout.check(nq, nk, argument="layout")
    names = _check_reductions(reductions, layout)
    if scale is None:
        scale = d**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None (D**-0.5), got {scale!r}")
    if "full" in names:
        entries = b * (h if per_head else 1) * nq * nk
        if entries > FULL_LIMIT:
            raise ValueError(
                f"reductions: 'full' would hold {entries} entries (limit {FULL_LIMIT}); it is meant for small "
                "maps such as ViT rollout. Use 'cross', 'temporal', 'text', 'received' or 'probe' instead"
            )
    return AttentionCall(
        q=q,
        k=k,
        layout=layout,
        reductions=names,
        per_head=bool(per_head),
        scale=float(scale),
        bias=_check_mask(key_padding_mask, q, nk, check_finite),
        probe=_check_probe(probe, "probe" in names, nq, q.device),
        lse=_check_lse(lse, q, check_finite),
        text_groups=_check_text_groups(text_groups, layout),
    )


def finish(call: AttentionCall, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn raw sums ``[B, Hs, ...]`` (summed over heads when ``Hs == 1``) into the contract's means.

    ``temporal`` arrives as the sum over the query frame's rows and ``received`` as the sum over all
    rows; both are divided here, as is the head sum.
    """
    out: dict[str, torch.Tensor] = {}
    for name in call.reductions:
        t = sums[name]
        if name == "temporal":
            t = t / call.layout.frame_tokens
        elif name == "received":
            t = t / call.num_queries
        if not call.per_head:
            t = t.squeeze(1) / call.heads
        out[name] = t.to(torch.float32)
    return out


# -- torch streaming backend --------------------------------------------------------------------


def keys_t(call: AttentionCall) -> torch.Tensor:
    """``k`` in fp32 as ``[B * Hk, D, Nk]`` (a transposed view; one copy at most, for the dtype or strides)."""
    b, hk, nk, d = call.k.shape
    return call.k.to(torch.float32).reshape(b * hk, nk, d).transpose(1, 2)


def block_probs(call: AttentionCall, rows: Union[slice, torch.Tensor], kt: torch.Tensor) -> torch.Tensor:
    """P for some query rows, every head at once: ``[B, H, R, Nk]`` fp32.

    One batched matmul per k head with the scale (and the bias) fused in, then ``torch.softmax``,
    which walks each row in cache: about 1.6x faster on the CPU than separate max, exp, sum and
    divide passes over the block.

    Args:
        call: the validated call.
        rows: a slice of query positions or a LongTensor of them.
        kt: :func:`keys_t` of the call, ``[B * Hk, D, Nk]``.
    """
    b, h, hk, d, nk = call.batch, call.heads, call.kv_heads, int(call.q.shape[3]), call.num_keys
    qb = call.q[:, :, rows].to(torch.float32)
    r = int(qb.shape[2])
    # heads h = j * g + i share k head j (repeat_interleave order): one batched matmul per k head
    q3 = qb.reshape(b * hk, (h // hk) * r, d)
    if call.bias is None:
        s = torch.baddbmm(q3.new_zeros(()), q3, kt, beta=0, alpha=call.scale).view(b, h, r, nk)
    else:
        s = torch.bmm(q3, kt).view(b, h, r, nk)
        torch.add(call.bias[:, :, None, :], s, alpha=call.scale, out=s)
    if call.lse is not None:
        shift = call.lse[:, :, rows]
        # a row whose lse is -inf (every key masked) has no mass: shift by +inf
        shift = torch.where(torch.isneginf(shift), torch.full_like(shift, math.inf), shift)
        return s.sub_(shift[..., None]).exp_()
    p = torch.softmax(s, dim=-1)  # subtracts the row max: huge logits stay exact
    if call.bias is not None:
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
    step = max(1, TORCH_BLOCK_ENTRIES // max(1, call.batch * call.heads * call.num_keys))
    parts = [
        _head_sum(call, block_probs(call, call.probe[i : i + step], kt))
        for i in range(0, len(call.probe), step)
    ]
    return torch.cat(parts, dim=2)


def _torch_sums(call: AttentionCall, block_rows: Optional[int] = None) -> dict[str, torch.Tensor]:
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

    lo, hi = call.row_range()
    step = block_rows or max(1, TORCH_BLOCK_ENTRIES // max(1, b * call.heads * nk))
    hw = lay.frame_tokens
    for r0 in range(lo, hi, step):
        r1 = min(r0 + step, hi)
        p = _head_sum(call, block_probs(call, slice(r0, r1), kt))  # [B, Hs, R, Nk]
        if "received" in wanted:
            sums["received"] += p.sum(dim=2)
        if "full" in wanted:
            sums["full"][:, :, r0:r1] = p
        v0, v1 = max(r0, vq.start), min(r1, vq.stop)
        if v0 < v1 and "cross" in wanted and tk is not None:
            sums["cross"][:, :, v0 - vq.start : v1 - vq.start] = p[:, :, v0 - r0 : v1 - r0, tk]
        if v0 < v1 and "temporal" in wanted and vk is not None:
            seg = p[:, :, v0 - r0 : v1 - r0, vk].unflatten(-1, (lay.frames, hw)).sum(dim=-1)
            frame = torch.arange(v0 - vq.start, v1 - vq.start, device=dev) // hw
            sums["temporal"].index_add_(2, frame, seg)
        if tq is not None and tk is not None and "text" in wanted:
            t0, t1 = max(r0, tq.start), min(r1, tq.stop)
            if t0 < t1:
                sums["text"][:, :, t0 - tq.start : t1 - tq.start] = p[:, :, t0 - r0 : t1 - r0, tk]
    return sums


# -- CPU: grouped sums in the native extension -------------------------------------------------


def _native_serves(call: AttentionCall) -> bool:
    # the kernel forms each row's softmax itself; a caller's lse is honoured by the block path
    return call.q.device.type == "cpu" and set(call.reductions) <= GROUPED and call.lse is None


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


def _native_sums(call: AttentionCall, grouped: bool = True) -> dict[str, torch.Tensor]:
    """``cross``, ``temporal`` and ``text`` as raw sums (see :func:`finish`) from the Rust kernel:
    each row's P summed into one column per text key and one per frame, in one pass over the keys
    with an online softmax (a q k^T product and an exp per key; no block of P in memory)."""
    from attnmap import _native

    lay, wanted = call.layout, set(call.reductions)
    text, frames = bool(wanted & {"cross", "text"}), "temporal" in wanted
    cols, t, merge = _key_columns(lay, text, frames, call.text_groups if grouped else None)
    lo, hi = call.row_range()
    out = _native.attention_groups(
        _cpu_array(call.q[:, :, lo:hi]),
        _cpu_array(call.k),
        cols,
        t + (lay.frames if frames else 0),
        scale=call.scale,
        bias=None if call.bias is None else _cpu_array(call.bias),
        per_head=call.per_head,
    )
    rows = torch.from_numpy(out)  # [B, Hs, hi - lo, C]
    sums: dict[str, torch.Tensor] = {}
    video = rows[:, :, lay.video_q.start - lo : lay.video_q.stop - lo]
    if "cross" in wanted:
        sums["cross"] = video[..., :t].contiguous() if merge is None else video[..., :t] @ merge
    if frames:
        sums["temporal"] = video[..., t:].unflatten(2, (lay.frames, lay.frame_tokens)).sum(dim=3)
    if "text" in wanted and lay.text_q is not None:
        assert merge is None
        sums["text"] = rows[:, :, lay.text_q.start - lo : lay.text_q.stop - lo, :t].contiguous()
    return sums


# -- dispatch -------------------------------------------------------------------------------------


def _resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if q.is_cuda:
            try:
                import triton  # noqa: F401
            except ImportError:
                return "torch"
            return "triton"
        return "torch"
    if backend == "triton" and not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (q is on {q.device}); set TRITON_INTERPRET=1 before "
            "importing attnmap.kernels to run the kernel on the CPU, or use backend='torch'"
        )
    return backend


def attention_sums(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: Layout,
    reductions: Reductions = ("cross", "temporal"),
    *,
    per_head: bool = False,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    probe: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    backend: str = "auto",
    check_finite: bool = True,
    text_groups: Optional[Sequence[Sequence[int]]] = None,
) -> dict[str, torch.Tensor]:
    """Reduce the attention probabilities of one call into small maps, never holding [Nq, Nk] per head.

    P = softmax(scale * q k^T + mask) in fp32 over every key of the row; a row whose keys are all
    masked contributes zero.

    Args:
        q: queries ``[B, H, Nq, D]`` (fp32, fp16 or bf16; any strides).
        k: keys ``[B, Hk, Nk, D]``, same dtype and device; ``H % Hk == 0`` (grouped-query attention:
            query head ``h`` uses key head ``h // (H // Hk)``).
        layout: which positions are text, video and prefix tokens; must fit ``Nq`` and ``Nk``.
        reductions: names among ``cross`` ``[B, Nv, Nt]``, ``temporal`` ``[B, F, F]``, ``text``
            ``[B, Nt, Nt]``, ``received`` ``[B, Nk]``, ``probe`` ``[B, Q, Nk]`` and ``full``
            ``[B, Nq, Nk]`` (at most 2**26 entries).
        per_head: keep heads: every output gets ``H`` after ``B``; otherwise the mean over heads.
        scale: logit scale, default ``D ** -0.5``.
        key_padding_mask: ``[B, Nk]``, ``[B, 1, 1, Nk]`` or ``[B, H, 1, Nk]``; bool (True = keep) or
            an additive float bias (-inf excludes a key).
        probe: LongTensor ``[Q]`` of query positions whose full rows ``probe`` returns.
        lse: ``[B, H, Nq]``, the logsumexp of ``scale * q k^T + mask`` per row (natural log), e.g. from
            :func:`sdpa_with_lse`; then P = exp(logit - lse) and the row-statistics pass is skipped.
            Its precision is that of lse (about ``|lse| * 6e-8`` absolute in the exponent).
        backend: ``"auto"`` (Triton on CUDA, torch otherwise), ``"triton"``, ``"torch"`` or
            ``"reference"``.
        check_finite: raise ValueError when q or k holds NaN or inf (or lse NaN, or the mask NaN
            or +inf). The test costs one device sync; with False it is skipped and such inputs give
            NaN in the outputs (never silent zeros), for callers that check their maps later, as
            :func:`attnmap.capture` does once per step.
        text_groups: sequences of text positions (0 = the first text key); ``cross`` then has one
            column per group, the attention summed over its keys (a word of several sub-tokens, the
            padded tail of the text), instead of one per text key. Groups may overlap; a key
            listed twice in one group counts once. ``text`` keeps every text key.

    Returns:
        dict from reduction name to a float32 tensor on q's device.

    Example:
        >>> lay = Layout.joint(text=3, grid=(2, 2, 2))
        >>> q = k = torch.randn(1, 2, 11, 32)
        >>> out = attention_sums(q, k, lay, ("temporal", "received"))
        >>> out["temporal"].shape, out["received"].shape
        (torch.Size([1, 2, 2]), torch.Size([1, 11]))
    """
    call = prepare_call(
        q,
        k,
        layout,
        reductions,
        per_head=per_head,
        scale=scale,
        key_padding_mask=key_padding_mask,
        probe=probe,
        lse=lse,
        check_finite=check_finite,
        text_groups=text_groups,
    )
    chosen = _resolve_backend(backend, call.q)
    with torch.no_grad():
        if chosen == "reference":
            from attnmap import reference

            return group_text(call, reference.sums_of(call))
        if chosen == "triton":
            from attnmap.kernels.attn_reduce import attn_reduce

            return group_text(call, finish(call, attn_reduce(call)))
        if _native_serves(call):
            if call.text_groups is not None and "text" in call.reductions:  # text needs every key
                return group_text(call, finish(call, _native_sums(call, grouped=False)))
            return finish(call, _native_sums(call))  # the groups formed in the kernel
        return group_text(call, finish(call, _torch_sums(call)))


# -- attention forward with logsumexp --------------------------------------------------------------


def _float_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


def _trim_lse(lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    if lse.dim() == 4:
        lse = lse.squeeze(-1)
    return lse[..., : q.shape[2]].to(torch.float32)


def sdpa_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run ``F.scaled_dot_product_attention`` and also return the rows' logsumexp when torch can.

    The kernel is the one SDPA itself picks (``torch._fused_sdp_choice``), called through its aten
    op that also returns the logsumexp: flash (CPU or CUDA), memory-efficient or cuDNN. When SDPA
    would use the math path, or the call needs dropout, GQA broadcasting or padding of the head dim,
    the output comes from SDPA itself and lse is None.

    Args:
        q: ``[B, H, Nq, D]``. k, v: ``[B, H, Nk, D]`` and ``[B, H, Nk, Dv]``.
        attn_mask, scale, is_causal, dropout_p, enable_gqa: as in SDPA.

    Returns:
        ``(out [B, H, Nq, Dv], lse [B, H, Nq] fp32 or None)``; lse is the natural-log logsumexp of
        ``scale * q k^T + mask`` per row, what :func:`attention_sums` takes as ``lse``.
    """
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def plain() -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        out = sdpa(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
        return out, None

    simple = (
        dropout_p == 0.0
        and q.dim() == 4
        and k.dim() == 4
        and v.dim() == 4
        and q.shape[1] == k.shape[1] == v.shape[1]
        and q.shape[-1] % 8 == 0
        and v.shape[-1] == q.shape[-1]
    )
    if not simple:
        return plain()
    try:
        choice = int(torch._fused_sdp_choice(q, k, v, attn_mask, dropout_p, is_causal, scale=scale))
    except (RuntimeError, TypeError):
        return plain()
    aten = torch.ops.aten
    try:
        if q.device.type == "cpu" and choice == 1:
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, is_causal, attn_mask=_float_mask(attn_mask, q.dtype), scale=scale
            )
        elif q.is_cuda and choice == 1 and attn_mask is None:
            out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)[
                :2
            ]
        elif q.is_cuda and choice == 2:
            bias = _float_mask(attn_mask, q.dtype)
            if bias is not None:
                # as SDPA does: align the bias' rows to 16 elements (pad, slice back) while it is
                # still small, then broadcast it as a view; never a [B, H, Nq, Nk] copy
                nk = bias.shape[-1]
                if any(st % 16 for st in bias.stride()[:-1]) or bias.stride(-1) != 1:
                    bias = torch.nn.functional.pad(bias, (0, (-nk) % 16 or 16))[..., :nk]
                bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], nk)
            out, lse = aten._scaled_dot_product_efficient_attention(
                q, k, v, bias, True, 0.0, is_causal, scale=scale
            )[:2]
        elif q.is_cuda and choice == 3:
            out, lse = aten._scaled_dot_product_cudnn_attention(
                q, k, v, _float_mask(attn_mask, q.dtype), True, 0.0, is_causal, False, scale=scale
            )[:2]
        else:
            return plain()
    except RuntimeError:
        return plain()
    return out, _trim_lse(lse, q)
