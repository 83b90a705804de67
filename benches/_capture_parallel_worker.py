"""One rank of ``benches/bench_capture_parallel.py``: a Wan under diffusers' context parallelism, timed
with and without capture.

Run as ``python _capture_parallel_worker.py RANK WORLD RENDEZVOUS OUT SIZE ROUNDS MODE...`` (each MODE
``ring:ulysses``), one process per rank, all started by the bench, with ``tests/`` on the path for the
CPU shims diffusers' context parallelism needs (``capture_parallel_worker.shim``). For each mode every
rank builds the same model, checks that capture leaves the output unchanged, then times the two ways
interleaved (``_timing.timed``; the ranks keep in step through the model's collectives). Rank 0 writes
``OUT/timings.json``: per mode the two timings, their ratio, and the maps' check.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

#: (WanTransformer3DModel kwargs, latents [B, C, F, H, W], text length) per size; ``cpu-scaled`` is
#: bench_capture.py's CPU model (heads of 128, FFN 6x the width, text padded to 512, 4,800 tokens)
SIZES: dict[str, tuple[dict[str, Any], tuple[int, ...], int]] = {
    "smoke": (
        dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32,
             freq_dim=32, ffn_dim=64, num_layers=2),
        (1, 4, 4, 8, 8),
        16,
    ),
    "cpu-scaled": (
        dict(num_attention_heads=2, attention_head_dim=128, in_channels=4, out_channels=4, text_dim=256,
             freq_dim=256, ffn_dim=1536, num_layers=2),
        (1, 4, 5, 60, 64),
        512,
    ),
}  # fmt: skip
STEPS = 2


def setup(size: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import WanTransformer3DModel

    cfg, shape, text_len = SIZES[size]
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), cross_attn_norm=True, qk_norm="rms_norm_across_heads", **cfg
    )
    text = torch.zeros(1, text_len, cfg["text_dim"])
    text[:, :12] = torch.randn(1, 12, cfg["text_dim"])  # 12 real tokens, zero pads
    kwargs = {
        "hidden_states": torch.randn(shape),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": text,
        "return_dict": False,
    }
    return model.eval(), kwargs


def runs(model: torch.nn.Module, kwargs: dict[str, Any], keep: list[Any]) -> list[Callable[[], torch.Tensor]]:
    """The forwards without capture, and with capture of cross + temporal of every block."""
    import attnmap

    def plain() -> torch.Tensor:
        with torch.no_grad():
            for _ in range(STEPS):
                out = model(**kwargs)[0].clone()
        return out

    def captured() -> torch.Tensor:
        with attnmap.capture(model, reductions=("cross", "temporal")) as rec, torch.no_grad():
            for _ in range(STEPS):
                out = model(**kwargs)[0].clone()
                rec.step()
        keep[:] = [rec]
        return out

    return [plain, captured]


def main(argv: list[str]) -> None:
    rank, world, rendezvous, out = int(argv[0]), int(argv[1]), argv[2], Path(argv[3])
    size, rounds, modes = argv[4], int(argv[5]), argv[6:]
    warnings.simplefilter("ignore", FutureWarning)
    from capture_parallel_worker import join_group, shim

    shim()
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    from _timing import timed

    join_group(rank, world, rendezvous, 120)  # one core per rank
    found: dict[str, Any] = {}
    try:
        for mode in modes:
            ring, ulysses = (int(x) for x in mode.split(":"))
            model, kwargs = setup(size)
            model.enable_parallelism(config=ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses))
            keep: list[Any] = []
            plain, captured = runs(model, kwargs, keep)
            same = bool(torch.equal(plain(), captured()))  # and the first call of each is untimed
            temporal = keep[0].get("temporal")
            rows = float((temporal.sum(-1) - 1).abs().max())  # each query frame's mass over key frames: 1
            t_plain, t_capture = timed([plain, captured], rounds)
            name = "ulysses" if ring == 1 else "ring" if ulysses == 1 else "unified"
            found[name] = {
                **t_plain.as_dict("plain"),
                **t_capture.as_dict("capture"),
                "ratio": t_capture.wall / t_plain.wall,
                "cpu_ratio": t_capture.cpu_best / t_plain.cpu_best,
                "output_unchanged": same,
                "temporal_rows_err": rows,
            }
        if rank == 0:
            from attnmap import _native

            threads = {
                "torch_threads": torch.get_num_threads(),
                "kernel_threads": _native.kernel_info()["threads"],
            }
            (out / "timings.json").write_text(json.dumps({"modes": found, "rank": threads}))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
