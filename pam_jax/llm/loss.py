"""The language-model loss, chunked over the sequence so [B, T, V] float32 logits never exist,
and computed only where there is something to learn.

`lm_loss_sums(llm, hidden, labels)` -> (sum of token NLLs, number of counted tokens): shifted
cross entropy (position t predicts labels[t + 1], as HF's `ForCausalLMLoss`), over the model's
full (padded) vocabulary, float32 log-softmax.

The head is the costliest part of the loss (8 x positions x hidden x vocab FLOPs forward and
backward: about an eighth of a PAM-3B step if every position went through it), yet only the
supervised positions (the answers, a few percent of an image sample's row) contribute. So each
row's supervised positions are moved to its front (a stable sort, then a gather), the row is cut
into chunks of `chunk` positions, and one `lax.while_loop` runs the head over the leading chunks
that hold a target, forward and backward (a custom VJP over the whole loss: the loop's trip count
is data-dependent, which reverse-mode autodiff of a loop cannot take). Each chunk's logits are
computed, reduced and dropped inside the loop, so the loss holds one [B, chunk, V] block at a
time, keeps only the log-sum-exp per position, and recomputes the logits once in the backward.
The backward's two head matmuls run in the compute dtype (the softmax gradient is cast to it, as
the release's bf16 autocast does), not on float32 [B, chunk, V] cotangents against bf16 weights
(XLA would upcast the weight and run both in float32); the head's gradient accumulates in
float32 over the chunks. Return sums, not a mean, so a trainer can normalise over any group (per
batch, across gradient-accumulation steps or hosts) exactly.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pam_jax.sharding import constrain

IGNORE_INDEX = -100  # labels < 0 (HF and the release use -100) are not counted
CHUNK = 128


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
    b, t, _ = hidden.shape
    targets = jnp.concatenate(
        [labels[:, 1:].astype(jnp.int32), jnp.full((b, 1), IGNORE_INDEX, jnp.int32)], axis=1
    )
    c = min(chunk, t)
    pad = -t % c
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    # each row's supervised positions first, in order (the sort is stable); the gather's
    # inverse runs in the custom backward
    order = jnp.argsort(jnp.where(targets >= 0, 0, 1).astype(jnp.int8), axis=1, stable=True)
    targets = jnp.take_along_axis(targets, order, axis=1)
    w, w_hv = head_weight(llm)
    nll = head_nll(hidden.astype(w.dtype), w, targets, order, c, w_hv)
    return nll, jnp.sum(targets >= 0).astype(jnp.int32)


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


def _live_chunks(targets: jax.Array, c: int) -> jax.Array:
    """1 + the last chunk index holding a target (0: none): the chunks the loop runs. Exact
    for any order of targets; the sort makes it the longest row's count / c."""
    n = targets.shape[1] // c
    has = jnp.any((targets >= 0).reshape(targets.shape[0], n, c), axis=(0, 2))
    return jnp.max(jnp.where(has, jnp.arange(1, n + 1), 0))


def _slice(x: jax.Array, i: jax.Array, c: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=1)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def head_nll(
    hidden: jax.Array, w: jax.Array, targets: jax.Array, order: jax.Array, c: int, w_hv: bool
) -> jax.Array:
    """Sum of NLLs: hidden [B, T, H] (T a multiple of c, in the original order), w the head
    (`head_weight`), targets [B, T] already permuted by `order` (each row's gather indices)."""
    return _head_fwd(hidden, w, targets, order, c, w_hv)[0]


def _head_fwd(hidden, w, targets, order, c, w_hv):
    hs = jnp.take_along_axis(hidden, order[..., None], axis=1)
    live = _live_chunks(targets, c)

    def body(carry):
        i, total, lse = carry
        y = _slice(targets, i, c)
        logits = _chunk_logits(_slice(hs, i, c), w, w_hv)
        lse_i = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, jnp.where(y >= 0, y, 0)[..., None], axis=-1)
        nll = jnp.where(y >= 0, lse_i - picked[..., 0], 0.0)
        lse = jax.lax.dynamic_update_slice_in_dim(lse, lse_i, i * c, axis=1)
        return i + 1, total + jnp.sum(nll), lse

    lse0 = jnp.zeros(targets.shape, jnp.float32)
    _, total, lse = jax.lax.while_loop(
        lambda s: s[0] < live, body, (jnp.int32(0), jnp.float32(0), lse0)
    )
    return total, (hs, w, targets, order, lse, live)


def _head_bwd(c, w_hv, res, ct):
    hs, w, targets, order, lse, live = res
    f32 = jnp.float32
    v = w.shape[1] if w_hv else w.shape[0]

    def body(carry):
        i, dhs, dw = carry
        y = _slice(targets, i, c)
        h = _slice(hs, i, c)
        logits = _chunk_logits(h, w, w_hv)
        onehot = jnp.arange(v, dtype=jnp.int32) == y[..., None]  # y < 0 matches nothing
        p = jnp.exp(logits - _slice(lse, i, c)[..., None])
        d = (p - onehot) * jnp.where(y >= 0, ct, 0.0)[..., None]
        d = constrain(d.astype(h.dtype), ("batch", "length", "act_vocab"))
        if w_hv:
            dh = jnp.einsum("bcv,hv->bch", d, w, preferred_element_type=f32)
            dw = dw + jnp.einsum("bch,bcv->hv", h, d, preferred_element_type=f32)
        else:
            dh = jnp.einsum("bcv,vh->bch", d, w, preferred_element_type=f32)
            dw = dw + jnp.einsum("bch,bcv->vh", h, d, preferred_element_type=f32)
        dhs = jax.lax.dynamic_update_slice_in_dim(dhs, dh.astype(hs.dtype), i * c, axis=1)
        return i + 1, dhs, dw

    dw_names = ("embed", "vocab") if w_hv else ("vocab", "embed")
    dw0 = constrain(jnp.zeros(w.shape, f32), dw_names)
    _, dhs, dw = jax.lax.while_loop(
        lambda s: s[0] < live, body, (jnp.int32(0), jnp.zeros_like(hs), dw0)
    )
    # undo the row sort: position order[b, j] receives dhs[b, j]
    inverse = jnp.argsort(order, axis=1)
    dh = jnp.take_along_axis(dhs, inverse[..., None], axis=1)
    zero = lambda x: np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731
    return dh, dw.astype(w.dtype), zero(targets), zero(order)


head_nll.defvjp(_head_fwd, _head_bwd)
