"""PAM's two `mlp2x_gelu` projectors and its three learned newline embeddings.

The official projector is `nn.Sequential(Linear(in, H), GELU(), Linear(H, H))`
(`llava/model/multimodal_projector/builder.py`); its keys are `0.*` and `2.*`. `MLPProjector`
is an `nnx.List` of the same three entries, so its NNX paths are `0/kernel`, `2/kernel`, ...
and the release keys `model.mm_projector_img.0.weight` map through the generic converter.

    mm_projector_img   in = 4 * 256 = 1024 (compressed image tokens)
    mm_projector_semT  in = 256            (semantic tokens)

The newlines (`image_newline`, `semT_newline`, `frame_newline`) are raw `[H]` parameters
(`nn.Parameter` in the release) separating the parts of the visual sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pam_jax.sam2.common import gelu, linear


class GELU(nnx.Module):
    """torch.nn.GELU() (exact erf form); parameter-free, index 1 of the Sequential."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return gelu(x)


class MLPProjector(nnx.List):
    """Official `mlp2x_gelu` projector: [0] Linear(in, H), [1] GELU, [2] Linear(H, H)."""

    def __init__(self, in_dim: int, hidden_size: int, *, rngs: nnx.Rngs, dtype=None):
        super().__init__(
            [
                linear(in_dim, hidden_size, rngs, axes=("vis_embed", "embed"), dtype=dtype),
                GELU(),
                linear(hidden_size, hidden_size, rngs, axes=("mlp", "embed"), dtype=dtype),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self:
            x = layer(x)
        return x


def newline_param(hidden_size: int, rngs: nnx.Rngs) -> nnx.Param:
    """A learned [H] separator, initialised like the release (N(0, 1/sqrt(H)))."""
    x = jax.random.normal(rngs.params(), (hidden_size,), jnp.float32) / jnp.sqrt(hidden_size)
    return nnx.Param(x, out_sharding=("embed",))
