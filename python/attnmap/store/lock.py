"""One writer per video at a time: a lock file in the video's folder holding the writer's pid.

The lock is an advisory ``flock`` on ``<video folder>/.writer.lock``, which exists while a writer
holds it: the kernel drops the flock when the writer's process ends in any way (SIGKILL included),
so the file a dead writer leaves is a stale lock by construction and the next writer takes it
over, rewriting the pid. The pid in the file is for the message a second writer gets. Where ``fcntl`` is missing (Windows) the file itself is the lock:
created exclusively, taken over when the pid in it is no longer running.

Example:
    >>> with WriterLock(video_folder, "vid 1", wait=10.0):   # doctest: +SKIP
    ...     ...  # write steps; a second writer of "vid 1" waits up to 10 s, then gets a StoreError
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

from attnmap.errors import AttnmapError, StoreError

try:
    import fcntl
except ImportError:  # Windows: the exclusive-create lock below
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".writer.lock"
_POLL_S = 0.05


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


def _pid_in(path: Path) -> Optional[int]:
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and len(text) < 12 else None


def _holder(path: Path) -> str:
    pid = _pid_in(path)
    if pid is None:
        return "another writer"
    return f"process {pid}" + (
        " (this process: close its other StoreWriter first)" if pid == os.getpid() else ""
    )


class WriterLock:
    """The writer lock of one video folder; :meth:`acquire` takes it, :meth:`release` drops it.

    Args:
        folder: the video's folder (it must exist).
        video_id: the id, for the messages.
        wait: seconds to wait for a live writer to finish; 0 fails at once, None waits as long as it takes.
    """

    def __init__(self, folder: Path, video_id: str, *, wait: Optional[float] = 0.0) -> None:
        self._fd: Optional[int] = None
        if wait is not None and (isinstance(wait, bool) or not isinstance(wait, (int, float)) or wait < 0):
            raise AttnmapError(f"wait must be seconds >= 0 or None (wait as long as it takes), got {wait!r}")
        self.path = Path(folder) / LOCK_FILE
        self.video_id = video_id
        self.wait = wait

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, waiting up to ``wait`` seconds for a live writer; StoreError when it stays held."""
        if self._fd is not None:
            return
        deadline = None if self.wait is None else time.monotonic() + self.wait
        while not self._try():
            if deadline is not None and time.monotonic() >= deadline:
                raise StoreError(
                    f"video {self.video_id!r} is being written by {_holder(self.path)} (lock file "
                    f"{self.path}); wait for it to finish, or pass wait=<seconds> to wait for it"
                )
            time.sleep(_POLL_S)

    def _try(self) -> bool:
        if fcntl is None:
            return self._try_exclusive()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.fstat(fd)
            now = os.stat(self.path)
        except OSError:  # held by a live writer (this process's other writers included), or gone
            os.close(fd)
            return False
        if (held.st_ino, held.st_dev) != (now.st_ino, now.st_dev):  # released and removed meanwhile
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode("ascii"))
        self._fd = fd
        return True

    def _try_exclusive(self) -> bool:
        """The lock without flock: the file exists while a writer holds it; a dead pid's file is taken over."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pid = _pid_in(self.path)
                if pid is None or _pid_alive(pid):
                    return False
                self.path.unlink(missing_ok=True)  # a dead writer's lock: take it over
                continue
            os.write(fd, str(os.getpid()).encode("ascii"))
            self._fd = fd
            return True
        return False

    def release(self) -> None:
        """Drop the lock and remove its file (a writer waiting on the removed file sees that it was
        removed and opens the path again)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(fd)  # with flock, closing the descriptor drops the lock

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()
