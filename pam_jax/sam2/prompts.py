"""The one prompt module: points, labels, boxes and masks for every predictor, CLI and data path.

A `Prompt` is one object's visual prompt on one image, as the official API takes it:

- points float32 [P, 2] (x, y) and labels int32 [P]: 1 positive click, 0 negative click,
  2 / 3 the top-left / bottom-right box corners. A box `[x1, y1, x2, y2]` becomes the two
  corner points (labels 2, 3) placed BEFORE the clicks (official `add_new_points_or_box` and
  `SAM2ImagePredictor._prep_prompts`).
- mask: an optional [H, W] bool / float mask at the image's size (official `add_new_mask`);
  a mask prompt takes no points or box.

`make_prompt` checks a prompt against one rule set (one `PromptError` message per bad case);
`to_model` moves it to the model's input frame (the official normalize-then-scale transform for
points, `add_new_mask`'s antialiased resize + 0.5 threshold for masks); `pad_prompts` stacks N
model-frame prompts into static, power-of-two-bucketed arrays (`PaddedPrompts`) for a jitted
call. A mask row of `PaddedPrompts` holds the prompt-less (0, 0) / -1 point (valid), which is
the point the official `_use_mask_as_output` path feeds the decoder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pam_jax.sam2.common import pow2_bucket
from pam_jax.sam2.ops import resize_bilinear

# Coordinates at most this far outside the image (in the prompt's pixels) are clipped to the
# edge (a click on the last pixel's far edge, a box rounded outwards); further out is an error.
EDGE_TOLERANCE = 1.0
BOX_LABELS = (2, 3)
REGION_KEYS = ("box", "points", "labels", "mask")


class PromptError(ValueError):
    """A prompt that breaks the rules (the message names the problem)."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One object's prompt: points [P, 2] float32 (x, y), labels [P] int32, mask [H, W] or None.

    Coordinates are in the pixels of the image the prompt was made for (original pixels from
    `make_prompt`, model pixels after `to_model`)."""

    points: np.ndarray
    labels: np.ndarray
    mask: np.ndarray | None = None

    @property
    def num_points(self) -> int:
        return int(self.labels.shape[0])

    @property
    def is_mask(self) -> bool:
        return self.mask is not None


@dataclasses.dataclass(frozen=True)
class PaddedPrompts:
    """N prompts padded to P points (model pixels), ready for a jitted call.

    coords [N, P, 2] float32, labels [N, P] int32 (-1 padding), valid [N, P] bool,
    mask_inputs [N, S, S] float32 binary (None when no row has a mask), is_mask [N] bool."""

    coords: np.ndarray
    labels: np.ndarray
    valid: np.ndarray
    mask_inputs: np.ndarray | None
    is_mask: np.ndarray

    @property
    def num_prompts(self) -> int:
        return int(self.labels.shape[0])


def _finite_array(x: Any, what: str, dtype=np.float32) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype)
    except (TypeError, ValueError) as e:
        raise PromptError(f"{what} must be numbers, got {x!r}") from e
    if not np.all(np.isfinite(arr)):
        raise PromptError(f"{what} must be finite, got {arr.tolist()}")
    return arr


def _inside(xy: np.ndarray, image_hw: tuple[int, int], what: str, tolerance: float) -> np.ndarray:
    """xy [..., 2] clipped to [0, W] x [0, H] when at most `tolerance` outside, else an error."""
    h, w = image_hw
    lim = np.array([w, h], np.float32)
    bad = np.any((xy < -tolerance) | (xy > lim + tolerance), axis=-1)
    if np.any(bad):
        raise PromptError(
            f"{what} {xy[bad].tolist()} outside the {w:g}x{h:g} image "
            f"(x in [0, {w:g}], y in [0, {h:g}])"
        )
    return np.clip(xy, 0.0, lim).astype(np.float32)


def _labels(labels: Any, n: int) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim == 0:
        lab = lab.reshape(1)
    if lab.ndim != 1 or lab.shape[0] != n:
        raise PromptError(f"{n} points but labels have shape {tuple(lab.shape)}")
    if lab.size and not np.issubdtype(lab.dtype, np.integer):
        try:
            f = lab.astype(np.float64)
        except (TypeError, ValueError) as e:
            raise PromptError(f"labels must be integers, got {lab.tolist()}") from e
        if not np.all(f == np.round(f)):
            raise PromptError(f"labels must be integers, got {lab.tolist()}")
        lab = f
    lab = lab.astype(np.int32)
    if np.any((lab < 0) | (lab > 3)):
        raise PromptError(
            f"labels must be 1 (positive), 0 (negative) or 2 / 3 (box corners), got {lab.tolist()}"
        )
    return lab


def make_prompt(
    points: Any = None,
    labels: Any = None,
    box: Any = None,
    mask: Any = None,
    *,
    image_hw: tuple[int, int],
    tolerance: float = EDGE_TOLERANCE,
) -> Prompt:
    """Check one prompt and build a `Prompt` (coordinates in the pixels of an image of size
    image_hw = (H, W)); raises PromptError naming the problem.

    points [P, 2] (x, y) with labels [P] (given together); box [x1, y1, x2, y2] (x1 <= x2,
    y1 <= y2), placed before the points as corners 2 / 3; mask [H, W] bool / 0-1 (alone).
    Coordinates within `tolerance` pixels outside the image are clipped to its edge."""
    h, w = (int(v) for v in image_hw)
    if h < 1 or w < 1:
        raise PromptError(f"image size must be positive, got {image_hw}")
    if points is None and labels is None and box is None and mask is None:
        raise PromptError("empty prompt: give points (with labels), a box or a mask")
    if (points is None) != (labels is None):
        raise PromptError("points and labels must be provided together")
    if mask is not None:
        if points is not None or box is not None:
            raise PromptError("a mask prompt takes no points or box (as add_new_mask)")
        m = np.asarray(mask)
        if m.dtype != bool:
            m = _finite_array(m, "mask")
        if m.shape != (h, w):
            raise PromptError(f"mask has shape {tuple(m.shape)}, the image is {(h, w)} (H, W)")
        if not np.any(m):
            raise PromptError("the mask prompt is empty (no foreground pixel)")
        return Prompt(np.zeros((0, 2), np.float32), np.zeros((0,), np.int32), m)
    pts = np.zeros((0, 2), np.float32)
    labs = np.zeros((0,), np.int32)
    if points is not None:
        pts = _finite_array(points, "point coordinates")
        if pts.ndim != 2 or pts.shape[-1] != 2:
            raise PromptError(f"points must be [P, 2] (x, y), got shape {tuple(pts.shape)}")
        labs = _labels(labels, pts.shape[0])
        pts = _inside(pts, (h, w), "point(s)", tolerance)
    if box is not None:
        b = _finite_array(box, "box coordinates")
        if b.shape != (4,):
            raise PromptError(f"a box is 4 numbers x1, y1, x2, y2, got shape {tuple(b.shape)}")
        if b[2] < b[0] or b[3] < b[1]:
            raise PromptError(f"box {b.tolist()} has x2 < x1 or y2 < y1")
        corners = _inside(b.reshape(2, 2), (h, w), "box corner(s)", tolerance)
        pts = np.concatenate([corners, pts])
        labs = np.concatenate([np.asarray(BOX_LABELS, np.int32), labs])
    if labs.shape[0] == 0:
        raise PromptError("empty prompt: no points given")
    return Prompt(pts.astype(np.float32), labs.astype(np.int32), None)


def prompt_from_region(
    region: Mapping[str, Any], *, image_hw: tuple[int, int], index: int | None = None
) -> Prompt:
    """A region dict {"box"}, {"points", "labels"} (labels default to positive clicks), both,
    or {"mask"} -> `make_prompt`. `index` prefixes errors with "region i: "."""
    where = "" if index is None else f"region {index}: "
    try:
        unknown = set(region) - set(REGION_KEYS)
        if unknown:
            raise PromptError(f"unknown keys {sorted(unknown)} (allowed: {', '.join(REGION_KEYS)})")
        points, labels = region.get("points"), region.get("labels")
        if points is not None:
            points = np.asarray(points, np.float32)
            if points.ndim == 1 and points.shape[0] == 2:
                points = points[None]
            if labels is None:
                labels = np.ones(points.shape[:1], np.int32)
        return make_prompt(points, labels, region.get("box"), region.get("mask"), image_hw=image_hw)
    except (PromptError, ValueError) as e:
        raise PromptError(f"{where}{e}") from None


def to_model_coords(prompt: Prompt, image_hw: tuple[int, int], size: int) -> np.ndarray:
    """points [P, 2] in image pixels -> model-input pixels, as the official transform:
    x / W, y / H in float32, then * size."""
    h, w = image_hw
    xy = prompt.points.astype(np.float32).copy()
    xy[:, 0] = xy[:, 0] / np.float32(w)
    xy[:, 1] = xy[:, 1] / np.float32(h)
    return xy * np.float32(size)


@partial(jax.jit, static_argnames=("size",))
def _mask_to_model(mask: jax.Array, *, size: int) -> jax.Array:
    m = resize_bilinear(mask.astype(jnp.float32)[None], (size, size), True, axes=(-2, -1))[0]
    return (m >= 0.5).astype(jnp.float32)


def mask_to_model(mask: np.ndarray, size: int) -> np.ndarray:
    """Official `add_new_mask`: an [H, W] mask -> [size, size] float32 0 / 1 (antialiased
    bilinear resize and >= 0.5 when the size differs; unchanged values otherwise)."""
    m = np.asarray(mask)
    if m.shape == (size, size):
        return m.astype(np.float32)
    return np.asarray(_mask_to_model(jnp.asarray(m.astype(np.float32)), size=size))


def to_model(prompt: Prompt, image_hw: tuple[int, int], size: int) -> Prompt:
    """The prompt in the model's input frame (size x size): points by `to_model_coords`, a mask
    by `mask_to_model`."""
    mask = None if prompt.mask is None else mask_to_model(prompt.mask, size)
    return Prompt(to_model_coords(prompt, image_hw, size), prompt.labels, mask)


def pad_prompts(prompts: Sequence[Prompt], bucket: int | None = None) -> PaddedPrompts:
    """Stack N model-frame prompts: P = `bucket` when given (a prompt with more points is an
    error), else the smallest power of two holding the longest. Mask rows get the prompt-less
    (0, 0) / -1 point, valid, and their [S, S] mask in mask_inputs."""
    if not prompts:
        raise PromptError("no prompts to pad")
    longest = max(max(p.num_points for p in prompts), 1)
    p_len = pow2_bucket(longest) if bucket is None else int(bucket)
    if longest > p_len:
        raise PromptError(f"a prompt has {longest} points, more than the bucket of {p_len}")
    n = len(prompts)
    coords = np.zeros((n, p_len, 2), np.float32)
    labels = -np.ones((n, p_len), np.int32)
    valid = np.zeros((n, p_len), bool)
    is_mask = np.array([p.is_mask for p in prompts], bool)
    mask_inputs = None
    if is_mask.any():
        sizes = {p.mask.shape for p in prompts if p.mask is not None}
        if len(sizes) != 1 or any(a != b for a, b in sizes):
            raise PromptError(f"mask prompts must share one square model size, got {sizes}")
        ((s, _),) = sizes
        mask_inputs = np.zeros((n, s, s), np.float32)
    for i, p in enumerate(prompts):
        if p.mask is not None:
            mask_inputs[i] = p.mask.astype(np.float32)
            valid[i, 0] = True  # the prompt-less (0, 0) / -1 point
            continue
        k = p.num_points
        coords[i, :k], labels[i, :k], valid[i, :k] = p.points, p.labels, True
    return PaddedPrompts(coords, labels, valid, mask_inputs, is_mask)


def pad_regions(
    regions: Sequence[Mapping[str, Any]], image_hw: tuple[int, int], size: int
) -> PaddedPrompts:
    """Region dicts (`prompt_from_region`, original pixels) of one image -> model pixels
    (`to_model`), padded (`pad_prompts`). Errors name the region ("region i: ...")."""
    if not regions:
        raise PromptError("no regions: give at least one box, points or mask")
    rows = [
        to_model(prompt_from_region(r, image_hw=image_hw, index=i), image_hw, size)
        for i, r in enumerate(regions)
    ]
    return pad_prompts(rows)


def bbox_xywh_to_box(bbox: Sequence[float]) -> list[int]:
    """A COCO-style [x, y, w, h] box -> [x1, y1, x2, y2] with the release's rounding:
    [int(x), int(y), int(x + w), int(y + h)]."""
    if len(bbox) != 4:
        raise PromptError(f"a bbox is 4 numbers x, y, w, h, got {list(bbox)!r}")
    x, y, w, h = (float(v) for v in bbox)
    return [int(x), int(y), int(x + w), int(y + h)]
