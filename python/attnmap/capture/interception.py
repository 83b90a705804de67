"""Interception: the attention entry points people use, the module stack, and the calls they emit.

An :class:`Interceptor` sees every attention call made inside a watched module and hands it, as an
:class:`Intercepted` (q and k in the SDPA layout ``[B, H, N, D]``, mask, scale, entry point), to a
sink. The model's own call always runs exactly as before; the interceptor only looks at its inputs.
The entry points:

- diffusers' ``dispatch_attention_fn``, for every backend it dispatches to (flex, flash, sage,
  xformers, hub kernels ...). Modules import it by name, so it is replaced where it is looked up:
  in every loaded module that holds it. Backends that end in torch SDPA (``native`` and the
  ``_native_*`` variants) are left to the SDPA entry point below, so that a call is seen once;
- under diffusers' context parallelism, ``_templated_context_parallel_attention`` (replaced the same
  way): the ``forward_op`` it is given is watched (:class:`~attnmap.capture.parallel.OpSpy`), and
  its calls (Ulysses' whole sequence for a head subset, the ring's key shards) become one call of the
  rank's query rows against the whole keys, with a :class:`~attnmap.capture.parallel.Shard` saying
  where they sit; nothing inside it is read again at SDPA. The dispatcher's own view of such a call
  (the local chunks) is never read;
- xDiT's ``USP`` (replaced where it is looked up), xDiT's attention processors and ParaAttention's
  function modes (seen on the mode stack at each call): their calls are refused with a reason naming
  the framework, never read as whole, and SDPA runs under a foreign mode as the plain torch function
  (a mode that asks ``func is F.scaled_dot_product_attention`` gets yes);
- transformers' attention interface (``AttentionInterface``'s functions: flash_attention_*,
  flex_attention; its sdpa for sites read there, ``Site.interface``: a video LLM's, before the sdpa
  function packs grouped queries) and the ``eager_attention_forward`` of a watched module's
  modeling file;
- ``torch.nn.functional.scaled_dot_product_attention``, replaced on ``torch.nn.functional`` and in
  every module that imported it by name (never in ``torch._C._nn``, where torch finds the function
  it hands a function mode), for every processor that calls it itself (and for the SDPA backends
  above). A replaced function, unlike a ``TorchFunctionMode``, is traced by
  ``torch.compile`` like any other Python, so a compiled model is compiled as it would be alone.
  (While a user's ``TorchFunctionMode`` is active, ``torch.nn.functional.scaled_dot_product_attention``
  is torch's own function again for the length of each call, so that the mode sees the function it
  compares with);
- softmax calls, through a ``TorchFunctionMode`` entered only for the families that read eager
  probabilities (TimeSformer).

Forward hooks on the watched modules keep the module stack: a call belongs to the innermost
watched module running. Under ``torch.compile`` the hooks and the entry points are traced into the
graph as they are (plain Python on a list), and the hand-over is an opaque operator,
``attnmap::observe``: a ``torch.library`` custom op with a fake implementation that takes the call's
q and k and the site's token. It runs, as plain Python outside the graph's kernels, when the compiled
graph runs, so the graph and inductor's fusion around the attention are those of the model alone
and the output stays bit-identical.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import sys
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils._device import DeviceContext

import attnmap.capture.parallel as parallel
from attnmap.capture.parallel import Shard

_SDPA = torch.nn.functional.scaled_dot_product_attention
_SOFTMAX = (torch.Tensor.softmax, torch.softmax, torch.nn.functional.softmax)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DISPATCH_ARGS = (*_SDPA_ARGS[:-1], "enable_gqa", "attention_kwargs")
#: diffusers' templated context-parallel attention, and its positional arguments
_TEMPLATED = "_templated_context_parallel_attention"
_TEMPLATED_ARGS = (*_SDPA_ARGS[:-1], "enable_gqa", "return_lse")
#: diffusers backends whose implementation calls torch SDPA (seen there, not at the dispatcher)
SDPA_BACKENDS = frozenset({"native", "_native_cudnn", "_native_efficient", "_native_flash", "_native_math"})
#: transformers attention functions that call torch SDPA
_TRANSFORMERS_SDPA = frozenset({"sdpa"})


#: ``Intercepted.context`` of a module that takes ``encoder_hidden_states`` and was given none
NO_CONTEXT = -1
UNKNOWN = -2  # a module whose forward takes no encoder_hidden_states: what its keys are is not known


@dataclass(eq=False)
class Site:
    """One watched module: its qualified name, block number and, per forward, how many calls it made."""

    name: str
    module: torch.nn.Module
    block: int
    role: str = "auto"  # "auto" (layouts inferred from shapes), or a family's role ("space", "time")
    calls: int = 0  # attention calls inside the module's current forward
    entered: bool = False  # the module ran while the capture was open (a flag: a count would be a new
    # constant to torch.compile at every forward, and recompile the graph each time)
    seen: int = 0  # attention calls seen while the capture was open
    token: int = -1  # the site's number for attnmap::observe while its interceptor is open
    context: int = UNKNOWN  # tokens of the encoder_hidden_states its current forward was given
    context_arg: Optional[int] = None  # the position of encoder_hidden_states among its forward's args
    takes_context: bool = False  # its forward takes encoder_hidden_states
    interface: bool = False  # read at transformers' attention interface, its "sdpa" function included


@dataclass(frozen=True, eq=False)
class Intercepted:
    """One attention call as an entry point saw it, in the SDPA layout.

    ``query`` ``[B, H, Nq, D]`` and ``key`` ``[B, Hk, Nk, D]`` are the tensors the model passed
    (views, never copies); ``entry`` names the entry point (``"sdpa"``, ``"diffusers:flex"``,
    ``"transformers:eager"`` ...); ``index`` is the call's position among its module's calls in this
    forward; ``lse`` the rows' logsumexp when the call ran through :func:`attnmap.reduce.sdpa_with_lse`;
    ``shard`` where a context-parallel rank's call sits in the whole call (its query rows, heads);
    ``refused`` why a call cannot be read (a framework's sharding attnmap cannot see); ``softcap``
    the cap transformers' interface was asked to put on the scores (``cap * tanh(s / cap)``);
    ``window`` the ``sliding_window`` it was given (a flash-attention function applies it itself).
    """

    query: torch.Tensor
    key: torch.Tensor
    attn_mask: Optional[torch.Tensor]
    scale: Optional[float]
    is_causal: bool
    entry: str
    index: int = 0
    lse: Optional[torch.Tensor] = None
    context: Optional[int] = None
    shard: Optional[Shard] = None
    refused: Optional[str] = None
    softcap: Optional[float] = None
    window: Optional[int] = None


Emit = Callable[[Site, Intercepted], None]
Probs = Callable[[Site, torch.Tensor], None]


#: (module token, nesting depth) -> (interceptor, site) of the open interceptors, for attnmap::observe
_TOKENS: dict[tuple[int, int], tuple[Interceptor, Site]] = {}
_OPEN: list[Interceptor] = []  # the open interceptors, first opened first
_NEXT = itertools.count()
#: one token per watched module, kept across captures (a compiled graph holds it as a constant)
_MODULE_TOKENS: weakref.WeakKeyDictionary[torch.nn.Module, int] = weakref.WeakKeyDictionary()
_SINK: list[torch.Tensor] = []  # what attnmap::observe "mutates", so that no compiler drops it


def _observe_op() -> Callable[..., None]:
    """``torch.ops.attnmap.observe``, defined on first use (never at import)."""
    if not _SINK:

        @torch.library.custom_op("attnmap::observe", mutates_args=("sink",))
        def observe(
            sink: torch.Tensor,
            query: torch.Tensor,
            key: torch.Tensor,
            mask: Optional[torch.Tensor],
            scale: Optional[float],
            is_causal: bool,
            token: int,
            depth: int,
            index: int,
            entry: str,
            context: int,
        ) -> None:
            """Hand one attention call to the interceptor open at ``depth`` that watches the module of
            ``token`` (a no-op once it closed)."""
            found = _TOKENS.get((token, depth))
            if found is not None:
                interceptor, site = found
                blocked = entry.endswith(":blockmask")
                call = Intercepted(
                    query=query,
                    key=key,
                    attn_mask=_UNREADABLE if blocked else mask,
                    scale=scale,
                    is_causal=is_causal,
                    entry=entry.removesuffix(":blockmask"),
                    index=index,
                    context=None if context == UNKNOWN else context,
                )
                interceptor._deliver(site, call)

        @observe.register_fake
        def _(sink: torch.Tensor, query: torch.Tensor, key: torch.Tensor, *args: Any) -> None:
            return None

        _SINK.append(torch.zeros(1))
    return torch.ops.attnmap.observe


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
    """Forwards every torch call unchanged; shows softmax calls (eager attention read from its
    probabilities, TimeSformer). Only entered for families that need it."""

    def __init__(self, owner: Interceptor) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Optional[dict[str, Any]] = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in _SOFTMAX and self.owner.stack and isinstance(out, torch.Tensor):
            self.owner.seen_softmax(out)
        return out


def _alone() -> bool:
    """No function mode is active but ``torch.device`` contexts: the one-pass path may call an aten
    op that a user's mode would not see as SDPA."""
    return all(isinstance(m, DeviceContext) for m in _get_current_function_mode_stack())


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
        one_pass: run SDPA calls that ``wants_lse(site)`` through :func:`attnmap.reduce.sdpa_with_lse`
            (None: those with CPU tensors).
        wants_lse: whether a site's next call will be recorded (only those take the one-pass path).
        compiled: the sites run inside torch.compile'd code. Their forward hooks are then not
            always-called ones, whose ids torch.compile guards (each capture would compile the graph
            again: 8 captures, then it runs eagerly); a site that a raising forward left on the stack
            is dropped when it is entered again. Otherwise the stack is clean as soon as it raises.
    """

    sites: Sequence[Site]
    emit: Emit
    probs: Optional[Probs] = None
    softmax_roles: frozenset[str] = frozenset()
    one_pass: Optional[bool] = False
    wants_lse: Callable[[Site], bool] = lambda site: False
    compiled: bool = False
    stack: list[Site] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list)
    _patches: list[_Patch] = field(default_factory=list)
    _mode: Optional[_Mode] = None
    _observe: Callable[..., None] = lambda *args: None  # attnmap::observe, once open
    _registry: Any = None  # diffusers' attention backend registry, once open
    _busy: bool = False  # inside a call whose inner attention is not read (ours, or one read whole)
    _depth: int = 0  # how many interceptors were open when this one opened
    _templated: int = 0  # context-parallel calls read at the templated function

    # -- opening and closing -------------------------------------------------------------
    def __enter__(self) -> Interceptor:
        _keep_dynamo_out_of_the_mode()
        self._observe = _observe_op()
        self._registry = _diffusers_registry()
        self._depth = len(_OPEN)
        _OPEN.append(self)
        try:
            for site in self.sites:
                site.token = _MODULE_TOKENS.setdefault(site.module, next(_NEXT))
                _TOKENS[(site.token, self._depth)] = (self, site)
                site.takes_context, site.context_arg = _context_position(site.module)
                push = site.module.register_forward_pre_hook(self._push(site), with_kwargs=True)
                self._handles.append(push)
                pop = site.module.register_forward_hook(self._pop(site), always_call=not self.compiled)
                self._handles.append(pop)
            self._patch_everywhere([self._sdpa_patch(), *self._diffusers_patches(), *self._xdit_patches()])
            self._patch_transformers()
            if self.softmax_roles:
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
        for site in self.sites:
            if _TOKENS.get((site.token, self._depth), (None,))[0] is self:
                del _TOKENS[(site.token, self._depth)]
        if self in _OPEN:
            _OPEN.remove(self)

    # -- the module stack ----------------------------------------------------------------
    def _push(self, site: Site) -> Callable[..., None]:
        def push(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            site.calls = 0
            site.entered = True
            given = kwargs.get("encoder_hidden_states")
            if given is None and site.context_arg is not None and len(args) > site.context_arg:
                given = args[site.context_arg]
            if isinstance(given, torch.Tensor) and given.dim() == 3:
                site.context = int(given.shape[1])
            else:
                site.context = NO_CONTEXT if site.takes_context else UNKNOWN
            if site in self.stack:  # left there by a compiled forward that raised (no pop hook ran)
                del self.stack[self.stack.index(site) :]
            self.stack.append(site)

        return push

    def _pop(self, site: Site) -> Callable[..., None]:
        def pop(module: torch.nn.Module, args: Any, output: Any) -> None:
            if self.stack and self.stack[-1] is site:
                self.stack.pop()
            elif site in self.stack:
                self.stack.remove(site)

        return pop

    # -- emitting --------------------------------------------------------------------------
    def _hand_over(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        mask: Optional[torch.Tensor],
        scale: Optional[float],
        is_causal: bool,
        entry: str,
        lse: Optional[torch.Tensor] = None,
        shard: Optional[Shard] = None,
        refused: Optional[str] = None,
        softcap: Optional[float] = None,
        window: Optional[int] = None,
    ) -> None:
        """One call of the innermost site: delivered now, or, inside a graph being compiled, through
        the opaque ``attnmap::observe`` when the graph runs."""
        site = self.stack[-1]
        index = site.calls
        site.calls += 1
        if refused is None and not torch.compiler.is_compiling():  # a framework's sharding
            refused = parallel.foreign_processor(site.module) or (
                None if _alone() else parallel.foreign_mode()
            )
        if torch.compiler.is_compiling() and shard is None and refused is None:
            blocked = mask is _UNREADABLE
            self._observe(
                _SINK[0], query, key, None if blocked else mask, scale, is_causal, site.token, self._depth, index,
                entry + (":blockmask" if blocked else ""), site.context,
            )  # fmt: skip
            return
        context = None if site.context == UNKNOWN else site.context
        call = Intercepted(
            query,
            key,
            mask,
            scale,
            is_causal,
            entry,
            index,
            lse,
            context,
            shard=shard,
            refused=refused,
            softcap=None if softcap is None else float(softcap),
            window=window,  # an int or None: seen_interface reads it
        )
        self._deliver(site, call)

    def _deliver(self, site: Site, call: Intercepted) -> None:
        site.seen += 1
        self.emit(site, call)

    def seen_sdpa(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any], lse: Optional[torch.Tensor]
    ) -> None:
        """An SDPA call inside a site (its output already computed)."""
        if not self.stack:
            return
        call = bind(_SDPA_ARGS, args, kwargs)
        q, k = call.get("query"), call.get("key")
        if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor):
            self._hand_over(
                q,
                k,
                call.get("attn_mask"),
                call.get("scale"),
                bool(call.get("is_causal", False)),
                "sdpa",
                lse,
            )

    @torch.compiler.disable
    def seen_softmax(self, probs: torch.Tensor) -> None:
        if self.stack and self.probs is not None and self.stack[-1].role in self.softmax_roles:
            self.probs(self.stack[-1], probs)

    def one_pass_sdpa(self, call: dict[str, Any]) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """The SDPA forward plus its rows' logsumexp (None where torch offers no such op for the
        call), for a call that will be recorded; None where the one-pass path does not apply."""
        from attnmap import reduce

        q, k, v = call.get("query"), call.get("key"), call.get("value")
        if not self.stack or not self.wants_lse(self.stack[-1]):
            return None
        if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
            return None
        self._busy = True
        try:
            return reduce.sdpa_with_lse(
                q,  # type: ignore[arg-type]
                k,  # type: ignore[arg-type]
                v,  # type: ignore[arg-type]
                attn_mask=call.get("attn_mask"),
                scale=call.get("scale"),
                is_causal=bool(call.get("is_causal")),
                dropout_p=float(call.get("dropout_p") or 0.0),
                enable_gqa=bool(call.get("enable_gqa", False)),
            )
        finally:
            self._busy = False

    # -- patching ------------------------------------------------------------------------------
    def _patch_everywhere(self, patches: Sequence[tuple[str, Any, Any]]) -> None:
        """Each ``(name, original, wrapper)``: the wrapper in every loaded module that holds the original
        under that name. One pass over the modules' own namespaces: a lazy module's ``__getattr__``
        (which may import, and costs microseconds for every name it lacks) is never asked. torch's C
        modules are left as they are: torch hands a function mode the SDPA of torch._C._nn, where
        :meth:`_beside_a_mode` puts torch's own back on functional for it."""
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict) or str(namespace.get("__name__", "")).startswith("torch._C"):
                continue
            for name, original, wrapper in patches:
                if namespace.get(name) is original:
                    self._patches.append(_Patch(module, name, original))
                    setattr(module, name, wrapper)

    # -- torch SDPA --------------------------------------------------------------------------
    def _sdpa_patch(self) -> tuple[str, Any, Any]:
        previous = torch.nn.functional.scaled_dot_product_attention  # torch's, or an open capture's wrapper
        return "scaled_dot_product_attention", previous, self._sdpa_wrapper(previous)

    def _sdpa_wrapper(self, previous: Callable[..., Any]) -> Callable[..., Any]:
        last = previous is _SDPA  # the capture opened first: nothing of attnmap's below it

        def scaled_dot_product_attention(*args: Any, **kwargs: Any) -> Any:
            # inside a call whose inner attention is not read: sdpa_with_lse's fallback to SDPA, a
            # context-parallel call read at the templated function, a framework's own parallel attention
            if not torch.compiler.is_compiling() and not _alone():  # busy or not: the mode sees torch's
                return self._beside_a_mode(previous, args, kwargs)
            if self._busy:
                return previous(*args, **kwargs)
            # is_compiling() first: a graph being traced reads no option (each value would be a guard)
            if not torch.compiler.is_compiling() and self.stack and self.one_pass is not False and last:
                call = bind(_SDPA_ARGS, args, kwargs)
                q = call.get("query")
                cpu = isinstance(q, torch.Tensor) and q.device.type == "cpu"
                found = self.one_pass_sdpa(call) if (self.one_pass or cpu) and _alone() else None
                if found is not None:
                    self.seen_sdpa(args, kwargs, found[1])
                    return found[0]
            if torch.compiler.is_compiling():
                out = previous(*args, **kwargs)
            else:
                self._busy = True
                try:
                    out = previous(*args, **kwargs)
                finally:
                    self._busy = False
            if self.stack:
                self.seen_sdpa(args, kwargs, None)
            return out

        scaled_dot_product_attention.__wrapped__ = previous  # type: ignore[attr-defined]
        scaled_dot_product_attention.__doc__ = getattr(previous, "__doc__", None)
        return scaled_dot_product_attention

    def _beside_a_mode(
        self, previous: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """An SDPA call while a user's function mode is active: torch.nn.functional holds torch's own
        SDPA for its length, so that the mode sees the function it compares with (ParaAttention runs
        its parallel attention only when ``func is F.scaled_dot_product_attention``), and nothing
        inside is read. The call itself is read as usual (unless it is inside a call whose inner
        attention is not read), or refused where the mode computes it its own way (ParaAttention)."""
        functional = torch.nn.functional
        mine = functional.scaled_dot_product_attention
        read = bool(self.stack) and not self._busy
        refused = parallel.foreign_mode() if read else None
        functional.scaled_dot_product_attention = _SDPA
        busy, self._busy = self._busy, True
        try:
            out = previous(*args, **kwargs)
        finally:
            self._busy = busy
            functional.scaled_dot_product_attention = mine
        if read:
            call = bind(_SDPA_ARGS, args, kwargs)
            q, k = call.get("query"), call.get("key")
            if refused is not None and isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor):
                self._hand_over(q, k, None, None, False, "sdpa", refused=refused)
            elif refused is None:
                self.seen_sdpa(args, kwargs, None)
        return out

    # -- diffusers' dispatcher ---------------------------------------------------------------
    def _diffusers_patches(self) -> list[tuple[str, Any, Any]]:
        dispatch = sys.modules.get("diffusers.models.attention_dispatch")
        if dispatch is None:
            return []
        patches = []
        for name, make in (
            ("dispatch_attention_fn", self._dispatch_wrapper),
            (_TEMPLATED, self._templated_wrapper),
        ):
            original = getattr(dispatch, name, None)
            if original is not None:
                patches.append((name, original, make(original)))
        return patches

    def _dispatch_wrapper(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def dispatch_attention_fn(*args: Any, **kwargs: Any) -> Any:
            before = self._templated
            out = original(*args, **kwargs)
            self.seen_dispatch(args, kwargs, read=self._templated > before)
            return out

        dispatch_attention_fn.__wrapped__ = original  # type: ignore[attr-defined]
        return dispatch_attention_fn

    def seen_dispatch(self, args: tuple[Any, ...], kwargs: Mapping[str, Any], *, read: bool = False) -> None:
        """A dispatcher call inside a site (``read``: its context-parallel attention was read at the
        templated function)."""
        if not self.stack or self._busy:
            return
        call = bind(_DISPATCH_ARGS, args, kwargs)
        backend = call.get("backend")
        if backend is None:
            backend = "native" if self._registry is None else self._registry._active_backend
        name = str(getattr(backend, "value", backend))
        q, k = _blhd(call.get("query")), _blhd(call.get("key"))
        if call.get("parallel_config") is not None:  # the local chunks of a context-parallel call
            if not read and q is not None and k is not None:
                reason = (
                    f"its context-parallel attention (diffusers backend {name!r}) did not go through "
                    "_templated_context_parallel_attention where attnmap reads it"
                    + (" (under torch.compile it is not read)" if torch.compiler.is_compiling() else "")
                )
                self._hand_over(q, k, None, None, False, f"diffusers:{name}", refused=reason)
            return
        if name in SDPA_BACKENDS:
            return  # the SDPA entry point saw it
        if q is not None and k is not None:
            self._hand_over(
                q,
                k,
                _readable_mask(call.get("attn_mask"), int(k.shape[2])),
                call.get("scale"),
                bool(call.get("is_causal", False)),
                f"diffusers:{name}",
            )

    def _templated_wrapper(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def _templated_context_parallel_attention(*args: Any, **kwargs: Any) -> Any:
            if not self.stack or self._busy:
                return original(*args, **kwargs)
            if torch.compiler.is_compiling():  # not read (the dispatcher says so); nor is any call inside
                self._busy = True  # (a Ulysses rank's SDPA holds a subset of the heads)
                try:
                    return original(*args, **kwargs)
                finally:
                    self._busy = False
            spy = parallel.OpSpy(kwargs["forward_op"])
            busy, self._busy = self._busy, True  # the forward op's own SDPA is read here, not there
            try:
                out = original(*args, **{**kwargs, "forward_op": spy})
            finally:
                self._busy = busy
            self.seen_templated(spy, bind(_TEMPLATED_ARGS, args, kwargs))
            return out

        _templated_context_parallel_attention.__wrapped__ = original  # type: ignore[attr-defined]
        return _templated_context_parallel_attention

    def seen_templated(self, spy: parallel.OpSpy, call: Mapping[str, Any]) -> None:
        """One rank's context-parallel attention, from the calls its forward op made."""
        self._templated += 1
        config = call.get("_parallel_config")
        found = parallel.assemble(spy.calls, config)
        backend = diffusers_backend(None)
        if isinstance(found, str):
            q, k = _blhd(call.get("query")), _blhd(call.get("key"))
            if q is not None and k is not None:
                self._hand_over(q, k, None, None, False, f"diffusers:{backend}", refused=found)
            return
        self._hand_over(
            found.query,
            found.key,
            found.mask,
            found.scale,
            bool(call.get("is_causal", False)),
            f"diffusers:{backend}:{found.mode}",
            shard=found.shard,
        )

    # -- xDiT ----------------------------------------------------------------------------------
    def _xdit_patches(self) -> list[tuple[str, Any, Any]]:
        patches = []
        for modname, name in parallel.XDIT:
            original = getattr(sys.modules.get(modname), name, None)
            if callable(original):
                patches.append((name, original, self._xdit_wrapper(original)))
        return patches

    def _xdit_wrapper(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def USP(query: Any, key: Any, *args: Any, **kwargs: Any) -> Any:  # xDiT's name
            if not self.stack or self._busy or not parallel.xdit_parallel():
                return original(query, key, *args, **kwargs)
            busy, self._busy = self._busy, True  # nothing inside is read
            try:
                out = original(query, key, *args, **kwargs)
            finally:
                self._busy = busy
            if isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor):
                self._hand_over(query, key, None, None, False, "xdit:usp", refused=parallel.XDIT_REFUSED)
            return out

        USP.__wrapped__ = original  # type: ignore[attr-defined]
        return USP

    # -- transformers' attention interface ---------------------------------------------------
    def _patch_transformers(self) -> None:
        utils = sys.modules.get("transformers.modeling_utils")
        interface = None if utils is None else getattr(utils, "AttentionInterface", None)
        if interface is not None:
            mapping = interface._global_mapping
            for name, fn in list(mapping.items()):
                if name.startswith("paged|") or not callable(fn):
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
        sdpa = name in _TRANSFORMERS_SDPA
        after = _positional_after_mask(original)

        def attention(
            module: torch.nn.Module,
            query: Any,
            key: Any,
            value: Any,
            attention_mask: Any,
            *args: Any,
            **kwargs: Any,
        ) -> Any:
            if sdpa and not (self.stack and self.stack[-1].interface):
                # the torch SDPA entry point sees it (diffusers' and transformers' video encoders)
                return original(module, query, key, value, attention_mask, *args, **kwargs)
            busy, self._busy = self._busy, True  # the torch SDPA call inside is this one: seen here
            try:
                out = original(module, query, key, value, attention_mask, *args, **kwargs)
            finally:
                self._busy = busy
            named = dict(zip(after, args))
            self.seen_interface(name, query, key, attention_mask, {**named, **kwargs})
            return out

        attention.__wrapped__ = original  # type: ignore[attr-defined]
        return attention

    def seen_interface(
        self, name: str, query: Any, key: Any, attention_mask: Any, kwargs: Mapping[str, Any]
    ) -> None:
        if (
            not self.stack
            or self._busy
            or not isinstance(query, torch.Tensor)
            or not isinstance(key, torch.Tensor)
        ):
            return
        if query.dim() != 4 or key.dim() != 4:
            return
        mask = _readable_mask(attention_mask, int(key.shape[2]))
        scale = kwargs.get("scaling", kwargs.get("scale"))
        cap = kwargs.get("softcap")
        window = kwargs.get("sliding_window")
        window = int(window) if isinstance(window, int) and window > 0 else None
        causal = bool(kwargs.get("is_causal", False)) and query.shape[2] > 1
        cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        if isinstance(cu_q, torch.Tensor) and isinstance(cu_k, torch.Tensor) and query.shape[0] == 1:
            # packed sequences: one call per sequence, as rows of one batch
            bq, bk = cu_q.tolist(), cu_k.tolist()
            for i in range(len(bq) - 1):
                q_i, k_i = query[:, :, bq[i] : bq[i + 1]], key[:, :, bk[i] : bk[i + 1]]
                self._hand_over(
                    q_i, k_i, None, scale, causal, f"transformers:{name}:varlen", softcap=cap, window=window
                )
            return
        self._hand_over(query, key, mask, scale, causal, f"transformers:{name}", softcap=cap, window=window)


@functools.cache
def _positional_after_mask(fn: Callable[..., Any]) -> tuple[str, ...]:
    """The names of an attention function's positional parameters after its ``attention_mask`` (an
    eager function takes ``scaling, dropout``, transformers' SDPA and flash ones ``dropout, scaling``),
    to name the extra positional arguments of a call by the function's own signature."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return ("dropout", "scaling")  # transformers' own order for its interface functions
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in params if p.kind in kinds]
    return tuple(names[5:])


def _context_position(module: torch.nn.Module) -> tuple[bool, Optional[int]]:
    """Whether a module's forward takes ``encoder_hidden_states``, and where among its positional
    arguments."""
    try:
        names = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return False, None
    if "encoder_hidden_states" not in names:
        return False, None
    return True, names.index("encoder_hidden_states")


#: stands for a mask attnmap cannot read (a flex BlockMask); such calls are skipped with a reason
_UNREADABLE = torch.empty(0)


def _readable_mask(mask: Any, nk: int) -> Optional[torch.Tensor]:
    """A call's mask (at diffusers' dispatcher or transformers' interface) as a tensor.

    A flex ``BlockMask`` of whole blocks (no ``mask_mod``) that keeps the same key blocks for every
    query block is the key-padding mask ``[B, H, 1, Nk]`` of those blocks; any other ``BlockMask``
    (one that varies over the queries, as a sparse or causal pattern does) stands for a mask attnmap
    cannot read."""
    if mask is None or isinstance(mask, torch.Tensor):
        return mask
    try:
        from torch.nn.attention.flex_attention import noop_mask
    except ImportError:  # no flex attention: not a BlockMask
        return _UNREADABLE
    if torch.compiler.is_compiling() or getattr(mask, "mask_mod", None) is not noop_mask:
        return _UNREADABLE
    blocks = mask.to_dense().bool()  # [B, H, query blocks, key blocks]
    if not bool((blocks == blocks[..., :1, :]).all()):
        return _UNREADABLE
    return blocks[..., :1, :].repeat_interleave(int(mask.BLOCK_SIZE[1]), dim=-1)[..., :nk]


def unreadable(mask: Optional[torch.Tensor]) -> bool:
    """Whether a call's mask was one attnmap cannot read."""
    return mask is _UNREADABLE
