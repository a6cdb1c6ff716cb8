"""Typed state of the offline video predictor (the official `inference_state`, restricted to
what inference reads) and the memory lookup that turns it into a fixed-size `MemoryBank`.

Per object (`ObjectState`): its prompts per frame, its consolidated conditioning outputs, the
temporary outputs of frames prompted since the last propagation (official
`temp_output_dict_per_obj`), and which frames it was tracked on. Per frame, every object's
non-conditioning outputs are one batched `FrameRows` (objects are the batch axis of a step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pam_jax.sam2.common import pow2_bucket
from pam_jax.sam2.config import SAM2Config
from pam_jax.sam2.memory import MemoryBank, init_memory_bank
from pam_jax.sam2.prompts import Prompt
from pam_jax.sam2.tracking import FrameFeatures
from pam_jax.sam2.video_io import VideoFrames


@dataclasses.dataclass
class FrameOutput:
    """One object's output on one frame (the official compact `current_out`)."""

    pred_masks: jax.Array  # [4h, 4w] float32
    obj_ptr: jax.Array  # [C]
    score: jax.Array  # [1]
    mem: jax.Array | None = None  # [h * w, mem_dim] bfloat16, set by the preflight


@dataclasses.dataclass
class FrameRows:
    """Every object's non-conditioning output on one frame (rows valid where `valid`; objects
    added after the frame was tracked have no row)."""

    pred_masks: jax.Array  # [O, 4h, 4w]
    obj_ptr: jax.Array  # [O, C]
    score: jax.Array  # [O, 1]
    mem: jax.Array  # [O, h * w, mem_dim] bfloat16
    valid: np.ndarray  # [O] bool

    FIELDS = ("pred_masks", "obj_ptr", "score", "mem")

    def padded(self, n_obj: int) -> FrameRows:
        """The rows padded (invalid) to n_obj objects."""
        k = n_obj - self.valid.shape[0]
        if k <= 0:
            return self
        pad = {
            f: jnp.concatenate([a, jnp.zeros((k,) + a.shape[1:], a.dtype)])
            for f, a in ((f, getattr(self, f)) for f in self.FIELDS)
        }
        return FrameRows(**pad, valid=np.concatenate([self.valid, np.zeros(k, bool)]))

    def row(self, o: int) -> FrameOutput | None:
        if o >= self.valid.shape[0] or not self.valid[o]:
            return None
        return FrameOutput(self.pred_masks[o], self.obj_ptr[o], self.score[o], self.mem[o])

    def without(self, o: int) -> FrameRows:
        if o >= self.valid.shape[0]:
            return self
        keep = np.arange(self.valid.shape[0]) != o
        return FrameRows(*(getattr(self, f)[keep] for f in self.FIELDS), self.valid[keep])


@dataclasses.dataclass
class ObjectState:
    """One object's prompts and outputs."""

    obj_id: Any
    point_inputs: dict[int, Prompt] = dataclasses.field(default_factory=dict)  # model pixels
    mask_inputs: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)  # [S, S]
    cond: dict[int, FrameOutput] = dataclasses.field(default_factory=dict)
    temp_cond: dict[int, FrameOutput] = dataclasses.field(default_factory=dict)
    temp_non_cond: dict[int, FrameOutput] = dataclasses.field(default_factory=dict)
    frames_tracked: dict[int, bool] = dataclasses.field(default_factory=dict)  # -> reverse

    def temp(self, is_cond: bool) -> dict[int, FrameOutput]:
        return self.temp_cond if is_cond else self.temp_non_cond

    @property
    def prompted_frames(self) -> list[int]:
        return sorted(set(self.point_inputs) | set(self.mask_inputs))


@dataclasses.dataclass
class InferenceState:
    """The official `inference_state`: the video, the objects, every frame's outputs."""

    images: VideoFrames
    num_frames: int
    video_height: int
    video_width: int
    objects: list[ObjectState] = dataclasses.field(default_factory=list)
    non_cond: dict[int, FrameRows] = dataclasses.field(default_factory=dict)
    cached_features: dict[int, FrameFeatures] = dataclasses.field(default_factory=dict)
    cond_cache: dict[tuple, CondSlots] = dataclasses.field(default_factory=dict)

    @property
    def obj_ids(self) -> list[Any]:
        return [o.obj_id for o in self.objects]

    def index(self, obj_id: Any) -> int | None:
        for i, o in enumerate(self.objects):
            if o.obj_id == obj_id:
                return i
        return None

    def output(self, o: int, is_cond: bool, f: int) -> FrameOutput | None:
        """Object o's latest output on frame f: temporary, conditioning, then tracked."""
        obj = self.objects[o]
        out = obj.temp(is_cond).get(f)
        if out is None:
            out = obj.cond.get(f)
        if out is None and f in self.non_cond:
            out = self.non_cond[f].row(o)
        return out

    def temp_is_cond(self, f: int) -> bool:
        """Which temporary outputs the consolidated frame reads (official `is_cond`)."""
        return any(f in o.temp_cond for o in self.objects)


@struct.dataclass
class CondSlots:
    """Conditioning memories of B objects: [B, Kc, ...] (Kc a power of two)."""

    feats: jax.Array  # [B, Kc, HW, mem_dim] bfloat16
    ptrs: jax.Array  # [B, Kc, C] float32
    frames: np.ndarray  # [B, Kc] int32
    valid: np.ndarray  # [B, Kc] bool


@struct.dataclass
class BankSlots:
    """Exactly the memories the official `_prepare_memory_conditioned_features` reads for B
    objects at one frame (static slot counts; missing ones invalid). Recent memories / pointers
    are per-distance tuples, stacked inside jit (`to_bank`)."""

    cond: CondSlots
    recent_feats: tuple[jax.Array, ...]  # Kr x [B, HW, mem_dim]
    recent_frames: np.ndarray  # [Kr]
    recent_valid: np.ndarray  # [B, Kr]
    ptrs: tuple[jax.Array, ...]  # Kp x [B, C]
    ptr_frames: np.ndarray  # [Kp]
    ptr_valid: np.ndarray  # [B, Kp]
    mem_pos: jax.Array  # [HW, mem_dim]

    def to_bank(self) -> MemoryBank:
        cf = self.cond.frames
        b, kc = cf.shape
        rf = jnp.broadcast_to(self.recent_frames[None], (b, self.recent_frames.shape[0]))
        pf = jnp.broadcast_to(self.ptr_frames[None], (b, self.ptr_frames.shape[0]))
        z = partial(jnp.zeros, dtype=jnp.int32)
        return MemoryBank(
            cond_feats=self.cond.feats,
            cond_ptrs=self.cond.ptrs,
            cond_frames=cf,
            cond_valid=self.cond.valid,
            cond_stamp=z((b, kc)),
            recent_feats=jnp.stack(self.recent_feats, axis=1),
            recent_frames=rf,
            recent_valid=self.recent_valid,
            recent_stamp=z(rf.shape),
            ptrs=jnp.stack(self.ptrs, axis=1),
            ptr_frames=pf,
            ptr_valid=self.ptr_valid,
            ptr_stamp=z(pf.shape),
            mem_pos=self.mem_pos,
            step=z(()),
        )


class MemoryLookup:
    """Builds the `BankSlots` of B objects at one frame from an `InferenceState`: every
    conditioning memory (cached until they change), the `num_recent` previous
    non-conditioning memories and the `num_ptrs` previous pointers in tracking direction."""

    def __init__(self, cfg: SAM2Config, num_recent: int, num_ptrs: int):
        self.config = cfg
        self.num_recent = num_recent
        self.num_ptrs = num_ptrs
        self.mem_pos = init_memory_bank(cfg, 1, num_cond=1).mem_pos
        self._zeros: dict[tuple, jax.Array] = {}

    def _zeros_like(self, shape: tuple[int, ...], dtype) -> jax.Array:
        key = (shape, jnp.dtype(dtype).name)
        if key not in self._zeros:
            self._zeros[key] = jnp.zeros(shape, dtype)
        return self._zeros[key]

    def cond(self, state: InferenceState, objs: Sequence[int]) -> CondSlots:
        """Conditioning memories of `objs` (cached until they change)."""
        key = tuple(
            (o, tuple((t, id(out)) for t, out in sorted(state.objects[o].cond.items())))
            for o in objs
        )
        hit = state.cond_cache.get(key)
        if hit is not None:
            return hit
        cfg = self.config
        b, hw, c, d = len(objs), cfg.feat_size**2, cfg.mem_dim, cfg.d_model
        kc = pow2_bucket(max(len(state.objects[o].cond) for o in objs))
        frames = np.zeros((b, kc), np.int32)
        valid = np.zeros((b, kc), bool)
        cf = jnp.zeros((b, kc, hw, c), jnp.bfloat16)
        cp = jnp.zeros((b, kc, d), jnp.float32)
        idx, feats, ptrs = [], [], []
        for i, o in enumerate(objs):
            for k, (t, out) in enumerate(sorted(state.objects[o].cond.items())):
                idx.append((i, k))
                feats.append(out.mem)
                ptrs.append(out.obj_ptr)
                frames[i, k], valid[i, k] = t, True
        if idx:
            ii, kk = (np.array(v) for v in zip(*idx))
            cf = cf.at[ii, kk].set(jnp.stack(feats).astype(jnp.bfloat16))
            cp = cp.at[ii, kk].set(jnp.stack(ptrs).astype(jnp.float32))
        state.cond_cache = {key: CondSlots(cf, cp, frames, valid)}
        return state.cond_cache[key]

    def slots(
        self, state: InferenceState, objs: Sequence[int], frame_idx: int, reverse: bool
    ) -> BankSlots:
        """The memories the official `_prepare_memory_conditioned_features` would read for the
        objects `objs` at `frame_idx` (static slot counts; missing ones marked invalid)."""
        cfg = self.config
        n_all = len(state.objects)
        b = len(objs)
        hw, c, d = cfg.feat_size**2, cfg.mem_dim, cfg.d_model
        sign = -1 if reverse else 1
        objs_a = np.asarray(objs)

        def gather(n: int, field: str, shape: tuple[int, ...], dtype):
            arrs, frames, valid = [], np.zeros(n, np.int32), np.zeros((b, n), bool)
            for k in range(n):
                t = frame_idx - sign * (k + 1)
                frames[k] = t
                rows = state.non_cond.get(t)
                if rows is None:
                    arrs.append(self._zeros_like((b,) + shape, dtype))
                    continue
                rows = rows.padded(n_all)
                arr = getattr(rows, field)
                arrs.append(arr if b == n_all else arr[objs_a])
                valid[:, k] = rows.valid[objs_a]
            return tuple(arrs), frames, valid

        recent, rf, rv = gather(self.num_recent, "mem", (hw, c), jnp.bfloat16)
        ptrs, pf, pv = gather(self.num_ptrs, "obj_ptr", (d,), jnp.float32)
        cond = self.cond(state, objs)
        return BankSlots(cond, recent, rf, rv, ptrs, pf, pv, self.mem_pos)
