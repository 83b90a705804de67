"""The ``attention_analysis`` configuration block (seed 001's YAML) as typed dataclasses.

Example:
    >>> cfg = Config.from_dict({"store_per_block": True, "visualization_params": {"fps": 12}})
    >>> cfg.store_per_block, cfg.visualization_params.fps
    (True, 12)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Union

STORAGE_DTYPES = ("float16", "float32")
STORAGE_FORMATS = ("numpy", "torch", "safetensors")
#: containers attnmap.render.write_video writes that the seed configs use
VIDEO_FORMATS = ("mp4", "webm", "gif", "mkv")


def _check_keys(data: Mapping[str, Any], valid: tuple[str, ...], where: str) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in valid)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys are: {', '.join(valid)}")


def _bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, got {value!r}")
    return value


def _number(where: str, value: Any, minimum: float, *, integer: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number >= {minimum}, got {value!r}")
    if integer and int(value) != value:
        raise ValueError(f"{where} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{where} must be >= {minimum}, got {value!r}")
    return int(value) if integer else float(value)


def _choice(where: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{where} must be one of {', '.join(choices)}; got {value!r}")
    return str(value)


@dataclass(frozen=True)
class VisualizationParams:
    """How rendered attention videos look (``visualization_params`` of the YAML block).

    Attributes:
        figsize: figure (width, height) in inches for matplotlib figures.
        colormap: a matplotlib colormap name.
        overlay_alpha: heatmap opacity over the original video, in [0, 1].
        static_duration: seconds a step-aggregated (static) map is shown.
        fps: frames per second of the rendered videos.
        interpolation_steps: frames blended between consecutive steps (0: none).
        include_colorbar: draw the attention scale.
        video_format: container of the rendered videos (mp4, webm, gif, mkv).
    """

    figsize: tuple[float, float] = (12.0, 8.0)
    colormap: str = "hot"
    overlay_alpha: float = 0.6
    static_duration: float = 3.0
    fps: int = 10
    interpolation_steps: int = 2
    include_colorbar: bool = True
    video_format: str = "mp4"

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VisualizationParams:
        """Validate a ``visualization_params`` mapping; missing keys take their defaults."""
        where = "attention_analysis.visualization_params"
        _check_keys(data, cls.keys(), where)
        out: dict[str, Any] = {}
        if "figsize" in data:
            fs = data["figsize"]
            if (
                not isinstance(fs, (list, tuple))
                or len(fs) != 2
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in fs)
            ):
                raise ValueError(f"{where}.figsize must be [width, height] of positive numbers, got {fs!r}")
            out["figsize"] = (float(fs[0]), float(fs[1]))
        if "colormap" in data:
            if not isinstance(data["colormap"], str) or not data["colormap"]:
                raise ValueError(f"{where}.colormap must be a colormap name, got {data['colormap']!r}")
            out["colormap"] = data["colormap"]
        if "overlay_alpha" in data:
            alpha = _number(f"{where}.overlay_alpha", data["overlay_alpha"], 0.0)
            if alpha > 1.0:
                raise ValueError(f"{where}.overlay_alpha must be in [0, 1], got {alpha!r}")
            out["overlay_alpha"] = alpha
        if "static_duration" in data:
            out["static_duration"] = _number(f"{where}.static_duration", data["static_duration"], 0.0)
        if "fps" in data:
            out["fps"] = _number(f"{where}.fps", data["fps"], 1, integer=True)
        if "interpolation_steps" in data:
            out["interpolation_steps"] = _number(
                f"{where}.interpolation_steps", data["interpolation_steps"], 0, integer=True
            )
        if "include_colorbar" in data:
            out["include_colorbar"] = _bool(f"{where}.include_colorbar", data["include_colorbar"])
        if "video_format" in data:
            out["video_format"] = _choice(f"{where}.video_format", data["video_format"], VIDEO_FORMATS)
        return cls(**out)

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: (list(self.figsize) if f.name == "figsize" else getattr(self, f.name))
            for f in fields(self)
        }


@dataclass(frozen=True)
class Config:
    """The ``attention_analysis`` block: what capture keeps and stores, and what is rendered.

    Attributes:
        store_attention: write the captured maps to the store.
        storage_format: kept for compatibility with seed configs (the store always writes
            safetensors; "numpy"/"torch" name the same maps).
        compress_attention: compress the stored tensors when the store supports it.
        storage_dtype: dtype of stored maps (float16 or float32).
        store_per_head: keep a map per head (H as the first dim) instead of the head mean.
        store_per_block: keep ``<name>/block<b>`` maps beside the block means.
        store_aggregated_attention: write the step-averaged maps when a video completes.
        aggregated_storage_format: like ``storage_format``, for the aggregated maps.
        auto_generate_videos: render every stored video at the end of the batch.
        auto_generate_per_video: render a video's maps as soon as its capture completes.
        spatial_downsample_factor: integer spatial downsampling of stored token maps.
        visualization_params: see :class:`VisualizationParams`.
    """

    store_attention: bool = True
    storage_format: str = "numpy"
    compress_attention: bool = False
    storage_dtype: str = "float16"
    store_per_head: bool = False
    store_per_block: bool = False
    store_aggregated_attention: bool = True
    aggregated_storage_format: str = "numpy"
    auto_generate_videos: bool = False
    auto_generate_per_video: bool = False
    spatial_downsample_factor: int = 1
    visualization_params: VisualizationParams = field(default_factory=VisualizationParams)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """Validate an ``attention_analysis`` mapping (the block itself, or a whole config that
        holds it under the key ``attention_analysis``); missing keys take their defaults.

        Raises:
            ValueError: an unknown key (the message lists the valid ones) or a bad value.
        """
        if isinstance(data, Mapping) and set(data) == {"attention_analysis"}:
            data = data["attention_analysis"]
        if data is None:
            data = {}
        where = "attention_analysis"
        _check_keys(data, cls.keys(), where)
        out: dict[str, Any] = {}
        for name in (
            "store_attention",
            "compress_attention",
            "store_per_head",
            "store_per_block",
            "store_aggregated_attention",
            "auto_generate_videos",
            "auto_generate_per_video",
        ):
            if name in data:
                out[name] = _bool(f"{where}.{name}", data[name])
        for name in ("storage_format", "aggregated_storage_format"):
            if name in data:
                out[name] = _choice(f"{where}.{name}", data[name], STORAGE_FORMATS)
        if "storage_dtype" in data:
            out["storage_dtype"] = _choice(f"{where}.storage_dtype", data["storage_dtype"], STORAGE_DTYPES)
        if "spatial_downsample_factor" in data:
            out["spatial_downsample_factor"] = _number(
                f"{where}.spatial_downsample_factor", data["spatial_downsample_factor"], 1, integer=True
            )
        if "visualization_params" in data:
            out["visualization_params"] = VisualizationParams.from_dict(data["visualization_params"] or {})
        return cls(**out)

    @classmethod
    def from_yaml(cls, path: Union[str, Path]) -> Config:
        """Read the ``attention_analysis`` block of a YAML file (or a file that is only that block).

        Raises:
            OSError: the file cannot be read.
            ValueError: the YAML is malformed, or a key or value is invalid.
        """
        import yaml

        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise OSError(f"cannot read config file {str(path)!r}: {exc}") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ValueError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
        if "attention_analysis" in data:
            data = data["attention_analysis"] or {}
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["visualization_params"] = self.visualization_params.to_dict()
        return out
