"""SAM 2 mask-decoder transformer: `Attention`, `TwoWayAttentionBlock`, `TwoWayTransformer`.

Mirrors `sam2.modeling.sam.transformer` (torch names, so the generic converter maps the weights),
batch-first `[B, L, C]` token sequences and NHWC images. Differences from the official code:

- `Attention` takes an optional key-validity mask `[B, Lk]` (True = attend). Padding tokens
  excluded this way have no influence on the other tokens, which is what lets prompts with
  different numbers of points share one batch (see `TwoWayTransformer.__call__`). The PAM
  perceiver reuses `Attention` with the same mask for its padded inputs.
- Softmax (and the logits feeding it) are float32 whatever the compute dtype.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pam_jax.sam2.common import MLP, linear
from pam_jax.sam2.common import layer_norm as common_layer_norm


# `Attention`'s few-token paths (below) apply where one side has at most this many tokens;
# `PAM_JAX_FEW_TOKENS=0` turns them off. H200, SAM 2.1-L mask generator (profile_amg.py, one
# run): decoder 55.4 -> 47.2 ms per 1024 prompts. tests/sam2/test_mask_decoder.py pins them
# against the plain form.
def _few_tokens() -> int:
    return int(os.environ.get("PAM_JAX_FEW_TOKENS", "32"))  # read at trace time


def _masked_softmax(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax over the last (key) axis of float32 logits [B, ., ., Lk]; mask [B, Lk] (True =
    attend). Finite fill: a row with every key masked gives a uniform (harmless) softmax, not
    NaN."""
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


# torch.nn.LayerNorm default, used by every norm of the two-way transformer.
TWO_WAY_LN_EPS = 1e-5


# common.layer_norm uses the two-pass variance torch computes (flax's fast form is 2e-4 off on
# few-channel LayerNorm2d); kept under this name for the modules that import it from here.
layer_norm = common_layer_norm


class Attention(nnx.Module):
    """Official `Attention`: projections to `embedding_dim // downsample_rate`, multi-head SDPA.

    `kv_in_dim` is the width of the key/value inputs (defaults to `embedding_dim`).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        downsample_rate: int = 1,
        kv_in_dim: int | None = None,
        *,
        rngs: nnx.Rngs,
        dtype=None,
    ):
        self.embedding_dim = embedding_dim
        self.kv_in_dim = kv_in_dim if kv_in_dim is not None else embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide {self.internal_dim}")
        self.dtype = dtype
        in_axes = ("vis_embed", "vis_heads")
        self.q_proj = linear(embedding_dim, self.internal_dim, rngs, axes=in_axes, dtype=dtype)
        self.k_proj = linear(self.kv_in_dim, self.internal_dim, rngs, axes=in_axes, dtype=dtype)
        self.v_proj = linear(self.kv_in_dim, self.internal_dim, rngs, axes=in_axes, dtype=dtype)
        self.out_proj = linear(
            self.internal_dim, embedding_dim, rngs, axes=("vis_heads", "vis_embed"), dtype=dtype
        )

    def __call__(
        self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None
    ) -> jax.Array:
        """q [B, Lq, C], k/v [B, Lk, kv_in_dim], mask [B, Lk] bool (True = valid) -> [B, Lq, C].

        Batch dims of q and k/v may broadcast (e.g. 1 vs B).
        """
        lq, lk, few = q.shape[-2], k.shape[-2], _few_tokens()
        if lk <= few and lq >= 8 * lk:
            return self._few_keys(q, k, v, mask)
        if lq <= few and lk >= 8 * lq:
            return self._few_queries(q, k, v, mask)
        h = self.num_heads
        q = self.q_proj(q)
        k = self.k_proj(k)
        v = self.v_proj(v)
        q = q.reshape(*q.shape[:-1], h, -1)  # [B, Lq, H, D]
        k = k.reshape(*k.shape[:-1], h, -1)
        v = v.reshape(*v.shape[:-1], h, -1)
        scale = q.shape[-1] ** -0.5
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = logits.astype(jnp.float32) * scale
        probs = _masked_softmax(logits, mask).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        out = out.reshape(*out.shape[:-2], self.internal_dim)
        return self.out_proj(out)

    # A few tokens against a whole image (the decoder's and the perceiver's cross attentions:
    # <= 32 tokens, >= 8x as many image positions). The image side is then touched only by
    # matmuls with the tokens folded into the projections, never projected itself: with
    # heads h, head size d and tokens t, q_proj(x) k^T = x (W_q k^T) + b_q k^T and
    # sum_j p_j v_proj(y_j) = (sum_j p_j y_j) W_v + b_v (the probabilities sum to 1). The same
    # products in another order; float32 logits and softmax as the plain path.

    def _weights(self, lin: nnx.Linear) -> tuple[jax.Array, jax.Array]:
        w, b = lin.kernel[...], lin.bias[...]
        if self.dtype is not None:
            w, b = w.astype(self.dtype), b.astype(self.dtype)
        return w, b

    def _few_keys(self, q, k, v, mask):
        """Image queries [B or 1, L, C] against a few token keys / values [B, t, kv_in]."""
        h = self.num_heads
        d = self.internal_dim // h
        wq, bq = self._weights(self.q_proj)
        wo, bo = self._weights(self.out_proj)
        kp = self.k_proj(k).reshape(*k.shape[:-1], h, d)  # [B, t, h, d]
        vp = self.v_proj(v).reshape(*v.shape[:-1], h, d)
        scale = d**-0.5
        a = jnp.einsum("chd,bthd->bcht", wq.reshape(-1, h, d), kp) * scale  # [B, C, h, t]
        c = jnp.einsum("hd,bthd->bht", bq.reshape(h, d), kp).astype(jnp.float32) * scale
        x = q.astype(a.dtype)
        if x.shape[0] == 1 and a.shape[0] > 1:  # a shared image: one GEMM over every prompt
            logits = jnp.einsum("lc,bcht->blht", x[0], a, preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("blc,bcht->blht", x, a, preferred_element_type=jnp.float32)
        logits = logits + c[:, None]
        probs = _masked_softmax(logits, mask)
        bv = jnp.einsum("bthd,hdc->bhtc", vp, wo.reshape(h, d, -1))  # [B, h, t, C]
        return jnp.einsum("blht,bhtc->blc", probs.astype(bv.dtype), bv) + bo

    def _few_queries(self, q, k, v, mask):
        """A few token queries [B, t, C] against image keys / values [B or 1, L, kv_in]."""
        h = self.num_heads
        d = self.internal_dim // h
        wk, bk = self._weights(self.k_proj)
        wv, bv = self._weights(self.v_proj)
        qp = self.q_proj(q).reshape(*q.shape[:-1], h, d)  # [B, t, h, d]
        scale = d**-0.5
        qk = jnp.einsum("bthd,chd->bhtc", qp, wk.reshape(-1, h, d)) * scale  # [B, h, t, C]
        c = jnp.einsum("bthd,hd->bht", qp, bk.reshape(h, d)).astype(jnp.float32) * scale
        kx, vx = k.astype(qk.dtype), v.astype(qk.dtype)
        shared = kx.shape[0] == 1 and vx.shape[0] == 1 and qk.shape[0] > 1
        f32 = jnp.float32
        if shared:  # a shared image: one GEMM over every prompt
            logits = jnp.einsum("bhtc,lc->bhtl", qk, kx[0], preferred_element_type=f32)
        else:
            logits = jnp.einsum("bhtc,blc->bhtl", qk, kx, preferred_element_type=f32)
        probs = _masked_softmax(logits + c[..., None], mask)
        probs = probs.astype(vx.dtype)
        if shared:
            pv = jnp.einsum("bhtl,lc->bthc", probs, vx[0])  # [B, t, h, kv_in]
        else:
            pv = jnp.einsum("bhtl,blc->bthc", probs, vx)
        out = jnp.einsum("bthc,chd->bthd", pv, wv.reshape(-1, h, d)) + bv.reshape(h, d)
        return self.out_proj(out.reshape(*out.shape[:-2], self.internal_dim))


class TwoWayAttentionBlock(nnx.Module):
    """Official `TwoWayAttentionBlock`: self-attn, token->image, MLP, image->token, post-LN."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
        *,
        rngs: nnx.Rngs,
        dtype=None,
    ):
        d = embedding_dim
        self.self_attn = Attention(d, num_heads, rngs=rngs, dtype=dtype)
        self.norm1 = layer_norm(d, TWO_WAY_LN_EPS, rngs, dtype)
        self.cross_attn_token_to_image = Attention(
            d, num_heads, downsample_rate=attention_downsample_rate, rngs=rngs, dtype=dtype
        )
        self.norm2 = layer_norm(d, TWO_WAY_LN_EPS, rngs, dtype)
        self.mlp = MLP(d, mlp_dim, d, 2, rngs=rngs, activation=activation, dtype=dtype)
        self.norm3 = layer_norm(d, TWO_WAY_LN_EPS, rngs, dtype)
        self.norm4 = layer_norm(d, TWO_WAY_LN_EPS, rngs, dtype)
        self.cross_attn_image_to_token = Attention(
            d, num_heads, downsample_rate=attention_downsample_rate, rngs=rngs, dtype=dtype
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def __call__(
        self,
        queries: jax.Array,
        keys: jax.Array,
        query_pe: jax.Array,
        key_pe: jax.Array,
        token_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """queries [B, N, C] (tokens), keys [B, HW, C] (image); token_mask [B, N] bool or None."""
        if self.skip_first_layer_pe:
            # first layer: no PE and no residual (the output replaces the queries)
            queries = self.self_attn(queries, queries, queries, token_mask)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries, token_mask)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe
        queries = queries + self.cross_attn_token_to_image(q, k, keys)
        queries = self.norm2(queries)

        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        k = keys + key_pe
        keys = keys + self.cross_attn_image_to_token(k, q, queries, token_mask)
        keys = self.norm4(keys)
        return queries, keys


class TwoWayTransformer(nnx.Module):
    """Official `TwoWayTransformer` (SAM 2: depth 2, 256 wide, 8 heads, MLP 2048, downsample 2)."""

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
        attention_downsample_rate: int = 2,
        *,
        rngs: nnx.Rngs,
        dtype=None,
    ):
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nnx.List(
            [
                TwoWayAttentionBlock(
                    embedding_dim,
                    num_heads,
                    mlp_dim,
                    activation,
                    attention_downsample_rate,
                    skip_first_layer_pe=(i == 0),
                    rngs=rngs,
                    dtype=dtype,
                )
                for i in range(depth)
            ]
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim,
            num_heads,
            downsample_rate=attention_downsample_rate,
            rngs=rngs,
            dtype=dtype,
        )
        self.norm_final_attn = layer_norm(embedding_dim, TWO_WAY_LN_EPS, rngs, dtype)

    def __call__(
        self,
        image_embedding: jax.Array,
        image_pe: jax.Array,
        point_embedding: jax.Array,
        token_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """image_embedding [B or 1, H, W, C] (1: shared by every prompt; the first layer's
        image update makes it [B]), image_pe [B or 1, H, W, C], point_embedding [B, N, C].

        Returns (queries [B, N, C], keys [B, H*W, C]). `token_mask` [B, N] (True = real token)
        removes padding tokens from every attention over tokens (self-attn keys and image->token
        keys); tokens never attend image positions by mask, so the outputs of the real tokens
        and the image keys equal those of the unpadded sequence. Outputs at masked positions
        are meaningless.
        """
        b, h, w, c = image_embedding.shape
        keys = image_embedding.reshape(b, h * w, c)
        key_pe = image_pe.reshape(image_pe.shape[0], h * w, c)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe, token_mask)
        q = queries + point_embedding
        k = keys + key_pe
        queries = queries + self.final_attn_token_to_image(q, k, keys)
        queries = self.norm_final_attn(queries)
        return queries, keys
