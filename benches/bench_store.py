"""Store loading speed: one token's per-step maps (Wan 480p: 50 steps of (21, 30, 52)) and its
aggregated map, against numpy reading the same bytes (np.fromfile at the known offsets, then
float32). Smoke size in plain pytest; the full size with ``--benchmark-enable``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _timing import best_wall
from attnmap.store import AGGREGATED_FILE, StoreWriter, open_store, step_filename, video_dirname

WORDS = ("kiss", "flowers")


def _offsets(path: Path, name: str) -> tuple[int, int, str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    begin, end = header[name]["data_offsets"]
    return 8 + n + begin, end - begin, header[name]["dtype"]


@pytest.mark.benchmark(group="store-load")
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_load_one_token_all_steps(benchmark: Any, tmp_path: Path, dtype: str) -> None:
    # smoke size in plain pytest, Wan 480p (50 steps of (21, 30, 52)) with --benchmark-enable
    grid, steps = ((3, 4, 5), 4) if benchmark.disabled else ((21, 30, 52), 50)
    rng = np.random.default_rng(0)
    written = []
    with StoreWriter(
        tmp_path, "wan480p", {"targets": {w: [i] for i, w in enumerate(WORDS)}}, dtype=dtype
    ) as w:
        for s in range(steps):
            maps = {f"token/{word}": rng.random(grid, dtype=np.float32) for word in WORDS}
            maps["temporal"] = rng.random((grid[0], grid[0]), dtype=np.float32)
            w.write_step(s, maps)
            written.append(maps["token/kiss"])
    store = open_store(tmp_path)
    d = tmp_path / video_dirname("wan480p")
    files = [d / step_filename(s) for s in range(steps)] + [d / AGGREGATED_FILE]
    where = [_offsets(p, "token/kiss") for p in files]
    np_dtype = {"F16": np.float16, "F32": np.float32}

    def ours() -> tuple[list[Any], Any]:
        return store.load_all_steps("wan480p", "kiss"), store.aggregated("wan480p", "kiss")

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
    t_ours, t_np = best_wall(ours, repeat), best_wall(numpy_read, repeat)
    ratio = t_ours / t_np
    step_bytes = files[0].stat().st_size
    benchmark.extra_info.update(
        ratio_vs_numpy=ratio, numpy_ms=t_np * 1e3, ours_ms=t_ours * 1e3, bytes_per_step=step_bytes
    )
    print(
        f"\n[store {dtype} grid={grid} steps={steps}] ours {t_ours * 1e3:.2f} ms, numpy {t_np * 1e3:.2f} ms, "
        f"ratio {ratio:.2f}x; bytes per step file {step_bytes} ({len(WORDS)} tokens + temporal), "
        f"per token map {int(np.prod(grid)) * np.dtype(dtype).itemsize}"
    )
    if not benchmark.disabled:
        assert ratio < 1.5, f"loading is {ratio:.2f}x numpy reading the same bytes (target 1.5x)"
    benchmark(ours)
