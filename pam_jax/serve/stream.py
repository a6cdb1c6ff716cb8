"""Streamed batched generation: one jitted prefill, then jitted decode calls of `chunk` tokens
each (a `lax.while_loop` inside; no Python loop per token), the host reading the tokens between
calls.

The steps are `pam_jax.llm.sampler`'s own (`plan_cache`, `prefill_state`, `decode_step`: the
one-call program runs the same ones), split at the chunk boundaries, so the tokens equal one
`sampler.generate` call's (tests/serve/test_api.py checks it). The sampler
keeps its single-call program (the fastest path for offline prediction); this module is the
server's, where the first words must show before the last token is generated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from pam_jax.llm.sampler import (
    LoopState,
    PreparedModel,
    SamplingMode,
    SamplingParams,
    decode_step,
    plan_cache,
    prefill_state,
)
from pam_jax.prepared import merge


@dataclasses.dataclass
class Chunk:
    """The tokens so far after one decode call: tokens [B, step], lengths [B] (tokens up to and
    including a stop token), done [B]."""

    tokens: np.ndarray
    lengths: np.ndarray
    done: np.ndarray

    @property
    def finished(self) -> bool:
        return bool(self.done.all())


@partial(jax.jit, static_argnames=("structure", "max_new_tokens", "cache_length", "mode"))
def _prefill(
    structure, leaves, prompt, lengths, stop_ids, rng, values, pad_id, *,
    max_new_tokens: int, cache_length: int, mode: SamplingMode,
):  # fmt: skip
    model = merge(structure, leaves)
    b = prompt.shape[0]
    seen = jnp.zeros((b, model.cfg.vocab_size), bool) if mode.use_penalty else None
    return prefill_state(
        model, prompt, lengths, seen, stop_ids, rng, values, pad_id,
        max_new_tokens=max_new_tokens, cache_length=cache_length, mode=mode,
    )  # fmt: skip


@partial(jax.jit, static_argnames=("structure", "chunk", "prompt_len", "mode"), donate_argnums=2)
def _decode(
    structure, leaves, state: LoopState, lengths, stop_ids, values, pad_id, *,
    chunk: int, prompt_len: int, mode: SamplingMode,
):  # fmt: skip
    model = merge(structure, leaves)
    end = jnp.minimum(state.step + chunk, state.tokens.shape[1])

    def cond(s: LoopState):
        return (s.step < end) & ~jnp.all(s.done)

    def body(s: LoopState) -> LoopState:
        return decode_step(model, s, lengths, prompt_len, stop_ids, values, pad_id, mode)

    return jax.lax.while_loop(cond, body, state)


def stream_generate(
    model: PreparedModel,
    inputs_embeds: jax.Array,
    prompt_lengths: Sequence[int] | np.ndarray,
    *,
    max_new_tokens: int,
    chunk: int = 8,
    sampling: SamplingParams | None = None,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    rng: int = 0,
    buckets: Sequence[int] | None = None,
) -> Iterator[Chunk]:
    """Yield a `Chunk` after the prefill and after every decode call of up to `chunk` tokens,
    until every row stopped or `max_new_tokens` were generated. inputs_embeds [B, T, H] right
    padded with prompt_lengths [B], as `sampler.generate` (its cache sizing and length limit)."""
    if max_new_tokens < 1 or chunk < 1:
        raise ValueError(f"max_new_tokens and chunk must be >= 1, got {max_new_tokens}, {chunk}")
    lengths = np.asarray(prompt_lengths, np.int32)
    n = int(lengths.max())
    tb, cache_length = plan_cache(
        model.cfg, n, max_new_tokens, buckets, model.cfg.max_position_embeddings
    )
    x = jnp.asarray(inputs_embeds)[:, :n]
    prompt = jnp.pad(x, ((0, 0), (0, tb - n), (0, 0)))
    sampling = sampling or SamplingParams()
    mode = sampling.mode
    stops = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
    values, pad = sampling.values(), jnp.int32(pad_id)
    lens = jnp.asarray(lengths)
    state = _prefill(
        model.structure, model.leaves, prompt, lens, stops, jax.random.key(rng), values, pad,
        max_new_tokens=max_new_tokens, cache_length=cache_length, mode=mode,
    )  # fmt: skip
    while True:
        step = int(state.step)
        out = Chunk(
            np.asarray(state.tokens[:, :step]), np.asarray(state.lengths), np.asarray(state.done)
        )
        yield out
        if out.finished or step >= max_new_tokens:
            return
        state = _decode(
            model.structure, model.leaves, state, lens, stops, values, pad,
            chunk=chunk, prompt_len=tb, mode=mode,
        )  # fmt: skip
