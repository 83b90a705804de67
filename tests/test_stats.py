"""analysis.stats: decay, windows, recall, sinks and head classes against brute force and designed heads."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from attnmap.analysis import stats
from attnmap.layout import Layout
from attnmap.reduce import attention_sums
from attnmap.store import StoreWriter, open_store

GRID = (3, 4, 4)
LAYOUT = Layout.self_attn(grid=GRID, prefix=1)


def designed_heads(strength: float = 12.0) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [1, 4, 49, 32] of four heads: 0 attends within the query's frame, 1 to the query's
    position in every frame, 2 evenly to every key, 3 to the prefix token (a sink)."""
    f, h, w = GRID
    n, d = LAYOUT.num_queries, 32
    q, k = torch.zeros(1, 4, n, d), torch.zeros(1, 4, n, d)
    for v in range(f * h * w):
        t, pos = v // (h * w), v % (h * w)
        q[0, 0, 1 + v, t] = k[0, 0, 1 + v, t] = strength  # same frame
        q[0, 1, 1 + v, 3 + pos] = k[0, 1, 1 + v, 3 + pos] = strength  # same position
    q[0, 3, :, 31] = strength
    k[0, 3, 0, 31] = strength  # every query of head 3 looks at the prefix token
    return q, k


def _statistics(per_head: bool = True) -> dict[str, torch.Tensor]:
    q, k = designed_heads()
    names = ("blocks", "distance", "entropy", "received")
    return attention_sums(q, k, LAYOUT, names, per_head=per_head, block_size=(1, 2, 2), scale=1.0)


def test_energy_decay_by_hand() -> None:
    d = np.zeros((2, 3, 2))
    d[0, 0, 0], d[1, 2, 1], d[0, 1, 1] = 0.5, 0.25, 0.25
    curves = stats.energy_decay(d)
    np.testing.assert_allclose(curves["time"], [0.75, 0.25])
    np.testing.assert_allclose(curves["height"], [0.5, 0.25, 0.25])
    np.testing.assert_allclose(curves["width"], [0.5, 0.5])
    zero = stats.energy_decay(np.zeros((2, 1, 1, 1)))
    assert zero["time"].shape == (2, 1) and not zero["time"].any()


def test_window_coverage_and_smallest_window_by_brute_force() -> None:
    rng = np.random.default_rng(0)
    d = rng.random((2, 3, 4, 5)) ** 4  # two heads, mass uneven
    f, h, w = d.shape[1:]
    for t, y, x in itertools.product(range(1, 6), range(1, 8), range(1, 10)):
        want = d[:, : t // 2 + 1, : y // 2 + 1, : x // 2 + 1].sum(axis=(1, 2, 3)) / d.sum(axis=(1, 2, 3))
        np.testing.assert_allclose(stats.window_coverage(d, (t, y, x)), want, rtol=1e-6)
    for share in (0.3, 0.6, 0.9, 1.0):
        got = stats.smallest_window(d, share)
        for head in range(2):
            windows = [
                (2 * a + 1, 2 * b + 1, 2 * c + 1)
                for a, b, c in itertools.product(range(f), range(h), range(w))
                if d[head, : a + 1, : b + 1, : c + 1].sum() >= share * d[head].sum() - 1e-12
            ]
            fewest = min(math.prod(v) for v in windows)
            assert math.prod(got[head]) == fewest, (share, head, got[head])
            assert stats.window_coverage(d[head], got[head]) >= share - 1e-6
    with pytest.raises(ValueError, match=r"^share: expected a finite number in \(0, 1\], got 0.0$"):
        stats.smallest_window(d, 0.0)
    with pytest.raises(ValueError, match=r"^window: expected \(t, h, w\): 3 integers >= 1, got \(1, 0, 1\)$"):
        stats.window_coverage(d, (1, 0, 1))
    with pytest.raises(ValueError, match=r"^distance must be \[\.\.\., F, H, W\]"):
        stats.energy_decay(np.ones((3, 3)))


def test_recall_curve_by_hand() -> None:
    blocks = np.array([[[0.5, 0.2, 0.3, 0.0], [0.1, 0.1, 0.1, 0.7], [0.0, 0.0, 0.0, 0.0]]])
    fr, recall = stats.recall_curve(blocks, [0.25, 0.5, 0.75, 1.0])
    # row 0 sorted 0.5, 0.3, 0.2, 0 and row 1 0.7, 0.1, 0.1, 0.1; the empty row does not count
    np.testing.assert_allclose(recall, [[(0.5 + 0.7) / 2, (0.8 + 0.8) / 2, (1.0 + 0.9) / 2, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(fr, [0.25, 0.5, 0.75, 1.0])
    fr, recall = stats.recall_curve(blocks[0])
    assert fr.shape == (100,) and recall.shape == (100,) and recall[-1] == pytest.approx(1.0)
    assert np.all(np.diff(recall) >= 0)
    with pytest.raises(ValueError, match=r"^fractions: expected a finite number in \(0, 1\], got 0.0$"):
        stats.recall_curve(blocks, [0.0])


def test_recall_of_real_blocks_rises_faster_than_uniform() -> None:
    out = _statistics()
    fr, recall = stats.recall_curve(out["blocks"][0])
    # head 3 (the sink) puts its mass on one key, outside every video cube: no block mass at all
    assert recall.shape == (4, 100)
    uniform = np.ceil(fr * out["blocks"].shape[-1]) / out["blocks"].shape[-1]
    assert np.all(recall[0] >= uniform - 1e-6) and recall[0, 30] > uniform[30] + 0.3
    np.testing.assert_allclose(recall[2], uniform, atol=1e-5)  # the even head keeps what it pays for


def test_sink_keys_name_where_they_sit() -> None:
    received = np.array([0.05, 0.5, 0.1, 0.35])
    lay = Layout.joint(text=2, grid=(1, 1, 2), text_first=False)  # video keys 0, 1; text keys 2, 3
    sinks = stats.sink_keys(received, 2, layout=lay)
    assert sinks == [
        {"key": 1, "mass": 0.5, "kind": "video", "frame": 0, "row": 0, "col": 1},
        {"key": 3, "mass": 0.35, "kind": "text", "index": 1},
    ]
    per_head = stats.sink_keys(np.stack([received, received[::-1]]), 1)
    assert per_head == [[{"key": 1, "mass": 0.5}], [{"key": 2, "mass": 0.5}]]
    np.testing.assert_allclose(stats.sink_mass(received, 2), 0.85)
    with pytest.raises(ValueError, match=r"^layout .* has 4 keys, received has 3"):
        stats.sink_keys(received[:3], layout=lay)
    with pytest.raises(ValueError, match=r"^k: expected an integer >= 1, got 0$"):
        stats.sink_keys(received, 0)


def test_head_classes_of_designed_heads() -> None:
    out = _statistics()
    labels = stats.head_classes(out["distance"][0], out["received"][0])
    assert labels.tolist() == ["spatial", "temporal", "global", "sink"]
    # without received the sink head is judged by its (tiny, even) video mass alone
    assert stats.head_classes(out["distance"][0])[:3].tolist() == ["spatial", "temporal", "global"]
    sinks = stats.sink_keys(out["received"][0], 1, layout=LAYOUT)
    assert sinks[3][0]["key"] == 0 and sinks[3][0]["kind"] == "prefix" and sinks[3][0]["mass"] > 0.99
    windows = stats.smallest_window(out["distance"][0], 0.9)
    assert windows[0].tolist() == [1, 7, 7]  # the own frame, all of it
    assert windows[1].tolist() == [5, 1, 1]  # the own position, every frame
    with pytest.raises(ValueError, match=r"^received must have the leading dims of distance"):
        stats.head_classes(out["distance"][0], out["received"][0, :2])


def _write_store(root: Path) -> dict[str, np.ndarray]:
    """A store as capture writes one: block means and two blocks, per head (H first), a cross
    call's received under received/text."""
    a, b = _statistics(), _statistics()
    cross = Layout.cross(grid=GRID, text=6)
    qc, kc = torch.randn(1, 4, cross.num_queries, 32), torch.randn(1, 4, 6, 32)
    text = attention_sums(
        qc, kc, cross, ("received", "blocks"), per_head=True, block_size=(8, 2), backend="reference"
    )
    maps = {}
    for name in ("blocks", "distance", "entropy", "received"):
        maps[f"{name}/block0"] = a[name][0].numpy()
        maps[f"{name}/block1"] = (b[name][0].numpy()[::-1]).copy()  # another block: heads reversed
        maps[name] = (maps[f"{name}/block0"] + maps[f"{name}/block1"]) / 2
    maps["received/text"] = text["received"][0].numpy()
    maps["blocks/text"] = text["blocks"][0].numpy()
    meta = {"grid": list(GRID), "layouts": {"self": LAYOUT.to_dict(), "cross": cross.to_dict()}}
    with StoreWriter(root, "vid", meta, dtype="float32") as writer:
        writer.write_step(0, maps)
        writer.write_step(1, maps)
    return maps


def test_summarize_stats_of_a_store(tmp_path: Path) -> None:
    maps = _write_store(tmp_path)
    store = open_store(tmp_path)
    assert stats.stats_maps(store, "vid")["distance"] == {
        None: "distance",
        0: "distance/block0",
        1: "distance/block1",
    }
    summary = stats.summarize_stats(store, "vid", share=0.9, window=(1, 3, 3), k=2)
    json.dumps(summary)  # JSON-safe
    assert set(summary) == {
        "video_id",
        "grid",
        "share",
        "window",
        "blocks",
        "blocks/text",
        "distance",
        "entropy",
        "received",
        "received/text",
    }
    d0 = summary["distance"]["0"]
    assert d0["head_classes"] == ["spatial", "temporal", "global", "sink"]
    assert summary["distance"]["1"]["head_classes"] == ["sink", "global", "temporal", "spatial"]
    np.testing.assert_allclose(
        d0["window_coverage"], stats.window_coverage(maps["distance/block0"], (1, 3, 3))
    )
    assert d0["smallest_window"] == stats.smallest_window(maps["distance/block0"], 0.9).tolist()
    np.testing.assert_allclose(
        d0["energy_decay"]["time"], stats.energy_decay(maps["distance/block0"])["time"]
    )
    recall = stats.recall_curve(maps["blocks"], stats.RECALL_AT)[1]
    np.testing.assert_allclose(summary["blocks"]["mean"]["recall_at"]["0.1"], recall[:, 1], rtol=1e-6)
    sinks = summary["received"]["0"]["sinks"]
    assert sinks[3][0] == {
        "key": 0,
        "mass": pytest.approx(float(maps["received/block0"][3, 0])),
        "kind": "prefix",
        "index": 0,
    }
    text_sink = summary["received/text"]["mean"]["sinks"][0][0]
    assert text_sink["kind"] == "text" and len(summary["received/text"]["mean"]["sinks"][0]) == 2
    entropy = summary["entropy"]["mean"]
    np.testing.assert_allclose(entropy["mean"], maps["entropy"].mean(-1), rtol=1e-6)
    assert entropy["max"][2] == pytest.approx(math.log(LAYOUT.num_keys), rel=1e-4)  # the even head


def test_summarize_stats_refuses_a_video_without_statistics(tmp_path: Path) -> None:
    with StoreWriter(tmp_path, "plain", {"grid": [1, 2, 2]}) as writer:
        writer.write_step(0, {"temporal": np.ones((1, 1), np.float32)})
    with pytest.raises(ValueError, match=r"^video 'plain' holds no attention statistics"):
        stats.summarize_stats(open_store(tmp_path), "plain")
