"""The decoration drawn into rendered frames: the label (token, step, time), the colour bar with its
ticks, and the text they are written in.

:func:`decor_layout` decides once per frame size where everything goes (:class:`Decor`: nothing overlaps,
nothing is drawn in frames below :data:`MIN_DECORATED`); :func:`decorate` draws it into a frame in place.
Text is white over the frame darkened to a third, in Pillow's default font scaled to the frame
(:func:`font_size`); each text's width and coverage mask are measured once (most frames of a video repeat
their label), under one lock, as the renders running at the same time share one FreeType face.

Example:
    >>> decor = decor_layout(480, 832, labels=True, colorbar=True, vrange=(0.0, 0.5))
    >>> decorate(frame, decor, "cat | step 3", "hot")          # frame [480, 832, 3] uint8, in place
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

_FONT_LOCK = threading.Lock()
#: Frames smaller than this (height, width) get no label and no colour bar: there is no room to read them.
MIN_DECORATED = (48, 64)
_MIN_FONT = 10


@functools.lru_cache(maxsize=16)
def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


@functools.lru_cache(maxsize=4096)
def _text_width(text: str, size: int) -> int:
    """The advance width of ``text`` at ``size`` pixels: measured once per text, as labels and ticks
    repeat on every frame."""
    with _FONT_LOCK:
        return math.ceil(_font(size).getlength(text))


@functools.lru_cache(maxsize=512)
def _text_mask(text: str, size: int, box_h: int, box_w: int, pad: int) -> np.ndarray:
    """The coverage [box_h, box_w] uint8 of ``text`` in a font of ``size`` pixels, ``pad`` pixels from the
    left and centred in height (Pillow's "lm" anchor): drawn once per text, since most frames of a video
    repeat their label."""
    from PIL import Image, ImageDraw

    image = Image.new("L", (box_w, box_h), 0)
    with _FONT_LOCK:  # one FreeType face is shared by the renders running at the same time
        ImageDraw.Draw(image).text((pad, box_h / 2), text, fill=255, font=_font(size), anchor="lm")
    mask = np.asarray(image)
    mask.flags.writeable = False
    return mask


def _blend_text(frame: np.ndarray, y0: int, x0: int, mask: np.ndarray) -> None:
    """White text by ``mask`` over the frame darkened to a third, in place at (y0, x0)."""
    h = min(mask.shape[0], frame.shape[0] - y0)
    w = min(mask.shape[1], frame.shape[1] - x0)
    if h <= 0 or w <= 0:
        return
    region = frame[y0 : y0 + h, x0 : x0 + w]
    cover = mask[:h, :w, None].astype(np.uint16)
    dark = region // 3
    # white over the darkened box by the glyph coverage, rounded as Pillow blends a mask
    tmp = (255 - dark) * cover + 128
    region[...] = dark + (((tmp >> 8) + tmp) >> 8).astype(np.uint8)


def _fit(text: str, size: int, width: int) -> tuple[str, int]:
    """``text`` and a font size (``size`` down to 10 pixels) whose box fits ``width``; cut with "..."
    when even the smallest font is too wide."""
    pad = max(3, size // 3)
    for s in range(size, _MIN_FONT - 1, -1):
        if _text_width(text, s) + 2 * pad <= width:
            return text, s
    s = _MIN_FONT
    while len(text) > 1 and _text_width(text + "...", s) + 2 * pad > width:
        text = text[:-1]
    return text.rstrip() + "...", s


def font_size(height: int, width: int) -> int:
    """The label font of a frame: a twentieth of its short side, 10 to 28 pixels."""
    return int(min(28, max(_MIN_FONT, round(min(height, width) / 20))))


def _label_box(text: str, size: int, height: int, width: int) -> tuple[str, int, int, int, int]:
    """The label as drawn: (text, font size, pad, box height, box width)."""
    text, size = _fit(text, size, width)
    pad = max(3, size // 3)
    return text, size, pad, min(height, size + 2 * pad), min(width, _text_width(text, size) + 2 * pad)


def draw_label(frame: np.ndarray, text: str, *, size: Optional[int] = None) -> int:
    """Draw ``text`` in white on a dark box (the frame at a third of its brightness) at the top left of
    ``frame`` ``[H, W, 3]`` uint8, in place: the font scaled to the frame (:func:`font_size`), shrunk or the
    text cut so that the box fits the width.

    Returns:
        The height of the box drawn (0 when nothing fits).
    """
    height, width = frame.shape[:2]
    text, size, pad, box_h, box_w = _label_box(text, size or font_size(height, width), height, width)
    if box_h <= 0 or box_w <= 0:
        return 0
    _blend_text(frame, 0, 0, _text_mask(text, size, box_h, box_w, pad))
    return box_h


@dataclass(frozen=True)
class Decor:
    """Where the label, the colour bar and its ticks go in frames of one size: the label across the top,
    the bar below it at the right edge, its tick labels to its left, spaced so that none overlaps another.

    Attributes:
        label: the label's font size, or 0 without labels.
        label_h: the height of the label row (the bar starts below it).
        bar: (top, bottom, left, right) of the bar in pixels, or None without one.
        ticks: (y, text) of each tick, top to bottom.
        tick_font: the ticks' font size.
    """

    label: int
    label_h: int
    bar: Optional[tuple[int, int, int, int]]
    ticks: tuple[tuple[int, str], ...]
    tick_font: int

    def tick_boxes(self) -> list[tuple[int, int, int, int, str]]:
        """(top, bottom, left, right, text) of each tick label's dark box, left of the bar."""
        if self.bar is None:
            return []
        left = self.bar[2]
        pad = max(2, self.tick_font // 4)
        box_h = self.tick_font + 2 * pad
        out = []
        for y, text in self.ticks:
            box_w = _text_width(text, self.tick_font) + 2 * pad
            x0 = max(0, left - 3 - box_w)
            out.append((y - box_h // 2, y - box_h // 2 + box_h, x0, left - 3, text))
        return out

    def boxes(self, height: int, width: int, label: Optional[str]) -> list[tuple[str, int, int, int, int]]:
        """(what, top, bottom, left, right) of everything :func:`decorate` draws in a frame of this size:
        the label, the bar with its tick marks, each tick label. No two of them overlap."""
        out = []
        if label and self.label:
            _, _, _, box_h, box_w = _label_box(label, self.label, height, width)
            out.append(("label", 0, box_h, 0, box_w))
        if self.bar is not None:
            top, bottom, left, right = self.bar
            out.append(("bar", top, bottom, max(0, left - 3), right))
            out += [("tick " + text, y0, y1, x0, x1) for y0, y1, x0, x1, text in self.tick_boxes()]
        return out


def _tick_text(values: Sequence[float]) -> list[str]:
    """Tick labels with as many decimals as the ticks' spacing needs (one more than its first digit), in
    scientific notation for very large or small values; more digits until the labels differ."""
    top = max(abs(v) for v in values)
    spacing = min((abs(b - a) for a, b in zip(values, values[1:])), default=0.0) or top or 1.0
    first = math.floor(math.log10(spacing))
    scientific = top >= 1e4 or 0 < top < 1e-3
    for extra in range(1, 6):
        if scientific:
            digits = max(0, math.floor(math.log10(top)) - first + extra)
            texts = [f"{v:.{digits}e}" for v in values]
        else:
            texts = [f"{v:.{max(0, extra - first)}f}" for v in values]
        if len(set(texts)) == len(texts):
            return texts
    return texts


def decor_layout(
    height: int, width: int, *, labels: bool, colorbar: bool, vrange: Optional[tuple[float, float]]
) -> Optional[Decor]:
    """Lay out the decorations of ``height`` x ``width`` frames (None: nothing drawn, below
    :data:`MIN_DECORATED` or nothing asked for). ``vrange`` is the (low, high) value the bar's ends show;
    None labels them "min" and "max" (a range per frame)."""
    if height < MIN_DECORATED[0] or width < MIN_DECORATED[1] or not (labels or colorbar):
        return None
    size = font_size(height, width)
    margin = max(2, min(height, width) // 60)
    label_h = size + 2 * max(3, size // 3) if labels else 0
    if not colorbar:
        return Decor(size, label_h, None, (), 0)
    tick_font = max(_MIN_FONT, round(size * 0.85))
    bar_w = max(5, width // 40)
    right = width - margin
    # the bar's ends carry the first and last ticks: half a tick label more is kept above and below it
    half = (tick_font + 2 * max(2, tick_font // 4)) // 2 + 1
    top, bottom = label_h + 2 * margin + half, height - 2 * margin - half
    if bottom - top < 2 * tick_font:
        return Decor(size if labels else 0, label_h, None, (), 0)
    count = int(min(5, max(2, (bottom - top) // (3 * tick_font) + 1)))
    if vrange is None:
        texts = ["max", "min"]
        count = 2
    else:
        lo, hi = vrange
        texts = _tick_text([hi - (hi - lo) * i / (count - 1) for i in range(count)])
    ys = [round(top + (bottom - 1 - top) * i / (count - 1)) for i in range(count)]
    return Decor(
        size if labels else 0, label_h, (top, bottom, right - bar_w, right), tuple(zip(ys, texts)), tick_font
    )


@functools.lru_cache(maxsize=32)
def _bar_strip(bar_h: int, bar_w: int, colormap: str) -> np.ndarray:
    """A vertical colour bar [bar_h, bar_w, 3] uint8, high values on top, in a 1-pixel dark frame."""
    import attnmap.render as render

    ramp = np.linspace(1.0, 0.0, bar_h, dtype=np.float32)[:, None].repeat(2, axis=1)
    strip = render.frames(
        ramp, size=(bar_h, bar_w), colormap=colormap, normalize="fixed", vmin=0.0, vmax=1.0
    )[0]
    strip[[0, -1]] = 40
    strip[:, [0, -1]] = 40
    strip.flags.writeable = False
    return strip


def decorate(frame: np.ndarray, decor: Decor, label: Optional[str], colormap: str) -> None:
    """Draw the label, the colour bar and its ticks of ``decor`` into ``frame`` [H, W, 3] uint8, in place."""
    if label and decor.label:
        draw_label(frame, label, size=decor.label)
    if decor.bar is None:
        return
    top, bottom, left, right = decor.bar
    frame[top:bottom, left:right] = _bar_strip(bottom - top, right - left, colormap)
    for (y, _), (y0, y1, x0, x1, text) in zip(decor.ticks, decor.tick_boxes()):
        pad = max(2, decor.tick_font // 4)
        _blend_text(frame, y0, x0, _text_mask(text, decor.tick_font, y1 - y0, x1 - x0, pad))
        frame[y, left - 3 : left] = 255  # the tick mark
