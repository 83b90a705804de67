"""attnmap-render on a store fixture: outputs decode right; bad arguments give one line and exit 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attnmap.cli import RENDER_EXAMPLES, app
from attnmap.render.videos import output_stem
from render_builders import decode, make_original, make_store

runner = CliRunner()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    make_original(tmp_path / "original.mp4")
    return make_store(tmp_path / "attention_maps")


def invoke(*args: str) -> object:
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_examples() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for example in RENDER_EXAMPLES:
        assert example.split(" --")[0] in result.output
    for command in ("video", "all", "list", "figures", "demo"):
        sub = runner.invoke(app, [command, "--help"])
        assert sub.exit_code == 0 and "Examples:" in sub.output and "$ attnmap-render" in sub.output


def test_video_overlay_aggregated(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "cat_overlay.mp4"
    result = runner.invoke(
        app,
        [
            "video",
            "--attention-dir",
            str(store),
            "--video-id",
            "vid 1",
            "--token",
            "cat",
            "--use-aggregated",
            "--original-video",
            str(tmp_path / "original.mp4"),
            "--overlay-alpha",
            "0.5",
            "--threshold",
            "0.5",
            "--fps",
            "6",
            "--quiet",
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    frames, fps = decode(out)
    assert frames.shape == (9, 32, 48, 3) and fps == 6


def test_video_steps_folder_and_grid(store: Path, tmp_path: Path) -> None:
    base = ["video", "--attention-dir", str(store), "--video-id", "vid 1", "--quiet"]
    result = runner.invoke(
        app,
        [
            *base,
            "--output",
            str(tmp_path / "dir"),
            "--interpolation-steps",
            "1",
            "--video-format",
            "gif",
            "--steps",
            "0-1",
        ],
    )
    assert result.exit_code == 0, result.output
    paths = [Path(p) for p in result.stdout.split()]
    stems = [output_stem("vid 1", w) for w in ("cat", "dog")]
    assert [p.name for p in paths] == [f"{s}_steps.gif" for s in stems]
    assert decode(paths[0])[0].shape[0] == 2 + 1
    result = runner.invoke(
        app,
        [
            *base,
            "--token",
            "cat",
            "--token",
            "dog",
            "--grid",
            "--use-aggregated",
            "--output",
            str(tmp_path / "grid.webm"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert decode(tmp_path / "grid.webm")[0].shape == (9, 32, 96, 3)


def test_all_list_and_figures(store: Path, tmp_path: Path) -> None:
    result = invoke("all", store, "--output", tmp_path / "videos", "--quiet")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    names = sorted(Path(p).name for p in result.stdout.split())  # type: ignore[attr-defined]
    assert names == [f"{output_stem('vid 1', w)}_attention.mp4" for w in ("cat", "dog")]
    listing = invoke("list", store)
    assert "vid 1\tsteps 0..2 (3)\ttokens: cat, dog" in listing.stdout  # type: ignore[attr-defined]
    figs = invoke(
        "figures",
        "--attention-dir",
        store,
        "--video-id",
        "vid 1",
        "--output",
        tmp_path / "f",
        "--format",
        "svg",
    )
    assert figs.exit_code == 0  # type: ignore[attr-defined]
    assert len(list((tmp_path / "f").glob("*.svg"))) == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--video-id", "nope", "--token", "cat"], "Error: --video-id 'nope' is not in"),
        (["--video-id", "vid 1", "--token", "bird"], "Error: --token 'bird' is not stored for video 'vid 1'"),
        (
            ["--video-id", "vid 1", "--original-video", "missing.mp4"],
            "Error: --original-video 'missing.mp4' does",
        ),
        (
            ["--video-id", "vid 1", "--overlay-alpha", "1.5"],
            "Error: --overlay-alpha: expected a number <= 1.0, got 1.5",
        ),
        (["--video-id", "vid 1", "--colormap", "nope"], "Error: --colormap 'nope' is unknown; valid names:"),
        (["--video-id", "vid 1", "--steps", "x"], "Error: --steps must be numbers"),
        (["--video-id", "vid 1", "--token", "cat", "--steps", "7"], "Error: steps [7] are not stored"),
        (
            ["--video-id", "vid 1", "--normalize", "minmax"],
            "Error: --normalize: expected one of global, frame",
        ),
        (
            ["--video-id", "vid 1", "--threshold", "2"],
            "Error: --threshold: expected a number <= 1.0, got 2.0",
        ),
        (["--video-id", "vid 1", "--fps", "0"], "Error: --fps: expected a number > 0.0, got 0.0"),
        (
            ["--video-id", "vid 1", "--video-format", "avi"],
            "Error: --video-format: expected one of mp4, webm, gif",
        ),
        (
            ["--video-id", "vid 1", "--interpolation-steps", "-1"],
            "Error: --interpolation-steps: expected an integer >= 0",
        ),
    ],
)
def test_bad_arguments_one_line(store: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(
        app, ["video", "--attention-dir", str(store), *args, "--output", str(tmp_path / "o.mp4"), "--quiet"]
    )
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert not (tmp_path / "o.mp4").exists()


def test_console_script_error_has_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "ATTNMAP_DEBUG": "0"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "attnmap.cli",
            "video",
            "--attention-dir",
            str(tmp_path / "missing"),
            "--video-id",
            "v",
            "--output",
            "o.mp4",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"Error: --attention-dir {str(tmp_path / 'missing')!r} is not a directory"
    unknown = subprocess.run(
        [sys.executable, "-m", "attnmap", "video", "--bogus"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert unknown.returncode != 0 and "Traceback" not in unknown.stderr
    assert unknown.stderr.strip().splitlines() == ["Error: No such option: --bogus"]


def test_unmakeable_output_folder_is_one_line(store: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "sub" / "cat.mp4"
    result = invoke(
        "video", "--attention-dir", store, "--video-id", "vid 1", "--token", "cat", "--output", out
    )
    assert result.exit_code == 1  # type: ignore[attr-defined]
    lines = result.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("Error: output: cannot make the folder"), lines
