"""Attention reductions without the N x N map: :func:`attention_sums` and :func:`sdpa_with_lse`.

``attention_sums`` takes the q and k of one attention call (SDPA layout ``[B, H, N, D]``) and a
:class:`~attnmap.layout.Layout`, forms P = softmax(scale * q k^T + mask) in fp32 and reduces it into
small maps. The call is validated once (:mod:`attnmap.reduce.contract`, a leaf module) and handed
to one backend, each in its own module that imports only the contract:

- ``triton`` (:mod:`attnmap.reduce.triton`): the fused kernel, CUDA (or CPU under
  ``TRITON_INTERPRET=1``);
- ``native`` (:mod:`attnmap.reduce.native`): the Rust CPU kernel, an online softmax per row summed
  into key columns;
- ``blocks`` (:mod:`attnmap.reduce.blocks`): torch on any device, blocks of query rows at a time;
- ``reference`` (:mod:`attnmap.reduce.reference`): P materialised whole, the tests' oracle.

``auto`` picks the first of triton, native and blocks that serves the call. With the rows'
logsumexp given (``lse``), every backend takes P = exp(logit - lse) in one pass.

:func:`partial_sums` forms the reductions of a shard of the keys per row and head with each row's
logsumexp, which :func:`merge_partials` merges exactly across shards (as ring attention merges its
outputs) and :func:`finish_partial` turns into ``attention_sums``' outputs
(:mod:`attnmap.reduce.partial`).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Optional

import torch

from attnmap.errors import AttnmapError
from attnmap.layout import Layout
from attnmap.reduce.contract import (
    FULL_LIMIT,
    REDUCTIONS,
    AttentionCall,
    BlockSize,
    KeyRange,
    Reductions,
    prepare_call,
)
from attnmap.reduce.lse import sdpa_with_lse
from attnmap.reduce.partial import PARTIAL, Partial, finish_partial, merge_partials, prepare_partial

#: backend name -> the module that implements it (``serves(call)`` and ``run(call)``).
BACKENDS: dict[str, str] = {
    "triton": "attnmap.reduce.triton",
    "native": "attnmap.reduce.native",
    "blocks": "attnmap.reduce.blocks",
    "reference": "attnmap.reduce.reference",
}
_AUTO = ("triton", "native", "blocks")


def backend(name: str) -> ModuleType:
    """The module of a backend name of :data:`BACKENDS`."""
    if name not in BACKENDS:
        raise AttnmapError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}, got {name!r}")
    return importlib.import_module(BACKENDS[name])


def choose(name: str, call: AttentionCall) -> ModuleType:
    """The backend module that reduces ``call``: ``name`` itself (an error when it cannot serve the
    call, with its reason), or for ``"auto"`` the first of triton, native and blocks that can."""
    if name == "auto":
        for candidate in _AUTO:
            if candidate == "triton" and not call.q.is_cuda:
                continue  # the interpreter is chosen by name only
            module = backend(candidate)
            if module.serves(call) is None:
                return module
        raise AssertionError("the blocks backend serves every call")  # pragma: no cover
    module = backend(name)
    reason = module.serves(call)
    if reason is not None:
        raise AttnmapError(f"backend={name!r} cannot reduce this call: {reason}")
    return module


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
    block_size: Optional[BlockSize] = None,
    rows: Optional[tuple[int, int]] = None,
    key_range: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    key_positions: Optional[torch.Tensor] = None,
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
            ``[B, Nt, Nt]``, ``received`` ``[B, Nk]``, ``probe`` ``[B, Q, Nk]``, ``full``
            ``[B, Nq, Nk]`` (at most 2**26 entries), and the statistics of sparse-attention design:
            ``blocks`` (see ``block_size``), ``distance`` ``[B, F, H, W]`` (entry ``(dt, dy, dx)``:
            P summed over the video query/key pairs ``dt`` frames, ``dy`` rows and ``dx`` columns
            apart, divided by the number of video queries; it sums to the mean video-to-video
            mass) and ``entropy`` ``[B, Nq]`` (``-sum P ln P`` of each row). All are exact: the
            softmax is over every key.
        per_head: keep heads: every output gets ``H`` after ``B``; otherwise the mean over heads.
        scale: logit scale, default ``D ** -0.5``.
        key_padding_mask: ``[B, Nk]``, ``[B, 1, 1, Nk]`` or ``[B, H, 1, Nk]``; bool (True = keep) or
            an additive float bias (-inf excludes a key).
        probe: LongTensor ``[Q]`` of query positions whose full rows ``probe`` returns.
        lse: ``[B, H, Nq]``, the logsumexp of ``scale * q k^T + mask`` per row (natural log), e.g. from
            :func:`sdpa_with_lse`; then P = exp(logit - lse) and the row-statistics pass is skipped.
            Its precision is that of lse (about ``|lse| * 6e-8`` absolute in the exponent).
        backend: a name of :data:`BACKENDS`: ``"auto"`` (Triton on CUDA; on the CPU the native
            kernel where it serves the call; blocks otherwise), ``"triton"``, ``"native"``,
            ``"blocks"`` or ``"reference"``. A named backend that cannot serve the call raises.
        check_finite: raise AttnmapError when q or k holds NaN or inf (or lse NaN, or the mask NaN
            or +inf). The test costs one device sync; with False it is skipped and such inputs give
            NaN in the outputs (never silent zeros), for callers that check their maps later, as
            :func:`attnmap.capture` does once per step.
        text_groups: sequences of text positions (0 = the first text key); ``cross`` then has one
            column per group, the attention summed over its keys (a word of several sub-tokens, the
            padded tail of the text), instead of one per text key. Groups may overlap; a key
            listed twice in one group counts once. ``text`` keeps every text key.
        block_size: the blocks of ``blocks``: an int or a pair ``(bq, bk)`` gives token tiles in
            the call's own token order, ``[B, ceil(Nq / bq), ceil(Nk / bk)]``, each value the mean
            over the tile's query rows of P summed over the tile's keys (rows sum to 1); a triple
            ``(t, h, w)`` gives video cubes of the grid (video queries to video keys only, cubes in
            raster order, edge cubes smaller), ``[B, C, C]`` with
            ``C = ceil(F / t) * ceil(H / h) * ceil(W / w)``; ``(1, H, W)`` is exactly ``temporal``.
        rows: ``(lo, hi)``, the layout's query positions that q holds (one rank's query shard under
            context parallelism; every key is in k, and each row's softmax is over all of them).
            The outputs then have the whole layout's shapes, zero outside those rows, and are
            divided by the whole layout's counts (``received`` by every query, ``temporal`` by a
            frame's tokens ...), so that the outputs of the shards of the queries add up exactly to
            the whole call's; ``lse`` is then ``[B, H, hi - lo]``, the rows' logsumexp over every
            key. Not with ``probe`` nor ``key_range``.
        key_range: ``(lo, hi)``, integer tensors ``[B, Nq]`` (or ``[Nq]`` for every batch row): query
            row ``i`` attends only the keys whose position lies in ``[lo[i], hi[i])`` (with the
            ``key_padding_mask`` as well): causal attention with a decode offset, a sliding window, a
            bidirectional span. A row left with no key contributes zero. Reduced by the ``blocks``
            and ``reference`` backends (``auto`` picks ``blocks``).
        key_positions: ``[Nk]`` or ``[B, Nk]`` integers, the position of each key that ``key_range``
            is read against (default ``0 .. Nk-1``), so that the keys may come in a layout's order
            (a video LLM's video tokens first) and still be masked by where they sit in the sequence.

    Returns:
        dict from reduction name to a float32 tensor on q's device.

    Example:
        >>> lay = Layout.joint(text=3, grid=(2, 2, 2))
        >>> q = k = torch.randn(1, 2, 11, 32)
        >>> out = attention_sums(q, k, lay, ("temporal", "received"))
        >>> out["temporal"].shape, out["received"].shape
        (torch.Size([1, 2, 2]), torch.Size([1, 11]))
        >>> stats = attention_sums(q, k, lay, ("blocks", "distance", "entropy"), block_size=(1, 2, 2))
        >>> stats["blocks"].shape, stats["distance"].shape, stats["entropy"].shape
        (torch.Size([1, 2, 2]), torch.Size([1, 2, 2, 2]), torch.Size([1, 11]))
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
        block_size=block_size,
        rows=rows,
        key_range=key_range,
        key_positions=key_positions,
    )
    module = choose(backend, call)
    with torch.no_grad():
        out: dict[str, torch.Tensor] = module.run(call)
    return out


#: The backends that form partial sums (:func:`partial_sums`).
_PARTIAL_BACKENDS = ("triton", "native", "reference")


def partial_sums(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: Layout,
    reductions: Reductions = ("cross", "temporal"),
    *,
    rows: Optional[tuple[int, int]] = None,
    keys: Optional[tuple[int, int]] = None,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
    check_finite: bool = True,
    text_groups: Optional[Sequence[Sequence[int]]] = None,
) -> Partial:
    """The reductions of a shard of the keys, per query row and head, with each row's logsumexp over
    the shard: what merges exactly across shards (:func:`merge_partials`), as ring attention merges
    its outputs, into :func:`attention_sums`' outputs (:func:`finish_partial`).

    Args:
        q: ``[B, H, R, D]``, the layout's query positions ``rows`` (all of them by default).
        k: ``[B, Hk, Nk_shard, D]``, the layout's key positions ``keys`` (all by default).
        layout: the whole call's layout (positions of text, video and prefix tokens).
        reductions: some of :data:`PARTIAL`: ``cross``, ``temporal``, ``text``, ``full``, ``entropy``
            (the others sum over rows per key: run :func:`attention_sums` with the merged lse).
        rows, keys: ``(lo, hi)`` positions of the layout that q and k hold.
        scale: logit scale, default ``D ** -0.5``.
        key_padding_mask: the shard's keys' mask, as in :func:`attention_sums` (``Nk`` = the shard's).
        backend: ``"auto"`` (the native kernel for CPU tensors, Triton for CUDA ones), ``"native"``,
            ``"triton"`` (``cross``, ``text``, ``full`` and ``entropy``; CUDA, or the CPU under
            ``TRITON_INTERPRET=1``) or ``"reference"`` (float64, P of the shard materialised).
        check_finite, text_groups: as in :func:`attention_sums`.

    Returns:
        a :class:`Partial`: ``sums[name]`` ``[B, H, R_name, C]`` fp32, each row's P over the shard's
        keys normalised over them and summed into the reduction's columns, and ``lse`` ``[B, H, R]``.

    Example:
        >>> lay = Layout.self_attn(grid=(2, 2, 2))
        >>> q = k = torch.randn(1, 2, 8, 16)
        >>> parts = [partial_sums(q, k[:, :, lo:hi], lay, ("temporal",), keys=(lo, hi)) for lo, hi in ((0, 3), (3, 8))]
        >>> whole = finish_partial(merge_partials(parts))
        >>> torch.allclose(whole["temporal"], attention_sums(q, k, lay, ("temporal",))["temporal"], atol=1e-6)
        True
    """
    call = prepare_partial(
        q,
        k,
        layout,
        (reductions,) if isinstance(reductions, str) else tuple(reductions),
        rows=rows,
        keys=keys,
        scale=scale,
        key_padding_mask=key_padding_mask,
        check_finite=check_finite,
        text_groups=text_groups,
    )
    name = backend
    if name == "auto":
        name = "native" if call.q.device.type == "cpu" else "triton"
    if name not in _PARTIAL_BACKENDS:
        raise AttnmapError(f"backend must be 'auto' or one of {', '.join(_PARTIAL_BACKENDS)}, got {name!r}")
    module = importlib.import_module(BACKENDS[name])
    reason = module.serves_partial(call)
    if reason is not None:
        raise AttnmapError(
            f"backend={name!r} cannot form these partial sums: {reason} (backend='reference' forms any, "
            "materialising the shard's P: small inputs only)"
        )
    with torch.no_grad():
        sums, lse = module.partial(call)
    return Partial(
        layout=call.layout,
        reductions=call.reductions,
        rows=call.rows,
        keys=(call.keys,),
        text_groups=call.text_groups,
        sums=sums,
        lse=lse,
    )


__all__ = [
    "BACKENDS",
    "FULL_LIMIT",
    "PARTIAL",
    "REDUCTIONS",
    "AttentionCall",
    "KeyRange",
    "Partial",
    "attention_sums",
    "backend",
    "choose",
    "finish_partial",
    "merge_partials",
    "partial_sums",
    "prepare_call",
    "sdpa_with_lse",
]
