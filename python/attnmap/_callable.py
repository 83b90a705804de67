"""Modules that share their name with their main function: ``attnmap.capture``, ``attnmap.rollout``.

Importing a submodule binds it as the package attribute of the same name, over the function that
``attnmap/__init__.py`` exports under that name. Calling the module runs the function instead, so
``attnmap.capture(model)`` and ``attnmap.rollout(maps)`` work whichever was imported first.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Callable


def make_module_callable(module_name: str, func: Callable[..., Any]) -> None:
    """Make calling the module ``module_name`` call ``func`` with the same arguments."""

    class _CallableModule(types.ModuleType):
        __call__ = staticmethod(func)

    sys.modules[module_name].__class__ = _CallableModule
