"""Writing one video's maps: :class:`StoreWriter`."""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from attnmap._checks import integer
from attnmap._io import atomic_write
from attnmap.errors import AttnmapError
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
from attnmap.store.schema import problem


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


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
        self.run_id = uuid.uuid4().hex
        self.root = Path(root)
        self.path = self.root / video_dirname(video_id)
        self._np_dtype = DTYPES[dtype]
        video = metadata.get("video")
        self.steps_format = file_format(steps_format, compress=compress, video=video)
        self.aggregated_format = file_format(agg_format, compress=compress, video=video)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._steps: list[int] = []
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
        self._lock = WriterLock(self.path, video_id, wait=wait)
        if self._exists() and not overwrite:
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

    def _exists(self) -> bool:
        return os.path.lexists(self.path / METADATA_FILE)

    def _start(self, encoded: bytes, overwrite: bool) -> None:
        """Under the lock: commit the new run's metadata, then remove the old run's files."""
        if self._exists() and not overwrite:  # another writer created it while this one waited
            raise FileExistsError(
                f"video {self.video_id!r} already exists in the store at {self.path}; pass overwrite=True"
            )
        # the old run's files, in whichever format it wrote
        old = [p for name in STORAGE_FORMATS for p in file_format(name).run_files(self.path)]
        # The commit point: once metadata.json names the new run, files of the old run are ignored.
        atomic_write(self.path / METADATA_FILE, encoded)
        for p in old:
            p.unlink(missing_ok=True)
        for p in self.path.glob(".*.tmp*"):  # temp files of a dead writer (a live one holds the lock)
            p.unlink(missing_ok=True)
        for folder in {p.parent for p in old} - {self.path}:  # a format's subfolders left empty
            with contextlib.suppress(OSError):
                folder.rmdir()

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
            step: int >= 0, not written before in this run.
            maps: ``{name: array}``; names like ``token/<word>`` ``[F, H, W]``, ``temporal``
                ``[F, F]``, ``text`` ``[Nt, Nt]``, ``<name>/block<b>``; per-head maps have H first.

        Returns:
            Path of the step file (the numpy format: the step's manifest).
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
        path = self.steps_format.write(self.path, step, prepared, step_metadata(self.run_id, step))
        for name, arr in prepared.items():
            self._shapes[name] = arr.shape
        self._steps.append(step)
        return path

    def close(self, aggregated: Optional[Mapping[str, ArrayLike]] = None) -> None:
        """Write the step-aggregated maps and mark the video complete.

        metadata.json then gets ``steps`` and ``steps_written`` (the steps written, sorted: the
        caller's ``steps`` was a snapshot from when the writer opened), ``finished`` and
        ``aggregation`` (how the aggregated maps were made).

        Args:
            aggregated: ``{name: array}`` to store as the aggregated maps; None stores
                :meth:`Store.mean` of each map over the steps written (read back from their files,
                so :meth:`Store.rebuild_aggregated` gives the same result after a crash).
        """
        if self._closed:
            return
        if aggregated is None:
            agg, counts = {}, {}
            with Store(self.root) as store:
                for name in self._shapes:
                    try:
                        mean, used = store._mean(self.video_id, name, self._steps)
                    except KeyError:  # every step of it went bad on disk (each named in a warning)
                        continue
                    agg[name], counts[name] = mean.astype(self._np_dtype), len(used)
            how = "mean over the written steps"
        else:
            agg = {check_name(n): self._prepare(n, v) for n, v in aggregated.items()}
            counts = {}
            how = "given by the caller" if agg else "not stored (mean over the steps on load)"
        steps = sorted(self._steps)
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
