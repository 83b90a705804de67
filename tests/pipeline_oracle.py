"""An independent oracle of the maps a pipeline run must record, per step, CFG branch and batch row.

It shares no code with attnmap's capture or reductions (it imports neither): it logs every
attention call of a family's watched modules at the entry point (:class:`tiny_models.AttentionLog`:
module name, q, k, mask, scale), marks where each forward of the denoiser starts, and computes, in
float64:

- ``P = softmax(scale q k^T + mask)`` per call (KV heads repeated), the mean over its heads;
- ``temporal[f_i, f_j]``: the mean over the video queries of frame i of the mass on frame j's video
  keys, from the calls that hold video keys;
- ``cross``: the video query rows against the row's own real text keys, from the calls that hold the
  prompt's text (``[Nv, text_len]`` per row; stacked to the longest row of a branch, NaN past a row's
  length);
- ``token/<word>``: the sum of a row's cross columns over the word's tokens, as ``[F, H, W]`` (NaN for
  a row whose prompt lacks the word);

each the mean over the watched calls of a step. Which tokens of a call are video and text, and how the
forwards of a step split into guidance branches and batch rows, is written here from each family's
own code (:class:`Site`, :class:`Text`, ``cfg``), and each row's real length and its words' token
positions come from the pipeline's tokenizer with the family's prompt template and crop.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from tiny_models import AttentionLog, softmax64

Grid = tuple[int, int, int]
_MARK = re.compile(r"\(([^()]*)\)")


def marked(prompt: str) -> tuple[str, list[str]]:
    """``"a (cat) on a (mat)"`` -> ``("a cat on a mat", ["cat", "mat"])``."""
    words = list(dict.fromkeys(m.group(1).strip() for m in _MARK.finditer(prompt)))
    return _MARK.sub(lambda m: m.group(1), prompt), words


@dataclass(frozen=True)
class Row:
    """One batch row as the denoiser sees it: its prompt, its real text tokens, its words' tokens."""

    prompt: str
    text_len: int
    targets: dict[str, list[int]]

    def as_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "text_len": self.text_len, "targets": self.targets}


@dataclass(frozen=True)
class Text:
    """How a family turns a prompt into the denoiser's text tokens.

    ``template``: the text the encoder sees (``{}`` is the prompt); ``crop``: tokens the pipeline drops
    from the front of the encoder's output; ``length``: the most tokens the denoiser's text keeps (the
    pipeline's ``max_sequence_length``, after the crop); ``specials``: the tokenizer adds its special
    tokens (not through a chat template, which writes its own); ``instruction``: text put before the
    prompt, of whose tokens (padded to the instruction's and ``length`` - 2) the pipeline keeps the
    first and the last ``length`` - 1 (Sana's complex human instruction); ``cut``: a batch of one
    prompt keeps only the prompt's real tokens, and the negative prompt is cut to as many (Latte's
    ``mask_feature``); ``tokenizer``: the pipeline's attribute.
    """

    length: int
    template: str = "{}"
    crop: int = 0
    specials: bool = True
    instruction: str = ""
    cut: bool = False
    tokenizer: str = "tokenizer"

    def row(self, tokenizer: Any, prompt: str, cut: Optional[int] = None) -> Row:
        """The row of ``prompt`` (its marks stripped), its first ``cut`` tokens only if given; a word cut
        off is not a target."""
        length = self.length
        clean, words = marked(prompt)
        full = self.instruction + self.template.format(clean)
        at = len(self.instruction) + self.template.index("{}")
        if self.instruction:
            total = len(tokenizer.encode(self.instruction)) + length - 2
            keep = [0, *range(total - length + 1, total)]
        else:
            total = self.crop + length
            keep = list(range(self.crop, total))
        keep = keep[:cut] if cut is not None else keep
        enc = tokenizer(
            full, max_length=total, truncation=True, padding="max_length", padding_side="right",
            add_special_tokens=self.specials, return_offsets_mapping=True,
        )  # fmt: skip
        offsets, real = [tuple(o) for o in enc["offset_mapping"]], enc["attention_mask"]
        text_len = sum(real[p] for p in keep)
        assert all(real[p] for p in keep[:text_len]), f"{full!r}: the kept real tokens are not a prefix"
        targets = {}
        for word in words:
            spans = [
                (at + m.start(), at + m.end()) for m in re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", clean)
            ]
            tokens = [
                keep.index(i)
                for i, (s, e) in enumerate(offsets)
                if i in keep and e > s and any(s < b and e > a for a, b in spans)
            ]
            if tokens:
                targets[word] = tokens
        return Row(clean, text_len, targets)


@dataclass(frozen=True)
class Site:
    """A watched attention module as the family's code calls it.

    ``pattern``: a regex on the module's name inside its denoiser; ``kind``: ``self`` (video tokens
    only), ``cross`` (video queries; keys: the text from ``text_start`` on), ``joint`` (video and the
    text context in one sequence, the text first or last, the prompt's tokens from ``text_start`` on
    within the context), ``space`` (divided attention: a row's frames in the batch, each frame's
    queries against the text), ``time`` (a row's positions in the batch, each position's frames
    against each other); ``per_row``: one call per batch row (Mochi).
    """

    pattern: str
    kind: str
    text_first: bool = True
    text_start: int = 0
    per_row: bool = False


def branch_rows(
    tokenizer: Any,
    text: Text,
    prompts: Sequence[str],
    negatives: Optional[Sequence[str]],
    per_prompt: int,
    negative_text: Optional[Text] = None,
) -> dict[str, list[Row]]:
    """The rows of each guidance branch, prompt-major (prompt i's videos are rows i*n .. i*n+n-1);
    ``negative_text``: how the pipeline encodes its negative prompts, where it differs (Sana)."""
    out = {"cond": [text.row(tokenizer, p) for p in prompts for _ in range(per_prompt)]}
    cut = out["cond"][0].text_len if text.cut and len(out["cond"]) == 1 else None
    if negatives is not None:
        neg = negative_text or text
        out["uncond"] = [neg.row(tokenizer, p, cut) for p in negatives for _ in range(per_prompt)]
    return out


def temporal_of(pv: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``[B, Nv, Nv]`` video-to-video probabilities -> ``[B, F, F]``."""
    f, hw = grid[0], grid[1] * grid[2]
    return pv.reshape(pv.shape[0], f, hw, f, hw).sum(-1).mean(2)


@dataclass
class _Forward:
    denoiser: str
    start: int  # its first call in its denoiser's log
    end: int = -1  # past its last call


class Oracle:
    """Logs the attention calls of a pipeline's denoisers at their entry points, forward by forward.

    Use ``with oracle.dispatch():`` outside the capture and ``with oracle:`` inside it (so that it
    sees at torch SDPA the calls the capture passes on), then :meth:`maps`; ``close()`` at the end.
    """

    def __init__(
        self, pipe: Any, sites: Sequence[Site], grid: Grid, denoisers: Sequence[str] = ("transformer",)
    ):
        self.sites, self.grid = tuple(sites), grid
        self.logs: dict[str, AttentionLog] = {}
        self.forwards: list[_Forward] = []
        self._handles: list[Any] = []
        self._stack = contextlib.ExitStack()
        for attr in denoisers:
            model = getattr(pipe, attr)
            names = [n for n, _ in model.named_modules() if n and self.site(n) is not None]
            assert names, f"{attr}: no module matches {[s.pattern for s in self.sites]}"
            log = self.logs[attr] = AttentionLog(model, names)
            self._handles += [
                model.register_forward_pre_hook(
                    lambda m, a, attr=attr, log=log: self.forwards.append(_Forward(attr, len(log.calls)))
                ),
                model.register_forward_hook(lambda m, a, o, log=log: self._ended(len(log.calls))),
            ]

    def _ended(self, end: int) -> None:
        self.forwards[-1].end = end

    def site(self, name: str) -> Optional[Site]:
        return next((s for s in self.sites if re.fullmatch(s.pattern, name)), None)

    @contextlib.contextmanager
    def dispatch(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for log in self.logs.values():
                stack.enter_context(log.dispatch())
            yield

    def __enter__(self) -> Oracle:
        for log in self.logs.values():
            self._stack.enter_context(log)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def close(self) -> None:
        for log in self.logs.values():
            log.close()
        for h in self._handles:
            h.remove()

    # -- the expected maps -------------------------------------------------------------------------
    def calls(self, forward: _Forward) -> list[tuple[str, torch.Tensor, torch.Tensor, Any, Any]]:
        return self.logs[forward.denoiser].calls[forward.start : forward.end]

    def maps(
        self, rows: Mapping[str, Sequence[Row]], *, cfg: str, steps: int
    ) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
        """``{(step, branch): {name: [rows, ...]}}`` from the logged calls.

        ``cfg``: how the pipeline runs the guidance branches: ``"batched"`` (one forward per step on
        the rows [uncond..., cond...]) or ``"separate"`` (a cond forward, then an uncond one).
        """
        branches = list(rows)
        guided = "uncond" in rows
        per_step = 2 if guided and cfg == "separate" else 1
        forwards = [f for f in self.forwards if self.calls(f)]
        assert len(forwards) == steps * per_step, (
            f"{len(forwards)} denoiser forwards with attention calls for {steps} steps of {per_step}"
        )
        nv = self.grid[0] * self.grid[1] * self.grid[2]
        acc: dict[tuple[int, str, int, str], list[torch.Tensor]] = {}
        for i, fw in enumerate(forwards):
            step = i // per_step
            if cfg == "separate" or not guided:
                branch_of = [(branches[i % per_step], r) for r in range(len(rows[branches[i % per_step]]))]
            else:
                branch_of = [("uncond", r) for r in range(len(rows["uncond"]))]
                branch_of += [("cond", r) for r in range(len(rows["cond"]))]
            seen: dict[str, int] = {}
            for name, q, k, mask, scale in self.calls(fw):
                site = self.site(name)
                assert site is not None
                p = softmax64(q, k, mask, scale).mean(1)  # [b, Nq, Nk]
                if site.per_row:
                    assert p.shape[0] == 1, f"{name}: a per-row call of batch {p.shape[0]}"
                    index = seen.get(name, 0)
                    seen[name] = index + 1
                    call_rows = [branch_of[index]]
                else:
                    call_rows = branch_of
                fold = {"space": self.grid[0], "time": self.grid[1] * self.grid[2]}.get(site.kind, 1)
                assert p.shape[0] == len(call_rows) * fold, (
                    f"{name}: batch {p.shape[0]} for {len(call_rows)} rows"
                )
                for b, (branch, r) in enumerate(call_rows):
                    maps = self._reduce(site, p[b * fold : (b + 1) * fold], nv, rows[branch][r])
                    for red, value in maps.items():
                        acc.setdefault((step, branch, r, red), []).append(value)
        out: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for step in range(steps):
            for branch in branches:
                out[(step, branch)] = self._stack_rows(acc, step, branch, rows[branch])
        return out

    def _reduce(self, site: Site, p: torch.Tensor, nv: int, row: Row) -> dict[str, torch.Tensor]:
        """One batch row's maps (``p``: its call rows [fold, Nq, Nk]): ``temporal`` [F, F], ``cross`` [Nv, text_len]."""
        if site.kind == "space":  # its frames' queries against the text
            text = p[..., site.text_start : site.text_start + row.text_len].reshape(nv, -1)
            assert text.shape[1] == row.text_len
            return {"cross": text}
        if site.kind == "time":  # each position's frames against each other
            assert p.shape[1:] == (self.grid[0], self.grid[0])
            return {"temporal": p.mean(0)}
        p = p[0]
        nq, nk = p.shape
        if site.kind == "self":
            assert nq == nk == nv, f"self call {nq}x{nk} on {nv} video tokens"
            return {"temporal": temporal_of(p[None], self.grid)[0]}
        if site.kind == "cross":
            assert nq == nv, f"cross call with {nq} queries on {nv} video tokens"
            text = p[:, site.text_start : site.text_start + row.text_len]
            assert text.shape[1] == row.text_len, (
                f"{row.prompt!r}: {nk} keys hold no {row.text_len} text tokens"
            )
            return {"cross": text}
        assert site.kind == "joint" and nq == nk
        other = nk - nv
        video = slice(other, nk) if site.text_first else slice(0, nv)
        t0 = (0 if site.text_first else nv) + site.text_start
        assert t0 + row.text_len <= (other if site.text_first else nk), (
            f"{row.prompt!r}: text past the context"
        )
        return {
            "temporal": temporal_of(p[None, video, video], self.grid)[0],
            "cross": p[video, t0 : t0 + row.text_len],
        }

    def _stack_rows(
        self,
        acc: Mapping[tuple[int, str, int, str], list[torch.Tensor]],
        step: int,
        branch: str,
        rows: Sequence[Row],
    ) -> dict[str, torch.Tensor]:
        f, h, w = self.grid
        nv = f * h * w
        out: dict[str, torch.Tensor] = {}
        temporal = [acc.get((step, branch, r, "temporal")) for r in range(len(rows))]
        if all(t is not None for t in temporal):
            out["temporal"] = torch.stack([torch.stack(t).mean(0) for t in temporal if t is not None])
        cross_calls = [acc.get((step, branch, r, "cross")) for r in range(len(rows))]
        if all(c is not None for c in cross_calls):
            width = max(row.text_len for row in rows)
            cross = torch.full((len(rows), nv, width), float("nan"), dtype=torch.float64)
            for r, calls in enumerate(cross_calls):
                assert calls is not None
                cross[r, :, : rows[r].text_len] = torch.stack(calls).mean(0)
            out["cross"] = cross
            for word in dict.fromkeys(w for row in rows for w in row.targets):
                token = torch.full((len(rows), f, h, w), float("nan"), dtype=torch.float64)
                for r, row in enumerate(rows):
                    if word in row.targets:
                        token[r] = cross[r][:, row.targets[word]].sum(-1).reshape(f, h, w)
                out[f"token/{word}"] = token
        return out
