"""`SAM2Base`: the whole SAM 2 / 2.1 model (official `sam2.modeling.sam2_base.SAM2Base`), NHWC.

Every official state-dict key has a parameter here under the same path (see
`pam_jax.convert.sam2`), including the memory modules and the tracking parameters the image path
never reads, so one converted model directory serves the image predictor, the video predictor
and PAM.

This class holds the only implementation of each official per-frame step; the image
predictor, the video predictor, the streaming tracker and every PAM path call these:

- `forward_image` / `frame_features` / `image_features`: backbone (trunk + FPN) plus `conv_s0`
  / `conv_s1`; `image_features` is what `SAM2ImagePredictor.set_image` keeps.
- `decode_all`: prompt encoding + the mask decoder's `predict_masks` (every output token, PAM's
  taps included); `decode_prompts` adds the official `forward`'s choice of outputs.
- `sam_heads`: the official `_forward_sam_heads` choices on a decoder call: object-score gating
  of the masks, best-IoU / single-mask selection per row, the object pointer with the
  `no_obj_ptr` blend. `forward_sam_heads` is the official signature over it.
- `use_mask_as_output`: the official `_use_mask_as_output`.
- `memory_conditioned`: `_prepare_memory_conditioned_features` over a `MemoryBank`.
- `encode_memory`: `_encode_new_memory` on low-res logits (stored dtype chosen by the caller:
  bfloat16 as the official video predictor, float32 for PAM's tracked frames).
- `track_step`: the official `track_step` for B objects in one call (`tracking.py` has the
  modes and the typed inputs / outputs).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pam_jax.sam2.common import MLP, linear
from pam_jax.sam2.config import SAM2Config
from pam_jax.sam2.image_encoder import ImageEncoder
from pam_jax.sam2.mask_decoder import AllMasks, MaskDecoder, MaskDecoderOutput
from pam_jax.sam2.memory import MemoryBank, encode_new_memory, prepare_memory_conditioned_features
from pam_jax.sam2.memory_attention import MemoryAttention
from pam_jax.sam2.memory_encoder import MemoryEncoder
from pam_jax.sam2.ops import resize_bilinear
from pam_jax.sam2.prompt_encoder import PromptEncoder, conv2d
from pam_jax.sam2.tracking import (
    CORRECT,
    MASK,
    TRACK,
    FrameFeatures,
    SamHeads,
    StepOutput,
    StepPrompts,
)

# The official "no object" mask logit (sam2_base.NO_OBJ_SCORE).
NO_OBJ_SCORE = -1024.0


class SamHeadsOutput(NamedTuple):
    """The seven outputs of the official `_forward_sam_heads`, channels-last masks [B, M, H, W]."""

    low_res_multimasks: jax.Array  # [B, M, 4h, 4w]
    high_res_multimasks: jax.Array  # [B, M, image_size, image_size]
    ious: jax.Array  # [B, M]
    low_res_masks: jax.Array  # [B, 1, 4h, 4w] best (by IoU) or the single mask
    high_res_masks: jax.Array  # [B, 1, image_size, image_size]
    obj_ptr: jax.Array  # [B, C]
    object_score_logits: jax.Array  # [B, 1]


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str | None, ...]) -> nnx.Param:
    """A raw parameter with the official trunc_normal(std=0.02) init and logical axis names."""
    init = jax.nn.initializers.truncated_normal(stddev=0.02)
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=names)


class SAM2Base(nnx.Module):
    """SAM 2 / 2.1 with the official attribute names (so every checkpoint key maps)."""

    def __init__(self, cfg: SAM2Config, *, rngs: nnx.Rngs, dtype=None):
        cfg = cfg.validate()
        self.config = cfg
        self.image_size = cfg.image_size
        self.dtype = dtype
        d, mem = cfg.d_model, cfg.mem_dim
        feat = cfg.feat_size
        self.image_encoder = ImageEncoder(cfg, rngs=rngs, dtype=dtype)
        self.memory_attention = MemoryAttention(
            d, cfg.memory_attention_layers, rngs=rngs, dtype=dtype, kv_in_dim=mem
        )
        self.memory_encoder = MemoryEncoder(mem, d, rngs=rngs, dtype=dtype)
        self.sam_prompt_encoder = PromptEncoder(
            d, (feat, feat), (cfg.image_size, cfg.image_size), 16, rngs=rngs, dtype=dtype
        )
        self.sam_mask_decoder = MaskDecoder.from_config(cfg, rngs=rngs, dtype=dtype)
        # use_obj_ptrs_in_encoder: the mask prompt of `_use_mask_as_output` is downsampled by this
        self.mask_downsample = conv2d(1, 1, 4, 4, rngs, dtype=dtype)
        self.obj_ptr_proj = MLP(d, d, d, 3, rngs=rngs, dtype=dtype)  # use_mlp_for_obj_ptr_proj
        # 2.0 has an Identity here (no parameters); 2.1 projects the temporal encoding to mem_dim.
        self.obj_ptr_tpos_proj = (
            linear(d, mem, rngs, axes=("vis_embed", "vis_mlp"), dtype=dtype)
            if cfg.proj_tpos_enc_in_obj_ptrs
            else None
        )
        self.maskmem_tpos_enc = _param(
            rngs, (cfg.num_maskmem, 1, 1, mem), (None,) * 3 + ("vis_embed",)
        )
        self.no_mem_embed = _param(rngs, (1, 1, d), (None, None, "vis_embed"))
        self.no_mem_pos_enc = _param(rngs, (1, 1, d), (None, None, "vis_embed"))
        self.no_obj_ptr = _param(rngs, (1, d), (None, "vis_embed"))
        self.no_obj_embed_spatial = (
            _param(rngs, (1, mem), (None, "vis_embed")) if cfg.no_obj_embed_spatial else None
        )

    # ------------------------------------------------------------------------------------------
    # image path

    def forward_image(self, images: jax.Array) -> dict[str, jax.Array | list[jax.Array]]:
        """images [B, S, S, 3] normalized (S = image_size) -> the official backbone dict, NHWC:
        vision_features [B, S/16, S/16, C], vision_pos_enc (3 maps), backbone_fpn (3 maps) with
        conv_s0 / conv_s1 applied to levels 0 / 1 (32 and 64 channels)."""
        out = self.image_encoder(images)
        fpn = list(out["backbone_fpn"])
        fpn[0] = self.sam_mask_decoder.conv_s0(fpn[0])
        fpn[1] = self.sam_mask_decoder.conv_s1(fpn[1])
        return {**out, "backbone_fpn": fpn}

    def frame_features(self, images: jax.Array) -> FrameFeatures:
        """images [B, S, S, 3] normalized -> the float32 features a step reads."""
        out = self.forward_image(images)
        fpn, pos = out["backbone_fpn"], out["vision_pos_enc"]
        f32 = jnp.float32
        return FrameFeatures(
            fpn[-1].astype(f32), pos[-1].astype(f32), (fpn[0].astype(f32), fpn[1].astype(f32))
        )

    def with_no_mem_embed(self, vision: jax.Array) -> jax.Array:
        """Features of an initial conditioning frame: vision + `no_mem_embed`
        (`directly_add_no_mem_embed`)."""
        return vision + self.no_mem_embed[...].reshape(1, 1, 1, -1)

    def image_features(self, images: jax.Array) -> dict[str, jax.Array | tuple[jax.Array, ...]]:
        """What `SAM2ImagePredictor.set_image` keeps: image_embed [B, h, w, C] (stride 16, with
        `no_mem_embed` added) and high_res_feats (s0 [B, 4h, 4w, C/8], s1 [B, 2h, 2w, C/4]),
        all float32."""
        f = self.frame_features(images)
        return {"image_embed": self.with_no_mem_embed(f.vision), "high_res_feats": f.high_res}

    def decode_all(
        self,
        image_embed: jax.Array,
        high_res_feats: tuple[jax.Array, jax.Array],
        coords: jax.Array,
        labels: jax.Array,
        point_valid: jax.Array | None = None,
        mask_prompt: jax.Array | None = None,
        has_mask: jax.Array | None = None,
        *,
        pad: bool = True,
        pad_valid: jax.Array | None = None,
    ) -> AllMasks:
        """Prompt encoder + the decoder's `predict_masks` for N prompt sets in one call.

        image_embed [1 or N, h, w, C] and high_res_feats (repeated over the prompts when their
        batch is smaller); coords [N, P, 2] (x, y) model-input pixels; labels [N, P] (-1 not a
        point, 0 / 1 clicks, 2 / 3 box corners); point_valid [N, P] (False = padding, removed
        from attention); mask_prompt [N, 4h, 4w, 1] low-res logits for rows where has_mask [N].
        `pad` appends the official (0, 0) / -1 point, a real token unless pad_valid [N] is False
        (the image predictor's rows without points or box: no sparse tokens at all)."""
        pe = self.sam_prompt_encoder
        sparse, dense = pe(coords, labels, mask_prompt, has_mask=has_mask, pad=pad)
        if mask_prompt is None:
            # every row's dense embedding is `no_mask_embed`: one row lets the decoder's first
            # layer project the image once for all prompts (`predict_masks`)
            dense = dense[:1]
        token_valid = None
        if point_valid is not None:
            token_valid = pe.sparse_valid(point_valid, pad=pad, pad_valid=pad_valid)
        return self.sam_mask_decoder.predict_masks(
            image_embed, pe.get_dense_pe(), sparse, dense, high_res_feats, token_valid
        )

    def decode_prompts(
        self,
        image_embed: jax.Array,
        high_res_feats: tuple[jax.Array, jax.Array],
        coords: jax.Array,
        labels: jax.Array,
        point_valid: jax.Array | None = None,
        mask_inputs: jax.Array | None = None,
        has_mask: jax.Array | None = None,
        *,
        multimask_output: bool,
        pad: bool = True,
        pad_valid: jax.Array | None = None,
        dynamic_multimask: bool | None = None,
    ) -> MaskDecoderOutput:
        """`decode_all` + the official decoder `forward`'s choice of outputs (the image
        predictor's call: 3 masks with multimask_output, else the single / dynamic one)."""
        out = self.decode_all(
            image_embed, high_res_feats, coords, labels, point_valid, mask_inputs, has_mask,
            pad=pad, pad_valid=pad_valid,
        )  # fmt: skip
        return self.sam_mask_decoder.select_outputs(out, multimask_output, dynamic_multimask)

    # ------------------------------------------------------------------------------------------
    # per-frame steps

    def sam_heads(
        self, out: AllMasks, multimask: jax.Array, *, dynamic_multimask: bool | None = None
    ) -> SamHeads:
        """The official `_forward_sam_heads` choices, per row: multimask [B] rows take the
        best-IoU multimask token (mask, IoU and, with `use_multimask_token_for_obj_ptr`, the
        pointer token), others the single-mask output (`dynamic_multimask` as the decoder).
        Absent objects (score <= 0) get NO_OBJ_SCORE masks and the `no_obj_ptr` pointer
        (`fixed_no_obj_ptr`, hard gate)."""
        dec = self.sam_mask_decoder
        obj = out.object_score_logits
        is_obj = obj > 0  # [B, 1]
        masks = jnp.where(is_obj[:, :, None, None], out.masks, NO_OBJ_SCORE).astype(jnp.float32)
        idx = jnp.where(multimask, out.best, dec.single_index(out, dynamic_multimask))
        low = jnp.take_along_axis(masks, idx[:, None, None, None], axis=1)[:, 0]
        iou = jnp.take_along_axis(out.iou_pred, idx[:, None], axis=1)[:, 0]
        tok_idx = jnp.zeros_like(idx)
        if dec.use_multimask_token_for_obj_ptr:
            tok_idx = jnp.where(multimask, out.best, 0)
        token = jnp.take_along_axis(out.mask_tokens, tok_idx[:, None, None], axis=1)[:, 0]
        ptr = self.obj_ptr_proj(token.astype(jnp.float32)).astype(jnp.float32)
        ptr = self._blend_no_obj_ptr(ptr, is_obj.astype(jnp.float32))
        return SamHeads(low, iou, ptr, obj, masks)

    def _blend_no_obj_ptr(self, ptr: jax.Array, present: jax.Array) -> jax.Array:
        """present [B, 1] in {0, 1}: the pointer where present, `no_obj_ptr` elsewhere."""
        return present * ptr + (1 - present) * self.no_obj_ptr[...].astype(jnp.float32)

    def use_mask_as_output(
        self, heads: SamHeads, mask_inputs: jax.Array, is_mask: jax.Array | None = None
    ) -> SamHeads:
        """Official `_use_mask_as_output` for rows where is_mask [B] (all when None):
        mask_inputs [B, S, S] 0 / 1 -> +-10 logits antialiased down to 4h x 4w, IoU 1, object
        score +-10 by presence, and `heads`' pointer (from the decoder call on the
        `mask_downsample`d mask) blended with `no_obj_ptr` by presence."""
        m = mask_inputs.astype(jnp.float32)
        lr = self.config.low_res_size
        low = resize_bilinear(m * 20.0 - 10.0, (lr, lr), True, axes=(-2, -1))
        present = jnp.any(m > 0, axis=(1, 2))[:, None].astype(jnp.float32)
        mine = SamHeads(
            low_res_masks=low,
            ious=jnp.ones_like(heads.ious),
            obj_ptr=self._blend_no_obj_ptr(heads.obj_ptr, present),
            object_score_logits=20.0 * present - 10.0,
            gated_masks=heads.gated_masks,
        )
        if is_mask is None:
            return mine
        return jax.tree.map(
            lambda a, b: jnp.where(is_mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
            mine,
            heads,
        )

    def memory_conditioned(
        self,
        feats: FrameFeatures,
        bank: MemoryBank,
        frame_idx: jax.Array | int,
        num_frames: jax.Array | int,
        reverse: jax.Array | bool = False,
    ) -> jax.Array:
        """Official `_prepare_memory_conditioned_features` for B rows of a non-initial frame:
        [B, h, w, C] float32 (feats.vision [1 or B, ...] attends each row's memory)."""
        b = bank.batch_size
        vision = jnp.broadcast_to(feats.vision, (b,) + feats.vision.shape[1:])
        _, h, w, c = vision.shape
        out = prepare_memory_conditioned_features(
            self.memory_attention, bank, self.config, frame_idx, num_frames,
            vision.reshape(b, h * w, c), feats.pos[0].reshape(h * w, c),
            self.maskmem_tpos_enc[...], self.obj_ptr_tpos_proj, reverse,
        )  # fmt: skip
        return out.reshape(b, h, w, c).astype(jnp.float32)

    def encode_memory(
        self,
        vision: jax.Array,
        pred_masks: jax.Array,
        object_score_logits: jax.Array,
        binarize: jax.Array,
        dtype=jnp.bfloat16,
    ) -> jax.Array:
        """Official `_encode_new_memory` on low-res logits pred_masks [B, 4h, 4w]: upsampled to
        the model size (bilinear, as `pred_masks_high_res`), binarized where `binarize` [B]
        (`binarize_mask_from_pts_for_mem_enc`) else sigmoid, with the raw frame features vision
        [1 or B, h, w, C]. Returns [B, h * w, mem_dim] in `dtype`: bfloat16 as the official
        video predictor stores memories; PAM's fork keeps tracked frames' in float32."""
        s = self.image_size
        b = pred_masks.shape[0]
        high = resize_bilinear(pred_masks.astype(jnp.float32), (s, s), False, axes=(-2, -1))
        pix = jnp.broadcast_to(vision, (b,) + vision.shape[1:])
        feats, _ = encode_new_memory(
            self.memory_encoder, self.config, pix, high[..., None], object_score_logits,
            None if self.no_obj_embed_spatial is None else self.no_obj_embed_spatial[...],
            binarize, True,
        )  # fmt: skip
        return feats.reshape(b, -1, feats.shape[-1]).astype(dtype)

    def track_step(
        self,
        feats: FrameFeatures,
        prompts: StepPrompts,
        bank: MemoryBank | None = None,
        frame_idx: jax.Array | int = 0,
        num_frames: jax.Array | int = 1,
        reverse: jax.Array | bool = False,
        *,
        encode: bool = False,
        dynamic_multimask: bool | None = None,
        mem_dtype=jnp.bfloat16,
    ) -> StepOutput:
        """One frame for B rows: the official `track_step` (+ `_use_mask_as_output`).

        feats: the frame's features (batch 1, shared by the rows, or B); prompts: each row's
        mode and prompt (`StepPrompts`); bank: every row's memory (None when no row needs it:
        TRACK / CORRECT rows then use the initial-frame features). `encode` (static) also
        runs the memory encoder (binarized masks for prompted rows) into `mem_dtype`.
        `dynamic_multimask` overrides the decoder's stability fallback (PAM: False)."""
        mode = prompts.mode
        b = mode.shape[0]
        vision = jnp.broadcast_to(feats.vision, (b,) + feats.vision.shape[1:])
        pix = self.with_no_mem_embed(vision)
        if bank is not None:
            cond = self.memory_conditioned(feats, bank, frame_idx, num_frames, reverse)
            uses_mem = ((mode == TRACK) | (mode == CORRECT))[:, None, None, None]
            pix = jnp.where(uses_mem, cond, pix)
        is_mask = mode == MASK
        if prompts.mask_inputs is not None:
            pix = jnp.where(is_mask[:, None, None, None], vision, pix)

        # dense prompt: mask_downsample(mask) for MASK rows, previous logits for refinements
        dense_in, has_dense = None, None
        if prompts.mask_inputs is not None or prompts.prev_logits is not None:
            lr = self.config.low_res_size
            dense_in = jnp.zeros((b, lr, lr, 1), jnp.float32)
            has_dense = jnp.zeros((b,), bool)
            if prompts.prev_logits is not None:
                prev = prompts.prev_logits[..., None].astype(jnp.float32)
                dense_in = jnp.where(prompts.has_prev[:, None, None, None], prev, dense_in)
                has_dense = has_dense | prompts.has_prev
            if prompts.mask_inputs is not None:
                m = prompts.mask_inputs[..., None].astype(jnp.float32)
                down = self.mask_downsample(m).astype(jnp.float32)
                dense_in = jnp.where(is_mask[:, None, None, None], down, dense_in)
                has_dense = has_dense | is_mask

        out = self.decode_all(
            pix, feats.high_res, prompts.coords, prompts.labels, prompts.valid, dense_in,
            has_dense,
        )  # fmt: skip
        heads = self.sam_heads(out, prompts.multimask, dynamic_multimask=dynamic_multimask)
        if prompts.mask_inputs is not None:
            heads = self.use_mask_as_output(heads, prompts.mask_inputs, is_mask)
        mem = None
        if encode:
            mem = self.encode_memory(
                feats.vision, heads.low_res_masks, heads.object_score_logits, mode != TRACK,
                mem_dtype,
            )  # fmt: skip
        return StepOutput(
            heads.low_res_masks, heads.obj_ptr, heads.object_score_logits, heads.ious, mem, out
        )

    def forward_sam_heads(
        self,
        backbone_features: jax.Array,
        point_coords: jax.Array | None = None,
        point_labels: jax.Array | None = None,
        mask_inputs: jax.Array | None = None,
        high_res_features: tuple[jax.Array, jax.Array] | None = None,
        multimask_output: bool = False,
        point_valid: jax.Array | None = None,
    ) -> SamHeadsOutput:
        """The official `_forward_sam_heads` signature and seven outputs, over `decode_all` and
        `sam_heads`: backbone_features [B, h, w, C]; point_coords [B, P, 2] model-input pixels
        and point_labels [B, P] (None: one (0, 0) / -1 point); point_valid [B, P];
        mask_inputs [B, H, W, 1] (resized to 4h x 4w, antialiased bilinear, when different)."""
        b = backbone_features.shape[0]
        if point_coords is None:
            point_coords = jnp.zeros((b, 1, 2), jnp.float32)
            point_labels = -jnp.ones((b, 1), jnp.int32)
        if mask_inputs is not None:
            size = self.sam_prompt_encoder.mask_input_size
            if tuple(mask_inputs.shape[1:3]) != size:
                mask_inputs = resize_bilinear(mask_inputs.astype(jnp.float32), size, True)
        out = self.decode_all(
            backbone_features, high_res_features, point_coords, point_labels, point_valid,
            mask_inputs,
        )  # fmt: skip
        heads = self.sam_heads(out, jnp.full((b,), multimask_output))
        sel = self.sam_mask_decoder.select_outputs(out, multimask_output)
        is_obj = (heads.object_score_logits > 0)[:, :, None, None]
        low = jnp.where(is_obj, sel.masks, NO_OBJ_SCORE).astype(jnp.float32)
        s = self.image_size
        high = resize_bilinear(low, (s, s), False, axes=(-2, -1))
        best = heads.low_res_masks[:, None]
        high_best = resize_bilinear(best, (s, s), False, axes=(-2, -1))
        return SamHeadsOutput(
            low, high, sel.iou_pred, best, high_best, heads.obj_ptr, heads.object_score_logits
        )
