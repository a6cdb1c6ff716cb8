"""Small layers shared by SAM 2 and PAM modules."""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pam_jax import sharding


def pow2_bucket(n: int, lo: int = 1) -> int:
    """n rounded up to a power of two (at least `lo`): padded prompt / slot counts take few
    distinct values, so few compiled shapes serve all inputs."""
    return max(lo, 1 << max(0, n - 1).bit_length())


def gelu(x: jax.Array) -> jax.Array:
    """torch.nn.GELU(): the exact erf form (the tanh default is off by up to 4.7e-4)."""
    return jax.nn.gelu(x, approximate=False)


def linear(
    din: int,
    dout: int,
    rngs: nnx.Rngs,
    *,
    axes: tuple[str, str] = ("vis_embed", "vis_mlp"),
    use_bias: bool = True,
    dtype=None,
) -> nnx.Linear:
    """`pam_jax.sharding.linear` with SAM 2's default axis names."""
    return sharding.linear(din, dout, rngs, axes=axes, use_bias=use_bias, dtype=dtype)


class MLP(nnx.Module):
    """The official `sam2.modeling.sam2_utils.MLP`: `layers.{i}` Linears, activation between."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        *,
        rngs: nnx.Rngs,
        activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
        sigmoid_output: bool = False,
        dtype=None,
    ):
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nnx.List(
            [linear(a, b, rngs, dtype=dtype) for a, b in zip(dims[:-1], dims[1:])]
        )
        self.activation = activation
        self.sigmoid_output = sigmoid_output

    def __call__(self, x: jax.Array) -> jax.Array:
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < n - 1:
                x = self.activation(x)
        return jax.nn.sigmoid(x) if self.sigmoid_output else x


def layer_norm(dim: int, eps: float, rngs: nnx.Rngs, dtype=None) -> nnx.LayerNorm:
    """LayerNorm over the last axis; with NHWC this is also the official LayerNorm2d.

    Statistics are computed in float32 whatever the compute dtype, with the two-pass variance:
    flax's fast E[x^2] - E[x]^2 form is off by 2e-4 from torch on LayerNorm2d over 4 channels.
    """
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        rngs=rngs,
        scale_metadata={"out_sharding": ("norm",)},
        bias_metadata={"out_sharding": ("norm",)},
    )


def sdpa(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Unmasked attention on [B, L, heads, head_dim], scale 1/sqrt(head_dim).

    On GPU with 16-bit inputs this uses cuDNN's fused (flash) kernel: the XLA path materialises
    float32 logits, e.g. 4 GiB per global Hiera-L block at batch 8. Elsewhere (CPU parity,
    float32) it is the XLA path, whose softmax is float32 too. PAM_JAX_ATTENTION=xla forces XLA;
    PAM_JAX_FUSED_MIN_LEN=n (default 0) sends sequences of fewer than n keys to XLA (cuDNN pads
    Hiera's 16- / 64-token windows to its tile, where XLA's small logits may be cheaper). Both
    are read at trace time.
    """
    fused = os.environ.get("PAM_JAX_ATTENTION", "auto") != "xla"
    min_len = os.environ.get("PAM_JAX_FUSED_MIN_LEN", "0")
    try:
        min_len = int(min_len)
    except ValueError:
        raise ValueError(f"PAM_JAX_FUSED_MIN_LEN must be an integer, got {min_len!r}") from None
    fused = fused and k.shape[1] >= min_len
    if fused and jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        except Exception:  # shape or version the fused kernel does not support
            pass
    return jax.nn.dot_product_attention(q, k, v)
