"""Capture inside a context-parallel model: each rank's calls placed in the whole sequence, then
the ranks' maps combined so that each holds what one process would have captured.

diffusers' context parallelism (``model.enable_parallelism(config=ContextParallelConfig(...))``)
splits the sequence over the ranks of a flattened ``(ring, ulysses)`` mesh, rank ``r`` holding the
``r``-th equal chunk. Its dispatcher sees those local chunks; the backends that support it hand them
to ``_templated_context_parallel_attention(..., forward_op=...)``, which calls ``forward_op`` on
what each rank attends:

- Ulysses (degree U): an all-to-all, then one call of the whole sequence for ``H / U`` heads;
- ring (degree R): the keys and values all-gathered, then R calls of the local queries, the i-th
  against the key shard of ring rank ``(r + i) % R`` (together the whole keys), merged by their lse;
- unified: both; the ring's queries are then the Ulysses group's chunks, ``U`` chunks long.

The interceptor spies on that ``forward_op`` (:class:`OpSpy`) and :func:`assemble` turns its calls
into one call of whole keys for the rank's query rows and heads, a :class:`Shard` saying where they
sit; the reduction reads it with ``attention_sums(..., rows=...)`` (each row's softmax over every
key, exact in one pass) and :func:`widen` puts its heads among all of them. A call the model makes
outside the templated function on its local rows (Wan's cross-attention passes
``parallel_config=None``: local video rows against the whole text) is placed at the rank's chunk
(:meth:`Split.local`).

So every rank's maps are zero outside its query rows and heads, and scaled by the whole model's
counts: their sum over the ranks is the single process's. :func:`combine` adds them up over the
context-parallel group when a step ends (checking first that every rank holds the same maps), so that
every rank, rank 0 included, then holds the whole maps.

Under ring attention every reduction is exact too, the per-key ones (``received``, fine ``blocks``)
included: the shards' keys are the all-gathered views diffusers already holds, so each of the rank's
rows is reduced against every key in one pass (its softmax over the whole row, never a shard's partial
sums taken as whole), and no communication is added but the step's one all-reduce.

A call a rank makes outside the templated function is read only where its rows can be placed: its
chunk of the video against keys given whole (the cross-attention above), or a whole video call every
rank makes alike (kept by rank 0). Local rows against local keys are refused with a warning.

Frameworks whose sharding attnmap cannot see are refused with one warning naming them, never read as
whole; neither framework need be installed (detection is by module names, and the tests mimic them):
- xDiT: its ``USP`` (:data:`XDIT`, replaced where it is looked up) and attention processors whose class
  is defined under ``xfuser`` (:func:`foreign_processor`), while its ``xfuser.core.distributed`` state
  says more than one sequence-parallel rank (:func:`xdit_parallel`);
- ParaAttention: its function modes (:func:`foreign_mode`: a class under ``para_attn`` on the mode
  stack, not ``disabled``). They run their parallel attention only when ``func is
  F.scaled_dot_product_attention``; attnmap never replaces SDPA in ``torch._C._nn`` (where torch finds
  the ``func`` it hands a mode) and puts torch's own back on ``torch.nn.functional`` for the length of
  each call made under a mode, so the identity holds and their parallelism runs as it would alone.

Private to :mod:`attnmap.capture`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

#: the arguments of a diffusers templated forward op, in order
_OP_ARGS = ("ctx", "query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
#: xDiT's sequence-parallel attention: the module and the name it is imported by
XDIT = (("xfuser.model_executor.layers.usp", "USP"), ("xfuser.model_executor.layers.usp_legacy", "USP"))
XDIT_REFUSED = (
    "xDiT's USP runs this attention split across its sequence-parallel ranks (Ulysses heads, ring key "
    "shards) inside its own kernels, where attnmap cannot see whole rows or their place in the sequence; "
    "these calls are not recorded (run the model with diffusers' enable_parallelism to capture it)"
)
PARA_REFUSED = (
    "ParaAttention's {mode} computes this attention its own way inside its function mode (split across "
    "ranks: Ulysses heads, ring key shards on the rank's chunk of the sequence; or batched, or sparse), "
    "where attnmap cannot see whole rows or their place in the sequence; these calls are not recorded and "
    "ParaAttention runs as it would alone (run the model with diffusers' enable_parallelism to capture it)"
)


@dataclass(frozen=True)
class Shard:
    """Where one rank's call sits in the whole call: its query rows ``rows`` of ``queries``, its heads
    ``heads`` of ``num_heads``. ``keep`` False: a whole call every rank makes alike, kept by rank 0 only."""

    rows: tuple[int, int]
    queries: int
    heads: tuple[int, int]
    num_heads: int
    keep: bool = True


@dataclass(frozen=True, eq=False)
class Split:
    """A model's context-parallel split: this ``rank`` of ``world`` (diffusers' flattened ``(ring,
    ulysses)`` mesh, whose ``group`` the maps are combined over), and the ring and Ulysses degrees."""

    world: int
    rank: int
    group: Any
    ring: int = 1
    ulysses: int = 1

    def describe(self) -> dict[str, int]:
        """The split as metadata: ``{"ranks", "ring", "ulysses"}``."""
        return {"ranks": self.world, "ring": self.ring, "ulysses": self.ulysses}

    def chunk(self, n: int) -> tuple[int, int]:
        """This rank's positions of a sequence of ``n`` split over the ranks (``tensor_split``'s cut:
        equal chunks when ``world`` divides ``n``, as diffusers requires)."""
        base, extra = divmod(n, self.world)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (self.rank < extra)

    def local(self, nq: int, heads: int, whole: int) -> Optional[Shard]:
        """The shard of a call made on this rank's chunk of ``whole`` query positions (``nq`` of them),
        None when ``nq`` is not that chunk; a whole call (``nq == whole``) is kept by rank 0."""
        if nq == whole:
            return Shard((0, whole), whole, (0, heads), heads, keep=self.rank == 0)
        lo, hi = self.chunk(whole)
        return Shard((lo, hi), whole, (0, heads), heads) if hi - lo == nq else None


def split_of(module: torch.nn.Module) -> Optional[Split]:
    """The context-parallel split diffusers' ``enable_parallelism`` gave ``module`` (None: none, or
    one rank)."""
    config: Any = getattr(getattr(module, "_parallel_config", None), "context_parallel_config", None)
    mesh = getattr(config, "_flattened_mesh", None)
    if mesh is None:
        return None
    import torch.distributed as dist

    group = mesh.get_group()
    world = dist.get_world_size(group)
    if world <= 1:
        return None
    ring, ulysses = int(config.ring_degree), int(config.ulysses_degree)
    return Split(world=world, rank=dist.get_rank(group), group=group, ring=ring, ulysses=ulysses)


class OpSpy:
    """Stands in for a templated ``forward_op``: runs it unchanged and keeps what each call attended
    (``query``, ``key`` ``[B, S, H, D]`` views, ``attn_mask``, ``scale``)."""

    def __init__(self, op: Callable[..., Any]) -> None:
        self.op = op
        self.calls: list[dict[str, Any]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bound = dict(zip(_OP_ARGS, args))
        bound.update((k, v) for k, v in kwargs.items() if k in _OP_ARGS)
        self.calls.append({k: bound.get(k) for k in ("query", "key", "attn_mask", "scale")})
        return self.op(*args, **kwargs)


@dataclass(frozen=True, eq=False)
class Assembled:
    """One rank's templated attention as one call: ``query`` ``[B, h, rows, D]`` against every key
    ``key`` ``[B, h, Nk, D]`` (the shards in the sequence's order), with its ``mask`` and ``scale``."""

    query: torch.Tensor
    key: torch.Tensor
    mask: Optional[torch.Tensor]
    scale: Optional[float]
    shard: Shard
    mode: str


def assemble(calls: Sequence[dict[str, Any]], config: Any) -> Union[Assembled, str]:
    """The calls a templated context-parallel attention made to its forward op, as one call of the
    rank's query rows and heads against the whole keys; a reason where they are not what the mode
    makes (a mesh attnmap cannot place, shards of unequal lengths)."""
    cp = getattr(config, "context_parallel_config", None)
    if cp is None or not calls:
        return "the context-parallel attention made no call attnmap could see"
    ring, ulysses = int(cp.ring_degree), int(cp.ulysses_degree)
    mode = "unified" if ring > 1 and ulysses > 1 else ("ring" if ring > 1 else "ulysses")
    if getattr(cp, "ulysses_anything", False) or getattr(cp, "ring_anything", False):
        return f"{mode} attention with uneven shards (ulysses_anything / ring_anything) is not read"
    r = int(cp._ring_local_rank) if ring > 1 else 0
    u = int(cp._ulysses_local_rank) if ulysses > 1 else 0
    if _flat_rank(cp) not in (None, r * ulysses + u):
        return f"{mode} attention on a mesh whose sequence chunks are not in (ring, ulysses) order"
    if len(calls) != ring:
        return f"{mode} attention made {len(calls)} forward calls, {ring} expected (one per ring rank)"
    query = calls[0]["query"]
    if any(c["query"] is not query for c in calls):
        return f"{mode} attention changed its queries between its ring steps"
    sq, hl = int(query.shape[1]), int(query.shape[2])
    keys: list[Any] = [None] * ring
    masks: list[Any] = [None] * ring
    for i, call in enumerate(calls):  # step i attends the key shard of ring rank (r + i) % R
        keys[(r + i) % ring], masks[(r + i) % ring] = call["key"], call["attn_mask"]
    if len({tuple(k.shape) for k in keys}) != 1:
        return f"{mode} attention's key shards differ in shape"
    key = keys[0] if ring == 1 else torch.cat(keys, dim=1)
    mask: Optional[torch.Tensor] = None
    if any(m is not None for m in masks):
        nk = int(keys[0].shape[1])
        if not all(isinstance(m, torch.Tensor) and m.shape[-1] == nk for m in masks):
            return f"{mode} attention's masks do not cover its key shards one by one"
        mask = masks[0] if ring == 1 else torch.cat(masks, dim=-1)
    shard = Shard((r * sq, (r + 1) * sq), ring * sq, (u * hl, (u + 1) * hl), ulysses * hl)
    scale = calls[0]["scale"]
    return Assembled(query.transpose(1, 2), key.transpose(1, 2), mask, scale, shard, mode)


def _flat_rank(cp: Any) -> Optional[int]:
    """This rank's chunk of the sequence: its rank in the flattened mesh (None: no such mesh)."""
    mesh = getattr(cp, "_flattened_mesh", None)
    if mesh is None:
        return None
    import torch.distributed as dist

    return int(dist.get_rank(mesh.get_group()))


def widen(out: dict[str, torch.Tensor], shard: Shard, per_head: bool) -> dict[str, torch.Tensor]:
    """A shard call's outputs among all the heads: per head, its heads in their place and zero for the
    others; else the mean over its heads times its share of them (so that the ranks' outputs add up
    to the mean over every head). A whole call another rank keeps gives zero (NaN stays NaN)."""
    lo, hi = shard.heads
    done: dict[str, torch.Tensor] = {}
    for name, t in out.items():
        if not shard.keep:
            t = torch.where(t.isnan(), t, torch.zeros_like(t))
        elif (lo, hi) != (0, shard.num_heads):
            if per_head:
                wide = t.new_zeros(t.shape[0], shard.num_heads, *t.shape[2:])
                wide[:, lo:hi] = t
                t = wide
            else:
                t = t * ((hi - lo) / shard.num_heads)
        done[name] = t
    return done


def foreign_mode() -> Optional[str]:
    """The refusal of a ParaAttention function mode that is active, None where none is.

    ParaAttention's modes (``para_attn.para_attn_interface``: ``UnifiedAttnMode``, ``UlyssesAttnMode``,
    ``RingAttnMode``; also ``InBatchAttnMode`` and the sparse modes of ``para_attn.sparse_attn``) take
    every ``F.scaled_dot_product_attention`` call made inside them and compute it their own way: split
    across ranks (Ulysses' heads, the ring's key shards, on the rank's local chunk of the sequence), or
    batched, or sparse. attnmap sees the local call the model made, not what the mode computed, so it
    reads none of them. A mode is known by its class's module (``para_attn`` or below) and its
    class-level ``disabled`` flag; ParaAttention itself need not be installed (the tests mimic it).
    """
    from torch.overrides import _get_current_function_mode_stack

    for mode in _get_current_function_mode_stack():
        cls = type(mode)
        if cls.__module__.split(".")[0] == "para_attn" and not getattr(cls, "disabled", False):
            return PARA_REFUSED.format(mode=cls.__name__)
    return None


def xdit_parallel() -> bool:
    """xDiT runs with more than one sequence-parallel rank (its ``xfuser.core.distributed`` state, where
    it has been imported and initialised; xDiT itself need not be installed)."""
    import sys

    state = sys.modules.get("xfuser.core.distributed")
    size = getattr(state, "get_sequence_parallel_world_size", None)
    try:
        return callable(size) and int(size()) > 1
    except Exception:  # its state not initialised: no sequence parallelism
        return False


def foreign_processor(module: torch.nn.Module) -> Optional[str]:
    """The refusal of an attention module whose processor is xDiT's (its class defined under
    ``xfuser``) while xDiT runs sequence parallelism: such processors run USP's all-to-all and ring
    kernels on the rank's chunk of the sequence, which attnmap cannot see whole. None otherwise."""
    processor = getattr(module, "processor", None)
    if processor is None or type(processor).__module__.split(".")[0] != "xfuser":
        return None
    return XDIT_REFUSED if xdit_parallel() else None


def _manifest(keys: Sequence[Any], totals: Sequence[torch.Tensor], counts: Sequence[torch.Tensor]) -> int:
    """A checksum of the maps a rank holds: their keys, shapes and call counts."""
    text = repr([(k, tuple(t.shape), c.tolist()) for k, t, c in zip(keys, totals, counts)])
    return zlib.crc32(text.encode())


def combine(
    keys: Sequence[Any], totals: Sequence[torch.Tensor], counts: Sequence[torch.Tensor], split: Split
) -> Union[list[torch.Tensor], str]:
    """The sum over the ranks of ``split.group`` of each rank's ``totals`` (the maps' running sums),
    or the reason they were not combined: the ranks hold different maps (keys, shapes or call counts
    differ), or a collective failed (a rank that never arrived: the process group's timeout).

    Two collectives, reached by every rank at the end of each step: an all-gather of each rank's
    checksum, then one all-reduce of every map at once.
    """
    import torch.distributed as dist

    device = totals[0].device if totals else torch.device("cpu")
    if device.type == "cpu" and dist.get_backend(split.group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    mine = torch.tensor([_manifest(keys, totals, counts)], dtype=torch.int64, device=device)
    seen = [torch.zeros_like(mine) for _ in range(split.world)]
    try:
        dist.all_gather(seen, mine, group=split.group)
        if any(int(s) != int(mine) for s in seen):
            return (
                "the context-parallel ranks hold different maps (names, shapes or call counts differ), so "
                "their rows cannot be added up"
            )
        if not totals:
            return []
        flat = torch.cat([t.reshape(-1) for t in totals]).to(device)
        dist.all_reduce(flat, group=split.group)
    except RuntimeError as error:
        return f"combining the maps over the context-parallel ranks failed ({error})"
    out, at = [], 0
    for t in totals:
        out.append(flat[at : at + t.numel()].view_as(t).to(t.device))
        at += t.numel()
    return out


__all__ = [
    "PARA_REFUSED",
    "XDIT",
    "XDIT_REFUSED",
    "Assembled",
    "OpSpy",
    "Shard",
    "Split",
    "assemble",
    "combine",
    "foreign_mode",
    "foreign_processor",
    "split_of",
    "widen",
    "xdit_parallel",
]
