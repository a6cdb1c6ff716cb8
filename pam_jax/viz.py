"""Drawing masks, boxes, points and labels over an image (PIL only; used by SAM 2 and PAM).

All functions take and return host data (numpy / PIL); nothing here touches JAX.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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
) -> Image.Image:
    """The image with each mask blended in its own colour, plus optional prompts and labels.

    masks: [N, H, W] booleans (or anything where > 0 is foreground) at the image size.
    labels: one text per mask (None or "" to skip), drawn at `label_xy[i]` if given, else at the
    top-left of the mask's bounding box, moved down where labels would overlap.
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

    if labels is not None:
        font = ImageFont.load_default(size=max(10, round(min(h, w) / 40)))
        placed: list[tuple[int, int, int, int]] = []
        for k, (m, c, text) in enumerate(zip(masks, cols, labels)):
            if not text:
                continue
            if label_xy is not None and label_xy[k] is not None:
                x0, y0 = (int(v) for v in label_xy[k])
            else:
                ys, xs = np.nonzero(m)
                x0, y0 = (int(xs.min()), int(ys.min())) if len(xs) else (0, 0)
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            tw, th = right - left + 4, bottom - top + 4
            x0, y0 = min(max(0, x0), max(0, w - tw)), min(max(0, y0), max(0, h - th))
            # move down past labels already drawn there, so none hides another
            while any(_overlap((x0, y0, x0 + tw, y0 + th), r) for r in placed) and y0 + th < h:
                y0 += th
            placed.append((x0, y0, x0 + tw, y0 + th))
            draw.rectangle((x0, y0, x0 + tw, y0 + th), fill=c)
            draw.text((x0 + 2 - left, y0 + 2 - top), text, fill=(255, 255, 255), font=font)
    return img
