"""Capture under diffusers' context parallelism: two CPU processes (gloo) run a Wan under Ulysses
(2 heads split over 2 ranks) and under ring attention (the keys in 2 shards), each rank on one core;
in each, a few forwards with capture of cross + temporal on every block (the ranks' maps added up when
each step ends) against the same parallel forwards without capture, interleaved, best of n, as a ratio.

Sizes: plain pytest smoke-runs a 2-block toy; ``--benchmark-enable`` runs bench_capture.py's CPU model
(2 blocks of 2 heads of 128, FFN 6x the width, text padded to 512, grid (5, 30, 32) = 4,800 tokens).
The processes are ``benches/_capture_parallel_worker.py``; the ratio and the timings come from rank 0,
and pytest-benchmark times the whole run of both modes.

    pytest benches/bench_capture_parallel.py -s --benchmark-enable
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from _timing import machine, record

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the ranks' launcher and shims
from capture_parallel_worker import run_ranks

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_capture_parallel_worker.py"
#: ring:ulysses of the two modes
MODES = {"ulysses": "1:2", "ring": "2:1"}


def launch(out: Path, size: str, rounds: int, deadline: float) -> dict[str, Any]:
    """Run the two ranks over both modes; rank 0's figures. Every process is killed after ``deadline``."""
    root = HERE.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root / "python"), str(root / "tests"), str(HERE)]),
        "RAYON_NUM_THREADS": "1",  # one core per rank: the kernels' threads too
        "OMP_NUM_THREADS": "1",
    }
    commands = [
        [sys.executable, str(WORKER), str(rank), "2", f"file://{out}/rendezvous", str(out), size, str(rounds),
         *MODES.values()]
        for rank in range(2)
    ]  # fmt: skip
    failed = run_ranks(commands, [out / f"log{rank}.txt" for rank in range(2)], env, deadline)
    if failed:
        pytest.fail(f"the parallel bench failed ({failed})")
    found: dict[str, Any] = json.loads((out / "timings.json").read_text())
    return found


@pytest.mark.benchmark(group="capture-parallel")
def test_capture_parallel_overhead(benchmark: Any, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    opt = request.config.getoption
    smoke = bool(opt("benchmark_disable")) and not opt("benchmark_enable")
    size, rounds, deadline = ("smoke", 1, 240.0) if smoke else ("cpu-scaled", 5, 600.0)
    start = machine()
    found: dict[str, Any] = {}

    def run() -> None:
        found.update(launch(tmp_path, size, rounds, deadline))

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    assert sorted(found["modes"]) == sorted(MODES)
    for mode, figures in found[
        "modes"
    ].items():  # correctness first: the same output, maps that are probabilities
        assert figures["output_unchanged"], f"{mode}: capture changed the model output"
        assert figures["temporal_rows_err"] < 2e-3, mode
    threads = found["rank"]  # each rank's own (the machine's line below is this process's)
    info: dict[str, Any] = {"size": size, "ranks": 2, **{f"rank_{k}": v for k, v in threads.items()}}
    for mode, figures in found["modes"].items():
        info.update({f"{mode}_{k}": v for k, v in figures.items() if not isinstance(v, bool)})
    record(benchmark, info, start)
