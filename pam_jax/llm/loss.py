"""The language-model loss, chunked over the sequence so [B, T, V] float32 logits never exist.

`lm_loss_sums(llm, hidden, labels)` -> (sum of token NLLs, number of counted tokens): shifted
cross entropy (position t predicts labels[t + 1], as HF's `ForCausalLMLoss`), over the model's
full (padded) vocabulary, float32 log-softmax. The sequence is cut into chunks of `chunk`
positions; each chunk's logits are computed, reduced and dropped inside a `lax.scan`, so forward
and backward hold one [B, chunk, V] block at a time: the chunk has a custom VJP that keeps only
its log-sum-exp and recomputes the logits once in the backward pass. The backward's two head
matmuls run in the compute dtype (the softmax gradient is cast to it, as the release's bf16
autocast does), not on float32 [B, chunk, V] cotangents against bf16 weights (XLA would upcast
the weight and run both in float32). Return sums, not a mean, so a trainer can normalise over
any group (per batch, across gradient-accumulation steps or hosts) exactly.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pam_jax.sharding import constrain

IGNORE_INDEX = -100  # labels < 0 (HF and the release use -100) are not counted
CHUNK = 512


def lm_loss_sums(
    llm: Any, hidden: jax.Array, labels: jax.Array, *, chunk: int = CHUNK
) -> tuple[jax.Array, jax.Array]:
    """hidden [B, T, H] (final-normed, `hidden_states_train`), labels [B, T] int (-100 =
    ignored, NOT shifted) -> (nll_sum float32 scalar, n_tokens int32 scalar).

    `llm` is a `Qwen2ForCausalLM` (its `logits` maps hidden states to float32 logits).
    """
    if hidden.ndim != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden must be [B, T, H] and labels [B, T]: {hidden.shape}, {labels.shape}"
        )
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    b, t, h = hidden.shape
    targets = jnp.concatenate(
        [labels[:, 1:].astype(jnp.int32), jnp.full((b, 1), IGNORE_INDEX, jnp.int32)], axis=1
    )
    c = min(chunk, t)
    pad = -t % c
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    n = (t + pad) // c
    hs = jnp.swapaxes(hidden.reshape(b, n, c, h), 0, 1)  # [n, B, c, H]
    ys = jnp.swapaxes(targets.reshape(b, n, c), 0, 1)

    w, w_hv = head_weight(llm)
    hs = hs.astype(w.dtype)

    def chunk_sums(hc, yc):
        return chunk_nll(hc, w, yc, w_hv)

    def body(carry, xs):
        s, k = chunk_sums(*xs)
        return (carry[0] + s, carry[1] + k), None

    (nll, count), _ = jax.lax.scan(body, (jnp.float32(0), jnp.int32(0)), (hs, ys))
    return nll, count


def head_weight(llm: Any) -> tuple[jax.Array, bool]:
    """The output head of a `Qwen2ForCausalLM` in its compute dtype, as `logits` uses it:
    (the tied embedding [V, H], False) or (lm_head.kernel [H, V], True)."""
    if llm.cfg.tie_word_embeddings:
        return llm.model.embed_tokens.embedding[...].astype(llm.dtype), False
    return llm.lm_head.kernel[...].astype(llm.dtype), True


def _chunk_logits(h: jax.Array, w: jax.Array, w_hv: bool) -> jax.Array:
    spec = "bch,hv->bcv" if w_hv else "bch,vh->bcv"
    logits = jnp.einsum(spec, h, w, preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "length", "act_vocab"))


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunk_nll(h: jax.Array, w: jax.Array, y: jax.Array, w_hv: bool):
    """(NLL sum, counted tokens) of one chunk: h [B, c, H], w the head (`head_weight`),
    y [B, c] targets (< 0 ignored); float32 logits and log-softmax."""
    return _chunk_fwd(h, w, y, w_hv)[0]


def _chunk_fwd(h, w, y, w_hv):
    logits = _chunk_logits(h, w, w_hv)
    lse = jax.nn.logsumexp(logits, axis=-1)
    valid = y >= 0
    picked = jnp.take_along_axis(logits, jnp.where(valid, y, 0)[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid, lse - picked, 0.0)
    return (jnp.sum(nll), jnp.sum(valid.astype(jnp.int32))), (h, w, y, lse)


def _chunk_bwd(w_hv, res, ct):
    h, w, y, lse = res
    logits = _chunk_logits(h, w, w_hv)
    v = logits.shape[-1]
    onehot = jnp.arange(v, dtype=jnp.int32) == y[..., None]  # y < 0 matches nothing
    d = (jnp.exp(logits - lse[..., None]) - onehot) * jnp.where(y >= 0, ct[0], 0.0)[..., None]
    d = constrain(d.astype(h.dtype), ("batch", "length", "act_vocab"))
    f32 = jnp.float32
    if w_hv:
        dh = jnp.einsum("bcv,hv->bch", d, w, preferred_element_type=f32)
        dw = jnp.einsum("bch,bcv->hv", h, d, preferred_element_type=f32)
    else:
        dh = jnp.einsum("bcv,vh->bch", d, w, preferred_element_type=f32)
        dw = jnp.einsum("bch,bcv->vh", h, d, preferred_element_type=f32)
    return dh.astype(h.dtype), dw.astype(w.dtype), np.zeros(y.shape, jax.dtypes.float0)


chunk_nll.defvjp(_chunk_fwd, _chunk_bwd)
