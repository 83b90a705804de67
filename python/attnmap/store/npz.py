"""The numpy format: the per-token layout of ``.npz`` files that scripts read with numpy alone.

Layout in a video's folder (``<token>`` is the word through the store's sanitiser; ``NNN`` the step, at
least three digits)::

    <token>/step_NNN.npz                        the word's maps of step NNN: ``attention_map`` (its map
                                                ``token/<word>``), its per-block and unconditional maps
                                                under their names
    <token>/step_NNN_metadata.json              shape, dtype, num_steps, steps_used, aggregation_method,
                                                token_word, video_dimensions, storage_timestamp,
                                                attention_storage_version (and the run and step)
    step_NNN.npz                                the step's other maps (temporal, text, ...), keys = names
    step_NNN_metadata.json                      the step's manifest (below); written last, it commits
                                                the step
    aggregated/<token>_aggregated.npz           the word's step-aggregated maps
    aggregated/<token>_aggregated_metadata.json as for a step, with the steps aggregated
    aggregated/aggregated.npz                   the other aggregated maps
    aggregated/aggregated_metadata.json         the aggregate's manifest

Each ``.npz`` is what ``np.savez`` writes (``np.savez_compressed`` with ``compress``): plain arrays, read
back with ``np.load(path, allow_pickle=False)``. A word whose folder name is taken (``aggregated``,
``attention_videos``, or a name of the video folder's files such as ``metadata.json`` or ``step_000.npz``)
gets a folder ending in a hash of the word, as the sanitiser does for names it changes.

The manifest lists every map of its step with its file, key, dtype, shape and CRC-32, beside the run id
and the step, as a safetensors step file's header does. Every file is written to a temp name, fsynced and
renamed, the manifest last: a run killed in the middle of a step leaves nothing of that step visible, and
every finished step loadable. Reading checks what attnmap adds to numpy's own: the manifest as a bounded
JSON file whose files are exactly those this format writes for its maps (never a path outside the video
folder), each member's npy header against the manifest's dtype and shape before its data is read (a
compressed member never declares more than deflate can give), and the CRC-32 of each map's bytes.

Example:
    >>> w = StoreWriter(root, "vid", {"prompt": "a (cat)"}, storage_format="numpy", compress=True)
    >>> w.write_step(0, {"token/cat": maps})
    >>> np.load(root / "vid" / "cat" / "step_000.npz", allow_pickle=False)["attention_map"].shape
    (21, 30, 52)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from attnmap._io import atomic_path, atomic_write
from attnmap.errors import StoreError
from attnmap.store.format import (
    FORMAT,
    MAX_ENTRIES,
    MAX_NDIM,
    Entry,
    PathLike,
    checksum,
    file_key,
    token_of,
)
from attnmap.store.naming import check_step, safe_component
from attnmap.store.schema import read_json

#: the version of the per-token npz layout and of its metadata files' fields
LAYOUT_VERSION = "1.1.0"
AGGREGATED_DIR = "aggregated"
#: folder names a word never takes (such a word's folder ends in a hash of it): the aggregate's, the
#: renders' (auto-render), and the names of the files of a video folder (its metadata, steps, aggregate)
TAKEN = re.compile(r"^(aggregated|attention_videos|metadata\.json|aggregated\.safetensors|step_\d.*)$")
#: the key of a word's own map (``token/<word>``) in its .npz
MAIN_KEY = "attention_map"
AGGREGATED_MANIFEST = "aggregated_metadata.json"
#: the dtypes a map may be stored in, by their names in the manifest
DTYPES: dict[str, np.dtype[Any]] = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
#: deflate never makes more than 1032 bytes of one: a compressed member declaring more is not what it says
DEFLATE_RATIO = 1032
_MANIFEST = re.compile(r"^step_(\d{3,})_metadata\.json$")
_RUN_FILE = re.compile(r"^step_\d{3,}(?:\.npz|_metadata\.json)$")
_AGGREGATED_FILE = re.compile(r"^.+(?:\.npz|_metadata\.json)$")
_TEMP = re.compile(r"^\..+\.tmp")


def token_folder(word: str) -> str:
    """The folder of a word's maps: :func:`safe_component` of it, with a hash where the name is taken."""
    name = safe_component(word)
    if TAKEN.match(name):
        name = f"{name}-{hashlib.sha256(word.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"
    return name


def step_stem(step: int) -> str:
    """``step_003`` for step 3 (at least three digits)."""
    return f"step_{check_step(step):03d}"


def npz_name(step: Optional[int], word: Optional[str]) -> str:
    """Where a map goes, relative to the video folder: the word's file (``word``) or the file of the
    other maps (None), of a step or of the aggregate (``step`` None)."""
    if step is None:
        stem = "aggregated" if word is None else f"{token_folder(word)}_aggregated"
        return f"{AGGREGATED_DIR}/{stem}.npz"
    return f"{step_stem(step)}.npz" if word is None else f"{token_folder(word)}/{step_stem(step)}.npz"


def metadata_name(npz: str) -> str:
    """The metadata file beside an .npz: ``step_000.npz`` -> ``step_000_metadata.json``."""
    return npz[: -len(".npz")] + "_metadata.json"


def _word(name: str) -> Optional[str]:
    token = token_of(name)
    return None if token is None else token[0]


def _key(name: str) -> str:
    """A map's key inside its .npz: ``attention_map`` for a word's own map, else its name."""
    word = _word(name)
    return MAIN_KEY if word is not None and name == f"token/{word}" else name


def write_npz(path: Path, arrays: Mapping[str, np.ndarray], *, compress: bool) -> None:
    """Write ``arrays`` to ``path`` atomically as the .npz that ``np.savez`` (``np.savez_compressed``)
    writes: one ``<key>.npy`` member per array, no pickle. Built the way numpy builds it, since
    ``np.savez`` takes its keys as keyword arguments and a map may be named ``file``."""
    how = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=how, allowZip64=True) as zf:
        for key, arr in arrays.items():
            with zf.open(key + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


@dataclass
class NpzUnit:
    """One step (or the aggregate) of the numpy format as its manifest lists it; :meth:`read` reads a map."""

    path: str  # the manifest
    entries: dict[str, Entry]
    metadata: dict[str, str]
    key: tuple[int, int, int]
    folder: Path  # the video folder
    files: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # name -> (file, key, CRC-32)

    def read(self, name: str) -> np.ndarray:
        """The map ``name`` (its stored dtype) through ``np.load(allow_pickle=False)``, its npy header
        checked before its data is read and its checksum after; StoreError naming the .npz file."""
        entry = self.entries[name]
        rel, key, crc = self.files[name]
        path = self.folder / rel
        file_key(path, "an .npz file")
        try:
            # opened here, not by numpy, which leaves a file it opened open when the zip is bad; without
            # blocking, should a FIFO have taken the file's place since it was checked
            with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise StoreError(f"Store file {path} is not a regular file (expected an .npz file)")
                arr = self._member(path, f, key, entry)
        except StoreError:
            raise
        except Exception as exc:  # not a zip, an .npy, pickled data, a missing key, a truncated member ...
            raise StoreError(f"Corrupt store file {path}: cannot read {name!r} ({exc})") from None
        if arr.dtype != entry.dtype or arr.shape != entry.shape:
            raise StoreError(f"Corrupt store file {path}: {name!r} changed while it was read")
        if checksum(arr) != crc:
            raise StoreError(f"Corrupt store file {path}: the bytes of {name!r} do not match their checksum")
        return arr

    @staticmethod
    def _member(path: Path, f: Any, key: str, entry: Entry) -> np.ndarray:
        """The member ``key`` of the open .npz ``f``, its npy header checked first."""
        if f.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):  # np.load reads .npy and pickles too
            raise StoreError(f"Corrupt store file {path}: not an .npz file (a zip of .npy files)")
        f.seek(0)
        npz = np.load(f, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise StoreError(f"Corrupt store file {path}: not an .npz file (a zip of .npy files)")
        with npz:
            archive = npz.zip
            assert archive is not None  # an open NpzFile holds its zip
            info = archive.getinfo(key + ".npy")
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(member)
                else:
                    raise StoreError(
                        f"Corrupt store file {path}: {key!r} is an npy file of version {version}"
                    )
            if dtype != entry.dtype or tuple(shape) != entry.shape:
                raise StoreError(
                    f"Corrupt store file {path}: {key!r} holds {dtype} {list(shape)}, but its manifest says "
                    f"{entry.dtype} {list(entry.shape)}"
                )
            if (
                info.compress_type != zipfile.ZIP_STORED
                and info.file_size > DEFLATE_RATIO * info.compress_size + 4096
            ):
                raise StoreError(
                    f"Corrupt store file {path}: {key!r} declares {info.file_size} bytes from "
                    f"{info.compress_size} compressed"
                )
            return npz[key]

    def release(self) -> None:
        """Nothing stays open between reads."""


def _bad(path: PathLike, what: str) -> StoreError:
    return StoreError(f"Corrupt store file {path}: {what}")


class Numpy:
    """The numpy format behind the interface of :mod:`attnmap.store.formats` (see the module docstring).

    Args:
        compress: write compressed members (``np.savez_compressed``).
        video: the video's ``{height, width, fps, frames}``, the ``video_dimensions`` of the word files.
    """

    name = "numpy"
    kind = "a numpy-format manifest (JSON)"

    def __init__(self, *, compress: bool = False, video: Optional[Mapping[str, Any]] = None) -> None:
        self.compress = compress
        self.video = dict(video) if isinstance(video, Mapping) else {}

    # -- names ------------------------------------------------------------------------------------
    def unit_path(self, folder: Path, step: Optional[int]) -> Path:
        """The manifest of a step (or of the aggregate, ``step`` None)."""
        return folder / metadata_name(npz_name(step, None))

    def step_files(self, folder: Path) -> dict[int, str]:
        """step -> path of every step manifest in the folder (nothing is opened)."""
        files = {}
        with os.scandir(folder) as it:
            for e in it:
                m = _MANIFEST.match(e.name)
                if m and e.name == metadata_name(npz_name(int(m.group(1)), None)):
                    files[int(m.group(1))] = e.path
        return files

    def run_files(self, folder: Path) -> list[Path]:
        """Every file a run of this format leaves: steps and words' files, the aggregate, temp files in
        the subfolders it writes (the writer sweeps the video folder's own)."""
        out = [p for p in folder.iterdir() if _RUN_FILE.match(p.name)]
        with os.scandir(folder) as it:
            subfolders = [
                Path(e.path) for e in it if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")
            ]
        for sub in subfolders:
            pattern = _AGGREGATED_FILE if sub.name == AGGREGATED_DIR else _RUN_FILE
            out += [p for p in sub.iterdir() if pattern.match(p.name) or _TEMP.match(p.name)]
        return out

    # -- writing ----------------------------------------------------------------------------------
    def write(
        self, folder: Path, step: Optional[int], maps: Mapping[str, np.ndarray], metadata: Mapping[str, str]
    ) -> Path:
        """Write one step (or the aggregate, ``step`` None): the words' files and the other maps' file,
        then the manifest, each atomically."""
        now = _now()
        groups: dict[Optional[str], dict[str, np.ndarray]] = {}
        for name, arr in maps.items():
            groups.setdefault(_word(name), {})[name] = arr
        entries: dict[str, dict[str, Any]] = {}
        # the words first, the other maps last: the manifest follows them
        for word in sorted((w for w in groups if w is not None), key=str) + (
            [None] if None in groups else []
        ):
            group = dict(sorted(groups[word].items(), key=lambda kv: _key(kv[0]) != MAIN_KEY))
            rel = npz_name(step, word)
            target = folder / rel
            target.parent.mkdir(exist_ok=True)
            write_npz(target, {_key(n): a for n, a in group.items()}, compress=self.compress)
            for name, arr in group.items():
                entries[name] = {
                    "file": rel,
                    "key": _key(name),
                    "dtype": arr.dtype.name,
                    "shape": list(arr.shape),
                    "crc32": checksum(arr),
                }
            if word is not None:
                info = self._word_metadata(word, group, step, metadata, now)
                atomic_write(folder / metadata_name(rel), json.dumps(info, indent=1).encode("utf-8"))
        manifest = self.unit_path(folder, step)
        manifest.parent.mkdir(exist_ok=True)
        body = {
            **metadata,
            "storage_format": self.name,
            "storage_timestamp": now,
            "attention_storage_version": LAYOUT_VERSION,
            "maps": entries,
        }
        atomic_write(manifest, json.dumps(body, indent=1).encode("utf-8"))
        return manifest

    def _word_metadata(
        self,
        word: str,
        group: Mapping[str, np.ndarray],
        step: Optional[int],
        metadata: Mapping[str, str],
        now: str,
    ) -> dict[str, Any]:
        """The documented fields of a word's file (about its own map, ``attention_map``)."""
        main = group.get(f"token/{word}")
        if step is None:
            steps = json.loads(metadata.get("steps", "[]"))
            counts = json.loads(metadata.get("counts", "{}"))
            how = metadata.get("aggregation", "")
            num, method = counts.get(f"token/{word}", len(steps)), "mean" if how.startswith("mean") else how
        else:
            steps, num, method = [step], 1, "none"
        return {
            "shape": None if main is None else list(main.shape),
            "dtype": None if main is None else main.dtype.name,
            "num_steps": num,
            "steps_used": steps,
            "aggregation_method": method,
            "token_word": word,
            "video_dimensions": {k: self.video.get(k) for k in ("width", "height", "fps", "frames")},
            "storage_timestamp": now,
            "attention_storage_version": LAYOUT_VERSION,
            "run_id": metadata.get("run_id"),
            "step": step,
            "maps": {_key(name): name for name in group},
        }

    # -- reading ----------------------------------------------------------------------------------
    def read(self, path: PathLike, *, step: Optional[int] = None) -> NpzUnit:
        """Read and check a manifest (a step's, or the aggregate's).

        Args:
            path: the manifest.
            step: the step its name says; the manifest must say the same.

        Raises:
            StoreError: naming ``path``: missing, not a regular file, or any defect of the manifest.
        """
        key = file_key(path, self.kind)
        manifest = read_json(Path(path), self.kind)
        if not isinstance(manifest, dict):
            raise _bad(path, "the manifest is not a JSON object")
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("run_id"), str):
            raise _bad(path, "not an attnmap store file (no format or run id)")
        if step is not None and manifest.get("step") != str(step):
            raise StoreError(
                f"Store file {path} holds step {manifest.get('step')!r}, not step {step} as its name says"
            )
        if Path(path).name == AGGREGATED_MANIFEST:
            unit, folder = None, Path(path).parent.parent
        else:
            hit = _MANIFEST.match(Path(path).name)
            if hit is None:
                raise _bad(path, "not a manifest of the numpy format (step_NNN_metadata.json)")
            unit, folder = int(hit.group(1)), Path(path).parent
        maps = manifest.get("maps")
        if not isinstance(maps, dict) or len(maps) > MAX_ENTRIES:
            raise _bad(path, f"its maps must be an object of at most {MAX_ENTRIES} entries")
        entries: dict[str, Entry] = {}
        files: dict[str, tuple[str, str, int]] = {}
        for name, e in maps.items():
            if not name or "\x00" in name or name.startswith("__"):
                raise _bad(path, f"a map name {name!r} is not a store name")
            if not isinstance(e, dict) or e.get("dtype") not in DTYPES:
                raise _bad(
                    path,
                    f"map {name!r} has dtype {e.get('dtype') if isinstance(e, dict) else e!r}, expected float16 or float32",
                )
            shape = e.get("shape")
            if (
                not isinstance(shape, list)
                or len(shape) > MAX_NDIM
                or not all(type(s) is int and 1 <= s <= 1 << 40 for s in shape)
                or math.prod(shape) > 1 << 40
            ):
                raise _bad(
                    path,
                    f"map {name!r} has shape {shape!r}, expected at most {MAX_NDIM} dimensions of at least 1",
                )
            rel = npz_name(unit, _word(name))
            if e.get("file") != rel or e.get("key") != _key(name):
                raise _bad(
                    path,
                    f"map {name!r} is listed in {e.get('file')!r} under {e.get('key')!r}, not where this format writes it",
                )
            crc = e.get("crc32")
            if type(crc) is not int or not 0 <= crc < 1 << 32:
                raise _bad(path, f"map {name!r} has no CRC-32")
            entries[name] = Entry(DTYPES[e["dtype"]], tuple(shape))
            files[name] = (rel, e["key"], crc)
        meta = {k: v for k, v in manifest.items() if isinstance(v, str)}
        return NpzUnit(os.fspath(path), entries, meta, key, folder, files)
