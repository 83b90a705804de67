"""The benches' one harness: what a figure needs so that it cannot mislead.

- :func:`timed`: several methods in interleaved rounds (a load spike on a shared machine hits them
  alike), best of n, each with its wall time, the process CPU time of the same round and the cores
  it kept busy (CPU time / wall): a ratio between a method on every core and one on a single core
  shows as such.
- :func:`machine`: the logical CPUs, torch's threads, the attention kernels' pool (torch's OpenMP
  team, or rayon's) and threads, the kernels' build and the load average, taken when a bench starts.
- :func:`record`: one bench's figures with its machine, into pytest-benchmark's ``extra_info`` and
  printed as one JSON line; a run that started with a load average above :data:`LOAD_LIMIT` says
  ``LOADED`` there, and :func:`quiet` tells a bench whether it may assert time targets that depend
  on having every core (those benches record ``targets_asserted``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

#: A run whose 1-minute load average exceeds this at its start is not quiet: other work shared the
#: cores, so its wall times (and ratios between methods that use different numbers of cores) are
#: not the machine's.
LOAD_LIMIT = 1.0


@dataclass(frozen=True)
class Timing:
    """One method's best round: ``wall`` seconds, the process ``cpu`` seconds of that same round, and
    ``cpu_best``, the least CPU time of any round (what other processes disturb least)."""

    wall: float
    cpu: float
    cpu_best: float

    @property
    def cores(self) -> float:
        """The cores the method kept busy in its best round (CPU time / wall)."""
        return self.cpu / self.wall if self.wall > 0 else float("nan")

    def as_dict(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}_s": self.wall,
            f"{prefix}_cpu_s": self.cpu_best,
            f"{prefix}_cores": self.cores,
        }


def timed(fns: Sequence[Callable[[], Any]], n: int, warmup: bool = False) -> list[Timing]:
    """Best of ``n`` rounds of each function, the functions interleaved in every round (after one
    untimed call each with ``warmup``)."""
    if warmup:
        for fn in fns:
            fn()
    best: list[Optional[tuple[float, float]]] = [None] * len(fns)
    cpu_best = [float("inf")] * len(fns)
    for _ in range(n):
        for i, fn in enumerate(fns):
            c, t = time.process_time(), time.perf_counter()
            fn()
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            cpu_best[i] = min(cpu_best[i], cpu)
            got = best[i]
            if got is None or wall < got[0]:
                best[i] = (wall, cpu)
    out = []
    for got, c in zip(best, cpu_best):
        assert got is not None, "timed needs n >= 1"
        out.append(Timing(wall=got[0], cpu=got[1], cpu_best=c))
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine() -> dict[str, Any]:
    """The machine a bench runs on, taken at its start: logical CPUs and the model, torch's threads,
    the attention kernels' pool, threads and build, and the 1-, 5- and 15-minute load averages."""
    from attnmap import _native

    kernel = _native.kernel_info()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "kernel_pool": kernel["pool"],
        "kernel_threads": kernel["threads"],
        "kernel_build": kernel["build"],
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def quiet(start: dict[str, Any]) -> bool:
    """Whether the run started quiet: a 1-minute load average of at most :data:`LOAD_LIMIT`."""
    return bool(start["load_avg_start"][0] <= LOAD_LIMIT)


def record(benchmark: Any, info: dict[str, Any], start: dict[str, Any]) -> dict[str, Any]:
    """``info`` with the machine ``start`` and the load average at the end, into the benchmark's
    ``extra_info`` (when there is a benchmark) and printed as one JSON line, led by ``LOADED`` (and
    the load) where the run did not start quiet."""
    out = {**info, **start, "load_avg_end": [round(x, 2) for x in os.getloadavg()]}
    out["loaded"] = not quiet(start)
    if benchmark is not None:
        benchmark.extra_info.update(out)
    lead = (
        f"LOADED (load average {start['load_avg_start'][0]} > {LOAD_LIMIT} at the start: other work "
        "shared the cores, so wall times and ratios are not the machine's) "
        if out["loaded"]
        else ""
    )
    text = json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()})
    print(f"\n{lead}{text}")
    return out
