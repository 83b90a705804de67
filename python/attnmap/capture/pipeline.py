"""Pipelines: capture a diffusers pipeline the way it is called, ``pipe("a (cat) on a mat", ...)``.

- :func:`split_pipeline` finds a pipeline's denoisers (``transformer``, Wan 2.2's ``transformer_2``
  ...); :func:`vae_stride` reads its VAE factors whatever the pipeline calls them
  (``vae_scale_factor_temporal``, LTX's ``vae_temporal_compression_ratio`` ...).
- :class:`PromptWatch` wraps the pipeline's ``encode_prompt``: it strips the target parentheses from
  the prompt the pipeline encodes (and finds the targets there), reads a prompt template's
  ``crop_start``, and, from the ids the text encoder sees, where the prompt's tokens sit once the
  template wrapped it, so that ``token/<word>`` is that word.
- :class:`StepWatch` advances the capture's step at each ``scheduler.step``.
- :func:`watch_cache_context` reads the branch name of diffusers' ``cache_context("cond" / "uncond")``.

Each patch is an instance attribute, removed on close. Private to :mod:`attnmap.capture`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from attnmap.capture.tokens import run_positions
from attnmap.errors import AttnmapError

DENOISERS = ("transformer", "transformer_2", "transformer_3", "unet")


def split_pipeline(model: Any) -> tuple[Any, list[tuple[str, torch.nn.Module]]]:
    """``(pipeline or None, [(attribute, denoiser)])``: a diffusers pipeline's transformer(s) or the
    model itself (attribute ``""``)."""
    if isinstance(model, torch.nn.Module):
        return None, [("", _uncompiled(model))]
    nets = [
        (n, _uncompiled(m)) for n in DENOISERS if isinstance(m := getattr(model, n, None), torch.nn.Module)
    ]
    if not nets:
        raise AttnmapError(
            f"model must be a torch.nn.Module or a diffusers pipeline with a transformer, got {type(model).__name__}"
        )
    return model, nets


def runs_compiled(model: Any) -> bool:
    """Whether a model (or a pipeline's denoisers), or one of its submodules, runs through torch.compile
    (``torch.compile(m)``, ``m.compile()``, diffusers' ``compile_repeated_blocks()``)."""
    nets = [model] if isinstance(model, torch.nn.Module) else [getattr(model, n, None) for n in DENOISERS]
    return any(
        isinstance(getattr(net, "_orig_mod", None), torch.nn.Module)
        or any(getattr(m, "_compiled_call_impl", None) is not None for m in net.modules())
        for net in nets
        if isinstance(net, torch.nn.Module)
    )


def _uncompiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module that ``torch.compile(module)`` wraps (its hooks and names are the model's own)."""
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) else module


def vae_stride(pipe: Any) -> Optional[tuple[Optional[int], Optional[int]]]:
    """A pipeline's own VAE factors ``(temporal, spatial)``, from whichever of its attributes name them
    (``vae_scale_factor_temporal`` / ``_spatial``, ``vae_temporal_compression_ratio`` /
    ``vae_spatial_compression_ratio``, ``vae_scale_factor``); None when it names none."""
    if pipe is None:
        return None
    temporal = spatial = None
    for name, value in sorted(vars(pipe).items()):
        if not name.startswith("vae") or isinstance(value, bool) or not isinstance(value, int):
            continue
        if "temporal" in name:
            temporal = value
        elif "spatial" in name or (name == "vae_scale_factor" and spatial is None):
            spatial = value
    return None if temporal is None and spatial is None else (temporal, spatial)


def _set(obj: Any, name: str, value: Any) -> Callable[[], None]:
    """Set an instance attribute past any ``__setattr__`` (diffusers' registers modules); returns the undo."""
    missing = object()
    previous = obj.__dict__.get(name, missing)
    object.__setattr__(obj, name, value)

    def restore() -> None:
        if previous is missing:
            obj.__dict__.pop(name, None)
        else:
            object.__setattr__(obj, name, previous)

    return restore


def watch_cache_context(
    core: torch.nn.Module, on_label: Callable[[Optional[str]], Optional[str]]
) -> Optional[Callable[[], None]]:
    """Wrap ``core.cache_context`` so that ``on_label(name)`` hears each branch name on entry and the
    previous label (what it returned) on exit (Wan and HunyuanVideo run the CFG branches as separate
    forwards inside it). Returns the undo, or None for a model without it."""
    original = getattr(core, "cache_context", None)
    if original is None:
        return None

    @contextlib.contextmanager
    def cache_context(name: str, *args: Any, **kwargs: Any) -> Iterator[None]:
        previous = on_label(name)
        try:
            with original(name, *args, **kwargs):
                yield
        finally:
            on_label(previous)

    return _set(core, "cache_context", cache_context)


class _Stepped:
    """A scheduler's ``step`` that calls ``advance()`` after it. A copy of the scheduler (LTX-2 deep-copies
    its scheduler for the audio stream) gets its own plain ``step``: never this one, which would step
    the watched scheduler and advance the capture for the copy's steps."""

    def __init__(self, scheduler: Any, step: Callable[..., Any], advance: Callable[[], None]) -> None:
        self.scheduler, self.step, self.advance = scheduler, step, advance
        functools.update_wrapper(self, step)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.step(*args, **kwargs)
        self.advance()
        return out

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        copy = memo.get(id(self.scheduler))  # the scheduler's copy, made before its attributes
        return None if copy is None else type(copy).step.__get__(copy)


class StepWatch:
    """Calls ``advance()`` after each ``scheduler.step`` of the pipeline (its denoising steps)."""

    def __init__(self, pipe: Any, advance: Callable[[], None]) -> None:
        self._undo: list[Callable[[], None]] = []
        scheduler = getattr(pipe, "scheduler", None)
        step = getattr(scheduler, "step", None)
        if callable(step):
            self._undo.append(_set(scheduler, "step", _Stepped(scheduler, step, advance)))

    def close(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


@dataclass(frozen=True)
class Prompt:
    """One prompt a pipeline encoded, as its denoiser sees it: the clean text, its target words'
    token indices, its real (unpadded) tokens (None: unknown)."""

    text: str
    targets: tuple[tuple[str, tuple[int, ...]], ...] = ()
    real: Optional[int] = None


class PromptBook:
    """The prompt embeddings a pipeline's ``encode_prompt`` returned, row by row, to tell which prompt
    each batch row of a denoiser forward holds (its text input equals that row of them)."""

    def __init__(self) -> None:
        self._entries: list[tuple[torch.Tensor, list[Prompt], bool]] = []

    def __bool__(self) -> bool:
        return bool(self._entries)

    def add(self, embeds: torch.Tensor, prompts: list[Prompt], negative: bool) -> None:
        """``embeds`` [n, L, D] whose row i holds ``prompts[i]``, the pipeline's negative prompts or not."""
        self._entries.append((embeds.detach(), prompts, negative))

    def match(self, text: torch.Tensor) -> list[Optional[tuple[Prompt, bool]]]:
        """The prompt of each row of a denoiser's text input ``[B, L, D]``, and whether it is a negative
        prompt (None: no encoded row equals it)."""
        rows = text.detach()
        out: list[Optional[tuple[Prompt, bool]]] = [None] * int(rows.shape[0])
        for embeds, prompts, negative in reversed(self._entries):  # the latest encoding first
            if embeds.shape[1:] != rows.shape[1:] or all(o is not None for o in out):
                continue
            cast = embeds.to(device=rows.device, dtype=rows.dtype)
            # [B, n]: row b equals encoded row i; one transfer for the whole batch
            equal = (cast[None] == rows[:, None]).flatten(2).all(2).tolist()
            for b, hits in enumerate(equal):
                if out[b] is None and True in hits:
                    out[b] = (prompts[hits.index(True)], negative)
        return out


class PromptWatch:
    """Strips target marks from the prompts a pipeline encodes and finds where their tokens land.

    Args:
        pipe: the pipeline (its ``encode_prompt``, ``tokenizer`` and ``text_encoder``).
        on_prompts: called with the marked prompts as the pipeline got them (then, flagged, its
            negative prompts), before they are encoded; returns the clean prompts to encode instead.
        on_ids: called with the ``input_ids`` ``[B, L]`` the text encoder saw, the template's
            ``crop_start`` (tokens the pipeline drops from the front of the encoder's output) and the
            encoder's hidden states ``[B, L, D]`` (its last, then each layer's, newest first).
        on_encoded: called after each ``encode_prompt`` with its lists of clean prompts, each with
            whether they are negative prompts (the prompts, then the negative prompts where it takes
            them), the videos per prompt and what it returned.
    """

    def __init__(
        self,
        pipe: Any,
        on_prompts: Callable[[list[str], bool], list[str]],
        on_ids: Callable[[torch.Tensor, int, list[torch.Tensor]], None],
        on_encoded: Callable[[list[tuple[list[str], bool]], int, Any], None],
    ) -> None:
        self._undo: list[Callable[[], None]] = []
        self._handles: list[Any] = []
        self.crop = 0
        encode = getattr(pipe, "encode_prompt", None)
        if callable(encode):
            self._undo.append(_set(pipe, "encode_prompt", self._wrap(encode, on_prompts, on_encoded)))
        encoder = getattr(pipe, "text_encoder", None)
        if isinstance(encoder, torch.nn.Module):

            def seen(
                module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
            ) -> None:
                ids = args[0] if args else kwargs.get("input_ids")
                if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point():
                    on_ids(ids, self.crop, _hidden_states(out, ids.shape))

            self._handles.append(encoder.register_forward_hook(seen, with_kwargs=True))

    def _wrap(
        self,
        encode: Callable[..., Any],
        on_prompts: Callable[[list[str], bool], list[str]],
        on_encoded: Callable[[list[tuple[list[str], bool]], int, Any], None],
    ) -> Callable[..., Any]:
        try:
            signature: Optional[inspect.Signature] = inspect.signature(encode)
        except (TypeError, ValueError):
            signature = None

        @functools.wraps(encode)
        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            if signature is None:
                return encode(*args, **kwargs)
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                return encode(*args, **kwargs)
            bound.apply_defaults()
            given = bound.arguments
            template = given.get("prompt_template")
            crop = template.get("crop_start") if isinstance(template, Mapping) else None
            self.crop = int(crop) if isinstance(crop, int) and not isinstance(crop, bool) else 0
            asked = _negative_call(given, sys._getframe(1).f_locals)
            clean = {}
            for name in ("prompt", "negative_prompt"):
                value = given.get(name)
                texts = [value] if isinstance(value, str) else value
                if isinstance(texts, (list, tuple)) and texts and all(isinstance(p, str) for p in texts):
                    clean[name] = on_prompts(list(texts), asked or name == "negative_prompt")
                    given[name] = clean[name][0] if isinstance(value, str) else clean[name]
            out = encode(*bound.args, **bound.kwargs)
            per = given.get("num_videos_per_prompt", given.get("num_images_per_prompt", 1))
            per = per if isinstance(per, int) and not isinstance(per, bool) and per > 0 else 1
            if "prompt" in clean:
                lists = [(clean["prompt"], asked)]
                negative = clean.get("negative_prompt")
                if negative is None and "negative_prompt" in given:  # pipelines encode None as ""
                    negative = [""] * len(clean["prompt"])
                if negative is not None:
                    n = len(clean["prompt"])
                    lists.append((negative * n if len(negative) == 1 < n else negative, True))
                on_encoded(lists, per, out)
            return out

        return encode_prompt

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


#: Pipeline modules between the text encoder and the denoiser, by class name: their output rows hold
#: their input rows' prompts, each row's real tokens (by the mask they are given) moved to the front in
#: order (LTX-2's text connectors fill the rest with learnt registers, diffusers' connectors.py).
RELAYS = frozenset({"LTX2TextConnectors"})


def watch_relays(
    pipe: Any, on_relay: Callable[[torch.Tensor, torch.Tensor, Any], None]
) -> Callable[[], None]:
    """Call ``on_relay(embeddings, mask, outputs)`` after each forward of a pipeline's relay module
    (:data:`RELAYS`); returns the undo."""
    handles = []
    for value in list(vars(pipe).values()):
        if isinstance(value, torch.nn.Module) and type(value).__name__ in RELAYS:

            def seen(
                module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
            ) -> None:
                names = list(inspect.signature(module.forward).parameters)
                given = {**dict(zip(names, args)), **kwargs}
                embeds, mask = (given.get(n) for n in names[:2])
                if isinstance(embeds, torch.Tensor) and isinstance(mask, torch.Tensor) and mask.dim() == 2:
                    on_relay(embeds.flatten(2) if embeds.dim() == 4 else embeds, mask, out)

            handles.append(value.register_forward_hook(seen, with_kwargs=True))

    def undo() -> None:
        for handle in handles:
            handle.remove()

    return undo


def relayed(prompt: Prompt, mask: torch.Tensor) -> Prompt:
    """``prompt`` once a relay moved the real tokens of its row (``mask`` [L] nonzero) to the front."""
    kept = {int(p): j for j, p in enumerate(mask.nonzero().flatten().tolist())}
    targets = tuple((w, tuple(kept[p] for p in ps)) for w, ps in prompt.targets if all(p in kept for p in ps))
    return Prompt(prompt.text, targets, len(kept))


def _negative_call(given: Mapping[str, Any], caller: Mapping[str, Any]) -> bool:
    """Whether an ``encode_prompt`` that takes no negative prompt encodes the pipeline's negative
    prompts as its ``prompt``: the calling ``__call__`` passed its own ``negative_prompt`` (Kandinsky 5,
    HunyuanVideo encode them in a call of their own)."""
    if "negative_prompt" in given:
        return False
    prompt, negative = given.get("prompt"), caller.get("negative_prompt")
    if negative is None or prompt is None:
        return False
    return prompt is negative or (prompt == negative and caller.get("prompt") != prompt)


def _hidden_states(out: Any, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """A text encoder's outputs ``[B, L, D]``: its last hidden state, then each layer's (newest first),
    where a pipeline may take its text embeddings from."""
    found: list[torch.Tensor] = []
    first = out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)
    layers = out.get("hidden_states") if isinstance(out, Mapping) else getattr(out, "hidden_states", None)
    for t in [first, *reversed(list(layers or ()))]:
        if isinstance(t, torch.Tensor) and t.dim() == 3 and tuple(t.shape[:2]) == tuple(shape):
            if not any(t is f for f in found):
                found.append(t.detach())
    return found


def align_prompt(
    prompt: Prompt,
    text: torch.Tensor,
    ids: list[int],
    outputs: list[torch.Tensor],
    at: dict[str, tuple[int, ...]],
    pad: Any,
) -> Prompt:
    """``prompt`` as one row ``text`` [L, D] of the embeddings a pipeline made of it says: each position
    of ``text`` that is one of the encoder's outputs ``[N, D]`` (as given, or cast) comes from that
    encoder position, whatever the pipeline cut or picked (a template's crop, a first token and the
    last L - 1); the words (``at``: their encoder positions) and the real tokens (not ``pad``) follow.
    Unchanged where no output explains the row (the pipeline transformed its embeddings)."""
    best: Optional[list[int]] = None
    probe = torch.randn(text.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    probe = probe.to(text.device)
    for output in outputs:
        if output.shape[-1] != text.shape[-1]:  # projected before the denoiser: nothing to find
            continue
        cand = output.to(device=text.device, dtype=text.dtype)
        index: dict[float, list[int]] = {}  # equal rows have equal keys: only those are compared
        for p, key in enumerate((cand.double() @ probe).tolist()):
            index.setdefault(key, []).append(p)
        source = [
            next((p for p in index.get(key, ()) if torch.equal(cand[p], text[j])), -1)
            for j, key in enumerate((text.double() @ probe).tolist())
        ]
        if best is None or sum(p >= 0 for p in source) > sum(p >= 0 for p in best):
            best = source
    if best is None or not any(p >= 0 for p in best):
        return prompt
    where = {p: j for j, p in reversed(list(enumerate(best))) if p >= 0}
    targets = tuple((w, tuple(where[p] for p in ps)) for w, ps in at.items() if all(p in where for p in ps))
    real = sum(1 for p in best if p >= 0 and (pad is None or ids[p] != pad))
    return Prompt(prompt.text, targets, real)


def encoded_rows(
    out: Any, lists: Sequence[tuple[list[Prompt], bool]], per: int
) -> list[tuple[torch.Tensor, list[Prompt], bool]]:
    """What an ``encode_prompt`` returned, as ``(embeddings [n, L, D], the prompt of each row, whether
    they are negative prompts)``: its first 3-D float tensor holds the first list of prompts, its second
    (where it takes negative prompts) the second, each prompt repeated ``per`` times in a row
    (diffusers' ``num_videos_per_prompt``)."""
    tensors = [
        t
        for t in (out if isinstance(out, (tuple, list)) else (out,))
        if isinstance(t, torch.Tensor) and t.dim() == 3 and t.is_floating_point()
    ]
    found = []
    for embeds, (texts, neg) in zip(tensors, lists):
        n = int(embeds.shape[0])
        if n == len(texts) * per:
            found.append((embeds, [texts[i // per] for i in range(n)], neg))
        elif n == len(texts):
            found.append((embeds, list(texts), neg))
    return found


def find_run(haystack: list[int], needle: list[int]) -> Optional[int]:
    """The first position of ``needle`` as a run inside ``haystack`` (None when absent or empty)."""
    hits = run_positions(haystack, needle)
    return hits[0] if hits else None
