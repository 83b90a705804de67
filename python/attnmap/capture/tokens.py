"""Target words of a prompt and the token indices they map to.

A prompt marks its targets with parentheses, ``"A romantic (kiss) with (flowers)"``;
:func:`parse_targets` strips them (the model sees ``"A romantic kiss with flowers"``) and
:func:`find` maps each word to the positions of its tokens in the tokenized prompt, through the
tokenizer's character offsets: a word split into several sub-tokens gives all of them, a
repeated word gives every occurrence, matching ignores case, and a special token (``"</s>"``)
is found by name.

Example:
    >>> parse_targets("A romantic (kiss) with (flowers)")
    ('A romantic kiss with flowers', ['kiss', 'flowers'])
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence, Union

from attnmap.errors import AttnmapError

_MARKED = re.compile(r"\(([^()]*)\)")

#: What ``targets=`` of capture accepts.
Targets = Union[str, Sequence[str], Mapping[str, Sequence[int]]]


def parse_targets(prompt: str) -> tuple[str, list[str]]:
    """Strip the parentheses that mark target words.

    Args:
        prompt: text with targets in parentheses, e.g. ``"a (red ball) and a (dog)"``.

    Returns:
        ``(clean_prompt, words)``: the prompt without the parentheses, and the marked words in
        order of first appearance, without repeats (``["red ball", "dog"]``).

    Raises:
        AttnmapError: ``prompt`` is not a string, a marked word is empty, or parentheses are nested
            or unbalanced.
    """
    if not isinstance(prompt, str):
        raise AttnmapError(f"prompt must be a string, got {type(prompt).__name__}")
    words: list[str] = []
    for match in _MARKED.finditer(prompt):
        word = match.group(1).strip()
        if not word:
            raise AttnmapError(
                f"prompt {prompt!r} marks an empty target '()'; put a word inside the parentheses"
            )
        if word not in words:
            words.append(word)
    clean = _MARKED.sub(lambda m: m.group(1), prompt)
    if "(" in clean or ")" in clean:
        raise AttnmapError(
            f"prompt {prompt!r} has nested or unbalanced parentheses; mark each target once, as '(word)'"
        )
    return clean, words


def _word_pattern(word: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(word) + r"(?!\w)", flags=re.IGNORECASE)


def has_word(text: str, word: str) -> bool:
    """Whether ``word`` stands in ``text`` as a whole word (in any case)."""
    return _word_pattern(word).search(text) is not None


def _word_spans(text: str, word: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in _word_pattern(word).finditer(text)]


def _encode(tokenizer: Any, text: str) -> dict[str, Any]:
    try:
        return dict(tokenizer(text, add_special_tokens=True, return_offsets_mapping=True))
    except (NotImplementedError, TypeError, ValueError):
        return dict(tokenizer(text, add_special_tokens=True))


def run_positions(haystack: Sequence[int], needle: Sequence[int]) -> list[int]:
    """Every position where ``needle`` runs inside ``haystack`` (none for an empty needle)."""
    n = len(needle)
    return [i for i in range(len(haystack) - n + 1) if n and list(haystack[i : i + n]) == list(needle)]


def find(prompt: str, tokenizer: Any, words: Optional[Sequence[str]] = None) -> dict[str, list[int]]:
    """Map target words to the indices of their tokens in the tokenized prompt.

    Args:
        prompt: the prompt; parentheses marking targets are stripped before tokenizing.
        tokenizer: a Hugging Face tokenizer (fast tokenizers give character offsets; a slow one
            is matched by the word's own token ids).
        words: the words to find; None takes the words marked in parentheses.

    Returns:
        ``{word: [token index, ...]}`` in the order of ``words``; indices count special tokens
        added by the tokenizer (as the text encoder sees them).

    Raises:
        AttnmapError: no words are given or marked, or a word is not in the prompt.

    Example:
        >>> find("a (red) ball", tok)  # doctest: +SKIP
        {'red': [1]}
    """
    clean, marked = parse_targets(prompt)
    if words is None:
        words = marked
    elif isinstance(words, str):
        words = [words]
    if not words:
        raise AttnmapError(
            f"no target words: mark them in the prompt as '(word)' or pass words=[...]; prompt was {prompt!r}"
        )
    enc = _encode(tokenizer, clean)
    ids = list(enc["input_ids"])
    if ids and isinstance(ids[0], list):  # batched output of a single prompt
        ids = ids[0]
    offsets = enc.get("offset_mapping")
    if offsets is not None and len(offsets) and isinstance(offsets[0], list) and len(offsets[0]) != 2:
        offsets = offsets[0]
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    out: dict[str, list[int]] = {}
    for word in words:
        if not isinstance(word, str) or not word.strip():
            raise AttnmapError(f"target words must be non-empty strings, got {word!r}")
        word = word.strip()
        found: list[int] = []
        if word in specials:
            tid = tokenizer.convert_tokens_to_ids(word)
            found = [i for i, t in enumerate(ids) if t == tid]
        elif offsets is not None:
            for start, end in _word_spans(clean, word):
                found += [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
        else:
            for variant in (word, " " + word, word.lower(), " " + word.lower()):
                sub = tokenizer(variant, add_special_tokens=False)["input_ids"]
                for pos in run_positions(ids, sub):
                    found += range(pos, pos + len(sub))
        if not found:
            raise AttnmapError(
                f"target word {word!r} is not in the prompt {clean!r} (as tokenized by "
                f"{type(tokenizer).__name__}); check its spelling or pass token indices"
            )
        out[word] = sorted(set(found))
    return out


def resolve(
    targets: Optional[Targets], prompt: Optional[str], tokenizer: Any
) -> tuple[Optional[str], dict[str, list[int]]]:
    """Turn capture's ``targets``/``prompt``/``tokenizer`` into the clean prompt and ``{word: indices}``.

    Args:
        targets: None (the words marked in ``prompt``, if any), a list of words, or a mapping
            word -> token indices (for models without a tokenizer).
        prompt: the prompt, possibly with marked words.
        tokenizer: needed unless ``targets`` is a mapping.

    Returns:
        ``(clean_prompt or None, {word: [indices]})``; the mapping is empty when there are no targets.

    Raises:
        AttnmapError: bad indices, words without a prompt or tokenizer, or a word not in the prompt.
    """
    clean = None
    marked: list[str] = []
    if prompt is not None:
        clean, marked = parse_targets(prompt)
    if isinstance(targets, Mapping):
        out: dict[str, list[int]] = {}
        for word, idx in targets.items():
            if isinstance(idx, int):
                idx = [idx]
            values = list(idx)
            if not values or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in values):
                raise AttnmapError(
                    f"targets[{word!r}] must be a non-empty list of token indices >= 0, got {idx!r}"
                )
            out[str(word)] = sorted(set(values))
        return clean, out
    words: list[str] = [targets] if isinstance(targets, str) else list(targets or marked)
    if not words:
        return clean, {}
    if prompt is None or tokenizer is None:
        raise AttnmapError(
            f"targets {words} need prompt= and tokenizer= to find their tokens; "
            "or pass targets as a mapping word -> token indices"
        )
    return clean, find(prompt, tokenizer, words)
