"""The attention forward with the rows' logsumexp: :func:`sdpa_with_lse`.

With the logsumexp of every query row known, a reduction needs one pass over the keys instead of
two (P = exp(logit - lse)); capture's ``one_pass`` runs the model's attention through this.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


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
