"""Processes that write and read one store root at once, for ``tests/test_store_concurrency.py``.

Each runs in a process of its own, forked from a fresh interpreter (multiprocessing's forkserver; as a
worker of torchrun or Ray, it shares nothing with the test's process), and talks to the test through a
pipe of its own, one short message at a time, so that a process killed with SIGKILL cuts no one else's
messages. Each writer can see flock as a file system without it gives it (:func:`without_flock`). What a writer writes is known from its video, step and attempt alone
(:func:`maps`), so the test and the reader know what every visible step must hold.
"""

from __future__ import annotations

import errno
import os
import time
import traceback
import warnings
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

#: the ways a file system has no flock: the store told not to use it, flock raising, flock doing nothing
NO_FLOCK = ("env", "raises", "noop")
#: the attempts of one video (the first, then its retries), at most
ATTEMPTS = 3


def without_flock(how: str) -> None:
    """Make this process's flock what a file system without it gives (see :data:`NO_FLOCK`)."""
    if how == "env":
        os.environ["ATTNMAP_STORE_FLOCK"] = "0"
        return
    import fcntl

    def raises(fd: Any, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    def noop(fd: Any, operation: int) -> None:
        return None

    fcntl.flock = {"raises": raises, "noop": noop}[how]  # type: ignore[assignment]


def video_id(video: int) -> str:
    return f"video {video}"  # a space: its folder is a sanitised name with a hash


def maps(video: int, step: int, attempt: int) -> dict[str, np.ndarray]:
    """What attempt ``attempt`` of video ``video`` writes at ``step``: every value says all three (exact
    in float32: an integer below 2**14 plus a multiple of 1/64)."""
    base = np.float32(video * 1000 + step * 10 + attempt)
    cells = np.arange(32, dtype=np.float32).reshape(2, 4, 4) / 64
    return {
        "token/cat": base + cells,
        "token/dog": -(base + cells),
        "temporal": base + np.float32(0.5) + cells[0, :2, :2],
    }


def which_attempt(video: int, step: int, stored: dict[str, np.ndarray]) -> int:
    """The one attempt of ``video`` whose ``step`` is exactly ``stored`` (every map of it); AssertionError
    when none is: a map mixed from two attempts, from another video or step, or partly written."""
    for attempt in range(ATTEMPTS):
        expected = maps(video, step, attempt)
        if set(stored) == set(expected) and all(
            stored[k].dtype == np.float32 and np.array_equal(stored[k], v) for k, v in expected.items()
        ):
            return attempt
    raise AssertionError(f"step {step} of {video_id(video)} is no attempt's: {stored}")


def write(root: str, video: int, fmt: str, attempt: int, steps: int, how: str, conn: Connection) -> None:
    """One attempt of a writer of ``video``: every attempt writes the same run (its run id derives from
    the video), so a retry continues what a killed attempt committed. Reports ``ready`` (before it opens
    the video), ``open``, ``step <s>`` after each committed step, ``closed``, or ``error <traceback>``."""
    try:
        without_flock(how)
        from attnmap.store import StoreWriter, derive_run_id

        run = derive_run_id("batch 7", video_id(video))
        meta = {"prompt": video_id(video)}
        conn.send_bytes(b"ready")
        writer = StoreWriter(root, video_id(video), meta, dtype="float32", storage_format=fmt, run_id=run)
        conn.send_bytes(b"open")
        for s in range(steps):
            writer.write_step(s, maps(video, s, attempt))
            conn.send_bytes(f"step {s}".encode())
        writer.close()
        conn.send_bytes(b"closed")
    except BaseException:
        conn.send_bytes(f"error {traceback.format_exc()}".encode())


def contend(root: str, video: int, attempt: int, wait: float, how: str, conn: Connection) -> None:
    """A writer of a video that other writers write at the same time, each its own run. It reports
    ``ready``; when the test sends ``start`` it reports ``trying`` and opens the video: ``open``, or ``refused <message>``; then
    each ``go`` writes the next step (``step <s>``) and ``close`` closes (``closed``); ``error
    <traceback>`` on any failure."""
    try:
        without_flock(how)
        from attnmap.store import StoreError, StoreWriter

        conn.send_bytes(b"ready")
        conn.recv_bytes()
        conn.send_bytes(b"trying")
        try:
            writer = StoreWriter(
                root, video_id(video), {}, dtype="float32", storage_format="numpy", wait=wait
            )
        except StoreError as exc:
            conn.send_bytes(f"refused {exc}".encode())
            return
        conn.send_bytes(b"open")
        step = 0
        while conn.recv_bytes() == b"go":
            writer.write_step(step, maps(video, step, attempt))
            conn.send_bytes(f"step {step}".encode())
            step += 1
        writer.close()
        conn.send_bytes(b"closed")
    except BaseException:
        conn.send_bytes(f"error {traceback.format_exc()}".encode())


def read(root: str, videos: int, conn: Connection) -> None:
    """Read the store over and over while writers write it, until the test says stop, then once more:
    every video listed has its metadata, and every step listed is exactly one attempt's step (a warning,
    that is a file the reader skipped, is an error). Reports ``reading`` as its first pass begins, then
    ``read <passes> <steps checked> <the store module's file>``, or ``error <traceback>``."""
    try:
        warnings.simplefilter("error")
        import attnmap.store
        from attnmap.store import derive_run_id, open_store

        ids = {video_id(v): v for v in range(videos)}
        passes = checked = 0
        conn.send_bytes(b"reading")
        while True:
            stop = conn.poll()
            with open_store(root) as store:
                for vid in store.videos():
                    assert store.metadata(vid)["run_id"] == derive_run_id("batch 7", vid), vid
                    for s in store.steps(vid):
                        stored = {name: store.load(vid, name, s) for name in store.names(vid, s)}
                        which_attempt(ids[vid], s, stored)
                        checked += 1
            passes += 1
            if stop:
                break
            time.sleep(0.01)  # a reader polling, not spinning
        conn.send_bytes(f"read {passes} {checked} {attnmap.store.__file__}".encode())
    except BaseException:
        conn.send_bytes(f"error {traceback.format_exc()}".encode())


def race(folders: list[str], how: str, barrier: Any, conn: Connection) -> None:
    """For each folder in turn, at the same moment as the other racers (``barrier``): try to take its
    writer lock, which holds a dead writer's claim; once every racer has tried, report ``won`` (this
    racer holds it), ``lost`` (it took it, and the claim is another's now) or ``refused``; ``error
    <traceback>`` on any failure."""
    try:
        without_flock(how)
        from attnmap.store import StoreError
        from attnmap.store.lock import WriterLock

        for folder in folders:
            lock = WriterLock(folder, "v", wait=0)
            barrier.wait(60)
            try:
                lock.acquire()
            except StoreError:
                pass
            barrier.wait(60)  # every racer has tried
            if not lock.held:
                conn.send_bytes(b"refused")
                continue
            try:
                lock.check()
                conn.send_bytes(b"won")
            except StoreError:
                conn.send_bytes(b"lost")
            lock.release()
    except BaseException:
        conn.send_bytes(f"error {traceback.format_exc()}".encode())
