"""The numpy format of the store (attnmap.store.npz): the documented per-token layout, read back by numpy
alone without pickle, and by the store as a safetensors store is; compression; runs that replace each
other across formats; refusals that name the argument."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from attnmap.errors import AttnmapError
from attnmap.store import METADATA_FILE, StoreWriter, open_store, video_dirname
from attnmap.store.npz import token_folder

META = {
    "model": "tiny",
    "prompt": "a (cat) and a (dog)",
    "targets": {"dog": [5], "cat": [2]},
    "grid": [2, 3, 4],
    "video": {"height": 48, "width": 64, "fps": 8, "frames": 5},
}


def maps_of(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "token/cat": rng.random((2, 3, 4), dtype=np.float32),
        "token/dog": rng.random((2, 3, 4), dtype=np.float32),
        "token/cat/block1": rng.random((2, 3, 4), dtype=np.float32),
        "uncond/token/cat": rng.random((2, 3, 4), dtype=np.float32),
        "temporal": rng.random((2, 2), dtype=np.float32),
        "temporal/block0": rng.random((2, 2, 2), dtype=np.float32),  # per head
    }


def write_run(
    root: Path, video_id: str = "prompt_001_vid_001", steps: int = 3, **kw: Any
) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    written = []
    with StoreWriter(root, video_id, META, **{"dtype": "float32", "storage_format": "numpy", **kw}) as w:
        for s in range(steps):
            written.append(maps_of(rng))
            w.write_step(s, written[-1])
    return written


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def npz(path: Path) -> dict[str, np.ndarray]:
    """An .npz read by numpy alone, without pickle (the independent reader)."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


# -- the layout, read by numpy alone -------------------------------------------------------------
@pytest.mark.parametrize("compress", [False, True], ids=["stored", "compressed"])
def test_the_documented_layout_read_by_numpy_alone(tmp_path: Path, compress: bool) -> None:
    written = write_run(tmp_path, compress=compress)
    folder = tmp_path / "prompt_001_vid_001"
    steps = [f"step_{s:03d}" for s in range(3)]
    assert files_under(folder) == sorted(
        [METADATA_FILE, "aggregated/aggregated.npz", "aggregated/aggregated_metadata.json"]
        + [f"aggregated/{w}_aggregated{x}" for w in ("cat", "dog") for x in (".npz", "_metadata.json")]
        + [f"{d}{s}{x}" for d in ("", "cat/", "dog/") for s in steps for x in (".npz", "_metadata.json")]
    )
    for s, maps in enumerate(written):
        cat = npz(folder / "cat" / f"step_{s:03d}.npz")
        assert list(cat) == ["attention_map", "token/cat/block1", "uncond/token/cat"]  # its own map first
        np.testing.assert_array_equal(cat["attention_map"], maps["token/cat"])
        np.testing.assert_array_equal(cat["uncond/token/cat"], maps["uncond/token/cat"])
        np.testing.assert_array_equal(
            npz(folder / "dog" / f"step_{s:03d}.npz")["attention_map"], maps["token/dog"]
        )
        other = npz(folder / f"step_{s:03d}.npz")
        assert sorted(other) == ["temporal", "temporal/block0"]
        np.testing.assert_array_equal(other["temporal/block0"], maps["temporal/block0"])
        meta = json.loads((folder / "cat" / f"step_{s:03d}_metadata.json").read_text())
        assert {k: meta[k] for k in ("shape", "dtype", "num_steps", "steps_used", "aggregation_method", "token_word")} == {
            "shape": [2, 3, 4], "dtype": "float32", "num_steps": 1, "steps_used": [s], "aggregation_method": "none",
            "token_word": "cat",
        }  # fmt: skip
        assert meta["video_dimensions"] == {"width": 64, "height": 48, "fps": 8, "frames": 5}
        assert meta["storage_timestamp"] and meta["attention_storage_version"] == "1.1.0"
    mean = np.mean([m["token/cat"].astype(np.float64) for m in written], axis=0).astype(np.float32)
    np.testing.assert_array_equal(npz(folder / "aggregated" / "cat_aggregated.npz")["attention_map"], mean)
    meta = json.loads((folder / "aggregated" / "cat_aggregated_metadata.json").read_text())
    assert meta["num_steps"] == 3 and meta["steps_used"] == [0, 1, 2] and meta["aggregation_method"] == "mean"
    with zipfile.ZipFile(folder / "cat" / "step_001.npz") as zf:
        kinds = {i.compress_type for i in zf.infolist()}
    assert kinds == {zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED}


@pytest.mark.parametrize("dtype,tol", [("float32", 0.0), ("float16", 1e-3)])
def test_the_store_reads_a_numpy_store_as_a_safetensors_one(tmp_path: Path, dtype: str, tol: float) -> None:
    """The same maps written in both formats read back the same through every read of the store."""
    written = write_run(tmp_path / "np", dtype=dtype, compress=True)
    write_run(tmp_path / "st", dtype=dtype, storage_format="safetensors")
    a, b = open_store(tmp_path / "np"), open_store(tmp_path / "st")
    vid = "prompt_001_vid_001"
    assert a.videos() == b.videos() == [vid]
    assert a.steps(vid) == b.steps(vid) == [0, 1, 2] and a.tokens(vid) == b.tokens(vid) == ["dog", "cat"]
    assert a.names(vid) == b.names(vid) and a.names(vid, 1) == b.names(vid, 1) == sorted(written[1])
    for name in written[0]:
        for s in range(3):
            np.testing.assert_array_equal(a.load(vid, name, s), b.load(vid, name, s))
            np.testing.assert_allclose(a.load(vid, name, s), written[s][name], atol=tol, rtol=0)
        np.testing.assert_array_equal(a.load(vid, name), b.load(vid, name))
        np.testing.assert_array_equal(a.mean(vid, name, [0, 2]), b.mean(vid, name, [0, 2]))
    assert [m.metadata["step"] for m in a.load_all_steps(vid, "cat", branch="uncond")] == [0, 1, 2]
    np.testing.assert_array_equal(
        a.aggregated(vid, "cat", block=1).map, b.aggregated(vid, "cat", block=1).map
    )
    assert a.aggregated(vid, "dog").metadata["rebuilt"] is False
    assert a.metadata(vid)["storage"] == {"steps": "numpy", "aggregated": "numpy", "compressed": True}


def test_compressed_files_are_smaller(tmp_path: Path) -> None:
    smooth = {"token/cat": np.tile(np.linspace(0, 1, 64, dtype=np.float32), (8, 64, 1))}
    for compress in (False, True):
        with StoreWriter(
            tmp_path / str(compress), "v", {}, dtype="float32", storage_format="numpy", compress=compress
        ) as w:
            w.write_step(0, smooth)
    size = {c: (tmp_path / str(c) / "v" / "cat" / "step_000.npz").stat().st_size for c in (False, True)}
    assert size[True] < size[False] / 4 and size[False] > smooth["token/cat"].nbytes


def test_names_that_are_taken_or_are_numpy_arguments(tmp_path: Path) -> None:
    """Words named like the aggregate's folder or like the video folder's files, a word of no plain name,
    maps named like np.savez's own arguments: each keeps a file of its own and round-trips."""
    maps = {
        "token/aggregated": np.full((1, 2, 2), 1.0),
        "token/attention_videos": np.full((1, 2, 2), 2.0),
        "token/a b/c": np.full((1, 2, 2), 3.0),
        "token/metadata.json": np.full((1, 2, 2), 6.0),
        "token/step_1000.npz": np.full((1, 2, 2), 7.0),
        "file": np.full(3, 4.0),
        "allow_pickle": np.full(3, 5.0),
    }
    with StoreWriter(tmp_path, "v", {}, dtype="float32", storage_format="numpy") as w:
        w.write_step(1000, maps)  # four digits after three
    folder = tmp_path / "v"
    assert token_folder("aggregated") != "aggregated" and token_folder("aggregated").startswith("aggregated-")
    assert token_folder("attention_videos").startswith("attention_videos-")
    assert (folder / token_folder("aggregated") / "step_1000.npz").is_file()
    assert npz(folder / "step_1000.npz")["allow_pickle"].tolist() == [5.0, 5.0, 5.0]
    assert (folder / "metadata.json").is_file() and (folder / "step_1000.npz").is_file()
    assert token_folder("metadata.json").startswith("metadata.json-")
    assert token_folder("step_1000.npz").startswith("step_1000.npz-")
    store = open_store(tmp_path)
    words = ["a b/c", "aggregated", "attention_videos", "metadata.json", "step_1000.npz"]
    assert store.steps("v") == [1000] and sorted(store.tokens("v")) == words
    for name, value in maps.items():
        np.testing.assert_array_equal(store.load("v", name, 1000), value)
        np.testing.assert_array_equal(store.load("v", name), value)


# -- runs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("first", "second"), [("safetensors", "numpy"), ("numpy", "safetensors"), ("numpy", "numpy")]
)
def test_a_new_run_replaces_the_old_in_any_format(tmp_path: Path, first: str, second: str) -> None:
    write_run(tmp_path, "v", steps=4, storage_format=first)
    folder = tmp_path / "v"
    (folder / "attention_videos").mkdir()
    (folder / "attention_videos" / "v_cat_attention.mp4").write_bytes(b"a render")  # not the store's
    w = StoreWriter(tmp_path, "v", META, dtype="float32", storage_format=second)
    w.write_step(0, {"token/cat": np.full((2, 3, 4), 9.0)})
    store = open_store(tmp_path)
    assert store.steps("v") == [0] and store.tokens("v") == ["cat"]  # nothing of the old run is read
    assert store.load_step("v", "cat", 0).map.max() == 9.0
    w.close()
    kept = files_under(folder)
    assert "attention_videos/v_cat_attention.mp4" in kept
    if second == "numpy":
        assert sorted(kept) == sorted([
            METADATA_FILE, "attention_videos/v_cat_attention.mp4", "step_000_metadata.json", "cat/step_000.npz",
            "cat/step_000_metadata.json", "aggregated/aggregated_metadata.json", "aggregated/cat_aggregated.npz",
            "aggregated/cat_aggregated_metadata.json",
        ])  # fmt: skip
    else:
        assert not (folder / "dog").exists() and not (folder / "aggregated").exists()
        assert sorted(kept) == sorted(
            [
                METADATA_FILE,
                "attention_videos/v_cat_attention.mp4",
                "step_000000.safetensors",
                "aggregated.safetensors",
            ]
        )


def test_steps_in_numpy_and_the_aggregate_in_safetensors(tmp_path: Path) -> None:
    written = write_run(tmp_path, "v", steps=2, aggregated_format="safetensors")
    folder = tmp_path / "v"
    assert (folder / "aggregated.safetensors").is_file() and not (folder / "aggregated").exists()
    store = open_store(tmp_path)
    expect = np.mean([m["temporal"].astype(np.float64) for m in written], axis=0).astype(np.float32)
    np.testing.assert_array_equal(store.load("v", "temporal"), expect)
    assert store.aggregated("v", "cat").metadata["rebuilt"] is False


def test_a_run_that_died_is_rebuilt_in_its_format(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    w = StoreWriter(tmp_path, "v", META, dtype="float32", storage_format="numpy", compress=True)
    written = [maps_of(rng) for _ in range(3)]
    for s, maps in enumerate(written):
        w.write_step(s, maps)
    w.abort()  # as if it had died: no aggregate
    store = open_store(tmp_path)
    assert store.aggregated("v", "dog").metadata["rebuilt"] is True
    path = store.rebuild_aggregated("v")
    assert path == tmp_path / "v" / "aggregated" / "aggregated_metadata.json"
    expect = np.mean([m["token/dog"].astype(np.float64) for m in written], axis=0).astype(np.float32)
    np.testing.assert_array_equal(
        npz(tmp_path / "v" / "aggregated" / "dog_aggregated.npz")["attention_map"], expect
    )
    assert open_store(tmp_path).aggregated("v", "dog").metadata["rebuilt"] is False


def test_loading_a_numpy_store_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    write_run(tmp_path, "v", steps=2)
    real = np.load
    seen = []

    def no_pickle(*args: Any, **kwargs: Any) -> Any:
        assert kwargs.get("allow_pickle") is False, kwargs
        seen.append(args[0])
        return real(*args, **kwargs)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the store unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(np, "load", no_pickle)
    store = open_store(tmp_path)
    for word in store.tokens("v"):
        store.load_all_steps("v", word)
        store.aggregated("v", word)
    store.load("v", "temporal", 1)
    assert seen  # the maps came through np.load(allow_pickle=False)


# -- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"storage_format": "torch"},
            r"^storage_format: 'torch' files are written with pickle \(torch\.save\)",
        ),
        ({"aggregated_format": "torch"}, r"^aggregated_format: 'torch' files are written with pickle"),
        ({"storage_format": "npy"}, r"^storage_format: expected one of safetensors, numpy, got 'npy'$"),
        (
            {"compress": True},
            r"^compress: safetensors files are stored uncompressed; set storage_format to numpy",
        ),
        ({"storage_format": "numpy", "compress": 1}, r"^compress: expected true or false, got 1$"),
    ],
)
def test_formats_a_store_cannot_write_are_refused_before_anything_is_written(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(AttnmapError, match=message):
        StoreWriter(tmp_path, "v", {}, **options)
    assert not (tmp_path / video_dirname("v")).exists()
