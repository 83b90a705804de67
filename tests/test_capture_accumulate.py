"""attnmap.capture.accumulate and attnmap.capture.sinks alone: running means per batch row, reads
over blocks, the names a step's maps are stored under, and where finished steps go."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from attnmap import Config
from attnmap.capture.accumulate import Accumulator, MapKey, RunningMean
from attnmap.capture.sinks import AutoRenderSink, StoreSink, store_sinks
from attnmap.store import open_store


def test_a_running_mean_counts_each_batch_row_apart() -> None:
    mean = RunningMean(3, (2,), torch.device("cpu"))
    a, b, c = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 6.0]]), torch.tensor([[5.0, 5.0], [7.0, 7.0]])
    assert mean.add(a, [1]) is None and mean.add(b, slice(1, 2)) is None and mean.add(c, [0, 2]) is None
    got = mean.mean()
    assert torch.equal(got, torch.tensor([[5.0, 5.0], [2.0, 4.0], [7.0, 7.0]]))
    empty = RunningMean(2, (1,), torch.device("cpu"))
    empty.add(torch.ones(1, 1), [0])
    assert torch.isnan(empty.mean()[1]).all()  # a row no call reached is NaN, never a silent zero


def test_a_map_that_grows_is_nan_padded_and_one_of_another_rank_is_refused() -> None:
    mean = RunningMean(2, (2, 3), torch.device("cpu"))
    mean.add(torch.ones(1, 2, 3), [0])
    mean.add(torch.full((1, 2, 5), 2.0), [1])  # a row with more text tokens
    got = mean.mean()
    assert got.shape == (2, 2, 5)
    nan = float("nan")
    assert torch.allclose(got[0], torch.tensor([[1.0, 1, 1, nan, nan]] * 2), equal_nan=True) and torch.equal(
        got[1], torch.full((2, 5), 2.0)
    )
    assert mean.add(torch.ones(1, 2), [0]) == "changed shape from (2, 5) to (2,)"


def test_reads_average_over_blocks_and_steps_name_the_branch_and_block() -> None:
    acc = Accumulator()
    for block, value in ((0, 1.0), (1, 3.0)):
        acc.add(MapKey(0, "cond", "temporal", block), torch.full((1, 2, 2), value), slice(None), 1)
    acc.add(MapKey(0, "uncond", "temporal", 0), torch.full((1, 2, 2), 9.0), slice(None), 1)
    acc.add(MapKey(2, "cond", "temporal", 0), torch.full((1, 2, 2), 5.0), slice(None), 1)
    assert acc.steps == [0, 2] and acc.names == ["temporal"] and acc.rows(0) == 1
    mean = acc.value(0, "cond", "temporal", None, per_block=True)
    assert mean is not None and torch.equal(mean, torch.full((1, 2, 2), 2.0))
    maps = acc.step_maps(0, 0, per_block=True)
    assert sorted(maps) == [
        "temporal",
        "temporal/block0",
        "temporal/block1",
        "uncond/temporal",
        "uncond/temporal/block0",
    ]
    assert torch.equal(maps["temporal"], torch.full((2, 2), 2.0)) and maps["temporal"].shape == (2, 2)
    assert acc.nbytes == 4 * 4 * 4
    acc.to_cpu(0)
    assert acc.value(1, "cond", "temporal", None, per_block=True) is None


def maps(value: float) -> dict[str, torch.Tensor]:
    return {"token/cat": torch.full((2, 3, 4), value), "temporal": torch.full((2, 2), value)}


def test_the_store_sink_writes_each_row_as_a_video(tmp_path: Path) -> None:
    sink = StoreSink(
        tmp_path,
        ["a", "b"],
        lambda row: {"model": "test", "grid": [2, 3, 4], "row": row},
        Config.from_dict({"storage_dtype": "float32"}),
    )
    for step in range(2):
        sink.write_step(step, [maps(step), maps(10 + step)])
    sink.close()
    store = open_store(tmp_path)
    assert store.is_complete("a") and store.steps("b") == [0, 1] and sink.written == ["a", "b"]
    np.testing.assert_array_equal(store.load("b", "token/cat", step=1), np.full((2, 3, 4), 11.0, np.float32))
    assert [store.metadata(v)["row"] for v in ("a", "b")] == [0, 1]  # each video gets its row's metadata
    np.testing.assert_array_equal(
        store.load("a", "temporal"), np.full((2, 2), 0.5, np.float32)
    )  # the step mean
    with pytest.raises(
        ValueError, match=r"video_id gives 2 id\(s\) \['a', 'b'\] but the model ran 1 video\(s\)"
    ):
        StoreSink(tmp_path / "x", ["a", "b"], lambda row: {}, None).write_step(0, [maps(0)])


def test_auto_render_is_a_sink_the_config_adds_and_runs_after_the_store_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert [type(s) for s in store_sinks(tmp_path, ["v"], lambda row: {}, None)] == [StoreSink]
    cfg = Config.from_dict({"auto_generate_per_video": True, "auto_generate_videos": True})
    sinks = store_sinks(tmp_path, ["v"], lambda row: {"model": "test"}, cfg)
    assert [type(s) for s in sinks] == [StoreSink, AutoRenderSink]
    calls: list[Any] = []
    fake = types.ModuleType("attnmap.render.videos")
    fake.render_video = lambda root, vid, out, params: calls.append(
        ("video", vid, open_store(root).is_complete(vid))
    )  # type: ignore[attr-defined]
    fake.render_store = lambda root, params: calls.append(("store",))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "attnmap.render.videos", fake)
    for sink in sinks:
        sink.write_step(0, [maps(1)])
    for sink in sinks:
        sink.close()
    assert calls == [("video", "v", True), ("store",)]
