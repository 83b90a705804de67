"""The store's file formats behind one interface, which the writer and the reader use.

A format knows the files of one video folder: where a step's maps go (and the step-aggregated maps,
``step`` None), how they are written (atomically, the run id, the step and each map's CRC-32 with
them) and how they are read back, checked, as one :class:`StoreFile` per step. Two formats:

- ``"safetensors"`` (:class:`attnmap.store.format.Safetensors`, the default): one file per step;
- ``"numpy"`` (:class:`attnmap.store.npz.Numpy`): the per-token ``.npz`` layout, optionally compressed.

A video's ``metadata.json`` says which it uses (``storage``: ``{"steps", "aggregated", "compressed"}``;
a store without the key is safetensors). ``torch`` is refused: ``torch.save`` writes pickle, which
loading would have to run.

Example:
    >>> steps, aggregated = check_storage("numpy", None, compress=True)
    >>> fmt = file_format(steps, compress=True)
    >>> fmt.write(folder, 3, {"token/cat": m}, step_metadata(run_id, 3))   # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np

from attnmap.errors import AttnmapError
from attnmap.store.format import FORMAT, SCHEMA_VERSION, STORAGE_FORMATS, Entry, PathLike, Safetensors
from attnmap.store.npz import Numpy


class StoreFile(Protocol):
    """One step (or the aggregate) as its format read it: checked, its maps listed, none read yet."""

    path: str  # what a message names: the file, or the numpy format's manifest
    entries: dict[str, Entry]  # map name -> dtype and shape
    metadata: dict[str, str]  # format, schema_version, run_id, step (or steps, counts, aggregation)

    def read(self, name: str) -> np.ndarray:
        """The map ``name`` in its stored dtype, its checksum checked (StoreError naming the file)."""
        ...

    def release(self) -> None:
        """Close what is held open between reads."""
        ...


class FileFormat(Protocol):
    """Where a video folder's maps go and how they are written and read (see the module docstring)."""

    name: str
    kind: str  # what a step's file is, for messages

    def unit_path(self, folder: Path, step: Optional[int]) -> Path:
        """The file whose arrival commits a step (``step`` None: the aggregate)."""
        ...

    def step_files(self, folder: Path) -> dict[int, str]:
        """step -> its :meth:`unit_path`, for every step in the folder (nothing is opened)."""
        ...

    def run_files(self, folder: Path) -> list[Path]:
        """Every file a run of this format leaves in the folder (removed when a new run commits)."""
        ...

    def read(self, path: PathLike, *, step: Optional[int] = None) -> StoreFile:
        """The checked step (its name says ``step``) or aggregate at ``path``; StoreError naming it."""
        ...

    def write(
        self, folder: Path, step: Optional[int], maps: Mapping[str, np.ndarray], metadata: Mapping[str, str]
    ) -> Path:
        """Write a step (``step`` None: the aggregate) atomically; returns :meth:`unit_path`."""
        ...


def check_format(value: Any, argument: str) -> str:
    """A storage format name, or an AttnmapError naming ``argument`` and the formats a store writes."""
    if value == "torch":
        raise AttnmapError(
            f"{argument}: 'torch' files are written with pickle (torch.save), and loading them would run "
            f"it; attnmap stores tensors without pickle: use {' or '.join(STORAGE_FORMATS)} (numpy: .npz of "
            "plain arrays, loaded with allow_pickle=False)"
        )
    if value not in STORAGE_FORMATS:
        raise AttnmapError(f"{argument}: expected one of {', '.join(STORAGE_FORMATS)}, got {value!r}")
    return str(value)


def check_storage(steps: Any, aggregated: Any, *, compress: Any, where: str = "") -> tuple[str, str]:
    """The formats of the steps and of the aggregate (None: as the steps), checked together with
    ``compress``, which needs a format that compresses (numpy). ``where`` prefixes the arguments' names
    (``"attention_analysis."``)."""
    names = (f"{where}storage_format", f"{where}aggregated_storage_format", f"{where}compress_attention")
    if not where:
        names = ("storage_format", "aggregated_format", "compress")
    steps = check_format(steps, names[0])
    aggregated = steps if aggregated is None else check_format(aggregated, names[1])
    if not isinstance(compress, bool):
        raise AttnmapError(f"{names[2]}: expected true or false, got {compress!r}")
    if compress and "numpy" not in (steps, aggregated):
        raise AttnmapError(
            f"{names[2]}: safetensors files are stored uncompressed; set {names[0]} to numpy for compressed "
            ".npz files, or leave it off (float16 and spatial downsampling make stores smaller)"
        )
    return steps, aggregated


def file_format(
    name: str, *, compress: bool = False, video: Optional[Mapping[str, Any]] = None
) -> FileFormat:
    """The format ``name`` (:data:`STORAGE_FORMATS`); ``compress`` and ``video`` (the words' metadata)
    concern the numpy format's writes only."""
    if check_format(name, "storage_format") == "numpy":
        return Numpy(compress=compress, video=video)
    return Safetensors()


def storage(meta: Mapping[str, Any]) -> tuple[FileFormat, FileFormat]:
    """The formats of a video's steps and of its aggregate, from its metadata (safetensors without the
    ``storage`` key), ready to write as the run wrote (``compressed``, the video's size)."""
    given = meta.get("storage") or {}
    compress, video = bool(given.get("compressed", False)), meta.get("video")
    steps = file_format(given.get("steps", "safetensors"), compress=compress, video=video)
    aggregated = file_format(given.get("aggregated", steps.name), compress=compress, video=video)
    return steps, aggregated


def step_metadata(run_id: str, step: int) -> dict[str, str]:
    """What a step's file says about itself: the store format, the run and the step."""
    return {"format": FORMAT, "schema_version": str(SCHEMA_VERSION), "run_id": run_id, "step": str(step)}


def write_aggregated(
    fmt: FileFormat,
    folder: Path,
    maps: Mapping[str, np.ndarray],
    run_id: str,
    steps: list[int],
    counts: Mapping[str, int],
    how: str,
) -> Path:
    """Write the step-aggregated maps of the video folder ``folder`` atomically in ``fmt``, saying which
    steps (and how many per map) went into them and how."""
    meta = {
        "format": FORMAT,
        "schema_version": str(SCHEMA_VERSION),
        "run_id": run_id,
        "steps": json.dumps(steps),
        "counts": json.dumps(dict(counts)),
        "aggregation": how,
    }
    return fmt.write(folder, None, maps, meta)
