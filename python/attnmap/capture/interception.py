"""Interception: the attention entry points people use, the module stack, and the calls they emit.

An :class:`Interceptor` sees every attention call made inside a watched module and hands it, as an
:class:`Intercepted` (q and k in the SDPA layout ``[B, H, N, D]``, mask, scale, entry point), to a
sink. The model's own call always runs exactly as before; the interceptor only looks at its inputs.
The entry points:

- diffusers' ``dispatch_attention_fn``, for every backend it dispatches to (flex, flash, sage,
  xformers, hub kernels ...). Modules import it by name, so it is replaced where it is looked up:
  in every loaded module that holds it. Backends that end in torch SDPA (``native`` and the
  ``_native_*`` variants) are left to the SDPA entry point below, so that a call is seen once;
- transformers' attention interface (``AttentionInterface``'s functions: sdpa, flash_attention_*,
  flex_attention) and the ``eager_attention_forward`` of a watched module's modeling file;
- ``torch.nn.functional.scaled_dot_product_attention`` through a ``TorchFunctionMode``, for every
  processor that calls it itself (and for the SDPA backends above);
- softmax calls, for the modules whose family reads eager probabilities (TimeSformer).

Forward hooks on the watched modules keep the module stack: a call belongs to the innermost
watched module running. The hooks and the hand-over to the sink are ``torch.compiler.disable``d,
so under ``torch.compile`` they are deliberate graph breaks and run as plain Python, while the
model's attention stays in the compiled graph.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils._device import DeviceContext

_SDPA = torch.nn.functional.scaled_dot_product_attention
_SOFTMAX = (torch.Tensor.softmax, torch.softmax, torch.nn.functional.softmax)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DISPATCH_ARGS = (*_SDPA_ARGS[:-1], "enable_gqa", "attention_kwargs")
#: diffusers backends whose implementation calls torch SDPA (seen there, not at the dispatcher)
SDPA_BACKENDS = frozenset({"native", "_native_cudnn", "_native_efficient", "_native_flash", "_native_math"})
#: transformers attention functions that call torch SDPA
_TRANSFORMERS_SDPA = frozenset({"sdpa"})


@dataclass(eq=False)
class Site:
    """One watched module: its qualified name, block number and, per forward, how many calls it made."""

    name: str
    module: torch.nn.Module
    block: int
    role: str = "auto"  # "auto" (layouts inferred from shapes), or a family's role ("space", "time")
    calls: int = 0  # attention calls inside the module's current forward
    entered: int = 0  # forwards of the module while the capture was open
    seen: int = 0  # attention calls seen while the capture was open


@dataclass(frozen=True, eq=False)
class Intercepted:
    """One attention call as an entry point saw it, in the SDPA layout.

    ``query`` ``[B, H, Nq, D]`` and ``key`` ``[B, Hk, Nk, D]`` are the tensors the model passed
    (views, never copies); ``entry`` names the entry point (``"sdpa"``, ``"diffusers:flex"``,
    ``"transformers:eager"`` ...); ``index`` is the call's position among its module's calls in this
    forward; ``lse`` the rows' logsumexp when the call ran through :func:`attnmap.reduce.sdpa_with_lse`.
    """

    query: torch.Tensor
    key: torch.Tensor
    attn_mask: Optional[torch.Tensor]
    scale: Optional[float]
    is_causal: bool
    entry: str
    index: int = 0
    lse: Optional[torch.Tensor] = None


Emit = Callable[[Site, Intercepted], None]
Probs = Callable[[Site, torch.Tensor], None]


def bind(names: Sequence[str], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A call's arguments by name, however they were passed."""
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _blhd(t: Any) -> Optional[torch.Tensor]:
    """A ``[B, S, H, D]`` tensor as a ``[B, H, S, D]`` view (None for anything else)."""
    return t.transpose(1, 2) if isinstance(t, torch.Tensor) and t.dim() == 4 else None


def diffusers_backend(backend: Any) -> str:
    """The name of the diffusers attention backend a dispatcher call runs with."""
    if backend is None:
        registry = _diffusers_registry()
        if registry is None:
            return "native"
        backend = registry._active_backend
    return str(getattr(backend, "value", backend))


def _diffusers_registry() -> Any:
    module = sys.modules.get("diffusers.models.attention_dispatch")
    return None if module is None else getattr(module, "_AttentionBackendRegistry", None)


class _Mode(TorchFunctionMode):
    """Forwards every torch call unchanged; shows SDPA (and, where asked, softmax) calls."""

    def __init__(self, owner: Interceptor) -> None:
        super().__init__()
        self.owner = owner
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
        owner = self.owner
        if func is _SDPA and owner.stack:
            if owner.one_pass and self.alone and not torch.compiler.is_compiling():
                found = owner.one_pass_sdpa(bind(_SDPA_ARGS, args, kwargs))
                if found is not None:
                    out, lse = found
                    owner.seen_sdpa(args, kwargs, lse)
                    return out
            out = func(*args, **kwargs)
            owner.seen_sdpa(args, kwargs, None)
            return out
        out = func(*args, **kwargs)
        if owner.softmax_roles and func in _SOFTMAX and owner.stack and isinstance(out, torch.Tensor):
            owner.seen_softmax(out)
        return out


def _keep_dynamo_out_of_the_mode() -> None:
    """Under torch.compile, dynamo would compile the mode's ``__torch_function__`` as a frame of its
    own each time an op runs eagerly between graphs (one recompilation per op signature, up to its
    limit); marked once, on first use, it is only ever inlined into the graphs being traced."""
    eval_frame = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    skip = getattr(eval_frame, "skip_code", None)
    if callable(skip):
        skip(_Mode.__torch_function__.__code__)


@dataclass
class _Patch:
    """One attribute replaced while the interceptor is open (restored on close)."""

    target: Any
    name: str
    previous: Any
    mapping: bool = False  # target is a dict, name a key

    def restore(self) -> None:
        if self.mapping:
            self.target[self.name] = self.previous
        else:
            setattr(self.target, self.name, self.previous)


@dataclass
class Interceptor:
    """Watches ``sites`` and emits their attention calls while open (a context manager).

    Args:
        sites: the watched modules; a call belongs to the innermost one running.
        emit: gets ``(site, call)`` for every attention call inside a site.
        probs: gets ``(site, probabilities)`` for softmax calls inside sites whose role is in
            ``softmax_roles`` (TimeSformer's eager attention).
        one_pass: run SDPA calls that ``wants_lse(site)`` through :func:`attnmap.reduce.sdpa_with_lse`.
        wants_lse: whether a site's next call will be recorded (only those take the one-pass path).
    """

    sites: Sequence[Site]
    emit: Emit
    probs: Optional[Probs] = None
    softmax_roles: frozenset[str] = frozenset()
    one_pass: bool = False
    wants_lse: Callable[[Site], bool] = lambda site: False
    stack: list[Site] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list)
    _patches: list[_Patch] = field(default_factory=list)
    _mode: Optional[_Mode] = None

    # -- opening and closing -------------------------------------------------------------
    def __enter__(self) -> Interceptor:
        _keep_dynamo_out_of_the_mode()
        try:
            for site in self.sites:
                self._handles.append(site.module.register_forward_pre_hook(self._push(site)))
                self._handles.append(site.module.register_forward_hook(self._pop(site), always_call=True))
            self._patch_diffusers()
            self._patch_transformers()
            self._mode = _Mode(self)
            self._mode.__enter__()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove the mode, the hooks and the patches (safe to call twice)."""
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for patch in reversed(self._patches):
            patch.restore()
        self._patches.clear()
        self.stack.clear()

    # -- the module stack ----------------------------------------------------------------
    def _push(self, site: Site) -> Callable[..., None]:
        @torch.compiler.disable
        def push(module: torch.nn.Module, args: Any) -> None:
            site.calls = 0
            site.entered += 1
            self.stack.append(site)

        return push

    def _pop(self, site: Site) -> Callable[..., None]:
        @torch.compiler.disable
        def pop(module: torch.nn.Module, args: Any, output: Any) -> None:
            if self.stack and self.stack[-1] is site:
                self.stack.pop()
            elif site in self.stack:
                self.stack.remove(site)

        return pop

    # -- emitting --------------------------------------------------------------------------
    def _hand_over(self, call: Intercepted) -> None:
        site = self.stack[-1]
        site.calls += 1
        site.seen += 1
        self.emit(site, call)

    @torch.compiler.disable
    def seen_sdpa(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any], lse: Optional[torch.Tensor]
    ) -> None:
        """An SDPA call inside a site (its output already computed)."""
        if not self.stack:
            return
        call = bind(_SDPA_ARGS, args, kwargs)
        q, k = call.get("query"), call.get("key")
        site = self.stack[-1]
        self._hand_over(
            Intercepted(
                query=q,  # type: ignore[arg-type]
                key=k,  # type: ignore[arg-type]
                attn_mask=call.get("attn_mask"),
                scale=call.get("scale"),
                is_causal=bool(call.get("is_causal", False)),
                entry="sdpa",
                index=site.calls,
                lse=lse,
            )
        )

    @torch.compiler.disable
    def seen_softmax(self, probs: torch.Tensor) -> None:
        if self.stack and self.probs is not None and self.stack[-1].role in self.softmax_roles:
            self.probs(self.stack[-1], probs)

    def one_pass_sdpa(self, call: dict[str, Any]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The SDPA forward plus its rows' logsumexp, for a call that will be recorded; None where
        the one-pass path does not apply (then SDPA runs as usual)."""
        from attnmap import reduce

        q, k, v = call.get("query"), call.get("key"), call.get("value")
        if not self.stack or not self.wants_lse(self.stack[-1]):
            return None
        if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
            return None
        out, lse = reduce.sdpa_with_lse(
            q,  # type: ignore[arg-type]
            k,  # type: ignore[arg-type]
            v,  # type: ignore[arg-type]
            attn_mask=call.get("attn_mask"),
            scale=call.get("scale"),
            is_causal=bool(call.get("is_causal")),
            dropout_p=float(call.get("dropout_p") or 0.0),
            enable_gqa=bool(call.get("enable_gqa", False)),
        )
        if lse is None:
            return None
        return out, lse

    # -- diffusers' dispatcher ---------------------------------------------------------------
    def _patch_diffusers(self) -> None:
        dispatch = sys.modules.get("diffusers.models.attention_dispatch")
        if dispatch is None:
            return
        original = getattr(dispatch, "dispatch_attention_fn", None)
        if original is None:
            return
        wrapper = self._dispatch_wrapper(original)
        for module in list(sys.modules.values()):
            if getattr(module, "dispatch_attention_fn", None) is original:
                self._patches.append(_Patch(module, "dispatch_attention_fn", original))
                setattr(module, "dispatch_attention_fn", wrapper)  # noqa: B010

    def _dispatch_wrapper(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def dispatch_attention_fn(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            self.seen_dispatch(args, kwargs)
            return out

        dispatch_attention_fn.__wrapped__ = original  # type: ignore[attr-defined]
        return dispatch_attention_fn

    @torch.compiler.disable
    def seen_dispatch(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        if not self.stack:
            return
        call = bind(_DISPATCH_ARGS, args, kwargs)
        backend = diffusers_backend(call.get("backend"))
        if backend in SDPA_BACKENDS and call.get("parallel_config") is None:
            return  # the SDPA entry point saw it
        q, k = _blhd(call.get("query")), _blhd(call.get("key"))
        if q is None or k is None:
            return
        site = self.stack[-1]
        self._hand_over(
            Intercepted(
                query=q,
                key=k,
                attn_mask=call.get("attn_mask"),
                scale=call.get("scale"),
                is_causal=bool(call.get("is_causal", False)),
                entry=f"diffusers:{backend}",
                index=site.calls,
            )
        )

    # -- transformers' attention interface ---------------------------------------------------
    def _patch_transformers(self) -> None:
        utils = sys.modules.get("transformers.modeling_utils")
        interface = None if utils is None else getattr(utils, "AttentionInterface", None)
        if interface is not None:
            mapping = interface._global_mapping
            for name, fn in list(mapping.items()):
                if name in _TRANSFORMERS_SDPA or name.startswith("paged|") or not callable(fn):
                    continue
                self._patches.append(_Patch(mapping, name, fn, mapping=True))
                mapping[name] = self._interface_wrapper(name, fn)
        done: set[str] = set()
        for site in self.sites:
            modname = type(site.module).__module__
            module = sys.modules.get(modname)
            eager = getattr(module, "eager_attention_forward", None)
            if (
                modname in done
                or module is None
                or not callable(eager)
                or not modname.startswith("transformers")
            ):
                continue
            done.add(modname)
            self._patches.append(_Patch(module, "eager_attention_forward", eager))
            module.eager_attention_forward = self._interface_wrapper("eager", eager)  # type: ignore[attr-defined]

    def _interface_wrapper(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def attention(
            module: torch.nn.Module,
            query: Any,
            key: Any,
            value: Any,
            attention_mask: Any,
            *args: Any,
            **kwargs: Any,
        ) -> Any:
            out = original(module, query, key, value, attention_mask, *args, **kwargs)
            self.seen_interface(name, query, key, attention_mask, kwargs)
            return out

        attention.__wrapped__ = original  # type: ignore[attr-defined]
        return attention

    @torch.compiler.disable
    def seen_interface(
        self, name: str, query: Any, key: Any, attention_mask: Any, kwargs: Mapping[str, Any]
    ) -> None:
        if not self.stack or not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor):
            return
        if query.dim() != 4 or key.dim() != 4:
            return
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) else None
        if attention_mask is not None and mask is None:  # a flex BlockMask: not a tensor attnmap reads
            mask = _UNREADABLE
        scale = kwargs.get("scaling", kwargs.get("scale"))
        cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        site = self.stack[-1]
        if isinstance(cu_q, torch.Tensor) and isinstance(cu_k, torch.Tensor) and query.shape[0] == 1:
            # packed sequences: one call per sequence, as rows of one batch
            bq, bk = cu_q.tolist(), cu_k.tolist()
            for i in range(len(bq) - 1):
                self._hand_over(
                    Intercepted(
                        query=query[:, :, bq[i] : bq[i + 1]],
                        key=key[:, :, bk[i] : bk[i + 1]],
                        attn_mask=None,
                        scale=scale,
                        is_causal=bool(kwargs.get("is_causal", False)),
                        entry=f"transformers:{name}:varlen",
                        index=site.calls,
                    )
                )
            return
        self._hand_over(
            Intercepted(
                query=query,
                key=key,
                attn_mask=mask,
                scale=scale,
                is_causal=bool(kwargs.get("is_causal", False)) and query.shape[2] > 1,
                entry=f"transformers:{name}",
                index=site.calls,
            )
        )


#: stands for a mask attnmap cannot read (a flex BlockMask); such calls are skipped with a reason
_UNREADABLE = torch.empty(0)


def unreadable(mask: Optional[torch.Tensor]) -> bool:
    """Whether a call's mask was one attnmap cannot read."""
    return mask is _UNREADABLE
