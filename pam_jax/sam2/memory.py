"""Fixed-capacity SAM 2 memory bank: the array logic of `_prepare_memory_conditioned_features`.

The official tracker keeps python dicts {frame_idx: output} per object and, for every frame,
concatenates a variable number of memories. Here each object owns fixed slots instead (static
shapes, jit-friendly, vmapped over objects by construction: every array has a leading object
axis B), plus validity flags; `assemble_memory` returns all slots with a key mask and
`MemoryAttention(..., memory_valid=mask)` then gives exactly the official result, because a
masked key has softmax weight 0.

Slots (per object):
- cond:   `num_cond` conditioning (prompted) frames: memory features, object pointer, frame index.
          All of them are attended (official `max_cond_frames_in_attn = -1`); a pointer only when
          the frame is not in the future w.r.t. the tracking direction
          (`only_obj_ptrs_in_the_past_for_eval`).
- recent: `num_maskmem - 1` (= 6) most recent non-conditioning memories. A slot is attended iff
          its frame is 1..6 frames before the current one in tracking direction (temporal stride
          1, the eval default), with `maskmem_tpos_enc[distance - 1]`; cond frames use index
          `num_maskmem - 1`, as official.
- ptrs:   `max_obj_ptrs_in_encoder - 1` (= 15) most recent non-conditioning object pointers, used
          iff 1 <= distance <= min(num_frames, 16) - 1.

Insertion overwrites the slot holding the same frame, else an empty slot, else the oldest one
(ring buffer). The bank reproduces the official selection exactly as long as every frame the
official code would look up is still held: true for tracking in one direction with the default
`num_recent`/`num_ptrs` and `num_cond` >= the number of prompted frames. Tracking forward and
then backward over already-tracked frames (where the official tracker re-reads the forward
pass's memories) needs larger `num_recent`/`num_ptrs`.
Memory features are stored in bfloat16 like the official video predictor.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

from pam_jax.sam2.config import SAM2Config
from pam_jax.sam2.position_encoding import get_1d_sine_pe, position_embedding_sine

Int = int | jax.Array


@struct.dataclass
class MemoryBank:
    """Per-object memory slots (leading axis B = objects). HW = h * w memory tokens per frame."""

    cond_feats: jax.Array  # [B, Kc, HW, mem_dim] bfloat16
    cond_ptrs: jax.Array  # [B, Kc, ptr_dim] float32
    cond_frames: jax.Array  # [B, Kc] int32
    cond_valid: jax.Array  # [B, Kc] bool
    cond_stamp: jax.Array  # [B, Kc] int32, insertion time (ring-buffer eviction order)
    recent_feats: jax.Array  # [B, Kr, HW, mem_dim] bfloat16
    recent_frames: jax.Array  # [B, Kr] int32
    recent_valid: jax.Array  # [B, Kr] bool
    recent_stamp: jax.Array  # [B, Kr] int32
    ptrs: jax.Array  # [B, Kp, ptr_dim] float32 (non-conditioning frames)
    ptr_frames: jax.Array  # [B, Kp] int32
    ptr_valid: jax.Array  # [B, Kp] bool
    ptr_stamp: jax.Array  # [B, Kp] int32
    mem_pos: jax.Array  # [HW, mem_dim] float32 spatial pos enc, shared by all memories
    step: jax.Array  # [] int32 insertion counter

    @property
    def batch_size(self) -> int:
        return self.cond_valid.shape[0]


@struct.dataclass
class MemoryInputs:
    """Inputs of `MemoryAttention`: all slots, spatial tokens first, then pointer tokens."""

    memory: jax.Array  # [B, M, mem_dim] float32
    memory_pos: jax.Array  # [B, M, mem_dim] float32
    memory_valid: jax.Array  # [B, M] bool
    num_obj_ptr_tokens: int = struct.field(pytree_node=False, default=0)


def init_memory_bank(
    cfg: SAM2Config,
    batch_size: int,
    *,
    num_cond: int = 4,
    num_recent: int | None = None,
    num_ptrs: int | None = None,
    mem_pos: jax.Array | None = None,
    feat_size: int | None = None,
) -> MemoryBank:
    """An empty bank for `batch_size` objects.

    `mem_pos` [HW, mem_dim] defaults to the memory encoder's sine encoding of the
    `feat_size` x `feat_size` map (cfg.feat_size), which is what every official memory carries.
    """
    side = feat_size or cfg.feat_size
    hw, c, d = side * side, cfg.mem_dim, cfg.d_model
    kc = num_cond
    kr = cfg.num_maskmem - 1 if num_recent is None else num_recent
    kp = cfg.max_obj_ptrs_in_encoder - 1 if num_ptrs is None else num_ptrs
    if mem_pos is None:
        mem_pos = position_embedding_sine(side, side, c).reshape(hw, c)
    b = batch_size

    def slots(k: int):
        return (jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), bool), jnp.zeros((b, k), jnp.int32))

    cf, cv, cs = slots(kc)
    rf, rv, rs = slots(kr)
    pf, pv, ps = slots(kp)
    return MemoryBank(
        cond_feats=jnp.zeros((b, kc, hw, c), jnp.bfloat16),
        cond_ptrs=jnp.zeros((b, kc, d), jnp.float32),
        cond_frames=cf,
        cond_valid=cv,
        cond_stamp=cs,
        recent_feats=jnp.zeros((b, kr, hw, c), jnp.bfloat16),
        recent_frames=rf,
        recent_valid=rv,
        recent_stamp=rs,
        ptrs=jnp.zeros((b, kp, d), jnp.float32),
        ptr_frames=pf,
        ptr_valid=pv,
        ptr_stamp=ps,
        mem_pos=jnp.asarray(mem_pos, jnp.float32).reshape(hw, c),
        step=jnp.zeros((), jnp.int32),
    )


def _pick_slot(frames: jax.Array, valid: jax.Array, stamp: jax.Array, frame_idx: Int) -> jax.Array:
    """[B, K] -> [B] slot: the one holding `frame_idx`, else an empty one, else the oldest."""
    score = jnp.where(valid & (frames == frame_idx), -2, jnp.where(valid, stamp, -1))
    return jnp.argmin(score, axis=1)


def _write(arr: jax.Array, slot: jax.Array, value: jax.Array, do: jax.Array) -> jax.Array:
    """arr[b, slot[b]] = value[b] where do[b] (static shapes, one scatter)."""
    b = jnp.arange(arr.shape[0])
    old = arr[b, slot]
    do = do.reshape(do.shape + (1,) * (old.ndim - 1))
    return arr.at[b, slot].set(jnp.where(do, value.astype(arr.dtype), old))


def _push(
    frames: jax.Array,
    valid: jax.Array,
    stamp: jax.Array,
    frame_idx: jax.Array,
    new_stamp: jax.Array,
    do: jax.Array,
    *payloads: tuple[jax.Array, jax.Array],
    drop: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, ...]]:
    """One ring of slots [B, K]: write frame `frame_idx`'s entry (each (array, value) of
    `payloads`) where do [B]; where drop [B], first invalidate an entry of the same frame.
    Returns the new frames, valid, stamp and payload arrays."""
    b = frames.shape[0]
    s = _pick_slot(frames, valid, stamp, frame_idx)
    if drop is not None:
        valid = valid & ~(drop[:, None] & (frames == frame_idx))
    fr = jnp.broadcast_to(frame_idx, (b,))
    return (
        _write(frames, s, fr, do),
        _write(valid, s, jnp.ones((b,), bool), do),
        _write(stamp, s, new_stamp, do),
        tuple(_write(a, s, v, do) for a, v in payloads),
    )


def insert_memory(
    bank: MemoryBank,
    frame_idx: Int,
    features: jax.Array,
    obj_ptr: jax.Array,
    is_cond: bool | jax.Array,
    update: jax.Array | None = None,
) -> MemoryBank:
    """Store the memory of `frame_idx` for every object where `update` [B] (default all).

    features: [B, HW, mem_dim] or [B, h, w, mem_dim] (memory-encoder output; rounded to
    bfloat16 as official). obj_ptr: [B, ptr_dim]. is_cond: bool or [B] bool, conditioning
    (prompted) frame or not. A conditioning insert also drops any non-conditioning memory and
    pointer of the same frame (official `propagate_in_video_preflight`).
    """
    b = bank.batch_size
    feats = features.reshape(b, -1, features.shape[-1])
    frame_idx = jnp.asarray(frame_idx, jnp.int32)
    update = jnp.ones((b,), bool) if update is None else jnp.asarray(update, bool)
    is_cond = jnp.broadcast_to(jnp.asarray(is_cond, bool), (b,))
    do_c, do_r = update & is_cond, update & ~is_cond
    step = bank.step + 1
    stamp = jnp.broadcast_to(step, (b,))
    cf, cv, cs, (cfeat, cptr) = _push(
        bank.cond_frames, bank.cond_valid, bank.cond_stamp, frame_idx, stamp, do_c,
        (bank.cond_feats, feats), (bank.cond_ptrs, obj_ptr),
    )  # fmt: skip
    # a new cond frame replaces a non-cond entry (memory and pointer) of the same frame
    rf, rv, rs, (rfeat,) = _push(
        bank.recent_frames, bank.recent_valid, bank.recent_stamp, frame_idx, stamp, do_r,
        (bank.recent_feats, feats), drop=do_c,
    )  # fmt: skip
    pf, pv, ps, (ptr,) = _push(
        bank.ptr_frames, bank.ptr_valid, bank.ptr_stamp, frame_idx, stamp, do_r,
        (bank.ptrs, obj_ptr), drop=do_c,
    )  # fmt: skip
    return bank.replace(
        cond_feats=cfeat, cond_ptrs=cptr, cond_frames=cf, cond_valid=cv, cond_stamp=cs,
        recent_feats=rfeat, recent_frames=rf, recent_valid=rv, recent_stamp=rs,
        ptrs=ptr, ptr_frames=pf, ptr_valid=pv, ptr_stamp=ps, step=step,
    )  # fmt: skip


def remove_frame(bank: MemoryBank, frame_idx: Int, update: jax.Array | None = None) -> MemoryBank:
    """Forget every memory and pointer of `frame_idx` (for objects where `update`)."""
    upd = jnp.ones((bank.batch_size,), bool) if update is None else jnp.asarray(update, bool)
    upd = upd[:, None]
    return bank.replace(
        cond_valid=bank.cond_valid & ~(upd & (bank.cond_frames == frame_idx)),
        recent_valid=bank.recent_valid & ~(upd & (bank.recent_frames == frame_idx)),
        ptr_valid=bank.ptr_valid & ~(upd & (bank.ptr_frames == frame_idx)),
    )


def assemble_memory(
    bank: MemoryBank,
    cfg: SAM2Config,
    frame_idx: Int,
    num_frames: Int,
    maskmem_tpos_enc: jax.Array,
    obj_ptr_tpos_proj: Callable[[jax.Array], jax.Array] | None,
    reverse: bool | jax.Array = False,
) -> MemoryInputs:
    """Memory tokens for a non-initial frame `frame_idx` of a `num_frames` video.

    maskmem_tpos_enc: the model's [num_maskmem, 1, 1, mem_dim] parameter. obj_ptr_tpos_proj:
    the model's `obj_ptr_tpos_proj` (SAM 2.1, 256 -> 64) or None (Identity). The 2.0/2.1 rules
    come from cfg (add_tpos_enc_to_obj_ptrs, proj_tpos_enc_in_obj_ptrs,
    use_signed_tpos_enc_to_obj_ptrs). reverse: tracking in decreasing frame order.

    Returns M = (Kc + Kr) * HW spatial tokens followed by (Kc + Kp) * (ptr_dim // mem_dim)
    pointer tokens; `memory_valid` marks the ones the official code would have concatenated.
    """
    b, kc, hw, c = bank.cond_feats.shape
    kr, kp = bank.recent_valid.shape[1], bank.ptr_valid.shape[1]
    d = bank.ptrs.shape[-1]
    nm = cfg.num_maskmem
    frame_idx = jnp.asarray(frame_idx, jnp.int32)
    num_frames = jnp.asarray(num_frames, jnp.int32)
    sign = 1 - 2 * jnp.asarray(reverse, jnp.int32)  # +1 forward, -1 reverse
    tpos = jnp.asarray(maskmem_tpos_enc, jnp.float32).reshape(nm, c)

    # spatial memories: cond frames (t_pos 0 -> tpos index nm - 1), then recent non-cond frames
    # at distance t_rel in 1..nm-1 (t_pos = nm - t_rel -> tpos index t_rel - 1)
    t_rel = (frame_idx - bank.recent_frames) * sign
    recent_ok = bank.recent_valid & (t_rel >= 1) & (t_rel <= nm - 1)
    recent_tpos = tpos[jnp.clip(t_rel - 1, 0, nm - 1)]  # [B, Kr, C]
    cond_tpos = jnp.broadcast_to(tpos[nm - 1], (b, kc, c))
    slot_tpos = jnp.concatenate([cond_tpos, recent_tpos], axis=1)  # [B, Kc + Kr, C]
    feats = jnp.concatenate([bank.cond_feats, bank.recent_feats], axis=1).astype(jnp.float32)
    pos = bank.mem_pos[None, None] + slot_tpos[:, :, None, :]
    slot_ok = jnp.concatenate([bank.cond_valid, recent_ok], axis=1)
    n_sp = (kc + kr) * hw
    sp_mem = feats.reshape(b, n_sp, c)
    sp_pos = pos.reshape(b, n_sp, c)
    sp_ok = jnp.repeat(slot_ok, hw, axis=1)

    # object pointers: cond frames not in the future, then non-cond frames 1..max_ptrs-1 back
    max_ptrs = jnp.minimum(num_frames, cfg.max_obj_ptrs_in_encoder)
    dc = (frame_idx - bank.cond_frames) * sign
    cond_ptr_ok = bank.cond_valid & (dc >= 0)
    cond_dt = dc if cfg.use_signed_tpos_enc_to_obj_ptrs else jnp.abs(frame_idx - bank.cond_frames)
    dp = (frame_idx - bank.ptr_frames) * sign
    ptr_ok = (
        bank.ptr_valid
        & (dp >= 1)
        & (dp <= max_ptrs - 1)
        & (bank.ptr_frames >= 0)
        & (bank.ptr_frames < num_frames)
    )
    ptrs = jnp.concatenate([bank.cond_ptrs, bank.ptrs], axis=1)  # [B, P, D]
    dt = jnp.concatenate([cond_dt, dp], axis=1)  # [B, P]
    p_ok = jnp.concatenate([cond_ptr_ok, ptr_ok], axis=1)
    n_p = kc + kp
    if cfg.add_tpos_enc_to_obj_ptrs:
        # official divides by t_diff_max = max_ptrs - 1 (0 for a 1-frame video -> NaN there)
        t_diff_max = jnp.maximum(max_ptrs - 1, 1).astype(jnp.float32)
        tpos_dim = d if cfg.proj_tpos_enc_in_obj_ptrs else c
        p_pos = get_1d_sine_pe(dt.astype(jnp.float32) / t_diff_max, tpos_dim)
        if cfg.proj_tpos_enc_in_obj_ptrs:
            if obj_ptr_tpos_proj is None:
                raise ValueError("cfg.proj_tpos_enc_in_obj_ptrs needs obj_ptr_tpos_proj")
            p_pos = obj_ptr_tpos_proj(p_pos)
        p_pos = p_pos.astype(jnp.float32)
    else:
        p_pos = jnp.zeros((b, n_p, c), jnp.float32)
    split = d // c if c < d else 1  # each pointer becomes `split` tokens of mem_dim
    p_mem = ptrs.reshape(b, n_p * split, d // split)
    p_pos = jnp.repeat(p_pos, split, axis=1)
    p_ok = jnp.repeat(p_ok, split, axis=1)

    return MemoryInputs(
        memory=jnp.concatenate([sp_mem, p_mem], axis=1),
        memory_pos=jnp.concatenate([sp_pos, p_pos], axis=1),
        memory_valid=jnp.concatenate([sp_ok, p_ok], axis=1),
        num_obj_ptr_tokens=n_p * split,
    )


def prepare_memory_conditioned_features(
    memory_attention: Callable[..., jax.Array],
    bank: MemoryBank,
    cfg: SAM2Config,
    frame_idx: Int,
    num_frames: Int,
    curr: jax.Array,
    curr_pos: jax.Array,
    maskmem_tpos_enc: jax.Array,
    obj_ptr_tpos_proj: Callable[[jax.Array], jax.Array] | None,
    reverse: bool | jax.Array = False,
) -> jax.Array:
    """Official `_prepare_memory_conditioned_features` for a non-initial frame (batch-first).

    curr/curr_pos: [B, HW, d_model] stride-16 features and their sine pos enc (curr_pos may be
    [HW, d_model]). Returns the memory-conditioned features [B, HW, d_model]. (Initial
    conditioning frames skip attention: `curr + no_mem_embed`.)
    """
    mem = assemble_memory(
        bank, cfg, frame_idx, num_frames, maskmem_tpos_enc, obj_ptr_tpos_proj, reverse
    )
    curr_pos = jnp.broadcast_to(curr_pos, curr.shape)
    return memory_attention(
        curr, curr_pos, mem.memory, mem.memory_pos, mem.num_obj_ptr_tokens, mem.memory_valid
    )


def encode_new_memory(
    memory_encoder: Callable[..., tuple[jax.Array, jax.Array]],
    cfg: SAM2Config,
    pix_feat: jax.Array,
    pred_masks_high_res: jax.Array,
    object_score_logits: jax.Array,
    no_obj_embed_spatial: jax.Array | None,
    is_mask_from_pts: bool | jax.Array = False,
    binarize_mask_from_pts: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Official `_encode_new_memory` (eval, `non_overlap_masks_for_mem_enc=False`).

    pix_feat [B, h, w, d_model] (stride-16 backbone features, no memory), pred_masks_high_res
    [B, H, W, 1] logits, object_score_logits [B, 1]. no_obj_embed_spatial: the model's [1,
    mem_dim] parameter (SAM 2.1) or None (2.0). With `binarize_mask_from_pts` (set by
    `build_sam2_video_predictor`) masks from clicks (`is_mask_from_pts`, bool or [B]) are
    binarized instead of passed through sigmoid. Returns (features [B, h, w, mem_dim] float32,
    pos [B, h, w, mem_dim]); the caller chooses the stored dtype (`SAM2Base.encode_memory`).
    """
    logits = pred_masks_high_res.astype(jnp.float32)
    mask = jax.nn.sigmoid(logits)
    if binarize_mask_from_pts:
        binar = jnp.asarray(is_mask_from_pts, bool)
        binar = binar.reshape(binar.shape + (1,) * (4 - binar.ndim))
        mask = jnp.where(binar, (logits > 0).astype(jnp.float32), mask)
    if cfg.sigmoid_scale_for_mem_enc != 1.0:
        mask = mask * cfg.sigmoid_scale_for_mem_enc
    if cfg.sigmoid_bias_for_mem_enc != 0.0:
        mask = mask + cfg.sigmoid_bias_for_mem_enc
    feats, pos = memory_encoder(pix_feat, mask, skip_mask_sigmoid=True)
    feats = feats.astype(jnp.float32)
    if no_obj_embed_spatial is not None:
        present = (object_score_logits > 0).astype(jnp.float32)  # [B, 1]
        emb = jnp.asarray(no_obj_embed_spatial, jnp.float32).reshape(1, 1, 1, -1)
        feats = feats + (1 - present)[:, :, None, None] * emb
    return feats, pos
