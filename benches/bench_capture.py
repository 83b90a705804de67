"""Capture overhead on a Wan-shaped transformer: a few denoising forwards with capture of
cross + temporal on every block (two target tokens) against the same forwards without capture,
for both reduction modes: ``two-pass`` (the model's own SDPA call untouched, attnmap recomputes the
row statistics) and ``one-pass`` (``one_pass=True``: the recorded calls run through
:func:`attnmap.reduce.sdpa_with_lse` and the reduction reuses their logsumexp).

Sizes: plain pytest smoke-runs a 2-block toy; ``--benchmark-enable`` runs the Wan 2.1 1.3B shape
(30 blocks, 12 heads of 128, 480p: grid (21, 30, 52) = 32,760 tokens, text padded to 512, bf16)
on CUDA, and on a CPU a Wan scaled down where it does not change what capture costs relative to the
forward: heads of 128 as in every Wan, FFN 6x the width (Wan 1.3B: 8960 / 1536), text padded to
512, and enough tokens (grid (5, 30, 32) = 4,800) that attention takes about 60% of the forward's
time as at 480p; but 2 blocks of 2 heads, so that a run takes about a second. (Until 2026-11-25
the CPU model had heads of 32 and 960 tokens, where attention is half the forward and the per-call
Python costs weigh more: ``ATTNMAP_BENCH_CPU_TOY=1`` still runs it.)

    pytest benches/bench_capture.py -s --benchmark-enable
"""

from __future__ import annotations

import os
from typing import Any, Callable

import pytest
import torch

import attnmap
from _timing import Timing, machine, quiet, record, timed

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

STEPS = 2
CUDA = torch.cuda.is_available()


def wan_shape(
    request: pytest.FixtureRequest,
) -> tuple[str, dict[str, Any], tuple[int, ...], int, torch.dtype]:
    """(label, WanTransformer3DModel kwargs, latent shape [B, C, F, H, W], text length, dtype)."""
    cfg_opt = request.config.getoption
    if cfg_opt("benchmark_disable") and not cfg_opt("benchmark_enable"):
        cfg = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32,
                   freq_dim=32, ffn_dim=64, num_layers=2)  # fmt: skip
        return "smoke", cfg, (1, 4, 3, 8, 8), 16, torch.float32
    if CUDA:
        cfg = dict(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                   freq_dim=256, ffn_dim=8960, num_layers=30)  # fmt: skip
        return "wan1.3b-480p", cfg, (1, 16, 21, 60, 104), 512, torch.bfloat16
    if os.environ.get("ATTNMAP_BENCH_CPU_TOY") == "1":  # the CPU model used until 2026-11-25
        cfg = dict(num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4, text_dim=64,
                   freq_dim=32, ffn_dim=256, num_layers=4)  # fmt: skip
        return "cpu-toy", cfg, (1, 4, 5, 24, 32), 64, torch.float32
    cfg = dict(num_attention_heads=2, attention_head_dim=128, in_channels=4, out_channels=4, text_dim=256,
               freq_dim=256, ffn_dim=1536, num_layers=2)  # fmt: skip
    return "cpu-scaled", cfg, (1, 4, 5, 60, 64), 512, torch.float32


@pytest.fixture(scope="module")
def setup(request: pytest.FixtureRequest) -> dict[str, Any]:
    from diffusers import WanTransformer3DModel

    label, cfg, shape, text_len, dtype = wan_shape(request)
    device = "cuda" if CUDA else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), cross_attn_norm=True, qk_norm="rms_norm_across_heads", **cfg
        )
    model = (model if dtype == torch.float32 else model.to(dtype)).eval()
    text = torch.zeros(1, text_len, cfg["text_dim"], device=device, dtype=dtype)
    text[:, :12] = torch.randn(
        1, 12, cfg["text_dim"], device=device, dtype=dtype
    )  # 12 real tokens, zero pads
    kwargs = {
        "hidden_states": torch.randn(shape, device=device, dtype=dtype),
        "timestep": torch.tensor([500], device=device),
        "encoder_hidden_states": text,
        "return_dict": False,
    }
    return {"label": label, "model": model, "kwargs": kwargs, "device": device}


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def plain_run(s: dict[str, Any]) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.no_grad():
            for _ in range(STEPS):
                out = s["model"](**s["kwargs"])[0]
        sync()
        return out

    return run


def captured_run(s: dict[str, Any], keep: list[Any], one_pass: bool) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        targets = {"cat": [3], "dog": [5, 6]}
        with attnmap.capture(s["model"], targets=targets, one_pass=one_pass) as rec, torch.no_grad():
            for _ in range(STEPS):
                out = s["model"](**s["kwargs"])[0]
                rec.step()
        sync()
        keep[:] = [rec]
        return out

    return run


def has_amx() -> bool:
    from attnmap import _native

    return not CUDA and "amx" in _native.kernel_info()["builds"]


def on_fma_build(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` with the CPU kernels' AVX-512 build, whose q k^T products are f32 FMAs, instead of the
    AMX build's tiles (see rust/src/amx.rs): the kernels as they were before 2026-12-07, 09:00."""
    from attnmap import _native

    def run() -> Any:
        _native.set_kernel_build("avx512")
        try:
            return fn()
        finally:
            _native.set_kernel_build(None)

    return run


def fma_build(timings: list[Timing], plain: Timing) -> dict[str, float]:
    """The figures of :func:`on_fma_build`'s run, where there was one."""
    if not timings:
        return {}
    return {**timings[0].as_dict("capture_fma_build"), "ratio_fma_build": timings[0].wall / plain.wall}


def peak_bytes(fn: Callable[[], Any]) -> int:
    if not CUDA:
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.benchmark(group="capture")
@pytest.mark.parametrize("one_pass", [False, True], ids=["two-pass", "one-pass"])
def test_capture_overhead(benchmark: Any, setup: dict[str, Any], one_pass: bool) -> None:
    start = machine()
    keep: list[Any] = []
    plain, captured = plain_run(setup), captured_run(setup, keep, one_pass)
    # correctness first: the output is bit-identical and the maps are probabilities
    want = plain()
    got = captured()
    assert torch.equal(want, got), "capture changed the model output"
    rec = keep[0]
    assert rec.steps == list(range(STEPS))
    temporal = rec.get("temporal")  # each query frame's attention over key frames sums to 1
    assert torch.allclose(temporal.sum(-1), torch.ones_like(temporal.sum(-1)), atol=2e-3)
    token_mass = rec.get("token/cat") + rec.get("token/dog") + rec.get("padding")
    assert bool((token_mass <= 1 + 1e-3).all()) and bool((token_mass > 0).all())
    if one_pass:  # the one-pass maps equal the two-pass maps of the same forwards
        reference: list[Any] = []
        captured_run(setup, reference, False)()
        for name in rec.names:
            got, want = rec.get(name), reference[0].get(name)
            err = (got - want).abs().max().item()
            assert err <= 2e-3 * max(want.abs().max().item(), 1e-6), (
                f"one-pass {name}: max abs error {err:.3g}"
            )

    rounds = {"smoke": 1, "cpu-scaled": 8}.get(setup["label"], 7)
    benchmark.pedantic(captured, rounds=rounds, iterations=1, warmup_rounds=0)
    methods = [plain, captured]
    if has_amx():  # beside it, the kernels' products as f32 FMAs instead of on AMX tiles
        methods.append(on_fma_build(captured))
    t_plain, t_capture, *t_fma = timed(methods, rounds)
    m_plain, m_capture = peak_bytes(plain), peak_bytes(captured)
    kept = sum(
        rec.get(n, step=s).numel() * 4 for s in rec.steps for n in rec.names
    )  # bytes of per-step maps held
    info = {
        "size": setup["label"],
        "mode": "one-pass" if one_pass else "two-pass",
        "device": setup["device"],
        **t_plain.as_dict("plain"),
        **t_capture.as_dict("capture"),
        "ratio": t_capture.wall / t_plain.wall,
        "cpu_ratio": t_capture.cpu_best / t_plain.cpu_best,
        **fma_build(t_fma, t_plain),
        "peak_plain_MiB": m_plain / 2**20,
        "peak_capture_MiB": m_capture / 2**20,
        "extra_MiB": (m_capture - m_plain) / 2**20,
        "kept_maps_MiB": kept / 2**20,
        # the target, capture within 1.3x of the forward, holds on the CPU model in the CPU's default
        # mode, on a machine that nothing else shares
        "targets_asserted": setup["label"] == "cpu-scaled" and one_pass and quiet(start),
    }
    record(benchmark, info, start)
    if info["targets_asserted"]:
        assert info["ratio"] <= 1.3, info


@pytest.mark.benchmark(group="capture")
def test_compiled_capture_overhead(benchmark: Any, setup: dict[str, Any]) -> None:
    """The same forwards of ``torch.compile(model)`` (inductor), with and without capture.

    Capture's hooks and entry points are traced into the graph and the reductions run from the opaque
    op ``attnmap::observe`` as the graph runs; the ratio is against the compiled forward without
    capture (and beside it, eager capture against the eager forward in the same rounds).
    """
    from torch._dynamo.utils import counters

    start = machine()
    torch._dynamo.reset()
    compiled = {**setup, "model": torch.compile(setup["model"])}
    keep: list[Any] = []
    plain, captured = plain_run(compiled), captured_run(compiled, keep, False)
    eager_plain, eager_captured = plain_run(setup), captured_run(setup, [], False)
    want = plain()  # compiles
    got = captured()  # compiles once more, with capture's hooks traced in
    assert torch.equal(want, got), "capture changed the compiled graph"
    temporal = keep[0].get("temporal")
    assert torch.allclose(temporal.sum(-1), torch.ones_like(temporal.sum(-1)), atol=2e-3)
    plain()  # each way of running once more: dynamo keeps both graphs (with and without the hooks)
    captured()
    graphs = counters["stats"]["unique_graphs"]

    rounds = {"smoke": 1, "cpu-scaled": 5}.get(setup["label"], 7)
    benchmark.pedantic(captured, rounds=rounds, iterations=1, warmup_rounds=0)
    t_plain, t_capture, t_eager, t_eager_cap = timed([plain, captured, eager_plain, eager_captured], rounds)
    # every round's capture (a new one each) ran the graphs compiled above: none was compiled again
    assert counters["stats"]["unique_graphs"] == graphs, "the timed rounds recompiled the model"
    info = {
        "size": setup["label"],
        "mode": "compiled",
        "device": setup["device"],
        **t_plain.as_dict("plain"),
        **t_capture.as_dict("capture"),
        "ratio": t_capture.wall / t_plain.wall,
        "cpu_ratio": t_capture.cpu_best / t_plain.cpu_best,
        **t_eager.as_dict("eager_plain"),
        **t_eager_cap.as_dict("eager_capture"),
        "eager_ratio": t_eager_cap.wall / t_eager.wall,
    }
    record(benchmark, info, start)
    torch._dynamo.reset()


@pytest.mark.benchmark(group="capture")
def test_capture_floor(benchmark: Any, setup: dict[str, Any]) -> None:
    """What capture cannot cost less than on this model, from its parts, in the same rounds: the
    uncaptured forward; one block's self-attention SDPA call; the reduction capture runs on it
    (``temporal``, with the lse SDPA gave: one pass); the same q k^T products alone through torch's
    BLAS (``torch.mm`` in chunks of 256 rows that stay in cache: what any exact reduction must
    compute, without its exponentials and sums); and the cross call's reduction over the targets
    (one pass too, as capture runs both on the CPU).
    ``floor`` = 1 + blocks * (self + cross reductions) / forward: capture's ratio if nothing but the
    reduction cost anything."""
    if CUDA:
        pytest.skip("the floor is a CPU figure: the GPU path reduces with the Triton kernel")
    start = machine()
    model, kwargs = setup["model"], setup["kwargs"]
    cfg = model.config
    _, _, frames, height, width = kwargs["hidden_states"].shape
    grid = (frames, height // 2, width // 2)
    n, text = grid[0] * grid[1] * grid[2], kwargs["encoder_hidden_states"].shape[1]
    heads, dim = cfg.num_attention_heads, cfg.attention_head_dim
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim) for _ in range(3))
    kt, vt = torch.randn(1, heads, text, dim), torch.randn(1, heads, text, dim)
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
    _, lse_cross = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, kt, vt)[:2]
    self_layout = attnmap.Layout.self_attn(grid=grid)
    cross_layout = attnmap.Layout.cross(grid=grid, text=text)
    groups = [[3], [5, 6], list(range(12, text))]  # the bench's two targets and the padded tail
    # correctness first: the one-pass reduction equals the two-pass one (and rows sum to 1)
    one = attnmap.attention_sums(q, k, self_layout, ("temporal",), lse=lse, check_finite=False)
    two = attnmap.attention_sums(q, k, self_layout, ("temporal",), check_finite=False)
    torch.testing.assert_close(one["temporal"], two["temporal"], rtol=1e-4, atol=1e-6)

    forward = plain_run({**setup, "kwargs": kwargs})

    def sdpa() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def sdpa_cross() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, kt, vt)

    def reduce_self() -> dict[str, torch.Tensor]:
        return attnmap.attention_sums(q, k, self_layout, ("temporal",), lse=lse, check_finite=False)

    def reduce_cross() -> dict[str, torch.Tensor]:
        return attnmap.attention_sums(
            q, kt, cross_layout, ("cross",), text_groups=groups, lse=lse_cross, check_finite=False
        )

    def products() -> None:
        for h in range(heads):
            keys = k[0, h].T
            for r in range(0, n, 256):
                torch.mm(q[0, h, r : r + 256], keys)

    rounds = {"smoke": 1}.get(setup["label"], 5)
    benchmark.pedantic(reduce_self, rounds=rounds, iterations=1, warmup_rounds=0)
    methods = [forward, sdpa, reduce_self, products, reduce_cross, sdpa_cross]
    if has_amx():  # beside it, the self reduction with f32 FMA products instead of AMX tiles
        methods.append(on_fma_build(reduce_self))
    t_fwd, t_sdpa, t_self, t_mm, t_cross, t_sdpa_cross, *t_fma = timed(methods, rounds, warmup=True)
    blocks = cfg.num_layers
    per_forward = STEPS  # plain_run runs STEPS forwards
    extra = per_forward * blocks * (t_self.wall + t_cross.wall)
    flops = 2 * heads * n * n * dim
    info = {
        "size": setup["label"],
        "tokens": n,
        "text": text,
        **t_fwd.as_dict("forwards"),
        **t_sdpa.as_dict("sdpa_self"),
        **t_self.as_dict("reduce_self"),
        **t_mm.as_dict("qk_products_blas"),
        **t_cross.as_dict("reduce_cross"),
        **t_sdpa_cross.as_dict("sdpa_cross"),
        "reduce_self_vs_sdpa": t_self.wall / t_sdpa.wall,
        "reduce_self_vs_blas_products": t_self.wall / t_mm.wall,
        "reduce_self_gflops": flops / t_self.wall / 1e9,
        "blas_products_gflops": flops / t_mm.wall / 1e9,
        "attention_share_of_forward": per_forward * blocks * (t_sdpa.wall + t_sdpa_cross.wall) / t_fwd.wall,
        "floor": 1 + extra / t_fwd.wall,
    }
    if t_fma:
        info.update(t_fma[0].as_dict("reduce_self_fma_build"))
        info["reduce_self_vs_fma_build"] = t_self.wall / t_fma[0].wall
    record(benchmark, info, start)
