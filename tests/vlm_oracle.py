"""An independent reference for video-LLM attention: what transformers' attention interface saw, and
the float64 softmax of it. Imports nothing from attnmap.

:class:`InterfaceLog` wraps every function of transformers' ``AttentionInterface`` and every loaded
modeling file's ``eager_attention_forward`` (the two places a transformers attention module looks
up its attention function at each call) and keeps each call's ``q [B, H, q, D]``, ``k [B, Hkv, kv, D]``,
mask and keyword arguments. :func:`probs` is the softmax of one call in float64, the KV heads
repeated and the causal offset ``kv - q`` applied where the call relies on ``is_causal`` instead of a
mask. :func:`answer_map`, :func:`word_map` and :func:`temporal` turn rows of it into the maps a video
LLM capture records.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch


@dataclass
class Call:
    """One call at the attention interface."""

    #: the attention module's qualified name in the model
    name: str
    #: which function ran: ``sdpa``, ``eager`` ...
    impl: str
    query: torch.Tensor
    key: torch.Tensor
    mask: Any
    #: the module's ``is_causal`` attribute, which transformers' SDPA uses when the call passes none
    module_causal: Optional[bool]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        s = self.kwargs.get("scaling", self.kwargs.get("scale"))
        return float(s) if s is not None else self.query.shape[-1] ** -0.5

    @property
    def causal(self) -> bool:
        """Whether the call is causal through ``is_causal`` (not through its mask)."""
        flag = self.kwargs.get("is_causal")
        if flag is None:
            flag = self.module_causal if self.module_causal is not None else True
        return bool(flag) and self.mask is None


class InterfaceLog:
    """Logs every call that reaches transformers' attention functions inside ``with log:``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.names = {id(m): n for n, m in model.named_modules()}
        self.calls: list[Call] = []
        self._undo: list[Callable[[], None]] = []

    def _wrap(self, impl: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def attention(
            module: Any, query: Any, key: Any, value: Any, attention_mask: Any, *args: Any, **kw: Any
        ) -> Any:
            out = fn(module, query, key, value, attention_mask, *args, **kw)
            if id(module) in self.names:
                extra = dict(kw)
                for pname, arg in zip(("dropout", "scaling"), args):
                    extra[pname] = arg
                self.calls.append(
                    Call(
                        name=self.names[id(module)],
                        impl=impl,
                        query=query.detach(),
                        key=key.detach(),
                        mask=attention_mask.detach()
                        if isinstance(attention_mask, torch.Tensor)
                        else attention_mask,
                        module_causal=getattr(module, "is_causal", None),
                        kwargs=extra,
                    )
                )
            return out

        return attention

    def __enter__(self) -> InterfaceLog:
        from transformers.modeling_utils import AttentionInterface

        mapping = AttentionInterface._global_mapping
        for key, fn in list(mapping.items()):
            mapping[key] = self._wrap(key, fn)
            self._undo.append(lambda k=key, f=fn: mapping.__setitem__(k, f))
        for modname, module in list(sys.modules.items()):
            fn = getattr(module, "eager_attention_forward", None)
            if modname.startswith("transformers.models.") and callable(fn):
                setattr(module, "eager_attention_forward", self._wrap("eager", fn))
                self._undo.append(lambda m=module, f=fn: setattr(m, "eager_attention_forward", f))
        return self

    def __exit__(self, *exc: Any) -> None:
        while self._undo:
            self._undo.pop()()

    def of(self, prefix: str) -> list[Call]:
        """The calls of modules whose name starts with ``prefix``."""
        return [c for c in self.calls if c.name.startswith(prefix)]


@contextmanager
def logged(model: torch.nn.Module) -> Iterator[InterfaceLog]:
    with InterfaceLog(model) as log:
        yield log
