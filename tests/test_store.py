"""The attention store: round trips, atomicity, crash safety, run separation, path safety, corruption."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch

from attnmap.store import (
    AGGREGATED_FILE,
    LOCK_FILE,
    METADATA_FILE,
    StoreError,
    StoreWriter,
    downsample_spatial,
    open_store,
    safe_component,
    step_filename,
    video_dirname,
)
from conftest import make_store

META = {
    "model": "tiny",
    "prompt": "a (cat) and a (dog)",
    "targets": {"dog": [5], "cat": [2]},
    "grid": [2, 3, 4],
}


def _maps(rng: np.random.Generator, grid: tuple[int, int, int] = (2, 3, 4)) -> dict[str, np.ndarray]:
    f = grid[0]
    return {
        "token/cat": rng.random(grid).astype(np.float32),
        "token/dog": rng.random(grid).astype(np.float32),
        "token/cat/block1": rng.random(grid).astype(np.float32),
        "temporal": rng.random((f, f)).astype(np.float32),
        "text": rng.random((7, 7)).astype(np.float32),
    }


def _write_run(root: Path, video_id: str, steps: int = 3, **kw: object) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    written = []
    w = StoreWriter(root, video_id, META, **kw)  # type: ignore[arg-type]
    for s in range(steps):
        maps = _maps(rng)
        w.write_step(s, maps)
        written.append(maps)
    w.close()
    return written


# -- round trips --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [("float32", 0.0), ("float16", 1e-3)])
def test_round_trip_steps_and_aggregated(tmp_path: Path, dtype: str, tol: float) -> None:
    written = _write_run(tmp_path, "prompt_001_vid_001", dtype=dtype)
    store = open_store(tmp_path)
    assert store.videos() == ["prompt_001_vid_001"]
    assert store.tokens("prompt_001_vid_001") == ["dog", "cat"]  # the order of the metadata's targets
    assert store.steps("prompt_001_vid_001") == [0, 1, 2]
    m = store.load_step("prompt_001_vid_001", "cat", 1)
    assert m.map.dtype == np.float32 and m.map.shape == (2, 3, 4)
    np.testing.assert_allclose(m.map, written[1]["token/cat"], atol=tol, rtol=0)
    assert m.metadata["step"] == 1 and m.metadata["token"] == "cat"
    assert m.metadata["video"]["prompt"] == META["prompt"] and m.metadata["stored_dtype"] == dtype
    allsteps = store.load_all_steps("prompt_001_vid_001", "dog")
    assert [a.metadata["step"] for a in allsteps] == [0, 1, 2]
    for a, w in zip(allsteps, written):
        np.testing.assert_allclose(a.map, w["token/dog"], atol=tol, rtol=0)
    agg = store.aggregated("prompt_001_vid_001", "cat")
    expect = np.mean([w["token/cat"] for w in written], axis=0)
    np.testing.assert_allclose(agg.map, expect, atol=2 * tol + 1e-7, rtol=0)
    assert agg.metadata["steps"] == [0, 1, 2] and agg.metadata["rebuilt"] is False
    block = store.load_step("prompt_001_vid_001", "cat", 2, block=1)
    np.testing.assert_allclose(block.map, written[2]["token/cat/block1"], atol=tol, rtol=0)
    # generic loader
    np.testing.assert_allclose(
        store.load("prompt_001_vid_001", "temporal", 0), written[0]["temporal"], atol=tol
    )
    np.testing.assert_allclose(
        store.load("prompt_001_vid_001", "text"),
        np.mean([w["text"] for w in written], axis=0),
        atol=2 * tol + 1e-7,
    )
    meta = store.metadata("prompt_001_vid_001")
    assert meta["complete"] is True and meta["steps_written"] == [0, 1, 2]
    assert meta["dtype"] == dtype and meta["schema_version"] == 1 and meta["model"] == "tiny"
    assert len(meta["run_id"]) == 32


def test_files_are_plain_safetensors_and_json(tmp_path: Path) -> None:
    written = _write_run(tmp_path, "v", steps=1)
    d = tmp_path / video_dirname("v")
    assert sorted(p.name for p in d.iterdir()) == sorted([METADATA_FILE, AGGREGATED_FILE, step_filename(0)])
    # read with the safetensors library itself (independent reader)
    loaded = safetensors.numpy.load_file(d / step_filename(0))
    assert loaded["token/cat"].dtype == np.float16
    np.testing.assert_allclose(loaded["token/cat"], written[0]["token/cat"], atol=1e-3)
    json.loads((d / METADATA_FILE).read_text())


def test_torch_tensors_and_per_head_maps(tmp_path: Path) -> None:
    per_head = torch.rand(3, 2, 3, 4)
    with StoreWriter(tmp_path, "v", {}, dtype="float32") as w:
        w.write_step(0, {"token/cat": per_head, "temporal": torch.rand(3, 2, 2)})
    store = open_store(tmp_path)
    np.testing.assert_allclose(store.load_step("v", "cat", 0).map, per_head.mean(0).numpy(), rtol=1e-6)
    assert store.load("v", "token/cat", 0).shape == (3, 2, 3, 4)
    assert store.load("v", "temporal", 0).shape == (3, 2, 2)


def test_downsample_is_block_mean(tmp_path: Path) -> None:
    x = torch.rand(2, 5, 7)
    with StoreWriter(tmp_path, "v", {}, dtype="float32", downsample=2) as w:
        w.write_step(0, {"token/cat": x, "text": torch.rand(5, 5)})
    store = open_store(tmp_path)
    got = store.load_step("v", "cat", 0).map
    # reference: torch avg_pool2d with ceil_mode and no padding counts only the real cells
    ref = torch.nn.functional.avg_pool2d(x[:, None], 2, ceil_mode=True)[:, 0].numpy()
    assert got.shape == (2, 3, 4)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert store.load("v", "text", 0).shape == (5, 5)  # only token maps are downsampled
    assert store.metadata("v")["downsample"] == 2
    np.testing.assert_array_equal(downsample_spatial(x.numpy(), 1), x.numpy())


def test_close_with_given_aggregated(tmp_path: Path) -> None:
    w = StoreWriter(tmp_path, "v", {}, dtype="float32")
    w.write_step(0, {"token/cat": np.zeros((1, 2, 2))})
    w.close(aggregated={"token/cat": np.full((1, 2, 2), 7.0)})
    assert open_store(tmp_path).aggregated("v", "cat").map.max() == 7.0


# -- runs ---------------------------------------------------------------------------------------
def test_second_run_replaces_first_and_never_mixes(tmp_path: Path) -> None:
    _write_run(tmp_path, "v", steps=5)
    w = StoreWriter(tmp_path, "v", META, dtype="float32")
    w.write_step(0, {"token/cat": np.full((2, 3, 4), 9.0)})
    store = open_store(tmp_path)
    assert store.steps("v") == [0]  # steps 1..4 of the old run are gone
    assert store.load_step("v", "cat", 0).map.max() == 9.0
    agg = store.aggregated("v", "cat")  # not closed yet: rebuilt from the new run only
    assert agg.metadata["rebuilt"] is True and agg.map.max() == 9.0
    w.close()


def test_stale_file_of_old_run_is_ignored(tmp_path: Path) -> None:
    """A file of an older run left behind (crash during clean-up) is never read as the current run."""
    _write_run(tmp_path, "v", steps=2)
    d = tmp_path / video_dirname("v")
    stale = (d / step_filename(1)).read_bytes()
    w = StoreWriter(tmp_path, "v", META)
    w.write_step(0, _maps(np.random.default_rng(1)))
    (d / step_filename(1)).write_bytes(stale)  # as if clean-up had not happened
    store = open_store(tmp_path)
    assert store.steps("v") == [0]
    with pytest.raises(StoreError, match=r"step_000001\.safetensors belongs to run"):
        store.load_step("v", "cat", 1)


def test_overwrite_false_raises_and_keeps_old(tmp_path: Path) -> None:
    written = _write_run(tmp_path, "v", steps=2, dtype="float32")
    with pytest.raises(FileExistsError, match="already exists"):
        StoreWriter(tmp_path, "v", META, overwrite=False)
    np.testing.assert_array_equal(open_store(tmp_path).load_step("v", "cat", 1).map, written[1]["token/cat"])


def test_bad_new_run_keeps_old_run(tmp_path: Path) -> None:
    written = _write_run(tmp_path, "v", steps=2, dtype="float32")
    with pytest.raises(ValueError, match="JSON-safe"):
        StoreWriter(tmp_path, "v", {"bad": object()})
    with pytest.raises(ValueError, match="reserved"):
        StoreWriter(tmp_path, "v", {"run_id": "x"})
    store = open_store(tmp_path)
    assert store.steps("v") == [0, 1]
    np.testing.assert_array_equal(store.load_step("v", "cat", 0).map, written[0]["token/cat"])


_CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    sys.path.insert(0, {python!r})
    from attnmap.store import StoreWriter
    w = StoreWriter({root!r}, "killed", {{"prompt": "p"}}, dtype="float32")
    for s in range(1000):
        w.write_step(s, {{"token/cat": np.full((2, 8, 8), float(s)), "temporal": np.full((2, 2), float(s))}})
        print(s, flush=True)
        time.sleep(0.005)
    """
)


def test_sigkill_mid_run_leaves_finished_steps_and_rebuilds_aggregated(tmp_path: Path) -> None:
    python_dir = str(Path(__file__).resolve().parents[1] / "python")
    code = _CHILD.format(python=python_dir, root=str(tmp_path))
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if int(line) >= 12:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    store = open_store(tmp_path)
    steps = store.steps("killed")
    assert steps == list(range(len(steps))) and len(steps) >= 13
    assert not store.is_complete("killed")
    for s in steps:  # every finished step loads intact
        assert np.all(store.load_step("killed", "cat", s).map == s)
    agg = store.aggregated("killed", "cat")
    assert agg.metadata["rebuilt"] is True
    np.testing.assert_allclose(agg.map, np.mean(steps))
    path = store.rebuild_aggregated("killed")
    assert path.name == AGGREGATED_FILE
    np.testing.assert_allclose(store.aggregated("killed", "cat").map, np.mean(steps))
    np.testing.assert_allclose(store.load("killed", "temporal"), np.mean(steps))
    # no temp files are mistaken for steps
    assert all(not p.name.startswith("step_") or p.suffix == ".safetensors" for p in (path.parent).iterdir())


# -- names and paths ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "video_id", ["../x", "/", "..", ".", "a/../../b", "x" * 5000, "é vidéo 1", "C:\\evil", "-"]
)
def test_video_id_never_escapes_root(tmp_path: Path, video_id: str) -> None:
    root = tmp_path / "root"
    name = video_dirname(video_id)
    assert name and "/" not in name and "\\" not in name and name not in (".", "..") and len(name) <= 120
    with StoreWriter(root, video_id, {}) as w:
        w.write_step(0, {"token/../../etc": np.ones((1, 2, 2)), "token/a/b": np.ones((1, 2, 2))})
    assert [p.name for p in root.iterdir()] == [name]
    assert [p.name for p in tmp_path.iterdir()] == ["root"]
    store = open_store(root)
    assert store.videos() == [video_id]
    assert store.tokens(video_id) == ["../../etc", "a/b"]
    assert store.load_step(video_id, "../../etc", 0).map.shape == (1, 2, 2)


def test_dirnames_unique_and_recognisable() -> None:
    ids = ["a/b", "a_b", "a\\b", "a b", "x" * 200, "x" * 201, "a_b-0123456789abcdef"]
    names = [video_dirname(v) for v in ids]
    assert len(set(names)) == len(names)
    assert names[1] == "a_b" and names[0].startswith("a_b-")


def test_nul_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="NUL"):
        StoreWriter(tmp_path, "a\x00b", {})
    with pytest.raises(ValueError, match="video_id must be a non-empty str"):
        StoreWriter(tmp_path, "", {})
    with pytest.raises(ValueError, match="dtype must be"):
        StoreWriter(tmp_path, "v", {}, dtype="int8")
    with pytest.raises(ValueError, match=r"^downsample: expected an integer >= 1, got 0$"):
        StoreWriter(tmp_path, "v", {}, downsample=0)
    w = StoreWriter(tmp_path, "v", {})
    with pytest.raises(ValueError, match="NUL"):
        w.write_step(0, {"token/a\x00": np.ones((1, 1, 1))})
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        w.write_step(-1, {"token/a": np.ones((1, 1, 1))})
    with pytest.raises(ValueError, match="float16's range"):
        w.write_step(0, {"token/a": np.full((1, 1, 1), 1e6)})
    w.write_step(0, {"token/a": np.ones((1, 1, 1))})
    with pytest.raises(ValueError, match="already written"):
        w.write_step(0, {"token/a": np.ones((1, 1, 1))})
    with pytest.raises(ValueError, match="has shape"):
        w.write_step(1, {"token/a": np.ones((1, 2, 1))})
    store = open_store(tmp_path)
    with pytest.raises(KeyError, match="not in the store"):
        store.metadata("nope")
    with pytest.raises(KeyError, match="'token/zzz' is not in"):
        store.load_step("v", "zzz", 0)
    with pytest.raises(FileNotFoundError):
        open_store(tmp_path / "missing")


# -- corruption ---------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "huge_header"])
def test_corrupt_step_names_file_and_rest_loads(tmp_path: Path, damage: str) -> None:
    written = _write_run(tmp_path, "v", steps=3, dtype="float32")
    _write_run(tmp_path, "other", steps=1)
    path = tmp_path / video_dirname("v") / step_filename(1)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 10])
    elif damage == "garbage":
        path.write_bytes(data[:8] + b"\xff" * (len(data) - 8))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes((2**40).to_bytes(8, "little") + data[8:])
    store = open_store(tmp_path)
    with pytest.raises(StoreError, match=r"step_000001\.safetensors"):
        store.load_step("v", "cat", 1)
    assert isinstance(StoreError("x"), OSError)
    np.testing.assert_array_equal(store.load_step("v", "cat", 2).map, written[2]["token/cat"])
    assert store.aggregated("v", "cat").map.shape == (2, 3, 4)
    assert store.videos() == ["other", "v"]
    assert store.load_step("other", "dog", 0).map.shape == (2, 3, 4)


def test_corrupt_metadata_warns_and_others_load(tmp_path: Path) -> None:
    _write_run(tmp_path, "good", steps=1)
    _write_run(tmp_path, "bad", steps=1)
    meta = tmp_path / video_dirname("bad") / METADATA_FILE
    meta.write_text("{not json")
    store = open_store(tmp_path)
    with pytest.warns(UserWarning, match=r"bad/metadata\.json"):
        assert store.videos() == ["good"]
    with pytest.raises(StoreError, match=r"metadata\.json"):
        store.metadata("bad")


def test_write_is_atomic_when_encoding_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while writing a step leaves the previous steps intact and no temp file behind."""
    _write_run(tmp_path, "v", steps=0)
    w = StoreWriter(tmp_path, "v", {}, dtype="float32")
    w.write_step(0, {"token/cat": np.ones((1, 2, 2))})

    def boom(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        w.write_step(1, {"token/cat": np.ones((1, 2, 2))})
    monkeypatch.undo()
    d = tmp_path / video_dirname("v")
    assert sorted(p.name for p in d.iterdir()) == [LOCK_FILE, METADATA_FILE, step_filename(0)]
    assert open_store(tmp_path).steps("v") == [0]
    w.close()
    assert sorted(p.name for p in d.iterdir()) == [AGGREGATED_FILE, METADATA_FILE, step_filename(0)]


def test_header_cache_sees_rewrites(tmp_path: Path) -> None:
    store_root = tmp_path
    _write_run(store_root, "v", steps=1, dtype="float32")
    store = open_store(store_root)
    first = store.load_step("v", "cat", 0).map.copy()
    time.sleep(0.01)
    w = StoreWriter(store_root, "v", META, dtype="float32")
    w.write_step(0, {"token/cat": np.full((2, 3, 4), 3.0)})
    assert not np.array_equal(first, store.load_step("v", "cat", 0).map)
    assert store.load_step("v", "cat", 0).map.max() == 3.0


# -- what capture writes ------------------------------------------------------------------------
def test_capture_metadata_has_every_key_and_the_final_steps(tmp_path: Path) -> None:
    """metadata.json of a real capture: the issue's keys, and ``steps`` = every written step (the
    writer opens at the end of step 0, when capture's own list says [0])."""
    import attnmap
    from tiny_models import wan

    model, kwargs = wan()
    with attnmap.capture(
        model, prompt="a red ball", targets={"red": [1]}, store=tmp_path, video_id="v", per_block=True
    ) as rec:
        for s in range(3):
            if s:
                rec.step()  # step s - 1 is complete: its file is on disk, loadable, before the run ends
                assert open_store(tmp_path).steps("v") == list(range(s))
                assert open_store(tmp_path).load_step("v", "red", s - 1).map.shape == (3, 4, 4)
            with torch.no_grad():
                model(**kwargs)
    store = open_store(tmp_path)
    meta = store.metadata("v")
    for key in ("schema_version", "attnmap_version", "model", "prompt", "targets", "layout", "grid"):
        assert meta[key] is not None, key
    for key in ("patch_size", "vae_stride", "video", "blocks", "dtype", "aggregation", "created", "finished"):
        assert key in meta, key
    assert meta["schema_version"] == 1 and meta["attnmap_version"] == attnmap.__version__
    assert meta["targets"] == {"red": [1]} and meta["grid"] == [3, 4, 4] and meta["blocks"] == [0, 1]
    assert meta["steps"] == meta["steps_written"] == [0, 1, 2] == store.steps("v")
    assert meta["dtype"] == "float16" and meta["aggregation"]["steps"] == "mean over the written steps"
    assert meta["patch_size"] == [1, 2, 2] and set(meta["video"]) >= {"fps"}
    assert store.tokens("v") == ["red"]
    maps = store.load_all_steps("v", "red")
    assert [m.metadata["step"] for m in maps] == [0, 1, 2] and maps[0].map.shape == (3, 4, 4)
    assert maps[0].map.dtype == np.float32
    mean = np.mean([m.map for m in maps], axis=0)
    np.testing.assert_allclose(store.aggregated("v", "red").map, mean, atol=1e-3)
    per_block = [store.load_step("v", "red", 2, block=b).map for b in (0, 1)]
    np.testing.assert_allclose(np.mean(per_block, axis=0), maps[2].map, atol=2e-3)


def test_empty_aggregated_lists_tokens_and_says_why(tmp_path: Path) -> None:
    """``close({})`` (store_aggregated_attention: false): the tokens of the steps are listed, the
    aggregated map is refused with the reason, and rebuild_aggregated writes it."""
    w = StoreWriter(tmp_path, "v", META, dtype="float32")
    w.write_step(0, {"token/cat": np.full((1, 2, 2), 1.0)})
    w.write_step(1, {"token/cat": np.full((1, 2, 2), 3.0)})
    w.close({})
    store = open_store(tmp_path)
    assert store.tokens("v") == ["cat"] and store.names("v") == ["token/cat"]
    assert store.metadata("v")["aggregation"]["steps"] == "not stored (mean over the steps on load)"
    with pytest.raises(KeyError, match="stored no aggregated maps"):
        store.aggregated("v", "cat")
    store.rebuild_aggregated("v")
    np.testing.assert_array_equal(store.aggregated("v", "cat").map, np.full((1, 2, 2), 2.0))


def test_aggregated_of_an_older_run_is_never_used(tmp_path: Path) -> None:
    """A run killed before ``close`` over an older complete run: the old aggregated file (had it
    survived) is ignored and the aggregate comes from the new run's steps only."""
    _write_run(tmp_path, "v", steps=2, dtype="float32")
    d = tmp_path / video_dirname("v")
    old_agg = (d / AGGREGATED_FILE).read_bytes()
    w = StoreWriter(tmp_path, "v", META, dtype="float32")
    w.write_step(0, {"token/cat": np.full((2, 3, 4), 5.0)})
    (d / AGGREGATED_FILE).write_bytes(old_agg)  # as if the unlink of the old file never happened
    store = open_store(tmp_path)
    agg = store.aggregated("v", "cat")
    assert agg.metadata["rebuilt"] is True and agg.metadata["steps"] == [0]
    np.testing.assert_array_equal(agg.map, np.full((2, 3, 4), 5.0))
    assert store.tokens("v") == ["cat"]


def test_guidance_branches(tmp_path: Path) -> None:
    """``uncond/token/<word>`` maps (capture's branch="both" or "uncond") are the same words."""
    cond, uncond = np.full((1, 2, 2), 1.0), np.full((1, 2, 2), 2.0)
    with StoreWriter(tmp_path, "both", {"branch": "both"}, dtype="float32") as w:
        w.write_step(
            0, {"token/red": cond, "uncond/token/red": uncond, "uncond/token/red/block1": 3 * uncond}
        )
    with StoreWriter(tmp_path, "un", {"branch": "uncond"}, dtype="float32") as w:
        w.write_step(0, {"uncond/token/red": uncond})
    store = open_store(tmp_path)
    assert store.tokens("both") == ["red"] and store.tokens("un") == ["red"]
    np.testing.assert_array_equal(store.load_step("both", "red", 0).map, cond)
    np.testing.assert_array_equal(store.load_step("both", "red", 0, branch="uncond").map, uncond)
    np.testing.assert_array_equal(store.aggregated("both", "red", block=1, branch="uncond").map, 3 * uncond)
    np.testing.assert_array_equal(store.load_step("un", "red", 0).map, uncond)  # the recorded branch
    np.testing.assert_array_equal(store.load_all_steps("un", "red")[0].map, uncond)
    assert store.map_name("both", "red", block=1, branch="uncond") == "uncond/token/red/block1"
    with pytest.raises(ValueError, match="branch must be 'cond', 'uncond' or None"):
        store.load_step("both", "red", 0, branch="neg")


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every read path with pickle (and torch.load, numpy's allow_pickle) made to fail."""
    import pickle

    _write_run(tmp_path, "v", steps=2)
    w = StoreWriter(tmp_path, "crashed", META)
    w.write_step(0, _maps(np.random.default_rng(1)))
    w.abort()  # as if the process had died: no close, the aggregated maps are rebuilt on load

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the store unpickled")

    for obj, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(obj, name, refuse)
    monkeypatch.setattr(np, "load", refuse)
    store = open_store(tmp_path)
    for vid in store.videos():
        store.metadata(vid)
        for word in store.tokens(vid):
            store.load_all_steps(vid, word)
            store.load_step(vid, word, 0)
            store.aggregated(vid, word)
        store.load(vid, "temporal")
    store.rebuild_aggregated("crashed")
    assert store.aggregated("crashed", "cat").metadata["rebuilt"] is False


def test_corrupt_step_of_a_crashed_run_is_skipped_with_a_warning(tmp_path: Path) -> None:
    """No aggregated file (the run was killed) and one step corrupt: the steps, tokens and the
    rebuilt aggregate come from the intact steps, with a warning naming the file."""
    w = StoreWriter(tmp_path, "v", META, dtype="float32")
    for s in range(3):
        w.write_step(s, {"token/cat": np.full((1, 2, 2), float(s))})
    bad = tmp_path / video_dirname("v") / step_filename(1)
    bad.write_bytes(bad.read_bytes()[:20])
    store = open_store(tmp_path)
    with pytest.warns(UserWarning, match=r"step_000001\.safetensors.*step 1 is skipped") as caught:
        assert store.steps("v") == [0, 2]
    assert len(caught) == 1
    # the same Store named the file once: every later read skips it silently (warnings are errors here)
    assert store.tokens("v") == ["cat"]
    agg = store.aggregated("v", "cat")
    assert agg.metadata["steps"] == [0, 2]
    np.testing.assert_array_equal(agg.map, np.full((1, 2, 2), 1.0))
    assert [m.metadata["step"] for m in store.load_all_steps("v", "cat")] == [0, 2]
    with pytest.warns(UserWarning, match=r"step_000001\.safetensors.*step 1 is skipped"):  # a new Store
        assert [m.metadata["step"] for m in open_store(tmp_path).load_all_steps("v", "cat")] == [0, 2]
    with pytest.raises(StoreError, match=r"step_000001\.safetensors"):
        store.load_step("v", "cat", 1)
    np.testing.assert_array_equal(store.load_step("v", "cat", 2).map, np.full((1, 2, 2), 2.0))


# -- the one aggregation over steps ---------------------------------------------------------------
def _stored(root: Path, video_id: str, step: int) -> dict[str, np.ndarray]:
    """A step file's maps as the safetensors library itself reads them."""
    return safetensors.numpy.load_file(root / video_dirname(video_id) / step_filename(step))


def test_mean_is_the_float64_mean_of_the_stored_values_in_the_stored_dtype(tmp_path: Path) -> None:
    make_store(tmp_path, "v", steps=5, dtype="float16")
    store = open_store(tmp_path)
    for steps in (None, [1, 3], range(2, 10**8)):
        chosen = [0, 1, 2, 3, 4] if steps is None else [s for s in range(5) if s in steps]
        stored = [_stored(tmp_path, "v", s)["token/cat"] for s in chosen]
        expect = (np.sum([a.astype(np.float64) for a in stored], axis=0) / len(stored)).astype(np.float16)
        got = store.mean("v", "token/cat", steps)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expect.astype(np.float32))
    # the aggregated file that close wrote is that mean, and so is a rebuilt one
    np.testing.assert_array_equal(store.aggregated("v", "cat").map, store.mean("v", "token/cat"))
    (tmp_path / video_dirname("v") / AGGREGATED_FILE).unlink()
    rebuilt = open_store(tmp_path).aggregated("v", "dog")
    assert rebuilt.metadata["rebuilt"] is True
    np.testing.assert_array_equal(rebuilt.map, store.mean("v", "token/dog"))
    store.rebuild_aggregated("v")
    np.testing.assert_array_equal(open_store(tmp_path).load("v", "temporal"), store.mean("v", "temporal"))


def test_mean_of_steps_not_in_the_store(tmp_path: Path) -> None:
    make_store(tmp_path, "v", steps=3)
    store = open_store(tmp_path)
    with pytest.warns(UserWarning, match=r"video 'v': steps 7, 9 are not in the store; they are left out"):
        np.testing.assert_array_equal(
            store.mean("v", "token/cat", [1, 7, 9]), store.load("v", "token/cat", 1)
        )
    with pytest.raises(KeyError, match="'token/cat' of video 'v' is in no good step among the chosen steps"):
        store.mean("v", "token/cat", range(50, 60))
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        store.mean("v", "token/cat", [-1])
    with pytest.raises(ValueError, match="steps must be an iterable of step numbers or None"):
        store.mean("v", "token/cat", 3)  # type: ignore[arg-type]


def test_steps_left_out_are_never_opened(tmp_path: Path) -> None:
    """One corrupt step: a selection without it reads cleanly (warnings are errors here)."""
    from attnmap.analysis import load_token_map

    make_store(tmp_path, "v", steps=4, dtype="float32")
    bad = tmp_path / video_dirname("v") / step_filename(1)
    bad.write_bytes(bad.read_bytes()[:-7])
    store = open_store(tmp_path)
    expect = (_stored(tmp_path, "v", 0)["token/cat"] + _stored(tmp_path, "v", 3)["token/cat"]) / 2
    np.testing.assert_allclose(store.mean("v", "token/cat", [0, 3]), expect, rtol=1e-6)
    np.testing.assert_allclose(load_token_map(store, "v", "cat", steps=[0, 3]), expect, rtol=1e-6)
    with pytest.warns(UserWarning, match=r"step_000001\.safetensors.*step 1 is skipped"):
        np.testing.assert_allclose(store.mean("v", "token/cat", [0, 1, 3]), expect, rtol=1e-6)


# -- what a step file says about itself -----------------------------------------------------------
def test_corrupt_bytes_are_named_by_their_checksum(tmp_path: Path) -> None:
    """0xff bytes inside a map (float16 NaN) pass every header check; the CRC-32 names them."""
    written = make_store(tmp_path, "v", steps=3, dtype="float16", close=False)
    path = tmp_path / video_dirname("v") / step_filename(1)
    data = bytearray(path.read_bytes())
    data[-40:-30] = b"\xff" * 10  # inside the last map of the file
    path.write_bytes(bytes(data))
    assert np.isnan(safetensors.numpy.load_file(path)["token/dog"]).any()  # the library reads NaN
    store = open_store(tmp_path)
    assert store.steps("v") == [0, 1, 2]  # the header is intact: listing does not read the maps
    with pytest.raises(StoreError, match=r"step_000001\.safetensors: the bytes of 'token/dog' do not match"):
        store.load_step("v", "dog", 1)
    np.testing.assert_allclose(store.load_step("v", "cat", 1).map, written[1]["token/cat"], atol=1e-3)
    with pytest.warns(UserWarning, match=r"'token/dog' do not match their checksum; step 1 is skipped"):
        maps = store.load_all_steps("v", "dog")
    assert [m.metadata["step"] for m in maps] == [0, 2]
    agg = store.aggregated("v", "dog")  # the same defect is named once per Store
    assert agg.metadata["steps"] == [0, 2] and not np.isnan(agg.map).any()
    with pytest.warns(UserWarning, match=r"step 1 is skipped"):
        assert open_store(tmp_path).aggregated("v", "dog").metadata["steps"] == [0, 2]


def test_a_step_file_copied_under_another_step_number_is_not_that_step(tmp_path: Path) -> None:
    make_store(tmp_path, "v", steps=2, close=False)
    d = tmp_path / video_dirname("v")
    (d / step_filename(99)).write_bytes((d / step_filename(1)).read_bytes())
    (d / "step_0000001.safetensors").write_bytes((d / step_filename(1)).read_bytes())  # not a name we write
    store = open_store(tmp_path)
    with pytest.warns(
        UserWarning, match=r"step_000099\.safetensors holds step '1', not step 99.*step 99 is skipped"
    ):
        assert store.steps("v") == [0, 1]
    with pytest.raises(StoreError, match="holds step '1', not step 99 as its name says"):
        store.load("v", "token/cat", 99)


def test_the_aggregated_file_truncated_falls_back_to_the_good_steps(tmp_path: Path) -> None:
    make_store(tmp_path, "v", steps=3)
    agg = tmp_path / video_dirname("v") / AGGREGATED_FILE
    agg.write_bytes(agg.read_bytes()[:100])
    store = open_store(tmp_path)
    with pytest.warns(UserWarning, match=r"aggregated\.safetensors.*mean of the good steps instead"):
        got = store.aggregated("v", "cat")
    assert got.metadata["rebuilt"] is True and got.metadata["steps"] == [0, 1, 2]
    np.testing.assert_array_equal(got.map, store.mean("v", "token/cat"))
    assert store.tokens("v") == ["cat", "dog"] and store.videos() == ["v"]  # named once per Store
    with pytest.warns(UserWarning, match=r"aggregated\.safetensors"):
        assert open_store(tmp_path).tokens("v") == ["cat", "dog"]


def test_empty_maps_are_refused_on_write(tmp_path: Path) -> None:
    with (
        StoreWriter(tmp_path, "v", {}) as w,
        pytest.raises(ValueError, match=r"none of them 0, got shape \(0, 4, 4\)"),
    ):
        w.write_step(0, {"token/cat": np.zeros((0, 4, 4))})


# -- metadata.json against the schema -------------------------------------------------------------
@pytest.mark.parametrize(
    "damage,message",
    [
        ("[" * 100_000 + "]" * 100_000, "its JSON is not valid JSON"),
        ("json_bomb_file", r"bytes, more than 16777216 for metadata"),
        ("digits", "an integer of 5000 digits"),
        ("targets", r"key 'targets' must be \{word: \[token index, \.\.\.\]\}, got 5"),
        ("dtype", r"key 'dtype' must be 'float16' or 'float32', got 'int8'"),
        ("frames", r"key 'video' must be \{height, width"),
        ("no_run", "key 'run_id' is missing"),
        ("nan", "NaN is not a JSON number"),
        ("list", "expected a JSON object, got list"),
        (b"\xff\xfe{}", "not UTF-8"),
    ],
)
def test_bad_metadata_skips_its_video_with_a_warning_naming_the_file(
    tmp_path: Path, damage: object, message: str
) -> None:
    make_store(tmp_path, "good", steps=1)
    make_store(tmp_path, "bad", steps=1)
    path = tmp_path / video_dirname("bad") / METADATA_FILE
    meta = json.loads(path.read_text())
    if damage == "json_bomb_file":
        path.write_text('{"video_id": "bad", "x": [' + "0," * (9 << 20) + "0]}")
    elif damage == "digits":
        path.write_text(json.dumps(meta)[:-1] + ', "n": 1' + "0" * 4999 + "}")
    elif damage in ("targets", "dtype", "frames", "no_run", "nan", "list"):
        if damage == "targets":
            meta["targets"] = 5
        elif damage == "dtype":
            meta["dtype"] = "int8"
        elif damage == "frames":
            meta["video"] = {"frames": 10**7}
        elif damage == "no_run":
            del meta["run_id"]
        elif damage == "nan":
            meta["x"] = float("nan")
        path.write_text(json.dumps([meta] if damage == "list" else meta))
    else:
        path.write_bytes(damage if isinstance(damage, bytes) else str(damage).encode())
    store = open_store(tmp_path)
    with pytest.warns(UserWarning, match=rf"bad/metadata\.json: .*{message}.*the video is skipped"):
        assert store.videos() == ["good"]
    with pytest.raises(StoreError, match=rf"Corrupt store file .*bad/metadata\.json: .*{message}"):
        store.steps("bad")
    assert store.tokens("good") == ["cat", "dog"]


def test_the_writer_refuses_metadata_a_reader_would_refuse(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"metadata: key 'targets' must be \{word: \[token index, \.\.\.\]\}, got 5"
    ):
        StoreWriter(tmp_path, "v", {"targets": 5})
    with pytest.raises(ValueError, match=r"metadata: key 'grid' must be null or \[F, H, W\]"):
        StoreWriter(tmp_path, "v", {"grid": [2, 3]})
    assert list(tmp_path.iterdir()) == []  # nothing was created


def test_a_metadata_file_in_another_videos_folder_is_skipped(tmp_path: Path) -> None:
    make_store(tmp_path, "a", steps=1)
    make_store(tmp_path, "b", steps=1)
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / METADATA_FILE).write_bytes((tmp_path / "a" / METADATA_FILE).read_bytes())
    with pytest.warns(UserWarning, match=r"copy/metadata\.json is for video 'a', whose folder is another"):
        assert open_store(tmp_path).videos() == ["a", "b"]


# -- names that become file names -----------------------------------------------------------------
def test_safe_component_never_maps_two_names_to_one() -> None:
    names = ["a/b", "a b", "a:b", "a_b", "a\\b", "cat s", "cat_s", "x" * 200, "x" * 201, "..", ".", "-"]
    names += ["a_b-0123456789abcdef", "é", "e"]
    parts = [safe_component(n) for n in names]
    assert len(set(parts)) == len(parts)
    for part in parts:
        assert part and set(part) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
        assert not part.startswith(".") and len(part) <= 96 + 17
    assert safe_component("cat_s") == "cat_s" and safe_component("a_b") == "a_b"  # plain names stay
    digest = hashlib.sha256(b"x" * 30).hexdigest()[:16]
    assert safe_component("x" * 30, max_length=8) == f"xxxxxxxx-{digest}"
    assert all(video_dirname(n) == safe_component(n) for n in names)
    with pytest.raises(ValueError, match="name: expected a non-empty str without NUL"):
        safe_component("")


# -- one writer per video id ----------------------------------------------------------------------
def test_a_second_writer_of_a_video_is_refused_and_deletes_nothing(tmp_path: Path) -> None:
    first = StoreWriter(tmp_path, "v", META, dtype="float32")
    for s in range(3):
        first.write_step(s, {"token/cat": np.full((2, 3, 4), float(s))})
    lock = tmp_path / video_dirname("v") / LOCK_FILE
    claim = json.loads(lock.read_text())  # the claim names its writer
    assert claim["pid"] == os.getpid() and claim["run_id"] == first.run_id and claim["host"]
    with pytest.raises(
        StoreError, match=rf"video 'v' is being written by process {os.getpid()} \(this process"
    ):
        StoreWriter(tmp_path, "v", META)
    with pytest.raises(StoreError, match="is being written by process"):
        open_store(tmp_path).rebuild_aggregated("v")
    assert open_store(tmp_path).steps("v") == [0, 1, 2]
    first.close()
    assert not lock.exists()
    assert open_store(tmp_path).metadata("v")["steps"] == [0, 1, 2]
    StoreWriter(tmp_path, "v", META).abort()  # the lock is free again


def test_a_writer_waits_for_the_other_when_asked(tmp_path: Path) -> None:
    first = StoreWriter(tmp_path, "v", META, dtype="float32")
    first.write_step(0, {"token/cat": np.ones((2, 3, 4))})
    threading.Timer(0.3, first.close).start()
    start = time.monotonic()
    with pytest.raises(StoreError, match="pass wait=<seconds> to wait for it"):
        StoreWriter(tmp_path, "v", META, wait=0.05)
    second = StoreWriter(tmp_path, "v", META, dtype="float32", wait=30)
    assert time.monotonic() - start >= 0.25
    assert open_store(tmp_path).metadata("v")["complete"] is False  # the second run began
    second.write_step(0, {"token/cat": np.zeros((2, 3, 4))})
    second.close()
    assert open_store(tmp_path).aggregated("v", "cat").map.max() == 0.0
    for bad in (-1, float("nan")):  # NaN would never reach its deadline: a wait that never ends
        with pytest.raises(ValueError, match="wait must be seconds >= 0 or None"):
            StoreWriter(tmp_path, "v", META, wait=bad)


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "no-fcntl"])
def test_a_dead_writers_lock_is_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flock: bool
) -> None:
    """A lock file of attnmap before claims (a bare pid) is a writer of this machine: where flock works
    nobody holding it says its writer is gone; without fcntl its pid no longer running does. A live
    writer keeps it either way (tests/test_store_concurrency.py: claims, and flock that does not work)."""
    from attnmap.store import lock as lock_module

    if not flock:
        monkeypatch.setattr(lock_module, "fcntl", None)
    make_store(tmp_path, "v", steps=2)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    lock = tmp_path / video_dirname("v") / LOCK_FILE
    lock.write_text(dead.stdout.strip())  # the pid of a process that has ended
    with StoreWriter(tmp_path, "v", META, dtype="float32") as w:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        w.write_step(0, {"token/cat": np.ones((2, 3, 4))})
        with pytest.raises(StoreError, match=rf"is being written by process {os.getpid()}"):
            StoreWriter(tmp_path, "v", META)
    assert not lock.exists() and open_store(tmp_path).steps("v") == [0]


def test_a_writer_that_fails_drops_its_lock(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="model failed"), StoreWriter(tmp_path, "v", META) as w:
        w.write_step(0, {"token/cat": np.ones((2, 3, 4))})
        raise RuntimeError("model failed")
    assert not (tmp_path / video_dirname("v") / LOCK_FILE).exists()
    store = open_store(tmp_path)
    assert store.steps("v") == [0] and not store.is_complete("v")
    with pytest.raises(ValueError, match="this StoreWriter is closed"):
        w.write_step(1, {"token/cat": np.ones((2, 3, 4))})
