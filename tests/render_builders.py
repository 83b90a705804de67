"""Stores and videos that the render tests (test_videos, test_cli) build: plain builders, not tests."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from attnmap.store import StoreWriter

VIDEO = {"height": 32, "width": 48, "fps": 8, "frames": 9}


def make_original(path: Path, frames: int = 9, size: tuple[int, int] = (32, 48)) -> Path:
    """A plain grey video written with PyAV directly (independent of attnmap.render)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.height, stream.width, stream.pix_fmt = size[0], size[1], "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((*size, 3), 128, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def make_store(root: Path, *, original: Path | None = None, steps: int = 3) -> Path:
    """Video "vid 1": words cat and dog, latent grid (3, 4, 6), vae stride 4 (9 frames), per-head temporal
    and text maps. cat's map is 1 in the top-left latent token of every frame and 0 elsewhere."""
    meta = {
        "prompt": "a (cat) and a (dog)",
        "targets": {"cat": [1], "dog": [4]},
        "text_tokens": ["a", "cat", "and", "a", "dog"],
        "grid": [3, 4, 6],
        "vae_stride": [4, 8, 8],
        "video": dict(VIDEO, **({"path": str(original)} if original else {})),
    }
    rng = np.random.default_rng(0)
    with StoreWriter(root, "vid 1", meta, dtype="float32") as writer:
        for step in range(steps):
            cat = np.zeros((3, 4, 6), np.float32)
            cat[:, 0, 0] = 1.0
            writer.write_step(
                step,
                {
                    "token/cat": cat,
                    "token/dog": rng.random((3, 4, 6)).astype(np.float32),
                    "temporal": rng.random((2, 3, 3)).astype(np.float32),
                    "text": rng.random((5, 5)).astype(np.float32),
                },
            )
    return root


def decode(path: Path) -> tuple[np.ndarray, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, float(stream.average_rate or 0)
