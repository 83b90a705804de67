"""How a rendered attention video or figure looks: :class:`RenderOptions`, the one options type.

The CLI builds it from its flags; a config's ``visualization_params`` block parses into it
(:meth:`RenderOptions.from_dict`), key for key: every key is a field, and an unknown key is an error
that lists the valid ones.

Example:
    >>> RenderOptions.from_dict({"colormap": "jet", "overlay_alpha": 0.5}).overlay_alpha
    0.5
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Optional

from attnmap._checks import integer, number
from attnmap.analysis.normalization import check as check_normalize
from attnmap.errors import AttnmapError

#: containers the renders write
VIDEO_FORMATS = ("mp4", "webm", "gif", "mkv", "mov")
#: frames per second when neither the options, the original video nor the metadata give one
DEFAULT_FPS = 10
#: the largest figure side in inches (a figure of the documented configs is 12 x 8 to 16 x 10)
MAX_FIGSIZE = 100.0


@dataclass(frozen=True)
class RenderOptions:
    """How a rendered attention video looks (``visualization_params`` of a config).

    Attributes:
        colormap: a colormap of :func:`attnmap.render.colormap_names` (matplotlib's names).
        fps: frames per second of the output; None: the original video's rate, else the metadata's
            ``video.fps``, else 10.
        overlay_alpha: heatmap opacity over the original video, in [0, 1].
        normalize: a name of the normalisation vocabulary (:mod:`attnmap.analysis.normalization`).
        vmin: the attention value shown as the lowest colour (None: measured).
        vmax: the attention value shown as the highest colour (None: measured).
        threshold: None, or a level in [0, 1] of the normalised map whose mask outline is drawn.
        interpolation_steps: blended frames between consecutive steps of a step-evolution video.
        static_duration: seconds a one-frame map is held.
        include_colorbar: draw a colour bar with ticks.
        labels: draw the token, step and time into the frames.
        include_timestamp: add the time of each frame to the label.
        video_format: container when the output is a folder (mp4, webm, gif, mkv, mov).
        figsize: (width, height) in inches of the matplotlib figures.
    """

    colormap: str = "hot"
    fps: Optional[float] = None
    overlay_alpha: float = 0.6
    normalize: str = "global"
    vmin: Optional[float] = None
    vmax: Optional[float] = None
    threshold: Optional[float] = None
    interpolation_steps: int = 2
    static_duration: float = 3.0
    include_colorbar: bool = True
    labels: bool = True
    include_timestamp: bool = False
    video_format: str = "mp4"
    figsize: Optional[tuple[float, float]] = None

    def __post_init__(self) -> None:
        from attnmap.render.codec import FPS_RANGE
        from attnmap.render.heatmap import MAX_FRAMES, check_colormap

        check_colormap(self.colormap)
        if self.fps is not None:
            number("fps", self.fps, low=FPS_RANGE[0], high=FPS_RANGE[1])
        number("overlay_alpha", self.overlay_alpha, low=0.0, high=1.0)
        check_normalize(self.normalize)
        for name in ("vmin", "vmax"):
            if getattr(self, name) is not None:
                number(name, getattr(self, name))
        if self.vmin is not None and self.vmax is not None and not self.vmax > self.vmin:
            raise AttnmapError(f"vmin, vmax: expected vmin < vmax, got {self.vmin} and {self.vmax}")
        if self.normalize == "fixed" and (self.vmin is None or self.vmax is None):
            raise AttnmapError("normalize: 'fixed' needs vmin and vmax")
        if self.threshold is not None:
            number("threshold", self.threshold, low=0.0, high=1.0)
        # the blended frames between two steps are output frames: at most a render's MAX_FRAMES
        integer("interpolation_steps", self.interpolation_steps, low=0, high=MAX_FRAMES)
        number("static_duration", self.static_duration, low=0.0, open_low=True)
        for name in ("include_colorbar", "labels", "include_timestamp"):
            if not isinstance(getattr(self, name), bool):
                raise AttnmapError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        if str(self.video_format).lower() not in VIDEO_FORMATS:
            raise AttnmapError(
                f"video_format: expected one of {', '.join(VIDEO_FORMATS)}, got {self.video_format!r}"
            )
        if self.figsize is not None:
            fs = self.figsize
            if not isinstance(fs, (list, tuple)) or len(fs) != 2:
                raise AttnmapError(f"figsize: expected [width, height] in inches, got {fs!r}")
            for v in fs:
                number("figsize", v, low=0.0, high=MAX_FIGSIZE, open_low=True)
            object.__setattr__(self, "figsize", (float(fs[0]), float(fs[1])))

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(
        cls, data: Optional[Mapping[str, Any]], *, where: str = "visualization_params"
    ) -> RenderOptions:
        """Options from a mapping of field names (a config's ``visualization_params``); missing
        keys take their defaults.

        Raises:
            AttnmapError: an unknown key (the message lists the valid ones) or a bad value, named
                as ``<where>.<key>``.
        """
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise AttnmapError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
        unknown = sorted(str(k) for k in data if k not in cls.keys())
        if unknown:
            raise AttnmapError(
                f"unknown key(s) {unknown} in {where}; valid keys are: {', '.join(cls.keys())}"
            )
        values: dict[str, Any] = {str(k): v for k, v in data.items()}
        if isinstance(values.get("figsize"), list):
            values["figsize"] = tuple(values["figsize"])
        try:
            return cls(**values)
        except AttnmapError as exc:
            raise AttnmapError(f"{where}.{exc}") from None

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.figsize is not None:
            out["figsize"] = list(self.figsize)
        return out
