"""Hiera trunk of the SAM 2 image encoder (`sam2.modeling.backbones.hieradet`), channels-last.

Parameter paths equal the official state-dict keys under `image_encoder.trunk.`:
`pos_embed` [1, C, bh, bw] and `pos_embed_window` [1, C, 8, 8] (raw, torch shapes),
`patch_embed.proj`, `blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.layers.{0,1}, proj}`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pam_jax.sam2.common import MLP, gelu, layer_norm, linear, sdpa
from pam_jax.sam2.config import HieraConfig
from pam_jax.sam2.ops import torch_bicubic_resize
from pam_jax.sharding import constrain

_ACT = ("batch", "spatial", "spatial", "act_embed")


def max_pool(x: jax.Array, stride: tuple[int, int]) -> jax.Array:
    """torch MaxPool2d(kernel=stride, stride=stride, ceil_mode=False) on [B, H, W, C]."""
    sh, sw = stride
    b, h, w, c = x.shape
    ho, wo = h // sh, w // sw
    x = x[:, : ho * sh, : wo * sw]
    return x.reshape(b, ho, sh, wo, sw, c).max(axis=(2, 4))


def window_partition(x: jax.Array, ws: int) -> tuple[jax.Array, tuple[int, int]]:
    """[B, H, W, C] -> [B * nh * nw, ws, ws, C], zero-padding H, W up to multiples of ws."""
    b, h, w, c = x.shape
    ph, pw = (-h) % ws, (-w) % ws
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    hp, wp = h + ph, w + pw
    x = x.reshape(b, hp // ws, ws, wp // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws, ws, c), (hp, wp)


def window_unpartition(
    x: jax.Array, ws: int, pad_hw: tuple[int, int], hw: tuple[int, int]
) -> jax.Array:
    """Inverse of `window_partition`, cropping the padding: -> [B, H, W, C]."""
    hp, wp = pad_hw
    h, w = hw
    b = x.shape[0] // ((hp // ws) * (wp // ws))
    x = x.reshape(b, hp // ws, wp // ws, ws, ws, -1).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, -1)[:, :h, :w]


class PatchEmbed(nnx.Module):
    """Conv k7 s4 p3, 3 -> embed_dim, NHWC in and out (torch pads explicitly, never "SAME")."""

    def __init__(self, embed_dim: int, *, rngs: nnx.Rngs, dtype=None):
        self.proj = nnx.Conv(
            3,
            embed_dim,
            kernel_size=(7, 7),
            strides=(4, 4),
            padding=((3, 3), (3, 3)),
            dtype=dtype,
            rngs=rngs,
            kernel_metadata={"out_sharding": ("conv_h", "conv_w", "conv_in", "conv_out")},
            bias_metadata={"out_sharding": ("conv_out",)},
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x)


class MultiScaleAttention(nnx.Module):
    """Attention inside windows; with `q_stride`, q is max-pooled per window (k/v are not)."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        q_stride: tuple[int, int] | None,
        *,
        rngs: nnx.Rngs,
        dtype=None,
    ):
        self.num_heads = num_heads
        self.q_stride = q_stride
        self.qkv = linear(dim, 3 * dim_out, rngs, axes=("vis_embed", "vis_heads"), dtype=dtype)
        self.proj = linear(dim_out, dim_out, rngs, axes=("vis_heads", "vis_embed"), dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        # torch layout of the qkv output: (3, heads, head_dim)
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [b, L, heads, hd]
        if self.q_stride:
            q = max_pool(q.reshape(b, h, w, -1), self.q_stride)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.num_heads, -1)
        # scale 1/sqrt(hd), no mask (padded tokens are real keys, as in the official code);
        # the XLA path computes logits and softmax in float32 for bf16 inputs as well.
        o = sdpa(q, k, v)
        return self.proj(o.reshape(b, h, w, -1))


class MultiScaleBlock(nnx.Module):
    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        mlp_ratio: float,
        q_stride: tuple[int, int] | None,
        window_size: int,
        *,
        rngs: nnx.Rngs,
        dtype=None,
    ):
        self.dim, self.dim_out = dim, dim_out
        self.window_size = window_size
        self.q_stride = q_stride
        self.norm1 = layer_norm(dim, 1e-6, rngs, dtype)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_stride, rngs=rngs, dtype=dtype)
        self.norm2 = layer_norm(dim_out, 1e-6, rngs, dtype)
        self.mlp = MLP(
            dim_out, int(dim_out * mlp_ratio), dim_out, 2, activation=gelu, rngs=rngs, dtype=dtype
        )
        if dim != dim_out:
            self.proj = linear(dim, dim_out, rngs, axes=("vis_embed", "vis_heads"), dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            # the shortcut comes from the *normalized* input
            shortcut = self.proj(x)
            if self.q_stride:
                shortcut = max_pool(shortcut, self.q_stride)
        ws = self.window_size
        h, w = x.shape[1:3]
        if ws > 0:
            x, pad_hw = window_partition(x, ws)
        x = self.attn(x)
        if self.q_stride and self.window_size > 0:
            # q-pooling shrank every window: un-partition with the pooled window size
            # (a global block, window 0, has nothing to un-partition)
            ws = self.window_size // self.q_stride[0]
            h, w = shortcut.shape[1:3]
            pad_hw = (h + (-h) % ws, w + (-w) % ws)
        if self.window_size > 0:
            x = window_unpartition(x, ws, pad_hw, (h, w))
        x = shortcut + x
        x = x + self.mlp(self.norm2(x))
        return constrain(x, _ACT)


class Hiera(nnx.Module):
    """Hiera trunk: NHWC image [B, H, W, 3] (normalized, H, W multiples of 32) -> 4 NHWC maps.

    Outputs are the stage ends, strides 4, 8, 16, 32, widths embed_dim * (1, 2, 4, 8).
    """

    def __init__(self, cfg: HieraConfig, *, rngs: nnx.Rngs, dtype=None):
        self.cfg = cfg
        self.dtype = dtype
        c = cfg.embed_dim
        self.patch_embed = PatchEmbed(c, rngs=rngs, dtype=dtype)
        # zeros in torch; random here so an unconverted model is not silently position-free
        init = nnx.initializers.normal(0.02)
        self.pos_embed = nnx.Param(
            init(rngs.params(), (1, c, *cfg.window_pos_embed_bkg_spatial_size)),
            out_sharding=(None, "vis_embed", "spatial", "spatial"),
        )
        ws0 = cfg.window_spec[0]
        self.pos_embed_window = nnx.Param(
            init(rngs.params(), (1, c, ws0, ws0)),
            out_sharding=(None, "vis_embed", "spatial", "spatial"),
        )
        stage_ends, q_pool_blocks = cfg.stage_ends, cfg.q_pool_blocks
        blocks = []
        dim, heads, stage = c, cfg.num_heads, 1
        for i in range(sum(cfg.stages)):
            dim_out = dim
            # window size lags by a block: a stage's first block uses the previous stage's size
            window = 0 if i in cfg.global_att_blocks else cfg.window_spec[stage - 1]
            if i - 1 in stage_ends:
                dim_out = int(dim * cfg.dim_mul)
                heads = int(heads * cfg.head_mul)
                stage += 1
            blocks.append(
                MultiScaleBlock(
                    dim,
                    dim_out,
                    heads,
                    cfg.mlp_ratio,
                    tuple(cfg.q_stride) if i in q_pool_blocks else None,
                    window,
                    rngs=rngs,
                    dtype=dtype,
                )
            )
            dim = dim_out
        self.blocks = nnx.List(blocks)

    def _get_pos_embed(self, hw: tuple[int, int]) -> jax.Array:
        """bicubic(pos_embed -> hw) + pos_embed_window tiled over hw: [h, w, C] float32."""
        h, w = hw
        pe = torch_bicubic_resize(self.pos_embed[...][0], (h, w), axes=(-2, -1))  # [C, h, w]
        win = self.pos_embed_window[...][0]
        wh, ww = win.shape[1:]
        if h % wh or w % ww:
            raise ValueError(f"stride-4 map {hw} must tile the {wh}x{ww} window embedding")
        pe = pe + jnp.tile(win, (1, h // wh, w // ww))
        return pe.transpose(1, 2, 0)

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        if self.dtype is not None:
            x = x.astype(self.dtype)
        x = self.patch_embed(x)
        x = x + self._get_pos_embed(x.shape[1:3]).astype(x.dtype)
        x = constrain(x, _ACT)
        ends = set(self.cfg.stage_ends)
        outputs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in ends:
                outputs.append(x)
        return outputs
