"""Atomic file writes: a reader sees either the old file or the whole new one, never a part.

:func:`atomic_path` yields a temp path in the target's folder; on success the temp file is fsynced,
renamed over the target and the folder fsynced; on any failure the temp file is removed. Temp names
are ``.<name>.<hex>.tmp<suffix>``, hidden and easy to sweep (``.*.tmp*``).

Example:
    >>> with atomic_path(out, suffix=".png") as tmp:
    ...     fig.savefig(tmp, format="png")
    >>> atomic_write(out_json, b"{}")
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Union

__all__ = ["atomic_path", "atomic_write"]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that refuse fsync on a folder
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Union[str, os.PathLike[str]], *, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path next to ``path``; rename it over ``path`` when the block succeeds.

    Args:
        path: the file to write. Its folder must exist.
        suffix: appended to the temp name (for writers that pick a format by suffix).

    The block writes the temp file by any means (it need not exist before). On success it is
    fsynced, renamed over ``path`` and the folder fsynced; on failure it is removed and the error
    propagates.
    """
    out = Path(path)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp{suffix}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(out.parent)


def atomic_write(path: Union[str, os.PathLike[str]], data: Union[bytes, memoryview]) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
