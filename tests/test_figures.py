"""Figures: each writes a valid PNG or SVG that shows the data (colours checked against matplotlib)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from attnmap.render import figures
from conftest import colormap_rgb, has_colour, read_png


def test_temporal_matrix_png_shows_the_colormap_ends(tmp_path: Path) -> None:
    out = figures.temporal_matrix(np.eye(5), tmp_path / "m.png", colormap="viridis")
    pixels = read_png(out)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert has_colour(pixels, colormap_rgb("viridis", 1.0))
    assert has_colour(pixels, colormap_rgb("viridis", 0.0))
    assert not has_colour(pixels, colormap_rgb("magma", 0.5), tol=0)


def test_svg_output_is_valid_xml(tmp_path: Path) -> None:
    out = figures.text_attention(
        np.random.default_rng(0).random((4, 4)), tmp_path / "t.svg", labels=list("abcd")
    )
    root = ET.parse(out).getroot()
    assert root.tag.endswith("svg")
    assert "d" in out.read_text() and not list(tmp_path.glob(".*"))  # no temp file left behind


def test_temporal_comparison_and_locality_and_colorbar(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    series = {"kiss": rng.random((4, 3, 5, 6)), "flowers": rng.random((4, 3, 5, 6))}
    locality = rng.random((3, 4))
    paths = [
        figures.temporal_comparison(series, tmp_path / "cmp.png", steps=[0, 10, 20, 30], title="two words"),
        figures.head_locality(locality, tmp_path / "loc.png", blocks=[0, 5, 9]),
        figures.colorbar(tmp_path / "bar.png", colormap="hot", vmin=0.0, vmax=2.0),
    ]
    lines = read_png(paths[0])  # one line per word, in matplotlib's first two cycle colours
    for colour in ("#1f77b4", "#ff7f0e"):
        assert has_colour(lines, np.asarray(matplotlib.colors.to_rgb(colour)) * 255, tol=3), colour
    cells = read_png(paths[1])  # every block x head cell in magma's colour of its value
    for value in locality.reshape(-1):
        assert has_colour(cells, colormap_rgb("magma", float(value)), tol=3), value
    assert has_colour(read_png(paths[2]), colormap_rgb("hot", 1.0))


def test_rollout_frames_overlays_each_frame(tmp_path: Path) -> None:
    frames = np.zeros((6, 32, 48, 3), dtype=np.uint8)
    maps = np.zeros((6, 4, 6))
    maps[:, 1, 1] = 1.0
    out = figures.rollout_frames(frames, maps, tmp_path / "r.png", alpha=1.0, colormap="gray", max_frames=3)
    pixels = read_png(out)
    assert has_colour(pixels, np.array([255, 255, 255]))  # the hot cell, drawn at full opacity


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: figures.temporal_matrix(np.ones((2, 3)), p / "a.png"), "matrix must be square"),
        (lambda p: figures.temporal_matrix(np.eye(2), p / "a.jpg"), "path must end in .png or .svg"),
        (lambda p: figures.temporal_matrix(np.eye(2), p / "a.png", colormap="nope"), "colormap must be"),
        (lambda p: figures.temporal_comparison({}, p / "a.png"), "series must map at least one word"),
        (
            lambda p: figures.temporal_comparison({"a": np.ones((2, 3)), "b": np.ones((3, 3))}, p / "a.png"),
            "same number of steps",
        ),
        (lambda p: figures.text_attention(np.eye(3), p / "a.png", labels=["x"]), "labels must name the 3"),
        (
            lambda p: figures.rollout_frames(np.zeros((2, 4, 4, 3)), np.ones((2, 2, 2)), p / "a.png"),
            "frames must be uint8",
        ),
        (lambda p: figures.colorbar(p / "a.png", vmin=1.0, vmax=1.0), "vmin < vmax"),
    ],
)
def test_bad_input_names_the_argument(tmp_path: Path, call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        call(tmp_path)


_RNG = np.random.default_rng(3)
FIGURES = {
    "temporal_comparison": lambda p: figures.temporal_comparison(
        {"cat": _RNG.random((3, 2, 4, 4)), "dog": _RNG.random((3, 2, 4, 4))}, p, steps=[0, 1, 2]
    ),
    "temporal_matrix": lambda p: figures.temporal_matrix(_RNG.random((5, 5)), p),
    "text_attention": lambda p: figures.text_attention(_RNG.random((3, 3)), p, labels=["a", "cat", "b"]),
    "head_locality": lambda p: figures.head_locality(_RNG.random((2, 4)), p, blocks=[0, 1]),
    "rollout_frames": lambda p: figures.rollout_frames(
        _RNG.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8), _RNG.random((3, 4, 4)), p
    ),
    "colorbar": lambda p: figures.colorbar(p),
}


@pytest.mark.parametrize("fmt", ["png", "svg"])
@pytest.mark.parametrize("kind", sorted(FIGURES))
def test_every_figure_kind_writes_png_and_svg(tmp_path: Path, kind: str, fmt: str) -> None:
    out = FIGURES[kind](tmp_path / f"{kind}.{fmt}")
    assert out == tmp_path / f"{kind}.{fmt}"
    if fmt == "png":
        assert read_png(out).std() > 0  # a drawn image, not a blank canvas
    else:
        assert ET.parse(out).getroot().tag.endswith("svg")
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The figures drawn, kept instead of written."""
    figs: list[object] = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path, **kw: figs.append(fig) or Path(path))
    return figs


def test_frame_and_step_axes_have_integer_ticks(drawn: list[object], tmp_path: Path) -> None:
    figures.temporal_matrix(np.eye(3), tmp_path / "m.png")
    rng = np.random.default_rng(0)
    figures.temporal_comparison({"a": rng.random((4, 3, 2, 2))}, tmp_path / "c.png", steps=[0, 1, 2, 3])
    matrix, comparison = drawn
    ax = matrix.axes[0]  # type: ignore[attr-defined]
    assert list(ax.get_xticks()) == [0, 1, 2] and list(ax.get_yticks()) == [0, 1, 2]
    for axis in comparison.axes:  # type: ignore[attr-defined]
        ticks = [t for t in axis.get_xticks() if axis.get_xlim()[0] <= t <= axis.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_long_text_matrices_keep_legible_tick_labels(drawn: list[object], tmp_path: Path) -> None:
    words = [f"w{i}" for i in range(200)]
    figures.text_attention(np.random.default_rng(0).random((200, 200)), tmp_path / "t.png", labels=words)
    ax = drawn[0].axes[0]  # type: ignore[attr-defined]
    shown = [t.get_text() for t in ax.get_xticklabels()]
    assert len(shown) <= figures.MAX_TICK_LABELS and shown[:2] == ["w0", "w5"]


def test_drawing_a_figure_changes_no_matplotlib_state(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys, numpy as np;"
        "from attnmap.render import figures;"
        f"figures.temporal_matrix(np.eye(3), {str(tmp_path / 'm.png')!r});"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported';"
        "print('ok')"
    )
    env = {"PYTHONPATH": str(Path(figures.__file__).parents[2]), "PATH": "/usr/bin:/bin", "MPLBACKEND": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
