"""Where a video pipeline's transformer looks in a real video: :func:`capture_video`.

A real video (a file PyAV decodes, or frames ``[T, H, W, 3]`` uint8) goes through the pipeline the way
a video-to-video pipeline takes its input, and its transformer runs once per chosen timestep under
:func:`attnmap.capture`; nothing is generated:

1. **fit**: the frames are resized (the whole frame, bilinear with antialiasing) to a size the VAE's
   spatial stride times the transformer's patch divides, and the first frames that a VAE of its
   temporal stride encodes whole are kept (``1 + k * stride`` for a causal VAE, whose first latent
   frame is frame 0 alone); a warning says what changed, a video that cannot fit is refused;
2. **encode**: the pipeline's own VAE encodes them (the mode of its latent distribution, as diffusers'
   video-to-video pipelines' ``retrieve_latents(..., sample_mode="argmax")``), and the family's own
   normalisation (:data:`FAMILIES`) turns the VAE's latents into the latents its transformer denoises;
3. **noise**: for each timestep and noise draw (a seeded ``torch.Generator``), the pipeline's scheduler's
   forward process: flow matching ``(1 - sigma) x0 + sigma noise`` at ``sigma = t / num_train_timesteps``
   (what ``FlowMatchEulerDiscreteScheduler.scale_noise`` computes at that sigma; the pipelines give
   their transformer ``t = sigma * num_train_timesteps``), DDPM/DDIM ``scheduler.add_noise``;
4. **run**: the pipeline itself is called for one denoising step on those latents (``output_type=
   "latent"``, so its VAE decodes nothing), with its scheduler replaced for the call by a one-timestep
   schedule whose step leaves the latents as they are: the pipeline encodes the marked caption with
   its own ``encode_prompt`` (prompt templates included), builds its transformer's inputs (rotary
   embeddings, masks, guidance embedding, packed tokens, Wan 2.2's expert for that timestep) and runs
   the transformer once per CFG branch, and :func:`attnmap.capture` records every call.

Each timestep is one capture step (its noise draws averaged in it); the store's aggregate is the mean
over timesteps. With ``store=`` the metadata's ``video`` is the real video (its size, its frame rate,
and ``path``: the file itself when every frame of it was used, else a copy of the frames used written
next to the maps), so that ``attnmap-render`` overlays and the report draw the maps on it; frame 0 is
latent frame 0 and each later latent frame covers ``stride`` frames, as the VAE encoded them.

Example:
    >>> rec = attnmap.capture_video(pipe, "dog.mp4", "a (dog) (jumps) over a fence", timesteps=(400, 600),
    ...                             height=480, width=832, store="maps", video_id="dog")  # doctest: +SKIP
    >>> rec.get("token/jumps").shape  # [B, F, H, W] latent tokens, mean over the two timesteps  # doctest: +SKIP
    torch.Size([1, 21, 30, 52])
"""

from __future__ import annotations

import contextlib
import inspect
import math
import operator
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from attnmap.capture.layouts import patch_size
from attnmap.capture.pipeline import _set, split_pipeline, vae_stride
from attnmap.capture.recorder import Recorder, capture
from attnmap.errors import AttnmapError

VideoInput = Union[str, "os.PathLike[str]", np.ndarray, torch.Tensor]

#: The name of the copy of the frames used, in the video's store folder (when not the whole file).
INPUT_VIDEO = "input.mp4"


# -- the families: how each pipeline's latents relate to its VAE's --------------------------------------
def _channels(value: Any, like: torch.Tensor) -> torch.Tensor:
    """A per-channel statistic (list or tensor) shaped to broadcast over ``[B, C, F, H, W]``."""
    return torch.as_tensor(value, dtype=torch.float32).to(like.device).view(1, -1, 1, 1, 1)


def _mean_std(vae: Any, z: torch.Tensor) -> torch.Tensor:
    # WanVideoToVideoPipeline.prepare_latents: (latents - latents_mean) * (1 / latents_std), the config's
    # lists (WanPipeline and SkyReelsV2Pipeline decode with the inverse)
    return (z - _channels(vae.config.latents_mean, z)) / _channels(vae.config.latents_std, z)


def _scaled(vae: Any, z: torch.Tensor) -> torch.Tensor:
    # CogVideoXVideoToVideoPipeline.prepare_latents: vae_scaling_factor_image * latents;
    # HunyuanVideoPipeline and AllegroPipeline decode latents / vae.config.scaling_factor
    return z * float(vae.config.scaling_factor)


def _ltx(vae: Any, z: torch.Tensor) -> torch.Tensor:
    # LTXPipeline._normalize_latents (and LTX2Pipeline's): (latents - mean) * scaling_factor / std, over
    # the VAE's latents_mean / latents_std buffers
    mean, std = _channels(vae.latents_mean, z), _channels(vae.latents_std, z)
    return (z - mean) * float(vae.config.scaling_factor) / std


def _mochi(vae: Any, z: torch.Tensor) -> torch.Tensor:
    # MochiPipeline.__call__ decodes latents * latents_std / scaling_factor + latents_mean (or
    # latents / scaling_factor without the statistics): its inverse
    sf = float(vae.config.scaling_factor)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return z * sf
    return (z - _channels(mean, z)) * sf / _channels(std, z)


def _as_is(pipe: Any, x: torch.Tensor) -> torch.Tensor:
    return x


def _frames_first(pipe: Any, x: torch.Tensor) -> torch.Tensor:
    # CogVideoXVideoToVideoPipeline.prepare_latents: .permute(0, 2, 1, 3, 4) to [B, F, C, H, W]
    return x.permute(0, 2, 1, 3, 4)


def _packed(pipe: Any, x: torch.Tensor) -> torch.Tensor:
    # LTXPipeline / LTX2Pipeline take latents= as tokens [B, N, C p_t p p] (their own _pack_latents)
    return pipe._pack_latents(x, pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size)


@dataclass(frozen=True)
class LatentFamily:
    """How a family's pipeline turns its VAE's latents into the ``latents=`` it denoises.

    Attributes:
        name: the family.
        transformers: class names of its transformers.
        normalise: ``(vae, z [B, C, F, H, W]) -> x0``: the VAE latents as the transformer denoises them.
        arrange: ``(pipe, x [B, C, F, H, W]) -> latents=`` in the pipeline's own layout.
        causal: the VAE encodes ``1 + k * stride`` frames, frame 0 alone in latent frame 0; else ``k * stride``.
        call: the pipeline call's arguments that keep it to one transformer forward per CFG branch.
    """

    name: str
    transformers: tuple[str, ...]
    normalise: Callable[[Any, torch.Tensor], torch.Tensor]
    arrange: Callable[[Any, torch.Tensor], torch.Tensor] = _as_is
    causal: bool = True
    call: tuple[tuple[str, Any], ...] = ()


#: The families capture_video knows, read from each pipeline's code in diffusers 0.42, each tested with a
#: tiny random pipeline (tests/test_capture_video.py): Wan 2.1 / 2.2, SkyReels-V2, CogVideoX 1.0 / 1.5,
#: HunyuanVideo, LTX, LTX-2, Mochi, Allegro, EasyAnimate, Motif-Video. Another pipeline is refused as one
#: whose latents capture_video does not know (Latte's VAE encodes images one by one, Cosmos' scheduler
#: is EDM's; Kandinsky 5, Sana-Video, HunyuanVideo 1.5 and Cosmos 2.5 are not read yet).
FAMILIES: tuple[LatentFamily, ...] = (
    LatentFamily("wan", ("WanTransformer3DModel", "SkyReelsV2Transformer3DModel"), _mean_std),
    LatentFamily("cogvideox", ("CogVideoXTransformer3DModel",), _scaled, _frames_first),
    LatentFamily("hunyuanvideo", ("HunyuanVideoTransformer3DModel",), _scaled),
    LatentFamily("ltx", ("LTXVideoTransformer3DModel",), _ltx, _packed),
    # LTX2Pipeline's spatio-temporal guidance (stg_scale) and modality guidance (modality_scale) run more
    # forwards per step, with blocks skipped or the other modality cut: off
    LatentFamily(
        "ltx2",
        ("LTX2VideoTransformer3DModel",),
        _ltx,
        _packed,
        call=(
            ("stg_scale", 0.0),
            ("audio_stg_scale", 0.0),
            ("modality_scale", 1.0),
            ("audio_modality_scale", 1.0),
        ),
    ),
    LatentFamily("mochi", ("MochiTransformer3DModel",), _mochi),
    # AllegroPipeline.prepare_latents: ceil(num_frames / 4) latent frames for an even frame count
    LatentFamily("allegro", ("AllegroTransformer3DModel",), _scaled, causal=False),
    # EasyAnimatePipeline decodes 1 / scaling_factor * latents
    LatentFamily("easyanimate", ("EasyAnimateTransformer3DModel",), _scaled),
    # MotifVideoPipeline._normalize_latents: (latents - latents_mean) / latents_std, the config's lists
    LatentFamily("motif-video", ("MotifVideoTransformer3DModel",), _mean_std),
)


def family_of(pipe: Any) -> LatentFamily:
    """The :class:`LatentFamily` of a pipeline's transformer.

    Raises:
        AttnmapError: the pipeline is not one capture_video can feed a real video, naming why.
    """
    name = type(pipe).__name__
    if isinstance(pipe, torch.nn.Module):
        raise AttnmapError(
            f"pipe must be a diffusers video pipeline (its VAE encodes the video), got the model {name}; "
            "for a bare model, encode the video yourself and run it under attnmap.capture"
        )
    _, nets = split_pipeline(pipe)
    core = type(nets[0][1]).__name__
    family = next((f for f in FAMILIES if core in f.transformers), None)
    if family is None:
        known = ", ".join(f.name for f in FAMILIES)
        raise AttnmapError(
            f"pipe: capture_video does not know how {name} turns its VAE's latents into the latents its "
            f"{core} denoises; it knows the families {known}"
        )
    vae = getattr(pipe, "vae", None)
    if vae is None or not callable(getattr(vae, "encode", None)):
        raise AttnmapError(f"pipe: {name} has no VAE with an encoder, so it cannot encode a real video")
    params = inspect.signature(pipe.__call__).parameters
    if "latents" not in params:
        raise AttnmapError(
            f"pipe: {name}.__call__ takes no latents=, so it cannot run on a real video's latents"
        )
    return family


# -- reading and fitting the video --------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """The real video: frames in hand ``[T, H, W, 3]`` uint8, or a file (probed, decoded only for the
    frames used); its frame count, size and rate."""

    frames: Optional[np.ndarray]
    count: int
    height: int
    width: int
    fps: Optional[float]
    path: Optional[Path]

    def pick(self, indices: Sequence[int]) -> np.ndarray:
        """The frames at ``indices`` (increasing), ``[n, H, W, 3]`` uint8: a file is decoded chunk by chunk
        up to the last one, keeping only those.

        Raises:
            AttnmapError: the file decodes fewer frames than its container counts.
        """
        if self.frames is not None:
            return self.frames[list(indices)]
        from attnmap.render.codec import iter_video

        assert self.path is not None
        wanted, offset = list(indices), 0
        kept: list[np.ndarray] = []
        chunks = iter_video(self.path, 16)
        try:
            for chunk in chunks:
                kept += [chunk[i - offset].copy() for i in wanted[len(kept) :] if i < offset + len(chunk)]
                offset += len(chunk)
                if len(kept) == len(wanted):
                    break
        finally:
            chunks.close()
        if len(kept) < len(wanted):
            raise AttnmapError(
                f"video: {str(self.path)!r} decodes {offset} frames, fewer than the {self.count} its container "
                f"counts (frame {wanted[len(kept)]} is missing)"
            )
        return np.stack(kept)


def read_source(video: VideoInput, fps: Optional[float] = None) -> Source:
    """Probe a video file (PyAV; nothing decoded yet) or check frames in hand.

    Args:
        video: a path, or frames ``[T, H, W, 3]`` uint8 (numpy or torch).
        fps: its frame rate; None: the file's (unknown for frames).

    Raises:
        AttnmapError: frames that are not ``[T, H, W, 3]`` uint8, an empty video, a bad fps.
        FileNotFoundError: a path that is not a file.
    """
    if fps is not None and (
        isinstance(fps, bool)
        or not isinstance(fps, (int, float))
        or not math.isfinite(fps)
        or not 0 < fps <= 1000
    ):
        raise AttnmapError(f"fps must be a frame rate in (0, 1000], got {fps!r}")
    if isinstance(video, (str, os.PathLike)):
        from attnmap.render.codec import probe_video

        path = Path(video)
        if not path.is_file():
            raise FileNotFoundError(f"video {str(video)!r} does not exist")
        count, (height, width), rate = probe_video(path)
        if count == 0:
            raise AttnmapError(f"video: {str(video)!r} has no frames")
        fps = fps if fps is not None else (float(rate) if rate > 0 else None)
        return Source(None, count, height, width, None if fps is None else float(fps), path.resolve())
    if not isinstance(video, (np.ndarray, torch.Tensor)):
        raise AttnmapError(f"video must be a path or frames [T, H, W, 3] uint8, got {type(video).__name__}")
    frames = video.detach().cpu().numpy() if isinstance(video, torch.Tensor) else video
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise AttnmapError(
            f"video: expected frames [T, H, W, 3] uint8, got {frames.dtype} {tuple(frames.shape)}"
        )
    count, height, width = (int(n) for n in frames.shape[:3])
    return Source(frames, count, height, width, None if fps is None else float(fps), None)


@dataclass(frozen=True)
class Fit:
    """What the pipeline takes of a video: the frames used (indices into the source), the model's frame
    size, and the strides behind them."""

    indices: tuple[int, ...]
    height: int
    width: int
    stride: tuple[int, int]  # the VAE's (temporal, spatial)
    causal: bool

    @property
    def latent_frames(self) -> int:
        n, t = len(self.indices), self.stride[0]
        return (n - 1) // t + 1 if self.causal else n // t

    def latent_index(self) -> list[int]:
        """The latent frame each used frame is encoded in."""
        t = self.stride[0]
        return [
            (0 if i == 0 else (i - 1) // t + 1) if self.causal else i // t for i in range(len(self.indices))
        ]


def _int(name: str, value: Any, lo: int) -> int:
    try:
        out = -1 if isinstance(value, bool) else operator.index(value)
    except TypeError:
        out = -1
    if out < lo:
        raise AttnmapError(f"{name} must be an int >= {lo}, got {value!r}")
    return out


def accepted_frames(count: int, stride: int, patch_t: int, causal: bool) -> list[int]:
    """The frame counts up to ``count`` that a VAE of temporal ``stride`` encodes whole into a latent
    frame count the transformer's temporal patch divides."""
    if causal:
        return [1 + k * stride for k in range(count) if 1 + k * stride <= count and (k + 1) % patch_t == 0]
    return [k * stride for k in range(1, count + 1) if k * stride <= count and k % patch_t == 0]


def fit(
    pipe: Any,
    family: LatentFamily,
    shape: tuple[int, int, int],
    *,
    height: Optional[int],
    width: Optional[int],
    num_frames: Optional[int],
    start: int,
    frame_step: int,
) -> tuple[Fit, list[str]]:
    """Choose the frames and size a pipeline takes of a video of ``shape`` (T, H, W).

    Returns:
        ``(fit, changes)``: the choice, and what it changed (for the warning).

    Raises:
        AttnmapError: a size or frame count the pipeline cannot take, naming the ones it can.
    """
    strides = vae_stride(pipe)
    if strides is None or strides[0] is None or strides[1] is None:
        raise AttnmapError(f"pipe: {type(pipe).__name__} names no VAE temporal and spatial factors")
    st, ss = int(strides[0]), int(strides[1])
    _, nets = split_pipeline(pipe)
    pt, ph, pw = patch_size(nets[0][1])
    total, h0, w0 = shape
    start, frame_step = _int("start", start, 0), _int("frame_step", frame_step, 1)
    if start >= total:
        raise AttnmapError(f"start must be a frame of the video, in [0, {total}), got {start}")
    available = len(range(start, total, frame_step))
    counts = accepted_frames(available, st, pt, family.causal)
    rule = f"1 + k x {st}" if family.causal else f"k x {st}"
    rule += f" with the latent frames a multiple of {pt}" if pt > 1 else ""
    changes: list[str] = []
    if num_frames is None:
        if not counts:
            raise AttnmapError(
                f"video: {available} frame(s) from frame {start} every {frame_step}; the pipeline's VAE "
                f"encodes {rule} frames, the fewest is {accepted_frames(1 << 20, st, pt, family.causal)[0]}"
            )
        n = counts[-1]
        if n < available:
            changes.append(f"used frames {start}..{start + (n - 1) * frame_step} of {total} ({rule} frames)")
    else:
        n = _int("num_frames", num_frames, 1)
        if n not in accepted_frames(max(n, available), st, pt, family.causal):
            near = accepted_frames(n + st * pt, st, pt, family.causal)
            raise AttnmapError(f"num_frames must be {rule} frames (e.g. {near[-2:]}), got {n}")
        if n > available:
            raise AttnmapError(
                f"num_frames={n} is more than the {available} frame(s) from frame {start} every {frame_step}"
            )
    sizes = []
    for name, given, have, multiple in (("height", height, h0, ss * ph), ("width", width, w0, ss * pw)):
        if given is None:
            size = max(multiple, int(have / multiple + 0.5) * multiple)  # the nearest, halves up
        else:
            size = _int(name, given, 1)
            if size % multiple:
                lower = max(multiple, size // multiple * multiple)
                raise AttnmapError(
                    f"{name} must be a multiple of {multiple} (the VAE's {ss} x the patch's "
                    f"{multiple // ss}), e.g. {lower} or {lower + multiple}; got {size}"
                )
        sizes.append(size)
    if (sizes[0], sizes[1]) != (h0, w0):
        changes.append(f"resized {h0}x{w0} to {sizes[0]}x{sizes[1]}")
    indices = tuple(start + i * frame_step for i in range(n))
    return Fit(indices, sizes[0], sizes[1], (st, ss), family.causal), changes


def pixels(used: np.ndarray, chosen: Fit) -> torch.Tensor:
    """The frames the VAE encodes: ``[1, 3, F, H, W]`` float32 in [-1, 1], the ``used`` frames
    ``[F, H, W, 3]`` uint8 resized as :func:`fit` chose (bilinear, antialiased, ``align_corners=False``)."""
    frames = torch.from_numpy(np.ascontiguousarray(used))
    x = frames.permute(0, 3, 1, 2).to(torch.float32)  # [F, 3, H, W]
    if x.shape[-2:] != (chosen.height, chosen.width):
        x = F.interpolate(
            x, size=(chosen.height, chosen.width), mode="bilinear", align_corners=False, antialias=True
        )
    return (x / 127.5 - 1.0).permute(1, 0, 2, 3).unsqueeze(0)


def encode(pipe: Any, family: LatentFamily, x: torch.Tensor) -> torch.Tensor:
    """The clean latents ``[1, C, F, h, w]`` float32 the transformer denoises: the VAE's mode, normalised
    as the family's pipeline does."""
    vae = pipe.vae
    param = next(vae.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    with torch.no_grad():
        out = vae.encode(x.to(device=device, dtype=dtype))
        dist: Any = getattr(out, "latent_dist", None)
        if dist is None and isinstance(out, tuple):
            dist = out[0]
        z = dist.mode() if hasattr(dist, "mode") else getattr(out, "latents", dist)
        if not isinstance(z, torch.Tensor) or z.dim() != 5:
            raise AttnmapError(
                f"pipe: its VAE's encode gave no latents [B, C, F, H, W] (got {type(z).__name__})"
            )
        return family.normalise(vae, z.to(torch.float32))


# -- noising ---------------------------------------------------------------------------------------------
def _flow(scheduler: Any) -> bool:
    config = scheduler.config
    return (
        hasattr(scheduler, "scale_noise")
        or bool(config.get("use_flow_sigmas", False))
        or config.get("prediction_type") == "flow_prediction"
    )


def noise_level(scheduler: Any, t: float) -> float:
    """The noise level of timestep ``t``: flow matching's sigma ``t / N``; DDPM/DDIM's ``sqrt(1 - alphabar_t)``."""
    n = int(scheduler.config.num_train_timesteps)
    if _flow(scheduler):
        return t / n
    return float(torch.sqrt(1.0 - scheduler.alphas_cumprod[int(t)]))


def check_scheduler(scheduler: Any, timesteps: Sequence[Any]) -> list[float]:
    """The timesteps as floats in the scheduler's range, and a scheduler capture_video can noise with.

    Raises:
        AttnmapError: an unknown kind of scheduler, or a timestep out of its range.
    """
    name = type(scheduler).__name__
    config = getattr(scheduler, "config", None)
    if config is None or "num_train_timesteps" not in config:
        raise AttnmapError(f"pipe: its scheduler {name} has no num_train_timesteps")
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
        raise AttnmapError(
            f"pipe: its scheduler {name} scales its inputs (init_noise_sigma != 1); capture_video noises "
            "for flow-matching and DDPM/DDIM schedulers"
        )
    flow = _flow(scheduler)
    if not flow and (not hasattr(scheduler, "alphas_cumprod") or hasattr(scheduler, "sigmas")):
        raise AttnmapError(
            f"pipe: capture_video noises latents for flow-matching and DDPM/DDIM schedulers; {name} is neither"
        )
    n = int(config.num_train_timesteps)
    if isinstance(timesteps, (int, float)):
        timesteps = [timesteps]
    out = []
    for t in timesteps:
        ok = isinstance(t, (int, float, np.integer, np.floating)) and not isinstance(t, bool)
        ok = ok and (0 < float(t) <= n if flow else float(t).is_integer() and 0 <= float(t) < n)
        if not ok:
            want = f"numbers in (0, {n}]" if flow else f"integers in [0, {n})"
            raise AttnmapError(f"timesteps must be {want} ({name}'s num_train_timesteps is {n}), got {t!r}")
        out.append(float(t))
    if not out:
        raise AttnmapError("timesteps must name at least one timestep")
    return out


def add_noise(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
    """``x0`` noised to timestep ``t`` by the scheduler's forward process."""
    if _flow(scheduler):
        sigma = noise_level(scheduler, t)  # FlowMatchEulerDiscreteScheduler.scale_noise at that sigma
        return sigma * noise + (1.0 - sigma) * x0
    out: torch.Tensor = scheduler.add_noise(x0, noise, torch.tensor([int(t)]))
    return out


class OneTimestep:
    """A scheduler whose schedule is one timestep, for the pipeline's call: the latents it is given are
    already noised to that timestep, and its step leaves them as they are (nothing is denoised).

    Everything the pipelines read of a scheduler (``config``, ``order``, ``init_noise_sigma``,
    ``timesteps``, ``sigmas``, ``set_timesteps``, ``set_begin_index``, ``scale_model_input``, ``step``)
    is here; its config is the real scheduler's.
    """

    order = 1
    init_noise_sigma = 1.0

    def __init__(self, scheduler: Any, timestep: float, sigma: float, dtype: torch.dtype) -> None:
        self.config = scheduler.config
        self.timesteps = torch.tensor([timestep], dtype=dtype)
        self.sigmas = torch.tensor([sigma, 0.0], dtype=torch.float32)

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Any = None,
        timesteps: Any = None,
        sigmas: Any = None,
        mu: Any = None,
        **kwargs: Any,
    ) -> None:
        if device is not None:
            self.timesteps = self.timesteps.to(device)
            self.sigmas = self.sigmas.to(device)

    def set_begin_index(self, begin_index: int = 0) -> None:
        return None

    def scale_model_input(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return sample

    def step(self, model_output: Any, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return (sample,)


@contextlib.contextmanager
def one_timestep(pipe: Any, scheduler: OneTimestep, *, guidance: bool = False) -> Iterator[None]:
    """``pipe.scheduler`` is ``scheduler`` inside (past the pipeline's registering ``__setattr__``), its
    progress bar is off, and without ``guidance`` a guider component (MotifVideoPipeline's) is off."""
    undo = [_set(pipe, "scheduler", scheduler)]
    bar = dict(getattr(pipe, "_progress_bar_config", None) or {})
    undo.append(_set(pipe, "_progress_bar_config", {**bar, "disable": True}))
    guider: Any = getattr(pipe, "guider", None)
    if not guidance and callable(getattr(guider, "new", None)) and "enabled" in getattr(guider, "config", {}):
        undo.append(_set(pipe, "guider", guider.new(enabled=False)))
    try:
        yield
    finally:
        for u in reversed(undo):
            u()


@contextlib.contextmanager
def prompt_encoded_once(pipe: Any) -> Iterator[None]:
    """Inside, the pipeline's ``encode_prompt`` (the capture's wrapper of it, which finds the targets)
    runs once per distinct call and its result is reused: every call of capture_video encodes the
    same caption, and a text encoder over a padded prompt can cost more than the tiny steps."""
    encode = pipe.encode_prompt
    memo: dict[str, Any] = {}

    def encode_prompt(*args: Any, **kwargs: Any) -> Any:
        key = repr((args, sorted(kwargs.items())))
        if key not in memo:
            memo[key] = encode(*args, **kwargs)
        return memo[key]

    undo = _set(pipe, "encode_prompt", encode_prompt)
    try:
        yield
    finally:
        undo()


# -- the call ---------------------------------------------------------------------------------------------
def _call_kwargs(
    pipe: Any,
    family: LatentFamily,
    chosen: Fit,
    *,
    fps: Optional[float],
    guidance: bool,
    guidance_scale: Optional[float],
    negative_prompt: Optional[str],
    given: Mapping[str, Any],
) -> dict[str, Any]:
    """The pipeline call's keyword arguments (those its ``__call__`` takes), ``given`` last."""
    params = inspect.signature(pipe.__call__).parameters
    kwargs: dict[str, Any] = {
        "height": chosen.height,
        "width": chosen.width,
        "num_frames": len(chosen.indices),
        "num_inference_steps": 2,  # what the pipeline's own schedule needs (Mochi's divides by steps - 1);
        # the one-timestep scheduler gives one timestep whatever it asks for
        "output_type": "latent",
        "return_dict": False,
    }
    if fps is not None:
        kwargs["frame_rate"] = fps  # LTX: the rotary embedding's time scale
    kwargs.update(dict(family.call))
    # the classifier-free guidance scales with a value of their own (each > 1 runs the negative
    # prompt's branch: LTX-2's audio_guidance_scale too; Wan 2.2's guidance_scale_2 is None, the same as
    # guidance_scale); HunyuanVideo's guidance_scale is an embedded input, its guidance true_cfg_scale
    knobs = (
        ["true_cfg_scale"]
        if "true_cfg_scale" in params
        else [
            n
            for n, p in params.items()
            if re.fullmatch(r"([a-z]+_)?guidance_scale(_\d+)?", n) and isinstance(p.default, (int, float))
        ]
    )
    for knob in knobs:
        kwargs[knob] = 1.0
    if guidance:
        knob = knobs[0] if knobs else "guidance_scale"
        default = params[knob].default if knob in params else None
        scale = guidance_scale if guidance_scale is not None else default
        if not isinstance(scale, (int, float)) or scale <= 1.0:
            scale = 2.0  # any scale above 1 runs both branches; it only mixes predictions, discarded here
        kwargs[knob] = float(scale)
        kwargs["negative_prompt"] = negative_prompt if negative_prompt is not None else ""
    kwargs = {k: v for k, v in kwargs.items() if k in params}
    bad = sorted(set(given) & {"latents", "prompt", "num_inference_steps", "output_type", "return_dict"})
    if bad:
        raise AttnmapError(f"pipeline_kwargs must not set {bad}: capture_video sets them")
    required = [
        name
        for name, p in params.items()
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and name not in ("prompt", *kwargs, *given)
    ]
    if required:
        raise AttnmapError(
            f"pipe: {type(pipe).__name__}.__call__ needs {required}, which capture_video does not give; pass "
            "them in pipeline_kwargs, or use the family's text-to-video pipeline"
        )
    return {**kwargs, **given}


@contextlib.contextmanager
def transformer_runs(pipe: Any) -> Iterator[list[int]]:
    """Counts the forwards of the pipeline's denoisers inside (``[count]``)."""
    count = [0]
    _, nets = split_pipeline(pipe)

    def seen(module: torch.nn.Module, args: Any) -> None:
        count[0] += 1

    handles = [net.register_forward_pre_hook(seen) for _, net in nets]
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()


def capture_video(
    pipe: Any,
    video: VideoInput,
    prompt: str,
    *,
    timesteps: Sequence[float] = (500,),
    noise_draws: int = 1,
    seed: int = 0,
    height: Optional[int] = None,
    width: Optional[int] = None,
    num_frames: Optional[int] = None,
    start: int = 0,
    frame_step: int = 1,
    fps: Optional[float] = None,
    guidance: bool = False,
    guidance_scale: Optional[float] = None,
    negative_prompt: Optional[str] = None,
    store: Union[str, Path, None] = None,
    video_id: Optional[str] = None,
    pipeline_kwargs: Optional[Mapping[str, Any]] = None,
    **capture_kwargs: Any,
) -> Recorder:
    """Capture where a pipeline's transformer looks in a real video (see the module docstring).

    Args:
        pipe: a diffusers video pipeline of a family of :data:`FAMILIES` (Wan 2.1/2.2, SkyReels-V2,
            CogVideoX 1.0/1.5, HunyuanVideo, LTX, LTX-2, Mochi, Allegro, EasyAnimate, Motif-Video); others
            are refused, naming why.
        video: a video file PyAV reads, or frames ``[T, H, W, 3]`` uint8.
        prompt: the caption, target words marked: ``"a (dog) (jumps) over a fence"``.
        timesteps: the timesteps to noise to and run at (one capture step each), in the scheduler's
            training units where ``num_train_timesteps`` is pure noise: flow matching, any number in
            (0, N]; DDPM/DDIM, integers in [0, N).
        noise_draws: noise draws per timestep, their maps averaged in its step.
        seed: seeds the noise (a CPU ``torch.Generator``: draw ``d`` is the same at every timestep).
        height, width: the frame size the model sees (multiples of the VAE's spatial stride times the
            patch); None: the video's, rounded to the nearest multiple (with a warning when it changes).
        num_frames: how many frames to use (``1 + k * stride`` for a causal VAE); None: as many as fit.
        start, frame_step: the frames used are ``start, start + frame_step, ...``.
        fps: the video's frame rate (None: the file's; unknown for frames); ``fps / frame_step`` is what
            the store records and LTX's ``frame_rate``.
        guidance: also run the negative prompt's branch (``negative_prompt``, default ``""``), with the
            pipeline's classifier-free guidance knob above 1 (``guidance_scale`` or its default);
            recorded as ``uncond/<name>`` with ``branch="both"`` (the default then).
        store, video_id: write the maps as a store video; its metadata ties the maps to the real video.
        pipeline_kwargs: more arguments of the pipeline's call (``max_sequence_length``,
            ``prompt_template`` ...).
        **capture_kwargs: passed to :func:`attnmap.capture` (``reductions``, ``per_head``,
            ``per_block``, ``blocks``, ``branch``, ``config``, ``metadata`` ...).

    Returns:
        the :class:`attnmap.Recorder` of the capture (closed): ``rec.get("token/dog")`` ``[B, F, H, W]``.

    Raises:
        AttnmapError: a pipeline that cannot take a real video, a video it cannot fit, a bad argument.
    """
    if not isinstance(prompt, str):
        raise AttnmapError(f"prompt must be a str with the target words marked, got {type(prompt).__name__}")
    for reserved in ("store", "video_id", "model", "targets", "prompt"):
        if reserved in capture_kwargs:
            raise AttnmapError(f"{reserved}= is not a capture option of capture_video")
    if store is not None and not isinstance(video_id, str):
        raise AttnmapError(f"store= needs video_id= (a str), got {video_id!r}")
    family = family_of(pipe)
    draws = _int("noise_draws", noise_draws, 1)
    seed = _int("seed", seed, 0)
    steps = check_scheduler(pipe.scheduler, timesteps)
    source = read_source(video, fps)
    chosen, changes = fit(
        pipe, family, (source.count, source.height, source.width), height=height, width=width, num_frames=num_frames, start=start,
        frame_step=frame_step,
    )  # fmt: skip
    if changes:
        warnings.warn(
            f"attnmap.capture_video: {'; '.join(changes)}, so that {type(pipe).__name__} takes the video",
            stacklevel=2,
        )
    rate = None if source.fps is None else source.fps / frame_step
    kwargs = _call_kwargs(
        pipe, family, chosen, fps=rate, guidance=guidance, guidance_scale=guidance_scale,
        negative_prompt=negative_prompt, given=dict(pipeline_kwargs or {}),
    )  # fmt: skip

    used = source.pick(chosen.indices)
    x0 = encode(pipe, family, pixels(used, chosen))
    st, ss = chosen.stride
    want = (chosen.latent_frames, chosen.height // ss, chosen.width // ss)
    if tuple(x0.shape[2:]) != want:
        raise AttnmapError(
            f"pipe: its VAE encoded {len(chosen.indices)} frames of {chosen.height}x{chosen.width} into latents "
            f"{tuple(x0.shape[2:])}, not the {want} that the pipeline's VAE factors ({st} in time, {ss} in space) "
            "give, so its latent frames cannot be tied to the video's frames"
        )
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noises = [torch.randn(x0.shape, generator=generator).to(x0.device) for _ in range(draws)]
    scheduler = pipe.scheduler
    n_train = int(scheduler.config.num_train_timesteps)
    whole = source.path is not None and len(chosen.indices) == source.count
    copy = store is not None and not whole
    video_meta: dict[str, Any] = {
        "height": source.height,
        "width": source.width,
        "frames": len(chosen.indices),
        "fps": rate,
        "path": str(source.path) if whole else None,
    }
    if copy:
        from attnmap.store import video_dirname

        video_meta["path"] = f"{video_dirname(str(video_id))}/{INPUT_VIDEO}"
    meta: dict[str, Any] = {
        "video": video_meta,
        "source": {
            "path": None if source.path is None else str(source.path),
            "frames": source.count,
            "fps": source.fps,
            "indices": list(chosen.indices),
            "size": [chosen.height, chosen.width],
            "latent_frames": chosen.latent_frames,
            "latent_index": chosen.latent_index(),
        },
        "timesteps": steps,
        "noise": {
            "seed": seed,
            "draws": draws,
            "levels": [noise_level(scheduler, t) for t in steps],
            "scheduler": type(scheduler).__name__,
        },
    }
    for key, value in dict(capture_kwargs.pop("metadata", None) or {}).items():
        meta[key] = (
            {**meta[key], **value} if isinstance(value, dict) and isinstance(meta.get(key), dict) else value
        )
    capture_kwargs.setdefault("branch", "both" if guidance else "cond")
    dtype = torch.float32 if _flow(scheduler) else torch.int64
    rec = capture(pipe, store=store, video_id=video_id, metadata=meta, **capture_kwargs)
    with rec, prompt_encoded_once(pipe):
        for t in steps:
            # a scheduler with invert_sigmas (Mochi's) counts its timesteps from pure noise at 0
            model_t = n_train - t if scheduler.config.get("invert_sigmas", False) else t
            for noise in noises:
                latents = family.arrange(pipe, add_noise(scheduler, x0, noise, t))
                one = OneTimestep(scheduler, model_t, noise_level(scheduler, t), dtype)
                with one_timestep(pipe, one, guidance=guidance), transformer_runs(pipe) as runs:
                    pipe(prompt=prompt, latents=latents, **kwargs)
                if not runs[0]:
                    raise AttnmapError(
                        f"pipe: {type(pipe).__name__} ran no transformer forward on the latents it was given at "
                        f"timestep {t} (a pipeline that schedules its own steps from a strength or an input video "
                        "does not run one timestep); use the family's text-to-video pipeline"
                    )
            rec.step()
    if copy and store is not None:
        from attnmap.render.codec import write_video
        from attnmap.render.videos import DEFAULT_FPS

        target = Path(store) / str(video_meta["path"])
        target.parent.mkdir(parents=True, exist_ok=True)
        write_video(used, target, fps=rate or DEFAULT_FPS)
    return rec


__all__ = ["FAMILIES", "LatentFamily", "capture_video"]
