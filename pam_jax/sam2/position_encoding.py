"""SAM 2 position encodings: 2-D sine, random Fourier (prompt encoder), axial RoPE, 1-D sine.

Mirrors `sam2.modeling.position_encoding` and `sam2_utils.get_1d_sine_pe`, channels-last and
without batch dims. Every computation is float32, in the same op order as the official code, so
the results match torch to float32 rounding (see tests/sam2/test_position_encoding.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def _dim_t(npf: int, temperature: float) -> jax.Array:
    """temperature ** (2 * (i // 2) / npf), float32 like torch's."""
    i = jnp.arange(npf, dtype=jnp.float32)
    return jnp.float32(temperature) ** (2 * (i // 2) / npf)


def position_embedding_sine(
    h: int, w: int, num_pos_feats: int, temperature: float = 10000.0
) -> jax.Array:
    """Official `PositionEmbeddingSine(num_pos_feats)` (normalize=True, scale 2pi) for an h x w map.

    Returns [h, w, num_pos_feats]: channels are cat(pos_y, pos_x), each num_pos_feats // 2 wide
    with sin/cos interleaved (sin on even channels, cos on odd ones).
    """
    if num_pos_feats % 2:
        raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
    npf = num_pos_feats // 2
    scale = 2 * math.pi
    eps = 1e-6
    y = jnp.arange(1, h + 1, dtype=jnp.float32)
    x = jnp.arange(1, w + 1, dtype=jnp.float32)
    y = y / (y[-1:] + eps) * scale
    x = x / (x[-1:] + eps) * scale
    dim_t = _dim_t(npf, temperature)

    def interleave(p: jax.Array) -> jax.Array:  # [n, npf] -> sin(even) / cos(odd) interleaved
        return jnp.stack([jnp.sin(p[:, 0::2]), jnp.cos(p[:, 1::2])], axis=-1).reshape(p.shape)

    pos_y = interleave(y[:, None] / dim_t)  # [h, npf]
    pos_x = interleave(x[:, None] / dim_t)  # [w, npf]
    pos_y = jnp.broadcast_to(pos_y[:, None, :], (h, w, npf))
    pos_x = jnp.broadcast_to(pos_x[None, :, :], (h, w, npf))
    return jnp.concatenate([pos_y, pos_x], axis=-1)


class PositionEmbeddingRandom(nnx.Module):
    """Official `PositionEmbeddingRandom`: random spatial frequencies, cat(sin, cos)."""

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None, *, rngs: nnx.Rngs):
        if scale is None or scale <= 0.0:
            scale = 1.0
        # A torch buffer, but stored in the checkpoint: a Param with the torch name and shape.
        self.positional_encoding_gaussian_matrix = nnx.Param(
            scale * jax.random.normal(rngs.params(), (2, num_pos_feats), jnp.float32),
            out_sharding=(None, "vis_embed"),
        )

    def _pe_encoding(self, coords: jax.Array) -> jax.Array:
        """coords [..., 2] in [0, 1] -> [..., 2 * num_pos_feats]."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix[...]
        coords = 2 * math.pi * coords
        return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

    def __call__(self, size: tuple[int, int]) -> jax.Array:
        """Dense encoding of an h x w grid sampled at cell centres: [h, w, 2 * num_pos_feats]."""
        h, w = size
        y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
        x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
        grid = jnp.stack(
            [jnp.broadcast_to(x[None, :], (h, w)), jnp.broadcast_to(y[:, None], (h, w))], axis=-1
        )
        return self._pe_encoding(grid)

    def forward_with_coords(self, coords: jax.Array, image_size: tuple[int, int]) -> jax.Array:
        """Encode pixel coords [..., 2] (x, y) of an image of size (h, w): [..., 2 * npf].

        As in the official code the caller adds the +0.5 pixel-centre shift beforehand.
        """
        coords = coords.astype(jnp.float32)
        coords = jnp.stack(
            [coords[..., 0] / image_size[1], coords[..., 1] / image_size[0]], axis=-1
        )
        return self._pe_encoding(coords)


# ----------------------------------------------------------------------------------------------
# Axial rotary position encoding (memory attention). Real arithmetic on interleaved pairs instead
# of torch's complex view; cos/sin stand for freqs_cis.real / .imag.


def compute_axial_cis(
    dim: int, end_x: int, end_y: int, theta: float = 10000.0
) -> tuple[jax.Array, jax.Array]:
    """Official `compute_axial_cis` as (cos, sin), each float32 [end_x * end_y, dim // 2].

    Columns [0, dim//4) rotate by the x position (t % end_x), [dim//4, dim//2) by y (t // end_x).
    """
    freqs = 1.0 / (
        jnp.float32(theta) ** (jnp.arange(0, dim, 4, dtype=jnp.float32)[: dim // 4] / dim)
    )
    t = jnp.arange(end_x * end_y, dtype=jnp.int32)
    t_x = (t % end_x).astype(jnp.float32)
    t_y = (t // end_x).astype(jnp.float32)
    angles = jnp.concatenate([jnp.outer(t_x, freqs), jnp.outer(t_y, freqs)], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Complex multiply of pairs (x[2j], x[2j+1]) by (cos_j + i sin_j), in float32."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    xr, xi = xf[..., 0], xf[..., 1]
    out = jnp.stack([xr * cos - xi * sin, xr * sin + xi * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def apply_rotary_enc(
    xq: jax.Array, xk: jax.Array, cos: jax.Array, sin: jax.Array, repeat_freqs_k: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Official `apply_rotary_enc` on q [..., Lq, D], k [..., Lk, D]; cos/sin [Lq, D // 2].

    With `repeat_freqs_k` the keys are r = Lk // Lq times longer and the freqs are tiled r times
    along the sequence (keys = r stacked copies of the query grid). Outputs keep input dtypes.
    """
    if cos.shape != (xq.shape[-2], xq.shape[-1] // 2):
        raise ValueError(f"freqs {cos.shape} do not fit q {xq.shape}")
    q_out = _rotate(xq, cos, sin)
    if xk.shape[-2] == 0:  # no keys to rotate
        return q_out, xk
    if repeat_freqs_k:
        r = xk.shape[-2] // xq.shape[-2]
        cos, sin = jnp.tile(cos, (r, 1)), jnp.tile(sin, (r, 1))
    return q_out, _rotate(xk, cos, sin)


def get_1d_sine_pe(pos: jax.Array, dim: int, temperature: float = 10000.0) -> jax.Array:
    """Official `sam2_utils.get_1d_sine_pe`: pos [...] -> [..., dim] = cat(sin, cos)."""
    dim_t = _dim_t(dim // 2, temperature)
    pe = pos.astype(jnp.float32)[..., None] / dim_t
    return jnp.concatenate([jnp.sin(pe), jnp.cos(pe)], axis=-1)
