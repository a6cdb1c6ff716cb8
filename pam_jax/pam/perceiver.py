"""PAM's Semantic Perceiver (`llava/model/multimodal_resampler/sem_perceiver.py`).

A 2-layer copy of SAM 2's mask-decoder two-way transformer that reads two tensors tapped from
SAM 2's mask decoder -- the image embedding after the decoder's transformer `[B, 64, 64, 256]`
and the two mask tokens `[B, 2, 256]` -- and returns 16 semantic tokens plus the updated image
tokens, space-to-depth compressed (`compression.space_to_depth`, release token order):

    scale 2 (images, a video's first frame): [B, 1024, 1024]
    scale 4 (other video frames):            [B, 256, 4096] -> proj -> [B, 256, 1024]

Attribute names are the official ones, so the release keys `model.vision_resampler.<name>` map
through the generic converter (the Fourier matrix `pe_layer.positional_encoding_gaussian_matrix`
is a torch buffer stored in the checkpoint: it is loaded, never resampled).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pam_jax.pam.compression import space_to_depth
from pam_jax.sam2.common import layer_norm, linear
from pam_jax.sam2.position_encoding import PositionEmbeddingRandom
from pam_jax.sam2.two_way_transformer import TWO_WAY_LN_EPS, Attention, TwoWayAttentionBlock


class SemanticPerceiver(nnx.Module):
    """Official `Semantic_Perceiver(num_sem_tokens=16, depth=2, embedding_dim=256, num_heads=8,
    mlp_dim=2048, activation=ReLU, channel_downsample_rate=2)`."""

    def __init__(
        self,
        num_sem_tokens: int = 16,
        depth: int = 2,
        embedding_dim: int = 256,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
        channel_downsample_rate: int = 2,
        *,
        rngs: nnx.Rngs,
        dtype=None,
    ):
        d = embedding_dim
        self.embedding_dim = d
        self.num_sem_tokens = num_sem_tokens
        self.dtype = dtype
        self.layers = nnx.List(
            [
                TwoWayAttentionBlock(
                    d,
                    num_heads,
                    mlp_dim,
                    activation,
                    channel_downsample_rate,
                    skip_first_layer_pe=(i == 0),
                    rngs=rngs,
                    dtype=dtype,
                )
                for i in range(depth)
            ]
        )
        self.pe_layer = PositionEmbeddingRandom(d // 2, rngs=rngs)
        self.sem_tokens = nnx.Embed(
            num_sem_tokens,
            d,
            dtype=dtype,
            rngs=rngs,
            embedding_init=nnx.initializers.normal(1.0),  # torch nn.Embedding init
            embedding_metadata={"out_sharding": ("tokens", "vis_embed")},
        )
        # only the 4x4 path uses it: [16 * 256 = 4096] -> [4 * 256 = 1024]
        self.proj = linear(d * 16, d * 4, rngs, axes=("vis_mlp", "vis_embed"), dtype=dtype)
        self.final_attn_token_to_image = Attention(
            d, num_heads, downsample_rate=channel_downsample_rate, rngs=rngs, dtype=dtype
        )
        self.norm_final_attn = layer_norm(d, TWO_WAY_LN_EPS, rngs, dtype)

    def encode(self, image_embed: jax.Array, mask_tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The two-way transformer part, before compression.

        image_embed [B, H, W, C] (NHWC), mask_tokens [B, M, C] (M = 2 in PAM) ->
        (sem_tokens [B, num_sem_tokens, C], image tokens [B, H, W, C]).
        """
        b, h, w, c = image_embed.shape
        dt = self.dtype or image_embed.dtype
        keys = image_embed.reshape(b, h * w, c).astype(dt)
        m = mask_tokens.shape[1]
        sem = jnp.broadcast_to(self.sem_tokens.embedding[...][None], (b, self.num_sem_tokens, c))
        queries = jnp.concatenate([mask_tokens.astype(dt), sem.astype(dt)], axis=1)
        tokens_pe = queries  # SAM convention: the initial queries are the query PE
        # the same grid PE for every layer (the official code recomputes it per layer)
        image_pe = self.pe_layer((h, w)).reshape(1, h * w, c).astype(dt)
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens_pe, image_pe)
        q = queries + tokens_pe
        k = keys + image_pe
        queries = queries + self.final_attn_token_to_image(q, k, keys)
        queries = self.norm_final_attn(queries)
        return queries[:, m:], keys.reshape(b, h, w, c)

    def compress(self, keys: jax.Array, scale: int) -> jax.Array:
        """keys [B, H, W, C] -> image tokens: scale 2 [B, HW/4, 4C]; scale 4 [B, HW/16, 4C]."""
        if scale == 2:
            return space_to_depth(keys, 2)
        if scale == 4:
            return self.proj(space_to_depth(keys, 4))
        raise ValueError(f"scale must be 2 (dense) or 4 (sparse), got {scale!r}")

    def __call__(
        self, image_embed: jax.Array, mask_tokens: jax.Array, scale: int = 2
    ) -> tuple[jax.Array, jax.Array]:
        """image_embed [B, 64, 64, 256], mask_tokens [B, 2, 256], scale 2 or 4 (static) ->
        (sem_tokens [B, 16, 256], image_tokens [B, 1024, 1024] or [B, 256, 1024])."""
        sem, keys = self.encode(image_embed, mask_tokens)
        return sem, self.compress(keys, scale)
