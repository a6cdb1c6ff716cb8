"""`SAM2Base`: the whole SAM 2 / 2.1 model (official `sam2.modeling.sam2_base.SAM2Base`), NHWC.

Every official state-dict key has a parameter here under the same path (see
`pam_jax.convert.sam2`), including the memory modules and the tracking parameters the image path
never reads, so one converted model directory serves the image predictor, the video predictor
and PAM.

The image path is implemented here:

- `forward_image`: backbone (trunk + FPN) plus `conv_s0` / `conv_s1` applied to the stride-4 / 8
  levels, as the official `forward_image` does.
- `image_features`: what `SAM2ImagePredictor.set_image` keeps (stride-16 embedding with
  `no_mem_embed` added, and the two high-resolution maps).
- `decode_prompts`: prompt encoder + mask decoder for a batch of prompts against one (or a
  batch of) image embedding(s), padding tokens excluded by a validity mask (no Python loop over
  prompts).
- `forward_sam_heads`: the official `_forward_sam_heads` (object-score gating of the masks,
  high-resolution upsampling, best-mask selection and the object pointer), the building block
  of tracking.

Video / memory logic (memory conditioning, memory encoding, track step) lives elsewhere and
uses the submodules below.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pam_jax.sam2.common import MLP, linear
from pam_jax.sam2.config import SAM2Config
from pam_jax.sam2.image_encoder import ImageEncoder
from pam_jax.sam2.mask_decoder import MaskDecoder, MaskDecoderOutput
from pam_jax.sam2.memory_attention import MemoryAttention
from pam_jax.sam2.memory_encoder import MemoryEncoder
from pam_jax.sam2.ops import resize_bilinear
from pam_jax.sam2.prompt_encoder import PromptEncoder, conv2d

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

    def image_features(self, images: jax.Array) -> dict[str, jax.Array | tuple[jax.Array, ...]]:
        """What `SAM2ImagePredictor.set_image` keeps: image_embed [B, h, w, C] (stride 16, with
        `no_mem_embed` added, as `directly_add_no_mem_embed`) and high_res_feats (s0 [B, 4h, 4w,
        C/8], s1 [B, 2h, 2w, C/4]), all float32."""
        out = self.forward_image(images)
        fpn = out["backbone_fpn"]
        embed = fpn[-1].astype(jnp.float32) + self.no_mem_embed[...].reshape(1, 1, 1, -1)
        return {
            "image_embed": embed,
            "high_res_feats": (fpn[0].astype(jnp.float32), fpn[1].astype(jnp.float32)),
        }

    def decode_prompts(
        self,
        image_embed: jax.Array,
        high_res_feats: tuple[jax.Array, jax.Array],
        coords: jax.Array,
        labels: jax.Array,
        token_valid: jax.Array | None = None,
        mask_inputs: jax.Array | None = None,
        has_mask: jax.Array | None = None,
        *,
        multimask_output: bool,
        pad: bool = True,
        dynamic_multimask: bool | None = None,
    ) -> MaskDecoderOutput:
        """Prompt encoder + mask decoder for N prompt sets in one call.

        image_embed [1 or N, h, w, C] and high_res_feats (repeated over the N prompts when their
        batch is 1); coords [N, P, 2] (x, y) in model-input pixels (0..image_size); labels
        [N, P] int (-1 not a point, 0 negative, 1 positive, 2/3 box corners); token_valid
        [N, P + pad] bool (False = padding, removed from attention); mask_inputs [N, 4h, 4w, 1]
        low-res mask logits with has_mask [N] choosing rows that use them. `pad` appends the
        official (0, 0) / -1 point.
        """
        sparse, dense = self.sam_prompt_encoder(
            coords, labels, mask_inputs, has_mask=has_mask, pad=pad
        )
        return self.sam_mask_decoder(
            image_embed,
            self.sam_prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            multimask_output,
            repeat_image=image_embed.shape[0] != sparse.shape[0],
            high_res_features=high_res_feats,
            token_valid=token_valid,
            dynamic_multimask=dynamic_multimask,
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
        """The official `_forward_sam_heads` on a batch of B objects / frames.

        backbone_features [B, h, w, C]; point_coords [B, P, 2] in model-input pixels and
        point_labels [B, P] (None: one (0, 0) / -1 point, as official); point_valid [B, P]
        excludes padding points; mask_inputs [B, H, W, 1] (any size; resized to 4h x 4w with
        antialiased bilinear when different). Absent objects (object score <= 0) get
        NO_OBJ_SCORE masks and the `no_obj_ptr` pointer (fixed_no_obj_ptr, hard gate).
        """
        b = backbone_features.shape[0]
        if point_coords is None:
            point_coords = jnp.zeros((b, 1, 2), jnp.float32)
            point_labels = -jnp.ones((b, 1), jnp.int32)
        token_valid = None
        if point_valid is not None:
            token_valid = self.sam_prompt_encoder.sparse_valid(point_valid, pad=True)
        if mask_inputs is not None:
            size = self.sam_prompt_encoder.mask_input_size
            if tuple(mask_inputs.shape[1:3]) != size:
                mask_inputs = resize_bilinear(mask_inputs.astype(jnp.float32), size, True)
        out = self.decode_prompts(
            backbone_features, high_res_features, point_coords, point_labels, token_valid,
            mask_inputs, multimask_output=multimask_output,
        )  # fmt: skip
        ious, obj = out.iou_pred, out.object_score_logits
        is_obj = obj > 0  # [B, 1]
        low = jnp.where(is_obj[:, :, None, None], out.masks, NO_OBJ_SCORE).astype(jnp.float32)
        s = self.image_size
        high = resize_bilinear(low, (s, s), False, axes=(-2, -1))
        token = out.sam_tokens_out[:, 0]
        if multimask_output:
            best = jnp.argmax(ious, axis=-1)
            low_best = jnp.take_along_axis(low, best[:, None, None, None], axis=1)
            high_best = jnp.take_along_axis(high, best[:, None, None, None], axis=1)
            if out.sam_tokens_out.shape[1] > 1:
                token = jnp.take_along_axis(out.sam_tokens_out, best[:, None, None], axis=1)[:, 0]
        else:
            low_best, high_best = low, high
        obj_ptr = self.obj_ptr_proj(token)
        lam = is_obj.astype(obj_ptr.dtype)
        obj_ptr = lam * obj_ptr + (1 - lam) * self.no_obj_ptr[...]
        return SamHeadsOutput(low, high, ious, low_best, high_best, obj_ptr, obj)
