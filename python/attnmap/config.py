"""The ``attention_analysis`` configuration block of a YAML file, as a typed dataclass.

Every key is honoured or refused with a message: storage keys configure capture's store, and
``visualization_params`` parses into :class:`attnmap.render.RenderOptions`.

Example:
    >>> cfg = Config.from_dict({"store_per_block": True, "visualization_params": {"fps": 12}})
    >>> cfg.store_per_block, cfg.visualization_params.fps
    (True, 12)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Union

from attnmap._checks import integer
from attnmap.errors import AttnmapError
from attnmap.render.options import RenderOptions
from attnmap.store.formats import check_storage

STORAGE_DTYPES = ("float16", "float32")


def _check_keys(data: Mapping[str, Any], valid: tuple[str, ...], where: str) -> None:
    if not isinstance(data, Mapping):
        raise AttnmapError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in valid)
    if unknown:
        raise AttnmapError(f"unknown key(s) {unknown} in {where}; valid keys are: {', '.join(valid)}")


def _bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise AttnmapError(f"{where} must be true or false, got {value!r}")
    return value


def _choice(where: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise AttnmapError(f"{where} must be one of {', '.join(choices)}; got {value!r}")
    return str(value)


@dataclass(frozen=True)
class Config:
    """The ``attention_analysis`` block: what capture keeps and stores, and what is rendered.

    Attributes:
        store_attention: write the captured maps to the store.
        storage_format: what the store writes: ``"safetensors"`` (one file per step) or ``"numpy"``
            (``<video_id>/<token>/step_000.npz`` with ``step_000_metadata.json``, see
            :mod:`attnmap.store.npz`); ``"torch"`` is refused (torch.save writes pickle).
        compress_attention: compressed ``.npz`` files (``np.savez_compressed``); needs a numpy format
            (safetensors files are not compressed: true is refused with safetensors alone).
        storage_dtype: dtype of stored maps (float16 or float32).
        store_per_head: keep a map per head (H as the first dim) instead of the head mean.
        store_per_block: keep ``<name>/block<b>`` maps beside the block means.
        store_aggregated_attention: write the step-averaged maps when a video completes.
        aggregated_storage_format: the step-aggregated maps' format, as ``storage_format``
            (numpy: ``<video_id>/aggregated/<token>_aggregated.npz`` with its ``_metadata.json``).
        auto_generate_videos: render every stored video at the end of the batch.
        auto_generate_per_video: render a video's maps as soon as its capture completes.
        spatial_downsample_factor: integer spatial downsampling of stored token maps.
        visualization_params: how renders look, :class:`attnmap.render.RenderOptions`.
    """

    store_attention: bool = True
    storage_format: str = "safetensors"
    compress_attention: bool = False
    storage_dtype: str = "float16"
    store_per_head: bool = False
    store_per_block: bool = False
    store_aggregated_attention: bool = True
    aggregated_storage_format: str = "safetensors"
    auto_generate_videos: bool = False
    auto_generate_per_video: bool = False
    spatial_downsample_factor: int = 1
    visualization_params: RenderOptions = field(default_factory=RenderOptions)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """Validate an ``attention_analysis`` mapping (the block itself, or a whole config that
        holds it under the key ``attention_analysis``); missing keys take their defaults.

        Raises:
            AttnmapError: an unknown key (the message lists the valid ones) or a bad value.
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
        steps, aggregated = check_storage(
            data.get("storage_format", "safetensors"),
            data.get("aggregated_storage_format", data.get("storage_format", "safetensors")),
            compress=out.get("compress_attention", False),
            where=f"{where}.",
        )
        out["storage_format"], out["aggregated_storage_format"] = steps, aggregated
        if "storage_dtype" in data:
            out["storage_dtype"] = _choice(f"{where}.storage_dtype", data["storage_dtype"], STORAGE_DTYPES)
        if "spatial_downsample_factor" in data:
            out["spatial_downsample_factor"] = integer(
                f"{where}.spatial_downsample_factor", data["spatial_downsample_factor"], low=1
            )
        if "visualization_params" in data:
            out["visualization_params"] = RenderOptions.from_dict(
                data["visualization_params"], where=f"{where}.visualization_params"
            )
        return cls(**out)

    @classmethod
    def from_yaml(cls, path: Union[str, Path]) -> Config:
        """Read the ``attention_analysis`` block of a YAML file (or a file that is only that block).

        Raises:
            OSError: the file cannot be read.
            AttnmapError: the YAML is malformed, or a key or value is invalid.
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
            raise AttnmapError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise AttnmapError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
        if "attention_analysis" in data:
            data = data["attention_analysis"] or {}
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["visualization_params"] = self.visualization_params.to_dict()
        return out
