"""SAM 2 image predictor: the official `SAM2ImagePredictor`, jitted and batched over prompts.

    predictor = SAM2ImagePredictor(model)
    predictor.set_image(image_uint8_hwc)             # embedding computed once (jit)
    masks, ious, low_res = predictor.predict(point_coords=[[x, y]], point_labels=[1])
    pred = predictor.predict_batch(boxes=[[...], [...]], point_coords=[[[x, y]], None], ...)

Semantics follow the official predictor (sam2 1.1.0):
- preprocessing: uint8 -> float / 255, antialiased bilinear resize to image_size x image_size
  (torchvision `Resize` on a float tensor), ImageNet mean / std;
- prompts: coordinates in original-image pixels (normalised by the original width / height,
  then scaled to the model size); a box becomes two points with labels 2 / 3 placed before the
  clicks; one (0, 0) point with label -1 is appended whenever there are points or a box;
  a mask prompt is low-resolution logits [4h, 4w] (256 x 256 at 1024) fed to the prompt encoder;
- outputs: masks bilinearly upsampled (no antialiasing) from the low-res logits to the original
  size and thresholded at `mask_threshold` unless `return_logits`; low-res logits clamped to
  [-32, 32]; no hole filling (the official CPU build skips it too; its default areas are 0).

`predict_batch` decodes N prompt sets in one jitted call: each row's tokens are padded with
label -1 and a validity mask removes the padding from attention, so a batch gives the same
results as one prompt at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pam_jax.prepared import merge, prepare
from pam_jax.sam2.common import pow2_bucket
from pam_jax.sam2.model import SAM2Base
from pam_jax.sam2.ops import resize_bilinear

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Official `SAM2ImagePredictor._predict` clamps the returned low-res logits to this range.
LOGIT_CLAMP = 32.0


class Prediction(NamedTuple):
    """Outputs of `predict_batch` for N prompt sets (M = 3 with multimask output, else 1)."""

    masks: np.ndarray  # [N, M, H, W] bool (float32 logits with return_logits), original size
    iou_predictions: np.ndarray  # [N, M] float32
    low_res_logits: np.ndarray  # [N, M, 4h, 4w] float32 in [-32, 32]
    object_score_logits: np.ndarray  # [N] float32 (> 0: object present)


def preprocess(image: jax.Array, image_size: int) -> jax.Array:
    """uint8 [H, W, 3] (or [B, H, W, 3]) -> normalized float32 [B, S, S, 3] as the official
    SAM2Transforms: ToTensor (/255), Resize((S, S)) (bilinear, antialiased), Normalize."""
    x = jnp.asarray(image)
    if x.ndim == 3:
        x = x[None]
    x = x.astype(jnp.float32) / 255.0
    x = resize_bilinear(x, (image_size, image_size), antialias=True)
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return (x - mean) / std


# ---------------------------------------------------------------------------------------------
# jitted kernels over a prepared model (pam_jax.prepared): split and hashed once, not per call.


@partial(jax.jit, static_argnums=(0, 2))
def _encode(structure, leaves, image_size: int, image: jax.Array) -> dict[str, Any]:
    model = merge(structure, leaves)
    return model.image_features(preprocess(image, image_size))


@partial(jax.jit, static_argnames=("structure", "multimask_output", "return_logits", "orig_hw"))
def _decode(
    structure,
    leaves,
    image_embed,
    high_res_feats,
    coords,
    labels,
    token_valid,
    mask_inputs,
    has_mask,
    mask_threshold,
    *,
    multimask_output: bool,
    return_logits: bool,
    orig_hw: tuple[int, int],
):
    model = merge(structure, leaves)
    out = model.decode_prompts(
        image_embed, high_res_feats, coords, labels, token_valid, mask_inputs, has_mask,
        multimask_output=multimask_output,
    )  # fmt: skip
    low = out.masks.astype(jnp.float32)  # [N, M, 4h, 4w]
    masks = resize_bilinear(low, orig_hw, antialias=False, axes=(-2, -1))
    if not return_logits:
        masks = masks > mask_threshold
    low = jnp.clip(low, -LOGIT_CLAMP, LOGIT_CLAMP)
    return masks, out.iou_pred, low, out.object_score_logits[:, 0]


class SAM2ImagePredictor:
    """Official-compatible image predictor over a pam-jax `SAM2Base`.

    The model's parameters are captured (`pam_jax.prepared.prepare`) when the predictor is
    built; build a new predictor after changing them.
    """

    def __init__(self, model: SAM2Base, mask_threshold: float = 0.0):
        self.model = model
        self.mask_threshold = float(mask_threshold)
        self.image_size = model.image_size
        self._prep = prepare(model)
        self.reset_predictor()

    # -- image ------------------------------------------------------------------------------

    def reset_predictor(self) -> None:
        self._features: dict[str, Any] | None = None
        self._orig_hw: tuple[int, int] | None = None

    def set_image(self, image: np.ndarray | Any) -> None:
        """Compute the image embedding of an RGB uint8 image [H, W, 3] (or a PIL image) once."""
        image = _as_uint8_rgb(image)
        self.reset_predictor()
        self._features = _encode(self._prep.structure, self._prep.leaves, self.image_size, image)
        self._orig_hw = (int(image.shape[0]), int(image.shape[1]))

    @property
    def is_image_set(self) -> bool:
        return self._features is not None

    @property
    def orig_hw(self) -> tuple[int, int]:
        self._check_image()
        return self._orig_hw

    @property
    def features(self) -> dict[str, Any]:
        """{"image_embed": [1, h, w, C], "high_res_feats": ([1, 4h, 4w, C/8], [1, 2h, 2w, C/4])},
        NHWC device arrays (the official `_features`, channels-last)."""
        self._check_image()
        return self._features

    def get_image_embedding(self) -> jax.Array:
        """The stride-16 image embedding [1, h, w, C] (NHWC; official: NCHW)."""
        return self.features["image_embed"]

    def _check_image(self) -> None:
        if self._features is None:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")

    # -- prompts ----------------------------------------------------------------------------

    def predict(
        self,
        point_coords: np.ndarray | Sequence | None = None,
        point_labels: np.ndarray | Sequence | None = None,
        box: np.ndarray | Sequence | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        normalize_coords: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One prompt set, as official `predict`: (masks [M, H, W], ious [M], low-res [M, 4h, 4w]).

        point_coords [P, 2] (x, y) and point_labels [P] (1 positive, 0 negative); box [4] x1, y1,
        x2, y2; mask_input [1, 4h, 4w] (or [4h, 4w]) low-res logits from an earlier prediction.
        Coordinates are original-image pixels (or [0, 1] with normalize_coords=False).
        """
        if box is not None:
            box = np.asarray(box, np.float32)
            if box.size != 4:
                raise ValueError(f"box must have 4 numbers (x1, y1, x2, y2), got shape {box.shape}")
            box = box.reshape(1, 4)
        pred = self.predict_batch(
            [point_coords] if point_coords is not None else None,
            [point_labels] if point_labels is not None else None,
            box,
            [mask_input] if mask_input is not None else None,
            multimask_output=multimask_output,
            return_logits=return_logits,
            normalize_coords=normalize_coords,
        )
        return pred.masks[0], pred.iou_predictions[0], pred.low_res_logits[0]

    def predict_batch(
        self,
        point_coords: Sequence | np.ndarray | None = None,
        point_labels: Sequence | np.ndarray | None = None,
        boxes: Sequence | np.ndarray | None = None,
        mask_inputs: Sequence | np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        normalize_coords: bool = True,
    ) -> Prediction:
        """N prompt sets decoded in one jitted call.

        point_coords: N entries of [P_i, 2] (or None for a row without points), or an array
        [N, P, 2]; point_labels likewise ([P_i] / [N, P]); boxes: [N, 4], or N entries of [4] or
        None; mask_inputs: [N, 4h, 4w] (or [N, 1, 4h, 4w]), or N entries of [4h, 4w] or None.
        Every row needs at least one prompt. Returns a `Prediction`.
        """
        self._check_image()
        coords, labels, valid, masks, has_mask = self._prepare(
            point_coords, point_labels, boxes, mask_inputs, normalize_coords
        )
        out = _decode(
            self._prep.structure, self._prep.leaves, self._features["image_embed"],
            self._features["high_res_feats"], coords, labels, valid, masks, has_mask,
            jnp.float32(self.mask_threshold), multimask_output=bool(multimask_output),
            return_logits=bool(return_logits), orig_hw=self._orig_hw,
        )  # fmt: skip
        m, iou, low, obj = jax.device_get(out)
        return Prediction(m, iou, low, obj)

    # -- host-side prompt preparation -------------------------------------------------------

    def _prepare(self, point_coords, point_labels, boxes, mask_inputs, normalize_coords):
        h, w = self._orig_hw
        n = _batch_size(point_coords, point_labels, boxes, mask_inputs)
        rows_c = _rows(point_coords, n)
        rows_l = _rows(point_labels, n)
        rows_b = _rows(boxes, n)
        rows_m = _rows(mask_inputs, n)
        lh = lw = self.model.config.low_res_size
        scale = np.float32(self.image_size)

        def to_model(xy: np.ndarray) -> np.ndarray:
            # official transform_coords: x / w, y / h (float32), then * image_size
            xy = xy.astype(np.float32).copy()
            if normalize_coords:
                xy[..., 0] = xy[..., 0] / np.float32(w)
                xy[..., 1] = xy[..., 1] / np.float32(h)
            return xy * scale

        tok_c, tok_l = [], []
        masks = np.zeros((n, lh, lw, 1), np.float32)
        has_mask = np.zeros((n,), bool)
        for i in range(n):  # host-side input checking only; the decode itself is one call
            c, lab, b, m = rows_c[i], rows_l[i], rows_b[i], rows_m[i]
            if (c is None) != (lab is None):
                raise ValueError(
                    f"prompt {i}: point_labels must be given with point_coords (and vice versa)"
                )
            cs, ls = [], []
            if b is not None:
                b = np.asarray(b, np.float32)
                if b.shape != (4,):
                    raise ValueError(f"prompt {i}: a box is 4 numbers x1,y1,x2,y2, got {b.shape}")
                check_box(b, (h, w), normalize_coords, i)
                cs.append(to_model(b.reshape(2, 2)))
                ls.append(np.array([2, 3], np.int32))
            if c is not None:
                c = np.asarray(c, np.float32)
                lab = np.asarray(lab)
                if c.ndim != 2 or c.shape[-1] != 2:
                    raise ValueError(f"prompt {i}: point_coords must be [P, 2], got {c.shape}")
                if lab.shape != (c.shape[0],):
                    raise ValueError(
                        f"prompt {i}: {c.shape[0]} points but point_labels has shape {lab.shape}"
                    )
                if not np.issubdtype(lab.dtype, np.integer) and not np.all(lab == np.round(lab)):
                    raise ValueError(f"prompt {i}: point labels must be integers, got {lab}")
                lab = lab.astype(np.int32)
                if np.any((lab < -1) | (lab > 3)):
                    raise ValueError(
                        f"prompt {i}: point labels must be 1 (positive) or 0 (negative), got {lab}"
                    )
                check_points(c, (h, w), normalize_coords, i)
                cs.append(to_model(c))
                ls.append(lab)
            if m is not None:
                m = np.asarray(m, np.float32)
                if m.ndim == 3 and m.shape[0] == 1:
                    m = m[0]
                if m.shape != (lh, lw):
                    raise ValueError(
                        f"prompt {i}: mask input must be low-res logits of shape (1, {lh}, {lw}) "
                        f"(the third output of predict), got {m.shape}"
                    )
                if not np.all(np.isfinite(m)):
                    raise ValueError(f"prompt {i}: mask input has NaN or infinite values")
                masks[i, ..., 0] = m
                has_mask[i] = True
            if not cs and m is None:
                raise ValueError(f"prompt {i} is empty: give points, a box or a mask input")
            tok_c.append(np.concatenate(cs) if cs else np.zeros((0, 2), np.float32))
            tok_l.append(np.concatenate(ls) if ls else np.zeros((0,), np.int32))

        p = pow2_bucket(max(len(x) for x in tok_l))
        coords = np.zeros((n, p, 2), np.float32)
        labels = -np.ones((n, p), np.int32)
        valid = np.zeros((n, p + 1), bool)  # + the official pad point
        for i, (c, lab) in enumerate(zip(tok_c, tok_l)):
            coords[i, : len(c)] = c
            labels[i, : len(lab)] = lab
            valid[i, : len(lab)] = True
            # the official pad point exists only when there are points (mask-only: no tokens)
            valid[i, p] = len(lab) > 0
        if not has_mask.any():
            masks, has_mask = None, None
        return coords, labels, valid, masks, has_mask


def _as_uint8_rgb(image: Any) -> np.ndarray:
    try:
        from PIL import Image

        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
    except ImportError:  # pragma: no cover
        pass
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image with values 0..255, got dtype {image.dtype}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"empty image of shape {image.shape}")
    return image


def _batch_size(*args) -> int:
    sizes = {len(a) for a in args if a is not None}
    if not sizes:
        raise ValueError("empty prompt: give point_coords/point_labels, boxes or mask_inputs")
    if len(sizes) > 1:
        raise ValueError(f"prompt arguments disagree on the number of prompts: {sorted(sizes)}")
    n = sizes.pop()
    if n == 0:
        raise ValueError("empty prompt list: no prompts to decode")
    return n


def _rows(x, n: int) -> list:
    return [None] * n if x is None else list(x)


def _limits(hw: tuple[int, int], normalized: bool) -> tuple[float, float]:
    return (1.0, 1.0) if not normalized else (float(hw[1]), float(hw[0]))


def check_points(c: np.ndarray, hw: tuple[int, int], normalize_coords: bool, i: int) -> None:
    """ValueError unless points [P, 2] lie in the image of size hw (or [0, 1] if normalized)."""
    if not np.all(np.isfinite(c)):
        raise ValueError(f"prompt {i}: point coordinates must be finite, got {c.tolist()}")
    wmax, hmax = _limits(hw, normalize_coords)
    bad = (c[:, 0] < 0) | (c[:, 0] > wmax) | (c[:, 1] < 0) | (c[:, 1] > hmax)
    if bad.any():
        raise ValueError(
            f"prompt {i}: point(s) {c[bad].tolist()} outside the image "
            f"(x in [0, {wmax:g}], y in [0, {hmax:g}])"
        )


def check_box(b: np.ndarray, hw: tuple[int, int], normalize_coords: bool, i: int) -> None:
    """ValueError unless box [4] is finite, inside the image and has x1 < x2, y1 < y2."""
    if not np.all(np.isfinite(b)):
        raise ValueError(f"prompt {i}: box coordinates must be finite, got {b.tolist()}")
    x1, y1, x2, y2 = b.tolist()
    wmax, hmax = _limits(hw, normalize_coords)
    if x1 < 0 or y1 < 0 or x2 > wmax or y2 > hmax:
        raise ValueError(
            f"prompt {i}: box {b.tolist()} is outside the image (x in [0, {wmax:g}], "
            f"y in [0, {hmax:g}])"
        )
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"prompt {i}: box {b.tolist()} must have x1 < x2 and y1 < y2")
