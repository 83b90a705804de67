"""Writing one video's maps: :class:`StoreWriter`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from attnmap._checks import integer
from attnmap._io import atomic_write
from attnmap.errors import AttnmapError, StoreError
from attnmap.store.format import (
    CHECKSUM_KEY,
    DTYPES,
    FORMAT,
    FP16_MAX,
    METADATA_FILE,
    RESERVED_KEYS,
    SCHEMA_VERSION,
    STORAGE_FORMATS,
    ArrayLike,
    downsample_spatial,
    is_token_name,
    to_numpy,
)
from attnmap.store.formats import check_storage, file_format, step_metadata, write_aggregated
from attnmap.store.lock import WriterLock
from attnmap.store.naming import check_name, check_step, check_video_id, video_dirname
from attnmap.store.reader import Store
from attnmap.store.schema import problem, read_metadata

#: what a run id given to :class:`StoreWriter` may be: it lands in file metadata and lock claims
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: the ``storage`` of a video whose metadata has none (written before the numpy format)
_SAFETENSORS_ONLY = {"steps": "safetensors", "aggregated": "safetensors", "compressed": False}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def check_run_id(run_id: Any) -> str:
    """A run id given by the caller, or an AttnmapError naming what a run id may be."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise AttnmapError(
            "run_id must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', '-' (the first a letter or "
            f"digit), got {run_id!r}; derive_run_id(...) makes one from any strings"
        )
    return run_id


def derive_run_id(*parts: str) -> str:
    """A run id that every attempt of the same work computes again (32 hex digits of SHA-256 over
    ``parts``), so that a retried writer continues its run (see :class:`StoreWriter`'s ``run_id``).

    Args:
        parts: strings that name the work, e.g. a job id and the video id (``TORCHELASTIC_RUN_ID`` or
            ``SLURM_JOB_ID`` with the video id; the same across a job's restarts, distinct between jobs).

    Example:
        >>> derive_run_id("job-17", "cat_001") == derive_run_id("job-17", "cat_001")
        True
    """
    if not parts or not all(isinstance(p, str) for p in parts):
        raise AttnmapError(f"derive_run_id takes one or more str, got {parts!r}")
    return hashlib.sha256(json.dumps(list(parts)).encode("utf-8")).hexdigest()[:32]


def _aggregation(steps: str, downsample: int) -> dict[str, Any]:
    """The ``aggregation`` metadata: how each stored value was reduced (the capture contract)."""
    return {
        "steps": steps,
        "token_maps": "sub-tokens summed; mean over blocks and heads (token/<word>/block<b>: one block)",
        "maps": "mean over blocks (<name>/block<b>: one block); per-head maps keep H first",
        "spatial_downsample": f"mean over {downsample}x{downsample} latent cells",
    }


class StoreWriter:
    """Writes one video's maps: each step as soon as it is complete, then the aggregated maps.

    Args:
        root: the store root (created if missing).
        video_id: any non-empty str; it never becomes a path outside ``root``.
        metadata: JSON-safe dict (model, prompt, targets, layout, grid, ...), see DEVELOPERS.md.
        dtype: ``"float16"`` or ``"float32"``: the storage dtype of every map.
        downsample: int >= 1; token maps ``token/...`` of shape ``[..., F, H, W]`` are averaged
            over ``downsample x downsample`` spatial blocks before storing.
        overwrite: when the video id already exists, True replaces the old run (only after the
            new run's metadata is written cleanly), False raises FileExistsError.
        wait: one writer per video id at a time: seconds to wait while another writer (another
            process, or another StoreWriter of this one) holds the video's lock; 0 raises a
            StoreError naming it at once, None waits as long as it takes. The lock is dropped by
            :meth:`close`, by leaving a ``with`` block, or when the process ends.
        storage_format: ``"safetensors"`` (one file per step) or ``"numpy"`` (the per-token ``.npz``
            layout, :mod:`attnmap.store.npz`); ``"torch"`` is refused (torch.save writes pickle).
        aggregated_format: the aggregated maps' format; None: ``storage_format``.
        compress: compressed ``.npz`` files (``np.savez_compressed``); needs the numpy format.
        run_id: the run this writer writes (1 to 64 characters of ``[A-Za-z0-9._-]``); None: a new
            random one. A writer given the run id its video's metadata already names continues that
            run (the retry of a killed writer): the steps that run committed stay as they are (a
            retried :meth:`write_step` of one of them writes nothing: a run's committed step never
            changes), and it writes the others; ``dtype``, ``downsample`` and the formats must be the
            run's. Any other run id starts a new run (``overwrite``). :func:`derive_run_id` makes
            one that every attempt of the same work computes again.

    Many processes may write one store root at once, each its own videos; two writers of one video
    id never mix their steps: the second is refused (or waits, ``wait``), also where flock does not
    work (:mod:`attnmap.store.lock`).

    Example:
        >>> with StoreWriter("attention_maps", "vid", {"prompt": "a (cat)"}) as w:
        ...     w.write_step(0, {"token/cat": maps})
    """

    def __init__(
        self,
        root: Union[str, os.PathLike[str]],
        video_id: str,
        metadata: Optional[Mapping[str, Any]] = None,
        *,
        dtype: str = "float16",
        downsample: int = 1,
        overwrite: bool = True,
        wait: Optional[float] = 0.0,
        storage_format: str = "safetensors",
        aggregated_format: Optional[str] = None,
        compress: bool = False,
        run_id: Optional[str] = None,
    ) -> None:
        from attnmap import __version__

        self.video_id = check_video_id(video_id)
        steps_format, agg_format = check_storage(storage_format, aggregated_format, compress=compress)
        if dtype not in DTYPES:
            raise AttnmapError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
        downsample = integer("downsample", downsample, low=1)
        metadata = dict(metadata or {})
        for key in RESERVED_KEYS:
            if key in metadata and not (key == "video_id" and metadata[key] == video_id):
                raise AttnmapError(f"metadata key {key!r} is reserved by the store; rename it")
        self.dtype = dtype
        self.downsample = downsample
        self.run_id = uuid.uuid4().hex if run_id is None else check_run_id(run_id)
        self.root = Path(root)
        self.path = self.root / video_dirname(video_id)
        self._np_dtype = DTYPES[dtype]
        video = metadata.get("video")
        self.steps_format = file_format(steps_format, compress=compress, video=video)
        self.aggregated_format = file_format(agg_format, compress=compress, video=video)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._steps: list[int] = []  # written by this writer
        self._committed: set[int] = set()  # committed by an earlier writer of this run (a retry's)
        self._closed = False
        self.metadata: dict[str, Any] = {
            **metadata,
            "schema_version": SCHEMA_VERSION,
            "format": FORMAT,
            "attnmap_version": __version__,
            "video_id": video_id,
            "run_id": self.run_id,
            "dtype": dtype,
            "downsample": downsample,
            "aggregation": _aggregation("mean over the written steps", downsample),
            "checksum": CHECKSUM_KEY,
            "storage": {"steps": steps_format, "aggregated": agg_format, "compressed": compress},
            "created": _now(),
            "complete": False,
        }
        try:
            encoded = json.dumps(self.metadata, indent=1, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise AttnmapError(
                f"metadata must be JSON-safe (str keys, finite numbers, lists, dicts): {exc}"
            ) from None
        bad = problem(json.loads(encoded))  # what a reader would refuse (tuples became lists)
        if bad is not None:
            raise AttnmapError(f"metadata: {bad}")
        self._lock = WriterLock(self.path, video_id, wait=wait, run_id=self.run_id)
        if self._other_run() and not overwrite:
            raise FileExistsError(
                f"video {video_id!r} already exists in the store at {self.path}; pass overwrite=True"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            self._start(encoded, overwrite)
        except BaseException:
            self._lock.release()
            raise

    def _stored(self) -> Optional[dict[str, Any]]:
        """The video's metadata as stored: None when there is none, {} when it is bad."""
        path = self.path / METADATA_FILE
        if not os.path.lexists(path):
            return None
        try:
            return read_metadata(path)
        except StoreError:
            return {}

    def _other_run(self) -> bool:
        """Whether the video holds a run other than this writer's."""
        stored = self._stored()
        return stored is not None and stored.get("run_id") != self.run_id

    def _start(self, encoded: bytes, overwrite: bool) -> None:
        """Under the lock: continue this run when the metadata names it; else commit the new run's
        metadata, then remove the old run's files."""
        self._lock.check()
        stored = self._stored()
        if stored is not None and stored.get("run_id") == self.run_id:
            self._resume(stored)
            return
        if stored is not None and not overwrite:  # another writer created it while this one waited
            raise FileExistsError(
                f"video {self.video_id!r} already exists in the store at {self.path}; pass overwrite=True"
            )
        # the old run's files, in whichever format it wrote
        old = [p for name in STORAGE_FORMATS for p in file_format(name).run_files(self.path)]
        # The commit point: once metadata.json names the new run, files of the old run are ignored.
        atomic_write(self.path / METADATA_FILE, encoded)
        for p in old:
            p.unlink(missing_ok=True)
        self._sweep()
        for folder in {p.parent for p in old} - {self.path}:  # a format's subfolders left empty
            with contextlib.suppress(OSError):
                folder.rmdir()

    def _sweep(self) -> None:
        """Remove the temp files of a dead writer (a live one holds the lock), the formats' included."""
        temps = [p for name in STORAGE_FORMATS for p in file_format(name).run_files(self.path)]
        for p in [p for p in temps if p.name.startswith(".")] + list(self.path.glob(".*.tmp*")):
            p.unlink(missing_ok=True)

    def _resume(self, stored: dict[str, Any]) -> None:
        """Under the lock: continue the run the metadata names (this writer's): its good steps are
        committed and stay; the metadata says the run is open again."""
        before = {**stored, "storage": stored.get("storage", _SAFETENSORS_ONLY)}
        for key in ("dtype", "downsample", "storage"):
            if before.get(key) != self.metadata[key]:
                raise StoreError(
                    f"video {self.video_id!r}: run {self.run_id} was begun with {key}={before.get(key)!r}, "
                    f"not {self.metadata[key]!r}; continue it with the same {key}, or start a new run with "
                    "another run_id"
                )
        with Store(self.root) as store:
            files = store._step_files(self.video_id)
            for step in sorted(files):
                header = store._good_step(self.video_id, step, files[step])
                if header is not None:
                    self._committed.add(step)
                    for name, entry in header.entries.items():
                        self._shapes.setdefault(name, entry.shape)
        self.metadata["created"] = stored.get("created", self.metadata["created"])
        atomic_write(self.path / METADATA_FILE, json.dumps(self.metadata, indent=1).encode("utf-8"))
        self._sweep()

    # -- context manager --------------------------------------------------------------------
    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None and not self._closed:
            self.close()
        else:
            self.abort()

    def abort(self) -> None:
        """Stop writing without closing the run: the steps written stay loadable (the aggregated maps
        are their mean on load), and the lock is dropped for the next writer."""
        self._closed = True
        self._lock.release()

    # -- writing ----------------------------------------------------------------------------
    def _prepare(self, name: str, value: ArrayLike) -> np.ndarray:
        arr = to_numpy(name, value)
        if self.downsample > 1 and is_token_name(name):
            if arr.ndim < 3:
                raise AttnmapError(
                    f"token map {name!r} must have shape [..., F, H, W] to downsample, got {arr.shape}"
                )
            arr = downsample_spatial(arr, self.downsample)
        if self.dtype == "float16":
            finite = arr[np.isfinite(arr)]
            if finite.size and float(np.abs(finite).max()) > FP16_MAX:
                raise AttnmapError(f"map {name!r} has values beyond float16's range; use dtype='float32'")
        return np.ascontiguousarray(arr.astype(self._np_dtype))

    def write_step(self, step: int, maps: Mapping[str, ArrayLike]) -> Path:
        """Write every map of one step atomically: ``step_<step>.safetensors``, or the numpy format's
        files of the step (its manifest last).

        Args:
            step: int >= 0, not written before by this writer. A step an earlier writer of the same
                run committed (``run_id``: a retry) stays as it is: it is checked, not written again.
            maps: ``{name: array}``; names like ``token/<word>`` ``[F, H, W]``, ``temporal``
                ``[F, F]``, ``text`` ``[Nt, Nt]``, ``<name>/block<b>``; per-head maps have H first.

        Returns:
            Path of the step file (the numpy format: the step's manifest).

        Raises:
            StoreError: this writer's lock was taken over (it writes nothing more).
        """
        if self._closed:
            raise AttnmapError("this StoreWriter is closed; open a new one to write another run")
        step = check_step(step)
        if step in self._steps:
            raise AttnmapError(f"step {step} was already written in this run")
        if not isinstance(maps, Mapping) or not maps:
            raise AttnmapError(f"maps must be a non-empty mapping name -> array, got {type(maps).__name__}")
        prepared = {check_name(name): self._prepare(name, value) for name, value in maps.items()}
        for name, arr in prepared.items():
            if self._shapes.get(name, arr.shape) != arr.shape:
                raise AttnmapError(
                    f"map {name!r} has shape {arr.shape} at step {step} but {self._shapes[name]} before"
                )
        if step in self._committed:  # a run's committed step never changes
            self._steps.append(step)
            return self.steps_format.unit_path(self.path, step)
        self._lock.check()
        path = self.steps_format.write(self.path, step, prepared, step_metadata(self.run_id, step))
        for name, arr in prepared.items():
            self._shapes[name] = arr.shape
        self._steps.append(step)
        return path

    def close(self, aggregated: Optional[Mapping[str, ArrayLike]] = None) -> None:
        """Write the step-aggregated maps and mark the video complete.

        metadata.json then gets ``steps`` and ``steps_written`` (the run's steps, sorted: those this
        writer wrote and those an earlier writer of the run committed; the caller's ``steps`` was a
        snapshot from when the writer opened), ``finished`` and ``aggregation`` (how the aggregated
        maps were made).

        Args:
            aggregated: ``{name: array}`` to store as the aggregated maps; None stores
                :meth:`Store.mean` of each map over the steps written (read back from their files,
                so :meth:`Store.rebuild_aggregated` gives the same result after a crash).
        """
        if self._closed:
            return
        steps = sorted(self._committed.union(self._steps))
        if aggregated is None:
            agg, counts = {}, {}
            with Store(self.root) as store:
                for name in self._shapes:
                    try:
                        mean, used = store._mean(self.video_id, name, steps)
                    except KeyError:  # every step of it went bad on disk (each named in a warning)
                        continue
                    agg[name], counts[name] = mean.astype(self._np_dtype), len(used)
            how = "mean over the written steps"
        else:
            agg = {check_name(n): self._prepare(n, v) for n, v in aggregated.items()}
            counts = {}
            how = "given by the caller" if agg else "not stored (mean over the steps on load)"
        self._lock.check()
        write_aggregated(self.aggregated_format, self.path, agg, self.run_id, steps, counts, how)
        # the caller's "steps" was a snapshot taken when the writer opened; the store knows them all
        self.metadata.update(
            complete=True,
            finished=_now(),
            steps=steps,
            steps_written=steps,
            aggregation=_aggregation(how, self.downsample),
        )
        atomic_write(self.path / METADATA_FILE, json.dumps(self.metadata, indent=1).encode("utf-8"))
        self._closed = True
        self._lock.release()
