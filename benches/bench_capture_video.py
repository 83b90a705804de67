"""Memory of ``attnmap.capture_video`` on a real video at Wan 480p (81 frames), every block kept per head,
against the maps a materialising method holds.

One fresh subprocess per way of running (the script below): a diffusers WanPipeline whose transformer
has Wan 2.1 1.3B's width (12 heads of 128, FFN 8960, text 4096, patch (1, 2, 2)) but one block (the
reduced depth), a Wan VAE of 16 latent channels with Wan's strides (4 in time, 8 in space) and narrow
layers, and a one-layer UMT5 of width 4096, all random. ``capture`` runs ``capture_video`` on the demo's
shapes video drawn at 480 x 832, 81 frames (grid (21, 30, 52) = 32,760 tokens) with ``per_head`` and
``per_block``; ``plain`` runs the same pipeline call on latents of the same shape without capture. A
forward pre-hook on the transformer resets the RSS high-water mark (``/proc/self/clear_refs``) as the
transformer starts, so the VAE's encode (the pipeline's own cost, the same with or without capture) is
left out: peak = ``VmHWM`` - ``VmRSS`` at that moment. Capture's extra = capture's peak - plain's peak.

A materialising method holds softmax(q k^T) of a call: B x H x N x N values, 51.5 GB in fp32 (25.8 GB
in bf16) for one block's 12 heads at 32,760 tokens, x 30 for Wan 1.3B's blocks kept. Capture keeps
per step, block and head only the reduced maps (``rec.nbytes``).

Plain pytest smoke-runs a tiny pipeline on 9 frames of 64 x 64; ``--benchmark-enable`` runs 480p
(about 10-20 minutes on a 2-core CPU: the VAE alone takes about 4):

    pytest benches/bench_capture_video.py -s --benchmark-enable
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

SMOKE = {"label": "smoke", "frames": 9, "height": 64, "width": 64, "heads": 2, "head_dim": 16, "ffn": 64,
         "text_dim": 32, "blocks": 2, "z": 4}  # fmt: skip
WAN480 = {"label": "wan1.3b-width-480p-81f", "frames": 81, "height": 480, "width": 832, "heads": 12,
          "head_dim": 128, "ffn": 8960, "text_dim": 4096, "blocks": 1, "z": 16}  # fmt: skip
WAN_BLOCKS = 30  # Wan 2.1 1.3B

_SCRIPT = r"""
import json, sys
import torch
import attnmap
from attnmap import demo
from attnmap.capture.real_video import OneTimestep, one_timestep

mode, size = sys.argv[1], json.loads(sys.argv[2])
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

tiny = demo.tiny_wan_pipeline()
torch.manual_seed(0)
transformer = WanTransformer3DModel(
    patch_size=(1, 2, 2), num_attention_heads=size["heads"], attention_head_dim=size["head_dim"],
    in_channels=size["z"], out_channels=size["z"], text_dim=size["text_dim"], freq_dim=256, ffn_dim=size["ffn"],
    num_layers=size["blocks"], cross_attn_norm=True, qk_norm="rms_norm_across_heads",
).eval()
encoder = UMT5EncoderModel(UMT5Config(
    vocab_size=64, d_model=size["text_dim"], d_kv=16, d_ff=64, num_layers=1, num_heads=2,
    relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
)).eval()
vae = AutoencoderKLWan(
    base_dim=8, z_dim=size["z"], dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
    latents_mean=[0.0] * size["z"], latents_std=[1.0] * size["z"],
).eval()
pipe = WanPipeline(tokenizer=tiny.tokenizer, text_encoder=encoder, vae=vae, scheduler=tiny.scheduler,
                   transformer=transformer)

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

marks = {}
def reset(module, args, kwargs):
    if "base" not in marks:
        open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
        marks["base"] = status("VmRSS")

pipe.transformer.register_forward_pre_hook(reset, with_kwargs=True)
f, h, w = size["frames"], size["height"], size["width"]
out = {}
if mode == "capture":
    clip = demo.make_video(frames=f, height=h, width=w)
    rec = attnmap.capture_video(pipe, clip.frames, demo.PROMPT, timesteps=(500,), fps=clip.fps,
                                per_head=True, per_block=True)
    temporal = rec.get("temporal")  # [1, H, F, F]: each query frame's attention over key frames sums to 1
    out["temporal_row_sum_err"] = float((temporal.sum(-1) - 1).abs().max())
    mass = sum(rec.get(f"token/{word}") for word in rec.tokens) + rec.get("padding")
    out["token_mass_max"] = float(mass.max())
    out["kept"] = rec.nbytes
    out["grid"] = rec.metadata["grid"]
else:
    latents = torch.randn(1, size["z"], (f - 1) // 4 + 1, h // 8, w // 8)
    with one_timestep(pipe, OneTimestep(pipe.scheduler, 500.0, 0.5, torch.float32)):
        pipe(prompt="a red ball", latents=latents, height=h, width=w, num_frames=f, num_inference_steps=1,
             output_type="latent", guidance_scale=1.0)
out["peak_extra"] = status("VmHWM") - marks["base"]
print(json.dumps(out))
"""


def _run(mode: str, size: dict[str, Any], cwd: Path) -> dict[str, Any]:
    """One fresh process, run from ``cwd`` (a scratch folder, not the clone's root)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", textwrap.dedent(_SCRIPT), mode, json.dumps(size)],
        capture_output=True, text=True, env=env, check=False, cwd=cwd,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.benchmark(group="capture_video")
def test_capture_video_memory_against_the_materialised_maps(
    benchmark: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    full = bool(request.config.getoption("benchmark_enable"))
    size = WAN480 if full else SMOKE
    plain = _run("plain", size, tmp_path)
    captured: dict[str, Any] = {}
    benchmark.pedantic(lambda: captured.update(_run("capture", size, tmp_path)), rounds=1, iterations=1)
    # correctness first: the maps are probabilities
    assert captured["temporal_row_sum_err"] < 2e-3 and captured["token_mass_max"] <= 1 + 1e-3
    f, gh, gw = captured["grid"]
    n = f * gh * gw
    heads = size["heads"]
    materialised = heads * n * n * 4  # one block's [H, N, N] fp32 probabilities
    extra = captured["peak_extra"] - plain["peak_extra"]
    info = {
        "size": size["label"],
        "tokens": n,
        "plain_peak_MiB": plain["peak_extra"] / 2**20,
        "capture_peak_MiB": captured["peak_extra"] / 2**20,
        "extra_MiB": extra / 2**20,
        "materialised_block_MiB": materialised / 2**20,
        "extra_over_block": extra / materialised,
        "kept_per_block_MiB": captured["kept"] / size["blocks"] / 2**20,
        "kept_over_block": captured["kept"] / size["blocks"] / materialised,
        "materialised_all_blocks_GiB": materialised * WAN_BLOCKS / 2**30,
    }
    benchmark.extra_info.update(info)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))
    if full:  # the memory target of every reduction here: under 10% of the map a materialising method holds
        assert n == 32760 and extra < 0.1 * materialised
