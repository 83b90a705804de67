"""Atomic writes: the target is the old file or the whole new one, and no temp file is left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from attnmap._io import atomic_path, atomic_write


def test_atomic_write_replaces_the_file(tmp_path: Path) -> None:
    out = tmp_path / "a.json"
    out.write_bytes(b"old")
    atomic_write(out, b"new")
    assert out.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "a.png"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="half written"), atomic_path(out, suffix=".png") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".a.png.") and tmp.name.endswith(".tmp.png")
        tmp.write_bytes(b"ne")
        raise RuntimeError("half written")
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_atomic_path_fails_when_nothing_was_written(tmp_path: Path) -> None:
    out = tmp_path / "a.bin"
    with pytest.raises(FileNotFoundError), atomic_path(out):
        pass
    assert not out.exists()
