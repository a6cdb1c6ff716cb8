"""Batched generation: a jitted prefill, then a jitted `jax.lax.while_loop` decode.

Inputs are **right-padded** (row b holds its prompt in `[:prompt_lengths[b]]`), given as token
ids or as input embeddings (PAM puts visual embeddings into the sequence). Inside, the prompt
length is rounded up to a bucket (`bucket_length`); the prefill runs causally on the
right-padded rows (cuDNN flash attention on GPU) and writes each row's keys/values shifted so
that all prompts end at the same cache slot (left padding in the cache); row b's positions are
`0..len_b-1` and its padding slots are masked out of attention. Every decode step then
writes the same cache slot for all rows: one `dynamic_update_slice` with a scalar index into
per-layer `[B, KV, S, D]` arrays.

One compilation per (bucket, batch, max_new_tokens, cache length, sampling mode): the float
sampling values (temperature, top-p, repetition penalty) are traced, only their on/off switches
and top-k are static. `TRACES` counts traces so tests can assert it.

Sampling follows HF's order: repetition penalty (on raw logits; with ids it covers prompt and
generated tokens, with embeddings only generated tokens, as HF's `generate(inputs_embeds=...)`),
then temperature, top-k, top-p (HF's rule: drop the tokens whose ascending cumulative
probability is <= 1 - top_p, keep at least one). Temperature 0 is greedy (argmax after the
penalty). After a stop id a row emits `pad_id`; `lengths` counts tokens up to and including
the stop token.

`generate(on_step=f)` compiles an unordered `jax.debug.callback` into the decode loop (f gets
the tokens generated so far: a progress bar); without it nothing is compiled in.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import itertools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pam_jax import prepared
from pam_jax.llm.qwen2 import KVCache, PrefillLengths
from pam_jax.prepared import Structure, merge

TRACES: collections.Counter = collections.Counter()  # (bucket, batch, max_new) -> traces


@dataclasses.dataclass(frozen=True)
class SamplingMode:
    """The static part of `SamplingParams`: one compilation per mode."""

    greedy: bool  # argmax (temperature 0)
    top_k: int  # 0 = off (always 0 when greedy)
    use_top_p: bool
    use_penalty: bool  # repetition penalty != 1


@struct.dataclass
class SamplingValues:
    """The traced part of `SamplingParams` (changing them does not recompile)."""

    temperature: jax.Array  # float32 scalar; 1 when greedy
    top_p: jax.Array
    repetition_penalty: jax.Array


@struct.dataclass
class LoopState:
    """The decode loop's carry."""

    step: jax.Array  # int32 scalar: tokens generated so far (the next one's column)
    tokens: jax.Array  # [B, max_new_tokens] int32, pad_id after a stop
    last: jax.Array  # [B] int32, the token fed to the next step
    done: jax.Array  # [B] bool, a stop token was emitted
    lengths: jax.Array  # [B] int32, tokens generated including the stop token
    cache: KVCache
    rng: jax.Array
    seen: jax.Array | None  # [B, V] bool tokens the repetition penalty covers; None when off


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")

    @property
    def mode(self) -> SamplingMode:
        """The static part (greedy, top-k, top-p and penalty switches)."""
        greedy = self.temperature == 0
        return SamplingMode(
            greedy=greedy,
            top_k=0 if greedy else self.top_k,
            use_top_p=(not greedy) and self.top_p < 1,
            use_penalty=self.repetition_penalty != 1.0,
        )

    def values(self) -> SamplingValues:
        return SamplingValues(
            temperature=jnp.float32(self.temperature or 1.0),
            top_p=jnp.float32(self.top_p),
            repetition_penalty=jnp.float32(self.repetition_penalty),
        )


def repetition_penalty(value: float | None, tokenizer: Any) -> float:
    """The one default: `value` if given, else the model's generation_config.json (1.05 for
    the release; HF applies it in greedy decoding too), else 1 (off)."""
    if value is not None:
        return float(value)
    cfg = getattr(tokenizer, "generation_config", None) or {}
    return float(cfg.get("repetition_penalty", 1.0))


@dataclasses.dataclass(frozen=True)
class PreparedModel:
    """A model split and flattened once: per call, `nnx.split` of a 28-layer model costs ~25 ms
    of Python, hashing its GraphDef several more, flattening its State ~5 ms."""

    structure: Structure
    leaves: list
    cfg: Any


def prepare(model: Any) -> PreparedModel:
    """Split `model` once for repeated `generate` calls (re-prepare after changing weights)."""
    if isinstance(model, PreparedModel):
        return model
    p = prepared.prepare(model)
    return PreparedModel(p.structure, p.leaves, model.cfg)


@dataclasses.dataclass
class Generated:
    tokens: np.ndarray  # [B, max_new_tokens] int32, pad_id after a stop token
    lengths: np.ndarray  # [B] tokens generated, including the stop token


def default_buckets(limit: int = 1 << 17) -> list[int]:
    """16, 32, 64, 128 then four per octave (160, 192, 224, 256, 320, ...): <= 25% padding."""
    out = [16, 32, 64]
    b = 128
    while b <= limit:
        out += [b, b * 5 // 4, b * 3 // 2, b * 7 // 4]
        b *= 2
    return out


def bucket_length(n: int, buckets: Sequence[int] | None = None) -> int:
    buckets = sorted(buckets or default_buckets())
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"prompt of {n} tokens is longer than the largest bucket {buckets[-1]}")
    return buckets[i]


# ---- logits processing ------------------------------------------------------------------
def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty) -> jax.Array:
    pen = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, pen, logits)


def _top_p_mask(sorted_desc: jax.Array, top_p) -> jax.Array:
    """Keep-mask over logits sorted descending, with HF's ascending-cumsum rule."""
    asc = sorted_desc[..., ::-1]
    cum = jnp.cumsum(jax.nn.softmax(asc, axis=-1), axis=-1)
    remove = cum <= (1 - top_p)
    remove = remove.at[..., -1].set(False)
    return ~remove[..., ::-1]


def _candidates(logits: jax.Array, temperature, top_k: int, use_top_p: bool, top_p):
    """-> (candidate logits [B, K] with -inf for removed, candidate token ids [B, K])."""
    logits = logits / temperature
    k = top_k if top_k > 0 else logits.shape[-1]
    if top_k > 0 or use_top_p:
        vals, idx = jax.lax.top_k(logits, k)
    else:
        vals = logits
        idx = jnp.broadcast_to(jnp.arange(logits.shape[-1]), logits.shape)
    if use_top_p:
        vals = jnp.where(_top_p_mask(vals, top_p), vals, -jnp.inf)
    return vals, idx


def warp_logits(
    logits: jax.Array, sampling: SamplingParams, seen: jax.Array | None = None
) -> jax.Array:
    """Full-vocabulary processed logits (-inf where filtered), as HF's processors return them.

    For tests and inspection; the sampler uses the same code on the candidates only.
    """
    mode = sampling.mode
    logits = logits.astype(jnp.float32)
    if mode.use_penalty and seen is not None:
        logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    if mode.greedy:
        return logits
    vals, idx = _candidates(
        logits, sampling.temperature, mode.top_k, mode.use_top_p, sampling.top_p
    )
    out = jnp.full_like(logits, -jnp.inf)
    return jax.vmap(lambda o, i, v: o.at[i].set(v))(out, idx, vals)


def _sample(logits, seen, rng, values: SamplingValues, mode: SamplingMode):
    if mode.use_penalty:
        logits = apply_repetition_penalty(logits, seen, values.repetition_penalty)
    if mode.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    vals, idx = _candidates(logits, values.temperature, mode.top_k, mode.use_top_p, values.top_p)
    choice = jax.random.categorical(rng, vals, axis=-1)
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


# ---- progress ----------------------------------------------------------------------------
# Host callbacks by id: the id is a traced argument, so calls with different callbacks share one
# compilation, and concurrent `generate` calls (threads) each reach their own callback.
_STEP_HOOKS: dict[int, Callable[[int], None]] = {}
_HOOK_IDS = itertools.count(1)


def _on_step(hook_id: Any, step: Any) -> None:
    """Host side of the decode loop's progress callback."""
    hook = _STEP_HOOKS.get(int(hook_id))
    if hook is not None:
        hook(int(step))


# ---- the steps, shared by the one-call program and the server's streamed chunks ----------
def plan_cache(
    cfg: Any, n: int, max_new_tokens: int, buckets: Sequence[int] | None, limit: int
) -> tuple[int, int]:
    """(padded prompt length, KV-cache slots) for prompts of at most `n` tokens."""
    if n + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {n} tokens + max_new_tokens {max_new_tokens} exceeds the "
            f"cache length {limit}"
        )
    tb = bucket_length(n, buckets)
    # the Pallas decode kernel splits the cache into up to 16 chunks of 128-slot blocks
    # (qwen2._decode_splits); 256-slot alignment keeps a split count >= 2 available
    impl = cfg.decode_attention
    pallas = impl.startswith("pallas") or (impl == "auto" and jax.default_backend() == "gpu")
    align = 256 if pallas else 8
    cache_length = -(-(tb + max_new_tokens) // align) * align
    if cache_length > limit:
        cache_length = tb + max_new_tokens
        if cache_length > limit:  # the bucket rounding pushed it over: pad to n exactly
            tb, cache_length = n, n + max_new_tokens
    return tb, cache_length


def _is_stop(tok: jax.Array, stop_ids: jax.Array) -> jax.Array:
    return jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)


def prefill_state(
    model: Any, x, lengths, seen, stop_ids, rng, values: SamplingValues, pad_id, *,
    max_new_tokens: int, cache_length: int, mode: SamplingMode,
) -> LoopState:  # fmt: skip
    """Traced: the prefill over right-padded embeddings x [B, T, H] (the cache written
    right-aligned) and the first sampled token, as the decode loop's first carry."""
    b, t = x.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    cache = model.init_cache(b, cache_length)
    h, cache = model.hidden_states(x, positions, PrefillLengths(lengths), cache, 0)
    h_last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
    rng, key = jax.random.split(rng)
    first = _sample(model.logits(h_last), seen, key, values, mode)
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


def decode_step(
    model: Any, s: LoopState, lengths, prompt_len: int, stop_ids, values: SamplingValues,
    pad_id, mode: SamplingMode,
) -> LoopState:  # fmt: skip
    """Traced: one decode step over the cache (prompts of `lengths` end at slot prompt_len-1)."""
    b = s.last.shape[0]
    slot = prompt_len + s.step - 1  # where the last token's k/v go
    pos = (lengths + s.step - 1)[:, None]
    m = (prompt_len - lengths, jnp.full((b,), slot + 1, jnp.int32))  # keys start <= j <= slot
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


def _grow_rows(s: LoopState, b: int, scan_layers: bool) -> LoopState:
    """Pad the carry to b rows with copies of row 0 (decode-only rows)."""
    b0 = s.last.shape[0]
    if b <= b0:
        return s

    def grow(a, axis=0):
        extra = jnp.repeat(jax.lax.slice_in_dim(a, 0, 1, axis=axis), b - b0, axis=axis)
        return jnp.concatenate([a, extra], axis=axis)

    axis = 1 if scan_layers else 0  # stacked caches are [L, B, ...]
    return s.replace(
        tokens=grow(s.tokens),
        last=grow(s.last),
        done=grow(s.done),
        lengths=grow(s.lengths),
        cache=jax.tree.map(lambda c: grow(c, axis), s.cache),
        seen=None if s.seen is None else grow(s.seen),
    )


# ---- the two jitted programs: prefill, then the decode loop --------------------------------
# Two programs, each compiled with the GEMM backend it wants on GPU (benchmarks/README.md, the
# 32-region call at PAM-3B shapes): the prefill's large GEMMs run faster on cuBLAS alone (A/B
# on the H200: prefill 323 vs 329 ms, the call 0.740 vs 0.753 s), the decode loop's skinny ones
# on XLA's Triton GEMMs (cuBLAS alone: 6.38 vs 3.75 ms/step). The prefill's state (KV cache
# included) is donated to the loop. $PAM_JAX_PREFILL_CUBLAS=0 keeps the default backends for
# the prefill too.
PREFILL_GPU_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def _prefill(
    structure, leaves, prompt, lengths, seen, stop_ids, rng, values, pad_id, hook_id, *,
    max_new_tokens: int, cache_length: int, mode: SamplingMode, from_ids: bool,
    decode_batch: int, report_steps: bool = False,
):  # fmt: skip
    b0, t = prompt.shape[:2]
    TRACES[(t, b0, max_new_tokens)] += 1  # runs only while tracing
    model = merge(structure, leaves)
    x = model.embed(prompt) if from_ids else prompt
    state0 = prefill_state(
        model, x, lengths, seen, stop_ids, rng, values, pad_id,
        max_new_tokens=max_new_tokens, cache_length=cache_length, mode=mode,
    )  # fmt: skip
    if report_steps:
        jax.debug.callback(_on_step, hook_id, jnp.int32(1), ordered=False)
    b = max(b0, decode_batch)
    if b > b0:  # decode with copies of row 0 (prefill ran on the real rows only)
        state0 = _grow_rows(state0, b, model.cfg.scan_layers)
        lengths = jnp.concatenate([lengths, jnp.repeat(lengths[:1], b - b0)])
    return state0, lengths


_PREFILL_STATIC = (
    "structure", "max_new_tokens", "cache_length", "mode", "from_ids", "decode_batch",
    "report_steps",
)  # fmt: skip


@functools.cache
def _prefill_program(cublas: bool) -> Callable:
    options = PREFILL_GPU_OPTIONS if cublas else None
    return jax.jit(_prefill, static_argnames=_PREFILL_STATIC, compiler_options=options)


def prefill_program() -> Callable:
    """The jitted prefill for the default backend (GPU: cuBLAS GEMMs unless
    $PAM_JAX_PREFILL_CUBLAS=0)."""
    gpu = jax.default_backend() == "gpu"
    return _prefill_program(gpu and os.environ.get("PAM_JAX_PREFILL_CUBLAS", "1") != "0")


@functools.partial(
    jax.jit,
    static_argnames=("structure", "prompt_len", "mode", "report_steps", "rows"),
    donate_argnames=("state0",),
)
def _decode(
    structure, leaves, state0: LoopState, lengths, stop_ids, values, pad_id, hook_id, *,
    prompt_len: int, mode: SamplingMode, rows: int, report_steps: bool = False,
):  # fmt: skip
    model = merge(structure, leaves)
    max_new_tokens = state0.tokens.shape[1]

    def cond(s: LoopState):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: LoopState) -> LoopState:
        s = decode_step(model, s, lengths, prompt_len, stop_ids, values, pad_id, mode)
        if report_steps:  # static: no callback in the loop unless asked
            jax.debug.callback(_on_step, hook_id, s.step, ordered=False)
        return s

    out = jax.lax.while_loop(cond, body, state0)
    # the whole final state is returned so that every donated buffer aliases an output (the
    # loop then runs in the prefill's cache, no copy); callers keep the two slices
    return out, out.tokens[:rows], out.lengths[:rows]


def _generate(
    structure, leaves, prompt, lengths, seen, stop_ids, rng, values, pad_id, hook_id, *,
    max_new_tokens: int, cache_length: int, mode: SamplingMode, from_ids: bool,
    decode_batch: int, report_steps: bool = False,
):  # fmt: skip
    """Dispatch the prefill program, then the decode loop on its donated state:
    (tokens [B, max_new_tokens], lengths [B]) as device arrays."""
    state0, dec_lengths = prefill_program()(
        structure, leaves, prompt, lengths, seen, stop_ids, rng, values, pad_id, hook_id,
        max_new_tokens=max_new_tokens, cache_length=cache_length, mode=mode,
        from_ids=from_ids, decode_batch=decode_batch, report_steps=report_steps,
    )  # fmt: skip
    _, tokens, out_lengths = _decode(
        structure, leaves, state0, dec_lengths, stop_ids, values, pad_id, hook_id,
        prompt_len=prompt.shape[1], mode=mode, rows=prompt.shape[0], report_steps=report_steps,
    )  # fmt: skip
    return tokens, out_lengths


def generate_async(
    model: Any,
    *,
    input_ids: Any = None,
    inputs_embeds: Any = None,
    prompt_lengths: Sequence[int] | np.ndarray | None = None,
    max_new_tokens: int = 32,
    sampling: SamplingParams = SamplingParams(),
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    rng: jax.Array | int = 0,
    buckets: Sequence[int] | None = None,
    max_cache_length: int | None = None,
    min_batch: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> PendingGeneration:
    """Dispatch the generation of up to `max_new_tokens` per row, without waiting for it:
    the returned `PendingGeneration`'s `result()` gives the host arrays (`generate` waits).

    input_ids [B, T] int or inputs_embeds [B, T, H]; both right-padded with `prompt_lengths`
    [B] (default: all T). The result: host arrays `tokens [B, max_new_tokens]`, `lengths [B]`.
    The KV cache has bucket(T) + max_new_tokens slots (rounded up to a multiple of 8); a prompt
    for which that exceeds `max_cache_length` (default: the config's max_position_embeddings)
    is an error.

    `model` is a `Qwen2ForCausalLM` or a `prepare(model)` (saves the split per call).
    `min_batch` pads the decode loop's batch with copies of row 0 after the prefill (default 2
    on GPU, where XLA's M=1 matrix-vector products run at a third of the M=2 bandwidth).
    `on_step(n)` is called on the host after each decode step with the tokens generated so far
    (a progress bar; one host round trip per step, none when it is None).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids and inputs_embeds")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    cfg = model.cfg
    from_ids = input_ids is not None
    prompt = jnp.asarray(input_ids, jnp.int32) if from_ids else jnp.asarray(inputs_embeds)
    if from_ids and prompt.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {prompt.shape}")
    if not from_ids and (prompt.ndim != 3 or prompt.shape[-1] != cfg.hidden_size):
        raise ValueError(f"inputs_embeds must be [B, T, {cfg.hidden_size}], got {prompt.shape}")
    b, t = prompt.shape[:2]
    lengths = np.full((b,), t) if prompt_lengths is None else np.asarray(prompt_lengths)
    if lengths.shape != (b,) or lengths.min() < 1 or lengths.max() > t:
        raise ValueError(f"prompt_lengths must be [B] in [1, {t}], got {lengths.tolist()}")
    n = int(lengths.max())
    limit = max_cache_length or cfg.max_position_embeddings
    tb, cache_length = plan_cache(cfg, n, max_new_tokens, buckets, limit)
    prompt = (
        prompt[:, :n]
        if tb <= n
        else jnp.pad(prompt[:, :n], ((0, 0), (0, tb - n)) + ((0, 0),) * (prompt.ndim - 2))
    )
    mode = sampling.mode
    seen = None
    if mode.use_penalty:
        seen = np.zeros((b, cfg.vocab_size), bool)
        if from_ids:  # HF penalises the prompt tokens too when they are given as ids
            ids = np.asarray(input_ids)
            rows, cols = np.nonzero(np.arange(ids.shape[1])[None, :] < lengths[:, None])
            seen[rows, ids[rows, cols]] = True
        seen = jnp.asarray(seen)
    stops = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    values = sampling.values()
    if min_batch is None:
        min_batch = 2 if jax.default_backend() == "gpu" else 1
    lengths_in = jnp.asarray(lengths, jnp.int32)
    pm = prepare(model)
    hook_id = 0
    if on_step is not None:
        hook_id = next(_HOOK_IDS)
        _STEP_HOOKS[hook_id] = on_step
    try:
        tokens, lens = _generate(
            pm.structure,
            pm.leaves,
            prompt,
            lengths_in,
            seen,
            stops,
            key,
            values,
            jnp.int32(pad_id),
            jnp.int32(hook_id),
            max_new_tokens=max_new_tokens,
            cache_length=cache_length,
            mode=mode,
            from_ids=from_ids,
            decode_batch=max(b, min_batch),
            report_steps=on_step is not None,
        )
    except BaseException:
        _STEP_HOOKS.pop(hook_id, None)
        raise
    return PendingGeneration(tokens, lens, hook_id if on_step is not None else None)


@dataclasses.dataclass
class PendingGeneration:
    """A dispatched generation (`generate_async`): its tokens are still being computed on the
    device; `result()` waits for them."""

    tokens: jax.Array
    lengths: jax.Array
    hook_id: int | None = None

    def result(self) -> Generated:
        try:
            out = Generated(np.asarray(self.tokens), np.asarray(self.lengths))
            if self.hook_id is not None:
                jax.effects_barrier()  # every step's callback has run before the hook goes
            return out
        finally:
            if self.hook_id is not None:
                _STEP_HOOKS.pop(self.hook_id, None)


def generate(model: Any, **kwargs: Any) -> Generated:
    """`generate_async(model, **kwargs).result()`: waits for the host arrays `tokens [B,
    max_new_tokens]`, `lengths [B]` (the keyword arguments are `generate_async`'s)."""
    return generate_async(model, **kwargs).result()
