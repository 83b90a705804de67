"""The progress display of a command: one for every render it runs, bars on a terminal, whole lines
otherwise (a log, a pipe), nothing when quiet.

Renders take the command's :class:`Progress` when it hands one over, else make one of their own for the
call (:func:`display`); each render is one :class:`Task` of it (:func:`render_task`), advanced by the frames it
encodes and closed with "done" or "FAILED".
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Optional


class Progress:
    """One progress display for a whole command, shared by the renders running at the same time.

    On a terminal it is one rich display with a bar per render running; otherwise (a log, a pipe) one
    plain line when a render starts and one when it ends, written whole under a lock, so that the lines
    of two renders never interleave. ``enabled=False`` shows nothing.

    Example:
        >>> with Progress() as progress:                                          # doctest: +SKIP
        ...     render_video(root, "vid", "out", progress=progress)
    """

    def __init__(self, *, enabled: bool = True, stream: Any = None) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.lock = threading.Lock()
        self._rich: Any = None
        isatty = getattr(self.stream, "isatty", None)
        if enabled and callable(isatty) and isatty():
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
                from rich.progress import Progress as RichProgress
            except ImportError:  # pragma: no cover - typer brings rich
                pass
            else:
                self._rich = RichProgress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeRemainingColumn(),
                    console=Console(file=self.stream),
                    transient=True,
                )
                self._rich.start()

    @property
    def live(self) -> bool:
        """Whether bars are being drawn on a terminal (rather than plain lines, or nothing)."""
        return self._rich is not None

    def task(self, description: str, total: int) -> Task:
        """A render of ``total`` frames; advance it, then close it."""
        return Task(self, description, total)

    def line(self, text: str) -> None:
        """One whole line on the display's stream (above the bars on a terminal)."""
        if not self.enabled:
            return
        with self.lock:
            if self._rich is not None:
                self._rich.console.print(text, markup=False, highlight=False)
            else:
                self.stream.write(text + "\n")
                self.stream.flush()

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Task:
    """One render of a :class:`Progress`: a bar on a terminal, else a line when it starts and one when it
    ends (with its frames and seconds)."""

    def __init__(self, progress: Progress, description: str, total: int) -> None:
        self.progress, self.description, self.total, self.done = progress, description, total, 0
        self.start = time.perf_counter()
        self.id: Any = None
        if progress._rich is not None:
            with progress.lock:
                self.id = progress._rich.add_task(description, total=total)
        else:
            progress.line(f"rendering {description}: {total} frames")

    def advance(self, frames: int) -> None:
        self.done += frames
        if self.id is not None:
            with self.progress.lock:
                self.progress._rich.update(self.id, advance=frames)

    def close(self, ok: bool = True) -> None:
        if self.id is not None:
            with self.progress.lock:
                self.progress._rich.remove_task(self.id)
            self.id = None
        elif self.progress.enabled:
            seconds = time.perf_counter() - self.start
            what = "done" if ok else "FAILED"
            self.progress.line(
                f"{what} {self.description}: {self.done}/{self.total} frames in {seconds:.1f} s"
            )


def display(progress: Optional[Progress], quiet: bool) -> contextlib.AbstractContextManager[Progress]:
    """The caller's display, or one of this call's own (closed with it; showing nothing when quiet)."""
    return contextlib.nullcontext(progress) if progress is not None else Progress(enabled=not quiet)


@contextlib.contextmanager
def render_task(
    progress: Optional[Progress], quiet: bool, description: str, total: int
) -> Iterator[Optional[Task]]:
    """A task of ``progress``, or of a display of its own for this one render (none when quiet); closed
    as done, or as failed when the block raises."""
    with display(progress, quiet) as shown:
        task = shown.task(description, total) if shown.enabled else None
        ok = False
        try:
            yield task
            ok = True
        finally:
            if task is not None:
                task.close(ok)
