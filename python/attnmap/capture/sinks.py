"""Sinks: where a capture's finished steps go.

A sink gets each finished step, one map dict per batch row (``write_step``), then ``close`` when the
capture ends, or ``abort`` when it ends by an exception (what was written stays; nothing is held). :class:`StoreSink` writes them through :class:`attnmap.store.StoreWriter` (one video
per batch row); :class:`AutoRenderSink`, added when a :class:`~attnmap.config.Config` asks for it,
renders the stored videos once the store sink has closed them. Private to :mod:`attnmap.capture`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch

from attnmap.config import Config
from attnmap.errors import AttnmapError

RowMaps = Sequence[dict[str, torch.Tensor]]


class Sink(Protocol):
    def write_step(self, step: int, rows: RowMaps) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class StoreSink:
    """Writes each step of each batch row as a store video (``video_ids`` one per row).

    Args:
        root: the store root.
        video_ids: the videos' ids, one per batch row.
        metadata: called with a video's batch row when its first step is written.
        config: storage dtype and formats, compression, downsampling, whether the aggregate is written.
    """

    def __init__(
        self,
        root: Path,
        video_ids: Sequence[str],
        metadata: Callable[[int], dict[str, Any]],
        config: Optional[Config],
    ) -> None:
        self.root, self.video_ids, self.metadata = root, list(video_ids), metadata
        self.config = config or Config()
        self._writers: dict[str, Any] = {}

    def write_step(self, step: int, rows: RowMaps) -> None:
        if not self.config.store_attention:
            return
        if len(self.video_ids) != len(rows):
            raise AttnmapError(
                f"video_id gives {len(self.video_ids)} id(s) {self.video_ids} but the model ran "
                f"{len(rows)} video(s) per branch; pass one id per video"
            )
        for row, (vid, maps) in enumerate(zip(self.video_ids, rows)):
            self._writer(vid, row).write_step(step, maps)

    def _writer(self, video_id: str, row: int) -> Any:
        from attnmap.store import StoreWriter

        writer = self._writers.get(video_id)
        if writer is None:
            writer = StoreWriter(
                self.root,
                video_id,
                self.metadata(row),
                dtype=self.config.storage_dtype,
                downsample=self.config.spatial_downsample_factor,
                storage_format=self.config.storage_format,
                aggregated_format=self.config.aggregated_storage_format,
                compress=self.config.compress_attention,
            )
            self._writers[video_id] = writer
        return writer

    @property
    def written(self) -> list[str]:
        """The ids of the videos written so far."""
        return list(self._writers)

    def close(self) -> None:
        # store_aggregated_attention: false leaves the aggregate empty (the steps stay loadable)
        aggregated: Optional[dict[str, Any]] = None if self.config.store_aggregated_attention else {}
        for vid, writer in self._writers.items():
            self._refresh(writer, self.metadata(self.video_ids.index(vid)))
            writer.close(aggregated)

    @staticmethod
    def _refresh(writer: Any, final: dict[str, Any]) -> None:
        """Merge what was learnt after a video's first step (a video LLM's answer words, the blocks
        seen) into its metadata, where the result is still JSON-safe and within the store's schema."""
        import json

        from attnmap.store import RESERVED_KEYS
        from attnmap.store.schema import problem

        merged = {**writer.metadata, **{k: v for k, v in final.items() if k not in RESERVED_KEYS}}
        try:
            checked = json.loads(json.dumps(merged, allow_nan=False))
        except (TypeError, ValueError):
            return
        if problem(checked) is None:
            writer.metadata.update(checked)

    def abort(self) -> None:
        """The capture failed: drop each writer's lock, leaving its finished steps loadable."""
        for writer in self._writers.values():
            writer.abort()


class AutoRenderSink:
    """Renders the videos a :class:`StoreSink` wrote, after it closed them (``auto_generate_*``)."""

    def __init__(self, store: StoreSink, config: Config) -> None:
        self.store, self.config = store, config

    def write_step(self, step: int, rows: RowMaps) -> None:
        return None

    def abort(self) -> None:
        return None  # nothing rendered from a failed capture

    def close(self) -> None:
        from attnmap.store import video_dirname

        root, params = self.store.root, self.config.visualization_params
        if not self.store.written:
            return
        if self.config.auto_generate_per_video:
            from attnmap.render.videos import render_video

            for vid in self.store.written:
                render_video(root, vid, root / video_dirname(vid) / "attention_videos", params)
        if self.config.auto_generate_videos:
            from attnmap.render.videos import render_store

            render_store(root, params)


def store_sinks(
    root: Path, video_ids: Sequence[str], metadata: Callable[[int], dict[str, Any]], config: Optional[Config]
) -> list[Sink]:
    """The sinks of ``store=``: the store writer, and auto-render when the config asks for it."""
    store = StoreSink(root, video_ids, metadata, config)
    sinks: list[Sink] = [store]
    if config is not None and (config.auto_generate_per_video or config.auto_generate_videos):
        sinks.append(AutoRenderSink(store, config))
    return sinks
