"""``attnmap-render``: heatmap videos, overlays, grids, still images, figures and the interactive HTML
report of an attention store, and the demo.

Commands are thin: they check their arguments and call :mod:`attnmap.render.videos`,
:mod:`attnmap.render.report` and :mod:`attnmap.demo`. Results (the paths written) go to stdout; one
progress display per command goes to stderr (bars on a terminal, plain lines otherwise); ``--quiet`` or
``ATTNMAP_QUIET=1`` turns it off. A warning prints as one ``Warning: ...`` line. An error prints one
``Error: ...`` line to stderr and exits 1 (``ATTNMAP_DEBUG=1`` shows the traceback instead); a render that
failed prints no path and makes the command exit 1.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from attnmap._checks import integer, number

RENDER_EXAMPLES = [
    "attnmap-render demo --output demo_out",
    "attnmap-render list outputs/attention_maps",
    "attnmap-render video --attention-dir outputs/attention_maps --video-id prompt_001_vid_001 "
    "--token kiss --output kiss_steps.mp4",
    "attnmap-render video --attention-dir outputs/attention_maps --video-id prompt_001_vid_001 --token kiss "
    "--use-aggregated --original-video outputs/videos/prompt_001_vid_001.mp4 --overlay-alpha 0.6 "
    "--threshold 0.5 --output kiss_overlay.mp4",
    "attnmap-render video --attention-dir outputs/attention_maps --video-id prompt_001_vid_001 --token all "
    "--grid --use-aggregated --output all_tokens.mp4",
    "attnmap-render figures --attention-dir outputs/attention_maps --video-id prompt_001_vid_001 "
    "--output figures/",
    "attnmap-render all outputs/attention_maps --output attention_videos/",
    "attnmap-render report outputs/attention_maps --output report.html",
    "attnmap-render still --attention-dir outputs/attention_maps --video-id prompt_001_vid_001 --token kiss "
    "--frame 40 --original-video outputs/videos/prompt_001_vid_001.mp4 --output kiss_40.png",
    "attnmap-render stats outputs/attention_maps --output stats/ --share 0.9 --window 3,7,7",
]


def _epilog(*picks: int) -> str:
    lines = [RENDER_EXAMPLES[i] for i in picks] if picks else RENDER_EXAMPLES
    # "\b" keeps click from re-wrapping the examples
    return "Examples:\n\n\b\n" + "\n".join(f"  $ {line}" for line in lines)


app = typer.Typer(
    name="attnmap-render",
    help="Render attention maps captured by attnmap: heatmap videos, overlays, token grids, still images, "
    "figures and an interactive HTML report.",
    epilog=_epilog(),
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class CLIError(Exception):
    """A user error the CLI reports as one line."""


def _show_version(value: bool) -> None:
    if value:
        import attnmap

        typer.echo(f"attnmap-render {attnmap.__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Render attention maps captured by attnmap."""


def _quiet(flag: bool) -> bool:
    return flag or os.environ.get("ATTNMAP_QUIET", "") not in ("", "0")


#: Option keys of the library whose errors the CLI names as the flag that set them.
_FLAGS = {
    "colormap", "fps", "overlay_alpha", "normalize", "vmin", "vmax", "threshold", "interpolation_steps",
    "video_format", "static_duration", "steps", "block", "head", "branch", "frame", "max_map_bytes", "output",
}  # fmt: skip


def _message(exc: BaseException) -> str:
    """One line for an error; a library message about an option key (``overlay_alpha: ...``) names the
    flag instead (``--overlay-alpha: ...``)."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    keys, sep, rest = text.partition(": ")
    names = [k.strip() for k in keys.split(",")]
    if sep and all(k in _FLAGS for k in names):
        return ", ".join("--" + k.replace("_", "-") for k in names) + ": " + rest
    return text


def _warning_line(
    message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    text = " ".join(str(message).split())
    print(f"Warning: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn the errors a user can cause into one ``Error:`` line and exit code 1, and every warning into
    one ``Warning:`` line."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _warning_line
        try:
            yield
        except (CLIError, ValueError, OSError, KeyError) as exc:
            if os.environ.get("ATTNMAP_DEBUG", "") not in ("", "0"):
                raise
            typer.echo(f"Error: {_message(exc)}", err=True)
            raise typer.Exit(1) from None


#: The most step numbers --steps may name (a range wider than this is a typo, not a selection).
MAX_STEPS = 1_000_000


def _steps(text: Optional[str]) -> Optional[list[int]]:
    """``"0,3,5"`` or ``"0-9"`` or ``"0-9,20"`` -> a sorted list of step numbers."""
    if text is None:
        return None
    out: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo < 0 or hi < lo:
                    raise CLIError(f"--steps: a range must run from low to high (>= 0), got {part!r}")
                if hi - lo + 1 + len(out) > MAX_STEPS:
                    raise CLIError(f"--steps: {part!r} names more than {MAX_STEPS} steps")
                out.update(range(lo, hi + 1))
            elif part:
                out.add(int(part))
    except ValueError:
        raise CLIError(f"--steps must be numbers and ranges like '0,5,10-20', got {text!r}") from None
    if not out:
        raise CLIError(f"--steps must name at least one step, got {text!r}")
    return sorted(out)


def _open(attention_dir: Path, video_id: Optional[str] = None, *, flag: str = "--attention-dir") -> Any:
    from attnmap.store import open_store

    if not attention_dir.is_dir():
        raise CLIError(f"{flag} {str(attention_dir)!r} is not a directory")
    store = open_store(attention_dir)
    videos = store.videos()
    if not videos:
        raise CLIError(f"{flag} {str(attention_dir)!r} holds no stored videos (is it an attnmap store?)")
    if video_id is not None:
        _stored(video_id, videos, attention_dir)
    return store


def _stored(video_id: str, videos: list[str], attention_dir: Path) -> None:
    """A clear error where ``video_id`` is not among the store's ``videos``."""
    if video_id not in videos:
        shown = ", ".join(videos[:10]) + (" ..." if len(videos) > 10 else "")
        raise CLIError(f"--video-id {video_id!r} is not in {str(attention_dir)!r}; it has: {shown}")


def _words(store: Any, video_id: str, token: list[str]) -> list[str]:
    stored = store.tokens(video_id)
    words = stored if token == ["all"] else list(dict.fromkeys(token))
    unknown = [w for w in words if w not in stored]
    if unknown:
        raise CLIError(
            f"--token {unknown[0]!r} is not stored for video {video_id!r}; it has: {', '.join(stored)}"
        )
    if not words:
        raise CLIError(f"video {video_id!r} has no token maps")
    return words


def _branch(value: Optional[str]) -> Optional[str]:
    if value is not None and value not in ("cond", "uncond"):
        raise CLIError(f"--branch must be cond or uncond, got {value!r}")
    return value


class _Printer:
    """Prints each finished path to stdout as one whole line (the render threads share it). While bars
    are drawn on the terminal that stdout also shows, the paths wait until the bars are gone, so that no
    path is glued to a bar."""

    def __init__(self, progress: Any) -> None:
        self.lock = threading.Lock()
        isatty = getattr(sys.stdout, "isatty", None)
        self.hold = bool(progress.live and callable(isatty) and isatty())
        self.pending: list[Path] = []

    def __call__(self, path: Path) -> None:
        with self.lock:
            if self.hold:
                self.pending.append(path)
            else:
                typer.echo(str(path))

    def flush(self) -> None:
        """Print the paths held back (call it once the progress display is closed)."""
        with self.lock:
            for path in self.pending:
                typer.echo(str(path))
            self.pending.clear()


# -- shared options -----------------------------------------------------------------------------------
AttentionDir = Annotated[Path, typer.Option(help="Store root (the attention_maps folder).")]
VideoId = Annotated[str, typer.Option(help="Video identifier inside the store.")]
Colormap = Annotated[str, typer.Option(help="Colormap (hot, jet, viridis, inferno, turbo, ...).")]
Fps = Annotated[
    Optional[float],
    typer.Option(
        help="Output frames per second (default: the original video's rate, else the metadata's, else 10)."
    ),
]
Alpha = Annotated[float, typer.Option(help="Heatmap opacity over the original video, 0.0-1.0.")]
Normalize = Annotated[
    str,
    typer.Option(
        help="global, frame, percentile (1-99), max, sum, none, or fixed (needs --vmin and --vmax)."
    ),
]
Vmin = Annotated[
    Optional[float], typer.Option(help="Attention value shown as the lowest colour (default: measured).")
]
Vmax = Annotated[
    Optional[float], typer.Option(help="Attention value shown as the highest colour (default: measured).")
]
Block = Annotated[
    Optional[int], typer.Option(help="One block's maps (stored with per_block; default: their mean).")
]
Head = Annotated[Optional[int], typer.Option(help="One head of per-head maps (default: their mean).")]
Branch = Annotated[
    Optional[str],
    typer.Option(help="cond or uncond guidance branch (default: the branch the video recorded)."),
]
VideoFormat = Annotated[
    str,
    typer.Option(help="Container of the files written when --output is a folder (a path without a suffix): "
                 "mp4, webm, gif, mkv or mov."),
]  # fmt: skip
Threshold = Annotated[
    Optional[float],
    typer.Option(help="Outline the mask where the normalised map >= this (0-1, both included)."),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]


def _options(**values: Any) -> Any:
    """The render options of the flags: every value is checked there, and its error names the flag."""
    from attnmap.render.options import RenderOptions

    return RenderOptions(**values)


@app.command("video", epilog=_epilog(2, 3, 4))
def video(
    attention_dir: AttentionDir,
    video_id: VideoId,
    output: Annotated[
        Path,
        typer.Option(
            help="Output video file; with several tokens and no --grid, an output folder (no suffix)."
        ),
    ],
    token: Annotated[
        list[str], typer.Option(help="Token word to render; repeat it for several, or 'all'.")
    ] = ["all"],  # noqa: B006
    original_video: Annotated[Optional[Path], typer.Option(help="Original video to overlay on.")] = None,
    overlay_alpha: Alpha = 0.6,
    use_aggregated: Annotated[
        bool, typer.Option(help="Step-aggregated map following the video's frames, instead of the steps.")
    ] = False,
    colormap: Colormap = "hot",
    fps: Fps = None,
    interpolation_steps: Annotated[int, typer.Option(help="Blended frames between steps.")] = 2,
    include_timestamp: Annotated[bool, typer.Option(help="Write each frame's time in its label.")] = False,
    video_format: VideoFormat = "mp4",
    normalize: Normalize = "global",
    vmin: Vmin = None,
    vmax: Vmax = None,
    threshold: Threshold = None,
    steps: Annotated[
        Optional[str], typer.Option(help="Steps to use, e.g. '0,5,10-20' (default all).")
    ] = None,
    block: Block = None,
    head: Head = None,
    branch: Branch = None,
    grid: Annotated[bool, typer.Option(help="Put the tokens side by side in one video.")] = False,
    colorbar: Annotated[bool, typer.Option(help="Draw a colour bar with ticks.")] = True,
    labels: Annotated[bool, typer.Option(help="Draw the token, step and time.")] = True,
    quiet: Quiet = False,
) -> None:
    """Render tokens of one stored video: the step evolution (default) or the aggregated map (--use-aggregated),
    as heatmaps or overlays on the original video, one file per token or a grid."""
    import attnmap.render.videos as videos
    from attnmap.render.progress import Progress

    with _errors():
        options = _options(
            colormap=colormap,
            fps=fps,
            overlay_alpha=overlay_alpha,
            normalize=normalize,
            vmin=vmin,
            vmax=vmax,
            threshold=threshold,
            interpolation_steps=interpolation_steps,
            include_colorbar=colorbar,
            labels=labels,
            include_timestamp=include_timestamp,
            video_format=video_format,
        )
        if original_video is not None and not original_video.is_file():
            raise CLIError(f"--original-video {str(original_video)!r} does not exist")
        store = _open(attention_dir, video_id)
        words = _words(store, video_id, token)
        mode = "aggregated" if use_aggregated else "steps"
        common: dict[str, Any] = {
            "options": options,
            "mode": mode,
            "steps": _steps(steps),
            "original_video": original_video,
            "block": block,
            "head": head,
            "branch": _branch(branch),
        }
        if grid or (len(words) == 1 and output.suffix):
            with Progress(enabled=not _quiet(quiet)) as progress:
                if grid:
                    path = videos.render_grid(store, video_id, words, output, progress=progress, **common)
                else:
                    path = videos.render_token(store, video_id, words[0], output, progress=progress, **common)
            typer.echo(path)
            return
        if output.suffix:
            raise CLIError(
                f"--output must be a folder (no suffix) when rendering {len(words)} tokens without --grid"
            )
        failed = []
        with Progress(enabled=not _quiet(quiet)) as progress:
            printer = _Printer(progress)
            for word in words:
                path = videos.output_path(
                    output, video_id, word, _kind(original_video, mode), options.video_format
                )
                try:
                    printer(videos.render_token(store, video_id, word, path, progress=progress, **common))
                except (ValueError, OSError, KeyError) as exc:
                    failed.append(f"{word}: {_message(exc)}")
        printer.flush()
        if failed:
            raise CLIError(f"{len(failed)} of {len(words)} renders failed; " + "; ".join(failed))


def _kind(original_video: Optional[Path], mode: str) -> str:
    return "overlay" if original_video is not None else ("attention" if mode == "aggregated" else "steps")


@app.command("still", epilog=_epilog(8))
def still(
    attention_dir: AttentionDir,
    video_id: VideoId,
    token: Annotated[str, typer.Option(help="Token word to draw.")],
    output: Annotated[Path, typer.Option(help="Output image (.png).")],
    frame: Annotated[
        str,
        typer.Option(help="Output frame of the aggregated video to draw, or 'mean' (the mean over frames)."),
    ] = "mean",
    original_video: Annotated[
        Optional[Path],
        typer.Option(help="Original video to overlay on (default: the metadata's video.path)."),
    ] = None,
    overlay_alpha: Alpha = 0.6,
    colormap: Colormap = "hot",
    normalize: Normalize = "global",
    vmin: Vmin = None,
    vmax: Vmax = None,
    threshold: Threshold = None,
    steps: Annotated[
        Optional[str], typer.Option(help="Steps to average (default: the aggregated map).")
    ] = None,
    block: Block = None,
    head: Head = None,
    branch: Branch = None,
) -> None:
    """Draw one still overlay image of a token (as DAAM's plot_overlay does for images): one frame of its
    aggregated video, or its mean over frames over the original's middle frame, with label and colour bar."""
    import attnmap.render.videos as videos

    with _errors():
        options = _options(
            colormap=colormap,
            overlay_alpha=overlay_alpha,
            normalize=normalize,
            vmin=vmin,
            vmax=vmax,
            threshold=threshold,
        )
        store = _open(attention_dir, video_id)
        word = _words(store, video_id, [token])[0]
        if frame == "mean":
            index: Optional[int] = None
        else:
            try:
                index = int(frame)
            except ValueError:
                raise CLIError(f"--frame must be a frame number or 'mean', got {frame!r}") from None
        original = original_video if original_video is not None else videos.known_original(store, video_id)
        if original is not None and not Path(original).is_file():
            raise CLIError(f"--original-video {str(original)!r} does not exist")
        path = videos.render_still(
            store, video_id, word, output, frame=index, options=options, steps=_steps(steps),
            original_video=original, block=block, head=head, branch=_branch(branch),
        )  # fmt: skip
        typer.echo(path)


@app.command("all", epilog=_epilog(6))
def render_all(
    attention_dir: Annotated[Path, typer.Argument(help="Store root (the attention_maps folder).")],
    output: Annotated[
        Optional[Path], typer.Option(help="Output folder (default: attention_videos next to the store).")
    ] = None,
    colormap: Colormap = "hot",
    fps: Fps = None,
    overlay_alpha: Alpha = 0.6,
    normalize: Normalize = "global",
    vmin: Vmin = None,
    vmax: Vmax = None,
    video_format: Annotated[str, typer.Option(help="Container: mp4, webm, gif, mkv or mov.")] = "mp4",
    quiet: Quiet = False,
) -> None:
    """Render every video and token of a store: <video_id>_<token>_attention.mp4 (the aggregated map following
    the video's frames) and _overlay.mp4 when the store knows the original video. Names that the file system
    cannot hold as they are, or that could be read two ways, end in a hash of the exact video id and token.
    Every finished file is printed; a failed render prints an error and the command exits 1."""
    import attnmap.render.videos as videos
    from attnmap.render.progress import Progress

    with _errors():
        store = _open(attention_dir, flag="ATTENTION_DIR")
        params = _options(
            colormap=colormap, fps=fps, overlay_alpha=overlay_alpha, normalize=normalize, vmin=vmin, vmax=vmax,
            video_format=video_format,
        )  # fmt: skip
        target = output if output is not None else attention_dir.resolve().parent / "attention_videos"
        failed = []
        with Progress(enabled=not _quiet(quiet)) as progress:
            printer = _Printer(progress)
            for video_id in store.videos():
                try:
                    videos.render_video(
                        attention_dir, video_id, target, params, progress=progress, on_done=printer
                    )
                except (ValueError, OSError, KeyError) as exc:
                    failed.append(f"video {video_id!r}: {_message(exc)}")
        printer.flush()
        if failed:
            raise CLIError(
                f"{len(failed)} of {len(store.videos())} videos failed to render; " + "; ".join(failed)
            )


@app.command("report", epilog=_epilog(7))
def report_cmd(
    attention_dir: Annotated[Path, typer.Argument(help="Store root (the attention_maps folder).")],
    output: Annotated[Path, typer.Option(help="Output page (.html).")] = Path("report.html"),
    video_id: Annotated[
        Optional[list[str]], typer.Option(help="Video to show; repeat it for several (default: every video).")
    ] = None,
    colormap: Annotated[str, typer.Option(help="The page's first colormap.")] = "hot",
    normalize: Annotated[
        str, typer.Option(help="The page's first normalisation (global, frame, percentile, ...).")
    ] = "global",
    overlay_alpha: Annotated[float, typer.Option(help="The page's first overlay opacity, 0.0-1.0.")] = 0.6,
    vmin: Vmin = None,
    vmax: Vmax = None,
    max_mb: Annotated[
        float,
        typer.Option(
            help="Megabytes of token maps per video the page may carry (per-step, per-block and "
            "per-head maps beyond it are left out, and the page says so)."
        ),
    ] = 12.0,
    original: Annotated[bool, typer.Option(help="Embed the original video's frames for the overlay.")] = True,
) -> None:
    """Write one self-contained HTML page (no server, nothing fetched) to explore a store's maps: token, step,
    block and head, a frame scrubber with play, the overlay on the original video, colormap and normalisation,
    the frame-to-frame matrix, the text self-attention, head locality and attention statistics."""
    from attnmap.render import report

    with _errors():
        store = _open(attention_dir, flag="ATTENTION_DIR")
        stored = store.videos()
        for vid in video_id or []:
            _stored(vid, stored, attention_dir)
        max_mb = number("--max-mb", max_mb, low=0)
        options = _options(
            colormap=colormap, normalize=normalize, overlay_alpha=overlay_alpha, vmin=vmin, vmax=vmax
        )
        if output.suffix.lower() not in (".html", ".htm"):
            raise CLIError(f"--output must end in .html, got {str(output)!r}")
        path = report.write_report(
            store,
            output,
            video_ids=video_id,
            options=options,
            max_map_bytes=int(max_mb * 1e6),
            background=original,
        )
        typer.echo(path)


@app.command("list", epilog=_epilog(1))
def list_videos(
    attention_dir: Annotated[Path, typer.Argument(help="Store root (the attention_maps folder).")],
) -> None:
    """List the stored videos with their steps and tokens."""
    with _errors():
        store = _open(attention_dir, flag="ATTENTION_DIR")
        for video_id in store.videos():
            steps = store.steps(video_id)
            span = f"{steps[0]}..{steps[-1]}" if steps else "none"
            typer.echo(
                f"{video_id}\tsteps {span} ({len(steps)})\ttokens: {', '.join(store.tokens(video_id))}"
            )


@app.command("figures", epilog=_epilog(5))
def figures_cmd(
    attention_dir: AttentionDir,
    video_id: VideoId,
    output: Annotated[Path, typer.Option(help="Output folder.")],
    fmt: Annotated[str, typer.Option("--format", help="png or svg.")] = "png",
    token: Annotated[Optional[list[str]], typer.Option(help="Tokens to compare (default all).")] = None,
) -> None:
    """Draw the figures of one video: tokens over steps and frames, the F x F temporal matrix, the text
    self-attention of the real (unpadded) tokens and the per-head temporal locality (those whose maps are
    stored)."""
    import attnmap.render.videos as videos

    with _errors():
        if fmt not in ("png", "svg"):
            raise CLIError(f"--format must be png or svg, got {fmt!r}")
        store = _open(attention_dir, video_id)
        for path in videos.render_figures(store, video_id, output, fmt=fmt, tokens=token):
            typer.echo(path)


@app.command("demo", epilog=_epilog(0))
def demo_cmd(
    output: Annotated[Path, typer.Option(help="Output folder for the store, videos and figures.")] = Path(
        "demo_out"
    ),
    wan: Annotated[bool, typer.Option(help="Also run the tiny random Wan transformer under capture.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Run the demo with nothing downloaded: moving coloured shapes, a small attention model whose words
    attend to their shapes (through torch's SDPA, under attnmap.capture), the store, overlays, a grid,
    figures and the IoU of each word's mask with its true shape; then a tiny random Wan transformer."""
    import attnmap.demo as demo

    with _errors():
        summary = demo.run(output, quiet=_quiet(quiet), log=typer.echo, wan=wan)
        if not summary["passed"]:
            raise CLIError(f"the demo's IoU check failed: {summary['iou']} (need >= {demo.IOU_TARGET})")


def _usage_message(exc: Any) -> str:
    """A command-line parsing error's message (click's, or the click typer carries), with a missing
    parameter named as the user types it: ``--attention-dir``, or ``ATTENTION_DIR`` for an argument."""
    param = getattr(exc, "param", None)
    if type(exc).__name__ == "MissingParameter" and param is not None:
        if getattr(param, "param_type_name", "") == "option" and getattr(param, "opts", None):
            return f"Missing option {' / '.join(param.opts)}"
        return f"Missing argument {str(getattr(param, 'name', '') or '').upper()}"
    return str(exc.format_message())


def _window_option(text: Optional[str]) -> Optional[tuple[int, int, int]]:
    """``"3,7,7"`` -> (3, 7, 7)."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise CLIError(f"--window must be three positive ints t,h,w such as '3,7,7', got {text!r}")
    return values[0], values[1], values[2]


@app.command("stats", epilog=_epilog(9))
def stats_cmd(
    attention_dir: Annotated[Path, typer.Argument(help="Store root (the attention_maps folder).")],
    output: Annotated[Path, typer.Option(help="Output folder for the figures and the JSON summaries.")],
    video_id: Annotated[
        Optional[list[str]], typer.Option(help="Video to summarise; repeat it for several (default all).")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="png or svg.")] = "png",
    share: Annotated[
        float, typer.Option(help="Share of mass the smallest window must keep, in (0, 1].")
    ] = 0.9,
    window: Annotated[
        Optional[str],
        typer.Option(help="Window t,h,w (odd extents around the query) whose coverage is mapped."),
    ] = None,
    top_k: Annotated[int, typer.Option(help="Sink keys listed per head.")] = 5,
) -> None:
    """Summarise the attention statistics of stored videos for sparse-attention design: energy decay by
    offset per head, block-sparse recall curves, a window-coverage map per block and head, and
    <video>_stats.json (head classes, smallest windows, sink keys, entropy)."""
    import attnmap.render.stats as render_stats

    with _errors():
        if fmt not in ("png", "svg"):
            raise CLIError(f"--format must be png or svg, got {fmt!r}")
        number("--share", share, low=0.0, high=1.0, open_low=True)
        integer("--top-k", top_k, low=1)
        size = _window_option(window)
        store = _open(attention_dir, flag="ATTENTION_DIR")
        stored = store.videos()
        videos = list(dict.fromkeys(video_id)) if video_id else stored
        for vid in videos:
            _stored(vid, stored, attention_dir)  # names the video when it is not stored
            for path in render_stats.render_stats(
                store, vid, output, fmt=fmt, share=share, window=size, k=top_k
            ):
                typer.echo(path)


def main(argv: Optional[list[str]] = None) -> None:
    """The console script: run the app, report any error as one ``Error: ...`` line and exit 1."""
    command = typer.main.get_command(app)
    debug = os.environ.get("ATTNMAP_DEBUG", "") not in ("", "0")
    try:
        code = command.main(args=argv, prog_name="attnmap-render", standalone_mode=False)
    except Exception as exc:  # click's exceptions, or those of the click typer carries: told apart by name
        kind = type(exc).__name__
        if kind == "Exit":
            code = getattr(exc, "exit_code", 1)
        elif kind == "Abort":
            typer.echo("Error: aborted", err=True)
            code = 1
        elif debug:
            raise
        else:
            text = _usage_message(exc) if callable(getattr(exc, "format_message", None)) else _message(exc)
            typer.echo(f"Error: {text}", err=True)
            code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
