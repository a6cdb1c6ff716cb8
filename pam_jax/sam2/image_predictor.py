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
results as one prompt at a time. Prompts follow `pam_jax.sam2.prompts` (one rule set for every
predictor). `encode_image` / `decode_image` are the pure functions behind the class: they take
the model's parameters (`pam_jax.prepared.prepare(model)`) on every call.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pam_jax.prepared import Prepared, merge, prepare
from pam_jax.sam2.model import SAM2Base
from pam_jax.sam2.ops import resize_bilinear
from pam_jax.sam2.prompts import (
    EDGE_TOLERANCE,
    Prompt,
    PromptError,
    make_prompt,
    pad_prompts,
    to_model_coords,
)

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


@partial(jax.jit, static_argnums=(1,))
def _preprocess(image: jax.Array, image_size: int) -> jax.Array:
    return preprocess(image, image_size)


@partial(jax.jit, static_argnums=(0,))
def _features(structure, leaves, x: jax.Array) -> dict[str, Any]:
    return merge(structure, leaves).image_features(x)


def _encode(structure, leaves, image_size: int, image: jax.Array) -> dict[str, Any]:
    # two programs: the resize from the photo's size compiles per size (small), the encoder
    # once per model (a folder of photos of many sizes must not recompile Hiera per size)
    return _features(structure, leaves, _preprocess(image, image_size))


@partial(jax.jit, static_argnames=("structure", "multimask_output"))
def _decode(
    structure, leaves, features: dict[str, Any], prompts: ImagePrompts, *, multimask_output: bool
):
    """The decoder at the model's resolution (no photo size in here: one program for every
    size); `_upsample` brings its logits to the photo."""
    model = merge(structure, leaves)
    out = model.decode_prompts(
        features["image_embed"], features["high_res_feats"], prompts.coords, prompts.labels,
        prompts.valid, prompts.mask_inputs, prompts.has_mask, multimask_output=multimask_output,
        pad_valid=prompts.has_points,
    )  # fmt: skip
    return out.masks.astype(jnp.float32), out.iou_pred, out.object_score_logits[:, 0]


@partial(jax.jit, static_argnames=("return_logits", "orig_hw"))
def _upsample(low, mask_threshold, *, return_logits: bool, orig_hw: tuple[int, int]):
    """Low-res logits [N, M, 4h, 4w] -> masks at the photo's size (thresholded unless
    `return_logits`) and the clamped low-res logits."""
    masks = resize_bilinear(low, orig_hw, antialias=False, axes=(-2, -1))
    if not return_logits:
        masks = masks > mask_threshold
    return masks, jnp.clip(low, -LOGIT_CLAMP, LOGIT_CLAMP)


@struct.dataclass
class ImagePrompts:
    """N prompt sets of the image predictor, padded (model pixels): coords [N, P, 2], labels
    [N, P], valid [N, P], has_points [N] (the official pad point exists only for rows with
    points or a box), mask_inputs [N, 4h, 4w, 1] low-res logits for rows where has_mask [N]."""

    coords: np.ndarray
    labels: np.ndarray
    valid: np.ndarray
    has_points: np.ndarray
    mask_inputs: np.ndarray | None = None
    has_mask: np.ndarray | None = None


def encode_image(prepared: Prepared, image: np.ndarray, image_size: int) -> dict[str, Any]:
    """The image embedding of uint8 [H, W, 3] with the parameters in `prepared` (pure: pass
    a freshly prepared model, e.g. a training state, on any call)."""
    return _encode(prepared.structure, prepared.leaves, image_size, image)


def decode_image(
    prepared: Prepared,
    features: dict[str, Any],
    prompts: ImagePrompts,
    orig_hw: tuple[int, int],
    *,
    multimask_output: bool = True,
    return_logits: bool = False,
    mask_threshold: float = 0.0,
) -> Prediction:
    """Decode N prompt sets against `encode_image`'s features (the decoder in one jitted call,
    then the upsample to `orig_hw`)."""
    low, iou, obj = _decode(
        prepared.structure, prepared.leaves, features, prompts,
        multimask_output=bool(multimask_output),
    )  # fmt: skip
    masks, low = _upsample(
        low, jnp.float32(mask_threshold), return_logits=bool(return_logits), orig_hw=tuple(orig_hw)
    )
    return Prediction(*jax.device_get((masks, iou, low, obj)))


class SAM2ImagePredictor:
    """Official-compatible image predictor over a pam-jax `SAM2Base`.

    The model's parameters are captured (`pam_jax.prepared.prepare`) when the predictor is
    built; build a new predictor after changing them.
    """

    def __init__(self, model: SAM2Base, mask_threshold: float = 0.0):
        self.mask_threshold = float(mask_threshold)
        self.image_size = model.image_size
        self.set_model(model)
        self.reset_predictor()

    def set_model(self, model: SAM2Base) -> None:
        """Run on `model`'s current parameters (e.g. a live training state) from now on; an
        image already set keeps the embedding computed with the earlier ones."""
        self.model = model
        self._prep = prepare(model)

    # -- image ------------------------------------------------------------------------------

    def reset_predictor(self) -> None:
        self._features: dict[str, Any] | None = None
        self._orig_hw: tuple[int, int] | None = None

    def set_image(self, image: np.ndarray | Any) -> None:
        """Compute the image embedding of an RGB uint8 image [H, W, 3] (or a PIL image) once."""
        image = _as_uint8_rgb(image)
        self.reset_predictor()
        self._features = encode_image(self._prep, image, self.image_size)
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
        prompts = self._prepare(point_coords, point_labels, boxes, mask_inputs, normalize_coords)
        return decode_image(
            self._prep, self._features, prompts, self._orig_hw,
            multimask_output=multimask_output, return_logits=return_logits,
            mask_threshold=self.mask_threshold,
        )  # fmt: skip

    # -- host-side prompt preparation -------------------------------------------------------

    def _prepare(
        self, point_coords, point_labels, boxes, mask_inputs, normalize_coords
    ) -> ImagePrompts:
        """Host-side checks (`pam_jax.sam2.prompts` rules) and padding; the decode itself is
        one call."""
        h, w = self._orig_hw
        n = _batch_size(point_coords, point_labels, boxes, mask_inputs)
        rows_c, rows_l = _rows(point_coords, n), _rows(point_labels, n)
        rows_b, rows_m = _rows(boxes, n), _rows(mask_inputs, n)
        lr = self.model.config.low_res_size
        # normalize_coords=False: coordinates in [0, 1], tolerance one image pixel
        hw, tol = ((h, w), EDGE_TOLERANCE) if normalize_coords else ((1, 1), 1.0 / max(h, w))
        masks = np.zeros((n, lr, lr, 1), np.float32)
        has_mask = np.zeros((n,), bool)
        rows: list[Prompt] = []
        for i in range(n):
            c, lab, b, m = rows_c[i], rows_l[i], rows_b[i], rows_m[i]
            if m is not None:
                masks[i, ..., 0] = _low_res_mask(m, lr, i)
                has_mask[i] = True
            if c is None and lab is None and b is None:
                if m is None:
                    raise PromptError(f"prompt {i} is empty: give points, a box or a mask input")
                rows.append(Prompt(np.zeros((0, 2), np.float32), np.zeros((0,), np.int32)))
                continue
            try:
                p = make_prompt(c, lab, b, image_hw=hw, tolerance=tol)
            except PromptError as e:
                raise PromptError(f"prompt {i}: {e}") from None
            rows.append(Prompt(to_model_coords(p, hw, self.image_size), p.labels))
        padded = pad_prompts(rows)
        has_points = np.array([r.num_points > 0 for r in rows])
        if not has_mask.any():
            masks, has_mask = None, None
        return ImagePrompts(padded.coords, padded.labels, padded.valid, has_points, masks, has_mask)


def _low_res_mask(m: Any, lr: int, i: int) -> np.ndarray:
    """A mask input: low-res logits [1, 4h, 4w] or [4h, 4w] (the third output of predict)."""
    m = np.asarray(m, np.float32)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.shape != (lr, lr):
        raise PromptError(
            f"prompt {i}: mask input must be low-res logits of shape (1, {lr}, {lr}) "
            f"(the third output of predict), got {m.shape}"
        )
    if not np.all(np.isfinite(m)):
        raise PromptError(f"prompt {i}: mask input has NaN or infinite values")
    return m


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
