"""Hiera token layouts: window-ordered across blocks ("stage") vs the official
per-block partition ("block").

Configs are tiny and chosen by their layout plans (asserted, so a config change cannot silently
stop covering a path): window merges (2 -> 8) and splits (4 -> 2), a window change through the
spatial map (2 -> 3), global blocks on window-ordered tokens with and without q-pooling, a
dimension change without pooling on windows, and padded maps (the per-block fallback, at the end
of a windowed run and, for Hiera-T at 256, through the whole of stage 3 and 4 with its global
blocks).

Tolerance: float32, the same operations on the same values; only the token order inside global
attention and the re-layouts differ, so sums run in other orders: max |stage - block| <=
1e-5 * max(1, max |block|) per stage output (seen: <= 3e-7 relative). Against official sam2 the
tolerance is test_hiera.py's (1e-5 relative, 4-8 residual blocks).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from pam_jax.convert.torch_nnx import torch_to_nnx_params
from torch_ref import to_np

from pam_jax.checkpoint import assign_params
from pam_jax.sam2.common import sdpa
from pam_jax.sam2.config import HIERA, HieraConfig
from pam_jax.sam2.hiera import Hiera, hiera_layout, rewindow, to_spatial, to_windows
from tests.sam2.test_hiera import official_hiera

REL_TOL = 1e-5

# name: (config, image side, expected "stage" plan: each block's input window, 0 = spatial)
CASES = {
    # 2 -> 8 merge before block 5, 4 -> 2 split before block 7, global block 4 on 2-windows
    "merge_split_global": (
        HieraConfig(8, 1, (1, 2, 3, 2), (4,), (8, 4, 8, 2), (7, 7)),
        128,
        [8, 8, 4, 4, 2, 8, 8, 2],
    ),
    # 2 -> 3 through the spatial map; block 4 changes width on 3-windows without pooling;
    # block 5's 6x6 map does not tile into 4-windows: padded, per-block path
    "respatial_padded": (
        HieraConfig(8, 1, (1, 1, 2, 2), (), (8, 4, 3, 4), (7, 7), q_pool=2),
        96,
        [8, 8, 4, 3, 3, 0],
    ),
    # test_hiera.py's config: q-pool blocks 1 and 3 are global (pooled inside the windows)
    "global_q_pool": (
        HieraConfig(8, 1, (1, 1, 1, 1), (1, 3), (8, 4, 4, 2), (7, 7)),
        128,
        [8, 8, 4, 2],
    ),
    # the real tiny model: stage 3/4 windows 14 / 7 pad the 16x16 / 8x8 maps
    "hiera_t_256": (HIERA["t"], 256, [8, 8, 4, 4] + [0] * 8),
}

_fwd = nnx.jit(lambda m, x, layout: m(x, layout), static_argnums=2)


def _image(side: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, side, side, 3)).astype(np.float32)


def _close(got, want, what: str) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.isfinite(got).all(), what
    err, scale = float(np.abs(got - want).max()), float(max(1.0, np.abs(want).max()))
    assert err <= REL_TOL * scale, f"{what}: max |diff| {err:.3g} > {REL_TOL} * {scale:.3g}"


@pytest.mark.parametrize("name", list(CASES))
def test_layouts_equal(name):
    cfg, side, plan = CASES[name]
    model = Hiera(cfg, rngs=nnx.Rngs(0))
    assert model.layout_plan((side // 4, side // 4), "stage") == plan
    assert model.layout_plan((side // 4, side // 4), "block") == [0] * len(plan)
    x = jnp.asarray(_image(side, batch=1 if name == "hiera_t_256" else 2))
    stage, block = _fwd(model, x, "stage"), _fwd(model, x, "block")
    assert len(stage) == len(block) == 4
    for i, (s, b) in enumerate(zip(stage, block)):
        _close(s, b, f"{name} stage output {i}")


@pytest.mark.heavy
def test_layouts_equal_hiera_l():
    # the real Hiera-L at 256 (1 min on CPU): every block window-ordered, one 2 -> 16 merge
    # before stage 3; seen max |stage - block| 2.1e-5 on outputs up to 27 (8e-7 relative)
    model = Hiera(HIERA["l"], rngs=nnx.Rngs(0))
    plan = model.layout_plan((64, 64))
    assert plan == [8] * 3 + [4] * 6 + [16] * 36 + [8] * 3
    x = jnp.asarray(_image(256, batch=1))
    for i, (s, b) in enumerate(zip(_fwd(model, x, "stage"), _fwd(model, x, "block"))):
        _close(s, b, f"hiera-l stage output {i}")


@pytest.mark.parametrize("name", ["merge_split_global", "respatial_padded"])
@pytest.mark.parametrize("layout", ["stage", "block"])
def test_layout_matches_official(name, layout):
    cfg, side, _ = CASES[name]
    ref = official_hiera(cfg)
    x = _image(side)
    with torch.no_grad():
        outs = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    want = [to_np(t).transpose(0, 2, 3, 1) for t in outs]
    model = Hiera(cfg, rngs=nnx.Rngs(0))
    sd = {k: to_np(v) for k, v in ref.state_dict().items()}
    assign_params(model, torch_to_nnx_params(model, sd, what="hiera"))
    got = _fwd(model, jnp.asarray(x), layout)
    for i, (g, w) in enumerate(zip(got, want)):
        _close(g, w, f"{name} {layout} stage output {i}")


def test_default_layout_is_block(monkeypatch):
    monkeypatch.delenv("PAM_JAX_HIERA_LAYOUT", raising=False)
    assert hiera_layout() == "block"  # measured faster on the H200 (hiera.py's docstring)
    cfg, side, plan = CASES["merge_split_global"]
    model = Hiera(cfg, rngs=nnx.Rngs(0))
    assert model.layout_plan((side // 4, side // 4)) == [0] * len(plan)
    monkeypatch.setenv("PAM_JAX_HIERA_LAYOUT", "stage")
    assert hiera_layout() == "stage"
    assert model.layout_plan((side // 4, side // 4)) == plan
    monkeypatch.setenv("PAM_JAX_HIERA_LAYOUT", "block")
    assert hiera_layout("stage") == "stage"  # an explicit layout wins over the env
    monkeypatch.setenv("PAM_JAX_HIERA_LAYOUT", "windows")
    with pytest.raises(ValueError, match="PAM_JAX_HIERA_LAYOUT.*'windows'"):
        hiera_layout()


@pytest.mark.parametrize("w0,ws", [(2, 8), (8, 2), (2, 3), (4, 4)])
def test_rewindow_is_a_relayout(w0, ws):
    # pure data movement: exactly the spatial round trip (24 tiles into 2, 3, 4 and 8)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 24, 48, 5)), jnp.float32)
    got = rewindow(to_windows(x, w0), ws)
    assert got.shape == (2, 24 // ws, 48 // ws, ws, ws, 5)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(to_windows(x, ws)))
    np.testing.assert_array_equal(np.asarray(to_spatial(got)), np.asarray(x))
    with pytest.raises(ValueError, match="does not tile"):
        to_windows(x, 5)


def test_fused_min_len_knob(monkeypatch):
    # CPU always runs XLA's attention, so only the knob's parsing is observable here: any
    # integer leaves the result alone, anything else is a clear error
    q = jnp.asarray(np.random.default_rng(2).standard_normal((2, 16, 1, 8)), jnp.float32)
    want = np.asarray(sdpa(q, q, q))
    monkeypatch.setenv("PAM_JAX_FUSED_MIN_LEN", "65")
    np.testing.assert_array_equal(np.asarray(sdpa(q, q, q)), want)
    monkeypatch.setenv("PAM_JAX_FUSED_MIN_LEN", "short")
    with pytest.raises(ValueError, match="PAM_JAX_FUSED_MIN_LEN.*'short'"):
        sdpa(q, q, q)
