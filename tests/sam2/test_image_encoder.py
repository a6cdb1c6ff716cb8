"""Parity of the SAM 2 image encoder (Hiera trunk + FPN neck) and its resizes with official sam2.

References are official SAM2Base models (random init, every parameter perturbed), whose
`image_encoder.*` weights go through the real converter (`torch_to_nnx_params`).

Tolerance: float32 on both sides, but the two frameworks sum in different orders (conv, matmul,
softmax), so every layer adds O(1e-7) relative noise that a deep residual stack carries along;
we require max |jax - torch| <= 1e-4 * max(1, max |torch|) per output map (relative to the
activation scale; the official notes expect ~1e-4 end to end, ~1e-5 per module).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from pam_jax.convert.torch_nnx import torch_to_nnx_params
from torch_ref import build_official_sam2, to_np

from pam_jax.checkpoint import assign_params
from pam_jax.sam2 import ops
from pam_jax.sam2.config import sam2_config
from pam_jax.sam2.image_encoder import ImageEncoder

REL_TOL = 1e-4


def _max_err(got, want) -> tuple[float, float]:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got).all()
    return float(np.abs(got - want).max()), float(max(1.0, np.abs(want).max()))


def _check(got, want, what: str) -> float:
    err, scale = _max_err(got, want)
    assert err <= REL_TOL * scale, f"{what}: max |diff| {err:.3g} > {REL_TOL} * {scale:.3g}"
    return err / scale


# ----------------------------------------------------------------------------------------------
# resizes (ops.py)


@pytest.mark.parametrize(
    "hw_in,hw_out", [((7, 7), (256, 256)), ((14, 14), (64, 48)), ((20, 30), (7, 9))]
)
def test_torch_bicubic_resize(hw_in, hw_out):
    x = np.random.default_rng(0).standard_normal((2, 5, *hw_in)).astype(np.float32)
    want = to_np(
        F.interpolate(torch.from_numpy(x), size=hw_out, mode="bicubic", align_corners=False)
    )
    got_nhwc = ops.torch_bicubic_resize(x.transpose(0, 2, 3, 1), hw_out)
    got_nchw = ops.torch_bicubic_resize(x, hw_out, axes=(-2, -1))
    # O(1) data, 16 float32 products per output: a few ulp
    np.testing.assert_allclose(np.asarray(got_nhwc).transpose(0, 3, 1, 2), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_nchw), want, atol=1e-5)
    # the default jax bicubic is a different filter: make sure the test can tell them apart
    other = jax.image.resize(x, (2, 5, *hw_out), "bicubic")
    assert np.abs(np.asarray(other) - want).max() > 1e-3


@pytest.mark.parametrize(
    "hw_in,hw_out,aa,atol",
    [
        # data N(0, 10) as mask logits: float32 interpolation weights give ~1e-6 absolute
        ((256, 256), (1024, 1024), False, 2e-5),
        ((256, 256), (480, 640), False, 2e-5),
        ((1024, 1024), (256, 256), True, 2e-5),
        ((100, 150), (37, 41), True, 2e-5),
        ((100, 150), (37, 41), False, 2e-5),
        # the generator's full-size upsample: non-integer ratio, one axis up, one down
        ((256, 256), (1024, 1536), False, 2e-5),
        ((100, 150), (200, 75), False, 2e-5),
        # torch's AA upscaling kernel differs from its own plain bilinear by ~1e-5 relative
        # (values here span +-40, so 1e-3 absolute)
        ((256, 256), (480, 640), True, 1e-3),
    ],
)
def test_resize_bilinear(hw_in, hw_out, aa, atol):
    x = (10 * np.random.default_rng(0).standard_normal((1, 2, *hw_in))).astype(np.float32)
    want = to_np(
        F.interpolate(
            torch.from_numpy(x), size=hw_out, mode="bilinear", align_corners=False, antialias=aa
        )
    )
    got = ops.resize_bilinear(x.transpose(0, 2, 3, 1), hw_out, aa)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, atol=atol, rtol=0)
    got_hw = ops.resize_bilinear(x, hw_out, aa, axes=(-2, -1))
    np.testing.assert_allclose(np.asarray(got_hw), want, atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------
# image encoder


def _pair(size: str, image_size: int, version: str = "2.1"):
    ref = build_official_sam2(size, version, image_size=image_size).image_encoder
    cfg = sam2_config(size, version, image_size=image_size)
    model = ImageEncoder(cfg, rngs=nnx.Rngs(0))
    sd = {k: to_np(v) for k, v in ref.state_dict().items()}
    assign_params(model, torch_to_nnx_params(model, sd, what="image_encoder"))
    return ref, model


def _image(image_size: int, batch: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 3, image_size, image_size)).astype(np.float32)


def _nhwc(t) -> np.ndarray:
    return to_np(t).transpose(0, 2, 3, 1)


# Jitted calls: eager JAX compiles every op separately, which is far slower on the CI's 2 cores.
_trunk = nnx.jit(lambda m, x: m.trunk(x))
_neck = nnx.jit(lambda m, xs: m.neck(xs))
_forward = nnx.jit(lambda m, x: m(x))


def _compare(ref, model, x: np.ndarray, tag: str) -> dict[str, float]:
    """Trunk, neck (fed the torch trunk outputs) and full forward vs the official modules."""
    with torch.no_grad():
        xt = torch.from_numpy(x)
        trunk_ref = ref.trunk(xt)
        neck_ref, pos_ref = ref.neck(trunk_ref)
        out_ref = ref(xt)
    xj = jnp.asarray(x.transpose(0, 2, 3, 1))
    errs = {}
    trunk = _trunk(model, xj)
    assert len(trunk) == 4
    for i, (g, w) in enumerate(zip(trunk, trunk_ref)):
        errs[f"trunk{i}"] = _check(g, _nhwc(w), f"trunk level {i}")
    # the neck alone, fed the torch trunk outputs, isolates neck errors from trunk errors
    feats, pos = _neck(model, [jnp.asarray(_nhwc(t)) for t in trunk_ref])
    for i in range(4):
        errs[f"neck{i}"] = _check(feats[i], _nhwc(neck_ref[i]), f"neck {i}")
        errs[f"pos{i}"] = _check(pos[i], _nhwc(pos_ref[i]), f"pos {i}")
    out = _forward(model, xj)
    assert set(out) == {"vision_features", "vision_pos_enc", "backbone_fpn"}
    assert len(out["backbone_fpn"]) == len(out["vision_pos_enc"]) == 3
    errs["vision_features"] = _check(
        out["vision_features"], _nhwc(out_ref["vision_features"]), "vision_features"
    )
    for i in range(3):
        errs[f"fpn{i}"] = _check(out["backbone_fpn"][i], _nhwc(out_ref["backbone_fpn"][i]), "fpn")
        errs[f"vpos{i}"] = _check(
            out["vision_pos_enc"][i], _nhwc(out_ref["vision_pos_enc"][i]), "vision_pos_enc"
        )
    print(tag, "max |diff| / max(1, max |torch|):", {k: f"{v:.2e}" for k, v in errs.items()})
    return errs


@pytest.fixture(scope="module")
def tiny256():
    return _pair("t", 256)


def test_image_encoder_tiny_256(tiny256):
    # 256: the stride-16 (16x16, window 14) and stride-32 (8x8, window 7) maps are zero-padded,
    # so padding, q-pool inside padded windows and cropping are all exercised.
    _compare(*tiny256, _image(256, batch=2), "t 256")


def test_image_encoder_jit_equals_eager(tiny256):
    _, model = tiny256
    x = jnp.asarray(_image(256, seed=1).transpose(0, 2, 3, 1))
    eager = model(x)
    jitted = _forward(model, x)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        # same program, XLA may fuse differently: float32 rounding only
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


_trunk_layout = nnx.jit(lambda m, x, layout: m.trunk(x, layout), static_argnums=2)


@pytest.mark.parametrize("layout", ["stage", "block"])
def test_trunk_non_square(tiny256, layout):
    # the trunk accepts any H, W that are multiples of 32 (192 x 320: windows padded differently
    # along H and W in stage 3 / 4; stage 1 / 2 tile into 6 x 10 windows, kept window-ordered
    # by the "stage" layout, re-partitioned per block by "block")
    ref, model = tiny256
    x = np.random.default_rng(3).standard_normal((1, 3, 192, 320)).astype(np.float32)
    with torch.no_grad():
        want = ref.trunk(torch.from_numpy(x))
    got = _trunk_layout(model, jnp.asarray(x.transpose(0, 2, 3, 1)), layout)
    for i, (g, w) in enumerate(zip(got, want)):
        _check(g, _nhwc(w), f"trunk level {i}")


def test_image_encoder_bf16_close_to_f32(tiny256):
    # bf16 compute (the accelerator setting): params stay float32 and the output stays within
    # bf16 noise of the float32 model (8 mantissa bits, 12 residual blocks -> a few %)
    _, m32 = tiny256
    cfg = sam2_config("t", image_size=256)
    m16 = ImageEncoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    nnx.update(m16, nnx.state(m32, nnx.Param))
    x = jnp.asarray(_image(256).transpose(0, 2, 3, 1))
    a = _forward(m32, x)["vision_features"]
    b = _forward(m16, x)["vision_features"].astype(jnp.float32)
    rel = float(jnp.linalg.norm(b - a) / jnp.linalg.norm(a))
    assert 0 < rel < 5e-2, rel
    for v in jax.tree.leaves(nnx.state(m16, nnx.Param)):
        assert v.dtype == jnp.float32


def test_hiera_output_shapes_and_sharding_names():
    cfg = sam2_config("t", image_size=512)
    model = ImageEncoder(cfg, rngs=nnx.Rngs(0))
    out = jax.eval_shape(
        lambda m, x: m.trunk(x), model, jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32)
    )
    assert [o.shape for o in out] == [
        (1, 128, 128, 96),
        (1, 64, 64, 192),
        (1, 32, 32, 384),
        (1, 16, 16, 768),
    ]
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        md = v.get_metadata()
        names = md.get("out_sharding") or md.get("sharding_names")
        assert names is not None and len(names) == v.ndim, path


@pytest.mark.heavy
@pytest.mark.parametrize("size", ["t", "b+", "l"])
def test_image_encoder_1024(size):
    _compare(*_pair(size, 1024), _image(1024), f"{size} 1024")
