"""SAM 2 video predictor (official `SAM2VideoPredictor` API and semantics).

    predictor = SAM2VideoPredictor(model)
    state = predictor.init_state("frames_dir_or.mp4")
    predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, points=[[x, y]], labels=[1])
    predictor.add_new_points_or_box(state, frame_idx=0, obj_id=2, box=[x1, y1, x2, y2])
    for frame_idx, obj_ids, logits in predictor.propagate_in_video(state):
        ...  # logits [O, H, W] float32 at video resolution, objects in insertion order

What is reproduced (see `sam2_video_predictor.py` / `sam2_base.py` of sam2 1.1.0):
- per-object independent inference (objects are a batch axis of one jitted step, which gives the
  same numbers as the official one-object-at-a-time loop);
- prompted frames are conditioning frames: init frames use `feat + no_mem_embed` and no memory,
  multimask when <= 1 point; clicks on an already tracked frame refine with memory and with the
  frame's previous logits as mask prompt (official `prev_sam_mask_logits`); masks go through
  `_use_mask_as_output`;
- the preflight consolidation encodes prompted frames' memories from their binarized low-res
  logits; tracking attends to every conditioning frame, the <= 6 previous non-conditioning
  memories (stride 1) and <= 16 object pointers (conditioning ones only from the past in
  tracking direction); `t_diff_max = min(num_frames, 16) - 1`; memory features are stored in
  bfloat16; masks are upsampled bilinearly to video resolution;
- forward and reverse propagation, `start_frame_idx`, `max_frame_num_to_track`;
- `clear_all_prompts_in_frame` (a conditioning output becomes a non-conditioning memory) and
  `remove_object` (the remaining objects keep their outputs and memories).

Not applied: `fill_hole_area` (hole filling needs the official CUDA extension `sam2._C`; the
official CPU build skips it with a warning, so results here equal the official CPU results),
`non_overlap_masks` (off by default officially).

Every frame step is `SAM2Base.track_step` (the same code the streaming tracker and PAM run).
The predictor keeps every frame's outputs (as the official one does, typed state in
`video_state`) and builds, for each frame, a fixed-size memory bank of exactly the frames the
official code would look up (`BankSlots`). `StreamingTracker` (`pam_jax.sam2.streaming`,
re-exported here) keeps a fixed-capacity ring buffer instead.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np

from pam_jax.prepared import prepare
from pam_jax.sam2.common import pow2_bucket
from pam_jax.sam2.model import NO_OBJ_SCORE, SAM2Base
from pam_jax.sam2.prompts import (
    EDGE_TOLERANCE,
    Prompt,
    PromptError,
    make_prompt,
    mask_to_model,
    pad_prompts,
    to_model_coords,
)
from pam_jax.sam2.streaming import StreamingTracker
from pam_jax.sam2.tracking import CORRECT, MASK, POINTS, FrameFeatures, StepPrompts
from pam_jax.sam2.video_io import VideoFrames, load_video_frames
from pam_jax.sam2.video_state import (
    FrameOutput,
    FrameRows,
    InferenceState,
    MemoryLookup,
    ObjectState,
)
from pam_jax.sam2.video_steps import (
    _encode_memory,
    _features,
    _frame_output,
    _prefetch_frames,
    _prompt_step,
    _propagate_prefetched,
    _propagate_step,
    _video_res,
)

__all__ = ["InferenceState", "SAM2VideoPredictor", "StreamingTracker"]

# ---------------------------------------------------------------------------------------------
# offline predictor


class SAM2VideoPredictor:
    """Official-compatible video predictor over a pam-jax `SAM2Base` (see the module docstring).

    `num_recent` / `num_ptrs` are fixed by the official eval settings (num_maskmem - 1 = 6 memories,
    max_obj_ptrs_in_encoder - 1 = 15 non-conditioning pointers, temporal stride 1). The model's
    parameters are read at construction; `set_model` points the predictor at new ones.
    `prefetch` > 1: `propagate_in_video` encodes that many upcoming frames in one batched call
    (default `video_steps.DEFAULT_PREFETCH`, or $PAM_JAX_VIDEO_PREFETCH); the results are the same.
    """

    def __init__(self, model: SAM2Base, prefetch: int | None = None):
        self.config = model.config
        self.image_size = model.image_size
        self.prefetch = _prefetch_frames(prefetch)
        self.set_model(model)
        cfg = self.config
        self.num_recent = cfg.num_maskmem - 1
        self.num_ptrs = cfg.max_obj_ptrs_in_encoder - 1
        self._lookup = MemoryLookup(cfg, self.num_recent, self.num_ptrs)

    def set_model(self, model: SAM2Base) -> None:
        """Run on `model`'s current parameters (e.g. a live training state) from now on."""
        self.model = model
        self._prep = prepare(model)

    # -- state ----------------------------------------------------------------------------------

    def init_state(self, video: str | os.PathLike | VideoFrames) -> InferenceState:
        """Load a JPEG folder or an MP4 (or take preloaded `VideoFrames`)."""
        frames = (
            video if isinstance(video, VideoFrames) else load_video_frames(video, self.image_size)
        )
        if frames.image_size != self.image_size:
            raise ValueError(f"frames are {frames.image_size}px, the model {self.image_size}px")
        return InferenceState(frames, len(frames), frames.video_height, frames.video_width)

    def reset_state(self, state: InferenceState) -> None:
        fresh = InferenceState(
            state.images, state.num_frames, state.video_height, state.video_width
        )
        for f in dataclasses.fields(fresh):
            setattr(state, f.name, getattr(fresh, f.name))

    def _obj_idx(self, state: InferenceState, obj_id: Any) -> int:
        idx = state.index(obj_id)
        if idx is None:
            idx = len(state.objects)
            state.objects.append(ObjectState(obj_id))
        return idx

    def _check_frame(self, state: InferenceState, frame_idx: int) -> int:
        f = int(frame_idx)
        if f != frame_idx or not 0 <= f < state.num_frames:
            raise ValueError(
                f"frame_idx {frame_idx} is outside the video (frames 0..{state.num_frames - 1})"
            )
        return f

    def _features(self, state: InferenceState, frame_idx: int) -> FrameFeatures:
        feats = state.cached_features.get(frame_idx)
        if feats is None:
            p = self._prep
            feats = _features(p.structure, p.leaves, state.images.frames_u8[frame_idx][None])
            state.cached_features = {frame_idx: feats}  # the most recent frame, as official
        return feats

    # -- prompts --------------------------------------------------------------------------------

    def _run_prompt(
        self, state: InferenceState, f: int, o: int, prompts: StepPrompts, is_init: bool,
        use_memory: bool,
    ) -> tuple[int, list[Any], np.ndarray]:  # fmt: skip
        """One prompted step for object o on frame f, kept as a temporary output."""
        obj = state.objects[o]
        reverse = obj.frames_tracked.get(f, False)
        slots = self._lookup.slots(state, [o], f, reverse) if use_memory else None
        out = _prompt_step(
            self._prep.structure, self._prep.leaves, self._features(state, f), prompts, slots,
            np.int32(f), np.int32(state.num_frames), np.bool_(reverse),
        )  # fmt: skip
        obj.temp(is_init)[f] = _frame_output(out)
        return f, state.obj_ids, self._consolidated(state, f, is_init)

    def add_new_points_or_box(
        self,
        state: InferenceState,
        frame_idx: int,
        obj_id: Any,
        points: Any = None,
        labels: Any = None,
        clear_old_points: bool = True,
        normalize_coords: bool = True,
        box: Any = None,
    ) -> tuple[int, list[Any], np.ndarray]:
        """Official `add_new_points_or_box`: points [n, 2] (x, y) video pixels (or [0, 1] with
        normalize_coords=False) with labels [n] (1 positive, 0 negative) and / or a box
        [x1, y1, x2, y2] (`pam_jax.sam2.prompts` rules). Returns (frame_idx, obj_ids,
        video-res logits [O, H, W]) of every object on this frame."""
        f = self._check_frame(state, frame_idx)
        if points is None and box is None:
            raise PromptError("at least one of points or box must be provided as input")
        if box is not None and not clear_old_points:
            raise PromptError(
                "cannot add box without clearing old points, since box prompt must be "
                "provided before any point prompt (please use clear_old_points=True instead)"
            )
        h, w = state.video_height, state.video_width
        hw, tol = ((h, w), EDGE_TOLERANCE) if normalize_coords else ((1, 1), 1.0 / max(h, w))
        prompt = make_prompt(points, labels, box, image_hw=hw, tolerance=tol)
        pts, labs = to_model_coords(prompt, hw, self.image_size), prompt.labels

        o = self._obj_idx(state, obj_id)
        obj = state.objects[o]
        old = obj.point_inputs.get(f) if not clear_old_points else None
        if old is not None:
            pts, labs = np.concatenate([old.points, pts]), np.concatenate([old.labels, labs])
        obj.point_inputs[f] = Prompt(pts, labs)
        obj.mask_inputs.pop(f, None)
        is_init = f not in obj.frames_tracked
        prev = state.output(o, is_init, f)

        padded = pad_prompts([obj.point_inputs[f]], bucket=pow2_bucket(len(labs), lo=4))
        lr = self.config.low_res_size
        prev_logits = np.zeros((1, lr, lr), np.float32)
        if prev is not None:
            prev_logits = jnp.clip(prev.pred_masks, -32.0, 32.0)[None]
        prompts = StepPrompts(
            mode=np.array([POINTS if is_init else CORRECT], np.int32),
            multimask=np.array([len(labs) <= 1]),
            coords=padded.coords, labels=padded.labels, valid=padded.valid,
            prev_logits=prev_logits, has_prev=np.array([prev is not None]),
        )  # fmt: skip
        return self._run_prompt(state, f, o, prompts, is_init, use_memory=not is_init)

    def add_new_mask(
        self, state: InferenceState, frame_idx: int, obj_id: Any, mask: Any
    ) -> tuple[int, list[Any], np.ndarray]:
        """Official `add_new_mask`: mask [H, W] (bool or 0/1) at any size (resized to the model
        size with antialiased bilinear and thresholded at 0.5 when different)."""
        f = self._check_frame(state, frame_idx)
        m = np.asarray(mask)
        if m.ndim != 2:
            raise PromptError(f"mask must be 2-D [H, W], got shape {m.shape}")
        m = mask_to_model(m, self.image_size)
        o = self._obj_idx(state, obj_id)
        obj = state.objects[o]
        obj.mask_inputs[f] = m
        obj.point_inputs.pop(f, None)
        is_init = f not in obj.frames_tracked
        padded = pad_prompts([Prompt(np.zeros((0, 2), np.float32), np.zeros(0, np.int32), m)])
        prompts = StepPrompts.from_padded(padded, np.array([MASK], np.int32), np.array([False]))
        # a mask prompt never reads memory (official: `_use_mask_as_output` on the raw features)
        return self._run_prompt(state, f, o, prompts, is_init, use_memory=False)

    def _consolidated(self, state: InferenceState, f: int, is_cond: bool) -> np.ndarray:
        """Every object's logits on frame f at video resolution (NO_OBJ_SCORE if none)."""
        lr = self.config.low_res_size
        rows = []
        for o in range(len(state.objects)):
            out = state.output(o, is_cond, f)
            rows.append(out.pred_masks if out is not None else jnp.full((lr, lr), NO_OBJ_SCORE))
        hw = (state.video_height, state.video_width)
        return np.asarray(_video_res(jnp.stack(rows), video_hw=hw))

    # -- removing prompts and objects -------------------------------------------------------------

    def clear_all_prompts_in_frame(
        self, state: InferenceState, frame_idx: int, obj_id: Any, need_output: bool = True
    ) -> tuple[int, list[Any], np.ndarray] | None:
        """Official `clear_all_prompts_in_frame`: drop `obj_id`'s points / mask on this frame.
        A conditioning output there becomes a non-conditioning one (it stays in memory, as
        official). Returns (frame_idx, obj_ids, video-res logits [O, H, W]) unless
        `need_output` is False. Unlike official, an unknown `obj_id` is an error (official
        would register it as a new object)."""
        f = self._check_frame(state, frame_idx)
        o = state.index(obj_id)
        if o is None:
            raise ValueError(f"unknown object id {obj_id!r}; the objects are {state.obj_ids}")
        obj = state.objects[o]
        for d in (obj.point_inputs, obj.mask_inputs, obj.temp_cond, obj.temp_non_cond):
            d.pop(f, None)
        out = obj.cond.pop(f, None)
        if out is not None:  # downgraded: frames tracked from it keep reading its memory
            self._set_non_cond_row(state, f, o, out)
            obj.frames_tracked.pop(f, None)
            state.cond_cache.clear()  # keyed by id() of the outputs: never reuse a freed one
        if not need_output:
            return None
        return f, state.obj_ids, self._consolidated(state, f, state.temp_is_cond(f))

    def remove_object(
        self, state: InferenceState, obj_id: Any, strict: bool = False, need_output: bool = True
    ) -> tuple[list[Any], list[tuple[int, np.ndarray]]]:
        """Official `remove_object`: forget `obj_id` (its prompts, outputs and memories).
        Returns (remaining obj_ids, [(frame_idx, video-res logits [O, H, W])] for the frames
        where it had prompts, which may now show other objects it occluded). Removing the last
        object resets the state. An unknown id returns unchanged, or raises with `strict`."""
        o = state.index(obj_id)
        if o is None:
            if strict:  # RuntimeError as official, so ported code catches it
                raise RuntimeError(
                    f"cannot remove object id {obj_id!r}: the objects are {state.obj_ids}"
                )
            return state.obj_ids, []
        if len(state.objects) == 1:
            self.reset_state(state)
            return [], []
        frames = state.objects[o].prompted_frames
        for f in frames:  # first, as official: this may downgrade conditioning frames
            self.clear_all_prompts_in_frame(state, f, obj_id, need_output=False)
        del state.objects[o]
        state.non_cond = {f: rows.without(o) for f, rows in state.non_cond.items()}
        state.cond_cache.clear()  # keyed by object index
        if not need_output:
            return state.obj_ids, []
        updated = [(f, self._consolidated(state, f, state.temp_is_cond(f))) for f in frames]
        return state.obj_ids, updated

    # -- propagation ----------------------------------------------------------------------------

    def propagate_in_video_preflight(self, state: InferenceState) -> None:
        """Encode the memories of the newly prompted frames and merge them into the outputs."""
        if not state.objects:
            raise ValueError(
                "no input points or masks are provided for any object; add inputs first"
            )
        for o, obj in enumerate(state.objects):
            for is_cond in (False, True):
                temp = obj.temp(is_cond)
                for f, out in temp.items():
                    if out.mem is None:
                        feats = self._features(state, f)
                        out.mem = _encode_memory(
                            self._prep.structure, self._prep.leaves, feats.vision,
                            out.pred_masks[None], out.score[None], np.array([True]),
                        )[0]  # fmt: skip
                    if is_cond:
                        obj.cond[f] = out
                    else:
                        self._set_non_cond_row(state, f, o, out)
                temp.clear()
            if not obj.cond:
                raise ValueError(
                    f"no input points or masks are provided for object id {obj.obj_id}; "
                    "add inputs first"
                )
            for f in obj.cond:
                rows = state.non_cond.get(f)
                if rows is not None and o < len(rows.valid):
                    rows.valid = rows.valid.copy()
                    rows.valid[o] = False

    def _set_non_cond_row(self, state: InferenceState, f: int, o: int, out: FrameOutput) -> None:
        n = len(state.objects)
        rows = state.non_cond.get(f)
        if rows is None:
            rows = FrameRows(
                jnp.zeros((n,) + out.pred_masks.shape, jnp.float32),
                jnp.zeros((n,) + out.obj_ptr.shape, jnp.float32),
                jnp.zeros((n, 1), jnp.float32),
                jnp.zeros((n,) + out.mem.shape, jnp.bfloat16),
                np.zeros(n, bool),
            )
        rows = rows.padded(n)
        vals = (out.pred_masks, out.obj_ptr, out.score, out.mem)
        new = {
            name: getattr(rows, name).at[o].set(val.astype(getattr(rows, name).dtype))
            for name, val in zip(FrameRows.FIELDS, vals)
        }
        valid = rows.valid.copy()
        valid[o] = True
        state.non_cond[f] = FrameRows(**new, valid=valid)

    def propagate_in_video(
        self,
        state: InferenceState,
        start_frame_idx: int | None = None,
        max_frame_num_to_track: int | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[int, list[Any], np.ndarray]]:
        """Official `propagate_in_video`: yields (frame_idx, obj_ids, logits [O, H, W])."""
        self.propagate_in_video_preflight(state)
        obj_ids = state.obj_ids
        objs = state.objects
        n, num_frames = len(objs), state.num_frames
        if start_frame_idx is None:
            start_frame_idx = min(t for obj in objs for t in obj.cond)
        start_frame_idx = self._check_frame(state, start_frame_idx)
        if max_frame_num_to_track is None:
            max_frame_num_to_track = num_frames
        if reverse:
            end = max(start_frame_idx - max_frame_num_to_track, 0)
            order = range(start_frame_idx, end - 1, -1) if start_frame_idx > 0 else range(0)
        else:
            end = min(start_frame_idx + max_frame_num_to_track, num_frames - 1)
            order = range(start_frame_idx, end + 1)
        hw = (state.video_height, state.video_width)
        all_objs = list(range(n))
        p = self._prep
        ahead: dict[int, int] = {}  # frame -> its row in `feats`, the prefetched features
        feats = None
        for i, f in enumerate(order):
            is_cond = np.array([f in obj.cond for obj in objs])
            if is_cond.all():
                video = _video_res(jnp.stack([obj.cond[f].pred_masks for obj in objs]), video_hw=hw)
            else:
                slots = self._lookup.slots(state, all_objs, f, reverse)
                step = (np.int32(f), np.int32(num_frames), np.bool_(reverse))
                if self.prefetch == 1:
                    out = _propagate_step(
                        p.structure, p.leaves, state.images.frames_u8[f], slots, *step
                    )
                else:
                    if f not in ahead:
                        ahead, feats = self._prefetch(state, order[i:]), None
                        rows = list(ahead) + [f] * (pow2_bucket(len(ahead)) - len(ahead))
                        feats = _features(p.structure, p.leaves, state.images.frames_u8[rows])
                    out = _propagate_prefetched(
                        p.structure, p.leaves, feats, np.int32(ahead[f]), slots, *step
                    )
                state.non_cond[f] = FrameRows(
                    out.pred_masks, out.obj_ptr, out.object_score_logits, out.maskmem_features,
                    ~is_cond,
                )  # fmt: skip
                pred = out.pred_masks
                if is_cond.any():
                    pred = jnp.stack([
                        objs[o].cond[f].pred_masks if is_cond[o] else out.pred_masks[o]
                        for o in all_objs
                    ])  # fmt: skip
                video = _video_res(pred, video_hw=hw)
            for obj in objs:
                obj.frames_tracked[f] = reverse
            yield f, obj_ids, np.asarray(video)

    def _prefetch(self, state: InferenceState, upcoming: range) -> dict[int, int]:
        """The next `prefetch` frames of `upcoming` that need a step (not conditioning for every
        object), as {frame: row}; padded by the caller to a power of two (few compiled shapes)."""
        ahead: dict[int, int] = {}
        for g in upcoming:
            if not all(g in obj.cond for obj in state.objects):
                ahead[g] = len(ahead)
                if len(ahead) == self.prefetch:
                    break
        return ahead

    def get_object_scores(self, state: InferenceState, frame_idx: int) -> np.ndarray:
        """Object score logits [O] on a tracked or prompted frame (NaN where unknown)."""
        res = np.full(len(state.objects), np.nan, np.float32)
        for o in range(len(state.objects)):
            for is_cond in (True, False):
                out = state.output(o, is_cond, frame_idx)
                if out is not None:
                    res[o] = float(np.asarray(out.score).reshape(-1)[0])
                    break
        return res
