"""attention_sums: every backend against attnmap.reference on random and adversarial inputs.

The Triton kernel runs on CUDA when present, else on the CPU under TRITON_INTERPRET=1 (set here
before attnmap.kernels is imported) at small sizes.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pytest
import torch

from attnmap import reduce as ops
from attnmap.layout import Layout
from conftest import CUDA, HAS_TRITON, TRITON_DEVICE, assert_close, make_qk, reduce_with

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton missing (or not interpretable here)")

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-3}

LAYOUTS = {
    "joint-text-first": Layout.joint(text=5, grid=(3, 2, 3)),
    "joint-video-first": Layout.joint(text=5, grid=(3, 2, 3), text_first=False),
    "self-prefix": Layout.self_attn(grid=(2, 3, 3), prefix=2),
    "self-one-frame": Layout.self_attn(grid=(1, 4, 5)),
    "cross": Layout.cross(grid=(2, 2, 3), text=9),
    "cross-prefix": Layout.cross(grid=(1, 3, 3), text=6, prefix=1),
}


def _all(lay: Layout) -> tuple[str, ...]:
    return tuple(r for r in ops.REDUCTIONS if lay.supports(r))


def _check(
    q: torch.Tensor,
    k: torch.Tensor,
    lay: Layout,
    backend: str,
    reductions: tuple[str, ...],
    ratio: float,
    **kw: object,
) -> dict[str, torch.Tensor]:
    out = reduce_with(backend, q, k, lay, reductions, **kw)
    ref = ops.attention_sums(q, k, lay, reductions, **kw, backend="reference")  # type: ignore[arg-type]
    assert set(out) == set(reductions)
    for name in reductions:
        assert out[name].device == q.device
        assert_close(f"{backend}/{name}", ref[name], out[name], ratio)
    return out


# -- every streaming backend against the reference ----------------------------------------------

BACKENDS = ["auto", "blocks", pytest.param("triton", marks=needs_triton)]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(backend, device): ``auto`` (on the CPU the native kernel for cross/temporal/text, blocks for the
    rest), ``blocks`` and ``triton`` with small tiles (``conftest.SMALL_TILES``), so that every test
    crosses block boundaries."""
    name = request.param
    return name, TRITON_DEVICE if name == "triton" else "cpu"


@pytest.mark.parametrize("per_head", [False, True], ids=["mean", "per_head"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts(name: str, per_head: bool, backend: tuple[str, str]) -> None:
    lay = LAYOUTS[name]
    q, k = make_qk(lay, seed=len(name), device=backend[1])
    probe = torch.tensor([0, lay.num_queries - 1, 3])
    _check(q, k, lay, backend[0], _all(lay), 1e-4, per_head=per_head, probe=probe, block_size=(4, 3))


@pytest.mark.parametrize("d", [32, 64, 80, 96, 128, 256])
def test_head_dims_and_gqa(d: int, backend: tuple[str, str]) -> None:
    lay = LAYOUTS["joint-text-first"]
    q, k = make_qk(lay, heads=6, kv_heads=2, d=d, seed=d, device=backend[1])
    _check(q, k, lay, backend[0], ("cross", "temporal", "received"), 1e-4, scale=0.2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_inputs(dtype: torch.dtype, backend: tuple[str, str]) -> None:
    lay = LAYOUTS["self-prefix"]
    q, k = make_qk(lay, dtype=dtype, device=backend[1])
    _check(q, k, lay, backend[0], ("temporal", "received", "full"), TOL[dtype])


@pytest.mark.parametrize(
    "mask_shape", ["bool-BN", "bool-B11N", "bool-BH1N", "add-BN", "add-B11N", "add-BH1N", "bool-1N"]
)
def test_masks(mask_shape: str, backend: tuple[str, str]) -> None:
    lay = LAYOUTS["cross"]
    q, k = make_qk(lay, seed=11, device=backend[1])
    _check_masked(q, k, lay, backend[0], mask_shape)


def _mask(mask_shape: str, batch: int, heads: int, n: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    keep = torch.rand(batch, heads, 1, n, generator=g) > 0.4
    keep[0, :, :, -3:] = False  # padded tail, as for umT5 text
    keep[-1] = False  # one batch element with every key masked: zero, never NaN
    kind, shape = mask_shape.split("-")
    m: torch.Tensor = keep if kind == "bool" else torch.where(keep, 0.0, -10000.0)
    if kind == "add":
        m = m + torch.rand(m.shape, generator=g)  # a real bias, not only 0 / -1e4
    if shape == "BN":
        m = m[:, 0, 0]
    elif shape == "B11N":
        m = m[:, :1]
    elif shape == "1N":
        m = m[:1, 0, 0]
    return m.to(device)


def _check_masked(q: torch.Tensor, k: torch.Tensor, lay: Layout, backend: str, mask_shape: str) -> None:
    b, h, n = q.shape[0], q.shape[1], k.shape[2]
    mask = _mask(mask_shape, b, h, n, q.device)
    # an additive mask puts a whole batch element near -1e4, where fp32 logits are rounded to ~1e-3:
    # the float64 oracle is exact there, the fp32 kernels are not
    tol = 2e-3 if mask_shape.startswith("add") else 1e-4
    out = _check(q, k, lay, backend, ("cross", "received"), tol, key_padding_mask=mask)
    if mask.dtype == torch.bool and mask_shape != "bool-1N":
        assert torch.equal(out["cross"][-1].cpu(), torch.zeros_like(out["cross"][-1].cpu()))


def test_huge_logits_stay_exact(backend: tuple[str, str]) -> None:
    # integer q and k: q k^T is exact in fp32, scale 1/8 too; logits ~1e4 apart by small integers
    lay = LAYOUTS["self-prefix"]
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-3, 4, (1, 2, lay.num_queries, 64), generator=g).float()
    q[..., 0] = 400.0
    k = torch.randint(-3, 4, (1, 2, lay.num_keys, 64), generator=g).float()
    k[..., 0] = 200.0
    out = _check(q.to(backend[1]), k.to(backend[1]), lay, backend[0], ("temporal", "received", "full"), 1e-4)
    assert float(out["full"].max()) > 0.01


def test_lse_one_pass(backend: tuple[str, str]) -> None:
    lay = LAYOUTS["joint-video-first"]
    q, k = make_qk(lay, heads=4, kv_heads=2, seed=8)
    keep = torch.rand(2, lay.num_keys, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[1] = False
    bias = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    logits = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.25 + bias[:, None, None, :]
    lse = torch.logsumexp(logits, dim=-1)  # -inf on fully masked rows
    dev = backend[1]
    probe = torch.tensor([1])
    out = reduce_with(
        backend[0],
        q.to(dev),
        k.to(dev),
        lay,
        _all(lay),
        scale=0.25,
        key_padding_mask=keep.to(dev),
        lse=lse.to(dev),
        probe=probe,
        block_size=5,
    )
    ref = ops.attention_sums(
        q,
        k,
        lay,
        _all(lay),
        scale=0.25,
        key_padding_mask=keep,
        probe=probe,
        block_size=5,
        backend="reference",
    )
    for name in ref:
        assert_close(name, ref[name], out[name], 1e-4)


def test_strided_inputs(backend: tuple[str, str]) -> None:
    # q and k as SDPA sees them after a transpose from [B, N, H, D]: non-contiguous
    lay = LAYOUTS["joint-text-first"]
    q, k = make_qk(lay, heads=2, seed=9, device=backend[1])
    qs, ks = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qs.is_contiguous()
    a = reduce_with(backend[0], qs, ks, lay, ("cross", "temporal"))
    b = ops.attention_sums(q, k, lay, ("cross", "temporal"), backend="reference")
    for name in a:
        assert_close(name, b[name], a[name], 1e-4)


@pytest.mark.parametrize("per_head", [False, True], ids=["mean", "per_head"])
@pytest.mark.parametrize("name", ["joint-video-first", "cross", "cross-prefix"])
def test_text_groups_sum_their_columns(name: str, per_head: bool, backend: tuple[str, str]) -> None:
    lay = LAYOUTS[name]
    q, k = make_qk(lay, heads=4, kv_heads=2, seed=21, device=backend[1])
    # a word of two sub-tokens, one overlapping it, a single token, and the padded tail
    # numpy integers count too; a key listed twice in a group counts once
    groups = [[1, 2, 1], [2], [np.int64(0)], list(range(3, lay.text))]
    names = tuple(r for r in ("cross", "text", "temporal") if lay.supports(r))
    out = reduce_with(backend[0], q, k, lay, names, per_head=per_head, text_groups=groups)
    full = ops.attention_sums(q.cpu(), k.cpu(), lay, names, per_head=per_head, backend="reference")
    for n in names:
        sets = [sorted(set(g)) for g in groups]
        want = full[n] if n != "cross" else torch.stack([full[n][..., g].sum(-1) for g in sets], -1)
        assert_close(n, want, out[n], 1e-4)


def test_text_groups_are_checked() -> None:
    lay = LAYOUTS["cross"]
    q, k = make_qk(lay)
    for bad in ([], [[]], [[0, 9]], [[-1]], "ab", [[0.5]], [[True]], [[1, True]], [[[1]]]):
        with pytest.raises(ValueError, match=r"^text_groups must be a sequence of non-empty sequences"):
            ops.attention_sums(q, k, lay, ("cross",), text_groups=bad)  # type: ignore[arg-type]
    lay = LAYOUTS["self-prefix"]
    q, k = make_qk(lay)
    with pytest.raises(ValueError, match=r"^text_groups: layout .* has no text keys"):
        ops.attention_sums(q, k, lay, ("temporal",), text_groups=[[0]])


# -- the native grouped path: cross, temporal and text of CPU tensors (attnmap._native) -----------

GROUPED_LAYOUTS = {
    **LAYOUTS,
    # crosses the kernel's row chunks (64), key blocks (256) and frame/text boundaries inside tiles
    "joint-large": Layout.joint(text=21, grid=(3, 10, 12)),
    "cross-wide": Layout.cross(grid=(2, 8, 9), text=70),
}


def _grouped(lay: Layout) -> tuple[str, ...]:
    return tuple(r for r in ("cross", "temporal", "text") if lay.supports(r))


@pytest.fixture
def native_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The shapes of q that reached ``attnmap._native.attention_groups`` (a spy on the real one)."""
    from attnmap import _native

    seen: list[tuple[int, ...]] = []
    real = _native.attention_groups

    def spy(q: np.ndarray, *args: object, **kwargs: object) -> np.ndarray:
        seen.append(tuple(q.shape))
        return real(q, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_native, "attention_groups", spy)
    return seen


@pytest.mark.parametrize("per_head", [False, True], ids=["mean", "per_head"])
@pytest.mark.parametrize("name", list(GROUPED_LAYOUTS))
def test_grouped_path_against_reference(
    name: str, per_head: bool, native_calls: list[tuple[int, ...]]
) -> None:
    lay = GROUPED_LAYOUTS[name]
    q, k = make_qk(lay, heads=4, kv_heads=2, d=48, seed=len(name))
    _check(q, k, lay, "auto", _grouped(lay), 1e-4, per_head=per_head, scale=0.3)
    for one in _grouped(lay):  # each alone: text columns only, frame columns only
        _check(q, k, lay, "auto", (one,), 1e-4, per_head=per_head)
    assert len(native_calls) == 1 + len(_grouped(lay))


@pytest.mark.parametrize("mask_shape", ["bool-BN", "bool-BH1N", "add-B11N", "add-BH1N", "bool-1N"])
@pytest.mark.parametrize("name", ["joint-video-first", "cross-wide"])
def test_grouped_path_masks(name: str, mask_shape: str, native_calls: list[tuple[int, ...]]) -> None:
    lay = GROUPED_LAYOUTS[name]
    q, k = make_qk(lay, heads=3, kv_heads=3, seed=12)
    mask = _mask(mask_shape, q.shape[0], q.shape[1], k.shape[2], q.device)
    # additive masks put a whole batch element near -1e4, where fp32 logits are rounded to ~1e-3: the
    # reference (matmul, then + bias) and the kernel (fused products) round differently there
    tol = 2e-3 if mask_shape.startswith("add") else 1e-4
    out = _check(q, k, lay, "auto", _grouped(lay), tol, key_padding_mask=mask, per_head=True)
    if mask.dtype == torch.bool and mask_shape != "bool-1N":  # batch element 1: every key masked
        for t in out.values():
            assert torch.equal(t[-1], torch.zeros_like(t[-1]))
    assert native_calls


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_grouped_path_half_and_stridedmake_qk(
    dtype: torch.dtype, native_calls: list[tuple[int, ...]]
) -> None:
    lay = GROUPED_LAYOUTS["joint-large"]
    q, k = make_qk(lay, heads=2, d=64, seed=13, dtype=dtype)
    qs, ks = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    out = ops.attention_sums(qs, ks, lay, _grouped(lay), backend="auto")
    ref = ops.attention_sums(q, k, lay, _grouped(lay), backend="reference")
    for name in ref:
        assert_close(name, ref[name], out[name], TOL[dtype])
    assert native_calls


def test_grouped_path_gives_nan_rows_never_silent_zeros(native_calls: list[tuple[int, ...]]) -> None:
    lay = GROUPED_LAYOUTS["joint-text-first"]
    q, k = make_qk(lay)
    q[0, 1, lay.video_q.start + 2, 5] = float("nan")  # one video query row of batch 0, head 1
    k[1, 0, 0, 0] = float("nan")  # one key of batch 1: every row of head 0 is NaN
    names = _grouped(lay)
    out = ops.attention_sums(q, k, lay, names, backend="auto", check_finite=False, per_head=True)
    ref = ops.attention_sums(q, k, lay, names, check_finite=False, per_head=True, backend="reference")
    for name in names:
        assert torch.equal(out[name].isnan(), ref[name].isnan()), name
        assert_close(name, ref[name][0, 0], out[name][0, 0], 1e-4)
    assert out["cross"][0, 1, 2].isnan().all() and not out["cross"][0, 1, 3].isnan().any()
    assert native_calls


def test_native_attention_groups_names_bad_arguments() -> None:
    from attnmap import _native

    q = np.zeros((1, 2, 4, 8), np.float32)
    k = np.zeros((1, 2, 5, 8), np.float32)
    cols = np.arange(5, dtype=np.int64)
    with pytest.raises(ValueError, match=r"^columns: expected values in -1\.\.3"):
        _native.attention_groups(q, k, cols, 3, scale=1.0)
    with pytest.raises(ValueError, match=r"^columns: expected one column per key \(5\)"):
        _native.attention_groups(q, k, cols[:4], 5, scale=1.0)
    with pytest.raises(ValueError, match=r"^k: expected \[B, Hk, Nk, D\]"):
        _native.attention_groups(q, np.zeros((1, 3, 5, 8), np.float32), cols, 5, scale=1.0)
    with pytest.raises(ValueError, match=r"^bias: expected \[B, 1 or H, Nk\]"):
        _native.attention_groups(q, k, cols, 5, scale=1.0, bias=np.zeros((1, 2, 4), np.float32))
    with pytest.raises(ValueError, match=r"^scale: expected a finite number"):
        _native.attention_groups(q, k, cols, 5, scale=float("nan"))
    with pytest.raises(ValueError, match=r"^num_columns: the output \[B, Hs, R, C\]"):
        _native.attention_groups(q, k, np.zeros(5, np.int64), 2**61, scale=1.0)


def test_zero_head_dim_is_refused() -> None:
    lay = LAYOUTS["cross"]
    q, k = torch.zeros(1, 2, lay.num_queries, 0), torch.zeros(1, 2, lay.num_keys, 0)
    for b in ("auto", "reference"):
        with pytest.raises(ValueError, match=r"^q must have a head dim D >= 1"):
            ops.attention_sums(q, k, lay, ("cross",), backend=b, scale=1.0)


def test_grouped_reductions_with_lse_read_it(native_calls: list[tuple[int, ...]]) -> None:
    # a caller's lse defines P = exp(logit - lse): the kernel takes it as given (here a shifted one)
    lay = GROUPED_LAYOUTS["joint-large"]
    q, k = make_qk(lay, seed=14)
    lse = torch.logsumexp((q @ k.transpose(-1, -2)) * 32**-0.5, dim=-1)
    names = _grouped(lay)
    right = ops.attention_sums(q, k, lay, names, lse=lse, backend="auto")
    shifted = ops.attention_sums(q, k, lay, names, lse=lse + math.log(2.0), backend="auto")
    ref = ops.attention_sums(q, k, lay, names, backend="reference")
    for name in names:
        assert_close(name, ref[name], right[name], 1e-4)
        assert_close(name, ref[name] / 2, shifted[name], 1e-4)
    assert len(native_calls) == 2


@needs_triton
@pytest.mark.parametrize("groups", [2, 3])
def test_triton_head_groups_and_many_blocks(groups: int) -> None:
    """Heads split over output slots, 3 x 3 query/key blocks, frames straddling block edges."""
    from attnmap.reduce import triton

    lay = Layout.self_attn(grid=(3, 3, 5), prefix=1)  # 46 tokens: blocks of 16 cut frames of 15
    q, k = make_qk(lay, heads=6, kv_heads=3, seed=groups, device=TRITON_DEVICE)
    call = ops.prepare_call(q, k, lay, ("temporal", "received", "full"))
    out = triton.run(call, block_m=16, block_n=16, head_groups=groups)
    ref = ops.attention_sums(q, k, lay, ("temporal", "received", "full"), backend="reference")
    for name in ref:
        assert_close(name, ref[name], out[name], 1e-4)


@needs_triton
def test_triton_rejects_bad_tiles() -> None:
    from attnmap.reduce import triton

    lay = LAYOUTS["cross"]
    q, k = make_qk(lay, device=TRITON_DEVICE)
    call = ops.prepare_call(q, k, lay, ("cross",))
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        triton.run(call, block_m=24)
    with pytest.raises(ValueError, match="head_groups must divide"):
        triton.run(call, head_groups=3)


def test_auto_on_the_cpu_picks_native() -> None:
    lay = LAYOUTS["joint-text-first"]
    q, k = make_qk(lay)
    for names in (("cross", "temporal"), ("cross", "received"), ("blocks", "distance", "entropy", "probe")):
        call = ops.prepare_call(
            q,
            k,
            lay,
            names,
            block_size=4 if "blocks" in names else None,
            probe=torch.tensor([1]) if "probe" in names else None,
        )
        assert ops.choose("auto", call).__name__ == "attnmap.reduce.native"
    lse = torch.zeros(2, 2, lay.num_queries)
    with_lse = ops.prepare_call(q, k, lay, ("cross", "received"), lse=lse)
    assert ops.choose("auto", with_lse).__name__ == "attnmap.reduce.native"  # one pass, lse given


def test_backend_and_probe_errors() -> None:
    lay = LAYOUTS["cross"]
    q, k = make_qk(lay)
    with pytest.raises(
        ValueError, match="backend must be 'auto' or one of triton, native, blocks, reference"
    ):
        ops.attention_sums(q, k, lay, ("cross",), backend="cuda")
    with pytest.raises(ValueError, match="'probe' is not in reductions"):
        ops.attention_sums(q, k, lay, ("cross",), probe=torch.tensor([0]))
    with pytest.raises(ValueError, match="probe must be a 1-D integer tensor"):
        ops.attention_sums(q, k, lay, ("probe",), probe=torch.tensor([0.5]))
    with pytest.raises(ValueError, match="key_padding_mask must be bool"):
        ops.attention_sums(q, k, lay, ("cross",), key_padding_mask=torch.ones(2, 9, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"layout must be an attnmap\.Layout"):
        ops.attention_sums(q, k, "cross", ("cross",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale must be a finite float"):
        ops.attention_sums(q, k, lay, ("cross",), scale=float("inf"))
    kk = k.clone()
    kk[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="k contains NaN"):
        ops.attention_sums(q, kk, lay, ("cross",))


@pytest.mark.parametrize("where", ["q-text-row", "q-video-row", "k", "k-inf"])
def test_nan_or_inf_in_q_or_k_is_refused(where: str, backend: tuple[str, str]) -> None:
    # row 0 of this layout is a text query that cross/temporal never read: refused all the same
    lay = LAYOUTS["joint-text-first"]
    q, k = make_qk(lay, device=backend[1])
    bad = float("inf") if where == "k-inf" else float("nan")
    if where.startswith("q"):
        q[1, 1, 0 if where == "q-text-row" else 7, 3] = bad
    else:
        k[0, 1, 4, 0] = bad
    name = where[0]
    for b in (backend[0], "reference"):
        with pytest.raises(ValueError, match=f"^{name} contains NaN or inf"):
            ops.attention_sums(q, k, lay, ("cross", "temporal"), backend=b)


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # the interpreter's tl.max
def test_check_finite_off_gives_nan_never_silent_zeros(backend: tuple[str, str]) -> None:
    lay = LAYOUTS["joint-text-first"]
    q, k = make_qk(lay, device=backend[1])
    q[0, 1, lay.video_q.start + 2, 5] = float("nan")  # one video query row of batch 0, head 1
    k[1, 0, 0, 0] = float("nan")  # one key of batch 1: every row of head 0 is NaN
    names = ("cross", "temporal", "received")
    out = reduce_with(backend[0], q, k, lay, names, check_finite=False, per_head=True)
    ref = ops.attention_sums(q, k, lay, names, check_finite=False, per_head=True, backend="reference")
    for name in names:
        got, want = out[name].cpu(), ref[name]
        assert torch.equal(got.isnan(), want.isnan()), (
            f"{name}: NaN where the reference has none or vice versa"
        )
        assert got[1, 0].isnan().all() and not got[1, 1].isnan().any()
        assert_close(name, want[0, 0], got[0, 0], 1e-4)  # the clean head is untouched
    assert out["cross"][0, 1, 2].isnan().all() and not out["cross"][0, 1, 3].isnan().any()


def test_finite_inputs_whose_sum_overflows_are_accepted() -> None:
    # the cheap finiteness test sums q; a sum that overflows falls back to the exact test
    lay = LAYOUTS["self-prefix"]
    q, k = make_qk(lay)
    q[..., 0], k[..., 0] = 1e37, 1e-37  # sum(q) = inf, every logit finite
    assert not torch.isfinite(q.sum())
    _check(q, k, lay, "auto", ("temporal", "received"), 1e-4)


@needs_triton
def test_triton_refuses_a_grid_beyond_the_cuda_limit() -> None:
    from attnmap.reduce import triton

    lay = Layout.self_attn(grid=(1, 1, 1))
    q = torch.zeros(1, 1, 1, 32, device=TRITON_DEVICE).expand(1, 65536, 1, 32)
    call = ops.prepare_call(q, q, lay, ("temporal",))
    with pytest.raises(ValueError, match="batch x heads = 65536 exceeds the Triton grid limit 65535"):
        triton.run(call)


# -- sdpa_with_lse -------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if CUDA else [])])
def test_sdpa_with_lse(mask_kind: str, device: str) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 64, generator=g).to(device) for n in (20, 24, 24))
    dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if device == "cuda" else [])
    for dtype in dtypes:
        qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
        keep = torch.rand(2, 1, 1, 24, generator=g).to(device) > 0.3
        mask: Optional[torch.Tensor] = {
            "none": None,
            "bool": keep,
            "additive": torch.where(keep, 0.0, -1000.0).to(dtype),
        }[mask_kind]
        out, lse = ops.sdpa_with_lse(qd, kd, vd, attn_mask=mask, scale=0.1)
        expected = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=0.1)
        assert torch.equal(out, expected), "sdpa_with_lse must give SDPA's output bit for bit"
        assert lse is not None and lse.shape == (2, 3, 20) and lse.dtype == torch.float32
        bias = (
            0.0 if mask is None else torch.zeros(keep.shape, device=device).masked_fill(~keep, float("-inf"))
        )
        if mask_kind == "additive":
            bias = mask.float()  # type: ignore[union-attr]
        logits = (qd.float() @ kd.float().transpose(-1, -2)) * 0.1 + bias
        torch.testing.assert_close(
            lse,
            torch.logsumexp(logits, -1),
            rtol=2e-3 if dtype != torch.float32 else 1e-5,
            atol=2e-3 if dtype != torch.float32 else 1e-5,
        )
        # the one-pass mode of attention_sums with that lse matches the two-pass one
        lay = Layout.cross(grid=(1, 4, 5), text=24)
        a = ops.attention_sums(
            qd, kd, lay, ("cross", "received"), scale=0.1, key_padding_mask=mask, lse=lse, backend="auto"
        )
        b = ops.attention_sums(
            qd, kd, lay, ("cross", "received"), scale=0.1, key_padding_mask=mask, backend="reference"
        )
        for name in a:
            assert_close(name, b[name], a[name], TOL[dtype])


def test_sdpa_with_lse_falls_back_without_lse() -> None:
    q = torch.randn(1, 4, 8, 12)  # D not a multiple of 8: SDPA pads it, so no lse here
    k = v = torch.randn(1, 4, 8, 12)
    out, lse = ops.sdpa_with_lse(q, k, v)
    assert lse is None
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


# -- the statistics of sparse-attention design: blocks, distance, entropy (and received) ----------

STATS = ("received", "blocks", "distance", "entropy")
STATS_BACKENDS = ["auto", "native", "blocks", pytest.param("triton", marks=needs_triton)]
#: sizes that are no multiple of any tile: 7 text tokens, grids of odd sides, prefix tokens
STATS_LAYOUTS = {
    "joint-text-first": Layout.joint(text=7, grid=(3, 3, 5)),
    "joint-video-first": Layout.joint(text=4, grid=(2, 5, 3), text_first=False),
    "self-prefix": Layout.self_attn(grid=(3, 4, 3), prefix=3),
    "cross-prefix": Layout.cross(grid=(2, 3, 3), text=11, prefix=2),
}
#: token tiles that straddle text/video boundaries, and video cubes with smaller edge cubes
BLOCK_SIZES = {"tiles": (5, 7), "square": 6, "cubes": (2, 2, 3)}


def _stats(lay: Layout, block_size: object) -> tuple[str, ...]:
    return tuple(r for r in STATS if lay.supports(r, block_size=block_size))  # type: ignore[arg-type]


@pytest.fixture(params=STATS_BACKENDS)
def stats_backend(request: pytest.FixtureRequest) -> tuple[str, str]:
    name = request.param
    return name, TRITON_DEVICE if name == "triton" else "cpu"


#: every layout with every block size it defines (cubes need video keys)
STATS_CASES = [
    (name, size)
    for name, lay in STATS_LAYOUTS.items()
    for size, block_size in BLOCK_SIZES.items()
    if lay.supports("blocks", block_size=block_size)  # type: ignore[arg-type]
]


@pytest.mark.parametrize("per_head", [False, True], ids=["mean", "per_head"])
@pytest.mark.parametrize(("name", "size"), STATS_CASES, ids=[f"{n}-{s}" for n, s in STATS_CASES])
def test_statistics_against_the_oracle(
    name: str, size: str, per_head: bool, stats_backend: tuple[str, str]
) -> None:
    lay, block_size = STATS_LAYOUTS[name], BLOCK_SIZES[size]
    q, k = make_qk(lay, heads=4, kv_heads=2, d=24, seed=len(name) + len(size), device=stats_backend[1])
    names = _stats(lay, block_size)
    if lay.supports("temporal"):
        names = (*names, "temporal")  # alongside the others
    _check(q, k, lay, stats_backend[0], names, 1e-4, per_head=per_head, block_size=block_size, scale=0.3)


@pytest.mark.parametrize("mask_shape", ["bool-BN", "bool-BH1N", "add-B11N"])
def test_statistics_with_masks(mask_shape: str, stats_backend: tuple[str, str]) -> None:
    lay = STATS_LAYOUTS["joint-text-first"]
    q, k = make_qk(lay, heads=3, seed=31, device=stats_backend[1])
    mask = _mask(mask_shape, q.shape[0], q.shape[1], k.shape[2], q.device)
    tol = 2e-3 if mask_shape.startswith("add") else 1e-4
    names = ("received", "blocks", "distance", "entropy", "temporal")
    out = _check(
        q, k, lay, stats_backend[0], names, tol, key_padding_mask=mask, per_head=True, block_size=(2, 2, 2)
    )
    if mask.dtype == torch.bool:  # batch element 1: every key masked, so zero mass and zero entropy
        for t in out.values():
            assert torch.equal(t[-1].cpu(), torch.zeros_like(t[-1].cpu()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_statistics_of_half_inputs(dtype: torch.dtype, stats_backend: tuple[str, str]) -> None:
    lay = STATS_LAYOUTS["self-prefix"]
    q, k = make_qk(lay, heads=2, dtype=dtype, seed=32, device=stats_backend[1])
    _check(q, k, lay, stats_backend[0], STATS, TOL[dtype], block_size=(1, 2, 2))


def test_statistics_with_lse_read_it(stats_backend: tuple[str, str]) -> None:
    # P = exp(logit - lse): a shifted lse halves every P, and the entropy is sum P (lse - logit)
    lay = STATS_LAYOUTS["joint-video-first"]
    q, k = make_qk(lay, seed=33)
    logits = (q @ k.transpose(-1, -2)).double() * 32**-0.5
    lse = torch.logsumexp(logits, dim=-1)
    dev = stats_backend[1]
    names = ("received", "blocks", "distance", "entropy")
    right = reduce_with(
        stats_backend[0], q.to(dev), k.to(dev), lay, names, lse=lse.float().to(dev), block_size=4
    )
    shifted = reduce_with(
        stats_backend[0],
        q.to(dev),
        k.to(dev),
        lay,
        names,
        lse=(lse + math.log(2.0)).float().to(dev),
        block_size=4,
    )
    ref = ops.attention_sums(q, k, lay, names, block_size=4, backend="reference")
    p = torch.softmax(logits, dim=-1)
    entropy_shifted = (p / 2 * (lse[..., None] + math.log(2.0) - logits)).sum(-1).mean(1)
    for name in names:
        assert_close(name, ref[name], right[name], 1e-4)
        want = entropy_shifted if name == "entropy" else ref[name] / 2
        assert_close(name, want, shifted[name], 1e-4)


def test_statistics_sum_rules(stats_backend: tuple[str, str]) -> None:
    lay = STATS_LAYOUTS["self-prefix"]
    _, h, w = lay.grid
    q, k = make_qk(lay, heads=2, seed=34, device=stats_backend[1])
    be = stats_backend[0]
    tiles = reduce_with(be, q, k, lay, ("blocks",), block_size=(5, 4))["blocks"]
    torch.testing.assert_close(tiles.sum(-1), torch.ones_like(tiles[..., 0]), rtol=0, atol=1e-5)
    names = ("temporal", "blocks", "distance")
    frames = reduce_with(be, q, k, lay, names, block_size=(1, h, w))
    # cubes of whole frames are the temporal map; distance sums to the mean video-to-video mass
    torch.testing.assert_close(frames["blocks"], frames["temporal"], rtol=0, atol=1e-6)
    video_mass = frames["temporal"].sum(-1).mean(-1)
    torch.testing.assert_close(frames["distance"].sum((-3, -2, -1)), video_mass, rtol=0, atol=1e-5)
    cubes = reduce_with(be, q, k, lay, ("blocks",), block_size=(2, 3, 2))["blocks"]
    cube_rows = cubes.sum(-1)  # each cube's queries' mass on video keys; weighted by cube sizes -> the mean
    sizes = torch.tensor(
        [2 * 3 * 2, 2 * 3 * 1, 2 * 1 * 2, 2 * 1 * 1, 1 * 3 * 2, 1 * 3 * 1, 1 * 1 * 2, 1 * 1 * 1]
    )
    sizes = sizes.to(cube_rows.device, torch.float32)
    torch.testing.assert_close((cube_rows * sizes).sum(-1) / sizes.sum(), video_mass, rtol=0, atol=1e-5)
    exact = ops.attention_sums(q.cpu(), k.cpu(), lay, names, block_size=(1, h, w), backend="reference")
    assert torch.equal(exact["blocks"], exact["temporal"])


def _pairs(length: int) -> torch.Tensor:
    """Ordered pairs of positions on an axis of ``length`` that lie ``d`` apart, for each d."""
    d = torch.arange(length, dtype=torch.float64)
    return torch.where(d == 0, float(length), 2.0 * (length - d))


def test_uniform_attention_has_known_statistics(stats_backend: tuple[str, str]) -> None:
    # q = 0: every key gets 1 / Nk; entropy ln(Nk), distance the pair counts by offset / (Nv Nk)
    lay = STATS_LAYOUTS["joint-video-first"]
    f, h, w = lay.grid
    q = torch.zeros(1, 2, lay.num_queries, 16, device=stats_backend[1])
    k = torch.randn(1, 2, lay.num_keys, 16, device=stats_backend[1])
    out = reduce_with(stats_backend[0], q, k, lay, ("entropy", "distance", "blocks"), block_size=(4, 8))
    n = lay.num_keys
    torch.testing.assert_close(out["entropy"].cpu(), torch.full((1, n), math.log(n)), rtol=1e-6, atol=0)
    counts = _pairs(f)[:, None, None] * _pairs(h)[None, :, None] * _pairs(w)[None, None, :]
    want = (counts / (lay.num_video * n)).float()[None]
    torch.testing.assert_close(out["distance"].cpu(), want, rtol=1e-5, atol=0)
    widths = torch.tensor([8.0, 8.0, 8.0, 8.0, n - 32.0]) / n  # key tiles of 8, the last one smaller
    torch.testing.assert_close(out["blocks"].cpu(), widths.expand(1, 9, 5), rtol=1e-5, atol=0)


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # the interpreter's tl.max
def test_statistics_with_check_finite_off_give_nan(stats_backend: tuple[str, str]) -> None:
    lay = STATS_LAYOUTS["self-prefix"]
    q, k = make_qk(lay, device=stats_backend[1])
    row = lay.video_q.start + 4
    q[0, 1, row, 5] = float("nan")  # one video query row of batch 0, head 1
    names = ("received", "blocks", "distance", "entropy")
    out = reduce_with(
        stats_backend[0], q, k, lay, names, check_finite=False, per_head=True, block_size=(3, 5)
    )
    ref = ops.attention_sums(
        q.cpu(),
        k.cpu(),
        lay,
        names,
        check_finite=False,
        per_head=True,
        block_size=(3, 5),
        backend="reference",
    )
    for name in names:
        got, want = out[name].cpu(), ref[name]
        # NaN wherever the oracle has it; products with 0/1 matrices (the blocks backend's distance
        # folds, the Triton kernel's one-hot block sums) spread it further, never to other heads
        assert (got.isnan() | ~want.isnan()).all(), name
        if (stats_backend[0], name) not in {("blocks", "distance"), ("triton", "blocks")}:
            assert torch.equal(got.isnan(), want.isnan()), name
        assert got[0, 1].isnan().any() and not got[0, 0].isnan().any() and not got[1].isnan().any()
        assert_close(name, want[1], got[1], 1e-4)
    assert out["entropy"][0, 1].isnan().sum() == 1 and out["entropy"][0, 1, row].isnan()


def test_block_size_is_checked_by_name() -> None:
    lay = STATS_LAYOUTS["self-prefix"]
    q, k = make_qk(lay)
    with pytest.raises(ValueError, match=r"^block_size: the 'blocks' reduction needs block_size="):
        ops.attention_sums(q, k, lay, ("blocks",))
    with pytest.raises(ValueError, match=r"^block_size was given but 'blocks' is not in reductions"):
        ops.attention_sums(q, k, lay, ("entropy",), block_size=4)
    for bad in (0, -2, 1.5, True, (1, 2, 3, 4), (), (2, 0), "4", (2, 2.0)):
        with pytest.raises(ValueError, match=r"^block_size must be a positive int, a pair \(bq, bk\)"):
            ops.attention_sums(q, k, lay, ("blocks",), block_size=bad)  # type: ignore[arg-type]
    many = torch.zeros(1, 1, lay.num_queries, 4).expand(1, 45_000, -1, -1)  # 45,000 heads, as a view
    with pytest.raises(
        ValueError, match=r"^block_size \(1, 1\) gives 39 x 39 blocks, \d+ entries in all \(limit"
    ):
        ops.attention_sums(many, many, lay, ("blocks",), block_size=1, per_head=True)
    cross = STATS_LAYOUTS["cross-prefix"]
    qc, kc = make_qk(cross)
    with pytest.raises(
        ValueError, match=r"^block_size: video cubes \(1, 2, 2\) need video keys, and Layout\.cross"
    ):
        ops.attention_sums(qc, kc, cross, ("blocks",), block_size=(1, 2, 2), backend="reference")
    with pytest.raises(ValueError, match=r"^reductions: 'distance' is not defined for Layout\.cross"):
        ops.attention_sums(qc, kc, cross, ("distance",))
    # numpy integers and lists count; one int is a square token tile
    a = ops.attention_sums(q, k, lay, ("blocks",), block_size=[np.int64(3), 3])
    b = ops.attention_sums(q, k, lay, ("blocks",), block_size=3)
    assert torch.equal(a["blocks"], b["blocks"])


# -- partial sums over shards of the keys (ring attention) ---------------------------------------

PARTIAL_LAYOUTS = {
    "joint-text-first": Layout.joint(text=6, grid=(3, 3, 4)),
    "joint-video-first": Layout.joint(text=5, grid=(2, 4, 3), text_first=False),
    "self-prefix": Layout.self_attn(grid=(3, 2, 5), prefix=2),
    "cross": Layout.cross(grid=(2, 3, 3), text=11),
}


def _partial_names(lay: Layout) -> tuple[str, ...]:
    return tuple(r for r in ops.PARTIAL if lay.supports(r))


def _cuts(n: int, shards: int, seed: int) -> list[tuple[int, int]]:
    """``shards`` ranges of ``0..n`` at random cuts (one of them may be empty)."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randint(0, n + 1, (shards - 1,), generator=g).tolist())
    edges = [0, *cuts, n]
    return list(zip(edges, edges[1:]))


def _sharded(
    q: torch.Tensor,
    k: torch.Tensor,
    lay: Layout,
    names: tuple[str, ...],
    shards: list[tuple[int, int]],
    backend: str,
    mask: Optional[torch.Tensor] = None,
    rows: Optional[tuple[int, int]] = None,
    **kw: object,
) -> ops.Partial:
    """The partial sums of every key shard of q's rows, merged."""
    parts = [
        ops.partial_sums(
            q,
            k[:, :, lo:hi],
            lay,
            names,
            keys=(lo, hi),
            rows=rows,
            key_padding_mask=None if mask is None else mask[..., lo:hi],
            backend=backend,
            **kw,  # type: ignore[arg-type]
        )
        for lo, hi in shards
    ]
    return ops.merge_partials(parts)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("shards", [1, 2, 3, 4])
@pytest.mark.parametrize("name", list(PARTIAL_LAYOUTS))
def test_key_shards_merge_to_the_unsharded_maps(name: str, shards: int, backend: str) -> None:
    lay = PARTIAL_LAYOUTS[name]
    names = _partial_names(lay)
    q, k = make_qk(lay, heads=4, kv_heads=2, d=24, seed=shards + len(name))
    keep = torch.rand(2, lay.num_keys, generator=torch.Generator().manual_seed(shards)) > 0.25
    keep[1] = False  # every key masked: zero maps, zero entropy, lse -inf
    cuts = _cuts(lay.num_keys, shards, seed=len(name) * shards)
    whole = _sharded(q, k, lay, names, cuts, backend, mask=keep, scale=0.3)
    assert whole.keys == tuple(cuts)
    for per_head in (False, True):
        out = ops.finish_partial(whole, per_head=per_head)
        ref = ops.attention_sums(
            q, k, lay, names, key_padding_mask=keep, scale=0.3, per_head=per_head, backend="reference"
        )
        assert set(out) == set(names)
        for n in names:
            assert_close(f"{backend}/{n}/{shards} shards", ref[n], out[n], 1e-5)
    # the merged lse is each row's logsumexp over every key (float64 oracle)
    logits = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * 0.3
    logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
    want = torch.logsumexp(logits, dim=-1)
    torch.testing.assert_close(whole.lse.double(), want, rtol=1e-6, atol=1e-6)
    assert bool(torch.isneginf(whole.lse[1]).all())


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_query_and_key_shards_add_up(backend: str) -> None:
    # Ulysses x ring: each query shard merges its key shards; the finished outputs of the query
    # shards add up to the whole call's (text groups on cross, as capture asks)
    lay = PARTIAL_LAYOUTS["joint-text-first"]
    names = ("cross", "temporal", "text", "entropy")
    q, k = make_qk(lay, heads=2, seed=41)
    groups = [[0, 2], [1], [3, 4, 5]]
    total: dict[str, torch.Tensor] = {}
    for r0, r1 in ((0, 7), (7, 25), (25, lay.num_queries)):
        cuts = (
            [(0, 10), (10, 10), (10, lay.num_keys)] if r0 == 0 else _cuts(lay.num_keys, 3, r0)
        )  # an empty one
        whole = _sharded(q[:, :, r0:r1], k, lay, names, cuts, backend, rows=(r0, r1), text_groups=groups)
        for n, t in ops.finish_partial(whole).items():
            total[n] = total[n] + t if n in total else t
    ref = ops.attention_sums(q, k, lay, names, text_groups=groups, backend="reference")
    for n in names:
        assert_close(n, ref[n], total[n], 1e-5)


def test_partial_sums_of_huge_and_nan_rows() -> None:
    lay = PARTIAL_LAYOUTS["self-prefix"]
    q, k = make_qk(lay, heads=2, seed=42)
    q[0, 0, 5, 0] = 1e3  # logits ~1e3 apart: each shard's own max, merged exactly
    q[1, 1, 3, 2] = float("nan")
    names = ("temporal", "entropy", "full")
    cuts = _cuts(lay.num_keys, 3, 2)
    got = ops.finish_partial(_sharded(q, k, lay, names, cuts, "native", check_finite=False), per_head=True)
    ref = ops.attention_sums(q, k, lay, names, per_head=True, check_finite=False, backend="reference")
    for n in names:
        assert torch.equal(got[n].isnan(), ref[n].isnan()), n
        assert_close(n, ref[n][0], got[n][0], 1e-5)
    assert bool(got["full"][1, 1, 3].isnan().all()) and not bool(got["full"][1, 1, 4].isnan().any())


def test_partial_sums_are_checked_by_name() -> None:
    lay = PARTIAL_LAYOUTS["self-prefix"]
    q, k = make_qk(lay, heads=2, seed=43)
    with pytest.raises(ValueError, match=r"^reductions: \['received'\] sum over the query rows per key"):
        ops.partial_sums(q, k, lay, ("temporal", "received"))
    with pytest.raises(ValueError, match=r"^keys \(0, 5\) holds 5 tokens, but the tensor holds 32"):
        ops.partial_sums(q, k, lay, ("temporal",), keys=(0, 5))
    with pytest.raises(ValueError, match=r"^rows must be a pair \(lo, hi\) with 0 <= lo <= hi <= 32"):
        ops.partial_sums(q, k, lay, ("temporal",), rows=(3, 40))
    with pytest.raises(ValueError, match=r"^backend must be 'auto' or one of triton, native, reference"):
        ops.partial_sums(q, k, lay, ("temporal",), backend="blocks")
    a = ops.partial_sums(q, k[:, :, :10], lay, ("temporal",), keys=(0, 10))
    b = ops.partial_sums(q, k[:, :, 8:], lay, ("temporal",), keys=(8, 32))
    with pytest.raises(
        ValueError, match=r"^parts must cover disjoint key ranges, got \[\(0, 10\), \(8, 32\)\]"
    ):
        ops.merge_partials([a, b])
    with pytest.raises(
        ValueError, match=r"^part covers the keys \[\(0, 10\)\] of 0\.\.32: merge the partial"
    ):
        ops.finish_partial(a)
    c = ops.partial_sums(q[:, :, :4], k[:, :, 10:], lay, ("temporal",), keys=(10, 32), rows=(0, 4))
    with pytest.raises(ValueError, match=r"^parts must share the layout, query rows"):
        ops.merge_partials([a, c])
    with pytest.raises(ValueError, match=r"^parts must hold at least one Partial"):
        ops.merge_partials([])


@needs_triton
@pytest.mark.parametrize("shards", [2, 3])
def test_triton_key_shards_merge_to_the_unsharded_maps(shards: int) -> None:
    lay = Layout.joint(text=9, grid=(2, 5, 6), text_first=False)  # 69 tokens: several 16 x 16 tiles
    names = ("cross", "text", "full", "entropy")
    q, k = make_qk(lay, heads=4, kv_heads=2, d=24, seed=shards, device=TRITON_DEVICE)
    keep = torch.rand(2, lay.num_keys, generator=torch.Generator().manual_seed(shards)) > 0.25
    keep[1] = False
    groups = [[0, 4], [2], [5, 6, 7, 8]]
    cuts = _cuts(lay.num_keys, shards, seed=shards)
    whole = _sharded(q, k, lay, names, cuts, "triton", mask=keep.to(q.device), scale=0.3, text_groups=groups)
    ref = ops.attention_sums(
        q.cpu(),
        k.cpu(),
        lay,
        names,
        key_padding_mask=keep,
        scale=0.3,
        text_groups=groups,
        backend="reference",
    )
    out = ops.finish_partial(whole)
    for n in names:
        assert_close(f"triton/{n}", ref[n], out[n].cpu(), 1e-5)
    logits = (q.cpu().double() @ k.cpu().double().repeat_interleave(2, 1).transpose(-1, -2)) * 0.3
    want = torch.logsumexp(logits.masked_fill(~keep[:, None, None, :], float("-inf")), dim=-1)
    torch.testing.assert_close(whole.lse.cpu().double(), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(
        ValueError, match=r"^backend='triton' cannot form these partial sums: the Triton kernel"
    ):
        ops.partial_sums(q, k, lay, ("temporal",), backend="triton")


# -- query shards (context parallelism: each rank holds some query rows against every key) -------

SHARD_BACKENDS = ["native", "blocks", "reference", pytest.param("triton", marks=needs_triton)]
SHARD_NAMES = ("cross", "temporal", "text", "received", "full", "blocks", "distance", "entropy")


@pytest.mark.parametrize("per_head", [False, True], ids=["mean", "per_head"])
@pytest.mark.parametrize("given_lse", [False, True], ids=["two-pass", "lse"])
@pytest.mark.parametrize("name", list(STATS_LAYOUTS))
@pytest.mark.parametrize("backend", SHARD_BACKENDS)
def test_query_shards_add_up_to_the_whole_call(
    name: str, backend: str, given_lse: bool, per_head: bool
) -> None:
    # cuts inside frames, inside the text and an empty shard: each shard's outputs have the whole
    # layout's shapes, zero outside its rows, and their sum is the float64 oracle's for every row
    lay = STATS_LAYOUTS[name]
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    q, k = make_qk(lay, heads=4, kv_heads=2, d=24, seed=len(name), device=device)
    keep = torch.rand(2, lay.num_keys, generator=torch.Generator().manual_seed(len(name))) > 0.2
    cubes_ok = lay.supports("blocks", block_size=(2, 2, 3))  # video cubes need video keys
    names = tuple(n for n in SHARD_NAMES if lay.supports(n) and (n != "blocks" or cubes_ok))
    if backend == "native":  # its distance reads the grid from the first video row: auto takes blocks
        names = tuple(n for n in names if n != "distance")
    kw: dict[str, object] = {
        "scale": 0.3,
        "per_head": per_head,
        "block_size": (2, 2, 3) if cubes_ok else None,
    }
    cubes = ops.attention_sums(q, k, lay, names, key_padding_mask=keep, backend="reference", **kw)
    tiles = ops.attention_sums(
        q,
        k,
        lay,
        ("blocks",),
        key_padding_mask=keep,
        backend="reference",
        scale=0.3,
        per_head=per_head,
        block_size=(5, 7),
    )
    lse = None
    if given_lse:  # each row's logsumexp over every key, as a ring's merged lse gives it
        logits = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * 0.3
        lse = torch.logsumexp(
            logits.masked_fill(~keep[:, None, None, :].to(q.device), float("-inf")), -1
        ).float()
    total: dict[str, torch.Tensor] = {}
    cuts = [(0, 5), (5, 5), *_cuts(lay.num_queries - 5, 3, seed=len(name))]
    cuts = [(lo + 5 * (i > 1), hi + 5 * (i > 1)) for i, (lo, hi) in enumerate(cuts)]
    assert cuts[-1][1] == lay.num_queries
    for lo, hi in cuts:
        shard = {"rows": (lo, hi), "key_padding_mask": keep.to(q.device), "backend": backend}
        if lse is not None:
            shard["lse"] = lse[:, :, lo:hi]
        out = ops.attention_sums(q[:, :, lo:hi], k, lay, names, **shard, **kw)  # type: ignore[arg-type]
        out["tiles"] = ops.attention_sums(
            q[:, :, lo:hi],
            k,
            lay,
            ("blocks",),
            **shard,
            scale=0.3,
            per_head=per_head,
            block_size=(5, 7),  # type: ignore[arg-type]
        )["blocks"]
        for n, t in out.items():
            total[n] = total[n] + t if n in total else t
        if "entropy" in out and lo < hi:  # zero outside the shard's rows
            assert bool((out["entropy"][..., :lo] == 0).all() and (out["entropy"][..., hi:] == 0).all())
    for n in names:
        assert_close(f"{backend}/{n}", cubes[n], total[n].cpu(), 1e-5)
    assert_close(f"{backend}/blocks tiles", tiles["blocks"], total["tiles"].cpu(), 1e-5)


def test_query_shards_with_text_groups_and_the_native_grouped_path(
    native_calls: list[tuple[int, ...]],
) -> None:
    lay = Layout.joint(text=9, grid=(3, 2, 3))
    q, k = make_qk(lay, heads=2, seed=5)
    groups = [[0, 3], [1, 2], [8]]
    ref = ops.attention_sums(q, k, lay, ("cross", "temporal"), text_groups=groups, backend="reference")
    total = {}
    for lo, hi in ((0, 4), (4, 13), (13, 27)):
        out = ops.attention_sums(
            q[:, :, lo:hi], k, lay, ("cross", "temporal"), text_groups=groups, rows=(lo, hi)
        )
        total = {n: total[n] + t if n in total else t for n, t in out.items()}
    assert [c[2] for c in native_calls] == [0, 4, 14]  # the grouped kernel read only each shard's video rows
    for n in ("cross", "temporal"):
        assert_close(n, ref[n], total[n], 1e-5)


def test_query_shards_are_checked_by_name() -> None:
    lay = Layout.self_attn(grid=(2, 2, 3))
    q, k = make_qk(lay, heads=2, seed=6)
    with pytest.raises(
        ValueError,
        match=r"^rows must be a pair \(lo, hi\) with 0 <= lo <= hi <= 12 \(the layout's queries\), got \(3, 20\)",
    ):
        ops.attention_sums(q[:, :, 3:], k, lay, ("temporal",), rows=(3, 20))
    with pytest.raises(ValueError, match=r"^rows \(3, 8\) holds 5 query positions, but q holds 9 rows"):
        ops.attention_sums(q[:, :, 3:], k, lay, ("temporal",), rows=(3, 8))
    with pytest.raises(
        ValueError,
        match=r"^layout Layout.self_attn\(grid=\(2, 2, 3\), prefix=0\) expects 12 queries and 12 keys, but the call has 12 queries and 5 keys",
    ):
        ops.attention_sums(q[:, :, 3:], k[:, :, :5], lay, ("temporal",), rows=(3, 12))
    with pytest.raises(ValueError, match=r"^rows: 'probe' reads rows by their query index"):
        ops.attention_sums(q[:, :, 3:], k, lay, ("probe",), probe=torch.tensor([4]), rows=(3, 12))
    with pytest.raises(
        ValueError, match=r"^rows: not with key_range \(a shard of the query rows with per-row"
    ):
        ranges = (torch.zeros(9, dtype=torch.long), torch.full((9,), 12))
        ops.attention_sums(q[:, :, 3:], k, lay, ("temporal",), rows=(3, 12), key_range=ranges)
    with pytest.raises(ValueError, match=r"^lse must have shape \[B, H, Nq\] = \(2, 2, 9\)"):
        ops.attention_sums(q[:, :, 3:], k, lay, ("temporal",), rows=(3, 12), lse=torch.zeros(2, 2, 12))
    # distance on a shard: the native kernel reads the grid from the first video row, auto takes blocks
    call = ops.prepare_call(q[:, :, 3:], k, lay, ("distance",), rows=(3, 12))
    assert ops.choose("auto", call).__name__ == "attnmap.reduce.blocks"
    with pytest.raises(
        ValueError, match=r"^backend='native' cannot reduce this call: distance needs every video query row"
    ):
        ops.attention_sums(q[:, :, 3:], k, lay, ("distance",), rows=(3, 12), backend="native")


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_ring_query_shard_reads_per_key_reductions_with_the_merged_lse(backend: str) -> None:
    # a ring rank: its query rows meet the key shards one by one; the merged lse makes received,
    # blocks and distance exact in one pass over the gathered keys, and the ranks' outputs add up
    lay = Layout.self_attn(grid=(3, 2, 4), prefix=1)
    q, k = make_qk(lay, heads=2, d=16, seed=9)
    names = ("received", "blocks", "distance")
    ref = ops.attention_sums(q, k, lay, names, block_size=(1, 2, 2), backend="reference")
    total: dict[str, torch.Tensor] = {}
    ranks = [(0, 7), (7, 13), (13, 19), (19, 25)]
    for lo, hi in ranks:
        merged = _sharded(q[:, :, lo:hi], k, lay, ("entropy",), ranks, backend, rows=(lo, hi))
        out = ops.attention_sums(
            q[:, :, lo:hi], k, lay, names, rows=(lo, hi), lse=merged.lse, block_size=(1, 2, 2), backend="auto"
        )
        total = {n: total[n] + t if n in total else t for n, t in out.items()}
    for n in names:
        assert_close(n, ref[n], total[n], 1e-5)
