"""Names that become paths inside a store: video folders, step files, token map names."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np

from attnmap.errors import AttnmapError
from attnmap.store.format import MAX_DIRNAME


def check_video_id(video_id: Any) -> str:
    if not isinstance(video_id, str) or not video_id:
        raise AttnmapError(f"video_id must be a non-empty str, got {video_id!r}")
    if "\x00" in video_id:
        raise AttnmapError(f"video_id must not contain NUL characters, got {video_id!r}")
    return video_id


def video_dirname(video_id: str) -> str:
    """The folder name of a video id: always one plain path component inside the root.

    Characters outside ``[A-Za-z0-9._-]`` become ``_``, leading dots are dropped and the name
    is cut to 96 characters. Whenever that changed the id (or the id looks like such a result)
    an 8-byte hash of the exact id is appended, so distinct ids never share a folder.

    Args:
        video_id: any non-empty str without NUL.

    Returns:
        str: e.g. ``"prompt_001_vid_001"`` or ``"x-3f9c...`` for ``"../x"``.
    """
    video_id = check_video_id(video_id)
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", video_id).lstrip(".")
    looks_hashed = re.search(r"-[0-9a-f]{16}$", clean) is not None
    if clean == video_id and len(clean) <= MAX_DIRNAME and not looks_hashed:
        return clean
    digest = hashlib.sha256(video_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{clean[:MAX_DIRNAME]}-{digest}".lstrip("-") or digest


def check_name(name: Any, what: str = "map name") -> str:
    if not isinstance(name, str) or not name:
        raise AttnmapError(f"{what} must be a non-empty str, got {name!r}")
    if "\x00" in name:
        raise AttnmapError(f"{what} must not contain NUL characters, got {name!r}")
    if name.startswith("__"):
        raise AttnmapError(f"{what} must not start with '__' (reserved by safetensors), got {name!r}")
    return name


def check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise AttnmapError(f"step must be an int >= 0, got {step!r}")
    return int(step)


def step_filename(step: int) -> str:
    """``step_000003.safetensors`` for step 3."""
    return f"step_{check_step(step):06d}.safetensors"
