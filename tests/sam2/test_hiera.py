"""Hiera trunk parity at a tiny config whose q-pool blocks are also global-attention blocks.

Official sam2==1.1.0 `MultiScaleBlock.forward` computes the un-partition padding as
`H % (window_size // q_stride)` even when `window_size == 0` (global attention), so such a block
raises ZeroDivisionError there; that padding only feeds `window_unpartition`, which a global block
skips. The reference is therefore the official block with `q_stride = None` on those blocks: the
official pooling itself (`self.pool` in the attention and the shortcut) is untouched, only the
unused bookkeeping branch is switched off.

Tolerance: float32 on both sides, 4 residual blocks; the frameworks sum in different orders, so
each layer adds O(1e-7) relative noise: max |jax - torch| <= 1e-5 * max(1, max |torch|) per stage
output (the image-encoder parity test allows 1e-4 for 12+ blocks).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from pam_jax.convert.torch_nnx import torch_to_nnx_params
from torch_ref import perturb_, to_np

from pam_jax.checkpoint import assign_params
from pam_jax.sam2.config import HieraConfig
from pam_jax.sam2.hiera import Hiera

REL_TOL = 1e-5

# q-pool blocks are 1, 2, 3 (one per stage change); 1 and 3 are also global
CFG = HieraConfig(
    embed_dim=8,
    num_heads=1,
    stages=(1, 1, 1, 1),
    global_att_blocks=(1, 3),
    window_spec=(8, 4, 4, 2),
    window_pos_embed_bkg_spatial_size=(7, 7),
)


def official_hiera(cfg: HieraConfig = CFG):
    """The official hieradet `Hiera` at `cfg`, every parameter perturbed, in eval mode."""
    from sam2.modeling.backbones.hieradet import Hiera as TorchHiera

    torch.manual_seed(0)
    ref = TorchHiera(
        embed_dim=cfg.embed_dim,
        num_heads=cfg.num_heads,
        q_pool=cfg.q_pool,
        q_stride=tuple(cfg.q_stride),
        stages=tuple(cfg.stages),
        dim_mul=cfg.dim_mul,
        head_mul=cfg.head_mul,
        window_pos_embed_bkg_spatial_size=tuple(cfg.window_pos_embed_bkg_spatial_size),
        window_spec=tuple(cfg.window_spec),
        global_att_blocks=tuple(cfg.global_att_blocks),
    )
    perturb_(ref)
    return ref.eval()


def test_global_q_pool_block_matches_official():
    assert set(CFG.q_pool_blocks) & set(CFG.global_att_blocks) == {1, 3}
    ref = official_hiera()
    x = np.random.default_rng(0).standard_normal((2, 3, 128, 128)).astype(np.float32)
    xt = torch.from_numpy(x)
    with torch.no_grad(), pytest.raises(ZeroDivisionError):
        ref(xt)  # the upstream bug this config exercises
    for i in CFG.global_att_blocks:
        assert ref.blocks[i].window_size == 0 and ref.blocks[i].pool is not None
        ref.blocks[i].q_stride = None
    with torch.no_grad():
        want = [to_np(t).transpose(0, 2, 3, 1) for t in ref(xt)]

    model = Hiera(CFG, rngs=nnx.Rngs(0))
    sd = {k: to_np(v) for k, v in ref.state_dict().items()}
    assign_params(model, torch_to_nnx_params(model, sd, what="hiera"))
    got = nnx.jit(lambda m, a: m(a))(model, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert (
        [g.shape for g in got]
        == [w.shape for w in want]
        == [
            (2, 32, 32, 8),
            (2, 16, 16, 16),
            (2, 8, 8, 32),
            (2, 4, 4, 64),
        ]
    )
    for i, (g, w) in enumerate(zip(got, want)):
        g = np.asarray(g)
        assert np.isfinite(g).all()
        err, scale = float(np.abs(g - w).max()), float(max(1.0, np.abs(w).max()))
        assert err <= REL_TOL * scale, f"stage {i}: max |diff| {err:.3g} > {REL_TOL} * {scale:.3g}"
