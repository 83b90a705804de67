"""Reading a video LLM's attention into maps, under ``generate()`` and under a plain forward.

A :class:`VideoLLMReader` watches one video LLM (:mod:`attnmap.capture.vlm`): it reads the inputs the
model got (``generate``'s arguments, or the forward's) into the token map of each batch row, walks
the answer one step per forward (step 0: the prefill, whose last row predicts the first generated
token; step s: the s-th decode step), and turns each call at transformers' attention interface into
maps, exactly, with the call's own mask, its KV heads repeated and a decode query's causal offset:

- every LLM call: ``answer`` ``[B, F, H, W]``, the last query row's attention to each video token
  on the LLM's grid, and beside it the rest of that row's mass, ``answer/sink`` (the row's first
  real token), ``answer/system`` (the prompt before the video), ``answer/video_text`` (timestamps
  and markers inside the video), ``answer/text`` (the prompt after the video: the question),
  ``answer/generated`` (the answer's earlier tokens): with the video's mass they sum to 1;
- the prefill's LLM calls: ``token/<word>`` for each marked prompt word (the mean of its query rows),
  and as asked ``temporal`` ``[B, F, F]`` (the video tokens' frame-to-frame attention) and
  ``received`` ``[B, N]`` (the mean attention each position receives from the real query rows; NaN
  on padding), with ``received/video`` ``[B, F, H, W]`` its video tokens on the grid;
- the vision tower's calls: ``vision/received`` and ``vision/entropy`` ``[B, T, Hv, Wv]`` per patch
  of each temporal slot, in the video's raster order (a window permutation and the merge's
  block-major order undone), averaged over the calls that held the patch;
- each generated token's word: ``token/<word>`` at its step is that step's ``answer``.

Private to :mod:`attnmap.capture`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

from attnmap import reduce
from attnmap.capture.accumulate import Rows
from attnmap.capture.interception import Intercepted, Site
from attnmap.capture.layouts import bind_arguments, key_padding
from attnmap.capture.sequence import SEGMENTS, key_ranges
from attnmap.capture.vlm import VideoLLMInputs, VLMSpec, read, word_positions
from attnmap.layout import Layout

Add = Callable[[Site, str, dict[str, torch.Tensor], Rows, int], None]
Warn = Callable[[Site, str], None]
#: the reductions of the prefill's LLM calls and of the vision tower that ``reductions=`` may ask for
PREFILL = ("temporal", "received")
VISION = ("received", "entropy")
_VIDEO = SEGMENTS.index("video")
Ranges = Union[tuple[torch.Tensor, torch.Tensor], str]


@dataclass
class _Buffer:
    """One vision block's sums over the calls of a forward, per patch: ``[Hs, B*T*Hv*Wv]`` and counts."""

    sums: dict[str, torch.Tensor]
    count: torch.Tensor


def answer_word(tokenizer: Any, token: int) -> str:
    """The map name a generated token goes by: its text without surrounding spaces, else ``#<id>``."""
    if tokenizer is not None:
        try:
            text = str(tokenizer.decode([int(token)])).strip()
        except Exception:  # a tokenizer that cannot decode it: the id
            text = ""
        if text and "/" not in text:
            return text
    return f"#{int(token)}"


class VideoLLMReader:
    """Reads one video LLM's calls into maps (see the module docstring).

    Args:
        model: the video LLM (its ``forward`` and ``generate`` are watched while open).
        spec: its family.
        llm, vision: the sites of its language model's and vision tower's attention modules.
        vision_root: the vision tower module (its forward's end closes the vision maps).
        reductions: the capture's reductions (``temporal``, ``received``, ``entropy`` apply here).
        per_head: keep heads.
        backend: the reduction backend (one that cannot read key ranges gives way to ``blocks``).
        tokenizer: decodes the answer's words and the text around the slots (optional).
        prompts: per prompt, its token ids and its marked words' indices among them.
        positions: explicit ``{word: sequence positions}`` (the same in every row), or None.
        add: hands a call's maps to the recorder; warn: one warning per module and reason;
        step: the recorder moves to a step (closing the one before); alias: copies a step's map
        under another name for some rows.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        spec: VLMSpec,
        *,
        llm: Sequence[Site],
        vision: Sequence[Site],
        vision_root: torch.nn.Module,
        reductions: Sequence[str],
        per_head: bool,
        backend: str,
        tokenizer: Any,
        prompts: Sequence[tuple[list[int], dict[str, list[int]]]],
        positions: Optional[Mapping[str, Sequence[int]]],
        add: Add,
        warn: Warn,
        step: Callable[[int], None],
        alias: Callable[[int, str, str, list[int]], None],
    ) -> None:
        self.model, self.spec = model, spec
        self.llm = {id(s.module): s for s in llm}
        self.vision = {id(s.module): s for s in vision}
        self.vision_root = vision_root
        self.prefill_reductions = tuple(r for r in PREFILL if r in reductions)
        self.vision_reductions = tuple(r for r in VISION if r in reductions)
        self.per_head = per_head
        self.backend = backend if backend in ("blocks", "reference") else "auto"
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        self.prompts = list(prompts)
        self.positions = None if positions is None else {w: tuple(p) for w, p in positions.items()}
        self.add, self.warn, self.step_to, self.alias = add, warn, step, alias
        self.inputs: Optional[VideoLLMInputs] = None
        self.step = 0
        self.answers: list[list[int]] = []  # per row, the generated token ids
        self.words: list[list[str]] = []  # per row, their map names
        self.answer_starts = 0  # prefills seen
        self._prefill = False  # the current forward is the prefill (word rows, prefill maps)
        self._vision_open = False  # vision sums wait to be handed over
        self._offsets: dict[int, int] = {}  # vision site -> rows (or frames) taken so far
        self._buffers: dict[int, _Buffer] = {}
        self._buffer_sites: dict[int, Site] = {}
        self._announced = False  # generate() read the inputs; its prefill forward comes next
        self._ranges: dict[tuple[Any, ...], tuple[Ranges, Optional[torch.Tensor]]] = {}
        self._closers: list[Callable[[], None]] = []
        self._silent: Optional[str] = None
        self._refused: Optional[str] = None  # why generate() could not read its inputs, until its prefill

    # -- opening ------------------------------------------------------------------------------
    def open(self) -> None:
        handle = self.model.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        self._closers.append(handle.remove)
        done = self.vision_root.register_forward_hook(lambda m, a, o: self.flush_vision())
        self._closers.append(done.remove)
        original: Optional[Callable[..., Any]] = getattr(self.model, "generate", None)
        if original is None:  # a base model (Qwen2VLModel ...): forwards only
            return
        had = "generate" in vars(self.model)
        reader = self

        def generate(*args: Any, **kwargs: Any) -> Any:
            reader.begin(_bind(original, args, kwargs))
            out = original(*args, **kwargs)
            sequences = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
            if isinstance(sequences, torch.Tensor):
                reader.finish(sequences)
            return out

        generate.__wrapped__ = original  # type: ignore[attr-defined]
        generate.__doc__ = original.__doc__
        setattr(self.model, "generate", generate)  # noqa: B010

        def restore() -> None:
            if had:
                setattr(self.model, "generate", original)  # noqa: B010
            else:
                delattr(self.model, "generate")

        self._closers.append(restore)

    def close(self) -> None:
        self.flush_vision()
        for close in reversed(self._closers):
            close()
        self._closers.clear()

    # -- the answer's steps -------------------------------------------------------------------
    def _build(self, args: Mapping[str, Any]) -> Optional[VideoLLMInputs]:
        def words(row: int, ids: list[int], after: int) -> dict[str, tuple[int, ...]]:
            if self.positions is not None:
                return dict(self.positions)
            return word_positions(ids, after, self.prompts)

        found = read(self.spec, self.model, args, tokenizer=self.tokenizer, words=words)
        if isinstance(found, str):
            self._silent = found
            return None
        self._silent = None
        return found

    def _start(self, inputs: Optional[VideoLLMInputs]) -> None:
        self.flush_vision()
        if self.answer_starts and inputs is not None:
            warnings.warn(
                "attnmap.capture: a second prompt in one capture: its answer's maps are averaged with the "
                "first's step by step in memory (what the recorder's get() returns), but a store keeps each "
                "step as it was first written: the first answer's steps hold its maps alone, and only steps "
                "past its last one get this answer's; open one capture per generate() to keep them apart",
                stacklevel=4,
            )
        self.answer_starts += inputs is not None
        self.inputs = inputs
        self._offsets.clear()
        self._buffers.clear()
        self._ranges.clear()
        self._prefill = True
        batch = 0 if inputs is None else inputs.seq.batch
        self.answers = [[] for _ in range(batch)]
        self.words = [[] for _ in range(batch)]
        self.step = 0
        self.step_to(0)

    def begin(self, args: Mapping[str, Any]) -> None:
        """``generate`` starts: read its inputs (the vision tower runs before the first forward)."""
        self._start(self._build(args))
        self._announced = self.inputs is not None
        self._refused = self._silent  # why generate()'s inputs were not read: kept for its prefill

    def finish(self, sequences: torch.Tensor) -> None:
        """``generate`` returned ``sequences [B, N + steps]``: the last step's token is its word."""
        if self.inputs is None:
            return
        at = self.inputs.seq.prefill + self.step
        if (
            sequences.shape[1] > at
            and len(self.answers) == sequences.shape[0]
            and len(self.answers[0]) == self.step
        ):
            self._name_step(sequences[:, at].tolist())

    def _on_forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        given = _bind(module.forward, args, kwargs)
        ids = given.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return
        mask = given.get("attention_mask")
        total = int(mask.shape[1]) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        seq = None if self.inputs is None else self.inputs.seq
        past = total - ids.shape[1] if total is not None else _cache_length(given)
        announced, self._announced = self._announced, False
        refused, self._refused = self._refused, None
        if announced and seq is not None and ids.shape[0] != seq.batch:
            self.inputs = None  # generate() expanded its rows: they cannot be told apart
            self._silent = (
                f"generate() runs {ids.shape[0]} rows for a prompt of {seq.batch} (beam search and "
                "num_return_sequences are not read; the vision tower's maps are)"
            )
            return
        if seq is None:
            new = None
        elif past == seq.total and ids.shape[0] == seq.batch:
            new = ids  # a decode step: the tokens generated before it
        elif (
            past == 0
            and ids.shape[0] == seq.batch
            and ids[:, : seq.total].tolist() == [seq.ids(b) for b in range(seq.batch)]
        ):
            if announced and ids.shape[1] == seq.prefill:
                return  # the prefill of the inputs generate() read
            new = ids[:, seq.total :]  # a step without the cache: the whole sequence again
        else:
            new = None
        if (new is None or new.shape[1] == 0) and past > 0:
            # a step that does not follow the answer read so far (beam search, several sequences per
            # prompt reorder and expand the rows): nothing more is read until the next prompt
            if seq is not None:
                self.inputs = None
                self._silent = (
                    f"a decode step of {ids.shape[0]} row(s) after {past} positions follows a prompt of "
                    f"{seq.batch} row(s) and {seq.total} positions (beam search and num_return_sequences "
                    "are not read)"
                )
            return
        if new is None or new.shape[1] == 0:
            if refused is not None and past == 0:
                return  # the prefill of inputs generate() could not read: its reason stands, named once
            self._start(self._build(given))  # a prefill: a new prompt (or the same one again)
            return
        assert seq is not None
        self._name_step(new[:, 0].tolist())
        seq.extend(new)
        self.flush_vision()
        self._prefill = False
        self._ranges.clear()
        self.step += 1
        self.step_to(self.step)

    def _name_step(self, tokens: list[int]) -> None:
        """The tokens the current step generated: remembered, and its ``answer`` copied under each
        row's word."""
        marked = {"answer", *(w for row in (self.inputs.seq.rows if self.inputs else []) for w in row.words)}
        names: dict[str, list[int]] = {}
        for row, token in enumerate(tokens):
            word = answer_word(self.tokenizer, token)
            name = f"answer:{word}" if word in marked else word
            self.answers[row].append(int(token))
            self.words[row].append(name)
            names.setdefault(name, []).append(row)
        for name, rows in names.items():
            self.alias(self.step, "answer", f"token/{name}", rows)

    # -- calls --------------------------------------------------------------------------------
    def read(self, site: Site, call: Intercepted) -> None:
        """One call of a watched module."""
        if self.inputs is None:
            if self._silent is not None:  # once for the prompt, not once per module
                self.warn(site, f"the model's inputs give no video to map its tokens onto: {self._silent}")
                self._silent = None
            return
        if call.refused is not None:
            self.warn(site, call.refused)
            return
        if call.shard is not None:
            self.warn(
                site,
                "it is a context-parallel rank's shard of a call, which a video LLM's capture does not read",
            )
            return
        if call.softcap is not None:
            self.warn(site, "its scores are soft-capped (softcap), which attention_sums does not reproduce")
            return
        if id(site.module) in self.vision:
            self._vision(site, call)
        else:
            self._llm(site, call)

    def _key_ranges(
        self, site: Site, call: Intercepted, nq: int, nk: int, rows: Optional[torch.Tensor]
    ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        mask = call.attn_mask
        causal = bool(getattr(site.module, "is_causal", True))
        key = (
            id(mask) if mask is not None else None,
            nq,
            nk,
            causal,
            call.window,
            None if rows is None else tuple(rows.tolist()),
        )
        kept = self._ranges.get(key)
        if kept is None:
            found = key_ranges(
                mask,
                batch=int(call.query.shape[0]),
                nq=nq,
                nk=nk,
                causal=causal,
                rows=rows,
                window=call.window,
            )
            self._ranges[key] = (found, mask)  # the mask kept alive: its id stays its own
        else:
            found = kept[0]
        if isinstance(found, str):
            self.warn(site, found)
            return None
        return found

    def _llm(self, site: Site, call: Intercepted) -> None:
        assert self.inputs is not None
        self.flush_vision()
        seq = self.inputs.seq
        q, k = call.query.detach(), call.key.detach()
        b, _, nq, _ = (int(s) for s in q.shape)
        nk = int(k.shape[2])
        total = seq.total
        if b != seq.batch or nk > total or nq > nk:
            self.warn(
                site,
                f"a call of batch {b}, {nq} queries and {nk} keys does not fit the sequence of {seq.batch} "
                f"row(s) and {total} positions",
            )
            return
        key0, q0 = total - nk, total - nq
        words: dict[str, list[tuple[int, list[int]]]] = {}
        if self._prefill:
            for row, tokens in enumerate(seq.rows):
                for word, at in tokens.words.items():
                    if at and all(q0 <= p < total for p in at):
                        words.setdefault(word, []).append((row, [p - q0 for p in at]))
        probe = sorted({nq - 1, *(i for hits in words.values() for _, idx in hits for i in idx)})
        probe_t = torch.tensor(probe, dtype=torch.long)
        ranges = self._key_ranges(site, call, nq, nk, probe_t)
        if ranges is None:
            return
        lo = torch.zeros(b, nq, dtype=torch.long)
        hi = torch.zeros(b, nq, dtype=torch.long)
        lo[:, probe_t], hi[:, probe_t] = ranges
        lay = Layout.self_attn((1, 1, nq)) if nq == nk else Layout.cross((1, 1, nq), text=nk)
        out = reduce.attention_sums(
            q, k, lay, ("probe",), per_head=self.per_head, scale=call.scale, probe=probe_t.to(q.device),
            key_range=(lo.to(q.device), hi.to(q.device)), backend=self.backend, check_finite=False,
        )["probe"]  # fmt: skip
        p = out if self.per_head else out[:, None]  # [B, Hs, Q, nk]
        last = p[:, :, probe.index(nq - 1)]
        maps = {"answer": self._heads(seq.on_grid(last, key0))}
        masses = seq.masses(last, key0)
        for i, name in enumerate(SEGMENTS):
            if i != _VIDEO:
                maps[f"answer/{name}"] = self._heads(masses[..., i])
        self.add(site, "cond", maps, slice(None), b)
        for word, hits in words.items():
            rows = [row for row, _ in hits]
            per = torch.zeros_like(last)
            for row, idx in hits:
                per[row] = p[row, :, [probe.index(i) for i in idx]].mean(dim=1)
            value = self._heads(seq.on_grid(per, key0))[rows]
            self.add(site, "cond", {f"token/{word}": value}, rows, b)
        if self._prefill and self.prefill_reductions and q0 == 0 and nq == nk:
            full = self._key_ranges(site, call, nq, nk, None)
            if full is not None:
                for row in range(b):
                    self._prefill_maps(site, call, row, full[0][row], full[1][row])

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, Hs, ...]`` as a map: the head axis kept with ``per_head``, else dropped (Hs = 1)."""
        return t if self.per_head else t[:, 0]

    def _prefill_maps(
        self, site: Site, call: Intercepted, row: int, lo: torch.Tensor, hi: torch.Tensor
    ) -> None:
        """``temporal``, ``received`` and ``received/video`` of one batch row of a prefill call: its
        real tokens that are not video first, then its video tokens in raster order (a placeholder for
        a cell without a token), each key masked by where it sits in the sequence. Each part is in
        sequence order, so that a causal block of rows attends a window of keys about as long as its
        own prefix (the ``blocks`` backend computes no other key)."""
        assert self.inputs is not None
        seq = self.inputs.seq
        q, k = call.query.detach(), call.key.detach()
        n = int(k.shape[2])
        cells = seq.cells[row]
        f, h, w = seq.grid
        segs = seq.segments(0, n, torch.device("cpu"))[row]
        other = ((segs >= 0) & (segs != _VIDEO)).nonzero().flatten()
        n_other = int(other.numel())
        pos = torch.cat([other, cells])
        order = pos.clamp_min(0)
        lo_r, hi_r = lo[order].clone(), hi[order].clone()
        none = pos < 0
        lo_r[none] = 0
        hi_r[none] = 0
        dev = q.device
        out = reduce.attention_sums(
            q[row : row + 1][:, :, order.to(dev)], k[row : row + 1][:, :, order.to(dev)],
            Layout.joint(n_other, seq.grid, text_first=True), self.prefill_reductions,
            per_head=self.per_head, scale=call.scale, key_range=(lo_r[None].to(dev), hi_r[None].to(dev)),
            key_positions=pos[None].to(dev), backend=self.backend, check_finite=False,
        )  # fmt: skip
        maps: dict[str, torch.Tensor] = {}
        if "temporal" in out:
            kept = (cells.view(f, h * w) >= 0).sum(-1).to(torch.float32)
            scale = torch.where(kept > 0, (h * w) / kept, torch.full_like(kept, float("nan"))).to(dev)
            maps["temporal"] = out["temporal"] * scale[:, None]
        if "received" in out:
            real = int((hi_r > lo_r).sum())
            got = out["received"] * (pos.numel() / max(1, real))
            nan = torch.full((*got.shape[:-1], n), float("nan"), device=dev)
            valid = (~none).to(dev)
            maps["received"] = nan.index_copy(-1, pos[~none].to(dev), got[..., valid])
            video = torch.where(valid[n_other:], got[..., n_other:], float("nan"))
            maps["received/video"] = video.unflatten(-1, seq.grid)
        self.add(site, "cond", maps, [row], seq.batch)

    # -- the vision tower ---------------------------------------------------------------------
    def _vision(self, site: Site, call: Intercepted) -> None:
        assert self.inputs is not None
        if not self.vision_reductions:
            return
        order = self.inputs.vision
        q, k = call.query.detach(), call.key.detach()
        b, _, nq, _ = (int(s) for s in q.shape)
        nk = int(k.shape[2])
        if nq != nk:
            self.warn(site, f"a vision call of {nq} queries and {nk} keys is not self-attention")
            return
        off = self._offsets.get(id(site.module), 0)
        if order.kind == "sequence":
            assert order.cells is not None
            cells = order.cells[off : off + b * nk]
            if b != 1 or cells.shape[0] != nk:
                self.warn(site, f"a vision call of batch {b} and {nk} tokens goes past the videos' patches")
                return
            self._offsets[id(site.module)] = off + nk
            prefix, patches = 0, cells[None]  # [1, nk, 4]: (row, slot, y, x)
        else:
            assert order.frames is not None and order.patches is not None
            frames = order.frames[off : off + b]
            width = int(order.patches.shape[1])
            prefix = nk - width
            if frames.shape[0] != b or prefix < 0:
                self.warn(site, f"a vision call of {b} frames of {nk} tokens does not fit the videos' frames")
                return
            self._offsets[id(site.module)] = off + b
            yx = (
                order.patches[off : off + b]
                if order.patches.shape[0] > 1
                else order.patches.expand(b, -1, -1)
            )
            patches = torch.cat([frames[:, None, :].expand(-1, width, -1), yx], dim=-1)  # [b, P, 4]
        mask = None
        if call.attn_mask is not None:
            kp = key_padding(call.attn_mask, b, int(q.shape[1]), nk, slice(prefix, nk))
            if isinstance(kp, str):
                self.warn(site, kp)
                return
            mask = kp[0]
        lay = Layout.self_attn((1, 1, nk - prefix), prefix=prefix)
        out = reduce.attention_sums(
            q, k, lay, self.vision_reductions, per_head=self.per_head, scale=call.scale, key_padding_mask=mask,
            backend="auto" if self.backend == "auto" else self.backend, check_finite=False,
        )  # fmt: skip
        self._gather(site, patches, {n: t[..., prefix:] for n, t in out.items()})

    def _gather(self, site: Site, patches: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Add per-token values ``[b, (H,) P]`` at their patches ``[b, P, 4]`` (row, slot, y, x; y -1: padding)."""
        assert self.inputs is not None
        t, hv, wv = self.inputs.vision_grid
        batch = self.inputs.seq.batch
        valid = patches[..., 2] >= 0
        p = patches[valid]
        index = (((p[:, 0] * t + p[:, 1]) * hv + p[:, 2]) * wv + p[:, 3]).long()
        buf = self._buffers.get(id(site.module))
        dev = next(iter(values.values())).device
        size = batch * t * hv * wv
        if buf is None:
            heads = next(iter(values.values())).shape[1] if self.per_head else 1
            buf = _Buffer(
                {n: torch.zeros(heads, size, device=dev) for n in values},
                torch.zeros(size, device=dev),
            )
            self._buffers[id(site.module)] = buf
            self._buffer_sites[id(site.module)] = site
        index = index.to(dev)
        for name, v in values.items():
            v = v if self.per_head else v[:, None]  # [b, Hs, P]
            picked = v.permute(1, 0, 2)[:, valid.to(dev)]  # [Hs, n]
            buf.sums[name].index_add_(1, index, picked.to(torch.float32))
        buf.count.index_add_(0, index, torch.ones(index.shape[0], device=dev))
        self._vision_open = True

    def flush_vision(self) -> None:
        """Hand over each vision block's maps of the forward: per patch, the mean over the calls that
        held it (NaN where none did: padding)."""
        if not self._vision_open or self.inputs is None:
            return
        self._vision_open = False
        t, hv, wv = self.inputs.vision_grid
        batch = self.inputs.seq.batch
        sites = self._buffer_sites
        for key, buf in self._buffers.items():
            count = buf.count.clamp_min(1)
            maps = {}
            for name, total in buf.sums.items():
                mean = torch.where(buf.count > 0, total / count, float("nan"))
                value = mean.view(-1, batch, t, hv, wv).transpose(0, 1)  # [B, Hs, T, Hv, Wv]
                maps[f"vision/{name}"] = self._heads(value)
            self.add(sites[key], "cond", maps, slice(None), batch)
        self._buffers.clear()

    # -- metadata -----------------------------------------------------------------------------
    def metadata(self, row: Optional[int] = None) -> dict[str, Any]:
        """What the render and the report need to put the maps on the input video (for one batch row:
        its prompt words and its answer)."""
        inputs = self.inputs
        if inputs is None:
            return {"family": self.spec.family}
        f, h, w = inputs.grid
        t, hv, wv = inputs.vision_grid
        tp, patch, merge = inputs.temporal, inputs.patch, inputs.merge
        meta: dict[str, Any] = {
            "family": self.spec.family,
            "grid": [f, h, w],
            "patch_size": [tp, patch, patch],
            "vae_stride": [tp, patch * merge, patch * merge],
            "video": {"frames": f * tp, "height": hv * patch, "width": wv * patch, "fps": inputs.fps},
            "time": {"slot_frames": inputs.slot_frames, "timestamps": inputs.timestamps, "fps": inputs.fps},
            "vision_grid": [t, hv, wv],
            "steps_are": "answer tokens",
        }
        rows = range(inputs.seq.batch) if row is None else [row]
        answers = []
        for r in rows:
            seq = inputs.seq
            words = self.words[r] if r < len(self.words) else []
            # the whole answer first (the report opens on it), then the prompt's and the answer's words
            answer = list(range(seq.prefill, seq.prefill + max(1, len(words))))
            targets = {"answer": answer, **{w: list(p) for w, p in seq.rows[r].words.items()}}
            for s, word in enumerate(words):
                targets.setdefault(word, []).append(seq.prefill + s)
            ids = self.answers[r] if r < len(self.answers) else []
            answers.append({"tokens": list(ids), "words": list(words), "targets": targets})
        if row is not None:
            meta["answer"] = answers[0]
            meta["targets"] = answers[0]["targets"]
        else:
            meta["answers"] = answers
            meta["targets"] = answers[0]["targets"] if answers else {}
        return meta


def _bind(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A call's arguments by name (``inputs`` of ``generate`` as ``input_ids``)."""
    bound = bind_arguments(fn, args, kwargs)
    if "input_ids" not in bound and isinstance(bound.get("inputs"), torch.Tensor):
        bound["input_ids"] = bound["inputs"]
    return bound


def _cache_length(args: Mapping[str, Any]) -> int:
    cache = args.get("cache", args.get("past_key_values"))
    length = getattr(cache, "get_seq_length", None)
    try:
        return int(length()) if callable(length) else 0
    except Exception:  # a cache that cannot say: a prefill
        return 0
