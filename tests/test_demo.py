"""The demo: synthetic shapes with known masks, a model whose words attend to their shapes, the IoU check."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from attnmap import demo
from attnmap.analysis.maps import token_mask
from attnmap.store import open_store


def test_video_masks_match_the_drawn_colours() -> None:
    video = demo.make_video(frames=5, height=64, width=64)
    assert video.frames.shape == (5, 64, 64, 3) and video.frames.dtype == np.uint8
    for word, (_, rgb, _) in demo.OBJECTS.items():
        mask = video.masks[word]
        assert mask.any(axis=(1, 2)).all()  # every shape is visible in every frame
        inside = video.frames[mask].astype(float) / 255
        assert np.abs(inside - np.asarray(rgb)).max() < 0.01
    union = sum(m.astype(int) for m in video.masks.values())
    assert union.max() == 1  # masks never overlap


def test_encode_pools_like_the_vae() -> None:
    video = np.arange(9 * 8 * 8 * 1, dtype=np.float32).reshape(9, 8, 8, 1)
    latent = demo.encode(video, (4, 4, 4))
    assert latent.shape == (3, 2, 2, 1)
    assert latent[0, 0, 0, 0] == video[0, :4, :4].mean()
    assert latent[2, 1, 1, 0] == pytest.approx(video[5:9, 4:, 4:].mean())


def test_model_runs_through_sdpa_and_words_attend_to_their_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    video = demo.make_video()
    clean = demo.encode(video.frames)
    model = demo.ShapeAttentionModel(clean.shape[:3])
    probs = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> torch.Tensor:
        probs.append(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1))
        return original(q, k, v, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(demo.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model(demo.noisy_latents(clean, 0.0, seed=0))
    assert len(probs) == 2  # one SDPA call per block
    nt = model.num_text
    p = torch.stack(probs).mean(dim=(0, 2))[0]
    truth = demo.true_latent_masks(video)
    for word, idx in demo.TARGETS.items():
        m = p[nt:, idx].sum(-1).reshape(clean.shape[:3]).numpy()
        assert demo.iou(token_mask(m, threshold=0.5), truth[word]) >= demo.IOU_TARGET
        others = [w for w in demo.TARGETS if w != word]
        assert all(demo.iou(token_mask(m, threshold=0.5), truth[o]) < 0.1 for o in others)


def test_iou() -> None:
    a = np.zeros((2, 4), bool)
    b = np.zeros((2, 4), bool)
    a[0, :2] = True
    b[0, 1:3] = True
    assert demo.iou(a, b) == pytest.approx(1 / 3)
    assert demo.iou(a & False, b & False) == 1.0
    with pytest.raises(ValueError, match="masks must have the same shape"):
        demo.iou(a, b[:1])


def test_demo_end_to_end(tmp_path: Path) -> None:
    lines: list[str] = []
    summary = demo.run(tmp_path, quiet=True, log=lines.append)
    assert summary["passed"], lines
    assert set(summary["iou"]) == {"ball", "square", "triangle"}
    assert all(v >= demo.IOU_TARGET for v in summary["iou"].values())
    text = "\n".join(lines)
    assert "IoU" in text and "RANDOM weights" in text
    store = open_store(tmp_path / "attention_maps")
    assert store.videos() == ["shapes", "wan_tiny_random"]
    assert store.metadata("wan_tiny_random")["model"] == "WanTransformer3DModel"
    assert store.steps("wan_tiny_random") == [0, 1, 2]
    # the IoU the demo printed is the one of the stored aggregated map
    truth = demo.true_latent_masks(demo.make_video())
    ball = token_mask(store.aggregated("shapes", "ball").map, threshold=0.5)
    assert demo.iou(ball, truth["ball"]) == pytest.approx(summary["iou"]["ball"])
    for path in summary["outputs"]:
        assert Path(path).is_file()
    with av.open(str(tmp_path / "videos" / "shapes_ball_overlay.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        rate = container.streams.video[0].average_rate
    assert len(frames) == 17 and frames[0].shape == (96, 128, 3)
    assert rate == demo.make_video().fps  # the original's rate: 8 fps
    for word in demo.TARGETS:
        with Image.open(tmp_path / "figures" / f"shapes_{word}_still.png") as image:
            assert image.size == (128, 96)
    page = (tmp_path / "report.html").read_text()
    assert '"id":"shapes"' in page and '"id":"wan_tiny_random"' in page and "<script src" not in page
