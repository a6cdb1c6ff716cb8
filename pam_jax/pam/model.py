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
from flax import nnx, struct

from pam_jax.pam import assembly
from pam_jax.pam.config import PAMConfig
from pam_jax.pam.perceiver import SemanticPerceiver
from pam_jax.pam.projector import MLPProjector, newline_param
from pam_jax.sam2.config import SAM2Config
from pam_jax.sam2.mask_decoder import AllMasks
from pam_jax.sam2.memory import MemoryBank, init_memory_bank, insert_memory
from pam_jax.sam2.model import SAM2Base
from pam_jax.sam2.tracking import MASK, POINTS, FrameFeatures, StepOutput, StepPrompts

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


@struct.dataclass
class RegionOutputs:
    """What one SAM 2 + PAM pass over regions gives: the LLM's visual embeddings, the masks
    and scores PAM returns, and SAM 2's decoder outputs (what its losses read)."""

    visual: jax.Array  # [N, 1042, H] image / [B, 5168, H] video
    low_res_masks: jax.Array  # [N, 4h, 4w] image / [B, F, 4h, 4w] video, gated float32
    object_score_logits: jax.Array  # [N] image / [B, F] video
    decoder: AllMasks  # every token: masks [N, 4, 4h, 4w], iou_pred [N, 4], ... (video [B, F])


def region_prompts_step(
    coords: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    mask_inputs: jax.Array | None = None,
    is_mask: jax.Array | None = None,
) -> StepPrompts:
    """PAM's prompted (conditioning) frame: POINTS rows, MASK rows where is_mask, always the
    single-mask output (`multimask_output_in_sam: False`)."""
    n = labels.shape[0]
    mode = jnp.full((n,), POINTS, jnp.int32)
    if mask_inputs is not None:
        mode = jnp.where(is_mask, MASK, mode)
    return StepPrompts(mode, jnp.zeros((n,), bool), coords, labels, valid, mask_inputs)


def pam_track_step(
    sam2: SAM2Base,
    feats: FrameFeatures,
    prompts: StepPrompts,
    bank: MemoryBank | None,
    frame_idx: jax.Array | int,
    num_frames: jax.Array | int,
    *,
    is_cond: bool,
) -> tuple[StepOutput, MemoryBank | None]:
    """One frame of SAM 2 as PAM's fork runs it: `SAM2Base.track_step` in single-mask mode
    without the stability fallback (PAM's decoder), the prompted frame's memory stored in
    bfloat16 and tracked frames' in float32 (pam.md 8). With a bank, the frame's memory is
    inserted (is_cond: as the conditioning frame)."""
    if not is_cond:
        prompts = StepPrompts.tracking(prompts.mode.shape[0]).replace(
            multimask=jnp.zeros_like(prompts.multimask)
        )
    out = sam2.track_step(
        feats, prompts, None if is_cond else bank, frame_idx, num_frames,
        encode=bank is not None, dynamic_multimask=False,
        mem_dtype=jnp.bfloat16 if is_cond else jnp.float32,
    )  # fmt: skip
    if bank is not None:
        bank = insert_memory(bank, frame_idx, out.maskmem_features, out.obj_ptr, is_cond)
    return out, bank


def pam_memory_bank(cfg: SAM2Config, batch_size: int) -> MemoryBank:
    """PAM's bank: one conditioning frame (frame 0) and float32 tracked memories."""
    bank = init_memory_bank(cfg, batch_size, num_cond=1)
    return bank.replace(recent_feats=bank.recent_feats.astype(jnp.float32))


def image_region_outputs(
    sam2: SAM2Base,
    parts: PAMParts,
    image: jax.Array,
    coords: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    mask_inputs: jax.Array | None = None,
    is_mask: jax.Array | None = None,
    image_index: jax.Array | None = None,
) -> RegionOutputs:
    """`image_regions` with SAM 2's decoder outputs (for the trainer's SAM 2 losses)."""
    n = labels.shape[0]
    if image_index is not None:
        if image_index.shape != (n,):
            raise ValueError(f"image_index must be [{n}], got {image_index.shape}")
    elif image.shape[0] not in (1, n):
        raise ValueError(
            f"{image.shape[0]} images for {n} regions: give 1 image, one per region or image_index"
        )
    feats = sam2.frame_features(image)
    if image_index is not None and image.shape[0] > 1:  # each region reads its image's maps
        feats = jax.tree.map(lambda a: a[image_index], feats)
    prompts = region_prompts_step(coords, labels, valid, mask_inputs, is_mask)
    out, _ = pam_track_step(sam2, feats, prompts, None, 0, 1, is_cond=True)
    dec = out.decoder
    visual = parts.image_visual_embeds(dec.mid_image_embed, dec.mid_single_tokens)
    return RegionOutputs(visual, out.pred_masks, out.object_score_logits[:, 0], dec)


def image_regions(
    sam2: SAM2Base,
    parts: PAMParts,
    image: jax.Array,
    coords: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    mask_inputs: jax.Array | None = None,
    is_mask: jax.Array | None = None,
    image_index: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """N regions through SAM 2 and PAM's parts, as the release's 1-frame video predictor sees
    them; pure and static-shaped (usable under jit and jax.grad).

    image [1, S, S, 3] normalized (N regions of one image), [N, S, S, 3] (one region per
    image), or [M, S, S, 3] with image_index [N] (region i on image image_index[i]: several
    images encoded in one batch, each once); coords [N, P, 2] model-input pixels, labels
    [N, P] (2 / 3 box corners, 1 / 0 clicks, -1 padding), valid [N, P]
    (`pam_jax.sam2.prompts.pad_prompts` builds all three). The conditioning frame's
    features are the backbone's plus `no_mem_embed`; the decoder runs in single-mask mode
    (`multimask_output_in_sam: False`) without the stability fallback.

    Mask prompts (rows where is_mask [N]; mask_inputs [N, S, S] binary floats, the mask as
    `add_new_mask` resizes it) follow `_use_mask_as_output`, the path the release's fork
    crashes on (it unpacks 7 of its 9 `_forward_sam_heads` outputs): the output mask is the
    input mask (+-10 logits, antialiased down to 4h x 4w), the object score +-10 by presence,
    and the perceiver taps come from the decoder call that path makes: raw backbone features
    (no `no_mem_embed`), dense prompt `mask_downsample(mask)`, the prompt-less (0, 0) / -1
    point (the caller's row holds it), single-mask mode.

    Returns (visual embeddings [N, 1042, H], low-res mask logits [N, 4h, 4w] gated by the
    object score as the video predictor does, object score logits [N]).
    """
    out = image_region_outputs(
        sam2, parts, image, coords, labels, valid, mask_inputs, is_mask, image_index
    )
    return out.visual, out.low_res_masks, out.object_score_logits


def video_regions(
    sam2: SAM2Base,
    parts: PAMParts,
    frames: jax.Array,
    coords: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    mask_inputs: jax.Array | None = None,
    is_mask: jax.Array | None = None,
) -> RegionOutputs:
    """B videos of F frames, each with one region prompted on frame 0: SAM 2 tracks it through
    the F frames (a `lax.scan` over frames, memory bank in the carry; pure and static-shaped,
    usable under jit and jax.grad) and PAM's parts read the `assembly.select_frames(F)` frames.

    frames [B, F, S, S, 3] normalized; coords [B, P, 2], labels [B, P], valid [B, P] (model
    pixels), mask_inputs [B, S, S] / is_mask [B] as `image_regions`. Returns `RegionOutputs`
    with visual [B, 5168, H] (F >= 1; 16 chosen frames), low-res logits [B, F, 4h, 4w], object
    scores [B, F] and the decoder outputs [B, F, ...]. The per-frame step is the one the PAM
    predictor runs (`pam_track_step`)."""
    b, f = frames.shape[:2]
    bank = pam_memory_bank(sam2.config, b)
    prompts = region_prompts_step(coords, labels, valid, mask_inputs, is_mask)
    num = jnp.int32(f)
    out0, bank = pam_track_step(
        sam2, sam2.frame_features(frames[:, 0]), prompts, bank, 0, num, is_cond=True
    )

    def body(bank, xs):
        t, frame = xs
        out, bank = pam_track_step(
            sam2, sam2.frame_features(frame), prompts, bank, t, num, is_cond=False
        )
        return bank, out.replace(maskmem_features=None)

    rest = jnp.moveaxis(frames[:, 1:], 1, 0)  # [F - 1, B, S, S, 3]
    _, outs = jax.lax.scan(body, bank, (jnp.arange(1, f, dtype=jnp.int32), rest))
    out0 = out0.replace(maskmem_features=None)
    # [B, F, ...]: frame 0 then the scanned frames
    steps = jax.tree.map(
        lambda a, r: jnp.concatenate([a[:, None], jnp.moveaxis(r, 0, 1)], axis=1), out0, outs
    )
    dec = steps.decoder
    chosen = jnp.asarray(assembly.select_frames(f, parts.config.num_frames))
    embeds = dec.mid_image_embed[:, chosen]  # [B, 16, h, w, C]
    tokens = jax.vmap(lambda d: d.mid_single_tokens)(dec)[:, chosen]  # [B, 16, 2, C]
    visual = jax.vmap(parts.video_visual_embeds)(embeds, tokens)
    return RegionOutputs(visual, steps.pred_masks, steps.object_score_logits[..., 0], dec)


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
