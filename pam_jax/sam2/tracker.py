"""SAM 2 per-frame tracking step: the official `SAM2Base.track_step` batched over objects.

Objects are the batch axis. Each row (object) of a step is in one of these modes (an int32
array, so one compiled step serves every mix of prompted and tracked objects):

- `TRACK`   memory-conditioned features, no prompt, multimask + best IoU (a propagated frame);
- `POINTS`  points / box on a frame the object was never tracked on (official
            `is_init_cond_frame`): features + `no_mem_embed`, no memory attention;
- `MASK`    a mask prompt (`_use_mask_as_output`: the mask itself is the output, the SAM
            decoder only supplies the object pointer);
- `CORRECT` points on an already tracked frame: memory-conditioned features plus the points and
            the frame's previous low-res logits as mask prompt;
- `INACTIVE` a row without an object (streaming slots not yet used): computed, then ignored.

The decoder runs once for all rows and returns all 4 masks, so the per-row choice between
multimask/best-IoU (<= 1 point, tracking) and the single mask with the dynamic stability
fallback (boxes, several points, masks) needs no recompilation. Memory encoding follows
`_encode_new_memory`: binarized mask for prompted frames (`binarize_mask_from_pts_for_mem_enc`,
applied by the official video predictor's preflight), sigmoid otherwise, `no_obj_embed_spatial`
for absent objects (2.1), result rounded to bfloat16 as the official predictor stores it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pam_jax.sam2.memory import MemoryBank, prepare_memory_conditioned_features
from pam_jax.sam2.model import NO_OBJ_SCORE, SAM2Base
from pam_jax.sam2.ops import resize_bilinear

INACTIVE, TRACK, POINTS, MASK, CORRECT = -1, 0, 1, 2, 3


class FrameFeatures(NamedTuple):
    """Backbone outputs of one frame (batch 1), NHWC, float32 on CPU."""

    vision: jax.Array  # [1, h, w, C] stride-16 features (no no_mem_embed)
    pos: jax.Array  # [1, h, w, C] their sine position encoding
    high_res: tuple[
        jax.Array, jax.Array
    ]  # conv_s0 / conv_s1 outputs [1, 4h, 4w, C/8], [1, 2h, 2w, C/4]


class StepOutput(NamedTuple):
    pred_masks: jax.Array  # [B, 4h, 4w] float32 low-res logits of the chosen mask
    obj_ptr: jax.Array  # [B, C] float32
    object_score_logits: jax.Array  # [B, 1] float32
    ious: jax.Array  # [B] IoU prediction of the chosen mask (1 for mask prompts)
    maskmem_features: jax.Array | None  # [B, h * w, mem_dim] bfloat16 (when encoded)


def frame_features(model: SAM2Base, image: jax.Array) -> FrameFeatures:
    """image [1, S, S, 3] normalized -> the backbone features the tracker needs."""
    out = model.forward_image(image)
    fpn, pos = out["backbone_fpn"], out["vision_pos_enc"]
    f32 = jnp.float32
    return FrameFeatures(
        fpn[-1].astype(f32), pos[-1].astype(f32), (fpn[0].astype(f32), fpn[1].astype(f32))
    )


def decode_all_masks(
    model: SAM2Base,
    image_embed: jax.Array,
    high_res: tuple[jax.Array, jax.Array],
    coords: jax.Array,
    labels: jax.Array,
    point_valid: jax.Array,
    mask_prompt: jax.Array | None,
    has_mask: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Prompt encoder + mask decoder returning every output token (the official decoder's
    `predict_masks`, before the multimask slicing): masks [B, 4, 4h, 4w], ious [B, 4],
    mask tokens [B, 4, C], object score logits [B, 1], stability-selected index [B]."""
    pe, dec = model.sam_prompt_encoder, model.sam_mask_decoder
    sparse, dense = pe(coords, labels, mask_prompt, has_mask=has_mask, pad=True)
    token_valid = pe.sparse_valid(point_valid, pad=True)
    b, d = sparse.shape[0], dec.transformer_dim
    out_tokens = jnp.concatenate(
        [dec.obj_score_token.embedding[...], dec.iou_token.embedding[...],
         dec.mask_tokens.embedding[...]], axis=0,
    )  # fmt: skip
    n_out = out_tokens.shape[0]
    tokens = jnp.concatenate(
        [jnp.broadcast_to(out_tokens, (b, n_out, d)).astype(sparse.dtype), sparse], axis=1
    )
    token_mask = jnp.concatenate([jnp.ones((b, n_out), bool), token_valid], axis=1)
    src = jnp.broadcast_to(image_embed, (b,) + image_embed.shape[1:]) + dense
    image_pe = pe.get_dense_pe()
    if dec.dtype is not None:
        src, tokens, image_pe = (x.astype(dec.dtype) for x in (src, tokens, image_pe))
    _, h, w, _ = src.shape
    hs, keys = dec.transformer(src, image_pe, tokens, token_mask)
    mask_tokens = hs[:, 2 : 2 + dec.num_mask_tokens]
    hr = tuple(jnp.broadcast_to(f, (b,) + f.shape[1:]) for f in high_res)
    upscaled = dec._upscale(keys.reshape(b, h, w, d), hr)
    hyper = dec._hypernetworks(mask_tokens)
    masks = jnp.einsum("bmc,bhwc->bmhw", hyper, upscaled).astype(jnp.float32)
    ious = dec.iou_prediction_head(hs[:, 1]).astype(jnp.float32)
    obj = dec.pred_obj_score_head(hs[:, 0]).astype(jnp.float32)
    best = jnp.argmax(ious[:, 1:], axis=-1) + 1
    stable = dec.stability_scores(masks[:, 0]) >= dec.dynamic_multimask_stability_thresh
    sel = jnp.where(stable, 0, best) if dec.dynamic_multimask_via_stability else 0 * best
    return masks, ious, mask_tokens.astype(jnp.float32), obj, sel


def encode_memory(
    model: SAM2Base,
    vision: jax.Array,
    pred_masks: jax.Array,
    object_score_logits: jax.Array,
    binarize: jax.Array,
) -> jax.Array:
    """Official `_encode_new_memory` on low-res logits: pred_masks [B, 4h, 4w] are upsampled to
    the model size (bilinear, as `pred_masks_high_res` / the preflight interpolation), binarized
    where `binarize` [B] else sigmoid, scaled 20 / -10, encoded with the raw frame features
    vision [1 or B, h, w, C]. Returns [B, h * w, mem_dim] bfloat16."""
    cfg = model.config
    s = model.image_size
    b = pred_masks.shape[0]
    high = resize_bilinear(pred_masks.astype(jnp.float32), (s, s), False, axes=(-2, -1))
    prob = jnp.where(binarize[:, None, None], (high > 0).astype(jnp.float32), jax.nn.sigmoid(high))
    mask_for_mem = prob * cfg.sigmoid_scale_for_mem_enc + cfg.sigmoid_bias_for_mem_enc
    pix = jnp.broadcast_to(vision, (b,) + vision.shape[1:])
    feats, _ = model.memory_encoder(pix, mask_for_mem[..., None], skip_mask_sigmoid=True)
    feats = feats.astype(jnp.float32)
    if model.no_obj_embed_spatial is not None:
        absent = (object_score_logits <= 0).astype(jnp.float32)  # [B, 1]
        feats = feats + absent[:, None, None, :] * model.no_obj_embed_spatial[...][None, None]
    return feats.reshape(b, -1, feats.shape[-1]).astype(jnp.bfloat16)


def track_step(
    model: SAM2Base,
    feats: FrameFeatures,
    mode: jax.Array,
    multimask: jax.Array,
    coords: jax.Array,
    labels: jax.Array,
    point_valid: jax.Array,
    bank: MemoryBank | None = None,
    frame_idx: jax.Array | int = 0,
    num_frames: jax.Array | int = 1,
    reverse: jax.Array | bool = False,
    mask_inputs: jax.Array | None = None,
    prev_logits: jax.Array | None = None,
    has_prev: jax.Array | None = None,
    *,
    encode: bool = False,
) -> StepOutput:
    """One frame for B objects (the official `track_step` + `_use_mask_as_output`).

    mode [B] int32 (TRACK / POINTS / MASK / CORRECT / INACTIVE); multimask [B] bool (the
    official `_use_multimask`: True for tracked rows and for prompts of <= 1 point);
    coords [B, P, 2] in model-input pixels, labels [B, P], point_valid [B, P] (rows without
    points hold one valid (0, 0) / -1 point, the official placeholder); bank: the memory of
    every object (None when no row needs memory); mask_inputs [B, S, S, 1] float mask prompts
    (MASK rows); prev_logits [B, 4h, 4w, 1] with has_prev [B]: earlier low-res logits fed with
    new points. `encode` (static) also runs the memory encoder (binarized for prompted rows).
    """
    cfg = model.config
    b = mode.shape[0]
    vision = jnp.broadcast_to(feats.vision, (b,) + feats.vision.shape[1:])
    _, h, w, c = vision.shape
    pix_init = vision + model.no_mem_embed[...].reshape(1, 1, 1, c)
    if bank is not None:
        cond = prepare_memory_conditioned_features(
            model.memory_attention, bank, cfg, frame_idx, num_frames,
            vision.reshape(b, h * w, c), feats.pos.reshape(h * w, c),
            model.maskmem_tpos_enc[...], model.obj_ptr_tpos_proj, reverse,
        ).reshape(b, h, w, c).astype(jnp.float32)  # fmt: skip
        uses_mem = ((mode == TRACK) | (mode == CORRECT))[:, None, None, None]
        pix = jnp.where(uses_mem, cond, pix_init)
    else:
        pix = pix_init
    is_mask = mode == MASK
    if mask_inputs is not None:
        pix = jnp.where(is_mask[:, None, None, None], vision, pix)

    # dense prompt: mask_downsample(mask) for MASK rows, previous logits for refinements
    dense_in, has_dense = None, None
    if mask_inputs is not None or prev_logits is not None:
        lr = cfg.low_res_size
        dense_in = jnp.zeros((b, lr, lr, 1), jnp.float32)
        has_dense = jnp.zeros((b,), bool)
        if prev_logits is not None:
            dense_in = jnp.where(has_prev[:, None, None, None], prev_logits, dense_in)
            has_dense = has_dense | has_prev
        if mask_inputs is not None:
            down = model.mask_downsample(mask_inputs.astype(jnp.float32)).astype(jnp.float32)
            dense_in = jnp.where(is_mask[:, None, None, None], down, dense_in)
            has_dense = has_dense | is_mask

    masks, ious, tokens, obj, sel = decode_all_masks(
        model, pix, feats.high_res, coords, labels, point_valid, dense_in, has_dense
    )
    is_obj = obj > 0  # [B, 1]
    masks = jnp.where(is_obj[:, :, None, None], masks, NO_OBJ_SCORE)
    best = jnp.argmax(ious[:, 1:], axis=-1) + 1
    idx = jnp.where(multimask, best, sel)
    low = jnp.take_along_axis(masks, idx[:, None, None, None], axis=1)[:, 0]
    iou = jnp.take_along_axis(ious, idx[:, None], axis=1)[:, 0]
    # use_multimask_token_for_obj_ptr: the chosen multimask token, else token 0
    tok_idx = jnp.where(multimask, best, 0)
    token = jnp.take_along_axis(tokens, tok_idx[:, None, None], axis=1)[:, 0]
    ptr = model.obj_ptr_proj(token).astype(jnp.float32)
    no_ptr = model.no_obj_ptr[...].astype(jnp.float32)
    lam = is_obj.astype(jnp.float32)
    ptr = lam * ptr + (1 - lam) * no_ptr

    if mask_inputs is not None:
        # _use_mask_as_output: the mask is the prediction (+-10 logits), presence from the mask
        m = mask_inputs[..., 0].astype(jnp.float32)
        lr = cfg.low_res_size
        m_low = resize_bilinear(m * 20.0 - 10.0, (lr, lr), True, axes=(-2, -1))
        present = jnp.any(m > 0, axis=(1, 2))[:, None].astype(jnp.float32)
        m_ptr = present * ptr + (1 - present) * no_ptr
        m_obj = 20.0 * present - 10.0
        sel_m = is_mask[:, None]
        low = jnp.where(sel_m[:, :, None], m_low, low)
        ptr = jnp.where(sel_m, m_ptr, ptr)
        obj = jnp.where(sel_m, m_obj, obj)
        iou = jnp.where(is_mask, 1.0, iou)

    mem = None
    if encode:
        mem = encode_memory(model, feats.vision, low, obj, mode != TRACK)
    return StepOutput(low, ptr, obj, iou, mem)


def point_rows(
    points: list[tuple[object, object] | None], num_points: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pad per-object point prompts to `num_points` slots.

    points: per row (coords [n, 2] model-input pixels, labels [n]) or None (no prompt: the
    official single (0, 0) / -1 placeholder point). Returns coords [B, P, 2], labels [B, P],
    valid [B, P] as numpy arrays.
    """
    import numpy as np

    b = len(points)
    coords = np.zeros((b, num_points, 2), np.float32)
    labels = -np.ones((b, num_points), np.int32)
    valid = np.zeros((b, num_points), bool)
    for i, p in enumerate(points):
        if p is None:
            valid[i, 0] = True
            continue
        xy, lab = np.asarray(p[0], np.float32).reshape(-1, 2), np.asarray(p[1], np.int32)
        n = len(lab)
        coords[i, :n], labels[i, :n], valid[i, :n] = xy, lab, True
    return coords, labels, valid
