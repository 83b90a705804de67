"""Lazy package attributes: a package names its public objects, and each module loads on first use.

Example:
    >>> __getattr__, __dir__ = lazy_exports(__name__, {"frames": ("attnmap.render.heatmap", "frames")})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from typing import Any, Callable, Optional


def lazy_exports(
    package: str, exports: Mapping[str, tuple[str, Optional[str]]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``.

    Args:
        package: the package's ``__name__``.
        exports: public name -> (module, attribute in it, or None for the module itself).

    Returns:
        ``(__getattr__, __dir__)``: the first looks a name up, imports its module, caches the value in
        the package and returns it; the second lists the package's names and the exports.
    """

    def __getattr__(name: str) -> Any:
        try:
            module_name, attribute = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        module = importlib.import_module(module_name)
        value = module if attribute is None else getattr(module, attribute)
        vars(sys.modules[package])[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
