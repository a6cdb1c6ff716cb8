"""Reading a user's images and mask pictures, writing mask files, RLE and boxes, JSON outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pam_jax.errors import CLIError, error_message

# -- reading images and masks --------------------------------------------------------------------


def _check_input_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise CLIError(f"{what} {path} is a folder, not a file")
    if not path.exists():
        raise CLIError(f"{what} {path}: no such file")


def read_image(path: str | os.PathLike, what: str = "image") -> np.ndarray:
    """A user's image as RGB uint8 [H, W, 3], EXIF orientation applied (as a viewer shows it)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    _check_input_file(p, what)
    try:
        with Image.open(p) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CLIError(f"{what} {p} is not a readable image ({error_message(e)})") from None


def read_mask(path: str | os.PathLike, hw: tuple[int, int], what: str = "mask") -> np.ndarray:
    """A mask picture -> bool [H, W] (non-zero in any channel = object). It must have the size
    `hw` (height, width) of the image or video it prompts."""
    m = read_image(path, what).max(axis=-1) > 0
    if m.shape != tuple(hw):
        raise CLIError(
            f"{what} {path} is {m.shape[1]}x{m.shape[0]} pixels; it must be the image's size, "
            f"{hw[1]}x{hw[0]}"
        )
    return m


# -- writing masks -------------------------------------------------------------------------------


def write_mask_png(mask: np.ndarray, path: str | os.PathLike) -> Path:
    """A boolean [H, W] mask as a black / white (0 / 255) 8-bit PNG."""
    from PIL import Image

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255, mode="L").save(p)
    return p


def mask_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO run-length encoding {"size": [h, w], "counts": str} (pycocotools' compressed form)."""
    from pycocotools import mask as mask_utils

    m = np.asfortranarray((np.asarray(mask) > 0).astype(np.uint8))
    rle = mask_utils.encode(m)
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def mask_box(mask: np.ndarray) -> list[int] | None:
    """The mask's bounding box [x1, y1, x2, y2] (exclusive x2, y2), None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def mask_bbox(mask: np.ndarray) -> list[int] | None:
    """The mask's bounding box as COCO's bbox [x, y, w, h], None for an empty mask."""
    b = mask_box(mask)
    return None if b is None else [b[0], b[1], b[2] - b[0], b[3] - b[1]]


def write_json(path: str | os.PathLike, data: Any) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return p
