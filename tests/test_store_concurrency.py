"""Many writers, one store: processes writing one root at once, killed and retried, where flock does not work.

Batches of videos are written by many processes at once (torchrun, accelerate, Ray), each its own
videos, on file systems where flock raises, does nothing or locks one machine only (NFS, Lustre). The
processes here are real, each a fresh interpreter's (multiprocessing's forkserver: a server started
fresh forks them, with numpy and the store imported once, not once per process), and see flock as such
a file system gives it (``tests/store_writers.py``); writers are killed with SIGKILL at points that follow their progress and
retried with the same run id, while another process reads the store. What is checked:

- every finished step of every video loads, exactly as one attempt of its writer wrote it (every map of
  it), and a step a run committed never changes when a retry writes it again; nothing another video or
  another run wrote is mixed in; a reader never meets a partial step or a video without its metadata;
- two writers of one video id at once: one writes, the other is refused with a StoreError naming it (or
  waits and then writes its own run whole, after a kill too);
- the claim file itself: a writer on another machine or in another pid namespace is never taken over
  (but a retry of its run does), a dead one is (a zombie, a reused pid), a writer whose claim was taken
  commits nothing more, a claim is written whole or not at all.
"""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing
import multiprocessing.forkserver
import os
import random
import signal
import subprocess
import sys
import time
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pytest

import store_writers
from attnmap.errors import AttnmapError
from attnmap.store import LOCK_FILE, StoreError, StoreWriter, derive_run_id, open_store, video_dirname
from attnmap.store import lock as lock_module
from store_writers import ATTEMPTS, NO_FLOCK, maps, video_id, which_attempt

#: processes forked from a spawned server (a clean interpreter that imported what they need once); spawn
#: itself where there is no forkserver
PROCESSES = multiprocessing.get_context(
    "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
)
PROCESSES.set_forkserver_preload(["store_writers", "attnmap.store"])
TESTS_DIR = Path(__file__).resolve().parent


@pytest.fixture(autouse=True, scope="module")
def _process_server() -> Iterator[None]:
    """Start the forkserver with this tree's attnmap and the writers imported: its preload does not see
    the test's sys.path before Python 3.13, so PYTHONPATH carries it to the server."""
    if PROCESSES.get_start_method() == "forkserver":
        paths = [str(TESTS_DIR.parent / "python"), str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
            multiprocessing.forkserver.ensure_running()
    yield


class Child:
    """A process of :data:`PROCESSES` running ``target(*args, conn)``, and the test's end of its pipe."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        self.conn, theirs = PROCESSES.Pipe()
        self.proc = PROCESSES.Process(target=target, args=(*args, theirs), daemon=True)
        self.proc.start()
        theirs.close()
        self.ended = False

    def recv(self, timeout: float = 60.0) -> Optional[str]:
        """The next message; None once the process has ended. An ``error`` message fails the test."""
        if not self.conn.poll(timeout):
            pytest.fail(f"process {self.proc.pid} said nothing for {timeout} s")
        try:
            message = self.conn.recv_bytes().decode()
        except (EOFError, OSError):
            self.ended = True
            return None
        if message.startswith("error"):
            pytest.fail(f"process {self.proc.pid} failed:\n{message[6:]}")
        return message

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)

    def join(self, timeout: float = 60.0) -> Optional[int]:
        """The exit code; a process still running after ``timeout`` is killed (its code: -SIGKILL)."""
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            self.kill()
            self.proc.join(10)
        self.conn.close()
        return self.proc.exitcode


# -- many writers, one root ------------------------------------------------------------------------
def test_many_writers_of_one_root_killed_and_retried_lose_nothing_and_mix_nothing(tmp_path: Path) -> None:
    """Five processes write five videos (both formats) into one root at once, each seeing flock as a
    file system without it gives it. Most are killed (SIGKILL) at a point that follows their progress:
    while opening the video, after a step (mid-way through the next), or in the close; each killed one is
    retried with its run's id until it closes. A reader reads the store all the while."""
    root = tmp_path / "store"
    root.mkdir()
    videos, steps = 5, 8
    rng = random.Random(34)  # kills in the constructor, in step 0, mid-run and in the close
    reader = Child(store_writers.read, str(root), videos)
    assert reader.recv() == "reading"  # its first pass begins before any writer: it reads them writing
    reported: dict[tuple[int, int], list[int]] = {}  # (video, step) -> the attempts that reported it
    pending, kills = list(range(videos)), 0
    for attempt in range(ATTEMPTS):
        # kill after this message: "ready" (inside the constructor), "open" (inside step 0), "step s"
        # (inside step s + 1, or the close after the last); None: let it finish (the last attempt)
        kill = 0.0 if attempt == ATTEMPTS - 1 else 0.8 / (attempt + 1)
        points = ["ready", "open", *(f"step {s}" for s in range(steps))]
        plan = {v: rng.choice(points) if rng.random() < kill else None for v in pending}
        children = {
            v: Child(
                store_writers.write,
                str(root),
                v,
                ("safetensors", "numpy")[v % 2],
                attempt,
                steps,
                NO_FLOCK[v % 3],
            )
            for v in pending
        }
        closed = set()
        live = {c.conn: v for v, c in children.items()}
        while live:
            ready = wait(list(live), timeout=60)
            if not ready:
                pytest.fail(f"writers of videos {sorted(live.values())} said nothing for 60 s")
            for conn in ready:
                v = live[conn]
                message = children[v].recv()
                if message is None:
                    del live[conn]
                    continue
                if message.startswith("step"):
                    reported.setdefault((v, int(message.split()[1])), []).append(attempt)
                if message == "closed":
                    closed.add(v)
                if message == plan[v]:
                    time.sleep(rng.uniform(0.0, 0.004))
                    children[v].kill()
                    kills += 1
        for v, child in children.items():
            code = child.join()
            assert code in ((0,) if plan[v] is None else (0, -signal.SIGKILL)), (
                v,
                code,
            )  # killed, or closed first
        pending = [v for v in pending if v not in closed]
        if not pending:
            break
    assert not pending and kills >= 4  # seeded: most videos were killed at least once
    with contextlib.suppress(BrokenPipeError):  # a reader that failed has ended, its error sent
        reader.conn.send_bytes(b"stop")
    message = reader.recv()
    assert reader.join() == 0 and message is not None
    passes, checked, module = message.split(maxsplit=3)[1:]
    assert Path(module).is_relative_to(TESTS_DIR.parent / "python")  # the processes ran this tree's store
    assert int(passes) >= 2 and int(checked) >= videos * steps  # the last pass came after every writer closed

    store = open_store(root)
    assert store.videos() == sorted(video_id(v) for v in range(videos))
    for v in range(videos):
        vid = video_id(v)
        meta = store.metadata(vid)
        assert meta["run_id"] == derive_run_id("batch 7", vid) and meta["complete"]
        assert store.steps(vid) == meta["steps"] == list(range(steps))  # nothing lost
        committed = {}
        for s in range(steps):
            stored = {name: store.load(vid, name, s) for name in store.names(vid, s)}
            committed[s] = which_attempt(v, s, stored)  # exactly one attempt's step, whole
            # a committed step never changes: the attempt that first reported it (or a killed one
            # before it, between its commit and its report) wrote what is there
            assert committed[s] <= min(reported.get((v, s), [ATTEMPTS])), (
                v,
                s,
                committed[s],
                reported.get((v, s)),
            )
        for name in ("token/cat", "token/dog", "temporal"):
            expected = np.mean(
                [maps(v, s, committed[s])[name].astype(np.float64) for s in range(steps)], axis=0
            )
            np.testing.assert_allclose(store.load(vid, name), expected, rtol=1e-6, atol=0)
        assert store.aggregated(vid, "cat").metadata["rebuilt"] is False
        folder = root / video_dirname(vid)
        assert not [p for p in folder.rglob(".*") if ".tmp" in p.name]  # a killed writer's temp files swept
        assert not (folder / LOCK_FILE).exists()


# -- two writers of one video ----------------------------------------------------------------------
def test_writers_of_one_video_at_once_without_flock_one_writes_the_others_are_refused(tmp_path: Path) -> None:
    """Three writers of one video id, each its own run, open it at the same moment, each seeing flock as
    one kind of file system without it gives it (the store told not to use it, flock raising, flock doing
    nothing), and each finding the claim of a writer that died: of the three that judge it stale, one
    removes it and takes the video; the two others are refused with a StoreError naming that one. The
    video is its run."""
    root = str(tmp_path)
    children = [
        Child(store_writers.contend, root, 0, attempt, 0.0, how) for attempt, how in enumerate(NO_FLOCK)
    ]
    assert [child.recv() for child in children] == ["ready"] * 3
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, timeout=60
    )
    _claim(tmp_path / video_dirname(video_id(0)), pid=int(dead.stdout), start=None)
    for child in children:
        child.conn.send_bytes(b"start")
    assert [child.recv() for child in children] == ["trying"] * 3
    replies = [child.recv() or "" for child in children]
    opened = [i for i, reply in enumerate(replies) if reply.startswith("open")]
    assert replies.count("open") == 1, replies
    winner = children[opened[0]]
    for i, reply in enumerate(replies):
        if i != opened[0]:
            assert reply.startswith("refused video 'video 0' is being written by process "), reply
            assert f"process {winner.proc.pid} (lock file" in reply
    for s in range(4):
        winner.conn.send_bytes(b"go")
        assert winner.recv() == f"step {s}"
    winner.conn.send_bytes(b"close")
    assert winner.recv() == "closed"
    assert [child.join() for child in children] == [0, 0, 0]
    store = open_store(root)
    assert store.steps(video_id(0)) == [0, 1, 2, 3] and store.is_complete(video_id(0))
    for s in range(4):
        stored = {name: store.load(video_id(0), name, s) for name in store.names(video_id(0), s)}
        assert which_attempt(0, s, stored) == opened[0]


def test_a_waiting_writer_of_one_video_takes_a_killed_writers_place_and_writes_its_run_whole(
    tmp_path: Path,
) -> None:
    """Without flock: the second writer waits while the first runs; the first is killed after two steps;
    the second takes the dead writer's claim over and its run replaces the first run whole."""
    root = str(tmp_path)
    first = Child(store_writers.contend, root, 0, 0, 0.0, "noop")
    first.conn.send_bytes(b"start")
    assert [first.recv(), first.recv(), first.recv()] == ["ready", "trying", "open"]
    second = Child(store_writers.contend, root, 0, 1, 60.0, "raises")
    second.conn.send_bytes(b"start")
    assert [second.recv(), second.recv()] == ["ready", "trying"]
    for s in range(2):
        first.conn.send_bytes(b"go")
        assert first.recv() == f"step {s}"
    assert not second.conn.poll(0.3)  # it waits while the first writer runs
    first.kill()
    assert first.join() == -signal.SIGKILL
    assert second.recv() == "open"  # the dead writer's claim taken over
    for s in range(4):
        second.conn.send_bytes(b"go")
        assert second.recv() == f"step {s}"
    second.conn.send_bytes(b"close")
    assert second.recv() == "closed" and second.join() == 0
    store = open_store(root)
    assert store.steps(video_id(0)) == [0, 1, 2, 3]
    for s in range(4):
        stored = {name: store.load(video_id(0), name, s) for name in store.names(video_id(0), s)}
        assert which_attempt(0, s, stored) == 1  # the second run, whole: nothing of the first is left


def test_of_the_writers_that_find_a_dead_writers_claim_one_takes_it_round_after_round(tmp_path: Path) -> None:
    """Five processes without flock race for twenty video folders in turn, each holding the claim of a
    writer that died: every round exactly one takes the lock and keeps it, the others are refused, and
    no claim is left behind."""
    rounds, racers = 20, 5
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, timeout=60
    )
    folders = []
    for r in range(rounds):
        folders.append(str(_claim(tmp_path / f"v{r}", pid=int(dead.stdout), start=None).parent))
    barrier = PROCESSES.Barrier(racers)
    children = [Child(store_writers.race, folders, NO_FLOCK[i % 3], barrier) for i in range(racers)]
    results = [[child.recv() for _ in range(rounds)] for child in children]
    assert [child.join() for child in children] == [0] * racers
    for r in range(rounds):
        assert sorted(result[r] or "" for result in results) == ["refused"] * (racers - 1) + ["won"], r
        assert os.listdir(folders[r]) == []


# -- the claim file ---------------------------------------------------------------------------------
META = {"prompt": "p"}


def _claim(folder: Path, **fields: Any) -> Path:
    """Write a claim in ``folder`` as a writer with ``fields`` would have (the rest: this process's)."""
    folder.mkdir(parents=True, exist_ok=True)
    host, machine, pidns = lock_module._machine()
    stat = lock_module._proc_stat(os.getpid())
    claim = {
        "pid": os.getpid(),
        "host": host,
        "machine": machine,
        "pidns": pidns,
        "start": None if stat is None else stat[1],
        "run_id": "r0",
        "token": "t0",
        "since": "2026-12-07T00:00:00+0000",
        "flock": False,
        **fields,
    }
    path = folder / LOCK_FILE
    path.write_text(json.dumps(claim))
    return path


def test_a_writer_on_another_machine_is_never_taken_over_but_a_retry_of_its_run_is(tmp_path: Path) -> None:
    folder = tmp_path / video_dirname("v")
    lock = _claim(folder, host="node-7", machine="another-boot-id", pid=1, run_id="run-7")
    with pytest.raises(StoreError) as info:
        StoreWriter(tmp_path, "v", META, wait=0.1)
    assert str(info.value) == (
        f"video 'v' is being written by process 1 on node-7 (lock file {lock}, run run-7, since "
        "2026-12-07T00:00:00+0000); wait for it to finish, or pass wait=<seconds> to wait for it; a writer "
        "on another machine cannot be asked whether it still runs: once it is gone, remove the lock file, "
        "or continue its run with run_id='run-7'"
    )
    with pytest.raises(StoreError, match="on node-7"):
        StoreWriter(tmp_path, "v", META, run_id="run-8")  # another run: refused too
    assert not (folder / "metadata.json").exists()  # the refused writers wrote nothing
    with StoreWriter(tmp_path, "v", META, dtype="float32", run_id="run-7") as w:  # its retry takes over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        w.write_step(0, {"token/cat": np.ones((1, 2, 2))})
    assert open_store(tmp_path).steps("v") == [0] and not lock.exists()


def test_a_writer_in_another_pid_namespace_is_judged_by_flock_or_else_only_its_retry_takes_over(
    tmp_path: Path,
) -> None:
    """A writer of this machine in another pid namespace (another container, a pod restarted on the same
    node): its pid means nothing here, so, where flock does not tell, its claim is never judged, however
    dead that pid is here; a retry of its run takes over. Where it held flock and flock works here, flock
    tells that it is gone."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, timeout=60
    )
    pidns = "pid:[1]"  # not this process's
    assert lock_module._machine()[2] != pidns
    folder = tmp_path / video_dirname("v")
    lock = _claim(folder, pid=int(dead.stdout), pidns=pidns, start=None, run_id="run-7")
    with pytest.raises(StoreError) as info:
        StoreWriter(tmp_path, "v", META, wait=0.1, run_id="run-8")
    assert str(info.value) == (
        f"video 'v' is being written by process {int(dead.stdout)} in another pid namespace of this machine "
        f"(another container) (lock file {lock}, run run-7, since 2026-12-07T00:00:00+0000); wait for it to "
        "finish, or pass wait=<seconds> to wait for it; a writer in another pid namespace cannot be asked "
        "whether it still runs: once it is gone, remove the lock file, or continue its run with "
        "run_id='run-7'"
    )
    assert not (folder / "metadata.json").exists()
    with StoreWriter(tmp_path, "v", META, dtype="float32", run_id="run-7") as w:  # its retry takes over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        w.write_step(0, {"token/cat": np.ones((1, 2, 2))})
    assert open_store(tmp_path).steps("v") == [0] and not lock.exists()
    # a claim whose writer held flock (nobody holds it now) on a file system where flock works
    lock = _claim(tmp_path / video_dirname("w"), pid=int(dead.stdout), pidns=pidns, start=None, flock=True)
    with StoreWriter(tmp_path, "w", META, dtype="float32") as w:
        w.write_step(0, {"token/cat": np.ones((1, 2, 2))})
    assert open_store(tmp_path).steps("w") == [0] and not lock.exists()


def test_a_claim_is_written_whole_through_short_writes_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk all but full may take a claim a few bytes at a time (the writer writes on), or take none
    (ENOSPC: no claim, no temp claim, nothing of the video is left)."""
    write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: write(fd, bytes(data)[:7]))
    w = StoreWriter(tmp_path, "v", META, dtype="float32")
    monkeypatch.undo()
    claim = lock_module.Claim.parse(w._lock.path.read_bytes())
    assert claim is not None and claim.pid == os.getpid()
    w.write_step(0, {"token/cat": np.ones((1, 2, 2))})
    w.close()
    assert open_store(tmp_path).steps("v") == [0]
    monkeypatch.setattr(os, "write", lambda fd, data: 0)
    with pytest.raises(OSError) as info:
        StoreWriter(tmp_path, "w", META)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path / video_dirname("w")) == []


def test_a_dead_writers_claim_is_taken_over_a_zombie_and_a_reused_pid_too(tmp_path: Path) -> None:
    """Without flock a claim of this machine is judged by its pid: one that no longer runs, runs as a zombie
    (ended, not yet reaped), or runs another process than the one that started at the claim's time is
    taken over; a live one never is, however old its claim."""
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 30
        while (lock_module._proc_stat(zombie.pid) or ("?",))[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        stat = lock_module._proc_stat(live.pid)
        assert stat is not None  # /proc (Linux), where the start time tells a reused pid
        claims = {
            "zombie": {"pid": zombie.pid, "start": None},
            "reused pid": {"pid": live.pid, "start": str(int(stat[1]) - 1)},  # the pid's process is younger
            "old lock": None,  # a bare pid, as attnmap wrote before claims (a dead writer's)
        }
        for name, fields in claims.items():
            folder = tmp_path / video_dirname(name)
            if fields is None:
                folder.mkdir()
                (folder / LOCK_FILE).write_text(str(zombie.pid))
            else:
                _claim(folder, **fields)
            with StoreWriter(tmp_path, name, META, dtype="float32") as w:
                w.write_step(0, {"token/cat": np.ones((1, 2, 2))})
            assert open_store(tmp_path).steps(name) == [0]
        lock = _claim(
            tmp_path / video_dirname("live"), pid=live.pid, start=stat[1], since="2020-01-01T00:00:00+0000"
        )
        with pytest.raises(StoreError, match=rf"is being written by process {live.pid} \(lock file"):
            StoreWriter(tmp_path, "live", META, wait=0.2)
        assert lock.exists() and not (lock.parent / "metadata.json").exists()
    finally:
        live.kill()
        live.wait(60)
        zombie.wait(60)


def test_a_stale_claim_is_removed_by_the_writer_holding_the_break_in_claim(tmp_path: Path) -> None:
    """A dead writer's claim is removed only by the writer holding ``.writer.lock.break``: while a live
    writer holds it the claim stays (the writer is refused), and a break-in claim whose writer died is
    removed in turn."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, timeout=60
    )
    folder = tmp_path / video_dirname("v")
    lock = _claim(folder, pid=int(dead.stdout), start=None, token="dead")
    brk = folder / lock_module.BREAK_FILE
    brk.write_bytes(
        lock.read_bytes()
        .replace(b'"dead"', b'"live"')
        .replace(dead.stdout.strip().encode(), str(os.getpid()).encode())
    )
    with pytest.raises(StoreError, match=rf"is being written by process {int(dead.stdout)} \(lock file"):
        StoreWriter(tmp_path, "v", META)  # the break-in is this process's, live: the claim stays
    assert json.loads(lock.read_text())["token"] == "dead"
    brk.write_bytes(lock.read_bytes())  # a break-in claim whose writer died
    with StoreWriter(tmp_path, "v", META) as w:
        assert json.loads(lock.read_text())["pid"] == os.getpid() and not brk.exists()
        w.write_step(0, {"token/cat": np.ones((1, 2, 2))})
    assert sorted(os.listdir(folder)) == [
        "aggregated.safetensors",
        "metadata.json",
        "step_000000.safetensors",
    ]


def test_a_break_in_claim_is_judged_by_flock_on_its_own_file(tmp_path: Path) -> None:
    """A break-in claim that says its writer holds flock, of a live process, whose file nobody flocks, is
    a writer gone (its claim's file descriptor closed): flock is asked of the break-in file, not of the
    lock file beside it."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, timeout=60
    )
    folder = tmp_path / video_dirname("v")
    lock = _claim(folder, pid=int(dead.stdout), start=None, token="dead")
    brk = folder / lock_module.BREAK_FILE
    brk.write_bytes(json.dumps({**json.loads(lock.read_text()), "pid": os.getpid(), "flock": True,
                                "start": None}).encode())  # fmt: skip
    with StoreWriter(tmp_path, "v", META) as w:
        assert json.loads(lock.read_text())["pid"] == os.getpid() and not brk.exists()
        w.write_step(0, {"token/cat": np.ones((1, 2, 2))})


def test_a_claim_not_readable_as_one_is_held(tmp_path: Path) -> None:
    """A claim caught half written (a file system without hard links creates it in place) is held."""
    folder = tmp_path / video_dirname("v")
    folder.mkdir()
    (folder / LOCK_FILE).write_bytes(b'{"pid": 12')
    with pytest.raises(StoreError, match=r"by another writer \(lock file .*, not readable as a claim\)"):
        StoreWriter(tmp_path, "v", META)


def test_a_writer_whose_claim_was_taken_commits_nothing_more(tmp_path: Path) -> None:
    w = StoreWriter(tmp_path, "v", META, dtype="float32")
    w.write_step(0, {"token/cat": np.ones((1, 2, 2))})
    lock = _claim(tmp_path / video_dirname("v"), host="node-7", machine="another-boot-id", pid=1)
    with pytest.raises(StoreError, match=r"was taken over by process 1 on node-7 while this writer held it"):
        w.write_step(1, {"token/cat": np.ones((1, 2, 2))})
    with pytest.raises(StoreError, match="taken over"):
        w.close()
    w.abort()
    assert lock.exists()  # it dropped its own lock only: the other writer's claim stays
    assert open_store(tmp_path).steps("v") == [0] and not open_store(tmp_path).is_complete("v")
    lock.unlink()
    w = StoreWriter(tmp_path, "w", META)
    w._lock.path.unlink()
    with pytest.raises(StoreError, match="was removed while this writer held it"):
        w.write_step(0, {"token/cat": np.ones((1, 2, 2))})
    w.abort()


# -- runs continued by a retry ----------------------------------------------------------------------
def test_a_retry_continues_its_run_and_never_changes_a_committed_step(tmp_path: Path) -> None:
    """A writer given its run's id again continues it: the steps committed stay as they are (a retried
    write of one writes nothing), the others are written, the close aggregates them all."""
    run = derive_run_id("job", "v")
    first = StoreWriter(tmp_path, "v", META, dtype="float32", storage_format="numpy", run_id=run)
    for s in range(3):
        first.write_step(s, maps(0, s, 0))
    first.abort()  # as a killed writer: steps 0-2 committed, no close
    retry = StoreWriter(
        tmp_path, "v", META, dtype="float32", storage_format="numpy", run_id=run, overwrite=False
    )
    for s in range(5):
        retry.write_step(s, maps(0, s, 1))
    with pytest.raises(AttnmapError, match="step 4 was already written in this run"):
        retry.write_step(4, maps(0, 4, 1))
    retry.close()
    store = open_store(tmp_path)
    assert store.steps("v") == store.metadata("v")["steps"] == [0, 1, 2, 3, 4] and store.is_complete("v")
    written = [0, 0, 0, 1, 1]  # the attempt whose write of each step is stored
    for s in range(5):
        assert which_attempt(0, s, {n: store.load("v", n, s) for n in store.names("v", s)}) == written[s]
    expected = np.mean([maps(0, s, written[s])["temporal"].astype(np.float64) for s in range(5)], axis=0)
    np.testing.assert_allclose(store.load("v", "temporal"), expected, rtol=1e-6)
    # a retry must write as the run was begun; another run id starts a new run (overwrite) or is refused
    with pytest.raises(StoreError, match=r"run \w+ was begun with dtype='float32', not 'float16'"):
        StoreWriter(tmp_path, "v", META, storage_format="numpy", run_id=run)
    with pytest.raises(StoreError, match=r"was begun with storage=\{'steps': 'numpy'"):
        StoreWriter(tmp_path, "v", META, dtype="float32", run_id=run)
    with pytest.raises(FileExistsError, match="already exists"):
        StoreWriter(tmp_path, "v", META, run_id="another", overwrite=False)
    assert open_store(tmp_path).steps("v") == [0, 1, 2, 3, 4]


def test_run_ids(tmp_path: Path) -> None:
    assert derive_run_id("job", "v") == derive_run_id("job", "v") != derive_run_id("job", "w")
    assert derive_run_id("a", "bc") != derive_run_id("ab", "c") and len(derive_run_id("x")) == 32
    w = StoreWriter(tmp_path, "v", META, run_id="job-17.v_1")
    assert w.run_id == "job-17.v_1" and json.loads(w._lock.path.read_text())["run_id"] == "job-17.v_1"
    w.close()
    assert open_store(tmp_path).metadata("v")["run_id"] == "job-17.v_1"
    for bad in ("", "-x", "a/b", "a b", "x" * 65, 7):
        with pytest.raises(AttnmapError, match="run_id must be 1 to 64 characters of A-Z"):
            StoreWriter(tmp_path, "w", META, run_id=bad)  # type: ignore[arg-type]
    with pytest.raises(AttnmapError, match="derive_run_id takes one or more str"):
        derive_run_id()
