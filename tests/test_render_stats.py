"""render.stats and `attnmap-render stats`: figures that show their data, the JSON summary, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from attnmap.analysis import stats
from attnmap.cli import app
from attnmap.layout import Layout
from attnmap.reduce import attention_sums
from attnmap.render import stats as render_stats
from attnmap.store import StoreWriter, open_store
from conftest import colormap_rgb, has_colour, read_png

runner = CliRunner()
GRID = (3, 4, 5)


@pytest.fixture(scope="module")
def statistics() -> dict[str, np.ndarray]:
    """Per-head statistics of a random self-attention call, from the oracle."""
    lay = Layout.self_attn(grid=GRID, prefix=1)
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 3, lay.num_queries, 16, generator=g) * 2 for _ in range(2))
    names = ("blocks", "distance", "entropy", "received")
    out = attention_sums(q, k, lay, names, per_head=True, block_size=(2, 2, 2), backend="reference")
    return {n: t[0].numpy() for n, t in out.items()}


def test_energy_decay_figure_draws_a_line_per_head(statistics: dict[str, np.ndarray], tmp_path: Path) -> None:
    path = render_stats.energy_decay_figure(stats.energy_decay(statistics["distance"]), tmp_path / "e.png")
    pixels = read_png(path)
    for colour in matplotlib.colormaps["viridis"](np.linspace(0, 0.9, 3), bytes=True):
        assert has_colour(pixels, colour[:3], tol=8)
    one = render_stats.energy_decay_figure(
        stats.energy_decay(statistics["distance"][0]), tmp_path / "one.svg"
    )
    assert "mean over heads" in one.read_text()
    with pytest.raises(ValueError, match=r"^curves must hold time, height, width; missing width"):
        render_stats.energy_decay_figure({"time": [1.0], "height": [1.0]}, tmp_path / "x.png")


def test_recall_figure_and_its_checks(statistics: dict[str, np.ndarray], tmp_path: Path) -> None:
    fr, recall = stats.recall_curve(statistics["blocks"])
    path = render_stats.recall_figure(fr, recall, tmp_path / "r.svg")
    text = path.read_text()
    assert "head 2" in text and "uniform" in text
    with pytest.raises(ValueError, match=r"^recall must have 100 values per head"):
        render_stats.recall_figure(fr, recall[:, :5], tmp_path / "r.png")


def test_coverage_figure_shows_the_colormap_ends(tmp_path: Path) -> None:
    coverage = np.array([[1.0, 0.0, 0.5], [0.25, 0.75, 1.0]])
    pixels = read_png(
        render_stats.coverage_figure(coverage, tmp_path / "c.png", blocks=["0", "7"], window=(1, 3, 3))
    )
    assert has_colour(pixels, colormap_rgb("magma", 1.0)) and has_colour(pixels, colormap_rgb("magma", 0.0))
    svg = render_stats.coverage_figure(
        coverage, tmp_path / "c.svg", blocks=["0", "7"], window=(1, 3, 3)
    ).read_text()
    assert "1x3x3" in svg
    with pytest.raises(ValueError, match=r"^blocks must label the 2 rows of coverage, got 1"):
        render_stats.coverage_figure(coverage, tmp_path / "c.png", blocks=["0"])


def _store(root: Path, statistics: dict[str, np.ndarray], video_id: str = "vid") -> None:
    maps = {name: value for name, value in statistics.items()}
    for name, value in statistics.items():
        maps[f"{name}/block0"] = value
        maps[f"{name}/block4"] = value[::-1].copy()
    lay = Layout.self_attn(grid=GRID, prefix=1)
    with StoreWriter(root, video_id, {"grid": list(GRID), "layouts": {"self": lay.to_dict()}}) as writer:
        writer.write_step(0, maps)


def test_render_stats_writes_figures_and_the_summary(
    statistics: dict[str, np.ndarray], tmp_path: Path
) -> None:
    _store(tmp_path / "store", statistics)
    store = open_store(tmp_path / "store")
    paths = render_stats.render_stats(store, "vid", tmp_path / "out", window=(1, 3, 3))
    assert [p.name for p in paths] == [
        "vid_energy_decay.png",
        "vid_recall.png",
        "vid_coverage.png",
        "vid_stats.json",
    ]
    summary = json.loads(paths[-1].read_text())
    assert summary == json.loads(json.dumps(stats.summarize_stats(store, "vid", window=(1, 3, 3))))
    # the coverage map: blocks 0 and 4, heads in reverse order in block 4
    cov0, cov4 = summary["distance"]["0"]["window_coverage"], summary["distance"]["4"]["window_coverage"]
    np.testing.assert_allclose(cov4, cov0[::-1], rtol=1e-3)  # stored as float16
    heads = len(cov0)
    decay, recall, coverage = (read_png(p) for p in paths[:-1])
    for i, x in enumerate(np.linspace(0, 0.9, heads)):  # one line per head, in viridis
        for pixels in (decay, recall):
            assert has_colour(pixels, colormap_rgb("viridis", float(x)), tol=3), (i, x)
    for value in [*cov0, *cov4]:  # each block x head cell in magma's colour of its share
        assert has_colour(coverage, colormap_rgb("magma", float(value)), tol=3), value
    with pytest.raises(ValueError, match=r"^fmt must be 'png' or 'svg'"):
        render_stats.render_stats(store, "vid", tmp_path / "out", fmt="jpg")


def test_cli_stats(statistics: dict[str, np.ndarray], tmp_path: Path) -> None:
    root = tmp_path / "store"
    _store(root, statistics, "a")
    _store(root, statistics, "b")
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["stats", str(root), "--output", str(out), "--video-id", "b", "--format", "svg"]
    )
    assert result.exit_code == 0, result.output
    written = result.output.split()
    assert [Path(p).name for p in written] == [
        "b_energy_decay.svg",
        "b_recall.svg",
        "b_coverage.svg",
        "b_stats.json",
    ]
    summary = json.loads((out / "b_stats.json").read_text())
    assert summary["window"] == [1, 3, 3] and summary["share"] == 0.9  # the defaults: H // 4 * 2 + 1
    result = runner.invoke(
        app, ["stats", str(root), "--output", str(out), "--window", "1,1,1", "--share", "0.5"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*_stats.json")) == ["a_stats.json", "b_stats.json"]
    assert json.loads((out / "a_stats.json").read_text())["window"] == [1, 1, 1]
    assert "attnmap-render stats outputs/attention_maps" in runner.invoke(app, ["stats", "--help"]).output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--window", "1,2"], "Error: --window must be three positive ints t,h,w"),
        (["--share", "0"], "Error: --share: expected a finite number in (0, 1], got 0.0"),
        (["--format", "gif"], "Error: --format must be png or svg"),
        (["--top-k", "0"], "Error: --top-k: expected an integer >= 1, got 0"),
        (["--video-id", "nope"], "Error: --video-id 'nope' is not in"),
    ],
)
def test_cli_stats_bad_arguments_one_line(
    statistics: dict[str, np.ndarray], tmp_path: Path, args: list[str], message: str
) -> None:
    _store(tmp_path / "store", statistics)
    result = runner.invoke(app, ["stats", str(tmp_path / "store"), "--output", str(tmp_path / "o"), *args])
    assert result.exit_code == 1
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_cli_stats_of_a_video_without_statistics(tmp_path: Path) -> None:
    with StoreWriter(tmp_path, "plain", {"grid": [1, 2, 2]}) as writer:
        writer.write_step(0, {"temporal": np.ones((1, 1), np.float32)})
    result = runner.invoke(app, ["stats", str(tmp_path), "--output", str(tmp_path / "o")])
    assert result.exit_code == 1 and "Error: video 'plain' holds no attention statistics" in result.output
