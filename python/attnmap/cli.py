"""``attnmap-render``: heatmap videos, overlays, grids and figures from an attention store, and the demo.

Commands are thin: they check their arguments and call :mod:`attnmap.autorender`, :mod:`attnmap.figures`
and :mod:`attnmap.demo`. Results (the paths written) go to stdout, progress to stderr; ``--quiet`` or
``ATTNMAP_QUIET=1`` turns progress off. An error prints one ``Error: ...`` line to stderr and exits 1
(``ATTNMAP_DEBUG=1`` shows the traceback instead).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer

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
    "attnmap-render stats outputs/attention_maps --output stats/ --share 0.9 --window 3,7,7",
]


def _epilog(*picks: int) -> str:
    lines = [RENDER_EXAMPLES[i] for i in picks] if picks else RENDER_EXAMPLES
    # "\b" keeps click from re-wrapping the examples
    return "Examples:\n\n\b\n" + "\n".join(f"  $ {line}" for line in lines)


app = typer.Typer(
    name="attnmap-render",
    help="Render attention maps captured by attnmap: heatmap videos, overlays, token grids and figures.",
    epilog=_epilog(),
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class CLIError(Exception):
    """A user error the CLI reports as one line."""


def _quiet(flag: bool) -> bool:
    return flag or os.environ.get("ATTNMAP_QUIET", "") not in ("", "0")


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn the errors a user can cause into one ``Error:`` line and exit code 1."""
    try:
        yield
    except (CLIError, ValueError, OSError, KeyError) as exc:
        if os.environ.get("ATTNMAP_DEBUG", "") not in ("", "0"):
            raise
        typer.echo(f"Error: {_message(exc)}", err=True)
        raise typer.Exit(1) from None


def _steps(text: Optional[str]) -> Optional[list[int]]:
    """``"0,3,5"`` or ``"0-9"`` or ``"0-9,20"`` -> a sorted list of step numbers."""
    if text is None:
        return None
    out: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-", 1)
                out.update(range(int(lo), int(hi) + 1))
            elif part:
                out.add(int(part))
    except ValueError:
        raise CLIError(f"--steps must be numbers and ranges like '0,5,10-20', got {text!r}") from None
    if not out:
        raise CLIError(f"--steps must name at least one step, got {text!r}")
    return sorted(out)


def _open(attention_dir: Path, video_id: Optional[str] = None) -> Any:
    from attnmap.store import open_store

    if not attention_dir.is_dir():
        raise CLIError(f"--attention-dir {str(attention_dir)!r} is not a directory")
    store = open_store(attention_dir)
    if video_id is not None and video_id not in store.videos():
        videos = store.videos()
        shown = ", ".join(videos[:10]) + (" ..." if len(videos) > 10 else "")
        raise CLIError(
            f"--video-id {video_id!r} is not in {str(attention_dir)!r}; it has: {shown or 'no videos'}"
        )
    return store


@app.command("video", epilog=_epilog(2, 3, 4))
def video(
    attention_dir: Annotated[Path, typer.Option(help="Store root (the attention_maps folder).")],
    video_id: Annotated[str, typer.Option(help="Video identifier inside the store.")],
    output: Annotated[
        Path, typer.Option(help="Output video file; with several tokens and no --grid, an output folder.")
    ],
    token: Annotated[
        list[str], typer.Option(help="Token word to render; repeat it for several, or 'all'.")
    ] = ["all"],  # noqa: B006
    original_video: Annotated[Optional[Path], typer.Option(help="Original video to overlay on.")] = None,
    overlay_alpha: Annotated[float, typer.Option(help="Heatmap opacity on the overlay, 0.0-1.0.")] = 0.6,
    use_aggregated: Annotated[
        bool, typer.Option(help="Step-aggregated map following the video's frames, instead of the steps.")
    ] = False,
    colormap: Annotated[str, typer.Option(help="Colormap (hot, jet, viridis, inferno, turbo, ...).")] = "hot",
    fps: Annotated[
        Optional[float], typer.Option(help="Output frames per second (default: the original video's rate).")
    ] = None,
    interpolation_steps: Annotated[int, typer.Option(help="Blended frames between steps.")] = 2,
    include_timestamp: Annotated[bool, typer.Option(help="Write each frame's time in its label.")] = False,
    video_format: Annotated[str, typer.Option(help="mp4, webm or gif, when --output has no suffix.")] = "mp4",
    normalize: Annotated[str, typer.Option(help="global, frame or percentile (1-99).")] = "global",
    threshold: Annotated[
        Optional[float], typer.Option(help="Outline the mask where the normalised map >= this (0-1).")
    ] = None,
    steps: Annotated[
        Optional[str], typer.Option(help="Steps to use, e.g. '0,5,10-20' (default all).")
    ] = None,
    grid: Annotated[bool, typer.Option(help="Put the tokens side by side in one video.")] = False,
    colorbar: Annotated[bool, typer.Option(help="Draw a colour bar.")] = True,
    labels: Annotated[bool, typer.Option(help="Draw the token, step and time.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Render tokens of one stored video: the step evolution (default) or the aggregated map (--use-aggregated),
    as heatmaps or overlays on the original video, one file per token or a grid."""
    import attnmap.render.videos as autorender
    from attnmap.render.options import RenderOptions

    with _errors():
        options = RenderOptions(
            colormap=_colormap(colormap),
            fps=fps,
            overlay_alpha=overlay_alpha,
            normalize=normalize,
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
        stored = store.tokens(video_id)
        words = stored if token == ["all"] else list(dict.fromkeys(token))
        unknown = [w for w in words if w not in stored]
        if unknown:
            raise CLIError(
                f"--token {unknown[0]!r} is not stored for video {video_id!r}; it has: {', '.join(stored)}"
            )
        if not words:
            raise CLIError(f"video {video_id!r} has no token maps")
        mode = "aggregated" if use_aggregated else "steps"
        common: dict[str, Any] = {
            "options": options,
            "mode": mode,
            "steps": _steps(steps),
            "original_video": original_video,
            "quiet": _quiet(quiet),
        }
        if grid:
            typer.echo(autorender.render_grid(store, video_id, words, output, **common))
            return
        if len(words) == 1 and output.suffix:
            typer.echo(autorender.render_token(store, video_id, words[0], output, **common))
            return
        if output.suffix:
            raise CLIError(f"--output must be a folder when rendering {len(words)} tokens without --grid")
        kind = "overlay" if original_video is not None else ("attention" if use_aggregated else "steps")
        for word in words:
            path = autorender.output_path(output, video_id, word, kind, options.video_format)
            typer.echo(autorender.render_token(store, video_id, word, path, **common))


def _colormap(name: str) -> str:
    try:
        import attnmap.render as render

        names = list(render.colormap_names())
    except ImportError:  # pragma: no cover - render is part of the package
        return name
    if name not in names:
        raise CLIError(f"--colormap {name!r} is unknown; valid names: {', '.join(names)}")
    return name


@app.command("all", epilog=_epilog(6))
def render_all(
    attention_dir: Annotated[Path, typer.Argument(help="Store root (the attention_maps folder).")],
    output: Annotated[
        Optional[Path], typer.Option(help="Output folder (default: attention_videos next to the store).")
    ] = None,
    colormap: Annotated[str, typer.Option(help="Colormap.")] = "hot",
    fps: Annotated[
        Optional[float], typer.Option(help="Output frames per second (default: the original video's rate).")
    ] = None,
    overlay_alpha: Annotated[float, typer.Option(help="Heatmap opacity on overlays, 0.0-1.0.")] = 0.6,
    video_format: Annotated[str, typer.Option(help="mp4, webm or gif.")] = "mp4",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Render every video and token of a store: <video_id>_<token>_attention.mp4 (the aggregated map following
    the video's frames) and _overlay.mp4 when the store knows the original video."""
    import attnmap.render.videos as autorender
    from attnmap.render.options import RenderOptions

    with _errors():
        store = _open(attention_dir)
        params = RenderOptions(
            colormap=_colormap(colormap), fps=fps, overlay_alpha=overlay_alpha, video_format=video_format
        )
        target = output if output is not None else attention_dir.resolve().parent / "attention_videos"
        videos = store.videos()
        if not videos:
            raise CLIError(f"{str(attention_dir)!r} holds no stored videos")
        for video_id in videos:
            for path in autorender.render_video(attention_dir, video_id, target, params, quiet=_quiet(quiet)):
                typer.echo(path)


@app.command("list", epilog=_epilog(1))
def list_videos(
    attention_dir: Annotated[Path, typer.Argument(help="Store root (the attention_maps folder).")],
) -> None:
    """List the stored videos with their steps and tokens."""
    with _errors():
        store = _open(attention_dir)
        for video_id in store.videos():
            steps = store.steps(video_id)
            span = f"{steps[0]}..{steps[-1]}" if steps else "none"
            typer.echo(
                f"{video_id}\tsteps {span} ({len(steps)})\ttokens: {', '.join(store.tokens(video_id))}"
            )


@app.command("figures", epilog=_epilog(5))
def figures_cmd(
    attention_dir: Annotated[Path, typer.Option(help="Store root (the attention_maps folder).")],
    video_id: Annotated[str, typer.Option(help="Video identifier inside the store.")],
    output: Annotated[Path, typer.Option(help="Output folder.")],
    fmt: Annotated[str, typer.Option("--format", help="png or svg.")] = "png",
    token: Annotated[Optional[list[str]], typer.Option(help="Tokens to compare (default all).")] = None,
) -> None:
    """Draw the figures of one video: tokens over steps and frames, the F x F temporal matrix, the text
    self-attention and the per-head temporal locality (those whose maps are stored)."""
    import attnmap.render.videos as autorender

    with _errors():
        if fmt not in ("png", "svg"):
            raise CLIError(f"--format must be png or svg, got {fmt!r}")
        store = _open(attention_dir, video_id)
        for path in autorender.render_figures(store, video_id, output, fmt=fmt, tokens=token):
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


RENDER_EXAMPLES.append(
    "attnmap-render stats outputs/attention_maps --output stats/ --share 0.9 --window 3,7,7"
)


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


@app.command("stats", epilog=_epilog(7))
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
        if not 0.0 < share <= 1.0:
            raise CLIError(f"--share must lie in (0, 1], got {share}")
        if top_k < 1:
            raise CLIError(f"--top-k must be >= 1, got {top_k}")
        size = _window_option(window)
        store = _open(attention_dir)
        videos = list(dict.fromkeys(video_id)) if video_id else store.videos()
        if not videos:
            raise CLIError(f"{str(attention_dir)!r} holds no stored videos")
        for vid in videos:
            _open(attention_dir, vid)  # names the video when it is not stored
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
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.exceptions.Abort:
        typer.echo("Error: aborted", err=True)
        code = 1
    except click.ClickException as exc:
        if debug:
            raise
        typer.echo(f"Error: {exc.format_message()}", err=True)
        code = 1
    except Exception as exc:
        if debug:
            raise
        typer.echo(f"Error: {_message(exc)}", err=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
