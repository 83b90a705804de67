"""An independent reference for video-LLM attention: what transformers' attention interface saw, and
the float64 softmax of it. Imports nothing from attnmap.

:class:`InterfaceLog` wraps every function of transformers' ``AttentionInterface`` and every loaded
modeling file's ``eager_attention_forward`` (the two places a transformers attention module looks
up its attention function at each call) and keeps each call's ``q [B, H, q, D]``, ``k [B, Hkv, kv, D]``,
mask and keyword arguments. :func:`probs` is the softmax of one call in float64, the KV heads
repeated and the causal offset ``kv - q`` applied where the call relies on ``is_causal`` instead of a
mask. :func:`answer_map`, :func:`word_map` and :func:`temporal` turn rows of it into the maps a video
LLM capture records.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch


@dataclass
class Call:
    """One call at the attention interface."""

    #: the attention module's qualified name in the model
    name: str
    #: which function ran: ``sdpa``, ``eager`` ...
    impl: str
    query: torch.Tensor
    key: torch.Tensor
    mask: Any
    #: the module's ``is_causal`` attribute, which transformers' SDPA uses when the call passes none
    module_causal: Optional[bool]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        s = self.kwargs.get("scaling", self.kwargs.get("scale"))
        return float(s) if s is not None else self.query.shape[-1] ** -0.5

    @property
    def causal(self) -> bool:
        """Whether the call is causal through ``is_causal`` (not through its mask)."""
        flag = self.kwargs.get("is_causal")
        if flag is None:
            flag = self.module_causal if self.module_causal is not None else True
        return bool(flag) and self.mask is None


class InterfaceLog:
    """Logs every call that reaches transformers' attention functions inside ``with log:``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.names = {id(m): n for n, m in model.named_modules()}
        self.calls: list[Call] = []
        self._undo: list[Callable[[], None]] = []

    def _wrap(self, impl: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def attention(
            module: Any, query: Any, key: Any, value: Any, attention_mask: Any, *args: Any, **kw: Any
        ) -> Any:
            out = fn(module, query, key, value, attention_mask, *args, **kw)
            if id(module) in self.names:
                extra = dict(kw)
                for pname, arg in zip(("dropout", "scaling"), args):
                    extra[pname] = arg
                self.calls.append(
                    Call(
                        name=self.names[id(module)],
                        impl=impl,
                        query=query.detach(),
                        key=key.detach(),
                        mask=attention_mask.detach()
                        if isinstance(attention_mask, torch.Tensor)
                        else attention_mask,
                        module_causal=getattr(module, "is_causal", None),
                        kwargs=extra,
                    )
                )
            return out

        return attention

    def __enter__(self) -> InterfaceLog:
        from transformers.modeling_utils import AttentionInterface

        mapping = AttentionInterface._global_mapping
        for key, fn in list(mapping.items()):
            mapping[key] = self._wrap(key, fn)
            self._undo.append(lambda k=key, f=fn: mapping.__setitem__(k, f))
        for modname, module in list(sys.modules.items()):
            fn = getattr(module, "eager_attention_forward", None)
            if modname.startswith("transformers.models.") and callable(fn):
                module.eager_attention_forward = self._wrap("eager", fn)
                self._undo.append(lambda m=module, f=fn: setattr(m, "eager_attention_forward", f))
        return self

    def __exit__(self, *exc: Any) -> None:
        while self._undo:
            self._undo.pop()()

    def of(self, prefix: str) -> list[Call]:
        """The calls of modules whose name starts with ``prefix``."""
        return [c for c in self.calls if c.name.startswith(prefix)]


@contextmanager
def logged(model: torch.nn.Module) -> Iterator[InterfaceLog]:
    """``with logged(model) as log:`` logs every attention call of ``model`` inside the block."""
    with InterfaceLog(model) as log:
        yield log


# -- the reference softmax --------------------------------------------------------------------------
def probs(call: Call) -> torch.Tensor:
    """P = softmax(scale * q k^T + mask) of one call in float64, ``[B, H, q, kv]``.

    The KV heads are repeated to the query heads (head ``h`` reads KV head ``h // (H / Hkv)``). The
    mask is the call's: a bool mask keeps True, a float mask is added (transformers' eager masks hold
    the dtype's minimum where masked); where the call has no mask and is causal through
    ``is_causal``, query ``i`` sees keys ``j <= i + (kv - q)`` (a decode step's query is the last
    row). A ``softcap`` keyword caps the scores as ``softcap * tanh(s / softcap)`` before the mask.
    A query row that its mask hides entirely is NaN under a bool mask and uniform under a float one
    (as eager attention gives it).
    """
    q, k = call.query.double(), call.key.double()
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    s = q @ k.transpose(-1, -2) * call.scaling
    cap = call.kwargs.get("softcap")
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    mask = call.mask
    if isinstance(mask, torch.Tensor):
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    elif mask is None and call.causal:
        nq, nk = s.shape[-2:]
        i = torch.arange(nq)[:, None] + (nk - nq)
        s = s.masked_fill(torch.arange(nk)[None, :] > i, float("-inf"))
    elif mask is not None:
        raise TypeError(f"cannot read a mask of type {type(mask).__name__}")
    return torch.softmax(s, dim=-1)


# -- rows of P as maps on the LLM's video grid ------------------------------------------------------
def _on_grid(rows: torch.Tensor, cells: torch.Tensor, key_offset: int) -> torch.Tensor:
    """``rows [..., kv]`` read at the keys of ``cells [F, H, W]`` (sequence positions, -1 for none) ->
    ``[..., F, H, W]``; a cell outside the keys (before ``key_offset``, or none) reads 0."""
    idx = cells - key_offset
    inside = (cells >= 0) & (idx >= 0) & (idx < rows.shape[-1])
    out = rows[..., idx.clamp(0, rows.shape[-1] - 1)]
    return out * inside


def answer_map(
    p: torch.Tensor, cells: Sequence[torch.Tensor], *, key_offset: int = 0, per_head: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The last query row's attention to the video tokens, on the LLM's grid.

    Args:
        p: ``[B, H, q, kv]`` probabilities of one call (prefill: its last row predicts the first new
            token; decode: its only row).
        cells: per batch row ``[F, H, W]`` sequence positions of the video tokens (-1: no token).
        key_offset: the sequence position of key 0 (a sliding-window cache at decode holds only the
            last ``kv`` positions).
        per_head: keep the heads.

    Returns:
        ``(map, rest)``: ``map [B, F, H, W]`` (``[B, H, F, H, W]`` per head), mean over heads, and
        ``rest [B]`` (``[B, H]``), the row's mass on every other key (text, system prompt, sinks).
    """
    rows = p[:, :, -1]
    maps = torch.stack([_on_grid(rows[b], cells[b], key_offset) for b in range(len(cells))])
    rest = 1.0 - maps.flatten(2).sum(-1)
    if not per_head:
        maps, rest = maps.mean(1), rest.mean(1)
    return maps, rest


def mass(p: torch.Tensor, positions: Sequence[Sequence[int]], *, key_offset: int = 0) -> torch.Tensor:
    """The last query row's mass on the keys at ``positions`` (per batch row), mean over heads: ``[B]``."""
    rows = p[:, :, -1].mean(1)
    out = []
    for b, pos in enumerate(positions):
        idx = torch.tensor(
            [x - key_offset for x in pos if 0 <= x - key_offset < rows.shape[-1]], dtype=torch.long
        )
        out.append(rows[b, idx].sum())
    return torch.stack(out)


def word_map(
    p: torch.Tensor, cells: Sequence[torch.Tensor], words: Sequence[Sequence[int]], *, key_offset: int = 0
) -> torch.Tensor:
    """A prompt word's rows over the video: the mean over the word's query rows (its tokens' sequence
    positions, per batch row) and heads of their attention to the video tokens, ``[B, F, H, W]``.
    ``p`` is a prefill call's ``[B, H, N, N]``."""
    out = []
    for b in range(len(cells)):
        rows = p[b, :, list(words[b])].mean(dim=(0, 1))
        out.append(_on_grid(rows, cells[b], key_offset))
    return torch.stack(out)


def temporal(p: torch.Tensor, cells: Sequence[torch.Tensor]) -> torch.Tensor:
    """``temporal [B, F, F]`` among the video tokens of a prefill call ``p [B, H, N, N]``: for query
    frame f and key frame g, the mean over frame f's video tokens (and heads) of their mass on frame
    g's video tokens. A frame with no tokens (all dropped) gives a row of NaN."""
    out = []
    for b, c in enumerate(cells):
        frames = c.shape[0]
        pos = [c[f][c[f] >= 0] for f in range(frames)]
        ph = p[b].mean(0)
        t = torch.stack(
            [
                torch.stack([ph[pos[f]][:, pos[g]].sum(-1).mean() for g in range(frames)])
                for f in range(frames)
            ]
        )
        out.append(t)
    return torch.stack(out)


# -- the vision tower's own token order -------------------------------------------------------------
def block_major_cells(grid: tuple[int, int, int], merge: int) -> torch.Tensor:
    """``[T*H*W, 3]``: the (t, h, w) patch of each row of a Qwen-style ``pixel_values_videos`` (Qwen2-VL,
    Qwen2.5-VL, Qwen3-VL, GLM-4.1V, VideoLLaMA3): frame by frame, the ``merge x merge`` blocks in raster
    order over the merged grid, each block's patches in raster order. The LLM token of row r is
    ``r // merge**2`` (raster over (t, H / merge, W / merge))."""
    t, h, w = grid
    m = merge
    cells = torch.stack(
        torch.meshgrid(
            torch.arange(t),
            torch.arange(h // m),
            torch.arange(w // m),
            torch.arange(m),
            torch.arange(m),
            indexing="ij",
        ),
        dim=-1,
    ).reshape(-1, 5)
    return torch.stack([cells[:, 0], cells[:, 1] * m + cells[:, 3], cells[:, 2] * m + cells[:, 4]], dim=-1)


def window_order(grid: tuple[int, int, int], merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL's vision order: ``(order, lengths)``, where ``order[i]`` is the block-major row (see
    :func:`block_major_cells`) at position i of the tower's sequence and ``lengths`` the patches of each
    window call. Each frame is cut into windows of ``window x window`` merged tokens
    (``window = window_size // patch_size // merge``; the last row and column of windows are cut
    short), windows in raster order, merged tokens in raster order inside a window, each token's
    ``merge**2`` patches together. Every block runs in this order: the windowed blocks one call per
    window, the full-attention blocks one call per frame. Undo it with ``argsort(order)``."""
    t, h, w = grid
    hm, wm = h // merge, w // merge
    unit = merge * merge
    order: list[int] = []
    lengths: list[int] = []
    for f in range(t):
        for y0 in range(0, hm, window):
            for x0 in range(0, wm, window):
                n = 0
                for y in range(y0, min(y0 + window, hm)):
                    for x in range(x0, min(x0 + window, wm)):
                        token = (f * hm + y) * wm + x
                        order += range(token * unit, (token + 1) * unit)
                        n += unit
                lengths.append(n)
    return torch.tensor(order), lengths
