"""The materialising oracle of :func:`attnmap.attention_sums`: plain fp32 torch, P held whole.

Same contract as :func:`attnmap.attention_sums` (same arguments, validation and outputs), but it
builds P = softmax(scale * q k^T + mask) as one ``[B, H, Nq, Nk]`` tensor with ``torch.softmax`` and
slices it. It is what every backend is tested against; use it on small inputs only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch

from attnmap.layout import Layout
from attnmap.reduce.contract import AttentionCall, Reductions, group_text, prepare_call


def probabilities(call: AttentionCall) -> torch.Tensor:
    """The whole P ``[B, H, Nq, Nk]`` in fp32 (rows whose keys are all masked are zero)."""
    h, hk = call.heads, call.kv_heads
    q = call.q.to(torch.float32)
    k = call.k.to(torch.float32).repeat_interleave(h // hk, dim=1)
    logits = (q @ k.transpose(-1, -2)) * call.scale
    if call.bias is not None:
        logits = logits + call.bias[:, :, None, :]
    if call.lse is not None:
        lse = call.lse.clone()
        lse[torch.isneginf(lse)] = math.inf
        return torch.exp(logits - lse[..., None])
    dead = torch.isneginf(logits).all(dim=-1, keepdim=True)
    p = torch.softmax(logits, dim=-1)
    return torch.where(dead, torch.zeros_like(p), p)


def serves(call: AttentionCall) -> Optional[str]:
    """Every call (on small inputs: P is held whole)."""
    return None


def run(call: AttentionCall) -> dict[str, torch.Tensor]:
    """The contract's outputs of a validated call, from the materialised P."""
    return group_text(call, sums_of(call))


def sums_of(call: AttentionCall) -> dict[str, torch.Tensor]:
    """Every requested reduction of a validated call, from the materialised P."""
    p = probabilities(call)
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
            r = p[:, :, call.probe]
        else:  # full
            r = p
        out[name] = (r if call.per_head else r.mean(dim=1)).to(torch.float32).contiguous()
    return out


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
    check_finite: bool = True,
    text_groups: Optional[Sequence[Sequence[int]]] = None,
) -> dict[str, torch.Tensor]:
    """:func:`attnmap.attention_sums`, computed by materialising P (O(B H Nq Nk) memory).

    Args and Returns: as :func:`attnmap.attention_sums` (without ``backend``).

    Example:
        >>> lay = Layout.cross(grid=(1, 2, 2), text=3)
        >>> q, k = torch.randn(1, 2, 4, 32), torch.randn(1, 2, 3, 32)
        >>> attention_sums(q, k, lay, ("cross",))["cross"].sum(-1)
        tensor([[1.0000, 1.0000, 1.0000, 1.0000]])
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
    with torch.no_grad():
        return run(call)
