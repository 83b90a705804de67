"""Names that become paths inside a store: video folders, step files, token map names."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np

from attnmap.errors import AttnmapError

#: The longest directory name a video id becomes (longer ids end in a hash of the exact id).
MAX_DIRNAME = 96


def check_video_id(video_id: Any) -> str:
    if not isinstance(video_id, str) or not video_id:
        raise AttnmapError(f"video_id must be a non-empty str, got {video_id!r}")
    if "\x00" in video_id:
        raise AttnmapError(f"video_id must not contain NUL characters, got {video_id!r}")
    return video_id


def safe_component(name: str, max_length: int = MAX_DIRNAME) -> str:
    """A name as one plain file name component that no other name maps to.

    Characters outside ``[A-Za-z0-9._-]`` become ``_``, leading dots are dropped and the name is cut
    to ``max_length`` characters. Whenever that changed the name (or the name looks like such a
    result) a hash of the exact name (16 hex digits of its SHA-256) is appended, so distinct names
    never share a component: ``"a b"``, ``"a:b"``, ``"a/b"`` and ``"a_b"`` give four.

    Args:
        name: any non-empty str without NUL (a video id, a token word, a map name).
        max_length: the longest kept part of the name, before the hash.

    Returns:
        str: e.g. ``"cat"``, ``"cat_s-fee36aecff5c3f07"`` for ``"cat s"``, ``"_x-d6b96a97d147daaa"`` for ``"../x"``.

    Example:
        >>> safe_component("cat"), safe_component("cat s") != safe_component("cat_s")
        ('cat', True)
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise AttnmapError(f"name: expected a non-empty str without NUL characters, got {name!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise AttnmapError(f"max_length: expected an int >= 1, got {max_length!r}")
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    looks_hashed = re.search(r"-[0-9a-f]{16}$", clean) is not None
    if clean == name and len(clean) <= max_length and not looks_hashed:
        return clean
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{clean[:max_length]}-{digest}".lstrip("-") or digest


def video_dirname(video_id: str) -> str:
    """The folder name of a video id: always one plain path component inside the root, distinct for
    distinct ids (:func:`safe_component` with the store's 96 characters).

    Args:
        video_id: any non-empty str without NUL.

    Returns:
        str: e.g. ``"prompt_001_vid_001"`` or ``"x-3f9c...`` for ``"../x"``.
    """
    return safe_component(check_video_id(video_id), MAX_DIRNAME)


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
