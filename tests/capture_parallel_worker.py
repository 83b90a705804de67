"""One rank of a context-parallel capture, for ``tests/test_capture_parallel.py``.

Run as ``python capture_parallel_worker.py RANK WORLD RENDEZVOUS OUT CASE...`` (each CASE
``family:ring:ulysses``, e.g. ``wan:2:1``), one process per rank, all started by the test. Each joins a
gloo process group on the CPU, then for each case builds the tiny model (the same seed on every rank),
enables diffusers' context parallelism on it and runs it twice: without capture, then under
``attnmap.capture`` over two steps with its own store root. It writes ``OUT/rank<r>.safetensors``:
each case's outputs and, on every rank, the maps the recorder holds (``<case>|<name>|<step>|<block>``),
and ``OUT/warnings<r>.json``: each case's warnings from attnmap. A case may add ``heads`` (per head), ``batch`` (two rows, each its own text),
``cubes`` (video cubes for ``blocks``) and ``local`` (the self-attention's processors told to attend
the rank's chunk alone, outside diffusers' templated attention: calls attnmap must refuse), and
``compiled`` (the model run through ``torch.compile`` with dynamo's eager backend). The family
``wanpipe`` is a whole WanPipeline (a target word, a negative prompt, both branches kept).

The CPU needs three shims diffusers 0.42 leaves to an accelerator: the ``cpu:gloo`` backend, one
device per process (``torch.accelerator.device_count``), ``Logger.warning_once``; and a forward op
that returns the rows' logsumexp for the ring, which diffusers' native op refuses on any device:
:func:`lse_forward_op` runs the CPU flash kernel (the one SDPA itself picks on the CPU).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

#: the reductions recorded: per row (cross, temporal, entropy) and per key (received, blocks)
REDUCTIONS = ("cross", "temporal", "received", "blocks", "entropy", "distance")
#: token tiles of ``blocks``: fine enough that a tile's rows lie on several ranks
BLOCK_SIZE = (5, 7)
#: video cubes of ``blocks`` (frames, rows, columns): a cube's rows lie on several ranks
CUBES = (2, 3, 3)
#: the two steps: the latents' seed and the timestep
STEPS = ((1, 500), (2, 300))


def shim() -> None:
    """What diffusers 0.42's context parallelism needs on a CPU-only machine."""
    torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    if not hasattr(logging.Logger, "warning_once"):
        logging.Logger.warning_once = logging.Logger.warning  # type: ignore[attr-defined]
    from diffusers.models import attention_dispatch

    native = attention_dispatch._native_attention_forward_op

    def lse_forward_op(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
                       **kwargs: Any) -> Any:  # fmt: skip
        names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa", "return_lse")
        bound = {**dict(zip(names, args)), **kwargs}
        if not bound.get("return_lse", False):
            return native(ctx, query, key, value, *args, **kwargs)
        q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, float(bound.get("dropout_p", 0.0)), bool(bound.get("is_causal", False)),
            attn_mask=bound.get("attn_mask"), scale=bound.get("scale"),
        )  # fmt: skip
        return out.permute(0, 2, 1, 3), lse.permute(0, 2, 1)  # [B, S, H, D], [B, S, H]

    attention_dispatch._native_attention_forward_op = lse_forward_op


def join_group(rank: int, world: int, rendezvous: str, timeout_s: float) -> None:
    """Join the ranks' gloo group on the CPU (every collective gives up after ``timeout_s``), one
    torch thread per rank."""
    import torch.distributed as dist

    dist.init_process_group(
        "cpu:gloo",
        init_method=rendezvous,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    torch.set_num_threads(1)


def run_ranks(
    commands: list[list[str]],
    logs: list[Path],
    env: dict[str, str],
    deadline: float,
    cwd: Optional[Path] = None,
) -> Optional[str]:
    """Start one process per rank (``commands[r]``, its output into ``logs[r]``) and wait for them all,
    ``deadline`` seconds at most: the first to fail ends the wait (the others would wait for it until the
    group's timeout), and every process still running is then killed. None when every rank exits 0, else
    each rank's exit code and the tail of its log."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for command, path in zip(commands, logs):
            with open(path, "wb") as log:
                procs.append(
                    subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
                )
        end = time.monotonic() + deadline
        while any(p.poll() is None for p in procs) and time.monotonic() < end:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
    codes = [p.returncode for p in procs]
    if codes == [0] * len(commands):
        return None
    tails = "\n".join(f"--- rank {r} (exit {c}):\n{logs[r].read_text()[-3000:]}" for r, c in enumerate(codes))
    return f"exit codes {codes}:\n{tails}"


def build(family: str, batch: int = 1) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The tiny model of ``family`` and its first step's inputs (``batch`` rows, each its own text)."""
    import tiny_models

    model, kwargs = getattr(tiny_models, family)(0)
    if family == "ltx":  # diffusers 0.42 shards LTX's text mask but not its heads: Ulysses fails on it
        kwargs["encoder_attention_mask"] = None
    if batch > 1:
        gen = torch.Generator().manual_seed(3)
        for name in ("hidden_states", "encoder_hidden_states"):
            shape = kwargs[name].shape
            kwargs[name] = torch.randn(batch, *shape[1:], generator=gen)
    return model, kwargs


def step_inputs(kwargs: dict[str, Any], seed: int, timestep: int) -> dict[str, Any]:
    """The inputs of one step: new latents (the same on every rank), the same text."""
    gen = torch.Generator().manual_seed(seed)
    hidden = kwargs["hidden_states"]
    return {
        **kwargs,
        "hidden_states": torch.randn(hidden.shape, generator=gen),
        "timestep": torch.tensor([timestep] * hidden.shape[0]),
    }


def run_case(case: str, rank: int, out: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """One case on this rank (``rank`` -1: one process, no parallelism): outputs without and with
    capture and the maps held, and the warnings attnmap gave."""
    family, ring, ulysses, *extra = case.split(":")
    if family == "wanpipe":
        import tiny_models

        pipe = tiny_models.wan_pipeline(0)
        model, kwargs = pipe.transformer, {"pipe": pipe}
    else:
        model, kwargs = build(family, 2 if "batch" in extra else 1)
    if rank >= 0:
        from diffusers import ContextParallelConfig

        config = ContextParallelConfig(ring_degree=int(ring), ulysses_degree=int(ulysses))
        model.enable_parallelism(config=config)
        if "local" in extra:  # self-attention on the rank's chunk alone, outside the templated attention
            for name, module in model.named_modules():
                if name.endswith("attn1"):
                    module.processor._parallel_config = None
    if "compiled" in extra:
        model = torch.compile(model, backend="eager")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run = _capture_pipeline if family == "wanpipe" else _capture
        found = run(case, model, kwargs, rank, out)
    return found, [str(w.message) for w in seen if str(w.message).startswith("attnmap")]


def _capture(
    case: str, model: torch.nn.Module, kwargs: dict[str, Any], rank: int, out: Path
) -> dict[str, torch.Tensor]:
    import attnmap

    extra = case.split(":")[3:]
    per_head = "heads" in extra
    block_size = CUBES if "cubes" in extra else BLOCK_SIZE
    found: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i, (seed, timestep) in enumerate(STEPS):
            found[f"{case}|plain|{i}"] = model(**step_inputs(kwargs, seed, timestep))[0]
        store = out / f"store-{case.replace(':', '-')}-rank{rank}"
        with attnmap.capture(
            model,
            reductions=REDUCTIONS,
            per_block=True,
            per_head=per_head,
            block_size=block_size,
            store=store,
            video_id=["v", "w"][: kwargs["hidden_states"].shape[0]],
        ) as rec:
            for i, (seed, timestep) in enumerate(STEPS):
                found[f"{case}|captured|{i}"] = model(**step_inputs(kwargs, seed, timestep))[0]
                rec.step()
    for name in rec.names:
        for step in rec.steps:
            for block in rec.blocks:
                found[f"{case}|{name}|{step}|{block}"] = rec.get(name, step=step, block=block)
    return {k: v.clone().contiguous() for k, v in found.items()}  # a collective's output waited for


def _capture_pipeline(
    case: str, model: torch.nn.Module, kwargs: dict[str, Any], rank: int, out: Path
) -> dict[str, torch.Tensor]:
    """The whole pipeline: a prompt with a target word, a negative prompt (both branches kept), its
    scheduler's steps; the outputs are the latents after each step."""
    import attnmap

    pipe = kwargs["pipe"]

    def run(name: str, found: dict[str, torch.Tensor]) -> None:
        def keep(pipe: Any, i: int, t: Any, state: dict[str, Any]) -> dict[str, Any]:
            found[f"{case}|{name}|{i}"] = state["latents"].clone()
            return state

        pipe("a (cat) on a mat" if name == "captured" else "a cat on a mat", negative_prompt="blurry",
             num_frames=9, height=32, width=32, num_inference_steps=len(STEPS), guidance_scale=5.0,
             generator=torch.Generator().manual_seed(0), output_type="latent", callback_on_step_end=keep)  # fmt: skip

    found: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        run("plain", found)
        store = out / f"store-{case.replace(':', '-')}-rank{rank}"
        with attnmap.capture(
            pipe,
            reductions=REDUCTIONS,
            block_size=BLOCK_SIZE,
            per_block=True,
            branch="both",
            store=store,
            video_id="v",
        ) as rec:
            run("captured", found)
    from attnmap import AttnmapError

    for name in rec.names:
        for branch in ("cond", "uncond"):
            for step in rec.steps:
                for block in rec.blocks:
                    try:  # a branch holds the names of its prompt (the negative one has no target word)
                        got = rec.get(name, step=step, block=block, branch=branch)
                    except AttnmapError:
                        continue
                    found[f"{case}|{name if branch == 'cond' else 'uncond/' + name}|{step}|{block}"] = got
    return {k: v.clone().contiguous() for k, v in found.items()}


def main(argv: list[str]) -> None:
    rank, world, rendezvous, out, cases = int(argv[0]), int(argv[1]), argv[2], Path(argv[3]), argv[4:]
    warnings.simplefilter("default")
    shim()
    import torch.distributed as dist
    from safetensors.torch import save_file

    join_group(rank, world, rendezvous, 60)
    try:
        found: dict[str, torch.Tensor] = {}
        said: dict[str, list[str]] = {}
        for case in cases:
            maps, said[case] = run_case(case, rank, out)
            found.update(maps)
        save_file(found, str(out / f"rank{rank}.safetensors"))
        (out / f"warnings{rank}.json").write_text(json.dumps(said))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1:])
