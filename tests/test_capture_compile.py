"""Capture of a compiled model: ``torch.compile(model)`` and ``model.compile()``, inductor and eager.

The interception's hooks and entry points are traced into the graph, and each call reaches the
capture through the opaque custom op ``attnmap::observe`` when the graph runs, so the graph is the
model's own: the output is bit-identical to the compiled model's without capture (inductor too),
and the maps equal eager capture's (fp32, within 1e-5; measured 6e-8 on the tiny Wan).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import attnmap
from tiny_models import VIDEO_TRANSFORMERS

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def run(model: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**kwargs)
    return out if isinstance(out, torch.Tensor) else out[0]


def captured(model: Any, kwargs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """The eager capture, reduced in two passes as a compiled graph's calls are (the one-pass path
    takes the lse from an aten op a graph would not see as SDPA)."""
    with attnmap.capture(model, reductions=("cross", "temporal"), per_block=True, one_pass=False) as rec:
        out = run(model, kwargs)
    return out, rec


def assert_same_maps(rec: Any, eager: Any, atol: float) -> None:
    assert rec.names == eager.names and rec.blocks == eager.blocks and rec.names
    for name in eager.names:
        for block in eager.blocks:
            err = (rec.get(name, block=block) - eager.get(name, block=block)).abs().max().item()
            assert err <= atol, f"{name} block {block}: {err:.3g} from eager capture"


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_model_compile_with_the_eager_backend_is_bit_identical(family: str) -> None:
    torch._dynamo.reset()
    model, kwargs = VIDEO_TRANSFORMERS[family]()
    eager_out, eager = captured(model, kwargs)
    model.compile(backend="eager")
    plain = run(model, kwargs)
    out, rec = captured(model, kwargs)
    assert torch.equal(out, plain) and torch.equal(out, eager_out)
    assert_same_maps(rec, eager, 0.0)
    again, rec2 = captured(model, kwargs)  # a second capture of the same compiled model
    assert torch.equal(again, plain)
    assert_same_maps(rec2, eager, 0.0)
    assert run(model, kwargs).equal(plain)  # and after it, the compiled model runs as before


def test_torch_compile_inductor_records_the_eager_maps() -> None:
    torch._dynamo.reset()
    model, kwargs = VIDEO_TRANSFORMERS["wan"]()
    _, eager = captured(model, kwargs)
    compiled = torch.compile(model)
    plain = run(compiled, kwargs)
    out, rec = captured(compiled, kwargs)
    assert rec.blocks == [0, 1] and rec.metadata["layouts"]["self"]["grid"] == [3, 4, 4]
    assert_same_maps(rec, eager, 1e-5)
    assert torch.equal(out, plain), "capture changed the compiled graph"
    # captures one inside the other both record, and the compiled model then runs as before
    with (
        attnmap.capture(compiled, reductions=("temporal",)) as outer,
        attnmap.capture(compiled, reductions=("temporal",)) as inner,
    ):
        nested = run(compiled, kwargs)
    assert torch.equal(nested, plain) and torch.equal(outer.get("temporal"), inner.get("temporal"))
    assert (outer.get("temporal") - eager.get("temporal")).abs().max().item() <= 1e-5
    assert torch.equal(run(compiled, kwargs), plain)


def test_a_compiled_model_is_compiled_once_for_its_captures_not_at_every_forward_or_capture() -> None:
    """The hooks keep no state that torch.compile would guard as a constant changing from forward to
    forward (a count did), nor ids it guards that change from capture to capture (always-called forward
    hooks did): each recompiled the graph until dynamo's recompile limit (8), and past it the model ran
    eagerly."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model, kwargs = VIDEO_TRANSFORMERS["wan"]()
    _, eager = captured(model, kwargs)
    compiled = torch.compile(model, backend="eager")
    plain = run(compiled, kwargs)
    graphs = counters["stats"]["unique_graphs"]
    with attnmap.capture(compiled, reductions=("temporal",)) as rec:
        for _ in range(10):
            assert torch.equal(run(compiled, kwargs), plain)
            rec.step()
    assert rec.steps == list(range(10))
    assert counters["stats"]["unique_graphs"] - graphs <= 1, "the captured graph was compiled again and again"
    for _ in range(10):  # captures one after the other reuse that graph, and each records the eager maps
        out, rec = captured(compiled, kwargs)
        assert torch.equal(out, plain)
        assert_same_maps(rec, eager, 0.0)
    assert counters["stats"]["unique_graphs"] - graphs <= 1, "each capture compiled the graph again"


def test_a_compiled_forward_that_raises_inside_a_watched_module_leaves_no_stale_module_behind() -> None:
    """Without always-called forward hooks (see above) no hook pops a module whose forward raised; it is
    dropped when the module is entered again, and the next forwards' calls go to the right modules."""
    torch._dynamo.reset()
    model, kwargs = VIDEO_TRANSFORMERS["wan"]()
    _, clean = captured(model, kwargs)
    attn2 = model.blocks[1].attn2
    processor = attn2.processor

    def broken(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("a failing forward")

    compiled = torch.compile(model, backend="eager")
    with attnmap.capture(compiled, reductions=("cross", "temporal"), per_block=True) as rec:
        attn2.processor = broken
        with pytest.raises(RuntimeError, match="a failing forward"):
            run(compiled, kwargs)
        attn2.processor = processor
        rec.step()
        run(compiled, kwargs)
        assert not rec._interceptor.stack, "a module of the failed forward is still on the stack"
    for name in clean.names:
        for block in clean.blocks:
            got, want = rec.get(name, block=block, step=1), clean.get(name, block=block)
            # within rounding: the calls that run outside the graph again reduce in one pass
            assert torch.allclose(got, want, rtol=0, atol=1e-6), (
                f"{name} block {block} after the failed forward"
            )


def test_regional_compilation_of_the_repeated_blocks_records_the_eager_maps() -> None:
    """diffusers' ``compile_repeated_blocks()`` compiles each transformer block alone (the model is not
    wrapped): capture sees it as compiled, the output is the compiled model's, the maps are eager
    capture's, and later captures compile nothing again."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model, kwargs = VIDEO_TRANSFORMERS["wan"]()
    _, eager = captured(model, kwargs)
    model.compile_repeated_blocks(backend="eager")
    plain = run(model, kwargs)
    out, rec = captured(model, kwargs)
    assert torch.equal(out, plain)
    assert_same_maps(rec, eager, 0.0)
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(3):
        again, rec = captured(model, kwargs)
        assert torch.equal(again, plain)
        assert_same_maps(rec, eager, 0.0)
    assert counters["stats"]["unique_graphs"] == graphs, "a later capture compiled the blocks again"


def test_every_way_of_compiling_is_recognised_for_models_and_pipelines() -> None:
    from types import SimpleNamespace

    from attnmap.capture.pipeline import runs_compiled

    def fresh() -> torch.nn.Module:
        return VIDEO_TRANSFORMERS["wan"]()[0]

    plain, method, regional = fresh(), fresh(), fresh()
    method.compile(backend="eager")
    regional.compile_repeated_blocks(backend="eager")
    assert not runs_compiled(plain)
    assert (
        runs_compiled(torch.compile(plain, backend="eager"))
        and runs_compiled(method)
        and runs_compiled(regional)
    )
    assert runs_compiled(SimpleNamespace(transformer=plain, transformer_2=method))  # a pipeline's denoisers
    assert not runs_compiled(SimpleNamespace(transformer=plain))
