"""Each call placed once, per batch row: rows that differ are each read over their own text.

The cases that were silently wrong: the prompt branch of a batched-CFG pipeline cut to the negative
prompt's length (LTX), a one-row call over a padded text trimmed to its real tokens (Mochi), a text
as long as the video (Wan 2.2 TI2V-5B), video cubes beside cross-attention. Every map is checked
against a float64 softmax of the q, k and mask the entry point saw.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import attnmap
from tiny_models import AttentionLog, ltx_pipeline, mochi, softmax64, wan, wan22_ti2v, wan_pipeline

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

ARGS = {"num_frames": 9, "height": 32, "width": 32, "num_inference_steps": 2, "output_type": "pt"}


def close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float = 2e-6) -> None:
    """Equal within ``atol``, NaN exactly where the reference is NaN."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaN at other places than the reference's"
    err = (got.double() - want.double()).nan_to_num(nan=0.0).abs().max().item()
    assert err <= atol, f"{name}: max abs error {err:.3g} > {atol}"


def own_text(cross: torch.Tensor, reals: list[int]) -> torch.Tensor:
    """Rows' cross maps over their own real tokens, NaN past them, as wide as the longest."""
    out = cross[..., : max(reals)].clone()
    for i, n in enumerate(reals):
        out[i, ..., n:] = float("nan")
    return out


def step_mean(calls: list[tuple[str, Any, Any, Any, Any]]) -> torch.Tensor:
    """The head and block mean of the float64 probabilities of one step's calls: [B, Nq, Nk]."""
    return torch.stack([softmax64(q, k, m, s).mean(1) for _, q, k, m, s in calls]).mean(0)


@pytest.mark.parametrize(
    ("prompts", "negative", "reals", "negative_reals"),
    [
        (["a (cat) on a mat"], "", [6], [1]),
        (["a (cat) on a mat"], "the red ball", [6], [4]),
        (["a (cat) on a mat", "the (dog) runs in garden"], None, [6, 6], [1, 1]),
        (["a (cat) runs", "the red (dog) on a mat in garden"], "blue sky", [4, 9], [3, 3]),
    ],
    ids=["negative-empty", "negative-longer", "batch-of-two", "batch-of-two-lengths"],
)
def test_batched_guidance_reads_each_row_over_its_own_prompt(
    prompts: list[str], negative: Any, reals: list[int], negative_reals: list[int]
) -> None:
    """LTX stacks [negative, prompt] rows and masks each row's padding: the prompt rows were cut to
    the negative prompt's real length. Each row's cross map is now its own real tokens (NaN past
    them), each word map comes from its own prompt."""
    pipe = ltx_pipeline()
    clean = [p.replace("(", "").replace(")", "") for p in prompts]
    plain = pipe(clean if len(prompts) > 1 else clean[0],
                 negative_prompt=negative, max_sequence_length=16, generator=torch.Generator().manual_seed(0),
                 **ARGS).frames  # fmt: skip
    log = AttentionLog(pipe.transformer, ["transformer_blocks.0.attn2"])
    with attnmap.capture(pipe, branch="both", keep_cross=True) as rec, log:
        captured = pipe(prompts if len(prompts) > 1 else prompts[0], negative_prompt=negative,
                        max_sequence_length=16, generator=torch.Generator().manual_seed(0), **ARGS).frames  # fmt: skip
    log.close()
    assert torch.equal(plain, captured)
    n = len(prompts)
    assert [r["text_len"] for r in rec.metadata["rows"]["cond"]] == reals
    assert [r["text_len"] for r in rec.metadata["rows"]["uncond"]] == negative_reals
    for step in range(2):
        p = step_mean(log.calls[step : step + 1])  # [2n, Nv, 16]: uncond rows, then cond rows
        close(f"cond cross {step}", rec.get("cross", step=step), own_text(p[n:], reals))
        close(
            f"uncond cross {step}",
            rec.get("cross", step=step, branch="uncond"),
            own_text(p[:n], negative_reals),
        )
        for row, prompt in enumerate(prompts):
            for word, index in rec.metadata["rows"]["cond"][row]["targets"].items():
                assert f"({word})" in prompt
                got = rec.get(f"token/{word}", step=step)
                close(f"{word} row {row}", got[row], p[n + row][..., index].sum(-1).reshape(3, 8, 8))
                others = [r for r, q in enumerate(prompts) if f"({word})" not in q]
                assert all(got[r].isnan().all() for r in others), f"{word}: rows without it must be NaN"


@pytest.mark.filterwarnings("ignore:In CPU autocast")
def test_a_one_row_call_over_a_padded_text_trimmed_to_its_real_tokens_is_a_joint_call() -> None:
    """Mochi calls attention per row over [video, that row's real text]; with one row and a padded
    text (12 of 16 real) the 12 text tokens were read as prefix tokens before the video."""
    model, kwargs = mochi()
    kwargs = {
        k: v[:1] if isinstance(v, torch.Tensor) and v.shape[:1] == (2,) else v for k, v in kwargs.items()
    }
    kwargs["encoder_attention_mask"] = torch.arange(16)[None] < 12
    names = ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    log = AttentionLog(model, names)
    with attnmap.capture(model, targets={"w": [2, 3]}, keep_cross=True) as rec, log:
        with torch.no_grad():
            model(**kwargs)
    log.close()
    nv = 2 * 4 * 4
    p = step_mean(log.calls)  # [1, 44, 44]: video first, then the 12 real text tokens
    assert p.shape[-1] == nv + 12
    close("cross", rec.get("cross"), p[:, :nv, nv:])
    close("token", rec.get("token/w"), p[:, :nv, nv + 2 : nv + 4].sum(-1).reshape(1, 2, 4, 4))
    pv = p[:, :nv, :nv].reshape(1, 2, 16, 2, 16).sum(-1).mean(2)
    close("temporal", rec.get("temporal"), pv)


def test_a_text_as_long_as_the_video_is_cross_attention_when_the_module_was_given_it() -> None:
    """Wan 2.2 TI2V-5B's tiny config with 32 text tokens and 32 video tokens: the attn2 calls have the
    shapes of self-attention; the module was given encoder_hidden_states, so they are cross calls."""
    model, kwargs = wan22_ti2v()
    kwargs["encoder_hidden_states"] = torch.randn(1, 32, 16)
    log = AttentionLog(model, ["blocks.0.attn1", "blocks.0.attn2", "blocks.1.attn1", "blocks.1.attn2"])
    with attnmap.capture(model, keep_cross=True, per_block=True) as rec, log:
        with torch.no_grad():
            model(**kwargs)
    log.close()
    assert set(rec.metadata["layouts"]) == {"self", "cross"}
    for block in range(2):
        (_, *self_call), (_, *cross_call) = log.calls[2 * block : 2 * block + 2]
        close(f"cross {block}", rec.get("cross", block=block), softmax64(*cross_call).mean(1))
        p = softmax64(*self_call).mean(1)
        close(
            f"temporal {block}", rec.get("temporal", block=block), p.reshape(1, 2, 16, 2, 16).sum(-1).mean(2)
        )


def test_a_text_as_long_as_the_video_with_nothing_to_tell_is_warned_not_guessed() -> None:
    """A module that takes no encoder_hidden_states gives no word on where its keys came from: a call
    whose keys are as many as the video's and the text's tokens is skipped with a warning."""

    class Attention(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = Attention()

        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
            q = hidden_states.flatten(2).transpose(1, 2).reshape(1, 2, 12, -1)
            return self.attn(q, q, q)

    model = Model()
    x = torch.randn(1, 8, 3, 2, 2)  # grid (3, 2, 2): 12 video tokens
    with pytest.warns(UserWarning, match=r"self-attention or cross-attention to the 12 text tokens\?"):
        with attnmap.capture(model, reductions=("temporal",)) as rec:
            model(x, torch.randn(1, 12, 4))
    assert rec.names == []


def test_video_cubes_apply_to_the_calls_with_video_keys_and_skip_cross_calls_with_one_note() -> None:
    model, kwargs = wan()
    log = AttentionLog(model, ["blocks.0.attn1", "blocks.1.attn1"])
    with pytest.warns(UserWarning, match=r"blocks with video cubes \(1, 2, 2\) \(no video keys\): not read on the calls of 'blocks.0.attn2', 'blocks.1.attn2'"):  # fmt: skip
        with attnmap.capture(model, reductions=("blocks", "entropy"), block_size=(1, 2, 2)) as rec, log:
            with torch.no_grad():
                model(**kwargs)
    log.close()
    p = step_mean(log.calls)  # [1, 48, 48], grid (3, 4, 4): cubes of 1 x 2 x 2 tokens
    cube = (torch.arange(48) // 16) * 4 + ((torch.arange(48) % 16) // 8) * 2 + (torch.arange(48) % 4) // 2
    onehot = torch.nn.functional.one_hot(cube, 12).double()
    want = (onehot.T @ p[0] @ onehot) / onehot.sum(0)[:, None]
    close("blocks", rec.get("blocks")[0], want)
    assert "entropy/text" in rec.names  # the cross calls get what applies to them


def test_each_video_of_a_batch_is_stored_with_its_own_prompt_words_and_text_length(tmp_path: Any) -> None:
    pipe = wan_pipeline()
    with attnmap.capture(pipe, store=tmp_path, video_id=["one", "two"], keep_cross=True) as rec:
        pipe(["a (cat) on a mat", "the (dog) runs"], negative_prompt="blue sky", **ARGS)
    store = attnmap.open_store(tmp_path)
    one, two = store.metadata("one"), store.metadata("two")
    assert (one["prompt"], one["targets"], one["text_len"]) == ("a cat on a mat", {"cat": [1]}, 6)
    assert (two["prompt"], two["targets"], two["text_len"]) == ("the dog runs", {"dog": [1]}, 4)
    names = set(store.names("one", step=0))
    assert names >= {"token/cat", "cross"} and "token/dog" not in names
    assert store.load("two", "cross", step=0).shape == (12, 4)  # its own 4 real tokens, no NaN columns
    assert not torch.from_numpy(store.load("two", "cross", step=0)).isnan().any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rec.tokens == ["cat", "dog"]


def _masks(b: int, h: int, nq: int, nk: int) -> dict[str, torch.Tensor]:
    """The mask forms the families pass, each keeping keys 0..5 of row 0 and 0..3 of row 1."""
    keep = torch.zeros(b, nk, dtype=torch.bool)
    keep[0, :6], keep[1, :4] = True, True
    additive = torch.zeros(b, nk).masked_fill(~keep, -10000.0)  # LTX's -10000, not -inf
    return {
        "bool [B, 1, 1, Nk]": keep[:, None, None, :],
        "additive [B, 1, 1, Nk]": additive[:, None, None, :],
        "bool [B, H, 1, Nk]": keep[:, None, None, :].expand(b, h, 1, nk),
        "bool [B, 1, Nq, Nk]": keep[:, None, None, :].expand(b, 1, nq, nk),
        "additive [B, H, Nq, Nk]": additive[:, None, None, :].expand(b, h, nq, nk).contiguous(),
    }


@pytest.mark.parametrize("form", list(_masks(2, 2, 12, 8)))
def test_every_mask_form_is_read_per_row(form: str) -> None:
    """Key padding per row, bool or additive, 2 to 4 dims broadcast as SDPA broadcasts them: each row's
    maps are its own softmax, its masked keys get nothing."""
    mask = _masks(2, 2, 12, 8)[form]

    class Attention(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, k, attn_mask=mask)

    model = Attention()
    q, k = torch.randn(2, 2, 12, 16), torch.randn(2, 2, 8, 16)
    lay = attnmap.Layout.cross((3, 2, 2), text=8)
    with attnmap.capture(model, layout=lay, reductions=("cross", "received")) as rec:
        model(q, k)
    p = softmax64(q, k, mask).mean(1)
    close("cross", rec.get("cross"), p)  # an explicit layout: every key is the row's text
    close("received", rec.get("received/text"), p.mean(1))
    assert torch.equal(rec.get("cross")[:, :, 6:] == 0, torch.ones(2, 12, 2, dtype=torch.bool))
