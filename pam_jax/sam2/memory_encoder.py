"""SAM 2 memory encoder: mask downsampler + ConvNeXt fuser (official `memory_encoder.py`), NHWC.

Parameter paths equal the official torch keys (`mask_downsampler.encoder.{0,1,3,...,12}`,
`fuser.layers.{i}.dwconv`, ...) so `pam_jax.convert.torch_nnx` maps a checkpoint unchanged.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from pam_jax.sam2.common import gelu, layer_norm, linear
from pam_jax.sam2.position_encoding import position_embedding_sine

_CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")


def conv2d(
    din: int,
    dout: int,
    kernel: int,
    rngs: nnx.Rngs,
    *,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    dtype=None,
) -> nnx.Conv:
    """torch `nn.Conv2d` as nnx.Conv (HWIO kernel) with torch's explicit symmetric padding."""
    return nnx.Conv(
        din,
        dout,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        feature_group_count=groups,
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
        kernel_metadata={"out_sharding": _CONV_AXES},
        bias_metadata={"out_sharding": ("conv_out",)},
    )


class MaskDownSampler(nnx.Module):
    """Official `MaskDownSampler`: log_stride(total_stride) x (conv, LayerNorm2d, GELU), conv 1x1.

    `encoder` mirrors the torch `nn.Sequential` index by index; the GELU positions hold the
    (parameter-free) activation function, so parameter paths are `encoder.{0,1,3,4,...}`.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        kernel_size: int = 3,
        stride: int = 2,
        padding: int = 1,
        total_stride: int = 16,
        *,
        rngs: nnx.Rngs,
        dtype=None,
    ):
        num_layers = int(math.log2(total_stride) // math.log2(stride))
        if stride**num_layers != total_stride:
            raise ValueError(f"total_stride {total_stride} is not a power of stride {stride}")
        layers: list = []
        cin = cout = 1
        for _ in range(num_layers):
            cout = cin * stride**2
            layers.append(
                conv2d(cin, cout, kernel_size, rngs, stride=stride, padding=padding, dtype=dtype)
            )
            layers.append(layer_norm(cout, 1e-6, rngs, dtype=dtype))  # LayerNorm2d on NHWC
            layers.append(gelu)
            cin = cout
        layers.append(conv2d(cout, embed_dim, 1, rngs, dtype=dtype))
        self.encoder = nnx.List(layers)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, 1] -> [B, H / total_stride, W / total_stride, embed_dim]."""
        for layer in self.encoder:
            x = layer(x)
        return x


class CXBlock(nnx.Module):
    """Official `CXBlock` (ConvNeXt): x + gamma * pwconv2(gelu(pwconv1(norm(dwconv(x)))))."""

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        padding: int = 3,
        layer_scale_init_value: float = 1e-6,
        use_dwconv: bool = True,
        *,
        rngs: nnx.Rngs,
        dtype=None,
    ):
        self.dwconv = conv2d(
            dim,
            dim,
            kernel_size,
            rngs,
            padding=padding,
            groups=dim if use_dwconv else 1,
            dtype=dtype,
        )
        self.norm = layer_norm(dim, 1e-6, rngs, dtype=dtype)
        self.pwconv1 = linear(dim, 4 * dim, rngs, axes=("vis_embed", "vis_mlp"), dtype=dtype)
        self.pwconv2 = linear(4 * dim, dim, rngs, axes=("vis_mlp", "vis_embed"), dtype=dtype)
        # Raw Param with the torch name/shape [dim]; layer_scale_init_value <= 0 means no gamma.
        self.gamma = (
            nnx.Param(
                jnp.full((dim,), layer_scale_init_value, jnp.float32), out_sharding=("vis_embed",)
            )
            if layer_scale_init_value > 0
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, dim] -> same."""
        y = self.norm(self.dwconv(x))
        y = self.pwconv2(gelu(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma[...].astype(y.dtype) * y
        return x + y


class Fuser(nnx.Module):
    """Official `Fuser` with `input_projection=False` (the only configuration SAM 2 uses)."""

    def __init__(
        self, dim: int = 256, num_layers: int = 2, *, rngs: nnx.Rngs, dtype=None, **cx_kwargs
    ):
        self.layers = nnx.List(
            [CXBlock(dim, rngs=rngs, dtype=dtype, **cx_kwargs) for _ in range(num_layers)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nnx.Module):
    """Official `MemoryEncoder(out_dim=64, in_dim=256)` with its SAM 2 sub-modules.

    The `position_encoding` (PositionEmbeddingSine(out_dim)) has no parameters and is computed
    by `position_embedding_sine`.
    """

    def __init__(
        self,
        out_dim: int = 64,
        in_dim: int = 256,
        *,
        rngs: nnx.Rngs,
        dtype=None,
        fuser_layers: int = 2,
    ):
        self.out_dim = out_dim
        self.mask_downsampler = MaskDownSampler(in_dim, rngs=rngs, dtype=dtype)
        self.pix_feat_proj = conv2d(in_dim, in_dim, 1, rngs, dtype=dtype)
        self.fuser = Fuser(in_dim, fuser_layers, rngs=rngs, dtype=dtype)
        self.out_proj = conv2d(in_dim, out_dim, 1, rngs, dtype=dtype) if out_dim != in_dim else None

    def __call__(
        self, pix_feat: jax.Array, masks: jax.Array, skip_mask_sigmoid: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """pix_feat [B, h, w, in_dim], masks [B, 16h, 16w, 1] (logits, or already scaled when
        `skip_mask_sigmoid`) -> (vision_features [B, h, w, out_dim], vision_pos_enc [B, h, w,
        out_dim])."""
        if not skip_mask_sigmoid:
            masks = jax.nn.sigmoid(masks)
        m = self.mask_downsampler(masks)
        x = self.pix_feat_proj(pix_feat) + m
        x = self.fuser(x)
        if self.out_proj is not None:
            x = self.out_proj(x)
        b, h, w, c = x.shape
        pos = position_embedding_sine(h, w, c).astype(x.dtype)
        return x, jnp.broadcast_to(pos[None], (b, h, w, c))
