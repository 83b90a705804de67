"""Capture attention maps from a real model or pipeline while it runs.

While the context is open, a :class:`torch.overrides.TorchFunctionMode` sees every call of
``torch.nn.functional.scaled_dot_product_attention`` (keyword calls from diffusers, positional
ones from transformers and timm) and module hooks say which watched attention module made it. The
call runs exactly as before; the same q and k (after the model's norms and rotary embeddings) go
to :func:`attnmap.attention_sums`, and the small maps it returns are accumulated per
(branch, step, block). TimeSformer never calls SDPA: its softmax probabilities are read inside its
attention modules, space and time kept apart.

Map names (per step; ``get`` returns them with a leading batch dim ``B``, and ``H`` after it when
``per_head``):

- ``token/<word>`` ``[B, F, H, W]``: the video tokens' attention to that word (its sub-tokens summed);
- ``cross`` ``[B, Nv, Nt]`` (the real, unpadded text tokens), ``temporal`` ``[B, F, F]``, ``text``
  ``[B, Nt, Nt]``, ``received`` ``[B, Nk]``, ``full`` ``[B, Nq, Nk]``;
- ``received/text`` ``[B, Nt]`` and ``full/text`` ``[B, Nv, Nt]``: received and full of video -> text
  cross-attention calls (Wan attn2, LTX attn2), kept apart from those of self-attention;
- ``padding`` ``[B, F, H, W]``: attention mass on zero-padded text keys (Wan pads text to 512);
- ``image/<name>``: the image-context cross-attention of Wan I2V, kept apart from the text;
- ``full/space`` ``[B, F, 1+HW, 1+HW]`` and ``full/time`` ``[B, HW, F, F]``: TimeSformer's divided
  attention per frame (CLS first) and per patch (patches in (h, w) order), for rollout.

Example:
    >>> with attnmap.capture(pipe, prompt="a (cat) on a (mat)") as rec:  # doctest: +SKIP
    ...     pipe(rec.prompt, callback_on_step_end=rec.callback)
    >>> rec.get("token/cat").shape  # doctest: +SKIP
    torch.Size([1, 21, 30, 52])
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils._device import DeviceContext

from attnmap import reduce
from attnmap.capture import models
from attnmap.capture.tokens import Targets, resolve
from attnmap.config import Config
from attnmap.errors import AttnmapError
from attnmap.layout import Layout
from attnmap.reduce.native import REDUCTIONS as NATIVE_REDUCTIONS

_SDPA = torch.nn.functional.scaled_dot_product_attention
_SOFTMAX = (torch.Tensor.softmax, torch.softmax, torch.nn.functional.softmax)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS: dict[str, Any] = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None}
REDUCTIONS = ("cross", "temporal", "text", "received", "full")
BRANCHES = ("cond", "uncond", "both")

Key = tuple[str, str, Optional[int]]  # (branch, name, block)


def _bind_sdpa(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """SDPA's arguments by name, however they were passed."""
    bound = dict(_SDPA_DEFAULTS)
    bound.update(zip(_SDPA_ARGS, args))
    bound.update(kwargs)
    return bound


def _padding_mask(mask: Optional[torch.Tensor], batch: int, heads: int, nk: int) -> tuple[bool, Any]:
    """An SDPA ``attn_mask`` as a key-padding mask ``[B, 1 or H, 1, Nk]`` (bool or additive), or
    ``(False, reason)`` when it varies over queries or does not broadcast."""
    if mask is None:
        return True, None
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.shape[-1] != nk or m.shape[1] not in (1, heads) or m.shape[0] not in (1, batch):
        return False, f"attn_mask of shape {tuple(mask.shape)} does not broadcast to keys [B, H, 1, {nk}]"
    if m.shape[-2] != 1:
        if not bool((m == m[..., :1, :]).all()):
            return False, "attn_mask varies over queries (only key-padding masks are supported)"
        m = m[..., :1, :]
    return True, m.expand(batch, m.shape[1], 1, nk)


class _Mode(TorchFunctionMode):
    """Forwards every torch call unchanged; shows SDPA and softmax calls to the recorder."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder
        # one_pass calls an aten op that the modes below this one would not see as SDPA: only when
        # there are none (an outer capture, a user's mode; torch.device contexts do not care)
        self.alone = all(isinstance(m, DeviceContext) for m in _get_current_function_mode_stack())

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Optional[dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        rec = self.recorder
        if func is _SDPA and rec._stack:
            call = _bind_sdpa(args, kwargs)
            site = rec._stack[-1]
            lse: Optional[torch.Tensor] = None
            if rec.one_pass and self.alone and rec._recording(site):
                out, lse = rec._forward_with_lse(call)
            else:
                out = func(*args, **kwargs)
            rec._on_sdpa(site, call, lse)
            return out
        out = func(*args, **kwargs)
        if rec._stack and rec._spec.eager_softmax and func in _SOFTMAX and isinstance(out, torch.Tensor):
            rec._on_probs(rec._stack[-1], out)
        return out


class Recorder:
    """Accumulates the maps of one capture. Made by :func:`capture`; see its docstring.

    Attributes:
        prompt: the prompt without the target parentheses (what the model should see), or None.
        targets: ``{word: [token indices]}`` of the target words.
        model_name: the watched model's class name.
        metadata: the JSON-safe description written with the maps (model, grid, layout, ...).
    """

    def __init__(
        self,
        model: Any,
        *,
        reductions: Sequence[str] = ("cross", "temporal"),
        targets: Optional[Targets] = None,
        prompt: Optional[str] = None,
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
        one_pass: bool = False,
    ) -> None:
        self._pipe, denoisers = _split_pipeline(model)
        if isinstance(reductions, str):
            reductions = (reductions,)
        bad = [r for r in reductions if r not in REDUCTIONS]
        if bad:
            raise AttnmapError(f"reductions {bad} are unknown; choose among {', '.join(REDUCTIONS)}")
        if branch not in BRANCHES:
            raise AttnmapError(f"branch must be one of {', '.join(BRANCHES)}, got {branch!r}")
        if config is not None and not isinstance(config, Config):
            raise AttnmapError(f"config must be an attnmap.Config, got {type(config).__name__}")
        self.config = config
        if config is not None:
            per_block = per_block or config.store_per_block
            per_head = per_head or config.store_per_head
        if tokenizer is None and self._pipe is not None:
            tokenizer = getattr(self._pipe, "tokenizer", None)
        self.prompt, self.targets = resolve(targets, prompt, tokenizer)
        # the target tokens as the pipeline's text encoder should see them (checked during the run)
        self._expected_ids: Optional[list[int]] = None
        if self._pipe is not None and tokenizer is not None and self.prompt is not None and self.targets:
            with contextlib.suppress(Exception):
                self._expected_ids = list(tokenizer(self.prompt, add_special_tokens=True)["input_ids"])
        self._prompt_seen: Optional[bool] = None
        self._target_indices: dict[torch.device, list[tuple[str, int, torch.Tensor]]] = {}
        self.reductions = tuple(dict.fromkeys(reductions))
        self.per_block, self.per_head, self.branch = bool(per_block), bool(per_head), branch
        self.keep_cross = bool(keep_cross) or not self.targets
        self.backend = backend
        self.one_pass = bool(one_pass)
        self._blocks = _indices("blocks", blocks)
        self._steps = _indices("steps", steps)
        if store is not None and video_id is None:
            raise AttnmapError("store= needs video_id= (a str, or one per batch row)")
        self._store = None if store is None else Path(store)
        self._video_ids = [video_id] if isinstance(video_id, str) else list(video_id or [])
        self._extra_meta = dict(metadata or {})

        self._explicit: dict[str, Layout] = {}
        self._explicit_all: Optional[Layout] = None
        spec = None
        if isinstance(layout, Layout):
            self._explicit_all = layout
        elif isinstance(layout, Mapping):
            self._explicit = dict(layout)
            for name, lay in self._explicit.items():
                if not isinstance(lay, Layout):
                    raise AttnmapError(
                        f"layout[{name!r}] must be an attnmap.Layout, got {type(lay).__name__}"
                    )
        elif layout is not None:
            raise AttnmapError(
                f"layout must be an attnmap.Layout or a mapping module name -> Layout, got {layout!r}"
            )
        specs = []
        for denoiser in denoisers:
            spec = models.infer(denoiser)
            if spec is None and layout is not None:
                spec = models.generic(denoiser)
            if spec is None or not spec.sites:
                raise AttnmapError(
                    f"model {type(denoiser).__name__} has no attention module attnmap knows how to read; "
                    "pass layout=attnmap.Layout... (applied to every module whose class name says attention)"
                )
            specs.append(spec)
        if self._explicit:
            names = {s.name for sp in specs for s in sp.sites}
            missing = sorted(set(self._explicit) - names)
            if missing:
                raise AttnmapError(
                    f"layout names modules {missing} that are not attention modules of the model"
                )
        if self._pipe is not None:  # the pipeline's own VAE factors (Wan, LTX name them so)
            t = getattr(self._pipe, "vae_scale_factor_temporal", None)
            hw = getattr(self._pipe, "vae_scale_factor_spatial", None)
            for sp in specs:
                if isinstance(t, int) and isinstance(hw, int) and sp.vae_stride is not None:
                    sp.vae_stride[:] = [t, hw, hw]
        if self._blocks is not None:
            known = sorted({site.block for sp in specs for site in sp.sites})
            unknown = sorted(self._blocks - set(known))
            if unknown:
                raise AttnmapError(
                    f"blocks {unknown} are not blocks of the model; its attention blocks are {known[0]}..{known[-1]}"
                )
        self._specs = specs
        self._spec = specs[0]
        self.model_name = type(self._spec.core).__name__

        self._mode: Optional[_Mode] = None
        self._handles: list[Any] = []
        self._restore: list[Callable[[], None]] = []
        self._stack: list[models.Site] = []
        self._inputs = models.InputInfo()
        self._rows: list[tuple[str, slice]] = [("cond", slice(None))]
        self._label: Optional[str] = None
        self._warned: set[tuple[str, str]] = set()
        self._step = 0
        self._maps: dict[int, dict[Key, list[Any]]] = {}
        self._written: set[int] = set()
        self._writers: dict[str, Any] = {}
        self._layouts: dict[str, dict[str, Any]] = {}
        self._seen_blocks: set[int] = set()
        self._nonfinite: dict[str, torch.Tensor] = {}  # module name -> a NaN flag on its device, per step
        self._active = False

    # -- the context -------------------------------------------------------------------------
    def __enter__(self) -> Recorder:
        if self._active:
            raise RuntimeError("this Recorder is already open; make a new one with attnmap.capture(...)")
        self._active = True
        try:
            for spec in self._specs:
                self._handles.append(
                    spec.core.register_forward_pre_hook(self._make_core_hook(spec), with_kwargs=True)
                )
                for site in spec.sites:
                    self._handles.append(site.module.register_forward_pre_hook(self._make_push(site)))
                    self._handles.append(
                        site.module.register_forward_hook(self._make_pop(site), always_call=True)
                    )
                self._wrap_cache_context(spec.core)
            encoder = getattr(self._pipe, "text_encoder", None)
            if self._expected_ids is not None and isinstance(encoder, torch.nn.Module):
                self._handles.append(encoder.register_forward_pre_hook(self._check_prompt, with_kwargs=True))
            self._mode = _Mode(self)
            self._mode.__enter__()
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._teardown()
        if exc_type is None and self._prompt_seen is False:
            warnings.warn(
                f"attnmap.capture: the pipeline's text encoder never saw the tokens of {self.prompt!r}, so the "
                f"target indices {self.targets} may point at other tokens; pass rec.prompt (the prompt "
                "without the target parentheses) to the pipeline",
                stacklevel=2,
            )
        if exc_type is None:
            self._finish_step()
            self._close_store()

    def _teardown(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for restore in reversed(self._restore):
            restore()
        self._restore.clear()
        self._stack.clear()
        self._active = False

    def _wrap_cache_context(self, core: torch.nn.Module) -> None:
        """Read the branch name of diffusers' ``cache_context("cond" / "uncond")`` (Wan runs the
        two CFG branches as separate forwards inside it)."""
        original = getattr(core, "cache_context", None)
        if original is None:
            return
        missing = object()
        previous = core.__dict__.get("cache_context", missing)

        @contextlib.contextmanager
        def cache_context(name: str, *args: Any, **kwargs: Any) -> Iterator[None]:
            label, self._label = self._label, name
            try:
                with original(name, *args, **kwargs):
                    yield
            finally:
                self._label = label

        object.__setattr__(core, "cache_context", cache_context)

        def restore() -> None:
            if previous is missing:
                core.__dict__.pop("cache_context", None)
            else:
                object.__setattr__(core, "cache_context", previous)

        self._restore.append(restore)

    # -- hooks -------------------------------------------------------------------------------
    def _check_prompt(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Did some row of the text encoder's ``input_ids`` start with the clean prompt's tokens?"""
        ids = args[0] if args else kwargs.get("input_ids")
        expected = self._expected_ids
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or not expected or self._prompt_seen:
            return
        n = len(expected)
        want = torch.tensor(expected, device=ids.device, dtype=ids.dtype)
        self._prompt_seen = ids.shape[1] >= n and bool((ids[:, :n] == want).all(dim=1).any())

    def _make_core_hook(self, spec: models.ModelSpec) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._spec = spec
            self._inputs = spec.inputs(spec.bind(args, kwargs))
            self._rows = self._branch_rows(self._inputs.batch)

        return hook

    def _make_push(self, site: models.Site) -> Callable[..., None]:
        def push(module: torch.nn.Module, args: Any) -> None:
            site.calls = 0
            self._stack.append(site)

        return push

    def _make_pop(self, site: models.Site) -> Callable[..., None]:
        def pop(module: torch.nn.Module, args: Any, output: Any) -> None:
            if self._stack and self._stack[-1] is site:
                self._stack.pop()
            elif site in self._stack:
                self._stack.remove(site)

        return pop

    def _branch_rows(self, batch: Optional[int]) -> list[tuple[str, slice]]:
        """Which rows of this forward's batch belong to which CFG branch, filtered by ``branch``."""
        if self._label in ("cond", "uncond"):  # separate CFG forwards (Wan, HunyuanVideo)
            rows = [(self._label, slice(None))]
        elif self._guidance() and batch is not None and batch % 2 == 0:
            # batched CFG (CogVideoX, LTX: cache_context "cond_uncond"): diffusers stacks [uncond, cond]
            rows = [("uncond", slice(0, batch // 2)), ("cond", slice(batch // 2, batch))]
        else:
            rows = [("cond", slice(None))]
        return [(b, s) for b, s in rows if self.branch in ("both", b)]

    def _guidance(self) -> bool:
        """Whether the pipeline runs classifier-free guidance now."""
        if self._pipe is None:
            return False
        flag = getattr(self._pipe, "do_classifier_free_guidance", None)
        if flag is None:
            scale = getattr(self._pipe, "guidance_scale", None)
            flag = isinstance(scale, (int, float)) and scale > 1.0
        return bool(flag)

    def _warn(self, site: models.Site, reason: str) -> None:
        if (site.name, reason) in self._warned:
            return
        self._warned.add((site.name, reason))
        warnings.warn(
            f"attnmap.capture: skipping the attention of module {site.name!r}: {reason}", stacklevel=3
        )

    def _recording(self, site: models.Site) -> bool:
        if self._steps is not None and self._step not in self._steps:
            return False
        if self._blocks is not None and site.block not in self._blocks:
            return False
        return bool(self._rows)

    # -- layouts -----------------------------------------------------------------------------
    def _layout(self, site: models.Site, nq: int, nk: int) -> Union[Layout, str]:
        """The layout of a call, or the reason there is none."""
        explicit = self._explicit.get(site.name, self._explicit_all)
        if explicit is not None:
            if explicit.num_queries != nq or explicit.num_keys != nk:
                return (
                    f"layout {explicit} expects {explicit.num_queries} queries and {explicit.num_keys} keys, "
                    f"the call has {nq} and {nk}"
                )
            return explicit
        grid = self._inputs.grid
        if grid is None:
            return "the model's forward inputs gave no video grid; pass layout="
        nv = grid[0] * grid[1] * grid[2]
        prefix = self._spec.prefix
        if site.role == "self":
            extra = nq - nv
            if nq != nk or extra < 0 or (prefix is not None and extra != prefix):
                return (
                    f"self-attention over grid {grid} (+{prefix} prefix) does not fit {nq} queries, {nk} keys"
                )
            return Layout.self_attn(grid, prefix=extra)
        if site.role == "cross":
            if nq != nv or nk < 1:
                return f"cross-attention from grid {grid} ({nv} tokens) does not fit {nq} queries"
            return Layout.cross(grid, text=nk)
        if site.role == "joint":
            if nq != nk or nq < nv:
                return f"joint attention over grid {grid} does not fit {nq} queries, {nk} keys"
            return Layout.joint(nq - nv, grid, text_first=self._spec.text_first)
        return f"role {site.role!r} needs an explicit layout"

    # -- the reductions ----------------------------------------------------------------------
    @staticmethod
    def _forward_with_lse(call: dict[str, Any]) -> tuple[Any, Optional[torch.Tensor]]:
        """The attention forward through the kernel SDPA itself picks, plus the rows' logsumexp."""
        q, k, v = call.get("query"), call.get("key"), call.get("value")
        if not (
            isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
        ) or not (q.dim() == k.dim() == v.dim() == 4):
            return _SDPA(**call), None
        return reduce.sdpa_with_lse(
            q,
            k,
            v,
            attn_mask=call.get("attn_mask"),
            scale=call.get("scale"),
            is_causal=bool(call.get("is_causal")),
            dropout_p=float(call.get("dropout_p") or 0.0),
            enable_gqa=bool(call.get("enable_gqa", False)),
        )

    def _on_sdpa(self, site: models.Site, call: dict[str, Any], lse: Optional[torch.Tensor] = None) -> None:
        index = site.calls
        site.calls += 1
        if not self._recording(site):
            return
        q, k = call.get("query"), call.get("key")
        if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() != 4 or k.dim() != 4:
            self._warn(site, "query/key are not [B, H, N, D] tensors")
            return
        if call.get("is_causal"):
            self._warn(site, "causal attention is not supported")
            return
        b, h, nq, _ = q.shape
        nk = k.shape[2]
        layout = self._layout(site, nq, nk)
        if isinstance(layout, str):
            self._warn(site, layout)
            return
        ok, mask = _padding_mask(call.get("attn_mask"), b, h, nk)
        if not ok:
            self._warn(site, mask)
            return
        split = len(self._rows) > 1 or self._rows[0][1] != slice(None)
        if split and self._inputs.batch is not None and b != self._inputs.batch:
            self._warn(site, f"batch {b} differs from the model's batch {self._inputs.batch}")
            return
        image = site.role == "cross" and getattr(site.module, "add_k_proj", None) is not None and index == 0
        prefix = "image/" if image else ""
        wanted = [r for r in self.reductions if layout.supports(r)]
        if not wanted:
            return
        if prefix + layout.kind not in self._layouts:
            self._layouts[prefix + layout.kind] = layout.to_dict()

        # one branch: reduce only its rows; two (batched CFG): reduce all rows once, then split
        sel = self._rows[0][1] if len(self._rows) == 1 else slice(None)
        # the CPU kernel reduces into just the kept columns; elsewhere the full cross map is as cheap
        cpu = q.device.type == "cpu"
        groups = self._text_groups(site, layout, prefix) if cpu and "cross" in wanted else None
        grouped = cpu and set(wanted) <= NATIVE_REDUCTIONS  # the CPU kernel forms the softmax itself
        with torch.no_grad():
            out = reduce.attention_sums(
                q.detach()[sel],
                k.detach()[sel],
                layout,
                tuple(wanted),
                per_head=self.per_head,
                scale=call.get("scale"),
                key_padding_mask=None if mask is None else mask[sel],
                lse=None if lse is None or grouped else lse[sel],
                backend=self.backend,
                check_finite=False,  # no device sync per call: NaN is flagged on the device instead
                text_groups=None if groups is None else groups[0],
            )
            if groups is not None:  # the cross map arrives as one column per kept map
                cross = out.pop("cross")
                for col, name in enumerate(groups[1]):
                    out[name] = cross[..., col].unflatten(-1, layout.grid)
            bad = torch.stack([t.isnan().any() for t in out.values()]).any()
            seen = self._nonfinite.get(site.name)
            self._nonfinite[site.name] = bad if seen is None else seen | bad
            if len(self._rows) == 1:
                self._add_call(site, layout, out, self._rows[0][0], prefix, sel)
            else:
                for branch, rows in self._rows:
                    self._add_call(site, layout, {n: t[rows] for n, t in out.items()}, branch, prefix, rows)

    def _real_text(self, rows: slice) -> Optional[int]:
        """The real (unpadded) text length of these batch rows, if the inputs tell it."""
        if self._inputs.text_len is None:
            return None
        lens = self._inputs.text_len[rows]
        return max(lens) if lens else None

    def _text_groups(
        self, site: models.Site, layout: Layout, prefix: str
    ) -> Optional[tuple[list[list[int]], list[str]]]:
        """With targets and no full cross map to keep: each target's text keys and the padded tail as
        ``attention_sums``'s ``text_groups``, and the map each column becomes, so that the call
        reduces into those few columns instead of every text key. None: reduce the full map."""
        if self.keep_cross or prefix:
            return None
        groups: list[list[int]] = []
        names: list[str] = []
        for word, indices in self.targets.items():
            if max(indices) >= layout.text:
                self._warn(
                    site, f"target {word!r} has token index {max(indices)} >= {layout.text} text tokens"
                )
                continue
            groups.append(list(indices))
            names.append(f"token/{word}")
        if layout.kind == "cross":
            reals = {self._real_text(rows) for _, rows in self._rows}
            if len(reals) != 1:
                return None  # branches with different text lengths: each finds its padding below
            real = reals.pop()
            if real is not None and 0 < real < layout.text:
                groups.append(list(range(real, layout.text)))
                names.append("padding")
        return (groups, names) if groups else None

    def _target_index(self, device: torch.device) -> list[tuple[str, int, torch.Tensor]]:
        """``(word, its largest token index, its token indices on device)`` per target, made once per
        device (indexing with a list would copy it to the device on every call)."""
        found = self._target_indices.get(device)
        if found is None:
            found = [(w, max(i), torch.tensor(i, device=device)) for w, i in self.targets.items()]
            self._target_indices[device] = found
        return found

    def _add_call(
        self,
        site: models.Site,
        layout: Layout,
        out: dict[str, torch.Tensor],
        branch: str,
        prefix: str,
        rows: slice,
    ) -> None:
        grid = layout.grid
        maps: dict[str, torch.Tensor] = {}
        for name, value in out.items():
            if name.startswith("token/") or name == "padding":  # from text groups (_text_groups)
                maps[name] = value
                continue
            if name != "cross":
                # a cross call's received/full maps are over text keys: kept apart from self-attention's
                maps[f"{name}/text" if layout.kind == "cross" and not prefix else name] = value
                continue
            real = value.shape[-1]
            if not prefix and layout.kind == "cross" and self._inputs.text_len is not None:
                known = self._real_text(rows)
                real = real if known is None else known
                if 0 < real < value.shape[-1]:
                    pad = value[..., real:].sum(-1)
                    maps["padding"] = pad.unflatten(-1, grid)
            if prefix:
                maps["cross"] = value
                continue
            for word, last, idx in self._target_index(value.device):
                if last >= value.shape[-1]:
                    self._warn(
                        site, f"target {word!r} has token index {last} >= {value.shape[-1]} text tokens"
                    )
                    continue
                maps[f"token/{word}"] = value[..., idx].sum(-1).unflatten(-1, grid)
            if self.keep_cross:
                maps["cross"] = value[..., :real]
        block = site.block if self.per_block else None
        self._seen_blocks.add(site.block)
        acc = self._maps.setdefault(self._step, {})
        for name, value in maps.items():
            key = (branch, prefix + name, block)
            slot = acc.get(key)
            if slot is None:
                acc[key] = [value.detach().float().clone(), 1]
            elif slot[0].shape != value.shape:
                self._warn(
                    site, f"{prefix + name} changed shape from {tuple(slot[0].shape)} to {tuple(value.shape)}"
                )
            else:
                slot[0] += value
                slot[1] += 1

    def _on_probs(self, site: models.Site, probs: torch.Tensor) -> None:
        """TimeSformer: attention probabilities ``[B*F, heads, 1+HW, 1+HW]`` (space) or
        ``[B*HW, heads, F, F]`` (time), from its eager softmax."""
        if site.role not in ("space", "time") or not self._recording(site) or probs.dim() != 4:
            return
        grid, batch = self._inputs.grid, self._inputs.batch
        if grid is None or batch is None:
            self._warn(site, "the model's forward inputs gave no video grid")
            return
        f, hw = grid[0], grid[1] * grid[2]
        n = probs.shape[-1]
        expect = (batch * f, 1 + hw) if site.role == "space" else (batch * hw, f)
        if (probs.shape[0], n) != expect:
            self._warn(site, f"{site.role} attention of shape {tuple(probs.shape)} does not fit grid {grid}")
            return
        with torch.no_grad():
            p = probs.detach().float()
            p = p if self.per_head else p.mean(dim=1, keepdim=True)
            p = p.unflatten(0, (batch, -1))  # [B, F or HW, h, n, n]
            p = p.transpose(1, 2) if self.per_head else p.squeeze(2)
            out = {f"full/{site.role}": p}
            if site.role == "time" and "temporal" in self.reductions:
                out["temporal"] = p.mean(dim=-3)
            self._layouts.setdefault(site.role, {"kind": site.role, "grid": list(grid), "prefix": 1})
            self._add_call(site, Layout.self_attn(grid), out, "cond", "", slice(None))

    # -- steps -------------------------------------------------------------------------------
    def callback(
        self, pipe: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """A diffusers ``callback_on_step_end``: closes the step that just ran and starts the next."""
        self._finish_step()
        self._step = int(step_index) + 1
        return callback_kwargs

    def step(self) -> int:
        """Close the current step (written to the store if any) and start the next; returns its index."""
        self._finish_step()
        self._step += 1
        return self._step

    @property
    def current_step(self) -> int:
        return self._step

    def _warn_nonfinite(self) -> None:
        """One warning per step naming the modules whose maps got NaN (NaN or inf in q or k)."""
        flags, self._nonfinite = self._nonfinite, {}
        bad = [name for name, flag in flags.items() if bool(flag)]
        if bad:
            warnings.warn(
                f"attnmap.capture: step {self._step}: the attention of module(s) {', '.join(map(repr, bad))} "
                "got NaN or inf in its query or key; the maps of that step are NaN",
                stacklevel=4,
            )

    def _finish_step(self) -> None:
        self._warn_nonfinite()
        acc = self._maps.get(self._step)
        if not acc or self._step in self._written:
            return
        for slot in acc.values():
            slot[0] = slot[0].to("cpu")
        if self._store is not None and (self.config is None or self.config.store_attention):
            rows = next(iter(acc.values()))[0].shape[0]
            if len(self._video_ids) != rows:
                raise AttnmapError(
                    f"video_id gives {len(self._video_ids)} id(s) {self._video_ids} but the model ran "
                    f"{rows} video(s) per branch; pass one id per video"
                )
            for row, vid in enumerate(self._video_ids):
                self._writer(vid).write_step(self._step, self._step_maps(self._step, row))
        self._written.add(self._step)

    # -- reading -----------------------------------------------------------------------------
    @property
    def steps(self) -> list[int]:
        """The steps with recorded maps."""
        return sorted(s for s, acc in self._maps.items() if acc)

    @property
    def blocks(self) -> list[int]:
        """The blocks whose attention was recorded, as the model numbers them."""
        return sorted(self._seen_blocks)

    @property
    def tokens(self) -> list[str]:
        """The target words."""
        return list(self.targets)

    @property
    def nbytes(self) -> int:
        """Bytes of the maps held (per step, per kept block and branch)."""
        return sum(
            slot[0].numel() * slot[0].element_size() for acc in self._maps.values() for slot in acc.values()
        )

    @property
    def names(self) -> list[str]:
        """The recorded map names (without branch or block)."""
        return sorted({name for acc in self._maps.values() for (_, name, _) in acc})

    def _value(self, step: int, branch: str, name: str, block: Optional[int]) -> Optional[torch.Tensor]:
        acc = self._maps.get(step, {})
        if block is not None or not self.per_block:
            slot = acc.get((branch, name, block))
            return None if slot is None else slot[0] / slot[1]
        parts = [s[0] / s[1] for (br, nm, _), s in acc.items() if br == branch and nm == name]
        return torch.stack(parts).mean(0) if parts else None

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
        values = [v for s in steps if (v := self._value(s, branch, name, block)) is not None]
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
                value = self.get(f"full/{kind}", step=step, block=block)  # [B, (H,) F or HW, n, n]
                if self.per_head:
                    value = value.transpose(1, 2)
                maps.append(value.flatten(0, 1))
        return out

    def _step_maps(self, step: int, row: int) -> dict[str, torch.Tensor]:
        """The maps of one step for one batch row, named as the store expects."""
        out: dict[str, torch.Tensor] = {}
        acc = self._maps.get(step, {})
        for branch, name, block in sorted(acc, key=lambda k: (k[0], k[1], -1 if k[2] is None else k[2])):
            pre = "" if branch == "cond" else f"{branch}/"
            value = self._value(step, branch, name, block)
            if value is None:
                continue
            suffix = "" if block is None else f"/block{block}"
            out[pre + name + suffix] = value[row].contiguous()
            if block is not None and pre + name not in out:
                mean = self._value(step, branch, name, None)
                if mean is not None:
                    out[pre + name] = mean[row].contiguous()
        return out

    @property
    def metadata(self) -> dict[str, Any]:
        spec, inputs = self._spec, self._inputs
        main = next(iter(self._layouts.values()), None)
        meta: dict[str, Any] = {
            "model": self.model_name,
            "family": spec.family,
            "prompt": self.prompt,
            "targets": {w: list(i) for w, i in self.targets.items()},
            "layout": main,
            "layouts": dict(self._layouts),
            "grid": None if inputs.grid is None else list(inputs.grid),
            "patch_size": spec.patch_size,
            "vae_stride": spec.vae_stride,
            "video": {"fps": None, **(inputs.video or {})},
            "steps": self.steps,
            "blocks": self.blocks,
            "branch": self.branch,
            "reductions": list(self.reductions),
            "per_head": self.per_head,
            "per_block": self.per_block,
        }
        for key, value in self._extra_meta.items():
            if isinstance(value, dict) and isinstance(meta.get(key), dict):
                meta[key] = {**meta[key], **value}
            else:
                meta[key] = value
        return meta

    # -- storing -----------------------------------------------------------------------------
    def _writer(self, video_id: str, root: Optional[Path] = None) -> Any:
        from attnmap.store import StoreWriter

        writer = self._writers.get(video_id)
        if writer is None:
            cfg = self.config or Config()
            writer = StoreWriter(
                root or self._store,  # type: ignore[arg-type]
                video_id,
                self.metadata,
                dtype=cfg.storage_dtype,
                downsample=cfg.spatial_downsample_factor,
            )
            self._writers[video_id] = writer
        return writer

    def _close_store(self) -> None:
        if self._store is None or not self._writers:
            return
        cfg = self.config
        for writer in self._writers.values():
            # store_aggregated_attention: false leaves the aggregate empty (the steps stay loadable)
            writer.close(None if cfg is None or cfg.store_aggregated_attention else {})
        if cfg is None:
            return
        from attnmap.store import video_dirname

        if cfg.auto_generate_per_video:
            from attnmap.render.videos import render_video

            for vid in self._writers:
                out_dir = self._store / video_dirname(vid) / "attention_videos"
                render_video(self._store, vid, out_dir, cfg.visualization_params)
        if cfg.auto_generate_videos:
            from attnmap.render.videos import render_store

            render_store(self._store, cfg.visualization_params)

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
        from attnmap.store import StoreWriter

        if not isinstance(video_id, str) or not video_id:
            raise AttnmapError(f"video_id must be a non-empty str, got {video_id!r}")
        if not self.steps:
            raise AttnmapError("nothing was recorded: run the model inside the capture context first")
        rows = next(iter(self._maps[self.steps[0]].values()))[0].shape[0]
        if isinstance(batch_index, bool) or not isinstance(batch_index, int) or not 0 <= batch_index < rows:
            raise AttnmapError(
                f"batch_index must be an int in [0, {rows}) (the recorded videos), got {batch_index!r}"
            )
        cfg = self.config or Config()
        root = Path(path)
        with StoreWriter(
            root, video_id, self.metadata, dtype=cfg.storage_dtype, downsample=cfg.spatial_downsample_factor
        ) as writer:
            for step in self.steps:
                writer.write_step(step, self._step_maps(step, batch_index))
            # store_aggregated_attention: false leaves the aggregate empty, as for store=
            writer.close(None if cfg.store_aggregated_attention else {})
        return root


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


def _split_pipeline(model: Any) -> tuple[Any, list[torch.nn.Module]]:
    """``(pipeline or None, [denoisers])``: a diffusers pipeline's transformer(s) or the model itself."""
    if isinstance(model, torch.nn.Module):
        return None, [model]
    found = [getattr(model, n, None) for n in ("transformer", "transformer_2", "unet")]
    nets = [m for m in found if isinstance(m, torch.nn.Module)]
    if not nets:
        raise AttnmapError(
            f"model must be a torch.nn.Module or a diffusers pipeline with a transformer, got {type(model).__name__}"
        )
    return model, nets


def capture(
    model: Any,
    *,
    reductions: Sequence[str] = ("cross", "temporal"),
    targets: Optional[Targets] = None,
    prompt: Optional[str] = None,
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
    one_pass: bool = False,
) -> Recorder:
    """Record attention maps of ``model`` while the returned context is open.

    Args:
        model: a torch module (diffusers Wan, CogVideoX, HunyuanVideo, LTX-Video transformers,
            transformers VJEPA2, VideoMAE, TimeSformer, timm ViTs: layouts inferred) or a diffusers
            pipeline (its ``transformer``); any other module with ``layout=``.
        reductions: among ``cross``, ``temporal``, ``text``, ``received``, ``full``.
        targets: words (marked ``"(word)"`` in ``prompt`` by default), a list of words, or a mapping
            word -> token indices; their cross maps ``token/<word>`` ``[F, H, W]`` are kept per step.
        prompt: the prompt; ``rec.prompt`` is it without the target parentheses (pass that to the model).
        tokenizer: maps words to tokens (a pipeline's own tokenizer by default).
        layout: one Layout for every attention module, or ``{module name: Layout}``; None: inferred.
        blocks: the blocks to record (the model's numbering from 0; HunyuanVideo's single-stream
            blocks are numbered after its dual-stream ones); None: all.
        steps: the steps to record; None: all. ``rec.callback`` / ``rec.step()`` advance the step.
        per_block: keep ``<name>/block<b>`` maps too; per_head: keep heads (H after the batch dim).
        branch: classifier-free guidance branch: ``"cond"``, ``"uncond"`` or ``"both"``.
        store, video_id: write each step to this store as it completes (one id per batch row).
        config: an :class:`attnmap.Config`: per head/block, storage dtype, downsampling, auto-render.
        keep_cross: keep the full cross map ``cross`` ``[Nv, Nt]`` also when there are targets.
        metadata: extra JSON-safe metadata, merged over what capture records. Capture fills
            ``video`` ``{frames, height, width}`` with the pixel size the model's latents decode to
            (a pipeline's own VAE strides where it names them, else the family's), and leaves
            ``fps`` None: the pipeline does not know it. Auto-render overlays the maps on the
            generated video only when ``video.path`` names it (relative to the store root, or
            absolute) and the file exists when the context closes: pass
            ``metadata={"video": {"path": "videos/v0.mp4", "fps": 16}}`` and export the video
            inside the ``with`` block.
        backend: the reduction backend of :func:`attnmap.attention_sums`.
        one_pass: run each recorded attention call through :func:`attnmap.reduce.sdpa_with_lse` (the
            kernel SDPA itself picks, through its aten op that also returns the logsumexp) and reduce
            in one pass instead of two. Where torch offers no such op for a call, SDPA runs as usual.
            A capture opened inside another capture, or inside any torch function mode other than
            ``torch.device``, runs SDPA as usual (two passes), so that the outer one still sees the call.
            It saves time on CUDA; on the CPU, cross/temporal/text come from a kernel that forms the
            softmax itself, so there it only changes the aten entry point of the model's call.

    Returns:
        a :class:`Recorder`, to use as a context manager.

    Raises:
        AttnmapError: a target word not in the prompt, a model with no known attention, a bad argument.
        A call whose shapes fit no layout is skipped with one warning naming the module.

    Example:
        >>> with attnmap.capture(pipe, prompt="A romantic (kiss) with (flowers)",
        ...                      store="attention_maps", video_id="prompt_001_vid_001") as rec:  # doctest: +SKIP
        ...     pipe(rec.prompt, num_frames=81, callback_on_step_end=rec.callback)
        >>> rec.get("token/kiss", step=0).shape  # [B, F, H, W] latent tokens  # doctest: +SKIP
        torch.Size([1, 21, 30, 52])
        >>> with attnmap.capture(videomae, reductions=("temporal",), per_block=True) as rec:  # doctest: +SKIP
        ...     videomae(pixel_values)
        >>> rec.get("temporal", block=3).shape  # doctest: +SKIP
        torch.Size([1, 8, 8])
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
    )


__all__ = ["REDUCTIONS", "Recorder", "capture"]
