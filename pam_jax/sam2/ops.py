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


@functools.lru_cache(maxsize=64)
def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's 2-tap bilinear sampling (align_corners=False) of n_in -> n_out: indices i0, i1
    [n_out] int32 and the weight of i1 [n_out] float32. As torch's kernel: the scale in float32,
    src = scale * (o + 0.5) - 0.5 evaluated in double then rounded to float, clamped at 0."""
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    o = np.arange(n_out, dtype=np.float64)
    src = np.maximum((scale * (o + 0.5) - 0.5).astype(np.float32), np.float32(0))
    i0 = np.floor(src).astype(np.int32)
    i1 = np.minimum(i0 + 1, n_in - 1).astype(np.int32)
    return i0, i1, (src - i0.astype(np.float32)).astype(np.float32)


def _lerp_axis(x: jax.Array, n_out: int, axis: int) -> jax.Array:
    i0, i1, w1 = bilinear_taps(x.shape[axis], n_out)
    shape = [1] * x.ndim
    shape[axis] = n_out
    w1 = jnp.asarray(w1).reshape(shape)
    return jnp.take(x, i0, axis=axis) * (1 - w1) + jnp.take(x, i1, axis=axis) * w1


def resize_bilinear(
    x: jax.Array, out_hw: tuple[int, int], antialias: bool, axes: tuple[int, int] = (-3, -2)
) -> jax.Array:
    """torch `F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False, antialias=...)`.

    Without antialias (and when upscaling, where antialias changes nothing but rounding): torch's
    two taps per output pixel, gathered with static indices (`bilinear_taps`) so XLA fuses the
    upsample into its consumers (thresholds, counts) instead of running it as a dense matmul
    (the mask upsamples of the image / video predictors and the mask generator). Downscaling
    with antialias: `jax.image.resize(method="linear")`, which widens the triangle by the
    downscale factor exactly like torch's AA path (~1e-6); torch's separate AA kernel differs
    from its own plain bilinear by ~1e-5 relative when upscaling, and we match torch to that
    level there. Computed in float32, output in x.dtype; acts on `axes` (default [..., H, W, C]).
    """
    ah, aw = (a % x.ndim for a in axes)
    upscale = out_hw[0] >= x.shape[ah] and out_hw[1] >= x.shape[aw]
    if antialias and not upscale:
        shape = list(x.shape)
        shape[ah], shape[aw] = out_hw
        y = jax.image.resize(x.astype(jnp.float32), tuple(shape), "linear", antialias=True)
        return y.astype(x.dtype)
    y = x.astype(jnp.float32)
    for ax, n in ((ah, out_hw[0]), (aw, out_hw[1])):
        if y.shape[ax] != n:
            y = _lerp_axis(y, n, ax)
    return y.astype(x.dtype)
