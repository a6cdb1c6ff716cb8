"""The language-model loss, chunked over the sequence so [B, T, V] float32 logits never exist.

`lm_loss_sums(llm, hidden, labels)` -> (sum of token NLLs, number of counted tokens): shifted
cross entropy (position t predicts labels[t + 1], as HF's `ForCausalLMLoss`), over the model's
full (padded) vocabulary, float32 log-softmax. The sequence is cut into chunks of `chunk`
positions; each chunk's logits are computed, reduced and dropped inside a `lax.scan` whose body
is rematerialised (`jax.checkpoint`), so forward and backward hold one [B, chunk, V] block at a
time. Return sums, not a mean, so a trainer can normalise over any group (per batch, across
gradient-accumulation steps or hosts) exactly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

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

    @jax.checkpoint
    def chunk_sums(hc, yc):
        logits = constrain(llm.logits(hc), ("batch", "length", "act_vocab"))  # float32
        lse = jax.nn.logsumexp(logits, axis=-1)
        valid = yc >= 0
        picked = jnp.take_along_axis(logits, jnp.where(valid, yc, 0)[..., None], axis=-1)
        nll = jnp.where(valid, lse - picked[..., 0], 0.0)
        return jnp.sum(nll), jnp.sum(valid.astype(jnp.int32))

    def body(carry, xs):
        s, k = chunk_sums(*xs)
        return (carry[0] + s, carry[1] + k), None

    (nll, count), _ = jax.lax.scan(body, (jnp.float32(0), jnp.int32(0)), (hs, ys))
    return nll, count
