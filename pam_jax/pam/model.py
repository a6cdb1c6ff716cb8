"""PAM's own parameters (perceiver, projectors, newlines) and the visual-embedding path.

`PAMParts` holds exactly the release's PAM-specific tensors, with NNX paths equal to the release
keys minus the leading `model.`:

    vision_resampler.*                  model.vision_resampler.*    (Semantic Perceiver)
    mm_projector_img.{0,2}.*            model.mm_projector_img.{0,2}.*
    mm_projector_semT.{0,2}.*           model.mm_projector_semT.{0,2}.*
    image_newline, semT_newline, frame_newline   model.<same>

It maps SAM 2's tapped tensors (`image_embed` [B, 64, 64, 256] after the mask decoder's two-way
transformer, `mask_tokens` [B, 2, 256]) to the LLM-width visual embeddings that replace
`<image>` (`assembly.py` for the layout).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pam_jax.pam import assembly
from pam_jax.pam.config import PAMConfig
from pam_jax.pam.perceiver import SemanticPerceiver
from pam_jax.pam.projector import MLPProjector, newline_param
from pam_jax.sam2.model import NO_OBJ_SCORE, SAM2Base
from pam_jax.sam2.ops import resize_bilinear

PARTS = (
    "vision_resampler", "mm_projector_img", "mm_projector_semT",
    "image_newline", "semT_newline", "frame_newline",
)  # fmt: skip


class PAMParts(nnx.Module):
    """The PAM-specific modules. `dtype` is the compute dtype (parameters stay float32)."""

    def __init__(self, config: PAMConfig, *, rngs: nnx.Rngs, dtype=None):
        self.config = config
        p = config.perceiver
        h = config.hidden_size
        self.vision_resampler = SemanticPerceiver(
            p.num_sem_tokens, p.depth, p.embedding_dim, p.num_heads, p.mlp_dim,
            channel_downsample_rate=p.channel_downsample_rate, rngs=rngs, dtype=dtype,
        )  # fmt: skip
        self.mm_projector_img = MLPProjector(4 * p.embedding_dim, h, rngs=rngs, dtype=dtype)
        self.mm_projector_semT = MLPProjector(p.embedding_dim, h, rngs=rngs, dtype=dtype)
        self.image_newline = newline_param(h, rngs)
        self.semT_newline = newline_param(h, rngs)
        self.frame_newline = newline_param(h, rngs)

    def _newlines(self, dt) -> tuple[jax.Array, jax.Array, jax.Array]:
        return tuple(
            v[...].astype(dt) for v in (self.image_newline, self.semT_newline, self.frame_newline)
        )

    def image_visual_embeds(self, image_embed: jax.Array, mask_tokens: jax.Array) -> jax.Array:
        """Per image: image_embed [B, 64, 64, 256], mask_tokens [B, 2, 256] -> [B, 1042, H]."""
        sem, img = self.vision_resampler(image_embed, mask_tokens, self.config.dense_scale)
        img = self.mm_projector_img(img)
        sem = self.mm_projector_semT(sem)
        inl, snl, _ = self._newlines(img.dtype)
        return assembly.image_embeds(img, sem, inl, snl)

    def video_visual_embeds(self, image_embed: jax.Array, mask_tokens: jax.Array) -> jax.Array:
        """One video's chosen frames (`assembly.select_frames`), frame 0 first:
        image_embed [F, 64, 64, 256], mask_tokens [F, 2, 256] -> [5168, H] for F = 16.

        The transformer runs once over all F frames; only the compression differs (frame 0
        dense, others sparse), so no per-frame Python loop.
        """
        vr = self.vision_resampler
        sem, keys = vr.encode(image_embed, mask_tokens)
        dense = self.mm_projector_img(vr.compress(keys[:1], self.config.dense_scale))[0]
        sparse = self.mm_projector_img(vr.compress(keys[1:], self.config.sparse_scale))
        sem = self.mm_projector_semT(sem)
        return assembly.video_embeds(dense, sparse, sem, *self._newlines(dense.dtype))


class PAM(nnx.Module):
    """The whole model: SAM 2 (`sam2`), PAM's own parts (`parts`) and the Qwen2 LLM (`llm`).

    Submodules may be given (loaded ones, see `load_pam`) or are built with random weights.
    `dtype` is the compute dtype of SAM 2 and the parts, `llm_dtype` that of the LLM.
    """

    def __init__(
        self, config: PAMConfig, *, rngs: nnx.Rngs | None = None, dtype=None,
        llm_dtype=jnp.float32, sam2=None, llm=None, parts: PAMParts | None = None,
    ):  # fmt: skip
        from pam_jax.llm.qwen2 import Qwen2ForCausalLM

        self.config = config
        if rngs is None and (sam2 is None or llm is None or parts is None):
            rngs = nnx.Rngs(0)
        self.sam2 = sam2 if sam2 is not None else SAM2Base(config.sam2, rngs=rngs, dtype=dtype)
        self.parts = parts if parts is not None else PAMParts(config, rngs=rngs, dtype=dtype)
        self.llm = (
            llm if llm is not None
            else Qwen2ForCausalLM(config.llm, rngs=rngs, dtype=llm_dtype, param_dtype=jnp.float32)
        )  # fmt: skip

    def image_regions(
        self,
        image: jax.Array,
        coords: jax.Array,
        labels: jax.Array,
        valid: jax.Array,
        mask_inputs: jax.Array | None = None,
        is_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`image_regions` with this model's SAM 2 and parts."""
        return image_regions(
            self.sam2, self.parts, image, coords, labels, valid, mask_inputs, is_mask
        )


def image_regions(
    sam2: SAM2Base,
    parts: PAMParts,
    image: jax.Array,
    coords: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    mask_inputs: jax.Array | None = None,
    is_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """N regions of one image through SAM 2 and PAM's parts, as the release's 1-frame video
    predictor sees them.

    image [1, S, S, 3] normalized; coords [N, P, 2] model-input pixels, labels [N, P]
    (2 / 3 box corners, 1 / 0 clicks, -1 padding), valid [N, P]. The conditioning frame's
    features are the backbone's plus `no_mem_embed`; the decoder runs in single-mask mode
    (`multimask_output_in_sam: False`).

    Mask prompts (rows where is_mask [N] is set; mask_inputs [N, S, S] binary floats, the
    mask as `add_new_mask` resizes it) follow `_use_mask_as_output`, the path the release's
    fork crashes on (it unpacks 7 of its 9 `_forward_sam_heads` outputs): the output mask
    is the input mask (+-10 logits, antialiased down to 4h x 4w), the object score +-10 by
    presence, and the perceiver taps come from the decoder call that path makes: raw
    backbone features (no `no_mem_embed`), dense prompt `mask_downsample(mask)`, the
    prompt-less (0, 0) / -1 point (the caller's row holds it), single-mask mode.

    Returns (visual embeddings [N, 1042, H], low-res mask logits [N, 4h, 4w] gated by the
    object score as the video predictor does, object score logits [N]).
    """
    feats = sam2.image_features(image)
    embed, dense, has = feats["image_embed"], None, None
    if mask_inputs is not None:
        raw = embed - sam2.no_mem_embed[...].reshape(1, 1, 1, -1)
        sel = is_mask[:, None, None, None]
        embed = jnp.where(sel, raw, embed)  # [N, h, w, C]
        dense = sam2.mask_downsample(mask_inputs[..., None].astype(jnp.float32))
        dense, has = dense.astype(jnp.float32), is_mask
    token_valid = sam2.sam_prompt_encoder.sparse_valid(valid, pad=True)
    out = sam2.decode_prompts(
        embed, feats["high_res_feats"], coords, labels, token_valid, dense, has,
        multimask_output=False, dynamic_multimask=False,
    )  # fmt: skip
    visual = parts.image_visual_embeds(out.mid_image_embed, out.mid_mask_tokens)
    obj = out.object_score_logits[:, 0]
    low = jnp.where(obj[:, None, None] > 0, out.masks[:, 0], NO_OBJ_SCORE)
    low = low.astype(jnp.float32)
    if mask_inputs is not None:
        m = mask_inputs.astype(jnp.float32)
        m_low = resize_bilinear(m * 20.0 - 10.0, low.shape[-2:], True, axes=(-2, -1))
        m_obj = jnp.where(jnp.any(m > 0, axis=(1, 2)), 10.0, -10.0)
        low = jnp.where(is_mask[:, None, None], m_low, low)
        obj = jnp.where(is_mask, m_obj, obj.astype(jnp.float32))
    return visual, low, obj


def resize_vocab(llm, n: int):
    """The release's `resize_token_embeddings(len(tokenizer))`: keep the first `n` rows of the
    embedding (and of an untied lm_head), so the padded, untrained rows (151936 -> 151665 for
    Qwen2.5) can never be generated. In place; returns the new Qwen2 config."""
    cfg = llm.cfg
    if n >= cfg.vocab_size:
        return cfg
    new = cfg.replace(vocab_size=n)
    emb = llm.model.embed_tokens
    emb.embedding.set_value(emb.embedding[...][:n])
    emb.num_embeddings = n
    if not cfg.tie_word_embeddings:
        llm.lm_head.kernel.set_value(llm.lm_head.kernel[...][:, :n])
        llm.lm_head.out_features = n
    llm.cfg = new
    llm.model.cfg = new
    return new


def load_pam(
    model_dir, dtype=jnp.float32, llm_dtype=jnp.bfloat16, *, mesh=None, resize_to_tokenizer=True
):
    """(PAM, PAMConfig, tokenizer or None) from a `pam-jax convert pam` directory.

    SAM 2 and the parts keep float32 parameters (compute in `dtype`); the LLM's parameters and
    compute are `llm_dtype` (bf16 halves the bytes read per decoded token). Like the release's
    loader, the vocabulary is cut to the tokenizer's length (`resize_to_tokenizer`). With
    `mesh`, every part (SAM 2, perceiver / projectors / newlines, LLM) is placed as its logical
    axis names map under the current rules (`sharding.axis_rules`).
    """
    from pathlib import Path

    from pam_jax.checkpoint import CheckpointError, assign_params, load_params, read_model_config
    from pam_jax.llm.io import load_qwen2
    from pam_jax.sam2.loading import load_sam2
    from pam_jax.sharding import place

    d = Path(model_dir)
    meta = read_model_config(d, "pam")
    if not any(d.glob("*.safetensors")):  # before the (slow) SAM 2 and LLM loads
        raise CheckpointError(
            f"{d} holds no PAM weights (model.safetensors); write it with `pam-jax convert pam`"
        )
    cfg = PAMConfig.from_dict(meta["config"])
    sam2, _ = load_sam2(d / meta.get("sam2_dir", "sam2"), dtype=dtype or jnp.float32, mesh=mesh)
    llm, _, tok = load_qwen2(d / meta.get("llm_dir", "llm"), dtype=llm_dtype, mesh=mesh)
    parts = nnx.eval_shape(lambda: PAMParts(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    assign_params(parts, load_params(d), what=f"{d} (PAM parts)")
    if resize_to_tokenizer and tok is not None and tok.vocab_size < cfg.llm.vocab_size:
        cfg = cfg.replace(llm=resize_vocab(llm, tok.vocab_size))
        if mesh is not None:  # the cut rows: re-place (an odd count replicates that axis)
            place(llm.model.embed_tokens, mesh)
            if not cfg.llm.tie_word_embeddings:
                place(llm.lm_head, mesh)
    if mesh is not None:
        place(parts, mesh)
    return PAM(cfg, sam2=sam2, llm=llm, parts=parts), cfg, tok


def save_pam(model: PAM, out_dir, tokenizer_dir=None):
    """Write a PAM model as a model directory (`load_pam` reads it); for tests and demos."""
    from pathlib import Path

    from pam_jax.checkpoint import flat_params, save_model_dir
    from pam_jax.llm.io import save_qwen2
    from pam_jax.sam2.loading import save_sam2

    out = Path(out_dir)
    save_sam2(model.sam2, out / "sam2")
    save_qwen2(model.llm, out / "llm", tokenizer_dir=tokenizer_dir)
    save_model_dir(
        out, "pam", model.config.to_dict(), flat_params(model.parts),
        extra={"sam2_dir": "sam2", "llm_dir": "llm"},
    )  # fmt: skip
    return out
