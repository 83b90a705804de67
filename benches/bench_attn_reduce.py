"""attention_sums against SDPA's forward and the materialising methods, on the CPU and on CUDA.

Plain ``pytest`` smoke-runs the CPU part at N=1024 (correctness plus the memory and time ratios,
targets not asserted); ``pytest benches/bench_attn_reduce.py -s --benchmark-enable`` runs the issue's
sizes and asserts the targets where the run started quiet (``benches/_timing.py``: a load average of
at most 1; a loaded run prints ``LOADED`` and asserts correctness and memory only). The GPU part
skips without CUDA.

Every CPU figure comes from ``_timing.timed``: the methods interleaved in each round, best of n, with
the wall time, the CPU time and the cores each used, and the machine (CPUs, torch and kernel threads,
the load average at the start) beside them.

Peak extra memory (CPU) is measured in a fresh subprocess per method: after the inputs are made and
a tiny warm-up call has loaded every library, ``/proc/self/clear_refs`` resets the RSS high-water
mark (``VmHWM``) to the current RSS; after the call, ``VmHWM`` minus that RSS is the peak extra.
It is compared with the map a materialising method must hold, one fp32 [B, H, N, N] tensor
(B*H*N*N*4 bytes). The float64 oracle checks the outputs where it fits comfortably (B*H*N*N*4
bytes <= 1 GiB, or N <= 2,048 for the statistics); above that the sum rules do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

from _timing import machine, quiet, record, timed
from attnmap import reduce as ops
from attnmap.layout import Layout

ROOT = Path(__file__).resolve().parents[1]
HEADS, DIM = 4, 64


def _enabled(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("benchmark_enable")) or not request.config.getoption(
        "benchmark_disable"
    )


def _cpu_layout(n: int) -> Layout:
    return Layout.self_attn(grid=(16, 16, n // 256))


_PEAK_SCRIPT = """
import json, sys, torch
from attnmap import reduce as ops
from attnmap.layout import Layout
method, n, heads, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
names = tuple(sys.argv[5].split(","))
size = tuple(int(b) for b in sys.argv[6].split(",")) if len(sys.argv) > 6 else None
torch.manual_seed(0)
lay = Layout.self_attn(grid=(16, 16, n // 256))
q, k, v = (torch.randn(1, heads, n, dim) for _ in range(3))
small = Layout.self_attn(grid=(1, 4, 4))
qs = torch.randn(1, heads, 16, dim)
ops.attention_sums(qs, qs, small, names, backend="auto", block_size=size and (1, 2, 2))
ops.attention_sums(qs, qs, small, names, block_size=size and (1, 2, 2), backend="reference")
torch.nn.functional.scaled_dot_product_attention(qs, qs, qs)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the RSS high-water mark (VmHWM) to VmRSS
base = status("VmRSS")
if method == "torch":
    ops.attention_sums(q, k, lay, names, backend="auto", block_size=size)
elif method == "reference":
    ops.attention_sums(q, k, lay, names, block_size=size, backend="reference")
else:
    torch.nn.functional.scaled_dot_product_attention(q, k, v)
print(json.dumps({"peak_extra": status("VmHWM") - base}))
"""


def _peak_extra(
    method: str,
    n: int,
    reductions: tuple[str, ...],
    heads: int = HEADS,
    block_size: Optional[tuple[int, ...]] = None,
) -> int:
    """Peak extra RSS in bytes of one call of ``method`` at size n, in a fresh subprocess."""
    names = ",".join(reductions)
    size = [",".join(str(b) for b in block_size)] if block_size else []
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(_PEAK_SCRIPT),
            method,
            str(n),
            str(heads),
            str(DIM),
            names,
            *size,
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={
            "PYTHONPATH": str(ROOT / "python"),
            "PATH": "/usr/bin:/bin",
            "OMP_NUM_THREADS": "2",
            # a fixed mmap threshold: freed blocks go back to the system, so the peak is the
            # method's, not how glibc happened to cache earlier blocks (its dynamic threshold)
            "MALLOC_MMAP_THRESHOLD_": str(2**20),
        },
    )
    return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_extra"])


def _cpu_sizes(request: pytest.FixtureRequest) -> list[int]:
    return [4096, 16384] if _enabled(request) else [1024]


#: The CPU paths of the native backend: temporal alone runs in the grouped kernel
#: (``attnmap._native.attention_groups``); with received, in ``attnmap._native.attention_stats``.
CPU_PATHS = {"grouped": ("temporal",), "stats": ("temporal", "received")}


@pytest.mark.benchmark(group="attn_reduce-cpu")
@pytest.mark.parametrize("path", list(CPU_PATHS))
@pytest.mark.parametrize("size", ["small", "large"])
def test_cpu_torch_backend(benchmark: Any, request: pytest.FixtureRequest, size: str, path: str) -> None:
    sizes = _cpu_sizes(request)
    n = sizes[0] if size == "small" else sizes[-1]
    if size == "large" and len(sizes) == 1:
        pytest.skip("the large size runs with --benchmark-enable")
    start = machine()
    lay = _cpu_layout(n)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, n, DIM) for _ in range(3))
    reductions = CPU_PATHS[path]

    def ours() -> dict[str, torch.Tensor]:
        return ops.attention_sums(q, k, lay, reductions, backend="auto")

    out = ours()
    fits = HEADS * n * n * 4 <= 2**30
    if fits:  # correctness first: the materialising oracle on the same inputs
        ref = ops.attention_sums(q, k, lay, reductions, backend="reference")
        for name in reductions:
            torch.testing.assert_close(out[name], ref[name], rtol=1e-4, atol=1e-6)
    else:  # too big for the oracle here: its invariants (rows of P sum to one)
        torch.testing.assert_close(out["temporal"].sum(-1), torch.ones(1, lay.frames), rtol=1e-4, atol=0)
        if "received" in out:
            torch.testing.assert_close(out["received"].sum(-1), torch.ones(1), rtol=1e-4, atol=0)

    reps = 3 if n <= 4096 else 2  # best of 2 at 16,384: one slow round on a shared machine is not the method
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
    t_sdpa, t_ours = timed([sdpa, ours], reps, warmup=True)
    t_ref = (
        timed([lambda: ops.attention_sums(q, k, lay, reductions, backend="reference")], reps)[0].wall
        if fits
        else float("nan")
    )
    mem_ours = _peak_extra("torch", n, reductions)
    mem_sdpa = _peak_extra("sdpa", n, reductions)
    # the materialising method's one [B, H, N, N] fp32 map (the oracle itself works in float64)
    mem_ref = HEADS * n * n * 4
    info = {
        "N": n,
        "heads": HEADS,
        "path": path,
        **t_ours.as_dict("ours"),
        **t_sdpa.as_dict("sdpa"),
        "reference_s": t_ref,
        "time_vs_sdpa": t_ours.wall / t_sdpa.wall,
        "peak_extra_ours_MiB": mem_ours / 2**20,
        "peak_extra_sdpa_MiB": mem_sdpa / 2**20,
        "materialised_map_MiB": mem_ref / 2**20,
        "memory_vs_map": mem_ours / mem_ref,
        "targets_asserted": _enabled(request) and quiet(start),
    }
    record(benchmark, info, start)
    if _enabled(request):
        assert info["memory_vs_map"] < 0.10, info
        if quiet(start):
            assert info["time_vs_sdpa"] <= 3.0, info
    benchmark.pedantic(ours, rounds=1 if n > 4096 else 3, iterations=1)


#: The statistics of sparse-attention design, all in one call: the issue's CPU size and cubes of
#: 4 x 4 x 4 tokens (video sparse attention's blocks)
STATS = ("temporal", "received", "blocks", "distance", "entropy")
#: the pair that capture records most (the frame-to-frame map and where the layer looks)
PAIR = ("temporal", "received")
STATS_HEADS, STATS_N, STATS_CUBES = 2, 8192, (4, 4, 4)


@pytest.mark.benchmark(group="attn_reduce-cpu-stats")
def test_cpu_statistics(benchmark: Any, request: pytest.FixtureRequest) -> None:
    """temporal, received, blocks, distance and entropy together at H=2, N=8,192, D=64 (fp32), every
    core: within 1.2x one SDPA forward, and ("temporal", "received") within 1.0x, in the same
    interleaved rounds; under 2% of the materialising map's memory (B*H*N*N*4 bytes)."""
    start = machine()
    n = STATS_N if _enabled(request) else 1024
    lay = _cpu_layout(n)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, STATS_HEADS, n, DIM) for _ in range(3))

    def ours() -> dict[str, torch.Tensor]:
        return ops.attention_sums(q, k, lay, STATS, backend="auto", block_size=STATS_CUBES)

    def pair() -> dict[str, torch.Tensor]:
        return ops.attention_sums(q, k, lay, PAIR, backend="auto")

    out = ours()
    assert ops.choose("auto", ops.prepare_call(q, k, lay, STATS, block_size=STATS_CUBES)).__name__ == (
        "attnmap.reduce.native"
    )
    if n <= 2048:  # correctness first: the float64 oracle on the same inputs
        ref = ops.attention_sums(q, k, lay, STATS, block_size=STATS_CUBES, backend="reference")
        for name in STATS:
            scale = float(ref[name].abs().max())
            assert float((out[name] - ref[name]).abs().max()) <= 1e-4 * scale, name
    else:  # the sum rules: blocks rows and temporal rows sum to 1, distance to the video mass
        for name in ("temporal", "blocks"):
            torch.testing.assert_close(
                out[name].sum(-1), torch.ones_like(out[name][..., 0]), rtol=1e-4, atol=0
            )
        torch.testing.assert_close(out["distance"].sum((-3, -2, -1)), torch.ones(1), rtol=1e-4, atol=0)
        torch.testing.assert_close(out["received"].sum(-1), torch.ones(1), rtol=1e-4, atol=0)
    two = pair()
    for name in PAIR:
        torch.testing.assert_close(two[name], out[name], rtol=1e-5, atol=1e-7)

    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
    t_sdpa, t_ours, t_pair = timed([sdpa, ours, pair], 5, warmup=True)
    mem_ours = _peak_extra("torch", n, STATS, heads=STATS_HEADS, block_size=STATS_CUBES)
    mem_sdpa = _peak_extra("sdpa", n, STATS, heads=STATS_HEADS, block_size=STATS_CUBES)
    mem_map = STATS_HEADS * n * n * 4  # the [B, H, N, N] fp32 map a materialising method holds
    info = {
        "N": n,
        "heads": STATS_HEADS,
        "block_size": list(STATS_CUBES),
        **t_ours.as_dict("statistics"),
        **t_pair.as_dict("temporal_received"),
        **t_sdpa.as_dict("sdpa"),
        "statistics_vs_sdpa": t_ours.wall / t_sdpa.wall,
        "temporal_received_vs_sdpa": t_pair.wall / t_sdpa.wall,
        "cpu_time_vs_sdpa": t_ours.cpu_best / t_sdpa.cpu_best,
        "peak_extra_ours_MiB": mem_ours / 2**20,
        "peak_extra_sdpa_MiB": mem_sdpa / 2**20,
        "materialised_map_MiB": mem_map / 2**20,
        "memory_vs_map": mem_ours / mem_map,
        "targets_asserted": _enabled(request) and quiet(start),
    }
    record(benchmark, info, start)
    if _enabled(request):
        assert info["memory_vs_map"] < 0.02, info
        if quiet(start):
            assert info["statistics_vs_sdpa"] <= 1.2, info
            assert info["temporal_received_vs_sdpa"] <= 1.0, info
    benchmark.pedantic(ours, rounds=1, iterations=1)


#: The scaling table: sizes and the methods timed at each, at one thread and at every thread
SCALING_SIZES = (4096, 8192, 16384, 32768)
_SCALING_SCRIPT = """
import json, sys, torch
from attnmap import reduce as ops
from attnmap.layout import Layout
from _timing import machine, timed
threads, heads, dim, rounds = (int(a) for a in sys.argv[1:5])
torch.set_num_threads(threads)
stats = ("temporal", "received", "blocks", "distance", "entropy")
groups = [[3], [5, 6], list(range(12, 512))]  # two target words and the padded tail, as capture asks
print(json.dumps({"machine": machine()}), flush=True)
for n in (int(a) for a in sys.argv[5:]):
    torch.manual_seed(0)
    grid = (16, 16, n // 256)
    self_lay, cross_lay = Layout.self_attn(grid=grid), Layout.cross(grid=grid, text=512)
    q, k, v = (torch.randn(1, heads, n, dim) for _ in range(3))
    kt, vt = (torch.randn(1, heads, 512, dim) for _ in range(2))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    methods = {
        "sdpa": lambda: sdpa(q, k, v),
        "temporal": lambda: ops.attention_sums(q, k, self_lay, ("temporal",)),
        "temporal+received": lambda: ops.attention_sums(q, k, self_lay, ("temporal", "received")),
        "statistics": lambda: ops.attention_sums(q, k, self_lay, stats, block_size=(4, 4, 4)),
        "sdpa_cross": lambda: sdpa(q, kt, vt),
        "cross_targets": lambda: ops.attention_sums(q, kt, cross_lay, ("cross",), text_groups=groups),
    }
    out = methods["statistics"]()  # correctness first: the sum rules at every size
    assert abs(float(out["received"].sum()) - 1) < 1e-3 and abs(float(out["distance"].sum()) - 1) < 1e-3
    for name in ("temporal", "blocks"):
        assert float((out[name].sum(-1) - 1).abs().max()) < 1e-3, name
    cross = methods["cross_targets"]()["cross"]  # the groups' mass: positive, at most the row's
    assert cross.shape == (1, n, 3) and bool((cross > 0).all()) and float(cross.sum(-1).max()) <= 1 + 1e-4
    times = timed(list(methods.values()), rounds, warmup=True)
    row = {"N": n, "threads": threads}
    for name, t in zip(methods, times):
        row.update(t.as_dict(name))
    print(json.dumps(row), flush=True)
"""


def _scaling(
    threads: int, sizes: tuple[int, ...], rounds: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The scaling rows of one thread count, timed in a fresh process (torch's and the kernels'
    thread pools are sized there), and that process's machine."""
    env = {
        "PYTHONPATH": f"{ROOT / 'python'}:{ROOT / 'benches'}",
        "PATH": "/usr/bin:/bin",
        "OMP_NUM_THREADS": str(threads),
        "RAYON_NUM_THREADS": str(threads),
    }
    args = [str(threads), str(STATS_HEADS), str(DIM), str(rounds), *(str(n) for n in sizes)]
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SCALING_SCRIPT), *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env=env,
    )
    lines = [json.loads(line) for line in done.stdout.strip().splitlines()]
    return lines[0]["machine"], lines[1:]


@pytest.mark.benchmark(group="attn_reduce-cpu-scaling")
def test_cpu_scaling(benchmark: Any, request: pytest.FixtureRequest) -> None:
    """How the cost grows: N = 4k to 32k at one thread and at every thread, H=2, D=64, fp32, for
    ``temporal``, ``("temporal", "received")``, all five statistics (against SDPA over the same keys)
    and ``cross`` with target groups over 512 text keys (against SDPA over those keys); each thread
    count in its own process, the methods interleaved, best of 2 (3 at the smoke size). Prints the
    table for benches/README.md."""
    start = machine()
    sizes = SCALING_SIZES if _enabled(request) else (1024,)
    every = os.cpu_count() or 1
    rows: list[dict[str, Any]] = []
    machines = {}
    for threads in sorted({1, every}):
        machines[threads], got = _scaling(threads, sizes, 2 if _enabled(request) else 3)
        rows.extend(got)
    lines = [
        "| N | threads | SDPA s (cores) | temporal | temporal + received | all statistics | "
        "SDPA over 512 text keys s | cross with targets |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['N']:,} | {r['threads']} | {r['sdpa_s']:.3f} ({r['sdpa_cores']:.2f}) | "
            f"{_cell(r, 'temporal', 'sdpa')} | {_cell(r, 'temporal+received', 'sdpa')} | "
            f"{_cell(r, 'statistics', 'sdpa')} | {r['sdpa_cross_s']:.4f} ({r['sdpa_cross_cores']:.2f}) | "
            f"{_cell(r, 'cross_targets', 'sdpa_cross')} |"
        )
    print("\n" + "\n".join(lines))
    benchmark.extra_info["rows"] = rows
    record(benchmark, {"processes": machines}, start)
    assert [(r["N"], r["threads"]) for r in rows] == [(n, t) for t in sorted({1, every}) for n in sizes]
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def _cell(row: dict[str, Any], name: str, base: str) -> str:
    """A method's time, its ratio to the baseline's and the cores it used, as a table cell."""
    t, ref = row[name + "_s"], row[base + "_s"]
    return f"{t:.3f} s, {t / ref:.2f}x ({row[name + '_cores']:.2f})"


# -- GPU: the model shapes --------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

GPU_CASES = {
    # Wan 1.3B 480p self-attention: 81 frames -> grid (21, 30, 52); self layouts have no text,
    # so the reductions are temporal + received (cross is not defined there)
    "wan-1.3b-self": (Layout.self_attn(grid=(21, 30, 52)), 12, 128, ("temporal", "received")),
    # CogVideoX-2B joint attention: 226 text tokens, 49 frames -> grid (13, 30, 45)
    "cogvideox-2b-joint": (
        Layout.joint(text=226, grid=(13, 30, 45)),
        30,
        64,
        ("cross", "temporal", "received"),
    ),
}


def _cuda_time(fn: Callable[[], object], reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def _head_by_head(
    q: torch.Tensor, k: torch.Tensor, lay: Layout, reductions: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """The head-by-head running sums of attention recorders: per head, softmax(q k^T) materialised and summed
    into a [B, N, N] map."""
    b, h, n, d = q.shape
    total = torch.zeros(b, n, n, dtype=torch.float32, device=q.device)
    for i in range(h):
        total += torch.softmax((q[:, i] @ k[:, i].transpose(-1, -2)).float() * d**-0.5, dim=-1)
    total /= h
    out = {"received": total.mean(dim=1)}
    f, hw = lay.frames, lay.frame_tokens
    out["temporal"] = total[:, lay.video_q, lay.video_k].reshape(b, f, hw, f, hw).sum(-1).mean(2)
    if "cross" in reductions:
        out["cross"] = total[:, lay.video_q, lay.text_k].clone()
    return out


@needs_cuda
@pytest.mark.benchmark(group="attn_reduce-gpu")
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_model_shapes(benchmark: Any, request: pytest.FixtureRequest, case: str) -> None:
    lay, heads, dim, reductions = GPU_CASES[case]
    if not _enabled(request):  # smoke: same layout kind, small grid
        lay = (
            Layout.self_attn(grid=(3, 8, 8)) if lay.kind == "self" else Layout.joint(text=20, grid=(3, 8, 8))
        )
    n = lay.num_queries
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    _, lse = ops.sdpa_with_lse(q, k, v)
    assert lse is not None, "torch offers no lse for this call; the one-pass mode cannot be timed"

    # correctness first: Triton against the torch backend (and the reference when it fits)
    ours = ops.attention_sums(q, k, lay, reductions)
    ours_lse = ops.attention_sums(q, k, lay, reductions, lse=lse)
    base = ops.attention_sums(q, k, lay, reductions, backend="reference" if n <= 4096 else "blocks")
    for name in reductions:
        for got in (ours[name], ours_lse[name]):
            scale = float(base[name].abs().max())
            assert float((got - base[name]).abs().max()) <= 2e-3 * scale, name

    t_sdpa = _cuda_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    t_two = _cuda_time(lambda: ops.attention_sums(q, k, lay, reductions))
    t_one = _cuda_time(lambda: ops.attention_sums(q, k, lay, reductions, lse=lse))
    try:
        t_head = _cuda_time(lambda: _head_by_head(q, k, lay, reductions), reps=2)
        head = f"{t_head * 1e3:.1f} ms"
    except torch.cuda.OutOfMemoryError:
        t_head, head = float("nan"), "out of memory"
    torch.cuda.empty_cache()
    info = {
        "case": case,
        "N": n,
        "sdpa_ms": t_sdpa * 1e3,
        "ours_ms": t_two * 1e3,
        "ours_lse_ms": t_one * 1e3,
        "ratio": t_two / t_sdpa,
        "ratio_lse": t_one / t_sdpa,
        "head_by_head": head,
        "head_by_head_ratio": t_head / t_sdpa,
        "device": torch.cuda.get_device_name(),
    }
    benchmark.extra_info.update(info)
    print("\n" + json.dumps(info))
    if _enabled(request):
        assert info["ratio"] <= 1.2 and info["ratio_lse"] <= 0.7, info
    benchmark(lambda: (ops.attention_sums(q, k, lay, reductions, lse=lse), torch.cuda.synchronize()))


#: The GPU statistics cases: (layout, heads, head dim); all the statistics, cubes of 4 x 4 x 4
GPU_STATS_CASES = {
    # Wan 2.1 480p self-attention, 32,760 tokens
    "wan-480p-self": (Layout.self_attn(grid=(21, 30, 52)), 12, 128),
    # HunyuanVideo 720p joint attention: 256 text tokens after 33 x 45 x 80 video tokens = 119,056
    "hunyuan-720p-joint": (Layout.joint(text=256, grid=(33, 45, 80), text_first=False), 24, 128),
}
#: Flash-ColSum's published column sums: 18.5 ms at N=16,384, 32 heads, D=128 (RTX PRO 6000),
#: as q k^T FLOPs per second (2 N^2 D per head)
COLSUM_FLOPS = 2 * 16384**2 * 128 * 32 / 18.5e-3


@needs_cuda
@pytest.mark.benchmark(group="attn_reduce-gpu-stats")
@pytest.mark.parametrize("case", list(GPU_STATS_CASES))
def test_gpu_statistics(benchmark: Any, request: pytest.FixtureRequest, case: str) -> None:
    """All the statistics within 1.5x an SDPA forward; ``received`` alone against Flash-ColSum's
    published figure per FLOP."""
    lay, heads, dim = GPU_STATS_CASES[case]
    if not _enabled(request):  # smoke: same layout kind, small grid
        lay = Layout.self_attn(grid=(3, 8, 8)) if lay.kind == "self" else Layout.joint(20, (3, 8, 8), False)
    n = lay.num_queries
    names = ("temporal", "received", "blocks", "distance", "entropy")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = ops.attention_sums(q, k, lay, names, block_size=(4, 4, 4))
    # correctness first: the oracle where it fits, else the sum rules
    if n <= 4096:
        ref = ops.attention_sums(q, k, lay, names, block_size=(4, 4, 4), backend="reference")
        for name in names:
            scale = float(ref[name].abs().max())
            assert float((out[name] - ref[name]).abs().max()) <= 2e-3 * scale, name
    else:
        torch.testing.assert_close(out["received"].sum(-1).cpu(), torch.ones(1), rtol=2e-3, atol=0)
        mass = out["temporal"].sum(-1).mean(-1)
        torch.testing.assert_close(out["distance"].sum((-3, -2, -1)), mass, rtol=2e-3, atol=0)
    t_sdpa = _cuda_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    t_all = _cuda_time(lambda: ops.attention_sums(q, k, lay, names, block_size=(4, 4, 4)))
    t_received = _cuda_time(lambda: ops.attention_sums(q, k, lay, ("received",)))
    flops = 2 * n * n * dim * heads  # one q k^T; the two passes do it twice
    info = {
        "case": case,
        "N": n,
        "sdpa_ms": t_sdpa * 1e3,
        "statistics_ms": t_all * 1e3,
        "ratio": t_all / t_sdpa,
        "received_ms": t_received * 1e3,
        "received_qk_tflops": flops / t_received / 1e12,
        "received_vs_colsum_per_flop": (flops / t_received) / COLSUM_FLOPS,
        "device": torch.cuda.get_device_name(),
    }
    benchmark.extra_info.update(info)
    print("\n" + json.dumps(info))
    if _enabled(request):
        assert info["ratio"] <= 1.5, info
    benchmark(lambda: (ops.attention_sums(q, k, lay, names, block_size=(4, 4, 4)), torch.cuda.synchronize()))
