"""attnmap.Config: the attention_analysis block of the Wan visualisation suite's YAML, defaults, and
errors that name the key (a key is honoured or refused, never ignored)."""

from __future__ import annotations

from pathlib import Path

import pytest

from attnmap import AttnmapError, Config, RenderOptions

# every key that the Wan attention visualisation suite shows in its attention_analysis examples
SUITE_CONFIG = """
model: wan-1.3b
attention_analysis:
  store_attention: true
  storage_format: "numpy"      # numpy, torch
  compress_attention: true     # Use .npz compression
  storage_dtype: "float32"     # Storage precision
  store_per_head: false        # Average across attention heads
  store_per_block: true        # Average across transformer blocks
  store_aggregated_attention: true
  aggregated_storage_format: "numpy"
  auto_generate_videos: true
  auto_generate_per_video: true
  spatial_downsample_factor: 2
  visualization_params:
    figsize: [16, 10]
    colormap: "viridis"
    overlay_alpha: 0.5
    static_duration: 2.5
    fps: 15
    interpolation_steps: 3
    include_colorbar: false
    video_format: "webm"
"""


def test_from_yaml_honours_every_key_of_the_documented_block(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(SUITE_CONFIG)
    cfg = Config.from_yaml(path)
    assert cfg == Config(
        store_attention=True,
        storage_format="numpy",
        compress_attention=True,
        storage_dtype="float32",
        store_per_head=False,
        store_per_block=True,
        store_aggregated_attention=True,
        aggregated_storage_format="numpy",
        auto_generate_videos=True,
        auto_generate_per_video=True,
        spatial_downsample_factor=2,
        visualization_params=RenderOptions(
            figsize=(16.0, 10.0),
            colormap="viridis",
            overlay_alpha=0.5,
            static_duration=2.5,
            fps=15,
            interpolation_steps=3,
            include_colorbar=False,
            video_format="webm",
        ),
    )
    assert Config.from_dict(cfg.to_dict()) == cfg


# the suite's first example block, verbatim but for the blank line's trailing spaces
SUITE_TOP = """
attention_analysis:
  store_attention: true
  store_aggregated_attention: true  # NEW: Store step-averaged attention maps
  auto_generate_videos: true        # NEW: Automatically generate videos after batch completion
  auto_generate_per_video: true     # NEW: Generate videos immediately after each video completes

  visualization_params:
    figsize: [12, 8]
    colormap: "hot"
    overlay_alpha: 0.6
    static_duration: 3.0
    fps: 10
    interpolation_steps: 2
"""


def test_from_yaml_reads_the_top_block_with_defaults_for_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "top.yaml"
    path.write_text(SUITE_TOP)
    cfg = Config.from_yaml(path)
    assert cfg == Config(
        auto_generate_videos=True,
        auto_generate_per_video=True,
        visualization_params=RenderOptions(figsize=(12.0, 8.0), overlay_alpha=0.6, fps=10),
    )
    assert cfg.visualization_params.video_format == "mp4" and cfg.visualization_params.include_colorbar


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (  # torch.save pickles: refused, saying why and what works
            {"storage_format": "torch"},
            r"^attention_analysis\.storage_format: 'torch' files are written with pickle \(torch\.save\), and "
            r"loading them would run it; attnmap stores tensors without pickle: use safetensors or numpy",
        ),
        (
            {"storage_format": "numpy", "aggregated_storage_format": "torch"},
            r"^attention_analysis\.aggregated_storage_format: 'torch' files are written with pickle",
        ),
        (
            {"storage_format": "hdf5"},
            r"^attention_analysis\.storage_format: expected one of safetensors, numpy, got 'hdf5'$",
        ),
        (  # nothing to compress: safetensors files are not compressed
            {"compress_attention": True},
            r"^attention_analysis\.compress_attention: safetensors files are stored uncompressed; set "
            r"attention_analysis\.storage_format to numpy",
        ),
    ],
)
def test_formats_that_cannot_be_honoured_are_refused(data: dict[str, object], message: str) -> None:
    with pytest.raises(AttnmapError, match=message):
        Config.from_dict(data)


def test_the_aggregate_follows_the_steps_format_unless_set() -> None:
    assert Config.from_dict({"storage_format": "numpy"}).aggregated_storage_format == "numpy"
    mixed = Config.from_dict({"storage_format": "numpy", "aggregated_storage_format": "safetensors"})
    assert (mixed.storage_format, mixed.aggregated_storage_format) == ("numpy", "safetensors")
    # compression applies where there are .npz files
    assert Config.from_dict(
        {"aggregated_storage_format": "numpy", "compress_attention": True}
    ).compress_attention


def test_missing_keys_take_defaults() -> None:
    cfg = Config.from_dict({"visualization_params": {"colormap": "hot"}})
    assert cfg.store_attention and not cfg.store_per_block and cfg.storage_dtype == "float16"
    assert cfg.visualization_params == RenderOptions()
    assert cfg.visualization_params.figsize is None and cfg.visualization_params.fps is None
    assert Config.from_dict({}) == Config()


def test_unknown_keys_are_errors_that_list_the_valid_ones() -> None:
    with pytest.raises(ValueError) as err:
        Config.from_dict({"store_attention": True, "store_attn": True})
    assert str(err.value) == (
        "unknown key(s) ['store_attn'] in attention_analysis; valid keys are: store_attention, storage_format, "
        "compress_attention, storage_dtype, store_per_head, store_per_block, store_aggregated_attention, "
        "aggregated_storage_format, auto_generate_videos, auto_generate_per_video, spatial_downsample_factor, "
        "visualization_params"
    )
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['fsp'\] in attention_analysis.visualization_params; "
                       r"valid keys are: colormap, fps, overlay_alpha, normalize, vmin, vmax, threshold, "
                       r"interpolation_steps, static_duration, include_colorbar, labels, include_timestamp, "
                       r"video_format, figsize"):  # fmt: skip
        Config.from_dict({"visualization_params": {"fsp": 3}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"storage_dtype": "int8"}, "storage_dtype must be one of float16, float32; got 'int8'"),
        ({"store_per_head": "yes"}, "store_per_head must be true or false, got 'yes'"),
        ({"spatial_downsample_factor": 0}, "spatial_downsample_factor: expected an integer >= 1, got 0"),
        ({"spatial_downsample_factor": 1.5}, "spatial_downsample_factor: expected an integer >= 1, got 1.5"),
        (
            {"visualization_params": {"overlay_alpha": 1.5}},
            "^attention_analysis.visualization_params.overlay_alpha: expected a finite number in \\[0, 1\\], got 1.5",
        ),
        (
            {"visualization_params": {"fps": 0}},
            "visualization_params.fps: expected a finite number in \\[0.001, 1000\\], got 0",
        ),
        (
            {"visualization_params": {"figsize": [12]}},
            "visualization_params.figsize: expected \\[width, height\\] in inches",
        ),
        ({"visualization_params": {"normalize": "minmax"}}, "'minmax' is now called 'global'"),
        (  # the renderer cannot write avi: the error lists what it can
            {"visualization_params": {"video_format": "avi"}},
            "visualization_params.video_format: expected one of mp4, webm, gif, mkv, mov, got 'avi'",
        ),
    ],
)
def test_bad_values_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Config.from_dict(data)


def test_from_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="cannot read config file"):
        Config.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("attention_analysis: [unclosed\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        Config.from_yaml(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping, got list"):
        Config.from_yaml(listing)
    block_only = tmp_path / "block.yaml"
    block_only.write_text("store_per_head: true\n")
    assert Config.from_yaml(block_only).store_per_head


def test_the_documented_block_through_capture_writes_the_documented_numpy_layout(tmp_path: Path) -> None:
    """storage_format / aggregated_storage_format numpy with compress_attention: capture writes
    ``<video_id>/<token>/step_000.npz`` + ``step_000_metadata.json`` and
    ``<video_id>/aggregated/<token>_aggregated.npz`` + its metadata, compressed, which numpy alone reads
    (no pickle) and which hold what the recorder holds; the store reads them back the same."""
    import json
    import zipfile

    import numpy as np
    import torch

    import attnmap
    from tiny_models import wan

    path = tmp_path / "config.yaml"
    path.write_text(SUITE_CONFIG.replace("auto_generate_videos: true", "auto_generate_videos: false")
                    .replace("auto_generate_per_video: true", "auto_generate_per_video: false"))  # fmt: skip
    cfg = Config.from_yaml(path)
    model, kwargs = wan()
    root = tmp_path / "attention_maps"
    with (
        torch.no_grad(),
        attnmap.capture(model, targets={"red": [1]}, store=root, video_id="vid_001", config=cfg) as rec,
    ):
        for _ in range(2):
            model(**kwargs)
            rec.step()
    folder = root / "vid_001"

    def pooled(m: torch.Tensor) -> np.ndarray:  # spatial_downsample_factor 2: the mean of 2 x 2 cells
        f, h, w = m.shape
        return m.double().numpy().reshape(f, h // 2, 2, w // 2, 2).mean(axis=(2, 4)).astype(np.float32)

    for step in (0, 1):
        npz = folder / "red" / f"step_{step:03d}.npz"
        with zipfile.ZipFile(npz) as zf:
            assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
        with np.load(npz, allow_pickle=False) as data:
            assert data.files[0] == "attention_map"
            np.testing.assert_allclose(
                data["attention_map"], pooled(rec.get("token/red", step=step)[0]), rtol=1e-6
            )
            np.testing.assert_allclose(
                data["token/red/block1"], pooled(rec.get("token/red", step=step, block=1)[0]), rtol=1e-6
            )
        meta = json.loads((folder / "red" / f"step_{step:03d}_metadata.json").read_text())
        assert meta["shape"] == [3, 2, 2] and meta["dtype"] == "float32" and meta["token_word"] == "red"
        assert meta["steps_used"] == [step] and meta["num_steps"] == 1 and meta["attention_storage_version"]
        assert set(meta["video_dimensions"]) == {"width", "height", "fps", "frames"}
    with np.load(folder / "aggregated" / "red_aggregated.npz", allow_pickle=False) as data:
        np.testing.assert_allclose(data["attention_map"], pooled(rec.get("token/red")[0]), rtol=1e-5)
    meta = json.loads((folder / "aggregated" / "red_aggregated_metadata.json").read_text())
    assert meta["num_steps"] == 2 and meta["steps_used"] == [0, 1] and meta["aggregation_method"] == "mean"
    store = attnmap.open_store(root)
    assert store.steps("vid_001") == [0, 1] and store.tokens("vid_001") == ["red"]
    np.testing.assert_allclose(
        store.load_step("vid_001", "red", 1).map, pooled(rec.get("token/red", step=1)[0]), rtol=1e-6
    )
    np.testing.assert_allclose(
        store.load("vid_001", "temporal", 0), rec.get("temporal", step=0)[0].numpy(), rtol=1e-6
    )
