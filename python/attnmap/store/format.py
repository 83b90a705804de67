"""The store's files: names, constants and the safetensors encoding (never pickle)."""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from attnmap.errors import AttnmapError, StoreError

SCHEMA_VERSION = 1
FORMAT = "attnmap"
METADATA_FILE = "metadata.json"
AGGREGATED_FILE = "aggregated.safetensors"
STEP_RE = re.compile(r"^step_(\d{6,})\.safetensors$")
BLOCK_RE = re.compile(r"^(.*)/block(\d+)$")
MAX_DIRNAME = 96
MAX_HEADER = 64 * 1024 * 1024
FP16_MAX = 65504.0
DTYPES = {"float16": np.float16, "float32": np.float32}
# safetensors dtype code -> numpy dtype (little endian)
ST_DTYPES: dict[str, np.dtype[Any]] = {
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


def encode(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=dict(metadata))


@dataclass(frozen=True)
class Entry:
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int


@dataclass(frozen=True)
class Header:
    path: Path
    entries: dict[str, Entry]
    metadata: dict[str, str]


def read_header(path: Path) -> Header:
    """Parse and validate a safetensors header; any defect raises StoreError naming ``path``."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise StoreError(f"Corrupt store file {path}: truncated ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
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
    entries: dict[str, Entry] = {}
    for name, info in header.items():
        try:
            dtype = ST_DTYPES[info["dtype"]]
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
        entries[name] = Entry(dtype, shape, data_start + begin, nbytes)
    return Header(Path(path), entries, dict(meta))


def read_tensor(header: Header, name: str) -> np.ndarray:
    entry = header.entries[name]
    out = np.empty(entry.shape, dtype=entry.dtype)
    if entry.nbytes:
        with open(header.path, "rb") as f:
            f.seek(entry.start)
            got = f.readinto(out.reshape(-1).view(np.uint8).data)
        if got != entry.nbytes:
            raise StoreError(f"Corrupt store file {header.path}: truncated while reading {name!r}")
    return out


def to_numpy(name: str, value: ArrayLike) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch tensor, without importing torch
        value = value.detach().to("cpu").float().numpy()
    arr = np.asarray(value)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise AttnmapError(f"map {name!r} must be a numeric array or tensor, got dtype {arr.dtype}")
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
