"""Qwen2 / Qwen2.5 decoder in Flax NNX, named like `transformers.Qwen2ForCausalLM`.

Parameter paths equal the HF keys with the flax leaf names (`kernel` for Linear weights,
stored [in, out]; `embedding` for the token table). RMSNorm keeps HF's raw `weight`. So
`model.layers.3.self_attn.q_proj.kernel` <-> `model.layers.3.self_attn.q_proj.weight`.

With `cfg.scan_layers` the decoder layers are one stacked module (`model.layers.<...>` with a
leading `layers` axis) run under `jax.lax.scan`; `cfg.remat` wraps each layer in
`jax.checkpoint`. Both are for training; generation uses either layout.

KV cache: one `[B, KV, S, D]` array per layer for keys and one for values (stacked into
`[L, B, KV, S, D]` when layers are scanned); heads before slots so both attention matmuls read
the cache without a transpose. Every row of a batch writes the same cache slot at
each step (prompts are right-aligned in the cache by `sampler.generate`), so writes are a
single `jax.lax.dynamic_update_slice` with a scalar index.

Attention masks (argument `mask` of the decoder): a bool array [B, T, S] (True = may attend);
`Segments(segment_ids)`: the training forward, causal within packed segments without a
[B, T, T] buffer (`attention.attend`: chunked flash-style, cuDNN or splash);
`PrefillLengths(lengths)`: causal over right-padded rows, the cache written right-aligned
(the same kernels); or `(start, end)` per-row key ranges for a one-token step over the cache
(a Pallas flash-decoding kernel on GPU, `cfg.decode_attention`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pam_jax import sharding
from pam_jax.llm import attention as attn
from pam_jax.llm.config import REMAT, Qwen2Config
from pam_jax.sharding import constrain


class KVCache(NamedTuple):
    """Keys, values: tuples of per-layer `[B, KV, S, D]` arrays, or stacked `[L, B, KV, S, D]`."""

    k: Any
    v: Any


def _linear(
    din: int, dout: int, axes: tuple[str, str], *, bias: bool, rngs: nnx.Rngs, dtype, param_dtype
) -> nnx.Linear:
    return sharding.linear(
        din, dout, rngs, axes=axes, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(0.02),
    )  # fmt: skip


class Qwen2RMSNorm(nnx.Module):
    """HF Qwen2RMSNorm: statistics in float32, then `weight * x.to(compute dtype)`."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        var = jnp.mean(xf * xf, axis=-1, keepdims=True)
        xf = xf * jax.lax.rsqrt(var + self.eps)
        return self.weight[...].astype(self.dtype) * xf.astype(self.dtype)


def rope_cos_sin(
    positions: jax.Array, head_dim: int, theta: float, dtype
) -> tuple[jax.Array, jax.Array]:
    """HF default RoPE tables for integer positions [B, T] -> cos, sin [B, T, head_dim]."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    # x [B, T, heads, D]; the half-split rotate_half of HF (not interleaved)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rot * sin[:, :, None, :]


class PrefillLengths(NamedTuple):
    """Attention-mask marker: causal over right-padded rows of these lengths (prefill)."""

    lengths: jax.Array


class Segments(NamedTuple):
    """Attention-mask marker for the training forward: causal within segments
    (`segment_ids` [B, T], 0 = padding), by `attention.attend` (no [B, T, T] buffer)."""

    segment_ids: jax.Array
    implementation: str = "auto"
    packed: bool = False


_decode_splits = attn.decode_splits  # the decode kernel's split rule (tests import it)


class Qwen2Attention(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs, dtype, param_dtype):
        h, q, kv = cfg.hidden_size, cfg.q_dim, cfg.kv_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = _linear(h, q, ("embed", "heads"), bias=True, **kw)
        self.k_proj = _linear(h, kv, ("embed", "kv_heads"), bias=True, **kw)
        self.v_proj = _linear(h, kv, ("embed", "kv_heads"), bias=True, **kw)
        self.o_proj = _linear(q, h, ("heads", "embed"), bias=False, **kw)
        self.num_heads = cfg.num_attention_heads
        self.num_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.dtype = dtype
        self.decode_attention = cfg.decode_attention

    def __call__(self, x, cos, sin, mask, kv=None, cache_index=None, attend_cache=False):
        """x [B, T, H]; mask [B, T, S] bool (True = may attend), or for a one-token step over
        the cache a pair (start [B], end [B]): row b attends to slots start <= j < end.

        kv: this layer's cache (k, v) [B, KV, S, D] or None. The new keys/values are written at
        slot `cache_index`; attention runs over the whole cache when `attend_cache`, else over
        the T new keys only (a prefill from slot 0 or a cache-free forward).
        """
        b, t, _ = x.shape
        d, nkv = self.head_dim, self.num_kv
        q = self.q_proj(x).reshape(b, t, self.num_heads, d)
        k = self.k_proj(x).reshape(b, t, nkv, d)
        v = self.v_proj(x).reshape(b, t, nkv, d)
        q = constrain(_apply_rope(q, cos, sin), ("batch", "length", "act_heads", "head_dim"))
        k = constrain(_apply_rope(k, cos, sin), ("batch", "length", "act_kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "act_kv_heads", "head_dim"))
        if isinstance(mask, Segments | PrefillLengths):  # full-sequence causal attention
            return self._full(q, k, v, mask, kv)
        k = jnp.swapaxes(k, 1, 2)  # [B, KV, T, D], the cache layout
        v = jnp.swapaxes(v, 1, 2)
        if kv is not None:
            ck, cv = kv
            idx = (0, 0, cache_index, 0)
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), idx)
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), idx)
            names = ("batch", "act_kv_heads", "cache_length", "head_dim")
            kv = (constrain(ck, names), constrain(cv, names))
            if attend_cache:
                k, v = kv[0].astype(self.dtype), kv[1].astype(self.dtype)
        if isinstance(mask, tuple):  # (start, end) key ranges of a one-token decode step
            if (
                attend_cache
                and t == 1
                and attn.use_pallas_decode(self.decode_attention, k.shape[2])
            ):
                out = attn.decode_gqa(q, k, v, mask, self.decode_attention)
                out = constrain(out, ("batch", "length", "act_heads"))
                return self.o_proj(out), kv
            slots = jnp.arange(k.shape[2])
            start, end = mask
            mask = ((slots[None] >= start[:, None]) & (slots[None] < end[:, None]))[:, None, :]
        out = attn.masked_gqa(q, k, v, mask).reshape(b, t, self.num_heads * d)
        out = constrain(out, ("batch", "length", "act_heads"))
        return self.o_proj(out), kv

    def _full(self, q, k, v, mask: Segments | PrefillLengths, kv):
        """Causal attention over the T new tokens by `attention.attend` (no [B, T, T] mask):
        over segments (training), or over right-padded rows (prefill, row b valid in
        [:lengths[b]]; cuDNN's fused flash attention on GPU in bf16/fp16). A prefill writes
        each row's keys/values into the cache shifted right by T - len, so all prompts end at
        slot T-1.
        """
        b, t, h, d = q.shape
        if isinstance(mask, Segments):
            seg, impl, packed, lengths = mask.segment_ids, mask.implementation, mask.packed, None
        else:
            lengths = mask.lengths
            seg = (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.int32)
            impl, packed = "auto", False
        out = attn.attend(q, k, v, seg, implementation=impl, packed=packed)
        out = constrain(out.reshape(b, t, h * d), ("batch", "length", "act_heads"))
        if kv is not None and lengths is not None:
            shift = t - lengths

            def to_cache(x, c):  # [B, T, KV, D] -> rows right-aligned, [B, KV, T, D]
                x = jax.vmap(lambda r, s_: jnp.roll(r, s_, axis=0))(x, shift)
                x = jnp.swapaxes(x, 1, 2).astype(c.dtype)
                return jax.lax.dynamic_update_slice(c, x, (0, 0, 0, 0))

            names = ("batch", "act_kv_heads", "cache_length", "head_dim")
            kv = (constrain(to_cache(k, kv[0]), names), constrain(to_cache(v, kv[1]), names))
        return self.o_proj(out), kv


class Qwen2MLP(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs, dtype, param_dtype):
        h, m = cfg.hidden_size, cfg.intermediate_size
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, bias=False)
        self.gate_proj = _linear(h, m, ("embed", "mlp"), **kw)
        self.up_proj = _linear(h, m, ("embed", "mlp"), **kw)
        self.down_proj = _linear(m, h, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(constrain(y, ("batch", "length", "act_mlp")))


class Qwen2DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.self_attn = Qwen2Attention(cfg, rngs=rngs, **kw)
        self.mlp = Qwen2MLP(cfg, rngs=rngs, **kw)
        self.input_layernorm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.post_attention_layernorm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)

    def __call__(self, x, cos, sin, mask, kv=None, cache_index=None, attend_cache=False):
        a, kv = self.self_attn(
            self.input_layernorm(x), cos, sin, mask, kv, cache_index, attend_cache
        )
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "length", "act_embed")), kv


# remat policies by name (config.REMAT): what each layer keeps for the backward pass
REMAT_POLICIES = {
    "full": None,  # nothing: the whole layer is recomputed
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # weight matmul outputs
    "dots_all": jax.checkpoint_policies.dots_saveable,  # every matmul output
}


class Qwen2Model(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.cfg = cfg
        self.dtype = dtype
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            embedding_init=nnx.initializers.normal(0.02),
            embedding_metadata={"out_sharding": ("vocab", "embed")},
        )
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        if cfg.scan_layers:

            @nnx.split_rngs(splits=cfg.num_hidden_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make(r):
                return Qwen2DecoderLayer(cfg, rngs=r, **kw)

            self.layers = make(rngs)
        else:
            self.layers = nnx.List(
                [Qwen2DecoderLayer(cfg, rngs=rngs, **kw) for _ in range(cfg.num_hidden_layers)]
            )
        self.norm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)

    def __call__(
        self,
        x,
        positions,
        mask,
        cache: KVCache | None = None,
        cache_index=None,
        attend_cache: bool = False,
        remat: str | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Decoder stack on embeddings x [B, T, H] -> (final-normed hidden states, cache).

        `remat` (a `REMAT_POLICIES` name or "none") overrides `cfg.remat`.
        """
        cfg = self.cfg
        remat = cfg.remat if remat is None else remat
        if remat != "none" and remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; choose from {REMAT}")
        x = constrain(x.astype(self.dtype), ("batch", "length", "act_embed"))
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, self.dtype)

        def run_layer(graphdef, state, h, kv):
            layer = nnx.merge(graphdef, state)
            return layer(h, cos, sin, mask, kv, cache_index, attend_cache)

        if remat != "none":
            run_layer = jax.checkpoint(run_layer, policy=REMAT_POLICIES[remat], static_argnums=(0,))

        if cfg.scan_layers:
            graphdef, state = nnx.split(self.layers)

            def body(h, xs):
                st, ck, cv = xs
                h, kv = run_layer(graphdef, st, h, None if ck is None else (ck, cv))
                return h, (None, None) if kv is None else kv

            ks, vs = (None, None) if cache is None else (cache.k, cache.v)
            x, (ks, vs) = jax.lax.scan(body, x, (state, ks, vs))
            new_cache = None if cache is None else KVCache(ks, vs)
        else:
            ks, vs = [], []
            for i, layer in enumerate(self.layers):
                graphdef, state = nnx.split(layer)
                kv = None if cache is None else (cache.k[i], cache.v[i])
                x, kv = run_layer(graphdef, state, x, kv)
                if kv is not None:
                    ks.append(kv[0])
                    vs.append(kv[1])
            new_cache = None if cache is None else KVCache(tuple(ks), tuple(vs))
        return self.norm(x), new_cache


class Qwen2ForCausalLM(nnx.Module):
    """`transformers.Qwen2ForCausalLM` in NNX.

    Parameters are `param_dtype` (float32 for training; load in bf16 for inference to halve
    memory traffic), matmuls run in `dtype`; softmax and RMSNorm statistics are float32.
    """

    def __init__(
        self, cfg: Qwen2Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32
    ):
        self.cfg = cfg
        self.dtype = dtype
        self.model = Qwen2Model(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(
                cfg.hidden_size,
                cfg.vocab_size,
                ("embed", "vocab"),
                bias=False,
                rngs=rngs,
                dtype=dtype,
                param_dtype=param_dtype,
            )

    # ---- pieces used by the sampler and by PAM ------------------------------------------
    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token ids [B, T] -> input embeddings [B, T, H] in the compute dtype."""
        return constrain(self.model.embed_tokens(input_ids), ("batch", "length", "act_embed"))

    def logits(self, h: jax.Array) -> jax.Array:
        """Final hidden states [..., H] -> float32 logits [..., V]."""
        if self.cfg.tie_word_embeddings:
            w = self.model.embed_tokens.embedding[...].astype(self.dtype)
            out = jnp.einsum(
                "...h,vh->...v", h.astype(self.dtype), w, preferred_element_type=jnp.float32
            )
        else:
            w = self.lm_head.kernel[...].astype(self.dtype)
            out = jnp.einsum(
                "...h,hv->...v", h.astype(self.dtype), w, preferred_element_type=jnp.float32
            )
        return out.astype(jnp.float32)

    def init_cache(self, batch: int, length: int, dtype=None) -> KVCache:
        cfg = self.cfg
        shape = (batch, cfg.num_key_value_heads, length, cfg.head_dim)
        dtype = dtype or self.dtype
        if cfg.scan_layers:
            z = jnp.zeros((cfg.num_hidden_layers, *shape), dtype)
            return KVCache(z, z)
        zs = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers))
        return KVCache(zs, zs)

    def hidden_states(
        self, inputs_embeds, positions, mask, cache=None, cache_index=None, attend_cache=False
    ):
        """The decoder on embeddings; see `Qwen2Model.__call__`."""
        return self.model(inputs_embeds, positions, mask, cache, cache_index, attend_cache)

    def hidden_states_train(
        self,
        inputs_embeds: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        *,
        attention: str = "auto",
        remat: str | None = None,
        packed: bool = False,
    ) -> jax.Array:
        """The training forward: embeddings [B, T, H], positions [B, T] int32 and segment_ids
        [B, T] int32 (0 = padding; packed rows 1, 2, ...) -> final-normed hidden [B, T, H].

        Causal within each segment, never materialising [B, T, T] (`attention.attend`:
        "auto" | "chunked" | "cudnn" | "splash" | "dense"). `packed=True` says rows may hold
        several segments (cuDNN cannot, so "auto" then picks the chunked path on GPU).
        `remat` names a policy (`REMAT_POLICIES`, or "none"); None keeps `cfg.remat`.
        """
        if segment_ids.shape != inputs_embeds.shape[:2] or positions.shape != segment_ids.shape:
            raise ValueError(
                f"positions {positions.shape} and segment_ids {segment_ids.shape} must be "
                f"[B, T] = {inputs_embeds.shape[:2]}"
            )
        attn.resolve(attention, self.dtype, packed=packed)  # fail before tracing the stack
        mask = Segments(segment_ids.astype(jnp.int32), attention, packed)
        h, _ = self.model(inputs_embeds, positions, mask, remat=remat)
        return h

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Full causal forward without cache -> float32 logits [B, T, V].

        attention_mask [B, T] (1 = token, 0 = padding) as in HF; positions default to
        `cumsum(mask) - 1` (HF's rule, so left padding works) or `arange(T)`.
        """
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        attention_mask = attention_mask.astype(bool)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
        causal = jnp.tril(jnp.ones((t, t), bool))
        mask = causal[None] & attention_mask[:, None, :]
        h, _ = self.model(x, positions, mask)
        return constrain(self.logits(h), ("batch", "length", "act_vocab"))
