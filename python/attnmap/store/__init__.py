"""The attention store: one folder per video under a root, metadata JSON and safetensors maps (or the
per-token ``.npz`` layout of the numpy format, :mod:`attnmap.store.npz`).

Layout on disk (``<dir>`` is the sanitised video id, see :func:`video_dirname`)::

    root/<dir>/metadata.json                  video metadata + store keys (run id, schema, format, ...)
    root/<dir>/step_000003.safetensors        every map of step 3 (names are keys, never paths)
    root/<dir>/aggregated.safetensors         the step-aggregated maps (mean over steps)

    with storage_format="numpy":
    root/<dir>/<token>/step_003.npz           the word's maps of step 3, and step_003_metadata.json
    root/<dir>/step_003.npz                   the step's other maps; step_003_metadata.json commits it
    root/<dir>/aggregated/<token>_aggregated.npz, aggregated.npz, and their _metadata.json

Every file is written atomically (temp file, fsync, rename, fsync of the folder), so a run
killed at any moment leaves each finished step loadable. Each step file carries the run id in
its safetensors metadata, and ``metadata.json`` names the current run: files of an older run of
the same video id are never mixed in. A run that died before ``close`` has no aggregated file;
:meth:`Store.aggregated` then averages the finished steps and :meth:`Store.rebuild_aggregated`
writes the file.

Loading goes through safetensors' ``safe_open`` (or ``np.load(allow_pickle=False)``; never a pickle)
with attnmap's own checks on top: only regular files, bounded shapes, the run and step each file
names, a CRC-32 per map, and ``metadata.json`` checked against a schema. A bad file is skipped with a
warning naming it (once per :class:`Store`); a bad aggregated file falls back to the mean of the good
steps (:meth:`Store.mean`, the one aggregation over steps).

Many processes may write one root at once, each its own videos: a video's files never leave its
folder, and the commit points (a step's file or manifest, ``metadata.json``) are renames. One writer per
video id at a time: a claim file that names its writer (``.writer.lock``, :mod:`attnmap.store.lock`),
which never depends on flock; ``wait=`` to wait. A writer given its run's ``run_id`` again (a retry)
continues the run: the steps it committed never change.

Example:
    >>> w = StoreWriter(root, "vid 1", {"prompt": "a (cat)"})
    >>> w.write_step(0, {"token/cat": np.ones((2, 3, 4))})
    >>> w.close()
    >>> open_store(root).load_step("vid 1", "cat", 0).map.shape
    (2, 3, 4)
"""

from __future__ import annotations

from attnmap.errors import StoreError
from attnmap.store.format import (
    AGGREGATED_FILE,
    METADATA_FILE,
    RESERVED_KEYS,
    SCHEMA_VERSION,
    downsample_spatial,
    token_of,
)
from attnmap.store.lock import LOCK_FILE
from attnmap.store.naming import safe_component, step_filename, video_dirname
from attnmap.store.reader import AttentionMap, Store, open_store
from attnmap.store.writer import StoreWriter, derive_run_id

__all__ = [
    "AGGREGATED_FILE",
    "LOCK_FILE",
    "METADATA_FILE",
    "RESERVED_KEYS",
    "SCHEMA_VERSION",
    "AttentionMap",
    "Store",
    "StoreError",
    "StoreWriter",
    "derive_run_id",
    "downsample_spatial",
    "open_store",
    "safe_component",
    "step_filename",
    "token_of",
    "video_dirname",
]
