"""The decoration of rendered frames (attnmap.render.decor): the label equals Pillow drawing the text, and
labels, colour bar and ticks fit any frame size without overlapping, in matplotlib's colours."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

from attnmap.render import decor as render_decor


def test_draw_label_equals_pillow_drawing_the_text() -> None:
    """The cached glyph mask blended in numpy against Pillow drawing onto the darkened box itself."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (200, 320, 3), dtype=np.uint8)
    text = "cat | step 3 (2/5)"
    size = 10  # a twentieth of the short side
    font = ImageFont.load_default(size=size)
    pad = 3
    box_h, box_w = size + 2 * pad, int(np.ceil(font.getlength(text))) + 2 * pad
    region = Image.fromarray(frame[:box_h, :box_w] // 3)
    ImageDraw.Draw(region).text((pad, box_h / 2), text, fill=(255, 255, 255), font=font, anchor="lm")
    expected = frame.copy()
    expected[:box_h, :box_w] = np.asarray(region)
    for _ in range(2):  # the second call draws from the cache
        drawn = frame.copy()
        assert render_decor.draw_label(drawn, text) == box_h
        assert np.abs(drawn.astype(int) - expected.astype(int)).max() <= 1
    assert (drawn[:box_h, :box_w] > 200).all(axis=-1).sum() > 20  # white glyph pixels exist
    np.testing.assert_array_equal(drawn[box_h:], frame[box_h:])  # nothing drawn outside the box


# -- legibility: labels, colour bar and ticks laid out for any size ---------------------------------------
SIZES = [
    (48, 64),
    (64, 64),
    (96, 128),
    (120, 90),
    (240, 426),
    (480, 832),
    (720, 1280),
    (1080, 1920),
    (64, 2000),
]


@pytest.mark.parametrize(("height", "width"), SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_decorations_fit_and_never_overlap(height: int, width: int) -> None:
    label = "triangle | mean of steps 0..49 | block 12 | head 3 | t=3.25s"
    decor = render_decor.decor_layout(height, width, labels=True, colorbar=True, vrange=(0.000358, 0.5))
    assert decor is not None
    assert height < 64 or (
        decor.bar is not None and len(decor.ticks) >= 2
    )  # 48 high: room for the label only
    boxes = decor.boxes(height, width, label)
    for i, (what, top, bottom, left, right) in enumerate(boxes):
        assert 0 <= top < bottom <= height and 0 <= left < right <= width, (what, top, bottom, left, right)
        for other, t2, b2, l2, r2 in boxes[i + 1 :]:
            assert bottom <= t2 or b2 <= top or right <= l2 or r2 <= left, f"{what} overlaps {other}"
    # decorate draws only inside those boxes, and something inside each
    frame = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    drawn = frame.copy()
    render_decor.decorate(drawn, decor, label, "viridis")
    changed = (drawn != frame).any(-1)
    inside = np.zeros_like(changed)
    for what, top, bottom, left, right in boxes:
        inside[top:bottom, left:right] = True
        assert changed[top:bottom, left:right].mean() > 0.2, what
    assert not (changed & ~inside).any()
    # the font grows with the frame, from 10 pixels
    assert decor.label == max(10, min(28, round(min(height, width) / 20)))


def test_colour_bar_and_ticks_show_the_range() -> None:
    decor = render_decor.decor_layout(480, 832, labels=True, colorbar=True, vrange=(0.0, 2.0))
    assert decor is not None and decor.bar is not None
    assert [t for _, t in decor.ticks] == ["2.00", "1.50", "1.00", "0.50", "0.00"]
    frame = np.zeros((480, 832, 3), np.uint8)
    render_decor.decorate(frame, decor, None, "viridis")
    top, bottom, left, right = decor.bar
    column = frame[top + 1 : bottom - 1, (left + right) // 2].astype(int)
    table = np.asarray(matplotlib.colormaps["viridis"](np.linspace(1, 0, bottom - top))[:, :3] * 255)[1:-1]
    assert np.abs(column - table).max() <= 3  # high values on top, matplotlib's colours
    # each tick mark sits on the bar's row of its value
    for (y, _), value in zip(decor.ticks, (2.0, 1.5, 1.0, 0.5, 0.0)):
        assert (frame[y, left - 3 : left] == 255).all()
        assert abs(1 - (y - top) / (bottom - 1 - top) - value / 2.0) < 1.5 / (bottom - top)
    per_frame = render_decor.decor_layout(480, 832, labels=False, colorbar=True, vrange=None)
    assert per_frame is not None and [t for _, t in per_frame.ticks] == ["max", "min"]


def test_small_frames_get_no_decorations_and_long_labels_are_cut() -> None:
    assert render_decor.decor_layout(47, 200, labels=True, colorbar=True, vrange=(0, 1)) is None
    assert render_decor.decor_layout(200, 63, labels=True, colorbar=True, vrange=(0, 1)) is None
    frame = np.full((96, 128, 3), 255, np.uint8)
    text = "a very long label that cannot fit in a small frame at all"
    height = render_decor.draw_label(frame, text)
    assert 0 < height < 30 and (frame[height:] == 255).all()
    darkened = np.flatnonzero((frame[:height] < 255).any(axis=(0, 2)))
    assert darkened.max() >= 120  # the box spans the width: the text was cut to fit it, in the smallest font
    cut, size = render_decor._fit(text, 10, 128)
    assert cut.endswith("...") and text.startswith(cut[:-3]) and size == 10
