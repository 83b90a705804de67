"""Capture attention maps from a real model or pipeline while it runs: :func:`capture` and :class:`Recorder`.

The Recorder is a facade over the parts of :mod:`attnmap.capture`, along the data flow:
:mod:`~attnmap.capture.interception` (entry points, hooks, the module stack) emits each attention
call of a watched module; :mod:`~attnmap.capture.layouts` places its tokens from the forward's
inputs and the call's shapes; :func:`attnmap.attention_sums` reduces the same q and k the model used;
:mod:`~attnmap.capture.accumulate` keeps running means per (step, branch, name, block);
:mod:`~attnmap.capture.sinks` write finished steps (the store, auto-render);
:mod:`~attnmap.capture.pipeline` makes ``pipe("a (cat) on a mat")`` work as called.

Map names (per step; ``get`` returns them with a leading batch dim ``B``, and ``H`` after it when
``per_head``):

- ``token/<word>`` ``[B, F, H, W]``: the video tokens' attention to that word (its sub-tokens summed);
- ``cross`` ``[B, Nv, Nt]`` (the real, unpadded text tokens), ``temporal`` ``[B, F, F]``, ``text``
  ``[B, Nt, Nt]``, ``received`` ``[B, Nk]``, ``full`` ``[B, Nq, Nk]``, and any other reduction of
  :data:`attnmap.reduce.REDUCTIONS` asked for, under its own name;
- ``<name>/text`` (``received/text``, ``full/text`` ...): the other reductions of video -> text
  cross-attention calls (Wan attn2, LTX attn2), kept apart from those of self-attention;
- ``padding`` ``[B, F, H, W]``: attention mass on zero-padded text keys (Wan pads text to 512);
- ``image/<name>``, ``audio/<name>``, ``context/<name>``: cross-attention to an image context (Wan
  I2V), an audio stream (LTX-2) or keys of another length, kept apart from the text;
- ``<name>/space`` and ``<name>/time``: divided attention (Latte, TimeSformer): per frame
  ``[B, F, ...]`` and per position ``[B, HW, ...]``; ``full/space`` ``[B, F, 1+HW, 1+HW]`` and
  ``full/time`` ``[B, HW, F, F]`` feed :func:`attnmap.analysis.rollout.space_time_rollout`;
- a video LLM's ``answer`` ``[B, F, H, W]`` per answer token with ``answer/<part>`` ``[B]`` beside it,
  ``token/<word>`` for marked question words and for each generated word, ``temporal``,
  ``received`` ``[B, N]``, ``received/video`` and ``vision/<name>`` ``[B, T, Hv, Wv]`` (see
  :mod:`~attnmap.capture.vlm_reader`);
- ``uncond/<name>`` with ``branch="both"``; ``<denoiser>/<name>`` for a second denoiser kept apart
  (Wan 2.2's ``transformer_2`` with ``experts="apart"``).

Under diffusers' context parallelism (:mod:`~attnmap.capture.parallel`) every rank opens the capture
around the same run; each reads its own rows and heads, and when a step ends the ranks' maps are
added up over the context-parallel group, so that each holds the maps one process would have
captured. Only rank 0 writes ``store=``.

Example:
    >>> with attnmap.capture(pipe) as rec:  # doctest: +SKIP
    ...     pipe("a (cat) on a (mat)", num_frames=81)
    >>> rec.get("token/cat").shape  # doctest: +SKIP
    torch.Size([1, 21, 30, 52])
"""

from __future__ import annotations

import operator
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

import attnmap.capture.layouts as layouts
import attnmap.capture.parallel as parallel
import attnmap.capture.vlm as vlm
from attnmap import reduce
from attnmap.capture.accumulate import Accumulator, MapKey, Rows
from attnmap.capture.calls import CallReader
from attnmap.capture.interception import Intercepted, Interceptor, Site, diffusers_backend
from attnmap.capture.layouts import FamilySpec, VideoInputs
from attnmap.capture.pipeline import (
    Prompt,
    PromptBook,
    PromptWatch,
    StepWatch,
    align_prompt,
    encoded_rows,
    find_run,
    relayed,
    runs_compiled,
    split_pipeline,
    vae_stride,
    watch_cache_context,
    watch_relays,
)
from attnmap.capture.plan import Forward, ModelRow, Options, RowText
from attnmap.capture.sinks import Sink, StoreSink, store_sinks
from attnmap.capture.tokens import Targets, find, has_word, parse_targets, resolve
from attnmap.capture.vlm_reader import VideoLLMReader
from attnmap.config import Config
from attnmap.errors import AttnmapError
from attnmap.layout import Layout

#: The reductions capture accepts (every one of :data:`attnmap.reduce.REDUCTIONS` but ``probe``,
#: which needs query indices).
REDUCTIONS = tuple(r for r in reduce.REDUCTIONS if r != "probe")
#: What ``reductions=None`` records: a video LLM also the prefill's and the vision tower's ``received``.
DEFAULT_REDUCTIONS = ("cross", "temporal")
VLM_REDUCTIONS = ("cross", "temporal", "received")
BRANCHES = ("cond", "uncond", "both")
EXPERTS = ("merge", "apart")


@dataclass
class _Denoiser:
    """One watched denoiser: its core (the module whose forward gives the grid), spec and sites."""

    attr: str  # the pipeline attribute ("" for a model passed itself)
    core: torch.nn.Module
    spec: FamilySpec
    sites: list[Site]
    prefix: str = ""  # map name prefix (a second denoiser kept apart)
    forwards: int = 0
    everything: bool = (
        False  # every module is watched (an explicit layout on a model without attention modules)
    )
    leaves: set[str] = field(default_factory=set)  # sites with no watched module inside


def _indices(name: str, values: Optional[Iterable[int]]) -> Optional[set[int]]:
    """``blocks=`` / ``steps=`` as a set of indices >= 0 (None: all)."""
    if values is None:
        return None
    if isinstance(values, int):
        values = [values]
    out = set()
    for v in values:
        try:
            index = -1 if isinstance(v, bool) else operator.index(v)
        except TypeError:
            index = -1
        if index < 0:
            raise AttnmapError(f"{name} must be indices >= 0 (or None for all), got {v!r}")
        out.add(index)
    return out


class Recorder:
    """Accumulates the maps of one capture. Made by :func:`capture`; see its docstring.

    Reading API (stable): :meth:`get`, :attr:`names`, :attr:`steps`, :attr:`blocks`, :attr:`tokens`,
    :attr:`metadata`, :meth:`save`, plus :meth:`divided_attention`, :attr:`nbytes`.

    Attributes:
        prompt: the prompt without the target parentheses (what the model saw), or None.
        targets: ``{word: [token indices]}`` of the target words, as positions in the text the
            denoiser sees (after a prompt template and its crop).
        model_name: the watched model's class name.
    """

    def __init__(
        self,
        model: Any,
        *,
        reductions: Optional[Sequence[str]] = None,
        targets: Optional[Targets] = None,
        prompt: Union[str, Sequence[str], None] = None,
        tokenizer: Any = None,
        layout: Union[Layout, Mapping[str, Layout], None] = None,
        blocks: Optional[Iterable[int]] = None,
        steps: Optional[Iterable[int]] = None,
        per_block: bool = False,
        per_head: bool = False,
        branch: str = "cond",
        store: Union[str, Path, None] = None,
        video_id: Union[str, Sequence[str], None] = None,
        config: Optional[Config] = None,
        keep_cross: bool = False,
        metadata: Optional[Mapping[str, Any]] = None,
        backend: str = "auto",
        one_pass: Optional[bool] = None,
        block_size: Any = None,
        experts: str = "merge",
    ) -> None:
        self._given = model
        self._pipe, nets = split_pipeline(model)
        self._vlm_spec = vlm.spec_of(model) if self._pipe is None else None
        if reductions is None:
            reductions = VLM_REDUCTIONS if self._vlm_spec is not None else DEFAULT_REDUCTIONS
        if isinstance(reductions, str):
            reductions = (reductions,)
        bad = [r for r in reductions if r not in REDUCTIONS]
        if bad:
            raise AttnmapError(f"reductions {bad} are unknown; choose among {', '.join(REDUCTIONS)}")
        if branch not in BRANCHES:
            raise AttnmapError(f"branch must be one of {', '.join(BRANCHES)}, got {branch!r}")
        if experts not in EXPERTS:
            raise AttnmapError(f"experts must be one of {', '.join(EXPERTS)}, got {experts!r}")
        if config is not None and not isinstance(config, Config):
            raise AttnmapError(f"config must be an attnmap.Config, got {type(config).__name__}")
        self.config = config
        if config is not None:
            per_block = per_block or config.store_per_block
            per_head = per_head or config.store_per_head
        if tokenizer is None and self._pipe is not None:
            tokenizer = getattr(self._pipe, "tokenizer", None)
        self._tokenizer = tokenizer
        self._given_targets = targets
        # a pipeline's target words are found when it encodes its prompt
        later = (
            self._pipe is not None
            and prompt is None
            and targets is not None
            and not isinstance(targets, Mapping)
        )
        self._vlm_prompts: list[tuple[list[int], dict[str, list[int]]]] = []
        self._vlm_positions: Optional[dict[str, list[int]]] = None
        self._base_targets: dict[str, list[int]]
        if self._vlm_spec is not None:
            self.prompt, self._base_targets = self._vlm_targets(targets, prompt, tokenizer), {}
        elif prompt is not None and not isinstance(prompt, str):
            raise AttnmapError(f"prompt must be a str (a list of prompts is for video LLMs), got {prompt!r}")
        else:
            self.prompt, self._base_targets = (None, {}) if later else resolve(targets, prompt, tokenizer)
        self._prompt_seen: Optional[bool] = None
        self.reductions = tuple(dict.fromkeys(reductions))
        self.per_block, self.per_head, self.branch = bool(per_block), bool(per_head), branch
        self.backend = backend
        self.one_pass = None if one_pass is None else bool(one_pass)
        self._blocks = _indices("blocks", blocks)
        self._steps = _indices("steps", steps)
        if store is not None and video_id is None:
            raise AttnmapError("store= needs video_id= (a str, or one per batch row)")
        self._store = None if store is None else Path(store)
        self._video_ids = [video_id] if isinstance(video_id, str) else list(video_id or [])
        self._extra_meta = dict(metadata or {})
        self._explicit, explicit_all = self._check_layout(layout)
        options = Options(
            reductions=self.reductions, per_head=self.per_head, keep_cross=bool(keep_cross), backend=backend,
            block_size=block_size, layouts=self._explicit, layout=explicit_all,
        )  # fmt: skip
        self._reader = CallReader(options, warn=self._warn, add=self._add)
        self._targets: dict[str, list[int]] = dict(self._base_targets)
        self._prompts: dict[str, Prompt] = {}  # clean prompt -> as the denoiser sees it
        self._marked: dict[str, str] = (
            {parse_targets(prompt)[0]: prompt} if isinstance(prompt, str) and self._vlm_spec is None else {}
        )
        self._pending: list[str] = []  # the clean prompts of the encode_prompt running now
        # clean prompt -> (its ids, the encoder's outputs of its row, its words' encoder positions, pad id)
        self._sources: dict[str, tuple[list[int], list[torch.Tensor], dict[str, tuple[int, ...]], Any]] = {}
        self._book = PromptBook()
        self._rows_meta: dict[str, list[dict[str, Any]]] = {}  # branch -> per row: prompt, text_len, targets

        self._denoisers: list[_Denoiser] = []
        self._vlm: Optional[VideoLLMReader] = None
        if self._vlm_spec is not None:
            self._denoisers.append(self._watch_vlm(model, self._vlm_spec))
        for i, (attr, net) in enumerate(nets if self._vlm_spec is None else []):
            self._denoisers.append(self._watch(attr, net, layout is not None, experts == "apart" and i > 0))
        self._check_names()
        self._vae = vae_stride(self._pipe)
        self._current = self._denoisers[0]
        self.model_name = type(self._current.core).__name__

        self._interceptor: Optional[Interceptor] = None
        self._closers: list[Callable[[], None]] = []
        self._label: Optional[str] = None
        self._warned: set[tuple[str, str]] = set()
        self._step = 0
        self._since_step = 0  # denoiser forwards in the current step
        self._acc = Accumulator()
        self._written: set[int] = set()
        self._sinks: list[Sink] = []
        self._seen_blocks: set[int] = set()
        self._entries: set[str] = set()
        self._active = False
        self._split: Optional[parallel.Split] = None  # the model's context-parallel split, once seen
        self._combined: set[int] = set()  # steps whose maps hold every rank's
        self._uncombined: Optional[str] = None  # why the ranks' maps can no longer be combined

    # -- setting up --------------------------------------------------------------------------
    @staticmethod
    def _check_layout(layout: Any) -> tuple[dict[str, Layout], Optional[Layout]]:
        if layout is None:
            return {}, None
        if isinstance(layout, Layout):
            return {}, layout
        if isinstance(layout, Mapping):
            for name, lay in layout.items():
                if not isinstance(lay, Layout):
                    raise AttnmapError(
                        f"layout[{name!r}] must be an attnmap.Layout, got {type(lay).__name__}"
                    )
            return dict(layout), None
        raise AttnmapError(
            f"layout must be an attnmap.Layout or a mapping module name -> Layout, got {layout!r}"
        )

    def _watch(self, attr: str, net: torch.nn.Module, explicit: bool, apart: bool) -> _Denoiser:
        core_name, core = "", net
        for name, module in net.named_modules():
            if layouts.family_of(module) is not layouts.GENERIC:
                core_name, core = name, module
                break
        spec = layouts.family_of(core)
        sites = layouts.find_sites(core, spec, prefix=core_name)
        everything = not sites and explicit
        if everything:
            sites = layouts.find_sites(net, spec, everything=True)
        if not sites:
            raise AttnmapError(
                f"model {type(net).__name__} has no attention module attnmap knows how to read; "
                "pass layout=attnmap.Layout... (then every module of the model is watched)"
            )
        names = [s.name for s in sites]
        leaves = {n for n in names if not any(o.startswith(n + ".") for o in names)}
        return _Denoiser(
            attr, core, spec, sites, f"{attr}/" if apart else "", everything=everything, leaves=leaves
        )

    def _watch_vlm(self, model: torch.nn.Module, spec: vlm.VLMSpec) -> _Denoiser:
        """A video LLM: its language model's and vision tower's attention modules, read at
        transformers' attention interface by a :class:`VideoLLMReader`."""
        llm_name, vision_name = vlm.parts(model)
        modules = dict(model.named_modules())
        generic = layouts.GENERIC
        llm = layouts.find_sites(modules[llm_name], generic, prefix=llm_name)
        vision = layouts.find_sites(modules[vision_name], generic, prefix=vision_name)
        sites = llm + vision
        names = [s.name for s in sites]
        leaves = {n for n in names if not any(o.startswith(n + ".") for o in names)}
        llm = [s for s in llm if s.name in leaves]
        vision = [s for s in vision if s.name in leaves]
        for site in sites:
            site.interface = True
        self._vlm = VideoLLMReader(
            model, spec, llm=llm, vision=vision, vision_root=modules[vision_name], reductions=self.reductions,
            per_head=self.per_head, backend=self.backend, tokenizer=self._tokenizer, prompts=self._vlm_prompts,
            positions=self._vlm_positions, add=self._add, warn=self._warn, step=self._vlm_step,
            alias=self._alias,
        )  # fmt: skip
        return _Denoiser("", model, layouts.FamilySpec(family=spec.family), sites, leaves=leaves)

    def _vlm_targets(self, targets: Optional[Targets], prompt: Any, tokenizer: Any) -> Optional[str]:
        """A video LLM's marked words: ``targets`` as ``{word: sequence positions}``, or the words of
        each prompt (marked, or those of ``targets`` it holds) and their token indices among the
        prompt's own tokens, found in each batch row when the model runs. Returns the first prompt
        without its marks."""
        if prompt is None:
            prompts: list[str] = []
        elif isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, Sequence) and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise AttnmapError(f"prompt must be a str or a list of str (one per batch row), got {prompt!r}")
        if isinstance(targets, Mapping):
            self._vlm_positions = resolve(targets, None, None)[1]
            return parse_targets(prompts[0])[0] if prompts else None
        tok = getattr(tokenizer, "tokenizer", tokenizer)
        given = [targets] if isinstance(targets, str) else list(targets or [])
        for marked in prompts:
            clean, marks = parse_targets(marked)
            words = [w for w in given if has_word(clean, w.strip())]
            words = words if given else marks
            if not words:
                continue
            if tok is None:
                raise AttnmapError(
                    f"the words {words} of prompt {marked!r} need tokenizer= (the model's tokenizer or "
                    "processor) to find their tokens; or pass targets={word: [sequence positions]}"
                )
            plain = list(tok(clean, add_special_tokens=False)["input_ids"])
            special = list(tok(clean, add_special_tokens=True)["input_ids"])
            lead = find_run(special, plain) or 0
            found = find(marked, tok, words)
            self._vlm_prompts.append(
                (
                    plain,
                    {w: [i - lead for i in idx if 0 <= i - lead < len(plain)] for w, idx in found.items()},
                )
            )
        if given and not self._vlm_prompts and prompts:
            raise AttnmapError(f"targets {given} are in none of the prompts {prompts}")
        return parse_targets(prompts[0])[0] if prompts else None

    def _vlm_step(self, step: int) -> None:
        """The video LLM moved to answer step ``step`` (0: a new prompt's prefill)."""
        if step != self._step:
            self._finish_step()
            self._step = step
            self._since_step = 0

    def _alias(self, step: int, name: str, new: str, rows: list[int]) -> None:
        self._acc.alias(step, name, new, rows)  # the accumulator is made after the reader is

    def _check_names(self) -> None:
        names = {s.name for d in self._denoisers for s in d.sites}
        missing = sorted(set(self._explicit) - names)
        if missing:
            raise AttnmapError(f"layout names modules {missing} that are not attention modules of the model")
        if self._blocks is not None:
            known = sorted({s.block for d in self._denoisers for s in d.sites})
            unknown = sorted(self._blocks - set(known))
            if unknown:
                raise AttnmapError(
                    f"blocks {unknown} are not blocks of the model; its attention blocks are {known[0]}..{known[-1]}"
                )

    # -- the context -------------------------------------------------------------------------
    def __enter__(self) -> Recorder:
        if self._active:
            raise RuntimeError("this Recorder is already open; make a new one with attnmap.capture(...)")
        self._active = True
        try:
            sites = [s for d in self._denoisers for s in d.sites]
            for site in sites:
                site.entered = False
                site.seen = site.calls = 0
            roles = frozenset(r for d in self._denoisers for _, r in d.spec.roles)
            self._interceptor = Interceptor(
                sites, self._on_call, probs=self._on_probs, softmax_roles=roles, one_pass=self.one_pass,
                wants_lse=self._recording, compiled=runs_compiled(self._given),
            )  # fmt: skip
            for den in self._denoisers if self._vlm is None else []:
                handle = den.core.register_forward_pre_hook(self._core_hook(den), with_kwargs=True)
                self._closers.append(handle.remove)
                undo = watch_cache_context(den.core, self._on_label)
                if undo is not None:
                    self._closers.append(undo)
            if self._vlm is not None:
                self._vlm.open()
                self._closers.append(self._vlm.close)
            if self._pipe is not None:
                prompts = PromptWatch(self._pipe, self._on_prompts, self._on_ids, self._on_encoded)
                steps = StepWatch(self._pipe, self._on_scheduler_step)
                self._closers += [prompts.close, steps.close, watch_relays(self._pipe, self._on_relay)]
            self._interceptor.__enter__()
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._teardown()
        if exc_type is not None:
            for sink in self._sinks:
                sink.abort()
            return
        if self._prompt_seen is False:
            warnings.warn(
                f"attnmap.capture: the pipeline's text encoder never saw the tokens of {self.prompt!r}, so no "
                f"batch row holds its target words {self.targets}; pass rec.prompt (the prompt "
                "without the target parentheses) to the pipeline, or mark the targets in the prompt you pass",
                stacklevel=2,
            )
        self._warn_silent()
        self._warn_notes()
        self._finish_step()
        for sink in self._sinks:
            sink.close()

    def _teardown(self) -> None:
        if self._interceptor is not None:
            interceptor, self._interceptor = self._interceptor, None
            interceptor.close()
        for close in reversed(self._closers):
            close()
        self._closers.clear()
        self._active = False

    @property
    def _stack(self) -> list[Site]:
        return [] if self._interceptor is None else self._interceptor.stack

    # -- hooks ------------------------------------------------------------------------------
    def _on_label(self, label: Optional[str]) -> Optional[str]:
        previous, self._label = self._label, label
        return previous

    def _core_hook(self, den: _Denoiser) -> Callable[..., None]:
        @torch.compiler.disable
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._current = den
            den.forwards += 1
            self._since_step += 1
            given = layouts.bind_inputs(den.core, args, kwargs)
            inputs = layouts.read_inputs(den.core, den.spec, given)
            rows = self._model_rows(inputs, layouts.text_input(given, den.spec))
            split = parallel.split_of(den.core)
            self._split = split or self._split
            self._reader.forward = Forward(inputs, rows, den.spec, split)

        return hook

    def _model_rows(self, inputs: VideoInputs, text: Optional[torch.Tensor]) -> list[ModelRow]:
        """The kept batch rows of a forward: each one's branch, its row in the branch, its prompt."""
        matched: list[Optional[tuple[Prompt, bool]]] = []
        if self._book and text is not None and not isinstance(self._given_targets, Mapping):
            matched = self._book.match(text)
        reals = inputs.text_real or []
        if inputs.batch is not None and inputs.batch > 1 and text is not None and text.shape[0] == 1:
            # one text row for every video row (Kandinsky 5 with several videos per prompt)
            matched, reals = matched * inputs.batch, reals * inputs.batch
        rows = []
        for branch, indices in self._branch_rows(inputs.batch, matched):
            meta = []
            for out, index in enumerate(indices):
                hit = matched[index] if index < len(matched) else None
                found = None if hit is None else hit[0]
                real = reals[index] if index < len(reals) else None
                if found is not None and found.real is not None:
                    # the prompt's own tokens among those the model attends: a text without a mask need
                    # not be padded with zeros (CogVideoX), a mask may keep registers (LTX-2)
                    real = found.real if real is None else min(real, found.real)
                if found is not None:
                    words = found.targets
                elif self._book and matched:
                    words = ()
                    self._warn_once(
                        "unmatched", f"batch row {index} of the denoiser's text is none of the prompts the "
                        "pipeline encoded; its word maps are not recorded",
                    )  # fmt: skip
                else:
                    words = tuple((w, tuple(i)) for w, i in self._targets.items())
                text_row = RowText(found.text if found else None, real, words)
                rows.append(ModelRow(index, branch, out, len(indices), text_row))
                meta.append(
                    {
                        "prompt": text_row.prompt if found else self.prompt,
                        "text_len": real,
                        "targets": {w: list(i) for w, i in words},
                    }
                )
            self._rows_meta[branch] = meta
        return rows

    def _warn_once(self, key: str, message: str) -> None:
        if ("", key) not in self._warned:
            self._warned.add(("", key))
            warnings.warn(f"attnmap.capture: {message}", stacklevel=4)

    def _branch_rows(
        self, batch: Optional[int], matched: Sequence[Optional[tuple[Prompt, bool]]] = ()
    ) -> list[tuple[str, list[int]]]:
        """Which model rows of this forward belong to which CFG branch, filtered by ``branch``
        (the rows of an unknown batch: [0] stands for all): the forward's cache-context label (Wan,
        HunyuanVideo; a guider's ``pred_cond`` / ``pred_uncond``), else the prompt each row holds (a
        negative one is ``uncond``: Cosmos and Kandinsky 5 run the branches apart without a label),
        else diffusers' batched guidance, [uncond rows, cond rows]."""
        n = batch or 1
        labels = {"cond": "cond", "uncond": "uncond", "pred_cond": "cond", "pred_uncond": "uncond"}
        label = labels.get(self._label or "")  # "cond_uncond" (batched guidance) is no one branch
        if label is not None:
            rows = [(label, list(range(n)))]
        elif batch is not None and len(matched) == n and all(m is not None for m in matched):
            negative = [i for i, m in enumerate(matched) if m is not None and m[1]]
            rows = [("uncond", negative), ("cond", [i for i in range(n) if i not in negative])]
        elif self._guidance() and batch is not None and batch % 2 == 0:
            # batched CFG (CogVideoX, LTX: cache_context "cond_uncond"): diffusers stacks [uncond, cond]
            rows = [("uncond", list(range(n // 2))), ("cond", list(range(n // 2, n)))]
        else:
            rows = [("cond", list(range(n)))]
        return [(b, r) for b, r in rows if r and self.branch in ("both", b)]

    def _guidance(self) -> bool:
        """Whether the pipeline runs classifier-free guidance now."""
        if self._pipe is None:
            return False
        flag = getattr(self._pipe, "do_classifier_free_guidance", None)
        if flag is None:
            scale = getattr(self._pipe, "guidance_scale", None)
            flag = isinstance(scale, (int, float)) and scale > 1.0
        return bool(flag)

    def _warn(self, site: Optional[Site], reason: str) -> None:
        """One warning per module and reason (``site`` None: per reason, the same for every module)."""
        key = ("" if site is None else site.name, reason)
        if key in self._warned:
            return
        self._warned.add(key)
        where = "attention calls" if site is None else f"the attention of module {site.name!r}"
        warnings.warn(f"attnmap.capture: skipping {where}: {reason}", stacklevel=3)

    def _recording(self, site: Site) -> bool:
        if self._steps is not None and self._step not in self._steps:
            return False
        if self._blocks is not None and site.block not in self._blocks:
            return False
        return bool(self._reader.forward.rows)

    # -- prompts -----------------------------------------------------------------------------
    def _on_prompts(self, texts: list[str], negative: bool) -> list[str]:
        """The pipeline encodes ``texts`` (its prompts, or its negative prompts): strip their target
        marks; the first prompt with marks (or the words of ``targets=``) gives :attr:`targets`."""
        clean = [parse_targets(t)[0] for t in texts]
        for c, t in zip(clean, texts):
            if c != t or c not in self._marked:  # keep the marks capture(prompt=...) was given
                self._marked[c] = t
        self._pending = clean if not negative else self._pending + clean
        if negative:
            return clean
        words = parse_targets(texts[0])[1]
        given = self._given_targets
        deferred = given is not None and not isinstance(given, Mapping) and not self._base_targets
        if words or deferred:
            self.prompt = clean[0]
            if not isinstance(given, Mapping) and self._tokenizer is not None:
                self._base_targets = self._words(texts[0])
                self._set_targets(dict(self._base_targets))
            self._prompt_seen = None
        return clean

    def _words(self, marked: str) -> dict[str, list[int]]:
        """A prompt's target words and their token indices as the text encoder sees them: the words
        of ``targets=`` that it holds, else those it marks."""
        given = self._given_targets
        clean, marks = parse_targets(marked)
        words = [given] if isinstance(given, str) else list(given or marks)
        if given is not None and not isinstance(given, Mapping):
            words = [w for w in words if has_word(clean, w.strip())]
        if not words or self._tokenizer is None:
            return {}
        return find(marked, self._tokenizer, words)

    def _on_ids(self, ids: torch.Tensor, crop: int, outputs: Sequence[torch.Tensor]) -> None:
        """The text encoder saw ``ids`` and gave ``outputs`` (its hidden states): where each prompt's
        tokens sit there (a template moves them), less the template's ``crop_start``, is where the
        denoiser sees them, until :meth:`_on_encoded` finds them in what it returned; its tokens that
        are not padding are the prompt's real ones."""
        tok = self._tokenizer
        if tok is None or not self._pending:
            return
        pad = getattr(tok, "pad_token_id", None)
        try:
            runs = {
                p: (
                    list(tok(p, add_special_tokens=False)["input_ids"]),
                    list(tok(p, add_special_tokens=True)["input_ids"]),
                )
                for p in dict.fromkeys(self._pending)
            }
        except Exception:  # a tokenizer that cannot say: keep the indices as they are
            return
        rows = ids.tolist()
        if self.prompt is not None and self._base_targets and not self._prompt_seen:
            base = list(tok(self.prompt, add_special_tokens=False)["input_ids"])
            self._prompt_seen = any(find_run(row, base) is not None for row in rows)
        for i, row in enumerate(rows):
            found: Optional[tuple[str, Optional[int]]] = next(
                ((p, hit) for p, (plain, _) in runs.items() if (hit := find_run(row, plain)) is not None),
                None,
            )
            if found is None:
                empty = [p for p, (plain, _) in runs.items() if not plain]
                if len(empty) != 1:
                    continue
                found = (empty[0], None)
            prompt, pos = found
            plain, special = runs[prompt]
            start = 0 if pos is None else pos - (find_run(special, plain) or 0)  # the encoder's index 0
            words = self._words(self._marked.get(prompt, prompt))
            at = {w: tuple(start + j for j in idx) for w, idx in words.items()}  # in the encoder's row
            real = None if pad is None else sum(1 for t in row if t != pad) - crop
            targets = tuple((w, tuple(j - crop for j in js)) for w, js in at.items() if min(js) >= crop)
            self._prompts[prompt] = Prompt(prompt, targets, real)
            self._sources[prompt] = (row, [o[i] for o in outputs], at, pad)
            if prompt == self.prompt and self._base_targets and pos is not None:
                shift = start - crop
                self._set_targets({w: [j + shift for j in idx] for w, idx in self._base_targets.items()})

    def _on_encoded(self, lists: list[tuple[list[str], bool]], per: int, out: Any) -> None:
        """``encode_prompt`` returned: remember which prompt each row of its embeddings holds, and find
        each prompt's words and real tokens in them (a template's crop, a selection of positions)."""

        def known(texts: list[str]) -> list[Prompt]:
            found = []
            for text in texts:
                prompt = self._prompts.get(text)
                if prompt is None:  # the text encoder was not seen: indices as the tokenizer gives them
                    words = self._words(self._marked.get(text, text))
                    prompt = Prompt(text, tuple((w, tuple(i)) for w, i in words.items()))
                found.append(prompt)
            return found

        for embeds, rows, neg in encoded_rows(out, [(known(texts), neg) for texts, neg in lists], per):
            aligned: dict[str, Prompt] = {}
            for r, prompt in enumerate(rows):
                source = self._sources.get(prompt.text)
                if source is not None and prompt.text not in aligned:
                    aligned[prompt.text] = align_prompt(prompt, embeds[r], *source)
            self._book.add(embeds, [aligned.get(p.text, p) for p in rows], neg)
        self._pending = []
        self._sources.clear()

    def _on_relay(self, embeds: torch.Tensor, mask: torch.Tensor, out: Any) -> None:
        """A relay module (LTX-2's text connectors) turned encoded embeddings into the denoiser's text:
        its output rows hold the same prompts, their real tokens first."""
        matched = self._book.match(embeds)
        if not any(m is not None for m in matched):
            return
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for t in outputs:
            if (
                isinstance(t, torch.Tensor)
                and t.dim() == 3
                and t.is_floating_point()
                and t.shape[0] == len(matched)
            ):
                for b, hit in enumerate(matched):
                    if hit is not None:
                        self._book.add(t[b : b + 1], [relayed(hit[0], mask[b])], hit[1])

    def _set_targets(self, targets: dict[str, list[int]]) -> None:
        self._targets = {w: i for w, i in targets.items() if min(i) >= 0}

    @property
    def targets(self) -> dict[str, list[int]]:
        """``{word: [token indices]}`` of the target words, as positions in the text the denoiser sees
        (the first prompt's; a word of another row's prompt at its first row's positions)."""
        out = dict(self._targets)
        if self._vlm is not None:
            for row in self._vlm.metadata()["answers"] if self._vlm.inputs is not None else []:
                for word, positions in row["targets"].items():
                    out.setdefault(word, positions)
        for rows in self._rows_meta.values():
            for row in rows:
                for word, indices in row["targets"].items():
                    out.setdefault(word, indices)
        return out

    # -- calls -------------------------------------------------------------------------------
    def _on_call(self, site: Site, call: Intercepted) -> None:
        self._entries.add(call.entry)
        if self._recording(site):
            if self._vlm is not None:
                self._vlm.read(site, call)
            else:
                self._reader.read(site, call)

    def _on_probs(self, site: Site, probs: torch.Tensor) -> None:
        self._entries.add("softmax")
        if self._recording(site):
            self._reader.read_probs(site, probs)

    # -- one attention call ------------------------------------------------------------------
    def _add(self, site: Site, branch: str, maps: dict[str, torch.Tensor], rows: Rows, batch: int) -> None:
        block = site.block if self.per_block else None
        self._seen_blocks.add(site.block)
        prefix = self._current.prefix
        for name, value in maps.items():
            reason = self._acc.add(MapKey(self._step, branch, prefix + name, block), value, rows, batch)
            if reason is not None:
                self._warn(site, f"{prefix + name} {reason}")

    # -- steps -------------------------------------------------------------------------------
    def callback(
        self, pipe: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """A diffusers ``callback_on_step_end``: closes the step that just ran and starts the next
        (a no-op where the scheduler's step already did)."""
        if self._step <= int(step_index):
            self._finish_step()
            self._step = int(step_index) + 1
            self._since_step = 0
        return callback_kwargs

    def step(self) -> int:
        """Close the current step (written to the store if any) and start the next; returns its index."""
        self._finish_step()
        self._step += 1
        self._since_step = 0
        return self._step

    def _on_scheduler_step(self) -> None:
        if self._since_step:
            self.step()

    @property
    def current_step(self) -> int:
        return self._step

    def _warn_nonfinite(self) -> None:
        """One warning per step naming the modules whose maps got NaN (NaN or inf in q or k)."""
        flags, self._reader.nonfinite = self._reader.nonfinite, {}
        bad = [name for name, flag in flags.items() if bool(flag)]
        if bad:
            warnings.warn(
                f"attnmap.capture: step {self._step}: the attention of module(s) {', '.join(map(repr, bad))} "
                "got NaN or inf in its query or key; the maps of that step are NaN",
                stacklevel=4,
            )

    def _row_maps(self, step: int, row: int) -> dict[str, torch.Tensor]:
        """The maps of one step of one batch row, as a store video holds them: its ``cross`` and
        ``text`` maps cut to the row's own real text (the columns past it are NaN in memory)."""
        maps = self._acc.step_maps(step, row, self.per_block)
        experts = {d.prefix for d in self._denoisers if d.prefix}
        for name, value in maps.items():
            branch = "uncond" if name.startswith("uncond/") else "cond"
            base = name.removeprefix("uncond/")
            base = next((base.removeprefix(p) for p in experts if base.startswith(p)), base)
            base = re.sub(r"/block\d+$", "", base)
            rows = self._rows_meta.get(branch, [])
            real = rows[row]["text_len"] if row < len(rows) else None
            if real is None or base not in ("cross", "text"):
                continue
            cut = value[..., :real, :real] if base == "text" else value[..., :real]
            maps[name] = cut.contiguous()
        return maps

    def _warn_notes(self) -> None:
        """One note per reduction that applied to no call of some modules (video cubes on calls without
        video keys ...)."""
        for reason, names in sorted(self._reader.notes.items()):
            listed = ", ".join(repr(n) for n in sorted(names)[:4]) + (
                f" and {len(names) - 4} more" if len(names) > 4 else ""
            )
            warnings.warn(f"attnmap.capture: {reason}: not read on the calls of {listed}", stacklevel=3)

    def _finish_step(self) -> None:
        self._warn_nonfinite()
        if self._step in self._written:
            return
        if self._split is not None and not self._combine(self._step, self._split):
            return
        if self._step not in self._acc.steps:
            return
        if self._vlm is not None:  # the whole answer is a token too: the step scrubber walks it
            self._acc.alias(self._step, "answer", "token/answer", list(range(self._acc.rows(self._step))))
        self._acc.to_cpu(self._step)
        writes = self._split is None or self._split.rank == 0
        if self._store is not None and not self._sinks and writes:
            self._sinks = store_sinks(self._store, self._video_ids, self.video_metadata, self.config)
        rows = self._acc.rows(self._step)
        maps = [self._row_maps(self._step, row) for row in range(rows)]
        for sink in self._sinks:
            sink.write_step(self._step, maps)
        self._written.add(self._step)

    def _combine(self, step: int, split: parallel.Split) -> bool:
        """Add up the ranks' maps of ``step`` over the context-parallel group (every rank gets here at
        the end of each step); False when they were not (the step's maps are then dropped with one
        warning, never kept as partial maps)."""
        if step in self._combined:
            return True
        found: Union[list[torch.Tensor], str]
        if self._uncombined is not None:
            found = self._uncombined
        else:
            running = self._acc.running(step)
            keys = [k.order() for k, _ in running]
            found = parallel.combine(
                keys, [r.total for _, r in running], [r.count for _, r in running], split
            )
            if isinstance(found, list):
                for (_, slot), total in zip(running, found):
                    slot.total = total
                self._combined.add(step)
                return True
            if "failed" in found:  # the group is broken: no collective any more
                self._uncombined = found
        if step in self._acc.steps:
            self._acc.drop(step)
            self._warn(None, f"step {step}'s maps are not recorded: {found}")
        return False

    # -- never silently empty ----------------------------------------------------------------
    def _warn_silent(self) -> None:
        """One warning naming the watched attention modules that ran but produced no call attnmap saw."""
        for den in self._denoisers:
            if not den.forwards:
                continue
            silent = [
                s for s in den.sites if s.name in den.leaves and s.entered and not s.seen and s.role == "auto"
            ]
            refused = {s.name: parallel.foreign_processor(s.module) for s in silent}
            for reason in dict.fromkeys(r for r in refused.values() if r is not None):
                self._warn(None, reason)  # a framework's processor that ran kernels attnmap cannot see
            silent = [s for s in silent if refused[s.name] is None]
            if not silent or den.everything:
                continue
            linear = [s.name for s in silent if self._is_linear(den, s)]
            names = ", ".join(repr(s.name) for s in silent[:8]) + (
                f" and {len(silent) - 8} more" if len(silent) > 8 else ""
            )
            advice = (
                "They may run a kernel attnmap cannot see (a processor calling flash-attn, xformers or a custom "
                "kernel directly); run them through diffusers' dispatch_attention_fn, transformers' attention "
                "interface or torch SDPA (e.g. model.set_attention_backend('native') or set_attn_processor(...)), "
                "or pass layout= for a module that calls attention itself"
            )
            if linear:
                advice = (
                    f"{len(linear)} of them compute linear attention (no softmax, e.g. Sana-Video's self-attention), "
                    "which has no attention map to read"
                    + ("" if len(linear) == len(silent) else "; the others: " + advice)
                )
            warnings.warn(
                f"attnmap.capture: {len(silent)} watched attention module(s) of {type(den.core).__name__} ran but "
                f"produced no map: {names} (attention backend in force: {self._backend_in_force(den)}). {advice}",
                stacklevel=3,
            )

    @staticmethod
    def _is_linear(den: _Denoiser, site: Site) -> bool:
        """The module computes linear attention: its processor's class (or its own) says so."""
        name = type(getattr(site.module, "processor", None)).__name__
        return name in den.spec.linear or "Linear" in name or type(site.module).__name__ in den.spec.linear

    def _backend_in_force(self, den: _Denoiser) -> str:
        parts = []
        backends = {
            getattr(getattr(s.module, "processor", None), "_attention_backend", None) for s in den.sites
        }
        if any(hasattr(s.module, "processor") for s in den.sites):
            names = sorted({diffusers_backend(b) for b in backends})
            parts.append(f"diffusers {', '.join(names)}")
        impl = getattr(getattr(den.core, "config", None), "_attn_implementation", None)
        if isinstance(impl, str):
            parts.append(f"transformers {impl}")
        seen = sorted(self._entries)
        return "; ".join(parts or ["torch SDPA"]) + (
            f"; entry points seen: {', '.join(seen)}" if seen else ""
        )

    # -- reading -----------------------------------------------------------------------------
    @property
    def steps(self) -> list[int]:
        """The steps with recorded maps (under context parallelism: the finished steps, whose maps
        hold every rank's)."""
        if self._split is not None:
            return [s for s in self._acc.steps if s in self._combined]
        return self._acc.steps

    @property
    def blocks(self) -> list[int]:
        """The blocks whose attention was recorded, as the model numbers them (unique across stacks)."""
        return sorted(self._seen_blocks)

    @property
    def tokens(self) -> list[str]:
        """The target words."""
        return list(self.targets)

    @property
    def nbytes(self) -> int:
        """Bytes of the maps held (per step, per kept block and branch)."""
        return self._acc.nbytes

    @property
    def names(self) -> list[str]:
        """The recorded map names (without branch or block)."""
        return self._acc.names

    def get(
        self,
        name: str,
        *,
        step: Optional[int] = None,
        block: Optional[int] = None,
        token: Optional[str] = None,
        branch: Optional[str] = None,
    ) -> torch.Tensor:
        """One recorded map.

        Args:
            name: a map name (``temporal``, ``cross``, ``token/<word>``, ``full/space`` ...).
            step: a recorded step; None: the mean over the recorded steps.
            block: a block (needs ``per_block``); None: the mean over blocks.
            token: a target word: ``get("cross", token="cat")`` is ``get("token/cat")``.
            branch: ``"cond"`` or ``"uncond"``; None: the recorder's branch (``cond`` for ``both``).

        Returns:
            float32 CPU tensor ``[B, ...]`` (``[B, H, ...]`` with per_head), e.g. ``[B, F, H, W]`` for a token.

        Raises:
            AttnmapError: nothing was recorded under that name, step, block or branch.
        """
        if token is not None:
            if token not in self.targets:
                raise AttnmapError(f"token {token!r} is not a target; targets are {self.tokens}")
            name = f"token/{token}"
        branch = branch or ("cond" if self.branch == "both" else self.branch)
        if block is not None and not self.per_block:
            raise AttnmapError("block= needs capture(..., per_block=True); maps were averaged over blocks")
        steps = self.steps if step is None else [int(step)]
        if (
            self._split is not None
            and step is not None
            and int(step) in self._acc.steps
            and int(step) not in self._combined
        ):
            raise AttnmapError(
                f"step {step} is not finished: under context parallelism each rank holds only its own rows and "
                "heads until the step ends (the scheduler's step, rec.step(), or the capture's close) and the "
                "ranks' maps are added up"
            )
        values = [
            v for s in steps if (v := self._acc.value(s, branch, name, block, self.per_block)) is not None
        ]
        if not values:
            raise AttnmapError(
                f"no map {name!r} recorded for step={step}, block={block}, branch={branch!r}; "
                f"recorded names: {self.names}, steps: {self.steps}, blocks: {self.blocks}"
            )
        return values[0].to("cpu") if len(values) == 1 else torch.stack(values).mean(0).cpu()

    def divided_attention(
        self, *, step: Optional[int] = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """TimeSformer's space and time attention per block, shaped for
        :func:`attnmap.rollout.space_time_rollout` (needs ``per_block=True``).

        Args:
            step: a recorded step; None: the mean over steps.

        Returns:
            ``(space, time)``: per block, ``[B*F, (H,) 1+HW, 1+HW]`` and ``[B*HW, (H,) F, F]``.

        Example:
            >>> space, time = rec.divided_attention()  # doctest: +SKIP
            >>> attnmap.space_time_rollout(space, time, num_frames=8)  # doctest: +SKIP
        """
        if not self.per_block:
            raise AttnmapError("divided_attention needs capture(..., per_block=True)")
        out: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for kind, maps in zip(("space", "time"), out):
            for block in self.blocks:
                try:
                    value = self.get(f"full/{kind}", step=step, block=block)  # [B, (H,) F or HW, n, n]
                except AttnmapError:
                    continue
                if self.per_head:
                    value = value.transpose(1, 2)
                maps.append(value.flatten(0, 1))
        return out

    def show(self, *, batch_index: int = 0, options: Any = None) -> Any:
        """The interactive viewer of what was recorded, for a notebook (its ``_repr_html_`` shows it
        inline; the same page as ``attnmap-render report``).

        Args:
            batch_index: which batch row to show.
            options: an :class:`attnmap.RenderOptions` (colormap, normalisation ...); None: defaults.

        Example:
            >>> with attnmap.capture(pipe) as rec:  # doctest: +SKIP
            ...     pipe("a (cat) on a mat")
            >>> rec.show()  # doctest: +SKIP
        """
        from attnmap.render.report import recorder_viewer

        return recorder_viewer(self, video_id=self.model_name, batch_index=batch_index, options=options)

    @property
    def metadata(self) -> dict[str, Any]:
        """The JSON-safe description written with the maps (model, grid, layout, video size ...)."""
        den, inputs = self._current, self._reader.forward.inputs
        spec = den.spec
        stride = list(layouts.vae_stride(den.core, spec))
        if self._vae is not None:
            t, s = self._vae
            stride = [t or stride[0], s or stride[1], s or stride[2]]
        video: dict[str, Any] = {"fps": None}
        if inputs.latent is not None:
            video.update(layouts.pixels(inputs.latent, stride, spec.causal_vae))
        meta: dict[str, Any] = {
            "model": self.model_name,
            "family": spec.family,
            "prompt": self.prompt,
            "targets": {w: list(i) for w, i in self.targets.items()},
            "layout": next(iter(self._reader.layouts.values()), None),
            "layouts": dict(self._reader.layouts),
            "grid": None if inputs.grid is None else list(inputs.grid),
            "patch_size": list(layouts.patch_size(den.core)),
            "vae_stride": stride,
            "video": video,
            "steps": self.steps,
            "blocks": self.blocks,
            "branch": self.branch,
            "reductions": list(self.reductions),
            "per_head": self.per_head,
            "per_block": self.per_block,
            "entry_points": sorted(self._entries),
            **({} if self._split is None else {"context_parallel": self._split.describe()}),
            "rows": {branch: [dict(r) for r in rows] for branch, rows in self._rows_meta.items()},
        }
        if self._vlm is not None:
            meta.update(self._vlm.metadata(), layout=None, layouts={})
            meta.pop("answers", None)
        return self._merge_extra(meta)

    def _merge_extra(self, meta: dict[str, Any]) -> dict[str, Any]:
        """``meta`` with the caller's ``metadata=`` merged over it (a dict over a dict key by key)."""
        for key, value in self._extra_meta.items():
            if isinstance(value, dict) and isinstance(meta.get(key), dict):
                meta[key] = {**meta[key], **value}
            else:
                meta[key] = value
        return meta

    def video_metadata(self, row: int) -> dict[str, Any]:
        """The metadata of the video of batch row ``row``: :attr:`metadata` with that row's own prompt,
        real text length and target words (``text_len``)."""
        meta = self.metadata
        if self._vlm is not None:
            mine = self._vlm.metadata(row)
            meta.update(targets=mine["targets"], answer=mine["answer"])
            if mine.get("prompt") is not None:
                meta["prompt"] = mine["prompt"]
            return self._merge_extra(meta)
        branch = "cond" if self.branch == "both" else self.branch
        rows = self._rows_meta.get(branch, [])
        if row < len(rows):
            mine = rows[row]
            if mine["prompt"] is not None:
                meta["prompt"] = mine["prompt"]
            meta["targets"] = dict(mine["targets"]) if mine["targets"] or mine["prompt"] else meta["targets"]
            meta["text_len"] = mine["text_len"]
        return meta

    def save(self, path: Union[str, Path], video_id: str, *, batch_index: int = 0) -> Path:
        """Write every recorded step of one batch row, then the step-aggregated maps, as a store video.

        Args:
            path: the store root.
            video_id: the video's id in the store.
            batch_index: which batch row to write.

        Returns:
            the store root.

        Raises:
            AttnmapError: a bad ``video_id`` or ``batch_index``, or nothing was recorded.
        """
        if not isinstance(video_id, str) or not video_id:
            raise AttnmapError(f"video_id must be a non-empty str, got {video_id!r}")
        if not self.steps:
            raise AttnmapError("nothing was recorded: run the model inside the capture context first")
        rows = self._acc.rows(self.steps[0])
        if isinstance(batch_index, bool) or not isinstance(batch_index, int) or not 0 <= batch_index < rows:
            raise AttnmapError(
                f"batch_index must be an int in [0, {rows}) (the recorded videos), got {batch_index!r}"
            )
        root = Path(path)
        sink = StoreSink(root, [video_id], lambda row: self.video_metadata(batch_index), self.config)
        for step in self.steps:
            sink.write_step(step, [self._row_maps(step, batch_index)])
        sink.close()
        return root


def capture(
    model: Any,
    *,
    reductions: Optional[Sequence[str]] = None,
    targets: Optional[Targets] = None,
    prompt: Union[str, Sequence[str], None] = None,
    tokenizer: Any = None,
    layout: Union[Layout, Mapping[str, Layout], None] = None,
    blocks: Optional[Iterable[int]] = None,
    steps: Optional[Iterable[int]] = None,
    per_block: bool = False,
    per_head: bool = False,
    branch: str = "cond",
    store: Union[str, Path, None] = None,
    video_id: Union[str, Sequence[str], None] = None,
    config: Optional[Config] = None,
    keep_cross: bool = False,
    metadata: Optional[Mapping[str, Any]] = None,
    backend: str = "auto",
    one_pass: Optional[bool] = None,
    block_size: Any = None,
    experts: str = "merge",
) -> Recorder:
    """Record attention maps of ``model`` while the returned context is open.

    Args:
        model: a torch module (any diffusers video transformer, transformers VJEPA2, VideoMAE,
            TimeSformer, timm ViTs: layouts inferred from shapes), a compiled one
            (``torch.compile(model)`` or ``model.compile()``), or a diffusers pipeline (its
            ``transformer``, and ``transformer_2`` where it has one); any other module with ``layout=``.
            A transformers video LLM (Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE), GLM-4.1V, LLaVA-OneVision,
            LLaVA-NeXT-Video, SmolVLM2, InternVL, VideoLLaMA3, Gemma 4) is read at the attention
            interface under ``generate()`` or a forward, one step per token of the answer (see
            :mod:`attnmap.capture.vlm_reader` for its maps: ``answer``, ``answer/<part>``,
            ``token/<word>``, ``vision/<name>``).
        reductions: names of :data:`REDUCTIONS` (``cross``, ``temporal``, ``text``, ``received``,
            ``full`` ...); each call gets those its layout supports. None: ``("cross", "temporal")``,
            and for a video LLM ``("cross", "temporal", "received")`` (its answer and word maps are
            always kept; ``temporal`` and ``received`` of the prefill, ``received`` and ``entropy`` of
            the vision tower as asked).
        targets: words (marked ``"(word)"`` in the prompt by default), a list of words, or a mapping
            word -> token indices; their cross maps ``token/<word>`` ``[F, H, W]`` are kept per step.
            For a video LLM a mapping gives sequence positions in ``input_ids`` (the same in each row).
        prompt: the prompt, for a model run outside a pipeline; a pipeline's own prompt is read as
            it encodes it (``pipe("a (cat) on a mat")``: the marks are stripped, the targets found).
            For a video LLM: the question with its words marked, or one per batch row; each row's
            words are found where the question's tokens sit in its ``input_ids``.
        tokenizer: maps words to tokens (a pipeline's own tokenizer by default); for a video LLM its
            tokenizer or processor, which also names each generated token's map.
        layout: one Layout for the calls it fits (others are inferred), or ``{module name: Layout}``;
            None: inferred. With a layout, a model without attention modules is watched module by
            module (a model that calls attention itself is watched as itself, ``<root>``).
        blocks: the blocks to record, numbered from 0 and unique across the model's stacks
            (HunyuanVideo's single-stream blocks come after its dual-stream ones); None: all.
        steps: the steps to record; None: all. A pipeline's scheduler step advances the step;
            ``rec.step()`` (or ``rec.callback``) does it for a model run by hand.
        per_block: keep ``<name>/block<b>`` maps too; per_head: keep heads (H after the batch dim).
        branch: classifier-free guidance branch: ``"cond"``, ``"uncond"`` or ``"both"``.
        store, video_id: write each step to this store as it completes (one id per batch row).
        config: an :class:`attnmap.Config`: per head/block, storage dtype, downsampling, auto-render.
        keep_cross: keep the full cross map ``cross`` ``[Nv, Nt]`` also when there are targets.
        metadata: extra JSON-safe metadata, merged over what capture records. Capture fills
            ``video`` ``{frames, height, width}`` with the pixel size the model's latents decode to
            (a pipeline's own VAE factors where it names them, else the family's), and leaves
            ``fps`` None: the pipeline does not know it. Auto-render overlays the maps on the
            generated video only when ``video.path`` names it (relative to the store root, or
            absolute) and the file exists when the context closes.
        backend: the reduction backend of :func:`attnmap.attention_sums`.
        one_pass: run each recorded torch SDPA call through :func:`attnmap.reduce.sdpa_with_lse` and
            reduce in one pass instead of two, the rows' logsumexp coming from the kernel SDPA itself
            picks (its output unchanged); None (default): the calls on the CPU; True: every call;
            False: none. Never under torch.compile, nor inside another function mode than
            ``torch.device``, where SDPA runs as usual so that the outer mode sees it.
        block_size: passed to :func:`attnmap.attention_sums` for the ``blocks`` reduction.
        experts: ``"merge"`` (a pipeline's denoisers, Wan 2.2's two experts, record under the same
            names) or ``"apart"`` (a second denoiser's maps are named ``<attribute>/<name>``).

    Returns:
        a :class:`Recorder`, to use as a context manager.

    Raises:
        AttnmapError: a target word not in the prompt, a model with no attention module, a bad argument.
        A call whose shapes fit no layout is skipped with one warning naming the module and the shapes;
        watched modules that ran but produced nothing are named in one warning when the context closes.

    Example:
        >>> with attnmap.capture(pipe, store="attention_maps", video_id="prompt_001_vid_001") as rec:  # doctest: +SKIP
        ...     pipe("A romantic (kiss) with (flowers)", num_frames=81)
        >>> rec.get("token/kiss", step=0).shape  # [B, F, H, W] latent tokens  # doctest: +SKIP
        torch.Size([1, 21, 30, 52])
    """
    return Recorder(
        model,
        reductions=reductions,
        targets=targets,
        prompt=prompt,
        tokenizer=tokenizer,
        layout=layout,
        blocks=blocks,
        steps=steps,
        per_block=per_block,
        per_head=per_head,
        branch=branch,
        store=store,
        video_id=video_id,
        config=config,
        keep_cross=keep_cross,
        metadata=metadata,
        backend=backend,
        one_pass=one_pass,
        block_size=block_size,
        experts=experts,
    )


__all__ = ["REDUCTIONS", "Recorder", "capture"]
