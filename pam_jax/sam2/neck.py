"""FpnNeck of the SAM 2 image encoder (`sam2.modeling.backbones.image_encoder.FpnNeck`), NHWC.

The official config: 1x1 lateral convs to d_model, nearest x2 top-down fusion ("sum") only into
levels [2, 3], and a sine position encoding per level. Keys: `convs.{k}.conv.{weight,bias}` with
convs.0 the deepest (stride-32) level.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pam_jax.sam2.position_encoding import position_embedding_sine


class _LateralConv(nnx.Module):
    """torch `nn.Sequential(conv=Conv2d(dim, d_model, 1))`, so the key is `convs.N.conv.*`."""

    def __init__(self, dim: int, d_model: int, *, rngs: nnx.Rngs, dtype=None):
        self.conv = nnx.Conv(
            dim,
            d_model,
            kernel_size=(1, 1),
            padding="VALID",
            dtype=dtype,
            rngs=rngs,
            kernel_metadata={"out_sharding": ("conv_h", "conv_w", "conv_in", "conv_out")},
            bias_metadata={"out_sharding": ("conv_out",)},
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


def upsample_nearest2x(x: jax.Array) -> jax.Array:
    """torch F.interpolate(scale_factor=2, mode="nearest") on [B, H, W, C]."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class FpnNeck(nnx.Module):
    def __init__(
        self,
        d_model: int,
        backbone_channel_list: Sequence[int],
        *,
        rngs: nnx.Rngs,
        dtype=None,
        fpn_top_down_levels: Sequence[int] = (2, 3),
    ):
        self.d_model = d_model
        self.backbone_channel_list = tuple(backbone_channel_list)
        self.fpn_top_down_levels = tuple(fpn_top_down_levels)
        self.convs = nnx.List(
            [_LateralConv(c, d_model, rngs=rngs, dtype=dtype) for c in backbone_channel_list]
        )

    def __call__(self, xs: Sequence[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
        """xs: trunk maps [B, H_i, W_i, C_i], stride 4 first -> (features, pos), same order,
        each [B, H_i, W_i, d_model]."""
        n = len(self.convs) - 1
        if len(xs) != n + 1:
            raise ValueError(f"expected {n + 1} trunk levels, got {len(xs)}")
        out: list[jax.Array] = [None] * (n + 1)  # type: ignore[list-item]
        pos: list[jax.Array] = [None] * (n + 1)  # type: ignore[list-item]
        prev = None
        for i in range(n, -1, -1):  # top-down: deepest level first
            lateral = self.convs[n - i](xs[i])
            if i in self.fpn_top_down_levels and prev is not None:
                # the official code upsamples in float32 (so a bf16 sum promotes to float32)
                prev = lateral + upsample_nearest2x(prev.astype(jnp.float32))
            else:
                prev = lateral
            out[i] = prev
            b, h, w, _ = prev.shape
            pe = position_embedding_sine(h, w, self.d_model).astype(prev.dtype)
            pos[i] = jnp.broadcast_to(pe[None], (b, h, w, self.d_model))
        return out, pos
