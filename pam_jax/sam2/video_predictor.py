"""SAM 2 video predictor (official `SAM2VideoPredictor` API and semantics) and a streaming tracker.

Offline, official-API-shaped::

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

The offline predictor keeps every frame's outputs (as the official one does) and builds, for each
frame, a fixed-size memory bank of exactly the frames the official code would look up. The
`StreamingTracker` instead keeps a fixed-capacity ring-buffer bank (`pam_jax.sam2.memory`), so
memory use is bounded whatever the video length and one jitted step (compiled once) handles
every frame.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pam_jax.prepared import merge, prepare
from pam_jax.sam2.common import pow2_bucket
from pam_jax.sam2.memory import MemoryBank, init_memory_bank, insert_memory
from pam_jax.sam2.model import NO_OBJ_SCORE, SAM2Base
from pam_jax.sam2.ops import resize_bilinear
from pam_jax.sam2.tracker import (
    CORRECT,
    INACTIVE,
    MASK,
    POINTS,
    TRACK,
    FrameFeatures,
    StepOutput,
    encode_memory,
    frame_features,
    point_rows,
    track_step,
)
from pam_jax.sam2.video_io import (
    VideoFrames,
    load_video_frames,
    normalize_device,
    preprocess_frame,
)

# ---------------------------------------------------------------------------------------------
# jitted kernels over a prepared model (pam_jax.prepared: split and hashed once)


@partial(jax.jit, static_argnums=(0,))
def _features(structure, leaves, image_u8: jax.Array) -> FrameFeatures:
    return frame_features(merge(structure, leaves), normalize_device(image_u8)[None])


def _bank_from_parts(parts: dict[str, Any]) -> MemoryBank:
    """A MemoryBank holding exactly the looked-up frames (offline predictor)."""
    cf = parts["cond_frames"]
    b, kc = cf.shape
    rf = jnp.broadcast_to(parts["recent_frames"][None], (b, parts["recent_frames"].shape[0]))
    pf = jnp.broadcast_to(parts["ptr_frames"][None], (b, parts["ptr_frames"].shape[0]))
    z = partial(jnp.zeros, dtype=jnp.int32)
    return MemoryBank(
        cond_feats=parts["cond_feats"],
        cond_ptrs=parts["cond_ptrs"],
        cond_frames=cf,
        cond_valid=parts["cond_valid"],
        cond_stamp=z((b, kc)),
        recent_feats=jnp.stack(parts["recent_feats"], axis=1),
        recent_frames=rf,
        recent_valid=parts["recent_valid"],
        recent_stamp=z(rf.shape),
        ptrs=jnp.stack(parts["ptrs"], axis=1),
        ptr_frames=pf,
        ptr_valid=parts["ptr_valid"],
        ptr_stamp=z(pf.shape),
        mem_pos=parts["mem_pos"],
        step=z(()),
    )


@partial(jax.jit, static_argnames=("structure", "encode"))
def _step(
    structure, leaves, feats, mode, multimask, coords, labels, valid, parts, frame_idx,
    num_frames, reverse, mask_inputs, prev_logits, has_prev, *, encode: bool,
) -> StepOutput:  # fmt: skip
    model = merge(structure, leaves)
    bank = _bank_from_parts(parts) if parts is not None else None
    return track_step(
        model, feats, mode, multimask, coords, labels, valid, bank, frame_idx, num_frames,
        reverse, mask_inputs, prev_logits, has_prev, encode=encode,
    )  # fmt: skip


@partial(jax.jit, static_argnames=("structure", "video_hw"))
def _propagate_step(
    structure, leaves, image_u8, parts, frame_idx, num_frames, reverse, *, video_hw
) -> tuple[StepOutput, jax.Array]:
    """Backbone + memory-conditioned tracking of all objects + video-res masks, one call."""
    model = merge(structure, leaves)
    feats = frame_features(model, normalize_device(image_u8)[None])
    bank = _bank_from_parts(parts)
    b = parts["cond_frames"].shape[0]
    coords = jnp.zeros((b, 1, 2), jnp.float32)
    labels = -jnp.ones((b, 1), jnp.int32)
    valid = jnp.ones((b, 1), bool)
    mode = jnp.full((b,), TRACK, jnp.int32)
    out = track_step(
        model, feats, mode, jnp.ones((b,), bool), coords, labels, valid, bank, frame_idx,
        num_frames, reverse, encode=True,
    )  # fmt: skip
    return out, resize_bilinear(out.pred_masks, video_hw, False, axes=(-2, -1))


@partial(jax.jit, static_argnums=(0,))
def _encode_memory(structure, leaves, vision, pred_masks, scores, binarize) -> jax.Array:
    return encode_memory(merge(structure, leaves), vision, pred_masks, scores, binarize)


@partial(jax.jit, static_argnames=("video_hw",))
def _video_res(pred_masks: jax.Array, *, video_hw: tuple[int, int]) -> jax.Array:
    """Low-res logits [O, 4h, 4w] -> [O, H, W] (official `_get_orig_video_res_output`)."""
    return resize_bilinear(pred_masks.astype(jnp.float32), video_hw, False, axes=(-2, -1))


# ---------------------------------------------------------------------------------------------
# offline predictor


@dataclasses.dataclass
class _Out:
    """One object's output on one frame (the official compact `current_out`)."""

    pred_masks: jax.Array  # [4h, 4w] float32
    obj_ptr: jax.Array  # [C]
    score: jax.Array  # [1]
    mem: jax.Array | None = None  # [h * w, mem_dim] bfloat16


@dataclasses.dataclass
class _NonCond:
    """Every object's non-conditioning output on one frame (rows valid where `valid`)."""

    pred_masks: jax.Array  # [O, 4h, 4w]
    obj_ptr: jax.Array  # [O, C]
    score: jax.Array  # [O, 1]
    mem: jax.Array  # [O, h * w, mem_dim] bfloat16
    valid: np.ndarray  # [O] bool


@dataclasses.dataclass
class InferenceState:
    """The official `inference_state`, restricted to what inference reads."""

    images: VideoFrames
    num_frames: int
    video_height: int
    video_width: int
    obj_id_to_idx: dict[Any, int] = dataclasses.field(default_factory=dict)
    obj_ids: list[Any] = dataclasses.field(default_factory=list)
    point_inputs: list[dict[int, tuple[np.ndarray, np.ndarray]]] = dataclasses.field(
        default_factory=list
    )
    mask_inputs: list[dict[int, np.ndarray]] = dataclasses.field(default_factory=list)
    cond: list[dict[int, _Out]] = dataclasses.field(default_factory=list)
    temp: list[dict[str, dict[int, _Out]]] = dataclasses.field(default_factory=list)
    non_cond: dict[int, _NonCond] = dataclasses.field(default_factory=dict)
    frames_tracked: list[dict[int, bool]] = dataclasses.field(default_factory=list)
    cached_features: dict[int, FrameFeatures] = dataclasses.field(default_factory=dict)
    cond_cache: dict[tuple, tuple] = dataclasses.field(default_factory=dict)


class SAM2VideoPredictor:
    """Official-compatible video predictor over a pam-jax `SAM2Base` (see the module docstring).

    `num_recent` / `num_ptrs` are fixed by the official eval settings (num_maskmem - 1 = 6 memories,
    max_obj_ptrs_in_encoder - 1 = 15 non-conditioning pointers, temporal stride 1).
    """

    def __init__(self, model: SAM2Base):
        self.model = model
        self.config = model.config
        self.image_size = model.image_size
        self._prep = prepare(model)
        cfg = self.config
        self.num_recent = cfg.num_maskmem - 1
        self.num_ptrs = cfg.max_obj_ptrs_in_encoder - 1
        self._mem_pos = init_memory_bank(cfg, 1, num_cond=1).mem_pos
        self._zeros: dict[tuple, jax.Array] = {}

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
        idx = state.obj_id_to_idx.get(obj_id)
        if idx is not None:
            return idx
        idx = len(state.obj_ids)
        state.obj_id_to_idx[obj_id] = idx
        state.obj_ids.append(obj_id)
        state.point_inputs.append({})
        state.mask_inputs.append({})
        state.cond.append({})
        state.temp.append({"cond": {}, "non_cond": {}})
        state.frames_tracked.append({})
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
            feats = _features(p.structure, p.leaves, state.images.frames_u8[frame_idx])
            state.cached_features = {frame_idx: feats}  # the most recent frame, as official
        return feats

    def _zeros_like(self, shape: tuple[int, ...], dtype) -> jax.Array:
        key = (shape, jnp.dtype(dtype).name)
        if key not in self._zeros:
            self._zeros[key] = jnp.zeros(shape, dtype)
        return self._zeros[key]

    # -- memory lookup ---------------------------------------------------------------------------

    def _nc_rows(
        self, nc: _NonCond | None, n_obj: int, field: str
    ) -> tuple[jax.Array | None, np.ndarray]:
        """A frame's non-cond `field` padded to n_obj rows, and its validity."""
        if nc is None:
            return None, np.zeros(n_obj, bool)
        arr, valid = getattr(nc, field), nc.valid
        if arr.shape[0] < n_obj:  # objects added after this frame was tracked
            pad = jnp.zeros((n_obj - arr.shape[0],) + arr.shape[1:], arr.dtype)
            arr = jnp.concatenate([arr, pad])
            valid = np.concatenate([valid, np.zeros(n_obj - len(valid), bool)])
        return arr, valid

    def _cond_parts(self, state: InferenceState, objs: Sequence[int]):
        """Conditioning memories of `objs` as [B, Kc, ...] arrays (cached until they change)."""
        key = tuple(
            (o, tuple((t, id(out)) for t, out in sorted(state.cond[o].items()))) for o in objs
        )
        hit = state.cond_cache.get(key)
        if hit is not None:
            return hit
        cfg = self.config
        b, hw, c, d = len(objs), cfg.feat_size**2, cfg.mem_dim, cfg.d_model
        kc = pow2_bucket(max(len(state.cond[o]) for o in objs))
        cond_frames = np.zeros((b, kc), np.int32)
        cond_valid = np.zeros((b, kc), bool)
        cf = jnp.zeros((b, kc, hw, c), jnp.bfloat16)
        cp = jnp.zeros((b, kc, d), jnp.float32)
        idx, feats, ptrs = [], [], []
        for i, o in enumerate(objs):
            for k, (t, out) in enumerate(sorted(state.cond[o].items())):
                idx.append((i, k))
                feats.append(out.mem)
                ptrs.append(out.obj_ptr)
                cond_frames[i, k], cond_valid[i, k] = t, True
        if idx:
            ii, kk = (np.array(v) for v in zip(*idx))
            cf = cf.at[ii, kk].set(jnp.stack(feats).astype(jnp.bfloat16))
            cp = cp.at[ii, kk].set(jnp.stack(ptrs).astype(jnp.float32))
        state.cond_cache = {key: (cf, cp, cond_frames, cond_valid)}
        return state.cond_cache[key]

    def _bank_parts(
        self, state: InferenceState, objs: Sequence[int], frame_idx: int, reverse: bool
    ) -> dict[str, Any]:
        """The memories the official `_prepare_memory_conditioned_features` would read for the
        objects `objs` at `frame_idx` (static slot counts; missing ones marked invalid)."""
        cfg = self.config
        n_all = len(state.obj_ids)
        b = len(objs)
        hw, c, d = cfg.feat_size**2, cfg.mem_dim, cfg.d_model
        cf, cp, cond_frames, cond_valid = self._cond_parts(state, objs)
        sign = -1 if reverse else 1
        objs_a = np.asarray(objs)

        def gather(n: int, field: str, shape: tuple[int, ...], dtype):
            arrs, frames, valid = [], np.zeros(n, np.int32), np.zeros((b, n), bool)
            for k in range(n):
                t = frame_idx - sign * (k + 1)
                frames[k] = t
                arr, v = self._nc_rows(state.non_cond.get(t), n_all, field)
                if arr is None:
                    arrs.append(self._zeros_like((b,) + shape, dtype))
                else:
                    arrs.append(arr if b == n_all else arr[objs_a])
                    valid[:, k] = v[objs_a]
            return tuple(arrs), frames, valid

        recent, rf, rv = gather(self.num_recent, "mem", (hw, c), jnp.bfloat16)
        ptrs, pf, pv = gather(self.num_ptrs, "obj_ptr", (d,), jnp.float32)
        return {
            "cond_feats": cf, "cond_ptrs": cp, "cond_frames": cond_frames,
            "cond_valid": cond_valid, "recent_feats": recent, "recent_frames": rf,
            "recent_valid": rv, "ptrs": ptrs, "ptr_frames": pf, "ptr_valid": pv,
            "mem_pos": self._mem_pos,
        }  # fmt: skip

    # -- prompts --------------------------------------------------------------------------------

    def _prev_out(self, state: InferenceState, o: int, key: str, frame_idx: int) -> _Out | None:
        out = state.temp[o][key].get(frame_idx)
        if out is None:
            out = state.cond[o].get(frame_idx)
        if out is None:
            nc = state.non_cond.get(frame_idx)
            if nc is not None and o < len(nc.valid) and nc.valid[o]:
                out = _Out(nc.pred_masks[o], nc.obj_ptr[o], nc.score[o], nc.mem[o])
        return out

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
        """Official `add_new_points_or_box`: points [n, 2] (x, y) video pixels with labels [n]
        (1 positive, 0 negative) and / or a box [x1, y1, x2, y2]. Returns (frame_idx, obj_ids,
        video-res logits [O, H, W]) of every object on this frame."""
        f = self._check_frame(state, frame_idx)
        if (points is None) != (labels is None):
            raise ValueError("points and labels must be provided together")
        if points is None and box is None:
            raise ValueError("at least one of points or box must be provided as input")
        h, w = state.video_height, state.video_width
        pts = np.zeros((0, 2), np.float32) if points is None else np.asarray(points, np.float32)
        labs = np.zeros((0,), np.int32) if labels is None else np.asarray(labels, np.int32)
        pts, labs = pts.reshape(-1, 2), labs.reshape(-1)
        if len(pts) != len(labs):
            raise ValueError(f"{len(pts)} points but {len(labs)} labels")
        if not np.isin(labs, (0, 1, 2, 3)).all():
            raise ValueError(f"point labels must be 1 (positive) or 0 (negative), got {labs}")
        lim = np.array([w, h], np.float32) if normalize_coords else np.float32(self.image_size)
        if not np.all(np.isfinite(pts)) or np.any(pts < 0) or np.any(pts > lim):
            raise ValueError(f"points {pts.tolist()} lie outside the {w}x{h} frame")
        if box is not None:
            if not clear_old_points:
                raise ValueError(
                    "cannot add box without clearing old points, since box prompt must be "
                    "provided before any point prompt (please use clear_old_points=True instead)"
                )
            bx = np.asarray(box, np.float32).reshape(-1)
            if bx.shape != (4,) or not np.all(np.isfinite(bx)):
                raise ValueError(f"box must be [x1, y1, x2, y2], got {box!r}")
            if np.any(bx.reshape(2, 2) < 0) or np.any(bx.reshape(2, 2) > lim):
                raise ValueError(f"box {bx.tolist()} lies (partly) outside the {w}x{h} frame")
            if bx[2] < bx[0] or bx[3] < bx[1]:
                raise ValueError(f"box {bx.tolist()} must satisfy x1 <= x2 and y1 <= y2")
            pts = np.concatenate([bx.reshape(2, 2), pts])
            labs = np.concatenate([np.array([2, 3], np.int32), labs])
        if normalize_coords:
            pts = pts / np.array([w, h], np.float32)
        pts = (pts * np.float32(self.image_size)).astype(np.float32)

        o = self._obj_idx(state, obj_id)
        old = state.point_inputs[o].get(f) if not clear_old_points else None
        if old is not None:
            pts, labs = np.concatenate([old[0], pts]), np.concatenate([old[1], labs])
        state.point_inputs[o][f] = (pts, labs)
        state.mask_inputs[o].pop(f, None)
        tracked = state.frames_tracked[o]
        is_init = f not in tracked
        reverse = False if is_init else tracked[f]
        key = "cond" if is_init else "non_cond"
        prev = self._prev_out(state, o, key, f)

        feats = self._features(state, f)
        p = pow2_bucket(len(labs), lo=4)
        coords, lab_rows, valid = point_rows([(pts, labs)], p)
        lr = self.config.low_res_size
        prev_logits = np.zeros((1, lr, lr, 1), np.float32)
        has_prev = np.array([prev is not None])
        if prev is not None:
            prev_logits = jnp.clip(prev.pred_masks, -32.0, 32.0).reshape(1, lr, lr, 1)
        parts = None if is_init else self._bank_parts(state, [o], f, reverse)
        out = _step(
            self._prep.structure, self._prep.leaves, feats,
            np.array([POINTS if is_init else CORRECT], np.int32), np.array([len(labs) <= 1]),
            coords, lab_rows, valid, parts, np.int32(f), np.int32(state.num_frames),
            np.bool_(reverse), None, prev_logits, has_prev, encode=False,
        )  # fmt: skip
        state.temp[o][key][f] = _Out(out.pred_masks[0], out.obj_ptr[0], out.object_score_logits[0])
        return f, list(state.obj_ids), self._consolidated(state, f, key)

    def add_new_mask(
        self, state: InferenceState, frame_idx: int, obj_id: Any, mask: Any
    ) -> tuple[int, list[Any], np.ndarray]:
        """Official `add_new_mask`: mask [H, W] (bool or 0/1) at any size (resized to the model
        size with antialiased bilinear and thresholded at 0.5 when different)."""
        f = self._check_frame(state, frame_idx)
        m = np.asarray(mask)
        if m.ndim != 2:
            raise ValueError(f"mask must be 2-D [H, W], got shape {m.shape}")
        m = m.astype(np.float32)
        s = self.image_size
        if m.shape != (s, s):
            m = np.asarray(resize_bilinear(jnp.asarray(m), (s, s), True, axes=(0, 1)))
            m = (m >= 0.5).astype(np.float32)
        o = self._obj_idx(state, obj_id)
        state.mask_inputs[o][f] = m
        state.point_inputs[o].pop(f, None)
        tracked = state.frames_tracked[o]
        is_init = f not in tracked
        key = "cond" if is_init else "non_cond"
        feats = self._features(state, f)
        coords, labs, valid = point_rows([None], 1)
        out = _step(
            self._prep.structure, self._prep.leaves, feats, np.array([MASK], np.int32),
            np.array([False]),
            coords, labs, valid, None, np.int32(f), np.int32(state.num_frames), np.bool_(False),
            jnp.asarray(m)[None, :, :, None], None, None, encode=False,
        )  # fmt: skip
        state.temp[o][key][f] = _Out(out.pred_masks[0], out.obj_ptr[0], out.object_score_logits[0])
        return f, list(state.obj_ids), self._consolidated(state, f, key)

    def _consolidated(self, state: InferenceState, f: int, key: str) -> np.ndarray:
        """Every object's logits on frame f at video resolution (NO_OBJ_SCORE if none)."""
        lr = self.config.low_res_size
        rows = []
        for o in range(len(state.obj_ids)):
            out = self._prev_out(state, o, key, f)
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
        o = state.obj_id_to_idx.get(obj_id)
        if o is None:
            raise ValueError(f"unknown object id {obj_id!r}; the objects are {state.obj_ids}")
        state.point_inputs[o].pop(f, None)
        state.mask_inputs[o].pop(f, None)
        state.temp[o]["cond"].pop(f, None)
        state.temp[o]["non_cond"].pop(f, None)
        out = state.cond[o].pop(f, None)
        if out is not None:  # downgraded: frames tracked from it keep reading its memory
            self._set_non_cond_row(state, f, o, out)
            state.frames_tracked[o].pop(f, None)
            state.cond_cache.clear()  # keyed by id() of the outputs: never reuse a freed one
        if not need_output:
            return None
        return f, list(state.obj_ids), self._consolidated(state, f, self._temp_key(state, f))

    def remove_object(
        self, state: InferenceState, obj_id: Any, strict: bool = False, need_output: bool = True
    ) -> tuple[list[Any], list[tuple[int, np.ndarray]]]:
        """Official `remove_object`: forget `obj_id` (its prompts, outputs and memories).
        Returns (remaining obj_ids, [(frame_idx, video-res logits [O, H, W])] for the frames
        where it had prompts, which may now show other objects it occluded). Removing the last
        object resets the state. An unknown id returns unchanged, or raises with `strict`."""
        o = state.obj_id_to_idx.get(obj_id)
        if o is None:
            if strict:  # RuntimeError as official, so ported code catches it
                raise RuntimeError(
                    f"cannot remove object id {obj_id!r}: the objects are {state.obj_ids}"
                )
            return list(state.obj_ids), []
        if len(state.obj_ids) == 1:
            self.reset_state(state)
            return [], []
        frames = sorted(set(state.point_inputs[o]) | set(state.mask_inputs[o]))
        for f in frames:  # first, as official: this may downgrade conditioning frames
            self.clear_all_prompts_in_frame(state, f, obj_id, need_output=False)
        state.obj_ids = [i for i in state.obj_ids if i != obj_id]
        state.obj_id_to_idx = {i: k for k, i in enumerate(state.obj_ids)}
        for per_obj in (state.point_inputs, state.mask_inputs, state.cond, state.temp,
                        state.frames_tracked):  # fmt: skip
            del per_obj[o]
        for f, nc in list(state.non_cond.items()):
            if o < len(nc.valid):  # rows exist only for objects added before f was tracked
                keep = np.arange(len(nc.valid)) != o
                state.non_cond[f] = _NonCond(
                    nc.pred_masks[keep], nc.obj_ptr[keep], nc.score[keep], nc.mem[keep],
                    nc.valid[keep],
                )  # fmt: skip
        state.cond_cache.clear()  # keyed by object index
        if not need_output:
            return list(state.obj_ids), []
        updated = [(f, self._consolidated(state, f, self._temp_key(state, f))) for f in frames]
        return list(state.obj_ids), updated

    @staticmethod
    def _temp_key(state: InferenceState, f: int) -> str:
        """Which temporary outputs the consolidated frame reads (official `is_cond`)."""
        return "cond" if any(f in t["cond"] for t in state.temp) else "non_cond"

    # -- propagation ----------------------------------------------------------------------------

    def propagate_in_video_preflight(self, state: InferenceState) -> None:
        """Encode the memories of the newly prompted frames and merge them into the outputs."""
        n = len(state.obj_ids)
        if n == 0:
            raise ValueError(
                "no input points or masks are provided for any object; add inputs first"
            )
        for o in range(n):
            for key in ("non_cond", "cond"):
                for f, out in state.temp[o][key].items():
                    if out.mem is None:
                        feats = self._features(state, f)
                        out.mem = _encode_memory(
                            self._prep.structure, self._prep.leaves, feats.vision,
                            out.pred_masks[None], out.score[None], np.array([True]),
                        )[0]  # fmt: skip
                    if key == "cond":
                        state.cond[o][f] = out
                    else:
                        self._set_non_cond_row(state, f, o, out)
                state.temp[o][key].clear()
            if not state.cond[o]:
                raise ValueError(
                    f"no input points or masks are provided for object id {state.obj_ids[o]}; "
                    "add inputs first"
                )
            for f in state.cond[o]:
                nc = state.non_cond.get(f)
                if nc is not None and o < len(nc.valid):
                    nc.valid = nc.valid.copy()
                    nc.valid[o] = False

    def _set_non_cond_row(self, state: InferenceState, f: int, o: int, out: _Out) -> None:
        n = len(state.obj_ids)
        nc = state.non_cond.get(f)
        if nc is None:
            nc = _NonCond(
                jnp.zeros((n,) + out.pred_masks.shape, jnp.float32),
                jnp.zeros((n,) + out.obj_ptr.shape, jnp.float32),
                jnp.zeros((n, 1), jnp.float32),
                jnp.zeros((n,) + out.mem.shape, jnp.bfloat16),
                np.zeros(n, bool),
            )
        fields = {}
        for name, val in (("pred_masks", out.pred_masks), ("obj_ptr", out.obj_ptr),
                          ("score", out.score), ("mem", out.mem)):  # fmt: skip
            arr, _ = self._nc_rows(nc, n, name)
            fields[name] = arr.at[o].set(val.astype(arr.dtype))
        _, valid = self._nc_rows(nc, n, "mem")
        valid = valid.copy()
        valid[o] = True
        state.non_cond[f] = _NonCond(**fields, valid=valid)

    def propagate_in_video(
        self,
        state: InferenceState,
        start_frame_idx: int | None = None,
        max_frame_num_to_track: int | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[int, list[Any], np.ndarray]]:
        """Official `propagate_in_video`: yields (frame_idx, obj_ids, logits [O, H, W])."""
        self.propagate_in_video_preflight(state)
        obj_ids = list(state.obj_ids)
        n, num_frames = len(obj_ids), state.num_frames
        if start_frame_idx is None:
            start_frame_idx = min(t for c in state.cond for t in c)
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
        for f in order:
            is_cond = np.array([f in state.cond[o] for o in all_objs])
            if is_cond.all():
                video = _video_res(
                    jnp.stack([state.cond[o][f].pred_masks for o in all_objs]), video_hw=hw
                )
            else:
                parts = self._bank_parts(state, all_objs, f, reverse)
                out, video = _propagate_step(
                    self._prep.structure, self._prep.leaves, state.images.frames_u8[f], parts,
                    np.int32(f), np.int32(num_frames), np.bool_(reverse), video_hw=hw,
                )  # fmt: skip
                state.non_cond[f] = _NonCond(
                    out.pred_masks,
                    out.obj_ptr,
                    out.object_score_logits,
                    out.maskmem_features,
                    ~is_cond,
                )
                if is_cond.any():
                    pred = [
                        state.cond[o][f].pred_masks if is_cond[o] else out.pred_masks[o]
                        for o in all_objs
                    ]
                    video = _video_res(jnp.stack(pred), video_hw=hw)
            for o in all_objs:
                state.frames_tracked[o][f] = reverse
            yield f, obj_ids, np.asarray(video)

    def get_object_scores(self, state: InferenceState, frame_idx: int) -> np.ndarray:
        """Object score logits [O] on a tracked or prompted frame (NaN where unknown)."""
        res = np.full(len(state.obj_ids), np.nan, np.float32)
        for o in range(len(state.obj_ids)):
            for key in ("cond", "non_cond"):
                out = self._prev_out(state, o, key, frame_idx)
                if out is not None:
                    res[o] = float(np.asarray(out.score).reshape(-1)[0])
                    break
        return res


# ---------------------------------------------------------------------------------------------
# streaming tracker


def _stream_step_fn(
    structure, leaves, bank, image_u8, mode, multimask, coords, labels, valid, mask_inputs,
    frame_idx, num_frames, *, video_hw, counter,
):  # fmt: skip
    counter[0] += 1  # runs at trace time only: counts compilations
    model = merge(structure, leaves)
    feats = frame_features(model, normalize_device(image_u8)[None])
    out = track_step(
        model, feats, mode, multimask, coords, labels, valid, bank, frame_idx, num_frames,
        False, mask_inputs, encode=True,
    )  # fmt: skip
    is_cond = (mode == POINTS) | (mode == MASK)
    bank = insert_memory(
        bank, frame_idx, out.maskmem_features, out.obj_ptr, is_cond, update=mode != INACTIVE
    )
    video = resize_bilinear(out.pred_masks, video_hw, False, axes=(-2, -1))
    return bank, video, out.object_score_logits[:, 0]


class StreamingTracker:
    """Track objects through frames that arrive one at a time (a generator, a camera).

    Every frame is one call of one jitted function (backbone, memory attention over a
    fixed-capacity bank, SAM heads, memory encoding, bank update) with static shapes: objects
    occupy `max_objects` slots, prompts are padded to `max_points` points, and the bank has
    `num_cond` conditioning slots (ring buffer: beyond that, the oldest prompted frame is
    dropped), the 6 most recent memories and 15 most recent object pointers, each with validity
    flags. Nothing recompiles as the bank fills, and memory stays bounded for any video length.

    Prompts given with `add_prompt` apply to the next frame passed to `step`; an object is
    tracked from its first prompt on. Tracking is causal: a prompt never influences earlier
    frames (the offline predictor, which sees all prompts first, lets a later prompt condition
    earlier frames too). With prompts on the first frame only and `num_frames` set, the results
    equal `SAM2VideoPredictor.propagate_in_video`.
    """

    def __init__(
        self,
        model: SAM2Base,
        max_objects: int = 4,
        *,
        max_points: int = 8,
        num_cond: int = 4,
        num_frames: int | None = None,
    ):
        self.model = model
        self.config = model.config
        self.image_size = model.image_size
        self.max_objects = int(max_objects)
        self.max_points = int(max_points)
        self.num_frames = num_frames
        self._prep = prepare(model)
        self.bank = init_memory_bank(self.config, self.max_objects, num_cond=num_cond)
        self.obj_ids: list[Any] = []
        self.frame_idx = 0
        self.video_hw: tuple[int, int] | None = None
        self._pending: dict[int, dict[str, Any]] = {}
        self._started = np.zeros(self.max_objects, bool)
        self.compilations = [0]  # traces of the step function (1 after any number of frames)
        donate = ("bank",) if jax.default_backend() != "cpu" else ()
        self._jit = jax.jit(
            partial(_stream_step_fn, counter=self.compilations),
            static_argnames=("structure", "video_hw"),
            donate_argnames=donate,
        )

    def add_prompt(
        self, obj_id: Any, points: Any = None, labels: Any = None, box: Any = None, mask: Any = None
    ) -> None:
        """Prompt `obj_id` on the next frame: points [n, 2] + labels [n], and / or a box, in
        video pixels, or a mask [H, W] (bool) at video resolution."""
        if mask is None and points is None and box is None:
            raise ValueError("a prompt needs points, a box or a mask")
        if mask is not None and (points is not None or box is not None):
            raise ValueError("give either a mask or points / a box, not both")
        if (points is None) != (labels is None):
            raise ValueError("points and labels must be provided together")
        if obj_id not in self.obj_ids:
            if len(self.obj_ids) >= self.max_objects:
                raise ValueError(f"at most {self.max_objects} objects (max_objects)")
            self.obj_ids.append(obj_id)
        slot = self.obj_ids.index(obj_id)
        pts = np.zeros((0, 2), np.float32) if points is None else np.asarray(points, np.float32)
        labs = np.zeros((0,), np.int32) if labels is None else np.asarray(labels, np.int32)
        pts, labs = pts.reshape(-1, 2), labs.reshape(-1)
        if box is not None:
            pts = np.concatenate([np.asarray(box, np.float32).reshape(2, 2), pts])
            labs = np.concatenate([np.array([2, 3], np.int32), labs])
        if len(labs) > self.max_points:
            raise ValueError(f"{len(labs)} prompt points (box = 2) > max_points {self.max_points}")
        self._pending[slot] = {"points": (pts, labs), "mask": mask}

    def _prompt_arrays(self, h: int, w: int):
        b, s = self.max_objects, self.image_size
        mode = np.full(b, INACTIVE, np.int32)
        mode[: len(self.obj_ids)] = TRACK
        for slot in range(len(self.obj_ids)):
            if slot not in self._pending and not self._started[slot]:
                mode[slot] = INACTIVE  # declared but not yet prompted
        multimask = np.ones(b, bool)
        rows: list = [None] * b
        masks = np.zeros((b, s, s, 1), np.float32)
        for slot, p in self._pending.items():
            if p["mask"] is not None:
                m = np.asarray(p["mask"])
                if m.shape != (h, w):
                    raise ValueError(f"mask is {m.shape}, the frames are {(h, w)}")
                m = m.astype(np.float32)
                if m.shape != (s, s):
                    m = np.asarray(resize_bilinear(jnp.asarray(m), (s, s), True, axes=(0, 1)))
                    m = (m >= 0.5).astype(np.float32)
                masks[slot, ..., 0] = m
                mode[slot], multimask[slot] = MASK, False
            else:
                pts, labs = p["points"]
                if np.any(pts < 0) or np.any(pts > np.array([w, h], np.float32)):
                    raise ValueError(f"prompt {pts.tolist()} lies outside the {w}x{h} frame")
                pts = (pts / np.array([w, h], np.float32) * np.float32(s)).astype(np.float32)
                rows[slot] = (pts, labs)
                mode[slot], multimask[slot] = POINTS, len(labs) <= 1
        coords, labels, valid = point_rows(rows, self.max_points)
        return mode, multimask, coords, labels, valid, masks

    def step(self, frame: Any) -> tuple[int, list[Any], np.ndarray, np.ndarray]:
        """Process the next frame (uint8 [H, W, 3] or PIL image). Returns (frame_idx, obj_ids,
        logits [O, H, W] at video resolution, object score logits [O]) for the objects added so
        far (objects not yet prompted get NO_OBJ_SCORE logits)."""
        img, h, w = preprocess_frame(frame, self.image_size)
        if self.video_hw is None:
            self.video_hw = (h, w)
        elif (h, w) != self.video_hw:
            raise ValueError(
                f"frame is {w}x{h}, the stream is {self.video_hw[1]}x{self.video_hw[0]}"
            )
        mode, multimask, coords, labels, valid, masks = self._prompt_arrays(h, w)
        nf = self.num_frames if self.num_frames is not None else 2**30
        self.bank, video, scores = self._jit(
            self._prep.structure, self._prep.leaves, self.bank, img, mode,
            multimask, coords, labels, valid, masks, np.int32(self.frame_idx), np.int32(nf),
            video_hw=self.video_hw,
        )  # fmt: skip
        self._started |= mode != INACTIVE
        self._pending.clear()
        f = self.frame_idx
        self.frame_idx += 1
        n = len(self.obj_ids)
        video = np.array(video)[:n]  # a writable host copy
        video[~self._started[:n]] = NO_OBJ_SCORE
        return f, list(self.obj_ids), video, np.array(scores)[:n]

    def track(
        self, frames: Iterable[Any]
    ) -> Iterator[tuple[int, list[Any], np.ndarray, np.ndarray]]:
        """`step` over an iterable of frames (prompts must be added before / between frames)."""
        for frame in frames:
            yield self.step(frame)
