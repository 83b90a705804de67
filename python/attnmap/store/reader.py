"""Reading a store: :func:`open_store`, :class:`Store`, :class:`AttentionMap`."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from attnmap.errors import AttnmapError, StoreError
from attnmap.store.format import (
    AGGREGATED_FILE,
    DTYPES,
    METADATA_FILE,
    STEP_RE,
    Header,
    read_header,
    read_tensor,
    token_of,
)
from attnmap.store.naming import check_name, check_step, step_filename, video_dirname
from attnmap.store.writer import write_aggregated


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


class Store:
    """Reads a store root written by :class:`StoreWriter`. Build it with :func:`open_store`."""

    def __init__(self, root: Union[str, os.PathLike[str]]) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"store root {self.root} is not a directory")
        self._headers: dict[str, tuple[tuple[int, int, int], Header]] = {}
        self._metas: dict[Path, tuple[tuple[int, int, int], dict[str, Any]]] = {}

    # -- helpers ----------------------------------------------------------------------------
    def _dir(self, video_id: str) -> Path:
        path = self.root / video_dirname(video_id)
        if not (path / METADATA_FILE).is_file():
            raise KeyError(f"video {video_id!r} is not in the store at {self.root}")
        return path

    def _header(self, path: Union[str, Path]) -> Header:
        """The parsed header of ``path``, cached until the file is replaced (new inode, mtime or size)."""
        path = os.fspath(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise StoreError(f"Store file {path} does not exist") from None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._headers.get(path)
        if cached and cached[0] == key:
            return cached[1]
        header = read_header(Path(path))
        self._headers[path] = (key, header)
        return header

    def _current(self, video_id: str, path: Path) -> Header:
        header = self._header(path)
        run = self._video_meta(video_id)["run_id"]
        if header.metadata.get("run_id") != run:
            raise StoreError(
                f"Store file {path} belongs to run {header.metadata.get('run_id')!r}, not the current run {run!r}"
            )
        return header

    def _agg_header(self, video_id: str) -> Optional[Header]:
        """The current run's aggregated file, or None when it is missing or left by an older run
        (the run died before ``close``): the aggregated maps then come from the finished steps.
        An empty file means the run chose not to store them."""
        path = self._dir(video_id) / AGGREGATED_FILE
        if not path.is_file():
            return None
        header = self._header(path)
        if header.metadata.get("run_id") != self._video_meta(video_id)["run_id"]:
            return None
        return header

    # -- listing ----------------------------------------------------------------------------
    def videos(self) -> list[str]:
        """The video ids in the store, sorted. A video whose metadata.json is unreadable is
        skipped with a warning naming the file."""
        out = []
        for d in sorted(self.root.iterdir()):
            meta = d / METADATA_FILE
            if not d.is_dir() or not meta.is_file():
                continue
            try:
                out.append(self._load_metadata(meta)["video_id"])
            except StoreError as exc:
                warnings.warn(str(exc), stacklevel=2)
        return sorted(out)

    def _load_metadata(self, path: Path) -> dict[str, Any]:
        try:
            st = path.stat()
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            cached = self._metas.get(path)
            if cached and cached[0] == key:
                return cached[1]
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(f"Corrupt store file {path}: {exc}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("video_id"), str) or "run_id" not in meta:
            raise StoreError(f"Corrupt store file {path}: not an attnmap video metadata object")
        self._metas[path] = (key, meta)
        return meta

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
        """Steps of the current run whose files are present, sorted. Files of an older run are
        skipped, and so is a corrupt file, with a warning naming it (loading that step raises
        StoreError)."""
        d = self._dir(video_id)
        run = self._video_meta(video_id)["run_id"]
        out = []
        for p in d.iterdir():
            m = STEP_RE.match(p.name)
            if not m:
                continue
            try:
                header = self._header(p)
            except StoreError as exc:
                warnings.warn(f"{exc}; step {int(m.group(1))} is skipped", stacklevel=2)
                continue
            if header.metadata.get("run_id") == run:
                out.append(int(m.group(1)))
        return sorted(out)

    def is_complete(self, video_id: str) -> bool:
        """True when the writer closed the run (the aggregated maps were written)."""
        return bool(self._video_meta(video_id).get("complete"))

    def names(self, video_id: str, step: Optional[int] = None) -> list[str]:
        """Map names of one step (``step=None``: of the aggregated maps, or the union over steps
        when the run has no aggregated file or stored an empty one)."""
        if step is not None:
            return sorted(self._current(video_id, self._dir(video_id) / step_filename(step)).entries)
        agg = self._agg_header(video_id)
        if agg is not None and agg.entries:
            return sorted(agg.entries)
        names: set[str] = set()
        for s in self.steps(video_id):
            names.update(self._header(self._dir(video_id) / step_filename(s)).entries)
        return sorted(names)

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
        """
        check_name(name)
        if step is None:
            return self._load_aggregated(video_id, name)[0]
        path = self._dir(video_id) / step_filename(step)
        header = self._current(video_id, path)
        if name not in header.entries:
            raise KeyError(f"map {name!r} is not in {path}; it has {sorted(header.entries)}")
        return read_tensor(header, name).astype(np.float32, copy=False)

    def _load_aggregated(self, video_id: str, name: str) -> tuple[np.ndarray, dict[str, Any]]:
        d = self._dir(video_id)
        path = d / AGGREGATED_FILE
        header = self._agg_header(video_id)
        if header is not None:
            if not header.entries:
                raise KeyError(
                    f"map {name!r}: the run stored no aggregated maps in {path} (store_aggregated_attention"
                    " false); use load_all_steps, or rebuild_aggregated to write the mean over the steps"
                )
            if name not in header.entries:
                raise KeyError(f"map {name!r} is not in {path}; it has {sorted(header.entries)}")
            info = {
                "file": str(path),
                "steps": json.loads(header.metadata.get("steps", "[]")),
                "rebuilt": False,
            }
            return read_tensor(header, name).astype(np.float32, copy=False), info
        steps = [s for s in self.steps(video_id) if name in self._header(d / step_filename(s)).entries]
        if not steps:
            raise KeyError(f"map {name!r} of video {video_id!r} has no aggregated file and no finished step")
        total = sum(read_tensor(self._header(d / step_filename(s)), name).astype(np.float64) for s in steps)
        mean = (np.asarray(total) / len(steps)).astype(DTYPES[self._video_meta(video_id)["dtype"]])
        return mean.astype(np.float32), {"file": None, "steps": steps, "rebuilt": True}

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
        name = f"token/{token}" if block is None else f"token/{token}/block{int(block)}"
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
        path = self._dir(video_id) / step_filename(step)
        return AttentionMap(arr, self._map_meta(video_id, token, name, step, [step], str(path)))

    def load_all_steps(
        self, video_id: str, token: str, *, block: Optional[int] = None, branch: Optional[str] = None
    ) -> list[AttentionMap]:
        """The maps of one word at every finished step of the current run, in step order (a
        corrupt step file raises StoreError naming it; ``block``, ``branch``: see :meth:`map_name`)."""
        name = self.map_name(video_id, token, block=block, branch=branch)
        d = self._dir(video_id)
        meta = self._video_meta(video_id)
        video = json.loads(json.dumps(meta))  # one copy shared by the maps of this call
        files = []
        with os.scandir(d) as it:
            for e in it:
                m = STEP_RE.match(e.name)
                if m:
                    files.append((int(m.group(1)), e.path))
        out = []
        for step, path in sorted(files):
            header = self._header(path)
            if header.metadata.get("run_id") != meta["run_id"] or name not in header.entries:
                continue
            arr = self._as_map(read_tensor(header, name).astype(np.float32, copy=False), name)
            info = {"video_id": video_id, "token": token, "name": name, "step": step, "steps": [step]}
            out.append(
                AttentionMap(arr, {**info, "stored_dtype": meta.get("dtype"), "file": path, "video": video})
            )
        if not out:
            raise KeyError(f"token {token!r} has no step maps in video {video_id!r}")
        return out

    def aggregated(
        self, video_id: str, token: str, *, block: Optional[int] = None, branch: Optional[str] = None
    ) -> AttentionMap:
        """The step-aggregated ``[F, H, W]`` map of one word (rebuilt from the finished steps when
        the run died before writing it; ``metadata["rebuilt"]`` says so; ``block``, ``branch``:
        see :meth:`map_name`)."""
        name = self.map_name(video_id, token, block=block, branch=branch)
        arr, info = self._load_aggregated(video_id, name)
        meta = self._map_meta(video_id, token, name, None, info["steps"], info["file"])
        meta["rebuilt"] = info["rebuilt"]
        return AttentionMap(self._as_map(arr, name), meta)

    def rebuild_aggregated(self, video_id: str) -> Path:
        """Write the aggregated file from the finished steps of the current run (after a crash).

        Returns:
            Path of the aggregated file.
        """
        d = self._dir(video_id)
        meta = self._video_meta(video_id)
        steps = self.steps(video_id)
        if not steps:
            raise AttnmapError(f"video {video_id!r} has no finished step to aggregate")
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        for s in steps:
            header = self._header(d / step_filename(s))
            for name in header.entries:
                arr = read_tensor(header, name)
                if name in sums:
                    sums[name] += arr
                    counts[name] += 1
                else:
                    sums[name] = arr.astype(np.float64)
                    counts[name] = 1
        dtype = DTYPES[meta["dtype"]]
        agg = {n: (s / counts[n]).astype(dtype) for n, s in sums.items()}
        write_aggregated(d, agg, meta["run_id"], steps, counts, "mean over steps (rebuilt)")
        return d / AGGREGATED_FILE

    def show(self, video_id: Optional[str] = None) -> Any:
        """The interactive viewer of one video (default: every video) for a notebook: its
        ``_repr_html_`` shows it inline (see :mod:`attnmap.render.report`)."""
        from attnmap.render.report import store_viewer

        return store_viewer(self, None if video_id is None else [video_id])

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
