"""Token layouts: which positions of one attention call are text, video or prefix tokens.

Every reduction of attnmap is defined over a layout. The video grid is (F, H, W) in latent
tokens and a video token's index inside the grid is ``f * H * W + h * W + w``.

- ``joint``: text and video tokens in one sequence, queries and keys alike (CogVideoX puts
  text first, HunyuanVideo video first).
- ``self``: video tokens only, after ``prefix`` extra tokens (CLS, registers), queries and keys
  alike (Wan attn1, video ViTs).
- ``cross``: the queries are ``prefix`` extra tokens then the video tokens, the keys are
  ``text`` tokens (Wan attn2, a pooler's cross-attention).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional

from attnmap.errors import AttnmapError

Kind = Literal["joint", "self", "cross"]

#: Which reductions each layout kind supports. ``temporal`` and ``distance`` need video keys, so a
#: cross layout has neither; its ``blocks`` are token tiles only (video cubes need video keys).
SUPPORTED: dict[str, tuple[str, ...]] = {
    "joint": ("cross", "temporal", "text", "received", "probe", "full", "blocks", "distance", "entropy"),
    "self": ("temporal", "received", "probe", "full", "blocks", "distance", "entropy"),
    "cross": ("cross", "received", "probe", "full", "blocks", "entropy"),
}


def _positive_grid(grid: tuple[int, int, int]) -> tuple[int, int, int]:
    try:
        values = tuple(int(g) for g in grid)
    except TypeError as exc:
        raise AttnmapError(f"grid must be a tuple (F, H, W) of positive ints, got {grid!r}") from exc
    if len(values) != 3 or any(g < 1 for g in values):
        raise AttnmapError(f"grid must be a tuple (F, H, W) of positive ints, got {grid!r}")
    return (values[0], values[1], values[2])


def _count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise AttnmapError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Layout:
    """The token layout of one attention call. Build it with :meth:`joint`, :meth:`self_attn`
    or :meth:`cross`.

    Example:
        >>> lay = Layout.joint(text=226, grid=(13, 30, 45))
        >>> lay.num_queries, lay.video_q
        (17776, slice(226, 17776, None))
    """

    kind: Kind
    grid: tuple[int, int, int]
    text: int = 0
    prefix: int = 0
    text_first: bool = True

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def joint(cls, text: int, grid: tuple[int, int, int], text_first: bool = True) -> Layout:
        """Text and video tokens in one sequence (CogVideoX: text first; HunyuanVideo: last)."""
        return cls("joint", _positive_grid(grid), _count("text", text, 0), 0, bool(text_first))

    @classmethod
    def self_attn(cls, grid: tuple[int, int, int], prefix: int = 0) -> Layout:
        """Video self-attention; ``prefix`` tokens (CLS, registers) come before the grid."""
        return cls("self", _positive_grid(grid), 0, _count("prefix", prefix, 0))

    @classmethod
    def cross(cls, grid: tuple[int, int, int], text: int, prefix: int = 0) -> Layout:
        """Video queries (after ``prefix`` extra queries) attending to ``text`` keys."""
        return cls("cross", _positive_grid(grid), _count("text", text, 1), _count("prefix", prefix, 0))

    # -- sizes ------------------------------------------------------------------------------
    @property
    def frames(self) -> int:
        return self.grid[0]

    @property
    def frame_tokens(self) -> int:
        """Video tokens per latent frame (H * W)."""
        return self.grid[1] * self.grid[2]

    @property
    def num_video(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def num_queries(self) -> int:
        if self.kind == "joint":
            return self.text + self.num_video
        return self.prefix + self.num_video

    @property
    def num_keys(self) -> int:
        if self.kind == "cross":
            return self.text
        return self.num_queries

    # -- where each kind of token sits (None where the layout has none) ----------------------
    @property
    def video_q(self) -> slice:
        """Positions of the video tokens among the queries."""
        start = self.text if (self.kind == "joint" and self.text_first) else self.prefix
        return slice(start, start + self.num_video)

    @property
    def video_k(self) -> Optional[slice]:
        """Positions of the video tokens among the keys."""
        return None if self.kind == "cross" else self.video_q

    @property
    def text_q(self) -> Optional[slice]:
        """Positions of the text tokens among the queries (joint layouts only)."""
        if self.kind != "joint":
            return None
        start = 0 if self.text_first else self.num_video
        return slice(start, start + self.text)

    @property
    def text_k(self) -> Optional[slice]:
        """Positions of the text tokens among the keys."""
        if self.kind == "cross":
            return slice(0, self.text)
        return self.text_q

    def supports(self, reduction: str, *, block_size: Optional[Sequence[int]] = None) -> bool:
        """Whether ``reduction`` is defined for this layout; for ``blocks`` with ``block_size`` video
        cubes ``(t, h, w)``, also whether the layout has video keys for them."""
        if reduction not in SUPPORTED[self.kind]:
            return False
        if reduction == "blocks" and isinstance(block_size, Sequence) and len(block_size) == 3:
            return self.video_k is not None
        return True

    def check(self, num_queries: int, num_keys: int, *, argument: str = "layout") -> None:
        """Raise AttnmapError (naming ``argument``) if the layout does not fit a call's sizes."""
        if num_queries != self.num_queries or num_keys != self.num_keys:
            raise AttnmapError(
                f"{argument} {self} expects {self.num_queries} queries and {self.num_keys} keys, "
                f"but the call has {num_queries} queries and {num_keys} keys"
            )

    def __str__(self) -> str:
        if self.kind == "joint":
            order = "text first" if self.text_first else "video first"
            return f"Layout.joint(text={self.text}, grid={self.grid}, {order})"
        if self.kind == "self":
            return f"Layout.self_attn(grid={self.grid}, prefix={self.prefix})"
        return f"Layout.cross(grid={self.grid}, text={self.text}, prefix={self.prefix})"

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "grid": list(self.grid),
            "text": self.text,
            "prefix": self.prefix,
            "text_first": self.text_first,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Layout:
        """Rebuild a layout from :meth:`to_dict`'s output (as stored in a store's metadata)."""
        kind = data.get("kind")
        grid = tuple(int(g) for g in data.get("grid", ()))
        if kind == "joint":
            return cls.joint(int(data["text"]), grid, bool(data.get("text_first", True)))  # type: ignore[arg-type]
        if kind == "self":
            return cls.self_attn(grid, int(data.get("prefix", 0)))  # type: ignore[arg-type]
        if kind == "cross":
            return cls.cross(grid, int(data["text"]), int(data.get("prefix", 0)))  # type: ignore[arg-type]
        raise AttnmapError(f"layout kind must be 'joint', 'self' or 'cross', got {kind!r}")
