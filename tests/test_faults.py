"""Faults and hostile input: nothing saved is lost, nothing hangs, nothing aborts.

- hostile safetensors headers and files that are not regular files in a store: skipped with a warning
  naming them, the rest of the store loads;
- writers killed with SIGKILL at random points: every finished step loads, the next writer takes over;
- two writers of one video id at once: the second is refused (or waits), the first loses nothing;
- a full disk (a small tmpfs, where the tests run as root): writes fail with the disk's error, nothing
  half written is left or renamed into place, the encoder never deadlocks;
- allocation failures in the Rust core (under an address-space limit): AttnmapError, the process lives;
- hostile files of the numpy format (manifests pointing elsewhere, pickles, forged zip sizes): skipped
  with one warning naming them;
- a step whose bytes fail their checksum: every CLI command leaves it out with one warning;
- numbers the API cannot honour (frame rates, sizes, colours, dpi, counts): an AttnmapError naming the
  argument and its range, and one ``Error: --flag: ...`` line from the CLI.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import random
import re
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import safetensors.numpy

from attnmap.analysis.stats import energy_decay
from attnmap.errors import AttnmapError
from attnmap.render import write_video
from attnmap.store import (
    AGGREGATED_FILE,
    LOCK_FILE,
    METADATA_FILE,
    StoreError,
    StoreWriter,
    open_store,
    step_filename,
    video_dirname,
)
from conftest import make_store

PYTHON_DIR = str(Path(__file__).resolve().parents[1] / "python")


def finishes(fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    """``fn()``'s result (or its exception, re-raised) if it returns within ``timeout`` seconds."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{fn} still runs after {timeout} s (a hang)"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def child(code: str, *args: str) -> subprocess.Popen[str]:
    """A Python subprocess running ``code`` with this tree's attnmap first on its path."""
    prelude = f"import sys; sys.path.insert(0, {PYTHON_DIR!r})\n"
    return subprocess.Popen(
        [sys.executable, "-c", prelude + textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def reference_mean(root: Path, video_id: str, name: str, steps: list[int]) -> np.ndarray:
    """The float64 mean of the stored values of ``steps``, read by the safetensors library itself."""
    d = root / video_dirname(video_id)
    stored = [safetensors.numpy.load_file(d / step_filename(s))[name] for s in steps]
    return np.mean([a.astype(np.float64) for a in stored], axis=0).astype(stored[0].dtype).astype(np.float32)


# -- hostile headers ------------------------------------------------------------------------------
def raw_file(header: Any, data: bytes = b"") -> bytes:
    """A file in safetensors' layout from a header (a dict, or JSON text as it is) and data bytes."""
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(text)) + text + data


def hostile(run: str) -> dict[str, bytes]:
    """Step files (for step 1 of run ``run``) that must be refused, each for one reason."""
    meta = {"format": "attnmap", "schema_version": "1", "run_id": run, "step": "1"}

    def one(entry: dict[str, Any], data: bytes, **extra: Any) -> bytes:
        return raw_file({"__metadata__": meta, "token/cat": entry, **extra}, data)

    return {
        # 200 bytes that declare 1.6 billion values behind a zero
        "zero_dim_of_huge_shape": one(
            {"dtype": "F16", "shape": [0, 40000, 40000], "data_offsets": [0, 0]}, b""
        ),
        "overlapping_offsets": one(
            {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            b"\0" * 12,
            temporal={"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        ),
        "gapped_offsets": one(
            {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            b"\0" * 24,
            temporal={"dtype": "F32", "shape": [2], "data_offsets": [16, 24]},
        ),
        "200k_entries": raw_file(
            {
                "__metadata__": meta,
                **{
                    f"token/w{i}": {"dtype": "F16", "shape": [1], "data_offsets": [2 * i, 2 * i + 2]}
                    for i in range(200_000)
                },
            },
            b"\0" * 400_000,
        ),
        "infinity_in_shape": raw_file(
            '{"token/cat": {"dtype": "F16", "shape": [Infinity], "data_offsets": [0, 2]}}', b"\0\0"
        ),
        "100k_nesting_levels": raw_file(
            '{"token/cat": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2], "x": '
            + "[" * 100_000
            + "]" * 100_000
            + "}}",
            b"\0\0",
        ),
        "5000_digit_integer": raw_file(
            '{"token/cat": {"dtype": "F16", "shape": [1' + "0" * 5000 + '], "data_offsets": [0, 2]}}', b"\0\0"
        ),
        "shape_overflowing_its_size": one(
            {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}, b"\0" * 8
        ),
        "int8_dtype": one({"dtype": "I8", "shape": [2], "data_offsets": [0, 2]}, b"\0\0"),
        "header_length_2^40": struct.pack("<Q", 2**40) + b"{}",
        "header_not_utf8": struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc",
        "data_past_the_last_tensor": one({"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}, b"\0" * 6),
        "truncated_data": one({"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}, b"\0" * 4),
        "metadata_value_not_a_string": raw_file(
            '{"__metadata__": {"run_id": 5}, "token/cat": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}}',
            b"\0\0",
        ),
        "not_an_attnmap_file": raw_file(
            {"token/cat": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}}, b"\0\0"
        ),
        "checksums_not_listing_the_maps": one(
            {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]},
            b"\0\0",
            __metadata__={**meta, "crc32": "{}"},
        ),
    }


HOSTILE = sorted(hostile("x"))


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_step_file_is_skipped_and_the_rest_loads(tmp_path: Path, case: str) -> None:
    written = make_store(tmp_path, "vid", steps=3, close=False)
    run = open_store(tmp_path).metadata("vid")["run_id"]
    bad = tmp_path / video_dirname("vid") / step_filename(1)
    bad.write_bytes(hostile(run)[case])
    store = open_store(tmp_path)
    with pytest.warns(UserWarning, match=r"step_000001\.safetensors.*; step 1 is skipped") as caught:
        assert finishes(lambda: store.steps("vid")) == [0, 2]
    assert len(caught) == 1
    with pytest.raises(StoreError, match=r"step_000001\.safetensors"):
        store.load("vid", "token/cat", 1)
    agg = store.aggregated("vid", "cat")  # no aggregated file: the mean of the good steps (named once)
    assert agg.metadata["steps"] == [0, 2]
    with pytest.warns(UserWarning, match=r"step_000001\.safetensors"):
        assert open_store(tmp_path).aggregated("vid", "cat").metadata["steps"] == [0, 2]
    np.testing.assert_array_equal(agg.map, (written[0]["token/cat"] + written[2]["token/cat"]) / 2)


def test_hostile_aggregated_file_falls_back_to_the_steps(tmp_path: Path) -> None:
    make_store(tmp_path, "vid", steps=3, dtype="float16")
    d = tmp_path / video_dirname("vid")
    run = open_store(tmp_path).metadata("vid")["run_id"]
    for case, data in hostile(run).items():
        (d / AGGREGATED_FILE).write_bytes(data)
        store = open_store(tmp_path)
        with pytest.warns(UserWarning, match=r"aggregated\.safetensors.*mean of the good steps"):
            agg = store.aggregated("vid", "dog")
        assert agg.metadata["rebuilt"] is True, case
        np.testing.assert_array_equal(agg.map, reference_mean(tmp_path, "vid", "token/dog", [0, 1, 2]))


# -- not regular files ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_step_file_that_is_no_regular_file_never_hangs(tmp_path: Path, kind: str) -> None:
    make_store(tmp_path, "vid", steps=3)
    make_store(tmp_path, "other", steps=1)
    path = tmp_path / video_dirname("vid") / step_filename(1)
    path.unlink()
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    store = open_store(tmp_path)
    assert finishes(store.videos) == ["other", "vid"]  # listing never opens a step file
    with pytest.warns(
        UserWarning, match=r"step_000001\.safetensors is not a regular file.*step 1 is skipped"
    ):
        assert finishes(lambda: store.steps("vid")) == [0, 2]
    with pytest.raises(StoreError, match=r"step_000001\.safetensors is not a regular file"):
        finishes(lambda: store.load_step("vid", "cat", 1))
    assert store.tokens("vid") == ["cat", "dog"]  # from the aggregated file: no step is opened
    maps = finishes(lambda: store.load_all_steps("vid", "cat"))  # the file was named once
    assert [m.metadata["step"] for m in maps] == [0, 2]
    with pytest.warns(UserWarning, match=r"step_000001\.safetensors"):
        maps = finishes(lambda: open_store(tmp_path).load_all_steps("vid", "cat"))
    assert [m.metadata["step"] for m in maps] == [0, 2]


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_metadata_file_that_is_no_regular_file_skips_its_video(tmp_path: Path, kind: str) -> None:
    make_store(tmp_path, "vid", steps=1)
    make_store(tmp_path, "other", steps=1)
    meta = tmp_path / video_dirname("vid") / METADATA_FILE
    meta.unlink()
    os.mkfifo(meta) if kind == "fifo" else meta.mkdir()
    store = open_store(tmp_path)
    with pytest.warns(UserWarning, match=r"vid/metadata\.json is not a regular file.*the video is skipped"):
        assert finishes(store.videos) == ["other"]
    with pytest.raises(StoreError, match=r"vid/metadata\.json is not a regular file"):
        finishes(lambda: store.steps("vid"))
    assert store.steps("other") == [0]


def test_an_aggregated_fifo_falls_back_to_the_steps(tmp_path: Path) -> None:
    written = make_store(tmp_path, "vid", steps=2)
    agg = tmp_path / video_dirname("vid") / AGGREGATED_FILE
    agg.unlink()
    os.mkfifo(agg)
    store = open_store(tmp_path)
    with pytest.warns(UserWarning, match=r"aggregated\.safetensors is not a regular file"):
        got = finishes(lambda: store.aggregated("vid", "cat"))
    np.testing.assert_allclose(got.map, (written[0]["token/cat"] + written[1]["token/cat"]) / 2, rtol=1e-6)


# -- hostile files of the numpy format -------------------------------------------------------------
def npy_bytes(arr: np.ndarray) -> bytes:
    """One .npy member as numpy writes it."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=True)
    return buf.getvalue()


def forged_bomb(manifest: dict[str, Any]) -> bytes:
    """A compressed member whose npy header and manifest declare 2 GiB of float32 and whose zip entry
    declares it too, over 1 KiB of data."""
    manifest["maps"]["token/cat"]["shape"] = [1 << 29]
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": (1 << 29,)})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("attention_map.npy", head.getvalue() + b"\0" * 1024)
    data = bytearray(buf.getvalue())
    central = data.rindex(b"PK\x01\x02")
    data[central + 24 : central + 28] = struct.pack("<I", 0xFFFFFFF0)  # the uncompressed size it declares
    return bytes(data)


def hostile_numpy(folder: Path) -> dict[str, Callable[[], str]]:
    """Damages of step 1 of a numpy-format video, each for one reason; each returns the file it names."""
    manifest_path = folder / "step_001_metadata.json"
    cat = folder / "cat" / "step_001.npz"

    def edit(change: Callable[[dict[str, Any]], Any]) -> Callable[[], str]:
        def run() -> str:
            manifest = json.loads(manifest_path.read_text())
            change(manifest)
            manifest_path.write_text(json.dumps(manifest))
            return str(manifest_path)

        return run

    def member(data: bytes) -> Callable[[], str]:
        def run() -> str:
            with zipfile.ZipFile(cat, "w") as zf:
                zf.writestr("attention_map.npy", data)
            return str(cat)

        return run

    def bomb() -> str:
        manifest = json.loads(manifest_path.read_text())
        cat.write_bytes(forged_bomb(manifest))
        manifest_path.write_text(json.dumps(manifest))
        return str(cat)

    def replace(path: Path, data: bytes) -> Callable[[], str]:
        return lambda: (path.write_bytes(data), str(path))[1]

    def fifo(path: Path) -> Callable[[], str]:
        return lambda: (path.unlink(), os.mkfifo(path), str(path))[2]

    return {
        "manifest_not_json": replace(manifest_path, b"\xff{not json"),
        "manifest_of_another_step": edit(lambda m: m.update(step="2")),
        "manifest_of_no_run": edit(lambda m: m.pop("run_id")),
        "manifest_200k_maps": edit(lambda m: m.update(maps={f"token/w{i}": {} for i in range(200_000)})),
        "manifest_file_outside_the_video": edit(
            lambda m: m["maps"]["token/cat"].update(file="../../cat.npz")
        ),
        "manifest_file_of_another_map": edit(
            lambda m: m["maps"]["token/cat"].update(file="dog/step_001.npz")
        ),
        "manifest_huge_shape": edit(lambda m: m["maps"]["token/cat"].update(shape=[1 << 40, 1 << 40])),
        "manifest_int8": edit(lambda m: m["maps"]["token/cat"].update(dtype="int8")),
        "manifest_without_checksum": edit(lambda m: m["maps"]["token/cat"].pop("crc32")),
        "manifest_fifo": fifo(manifest_path),
        "npz_not_a_zip": replace(cat, b"PK\x03\x04 truncated"),
        "npz_an_npy_file": replace(cat, npy_bytes(np.zeros((3, 4, 5), np.float32))),
        "npz_a_pickle": replace(cat, b"\x80\x04\x95" + bytes(64)),
        "npz_pickled_object_member": member(
            npy_bytes(np.array([{"x": 1}] * 60, dtype=object).reshape(3, 4, 5))
        ),
        "npz_member_of_another_shape": member(npy_bytes(np.zeros((2, 2), np.float32))),
        "npz_member_truncated": member(npy_bytes(np.zeros((3, 4, 5), np.float32))[:-8]),
        "npz_without_the_member": lambda: (zipfile.ZipFile(cat, "w").close(), str(cat))[1],
        "npz_bytes_fail_checksum": member(npy_bytes(np.full((3, 4, 5), 0.5, np.float32))),
        "npz_forged_zip_bomb": bomb,
        "npz_fifo": fifo(cat),
    }


HOSTILE_NUMPY = sorted(hostile_numpy(Path()))


@pytest.mark.parametrize("case", HOSTILE_NUMPY)
def test_hostile_numpy_files_are_skipped_with_one_warning_and_the_rest_loads(
    tmp_path: Path, case: str
) -> None:
    written = make_store(tmp_path, "vid", steps=3, close=False, storage={"storage_format": "numpy"})
    folder = tmp_path / video_dirname("vid")
    named = hostile_numpy(folder)[case]()
    store = open_store(tmp_path)
    with pytest.warns(UserWarning, match=r"step 1 is skipped") as caught:
        maps = finishes(lambda: store.load_all_steps("vid", "cat"))
        assert finishes(lambda: store.aggregated("vid", "cat")).metadata["steps"] == [0, 2]
    assert [str(w.message) for w in caught if named in str(w.message)] == [str(caught[0].message)]
    assert len(caught) == 1 and [m.metadata["step"] for m in maps] == [0, 2]
    for m, s in zip(maps, (0, 2)):
        np.testing.assert_array_equal(m.map, written[s]["token/cat"])
    np.testing.assert_array_equal(store.load("vid", "token/dog", 2), written[2]["token/dog"])
    with pytest.raises(StoreError, match=re.escape(named)):
        store.load("vid", "token/cat", 1)


# -- SIGKILL at random points ---------------------------------------------------------------------
_KILLED_WRITER = """
    import numpy as np
    from attnmap.store import StoreWriter
    root, run, fmt = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    print("go", flush=True)
    w = StoreWriter(root, "killed", {"prompt": "p"}, dtype="float32", storage_format=fmt)
    for s in range(150):  # about 0.2 s of writing, then the close
        value = float(run * 1000 + s)
        w.write_step(s, {"token/cat": np.full((4, 32, 32), value), "temporal": np.full((4, 4), value)})
        print("step", s, flush=True)
    w.close()
    print("closed", flush=True)
"""


@pytest.mark.parametrize("fmt", ["safetensors", "numpy"])
def test_sigkill_at_random_points_leaves_every_finished_step_loadable(tmp_path: Path, fmt: str) -> None:
    """Writers killed during their set-up, a step, the close or after it; each next writer takes the dead
    one's lock over, and every step a writer reported finished loads with its values (in either format:
    the numpy format's manifest, written last, commits its step)."""
    rng = random.Random(1234)
    kills = 0
    for run in range(10):
        proc = child(_KILLED_WRITER, str(tmp_path), str(run), fmt)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "go"
        # the kill point follows the writer's progress, not the clock, so that a fast or a loaded machine
        # kills the same rounds: after step `after` (-1: during the set-up; 150: never), then a short delay
        after = rng.choice([-1, rng.randrange(0, 150), 149, 150])
        seen: list[str] = []
        while 0 <= after < 150:
            line = proc.stdout.readline()
            seen.append(line)
            if not line or line.startswith(f"step {after}\n"):
                break
        time.sleep(rng.uniform(0.0, 0.02))
        if after < 150 and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        out, err = proc.communicate(timeout=60)
        out = "".join(seen) + out
        assert proc.returncode in (0, -signal.SIGKILL), err
        finished = [int(line.split()[1]) for line in out.splitlines() if line.startswith("step")]
        store = open_store(tmp_path)  # warnings are errors here: nothing on disk may be half a file
        if not store.videos():
            assert not finished  # killed before its metadata was committed
            continue
        steps = store.steps("killed")
        run_of = store.load("killed", "temporal", steps[0])[0, 0] // 1000 if steps else run
        if run_of == run:  # this run committed its metadata: its finished steps are all there
            assert steps[: len(finished)] == finished and len(steps) <= len(finished) + 1
        else:  # killed before it committed: the older run is intact
            assert not finished
        for s in steps:
            np.testing.assert_array_equal(store.load_step("killed", "cat", s).map, run_of * 1000 + s)
        if steps:
            agg = store.aggregated("killed", "cat")
            np.testing.assert_array_equal(agg.map, run_of * 1000 + np.mean(steps))
            assert agg.metadata["rebuilt"] is False or not store.is_complete("killed")
        d = tmp_path / video_dirname("killed")  # no temp file was renamed into a step's name
        named = r"step_\d{6}\.safetensors" if fmt == "safetensors" else r"step_\d{3,}(\.npz|_metadata\.json)"
        assert all(re.fullmatch(named, p.name) for p in d.rglob("step_*")), sorted(d.rglob("step_*"))
    assert (
        kills >= 5
    )  # most rounds were killed mid-way (seeded); each next writer took the dead one's lock over


# -- concurrent writers ---------------------------------------------------------------------------
_SLOW_WRITER = """
    import time
    import numpy as np
    from attnmap.store import StoreWriter
    root, value, wait = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    print("started", flush=True)
    w = StoreWriter(root, "shared", {"prompt": "p"}, dtype="float32", wait=wait)
    print("locked", time.time(), flush=True)
    for s in range(10):
        w.write_step(s, {"token/cat": np.full((1, 4, 4), value + s)})
        time.sleep(0.3)
    w.close()
    print("closed", time.time(), flush=True)
"""


def test_concurrent_writers_of_one_video_never_lose_steps(tmp_path: Path) -> None:
    first = child(_SLOW_WRITER, str(tmp_path), "100", "0")
    assert first.stdout is not None
    assert first.stdout.readline().strip() == "started"
    assert first.stdout.readline().startswith("locked")
    # a second writer in this process is refused with the holder's pid, and deletes nothing
    with pytest.raises(StoreError, match=rf"'shared' is being written by process {first.pid} \(lock file"):
        StoreWriter(tmp_path, "shared", {}, dtype="float32")
    # a third, in its own process, waits for the first to finish, then replaces its run
    third = child(_SLOW_WRITER, str(tmp_path), "200", "60")
    out1, err1 = first.communicate(timeout=120)
    out3, err3 = third.communicate(timeout=120)
    assert first.returncode == 0 and third.returncode == 0, err1 + err3
    closed_first = float(out1.split("closed")[1])
    locked_third = float(out3.split("locked")[1].split()[0])
    assert locked_third >= closed_first  # one writer at a time
    store = open_store(tmp_path)
    meta = store.metadata("shared")
    assert meta["complete"] and meta["steps"] == store.steps("shared") == list(range(10))
    for s in range(10):
        assert store.load_step("shared", "cat", s).map.max() == 200 + s
    np.testing.assert_array_equal(store.aggregated("shared", "cat").map, np.full((1, 4, 4), 204.5))
    assert not (tmp_path / video_dirname("shared") / LOCK_FILE).exists()


# -- a full disk ----------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs mounted for the test (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("the full-disk tests mount a small tmpfs, which needs root, and this run is not root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode:
        pytest.skip(f"mount -t tmpfs failed here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill ``disk`` up to ``leave`` bytes free (0: until the disk says ENOSPC)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


@pytest.mark.parametrize("free", [0, 48 * 1024], ids=["0-bytes-free", "48k-free"])
def test_write_video_on_a_full_disk_raises_and_leaves_nothing(small_disk: Path, free: int) -> None:
    """With 0 bytes free the encoder fails after its end marker was taken (at the flush or the close):
    the old code deadlocked there; with a little room it fails mid-stream or at the close."""
    fill(small_disk, free)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (24, 96, 96, 3), dtype=np.uint8)
    out = small_disk / "out.mp4"
    with pytest.raises(OSError) as info:
        finishes(lambda: write_video(frames, out, fps=8))
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no file, no temp file


def test_store_writes_on_a_full_disk_fail_cleanly(small_disk: Path) -> None:
    root = small_disk / "store"
    rng = np.random.default_rng(0)
    done = []
    with pytest.raises(OSError) as info, StoreWriter(root, "v", {}, dtype="float32") as w:
        for s in range(1000):  # 16 KiB a step: the disk is full after a dozen
            w.write_step(s, {"token/cat": rng.random((1, 64, 64), dtype=np.float32)})
            done.append(s)
    assert info.value.errno == errno.ENOSPC and len(done) >= 3
    store = open_store(root)
    assert store.steps("v") == done and not store.is_complete("v")
    d = root / video_dirname("v")
    assert sorted(p.name for p in d.iterdir()) == sorted([METADATA_FILE] + [step_filename(s) for s in done])
    np.testing.assert_array_equal(store.mean("v", "token/cat"), reference_mean(root, "v", "token/cat", done))
    # the failed writer dropped its lock: a new run (after making room) starts at once; the store's
    # open files hold their space until it closes them
    store.close()
    for s in done[1:]:
        (d / step_filename(s)).unlink()
    with StoreWriter(root, "v", {}, dtype="float32") as w:
        w.write_step(0, {"token/cat": np.ones((1, 64, 64))})
    assert open_store(root).steps("v") == [0]


# -- allocation failures in the Rust core ---------------------------------------------------------
_UNDER_A_MEMORY_LIMIT = """
    import json, resource
    import numpy as np
    from attnmap import _native, render
    maps = np.random.default_rng(0).random((2, 16, 16), dtype=np.float32)
    render.frames(maps, size=(64, 64))  # start the thread pool before the limit
    values = np.zeros((48, 1024, 1024), np.float32)  # 192 MiB; colourised, 144 MiB
    vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (128 << 20), resource.RLIM_INFINITY))
    calls = {
        "resize": lambda: render.resize(maps, (4096, 4096), num_frames=64),
        "frames": lambda: render.frames(maps, size=(4096, 4096), num_frames=64),
        "render_2^24_frames": lambda: _native.render(maps, size=(64, 64), num_frames=2**24),
        "colorize": lambda: render.colorize(values),
        "normalize_percentile": lambda: _native.normalize(values.reshape(48, 1024, 1024), mode="percentile"),
    }
    for name, call in calls.items():
        try:
            call()
            print(json.dumps([name, "ok", ""]), flush=True)
        except Exception as e:
            print(json.dumps([name, type(e).__name__, str(e)]), flush=True)
    print(json.dumps(["alive", "", ""]), flush=True)
"""


def test_allocation_failures_in_rust_are_errors_not_aborts() -> None:
    """Under an address-space limit every render path's allocation fails: each raises AttnmapError
    naming its argument, and the process carries on (the old code died of SIGABRT)."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc/self/status to set the address-space limit above the process's size")
    proc = child(_UNDER_A_MEMORY_LIMIT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {err[-2000:]}"
    got = {name: (kind, message) for name, kind, message in map(json.loads, out.splitlines())}
    assert "alive" in got
    expect = {
        "resize": "size: cannot allocate",
        "frames": "size: cannot allocate",
        "render_2^24_frames": "",
        "colorize": "values: cannot allocate",
        "normalize_percentile": "maps: cannot allocate",
    }
    for name, start in expect.items():
        kind, message = got[name]
        assert kind == "AttnmapError", (name, kind, message)
        assert message.startswith(start) and "cannot allocate" in message, (name, message)


_HUGE_REDUCTIONS = """
    import json
    import numpy as np
    from attnmap import _native
    rng = np.random.default_rng(0)
    q, k = (rng.standard_normal((1, 2, 8, 16), dtype=np.float32) for _ in range(2))
    columns = np.zeros(8, np.int64)
    for n in (2**34, 2**40, 2**62):  # outputs of 512 GiB, 32 TiB and one whose size overflows
        try:
            _native.attention_groups(q, k, columns, num_columns=n, scale=0.25)
            print(json.dumps([n, "ok", ""]), flush=True)
        except Exception as e:
            print(json.dumps([n, type(e).__name__, str(e)]), flush=True)
    print(json.dumps(["alive", "", ""]), flush=True)
"""


def test_reductions_too_large_for_memory_are_errors_not_kills() -> None:
    """A column count whose output the machine cannot hold is refused with an AttnmapError naming
    num_columns, before the allocator grants it under overcommit and filling it kills the process
    (the old code panicked in a worker thread, then was killed for memory)."""
    proc = child(_HUGE_REDUCTIONS)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {err[-2000:]}"
    got = [json.loads(line) for line in out.splitlines()]
    assert got[-1][0] == "alive"
    for n, kind, message in got[:-1]:
        assert kind == "AttnmapError", (n, kind, message)
        assert message.startswith("num_columns: "), (n, message)
        assert "cannot allocate" in message or "too large" in message, (n, message)


# -- encoder faults without a full disk -----------------------------------------------------------
class _FailingContainer:
    """A PyAV output container whose ``close`` (the trailer) or packet-carrying ``mux`` fails as a full
    disk does, after doing the real work."""

    def __init__(self, real: Any, fail_in: str) -> None:
        self.real, self.fail_in = real, fail_in

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def mux(self, packets: Any) -> Any:
        if self.fail_in == "mux" and packets:  # x264 holds a few frames back: their packets come at the flush
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        return self.real.mux(packets)

    def close(self) -> None:
        self.real.close()
        if self.fail_in == "close":
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")


@pytest.mark.parametrize("fail_in", ["close", "mux"])
def test_encoder_errors_are_raised_and_nothing_is_renamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_in: str
) -> None:
    """An error in the container's close was swallowed (a broken file renamed into place); one in the
    flush after the end marker deadlocked the encoder thread. Both raise now, the old file stays."""
    import av

    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: _FailingContainer(real_open(*a, **k), fail_in))
    out = tmp_path / "out.mp4"
    out.write_bytes(b"old")
    frames = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(OSError, match="simulated"):
        finishes(lambda: write_video(frames, out, fps=8))
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]
    assert not [t for t in threading.enumerate() if t.name == "attnmap-encode"]


# -- a step whose bytes fail their checksum, through every command ---------------------------------
def damage_maps(path: Path) -> None:
    """Flip every data byte of a safetensors file (its header stays intact): each map fails its CRC-32."""
    data = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    data[start:] = bytes(b ^ 0x5A for b in data[start:])
    path.write_bytes(bytes(data))


def damage_npz(folder: Path, step: int) -> None:
    """Rewrite every .npz of a numpy-format step with other values (each still a good .npz)."""
    for path in folder.rglob(f"step_{step:03d}.npz"):
        with np.load(path, allow_pickle=False) as data:
            changed = {k: data[k] + 1 for k in data.files}
        with open(path, "wb") as f:
            np.savez(f, **changed)


@pytest.mark.parametrize("fmt", ["safetensors", "numpy"])
def test_every_command_skips_a_step_that_fails_its_checksum_with_one_warning(
    tmp_path: Path, fmt: str
) -> None:
    """A run killed before its aggregate, step 1's bytes damaged: every command that reads maps leaves
    step 1 out and names its file in exactly one warning (it stopped `video` and `report` with
    "Corrupt store file", and `figures` with unequal series), in either format."""
    from typer.testing import CliRunner

    import attnmap.render as render
    from attnmap.cli import app
    from conftest import page_data

    root = tmp_path / "maps"

    def stats(step: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {
            "distance": rng.random((3, 4, 5), dtype=np.float32),
            "received": rng.random(60, dtype=np.float32),
        }

    written = make_store(root, "vid", steps=3, extra=stats, close=False, storage={"storage_format": fmt})
    if fmt == "safetensors":
        bad = str(root / video_dirname("vid") / step_filename(1))
        damage_maps(Path(bad))
    else:
        bad = "step_001.npz"  # the first of its files a command reads
        damage_npz(root / video_dirname("vid"), 1)
    out = tmp_path / "out"
    store = ["--attention-dir", str(root), "--video-id", "vid"]
    commands = {
        "video steps": ["video", *store, "--token", "cat", "--quiet", "--output", str(out / "cat.mp4")],
        "video folder": ["video", *store, "--quiet", "--output", str(out / "steps")],
        "video grid": ["video", *store, "--grid", "--quiet", "--output", str(out / "grid.mp4")],
        "video aggregated": ["video", *store, "--use-aggregated", "--quiet", "--output", str(out / "agg")],
        "still": ["still", *store, "--token", "dog", "--output", str(out / "dog.png")],
        "all": ["all", str(root), "--quiet", "--output", str(out / "all")],
        "report": ["report", str(root), "--output", str(out / "page.html")],
        "figures": ["figures", *store, "--output", str(out / "figures")],
        "stats": ["stats", str(root), "--output", str(out / "stats")],
    }
    for what, args in commands.items():
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (what, result.output)
        warned = [line for line in result.stderr.splitlines() if line.startswith("Warning: ")]
        assert len(warned) == 1, (what, result.stderr)
        assert bad in warned[0] and "do not match their checksum; step 1 is skipped" in warned[0], what
    # what the commands made of the two good steps
    assert render.probe_video(out / "cat.mp4")[0] == 2 + 2  # steps 0 and 2, two blended frames between
    keys = set(page_data(out / "page.html")["videos"][0]["maps"])
    assert {"cat|0|all|mean|cond", "cat|2|all|mean|cond"} <= keys and "cat|1|all|mean|cond" not in keys
    assert (out / "figures" / "vid_tokens.png").is_file() and (out / "dog.png").is_file()
    summary = json.loads((out / "stats" / "vid_stats.json").read_text())
    expect = ((written[0]["distance"].astype(np.float64) + written[2]["distance"]) / 2).astype(np.float32)
    got = summary["distance"]["mean"]["energy_decay"]
    assert got == {a: c.tolist() for a, c in energy_decay(expect[None].astype(np.float64)).items()}
    # listing reads no map: the intact header lists step 1, and loading it by name names the damage
    listed = CliRunner().invoke(app, ["list", str(root)])
    assert listed.exit_code == 0 and "steps 0..2 (3)" in listed.stdout and not listed.stderr
    with pytest.raises(StoreError, match="do not match their checksum"):
        open_store(root).load("vid", "token/cat", 1)


# -- numbers that cannot be honoured --------------------------------------------------------------
def _figure(inches: float = 4) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(inches, inches))


_MAPS = np.random.default_rng(0).random((3, 4, 5), dtype=np.float32)
_FRAMES = np.zeros((2, 8, 8, 3), np.uint8)


def _loose_numbers(tmp: Path) -> dict[str, tuple[Callable[[], Any], str]]:
    """Calls of the public API with a number it cannot honour, and the start of the error each gives."""
    import attnmap.analysis.maps as maps
    import attnmap.analysis.stats as stats
    import attnmap.render as render
    import attnmap.render.figures as figures
    from attnmap.analysis.rollout import rollout
    from attnmap.render.options import RenderOptions

    finite = "expected a finite number"
    return {
        "write_video fps=inf": (
            lambda: write_video(_FRAMES, tmp / "a.mp4", fps=math.inf),
            f"fps: {finite} in [0.001, 1000], got inf",
        ),
        "write_video fps=1e-9": (
            lambda: write_video(_FRAMES, tmp / "a.mp4", fps=1e-9),
            f"fps: {finite} in [0.001, 1000], got 1e-09",
        ),
        "write_video fps=1e300": (
            lambda: write_video(_FRAMES, tmp / "a.mp4", fps=1e300),
            f"fps: {finite} in [0.001, 1000], got 1e+300",
        ),
        "write_video fps=nan": (
            lambda: write_video(_FRAMES, tmp / "a.mp4", fps=math.nan),
            f"fps: {finite} in [0.001, 1000], got nan",
        ),
        "write_video gif fps=1000": (
            lambda: write_video(_FRAMES, tmp / "a.gif", fps=1000),
            f"fps: {finite} in [0.002, 100], got 1000",
        ),
        "write_video crf=1.5": (
            lambda: write_video(_FRAMES, tmp / "a.mp4", crf=1.5),
            "crf: expected an integer in [0, 51], got 1.5",
        ),
        "iter_video chunk=0": (
            lambda: render.iter_video(tmp / "a.mp4", chunk=0),
            "chunk: expected an integer >= 1, got 0",
        ),
        "frames colormap=None": (
            lambda: render.frames(_MAPS, colormap=None),
            "colormap: expected one of hot, jet",
        ),
        "frames outline_color=(300, 0, 0)": (
            lambda: render.frames(_MAPS, outline=0.5, outline_color=(300, 0, 0)),
            "outline_color: expected (R, G, B): 3 integers in [0, 255], got (300, 0, 0)",
        ),
        "frames size=(2.7, 5.2)": (
            lambda: render.frames(_MAPS, size=(2.7, 5.2)),
            "size: expected (H, W): 2 integers >= 1, got (2.7, 5.2)",
        ),
        "frames num_frames=1.5": (
            lambda: render.frames(_MAPS, num_frames=1.5),
            "num_frames: expected an integer >= 1, got 1.5",
        ),
        "frames alpha='x'": (lambda: render.frames(_MAPS, alpha="x"), f"alpha: {finite} in [0, 1], got 'x'"),
        "frames outline='x'": (
            lambda: render.frames(_MAPS, outline="x"),
            f"outline: {finite} in [0, 1], got 'x'",
        ),
        "frames vmin='a'": (lambda: render.frames(_MAPS, vmin="a"), f"vmin: {finite}, got 'a'"),
        "frames gamma=inf": (lambda: render.frames(_MAPS, gamma=math.inf), f"gamma: {finite} > 0, got inf"),
        "colorize colormap=None": (lambda: render.colorize(_MAPS, None), "colormap: expected one of hot"),
        "resize size=(2.5, 4)": (
            lambda: render.resize(_MAPS, (2.5, 4)),
            "size: expected (H, W): 2 integers >= 1",
        ),
        "num_output_frames latent_frames=1.5": (
            lambda: render.num_output_frames(1.5),
            "latent_frames: expected an integer >= 1",
        ),
        "RenderOptions fps=inf": (
            lambda: RenderOptions(fps=math.inf),
            f"fps: {finite} in [0.001, 1000], got inf",
        ),
        "RenderOptions static_duration=inf": (
            lambda: RenderOptions(static_duration=math.inf),
            f"static_duration: {finite} > 0",
        ),
        "RenderOptions figsize=(1e6, 3)": (
            lambda: RenderOptions(figsize=(1e6, 3)),
            f"figsize: {finite} in (0, 100], got 1000000.0",
        ),
        "RenderOptions interpolation_steps=10**12": (
            lambda: RenderOptions(interpolation_steps=10**12),
            "interpolation_steps: expected an integer in [0, 65536], got 1000000000000",
        ),
        "RenderOptions colormap='nope'": (
            lambda: RenderOptions(colormap="nope"),
            "colormap: expected one of hot",
        ),
        "save_figure dpi=100000": (
            lambda: figures.save_figure(_figure(), tmp / "f.png", dpi=100000),
            f"dpi: {finite} in [10, 1200], got 100000",
        ),
        "save_figure dpi=nan": (
            lambda: figures.save_figure(_figure(), tmp / "f.png", dpi=math.nan),
            f"dpi: {finite} in [10, 1200], got nan",
        ),
        "save_figure too many pixels": (
            lambda: figures.save_figure(_figure(100), tmp / "f.png", dpi=1200),
            "dpi: the figure would be 120000 x 120000 pixels at 1200 dpi, more than 16384 a side",
        ),
        "head_locality 40,000 heads": (
            lambda: figures.head_locality(np.random.default_rng(0).random((1, 40_000)), tmp / "h.png"),
            "locality: expected at most 128 blocks (rows) and 128 heads (columns) in one figure, got shape [1, 40000]",
        ),
        "rollout_frames max_frames=1.5": (
            lambda: figures.rollout_frames(_FRAMES, _MAPS[:2], tmp / "r.png", max_frames=1.5),
            "max_frames: expected an integer in [1, 32], got 1.5",
        ),
        "colorbar vmin='a'": (lambda: figures.colorbar(tmp / "c.png", vmin="a"), f"vmin: {finite}, got 'a'"),
        "token_mask threshold=nan": (
            lambda: maps.token_mask(_MAPS, threshold=math.nan),
            f"threshold: {finite}, got nan",
        ),
        "top_frames k=1.5": (lambda: maps.top_frames(_MAPS, k=1.5), "k: expected an integer >= 1, got 1.5"),
        "top_regions mask_top_fraction=2": (
            lambda: maps.top_regions(_MAPS, mask_top_fraction=2),
            f"mask_top_fraction: {finite} in (0, 1], got 2",
        ),
        "classify_heads num_frames=1.5": (
            lambda: maps.classify_heads(_MAPS[0], 1.5),
            "num_frames: expected an integer >= 1",
        ),
        "classify_heads margin=nan": (
            lambda: maps.classify_heads(_MAPS[0], 3, margin=math.nan),
            f"margin: {finite} in [0, 1]",
        ),
        "sink_mass k=1.5": (lambda: stats.sink_mass(_MAPS, k=1.5), "k: expected an integer >= 1, got 1.5"),
        "entropy_summary num_keys=1.5": (
            lambda: stats.entropy_summary(_MAPS, num_keys=1.5),
            "num_keys: expected an integer >= 1",
        ),
        "window_coverage window=(1.5, 3, 3)": (
            lambda: stats.window_coverage(_MAPS[None], (1.5, 3, 3)),
            "window: expected (t, h, w): 3 integers >= 1",
        ),
        "rollout discard_ratio=nan": (
            lambda: rollout([np.full((1, 2, 2), 0.5)], discard_ratio=math.nan),
            f"discard_ratio: {finite} in [0, 1), got nan",
        ),
        "StoreWriter downsample=2.0": (
            lambda: StoreWriter(tmp / "s", "v", {}, downsample=2.0),
            "downsample: expected an integer >= 1, got 2.0",
        ),
        "map_name block=1.5": (
            lambda: open_store(tmp / "store").map_name("vid", "cat", block=1.5),
            "block: expected an integer >= 0, got 1.5",
        ),
    }


@pytest.fixture(scope="module")
def _cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Callable[[], Any], str]]:
    tmp = tmp_path_factory.mktemp("numbers")
    make_store(tmp / "store", "vid", steps=1)
    write_video(_FRAMES, tmp / "a.mp4", fps=8)
    return _loose_numbers(tmp)


@pytest.mark.parametrize("case", sorted(_loose_numbers(Path())))
def test_a_number_that_cannot_be_honoured_is_an_error_naming_the_argument_and_its_range(
    _cases: dict[str, tuple[Callable[[], Any], str]], case: str
) -> None:
    call, message = _cases[case]
    with pytest.raises(AttnmapError) as info:
        finishes(call)
    assert str(info.value).startswith(message), str(info.value)
    assert issubclass(AttnmapError, ValueError)


@pytest.mark.parametrize(
    ("flag", "value"), [("--fps", "1e-9"), ("--fps", "inf"), ("--fps", "1e300"), ("--fps", "nan")]
)
def test_the_cli_refuses_a_frame_rate_it_cannot_write_naming_the_flag(
    tmp_path: Path, flag: str, value: str
) -> None:
    """--fps 1e-9 wrote a 24 fps video (the rate became 0 as a fraction); inf and 1e300 failed with
    messages that did not name --fps. Each is one Error line naming the flag and its range, exit 1,
    no file."""
    from typer.testing import CliRunner

    from attnmap.cli import app

    make_store(tmp_path / "store", "vid", steps=2)
    out = tmp_path / "cat.mp4"
    for command in (
        ["video", "--attention-dir", str(tmp_path / "store"), "--video-id", "vid", "--token", "cat"],
        ["all", str(tmp_path / "store")],
    ):
        result = CliRunner().invoke(app, [*command, flag, value, "--quiet", "--output", str(out)])
        assert result.exit_code == 1, result.output
        shown = value if value != "1e-9" else "1e-09"
        assert result.stderr.strip().splitlines() == [
            f"Error: --fps: expected a finite number in [0.001, 1000], got {float(shown)!r}"
        ], result.stderr
        assert not out.exists() and not (tmp_path / "attention_videos").exists()
