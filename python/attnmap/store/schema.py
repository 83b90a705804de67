"""``metadata.json``: read with bounds (a regular file of at most 16 MiB, integers of at most 20
digits, no NaN, no nesting deeper than Python's parser allows) and checked against the store's
schema. The store's own keys must be there and well formed; the keys that capture writes and the
render reads (``targets``, ``grid``, ``video`` ...) must be well formed when present; any other
key is the caller's and passes as it is. Every defect is a StoreError naming the file.

Example:
    >>> meta = read_metadata(Path("store/vid/metadata.json"))   # doctest: +SKIP
    >>> meta["run_id"], meta["dtype"]
    ('3f9c...', 'float16')
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from attnmap.errors import StoreError
from attnmap.store.format import DTYPES, FORMAT, SCHEMA_VERSION, STORAGE_FORMATS, loads_bounded

#: the largest metadata.json read
MAX_METADATA_BYTES = 16 << 20
#: bounds of the sizes a metadata.json may give (the render's own limits are tighter)
MAX_SIDE = 1 << 17
MAX_FRAMES = 1 << 20
MAX_INDEX = 1 << 31

Check = Callable[[Any], bool]


def _int(lo: int, hi: int) -> Check:
    return lambda v: type(v) is int and lo <= v <= hi


def _optional(check: Check) -> Check:
    return lambda v: v is None or check(v)


def _list_of(check: Check, length: int = -1) -> Check:
    return lambda v: isinstance(v, list) and (length < 0 or len(v) == length) and all(check(x) for x in v)


def _number(lo: float, hi: float) -> Check:
    return lambda v: type(v) in (int, float) and lo < v <= hi


def _targets(v: Any) -> bool:
    return isinstance(v, dict) and all(
        isinstance(w, str) and _list_of(_int(0, MAX_INDEX))(i) for w, i in v.items()
    )


def _video(v: Any) -> bool:
    fields: dict[str, Check] = {
        "height": _optional(_int(1, MAX_SIDE)),
        "width": _optional(_int(1, MAX_SIDE)),
        "frames": _optional(_int(1, MAX_FRAMES)),
        "fps": _optional(_number(0, 1000)),
        "path": _optional(lambda p: isinstance(p, str)),
    }
    return isinstance(v, dict) and all(check(v[k]) for k, check in fields.items() if k in v)


def _storage(v: Any) -> bool:
    names = {"steps": lambda f: f in STORAGE_FORMATS, "aggregated": lambda f: f in STORAGE_FORMATS}
    checks: dict[str, Check] = {**names, "compressed": lambda c: isinstance(c, bool)}
    return isinstance(v, dict) and all(k in checks and checks[k](x) for k, x in v.items())


_TRIPLE = _optional(_list_of(_int(1, MAX_FRAMES), 3))
_STEPS = _optional(_list_of(_int(0, MAX_INDEX)))

#: key -> (what it must be, the check); the first group is required
REQUIRED: dict[str, tuple[str, Check]] = {
    "video_id": ("a non-empty str", lambda v: isinstance(v, str) and bool(v)),
    "run_id": ("a str of 1 to 64 characters", lambda v: isinstance(v, str) and 0 < len(v) <= 64),
    "format": (repr(FORMAT), lambda v: v == FORMAT),
    "schema_version": (f"an int in 1..{SCHEMA_VERSION}", _int(1, SCHEMA_VERSION)),
    "dtype": (" or ".join(map(repr, DTYPES)), lambda v: v in DTYPES),
    "downsample": ("an int >= 1", _int(1, 1 << 16)),
    "complete": ("true or false", lambda v: isinstance(v, bool)),
}
OPTIONAL: dict[str, tuple[str, Check]] = {
    "targets": ("{word: [token index, ...]}", _targets),
    "steps": ("a list of step numbers", _STEPS),
    "steps_written": ("a list of step numbers", _STEPS),
    "blocks": ("a list of block numbers", _STEPS),
    "grid": ("null or [F, H, W] of positive ints", _TRIPLE),
    "patch_size": ("null or [t, h, w] of positive ints", _TRIPLE),
    "vae_stride": ("null or [t, h, w] of positive ints", _TRIPLE),
    "video": (
        f"{{height, width (1..{MAX_SIDE}), frames (1..{MAX_FRAMES}), fps (0..1000], path}}, each optional",
        _video,
    ),
    "text_tokens": ("a list of str", _optional(_list_of(lambda t: isinstance(t, str)))),
    "checksum": ("'crc32'", lambda v: v == "crc32"),
    "storage": (
        f"{{steps, aggregated: {' or '.join(map(repr, STORAGE_FORMATS))}; compressed: true or false}}",
        _storage,
    ),
}


def problem(meta: Any) -> Optional[str]:
    """What is wrong with ``meta`` under the schema (the first bad key), or None when nothing is."""
    if not isinstance(meta, dict):
        return f"expected a JSON object, got {type(meta).__name__}"
    for key, (what, _) in REQUIRED.items():
        if key not in meta:
            return f"key {key!r} is missing (expected {what})"
    for key, (what, check) in {**REQUIRED, **OPTIONAL}.items():
        if key in meta and not check(meta[key]):
            shown = repr(meta[key])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            return f"key {key!r} must be {what}, got {shown}"
    return None


def read_json(path: Path, what: str) -> Any:
    """A store file of JSON read with bounds: a regular file (a FIFO never blocks the open) of at most
    :data:`MAX_METADATA_BYTES`, UTF-8, integers of at most 20 digits, no NaN.

    Raises:
        StoreError: naming ``path``; ``what`` says what the file was expected to be.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO never blocks the open
    except OSError as exc:
        raise StoreError(f"Store file {path} cannot be read: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"Store file {path} is not a regular file (expected {what}); it is never read")
        if st.st_size > MAX_METADATA_BYTES:
            raise StoreError(
                f"Corrupt store file {path}: {st.st_size} bytes, more than {MAX_METADATA_BYTES} for {what}"
            )
        raw = f.read(st.st_size + 1)  # a size, not the bound: read() allocates what it is asked for
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StoreError(f"Corrupt store file {path}: not UTF-8 ({exc})") from None
    return loads_bounded(text, "its JSON", path)


def read_metadata(path: Path) -> dict[str, Any]:
    """Read and check a video's ``metadata.json`` (see the module docstring).

    Raises:
        StoreError: naming ``path``: missing, not a regular file, too large, not JSON, or off the schema.
    """
    meta = read_json(path, "metadata JSON")
    bad = problem(meta)
    if bad is not None:
        raise StoreError(f"Corrupt store file {path}: {bad}")
    return meta
