"""The store's files: names and constants every format shares, and the safetensors format (the default):
its encoding, and reading a file through the safetensors library with the checks attnmap adds to the
library's own. :class:`Safetensors` is this format behind the interface of :mod:`attnmap.store.formats`.

safetensors' ``safe_open`` parses and checks every header (JSON, dtypes, shapes that match their
offsets, offsets without overlaps or gaps, a buffer that ends where the last tensor does, never a
pickle). attnmap adds what is its own: only regular files are opened, a file declares at most
:data:`MAX_ENTRIES` maps of :data:`STORED_DTYPES` with every dimension >= 1 (a few bytes never
declare gigabytes), the metadata says which run and which step wrote it, and every map carries a
CRC-32 of its bytes, checked when it is read. Every defect is a :class:`StoreError` naming the file.
"""

from __future__ import annotations

import json
import os
import re
import stat
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from attnmap.errors import AttnmapError, StoreError
from attnmap.store.naming import step_filename

SCHEMA_VERSION = 1
FORMAT = "attnmap"
#: the file formats a store writes (``storage_format``): safetensors, or the per-token numpy layout
STORAGE_FORMATS = ("safetensors", "numpy")
METADATA_FILE = "metadata.json"
AGGREGATED_FILE = "aggregated.safetensors"
STEP_RE = re.compile(r"^step_(\d{6,})\.safetensors$")
BLOCK_RE = re.compile(r"^(.*)/block(\d+)$")
FP16_MAX = 65504.0
DTYPES = {"float16": np.float16, "float32": np.float32}
#: safetensors dtype codes a store file may hold (what :data:`DTYPES` writes), as numpy dtypes
STORED_DTYPES: dict[str, np.dtype[Any]] = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4")}
#: the most maps one store file may declare
MAX_ENTRIES = 1 << 16
#: the most dimensions a stored map may have (per-head, per-block maps have 4)
MAX_NDIM = 8
#: the safetensors metadata key of the maps' checksums: JSON ``{name: CRC-32 of its bytes}``
CHECKSUM_KEY = "crc32"
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
    "checksum",
    "created",
    "finished",
    "complete",
    "steps_written",
    "storage",
)

ArrayLike = Any  # numpy array or torch tensor


def checksum(arr: np.ndarray) -> int:
    """CRC-32 of a contiguous array's bytes (what a store file holds for it)."""
    return zlib.crc32(np.ascontiguousarray(arr).view(np.uint8).reshape(-1).data)


def encode(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """A safetensors file of ``tensors`` whose metadata holds ``metadata`` and the maps' checksums."""
    from safetensors.numpy import save

    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    sums = json.dumps({k: checksum(v) for k, v in arrays.items()}, separators=(",", ":"))
    return save(arrays, metadata={**metadata, CHECKSUM_KEY: sums})


PathLike = Union[str, Path]


def file_key(path: PathLike, kind: str) -> tuple[int, int, int]:
    """(inode, mtime, size) of a regular file, which says when it was replaced; StoreError when
    ``path`` is missing or not a regular file (a FIFO, a folder, a device are never opened)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise StoreError(f"Store file {path} does not exist") from None
    except OSError as exc:
        raise StoreError(f"Store file {path} cannot be read: {exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"Store file {path} is not a regular file (expected {kind}); it is never opened")
    return st.st_ino, st.st_mtime_ns, st.st_size


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > 20:
        raise ValueError(f"an integer of {len(digits)} digits")
    return int(digits)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_int=_bounded_int, parse_constant=_no_constant)


def loads_bounded(text: str, what: str, path: PathLike) -> Any:
    """``json.loads`` that refuses integers of more than 20 digits, NaN and infinities, and turns any
    failure (deep nesting, bad UTF-8 ...) into a StoreError naming ``what`` of ``path``."""
    try:
        return _DECODER.decode(text)
    except (ValueError, RecursionError, MemoryError) as exc:
        raise StoreError(f"Corrupt store file {path}: {what} is not valid JSON ({exc})") from None


@dataclass(frozen=True)
class Entry:
    dtype: np.dtype[Any]
    shape: tuple[int, ...]


@dataclass
class Header:
    """One store file as safetensors parsed it, checked by attnmap; :meth:`read` reads a map."""

    path: str
    entries: dict[str, Entry]
    metadata: dict[str, str]
    checksums: Optional[dict[str, int]]
    key: tuple[int, int, int]
    handle: Any = field(default=None, repr=False)  # the open safe_open, None once released
    verified: set[str] = field(default_factory=set)

    def read(self, name: str) -> np.ndarray:
        """The map ``name`` (its stored dtype), its checksum checked; StoreError naming the file."""
        entry = self.entries[name]
        if self.handle is None:
            self.handle = _safe_open(self.path)
        try:
            arr = self.handle.get_tensor(name)
        except Exception as exc:  # safetensors' SafetensorError, or an OSError of the read
            raise StoreError(f"Corrupt store file {self.path}: cannot read {name!r} ({exc})") from None
        if arr.dtype != entry.dtype or arr.shape != entry.shape:
            raise StoreError(f"Corrupt store file {self.path}: {name!r} changed while it was read")
        if self.checksums is not None and name not in self.verified:
            if checksum(arr) != self.checksums[name]:
                raise StoreError(
                    f"Corrupt store file {self.path}: the bytes of {name!r} do not match their checksum"
                )
            self.verified.add(name)
        return arr

    def release(self) -> None:
        """Close the file (a later :meth:`read` opens it again)."""
        self.handle = None


_PREAD: Optional[bool] = None  # whether safe_open has the pread backend (safetensors >= 0.8)


def _safe_open(path: PathLike) -> Any:
    """``safe_open(path)`` for numpy, reading with pread(2) where the library can (a file truncated
    under a memory map would kill the process with SIGBUS; a short read is an error)."""
    global _PREAD
    from safetensors import safe_open

    try:
        if _PREAD is not False:
            try:
                handle = safe_open(path, framework="numpy", backend="pread")
                _PREAD = True
                return handle
            except TypeError:  # an older safetensors without backends
                _PREAD = False
        return safe_open(path, framework="numpy")
    except StoreError:
        raise
    except Exception as exc:  # SafetensorError (the header checks) or the OSError of opening
        raise StoreError(f"Corrupt store file {path}: {exc}") from None


def read_header(path: PathLike, *, step: Optional[int] = None) -> Header:
    """Open a store file through safetensors and check what attnmap adds (see the module docstring).

    Args:
        path: a step file or the aggregated file.
        step: the step its name says; the file's metadata must say the same.

    Returns:
        the checked :class:`Header`, its file open for :meth:`Header.read`.

    Raises:
        StoreError: naming ``path``: missing, not a regular file, or any defect of the file.
    """
    key = file_key(path, "a safetensors file")
    handle = _safe_open(path)
    try:
        meta = handle.metadata() or {}
        names = handle.offset_keys()
        if len(names) > MAX_ENTRIES:
            raise StoreError(f"Corrupt store file {path}: {len(names)} maps, more than {MAX_ENTRIES}")
        entries = {}
        for name in names:
            info = handle.get_slice(name)
            code, shape = info.get_dtype(), tuple(int(s) for s in info.get_shape())
            if code not in STORED_DTYPES:
                raise StoreError(
                    f"Corrupt store file {path}: map {name!r} has dtype {code}, expected "
                    f"{' or '.join(STORED_DTYPES)}"
                )
            if len(shape) > MAX_NDIM or min(shape, default=1) < 1:
                raise StoreError(
                    f"Corrupt store file {path}: map {name!r} has shape {list(shape)}, expected at most "
                    f"{MAX_NDIM} dimensions of at least 1"
                )
            if not name or "\x00" in name:
                raise StoreError(f"Corrupt store file {path}: a map name {name!r} is not a store name")
            entries[name] = Entry(STORED_DTYPES[code], shape)
    except StoreError:
        raise
    except Exception as exc:  # SafetensorError from the library's accessors
        raise StoreError(f"Corrupt store file {path}: {exc}") from None
    if meta.get("format") != FORMAT or not isinstance(meta.get("run_id"), str):
        raise StoreError(f"Corrupt store file {path}: not an attnmap store file (no format or run id)")
    if step is not None and meta.get("step") != str(step):
        raise StoreError(
            f"Store file {path} holds step {meta.get('step')!r}, not step {step} as its name says"
        )
    sums = None
    if CHECKSUM_KEY in meta:
        raw = meta[CHECKSUM_KEY]
        if len(raw) > 32 + sum(6 * len(n) + 16 for n in entries):  # names may be \u-escaped
            raise StoreError(f"Corrupt store file {path}: its checksums take {len(raw)} characters")
        sums = loads_bounded(raw, "its checksums", path)
        if (
            not isinstance(sums, dict)
            or set(sums) != set(entries)
            or not all(isinstance(v, int) and 0 <= v < 1 << 32 for v in sums.values())
        ):
            raise StoreError(f"Corrupt store file {path}: its checksums do not list its maps")
    return Header(os.fspath(path), entries, dict(meta), sums, key, handle)


def to_numpy(name: str, value: ArrayLike) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch tensor, without importing torch
        value = value.detach().to("cpu").float().numpy()
    arr = np.asarray(value)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise AttnmapError(f"map {name!r} must be a numeric array or tensor, got dtype {arr.dtype}")
    if arr.ndim > MAX_NDIM or 0 in arr.shape:
        raise AttnmapError(
            f"map {name!r} must have at most {MAX_NDIM} dimensions, none of them 0, got shape {arr.shape}"
        )
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


def is_token_name(name: str) -> bool:
    """``token/...`` maps, also those of another guidance branch (``uncond/token/...``)."""
    return name.startswith("token/") or name.startswith("uncond/token/")


def token_of(name: str) -> Optional[tuple[str, Optional[int]]]:
    """``("cat", None)`` for ``"token/cat"`` (or ``"uncond/token/cat"``), ``("cat", 3)`` for
    ``"token/cat/block3"``, else None."""
    if not is_token_name(name):
        return None
    rest = name.split("token/", 1)[1]
    m = BLOCK_RE.match(rest)
    if m:
        return m.group(1), int(m.group(2))
    return rest, None


class Safetensors:
    """The safetensors format: one file per step, ``step_000003.safetensors``, and
    ``aggregated.safetensors``, each every map of its step (names are keys) with the run, the step and the
    maps' CRC-32 in its metadata, written whole to a temp name, fsynced and renamed."""

    name = "safetensors"
    kind = "a safetensors file"

    def unit_path(self, folder: Path, step: Optional[int]) -> Path:
        return folder / (AGGREGATED_FILE if step is None else step_filename(step))

    def step_files(self, folder: Path) -> dict[int, str]:
        """step -> path of every entry named like a step file (nothing is opened)."""
        files = {}
        with os.scandir(folder) as it:
            for e in it:
                m = STEP_RE.match(e.name)
                if m and e.name == step_filename(int(m.group(1))):
                    files[int(m.group(1))] = e.path
        return files

    def run_files(self, folder: Path) -> list[Path]:
        return [p for p in folder.iterdir() if STEP_RE.match(p.name) or p.name == AGGREGATED_FILE]

    def read(self, path: PathLike, *, step: Optional[int] = None) -> Header:
        return read_header(path, step=step)

    def write(
        self, folder: Path, step: Optional[int], maps: Mapping[str, np.ndarray], metadata: Mapping[str, str]
    ) -> Path:
        from attnmap._io import atomic_write

        path = self.unit_path(folder, step)
        atomic_write(path, encode(maps, metadata))
        return path
