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
`PrefillLengths(lengths)`: causal over right-padded rows, the cache written right-aligned
(cuDNN flash attention on GPU); or `(start, end)` per-row key ranges for a one-token step over
the cache (a Pallas flash-decoding kernel on GPU, `cfg.decode_attention`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pam_jax.llm.config import Qwen2Config
from pam_jax.sharding import constrain

_NEG = float(jnp.finfo(jnp.float32).min)


class KVCache(NamedTuple):
    """Keys, values: tuples of per-layer `[B, KV, S, D]` arrays, or stacked `[L, B, KV, S, D]`."""

    k: Any
    v: Any


def _linear(
    din: int, dout: int, axes: tuple[str, str], *, bias: bool, rngs: nnx.Rngs, dtype, param_dtype
) -> nnx.Linear:
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        kernel_init=nnx.initializers.normal(0.02),
        kernel_metadata={"out_sharding": axes},
        bias_metadata={"out_sharding": (axes[1],)},
    )


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


def _decode_splits(s: int) -> tuple[int, int] | None:
    """(k_splits, block_k) for the Pallas decode kernel over a cache of s slots, or None.

    The largest key block that still leaves >= 8 splits (or one per block on short caches):
    on an H100 at PAM's 1280-slot cache (Qwen2.5-3B, batch 1) 10 x 128 ran 2.91 ms/step,
    16 x 16 3.05, 2 x 128 3.16; at batch 32 the choices were within 2% of each other.
    """
    for bk in (128, 64, 32, 16):
        blocks = s // bk
        if s % bk == 0 and blocks >= 1:
            ks = max(d for d in range(1, 17) if blocks % d == 0)
            if ks >= 8 or ks == blocks:
                return ks, bk
    for ks in (16, 8, 4, 2):
        n = s // ks
        if s % ks == 0 and n >= 16 and n % 16 == 0:
            return ks, next(bk for bk in (128, 64, 32, 16) if n % bk == 0)
    return None


def _use_pallas(impl: str, cache_len: int) -> bool:
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" else "xla"
    return impl.startswith("pallas") and _decode_splits(cache_len) is not None


def _pallas_decode(q, k, v, ranges, impl: str) -> jax.Array:
    """Flash-decoding (split-K) GQA attention of one query token over the cache.

    q [B, 1, H, D]; k, v [B, KV, S, D]; ranges = (start, end) per row. A Pallas (Triton) kernel
    from jax.experimental: XLA's own decode attention is a chain of small latency-bound kernels.
    """
    from jax.experimental.pallas.ops.gpu.decode_attention import gqa

    b, _, h, d = q.shape
    ks, bk = _decode_splits(k.shape[2])
    start, end = ranges
    out = gqa(
        q.reshape(b, h, d),
        jnp.swapaxes(k, 1, 2),
        jnp.swapaxes(v, 1, 2),
        start_idx=start,
        kv_seq_len=end,
        k_splits=ks,
        block_k=bk,
        interpret=impl == "pallas_interpret",
    )
    return out.reshape(b, 1, h * d).astype(q.dtype)


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
        g = self.num_heads // nkv
        q = self.q_proj(x).reshape(b, t, self.num_heads, d)
        k = self.k_proj(x).reshape(b, t, nkv, d)
        v = self.v_proj(x).reshape(b, t, nkv, d)
        q = constrain(_apply_rope(q, cos, sin), ("batch", "length", "act_heads", "head_dim"))
        k = constrain(_apply_rope(k, cos, sin), ("batch", "length", "act_kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "act_kv_heads", "head_dim"))
        if isinstance(mask, PrefillLengths):  # right-padded causal prefill
            return self._prefill(q, k, v, mask.lengths, kv)
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
            if attend_cache and t == 1 and _use_pallas(self.decode_attention, k.shape[2]):
                out = _pallas_decode(q, k, v, mask, self.decode_attention)
                out = constrain(out, ("batch", "length", "act_heads"))
                return self.o_proj(out), kv
            slots = jnp.arange(k.shape[2])
            start, end = mask
            mask = ((slots[None] >= start[:, None]) & (slots[None] < end[:, None]))[:, None, :]
        # grouped-query attention without repeating K/V: q [B, T, KV, G, D]
        q = q.reshape(b, t, nkv, g, d)
        scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores * (d**-0.5)
        scores = jnp.where(mask[:, None, None, :, :], scores, _NEG)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bksd->btkgd", probs, v).reshape(b, t, self.num_heads * d)
        out = constrain(out, ("batch", "length", "act_heads"))
        return self.o_proj(out), kv

    def _prefill(self, q, k, v, lengths, kv):
        """Causal attention over right-padded rows (row b valid in [:lengths[b]]); the cache
        gets each row's keys/values shifted right by T - len, so all prompts end at slot T-1.

        On GPU in bf16/fp16 this is cuDNN's fused flash attention (seq-length padding masks);
        elsewhere XLA with an explicit mask.
        """
        b, t, h, d = q.shape
        fused = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
        if fused:
            out = jax.nn.dot_product_attention(
                q,
                k,
                v,
                is_causal=True,
                query_seq_lengths=lengths,
                key_value_seq_lengths=lengths,
                implementation="cudnn",
            )
        else:
            nkv = self.num_kv
            slots = jnp.arange(t)
            mask = (slots[:, None] >= slots[None, :])[None] & (slots < lengths[:, None])[:, None]
            qg = q.reshape(b, t, nkv, h // nkv, d)
            scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
            scores = jnp.where(mask[:, None, None], scores * (d**-0.5), _NEG)
            probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
            out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
        out = constrain(out.reshape(b, t, h * d), ("batch", "length", "act_heads"))
        if kv is not None:
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


def _remat_policy(name: str):
    return {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[name]


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
    ) -> tuple[jax.Array, KVCache | None]:
        """Decoder stack on embeddings x [B, T, H] -> (final-normed hidden states, cache)."""
        cfg = self.cfg
        x = constrain(x.astype(self.dtype), ("batch", "length", "act_embed"))
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, self.dtype)
        policy = _remat_policy(cfg.remat) if cfg.remat != "none" else None

        def run_layer(graphdef, state, h, kv):
            layer = nnx.merge(graphdef, state)
            return layer(h, cos, sin, mask, kv, cache_index, attend_cache)

        if cfg.remat != "none":
            run_layer = jax.checkpoint(run_layer, policy=policy, static_argnums=(0,))

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
