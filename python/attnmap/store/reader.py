"""Reading a store: :func:`open_store`, :class:`Store`, :class:`AttentionMap`.

Every read goes through the video's file format (:mod:`attnmap.store.formats`: safetensors or the
numpy layout, as its metadata says) and every ``metadata.json`` through the schema
(:mod:`attnmap.store.schema`). A bad file never stops the rest of the store: listing and every read
over steps (:meth:`Store.step_maps`) skip it with a warning naming it, once per Store (a video whose
metadata is bad, a step that is corrupt, truncated, from another step, not a regular file, or whose
bytes fail their checksum), and a bad aggregated file falls back to the mean of the good steps.
Asking for one bad file by name (``load(vid, name, step)``) raises the StoreError.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, Union

import numpy as np

from attnmap._checks import integer
from attnmap.errors import AttnmapError, StoreError
from attnmap.store.format import DTYPES, METADATA_FILE, file_key, token_of
from attnmap.store.formats import FileFormat, StoreFile, storage, write_aggregated
from attnmap.store.lock import WriterLock
from attnmap.store.naming import check_name, check_step, video_dirname
from attnmap.store.schema import read_metadata

#: how many store files a Store keeps open between reads (the oldest is closed beyond)
MAX_OPEN_FILES = 128


@dataclass
class AttentionMap:
    """One loaded map.

    Attributes:
        map: ``[F, H, W]`` float32 array (token maps); other names keep their stored shape.
        metadata: ``video_id``, ``token``, ``name``, ``step`` (None when aggregated), ``steps``,
            ``stored_dtype``, ``file`` and ``video`` (the video's metadata dict).
    """

    map: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.map.shape)


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=4)


FileKey = tuple[int, int, int]
_T = TypeVar("_T")


def _cached(
    cache: dict[str, tuple[FileKey, Union[_T, StoreError]]], path: str, key: FileKey, load: Callable[[], _T]
) -> _T:
    """``load()`` of the file at ``path``, cached until the file is replaced (a new ``key``: inode,
    mtime or size); a bad file's StoreError is cached the same way and raised again."""
    cached = cache.get(path)
    if cached is None or cached[0] != key:
        try:
            cached = (key, load())
        except StoreError as exc:
            cached = (key, exc)
        cache[path] = cached
    found = cached[1]
    if isinstance(found, StoreError):
        raise found
    return found


class Store:
    """Reads a store root written by :class:`StoreWriter`. Build it with :func:`open_store`.

    It keeps up to :data:`MAX_OPEN_FILES` store files open between reads (a second read of a file
    skips safetensors' header parse); :meth:`close` (or a ``with`` block) closes them. Until then a
    file replaced or deleted by a writer keeps its disk space.
    """

    def __init__(self, root: Union[str, os.PathLike[str]]) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"store root {self.root} is not a directory")
        # path -> (file key, header or the StoreError it raised)
        self._headers: dict[str, tuple[FileKey, Union[StoreFile, StoreError]]] = {}
        self._open: OrderedDict[str, StoreFile] = OrderedDict()
        self._metas: dict[str, tuple[FileKey, Union[dict[str, Any], StoreError]]] = {}
        self._told: set[str] = set()  # the bad files already named in a warning
        self._told_lock = threading.Lock()  # renders of one Store run in threads

    def _skip(self, path: Union[str, Path], exc: Exception, consequence: str) -> None:
        """Warn of the bad file ``path`` (``exc`` says what is wrong) once for this Store: a command that
        meets the same bad step again (another map of it, another read of the same map) says so once."""
        with self._told_lock:
            first = os.fspath(path) not in self._told
            self._told.add(os.fspath(path))
        if first:
            _warn(f"{exc}; {consequence}")

    def close(self) -> None:
        """Close the store files kept open (a later read opens them again)."""
        for header in self._open.values():
            header.release()
        self._open.clear()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- files ------------------------------------------------------------------------------
    def _dir(self, video_id: str) -> Path:
        path = self.root / video_dirname(video_id)
        if not os.path.lexists(path / METADATA_FILE):
            raise KeyError(f"video {video_id!r} is not in the store at {self.root}")
        return path

    def _formats(self, video_id: str) -> tuple[FileFormat, FileFormat]:
        """The formats of the video's steps and of its aggregate (its metadata's ``storage``)."""
        return storage(self._video_meta(video_id))

    def _header(self, fmt: FileFormat, path: Union[str, Path], step: Optional[int] = None) -> StoreFile:
        """The checked step or aggregate at ``path`` (in ``fmt``), cached until the file is replaced
        (new inode, mtime or size); a bad file's StoreError is cached the same way."""
        path = os.fspath(path)

        def load() -> StoreFile:
            old = self._open.pop(path, None)  # the replaced file's handle
            if old is not None:
                old.release()
            return fmt.read(path, step=step)

        found = _cached(self._headers, path, file_key(path, fmt.kind), load)
        self._open[path] = found
        self._open.move_to_end(path)
        while len(self._open) > MAX_OPEN_FILES:
            self._open.popitem(last=False)[1].release()
        return found

    def _step_files(self, video_id: str) -> dict[int, str]:
        """step -> path of every entry named like a step of the video's format (nothing is opened)."""
        return self._formats(video_id)[0].step_files(self._dir(video_id))

    def _good_step(self, video_id: str, step: int, path: str) -> Optional[StoreFile]:
        """The header of a step file of the current run; None for another run's file, and for a bad
        file after a warning naming it."""
        run = self._video_meta(video_id)["run_id"]
        try:
            header = self._header(self._formats(video_id)[0], path, step)
        except StoreError as exc:
            self._skip(path, exc, f"step {step} is skipped")
            return None
        return header if header.metadata.get("run_id") == run else None

    def _current(self, video_id: str, step: int) -> StoreFile:
        """The header of one step of the current run, asked for by name: StoreError when it is bad."""
        fmt = self._formats(video_id)[0]
        path = fmt.unit_path(self._dir(video_id), check_step(step))
        header = self._header(fmt, path, step)
        run = self._video_meta(video_id)["run_id"]
        if header.metadata.get("run_id") != run:
            raise StoreError(
                f"Store file {path} belongs to run {header.metadata.get('run_id')!r}, not the current run {run!r}"
            )
        return header

    def _agg_header(self, video_id: str) -> Optional[StoreFile]:
        """The current run's aggregated file, or None when it is missing, left by an older run (the
        run died before ``close``) or bad (with a warning): the aggregated maps then come from the
        good steps. An empty file means the run chose not to store them."""
        fmt = self._formats(video_id)[1]
        path = fmt.unit_path(self._dir(video_id), None)
        if not os.path.lexists(path):
            return None
        try:
            header = self._header(fmt, path)
        except StoreError as exc:
            self._skip(path, exc, "the aggregated maps are the mean of the good steps instead")
            return None
        if header.metadata.get("run_id") != self._video_meta(video_id)["run_id"]:
            return None
        return header

    # -- listing ----------------------------------------------------------------------------
    def videos(self) -> list[str]:
        """The video ids in the store, sorted. A video whose metadata.json is bad (not a regular
        file, not JSON, off the schema, or in another video's folder) is skipped with a warning
        naming the file."""
        out = []
        with os.scandir(self.root) as it:
            folders = sorted(e.path for e in it if e.is_dir())
        for d in folders:
            meta = Path(d) / METADATA_FILE
            if not os.path.lexists(meta):
                continue  # not a video folder
            try:
                video_id = self._load_metadata(meta)["video_id"]
            except StoreError as exc:
                self._skip(meta, exc, "the video is skipped")
                continue
            if video_dirname(video_id) != Path(d).name:
                _warn(f"Store file {meta} is for video {video_id!r}, whose folder is another; it is skipped")
                continue
            out.append(video_id)
        return sorted(out)

    def _load_metadata(self, path: Path) -> dict[str, Any]:
        return _cached(self._metas, str(path), file_key(path, "JSON"), lambda: read_metadata(path))

    def metadata(self, video_id: str) -> dict[str, Any]:
        """The video's metadata dict (the caller's keys plus the store's); a fresh copy."""
        return json.loads(json.dumps(self._video_meta(video_id)))

    def _video_meta(self, video_id: str) -> dict[str, Any]:
        path = self._dir(video_id) / METADATA_FILE
        meta = self._load_metadata(path)
        if meta["video_id"] != video_id:
            raise StoreError(f"Store file {path} is for video {meta['video_id']!r}, not {video_id!r}")
        return meta

    def steps(self, video_id: str) -> list[int]:
        """Steps of the current run whose files are good, sorted. Files of an older run are left out,
        and so is a bad file, with a warning naming it (loading that step raises StoreError)."""
        files = self._step_files(video_id)
        return [s for s in sorted(files) if self._good_step(video_id, s, files[s]) is not None]

    def is_complete(self, video_id: str) -> bool:
        """True when the writer closed the run (the aggregated maps were written)."""
        return bool(self._video_meta(video_id).get("complete"))

    def names(self, video_id: str, step: Optional[int] = None) -> list[str]:
        """Map names of one step (``step=None``: of the aggregated maps, or the union over the good
        steps when the run has no good aggregated file or stored an empty one)."""
        if step is not None:
            return sorted(self._current(video_id, step).entries)
        agg = self._agg_header(video_id)
        if agg is not None and agg.entries:
            return sorted(agg.entries)
        return self._step_names(video_id)

    def tokens(self, video_id: str) -> list[str]:
        """Words with a token map (``token/<word>``), in the order of the metadata's targets, then
        sorted."""
        words = {w for n in self.names(video_id) if (t := token_of(n)) for w in [t[0]]}
        targets = self._video_meta(video_id).get("targets") or {}
        ordered = [w for w in targets if w in words]
        return ordered + sorted(words - set(ordered))

    # -- loading ----------------------------------------------------------------------------
    def load(self, video_id: str, name: str, step: Optional[int] = None) -> np.ndarray:
        """Any stored map by name (``temporal``, ``text``, ``received``, ``token/cat/block3``...).

        Args:
            video_id: the video.
            name: the map name inside a step file.
            step: the step, or None for the aggregated map.

        Returns:
            float32 array of the stored shape.

        Raises:
            StoreError: the step's file is bad (named in the message).
            KeyError: no such video, step file or map.
        """
        check_name(name)
        if step is None:
            return self._load_aggregated(video_id, name)[0]
        header = self._current(video_id, step)
        if name not in header.entries:
            raise KeyError(f"map {name!r} is not in {header.path}; it has {sorted(header.entries)}")
        return header.read(name).astype(np.float32, copy=False)

    def mean(self, video_id: str, name: str, steps: Optional[Iterable[int]] = None) -> np.ndarray:
        """The mean of one map over the chosen good steps of the current run: the one aggregation
        over steps (the aggregated file, its fallback and :meth:`rebuild_aggregated` are this mean).

        Values are summed in float64 and the mean is rounded to the stored dtype, so it equals what
        the aggregated file of the same steps holds. Steps left out are never opened; a chosen step
        that is bad, lacks the map or holds it in another shape is skipped with a warning naming it.

        Args:
            video_id: the video.
            name: the map name (``token/cat``, ``temporal``, ...).
            steps: the steps to average (any iterable of ints, e.g. ``range(10, 20)``); None: every
                step. Steps not in the store are left out (a list's are named in a warning).

        Returns:
            float32 array of the stored shape.

        Raises:
            KeyError: no chosen good step holds the map.

        Example:
            >>> store.mean("vid", "token/cat", steps=range(25, 50)).shape   # doctest: +SKIP
            (21, 30, 52)
        """
        return self._mean(video_id, name, steps)[0]

    def step_maps(
        self, video_id: str, name: str, steps: Optional[Iterable[int]] = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(step, map)`` of one map at each chosen good step of the current run that holds it, in step
        order: the one read over steps, which every aggregation, series and page goes through.

        A chosen step whose file is bad, or whose map fails its checksum, is skipped with a warning
        naming the file (once per Store); steps left out are never opened.

        Args:
            video_id: the video.
            name: the map name (``token/cat``, ``temporal/block3``, ...).
            steps: as in :meth:`mean`; None: every step.

        Yields:
            the step and its map, float32 of the stored shape.

        Example:
            >>> [s for s, _ in store.step_maps("vid", "temporal")]   # doctest: +SKIP
            [0, 1, 2]
        """
        check_name(name)
        files = self._step_files(video_id)
        for s in self._chosen(video_id, files, steps):
            header = self._good_step(video_id, s, files[s])
            if header is None or name not in header.entries:
                continue
            try:
                arr = header.read(name)
            except StoreError as exc:
                self._skip(header.path, exc, f"step {s} is skipped")
                continue
            yield s, arr.astype(np.float32, copy=False)

    def _mean(self, video_id: str, name: str, steps: Optional[Iterable[int]]) -> tuple[np.ndarray, list[int]]:
        meta = self._video_meta(video_id)
        total: Optional[np.ndarray] = None
        used = []
        for s, arr in self.step_maps(video_id, name, steps):
            if total is None:
                total = arr.astype(np.float64)
            elif arr.shape != total.shape:
                _warn(
                    f"map {name!r} of step {s} has shape {arr.shape}, not {total.shape}; step {s} is skipped"
                )
                continue
            else:
                total += arr
            used.append(s)
        if total is None:
            which = "" if steps is None else " among the chosen steps"
            raise KeyError(f"map {name!r} of video {video_id!r} is in no good step{which}")
        mean = (total / len(used)).astype(DTYPES[meta["dtype"]])
        return mean.astype(np.float32), used

    def _chosen(self, video_id: str, files: dict[int, str], steps: Optional[Iterable[int]]) -> list[int]:
        """The steps of ``files`` that ``steps`` chooses, sorted; ``steps`` is never expanded (a
        ``range`` of 10^8 steps costs what the folder's files cost)."""
        if steps is None:
            return sorted(files)
        if isinstance(steps, range):
            return [s for s in sorted(files) if s in steps]
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
            raise AttnmapError(f"steps must be an iterable of step numbers or None, got {steps!r}")
        chosen: set[int] = set()
        missing: list[int] = []
        for s in steps:
            s = check_step(s)
            if s in files:
                chosen.add(s)
            elif len(missing) < 6:
                missing.append(s)
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
            _warn(f"video {video_id!r}: steps {shown} are not in the store; they are left out")
        return sorted(chosen)

    def _load_aggregated(self, video_id: str, name: str) -> tuple[np.ndarray, dict[str, Any]]:
        path = self._formats(video_id)[1].unit_path(self._dir(video_id), None)
        header = self._agg_header(video_id)
        if header is not None:
            if not header.entries:
                raise KeyError(
                    f"map {name!r}: the run stored no aggregated maps in {path} (store_aggregated_attention"
                    " false); use mean or load_all_steps, or rebuild_aggregated to write the mean over the steps"
                )
            if name not in header.entries:
                raise KeyError(f"map {name!r} is not in {path}; it has {sorted(header.entries)}")
            try:
                arr = header.read(name)
            except StoreError as exc:
                self._skip(header.path, exc, "the aggregated map is the mean of the good steps instead")
            else:
                steps = json.loads(header.metadata.get("steps", "[]"))
                info = {"file": str(path), "steps": steps, "rebuilt": False}
                return arr.astype(np.float32, copy=False), info
        mean, used = self._mean(video_id, name, None)
        return mean, {"file": None, "steps": used, "rebuilt": True}

    def map_name(
        self, video_id: str, token: str, *, block: Optional[int] = None, branch: Optional[str] = None
    ) -> str:
        """The stored name of a word's map: ``token/<word>``, ``token/<word>/block<b>``, with an
        ``uncond/`` prefix for the unconditional guidance branch.

        Args:
            video_id: the video.
            token: a word of :meth:`tokens`.
            block: one block's map (stored with per_block), or None for the mean over blocks.
            branch: ``"cond"`` or ``"uncond"``; None: the branch the video recorded (``"cond"``
                when it recorded both).
        """
        check_name(token, "token")
        if branch is None:
            branch = "uncond" if self._video_meta(video_id).get("branch") == "uncond" else "cond"
        if branch not in ("cond", "uncond"):
            raise AttnmapError(f"branch must be 'cond', 'uncond' or None, got {branch!r}")
        name = f"token/{token}" if block is None else f"token/{token}/block{integer('block', block, low=0)}"
        return name if branch == "cond" else f"uncond/{name}"

    def _as_map(self, arr: np.ndarray, name: str) -> np.ndarray:
        if arr.ndim == 4:  # per-head [heads, F, H, W]: mean over heads
            arr = arr.mean(axis=0)
        if arr.ndim != 3:
            raise StoreError(f"token map {name!r} has shape {arr.shape}, expected [F, H, W]")
        return arr

    def load_step(
        self,
        video_id: str,
        token: str,
        step: int,
        *,
        block: Optional[int] = None,
        branch: Optional[str] = None,
    ) -> AttentionMap:
        """The ``[F, H, W]`` map of one word at one step (``block``, ``branch``: see :meth:`map_name`)."""
        name = self.map_name(video_id, token, block=block, branch=branch)
        arr = self._as_map(self.load(video_id, name, check_step(step)), name)
        path = self._formats(video_id)[0].unit_path(self._dir(video_id), step)
        return AttentionMap(arr, self._map_meta(video_id, token, name, step, [step], str(path)))

    def load_all_steps(
        self, video_id: str, token: str, *, block: Optional[int] = None, branch: Optional[str] = None
    ) -> list[AttentionMap]:
        """The maps of one word at every good step of the current run, in step order (a bad step is
        skipped with a warning naming its file; ``block``, ``branch``: see :meth:`map_name`)."""
        name = self.map_name(video_id, token, block=block, branch=branch)
        meta = self._video_meta(video_id)
        video = json.loads(json.dumps(meta))  # one copy shared by the maps of this call
        d, fmt = self._dir(video_id), self._formats(video_id)[0]
        out = []
        for step, arr in self.step_maps(video_id, name):
            file = str(fmt.unit_path(d, step))
            try:
                token_map = self._as_map(arr, name)
            except StoreError as exc:
                self._skip(file, exc, f"step {step} is skipped")
                continue
            info = {"video_id": video_id, "token": token, "name": name, "step": step, "steps": [step]}
            out.append(
                AttentionMap(
                    token_map, {**info, "stored_dtype": meta.get("dtype"), "file": file, "video": video}
                )
            )
        if not out:
            raise KeyError(f"token {token!r} has no step maps in video {video_id!r}")
        return out

    def aggregated(
        self, video_id: str, token: str, *, block: Optional[int] = None, branch: Optional[str] = None
    ) -> AttentionMap:
        """The step-aggregated ``[F, H, W]`` map of one word (the mean of the good steps when the run
        died before writing it or its file is bad; ``metadata["rebuilt"]`` says so; ``block``,
        ``branch``: see :meth:`map_name`)."""
        name = self.map_name(video_id, token, block=block, branch=branch)
        arr, info = self._load_aggregated(video_id, name)
        meta = self._map_meta(video_id, token, name, None, info["steps"], info["file"])
        meta["rebuilt"] = info["rebuilt"]
        return AttentionMap(self._as_map(arr, name), meta)

    def rebuild_aggregated(self, video_id: str) -> Path:
        """Write the aggregated file from the good steps of the current run (after a crash), each
        map the :meth:`mean` of the steps that hold it. Refused while a writer of the video is live.

        Returns:
            Path of the aggregated file.
        """
        d = self._dir(video_id)
        with WriterLock(d, video_id):
            meta = self._video_meta(video_id)
            names = self._step_names(video_id)
            if not names:
                raise AttnmapError(f"video {video_id!r} has no good step to aggregate")
            dtype = DTYPES[meta["dtype"]]
            agg, counts, steps = {}, {}, set()
            for name in names:
                mean, used = self._mean(video_id, name, None)
                agg[name], counts[name] = mean.astype(dtype), len(used)
                steps.update(used)
            how = "mean over steps (rebuilt)"
            return write_aggregated(
                self._formats(video_id)[1], d, agg, meta["run_id"], sorted(steps), counts, how
            )

    def _step_names(self, video_id: str) -> list[str]:
        """The union of the map names of the good steps."""
        files = self._step_files(video_id)
        names: set[str] = set()
        for s in sorted(files):
            header = self._good_step(video_id, s, files[s])
            if header is not None:
                names.update(header.entries)
        return sorted(names)

    def _map_meta(
        self, video_id: str, token: str, name: str, step: Optional[int], steps: list[int], file: Optional[str]
    ) -> dict[str, Any]:
        video = self.metadata(video_id)
        return {
            "video_id": video_id,
            "token": token,
            "name": name,
            "step": step,
            "steps": steps,
            "stored_dtype": video.get("dtype"),
            "file": file,
            "video": video,
        }


def open_store(root: Union[str, os.PathLike[str]]) -> Store:
    """Open a store root for reading.

    Example:
        >>> store = open_store("outputs/attention_maps")
        >>> store.load_step(store.videos()[0], "cat", 0).map.shape
        (21, 30, 52)
    """
    return Store(root)
