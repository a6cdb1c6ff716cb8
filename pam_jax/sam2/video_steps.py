"""The video predictor's jitted steps over a prepared model (`pam_jax.prepared`: split and
hashed once), each a call of `SAM2Base`'s one implementation (`frame_features`, `track_step`,
`encode_memory`)."""

from __future__ import annotations

import os
from functools import partial

import jax
import jax.numpy as jnp

from pam_jax.prepared import merge
from pam_jax.sam2.model import SAM2Base
from pam_jax.sam2.ops import resize_bilinear
from pam_jax.sam2.tracking import FrameFeatures, StepOutput, StepPrompts
from pam_jax.sam2.video_io import normalize_device
from pam_jax.sam2.video_state import BankSlots, FrameOutput

# Frames whose image features `propagate_in_video` computes in one batched encoder call ahead of
# tracking them (the encoder does not depend on memory; at batch 8 Hiera-L runs 1.7x the images/s
# of batch 1 on an H200). 1 = one frame per step, backbone and tracking in one call. 8 measured
# 54.3 vs 48.8 frames/s at 16 frames of 720p, Hiera-L, side by side on the H200
# (`benchmarks/bench_sam2_video.py --prefetch 1,8`); $PAM_JAX_VIDEO_PREFETCH overrides it.
DEFAULT_PREFETCH = 8

# ---------------------------------------------------------------------------------------------
# jitted kernels over a prepared model (pam_jax.prepared: split and hashed once)


@partial(jax.jit, static_argnums=(0,))
def _features(structure, leaves, images_u8: jax.Array) -> FrameFeatures:
    """uint8 frames [N, S, S, 3] -> their features (N = 1, or a prefetched run of frames)."""
    return merge(structure, leaves).frame_features(normalize_device(images_u8))


@partial(jax.jit, static_argnames=("structure",))
def _prompt_step(
    structure, leaves, feats: FrameFeatures, prompts: StepPrompts, slots: BankSlots | None,
    frame_idx, num_frames, reverse,
) -> StepOutput:  # fmt: skip
    """A prompted frame (points, box, mask or correction) for the given objects."""
    model = merge(structure, leaves)
    bank = None if slots is None else slots.to_bank()
    return model.track_step(feats, prompts, bank, frame_idx, num_frames, reverse).lean()


def _track(
    model: SAM2Base, feats: FrameFeatures, slots: BankSlots, frame_idx, num_frames, reverse
) -> StepOutput:
    """Memory-conditioned tracking of all objects on one frame. The video-res masks are
    `_video_res`'s (its own small program): videos of every size share the tracking step."""
    prompts = StepPrompts.tracking(slots.cond.frames.shape[0])
    return model.track_step(
        feats, prompts, slots.to_bank(), frame_idx, num_frames, reverse, encode=True
    ).lean()


@partial(jax.jit, static_argnames=("structure",))
def _propagate_step(
    structure, leaves, image_u8, slots: BankSlots, frame_idx, num_frames, reverse
) -> StepOutput:
    """Backbone + tracking of one frame, one call (`prefetch=1`)."""
    model = merge(structure, leaves)
    feats = model.frame_features(normalize_device(image_u8)[None])
    return _track(model, feats, slots, frame_idx, num_frames, reverse)


@partial(jax.jit, static_argnames=("structure",))
def _propagate_prefetched(
    structure, leaves, feats: FrameFeatures, j, slots: BankSlots, frame_idx, num_frames, reverse
) -> StepOutput:
    """Tracking of frame `j` of features computed ahead for a run of frames (`prefetch>1`)."""
    one = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, j, 1), feats)
    return _track(merge(structure, leaves), one, slots, frame_idx, num_frames, reverse)


@partial(jax.jit, static_argnums=(0,))
def _encode_memory(structure, leaves, vision, pred_masks, scores, binarize) -> jax.Array:
    return merge(structure, leaves).encode_memory(vision, pred_masks, scores, binarize)


@partial(jax.jit, static_argnames=("video_hw",))
def _video_res(pred_masks: jax.Array, *, video_hw: tuple[int, int]) -> jax.Array:
    """Low-res logits [O, 4h, 4w] -> [O, H, W] (official `_get_orig_video_res_output`)."""
    return resize_bilinear(pred_masks.astype(jnp.float32), video_hw, False, axes=(-2, -1))


def _frame_output(out: StepOutput, i: int = 0) -> FrameOutput:
    return FrameOutput(out.pred_masks[i], out.obj_ptr[i], out.object_score_logits[i])


def _prefetch_frames(prefetch: int | None) -> int:
    """The `prefetch` argument, else $PAM_JAX_VIDEO_PREFETCH, else `DEFAULT_PREFETCH`."""
    raw = prefetch if prefetch is not None else os.environ.get("PAM_JAX_VIDEO_PREFETCH")
    if raw is None:
        return DEFAULT_PREFETCH
    try:
        k = int(str(raw).strip())
    except ValueError:
        k = 0
    if k < 1:
        raise ValueError(f"video prefetch must be a whole number of frames >= 1, got {raw!r}")
    return k
