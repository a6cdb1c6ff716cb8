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
) -> Image.Image:
    """The image with each mask blended in its own colour, plus optional prompts and labels.

    masks: [N, H, W] booleans (or anything where > 0 is foreground) at the image size.
    labels: one text per mask (None or "" to skip), drawn at the top-left of the mask's box.
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
        for m, c, text in zip(masks, cols, labels):
            if not text:
                continue
            ys, xs = np.nonzero(m)
            x0, y0 = (int(xs.min()), int(ys.min())) if len(xs) else (0, 0)
            left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
            # keep the label inside the image
            dx, dy = min(0, w - right), min(0, h - bottom)
            box = (left + dx - 2, top + dy - 2, right + dx + 2, bottom + dy + 2)
            draw.rectangle(box, fill=c)
            draw.text((x0 + dx, y0 + dy), text, fill=(255, 255, 255), font=font)
    return img
