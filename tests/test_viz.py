"""pam_jax.viz: CJK text, ellipsis, label placement for empty masks, legend (issue 10 item 8)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from pam_jax import viz


def _glyph(text: str) -> np.ndarray:
    img = Image.new("L", (80, 40), 0)
    ImageDraw.Draw(img).text((2, 2), text, fill=255, font=viz.font(24))
    return np.asarray(img) > 0


def test_chinese_glyphs_are_not_boxes():
    # a font without CJK glyphs draws every character as the same "missing glyph" box
    a, b, c = _glyph("猫"), _glyph("狗"), _glyph("沙")
    assert a.any() and b.any()
    assert (a != b).sum() > 20 and (a != c).sum() > 20 and (b != c).sum() > 20
    assert viz.font_path() is not None  # the bundled Noto Sans CJK


def test_shorten_ellipsis():
    assert viz.shorten("a  b\nc") == "a b c"
    long = "word " * 30
    cut = viz.shorten(long, 20)
    assert len(cut) <= 20 and cut.endswith("…")


def _label_pixels(img: Image.Image, base: np.ndarray, color) -> np.ndarray:
    """Pixels painted exactly in the label's background colour (and not there before)."""
    a = np.asarray(img)
    return np.all(a == np.asarray(color, np.uint8), axis=-1) & ~np.all(a == base, axis=-1)


def test_empty_mask_label_at_its_prompt():
    base = np.full((200, 300, 3), 40, np.uint8)
    empty = np.zeros((1, 200, 300), bool)
    img = viz.overlay_masks(base, empty, labels=["lost"], anchors=[(200, 150)], outline=False)
    ys, xs = np.nonzero(_label_pixels(img, base, viz.color(0)))
    assert len(xs) and xs.min() >= 195 and ys.min() >= 140  # near the prompt, not at (0, 0)


def test_long_label_cut_and_legend():
    base = np.full((120, 400, 3), 40, np.uint8)
    m = np.zeros((2, 120, 400), bool)
    m[0, 60:100, 20:100] = True
    m[1, 70:110, 60:140] = True  # overlapping masks
    full = viz.overlay_masks(base, m, labels=["x" * 200, None], max_label_chars=10)
    # the label box of a 10-character label is far narrower than the image
    ys, xs = np.nonzero(_label_pixels(full, base, viz.color(0)))
    assert xs.max() - xs.min() < 200
    with_legend = viz.overlay_masks(base, m, legend=["box prompt", "point prompt"])
    plain = viz.overlay_masks(base, m)
    corner = np.asarray(with_legend)[:30, :30]
    assert (corner != np.asarray(plain)[:30, :30]).any()
    # each legend swatch holds its mask's colour
    for c in (viz.color(0), viz.color(1)):
        assert np.all(np.asarray(with_legend)[:40, :40] == np.asarray(c, np.uint8), axis=-1).any()


def test_chinese_labels_in_overlays():
    """Through `overlay_masks`' own signature (as a command draws its captions): two different
    Chinese captions give different pictures (a font without CJK draws both as the same boxes)."""
    base = np.full((120, 400, 3), 40, np.uint8)
    m = np.zeros((1, 120, 400), bool)
    m[0, 40:80, 150:250] = True

    def pic(label: str) -> np.ndarray:
        return np.asarray(viz.overlay_masks(base, m, labels=[label], outline=False))

    assert (pic("猫猫猫") != pic("狗狗狗")).any(-1).sum() > 30
