"""attnmap.capture_video: where a pipeline's transformer looks in a real video.

Each family's tiny random pipeline takes a real video: the latents its transformer receives equal the
VAE's latents normalised and noised by hand (the family's formula, the scheduler's forward process), its
maps equal a float64 softmax of the q and k the entry point saw, every frame is tied to the latent
frame its VAE encodes it in, a size or frame count the VAE cannot take is adapted with a message or
refused, a file equals its decoded frames, and a store ties the maps to the real video.
"""

from __future__ import annotations

import copy
import inspect
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnmap
from attnmap.errors import AttnmapError
from tiny_models import (
    HUNYUAN_TEMPLATE,
    AttentionLog,
    cogvideox_pipeline,
    hunyuan_pipeline,
    ltx_pipeline,
    softmax64,
    wan22_pipeline,
    wan_pipeline,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning",
    "ignore::DeprecationWarning",
    "ignore:In CPU autocast:UserWarning",  # Mochi's rotary embedding asks CPU autocast for float32
)

PROMPT = "a (red) ball"
TIMESTEPS = (300, 900)  # Wan 2.2: 900 >= its boundary (875) runs transformer, 300 runs transformer_2
DRAWS, SEED = 2, 3


def video(frames: int = 9, size: tuple[int, int] = (32, 32), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, *size, 3), dtype=np.uint8)


@dataclass
class Family:
    """A tiny pipeline and what the test knows of it by hand."""

    build: Callable[[], Any]
    kwargs: dict[str, Any]
    modules: list[str]  # the attention modules whose calls hold the video -> text attention
    grid: tuple[int, int, int]  # the transformer's token grid for 9 frames of 32 x 32
    normalise: Callable[[Any, torch.Tensor], torch.Tensor]  # VAE latents -> the latents it denoises
    arrange: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    cross: Callable[[torch.Tensor], torch.Tensor] = lambda p: p  # [B, Nq, Nk] -> [B, Nv, Nt]
    setup: Callable[[Any], None] = lambda pipe: None
    experts: list[str] = field(default_factory=lambda: ["transformer"])
    frames: int = 9  # the video's frames: as many as its VAE encodes whole
    ddim: bool = False  # a DDPM/DDIM scheduler (else flow matching)
    # compare the frame-to-frame maps of video self-attention ``modules``, not a word's
    temporal: bool = False
    quiet: str = ""  # a warning of capture's own this family gives, left aside here
    token: int = 1  # the position of "red" in the text the transformer sees
    latent: Callable[[torch.Tensor], torch.Tensor] = lambda h: h  # the latents in the transformer's input


def _wan_stats(pipe: Any) -> None:
    pipe.vae.register_to_config(latents_mean=[0.1, -0.2, 0.3, 0.05], latents_std=[0.5, 2.0, 1.5, 0.8])


def _wan(vae: Any, z: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.1, -0.2, 0.3, 0.05]).view(1, 4, 1, 1, 1)
    return (z - mean) / torch.tensor([0.5, 2.0, 1.5, 0.8]).view(1, 4, 1, 1, 1)


LTX_MEAN, LTX_STD, LTX_SCALE = torch.linspace(-0.3, 0.4, 8), torch.linspace(0.5, 1.7, 8), 0.7


def _ltx_stats(pipe: Any) -> None:
    pipe.vae.latents_mean.copy_(LTX_MEAN)
    pipe.vae.latents_std.copy_(LTX_STD)
    pipe.vae.register_to_config(scaling_factor=LTX_SCALE)


FAMILIES = {
    "wan": Family(wan_pipeline, {}, ["blocks.0.attn2", "blocks.1.attn2"], (3, 2, 2), _wan, setup=_wan_stats),
    "wan2.2": Family(
        wan22_pipeline,
        {},
        ["blocks.0.attn2", "blocks.1.attn2"],
        (3, 2, 2),
        _wan,
        setup=_wan_stats,
        experts=["transformer", "transformer_2"],
    ),
    "ltx": Family(
        ltx_pipeline,
        {"max_sequence_length": 8},
        ["transformer_blocks.0.attn2"],
        (3, 8, 8),
        lambda vae, z: (z - LTX_MEAN.view(1, 8, 1, 1, 1)) * LTX_SCALE / LTX_STD.view(1, 8, 1, 1, 1),
        arrange=lambda x: x.permute(0, 2, 3, 4, 1).flatten(1, 3),  # tokens [B, F*H*W, C] (patch 1)
        setup=_ltx_stats,
    ),
    "hunyuanvideo": Family(
        hunyuan_pipeline,
        {"prompt_template": HUNYUAN_TEMPLATE, "max_sequence_length": 8},
        ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"],
        (3, 4, 4),
        lambda vae, z: z * 0.476986,
        cross=lambda p: p[:, :48, 48:],  # joint, the 48 video tokens first
    ),
    "cogvideox": Family(
        cogvideox_pipeline,
        {"max_sequence_length": 16},
        ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"],
        (3, 2, 2),
        lambda vae, z: z * 1.15258426,
        arrange=lambda x: x.permute(0, 2, 1, 3, 4),  # [B, F, C, H, W]
        cross=lambda p: p[:, 16:, :16],  # joint, the 16 text tokens first
        ddim=True,
    ),
}


def _pipeline(name: str) -> Callable[[], Any]:
    """A builder of tests/tiny_pipelines.py's pipeline of a family."""

    def build() -> Any:
        from tiny_pipelines import PIPELINES

        return PIPELINES[name]()

    return build


def _run_kwargs(name: str) -> dict[str, Any]:
    """The family's own call arguments of tests/tiny_pipelines.py, less the size and steps capture_video sets."""
    from tiny_pipelines import RUNS

    sizes = {"num_inference_steps", "num_frames", "height", "width"}
    return {k: v for k, v in RUNS[name].items() if k not in sizes}


def _ltx2() -> Any:
    """tests/tiny_pipelines.py's LTX-2 with a VAE that compresses time as it says it does (4x): its own
    downsamples space only while reporting 4x in time, which capture_video refuses (tested below)."""
    from diffusers import AutoencoderKLLTX2Video, LTX2Pipeline

    pipe = _pipeline("ltx2")()
    torch.manual_seed(0)
    vae = AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), layers_per_block=(1, 1), decoder_layers_per_block=(1, 1, 1),
        spatio_temporal_scaling=(True, True), decoder_spatio_temporal_scaling=(True, True),
        decoder_inject_noise=(False, False, False), downsample_type=("spatiotemporal", "spatiotemporal"),
        upsample_residual=(False, False), upsample_factor=(1, 1), timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False,
    ).eval()  # fmt: skip
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    return LTX2Pipeline(**{**pipe.components, "vae": vae})


LTX2_MEAN, LTX2_STD, LTX2_SCALE = (
    torch.tensor([0.2, -0.1, 0.05, 0.3]),
    torch.tensor([0.6, 1.4, 0.9, 2.0]),
    0.8,
)


def _ltx2_stats(pipe: Any) -> None:
    pipe.vae.latents_mean.copy_(LTX2_MEAN)
    pipe.vae.latents_std.copy_(LTX2_STD)
    pipe.vae.register_to_config(scaling_factor=LTX2_SCALE)


def _mochi_stats(pipe: Any) -> None:
    pipe.vae.register_to_config(scaling_factor=0.8)  # its config's latents_mean and latents_std stay


def _mochi(vae: Any, z: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
    return (z - mean) * 0.8 / std


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 4, 1).flatten(1, 3)  # LTX's packed tokens [B, F*H*W, C] (patch 1)


def _config_mean_std(vae: Any, z: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
    return (z - mean) / torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)


FAMILIES.update(
    {
        "easyanimate": Family(
            _pipeline("easyanimate"),
            _run_kwargs("easyanimate"),
            ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"],
            (3, 2, 2),
            lambda vae, z: z * 0.7125,
            cross=lambda p: p[
                :, p.shape[-1] - 12 :, : p.shape[-1] - 12
            ],  # joint: its padded text, then 12 video
            token=5,  # after its chat template's tokens
        ),
        "motif-video": Family(
            _pipeline("motif-video"),
            _run_kwargs("motif-video"),
            ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"],
            (3, 4, 4),
            _config_mean_std,
            cross=lambda p: p[:, :48, 48:],  # joint, the 48 video tokens first
            latent=lambda h: h[:, :16],  # then its condition's 16 channels and a mask
        ),
        "mochi": Family(
            _pipeline("mochi"),
            _run_kwargs("mochi"),
            ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"],
            (3, 2, 2),
            _mochi,
            cross=lambda p: p[:, :12, 12:],
            setup=_mochi_stats,
            frames=13,
        ),  # joint, video first, one call per row over its real text; 13 frames: 1 + 2 x 6
        "skyreels-v2": Family(
            _pipeline("skyreels-v2"),
            _run_kwargs("skyreels-v2"),
            ["blocks.0.attn2", "blocks.1.attn2"],
            (3, 2, 2),
            _wan,
            setup=_wan_stats,
        ),
        "allegro": Family(
            _pipeline("allegro"),
            _run_kwargs("allegro"),
            ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"],
            (3, 2, 2),
            lambda vae, z: z * 0.13,
            frames=12,
            ddim=True,
        ),  # a VAE without the first-frame rule: 12 frames, 4 per latent frame
        "cogvideox1.5": Family(
            _pipeline("cogvideox1.5"),
            _run_kwargs("cogvideox1.5"),
            ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"],
            (2, 2, 2),
            lambda vae, z: z * 1.15258426,
            arrange=lambda x: x.permute(0, 2, 1, 3, 4),
            cross=lambda p: p[:, 16:, :16],
            frames=13,
            ddim=True,
        ),  # its temporal patch of 2 takes an even count of latent frames: 13 frames, 4 latent frames
        "ltx2": Family(
            _ltx2,
            _run_kwargs("ltx2"),
            ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"],
            (3, 8, 8),
            lambda vae, z: (z - LTX2_MEAN.view(1, 4, 1, 1, 1)) * LTX2_SCALE / LTX2_STD.view(1, 4, 1, 1, 1),
            arrange=_tokens,
            setup=_ltx2_stats,
            temporal=True,
            # its text reaches the transformer through its connectors, which capture does not tie to the prompt
            quiet="batch row 0 of the denoiser's text is none of the prompts the pipeline encoded",
        ),
    }
)


@dataclass
class Run:
    pipe: Any
    rec: Any
    frames: np.ndarray
    received: list[tuple[str, torch.Tensor, torch.Tensor]]  # (expert, hidden_states, timestep) per forward
    calls: dict[str, list[tuple[str, torch.Tensor, torch.Tensor, Any, Any]]]  # per expert, in order


@pytest.fixture(scope="module", params=list(FAMILIES))
def run(request: pytest.FixtureRequest) -> tuple[str, Run]:
    name = request.param
    fam = FAMILIES[name]
    pipe = fam.build()
    fam.setup(pipe)
    received: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    handles, logs = [], []
    for expert in fam.experts:
        net = getattr(pipe, expert)

        def seen(module: Any, args: Any, kwargs: dict[str, Any], expert: str = expert) -> None:
            given = inspect.signature(module.forward).bind(*args, **kwargs).arguments
            received.append((expert, given["hidden_states"].clone(), given["timestep"].clone()))

        handles.append(net.register_forward_pre_hook(seen, with_kwargs=True))
        logs.append(AttentionLog(net, fam.modules))
    frames = video(fam.frames)
    try:
        for log in logs:
            log.__enter__()
        with warnings.catch_warnings():
            if fam.quiet:
                warnings.filterwarnings("ignore", message=f"attnmap.capture: {re.escape(fam.quiet)}")
            rec = attnmap.capture_video(
                pipe,
                frames,
                PROMPT,
                timesteps=TIMESTEPS,
                noise_draws=DRAWS,
                seed=SEED,
                pipeline_kwargs=fam.kwargs,
            )
    finally:
        for log in reversed(logs):
            log.__exit__(None, None, None)
            log.close()
        for handle in handles:
            handle.remove()
    calls = {expert: log.calls for expert, log in zip(fam.experts, logs)}
    return name, Run(pipe, rec, frames, received, calls)


def by_hand(name: str, pipe: Any, frames: np.ndarray) -> list[tuple[float, torch.Tensor]]:
    """(timestep, the latents the transformer should get) for each timestep and draw, built by hand."""
    fam = FAMILIES[name]
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0  # [1, 3, F, H, W]
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.mode()
    x0 = fam.normalise(pipe.vae, z)
    generator = torch.Generator().manual_seed(SEED)
    noises = [torch.randn(x0.shape, generator=generator) for _ in range(DRAWS)]
    out = []
    for t in TIMESTEPS:
        for noise in noises:
            if fam.ddim:  # DDIM: sqrt(alphabar) x0 + sqrt(1 - alphabar) noise
                abar = pipe.scheduler.alphas_cumprod[t]
                xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
            else:  # flow matching: sigma = t / 1000
                xt = (1 - t / 1000) * x0 + t / 1000 * noise
            out.append((float(t), fam.arrange(xt)))
    return out


def close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.double() - want.double()).abs().max().item()
    assert err <= atol, f"{name}: max abs error {err:.3g} > {atol}"


def test_the_transformer_gets_the_vae_latents_normalised_and_noised(run: tuple[str, Run]) -> None:
    name, r = run
    fam = FAMILIES[name]
    want = by_hand(name, r.pipe, r.frames)
    assert len(r.received) == len(want) == len(TIMESTEPS) * DRAWS  # once per timestep and draw, nothing else
    for i, ((expert, got, timestep), (t, latents)) in enumerate(zip(r.received, want)):
        close(f"{name} latents {i}", fam.latent(got), latents, 1e-5)
        assert torch.all(timestep == t), f"{name}: timestep {timestep} != {t}"
        if name == "wan2.2":  # the pipeline's own expert for that timestep
            assert expert == ("transformer" if t >= 875 else "transformer_2")
    assert r.rec.steps == [0, 1] and r.rec.metadata["timesteps"] == [float(t) for t in TIMESTEPS]
    # two draws differ (the seed draws each anew) and the timesteps' latents differ
    assert (r.received[0][1] - r.received[1][1]).abs().max() > 0.1


def test_the_maps_equal_a_float64_softmax_of_the_q_and_k_it_saw(run: tuple[str, Run]) -> None:
    name, r = run
    fam = FAMILIES[name]
    assert r.rec.prompt == "a red ball" and (fam.temporal or r.rec.targets == {"red": [fam.token]})
    per_step = len(fam.modules) * DRAWS
    assert sum(len(c) for c in r.calls.values()) == per_step * len(TIMESTEPS)
    taken = dict.fromkeys(r.calls, 0)
    for step in range(len(TIMESTEPS)):
        expert = r.received[step * DRAWS][0]  # the transformer that ran this timestep
        calls = r.calls[expert][taken[expert] : taken[expert] + per_step]
        taken[expert] += per_step
        probs = torch.stack([fam.cross(softmax64(q, k, m, s).mean(1)) for _, q, k, m, s in calls]).mean(0)
        if fam.temporal:  # frame i's queries' mass on frame j's keys, the mean over those queries
            f, h, w = fam.grid
            want = probs.reshape(1, f, h * w, f, h * w).sum(-1).mean(-2)
            close(f"{name} temporal step {step}", r.rec.get("temporal", step=step), want, 2e-6)
        else:
            want = probs[..., fam.token].reshape(1, *fam.grid)  # red, the mean over blocks and draws
            close(f"{name} red step {step}", r.rec.get("token/red", step=step), want, 2e-6)


def _without_group_norms(vae: Any) -> Any:
    """A copy of the VAE whose encoder's group norms are gone: they pool statistics over every frame, so
    any frame would change every latent frame; its convolutions alone say which frames a latent frame
    holds."""
    vae = copy.deepcopy(vae)
    for module in vae.encoder.modules():
        for child, value in list(module.named_children()):
            if isinstance(value, torch.nn.GroupNorm):
                setattr(module, child, torch.nn.Identity())
    return vae


@pytest.mark.parametrize("name", ["wan", "ltx", "hunyuanvideo", "cogvideox", "mochi", "ltx2"])
def test_each_frame_is_tied_to_the_latent_frame_its_vae_encodes_it_in(name: str) -> None:
    """Every second frame from frame 1 of 20: as many as the VAE encodes whole, each tied to the latent
    frame that changes first when that frame changes (its causal VAE: frame 0 alone, then stride each)."""
    fam = FAMILIES[name]
    pipe = fam.build()
    frames = video(20)
    with warnings.catch_warnings():
        if fam.quiet:
            warnings.filterwarnings("ignore", message=f"attnmap.capture: {re.escape(fam.quiet)}")
        with pytest.warns(UserWarning, match=r"used frames 1\.\.\d+ of 20 \(1 \+ k x \d frames\)"):
            rec = attnmap.capture_video(
                pipe, frames, PROMPT, start=1, frame_step=2, pipeline_kwargs=fam.kwargs
            )
    source, stride = rec.metadata["source"], rec.metadata["vae_stride"][0]
    n = len(source["indices"])  # the most of the 10 frames a VAE of that stride encodes whole
    assert (n - 1) % stride == 0 and n + stride > 10 and source["indices"] == list(range(1, 2 * n, 2))
    # which latent frame first changes when one frame changes: the one the VAE put it in
    used = torch.from_numpy(frames[1 : 2 * n : 2]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
    batch = used.repeat(n + 1, 1, 1, 1, 1)
    for i in range(n):
        batch[i + 1, :, i] += 0.5
    with torch.no_grad():
        z = _without_group_norms(pipe.vae).encode(batch).latent_dist.mode()
    changed = (z[1:] - z[:1]).abs().amax(dim=(1, 3, 4)) > 0  # [frame, latent frame]
    first = changed.int().argmax(dim=1).tolist()
    assert first == [0] + [1 + (i - 1) // stride for i in range(1, n)]  # frame 0 alone, then stride each
    assert source["latent_index"] == first and source["latent_frames"] == first[-1] + 1
    # the metadata's video is those frames: the summary's and the render's rule gives the same
    assert attnmap.analysis.frame_latents(rec.metadata, first[-1] + 1).tolist() == first
    assert rec.metadata["video"]["frames"] == n


def test_a_scheduler_counting_from_pure_noise_gets_the_timestep_the_other_way() -> None:
    """Mochi's released scheduler inverts its sigmas (pure noise at timestep 0): the noise is the same, the
    transformer's timestep is N - t."""
    fam = FAMILIES["mochi"]
    pipe = fam.build()
    pipe.scheduler.register_to_config(invert_sigmas=True)
    got: list[torch.Tensor] = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: got.append(k["timestep"].clone()), with_kwargs=True
    )
    rec = attnmap.capture_video(pipe, video(13), PROMPT, timesteps=(300,), pipeline_kwargs=fam.kwargs)
    handle.remove()
    assert [float(t) for t in got] == [700.0] and rec.metadata["noise"]["levels"] == [0.3]


def test_a_vae_that_does_not_compress_as_its_pipeline_says_is_refused() -> None:
    """tests/tiny_pipelines.py's LTX-2 VAE downsamples space only, while it (and so the pipeline) says 4x in
    time: its latent frames cannot be tied to frames."""
    with pytest.raises(
        AttnmapError, match=r"its VAE encoded 9 frames of 32x32 into latents \(9, 8, 8\), not the"
    ):
        attnmap.capture_video(_pipeline("ltx2")(), video(9), PROMPT, pipeline_kwargs=_run_kwargs("ltx2"))


def test_a_size_the_vae_cannot_take_is_resized_with_a_message() -> None:
    pipe = wan_pipeline()
    frames = video(5, (30, 40))
    seen: list[torch.Tensor] = []
    encode = pipe.vae.encode
    pipe.vae.encode = lambda x, *a, **k: seen.append(x) or encode(x, *a, **k)
    with pytest.warns(
        UserWarning, match=r"^attnmap.capture_video: resized 30x40 to 32x48, so that WanPipeline"
    ):
        rec = attnmap.capture_video(pipe, frames, PROMPT)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    want = F.interpolate(x, size=(32, 48), mode="bilinear", align_corners=False, antialias=True) / 127.5 - 1.0
    torch.testing.assert_close(seen[0], want.permute(1, 0, 2, 3)[None], rtol=0, atol=1e-6)
    assert rec.get("token/red").shape == (1, 2, 2, 3)  # 5 frames: 2 latent frames; 32 x 48: 2 x 3 tokens
    assert rec.metadata["source"]["size"] == [32, 48] and rec.metadata["video"]["height"] == 30


def _dpm(pipe: Any) -> None:
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler()


REFUSED = [
    (
        {"height": 30},
        r"height must be a multiple of 16 \(the VAE's 8 x the patch's 2\), e\.g\. 16 or 32; got 30",
    ),
    ({"num_frames": 8}, r"num_frames must be 1 \+ k x 4 frames \(e\.g\. \[5, 9\]\), got 8"),
    ({"num_frames": 13}, r"num_frames=13 is more than the 9 frame\(s\) from frame 0 every 1"),
    ({"start": 9}, r"start must be a frame of the video, in \[0, 9\), got 9"),
    ({"frame_step": 0}, r"frame_step must be an int >= 1, got 0"),
    ({"timesteps": (0,)}, r"timesteps must be numbers in \(0, 1000\] \(FlowMatchEulerDiscreteScheduler's"),
    ({"timesteps": ()}, r"timesteps must name at least one timestep"),
    ({"noise_draws": 0}, r"noise_draws must be an int >= 1, got 0"),
    ({"fps": 0}, r"fps must be a frame rate in \(0, 1000\], got 0"),
    ({"store": "maps"}, r"store= needs video_id= \(a str\), got None"),
    ({"pipeline_kwargs": {"latents": None}}, r"pipeline_kwargs must not set \['latents'\]"),
    (
        {"video": np.zeros((9, 32, 32, 3), np.float32)},
        r"video: expected frames \[T, H, W, 3\] uint8, got float32",
    ),
    (
        {"pipe": lambda p: p.transformer},
        r"pipe must be a diffusers video pipeline \(its VAE encodes the video\)",
    ),
    (
        {"pipe": lambda p: _dpm(p) or p},
        r"flow-matching and DDPM/DDIM schedulers; DPMSolverMultistepScheduler is",
    ),
]


@pytest.mark.parametrize(("change", "message"), REFUSED, ids=[m.split(" ")[0] for _, m in REFUSED])
def test_what_the_pipeline_cannot_take_is_refused_naming_it(change: dict[str, Any], message: str) -> None:
    pipe = wan_pipeline()
    args: dict[str, Any] = {"video": video(), **change}
    target = args.pop("pipe")(pipe) if "pipe" in args else pipe
    frames = args.pop("video")
    with pytest.raises(AttnmapError, match=message):
        attnmap.capture_video(target, frames, PROMPT, **args)
    assert issubclass(AttnmapError, ValueError)


def test_a_pipeline_of_an_unknown_family_is_refused_naming_why() -> None:
    from types import SimpleNamespace

    pipe = wan_pipeline()
    other = SimpleNamespace(transformer=torch.nn.Linear(2, 2), vae=pipe.vae, scheduler=pipe.scheduler)
    with pytest.raises(
        AttnmapError, match=r"does not know how SimpleNamespace turns its VAE's latents into the"
    ):
        attnmap.capture_video(other, video(), PROMPT)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        attnmap.capture_video(pipe, "no/such/video.mp4", PROMPT)


def test_a_pipeline_that_needs_more_or_runs_no_step_is_refused_naming_why() -> None:
    from diffusers import WanImageToVideoPipeline, WanPipeline

    pipe = wan_pipeline()
    i2v = WanImageToVideoPipeline(**{k: v for k, v in pipe.components.items() if k != "transformer_2"})
    with pytest.raises(
        AttnmapError, match=r"WanImageToVideoPipeline\.__call__ needs \['image'\], which capture"
    ):
        attnmap.capture_video(i2v, video(), PROMPT)

    class OwnSteps(WanPipeline):  # schedules its own steps (as from a strength) and runs none at this one
        def __call__(self, prompt: Any = None, latents: Any = None, **kwargs: Any) -> Any:
            return (latents,)

    with pytest.raises(
        AttnmapError, match=r"OwnSteps ran no transformer forward on the latents it was given"
    ):
        attnmap.capture_video(OwnSteps(**pipe.components), video(), PROMPT)


def _decoded(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_a_video_file_equals_its_decoded_frames(tmp_path: Path) -> None:
    """A file is decoded chunk by chunk for the frames used (here across a chunk's end): the same maps as
    its frames decoded with PyAV in hand."""
    pipe = wan_pipeline()
    path = attnmap.render.write_video(video(20), tmp_path / "clip.mp4", fps=12)
    args: dict[str, Any] = {
        "timesteps": (500,),
        "start": 1,
        "frame_step": 2,
        "reductions": ("cross", "temporal"),
    }
    with pytest.warns(UserWarning, match=r"used frames 1\.\.17 of 20"):
        from_file = attnmap.capture_video(pipe, path, PROMPT, **args)
    frames = _decoded(path)  # PyAV directly
    with pytest.warns(UserWarning, match=r"used frames 1\.\.17 of 20"):
        from_frames = attnmap.capture_video(pipe, frames, PROMPT, fps=12, **args)
    for name in ("token/red", "temporal"):
        assert torch.equal(from_file.get(name), from_frames.get(name)), name
    assert (
        from_file.metadata["video"]["fps"] == 6.0 == from_frames.metadata["video"]["fps"]
    )  # every 2nd frame
    assert from_file.metadata["source"]["path"] == str(Path(path).resolve())
    assert from_file.metadata["source"]["frames"] == 20 and from_frames.metadata["source"]["path"] is None


def test_guidance_records_the_negative_prompt_branch_too() -> None:
    pipe = wan_pipeline()
    log = AttentionLog(pipe.transformer, ["blocks.0.attn2", "blocks.1.attn2"])
    with log:
        rec = attnmap.capture_video(
            pipe, video(), PROMPT, timesteps=(500,), guidance=True, negative_prompt="blue sky"
        )
    log.close()
    assert rec.branch == "both" and len(log.calls) == 4  # the cond forward, then the uncond one
    cond, uncond = (
        torch.stack([softmax64(q, k, m, s).mean(1) for _, q, k, m, s in calls]).mean(0)
        for calls in (log.calls[:2], log.calls[2:])
    )
    close("cond red", rec.get("token/red"), cond[..., 1].reshape(1, 3, 2, 2), 2e-6)
    # the negative prompt's row is read over its own text ("blue sky </s>": 3 real tokens), which lacks "red"
    assert rec.metadata["rows"]["uncond"] == [{"prompt": "blue sky", "text_len": 3, "targets": {}}]
    close("uncond cross", rec.get("cross", branch="uncond"), uncond[..., :3], 2e-6)


def test_the_store_ties_the_maps_to_the_real_video(tmp_path: Path) -> None:
    from attnmap.analysis import summarize

    pipe = wan_pipeline()
    root = tmp_path / "maps"
    whole = Path(attnmap.render.write_video(video(9), tmp_path / "whole.mp4", fps=12))
    rec = attnmap.capture_video(pipe, whole, PROMPT, timesteps=(400, 600), store=root, video_id="whole")
    store = attnmap.open_store(root)
    meta = store.metadata("whole")
    assert meta["video"] == {
        "height": 32,
        "width": 32,
        "frames": 9,
        "fps": 12.0,
        "path": str(whole.resolve()),
    }
    assert meta["timesteps"] == [400.0, 600.0] and store.steps("whole") == [0, 1]
    assert meta["noise"]["levels"] == [0.4, 0.6] and meta["targets"] == {"red": [1]}
    mean = store.load("whole", "token/red")  # the aggregate: the mean over the timesteps
    np.testing.assert_allclose(mean, rec.get("token/red")[0].numpy(), rtol=2e-3, atol=1e-4)
    assert not (root / "whole" / "input.mp4").exists()  # the whole file was used: it is the video

    # 12 frames: the first 9 are used, and they are written next to the maps as the video
    long = Path(attnmap.render.write_video(video(12, seed=1), tmp_path / "long.mp4", fps=12))
    with pytest.warns(UserWarning, match=r"used frames 0\.\.8 of 12"):
        attnmap.capture_video(pipe, long, PROMPT, store=root, video_id="long")
    store = attnmap.open_store(root)
    meta = store.metadata("long")
    assert meta["video"]["path"] == "long/input.mp4" and meta["video"]["frames"] == 9
    copy_ = _decoded(root / "long" / "input.mp4")
    assert copy_.shape == (9, 32, 32, 3)
    assert (
        np.abs(copy_.astype(int) - _decoded(long)[:9].astype(int)).mean() < 8
    )  # the same frames, re-encoded
    paths = attnmap.render_video(root, "long", tmp_path / "out")
    overlay = next(p for p in paths if p.name.endswith("_overlay.mp4"))
    import av

    with av.open(str(overlay)) as container:
        stream = container.streams.video[0]
        assert (stream.frames, float(stream.average_rate)) == (9, 12.0)  # the real video's frames and rate
    import json
    import re

    from attnmap.render.report import write_report

    page = write_report(root, tmp_path / "report.html", video_ids=["long"]).read_text()
    found = re.search(r'<script type="application/json" id="[^"]+-data">(.*?)</script>', page, re.S)
    assert found is not None
    shown = json.loads(found.group(1).replace("<\\/", "</"))["videos"][0]
    assert (len(shown["background"]), shown["fps"], shown["time"]) == (
        9,
        12.0,
        {"stride": 4},
    )  # the real frames
    track = summarize(store, "long")["tokens"]["red"]["track"]
    assert [p["latent_frame"] for p in track["points"]] == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert track["size"] == [32, 32]
