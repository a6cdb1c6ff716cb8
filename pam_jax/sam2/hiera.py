"""Hiera trunk of the SAM 2 image encoder (`sam2.modeling.backbones.hieradet`), channels-last.

Parameter paths equal the official state-dict keys under `image_encoder.trunk.`:
`pos_embed` [1, C, bh, bw] and `pos_embed_window` [1, C, 8, 8] (raw, torch shapes),
`patch_embed.proj`, `blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.layers.{0,1}, proj}`.

Token layouts. The official blocks each partition their input into windows and un-partition the
output, a full pass over the activations each way; so does the default here
(`PAM_JAX_HIERA_LAYOUT=block`). With `PAM_JAX_HIERA_LAYOUT=stage` tokens stay
*window-ordered*, [B, nh, nw, ws, ws, C], across consecutive blocks:
per-token ops (norms, MLP, qkv / proj, residuals) do not care about order, global attention has
no positional term so it runs on any order, and a q-pool block's 2x2 pooling stays inside each
window, so its output is already the partition of the pooled map into ws/2 windows in the same
window grid. The trunk converts only where the window size changes and at the stage ends (the
neck needs spatial maps). Blocks whose map does not tile into their windows (the official code
zero-pads after norm1 and crops after attention) and odd windows under q-pooling run the
official per-block path on the spatial map, as all blocks do with `PAM_JAX_HIERA_LAYOUT=block`.

Why "block" stays the default: on the H200 (session 6, bench_sam2.py, one run), Hiera-L at 1024,
batch 1 ran 71.4 img/s with "block" and 66.8 with "stage"; XLA's bytes-accessed estimate did
not drop (13.11 vs 13.28 GB per call): XLA already fuses the partition transposes into the
neighbouring norm / residual fusions, so keeping the windowed layout saves no pass there.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from pam_jax.sam2.common import MLP, gelu, layer_norm, linear, sdpa
from pam_jax.sam2.config import HieraConfig
from pam_jax.sam2.ops import torch_bicubic_resize
from pam_jax.sharding import constrain

_ACT = ("batch", "spatial", "spatial", "act_embed")
_ACT_WIN = ("batch", "spatial", "spatial", None, None, "act_embed")
LAYOUTS = ("stage", "block")


def hiera_layout(layout: str | None = None) -> str:
    """`layout`, else `PAM_JAX_HIERA_LAYOUT` (read at trace time): "block" (default) partitions /
    un-partitions in every block, as the official code does; "stage" keeps tokens
    window-ordered across blocks."""
    if layout is None:
        layout = os.environ.get("PAM_JAX_HIERA_LAYOUT", "block")
    if layout not in LAYOUTS:
        raise ValueError(
            f"Hiera layout (PAM_JAX_HIERA_LAYOUT) must be one of {LAYOUTS}, got {layout!r}"
        )
    return layout


def max_pool(x: jax.Array, stride: tuple[int, int]) -> jax.Array:
    """torch MaxPool2d(kernel=stride, stride=stride, ceil_mode=False) over axes -3, -2 of
    [..., H, W, C] (a spatial map or the windows of a window-ordered one)."""
    sh, sw = stride
    *lead, h, w, c = x.shape
    ho, wo = h // sh, w // sw
    x = x[..., : ho * sh, : wo * sw, :]
    return x.reshape(*lead, ho, sh, wo, sw, c).max(axis=(-4, -2))


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


def to_windows(x: jax.Array, ws: int) -> jax.Array:
    """Spatial [B, H, W, C] (H, W multiples of ws) -> window-ordered [B, nh, nw, ws, ws, C]."""
    b, h, w, c = x.shape
    if h % ws or w % ws:
        raise ValueError(f"map {h}x{w} does not tile into {ws}x{ws} windows")
    return x.reshape(b, h // ws, ws, w // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)


def to_spatial(x: jax.Array) -> jax.Array:
    """Window-ordered [B, nh, nw, ws, ws, C] -> spatial [B, nh * ws, nw * ws, C]."""
    b, nh, nw, ws, _, c = x.shape
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, nh * ws, nw * ws, c)


def rewindow(x: jax.Array, ws: int) -> jax.Array:
    """Window-ordered x -> window-ordered with window ws, as one transpose where one window
    size divides the other (Hiera-L's stage 2 -> 3: 2 -> 16), else through the spatial map."""
    b, nh, nw, w0, _, c = x.shape
    if ws == w0:
        return x
    if ws % w0 == 0 and nh % (ws // w0) == 0 and nw % (ws // w0) == 0:  # k x k windows merge
        k = ws // w0
        x = x.reshape(b, nh // k, k, nw // k, k, w0, w0, c).transpose(0, 1, 3, 2, 5, 4, 6, 7)
        return x.reshape(b, nh // k, nw // k, ws, ws, c)
    if w0 % ws == 0:  # every window splits into k x k
        k = w0 // ws
        x = x.reshape(b, nh, nw, k, ws, k, ws, c).transpose(0, 1, 3, 2, 5, 4, 6, 7)
        return x.reshape(b, nh * k, nw * k, ws, ws, c)
    return to_windows(to_spatial(x), ws)


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
    """Attention over groups of tiles; with `q_stride`, q is max-pooled per tile (k/v are not)."""

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
        """[N, n, h, w, C]: each of the N groups attends over its n tiles of h x w tokens (one
        window, n = 1; or a whole image: one spatial map, or its n windows) -> [N, n, h', w', C']
        with h', w' the pooled tile size."""
        b, n, h, w, _ = x.shape
        # torch layout of the qkv output: (3, heads, head_dim)
        qkv = self.qkv(x).reshape(b, n * h * w, 3, self.num_heads, -1)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [b, L, heads, hd]
        if self.q_stride:
            q = max_pool(q.reshape(b, n, h, w, -1), self.q_stride)
            h, w = q.shape[2:4]
            q = q.reshape(b, n * h * w, self.num_heads, -1)
        # scale 1/sqrt(hd), no mask (padded tokens are real keys, as in the official code);
        # the XLA path computes logits and softmax in float32 for bf16 inputs as well.
        o = sdpa(q, k, v)
        return self.proj(o.reshape(b, n, h, w, -1))


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

    def takes_windows(self, hw: tuple[int, int], tile: int) -> bool:
        """Whether this block can run on window-ordered tokens: its map tiles into its windows
        without padding, and q-pooling (square stride) divides the windows. `tile` is the
        current window size (0: spatial), which a global block keeps."""
        ws = self.window_size or tile
        if ws == 0 or hw[0] % ws or hw[1] % ws:
            return False
        if self.q_stride:
            sh, sw = self.q_stride
            return sh == sw and ws % sh == 0
        return True

    def __call__(self, x: jax.Array) -> jax.Array:
        """Spatial [B, H, W, C] (the official per-block path) or window-ordered
        [B, nh, nw, ws, ws, C] with ws the block's window (any ws for a global block)."""
        windowed = x.ndim == 6
        if windowed and self.window_size and x.shape[3] != self.window_size:
            raise ValueError(f"block of window {self.window_size} got {x.shape[3]}-windows")
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            # the shortcut comes from the *normalized* input
            shortcut = self.proj(x)
            if self.q_stride:
                shortcut = max_pool(shortcut, self.q_stride)  # inside windows when windowed
        if windowed:
            b, nh, nw, ws = x.shape[:4]
            # one group per window, or one per image of all its windows (global)
            groups = (b * nh * nw, 1) if self.window_size else (b, nh * nw)
            x = self.attn(x.reshape(*groups, ws, ws, -1)).reshape(shortcut.shape)
        elif self.window_size > 0:
            ws = self.window_size
            h, w = x.shape[1:3]
            x, pad_hw = window_partition(x, ws)
            x = self.attn(x[:, None])[:, 0]
            if self.q_stride:
                # q-pooling shrank every window: un-partition with the pooled window size
                ws = self.window_size // self.q_stride[0]
                h, w = shortcut.shape[1:3]
                pad_hw = (h + (-h) % ws, w + (-w) % ws)
            x = window_unpartition(x, ws, pad_hw, (h, w))
        else:
            x = self.attn(x[:, None])[:, 0]
        x = shortcut + x
        x = x + self.mlp(self.norm2(x))
        return constrain(x, _ACT_WIN if windowed else _ACT)


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

    def layout_plan(self, hw: tuple[int, int], layout: str | None = None) -> list[int]:
        """The window size each block's input is ordered by (0: spatial) for a stride-4 map of
        size hw. "stage": a block takes window-ordered tokens where `takes_windows` allows,
        a global block keeps the current order; "block": all spatial (the official path)."""
        stage_layout = hiera_layout(layout) == "stage"
        plan, tile = [], 0
        for blk in self.blocks:
            tile = blk.window_size or tile
            if not (stage_layout and blk.takes_windows(hw, tile)):
                tile = 0
            plan.append(tile)
            if blk.q_stride:
                hw = (hw[0] // blk.q_stride[0], hw[1] // blk.q_stride[1])
                tile //= blk.q_stride[0]
        return plan

    def __call__(self, x: jax.Array, layout: str | None = None) -> list[jax.Array]:
        """`layout`: "stage" or "block" (see the module docstring); None reads
        `PAM_JAX_HIERA_LAYOUT` at trace time."""
        if self.dtype is not None:
            x = x.astype(self.dtype)
        x = self.patch_embed(x)
        x = x + self._get_pos_embed(x.shape[1:3]).astype(x.dtype)
        x = constrain(x, _ACT)
        plan = self.layout_plan(x.shape[1:3], layout)
        ends = set(self.cfg.stage_ends)
        outputs = []
        for i, (blk, want) in enumerate(zip(self.blocks, plan)):
            tile = x.shape[3] if x.ndim == 6 else 0
            if want != tile:  # re-layout only where the window size really changes
                if tile == 0:
                    x = to_windows(x, want)
                else:
                    x = to_spatial(x) if want == 0 else rewindow(x, want)
            x = blk(x)
            if i in ends:
                outputs.append(to_spatial(x) if x.ndim == 6 else x)
        return outputs
