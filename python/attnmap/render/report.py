"""The interactive report: one self-contained HTML page (or notebook output) of a store's maps.

:func:`write_report` writes a page that needs no server and fetches nothing (its script, styles and
data are inline) showing, for every video: each token's map by step (or the step mean), block and head
(when stored), branch, on a frame scrubber with play, over the original video's frames with an alpha
slider, in any colormap and normalisation; the frame-to-frame matrix with values on hover; the text
self-attention of the real (unpadded) tokens; the temporal locality and class of each head; and the
attention statistics the store holds (``blocks``, ``distance``, ``entropy``, ``received``).

The maps travel at latent resolution as uint8 (with each map's range) and the page resizes, normalises
and colours them with the arithmetic of the Rust core (float32, torch's bilinear ``align_corners=False``,
matplotlib's colour levels, the same blend), so that with the same options it shows the pixels
:func:`attnmap.render.frames` makes, within the uint8 quantisation (at most a colour level).

Controls carry ``data-role`` attributes (``video``, ``token``, ``step``, ``block``, ``head``, ``branch``,
``frame``, ``play``, ``alpha``, ``colormap``, ``normalize``) and the heatmap canvas
``data-role="heatmap"``, so that tests and scripts can drive the page.

In a notebook, :meth:`attnmap.store.Store.show` and :func:`recorder_viewer` give a :class:`Viewer`,
shown inline by its ``_repr_html_``.

Example:
    >>> write_report("outputs/attention_maps", "report.html")          # doctest: +SKIP
    >>> attnmap.show("outputs/attention_maps", "vid_001")    # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from attnmap._checks import integer
from attnmap._io import atomic_write
from attnmap.analysis.maps import real_text_length, real_text_words
from attnmap.analysis.normalization import NORMALIZE
from attnmap.errors import AttnmapError
from attnmap.render.options import RenderOptions

if TYPE_CHECKING:  # pragma: no cover
    from attnmap.store import Store

PathLike = Union[str, "os.PathLike[str]"]

#: Raw bytes of token maps a page carries by default (base64 adds a third); tiers beyond it are left out.
DEFAULT_MAX_MAP_BYTES = 12 << 20
#: A statistic with more values than this is left out of the page (named in its notes).
MAX_STAT_VALUES = 1 << 21
#: Attention statistics shown when stored, with the number of dimensions of one head's map.
STATS = {"blocks": 2, "distance": 3, "entropy": 1, "received": 1}
_BLOCK = re.compile(r"^(.*)/block(\d+)$")
_JPEG_QUALITY = 92


# -- what the page is built from -------------------------------------------------------------------
class _Source:
    """One video's maps: ``get`` returns an array, or None when the map is not recorded."""

    video_id: str
    metadata: dict[str, Any]
    steps: list[int]
    tokens: list[str]
    original: Optional[Path]

    def names(self) -> list[str]:
        """Base map names (no ``uncond/`` prefix, no ``/block<b>`` suffix)."""
        raise NotImplementedError

    def blocks(self) -> list[int]:
        raise NotImplementedError

    def branches(self) -> list[str]:
        raise NotImplementedError

    def get(
        self, name: str, *, step: Optional[int] = None, block: Optional[int] = None, branch: str = "cond"
    ) -> Optional[np.ndarray]:
        """The map as recorded, a token map over the input frames (a video LLM's temporal slots spread
        onto the frames each covers: ``time.slot_frames``)."""
        from attnmap.analysis.maps import on_input_frames

        arr = self._read(name, step=step, block=block, branch=branch)
        if arr is None or not name.startswith("token/"):
            return arr
        return on_input_frames(arr, self.metadata)

    def _read(
        self, name: str, *, step: Optional[int], block: Optional[int], branch: str
    ) -> Optional[np.ndarray]:
        raise NotImplementedError


class _StoreSource(_Source):
    def __init__(self, store: Store, video_id: str) -> None:
        from attnmap.render.videos import known_original

        self.store, self.video_id = store, video_id
        self.metadata = store.metadata(video_id)
        self.steps = store.steps(video_id)
        self.tokens = store.tokens(video_id)
        self.original = known_original(store, video_id)
        names = set(store.names(video_id))
        for step in self.steps:
            names.update(store.names(video_id, step))
        self._stored = names

    def _parts(self) -> Iterable[tuple[str, str, Optional[int]]]:
        for full in self._stored:
            branch, rest = (
                ("uncond", full[len("uncond/") :]) if full.startswith("uncond/") else ("cond", full)
            )
            hit = _BLOCK.match(rest)
            yield (branch, hit.group(1), int(hit.group(2))) if hit else (branch, rest, None)

    def names(self) -> list[str]:
        return sorted({name for _, name, _ in self._parts()})

    def blocks(self) -> list[int]:
        return sorted({b for _, _, b in self._parts() if b is not None})

    def branches(self) -> list[str]:
        found = {br for br, name, _ in self._parts() if name.startswith("token/")}
        return [b for b in ("cond", "uncond") if b in found] or ["cond"]

    def _read(
        self, name: str, *, step: Optional[int], block: Optional[int], branch: str
    ) -> Optional[np.ndarray]:
        from attnmap.analysis.maps import aggregated_map

        full = ("uncond/" if branch == "uncond" else "") + name + ("" if block is None else f"/block{block}")
        if full not in self._stored:
            return None
        try:
            if step is None:
                return aggregated_map(self.store, self.video_id, full)
            # through the store's read over steps: a step whose map fails its checksum is left out
            # (the store names its file in one warning) and the page shows the nearest map it carries
            return next((a for _, a in self.store.step_maps(self.video_id, full, [step])), None)
        except KeyError:
            return None


class _RecorderSource(_Source):
    """A Recorder's maps through its public API (names, steps, blocks, tokens, metadata, get)."""

    def __init__(self, rec: Any, video_id: str, batch_index: int) -> None:
        self.rec, self.video_id, self.row = rec, video_id, int(batch_index)
        self.metadata = dict(rec.metadata)
        self.steps = list(rec.steps)
        self.tokens = list(rec.tokens)
        from attnmap.render.videos import original_path

        self.original = original_path(self.metadata)
        if not self.steps:
            raise AttnmapError("recorder: nothing was recorded yet (no step has maps)")

    def names(self) -> list[str]:
        return list(self.rec.names)

    def blocks(self) -> list[int]:
        return list(self.rec.blocks) if self.metadata.get("per_block") else []

    def branches(self) -> list[str]:
        return ["cond", "uncond"] if self.metadata.get("branch") == "both" else ["cond"]

    def _read(
        self, name: str, *, step: Optional[int], block: Optional[int], branch: str
    ) -> Optional[np.ndarray]:
        try:
            value = self.rec.get(name, step=step, block=block, branch=branch)
        except (AttnmapError, KeyError):
            return None
        if value.shape[0] <= self.row:
            raise AttnmapError(f"batch_index: expected < {value.shape[0]}, got {self.row}")
        return np.asarray(value[self.row].detach().float().cpu().numpy(), dtype=np.float32)


# -- encoding ---------------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def quantize(arr: np.ndarray) -> dict[str, Any]:
    """A map as the page carries it: uint8 levels of its finite range, base64.

    Returns:
        ``{"shape", "lo", "hi", "q"}`` (and ``"bad"``: the flat indices of non-finite values): value
        ``i`` is ``lo + q[i] * (hi - lo) / 255`` (what :func:`dequantize` gives back).
    """
    a = np.asarray(arr, dtype=np.float32)
    finite = np.isfinite(a)
    lo = float(a[finite].min()) if finite.any() else 0.0
    hi = float(a[finite].max()) if finite.any() else 0.0
    span = hi - lo
    scaled = np.where(finite, a, lo).astype(np.float64) - lo
    q = np.zeros(a.shape, np.uint8) if span <= 0 else np.rint(scaled * (255.0 / span)).clip(0, 255)
    out: dict[str, Any] = {
        "shape": list(a.shape),
        "lo": lo,
        "hi": hi,
        "q": _b64(q.astype(np.uint8).tobytes()),
    }
    if not finite.all():
        out["bad"] = np.flatnonzero(~finite).tolist()
    return out


def dequantize(entry: dict[str, Any]) -> np.ndarray:
    """The float32 map a page shows from :func:`quantize`'s entry (non-finite values come back NaN)."""
    q = np.frombuffer(base64.b64decode(entry["q"]), np.uint8).astype(np.float64)
    lo, hi = float(entry["lo"]), float(entry["hi"])
    out = (lo + q * ((hi - lo) / 255.0)).astype(np.float32)
    if entry.get("bad"):
        out[np.asarray(entry["bad"], dtype=np.int64)] = np.nan
    return out.reshape(entry["shape"])


def _floats(arr: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(arr, dtype="<f4")
    return {"shape": list(a.shape), "f32": _b64(a.tobytes())}


# -- one video's page data ----------------------------------------------------------------------------
@dataclass
class _Budget:
    left: int
    notes: list[str] = field(default_factory=list)

    def take(self, nbytes: int, what: str) -> bool:
        if nbytes > self.left:
            self.notes.append(
                f"{what} left out: {nbytes / 1e6:.1f} MB of maps over what is left of the page's budget "
                f"({max(0, self.left) / 1e6:.1f} MB; raise it with --max-mb)"
            )
            return False
        self.left -= nbytes
        return True


def _token_maps(src: _Source, budget: _Budget) -> tuple[dict[str, Any], int]:
    """Token maps by ``token|step|block|head|branch`` (``mean``/``all`` for the means): every step's and
    the step mean first, then per block and per head of the step mean, then per block of each step, as
    far as the budget allows. Returns the maps and the number of heads."""
    maps: dict[str, Any] = {}
    heads = 0
    blocks = src.blocks()
    branches = src.branches()

    def key(token: str, step: Any, block: Any, head: Any, branch: str) -> str:
        return f"{token}|{step}|{block}|{head}|{branch}"

    means: dict[tuple[str, str], np.ndarray] = {}
    for branch in branches:
        for token in src.tokens:
            mean = src.get(f"token/{token}", branch=branch)
            if mean is not None:
                means[(token, branch)] = mean
    if not means:
        raise AttnmapError(f"video {src.video_id!r} has no token maps to show")
    one = next(iter(means.values()))
    per_map = int(np.prod(one.shape[-3:]))
    heads = one.shape[0] if one.ndim == 4 else 0
    for (token, branch), mean in means.items():
        maps[key(token, "mean", "all", "mean", branch)] = quantize(
            mean.mean(axis=0) if mean.ndim == 4 else mean
        )
    count = len(means)
    if budget.take(count * len(src.steps) * per_map, "per-step maps"):
        for token, branch in means:
            for step in src.steps:
                arr = src.get(f"token/{token}", step=step, branch=branch)
                if arr is not None:
                    maps[key(token, step, "all", "mean", branch)] = quantize(
                        arr.mean(0) if arr.ndim == 4 else arr
                    )
    if heads and budget.take(count * heads * per_map, "per-head maps"):
        for (token, branch), mean in means.items():
            for h in range(heads):
                maps[key(token, "mean", "all", h, branch)] = quantize(mean[h])
    if blocks and budget.take(count * len(blocks) * per_map, "per-block maps"):
        for token, branch in means:
            for b in blocks:
                arr = src.get(f"token/{token}", block=b, branch=branch)
                if arr is not None:
                    maps[key(token, "mean", b, "mean", branch)] = quantize(
                        arr.mean(0) if arr.ndim == 4 else arr
                    )
    if blocks and budget.take(count * len(blocks) * len(src.steps) * per_map, "per-step per-block maps"):
        for token, branch in means:
            for step in src.steps:
                for b in blocks:
                    arr = src.get(f"token/{token}", step=step, block=b, branch=branch)
                    if arr is not None:
                        maps[key(token, step, b, "mean", branch)] = quantize(
                            arr.mean(0) if arr.ndim == 4 else arr
                        )
    if heads and budget.take(count * len(src.steps) * heads * per_map, "per-step per-head maps"):
        for token, branch in means:
            for step in src.steps:
                arr = src.get(f"token/{token}", step=step, branch=branch)
                if arr is not None and arr.ndim == 4:
                    for h in range(heads):
                        maps[key(token, step, "all", h, branch)] = quantize(arr[h])
    if blocks and heads and budget.take(count * len(blocks) * heads * per_map, "per-block per-head maps"):
        for token, branch in means:
            for b in blocks:
                arr = src.get(f"token/{token}", block=b, branch=branch)
                if arr is not None and arr.ndim == 4:
                    for h in range(heads):
                        maps[key(token, "mean", b, h, branch)] = quantize(arr[h])
    return maps, heads


def _matrices(src: _Source, name: str, ndim: int) -> dict[str, Any]:
    """Small maps (``temporal``, ``text``) by ``step|block|head``: per step, and per block and head of
    the step mean."""
    out: dict[str, Any] = {}

    def add(arr: Optional[np.ndarray], step: Any, block: Any) -> None:
        if arr is None or arr.ndim not in (ndim, ndim + 1):
            return
        out[f"{step}|{block}|mean"] = _floats(arr.mean(0) if arr.ndim == ndim + 1 else arr)
        if arr.ndim == ndim + 1:
            for h in range(arr.shape[0]):
                out[f"{step}|{block}|{h}"] = _floats(arr[h])

    add(src.get(name), "mean", "all")
    for block in src.blocks():
        add(src.get(name, block=block), "mean", block)
    for step in src.steps:
        arr = src.get(name, step=step)
        if arr is not None:
            add(arr.mean(0) if arr.ndim == ndim + 1 else arr, step, "all")
    return out


def _locality(src: _Source) -> Optional[dict[str, Any]]:
    """Per block (or for the block mean) and head: the mass kept in the query's own frame, and the
    head's class."""
    from attnmap.analysis.maps import classify_heads, temporal_locality

    rows: list[tuple[str, np.ndarray]] = []
    for block in src.blocks():
        arr = src.get("temporal", block=block)
        if arr is not None and arr.ndim in (2, 3):
            rows.append((str(block), np.atleast_1d(temporal_locality(arr))))
    if not rows:
        arr = src.get("temporal")
        if arr is None or arr.ndim not in (2, 3):
            return None
        rows.append(("mean", np.atleast_1d(temporal_locality(arr))))
    width = max(r.shape[0] for _, r in rows)
    rows = [(b, r) for b, r in rows if r.shape[0] == width]
    values = np.stack([r for _, r in rows])
    frames = int(src.get("temporal").shape[-1]) if src.get("temporal") is not None else 1  # type: ignore[union-attr]
    return {
        "blocks": [b for b, _ in rows],
        "values": values.round(4).tolist(),
        "classes": classify_heads(values, frames).tolist(),
        "frames": frames,
    }


def _stats(src: _Source, notes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in src.names():
        base = name.split("/", 1)[0]
        if base not in STATS:
            continue
        for block in [None, *src.blocks()]:
            arr = src.get(name, block=block)
            if arr is None:
                continue
            label = name if block is None else f"{name}/block{block}"
            if arr.ndim not in (STATS[base], STATS[base] + 1):
                notes.append(
                    f"{label} left out: shape {arr.shape} is not a {STATS[base]}-D map (or per head)"
                )
                continue
            if arr.size > MAX_STAT_VALUES:
                notes.append(f"{label} left out: {arr.size} values is more than {MAX_STAT_VALUES}")
                continue
            out[label] = {**_floats(arr), "heads": arr.ndim == STATS[base] + 1, "kind": base}
    return out


def _text(src: _Source) -> Optional[dict[str, Any]]:
    arr = src.get("text")
    if arr is None or arr.ndim not in (2, 3) or arr.shape[-1] != arr.shape[-2]:
        return None
    n, how = real_text_length(src.metadata, arr.shape[-1])
    crop = arr[..., :n, :n]
    labels = real_text_words(src.metadata, n) or [str(i) for i in range(n)]
    data = {"mean|all|mean": _floats(crop.mean(0) if crop.ndim == 3 else crop)}
    if crop.ndim == 3:
        for h in range(crop.shape[0]):
            data[f"mean|all|{h}"] = _floats(crop[h])
    return {"labels": labels, "stored": int(arr.shape[-1]), "shown": n, "how": how, "maps": data}


def _background(src: _Source, frames: int, size: tuple[int, int], quality: int) -> Optional[list[str]]:
    """The original video's frames the overlay goes on, one JPEG (4:4:4) per output frame, exactly the
    frames (picked and cropped) that the overlay videos blend."""
    from PIL import Image

    from attnmap.render.videos import _Original

    if src.original is None:
        return None
    original = _Original.open(src.original)
    out = []
    for chunk in original.chunks(frames, size):
        for frame in chunk:
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(frame)).save(buf, "JPEG", quality=quality, subsampling=0)
            out.append(_b64(buf.getvalue()))
    return out


def _video_data(src: _Source, options: RenderOptions, max_map_bytes: int, background: bool) -> dict[str, Any]:
    from attnmap.render.videos import frame_plan, output_fps, size_from_meta

    budget = _Budget(max_map_bytes)
    maps, heads = _token_maps(src, budget)
    first = next(iter(maps.values()))
    latent = tuple(int(s) for s in first["shape"])
    original = None
    if background and src.original is not None:
        from attnmap.render.videos import _Original

        original = _Original.open(src.original)
    fps = output_fps(options, None if original is None else original.fps, src.metadata)
    num_frames, stride = frame_plan(
        src.metadata,
        latent[0],
        fps=fps,
        options=options,
        background_frames=None if original is None else original.frames,
    )
    size = original.size if original is not None else size_from_meta(src.metadata, (latent[1], latent[2]))
    frames = num_frames if num_frames is not None else 1 + (latent[0] - 1) * int(stride or 1)
    notes = budget.notes
    return {
        "id": src.video_id,
        "model": src.metadata.get("model"),
        "prompt": src.metadata.get("prompt"),
        "grid": list(latent),
        "size": list(size),
        "frames": frames,
        "time": {"stride": stride} if stride is not None else {"frames": frames},
        "fps": fps,
        "tokens": src.tokens,
        "steps": src.steps,
        "blocks": src.blocks(),
        "heads": heads,
        "branches": src.branches(),
        "maps": maps,
        "background": _background(src, frames, size, _JPEG_QUALITY) if original is not None else None,
        "temporal": _matrices(src, "temporal", 2),
        "text": _text(src),
        "locality": _locality(src),
        "stats": _stats(src, notes),
        "notes": notes,
    }


# -- the page ---------------------------------------------------------------------------------------
def _asset(name: str) -> str:
    return resources.files("attnmap.render").joinpath(name).read_text(encoding="utf-8")


def _payload(videos: list[dict[str, Any]], options: RenderOptions) -> dict[str, Any]:
    import attnmap
    import attnmap.render as render

    names = render.colormap_names()
    normalize = {k: v for k, v in NORMALIZE.items() if k != "fixed" or options.vmin is not None}
    return {
        "version": attnmap.__version__,
        "colormaps": {n: _b64(render.colormap_table(n).tobytes()) for n in names},
        "normalize": normalize,
        "options": {
            "colormap": options.colormap,
            "normalize": options.normalize,
            "alpha": options.overlay_alpha,
            "vmin": options.vmin,
            "vmax": options.vmax,
        },
        "videos": videos,
    }


class Viewer:
    """The report of one or more videos: ``html`` (a whole page), ``_repr_html_`` (the same viewer
    inline, for notebooks) and :meth:`save`.

    Example:
        >>> viewer = attnmap.show(root, "vid_001")   # doctest: +SKIP
        >>> viewer.save("vid_001.html")                          # doctest: +SKIP
    """

    def __init__(self, payload: dict[str, Any]) -> None:
        self.payload = payload
        self.uid = "attnmap-" + secrets.token_hex(6)

    @property
    def video_ids(self) -> list[str]:
        return [v["id"] for v in self.payload["videos"]]

    def fragment(self) -> str:
        """The viewer as an HTML fragment: its styles, its data and the script that mounts it."""
        data = json.dumps(self.payload, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
        style = _asset("report.css")
        script = _asset("report.js").replace("</", "<\\/")
        return (
            f'<div class="attnmap-report" id="{self.uid}"></div>\n'
            f"<style>{style}</style>\n"
            f'<script type="application/json" id="{self.uid}-data">{data}</script>\n'
            f"<script>{script}\nattnmapReport.mount(document.getElementById({json.dumps(self.uid)}));</script>"
        )

    def _repr_html_(self) -> str:
        return self.fragment()

    @property
    def html(self) -> str:
        """A whole self-contained page."""
        title = html.escape("attnmap report: " + ", ".join(self.video_ids))
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,"><title>{title}</title>'
            f"</head><body>\n{self.fragment()}\n</body></html>\n"
        )

    def save(self, path: PathLike) -> Path:
        """Write :attr:`html` to ``path`` atomically; returns the path."""
        out = Path(path)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"output: cannot make the folder {str(out.parent)!r}: {e.strerror or e}") from None
        atomic_write(out, self.html.encode("utf-8"))
        return out


def store_viewer(
    store: Store,
    video_ids: Optional[Sequence[str]] = None,
    *,
    options: Optional[RenderOptions] = None,
    max_map_bytes: int = DEFAULT_MAX_MAP_BYTES,
    background: bool = True,
) -> Viewer:
    """The viewer of a store's videos (all, or those named).

    Args:
        store: an opened store (:func:`attnmap.open_store`).
        video_ids: the videos to show (default: every video).
        options: the page's starting colormap, normalisation, alpha and fps (:class:`RenderOptions`).
        max_map_bytes: raw bytes of token maps per video; tiers beyond it are left out, in this order:
            per step, per head, per block, per step and block, per step and head, per block and head.
        background: embed the original video's frames (``video.path``) for the overlay.

    Raises:
        AttnmapError: an unknown video id, or a video without token maps.
    """
    options = options or RenderOptions()
    stored = store.videos()
    ids = list(video_ids) if video_ids else stored
    unknown = [v for v in ids if v not in stored]
    if unknown:
        raise AttnmapError(f"video {unknown[0]!r} is not in the store at {store.root}; it has {stored}")
    if not ids:
        raise AttnmapError(f"the store at {store.root} holds no videos")
    max_map_bytes = integer("max_map_bytes", max_map_bytes, low=0)
    videos = [_video_data(_StoreSource(store, v), options, max_map_bytes, background) for v in ids]
    return Viewer(_payload(videos, options))


def recorder_viewer(
    rec: Any,
    *,
    video_id: str = "recorder",
    batch_index: int = 0,
    options: Optional[RenderOptions] = None,
    max_map_bytes: int = DEFAULT_MAX_MAP_BYTES,
) -> Viewer:
    """The viewer of what a Recorder holds (before or without saving it), through its public API.

    Args:
        rec: a :class:`attnmap.capture.Recorder` with at least one finished step.
        video_id: the title shown.
        batch_index: which batch row to show.
        options: as in :func:`store_viewer`.
        max_map_bytes: as in :func:`store_viewer`.
    """
    options = options or RenderOptions()
    max_map_bytes = integer("max_map_bytes", max_map_bytes, low=0)
    src = _RecorderSource(rec, video_id, integer("batch_index", batch_index, low=0))
    return Viewer(_payload([_video_data(src, options, max_map_bytes, True)], options))


def show(
    source: Any,
    video_id: Optional[str] = None,
    *,
    batch_index: int = 0,
    options: Optional[RenderOptions] = None,
) -> Viewer:
    """The interactive viewer for a notebook (its ``_repr_html_`` shows it inline): of a store's videos
    (a :class:`~attnmap.store.Store` or its root; one video, or all), or of what a Recorder holds.

    Args:
        source: an opened store, a store root, or a :class:`attnmap.capture.Recorder`.
        video_id: the store video to show (default: every video); for a Recorder, the title.
        batch_index: a Recorder's batch row to show.
        options: colormap, normalisation ... (:class:`attnmap.RenderOptions`); None: defaults.

    Example:
        >>> attnmap.show("outputs/attention_maps", "vid_001")  # doctest: +SKIP
    """
    from attnmap.store import Store, open_store

    if isinstance(source, (str, os.PathLike)):
        source = open_store(source)
    if isinstance(source, Store):
        return store_viewer(source, None if video_id is None else [video_id], options=options)
    if callable(getattr(source, "get", None)) and hasattr(source, "steps"):
        name = video_id or str(getattr(source, "model_name", "recorder"))
        return recorder_viewer(source, video_id=name, batch_index=batch_index, options=options)
    raise AttnmapError(f"source must be a Store, a store root or a Recorder, got {type(source).__name__}")


def write_report(
    store: Union[Store, PathLike],
    output: PathLike,
    *,
    video_ids: Optional[Sequence[str]] = None,
    options: Optional[RenderOptions] = None,
    max_map_bytes: int = DEFAULT_MAX_MAP_BYTES,
    background: bool = True,
) -> Path:
    """Write the report of a store (or its root) to ``output`` (``.html``), atomically.

    Returns:
        The path written.
    """
    from attnmap.store import Store, open_store

    out = Path(output)
    if out.suffix.lower() not in (".html", ".htm"):
        raise AttnmapError(f"output: expected a file ending in .html, got {str(output)!r}")
    opened = store if isinstance(store, Store) else open_store(store)
    viewer = store_viewer(
        opened, video_ids, options=options, max_map_bytes=max_map_bytes, background=background
    )
    return viewer.save(out)


def page_bytes(viewer: Viewer) -> int:
    """The size of the viewer's page in bytes (UTF-8)."""
    return len(viewer.html.encode("utf-8"))


__all__ = [
    "DEFAULT_MAX_MAP_BYTES",
    "Viewer",
    "dequantize",
    "quantize",
    "recorder_viewer",
    "store_viewer",
    "write_report",
]
