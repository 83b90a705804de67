"""Store speed at Wan 480p (50 steps of (21, 30, 52)).

- load: one token's per-step maps and its aggregated map, against numpy reading the same bytes
  (np.fromfile at the known offsets, then float32); warm (one Store, its files open and checked) and
  cold (a new Store each call: every header parsed by safetensors, every checksum computed);
- write: 50 steps and the close, against safetensors' save_file of the same maps with the same
  atomic rename per step file (temp name, fsync, rename) and no aggregation.

Smoke size in plain pytest; the full size with ``--benchmark-enable``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _timing import machine, record, timed
from attnmap.store import AGGREGATED_FILE, StoreWriter, open_store, step_filename, video_dirname

WORDS = ("kiss", "flowers")


def _offsets(path: Path, name: str) -> tuple[int, int, str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    begin, end = header[name]["data_offsets"]
    return 8 + n + begin, end - begin, header[name]["dtype"]


def _wan_steps(benchmark: Any) -> tuple[tuple[int, int, int], list[dict[str, np.ndarray]]]:
    """The grid and each step's maps (the words' token maps and the temporal map): smoke size in plain
    pytest, Wan 480p (50 steps of (21, 30, 52)) with --benchmark-enable."""
    grid, steps = ((3, 4, 5), 4) if benchmark.disabled else ((21, 30, 52), 50)
    rng = np.random.default_rng(0)
    per_step = []
    for _ in range(steps):
        maps = {f"token/{word}": rng.random(grid, dtype=np.float32) for word in WORDS}
        maps["temporal"] = rng.random((grid[0], grid[0]), dtype=np.float32)
        per_step.append(maps)
    return grid, per_step


@pytest.mark.benchmark(group="store-load")
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_load_one_token_all_steps(benchmark: Any, tmp_path: Path, dtype: str) -> None:
    start = machine()
    grid, per_step = _wan_steps(benchmark)
    steps = len(per_step)
    written = []
    with StoreWriter(
        tmp_path, "wan480p", {"targets": {w: [i] for i, w in enumerate(WORDS)}}, dtype=dtype
    ) as w:
        for s, maps in enumerate(per_step):
            w.write_step(s, maps)
            written.append(maps["token/kiss"])
    store = open_store(tmp_path)
    d = tmp_path / video_dirname("wan480p")
    files = [d / step_filename(s) for s in range(steps)] + [d / AGGREGATED_FILE]
    where = [_offsets(p, "token/kiss") for p in files]
    np_dtype = {"F16": np.float16, "F32": np.float32}

    def ours() -> tuple[list[Any], Any]:
        return store.load_all_steps("wan480p", "kiss"), store.aggregated("wan480p", "kiss")

    def cold() -> tuple[list[Any], Any]:
        fresh = open_store(tmp_path)
        return fresh.load_all_steps("wan480p", "kiss"), fresh.aggregated("wan480p", "kiss")

    def numpy_read() -> list[np.ndarray]:
        out = []
        for p, (off, nbytes, code) in zip(files, where):
            dt = np_dtype[code]
            a = np.fromfile(p, dtype=dt, count=nbytes // np.dtype(dt).itemsize, offset=off)
            out.append(a.reshape(grid).astype(np.float32))
        return out

    # correctness first
    maps, agg = ours()
    base = numpy_read()
    tol = 1e-3 if dtype == "float16" else 0.0
    assert len(maps) == steps
    for m, ref, raw in zip(maps, base, written):
        np.testing.assert_array_equal(m.map, ref)
        np.testing.assert_allclose(m.map, raw, atol=tol)
    np.testing.assert_array_equal(agg.map, base[-1])
    np.testing.assert_allclose(agg.map, np.mean(written, axis=0), atol=2 * tol + 1e-6)

    repeat = 3 if benchmark.disabled else 15
    t_ours, t_np, t_cold = timed([ours, numpy_read, cold], repeat)  # interleaved rounds
    ratio = t_ours.wall / t_np.wall
    step_bytes = files[0].stat().st_size
    info = {
        "dtype": dtype,
        "grid": list(grid),
        "steps": steps,
        **t_ours.as_dict("ours"),
        **t_np.as_dict("numpy"),
        **t_cold.as_dict("cold"),
        "ratio_vs_numpy": ratio,
        "cold_ratio_vs_numpy": t_cold.wall / t_np.wall,
        "bytes_per_step": step_bytes,
        "bytes_per_token_map": int(np.prod(grid)) * np.dtype(dtype).itemsize,
    }
    record(benchmark, info, start)
    if not benchmark.disabled:
        assert ratio < 1.5, f"loading is {ratio:.2f}x numpy reading the same bytes (target 1.5x)"
    benchmark(ours)


@pytest.mark.benchmark(group="store-write")
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_write_steps_and_close(benchmark: Any, tmp_path: Path, dtype: str) -> None:
    from safetensors.numpy import save_file

    start = machine()
    grid, per_step = _wan_steps(benchmark)
    steps = len(per_step)
    meta = {"targets": {w: [i] for i, w in enumerate(WORDS)}}

    def ours() -> None:
        with StoreWriter(tmp_path / "ours", "wan480p", meta, dtype=dtype) as w:
            for s, maps in enumerate(per_step):
                w.write_step(s, maps)

    base_dir = tmp_path / "baseline"
    base_dir.mkdir()

    def baseline() -> None:
        for s, maps in enumerate(per_step):
            out = base_dir / step_filename(s)
            tmp = base_dir / f".{out.name}.tmp"
            save_file({k: v.astype(dtype) for k, v in maps.items()}, tmp)
            fd = os.open(tmp, os.O_RDWR)
            os.fsync(fd)
            os.close(fd)
            os.replace(tmp, out)

    ours()  # correctness first: what was written loads back, and the aggregate is the steps' mean
    store = open_store(tmp_path / "ours")
    tol = 1e-3 if dtype == "float16" else 0.0
    np.testing.assert_allclose(
        store.load("wan480p", "token/kiss", steps - 1), per_step[-1]["token/kiss"], atol=tol
    )
    np.testing.assert_array_equal(
        store.aggregated("wan480p", "kiss").map, store.mean("wan480p", "token/kiss")
    )
    store.close()

    repeat = 2 if benchmark.disabled else 7
    t_ours, t_base = timed([ours, baseline], repeat)
    info = {
        "dtype": dtype,
        "grid": list(grid),
        "steps": steps,
        **t_ours.as_dict("ours"),
        **t_base.as_dict("save_file"),
        "ratio_vs_save_file": t_ours.wall / t_base.wall,
    }
    record(benchmark, info, start)
    benchmark(ours)
