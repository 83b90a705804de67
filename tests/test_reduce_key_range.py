"""Per-row key ranges of ``attention_sums`` (``key_range``, ``key_positions``): causal attention with a
decode offset, sliding windows, bidirectional spans and keys in a layout's order, against a float64
softmax under the equivalent dense mask; the backends that cannot read them say so and ``auto``
falls back to ``blocks``."""

from __future__ import annotations

import pytest
import torch

import attnmap
from attnmap import reduce
from attnmap.errors import AttnmapError
from attnmap.layout import Layout


def _oracle(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """P [B, H, Nq, Nk] in float64 under a dense bool mask ``allowed`` [B, Nq, Nk]; empty rows zero."""
    heads, kv = q.shape[1], k.shape[1]
    kk = k.double().repeat_interleave(heads // kv, dim=1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.where(allowed[:, None].any(-1, keepdim=True), p, torch.zeros_like(p))


def _ranges(kind: str, b: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.arange(n)
    if kind == "causal":
        lo, hi = torch.zeros(n, dtype=torch.long), i + 1
    elif kind == "window":  # 5 keys, row i sees i-4..i
        lo, hi = (i - 4).clamp_min(0), i + 1
    else:  # "span": tokens 6..13 see each other both ways, the rest causal; row 0 of batch 1 sees nothing
        lo, hi = torch.zeros(n, dtype=torch.long), i + 1
        hi[6:14] = 14
    lo, hi = lo.expand(b, n).clone(), hi.expand(b, n).clone()
    lo[1, 0] = hi[1, 0] = 0  # an empty row: a left pad
    lo[1, 1:] = 1  # ... whose key no later row attends
    return lo, hi


def _dense(lo: torch.Tensor, hi: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return (pos[:, None, :] >= lo[..., None]) & (pos[:, None, :] < hi[..., None])


@pytest.mark.parametrize("kind", ["causal", "window", "span"])
@pytest.mark.parametrize("backend", ["blocks", "reference", "auto"])
@pytest.mark.parametrize("per_head", [False, True])
def test_key_ranges_equal_a_dense_mask(kind: str, backend: str, per_head: bool) -> None:
    torch.manual_seed(0)
    b, h, hk, n, d = 2, 4, 2, 20, 8
    q, k = torch.randn(b, h, n, d), torch.randn(b, hk, n, d)
    lo, hi = _ranges(kind, b, n)
    layout = Layout.joint(text=8, grid=(3, 2, 2))  # 8 text tokens then 12 video tokens
    out = attnmap.attention_sums(
        q, k, layout, ("cross", "temporal", "received", "probe", "entropy"), per_head=per_head,
        probe=torch.tensor([0, 7, 19]), key_range=(lo, hi), backend=backend, block_size=None,
    )  # fmt: skip
    p = _oracle(q, k, _dense(lo, hi, torch.arange(n).expand(b, n)), d**-0.5)
    ph = p if per_head else p.mean(1)
    video, text = layout.video_q, layout.text_k
    want = {
        "cross": ph[..., video, text],
        "temporal": ph[..., video, video].unflatten(-1, (3, 4)).sum(-1).unflatten(-2, (3, 4)).mean(-2),
        "received": ph.mean(-2),
        "probe": ph[..., [0, 7, 19], :],
        "entropy": -torch.special.xlogy(p, p).sum(-1)
        if per_head
        else -torch.special.xlogy(p, p).sum(-1).mean(1),
    }
    for name, ref in want.items():
        torch.testing.assert_close(out[name].double(), ref, rtol=1e-5, atol=1e-6, msg=name)
    assert float(out["probe"][1, ..., 0, :].abs().max()) == 0.0  # the empty row


def test_key_positions_mask_keys_in_a_layout_order() -> None:
    """Keys permuted, each with its sequence position: the same P as in sequence order, permuted; a
    key at position -1 (a placeholder) is never attended."""
    torch.manual_seed(1)
    b, h, n, d = 1, 2, 16, 8
    q, k = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    i = torch.arange(n)
    lo, hi = torch.zeros(1, n, dtype=torch.long), (i + 1)[None]
    order = torch.randperm(n)
    pos = order.clone()
    pos[3] = -1
    lay = Layout.self_attn(grid=(1, 4, 4))
    out = attnmap.attention_sums(
        q[:, :, order], k[:, :, order], lay, ("full",), key_range=(lo[:, order], hi[:, order]),
        key_positions=pos, backend="blocks",
    )["full"]  # fmt: skip
    ref = _oracle(q[:, :, order], k[:, :, order], _dense(lo[:, order], hi[:, order], pos[None]), d**-0.5)
    torch.testing.assert_close(out.double(), ref.mean(1), rtol=1e-5, atol=1e-6)
    assert float(out[..., 3].abs().max()) == 0.0
    unmasked = _oracle(q, k, _dense(lo, hi, i[None]), d**-0.5).mean(1)
    keep = pos != -1
    assert not torch.allclose(out.double()[..., keep], unmasked[:, order][..., order][..., keep])


def test_lse_with_key_ranges() -> None:
    torch.manual_seed(2)
    q, k = torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    lo, hi = torch.zeros(12, dtype=torch.long), torch.arange(12) + 1
    allowed = _dense(lo[None], hi[None], torch.arange(12)[None])
    s = (q @ k.transpose(-1, -2) * 8**-0.5).masked_fill(~allowed[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    lay = Layout.self_attn(grid=(3, 2, 2))
    out = attnmap.attention_sums(q, k, lay, ("received",), key_range=(lo, hi), lse=lse, backend="blocks")
    ref = _oracle(q, k, allowed, 8**-0.5).mean(1).mean(-2)
    torch.testing.assert_close(out["received"].double(), ref, rtol=1e-5, atol=1e-6)


def test_backends_that_cannot_read_key_ranges_say_why() -> None:
    q = k = torch.randn(1, 2, 12, 8)
    lay = Layout.self_attn(grid=(3, 2, 2))
    lo, hi = torch.zeros(12, dtype=torch.long), torch.arange(12) + 1
    call = reduce.prepare_call(q, k, lay, ("temporal",), key_range=(lo, hi))
    assert (
        reduce.backend("native").serves(call)
        == "per-row key ranges (key_range) are reduced by the blocks backend"
    )
    assert "key ranges" in (reduce.backend("triton").serves(call) or "")
    assert reduce.choose("auto", call) is reduce.backend("blocks")
    with pytest.raises(AttnmapError, match="backend='native' cannot reduce this call: per-row key ranges"):
        attnmap.attention_sums(q, k, lay, ("temporal",), key_range=(lo, hi), backend="native")


def test_key_range_arguments_are_checked() -> None:
    q = k = torch.randn(2, 2, 12, 8)
    lay = Layout.self_attn(grid=(3, 2, 2))
    good = torch.zeros(12, dtype=torch.long)
    with pytest.raises(AttnmapError, match=r"key_range must be a pair \(lo, hi\)"):
        attnmap.attention_sums(q, k, lay, ("temporal",), key_range=good)  # type: ignore[arg-type]
    with pytest.raises(
        AttnmapError,
        match=r"key_range\[1\] \(hi\) must be an integer tensor \[Nq\] or \[B, Nq\] = \[2, 12\], got \(11,\)",
    ):
        attnmap.attention_sums(q, k, lay, ("temporal",), key_range=(good, good[:11]))
    with pytest.raises(AttnmapError, match=r"key_range\[0\] \(lo\) must be an integer tensor"):
        attnmap.attention_sums(q, k, lay, ("temporal",), key_range=(good.float(), good))
    with pytest.raises(AttnmapError, match=r"key_positions must be an integer tensor \[Nk\] or \[B, Nk\]"):
        attnmap.attention_sums(q, k, lay, ("temporal",), key_range=(good, good), key_positions=good[:3])
    with pytest.raises(AttnmapError, match="key_positions was given without key_range"):
        attnmap.attention_sums(q, k, lay, ("temporal",), key_positions=good)


@pytest.mark.parametrize("kind", ["causal", "window", "span"])
def test_blocks_of_rows_compute_only_their_window_of_keys(kind: str) -> None:
    """Small blocks of rows each reduce over the keys their ranges reach (a causal block: its
    prefix); the keys outside are zeros, and every output equals the dense oracle."""
    from attnmap.reduce import blocks

    torch.manual_seed(3)
    b, h, n, d = 2, 4, 20, 8
    q, k = torch.randn(b, h, n, d), torch.randn(b, 2, n, d)
    lo, hi = _ranges(kind, b, n)
    layout = Layout.joint(text=8, grid=(3, 2, 2))
    call = reduce.prepare_call(q, k, layout, ("temporal", "received", "entropy", "probe", "full"),
                               probe=torch.tensor([3, 19]), key_range=(lo, hi))  # fmt: skip
    # the union over the batch (batch row 1 attends from key 1 on: its key 0 is a pad)
    assert blocks.key_window(call, slice(0, 3)) == (0, 3)
    assert (
        blocks.key_window(call, slice(16, 19))
        == {"causal": (0, 19), "window": (1, 19), "span": (0, 19)}[kind]
    )
    assert (
        blocks.key_window(call, slice(8, 10)) == {"causal": (0, 10), "window": (1, 10), "span": (0, 14)}[kind]
    )
    out = blocks.run(call, block_rows=3)
    p = _oracle(q, k, _dense(lo, hi, torch.arange(n).expand(b, n)), d**-0.5).mean(1)
    torch.testing.assert_close(out["full"].double(), p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["received"].double(), p.mean(-2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["probe"].double(), p[:, [3, 19]], rtol=1e-5, atol=1e-6)
