"""attnmap.reference, the oracle, against torch's own SDPA and hand-written loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnmap.layout import Layout
from attnmap.reduce import FULL_LIMIT, attention_sums


def _qk(lay: Layout, heads: int = 2, kv_heads: int = 2, d: int = 32, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, lay.num_queries, d, generator=g)
    k = torch.randn(batch, kv_heads, lay.num_keys, d, generator=g)
    return q, k


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=lambda h: f"Hk{h}")
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "bool_b11n", "additive_bh1n"])
def test_full_times_v_is_sdpa(kv_heads: int, mask_kind: str) -> None:
    lay = Layout.joint(text=5, grid=(2, 3, 4))
    q, k = _qk(lay, heads=4, kv_heads=kv_heads, seed=1)
    v = torch.randn_like(k)
    n = lay.num_keys
    keep = torch.rand(2, n, generator=torch.Generator().manual_seed(2)) > 0.3
    keep[:, 0] = True
    masks = {
        "none": (None, None),
        "bool": (keep, keep[:, None, None, :]),
        "additive": (torch.where(keep, 0.0, -10000.0), torch.where(keep, 0.0, -10000.0)[:, None, None, :]),
        "bool_b11n": (keep[:, None, None, :], keep[:, None, None, :]),
        "additive_bh1n": (
            torch.randn(2, 4, 1, n) - 3.0 * (~keep[:, None, None, :]),
            None,
        ),
    }
    mask, sdpa_mask = masks[mask_kind]
    if mask_kind == "additive_bh1n":
        sdpa_mask = mask
    out = attention_sums(
        q, k, lay, ("full",), per_head=True, key_padding_mask=mask, scale=0.3, backend="reference"
    )
    p = out["full"]
    expected = F.scaled_dot_product_attention(
        q, k, v, attn_mask=sdpa_mask, scale=0.3, enable_gqa=kv_heads != 4
    )
    torch.testing.assert_close(p @ v.repeat_interleave(4 // kv_heads, dim=1), expected, rtol=1e-5, atol=1e-5)
    mean = attention_sums(q, k, lay, ("full",), key_padding_mask=mask, scale=0.3, backend="reference")["full"]
    torch.testing.assert_close(mean, p.mean(dim=1))


def test_temporal_by_loops() -> None:
    lay = Layout.self_attn(grid=(3, 2, 2), prefix=2)
    q, k = _qk(lay, seed=3)
    out = attention_sums(q, k, lay, ("temporal", "full"), per_head=True, backend="reference")
    p = out["full"]
    expected = torch.zeros(2, 2, 3, 3)
    for i in range(3):
        for j in range(3):
            rows = [2 + i * 4 + t for t in range(4)]
            cols = [2 + j * 4 + t for t in range(4)]
            expected[:, :, i, j] = p[:, :, rows][:, :, :, cols].sum(-1).mean(-1)
    torch.testing.assert_close(out["temporal"], expected)
    # with no prefix the rows of temporal sum to one
    lay0 = Layout.self_attn(grid=(3, 2, 2))
    q0, k0 = _qk(lay0, seed=4)
    t = attention_sums(q0, k0, lay0, ("temporal",), backend="reference")["temporal"]
    torch.testing.assert_close(t.sum(-1), torch.ones(2, 3))


def test_cross_text_received_probe_slices() -> None:
    lay = Layout.joint(text=3, grid=(1, 2, 3), text_first=False)
    q, k = _qk(lay, seed=5)
    out = attention_sums(
        q,
        k,
        lay,
        ("cross", "text", "received", "probe", "full"),
        probe=torch.tensor([7, 0]),
        backend="reference",
    )
    p = out["full"]
    torch.testing.assert_close(out["cross"], p[:, 0:6, 6:9])
    torch.testing.assert_close(out["text"], p[:, 6:9, 6:9])
    torch.testing.assert_close(out["received"], p.mean(1))
    torch.testing.assert_close(out["probe"], p[:, [7, 0]])
    torch.testing.assert_close(out["received"].sum(-1), torch.ones(2))


def test_fully_masked_rows_are_zero() -> None:
    lay = Layout.cross(grid=(1, 2, 2), text=4)
    q, k = _qk(lay, seed=6)
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[1] = False
    out = attention_sums(q, k, lay, ("cross", "received"), key_padding_mask=keep, backend="reference")
    assert not out["cross"].isnan().any()
    assert torch.equal(out["cross"][1], torch.zeros(4, 4))
    torch.testing.assert_close(out["cross"][0].sum(-1), torch.ones(4))


def test_lse_gives_the_same_p() -> None:
    lay = Layout.self_attn(grid=(2, 2, 2))
    q, k = _qk(lay, seed=7)
    lse = torch.logsumexp((q @ k.transpose(-1, -2)) * 32**-0.5, dim=-1)
    a = attention_sums(q, k, lay, ("temporal", "received"), backend="reference")
    b = attention_sums(q, k, lay, ("temporal", "received"), lse=lse, backend="reference")
    for name in a:
        torch.testing.assert_close(a[name], b[name])


def test_errors_name_the_argument() -> None:
    lay = Layout.self_attn(grid=(2, 2, 2))
    q, k = _qk(lay)
    with pytest.raises(ValueError, match="reductions must name at least one"):
        attention_sums(q, k, lay, (), backend="reference")
    with pytest.raises(ValueError, match=r"'cross' is not defined for Layout\.self_attn"):
        attention_sums(q, k, lay, ("cross",), backend="reference")
    with pytest.raises(ValueError, match=r"layout Layout\.self_attn.* expects 8 queries"):
        attention_sums(q[:, :, :7], k[:, :, :7], lay, ("temporal",), backend="reference")
    with pytest.raises(ValueError, match="same dtype"):
        attention_sums(q, k.half(), lay, ("temporal",), backend="reference")
    with pytest.raises(ValueError, match="does not match q"):
        attention_sums(q, k[..., :16], lay, ("temporal",), backend="reference")
    with pytest.raises(ValueError, match=r"probe indices must lie in \[0, 8\)"):
        attention_sums(q, k, lay, ("probe",), probe=torch.tensor([8]), backend="reference")
    with pytest.raises(ValueError, match="needs probe="):
        attention_sums(q, k, lay, ("probe",), backend="reference")
    bad = q.clone()
    bad[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="q contains NaN"):
        attention_sums(bad, k, lay, ("temporal",), backend="reference")
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        attention_sums(
            q,
            k,
            lay,
            ("temporal",),
            key_padding_mask=torch.ones(2, 1, 8, dtype=torch.bool),
            backend="reference",
        )
    with pytest.raises(ValueError, match=r"lse must have shape \[B, H, Nq\]"):
        attention_sums(q, k, lay, ("temporal",), lse=torch.zeros(2, 2, 7), backend="reference")


def test_full_is_refused_above_the_limit() -> None:
    side = math.isqrt(FULL_LIMIT) + 1
    lay = Layout.self_attn(grid=(1, 1, side))
    q = torch.zeros(1, 1, side, 1).expand(1, 1, side, 32)
    with pytest.raises(ValueError, match=r"'full' would hold .* Use 'cross', 'temporal'"):
        attention_sums(q, q, lay, ("full",), backend="reference")


def test_blocks_distance_entropy_by_loops() -> None:
    lay = Layout.self_attn(grid=(2, 3, 2), prefix=1)
    q, k = _qk(lay, seed=8)
    out = attention_sums(q, k, lay, ("full",), per_head=True, backend="reference")[
        "full"
    ].double()  # P itself, checked against SDPA above
    names = ("blocks", "distance", "entropy")
    cubes = attention_sums(q, k, lay, names, per_head=True, block_size=(1, 2, 2), backend="reference")
    tiles = attention_sums(q, k, lay, ("blocks",), per_head=True, block_size=(5, 4), backend="reference")[
        "blocks"
    ]
    pos = [(t, y, x) for t in range(2) for y in range(3) for x in range(2)]  # video token v at 1 + v
    # cubes (1, 2, 2): along y the edge cube holds one row; raster order (t, y, x)
    cube = [t * 2 + y // 2 for t, y, _ in pos]
    expected = torch.zeros(2, 2, 4, 4, dtype=torch.float64)
    members = [[v for v in range(12) if cube[v] == c] for c in range(4)]
    for a in range(4):
        for c in range(4):
            rows = [1 + v for v in members[a]]
            cols = [1 + v for v in members[c]]
            expected[:, :, a, c] = out[:, :, rows][:, :, :, cols].sum(-1).mean(-1)
    torch.testing.assert_close(cubes["blocks"].double(), expected, rtol=1e-6, atol=1e-7)
    # token tiles (5, 4) over all 13 tokens: 3 row tiles (5, 5, 3) x 4 key tiles (4, 4, 4, 1)
    expected = torch.zeros(2, 2, 3, 4, dtype=torch.float64)
    for a in range(3):
        for c in range(4):
            expected[:, :, a, c] = out[:, :, 5 * a : 5 * a + 5, 4 * c : 4 * c + 4].sum(-1).mean(-1)
    torch.testing.assert_close(tiles.double(), expected, rtol=1e-6, atol=1e-7)
    dist = torch.zeros(2, 2, 2, 3, 2, dtype=torch.float64)
    for i, (tq, yq, xq) in enumerate(pos):
        for j, (tk, yk, xk) in enumerate(pos):
            dist[:, :, abs(tq - tk), abs(yq - yk), abs(xq - xk)] += out[:, :, 1 + i, 1 + j] / 12
    torch.testing.assert_close(cubes["distance"].double(), dist, rtol=1e-6, atol=1e-7)
    entropy = -(out * out.clamp_min(1e-300).log()).sum(-1)
    torch.testing.assert_close(cubes["entropy"].double(), entropy, rtol=1e-6, atol=1e-7)


def test_the_oracle_is_float64() -> None:
    # logits 1e4 apart by 1e-3: fp32 cannot tell them apart (its spacing at 1e4 is 1e-3), float64 can
    lay = Layout.self_attn(grid=(1, 1, 2))
    q = torch.tensor([[[[1.0], [1.0]]]], dtype=torch.float32)
    k = torch.tensor([[[[10000.0], [10000.0009765625]]]], dtype=torch.float32)  # exact in fp32
    p = attention_sums(q, k, lay, ("full",), scale=1.0, backend="reference")["full"]
    want = torch.softmax(torch.tensor([10000.0, 10000.0009765625], dtype=torch.float64), 0).float()
    torch.testing.assert_close(p[0, 0], want, rtol=0, atol=1e-7)
