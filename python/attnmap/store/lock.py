"""One writer per video folder, without depending on flock: :class:`WriterLock`.

The lock of a video folder is a claim file, ``.writer.lock``, that says who writes: JSON with the
writer's ``pid``, ``host``, ``machine`` (the kernel's boot id; the host name where there is none),
``pidns`` (its pid namespace), ``start`` (when its process started), ``run_id``, a ``token`` of its
own, ``since`` and ``flock`` (whether it holds flock on the claim). A writer makes its claim whole under
a name of its own and hard-links it into place: ``link`` fails when the name exists, atomically, on
local file systems, NFS and Lustre alike (a file system without hard links gets the claim created with
``O_EXCL``). A claim is taken over only when its writer is known to be gone:

- a writer on this machine (the same kernel): where it holds flock on its claim (taken before the
  claim was linked) and flock excludes between two open files here, flock tells; otherwise its pid, in
  this pid namespace, no longer runs the process that started at ``start`` (a zombie is gone; on
  Windows, without flock, a claim is never judged: remove it once its writer is gone);
- a writer on another machine, or in another pid namespace of this one (another container, a pod
  restarted on the same node) where flock does not tell, cannot be asked: its claim holds until it is
  released, except for a writer that continues the same run (``run_id`` equal: the retry of a killed
  writer); the error names the file to remove once that writer is known to be gone.

flock is never what excludes, so nothing depends on it: where it raises (Lustre without flock),
silently does nothing, or excludes only one machine's processes (NFS mounted with
``local_lock=flock``, Lustre with ``localflock``), the claim still does. ``ATTNMAP_STORE_FLOCK=0``
keeps the store from calling flock at all (an NFS client whose lock calls hang while its lock daemon
cannot be reached).

A stale claim is removed by one writer at a time, the one holding the break-in claim
(``.writer.lock.break``, itself a claim), which removes it only if it is still the claim judged stale:
of several writers that judged it so, one removes it, and none removes a claim made after it. A writer
checks that the claim is still its own before each commit (:meth:`WriterLock.check`): a writer whose
claim was taken stops with a StoreError instead of writing on.

Example:
    >>> lock = WriterLock(folder, "vid", wait=10, run_id=run)   # doctest: +SKIP
    >>> with lock:
    ...     lock.check()   # before each commit
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from attnmap.errors import AttnmapError, StoreError

try:
    import fcntl
except ImportError:  # Windows: no flock; the claim's pid tells
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".writer.lock"
#: held by the writer that removes a stale claim, so that of several writers that judged it stale one does
BREAK_FILE = ".writer.lock.break"
#: the environment variable that keeps the store from calling flock (``0``, ``false``, ``no``, ``off``)
FLOCK_ENV = "ATTNMAP_STORE_FLOCK"
_OFF = ("0", "false", "no", "off")
_POLL_S = 0.05
_MAX_CLAIM = 4096
#: link(2) errors of a file system without hard links (then the claim is created with O_EXCL)
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read(256).strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _read_bytes(path: Path) -> Optional[bytes]:
    """The bytes of a claim file (at most what a claim holds and one more); None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(_MAX_CLAIM + 1)
    except OSError:
        return None


def _proc_stat(pid: int) -> Optional[tuple[str, str]]:
    """(state, start time in clock ticks after boot) of a process, from /proc (Linux); None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _machine() -> tuple[str, str, str]:
    """(host name, machine id, pid namespace) of this process."""
    host = socket.gethostname()
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return host, boot or f"host:{host}", pidns


def flock_enabled() -> bool:
    """Whether the store calls flock at all (it exists here and ``ATTNMAP_STORE_FLOCK`` is not off)."""
    return fcntl is not None and os.environ.get(FLOCK_ENV, "").strip().lower() not in _OFF


def _flock(fd: int) -> Optional[bool]:
    """flock(LOCK_EX | LOCK_NB) on ``fd``: True when taken, False when another open file holds it, None
    when flock failed otherwise (or is off)."""
    if not flock_enabled():
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _flock_excludes(path: Path) -> bool:
    """Whether flock held on one open file of ``path`` (by the caller) keeps a second open file of it
    out: where flock silently does nothing, or is kept per process (NFS), it does not."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        return _flock(fd) is False
    finally:
        os.close(fd)  # a lock it took is dropped with it


@dataclass(frozen=True)
class Claim:
    """Who holds a video's lock (see the module docstring)."""

    pid: int
    host: str
    machine: str
    pidns: str
    start: Optional[str]
    run_id: Optional[str]
    token: str
    since: str
    flock: bool

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode("utf-8")

    @staticmethod
    def parse(raw: bytes) -> Optional[Claim]:
        """The claim in ``raw``; a bare pid (the lock of attnmap before claims) is a writer of this
        machine that held flock; None for anything else (a claim still being written, garbage)."""
        text = raw.decode("utf-8", "replace").strip()
        if text.isascii() and text.isdigit() and len(text) < 12 and int(text) > 0:
            host, machine, pidns = _machine()
            return Claim(
                pid=int(text),
                host=host,
                machine=machine,
                pidns=pidns,
                start=None,
                run_id=None,
                token="",
                since="",
                flock=fcntl is not None,
            )
        try:
            fields = json.loads(text)
            claim = Claim(**fields)
        except (ValueError, TypeError, RecursionError):
            return None
        strings = (claim.host, claim.machine, claim.pidns, claim.token, claim.since)
        if (
            type(claim.pid) is not int
            or claim.pid <= 0
            or not all(isinstance(s, str) for s in strings)
            or not all(isinstance(s, (str, type(None))) for s in (claim.start, claim.run_id))
            or not isinstance(claim.flock, bool)
        ):
            return None
        return claim

    def running(self) -> bool:
        """Whether this claim's process (of this machine and pid namespace) still runs: its pid answers
        and, where /proc tells (Linux), it is not a zombie and started when the claim says."""
        if os.name == "nt":  # os.kill(pid, 0) would send it CTRL_C_EVENT: a pid on Windows is never judged
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's live process
            return True
        except OSError:
            return False
        stat = _proc_stat(self.pid)
        if stat is None:  # no /proc: the pid runs
            return True
        state, start = stat
        return state not in ("Z", "X") and (self.start is None or start == self.start)


def _here(run_id: Optional[str], flock: bool) -> Claim:
    host, machine, pidns = _machine()
    stat = _proc_stat(os.getpid())
    return Claim(
        pid=os.getpid(),
        host=host,
        machine=machine,
        pidns=pidns,
        start=None if stat is None else stat[1],
        run_id=run_id,
        token=uuid.uuid4().hex,
        since=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        flock=flock,
    )


class WriterLock:
    """The writer lock of one video folder; :meth:`acquire` takes it, :meth:`check` says it is still
    held, :meth:`release` drops it.

    Args:
        folder: the video's folder (it must exist).
        video_id: the id, for the messages.
        wait: seconds to wait for a live writer to finish; 0 fails at once, None waits as long as it takes.
        run_id: the run this writer writes: a claim of the same run on another machine is taken over
            (the retry of a killed writer).
    """

    def __init__(
        self, folder: Path, video_id: str, *, wait: Optional[float] = 0.0, run_id: Optional[str] = None
    ) -> None:
        self._fd: Optional[int] = None
        self._raw = b""
        self._no_links = False  # the file system has no hard links: claims are created in place
        if wait is not None and (
            isinstance(wait, bool) or not isinstance(wait, (int, float)) or not wait >= 0
        ):
            raise AttnmapError(f"wait must be seconds >= 0 or None (wait as long as it takes), got {wait!r}")
        self.path = Path(folder) / LOCK_FILE
        self.video_id = video_id
        self.wait = wait
        self.run_id = run_id
        self.holder: Optional[Claim] = None  # the claim that kept this writer out, at its last try

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
                raise StoreError(self._refusal())
            time.sleep(_POLL_S)

    def _refusal(self) -> str:
        holder, here = self.holder, _machine()
        if holder is None:
            return (
                f"video {self.video_id!r} is being written by another writer (lock file {self.path}, not "
                "readable as a claim); wait for it to finish, or remove the lock file if no writer runs"
            )
        who = f"process {holder.pid}"
        remote, other_ns = holder.machine != here[1], holder.pidns != here[2]
        if remote:
            who += f" on {holder.host}" + (" (before a restart)" if holder.host == here[0] else "")
        elif other_ns:
            who += " in another pid namespace of this machine (another container)"
        elif holder.pid == os.getpid():
            who += " (this process: close its other StoreWriter first)"
        run = f", run {holder.run_id}" if holder.run_id else ""
        since = f", since {holder.since}" if holder.since else ""
        message = (
            f"video {self.video_id!r} is being written by {who} (lock file {self.path}{run}{since}); wait "
            "for it to finish, or pass wait=<seconds> to wait for it"
        )
        if remote or other_ns:
            elsewhere = "on another machine" if remote else "in another pid namespace"
            message += (
                f"; a writer {elsewhere} cannot be asked whether it still runs: once it is gone, "
                "remove the lock file"
                + (f", or continue its run with run_id={holder.run_id!r}" if holder.run_id else "")
            )
        return message

    # -- taking the claim -----------------------------------------------------------------------------
    def _new_claim(self, path: Path) -> tuple[int, bytes]:
        """Create ``path`` (O_EXCL) holding this writer's claim, flock taken on it first where flock
        excludes; returns the open descriptor and the claim's bytes."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            flock = _flock(fd) is True and _flock_excludes(path)
            raw = _here(self.run_id, flock).encode()
            view = memoryview(raw)
            while view:  # a short write (a disk all but full) is written on, or fails with its error
                written = os.write(fd, view)
                if written <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
                view = view[written:]
            os.fsync(fd)  # whole on the server before another client can read it under the lock's name
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return fd, raw

    def _link(self, path: Path) -> Optional[tuple[int, bytes]]:
        """Put a new claim of this writer at ``path``, made whole under a name of its own and linked:
        its descriptor and bytes, or None when ``path`` exists (a file system without hard links gets
        it created in place with O_EXCL: a claim caught half written there is read as held)."""
        if self._no_links:
            try:
                return self._new_claim(path)
            except FileExistsError:
                return None
        tmp = path.with_name(f"{LOCK_FILE}.{uuid.uuid4().hex}")
        fd, raw = self._new_claim(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            os.close(fd)
            return None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _NO_LINKS:
                raise
            self._no_links = True
            return self._link(path)
        finally:
            tmp.unlink(missing_ok=True)
        return fd, raw

    def _try(self) -> bool:
        """One try: True when this writer now holds the claim."""
        for _ in range(8):  # a claim released or removed meanwhile: try again at once
            taken = self._link(self.path)
            if taken is not None:
                self._fd, self._raw = taken
                return True
            if not self._take_over():
                return False
        return False

    def _take_over(self) -> bool:
        """Judge the claim in place: False when its writer may still run (``holder`` says who); True
        when it is gone (released, or stale and removed): try again."""
        judged = self._judge(self.path)
        if judged is None:
            return True
        raw, self.holder, gone = judged
        if not gone:
            return False
        self._remove(raw)
        return True

    def _judge(self, path: Path) -> Optional[tuple[bytes, Optional[Claim], bool]]:
        """The claim at ``path``: its bytes, itself (None: not readable as one) and whether its writer is
        known to be gone; None when there is none."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            return None
        try:
            try:
                raw = os.read(fd, _MAX_CLAIM + 1)
            except OSError:  # not a file (a folder, a FIFO): never a claim
                raw = b""
            claim = Claim.parse(raw)
            return raw, claim, claim is not None and self._gone(claim, fd, path)
        finally:
            os.close(fd)

    def _remove(self, raw: bytes) -> None:
        """Remove the stale claim whose bytes are ``raw``, holding the break-in claim
        (``.writer.lock.break``) while it does: of several writers that judged it stale, one removes
        it, and none removes the claim another writer made after it."""
        brk = self.path.with_name(BREAK_FILE)
        taken = self._link(brk)
        if taken is None:  # another writer removes it now (or died doing it: its break-in is removed)
            judged = self._judge(brk)
            if judged is not None and judged[2]:
                with contextlib.suppress(OSError):
                    if _read_bytes(brk) == judged[0]:
                        brk.unlink()
            time.sleep(0.002)
            return
        fd, mine = taken
        try:
            if _read_bytes(self.path) == raw:
                self.path.unlink(missing_ok=True)
        finally:
            if _read_bytes(brk) == mine:
                brk.unlink(missing_ok=True)
            os.close(fd)

    def _gone(self, holder: Claim, fd: int, path: Path) -> bool:
        """Whether the writer of ``holder`` (its claim at ``path``, open at ``fd``) is known to be gone."""
        here = _machine()
        if holder.machine == here[1] and holder.flock:
            taken = _flock(fd)
            if taken is False:
                return False  # held: it runs
            if taken and _flock_excludes(path):
                return True  # flock excludes here, and nobody held it
        if holder.machine != here[1] or holder.pidns != here[2]:
            # its pid cannot be asked (another machine, or another pid namespace: a container of this
            # machine, a pod restarted on the same node); a retry of its run takes over
            return holder.run_id is not None and holder.run_id == self.run_id
        return not holder.running()

    # -- holding it -----------------------------------------------------------------------------------
    def _owns(self) -> bool:
        return _read_bytes(self.path) == self._raw

    def check(self) -> None:
        """StoreError unless this writer still holds the claim (before each commit)."""
        if self._fd is None:
            raise StoreError(f"video {self.video_id!r}: this writer does not hold its lock {self.path}")
        if not self._owns():
            holder = Claim.parse(_read_bytes(self.path) or b"")
            by = "removed" if holder is None else f"taken over by process {holder.pid} on {holder.host}"
            raise StoreError(
                f"video {self.video_id!r}: the writer lock {self.path} was {by} while this writer held it; "
                "it stops here and commits nothing more (what it committed stays, checked by run id)"
            )

    def release(self) -> None:
        """Drop the lock: its file is removed when it is still this writer's claim (a writer waiting on
        the removed file opens the path again)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._owns():
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)  # closing the descriptor drops flock

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # at interpreter exit the modules it needs may be gone; the claim is then stale
            pass
