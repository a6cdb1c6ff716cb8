"""Shared SAM 2 numerics that must reproduce torch exactly: bicubic and bilinear resizes.

Both resizes act on two spatial axes chosen by `axes` (default (-3, -2): channels-last
[..., H, W, C], the pam-jax layout). Pass axes=(-2, -1) for [..., H, W] maps such as masks or a
torch-layout [C, H, W] tensor.
"""

from __future__ import annotations

import functools

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
    shape = list(x.shape)
    shape[ah], shape[aw] = out_hw
    y = jax.image.resize(x.astype(jnp.float32), tuple(shape), "linear", antialias=antialias)
    return y.astype(x.dtype)
