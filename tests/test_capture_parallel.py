"""Capture under diffusers' context parallelism, on CPU processes (gloo).

Two and four real processes (``tests/capture_parallel_worker.py``, one per rank) run a tiny Wan and a
tiny LTX (whose text is split across the ranks too) under ``ContextParallelConfig``: Ulysses (2), ring
(2), and both (2 x 2, four processes). Each rank captures two steps per block; rank 0's maps must equal
what one process captures of the same inputs (every reduction: per query row, per key, fine token tiles
whose rows lie on several ranks, video cubes, per head, a batch of two rows with their own text),
every rank must hold them after each step, the outputs must be those of the same parallel run without
capture, and only rank 0 may write the store. A rank's call attnmap cannot place is refused, and so
are the calls of ParaAttention and xDiT (mimicked by small fake modules: neither is installed).

Every wait is bounded: the processes' group times out after 60 s, and a run that has not ended after
:data:`DEADLINE` seconds is killed and fails the test with the ranks' logs.
"""

from __future__ import annotations

import json
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

import attnmap
import tiny_models
from capture_parallel_worker import run_ranks
from tiny_models import softmax64

HERE = Path(__file__).resolve().parent
WORKER = HERE / "capture_parallel_worker.py"
#: seconds one group of processes may run
DEADLINE = 240.0
#: a case whose self-attention attends the rank's chunk alone, outside diffusers' templated attention
LOCAL = "wan:1:2:local"
#: a case run through torch.compile (dynamo; diffusers' templated attention is then not read)
COMPILED = "wan:1:2:compiled"
#: the cases each group runs, ``family:ring:ulysses[:heads][:cubes][:batch][:local][:compiled]``
#: (see the worker)
GROUPS = {
    2: ("wan:1:2", "wan:2:1:cubes", "ltx:1:2:heads", "ltx:2:1:batch", "wanpipe:2:1", LOCAL, COMPILED),
    4: ("wan:2:2:heads", "ltx:2:2:cubes"),
}
#: the cases a single process captures alike
CASES = [(world, case) for world, cases in GROUPS.items() for case in cases if case not in (LOCAL, COMPILED)]
#: a group's folder, its ranks' results and their warnings per case
Run = tuple[Path, list[dict[str, torch.Tensor]], list[dict[str, list[str]]]]


def _launch(world: int, cases: tuple[str, ...], out: Path) -> None:
    """Run one group of ``world`` processes over ``cases``; fail with their logs where one fails or
    the group outlives :data:`DEADLINE` (every process is then killed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "python"), str(HERE)])}
    env.pop("TRITON_INTERPRET", None)
    commands = [
        [sys.executable, str(WORKER), str(rank), str(world), f"file://{out}/rendezvous", str(out), *cases]
        for rank in range(world)
    ]
    failed = run_ranks(
        commands, [out / f"log{rank}.txt" for rank in range(world)], env, DEADLINE, HERE.parent
    )
    if failed:
        pytest.fail(f"the context-parallel run of {cases} failed ({failed})")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, Run]]:
    """Each group's run."""
    found: dict[int, Run] = {}
    for world, cases in GROUPS.items():
        out = tmp_path_factory.mktemp(f"world{world}")
        _launch(world, cases, out)
        results = [load_file(str(out / f"rank{r}.safetensors")) for r in range(world)]
        said = [json.loads((out / f"warnings{r}.json").read_text()) for r in range(world)]
        found[world] = (out, results, said)
    yield found


@pytest.fixture(scope="module")
def single(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, dict[str, dict[str, torch.Tensor]]]]:
    """What one process captures of each case's inputs, and its store's folder."""
    import capture_parallel_worker as worker

    out = tmp_path_factory.mktemp("single")
    found: dict[str, dict[str, torch.Tensor]] = {}
    for _, case in CASES:
        found[case], said = worker.run_case(case, -1, out)
        assert not [w for w in said if "skipping" in w], said
    yield out, found


def _of(results: dict[str, torch.Tensor], case: str) -> dict[str, torch.Tensor]:
    return {k[len(case) + 1 :]: v for k, v in results.items() if k.startswith(case + "|")}


@pytest.mark.parametrize(("world", "case"), CASES, ids=[f"{w}procs-{c}" for w, c in CASES])
def test_every_rank_holds_the_single_process_maps(
    runs: dict[int, Run],
    single: tuple[Path, dict[str, dict[str, torch.Tensor]]],
    world: int,
    case: str,
) -> None:
    want = {k: v for k, v in _of(single[1][case], case).items() if k.count("|") == 2}  # name|step|block
    names = {k.split("|")[0] for k in want}
    assert {"temporal", "received", "blocks", "entropy", "distance", "received/text"} <= names
    assert "cross" in names or "token/cat" in names  # a pipeline's target word: its own map
    assert {k.split("|")[1] for k in want} == {"0", "1"} and {k.split("|")[2] for k in want} == {"0", "1"}
    for rank, results in enumerate(runs[world][1]):
        assert not [w for w in runs[world][2][rank][case] if "skipping" in w], f"rank {rank}"
        got = {k: v for k, v in _of(results, case).items() if k.count("|") == 2}
        assert sorted(got) == sorted(want), f"rank {rank}"
        for key, value in want.items():
            assert got[key].shape == value.shape, (rank, key)
            assert value.abs().nan_to_num().max() > 0, key  # a map of something
            torch.testing.assert_close(
                got[key], value, atol=1e-5, rtol=0, equal_nan=True, msg=f"rank {rank} {key}"
            )


@pytest.mark.parametrize(("world", "case"), CASES, ids=[f"{w}procs-{c}" for w, c in CASES])
def test_output_equals_the_run_without_capture(
    runs: dict[int, Run],
    single: tuple[Path, dict[str, dict[str, torch.Tensor]]],
    world: int,
    case: str,
) -> None:
    for rank, results in enumerate(runs[world][1]):
        got = _of(results, case)
        for step in (0, 1):
            assert torch.equal(got[f"captured|{step}"], got[f"plain|{step}"]), (rank, step)
            # and the parallel run is the model's (so the maps above are of the same attention)
            alone = _of(single[1][case], case)[f"plain|{step}"]
            torch.testing.assert_close(got[f"plain|{step}"], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("world", "case"), CASES, ids=[f"{w}procs-{c}" for w, c in CASES])
def test_only_rank_zero_writes_the_store(
    runs: dict[int, Run],
    single: tuple[Path, dict[str, dict[str, torch.Tensor]]],
    world: int,
    case: str,
) -> None:
    out = runs[world][0]
    name = case.replace(":", "-")
    assert [r for r in range(world) if (out / f"store-{name}-rank{r}").exists()] == [0]
    mine, theirs = (
        attnmap.open_store(out / f"store-{name}-rank0"),
        attnmap.open_store(single[0] / f"store-{name}-rank-1"),
    )
    videos = ["v", "w"] if "batch" in case else ["v"]
    assert mine.videos() == theirs.videos() == videos
    ring, ulysses = (int(x) for x in case.split(":")[1:3])
    for video in videos:
        assert mine.is_complete(video) and mine.steps(video) == theirs.steps(video) == [0, 1]
        assert mine.metadata(video)["context_parallel"] == {"ranks": world, "ring": ring, "ulysses": ulysses}
        for step in (0, 1):
            assert mine.names(video, step) == theirs.names(video, step)
            for map_name in mine.names(video, step):
                a, b = mine.load(video, map_name, step), theirs.load(video, map_name, step)
                np.testing.assert_allclose(a, b, atol=2e-3, rtol=2e-3, err_msg=map_name)  # float16 on disk


def test_local_rows_outside_the_templated_attention_are_refused(runs: dict[int, Run]) -> None:
    """A self-attention made on the rank's chunk of the video against its chunk of keys (here: its
    processor told no parallel config) has rows attnmap cannot place: every rank refuses it with a
    warning, and keeps only the calls it can place (the cross calls: local rows, the whole text)."""
    _, results, said = runs[2]
    for rank in range(2):
        names = {k.split("|")[0] for k in _of(results[rank], LOCAL) if k.count("|") == 2}
        assert "cross" in names and all(n == "cross" or n.endswith("/text") for n in names), (rank, names)
        refused = [w for w in said[rank][LOCAL] if "made outside diffusers' templated attention" in w]
        assert len(refused) == 2 and all("blocks." in w and ".attn1'" in w for w in refused), said[rank][
            LOCAL
        ]


def test_a_compiled_model_records_only_what_it_can_place(
    runs: dict[int, Run], single: tuple[Path, dict[str, dict[str, torch.Tensor]]]
) -> None:
    """Under torch.compile the templated attention is traced, not watched: its calls (a Ulysses rank's
    SDPA holds half the heads) are refused with one warning, never read as whole; the cross calls are
    read as without compile, and the output is the compiled run's without capture."""
    _, results, said = runs[2]
    want = {k: v for k, v in _of(single[1]["wan:1:2"], "wan:1:2").items() if k.count("|") == 2}
    cross = {k: v for k, v in want.items() if k.split("|")[0] == "cross" or k.split("|")[0].endswith("/text")}
    for rank in range(2):
        got = _of(results[rank], COMPILED)
        assert sorted(k for k in got if k.count("|") == 2) == sorted(cross), rank
        for key, value in cross.items():
            torch.testing.assert_close(
                got[key], value, atol=1e-5, rtol=0, equal_nan=True, msg=f"rank {rank} {key}"
            )
        for step in (0, 1):
            assert torch.equal(got[f"captured|{step}"], got[f"plain|{step}"])
        refused = [w for w in said[rank][COMPILED] if "skipping" in w]
        assert len(refused) == 1 and "under torch.compile it is not read" in refused[0], said[rank][COMPILED]


# -- frameworks whose sharding attnmap cannot see --------------------------------------------------
# ParaAttention and xDiT are not installed here: the fakes below mimic exactly the points attnmap
# detects them by (module names, ParaAttention's `func is F.scaled_dot_product_attention`, xDiT's
# sequence-parallel world size and its `USP` entry point).


def _fake_modules(monkeypatch: pytest.MonkeyPatch, **modules: dict[str, Any]) -> dict[str, types.ModuleType]:
    """Modules named like a framework's, with the given globals, in sys.modules for one test."""
    made = {}
    for name, namespace in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(namespace)
        monkeypatch.setitem(sys.modules, name, module)
        made[name] = module
    return made


def _para_attn_mode(monkeypatch: pytest.MonkeyPatch) -> type[TorchFunctionMode]:
    """A function mode like ParaAttention's UlyssesAttnMode: it runs its parallel attention (here: it
    counts it, then runs SDPA) only when ``func is F.scaled_dot_product_attention``."""

    class UlyssesAttnMode(TorchFunctionMode):
        disabled = False
        parallel = 0  # calls it ran its parallel attention for

        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            if UlyssesAttnMode.disabled:
                return func(*args, **kwargs)
            if func is torch.nn.functional.scaled_dot_product_attention:
                UlyssesAttnMode.parallel += 1
                return torch.nn.functional.scaled_dot_product_attention(*args, **kwargs)
            return func(*args, **kwargs)

    UlyssesAttnMode.__module__ = "para_attn.para_attn_interface"
    _fake_modules(
        monkeypatch, para_attn={}, **{"para_attn.para_attn_interface": {"UlyssesAttnMode": UlyssesAttnMode}}
    )
    return UlyssesAttnMode


def test_paraattention_keeps_its_parallelism_and_nothing_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    mode = _para_attn_mode(monkeypatch)
    model, kwargs = tiny_models.wan(0)
    with torch.no_grad():
        with mode():
            alone = model(**kwargs)[0]
        assert mode.parallel == 4  # 2 blocks x (self, cross)
        with pytest.warns(
            UserWarning, match="ParaAttention's UlyssesAttnMode computes this attention"
        ) as seen:
            with attnmap.capture(model, reductions=("cross", "temporal")) as rec, mode():
                captured = model(**kwargs)[0]
    assert mode.parallel == 8  # every call still ran ParaAttention's parallel attention
    assert torch.equal(captured, alone)
    assert len([w for w in seen if "ParaAttention" in str(w.message)]) == 1  # one warning
    assert rec.names == [] and rec.steps == []  # nothing partial recorded as whole


def test_paraattention_disabled_is_read_as_usual(monkeypatch: pytest.MonkeyPatch) -> None:
    mode = _para_attn_mode(monkeypatch)
    model, kwargs = tiny_models.wan(0)
    with torch.no_grad():
        with attnmap.capture(model, reductions=("temporal",)) as plain:
            model(**kwargs)
        monkeypatch.setattr(mode, "disabled", True)
        with attnmap.capture(model, reductions=("temporal",)) as rec, mode():
            model(**kwargs)
    assert mode.parallel == 0
    torch.testing.assert_close(rec.get("temporal"), plain.get("temporal"), atol=1e-6, rtol=0)


#: a user's model calling xDiT's USP by the name it imported (as xDiT's examples' processors do)
USP_USER = """
import torch
from xfuser.model_executor.layers.usp import USP


class Net(torch.nn.Module):
    def forward(self, x):  # [B, H, N, D]
        return USP(x, x.flip(-1), x)
"""


def _fake_xdit(monkeypatch: pytest.MonkeyPatch, world: int) -> types.ModuleType:
    """xDiT's distributed state (``world`` sequence-parallel ranks) and USP (here: SDPA, as USP runs
    on one rank), and a user's module calling USP."""

    def USP(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float = 0.0,
            is_causal: bool = False) -> torch.Tensor:  # fmt: skip
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=is_causal)

    state = {"get_sequence_parallel_world_size": lambda: world}
    _fake_modules(
        monkeypatch,
        xfuser={},
        **{"xfuser.core": {}, "xfuser.core.distributed": state, "xfuser.model_executor": {},
           "xfuser.model_executor.layers": {}, "xfuser.model_executor.layers.usp": {"USP": USP}},
    )  # fmt: skip
    user = types.ModuleType("usp_user")
    monkeypatch.setitem(sys.modules, "usp_user", user)
    exec(compile(USP_USER, "usp_user.py", "exec"), user.__dict__)
    return user


def test_xdit_usp_across_ranks_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    net = _fake_xdit(monkeypatch, world=2).Net()
    x = torch.randn(1, 2, 8, 4)
    alone = net(x)
    with pytest.warns(UserWarning, match="xDiT's USP runs this attention split across") as seen:
        with attnmap.capture(
            net, layout=attnmap.Layout.self_attn(grid=(2, 2, 2)), reductions=("temporal",)
        ) as rec:
            captured = net(x)
            net(x)
    assert torch.equal(captured, alone)
    assert len(seen) == 1 and rec.names == []


def test_xdit_usp_on_one_rank_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    net = _fake_xdit(monkeypatch, world=1).Net()
    x = torch.randn(1, 2, 8, 4)
    with attnmap.capture(
        net, layout=attnmap.Layout.self_attn(grid=(2, 2, 2)), reductions=("temporal",)
    ) as rec:
        net(x)
    p = softmax64(x, x.flip(-1))[0]  # [H, N, N]
    frames = p.reshape(2, 2, 4, 2, 4).sum(-1).mean(2)  # [H, F, F]: mean over a frame's queries
    torch.testing.assert_close(rec.get("temporal")[0], frames.mean(0).float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kernel", ["sdpa", "own"])
def test_xdit_processor_across_ranks_is_named(monkeypatch: pytest.MonkeyPatch, kernel: str) -> None:
    """A processor of xDiT's own (its class defined under ``xfuser``) on a rank's chunk: an SDPA call
    of its local rows is not read as whole, and a kernel attnmap does not see is named as xDiT's, not
    as an unknown kernel."""
    _fake_xdit(monkeypatch, world=2)

    class xFuserAttnProcessor:  # xDiT's name
        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            if kernel == "sdpa":
                return torch.nn.functional.scaled_dot_product_attention(x, x, x)
            return torch.softmax(x @ x.transpose(-1, -2), -1) @ x

    xFuserAttnProcessor.__module__ = "xfuser.model_executor.layers.attention_processor"

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.processor = xFuserAttnProcessor()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.processor(x)

    net = Net()
    with pytest.warns(UserWarning, match="xDiT's USP runs this attention split across") as seen:
        with attnmap.capture(
            net, layout=attnmap.Layout.self_attn(grid=(2, 2, 2)), reductions=("temporal",)
        ) as rec:
            net(torch.randn(1, 2, 8, 4))
    assert len(seen) == 1 and rec.names == []


def test_paraattention_inside_a_call_that_is_not_read_keeps_its_parallelism(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ParaAttention's mode around a call attnmap does not read inside (xDiT's USP here): the mode
    still sees torch's SDPA as ``F.scaled_dot_product_attention``."""
    mode = _para_attn_mode(monkeypatch)
    net = _fake_xdit(monkeypatch, world=2).Net()
    x = torch.randn(1, 2, 8, 4)
    with mode():
        alone = net(x)
    with pytest.warns(UserWarning, match="xDiT's USP") as seen:
        with attnmap.capture(
            net, layout=attnmap.Layout.self_attn(grid=(2, 2, 2)), reductions=("temporal",)
        ) as rec:
            with mode():
                captured = net(x)
    assert mode.parallel == 2 and torch.equal(captured, alone)
    assert len(seen) == 1 and rec.names == []
