"""PAM on videos: SAM 2 tracks the region through every frame, PAM's parts read 16 of them.

Each frame is one jitted call of `pam_jax.pam.model.pam_track_step` (the step
`video_regions` scans for training), so frames stream through the device one at a time
whatever the video length; frame 0 is the prompted conditioning frame.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pam_jax.pam import assembly
from pam_jax.pam.model import pam_memory_bank, pam_track_step, region_prompts_step
from pam_jax.prepared import Prepared, merge
from pam_jax.sam2.config import SAM2Config
from pam_jax.sam2.ops import resize_bilinear
from pam_jax.sam2.prompts import pad_regions
from pam_jax.sam2.tracking import StepPrompts
from pam_jax.sam2.video_io import normalize_device, preprocess_frame


@partial(jax.jit, static_argnames=("structure", "is_cond", "video_hw"))
def _video_step(
    structure, leaves, bank, image_u8, prompts: StepPrompts, frame_idx, num_frames, *,
    is_cond: bool, video_hw: tuple[int, int],
):  # fmt: skip
    """One frame of PAM's SAM 2 tracking (one object), plus the video-size mask and the two
    perceiver taps."""
    sam2 = merge(structure, leaves)
    feats = sam2.frame_features(normalize_device(image_u8)[None])
    out, bank = pam_track_step(sam2, feats, prompts, bank, frame_idx, num_frames, is_cond=is_cond)
    video = resize_bilinear(out.pred_masks, video_hw, False, axes=(-2, -1))[0] > 0
    dec = out.decoder
    return (
        bank, video, out.object_score_logits[0, 0], dec.mid_image_embed[0],
        dec.mid_single_tokens[0],
    )  # fmt: skip


@partial(jax.jit, static_argnames=("structure",))
def _video_visual(structure, leaves, embeds, tokens):
    return merge(structure, leaves).video_visual_embeds(embeds, tokens)


@dataclasses.dataclass
class TrackedVideo:
    """SAM 2's pass over one video: visual [1, 5168, H] for the LLM, masks [T, H, W] bool and
    object scores [T] on every frame, and the frame indices the LLM reads."""

    visual: jax.Array
    masks: np.ndarray
    scores: np.ndarray
    frames: np.ndarray


def track_video(
    sam2: Prepared,
    parts: Prepared,
    cfg: SAM2Config,
    frames: Sequence[Any],
    region: Mapping[str, Any],
    num_llm_frames: int = 16,
) -> TrackedVideo:
    """Track `region` (prompted on frame 0; {"box"}, {"points", "labels"} or {"mask"}, original
    pixels) through `frames` with the prepared SAM 2 (config `cfg`) and read the chosen frames
    with the prepared PAM parts (pure: the parameters come with each call)."""
    image_size = cfg.image_size
    if not len(frames):
        raise ValueError("a video needs at least one frame")
    pre = [preprocess_frame(f, image_size) for f in frames]  # PIL resize per frame, as the loader
    h, w = pre[0][1], pre[0][2]
    if any((fh, fw) != (h, w) for _, fh, fw in pre):
        raise ValueError("all frames of a video must have the same size")
    p = pad_regions([region], (h, w), image_size)
    cond = region_prompts_step(
        p.coords, p.labels, p.valid, p.mask_inputs, None if p.mask_inputs is None else p.is_mask
    )
    tracked = StepPrompts.tracking(1)
    n = len(pre)
    chosen = assembly.select_frames(n, num_llm_frames)
    wanted = set(chosen.tolist())
    bank = pam_memory_bank(cfg, 1)
    masks, scores, taps = [], [], {}
    for f, (img, _, _) in enumerate(pre):  # tracking is sequential: one jitted step per frame
        bank, m, s, emb, tok = _video_step(
            sam2.structure, sam2.leaves, bank, img, cond if f == 0 else tracked, np.int32(f),
            np.int32(n), is_cond=f == 0, video_hw=(h, w),
        )  # fmt: skip
        # left on the device so the next frame is queued without a host sync (bool masks at
        # video size: about 2 MB per 1080p frame until the loop ends)
        masks.append(m)
        scores.append(s)
        if f in wanted:
            taps[f] = (emb, tok)
    embeds = jnp.stack([taps[int(f)][0] for f in chosen])
    tokens = jnp.stack([taps[int(f)][1] for f in chosen])
    visual = _video_visual(parts.structure, parts.leaves, embeds, tokens)[None]
    masks_np = np.stack([np.asarray(m) for m in masks])
    return TrackedVideo(visual, masks_np, np.asarray([float(s) for s in scores]), chosen)


def mask_box(mask: np.ndarray) -> list[float] | None:
    """The xyxy bounding box of a bool mask (the streaming notebook's re-prompt box)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
