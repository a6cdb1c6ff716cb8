"""Shared SAM 2 numerics that must reproduce torch exactly: bicubic and bilinear resizes.

Both resizes act on two spatial axes chosen by `axes` (default (-3, -2): channels-last
[..., H, W, C], the pam-jax layout). Pass axes=(-2, -1) for [..., H, W] maps such as masks or a
torch-layout [C, H, W] tensor.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """torch's 4 cubic-convolution coefficients for taps at offsets -1, 0, 1, 2 (A = -0.75)."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float32 matrix M with M @ x == torch bicubic (align_corners=False) of x.

    torch samples at src = (o + 0.5) * n_in / n_out - 0.5 (not clamped for cubic), takes taps
    floor(src) - 1 .. floor(src) + 2 clamped to the border, weighted by the A = -0.75 kernel.
    """
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    i0 = np.floor(src)
    w = _cubic_weights(src - i0)  # [n_out, 4]
    taps = np.clip(i0[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, n_in - 1)
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.repeat(np.arange(n_out), 4), taps.reshape(-1)), w.reshape(-1))
    return m.astype(np.float32)


def _resize_separable(
    x: jax.Array, mh: np.ndarray, mw: np.ndarray, axes: tuple[int, int]
) -> jax.Array:
    ah, aw = (a % x.ndim for a in axes)
    x = jnp.moveaxis(x, (ah, aw), (-2, -1))
    dt = x.dtype
    # HIGHEST: these small contractions must stay exact even where the default matmul is bf16.
    y = jnp.einsum(
        "oh,...hw,pw->...op",
        jnp.asarray(mh),
        x.astype(jnp.float32),
        jnp.asarray(mw),
        precision=jax.lax.Precision.HIGHEST,
    )
    return jnp.moveaxis(y.astype(dt), (-2, -1), (ah, aw))


def torch_bicubic_resize(
    x: jax.Array, out_hw: tuple[int, int], axes: tuple[int, int] = (-3, -2)
) -> jax.Array:
    """torch `F.interpolate(x, size=out_hw, mode="bicubic", align_corners=False)`.

    Acts on spatial `axes` (default channels-last [..., H, W, C]); computed in float32 as
    out = M_h @ x @ M_w^T with precomputed tap matrices (`bicubic_matrix`), output in x.dtype.
    """
    h, w = x.shape[axes[0]], x.shape[axes[1]]
    return _resize_separable(x, bicubic_matrix(h, out_hw[0]), bicubic_matrix(w, out_hw[1]), axes)


@functools.lru_cache(maxsize=256)
def linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torch's two bilinear taps per output index (align_corners=False, no antialias): (i0, i1
    [n_out] int32, w0, w1 [n_out] float32), out = w0 x[i0] + w1 x[i1]. torch takes scale = in /
    out in float32 and src = max(scale (o + 0.5) - 0.5, 0) as one fused multiply-add (a single
    rounding: the float64 product of the float32 scale is exact), i0 = floor(src), i1 = min(i0 +
    1, in - 1), w1 = src - i0. Rounding the product first, as plain float32 code would, moves
    w1 by up to 1.5e-5 at src ~ 255: 3e-4 on logits of +-40."""
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    src = (scale * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    w0 = (np.float32(1) - w1).astype(np.float32)
    return i0.astype(np.int32), i1.astype(np.int32), w0, w1


def _lerp_axis(x: jax.Array, axis: int, n_out: int) -> jax.Array:
    """Two-tap bilinear along `axis` (float32): gathers whole slices along it, so on a major
    axis it is a row copy, not the per-element lane gather of a minor one."""
    i0, i1, w0, w1 = linear_taps(x.shape[axis], n_out)
    shape = [1] * x.ndim
    shape[axis] = n_out
    a = jnp.take(x, jnp.asarray(i0), axis=axis)
    b = jnp.take(x, jnp.asarray(i1), axis=axis)
    return a * jnp.asarray(w0).reshape(shape) + b * jnp.asarray(w1).reshape(shape)


def _bilinear_taps(x: jax.Array, out_hw: tuple[int, int], ah: int, aw: int) -> jax.Array:
    """torch's plain bilinear as two separable two-tap passes, width first (torch's order).
    Where the width is the minor axis ([..., H, W] maps), the pass runs on the small input
    transposed, so both passes gather along a major axis. On the CPU this is 4x slower than the
    matmul form inside the generator's filter (XLA's gather fusions), so it is a GPU option."""
    x = x.astype(jnp.float32)
    if aw == x.ndim - 1:
        xt = jnp.swapaxes(x, -1, -2)
        x = jnp.swapaxes(_lerp_axis(xt, x.ndim - 2, out_hw[1]), -1, -2)
    else:
        x = _lerp_axis(x, aw, out_hw[1])
    return _lerp_axis(x, ah, out_hw[0])


def upsample_taps(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """float32 [..., H, W] maps (mask logits) upsampled to out_hw as torch's plain bilinear, in
    the two-tap form (`_bilinear_taps`). Elementwise after a small width pass, so a reduction
    over the result (the mask generator's stability counts and boxes) fuses with it and the
    full-size logits are never written."""
    return _bilinear_taps(x, out_hw, x.ndim - 2, x.ndim - 1)


# The masks' upsample (`resize_bilinear` without antialias, or upscaling) is a float32 matmul
# chain whose second contraction (H x h x W MACs per mask: 0.9 GFLOP per 256^2 -> 1024 x 1536
# mask) is most of the mask generator's filter on the GPU. `PAM_JAX_BILINEAR` (read at trace
# time) picks how it runs there: "bf16x3" (the default on accelerators unless the default matmul
# precision is "highest", as in float32 parity runs: three bf16 tensor-core passes, ~2^-17
# relative, finer than the bf16 model that made the logits), "bf16x6" / "tf32x3"
# (~2^-22 / 2^-21), "highest" (float32 on CUDA cores), or "taps" (two gathered taps per axis, no
# matmul). H200, SAM 2.1-L mask generator, 32 x 32 points at 1024 x 1536 (profile_amg.py, one
# run): highest 163.6 ms / image (filter 81.3), bf16x6 157.9 (76.5), bf16x3 137.4 (56.6). The
# CPU (parity) always runs "highest".
_BILINEAR_ALGOS = {
    "bf16x6": "BF16_BF16_F32_X6",
    "bf16x3": "BF16_BF16_F32_X3",
    "tf32x3": "TF32_TF32_F32_X3",
}


def _bilinear_mode() -> str:
    # float32 parity runs on an accelerator (`jax_default_matmul_precision="highest"`, as
    # tests/conftest.py sets) keep the float32 upsample unless asked otherwise
    full = str(jax.config.jax_default_matmul_precision).lower() in ("highest", "float32")
    mode = os.environ.get("PAM_JAX_BILINEAR", "highest" if full else "bf16x3")
    if mode not in ("highest", "taps", *_BILINEAR_ALGOS):
        raise ValueError(
            f"PAM_JAX_BILINEAR={mode!r}: use highest, taps, {', '.join(_BILINEAR_ALGOS)}"
        )
    return "highest" if jax.default_backend() == "cpu" else mode


def resize_bilinear(
    x: jax.Array, out_hw: tuple[int, int], antialias: bool, axes: tuple[int, int] = (-3, -2)
) -> jax.Array:
    """torch `F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False, antialias=...)`.

    `jax.image.resize(method="linear")` samples at the same half-pixel centres, renormalises its
    border weights (which equals torch's clamping) and, with antialias, widens the triangle by the
    downscale factor exactly like torch's AA path (~1e-6). When upscaling, AA changes nothing in
    JAX, while torch's separate AA kernel differs from its own plain bilinear by ~1e-5 relative;
    we match torch to that level there.
    Computed in float32, output in x.dtype; acts on `axes` (default [..., H, W, C]).
    """
    ah, aw = (a % x.ndim for a in axes)
    down = out_hw[0] < x.shape[ah] or out_hw[1] < x.shape[aw]
    mode = "highest" if (antialias and down) else _bilinear_mode()
    if mode == "taps":
        return _bilinear_taps(x, out_hw, ah, aw).astype(x.dtype)
    precision = (
        jax.lax.Precision.HIGHEST
        if mode == "highest"
        else getattr(jax.lax.DotAlgorithmPreset, _BILINEAR_ALGOS[mode])
    )
    shape = list(x.shape)
    shape[ah], shape[aw] = out_hw
    y = jax.image.resize(
        x.astype(jnp.float32), tuple(shape), "linear", antialias=antialias, precision=precision
    )
    return y.astype(x.dtype)
