"""PAM's training loss on one micro-batch: SAM 2 -> perceiver -> projectors -> spliced LLM
sequence -> next-token cross entropy, returned as sums (never means) so the trainer can
normalise by the supervised tokens of the whole global batch.

The release (`LlavaQwenForCausalLM.forward(labels=...)`, pam.md §8.1): labels are shifted
(position t predicts labels[t + 1]), -100 is ignored, the visual positions are ignored, and the
cross entropy runs over **all** logits of the model's padded vocabulary (151936 for Qwen2.5),
not the tokenizer's length. Its reduction is a token mean per micro-batch, then HF Trainer
weighs micro-batches equally over accumulation steps and GPUs; pam-jax divides the sum of
token NLLs of the global batch by its supervised token count (invariant to mesh and
accumulation).

The LLM runs through `Qwen2ForCausalLM.hidden_states_train` (segment-aware causal attention
that never builds [B, T, T]) and `pam_jax.llm.loss.lm_loss_sums` (cross entropy chunked over
the sequence, float32 logits of one chunk at a time).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from pam_jax.llm.loss import lm_loss_sums
from pam_jax.pam import assembly
from pam_jax.pam.model import PAM, RegionOutputs, image_region_outputs, video_regions
from pam_jax.sam2.video_io import normalize_device

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class LossOptions:
    num_sources: int = 1
    attention: str = "auto"
    chunk: int = 512
    seg_loss: float = 0.0
    lm_loss: float = 1.0


def source_loss_sums(llm, hidden, labels, source_index, num_sources: int, chunk: int):
    """Per mixture source (nll [S], n [S]) for the logs, without gradients: one more chunked
    loss pass per source over that source's tokens (source_index [B, 1] per row or [B, L] per
    token in packed rows; a vmap over rows would unshard the logits' batch dimension)."""
    if num_sources == 1:
        return None
    h = jax.lax.stop_gradient(hidden)
    out = [
        lm_loss_sums(llm, h, jnp.where(source_index == i, labels, IGNORE), chunk=chunk)
        for i in range(num_sources)  # a handful of sources, static
    ]
    return (jnp.stack([o[0] for o in out]), jnp.stack([o[1] for o in out]).astype(jnp.float32))


def region_forward(model: PAM, mb: Mapping[str, jax.Array]) -> RegionOutputs:
    """SAM 2 + PAM's parts on a micro-batch, one region per row prompted on frame 0.

    pixels [B, 1, S, S, 3]: the image path (visual [B, 1042, H]). pixels [B, F > 1, ...]: SAM 2
    tracks the clip (`video_regions`, visual [B, 5168, H]); image rows of such a batch
    (is_video False) take the image path on frame 0, padded to the video length (both paths
    then run on every row: keep images and videos in separate batches where possible).
    """
    frames = mb["pixels"].shape[1]
    args = (mb["coords"].astype(jnp.float32), mb["point_labels"], mb["point_valid"])
    first = normalize_device(mb["pixels"][:, 0])
    img = image_region_outputs(model.sam2, model.parts, first, *args)
    if frames == 1:
        return img
    vid = video_regions(model.sam2, model.parts, normalize_device(mb["pixels"]), *args)
    is_vid = mb["is_video"]
    pad = vid.visual.shape[1] - img.visual.shape[1]
    img_visual = jnp.pad(img.visual, ((0, 0), (0, pad), (0, 0)))
    visual = jnp.where(is_vid[:, None, None], vid.visual, img_visual.astype(vid.visual.dtype))
    return vid.replace(visual=visual)


def seg_loss_sums(out: RegionOutputs, mb: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """SAM 2's segmentation loss on the single-mask output of frame 0 (every frame for video
    batches) against the ground-truth masks, summed over rows with a mask: 20 x sigmoid focal
    (alpha 0.25, gamma 2, mean over pixels) + dice + |IoU prediction - IoU| + object-score BCE
    (SAM 2's training weights). Predictions stay at the decoder's 4h x 4w; the masks are
    area-downsampled to it (SAM 2 upsamples the predictions instead). Returns (sum, rows)."""
    dec = out.decoder
    logits = dec.masks[..., 0, :, :]  # [B, (F,) 4h, 4w] token 0 = the single mask
    iou_pred = dec.iou_pred[..., 0]
    obj = dec.object_score_logits[..., 0]
    gt = mb["gt_masks"].astype(jnp.float32)  # [B, F, S, S]
    if logits.ndim == 3:
        gt = gt[:, 0]
        valid = mb["has_mask"] & mb["mask_valid"][:, 0]
    else:
        valid = mb["has_mask"][:, None] & mb["mask_valid"]
    h = logits.shape[-1]
    s = gt.shape[-1]
    gt = gt.reshape(*gt.shape[:-2], h, s // h, h, s // h).mean(axis=(-3, -1)) > 0.5
    t = gt.astype(jnp.float32)
    p = jax.nn.sigmoid(logits)
    ce = optax_sigmoid_ce(logits, t)
    p_t = p * t + (1 - p) * (1 - t)
    focal = (0.25 * t + 0.75 * (1 - t)) * ce * (1 - p_t) ** 2
    focal = focal.mean(axis=(-2, -1))
    inter = (p * t).sum(axis=(-2, -1))
    dice = 1 - (2 * inter + 1) / (p.sum(axis=(-2, -1)) + t.sum(axis=(-2, -1)) + 1)
    hard = logits > 0
    iou = (hard & gt).sum(axis=(-2, -1)) / jnp.maximum((hard | gt).sum(axis=(-2, -1)), 1)
    iou_l1 = jnp.abs(iou_pred - jax.lax.stop_gradient(iou))
    present = gt.any(axis=(-2, -1)).astype(jnp.float32)
    cls = optax_sigmoid_ce(obj, present)
    # no mask / IoU loss on frames without the object (SAM 2's rule); the score loss always
    per = present * (20 * focal + dice + iou_l1) + cls
    v = valid.astype(jnp.float32)
    return jnp.sum(per * v), jnp.sum(v)


def optax_sigmoid_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    import optax

    return optax.sigmoid_binary_cross_entropy(logits, labels)


def masked_labels(mb: Mapping[str, jax.Array]) -> jax.Array:
    """labels with -100 on padding rows / positions (what the loss counts)."""
    keep = mb["example_valid"][:, None] & mb["mask"]
    return jnp.where(keep, mb["labels"], IGNORE)


def supervised_tokens(batch: Mapping[str, jax.Array]) -> jax.Array:
    """Tokens the loss counts in a (global) batch: shifted labels that are not ignored."""
    return jnp.sum((masked_labels(batch)[:, 1:] >= 0).astype(jnp.int32))


# per-sample fields that packed batches (`pam_jax.data.batch.collate_packed`) give a slot axis
SLOT_FIELDS = ("pixels", "coords", "point_labels", "point_valid", "is_video", "gt_masks",
               "mask_valid", "has_mask")  # fmt: skip


def is_packed(mb: Mapping[str, jax.Array]) -> bool:
    """Rows hold up to K samples: pixels [B, K, F, S, S, 3] (static)."""
    return mb["pixels"].ndim == 6


def slot_rows(mb: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """A packed micro-batch's per-sample fields as B * K rows (unchanged when not packed)."""
    if not is_packed(mb):
        return dict(mb)
    return {**mb, **{k: mb[k].reshape(-1, *mb[k].shape[2:]) for k in SLOT_FIELDS if k in mb}}


def seg_rows(batch: Mapping[str, jax.Array]) -> jax.Array:
    batch = slot_rows(batch)
    if batch["pixels"].shape[1] == 1:
        v = batch["has_mask"] & batch["mask_valid"][:, 0]
    else:
        v = batch["has_mask"][:, None] & batch["mask_valid"]
    return jnp.sum(v.astype(jnp.float32))


def forward_hidden(
    model: PAM, mb: Mapping[str, jax.Array], opts: LossOptions
) -> tuple[jax.Array, RegionOutputs, dict[str, jax.Array]]:
    """The training forward up to the LLM's final-normed hidden states [B, L, H]: SAM 2 + parts
    per sample (B * K slots when packed), spliced into the rows, segment-causal LLM. Returns
    (hidden, region outputs per sample, the micro-batch with its samples as rows)."""
    packed = is_packed(mb)
    slots = slot_rows(mb)
    out = region_forward(model, slots)
    visual = out.visual
    if packed:  # [B * K, V, H] -> [B, K * V, H]: slot k's block is k * V.. (visual_index)
        b, k = mb["pixels"].shape[:2]
        visual = visual.reshape(b, k * visual.shape[1], visual.shape[2])
    llm = model.llm
    emb = llm.embed(mb["text_ids"])
    lay = assembly.Layout(
        mb["text_ids"], mb["visual_index"], mb["is_visual"], mb["mask"], mb["positions"], None
    )
    x = assembly.assemble(emb, visual, lay)
    seg = jnp.where(mb["example_valid"][:, None], mb["segment_ids"], 0)
    hidden = llm.hidden_states_train(
        x, mb["positions"], seg, attention=opts.attention, packed=packed
    )
    return hidden, out, slots


def micro_batch_sums(model: PAM, mb: Mapping[str, jax.Array], opts: LossOptions):
    """Loss sums of one micro-batch: dict of nll [S] and n [S] per mixture source (S =
    opts.num_sources), plus scalars nll, n, positions (non-padding LLM positions)."""
    hidden, out, slots = forward_hidden(model, mb, opts)
    llm = model.llm
    valid_row = mb["example_valid"]
    seg = jnp.where(valid_row[:, None], mb["segment_ids"], 0)
    packed = is_packed(mb)
    labels = masked_labels(mb)
    nll, n = lm_loss_sums(llm, hidden, labels, chunk=opts.chunk)
    src = mb["source_index"]  # per row [B], per slot [B, K] packed -> per token
    src = jnp.take_along_axis(src, jnp.maximum(seg - 1, 0), axis=1) if packed else src[:, None]
    per = source_loss_sums(llm, hidden, labels, src, opts.num_sources, opts.chunk)
    if per is None:
        per = (nll[None], n.astype(jnp.float32)[None])
    return {
        "nll": nll,
        "n": n,
        "positions": jnp.sum((mb["mask"] & valid_row[:, None]).astype(jnp.int32)),
        "src_nll": per[0],
        "src_n": per[1],
        **_seg(out, slots, opts),
    }


def _seg(out: RegionOutputs, mb, opts: LossOptions) -> dict[str, jax.Array]:
    if not opts.seg_loss:
        return {}
    total, rows = seg_loss_sums(out, mb)
    return {"seg": total, "seg_rows": rows}
