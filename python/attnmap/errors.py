"""attnmap's one error root.

Every error attnmap raises on purpose is an :class:`AttnmapError`, a ``ValueError`` subclass (bad
input: the message names the argument and what was expected). The Rust core raises it too.
:class:`StoreError` is the one kind with a second base: a store file that is missing, truncated,
corrupt or from another run is an ``AttnmapError`` and an ``OSError``.

Example:
    >>> try:
    ...     attnmap.attention_sums(q, k, layout, ("nope",))
    ... except attnmap.AttnmapError as e:
    ...     print(e)  # doctest: +SKIP
    reductions: unknown reduction 'nope'; expected some of (...)
"""

from __future__ import annotations

from attnmap._native import AttnmapError


class StoreError(AttnmapError, OSError):
    """A store file is missing, truncated, corrupt or from another run. The message names the file."""


__all__ = ["AttnmapError", "StoreError"]
