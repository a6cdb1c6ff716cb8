"""Typed inputs and outputs of SAM 2's per-frame step (`SAM2Base.track_step`), and its modes.

Objects are the batch axis of a step. Each row (object) is in one of these modes (an int32
array, so one compiled step serves every mix of prompted and tracked objects):

- `TRACK`    memory-conditioned features, no prompt, multimask + best IoU (a propagated frame);
- `POINTS`   points / box on a frame the object was never tracked on (official
             `is_init_cond_frame`): features + `no_mem_embed`, no memory attention;
- `MASK`     a mask prompt (`_use_mask_as_output`: the mask itself is the output, the SAM
             decoder only supplies the object pointer);
- `CORRECT`  points on an already tracked frame: memory-conditioned features plus the points
             and the frame's previous low-res logits as mask prompt;
- `INACTIVE` a row without an object (streaming slots not yet used): computed, then ignored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pam_jax.sam2.mask_decoder import AllMasks

INACTIVE, TRACK, POINTS, MASK, CORRECT = -1, 0, 1, 2, 3


@struct.dataclass
class FrameFeatures:
    """Backbone outputs of one or B frames, NHWC, float32."""

    vision: jax.Array  # [B, h, w, C] stride-16 features (no no_mem_embed)
    pos: jax.Array  # [B, h, w, C] their sine position encoding
    high_res: tuple[jax.Array, jax.Array]  # conv_s0 / conv_s1: [B, 4h, 4w, C/8], [B, 2h, 2w, C/4]


@struct.dataclass
class StepPrompts:
    """What each of B rows brings to a step.

    mode [B] int32 (TRACK / POINTS / MASK / CORRECT / INACTIVE); multimask [B] bool (the
    official `_use_multimask`: tracked rows and prompts of <= 1 point); coords [B, P, 2]
    model-input pixels, labels [B, P] (-1 padding), valid [B, P] (a row without points holds one
    valid (0, 0) / -1 point, the official placeholder); mask_inputs [B, S, S] float 0 / 1 mask
    prompts (MASK rows); prev_logits [B, 4h, 4w] with has_prev [B]: earlier low-res logits fed
    as mask prompt with new points (CORRECT rows)."""

    mode: jax.Array
    multimask: jax.Array
    coords: jax.Array
    labels: jax.Array
    valid: jax.Array
    mask_inputs: jax.Array | None = None
    prev_logits: jax.Array | None = None
    has_prev: jax.Array | None = None

    @classmethod
    def tracking(cls, b: int) -> StepPrompts:
        """B prompt-less TRACK rows (a propagated frame)."""
        return cls(
            mode=jnp.full((b,), TRACK, jnp.int32),
            multimask=jnp.ones((b,), bool),
            coords=jnp.zeros((b, 1, 2), jnp.float32),
            labels=-jnp.ones((b, 1), jnp.int32),
            valid=jnp.ones((b, 1), bool),
        )

    @classmethod
    def from_padded(cls, padded, mode: np.ndarray, multimask: np.ndarray) -> StepPrompts:
        """From `pam_jax.sam2.prompts.PaddedPrompts` (its mask rows are MASK rows)."""
        return cls(
            mode=mode, multimask=multimask, coords=padded.coords, labels=padded.labels,
            valid=padded.valid, mask_inputs=padded.mask_inputs,
        )  # fmt: skip


@struct.dataclass
class SamHeads:
    """The official `_forward_sam_heads` choices for B rows of one decoder call."""

    low_res_masks: jax.Array  # [B, 4h, 4w] float32, the chosen mask, NO_OBJ_SCORE if absent
    ious: jax.Array  # [B] IoU prediction of the chosen mask
    obj_ptr: jax.Array  # [B, C] float32 (no_obj_ptr blended in for absent objects)
    object_score_logits: jax.Array  # [B, 1] float32
    gated_masks: jax.Array  # [B, M, 4h, 4w] every token's mask, NO_OBJ_SCORE if absent


@struct.dataclass
class StepOutput:
    """One frame for B rows. `decoder` holds every token's raw outputs (what SAM 2's losses
    and PAM's perceiver read); hot inference paths drop it (None) before leaving jit."""

    pred_masks: jax.Array  # [B, 4h, 4w] float32 low-res logits of the chosen mask
    obj_ptr: jax.Array  # [B, C] float32
    object_score_logits: jax.Array  # [B, 1] float32
    ious: jax.Array  # [B] IoU prediction of the chosen mask (1 for mask prompts)
    maskmem_features: jax.Array | None  # [B, h * w, mem_dim] (when encoded)
    decoder: AllMasks | None = None

    def lean(self) -> StepOutput:
        """Without the decoder's per-token outputs (fewer device buffers per call)."""
        return self.replace(decoder=None)
