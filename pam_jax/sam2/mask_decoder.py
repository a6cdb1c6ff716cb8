"""SAM 2 mask decoder (official `sam2.modeling.sam.mask_decoder.MaskDecoder`), NHWC, with PAM taps.

Besides the official outputs, `__call__` returns the two tensors PAM's Semantic Perceiver reads
(`../shared/reference/pam.md` section 1.3):

- `mid_image_embed` [B, h, w, C]: the image embedding after the two-way transformer, before the
  upscaling convolutions (PAM's `src.transpose(1, 2).view(b, c, h, w)`).
- `mid_mask_tokens`: with `multimask_output=False` (always the case in PAM) [B, 2, C] =
  cat(stability-selected mask token, single-mask token), where the stability-selected token is
  token 0 if the stability score of mask 0 is >= the threshold, else the best-IoU multimask token
  (1..3). It is computed whether or not `dynamic_multimask_via_stability` is on (that flag only
  governs `masks` / `iou_pred`, as in the official code). With `multimask_output=True` it is the
  three multimask tokens [B, 3, C].

PAM's modified decoder returns the single-mask output for `masks` (its dynamic fallback for
masks is commented out): call with `dynamic_multimask=False` to get that behaviour.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pam_jax.sam2.common import MLP, gelu, linear
from pam_jax.sam2.prompt_encoder import LN2D_EPS, conv2d, embed
from pam_jax.sam2.two_way_transformer import TwoWayTransformer, layer_norm


class MaskDecoderOutput(NamedTuple):
    masks: jax.Array  # [B, M, 4h, 4w] low-res mask logits, float32 (M = 3 multimask, else 1)
    iou_pred: jax.Array  # [B, M] float32
    sam_tokens_out: jax.Array  # [B, 3 or 1, C]: object-pointer source tokens
    object_score_logits: jax.Array  # [B, 1] float32
    mid_image_embed: jax.Array  # [B, h, w, C] (PAM tap)
    mid_mask_tokens: jax.Array  # [B, 2, C] single-mask mode, [B, 3, C] multimask (PAM tap)


class AllMasks(NamedTuple):
    """Every output token of one decoder call (official `predict_masks`), M = 1 + multimask."""

    masks: jax.Array  # [B, M, 4h, 4w] low-res mask logits, float32 (token 0 = single mask)
    iou_pred: jax.Array  # [B, M] float32
    mask_tokens: jax.Array  # [B, M, C] the mask tokens after the transformer
    object_score_logits: jax.Array  # [B, 1] float32
    mid_image_embed: jax.Array  # [B, h, w, C] (PAM tap)
    best: jax.Array  # [B] int32 best-IoU multimask token (1..M-1)
    stable_sel: jax.Array  # [B] int32 token 0 if mask 0 is stable, else `best`

    @property
    def mid_single_tokens(self) -> jax.Array:
        """PAM's token tap in single-mask mode: [B, 2, C] = (stability-selected, token 0)."""
        idx = self.stable_sel[:, None, None]
        chosen = jnp.take_along_axis(self.mask_tokens, idx, axis=1)
        return jnp.concatenate([chosen, self.mask_tokens[:, 0:1]], axis=1)


def conv_transpose2x2(din: int, dout: int, rngs: nnx.Rngs, dtype=None) -> nnx.ConvTranspose:
    """torch ConvTranspose2d(k=2, s=2): kernel [2, 2, dout, din] so the converter's (2, 3, 1, 0)
    permutation of torch's [din, dout, 2, 2] is exact with `transpose_kernel=True`."""
    return nnx.ConvTranspose(
        din, dout, kernel_size=(2, 2), strides=(2, 2), padding="VALID", transpose_kernel=True,
        dtype=dtype, rngs=rngs,
        kernel_metadata={"out_sharding": ("conv_h", "conv_w", "conv_out", "conv_in")},
        bias_metadata={"out_sharding": ("conv_out",)},
    )  # fmt: skip


def upsample_2x2(conv: nnx.ConvTranspose, x: jax.Array) -> jax.Array:
    """`conv` (a `conv_transpose2x2`) on x [B, h, w, din] -> [B, 2h, 2w, dout] as one matmul
    and a depth-to-space: with kernel 2 and stride 2 the output pixels (2i + p, 2j + q) are
    x[i, j] @ kernel[p, q] (the same sums as the convolution, exactly), which XLA runs as a
    GEMM instead of a strided transposed convolution. `$PAM_JAX_CONVT=conv` keeps the
    convolution (benchmarks' A/B)."""
    if os.environ.get("PAM_JAX_CONVT", "matmul") == "conv":
        return conv(x)
    k, bias = conv.kernel[...], conv.bias[...]
    if conv.dtype is not None:
        x, k, bias = x.astype(conv.dtype), k.astype(conv.dtype), bias.astype(conv.dtype)
    b, h, w, _ = x.shape
    y = jnp.einsum("bijc,pqoc->bipjqo", x, k)
    return y.reshape(b, 2 * h, 2 * w, k.shape[2]) + bias


def _repeat_to(x: jax.Array, b: int) -> jax.Array:
    """Repeat each image of x [b0, ...] b // b0 times (torch repeat_interleave) to batch b."""
    b0 = x.shape[0]
    if b0 == b:
        return x
    if b % b0:
        raise ValueError(f"image batch {b0} does not divide prompt batch {b}")
    return jnp.repeat(x, b // b0, axis=0)


class MaskDecoder(nnx.Module):
    """Official `MaskDecoder` (SAM 2 settings by default), including its `TwoWayTransformer`.

    `conv_s0` / `conv_s1` (1x1 convs of the stride-4 / stride-8 backbone features) belong to the
    decoder's weights but are applied in the image path (`SAM2Base.forward_image`); the decoder
    receives their outputs as `high_res_features`.
    """

    def __init__(
        self,
        transformer_dim: int = 256,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        use_high_res_features: bool = True,
        iou_prediction_use_sigmoid: bool = True,
        dynamic_multimask_via_stability: bool = True,
        dynamic_multimask_stability_delta: float = 0.05,
        dynamic_multimask_stability_thresh: float = 0.98,
        pred_obj_scores: bool = True,
        pred_obj_scores_mlp: bool = True,
        use_multimask_token_for_obj_ptr: bool = True,
        transformer_depth: int = 2,
        transformer_num_heads: int = 8,
        transformer_mlp_dim: int = 2048,
        *,
        rngs: nnx.Rngs,
        dtype=None,
    ):
        d = transformer_dim
        self.transformer_dim = d
        self.dtype = dtype
        self.transformer = TwoWayTransformer(
            transformer_depth, d, transformer_num_heads, transformer_mlp_dim, rngs=rngs,
            dtype=dtype,
        )  # fmt: skip
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = embed(1, d, rngs)
        self.mask_tokens = embed(self.num_mask_tokens, d, rngs)
        self.pred_obj_scores = pred_obj_scores
        if pred_obj_scores:
            self.obj_score_token = embed(1, d, rngs)
        self.use_multimask_token_for_obj_ptr = use_multimask_token_for_obj_ptr
        self.output_upscaling = nnx.List(
            [
                conv_transpose2x2(d, d // 4, rngs, dtype),
                layer_norm(d // 4, LN2D_EPS, rngs, dtype),
                None,  # GELU
                conv_transpose2x2(d // 4, d // 8, rngs, dtype),
                None,  # GELU
            ]
        )
        self.use_high_res_features = use_high_res_features
        if use_high_res_features:
            self.conv_s0 = conv2d(d, d // 8, 1, 1, rngs, dtype=dtype)
            self.conv_s1 = conv2d(d, d // 4, 1, 1, rngs, dtype=dtype)
        self.output_hypernetworks_mlps = nnx.List(
            [MLP(d, d, d // 8, 3, rngs=rngs, dtype=dtype) for _ in range(self.num_mask_tokens)]
        )
        self.iou_prediction_head = MLP(
            d, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth, rngs=rngs,
            sigmoid_output=iou_prediction_use_sigmoid, dtype=dtype,
        )  # fmt: skip
        if pred_obj_scores:
            if pred_obj_scores_mlp:
                self.pred_obj_score_head = MLP(d, d, 1, 3, rngs=rngs, dtype=dtype)
            else:
                self.pred_obj_score_head = linear(d, 1, rngs, dtype=dtype)
        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.dynamic_multimask_stability_delta = dynamic_multimask_stability_delta
        self.dynamic_multimask_stability_thresh = dynamic_multimask_stability_thresh

    @classmethod
    def from_config(cls, cfg, *, rngs: nnx.Rngs, dtype=None) -> MaskDecoder:
        """Decoder of a `pam_jax.sam2.config.SAM2Config`."""
        return cls(
            cfg.d_model,
            num_multimask_outputs=cfg.num_multimask_outputs,
            iou_head_depth=cfg.iou_head_depth,
            dynamic_multimask_via_stability=cfg.dynamic_multimask_via_stability,
            dynamic_multimask_stability_delta=cfg.dynamic_multimask_stability_delta,
            dynamic_multimask_stability_thresh=cfg.dynamic_multimask_stability_thresh,
            rngs=rngs,
            dtype=dtype,
        )

    def stability_scores(self, mask_logits: jax.Array) -> jax.Array:
        """area(logits > delta) / area(logits > -delta) over the last two axes (1 if empty)."""
        delta = self.dynamic_multimask_stability_delta
        area_i = jnp.sum(mask_logits > delta, axis=(-2, -1), dtype=jnp.int32).astype(jnp.float32)
        area_u = jnp.sum(mask_logits > -delta, axis=(-2, -1), dtype=jnp.int32).astype(jnp.float32)
        return jnp.where(area_u > 0, area_i / jnp.maximum(area_u, 1.0), 1.0)

    def _hypernetworks(self, mask_tokens_out: jax.Array) -> jax.Array:
        """output_hypernetworks_mlps[i] on token i, all i at once: [B, M, C] -> [B, M, C/8].

        The per-token MLP weights are stacked so one batched matmul replaces a loop over tokens.
        """
        mlps = self.output_hypernetworks_mlps
        x = mask_tokens_out
        n = len(mlps[0].layers)
        for j in range(n):
            w = jnp.stack([m.layers[j].kernel[...] for m in mlps])  # [M, din, dout]
            b = jnp.stack([m.layers[j].bias[...] for m in mlps])  # [M, dout]
            if self.dtype is not None:
                x, w, b = x.astype(self.dtype), w.astype(self.dtype), b.astype(self.dtype)
            x = jnp.einsum("bmi,mio->bmo", x, w) + b
            if j < n - 1:
                x = mlps[0].activation(x)
        return x

    def _upscale(self, src: jax.Array, high_res_features) -> jax.Array:
        dc1, ln1, _, dc2, _ = self.output_upscaling
        if not self.use_high_res_features:
            return gelu(upsample_2x2(dc2, gelu(ln1(upsample_2x2(dc1, src)))))
        feat_s0, feat_s1 = (_repeat_to(f, src.shape[0]) for f in high_res_features)
        if self.dtype is not None:
            feat_s0, feat_s1 = feat_s0.astype(self.dtype), feat_s1.astype(self.dtype)
        x = gelu(ln1(upsample_2x2(dc1, src) + feat_s1))
        return gelu(upsample_2x2(dc2, x) + feat_s0)

    def predict_masks(
        self,
        image_embeddings: jax.Array,
        image_pe: jax.Array,
        sparse_prompt_embeddings: jax.Array,
        dense_prompt_embeddings: jax.Array,
        high_res_features: tuple[jax.Array, jax.Array] | None = None,
        token_valid: jax.Array | None = None,
    ) -> AllMasks:
        """Every output token (the official `predict_masks`, before choosing outputs).

        image_embeddings [B or 1, h, w, C] (repeated per prompt when its batch is smaller, as
        the official `repeat_image`), image_pe [1, h, w, C] (`get_dense_pe()`),
        sparse_prompt_embeddings [B, N, C], dense_prompt_embeddings [B or 1, h, w, C],
        high_res_features (s0 [B or 1, 4h, 4w, C/8], s1 [B or 1, 2h, 2w, C/4]) after
        conv_s0 / s1, token_valid [B, N] bool (False = padding token, excluded from attention;
        see `PromptEncoder.sparse_valid`).
        """
        b = sparse_prompt_embeddings.shape[0]
        d = self.transformer_dim
        token_list = [self.iou_token.embedding[...], self.mask_tokens.embedding[...]]
        s = 0
        if self.pred_obj_scores:
            token_list.insert(0, self.obj_score_token.embedding[...])
            s = 1
        output_tokens = jnp.concatenate(token_list, axis=0)
        n_out = output_tokens.shape[0]
        sparse = sparse_prompt_embeddings
        output_tokens = jnp.broadcast_to(output_tokens, (b, n_out, d)).astype(sparse.dtype)
        tokens = jnp.concatenate([output_tokens, sparse], axis=1)
        token_mask = None
        if token_valid is not None:
            token_mask = jnp.concatenate(
                [jnp.ones((b, n_out), bool), jnp.asarray(token_valid, bool)], axis=1
            )
        if image_embeddings.shape[0] == 1 and dense_prompt_embeddings.shape[0] == 1:
            # the same image and dense prompt for every row: the first two-way layer projects
            # it once (its image-side keys / values / queries broadcast over the prompts); the
            # rows part at its first image update. Same numbers as repeating it.
            src = image_embeddings + dense_prompt_embeddings
        else:
            src = _repeat_to(image_embeddings, b) + dense_prompt_embeddings
        if self.dtype is not None:
            src, tokens = src.astype(self.dtype), tokens.astype(self.dtype)
            image_pe = image_pe.astype(self.dtype)
        _, h, w, _ = src.shape

        hs, keys = self.transformer(src, image_pe, tokens, token_mask)
        iou_token_out = hs[:, s]
        mask_tokens_out = hs[:, s + 1 : s + 1 + self.num_mask_tokens]
        src = keys.reshape(b, h, w, d)

        upscaled = self._upscale(src, high_res_features)  # [B, 4h, 4w, C/8]
        hyper_in = self._hypernetworks(mask_tokens_out)  # [B, M, C/8]
        masks = jnp.einsum("bmc,bhwc->bmhw", hyper_in, upscaled).astype(jnp.float32)
        iou_pred = self.iou_prediction_head(iou_token_out).astype(jnp.float32)
        if self.pred_obj_scores:
            obj = self.pred_obj_score_head(hs[:, 0]).astype(jnp.float32)
        else:  # the official default: object assumed present, sigmoid(10) ~ 1
            obj = jnp.full((b, 1), 10.0, jnp.float32)
        # Stability-based choice between token 0 and the best-IoU multimask token, without
        # branching on values; used by the dynamic fallback and by PAM's token tap.
        best = jnp.argmax(iou_pred[:, 1:], axis=-1) + 1  # [B] index into 1..M
        is_stable = self.stability_scores(masks[:, 0]) >= self.dynamic_multimask_stability_thresh
        return AllMasks(
            masks=masks,
            iou_pred=iou_pred,
            mask_tokens=mask_tokens_out,
            object_score_logits=obj,
            mid_image_embed=src,
            best=best,
            stable_sel=jnp.where(is_stable, 0, best),
        )

    def single_index(self, out: AllMasks, dynamic_multimask: bool | None = None) -> jax.Array:
        """[B] token of the single-mask output: the stability fallback when dynamic
        (`dynamic_multimask`, default `dynamic_multimask_via_stability`), else token 0."""
        dynamic = self.dynamic_multimask_via_stability
        if dynamic_multimask is not None:
            dynamic = dynamic_multimask
        return out.stable_sel if dynamic else jnp.zeros_like(out.stable_sel)

    def select_outputs(
        self, out: AllMasks, multimask_output: bool, dynamic_multimask: bool | None = None
    ) -> MaskDecoderOutput:
        """The official `forward`'s choice of outputs from `predict_masks` (static mode)."""
        masks, iou_pred, mask_tokens_out = out.masks, out.iou_pred, out.mask_tokens
        if multimask_output:
            out_masks, out_iou = masks[:, 1:], iou_pred[:, 1:]
            mid_tokens = mask_tokens_out[:, 1:]
        else:
            idx = self.single_index(out, dynamic_multimask)
            out_masks = jnp.take_along_axis(masks, idx[:, None, None, None], axis=1)
            out_iou = jnp.take_along_axis(iou_pred, idx[:, None], axis=1)
            mid_tokens = out.mid_single_tokens
        if multimask_output and self.use_multimask_token_for_obj_ptr:
            sam_tokens_out = mask_tokens_out[:, 1:]
        else:
            sam_tokens_out = mask_tokens_out[:, 0:1]
        return MaskDecoderOutput(
            masks=out_masks,
            iou_pred=out_iou,
            sam_tokens_out=sam_tokens_out,
            object_score_logits=out.object_score_logits,
            mid_image_embed=out.mid_image_embed,
            mid_mask_tokens=mid_tokens,
        )

    def __call__(
        self,
        image_embeddings: jax.Array,
        image_pe: jax.Array,
        sparse_prompt_embeddings: jax.Array,
        dense_prompt_embeddings: jax.Array,
        multimask_output: bool,
        repeat_image: bool = False,
        high_res_features: tuple[jax.Array, jax.Array] | None = None,
        token_valid: jax.Array | None = None,
        *,
        dynamic_multimask: bool | None = None,
    ) -> MaskDecoderOutput:
        """Predict masks (official `forward`): `predict_masks`, then `select_outputs`.

        `multimask_output` is static. `dynamic_multimask` overrides
        `dynamic_multimask_via_stability` for this call (eval-mode semantics).
        """
        b = sparse_prompt_embeddings.shape[0]
        if not repeat_image and image_embeddings.shape[0] not in (1, b):
            raise ValueError(f"image batch {image_embeddings.shape[0]} != prompt batch {b}")
        out = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
            high_res_features, token_valid,
        )  # fmt: skip
        return self.select_outputs(out, multimask_output, dynamic_multimask)
