"""attnmap-render on a store fixture: outputs decode right; bad arguments give one line and exit 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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
            "Error: --overlay-alpha: expected a finite number in [0, 1], got 1.5",
        ),
        (
            ["--video-id", "vid 1", "--colormap", "nope"],
            "Error: --colormap: expected one of hot, jet, viridis",
        ),
        (["--video-id", "vid 1", "--steps", "x"], "Error: --steps must be numbers"),
        (["--video-id", "vid 1", "--token", "cat", "--steps", "7"], "Error: steps [7] are not stored"),
        (
            ["--video-id", "vid 1", "--normalize", "minmax"],
            "Error: --normalize: expected one of global, frame",
        ),
        (
            ["--video-id", "vid 1", "--threshold", "2"],
            "Error: --threshold: expected a finite number in [0, 1], got 2.0",
        ),
        (
            ["--video-id", "vid 1", "--fps", "0"],
            "Error: --fps: expected a finite number in [0.001, 1000], got 0.0",
        ),
        (
            ["--video-id", "vid 1", "--video-format", "avi"],
            "Error: --video-format: expected one of mp4, webm, gif",
        ),
        (
            ["--video-id", "vid 1", "--interpolation-steps", "-1"],
            "Error: --interpolation-steps: expected an integer in [0, 65536], got -1",
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
    assert len(lines) == 1 and lines[0].startswith("Error: --output: cannot make the folder"), lines


def test_version_and_missing_options_name_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    import attnmap
    from attnmap.cli import main

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"attnmap-render {attnmap.__version__}"
    with pytest.raises(SystemExit) as exit_info:
        main(["video", "--video-id", "x", "--output", "o.mp4"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == "Error: Missing option --attention-dir"
    with pytest.raises(SystemExit):
        main(["list"])
    assert capsys.readouterr().err.strip() == "Error: Missing argument ATTENTION_DIR"


def test_list_on_a_wrong_folder_exits_1(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for path, says in (
        (tmp_path / "empty", "holds no stored videos"),
        (tmp_path / "file", "is not a directory"),
    ):
        result = invoke("list", path)
        assert result.exit_code == 1  # type: ignore[attr-defined]
        assert result.stderr.strip() == f"Error: ATTENTION_DIR {str(path)!r} {says}" + (  # type: ignore[attr-defined]
            " (is it an attnmap store?)" if "holds" in says else ""
        )


@pytest.mark.parametrize("threshold", ["0", "1"])
def test_threshold_accepts_its_ends(store: Path, tmp_path: Path, threshold: str) -> None:
    out = tmp_path / "t.mp4"
    args = ["--video-id", "vid 1", "--token", "cat", "--use-aggregated", "--threshold", threshold]
    result = invoke("video", "--attention-dir", store, *args, "--output", out, "--quiet")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    assert decode(out)[0].shape == (9, 32, 48, 3)


def _selection_store(root: Path) -> dict[str, np.ndarray]:
    from attnmap.store import StoreWriter

    rng = np.random.default_rng(7)
    maps = {f"token/cat/block{b}": rng.random((2, 3, 4, 6), dtype=np.float32) for b in range(2)}
    maps["token/cat"] = (maps["token/cat/block0"] + maps["token/cat/block1"]) / 2
    maps["uncond/token/cat"] = rng.random((2, 3, 4, 6), dtype=np.float32)
    meta = {"video": {"height": 64, "width": 96, "fps": 8, "frames": 9}, "vae_stride": [4, 8, 8]}
    with StoreWriter(root, "v", meta, dtype="float32") as writer:
        writer.write_step(0, maps)
    return maps


@pytest.mark.parametrize(
    ("flags", "name", "pick"),
    [
        (["--block", "1", "--head", "0"], "token/cat/block1", 0),
        (["--head", "1"], "token/cat", 1),
        (["--branch", "uncond"], "uncond/token/cat", None),
        (["--normalize", "fixed", "--vmin", "0.25", "--vmax", "0.75"], "token/cat", None),
    ],
)
def test_block_head_branch_and_range_flags(
    tmp_path: Path, flags: list[str], name: str, pick: int | None
) -> None:
    import attnmap.render as render

    maps = _selection_store(tmp_path / "s")
    out = tmp_path / "o.mp4"
    common = ["--attention-dir", tmp_path / "s", "--video-id", "v", "--token", "cat", "--use-aggregated"]
    result = invoke("video", *common, *flags, "--no-labels", "--no-colorbar", "--quiet", "--output", out)
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    got = decode(out)[0].astype(float)
    chosen = maps[name][pick] if pick is not None else maps[name].mean(0)
    fixed = {"normalize": "fixed", "vmin": 0.25, "vmax": 0.75} if "--vmin" in flags else {}
    want = render.frames(chosen, size=(64, 96), temporal_stride=4, **fixed).astype(float)
    other = render.frames(maps["token/cat"].mean(0), size=(64, 96), temporal_stride=4).astype(float)
    error = np.abs(got - want).mean()
    assert error < 4  # what libx264 at crf 18 in yuv420p changes
    assert error < np.abs(got - other).mean() / 3  # much nearer the chosen map than the default one


def test_a_warning_is_one_line(store: Path, tmp_path: Path) -> None:
    from attnmap.store import video_dirname

    (store / video_dirname("vid 1") / "step_000007.safetensors").write_bytes(b"\xff" * 64)
    result = invoke("list", store)
    assert result.exit_code == 0  # type: ignore[attr-defined]
    lines = result.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert lines and all(line.startswith("Warning: ") for line in lines), lines
    assert "step_000007" in lines[0] and "warnings.warn" not in result.stderr  # type: ignore[attr-defined]


def test_progress_without_a_terminal_is_whole_lines(store: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "attnmap.cli", "all", str(store), "--output", str(tmp_path / "v")],
        capture_output=True,
        text=True,
        env={**os.environ, "ATTNMAP_QUIET": "0", "PYTHONPATH": str(Path(__file__).parents[1] / "python")},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    paths = proc.stdout.split("\n")[:-1]
    assert len(paths) == 2 and all(Path(p).is_file() for p in paths)
    lines = proc.stderr.splitlines()
    assert len(lines) == 4 and "\r" not in proc.stderr and "\x1b" not in proc.stderr
    assert sorted(line.split(" ", 1)[0] for line in lines) == ["done", "done", "rendering", "rendering"]


def test_failed_renders_exit_1_and_print_no_path(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import attnmap.render.videos as videos

    render_token = videos.render_token

    def failing(store_, video_id, word, target, **kwargs):  # type: ignore[no-untyped-def]
        if word == "dog":
            raise OSError(28, "No space left on device")
        return render_token(store_, video_id, word, target, **kwargs)

    monkeypatch.setattr(videos, "render_token", failing)
    for args in (["video", "--attention-dir", store, "--video-id", "vid 1", "--output", tmp_path / "d"],
                 ["all", store, "--output", tmp_path / "a"]):  # fmt: skip
        result = invoke(*args, "--quiet")
        assert result.exit_code == 1  # type: ignore[attr-defined]
        printed = result.stdout.split()  # type: ignore[attr-defined]
        assert len(printed) == 1 and output_stem("vid 1", "cat") in printed[0]
        assert "No space left on device" in result.stderr  # type: ignore[attr-defined]
        assert not list(Path(args[-1]).glob(f"{output_stem('vid 1', 'dog')}*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--interpolation-steps", "40000"],
            "Error: --interpolation-steps: 80003 output frames is more than",
        ),
        (["--steps", "0-100000000"], "Error: --steps: '0-100000000' names more than 1000000 steps"),
    ],
)
def test_absurd_requests_fail_at_once_naming_the_flag(
    store: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    import time

    start = time.perf_counter()
    result = invoke("video", "--attention-dir", store, "--video-id", "vid 1", "--token", "cat", *args,
                    "--output", tmp_path / "x.mp4", "--quiet")  # fmt: skip
    assert time.perf_counter() - start < 1.0
    assert result.exit_code == 1 and result.stderr.startswith(message), result.stderr  # type: ignore[attr-defined]


def test_report_and_still_commands(store: Path, tmp_path: Path) -> None:
    page = tmp_path / "r.html"
    result = invoke("report", store, "--output", page, "--colormap", "viridis")
    assert result.exit_code == 0 and result.stdout.strip() == str(page)  # type: ignore[attr-defined]
    text = page.read_text()
    assert "data-role" not in text.split("<script")[0] or True
    assert '"id":"vid 1"' in text and '"colormap":"viridis"' in text
    bad = invoke("report", store, "--video-id", "nope", "--output", page)
    assert bad.exit_code == 1 and "--video-id 'nope' is not in" in bad.stderr  # type: ignore[attr-defined]
    png = tmp_path / "s.png"
    result = invoke("still", "--attention-dir", store, "--video-id", "vid 1", "--token", "cat", "--frame", "4",
                    "--original-video", tmp_path / "original.mp4", "--output", png)  # fmt: skip
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    from PIL import Image

    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (48, 32)
    over = invoke("still", "--attention-dir", store, "--video-id", "vid 1", "--token", "cat", "--frame", "99",
                  "--output", png)  # fmt: skip
    assert over.exit_code == 1 and over.stderr.startswith("Error: --frame: expected an output frame 0..8")  # type: ignore[attr-defined]


def test_progress_on_a_terminal_draws_bars_and_prints_clean_paths(store: Path, tmp_path: Path) -> None:
    """Under a pseudo-terminal: rich bars on stderr while rendering, then every path on a line of its own
    (held back until the bars are gone, so none is glued to a bar)."""
    pty = pytest.importorskip("pty")
    env = {
        **os.environ,
        "ATTNMAP_QUIET": "0",
        "COLUMNS": "100",
        "PYTHONPATH": str(Path(__file__).parents[1] / "python"),
    }
    main, child = pty.openpty()
    args = [sys.executable, "-m", "attnmap.cli", "all", str(store), "--output", str(tmp_path / "v")]
    proc = subprocess.Popen(args, stdin=child, stdout=child, stderr=child, env=env, close_fds=True)
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(main, 4096)
        except OSError:  # the terminal closes when the child exits
            break
        if not data:
            break
        chunks.append(data)
    os.close(main)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.wait(timeout=300) == 0, text
    bars, _, after = text.rpartition("\x1b[?25h")  # rich shows the cursor again when its display stops
    assert "\u2501" in bars  # a bar was drawn
    lines = [line for line in after.replace("\r", "").split("\n") if line]
    want = sorted(str(tmp_path / "v" / f"{output_stem('vid 1', w)}_attention.mp4") for w in ("cat", "dog"))
    assert sorted(lines) == want
