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
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional

import torch

from attnmap.capture.tokens import parse_targets
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


class StepWatch:
    """Calls ``advance()`` after each ``scheduler.step`` of the pipeline (its denoising steps)."""

    def __init__(self, pipe: Any, advance: Callable[[], None]) -> None:
        self._undo: list[Callable[[], None]] = []
        scheduler = getattr(pipe, "scheduler", None)
        step = getattr(scheduler, "step", None)
        if callable(step):

            @functools.wraps(step)
            def stepped(*args: Any, **kwargs: Any) -> Any:
                out = step(*args, **kwargs)
                advance()
                return out

            self._undo.append(_set(scheduler, "step", stepped))

    def close(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


class PromptWatch:
    """Strips target marks from the prompt a pipeline encodes and finds where its tokens land.

    Args:
        pipe: the pipeline (its ``encode_prompt``, ``tokenizer`` and ``text_encoder``).
        on_prompt: called with the marked prompt as the pipeline got it, before it is encoded;
            returns the clean prompt to encode instead (or None to leave it).
        on_ids: called with the ``input_ids`` ``[B, L]`` the text encoder sees and the template's
            ``crop_start`` (tokens the pipeline drops from the front of the encoder's output).
    """

    def __init__(
        self,
        pipe: Any,
        on_prompt: Callable[[str], Optional[str]],
        on_ids: Callable[[torch.Tensor, int], None],
    ) -> None:
        self._undo: list[Callable[[], None]] = []
        self._handles: list[Any] = []
        self.crop = 0
        encode = getattr(pipe, "encode_prompt", None)
        if callable(encode):
            self._undo.append(_set(pipe, "encode_prompt", self._wrap(encode, on_prompt)))
        encoder = getattr(pipe, "text_encoder", None)
        if isinstance(encoder, torch.nn.Module):

            def seen(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                ids = args[0] if args else kwargs.get("input_ids")
                if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point():
                    on_ids(ids, self.crop)

            self._handles.append(encoder.register_forward_pre_hook(seen, with_kwargs=True))

    def _wrap(
        self, encode: Callable[..., Any], on_prompt: Callable[[str], Optional[str]]
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
            template = bound.arguments.get("prompt_template")
            if template is None and "prompt_template" in signature.parameters:
                template = signature.parameters["prompt_template"].default
            crop = template.get("crop_start") if isinstance(template, Mapping) else None
            self.crop = int(crop) if isinstance(crop, int) and not isinstance(crop, bool) else 0
            prompt = bound.arguments.get("prompt")
            if isinstance(prompt, str):
                clean = on_prompt(prompt)
                if clean is not None:
                    bound.arguments["prompt"] = clean
            elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
                cleaned = [on_prompt(p) if i == 0 else parse_targets(p)[0] for i, p in enumerate(prompt)]
                bound.arguments["prompt"] = [c if c is not None else p for c, p in zip(cleaned, prompt)]
            return encode(*bound.args, **bound.kwargs)

        return encode_prompt

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def find_run(haystack: list[int], needle: list[int]) -> Optional[int]:
    """The first position of ``needle`` as a run inside ``haystack`` (None when absent or empty)."""
    n = len(needle)
    if not n:
        return None
    for i in range(len(haystack) - n + 1):
        if haystack[i : i + n] == needle:
            return i
    return None
