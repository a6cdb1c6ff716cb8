"""Parity of the SAM 2 memory modules with the official PyTorch code (float32, CPU).

Reference: `build_official_sam2("t", "2.1", image_size=512)` (stride-16 map 32x32, masks 512x512)
with every parameter perturbed; the CXBlock layer-scale gammas are additionally set to O(1)
values, otherwise (1e-6 init + 0.02 noise) the fuser branch would be too small to test.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from pam_jax.convert.torch_nnx import torch_to_nnx_params
from torch_ref import build_official_sam2, to_np

from pam_jax.checkpoint import assign_params
from pam_jax.sam2.memory_attention import MemoryAttention
from pam_jax.sam2.memory_encoder import MemoryEncoder

HW = 32  # feature side at image_size 512


@pytest.fixture(scope="module")
def official():
    torch.set_num_threads(1)
    m = build_official_sam2("t", "2.1", image_size=512)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in m.memory_encoder.fuser.layers:
            layer.gamma.copy_(1.0 + 0.5 * torch.randn(layer.gamma.shape, generator=g))
    return m


def _load(make, official, prefix: str) -> nnx.Module:
    """Build `make()` abstractly (random init is slow on a busy CPU) and load the weights."""
    jax_module = nnx.eval_shape(make)
    sd = {k: to_np(v) for k, v in official.state_dict().items()}
    params = torch_to_nnx_params(
        jax_module, sd, rename=lambda k: k[len(prefix) :] if k.startswith(prefix) else None
    )
    return assign_params(jax_module, params)


@pytest.fixture(scope="module")
def jax_encoder(official):
    return _load(lambda: MemoryEncoder(64, 256, rngs=nnx.Rngs(0)), official, "memory_encoder.")


@pytest.fixture(scope="module")
def jax_attention(official):
    return _load(lambda: MemoryAttention(256, 4, rngs=nnx.Rngs(0)), official, "memory_attention.")


def _close(got, want, atol: float, what: str) -> None:
    err = float(np.abs(np.asarray(got) - np.asarray(want)).max())
    print(f"{what}: max |d| = {err:.3g} (atol {atol:.3g})")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=atol, rtol=0)


# Whole-program jit: op-by-op eager dispatch compiles every op separately (slow on CI CPUs).
_run_encoder = nnx.jit(lambda m, pix, masks, skip: m(pix, masks, skip), static_argnums=3)
_run_attention = nnx.jit(
    lambda m, c, cp, mem, mp, n, valid=None: m(c, cp, mem, mp, n, valid), static_argnums=5
)


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("skip_mask_sigmoid", [True, False])
def test_memory_encoder(official, jax_encoder, skip_mask_sigmoid):
    rng = np.random.default_rng(0)
    pix = rng.standard_normal((2, HW, HW, 256)).astype(np.float32)
    masks = (10 * rng.standard_normal((2, 16 * HW, 16 * HW, 1))).astype(np.float32)
    with torch.no_grad():
        out = official.memory_encoder(_nchw(pix), _nchw(masks), skip_mask_sigmoid)
    want = to_np(out["vision_features"]).transpose(0, 2, 3, 1)
    want_pos = to_np(out["vision_pos_enc"][0]).transpose(0, 2, 3, 1)
    feats, pos = _run_encoder(jax_encoder, pix, masks, skip_mask_sigmoid)
    assert feats.shape == (2, HW, HW, 64) and pos.shape == (2, HW, HW, 64)
    # O(1-10) activations after 6 convs, 2 ConvNeXt blocks and 9 LayerNorms in float32:
    # accumulation-order differences only; measured max |d| 2e-6 relative to the output scale.
    scale = np.abs(want).max()
    _close(feats, want, 1e-5 * scale, f"encoder features (scale {scale:.3g})")
    _close(pos, want_pos, 1e-5, "encoder pos")


def test_memory_encoder_fuser_branch_active(official):
    """The fuser residual branch must change the output a lot, or the test above proves little."""
    rng = np.random.default_rng(1)
    pix = _nchw(rng.standard_normal((1, HW, HW, 256)).astype(np.float32))
    masks = _nchw((10 * rng.standard_normal((1, 16 * HW, 16 * HW, 1))).astype(np.float32))
    enc = official.memory_encoder
    with torch.no_grad():
        full = to_np(enc(pix, masks, True)["vision_features"])
        saved = [layer.gamma.clone() for layer in enc.fuser.layers]
        for layer in enc.fuser.layers:
            layer.gamma.zero_()
        try:
            no_fuser = to_np(enc(pix, masks, True)["vision_features"])
        finally:
            for layer, g in zip(enc.fuser.layers, saved):
                layer.gamma.copy_(g)
    assert np.abs(full - no_fuser).max() > 0.2 * np.abs(full).max()


def _attn_inputs(rng, b: int, n_frames: int, n_ptr_tokens: int, side: int = HW):
    curr = rng.standard_normal((b, side * side, 256)).astype(np.float32)
    curr_pos = rng.standard_normal((b, side * side, 256)).astype(np.float32)
    m = n_frames * side * side + n_ptr_tokens
    mem = rng.standard_normal((b, m, 64)).astype(np.float32)
    mem_pos = rng.standard_normal((b, m, 64)).astype(np.float32)
    return curr, curr_pos, mem, mem_pos


def _official_attn(official, curr, curr_pos, mem, mem_pos, n_ptr_tokens):
    def seq(x):  # batch-first numpy -> seq-first torch
        return torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 2)))

    with torch.no_grad():
        out = official.memory_attention(
            curr=seq(curr),
            curr_pos=seq(curr_pos),
            memory=seq(mem),
            memory_pos=seq(mem_pos),
            num_obj_ptr_tokens=n_ptr_tokens,
        )
    return to_np(out).transpose(1, 0, 2)


# Outputs are LayerNorm-ed (O(1)); 4 layers of float32 attention over ~2k keys and a 2048-wide
# MLP: accumulation-order differences only (measured 1.9e-6).
ATTN_ATOL = 1e-5


@pytest.mark.parametrize("n_frames,n_ptr_tokens", [(2, 16), (2, 0)])
def test_memory_attention(official, jax_attention, n_frames, n_ptr_tokens):
    rng = np.random.default_rng(2)
    curr, curr_pos, mem, mem_pos = _attn_inputs(rng, 2, n_frames, n_ptr_tokens)
    want = _official_attn(official, curr, curr_pos, mem, mem_pos, n_ptr_tokens)
    got = np.asarray(_run_attention(jax_attention, curr, curr_pos, mem, mem_pos, n_ptr_tokens))
    assert got.shape == want.shape == (2, HW * HW, 256)
    _close(got, want, ATTN_ATOL, f"attention {n_frames} frames {n_ptr_tokens} ptr tokens")


def test_memory_attention_masked_slots(official, jax_attention):
    """Masked (empty) frames / pointer tokens give the result of leaving them out entirely."""
    rng = np.random.default_rng(3)
    n_frames, n_ptr = 3, 8  # capacity: 3 memory frames, 8 pointers (32 tokens)
    curr, curr_pos, mem, mem_pos = _attn_inputs(rng, 2, n_frames, 4 * n_ptr)
    frame_valid = np.array([[True, False, True], [False, True, False]])
    ptr_valid = np.array([[1, 1, 0, 1, 0, 0, 1, 1], [0, 0, 0, 0, 1, 0, 0, 0]], bool)
    valid = np.concatenate(
        [np.repeat(frame_valid, HW * HW, axis=1), np.repeat(ptr_valid, 4, axis=1)], axis=1
    )
    got = np.asarray(_run_attention(jax_attention, curr, curr_pos, mem, mem_pos, 4 * n_ptr, valid))
    for b in range(2):
        sel = valid[b]
        n_keep = 4 * int(ptr_valid[b].sum())
        args = (curr[b : b + 1], curr_pos[b : b + 1], mem[b : b + 1, sel], mem_pos[b : b + 1, sel])
        compact = np.asarray(_run_attention(jax_attention, *args, n_keep))
        # same keys, masked ones get softmax weight exactly 0; only the reduction length (and so
        # XLA's summation order) differs: a few float32 ulp through 4 layers (measured 1.4e-6)
        _close(got[b], compact[0], 5e-6, "masked vs compact")
        want = _official_attn(official, *args, n_keep)
        _close(got[b], want[0], ATTN_ATOL, "masked vs official compact")


# ---------------------------------------------------------------------------------------------
# Fixed-capacity memory bank vs the official `_prepare_memory_conditioned_features`.


def _rand_frame(g: torch.Generator):
    """One official per-frame output: bf16 memory features [1, 64, h, w], obj_ptr [1, 256]."""
    feats = torch.randn(1, 64, HW, HW, generator=g).to(torch.bfloat16)
    return feats, torch.randn(1, 256, generator=g)


def _insert(*args):
    import jax

    from pam_jax.sam2 import memory as mb

    global _INSERT_JIT
    if "_INSERT_JIT" not in globals():
        _INSERT_JIT = jax.jit(mb.insert_memory, static_argnums=4)
    return _INSERT_JIT(*args)


def _bank_case(official, cfg, objects, frame_idx, num_frames, reverse, num_cond=3):
    """objects: per object (cond frames, non-cond frames in insertion order). Runs the official
    function per object (B=1) and ours batched over objects; returns per-object pairs."""
    import jax.numpy as jnp

    from pam_jax.sam2 import memory as mb
    from pam_jax.sam2.common import linear

    g = torch.Generator().manual_seed(frame_idx)
    b = len(objects)
    mem_pos = torch.randn(1, 64, HW, HW, generator=g)  # shared by all memories (as official)
    mem_pos_hwc = to_np(mem_pos)[0].transpose(1, 2, 0).reshape(HW * HW, 64)
    bank = mb.init_memory_bank(cfg, b, num_cond=num_cond, mem_pos=mem_pos_hwc)
    dicts = []
    for i, (conds, nonconds) in enumerate(objects):
        od = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        upd = np.arange(b) == i
        for is_cond, frames in ((True, conds), (False, nonconds)):
            key = "cond_frame_outputs" if is_cond else "non_cond_frame_outputs"
            for f in frames:
                feats, ptr = _rand_frame(g)
                od[key][f] = {
                    "maskmem_features": feats,
                    "maskmem_pos_enc": [mem_pos],
                    "obj_ptr": ptr,
                }
                f_np = to_np(feats.float())[0].transpose(1, 2, 0)[None].repeat(b, 0)
                bank = _insert(bank, np.int32(f), f_np, to_np(ptr).repeat(b, 0), is_cond, upd)
        dicts.append(od)

    curr = torch.randn(HW * HW, b, 256, generator=g)
    curr_pos = torch.randn(HW * HW, b, 256, generator=g)
    want, captured = [], []
    orig = official.memory_attention.forward

    def spy(*args, **kw):
        captured.append(kw)
        return orig(*args, **kw)

    official.memory_attention.forward = spy
    try:
        with torch.no_grad():
            for i, od in enumerate(dicts):
                out = official._prepare_memory_conditioned_features(
                    frame_idx=frame_idx,
                    is_init_cond_frame=False,
                    current_vision_feats=[curr[:, i : i + 1]],
                    current_vision_pos_embeds=[curr_pos[:, i : i + 1]],
                    feat_sizes=[(HW, HW)],
                    output_dict=od,
                    num_frames=num_frames,
                    track_in_reverse=reverse,
                )
                want.append(to_np(out)[0].transpose(1, 2, 0).reshape(HW * HW, 256))
    finally:
        del official.memory_attention.forward

    sd = official.state_dict()
    tpos_proj = None
    if cfg.proj_tpos_enc_in_obj_ptrs:
        tpos_proj = linear(256, 64, nnx.Rngs(0))
        tpos_proj.kernel[...] = jnp.asarray(to_np(sd["obj_ptr_tpos_proj.weight"]).T)
        tpos_proj.bias[...] = jnp.asarray(to_np(sd["obj_ptr_tpos_proj.bias"]))
    tpos = to_np(sd["maskmem_tpos_enc"])
    seq_b = to_np(curr).transpose(1, 0, 2)
    pos_b = to_np(curr_pos).transpose(1, 0, 2)
    mem = nnx.jit(
        lambda bk, p: mb.assemble_memory(bk, cfg, frame_idx, num_frames, tpos, p, reverse)
    )(bank, tpos_proj)
    return bank, mem, want, captured, (seq_b, pos_b, tpos, tpos_proj)


def _check_tokens(mem, captured, b):
    """The valid tokens of object b are exactly the official memory tokens (as a multiset)."""
    valid = np.asarray(mem.memory_valid[b])
    n_ptr = mem.num_obj_ptr_tokens
    ours_m, ours_p = np.asarray(mem.memory[b]), np.asarray(mem.memory_pos[b])
    off_m = to_np(captured["memory"])[:, 0]
    off_p = to_np(captured["memory_pos"])[:, 0]
    n_off_ptr = captured["num_obj_ptr_tokens"]
    sp_ok, p_ok = valid[:-n_ptr], valid[-n_ptr:]
    assert sp_ok.sum() == len(off_m) - n_off_ptr
    assert p_ok.sum() == n_off_ptr

    def sort_rows(m, p):
        x = np.concatenate([m, p], axis=1)
        return x[np.lexsort(x.T[::-1])]

    got_sp = sort_rows(ours_m[:-n_ptr][sp_ok], ours_p[:-n_ptr][sp_ok])
    want_sp = sort_rows(off_m[: len(off_m) - n_off_ptr], off_p[: len(off_m) - n_off_ptr])
    np.testing.assert_array_equal(got_sp, want_sp)  # same bf16 values, same float32 sums
    if n_off_ptr:
        got_p = sort_rows(ours_m[-n_ptr:][p_ok], ours_p[-n_ptr:][p_ok])
        want_p = sort_rows(off_m[-n_off_ptr:], off_p[-n_off_ptr:])
        # pointer pos = sine -> 256x64 linear: float32 rounding only
        np.testing.assert_allclose(got_p, want_p, atol=1e-5, rtol=0)


BANK_CASES = {
    # forward: cond 0 and 9 (9 sits among the recent frames), a future cond 15 (memory but no
    # pointer); more non-cond frames than the 6 recent slots hold
    "forward": (
        [((0, 9, 15), (1, 2, 3, 4, 5, 6, 7, 8, 10, 11)), ((2,), (3, 4, 5, 6, 7, 8, 9, 10, 11))],
        12,
        20,
        False,
    ),
    # reverse tracking from cond frame 19 down to 8, plus a cond frame in the past (3)
    "reverse": (
        [((19, 3), (18, 17, 16, 15, 14, 13, 12, 11, 10, 9)), ((14,), (13, 12, 11, 10, 9))],
        8,
        20,
        True,
    ),
    # short video: max pointers min(num_frames, 16) = 6, some pointers too far back
    "short": ([((0,), (1, 2, 3, 4, 5)), ((1,), (2, 3, 4, 5))], 6, 7, False),
}


# SAM 2.0 has no pointer tpos (zeros), so direction/length only matter for 2.1: 2.0 runs one
# case by default, the rest with -m heavy.
@pytest.mark.parametrize(
    "version,case",
    [("2.1", c) for c in BANK_CASES]
    + [("2.0", "forward")]
    + [pytest.param("2.0", c, marks=pytest.mark.heavy) for c in ("reverse", "short")],
)
def test_memory_bank_vs_official(version, case):
    from pam_jax.sam2 import memory as mb
    from pam_jax.sam2.config import sam2_config

    torch.set_num_threads(1)
    official = build_official_sam2("t", version, image_size=512)
    cfg = sam2_config("t", version, image_size=512)
    objects, frame_idx, num_frames, reverse = BANK_CASES[case]
    bank, mem, want, captured, (curr, curr_pos, tpos, tpos_proj) = _bank_case(
        official, cfg, objects, frame_idx, num_frames, reverse
    )
    for i in range(len(objects)):
        _check_tokens(mem, captured[i], i)
    attn = _load(lambda: MemoryAttention(256, 4, rngs=nnx.Rngs(0)), official, "memory_attention.")
    prepare = nnx.jit(
        lambda a, p, bk, c, cp: mb.prepare_memory_conditioned_features(
            a, bk, cfg, frame_idx, num_frames, c, cp, tpos, p, reverse
        )
    )
    got = prepare(attn, tpos_proj, bank, curr, curr_pos)
    for i in range(len(objects)):
        _close(got[i], want[i], ATTN_ATOL, f"{version} {case} object {i}")


def _small_bank(b=2, **kw):
    from pam_jax.sam2 import memory as mb
    from pam_jax.sam2.config import sam2_config

    cfg = sam2_config("t", "2.1", image_size=64)  # 4x4 memory maps: bookkeeping tests only
    return cfg, mb.init_memory_bank(cfg, b, **kw)


def test_memory_bank_ring_buffer():
    from pam_jax.sam2 import memory as mb

    cfg, bank = _small_bank(num_cond=2, num_recent=3, num_ptrs=4)
    feats = np.ones((2, 4, 4, 64), np.float32)
    ptr = np.ones((2, 256), np.float32)
    for f in range(1, 7):  # 6 non-cond frames into 3 memory / 4 pointer slots
        bank = mb.insert_memory(bank, f, feats * f, ptr * f, False)
    assert sorted(np.asarray(bank.recent_frames[0])) == [4, 5, 6]
    assert sorted(np.asarray(bank.ptr_frames[0])) == [3, 4, 5, 6]
    # memories keep the bf16 rounding of what was inserted
    bank = mb.insert_memory(bank, 5, feats * 1.001, ptr * 50, False)  # re-run frame 5: overwrite
    slot = int(np.argmax(np.asarray(bank.recent_frames[0]) == 5))
    assert bank.recent_feats.dtype == jnp.bfloat16
    assert float(bank.recent_feats[0, slot, 0, 0]) == float(jnp.bfloat16(1.001))
    assert sorted(np.asarray(bank.recent_frames[0])) == [4, 5, 6]
    # a cond insert for object 1 only drops that object's non-cond entries of the frame
    bank = mb.insert_memory(bank, 6, feats, ptr, True, update=np.array([False, True]))
    assert np.asarray(bank.cond_valid).tolist() == [[False, False], [True, False]]
    assert 6 in np.asarray(bank.recent_frames[0])[np.asarray(bank.recent_valid[0])]
    assert 6 not in np.asarray(bank.recent_frames[1])[np.asarray(bank.recent_valid[1])]
    assert 6 not in np.asarray(bank.ptr_frames[1])[np.asarray(bank.ptr_valid[1])]
    bank = mb.remove_frame(bank, 4)
    assert 4 not in np.asarray(bank.recent_frames)[np.asarray(bank.recent_valid)]


def test_memory_bank_jit_matches_eager():
    """insert/assemble are jittable with traced frame index, video length, direction, flags."""
    import jax

    from pam_jax.sam2 import memory as mb

    cfg, bank = _small_bank()
    rng = np.random.default_rng(0)
    from pam_jax.sam2.common import linear

    tpos = rng.standard_normal((7, 1, 1, 64)).astype(np.float32)
    proj = linear(256, 64, nnx.Rngs(0))
    ins = jax.jit(mb.insert_memory)
    asm = jax.jit(lambda bk, f, n, r: mb.assemble_memory(bk, cfg, f, n, tpos, proj, r))
    eager = bank
    for f, cond in [(0, True), (1, False), (2, False), (5, True), (3, False)]:
        feats = rng.standard_normal((2, 16, 64)).astype(np.float32)
        ptr = rng.standard_normal((2, 256)).astype(np.float32)
        bank = ins(bank, np.int32(f), feats, ptr, np.array(cond))
        eager = mb.insert_memory(eager, f, feats, ptr, cond)
    for f, n, r in [(4, 10, False), (2, 6, True)]:
        got = asm(bank, np.int32(f), np.int32(n), np.array(r))
        want = mb.assemble_memory(eager, cfg, f, n, tpos, proj, r)
        assert got.num_obj_ptr_tokens == want.num_obj_ptr_tokens == (4 + 15) * 4
        np.testing.assert_array_equal(np.asarray(got.memory_valid), np.asarray(want.memory_valid))
        for a, b in [(got.memory, want.memory), (got.memory_pos, want.memory_pos)]:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
        assert np.asarray(got.memory_valid).any()


def test_memory_modules_annotated_and_bf16(jax_encoder, jax_attention):
    """Every Param has logical axis names; bf16 compute runs and stays close to float32."""
    import jax.numpy as jnp

    from pam_jax.sharding import unannotated_params

    assert unannotated_params(jax_encoder) == []
    assert unannotated_params(jax_attention) == []
    enc16 = nnx.eval_shape(lambda: MemoryEncoder(64, 256, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    att16 = nnx.eval_shape(lambda: MemoryAttention(256, 4, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    nnx.update(enc16, nnx.state(jax_encoder))
    nnx.update(att16, nnx.state(jax_attention))
    rng = np.random.default_rng(4)
    side = 8  # small maps: bf16 convolutions are slow on CPU
    pix = rng.standard_normal((1, side, side, 256)).astype(np.float32)
    masks = (10 * rng.standard_normal((1, 16 * side, 16 * side, 1))).astype(np.float32)
    f32, _ = _run_encoder(jax_encoder, pix, masks, True)
    b16, pos16 = _run_encoder(enc16, pix, masks, True)
    assert b16.dtype == pos16.dtype == jnp.bfloat16
    # bf16 activations (8-bit mantissa) through ~10 layers: a few % of the output scale
    scale = float(np.abs(np.asarray(f32)).max())
    assert float(np.abs(np.asarray(b16, np.float32) - np.asarray(f32)).max()) < 0.1 * scale
    curr, curr_pos, mem, mem_pos = _attn_inputs(rng, 1, 2, 16, side)
    a32 = np.asarray(_run_attention(jax_attention, curr, curr_pos, mem, mem_pos, 16))
    a16 = _run_attention(att16, curr, curr_pos, mem, mem_pos, 16)
    assert a16.dtype == jnp.bfloat16
    assert float(np.abs(np.asarray(a16, np.float32) - a32).max()) < 0.25  # LayerNorm-ed, O(1)


@pytest.mark.parametrize("binarize", [False, True])
def test_encode_new_memory(official, jax_encoder, binarize):
    """vs official `_encode_new_memory` (2.1: no_obj_embed_spatial on absent objects)."""
    from pam_jax.sam2 import memory as mb
    from pam_jax.sam2.config import sam2_config

    cfg = sam2_config("t", "2.1", image_size=512)
    rng = np.random.default_rng(5)
    b = 3
    pix = rng.standard_normal((b, HW, HW, 256)).astype(np.float32)
    masks = (10 * rng.standard_normal((b, 16 * HW, 16 * HW, 1))).astype(np.float32)
    scores = np.array([[2.0], [-3.0], [0.5]], np.float32)  # object 1 absent
    seq = torch.from_numpy(np.ascontiguousarray(pix.reshape(b, HW * HW, 256).transpose(1, 0, 2)))
    official.binarize_mask_from_pts_for_mem_enc = binarize
    try:
        with torch.no_grad():
            want, want_pos = official._encode_new_memory(
                current_vision_feats=[seq],
                feat_sizes=[(HW, HW)],
                pred_masks_high_res=_nchw(masks),
                object_score_logits=torch.from_numpy(scores),
                is_mask_from_pts=True,
            )
    finally:
        official.binarize_mask_from_pts_for_mem_enc = False
    want = to_np(want).transpose(0, 2, 3, 1)
    emb = to_np(official.no_obj_embed_spatial)
    fn = nnx.jit(lambda enc, p, m, s, e: mb.encode_new_memory(enc, cfg, p, m, s, e, True, binarize))
    got, pos = fn(jax_encoder, pix, masks, scores, emb)
    assert pos.shape == (b, HW, HW, 64)
    _close(pos, to_np(want_pos[0]).transpose(0, 2, 3, 1), 1e-5, "encode_new_memory pos")
    scale = float(np.abs(want).max())
    # same tolerance as test_memory_encoder (same network)
    _close(got, want, 1e-5 * scale, f"encode_new_memory binarize={binarize}")
