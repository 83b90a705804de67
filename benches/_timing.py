"""Timing shared by the benchmarks: best-of-n wall and CPU time, ratios taken within one run."""

from __future__ import annotations

import time
from typing import Any, Callable


def best_of(fns: list[Callable[[], Any]], n: int) -> tuple[list[float], list[float]]:
    """The best wall time and the best process CPU time of each function over ``n`` rounds, the
    functions interleaved in each round so that a load spike on a shared machine hits them alike
    (CPU time is what other processes on a busy machine disturb least)."""
    wall = [float("inf")] * len(fns)
    cpu = [float("inf")] * len(fns)
    for _ in range(n):
        for i, fn in enumerate(fns):
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[i] = min(wall[i], time.perf_counter() - t)
            cpu[i] = min(cpu[i], time.process_time() - c)
    return wall, cpu


def best_wall(fn: Callable[[], Any], n: int) -> float:
    """The best wall time of ``fn`` over ``n`` calls."""
    return best_of([fn], n)[0][0]
