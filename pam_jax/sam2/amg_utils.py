"""The official `sam2.utils.amg` helpers of the automatic mask generator, in JAX and NumPy.

Device side (jitted, static shapes): `stability_score`, `masks_to_boxes`, `box_near_crop_edge`,
`nms` (greedy, over a fixed-size padded set). Host side (NumPy): point grids, crop boxes,
uncompressed / COCO RLE, `remove_small_regions` (OpenCV, as the official one).

Each function keeps the official semantics exactly (same float32 arithmetic where it decides a
threshold): stability = |logits > t + o| / |logits > t - o|; boxes are inclusive pixel indices
([0, 0, 0, 0] for an empty mask); NMS is torchvision's (stable descending sort by score, a box
is suppressed by an earlier kept one when IoU > threshold, areas (x2 - x1) * (y2 - y1)).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from itertools import product
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pam_jax.sam2 import ops

# Official `is_box_near_crop_edge` tolerance (pixels).
EDGE_ATOL = 20.0

# ---------------------------------------------------------------------------------------------
# device side


def stability_score(logits: jax.Array, mask_threshold, offset) -> jax.Array:
    """logits [..., H, W] -> [...] float32: IoU of the masks thresholded at t + o and t - o
    (official `calculate_stability_score`; 0 / 0 = NaN for an empty union, as torch)."""
    inter = jnp.sum(logits > (mask_threshold + offset), axis=(-2, -1), dtype=jnp.int32)
    union = jnp.sum(logits > (mask_threshold - offset), axis=(-2, -1), dtype=jnp.int32)
    return inter.astype(jnp.float32) / union.astype(jnp.float32)


def masks_to_boxes(masks: jax.Array) -> jax.Array:
    """Binary masks [..., H, W] -> int32 XYXY boxes [..., 4] (inclusive pixel indices; [0, 0, 0,
    0] for an empty mask), official `batched_mask_to_box`."""
    return _boxes_from_any(jnp.any(masks, axis=-1), jnp.any(masks, axis=-2))


def upsample_form() -> str:
    """How the generator upsamples low-res logits to the crop's size (read at trace time):
    "taps" (torch's two-tap bilinear, `ops.upsample_taps`, float32; on accelerators) or
    "matmul" (`ops.resize_bilinear`'s interpolation matmuls; on the CPU, where XLA's gather
    fusions ran the filter 8x slower). `$PAM_JAX_AMG_FILTER` overrides it (benchmarks)."""
    form = os.environ.get("PAM_JAX_AMG_FILTER") or (
        "matmul" if jax.default_backend() == "cpu" else "taps"
    )
    if form not in ("taps", "matmul"):
        raise ValueError(f"PAM_JAX_AMG_FILTER={form!r}: use taps or matmul")
    return form


def upsample_logits(low: jax.Array, out_hw: tuple[int, int], form: str | None = None) -> jax.Array:
    """low-res logits [..., h, w] -> float32 [..., H, W] at out_hw (torch bilinear)."""
    if (form or upsample_form()) == "taps":
        return ops.upsample_taps(low.astype(jnp.float32), out_hw)
    return ops.resize_bilinear(low.astype(jnp.float32), out_hw, False, axes=(-2, -1))


def upsampled_stats(
    low: jax.Array, out_hw: tuple[int, int], mask_threshold, offset, form: str | None = None
) -> tuple[jax.Array, jax.Array]:
    """low-res logits [..., h, w] -> (stability [...], boxes [..., 4] int32) of the logits
    upsampled to out_hw (`upsample_logits`): `stability_score` and `masks_to_boxes` of
    `> mask_threshold` on them. With the "taps" form every figure is a reduction of an
    elementwise map, so XLA computes the upsample inside the reductions and never writes the
    full-size logits (1024 x 1536 float32 per mask, 1.2 GB per batch of 64 points)."""
    full = upsample_logits(low, out_hw, form)
    hi, lo = full > (mask_threshold + offset), full > (mask_threshold - offset)
    m = full > mask_threshold
    inter = jnp.sum(jnp.sum(hi, axis=-1, dtype=jnp.int32), axis=-1)
    union = jnp.sum(jnp.sum(lo, axis=-1, dtype=jnp.int32), axis=-1)
    boxes = _boxes_from_any(jnp.any(m, axis=-1), jnp.any(m, axis=-2))
    return inter.astype(jnp.float32) / union.astype(jnp.float32), boxes


def _boxes_from_any(rows: jax.Array, cols: jax.Array) -> jax.Array:
    """rows [..., H] / cols [..., W]: whether a row / column holds a mask pixel -> XYXY boxes."""
    h, w = rows.shape[-1], cols.shape[-1]
    ys, xs = jnp.arange(h, dtype=jnp.int32), jnp.arange(w, dtype=jnp.int32)
    bottom = jnp.max(jnp.where(rows, ys, 0), axis=-1)
    top = jnp.min(jnp.where(rows, ys, h), axis=-1)
    right = jnp.max(jnp.where(cols, xs, 0), axis=-1)
    left = jnp.min(jnp.where(cols, xs, w), axis=-1)
    empty = (right < left) | (bottom < top)
    box = jnp.stack([left, top, right, bottom], axis=-1)
    return jnp.where(empty[..., None], 0, box)


def box_near_crop_edge(boxes: jax.Array, crop_box: jax.Array, orig_box: jax.Array) -> jax.Array:
    """boxes [N, 4] in crop pixels -> [N] bool: a side within 20 px of the crop's edge but not
    of the image's (official `is_box_near_crop_edge`; crop_box / orig_box [4] XYXY)."""
    off = jnp.stack([crop_box[0], crop_box[1], crop_box[0], crop_box[1]])
    b = (boxes + off).astype(jnp.float32)
    near_crop = jnp.abs(b - crop_box.astype(jnp.float32)) <= EDGE_ATOL
    near_image = jnp.abs(b - orig_box.astype(jnp.float32)) <= EDGE_ATOL
    return jnp.any(near_crop & ~near_image, axis=-1)


@jax.jit
def nms(boxes: jax.Array, scores: jax.Array, valid: jax.Array, iou_threshold) -> jax.Array:
    """Greedy NMS (torchvision `nms`) over a padded set: boxes [K, 4] XYXY, scores [K], valid [K]
    (False = padding, never kept, never suppresses). Returns the kept indices in descending
    score order as [K] int32, -1 after the last kept one."""
    k = boxes.shape[0]
    boxes = boxes.astype(jnp.float32)
    s = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
    order = jnp.argsort(-s, stable=True)  # stable descending, as torchvision's CPU kernel
    b, v = boxes[order], valid[order]
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    area = (x2 - x1) * (y2 - y1)
    iw = jnp.maximum(0.0, jnp.minimum(x2[:, None], x2[None]) - jnp.maximum(x1[:, None], x1[None]))
    ih = jnp.maximum(0.0, jnp.minimum(y2[:, None], y2[None]) - jnp.maximum(y1[:, None], y1[None]))
    inter = iw * ih
    iou = inter / (area[:, None] + area[None] - inter)
    later = jnp.arange(k)[None] > jnp.arange(k)[:, None]
    over = (iou > iou_threshold) & later  # [i, j]: kept i suppresses later j

    def body(i, keep):
        return keep & ~(keep[i] & over[i])

    keep = jax.lax.fori_loop(0, k, body, v)
    pos = jnp.cumsum(keep) - 1
    out = jnp.full((k,), -1, jnp.int32)
    return out.at[jnp.where(keep, pos, k)].set(order.astype(jnp.int32), mode="drop")


def nms_host(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """`nms` on host arrays of any length (padded to a power of two so few shapes compile):
    the kept indices in descending score order."""
    from pam_jax.sam2.common import pow2_bucket

    n = int(len(scores))
    if n == 0:
        return np.zeros((0,), np.int64)
    k = pow2_bucket(n, 8)
    b = np.zeros((k, 4), np.float32)
    b[:n] = boxes
    s = np.zeros((k,), np.float32)
    s[:n] = scores
    v = np.arange(k) < n
    out = np.asarray(nms(b, s, v, np.float32(iou_threshold)))
    return out[out >= 0].astype(np.int64)


# ---------------------------------------------------------------------------------------------
# host side


def build_point_grid(n_per_side: int) -> np.ndarray:
    """[n^2, 2] points (x, y) evenly spaced in [0, 1]^2, cell centres (official)."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list:
    """One grid per crop layer: n_per_side / scale_per_layer**i points per side (official)."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """The official crop boxes (XYXY) and their layer: the whole image, then (2^i)^2 overlapping
    crops per layer i >= 1."""
    crop_boxes, layer_idxs = [], []
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    crop_boxes.append([0, 0, im_w, im_h])
    layer_idxs.append(0)

    def crop_len(orig_len, n_crops, overlap):
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for i_layer in range(n_layers):
        n = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n))
        crop_w, crop_h = crop_len(im_w, n, overlap), crop_len(im_h, n, overlap)
        x0s = [int((crop_w - overlap) * i) for i in range(n)]
        y0s = [int((crop_h - overlap) * i) for i in range(n)]
        for x0, y0 in product(x0s, y0s):
            crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layer_idxs.append(i_layer + 1)
    return crop_boxes, layer_idxs


def box_xyxy_to_xywh(box: Sequence[float]) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """Binary mask [H, W] -> the official uncompressed RLE {"size": [H, W], "counts": [...]}
    (column-major runs, starting with the count of zeros)."""
    h, w = mask.shape
    flat = np.asarray(mask, bool).T.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    idx = np.concatenate([[0], change, [h * w]])
    counts = np.diff(idx).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [h, w], "counts": counts}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Uncompressed RLE -> bool [H, W] (official `rle_to_mask`)."""
    h, w = rle["size"]
    vals = np.arange(len(rle["counts"])) % 2 == 1
    flat = np.repeat(vals, rle["counts"])
    return flat.reshape(w, h).T


def area_from_rle(rle: dict[str, Any]) -> int:
    return int(sum(rle["counts"][1::2]))


def coco_encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Binary mask [H, W] -> COCO compressed RLE with a str `counts` (JSON-ready)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    rle["counts"] = rle["counts"].decode("utf-8")
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"]}


def remove_small_regions(
    mask: np.ndarray, area_thresh: float, mode: str
) -> tuple[np.ndarray, bool]:
    """Fill holes (mode "holes") or drop islands ("islands") smaller than area_thresh pixels
    (8-connectivity, OpenCV, as the official one; all islands small: the largest is kept).
    Returns (mask, changed)."""
    import cv2

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    correct_holes = mode == "holes"
    working = (correct_holes ^ np.asarray(mask, bool)).astype(np.uint8)
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(working, 8)
    sizes = stats[:, -1][1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return np.asarray(mask, bool), False
    fill = [0] + small
    if not correct_holes:
        fill = [i for i in range(n_labels) if i not in fill]
        if not fill:
            fill = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True
