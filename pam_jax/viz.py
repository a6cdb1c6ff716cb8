"""Drawing masks, boxes, points and labels over an image (PIL only; used by SAM 2 and PAM).

All functions take and return host data (numpy / PIL); nothing here touches JAX.

Text is drawn with Noto Sans CJK (the `noto-cjk-sans-otc` dependency, SIL Open Font License),
so Chinese captions (the `zh` tasks) render; `PAM_JAX_FONT=/path/to/font.ttf` overrides it. Long
labels are cut with an ellipsis; a region whose mask is empty gets its label at its prompt.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LABEL_CHARS = 48  # labels are cut here with "…" (the JSON outputs keep the full text)
CJK_FACE = 2  # NotoSansCJK-Regular.ttc faces: 0 JP, 1 KR, 2 SC, 3 TC, 4 HK

# A qualitative palette (Tableau 10): neighbouring masks stay distinguishable.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
POSITIVE_COLOR = (0, 220, 0)
NEGATIVE_COLOR = (230, 0, 0)


def color(i: int) -> tuple[int, int, int]:
    """The palette colour of mask `i` (cycling)."""
    return PALETTE[i % len(PALETTE)]


def font_path() -> tuple[str, int] | None:
    """(font file, face index) used for text: $PAM_JAX_FONT, else the bundled Noto Sans CJK."""
    env = os.environ.get("PAM_JAX_FONT")
    if env:
        return env, 0
    try:
        import noto_cjk_sans_otc
    except ImportError:
        return None
    return str(noto_cjk_sans_otc.FONT_PATH), CJK_FACE


@functools.lru_cache(maxsize=16)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The label font at `size` pixels (Noto Sans CJK SC; PIL's default font without it)."""
    found = font_path()
    if found is not None:
        try:
            return ImageFont.truetype(found[0], size, index=found[1])
        except OSError:
            pass
    return ImageFont.load_default(size=size)


def shorten(text: str, limit: int = LABEL_CHARS) -> str:
    """One line of at most `limit` characters, cut with an ellipsis."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _as_rgb(image: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"expected an H x W x 3 image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    return image[..., :3]


def _edges(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean mask (4-neighbourhood), for crisp outlines."""
    m = np.pad(mask, 1, mode="constant")
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def _overlap(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def overlay_masks(
    image: np.ndarray | Image.Image,
    masks: np.ndarray | Sequence[np.ndarray],
    *,
    labels: Sequence[str | None] | None = None,
    colors: Sequence[tuple[int, int, int]] | None = None,
    alpha: float = 0.5,
    outline: bool = True,
    boxes: np.ndarray | Sequence[Sequence[float]] | None = None,
    points: np.ndarray | Sequence[Sequence[float]] | None = None,
    point_labels: Sequence[int] | None = None,
    label_xy: Sequence[Sequence[float] | None] | None = None,
    anchors: Sequence[Sequence[float] | None] | None = None,
    legend: Sequence[str] | None = None,
    max_label_chars: int = LABEL_CHARS,
) -> Image.Image:
    """The image with each mask blended in its own colour, plus optional prompts and labels.

    masks: [N, H, W] booleans (or anything where > 0 is foreground) at the image size.
    labels: one text per mask (None or "" to skip), drawn at `label_xy[i]` if given, else at the
    top-left of the mask's bounding box, else (an empty mask) at `anchors[i]` (its prompt: a
    box corner or a click), moved down where labels would overlap; cut at `max_label_chars`
    with an ellipsis. legend: one entry per mask, drawn with its colour swatch in the top-left
    corner (tells masks apart where they overlap).
    boxes: [K, 4] x1, y1, x2, y2 in pixels. points: [P, 2] x, y; point_labels 1 (positive,
    green) or 0 (negative, red).
    """
    rgb = _as_rgb(image)
    h, w = rgb.shape[:2]
    masks = [np.asarray(m) > 0 for m in masks]
    for i, m in enumerate(masks):
        if m.shape != (h, w):
            raise ValueError(f"mask {i} has shape {m.shape}, the image is {(h, w)}")
    if labels is not None and len(labels) != len(masks):
        raise ValueError(f"{len(labels)} labels for {len(masks)} masks")
    cols = list(colors) if colors is not None else [color(i) for i in range(len(masks))]

    out = rgb.astype(np.float32)
    for m, c in zip(masks, cols):
        out[m] = (1 - alpha) * out[m] + alpha * np.asarray(c, np.float32)
        if outline:
            out[_edges(m)] = c
    img = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    lw = max(1, round(min(h, w) / 300))

    if boxes is not None:
        for b in np.asarray(boxes, np.float32).reshape(-1, 4):
            draw.rectangle([float(v) for v in b], outline=(255, 255, 255), width=lw + 1)
    if points is not None:
        pts = np.asarray(points, np.float32).reshape(-1, 2)
        pl = [1] * len(pts) if point_labels is None else list(point_labels)
        r = max(3, round(min(h, w) / 100))
        for (x, y), lab in zip(pts, pl):
            fill = POSITIVE_COLOR if int(lab) == 1 else NEGATIVE_COLOR
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=(255, 255, 255))

    if legend is not None and len(legend) != len(masks):
        raise ValueError(f"{len(legend)} legend entries for {len(masks)} masks")
    fnt = font(max(10, round(min(h, w) / 40)))
    placed: list[tuple[int, int, int, int]] = []
    if legend is not None and len(legend):
        placed.extend(_draw_legend(draw, fnt, [shorten(t, max_label_chars) for t in legend], cols))
    if labels is not None:
        for k, (m, c, text) in enumerate(zip(masks, cols, labels)):
            if not text:
                continue
            text = shorten(text, max_label_chars)
            ys, xs = np.nonzero(m)
            if label_xy is not None and label_xy[k] is not None:
                x0, y0 = (int(v) for v in label_xy[k])
            elif len(xs):
                x0, y0 = int(xs.min()), int(ys.min())
            elif anchors is not None and anchors[k] is not None:
                x0, y0 = (int(v) for v in anchors[k])
            else:
                x0, y0 = 0, 0
            left, top, right, bottom = draw.textbbox((0, 0), text, font=fnt)
            tw, th = right - left + 4, bottom - top + 4
            x0, y0 = min(max(0, x0), max(0, w - tw)), min(max(0, y0), max(0, h - th))
            # move down past labels already drawn there, so none hides another
            while any(_overlap((x0, y0, x0 + tw, y0 + th), r) for r in placed) and y0 + th < h:
                y0 += th
            placed.append((x0, y0, x0 + tw, y0 + th))
            draw.rectangle((x0, y0, x0 + tw, y0 + th), fill=c)
            draw.text((x0 + 2 - left, y0 + 2 - top), text, fill=(255, 255, 255), font=fnt)
    return img


def _draw_legend(draw, fnt, entries, cols) -> list[tuple[int, int, int, int]]:
    """A swatch and a text per mask, stacked in the top-left corner; returns the boxes used."""
    boxes = []
    y = 4
    for text, c in zip(entries, cols):
        left, top, right, bottom = draw.textbbox((0, 0), text or " ", font=fnt)
        th = bottom - top + 4
        sw = th
        x1 = 4 + sw + 4 + right - left + 4
        draw.rectangle((4, y, x1, y + th), fill=(0, 0, 0))
        draw.rectangle((6, y + 2, 4 + sw - 2, y + th - 2), fill=c)
        draw.text((4 + sw + 4 - left, y + 2 - top), text, fill=(255, 255, 255), font=fnt)
        boxes.append((4, y, x1, y + th))
        y += th + 2
    return boxes
