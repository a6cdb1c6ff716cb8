"""SAM 2 memory attention (official `memory_attention.py` + `RoPEAttention`), batch-first.

Beyond the official module, every call takes an optional key-validity mask `memory_valid`, so a
fixed-capacity memory bank (static shapes under jit) can hold empty slots: masked keys get a
softmax weight of exactly 0, the same result as if the slots were absent.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from pam_jax.sam2.common import layer_norm, linear
from pam_jax.sam2.position_encoding import apply_rotary_enc, compute_axial_cis
from pam_jax.sam2.two_way_transformer import Attention


def masked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """SDPA on [B, H, L, D] with float32 logits/softmax; mask [B, Lk] bool (True = attend).

    The fill is finite, so a row whose keys are all masked gives a uniform softmax, never NaN.
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v)


class RoPEAttention(Attention):
    """Official `RoPEAttention`: attention with axial RoPE on q and (the first) keys.

    The RoPE table is recomputed for the actual query length L (a square sqrt(L) x sqrt(L) map,
    as official). With `rope_k_repeat` the keys hold r stacked copies of that grid (one per memory
    frame) and the q freqs are tiled r times; the last `num_k_exclude_rope` keys (object pointers)
    are not rotated.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int = 1,
        downsample_rate: int = 1,
        kv_in_dim: int | None = None,
        rope_theta: float = 10000.0,
        rope_k_repeat: bool = False,
        *,
        rngs: nnx.Rngs,
        dtype=None,
    ):
        super().__init__(
            embedding_dim, num_heads, downsample_rate, kv_in_dim, rngs=rngs, dtype=dtype
        )
        self.rope_theta = rope_theta
        self.rope_k_repeat = rope_k_repeat

    def _heads(self, x: jax.Array) -> jax.Array:  # [B, L, C] -> [B, H, L, C / H]
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(0, 2, 1, 3)

    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        num_k_exclude_rope: int = 0,
        key_mask: jax.Array | None = None,
    ) -> jax.Array:
        """q [B, Lq, C], k/v [B, Lk, kv_in_dim], key_mask [B, Lk] bool -> [B, Lq, C]."""
        q = self._heads(self.q_proj(q))
        k = self._heads(self.k_proj(k))
        v = self._heads(self.v_proj(v))
        lq, lk = q.shape[-2], k.shape[-2]
        side = math.isqrt(lq)
        if side * side != lq:
            raise ValueError(f"RoPE needs a square query map, got {lq} tokens")
        if lq != lk and not self.rope_k_repeat:
            raise ValueError("keys longer than queries need rope_k_repeat=True")
        n_rope = lk - num_k_exclude_rope
        if self.rope_k_repeat and n_rope % lq:
            raise ValueError(f"{n_rope} rotated keys are not a whole number of {lq}-token frames")
        cos, sin = compute_axial_cis(
            self.internal_dim // self.num_heads, side, side, self.rope_theta
        )
        q, k_rope = apply_rotary_enc(q, k[:, :, :n_rope], cos, sin, self.rope_k_repeat)
        k = jnp.concatenate([k_rope, k[:, :, n_rope:]], axis=2) if num_k_exclude_rope else k_rope
        out = masked_attention(q, k, v, key_mask)
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(b, n, h * d))


class MemoryAttentionLayer(nnx.Module):
    """Official `MemoryAttentionLayer` (pre-norm; self-attn, cross-attn to memories, ReLU MLP)."""

    def __init__(
        self,
        d_model: int = 256,
        dim_feedforward: int = 2048,
        kv_in_dim: int = 64,
        num_heads: int = 1,
        rope_theta: float = 10000.0,
        pos_enc_at_attn: bool = False,
        pos_enc_at_cross_attn_keys: bool = True,
        pos_enc_at_cross_attn_queries: bool = False,
        *,
        rngs: nnx.Rngs,
        dtype=None,
    ):
        self.self_attn = RoPEAttention(
            d_model, num_heads, rope_theta=rope_theta, rngs=rngs, dtype=dtype
        )
        self.cross_attn_image = RoPEAttention(
            d_model,
            num_heads,
            kv_in_dim=kv_in_dim,
            rope_theta=rope_theta,
            rope_k_repeat=True,
            rngs=rngs,
            dtype=dtype,
        )
        self.linear1 = linear(
            d_model, dim_feedforward, rngs, axes=("vis_embed", "vis_mlp"), dtype=dtype
        )
        self.linear2 = linear(
            dim_feedforward, d_model, rngs, axes=("vis_mlp", "vis_embed"), dtype=dtype
        )
        self.norm1 = layer_norm(d_model, 1e-5, rngs, dtype=dtype)
        self.norm2 = layer_norm(d_model, 1e-5, rngs, dtype=dtype)
        self.norm3 = layer_norm(d_model, 1e-5, rngs, dtype=dtype)
        self.pos_enc_at_attn = pos_enc_at_attn
        self.pos_enc_at_cross_attn_keys = pos_enc_at_cross_attn_keys
        self.pos_enc_at_cross_attn_queries = pos_enc_at_cross_attn_queries

    def __call__(
        self,
        tgt: jax.Array,
        memory: jax.Array,
        pos: jax.Array,
        query_pos: jax.Array,
        num_k_exclude_rope: int = 0,
        memory_valid: jax.Array | None = None,
    ) -> jax.Array:
        t2 = self.norm1(tgt)
        qk = t2 + query_pos if self.pos_enc_at_attn else t2
        tgt = tgt + self.self_attn(qk, qk, t2)
        t2 = self.norm2(tgt)
        tgt = tgt + self.cross_attn_image(
            t2 + query_pos if self.pos_enc_at_cross_attn_queries else t2,
            memory + pos if self.pos_enc_at_cross_attn_keys else memory,
            memory,
            num_k_exclude_rope=num_k_exclude_rope,
            key_mask=memory_valid,
        )
        t2 = self.linear2(jax.nn.relu(self.linear1(self.norm3(tgt))))
        return tgt + t2


class MemoryAttention(nnx.Module):
    """Official `MemoryAttention(d_model, pos_enc_at_input=True, num_layers, batch_first=True)`."""

    def __init__(
        self,
        d_model: int = 256,
        num_layers: int = 4,
        *,
        rngs: nnx.Rngs,
        dtype=None,
        pos_enc_at_input: bool = True,
        dim_feedforward: int = 2048,
        kv_in_dim: int = 64,
        num_heads: int = 1,
        rope_theta: float = 10000.0,
    ):
        self.d_model = d_model
        self.pos_enc_at_input = pos_enc_at_input
        self.dtype = dtype
        self.layers = nnx.List(
            [
                MemoryAttentionLayer(
                    d_model,
                    dim_feedforward,
                    kv_in_dim,
                    num_heads,
                    rope_theta,
                    rngs=rngs,
                    dtype=dtype,
                )
                for _ in range(num_layers)
            ]
        )
        self.norm = layer_norm(d_model, 1e-5, rngs, dtype=dtype)

    def __call__(
        self,
        curr: jax.Array,
        curr_pos: jax.Array,
        memory: jax.Array,
        memory_pos: jax.Array,
        num_obj_ptr_tokens: int = 0,
        memory_valid: jax.Array | None = None,
    ) -> jax.Array:
        """Batch-first: curr/curr_pos [B, L, d_model] (L = h * w, square map), memory/memory_pos
        [B, M, kv_in_dim] whose last `num_obj_ptr_tokens` (static int) tokens are object
        pointers (no RoPE), memory_valid [B, M] bool or None -> [B, L, d_model]."""
        dt = self.dtype or curr.dtype
        out = curr.astype(dt)
        curr_pos = curr_pos.astype(dt)
        memory, memory_pos = memory.astype(dt), memory_pos.astype(dt)
        if self.pos_enc_at_input:
            out = out + 0.1 * curr_pos
        for layer in self.layers:
            out = layer(out, memory, memory_pos, curr_pos, num_obj_ptr_tokens, memory_valid)
        return self.norm(out)
