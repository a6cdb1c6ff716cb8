"""SAM 2's automatic mask generator (official `SAM2AutomaticMaskGenerator`, sam2 1.1.0) in JAX.

    gen = SAM2AutomaticMaskGenerator(model, points_per_side=32)
    records = gen.generate(image_uint8_hwc)   # the official record dicts, one per mask
    masks = gen.generate_masks(image)         # the same as a typed `MaskSet` (bool masks)

What happens, per crop (the whole image, then `crop_n_layers` layers of overlapping crops):

1. the crop is encoded once (the image predictor's preprocessing: antialiased resize to the
   model size, ImageNet normalization; `image_predictor.encode_image`);
2. the crop's point grid (one positive click each, in crop pixels, normalized by the crop's
   width / height then scaled to the model size) is cut into batches of `points_per_batch`,
   the last one padded; one jitted call decodes every batch (`lax.map`; the same program for
   every photo size): the decoder (3 masks per point with `multimask_output`), optionally the
   `use_m2m` refinement (each mask fed back as a mask prompt with its point, single-mask
   output); a second one (compiled per crop size, small) upsamples each batch's logits to the
   crop size for the stability score, the IoU / stability thresholds, the boxes and the
   crop-edge test (`amg_utils.upsampled_stats`: on accelerators the upsample is computed
   inside those reductions, the full-size logits never written). Only the low-res logits and
   per-mask numbers stay;
3. box NMS (`box_nms_thresh`, by predicted IoU) over the crop's surviving masks, on the device
   (`amg_utils.nms`, one jitted greedy pass over a power-of-two padded set).

Across crops, NMS by `crop_nms_thresh` prefers masks of smaller crops. Only the final masks are
upsampled again to full resolution (bit-identical to the first pass), moved to the host and
encoded (binary, uncompressed RLE or COCO RLE). With `min_mask_region_area > 0` the official
`postprocess_small_regions` runs on the host (OpenCV): holes and islands smaller than the area
are removed, then NMS again, preferring unchanged masks.

Known difference: official sam2 1.1.0 never calls `postprocess_small_regions` from `generate`; it
hands `min_mask_region_area` to its image predictor, which fills holes / removes sprinkles in the
low-res logits only with its CUDA extension `sam2._C` (its CPU build skips that step with a
warning). pam-jax runs the documented clean-up instead (the SAM 1 generator's, at full size).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pam_jax.prepared import Prepared, merge, prepare
from pam_jax.sam2 import amg_utils
from pam_jax.sam2.common import pow2_bucket
from pam_jax.sam2.image_predictor import _as_uint8_rgb, encode_image
from pam_jax.sam2.model import SAM2Base

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
LOGIT_CLAMP = 32.0  # the official predictor's low-res clamp (m2m feeds clamped logits back)


class AMGError(ValueError):
    """Bad parameters or input for the automatic mask generator (the message names it)."""


@dataclasses.dataclass(frozen=True)
class AMGConfig:
    """The official generator's parameters (same names and defaults)."""

    points_per_side: int | None = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.8
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    mask_threshold: float = 0.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    output_mode: str = "binary_mask"
    use_m2m: bool = False
    multimask_output: bool = True

    def validate(self, point_grids: Sequence[np.ndarray] | None = None) -> AMGConfig:
        """Raise AMGError naming the first absurd parameter."""
        if (self.points_per_side is None) == (point_grids is None):
            raise AMGError("give exactly one of points_per_side or point_grids")
        if self.points_per_side is not None and not _is_int(self.points_per_side, 1):
            raise AMGError(f"points_per_side must be an integer >= 1, got {self.points_per_side!r}")
        if not _is_int(self.points_per_batch, 1):
            raise AMGError(
                f"points_per_batch must be an integer >= 1, got {self.points_per_batch!r}"
            )
        for name in (
            "pred_iou_thresh",
            "stability_score_thresh",
            "box_nms_thresh",
            "crop_nms_thresh",
        ):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and np.isfinite(v) and 0.0 <= v <= 1.0):
                raise AMGError(f"{name} must be a number in [0, 1], got {v!r}")
        for name in ("stability_score_offset", "mask_threshold"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and np.isfinite(v)):
                raise AMGError(f"{name} must be a finite number, got {v!r}")
        if self.stability_score_offset < 0:
            raise AMGError(
                f"stability_score_offset must be >= 0, got {self.stability_score_offset}"
            )
        if not _is_int(self.crop_n_layers, 0) or self.crop_n_layers > 4:
            raise AMGError(f"crop_n_layers must be an integer in 0..4, got {self.crop_n_layers!r}")
        if not (
            isinstance(self.crop_overlap_ratio, (int, float)) and 0 <= self.crop_overlap_ratio < 1
        ):
            raise AMGError(f"crop_overlap_ratio must be in [0, 1), got {self.crop_overlap_ratio!r}")
        if not _is_int(self.crop_n_points_downscale_factor, 1):
            raise AMGError(
                "crop_n_points_downscale_factor must be an integer >= 1, got "
                f"{self.crop_n_points_downscale_factor!r}"
            )
        if not _is_int(self.min_mask_region_area, 0):
            raise AMGError(
                f"min_mask_region_area must be an integer >= 0, got {self.min_mask_region_area!r}"
            )
        if self.output_mode not in OUTPUT_MODES:
            raise AMGError(f"output_mode must be one of {OUTPUT_MODES}, got {self.output_mode!r}")
        if self.points_per_side is not None:
            for i in range(self.crop_n_layers + 1):
                if int(self.points_per_side / self.crop_n_points_downscale_factor**i) < 1:
                    raise AMGError(
                        f"crop layer {i} would have no points: points_per_side "
                        f"{self.points_per_side} / crop_n_points_downscale_factor"
                        f"^{i} < 1"
                    )
        return self


def _is_int(v: Any, lo: int) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and int(v) >= lo


@dataclasses.dataclass
class MaskSet:
    """The generator's masks, N of them, in output order (host arrays).

    masks [N, H, W] bool at the image size; boxes [N, 4] XYXY (inclusive pixel indices, as
    official); areas [N]; predicted_iou [N]; stability_score [N]; points [N, 2] the click (image
    pixels) that made each mask; crop_boxes [N, 4] XYXY of the crop it came from."""

    masks: np.ndarray
    boxes: np.ndarray
    areas: np.ndarray
    predicted_iou: np.ndarray
    stability_score: np.ndarray
    points: np.ndarray
    crop_boxes: np.ndarray

    def __len__(self) -> int:
        return int(self.areas.shape[0])

    def take(self, idx: np.ndarray) -> MaskSet:
        return MaskSet(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))


@dataclasses.dataclass
class _Kept:
    """One crop's masks after its NMS: low-res logits on the device + host numbers."""

    low_res: jax.Array  # [K, 4h, 4w] float32 (unclamped: the masks' source)
    iou: np.ndarray
    stability: np.ndarray
    boxes: np.ndarray  # [K, 4] image pixels
    points: np.ndarray  # [K, 2] image pixels
    crop_box: list[int]


@partial(jax.jit, static_argnames=("structure", "multimask", "use_m2m"))
def _decode_points(
    structure,
    leaves,
    features: dict[str, Any],
    coords: jax.Array,  # [nb, B, 2] model pixels
    *,
    multimask: bool,
    use_m2m: bool,
) -> tuple[jax.Array, jax.Array]:
    """Every point batch of one crop through the decoder: unclamped low-res logits
    [nb, B * M, 4h, 4w] and predicted IoU [nb, B * M]. Independent of the crop's size, so
    photos of every size share this program."""
    model = merge(structure, leaves)
    embed, high = features["image_embed"], features["high_res_feats"]

    def one_batch(xy):  # [B, 2]
        b = xy.shape[0]
        out = model.decode_prompts(
            embed, high, xy[:, None, :], jnp.ones((b, 1), jnp.int32), multimask_output=multimask
        )
        m = out.masks.shape[1]
        low = out.masks.astype(jnp.float32).reshape(b * m, *out.masks.shape[2:])
        iou = out.iou_pred.astype(jnp.float32).reshape(b * m)
        if use_m2m:  # official refine_with_m2m: the clamped low-res mask back in, single mask
            pts = jnp.repeat(xy, m, axis=0)
            prev = jnp.clip(low, -LOGIT_CLAMP, LOGIT_CLAMP)[..., None]
            ref = model.decode_prompts(
                embed, high, pts[:, None, :], jnp.ones((b * m, 1), jnp.int32),
                mask_inputs=prev, has_mask=jnp.ones((b * m,), bool), multimask_output=False,
            )  # fmt: skip
            low = ref.masks[:, 0].astype(jnp.float32)
            iou = ref.iou_pred[:, 0].astype(jnp.float32)
        return low, iou

    return jax.lax.map(one_batch, coords)


@partial(jax.jit, static_argnames=("crop_hw",))
def _filter_candidates(
    low: jax.Array,  # [nb, R, 4h, 4w] (R = B * M rows per batch)
    iou: jax.Array,  # [nb, R]
    valid: jax.Array,  # [nb, R]
    thresholds: jax.Array,  # [4]: pred_iou, stability, stability offset, mask threshold
    crop_box: jax.Array,  # [4] int32
    orig_box: jax.Array,  # [4] int32
    *,
    crop_hw: tuple[int, int],
):
    """Per mask (nb * R rows): stability, box (crop pixels) and keep flag, computed on the
    logits upsampled to the crop's size, batch by batch (`amg_utils.upsampled_stats`: on an
    accelerator inside the reductions, the full-size logits never written)."""
    pred_iou_t, stab_t, offset, mask_t = thresholds[0], thresholds[1], thresholds[2], thresholds[3]

    def one_batch(args):
        lo, io, ok = args
        stab, boxes = amg_utils.upsampled_stats(lo, crop_hw, mask_t, offset)
        keep = ok & ((io > pred_iou_t) | (pred_iou_t <= 0))
        keep &= (stab >= stab_t) | (stab_t <= 0)
        keep &= ~amg_utils.box_near_crop_edge(boxes, crop_box, orig_box)
        return stab, boxes, keep

    stab, boxes, keep = jax.lax.map(one_batch, (low, iou, valid))
    n = low.shape[0] * low.shape[1]
    return (
        low.reshape(n, *low.shape[2:]),
        iou.reshape(n),
        stab.reshape(n),
        boxes.reshape(n, 4),
        keep.reshape(n),
    )


@partial(jax.jit, static_argnames=("hw",))
def _gather_upsample(low: jax.Array, idx: jax.Array, mask_threshold, *, hw: tuple[int, int]):
    """Binary masks [K, H, W] of rows `idx` of the low-res logits (padded rows: any index)."""
    sel = jnp.take(low, idx, axis=0)
    return amg_utils.upsample_logits(sel, hw) > mask_threshold


class SAM2AutomaticMaskGenerator:
    """Official-compatible automatic mask generator over a pam-jax `SAM2Base` (same parameters
    and defaults as `sam2.automatic_mask_generator.SAM2AutomaticMaskGenerator`)."""

    def __init__(
        self,
        model: SAM2Base,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.8,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        mask_threshold: float = 0.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Sequence[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        use_m2m: bool = False,
        multimask_output: bool = True,
        device_batch: int | None = None,
    ):
        """The official parameters, plus `device_batch`: points decoded (and filtered) per
        device step, None for `points_per_batch` (the official batching). The masks do not
        depend on it; larger batches trade memory for fewer, fuller device steps."""
        if device_batch is not None and not _is_int(device_batch, 1):
            raise AMGError(f"device_batch must be an integer >= 1 or None, got {device_batch!r}")
        self.device_batch = device_batch
        self.config = AMGConfig(
            points_per_side, points_per_batch, pred_iou_thresh, stability_score_thresh,
            stability_score_offset, mask_threshold, box_nms_thresh, crop_n_layers,
            crop_nms_thresh, crop_overlap_ratio, crop_n_points_downscale_factor,
            min_mask_region_area, output_mode, use_m2m, multimask_output,
        ).validate(point_grids)  # fmt: skip
        cfg = self.config
        if point_grids is None:
            grids = amg_utils.build_all_layer_point_grids(
                cfg.points_per_side, cfg.crop_n_layers, cfg.crop_n_points_downscale_factor
            )
        else:
            grids = [np.asarray(g, np.float64) for g in point_grids]
            if len(grids) < cfg.crop_n_layers + 1:
                raise AMGError(
                    f"point_grids has {len(grids)} grids, crop_n_layers={cfg.crop_n_layers} "
                    f"needs {cfg.crop_n_layers + 1}"
                )
            for i, g in enumerate(grids):
                if g.ndim != 2 or g.shape[1] != 2 or len(g) == 0:
                    raise AMGError(
                        f"point_grids[{i}] must be a non-empty [P, 2] array, got {g.shape}"
                    )
                if not np.all(np.isfinite(g)) or g.min() < 0 or g.max() > 1:
                    raise AMGError(f"point_grids[{i}] must hold (x, y) in [0, 1]")
        self.point_grids = grids
        self.image_size = model.image_size
        self.set_model(model)

    def set_model(self, model: SAM2Base) -> None:
        """Run on `model`'s current parameters from now on (split once, pam_jax.prepared)."""
        self.model = model
        self._prep: Prepared = prepare(model)

    # -- public API -------------------------------------------------------------------------

    def generate(self, image: np.ndarray | Any) -> list[dict[str, Any]]:
        """The official `generate`: one record per mask with segmentation (per output_mode),
        area, bbox (XYWH), predicted_iou, point_coords, stability_score, crop_box (XYWH)."""
        ms = self.generate_masks(image)
        mode = self.config.output_mode
        out = []
        for i in range(len(ms)):
            m = ms.masks[i]
            if mode == "binary_mask":
                seg: Any = m
            elif mode == "uncompressed_rle":
                seg = amg_utils.mask_to_rle(m)
            else:
                seg = amg_utils.coco_encode_rle(m)
            out.append(
                {
                    "segmentation": seg,
                    "area": int(ms.areas[i]),
                    "bbox": amg_utils.box_xyxy_to_xywh(ms.boxes[i]),
                    "predicted_iou": float(ms.predicted_iou[i]),
                    "point_coords": [[float(v) for v in ms.points[i]]],
                    "stability_score": float(ms.stability_score[i]),
                    "crop_box": amg_utils.box_xyxy_to_xywh(ms.crop_boxes[i]),
                }
            )
        return out

    def generate_masks(self, image: np.ndarray | Any) -> MaskSet:
        """Every kept mask of `image` (RGB uint8 [H, W, 3]) as a `MaskSet`, in the official
        output order. An image where nothing passes the filters gives an empty set."""
        try:
            image = _as_uint8_rgb(image)
        except ValueError as e:
            raise AMGError(str(e)) from None
        cfg = self.config
        h, w = image.shape[:2]
        crop_boxes, layers = amg_utils.generate_crop_boxes(
            (h, w), cfg.crop_n_layers, cfg.crop_overlap_ratio
        )
        kept = [
            self._process_crop(image, box, layer, (h, w)) for box, layer in zip(crop_boxes, layers)
        ]

        # which masks survive the cross-crop NMS (prefer masks from smaller crops)
        sizes = [len(k.iou) for k in kept]
        owner = np.repeat(np.arange(len(kept)), sizes)
        row = np.concatenate([np.arange(s) for s in sizes]) if sizes else np.zeros(0, np.int64)
        boxes = np.concatenate([k.boxes for k in kept]).reshape(-1, 4)
        if len(crop_boxes) > 1 and len(owner):
            cb = np.asarray([kept[o].crop_box for o in owner], np.int64)
            area = ((cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1])).astype(np.float32)
            order = amg_utils.nms_host(boxes, np.float32(1.0) / area, cfg.crop_nms_thresh)
        else:
            order = np.arange(len(owner))
        ms = self._collect(kept, owner[order], row[order], (h, w))
        if cfg.min_mask_region_area > 0 and len(ms):
            ms = postprocess_small_regions(
                ms, cfg.min_mask_region_area, max(cfg.box_nms_thresh, cfg.crop_nms_thresh)
            )
        return ms

    # -- steps ------------------------------------------------------------------------------

    def _process_crop(
        self, image: np.ndarray, crop_box: list[int], layer: int, orig_hw: tuple[int, int]
    ) -> _Kept:
        cfg = self.config
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1]
        ch, cw = crop.shape[:2]
        features = encode_image(self._prep, crop, self.image_size)

        # the official points: grid * (w, h) in float64, then float32 / (w, h) * size
        pts = (self.point_grids[layer] * np.array([[cw, ch]])).astype(np.float32)
        model_xy = pts.copy()
        model_xy[:, 0] = model_xy[:, 0] / np.float32(cw)
        model_xy[:, 1] = model_xy[:, 1] / np.float32(ch)
        model_xy = model_xy * np.float32(self.image_size)
        b = int(self.device_batch or cfg.points_per_batch)
        n = len(pts)
        nb = -(-n // b)
        coords = np.zeros((nb * b, 2), np.float32)
        coords[:n] = model_xy
        valid = np.arange(nb * b) < n
        thresholds = np.array(
            [cfg.pred_iou_thresh, cfg.stability_score_thresh, cfg.stability_score_offset,
             cfg.mask_threshold], np.float32,
        )  # fmt: skip
        h, w = orig_hw
        low, iou = _decode_points(
            self._prep.structure, self._prep.leaves, features, coords.reshape(nb, b, 2),
            multimask=bool(cfg.multimask_output), use_m2m=bool(cfg.use_m2m),
        )  # fmt: skip
        m = low.shape[1] // b  # masks per point
        low, iou, stab, boxes, keep = _filter_candidates(
            low, iou, np.repeat(valid.reshape(nb, b), m, axis=1), thresholds,
            np.asarray(crop_box, np.int32), np.array([0, 0, w, h], np.int32), crop_hw=(ch, cw),
        )  # fmt: skip
        keep_h = np.asarray(keep)
        idx = np.flatnonzero(keep_h)
        iou_h, stab_h, boxes_h = (np.asarray(a)[idx] for a in (iou, stab, boxes))
        # NMS within the crop by predicted IoU (device, padded set)
        order = amg_utils.nms_host(boxes_h, iou_h, cfg.box_nms_thresh)
        idx, iou_h, stab_h, boxes_h = idx[order], iou_h[order], stab_h[order], boxes_h[order]
        off = np.array([x0, y0, x0, y0], np.int64)
        points = pts[np.minimum(idx // m, n - 1)] + np.array([x0, y0], np.float32)
        k = pow2_bucket(len(idx), 8)
        rows = np.zeros((k,), np.int32)
        rows[: len(idx)] = idx
        sel = jnp.take(low, jnp.asarray(rows), axis=0)  # stays on the device
        return _Kept(sel, iou_h, stab_h, boxes_h.astype(np.int64) + off, points, list(crop_box))

    def _collect(
        self, kept: list[_Kept], owner: np.ndarray, row: np.ndarray, hw: tuple[int, int]
    ) -> MaskSet:
        """Full-size binary masks (host) of the chosen (crop, row) pairs, in that order."""
        h, w = hw
        n = len(owner)
        masks = np.zeros((n, h, w), bool)
        thr = np.float32(self.config.mask_threshold)
        for c, k in enumerate(kept):  # one upsample call per crop (crops: 1, 5, 21, ...)
            sel = np.flatnonzero(owner == c)
            if len(sel) == 0:
                continue
            x0, y0, x1, y1 = k.crop_box
            rows = row[sel]
            bucket = pow2_bucket(len(rows), 8)
            padded = np.zeros((bucket,), np.int32)
            padded[: len(rows)] = rows
            got = np.asarray(
                _gather_upsample(k.low_res, jnp.asarray(padded), thr, hw=(y1 - y0, x1 - x0))
            )
            masks[sel, y0:y1, x0:x1] = got[: len(rows)]
        take = lambda f: np.array([getattr(kept[o], f)[r] for o, r in zip(owner, row)])  # noqa: E731
        return MaskSet(
            masks=masks,
            boxes=take("boxes").reshape(n, 4).astype(np.float32),
            areas=masks.sum(axis=(1, 2)).astype(np.int64),
            predicted_iou=take("iou").reshape(n).astype(np.float32),
            stability_score=take("stability").reshape(n).astype(np.float32),
            points=take("points").reshape(n, 2).astype(np.float32),
            crop_boxes=np.array([kept[o].crop_box for o in owner], np.float32).reshape(n, 4),
        )


def postprocess_small_regions(ms: MaskSet, min_area: int, nms_thresh: float) -> MaskSet:
    """Official `postprocess_small_regions`: remove holes and islands smaller than `min_area`
    pixels (OpenCV), recompute the boxes, NMS preferring masks that needed no change."""
    if len(ms) == 0:
        return ms
    new, scores = [], []
    for m in ms.masks:
        m2, changed_h = amg_utils.remove_small_regions(m, min_area, "holes")
        m2, changed_i = amg_utils.remove_small_regions(m2, min_area, "islands")
        new.append(m2)
        scores.append(float(not (changed_h or changed_i)))
    masks = np.stack(new)
    boxes = np.asarray(amg_utils.masks_to_boxes(jnp.asarray(masks))).astype(np.float32)
    keep = amg_utils.nms_host(boxes, np.asarray(scores, np.float32), nms_thresh)
    out = ms.take(keep)
    changed = np.asarray(scores)[keep] == 0.0
    out.masks = np.where(changed[:, None, None], masks[keep], out.masks)
    out.boxes = np.where(changed[:, None], boxes[keep], out.boxes)
    out.areas = out.masks.sum(axis=(1, 2)).astype(np.int64)
    return out
