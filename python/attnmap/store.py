"""The attention store: one folder per video under a root, metadata JSON and safetensors maps.

Layout on disk (``<dir>`` is the sanitised video id, see :func:`video_dirname`)::

    root/<dir>/metadata.json                  video metadata + store keys (run id, schema, ...)
    root/<dir>/step_000003.safetensors        every map of step 3 (names are keys, never paths)
    root/<dir>/aggregated.safetensors         the step-aggregated maps (mean over steps)

Every file is written atomically (temp file, fsync, rename, fsync of the folder), so a run
killed at any moment leaves each finished step loadable. Each step file carries the run id in
its safetensors metadata, and ``metadata.json`` names the current run: files of an older run of
the same video id are never mixed in. A run that died before ``close`` has no aggregated file;
:meth:`Store.aggregated` then averages the finished steps and :meth:`Store.rebuild_aggregated`
writes the file.

Loading never unpickles: headers are JSON and tensors are raw little-endian arrays.

Example:
    >>> w = StoreWriter(root, "vid 1", {"prompt": "a (cat)"})
    >>> w.write_step(0, {"token/cat": np.ones((2, 3, 4))})
    >>> w.close()
    >>> open_store(root).load_step("vid 1", "cat", 0).map.shape
    (2, 3, 4)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import time
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from attnmap._io import atomic_write

SCHEMA_VERSION = 1
FORMAT = "attnmap"
METADATA_FILE = "metadata.json"
AGGREGATED_FILE = "aggregated.safetensors"
_STEP_RE = re.compile(r"^step_(\d{6,})\.safetensors$")
_BLOCK_RE = re.compile(r"^(.*)/block(\d+)$")
_MAX_DIRNAME = 96
_MAX_HEADER = 64 * 1024 * 1024
_FP16_MAX = 65504.0
_DTYPES = {"float16": np.float16, "float32": np.float32}
# safetensors dtype code -> numpy dtype (little endian)
_ST_DTYPES: dict[str, np.dtype[Any]] = {
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
#: Keys the store adds to the video metadata; the caller's metadata may not use them.
RESERVED_KEYS = (
    "schema_version",
    "attnmap_version",
    "format",
    "video_id",
    "run_id",
    "dtype",
    "downsample",
    "aggregation",
    "created",
    "finished",
    "complete",
    "steps_written",
)

ArrayLike = Any  # numpy array or torch tensor


class StoreError(OSError):
    """A store file is missing, truncated, corrupt or from another run. The message names the file."""


# ------------------------------------------------------------------------------------------
# names -> paths
# ------------------------------------------------------------------------------------------
def _check_video_id(video_id: Any) -> str:
    if not isinstance(video_id, str) or not video_id:
        raise ValueError(f"video_id must be a non-empty str, got {video_id!r}")
    if "\x00" in video_id:
        raise ValueError(f"video_id must not contain NUL characters, got {video_id!r}")
    return video_id


def video_dirname(video_id: str) -> str:
    """The folder name of a video id: always one plain path component inside the root.

    Characters outside ``[A-Za-z0-9._-]`` become ``_``, leading dots are dropped and the name
    is cut to 96 characters. Whenever that changed the id (or the id looks like such a result)
    an 8-byte hash of the exact id is appended, so distinct ids never share a folder.

    Args:
        video_id: any non-empty str without NUL.

    Returns:
        str: e.g. ``"prompt_001_vid_001"`` or ``"x-3f9c...`` for ``"../x"``.
    """
    video_id = _check_video_id(video_id)
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", video_id).lstrip(".")
    looks_hashed = re.search(r"-[0-9a-f]{16}$", clean) is not None
    if clean == video_id and len(clean) <= _MAX_DIRNAME and not looks_hashed:
        return clean
    digest = hashlib.sha256(video_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{clean[:_MAX_DIRNAME]}-{digest}".lstrip("-") or digest


def _check_name(name: Any, what: str = "map name") -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty str, got {name!r}")
    if "\x00" in name:
        raise ValueError(f"{what} must not contain NUL characters, got {name!r}")
    if name.startswith("__"):
        raise ValueError(f"{what} must not start with '__' (reserved by safetensors), got {name!r}")
    return name


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    return int(step)


def step_filename(step: int) -> str:
    """``step_000003.safetensors`` for step 3."""
    return f"step_{_check_step(step):06d}.safetensors"


# ------------------------------------------------------------------------------------------
# safetensors encode / decode (json header + raw little-endian data; never pickle)
# ------------------------------------------------------------------------------------------
def _encode(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=dict(metadata))


@dataclass(frozen=True)
class _Entry:
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int


@dataclass(frozen=True)
class _Header:
    path: Path
    entries: dict[str, _Entry]
    metadata: dict[str, str]


def _read_header(path: Path) -> _Header:
    """Parse and validate a safetensors header; any defect raises StoreError naming ``path``."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise StoreError(f"Corrupt store file {path}: truncated ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise StoreError(f"Corrupt store file {path}: header length {n} exceeds file size {size}")
            raw = f.read(n)
    except FileNotFoundError:
        raise StoreError(f"Store file {path} does not exist") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"Corrupt store file {path}: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise StoreError(f"Corrupt store file {path}: header is not a JSON object")
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise StoreError(f"Corrupt store file {path}: __metadata__ must map str to str")
    data_start = 8 + n
    data_size = size - data_start
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"Corrupt store file {path}: bad entry {name!r} ({exc!r})") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if any(s < 0 for s in shape) or begin < 0 or end - begin != nbytes:
            raise StoreError(f"Corrupt store file {path}: entry {name!r} has inconsistent shape/offsets")
        if end > data_size:
            raise StoreError(
                f"Corrupt store file {path}: truncated (entry {name!r} ends at {end}, data has {data_size} bytes)"
            )
        entries[name] = _Entry(dtype, shape, data_start + begin, nbytes)
    return _Header(Path(path), entries, dict(meta))


def _read_tensor(header: _Header, name: str) -> np.ndarray:
    entry = header.entries[name]
    out = np.empty(entry.shape, dtype=entry.dtype)
    if entry.nbytes:
        with open(header.path, "rb") as f:
            f.seek(entry.start)
            got = f.readinto(out.reshape(-1).view(np.uint8).data)
        if got != entry.nbytes:
            raise StoreError(f"Corrupt store file {header.path}: truncated while reading {name!r}")
    return out


# ------------------------------------------------------------------------------------------
# map preparation
# ------------------------------------------------------------------------------------------
def _to_numpy(name: str, value: ArrayLike) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch tensor, without importing torch
        value = value.detach().to("cpu").float().numpy()
    arr = np.asarray(value)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise ValueError(f"map {name!r} must be a numeric array or tensor, got dtype {arr.dtype}")
    return arr


def downsample_spatial(x: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor x factor`` spatial blocks of the last two axes (edge blocks may be smaller).

    Args:
        x: ``[..., H, W]`` array.
        factor: int >= 1.

    Returns:
        ``[..., ceil(H / factor), ceil(W / factor)]`` float32 array; each value is the mean of
        its block.
    """
    if factor == 1:
        return np.asarray(x, dtype=np.float32)
    x = np.asarray(x, dtype=np.float64)
    h, w = x.shape[-2], x.shape[-1]
    rows = np.arange(0, h, factor)
    cols = np.arange(0, w, factor)
    s = np.add.reduceat(np.add.reduceat(x, rows, axis=-2), cols, axis=-1)
    rh = np.minimum(rows + factor, h) - rows
    cw = np.minimum(cols + factor, w) - cols
    return (s / np.outer(rh, cw)).astype(np.float32)


def _is_token_name(name: str) -> bool:
    """``token/...`` maps, also those of another guidance branch (``uncond/token/...``)."""
    return name.startswith("token/") or name.startswith("uncond/token/")


def token_of(name: str) -> Optional[tuple[str, Optional[int]]]:
    """``("cat", None)`` for ``"token/cat"`` (or ``"uncond/token/cat"``), ``("cat", 3)`` for
    ``"token/cat/block3"``, else None."""
    if not _is_token_name(name):
        return None
    rest = name.split("token/", 1)[1]
    m = _BLOCK_RE.match(rest)
    if m:
        return m.group(1), int(m.group(2))
    return rest, None


# ------------------------------------------------------------------------------------------
# writer
# ------------------------------------------------------------------------------------------
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
    ) -> None:
        from attnmap import __version__

        self.video_id = _check_video_id(video_id)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
        if isinstance(downsample, bool) or not isinstance(downsample, int) or downsample < 1:
            raise ValueError(f"downsample must be an int >= 1, got {downsample!r}")
        metadata = dict(metadata or {})
        for key in RESERVED_KEYS:
            if key in metadata and not (key == "video_id" and metadata[key] == video_id):
                raise ValueError(f"metadata key {key!r} is reserved by the store; rename it")
        self.dtype = dtype
        self.downsample = downsample
        self.run_id = uuid.uuid4().hex
        self.root = Path(root)
        self.path = self.root / video_dirname(video_id)
        self._np_dtype = _DTYPES[dtype]
        self._sums: dict[str, np.ndarray] = {}
        self._counts: dict[str, int] = {}
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
            "created": _now(),
            "complete": False,
        }
        try:
            encoded = json.dumps(self.metadata, indent=1, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"metadata must be JSON-safe (str keys, finite numbers, lists, dicts): {exc}"
            ) from None

        meta_path = self.path / METADATA_FILE
        if self.path.exists() and not overwrite:
            raise FileExistsError(
                f"video {video_id!r} already exists in the store at {self.path}; pass overwrite=True"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        old = [p for p in self.path.iterdir() if _STEP_RE.match(p.name) or p.name == AGGREGATED_FILE]
        # The commit point: once metadata.json names the new run, files of the old run are ignored.
        atomic_write(meta_path, encoded)
        for p in old:
            p.unlink(missing_ok=True)
        for p in self.path.glob(".*.tmp"):
            p.unlink(missing_ok=True)

    # -- context manager --------------------------------------------------------------------
    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None and not self._closed:
            self.close()

    # -- writing ----------------------------------------------------------------------------
    def _prepare(self, name: str, value: ArrayLike) -> np.ndarray:
        arr = _to_numpy(name, value)
        if self.downsample > 1 and _is_token_name(name):
            if arr.ndim < 3:
                raise ValueError(
                    f"token map {name!r} must have shape [..., F, H, W] to downsample, got {arr.shape}"
                )
            arr = downsample_spatial(arr, self.downsample)
        if self.dtype == "float16":
            finite = arr[np.isfinite(arr)]
            if finite.size and float(np.abs(finite).max()) > _FP16_MAX:
                raise ValueError(f"map {name!r} has values beyond float16's range; use dtype='float32'")
        return np.ascontiguousarray(arr.astype(self._np_dtype))

    def write_step(self, step: int, maps: Mapping[str, ArrayLike]) -> Path:
        """Write every map of one step atomically to ``step_<step>.safetensors``.

        Args:
            step: int >= 0, not written before in this run.
            maps: ``{name: array}``; names like ``token/<word>`` ``[F, H, W]``, ``temporal``
                ``[F, F]``, ``text`` ``[Nt, Nt]``, ``<name>/block<b>``; per-head maps have H first.

        Returns:
            Path of the step file.
        """
        if self._closed:
            raise ValueError("this StoreWriter is closed; open a new one to write another run")
        step = _check_step(step)
        if step in self._steps:
            raise ValueError(f"step {step} was already written in this run")
        if not isinstance(maps, Mapping) or not maps:
            raise ValueError(f"maps must be a non-empty mapping name -> array, got {type(maps).__name__}")
        prepared = {_check_name(name): self._prepare(name, value) for name, value in maps.items()}
        for name, arr in prepared.items():
            if name in self._sums and self._sums[name].shape != arr.shape:
                raise ValueError(
                    f"map {name!r} has shape {arr.shape} at step {step} but {self._sums[name].shape} before"
                )
        meta = {
            "format": FORMAT,
            "schema_version": str(SCHEMA_VERSION),
            "run_id": self.run_id,
            "step": str(step),
        }
        path = self.path / step_filename(step)
        atomic_write(path, _encode(prepared, meta))
        for name, arr in prepared.items():
            if name in self._sums:
                self._sums[name] += arr
                self._counts[name] += 1
            else:
                self._sums[name] = arr.astype(np.float64)
                self._counts[name] = 1
        self._steps.append(step)
        return path

    def close(self, aggregated: Optional[Mapping[str, ArrayLike]] = None) -> None:
        """Write the step-aggregated maps and mark the video complete.

        metadata.json then gets ``steps`` and ``steps_written`` (the steps written, sorted: the
        caller's ``steps`` was a snapshot from when the writer opened), ``finished`` and
        ``aggregation`` (how the aggregated maps were made).

        Args:
            aggregated: ``{name: array}`` to store as the aggregated maps; None stores the mean
                over the written steps of each map (of the stored values, so
                :meth:`Store.rebuild_aggregated` gives the same result after a crash).
        """
        if self._closed:
            return
        if aggregated is None:
            agg = {name: (s / self._counts[name]).astype(self._np_dtype) for name, s in self._sums.items()}
            counts = dict(self._counts)
            how = "mean over the written steps"
        else:
            agg = {_check_name(n): self._prepare(n, v) for n, v in aggregated.items()}
            counts = {}
            how = "given by the caller" if agg else "not stored (mean over the steps on load)"
        steps = sorted(self._steps)
        _write_aggregated(self.path, agg, self.run_id, steps, counts, how)
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


def _write_aggregated(
    path: Path,
    maps: Mapping[str, np.ndarray],
    run_id: str,
    steps: list[int],
    counts: Mapping[str, int],
    how: str,
) -> None:
    meta = {
        "format": FORMAT,
        "schema_version": str(SCHEMA_VERSION),
        "run_id": run_id,
        "steps": json.dumps(steps),
        "counts": json.dumps(dict(counts)),
        "aggregation": how,
    }
    atomic_write(path / AGGREGATED_FILE, _encode(maps, meta))


# ------------------------------------------------------------------------------------------
# reader
# ------------------------------------------------------------------------------------------
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
        self._headers: dict[str, tuple[tuple[int, int, int], _Header]] = {}
        self._metas: dict[Path, tuple[tuple[int, int, int], dict[str, Any]]] = {}

    # -- helpers ----------------------------------------------------------------------------
    def _dir(self, video_id: str) -> Path:
        path = self.root / video_dirname(video_id)
        if not (path / METADATA_FILE).is_file():
            raise KeyError(f"video {video_id!r} is not in the store at {self.root}")
        return path

    def _header(self, path: Union[str, Path]) -> _Header:
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
        header = _read_header(Path(path))
        self._headers[path] = (key, header)
        return header

    def _current(self, video_id: str, path: Path) -> _Header:
        header = self._header(path)
        run = self._video_meta(video_id)["run_id"]
        if header.metadata.get("run_id") != run:
            raise StoreError(
                f"Store file {path} belongs to run {header.metadata.get('run_id')!r}, not the current run {run!r}"
            )
        return header

    def _agg_header(self, video_id: str) -> Optional[_Header]:
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
            m = _STEP_RE.match(p.name)
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
        _check_name(name)
        if step is None:
            return self._load_aggregated(video_id, name)[0]
        path = self._dir(video_id) / step_filename(step)
        header = self._current(video_id, path)
        if name not in header.entries:
            raise KeyError(f"map {name!r} is not in {path}; it has {sorted(header.entries)}")
        return _read_tensor(header, name).astype(np.float32, copy=False)

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
            return _read_tensor(header, name).astype(np.float32, copy=False), info
        steps = [s for s in self.steps(video_id) if name in self._header(d / step_filename(s)).entries]
        if not steps:
            raise KeyError(f"map {name!r} of video {video_id!r} has no aggregated file and no finished step")
        total = sum(_read_tensor(self._header(d / step_filename(s)), name).astype(np.float64) for s in steps)
        mean = (np.asarray(total) / len(steps)).astype(_DTYPES[self._video_meta(video_id)["dtype"]])
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
        _check_name(token, "token")
        if branch is None:
            branch = "uncond" if self._video_meta(video_id).get("branch") == "uncond" else "cond"
        if branch not in ("cond", "uncond"):
            raise ValueError(f"branch must be 'cond', 'uncond' or None, got {branch!r}")
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
        arr = self._as_map(self.load(video_id, name, _check_step(step)), name)
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
                m = _STEP_RE.match(e.name)
                if m:
                    files.append((int(m.group(1)), e.path))
        out = []
        for step, path in sorted(files):
            header = self._header(path)
            if header.metadata.get("run_id") != meta["run_id"] or name not in header.entries:
                continue
            arr = self._as_map(_read_tensor(header, name).astype(np.float32, copy=False), name)
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
            raise ValueError(f"video {video_id!r} has no finished step to aggregate")
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        for s in steps:
            header = self._header(d / step_filename(s))
            for name in header.entries:
                arr = _read_tensor(header, name)
                if name in sums:
                    sums[name] += arr
                    counts[name] += 1
                else:
                    sums[name] = arr.astype(np.float64)
                    counts[name] = 1
        dtype = _DTYPES[meta["dtype"]]
        agg = {n: (s / counts[n]).astype(dtype) for n, s in sums.items()}
        _write_aggregated(d, agg, meta["run_id"], steps, counts, "mean over steps (rebuilt)")
        return d / AGGREGATED_FILE

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
