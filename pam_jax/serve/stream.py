"""Streamed batched generation: one jitted prefill, then jitted decode calls of `chunk` tokens
each (a `lax.while_loop` inside; no Python loop per token), the host reading the tokens between
calls.

The math is `pam_jax.llm.sampler._generate`'s (right-padded prompts written right-aligned into
the cache, the same `_sample` and stop / pad rules), split at the chunk boundaries so that the
tokens equal one `sampler.generate` call's (tests/serve/test_stream.py checks it). The sampler
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

from pam_jax.llm.qwen2 import PrefillLengths
from pam_jax.llm.sampler import (
    LoopState,
    PreparedModel,
    SamplingMode,
    SamplingParams,
    _sample,
    bucket_length,
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


def _is_stop(tok, stop_ids):
    return jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)


@partial(jax.jit, static_argnames=("structure", "max_new_tokens", "cache_length", "mode"))
def _prefill(
    structure, leaves, prompt, lengths, stop_ids, rng, values, pad_id, *,
    max_new_tokens: int, cache_length: int, mode: SamplingMode,
):  # fmt: skip
    model = merge(structure, leaves)
    b, t = prompt.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    cache = model.init_cache(b, cache_length)
    h, cache = model.hidden_states(prompt, positions, PrefillLengths(lengths), cache, 0)
    logits = model.logits(jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0])
    seen = jnp.zeros((b, model.cfg.vocab_size), bool) if mode.use_penalty else None
    rng, key = jax.random.split(rng)
    first = _sample(logits, seen, key, values, mode)
    if mode.use_penalty:
        seen = seen.at[jnp.arange(b), first].set(True)
    return LoopState(
        step=jnp.int32(1),
        tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first),
        last=first,
        done=_is_stop(first, stop_ids),
        lengths=jnp.ones((b,), jnp.int32),
        cache=cache,
        rng=rng,
        seen=seen,
    )


@partial(jax.jit, static_argnames=("structure", "chunk", "prompt_len", "mode"), donate_argnums=2)
def _decode(
    structure, leaves, state: LoopState, lengths, stop_ids, values, pad_id, *,
    chunk: int, prompt_len: int, mode: SamplingMode,
):  # fmt: skip
    model = merge(structure, leaves)
    b, max_new = state.tokens.shape
    t = prompt_len
    start = t - lengths
    end = jnp.minimum(state.step + chunk, max_new)

    def cond(s: LoopState):
        return (s.step < end) & ~jnp.all(s.done)

    def body(s: LoopState) -> LoopState:
        slot = t + s.step - 1
        pos = (lengths + s.step - 1)[:, None]
        m = (start, jnp.full((b,), slot + 1, jnp.int32))
        h, cache = model.hidden_states(
            model.embed(s.last[:, None]), pos, m, s.cache, slot, attend_cache=True
        )
        rng, key = jax.random.split(s.rng)
        nxt = jnp.where(s.done, pad_id, _sample(model.logits(h[:, 0]), s.seen, key, values, mode))
        return s.replace(
            step=s.step + 1,
            tokens=jax.lax.dynamic_update_slice(s.tokens, nxt[:, None], (0, s.step)),
            last=nxt,
            done=s.done | _is_stop(nxt, stop_ids),
            lengths=s.lengths + (~s.done).astype(jnp.int32),
            cache=cache,
            rng=rng,
            seen=s.seen.at[jnp.arange(b), nxt].set(True) if mode.use_penalty else s.seen,
        )

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
    limit = model.cfg.max_position_embeddings
    if n + max_new_tokens > limit:
        raise ValueError(f"prompt of {n} + {max_new_tokens} new tokens exceeds {limit} positions")
    tb = bucket_length(n, buckets)
    impl = model.cfg.decode_attention  # the Pallas decode kernel wants 256-slot caches
    pallas = impl.startswith("pallas") or (impl == "auto" and jax.default_backend() == "gpu")
    align = 256 if pallas else 8
    cache_length = -(-(tb + max_new_tokens) // align) * align
    if cache_length > limit:
        tb, cache_length = n, n + max_new_tokens
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
