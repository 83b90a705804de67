"""attnmap.capture.interception alone: each entry point emits the q and k the model used, in the SDPA
layout, for the innermost watched module; the model's call is unchanged; everything is put back."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
import torch

import attnmap
from attnmap.capture.interception import Intercepted, Interceptor, Site
from tiny_models import videomae, wan

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


class Outer(torch.nn.Module):
    """An attention module around another: the inner one makes the call."""

    def __init__(self, call: Any) -> None:
        super().__init__()
        self.inner = Inner(call)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.inner(q, k)


class Inner(torch.nn.Module):
    def __init__(self, call: Any) -> None:
        super().__init__()
        self.call = call

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.call(q, k)
        return out


def watch(model: torch.nn.Module) -> tuple[Interceptor, list[tuple[str, Intercepted]]]:
    seen: list[tuple[str, Intercepted]] = []
    sites = [Site(n or "<root>", m, i) for i, (n, m) in enumerate(model.named_modules())]
    return Interceptor(sites, lambda site, call: seen.append((site.name, call))), seen


def test_sdpa_calls_positional_or_keyword_belong_to_the_innermost_module() -> None:
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 5, 4)
    for call in (
        lambda q, k: torch.nn.functional.scaled_dot_product_attention(q, k, k, None, 0.0, False, scale=0.5),
        lambda q, k: torch.nn.functional.scaled_dot_product_attention(query=q, key=k, value=k, scale=0.5),
    ):
        model = Outer(call)
        interceptor, seen = watch(model)
        with interceptor:
            out = model(q, k)
        assert torch.equal(out, model(q, k))
        [(name, got)] = seen
        assert name == "inner" and got.entry == "sdpa" and got.scale == 0.5 and got.index == 0
        assert got.query is q and got.key is k


def dispatcher_module(backend: str) -> types.ModuleType:
    """A module that imported diffusers' dispatcher by name, as diffusers' transformer files do."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    module = types.ModuleType("attnmap_test_processor")
    module.dispatch_attention_fn = dispatch_attention_fn  # type: ignore[attr-defined]
    module.backend = backend  # type: ignore[attr-defined]
    return module


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")
@pytest.mark.parametrize(
    ("backend", "entry"), [("flex", "diffusers:flex"), ("native", "sdpa"), ("_native_math", "sdpa")]
)
def test_the_diffusers_dispatcher_is_seen_where_it_is_looked_up_for_every_backend(
    backend: str, entry: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = dispatcher_module(backend)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    original = module.dispatch_attention_fn
    q, k = torch.randn(1, 6, 2, 4), torch.randn(1, 5, 2, 4)  # diffusers' [B, S, H, D]

    def call(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = module.dispatch_attention_fn(q, k, k, backend=module.backend)
        return out

    model = Outer(call)
    plain = model(q, k)
    interceptor, seen = watch(model)
    with interceptor:
        assert module.dispatch_attention_fn is not original
        out = model(q, k)
    assert module.dispatch_attention_fn is original
    assert torch.equal(out, plain)
    [(name, got)] = seen  # once, at the dispatcher or (for backends that call it) at SDPA
    assert name == "inner" and got.entry == entry
    assert torch.equal(got.query, q.transpose(1, 2)) and torch.equal(got.key, k.transpose(1, 2))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")
def test_a_block_mask_is_read_as_key_padding_when_every_query_block_keeps_the_same_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torch.nn.attention.flex_attention import BlockMask

    from attnmap.capture.interception import unreadable

    module = dispatcher_module("flex")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    q, k = torch.randn(1, 256, 2, 8), torch.randn(1, 200, 2, 8)  # 2 query and 2 key blocks of 128

    def blocks(kept: list[list[int]]) -> BlockMask:  # per query block, the key blocks it keeps
        rows = [row + [b for b in (0, 1) if b not in row] for row in kept]  # the kept ones first
        indices = torch.tensor([[rows]], dtype=torch.int32)
        counts = torch.tensor([[[len(row) for row in kept]]], dtype=torch.int32)
        return BlockMask.from_kv_blocks(counts, indices, seq_lengths=(256, 200))

    for kept, keys in (([[0], [0]], 128), ([[0, 1], [1, 0]], 200), ([[0], [1]], None)):
        mask = blocks(kept)
        model = Outer(lambda q, k, m=mask: module.dispatch_attention_fn(q, k, k, attn_mask=m, backend="flex"))
        interceptor, seen = watch(model)
        with interceptor:
            model(q, k)
        [(_, got)] = seen
        if keys is None:  # the queries' blocks keep other keys: a sparse pattern, not key padding
            assert unreadable(got.attn_mask)
        else:
            assert got.attn_mask is not None and got.attn_mask.shape == (1, 1, 1, 200)
            assert int(got.attn_mask.sum()) == keys and bool(got.attn_mask[..., :keys].all())


def test_transformers_attention_functions_and_eager_attention_are_seen_and_put_back() -> None:
    from transformers.modeling_utils import AttentionInterface
    from transformers.models.videomae import modeling_videomae

    before = dict(AttentionInterface._global_mapping)
    eager_before = modeling_videomae.eager_attention_forward
    model, kwargs = videomae(attn="eager")
    sites = [
        Site(n, m, int(n.split(".")[2]))
        for n, m in model.named_modules()
        if n.endswith("attention.attention")
    ]
    seen: list[tuple[str, Intercepted]] = []
    with torch.no_grad():
        plain = model(**kwargs, output_attentions=True)
        with Interceptor(sites, lambda site, call: seen.append((site.name, call))):
            assert AttentionInterface._global_mapping["flex_attention"] is not before["flex_attention"]
            out = model(**kwargs, output_attentions=True)
    assert (
        AttentionInterface._global_mapping == before
        and modeling_videomae.eager_attention_forward is eager_before
    )
    assert torch.equal(out.last_hidden_state, plain.last_hidden_state)
    assert [(n, c.entry) for n, c in seen] == [(s.name, "transformers:eager") for s in sites]
    for (_, call), probs in zip(seen, plain.attentions):
        logits = (call.query.double() @ call.key.double().transpose(-1, -2)) * call.scale
        assert torch.allclose(torch.softmax(logits, -1), probs.double(), atol=1e-6)


@pytest.mark.filterwarnings(
    "ignore:flex_attention called without torch.compile:UserWarning",
    "ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning",  # transformers compiling flex
)
@pytest.mark.parametrize("impl", ["eager", "flex_attention"])
def test_transformers_attention_implementations_are_captured_like_sdpa(impl: str) -> None:
    sdpa, kwargs = videomae(attn="sdpa")
    other, _ = videomae(attn=impl)
    with torch.no_grad():
        plain = other(**kwargs).last_hidden_state
        with attnmap.capture(sdpa, reductions=("temporal", "received"), per_block=True) as a:
            sdpa(**kwargs)
        with attnmap.capture(other, reductions=("temporal", "received"), per_block=True) as b:
            out = other(**kwargs).last_hidden_state
    assert torch.equal(plain, out)
    assert a.metadata["entry_points"] == ["sdpa"] and b.metadata["entry_points"] == [f"transformers:{impl}"]
    for name in ("temporal", "received"):
        for block in (0, 1):
            assert torch.allclose(a.get(name, block=block), b.get(name, block=block), atol=1e-6)


def test_nested_interceptors_both_see_each_call_and_unwind() -> None:
    model, kwargs = wan()
    depth = torch._C._len_torch_function_stack()
    outer, seen_outer = watch(model)
    inner, seen_inner = watch(model)
    with torch.no_grad(), outer, inner:
        model(**kwargs)
    assert len(seen_outer) == len(seen_inner) == 4
    assert [n for n, _ in seen_outer] == [
        "blocks.0.attn1",
        "blocks.0.attn2",
        "blocks.1.attn1",
        "blocks.1.attn2",
    ]
    assert torch._C._len_torch_function_stack() == depth
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_modules_that_run_attention_attnmap_cannot_see_are_named_when_the_capture_closes() -> None:
    model, kwargs = wan()

    class HandMade:  # attention by hand: no entry point attnmap watches
        def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
            out: torch.Tensor = attn.to_out[0](attn.to_v(hidden_states))
            return out

    for block in model.blocks:
        block.attn1.set_processor(HandMade())
    with pytest.warns(UserWarning) as caught:
        with attnmap.capture(model, reductions=("cross",)) as rec, torch.no_grad():
            model(**kwargs)
    [warning] = [str(w.message) for w in caught]
    assert warning.startswith(
        "attnmap.capture: 2 watched attention module(s) of WanTransformer3DModel ran but produced no map: "
        "'blocks.0.attn1', 'blocks.1.attn1' (attention backend in force: diffusers native; entry points seen: sdpa)."
    )
    assert "dispatch_attention_fn" in warning and "set_attention_backend" in warning
    assert rec.names == ["cross"]  # the other modules still recorded


def test_packed_sequences_of_a_transformers_varlen_call_are_one_row_each() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    def packed(module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, **kw: Any) -> Any:
        return v, None  # stands for flash-attn's varlen kernel: attnmap only reads its q, k and offsets

    class Packed(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            fn = ALL_ATTENTION_FUNCTIONS["attnmap_varlen"]
            cu = torch.tensor([0, 3, 7])
            out, _ = fn(self, q, k, k, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, scaling=0.25)
            return out  # type: ignore[no-any-return]

    AttentionInterface.register("attnmap_varlen", packed)
    try:
        model = Packed()
        interceptor, seen = watch(model)
        q, k = torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4)  # [1, H, 3 + 4 tokens, D]
        with interceptor:
            model(q, k)
    finally:
        del AttentionInterface._global_mapping["attnmap_varlen"]
    assert [(c.entry, tuple(c.query.shape), c.scale) for _, c in seen] == [
        ("transformers:attnmap_varlen:varlen", (1, 2, 3, 4), 0.25),
        ("transformers:attnmap_varlen:varlen", (1, 2, 4, 4), 0.25),
    ]
    assert torch.equal(seen[1][1].key, k[:, :, 3:])
