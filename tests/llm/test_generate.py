"""Jitted generation vs transformers' generate (CPU, float32, perturbed tiny models).

Greedy decoding must be token-identical to HF for every row of a batch with different prompt
lengths (HF runs each row alone, unpadded: the ground truth). Sampling cannot share HF's RNG, so
the processed logits (`warp_logits`) are compared with HF's warpers instead (atol 1e-6, and the
same set of filtered tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pam_jax.llm import sampler
from pam_jax.llm.io import load_qwen2
from pam_jax.llm.sampler import SamplingParams, generate, warp_logits
from tests.llm.conftest import right_padded

LENS = [9, 4, 13]
NEW = 32


@pytest.fixture(scope="module")
def loaded(converted):
    """Tied and untied: for the HF parity tests."""
    hm, _, jd = converted
    model, _, tok = load_qwen2(jd, jnp.float32)
    return hm, model, tok


@pytest.fixture(scope="module")
def one(converted_untied):
    """One model for the semantic tests (tying does not matter to them)."""
    hm, _, jd = converted_untied
    model, _, tok = load_qwen2(jd, jnp.float32)
    return hm, model, tok


def _hf_generate(hm, **kw):
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kw)
    with torch.no_grad():
        return hm.generate(**kw)[0].numpy()


def test_greedy_batch_matches_hf(loaded):
    hm, model, _ = loaded
    ids = right_padded(LENS, seed=10)
    out = generate(model, input_ids=ids, prompt_lengths=LENS, max_new_tokens=NEW)
    assert out.tokens.shape == (3, NEW) and (out.lengths == NEW).all()
    for b, n in enumerate(LENS):
        ref = _hf_generate(hm, input_ids=torch.tensor(ids[b : b + 1, :n]))[n:]
        np.testing.assert_array_equal(out.tokens[b], ref)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_inputs_embeds_match_hf(loaded, penalty):
    """Prefix given as embeddings == HF generate(inputs_embeds=...), with and without the
    repetition penalty (which then covers generated tokens only, as in HF)."""
    hm, model, _ = loaded
    ids = right_padded(LENS, seed=11)
    with torch.no_grad():
        emb = hm.model.embed_tokens(torch.tensor(ids))
    # perturb the embeddings so they are not any token's: a real "visual" prefix
    emb = emb + 0.05 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(0))
    sp = SamplingParams(repetition_penalty=penalty)
    out = generate(
        model,
        inputs_embeds=jnp.asarray(emb.numpy()),
        prompt_lengths=LENS,
        max_new_tokens=NEW,
        sampling=sp,
    )
    for b, n in enumerate(LENS):
        ref = _hf_generate(hm, inputs_embeds=emb[b : b + 1, :n], repetition_penalty=penalty)
        np.testing.assert_array_equal(out.tokens[b], ref)


def test_repetition_penalty_with_ids_matches_hf(one):
    hm, model, _ = one
    ids = right_padded(LENS, seed=12)
    out = generate(
        model,
        input_ids=ids,
        prompt_lengths=LENS,
        max_new_tokens=NEW,
        sampling=SamplingParams(repetition_penalty=1.5),
    )
    for b, n in enumerate(LENS):
        ref = _hf_generate(hm, input_ids=torch.tensor(ids[b : b + 1, :n]), repetition_penalty=1.5)[
            n:
        ]
        np.testing.assert_array_equal(out.tokens[b], ref)


def test_stop_ids(one):
    hm, model, _ = one
    ids = right_padded(LENS, seed=10)
    free = generate(model, input_ids=ids, prompt_lengths=LENS, max_new_tokens=NEW)
    # stop on row 0's 4th token and row 1's 6th: each row stops at its first occurrence
    stops = [int(free.tokens[0, 3]), int(free.tokens[1, 5])]
    out = generate(
        model, input_ids=ids, prompt_lengths=LENS, max_new_tokens=NEW, stop_ids=stops, pad_id=-7
    )
    for b in range(3):
        hit = np.nonzero(np.isin(free.tokens[b], stops))[0]
        n = int(hit[0]) + 1 if len(hit) else NEW
        assert out.lengths[b] == n
        np.testing.assert_array_equal(out.tokens[b, :n], free.tokens[b, :n])
        assert (out.tokens[b, n:] == -7).all()
        # HF with the same stop ids agrees on the row's output (it pads with pad_token_id)
        ref = _hf_generate(
            hm, input_ids=torch.tensor(ids[b : b + 1, : LENS[b]]), eos_token_id=stops
        )[LENS[b] :]
        np.testing.assert_array_equal(ref[:n], out.tokens[b, :n])
        assert len(ref) == n or (ref[n:] == 0).all()


def test_compiles_once_per_bucket(one):
    _, model, _ = one
    before = dict(sampler.TRACES)
    for lens in ([5, 7], [3, 12], [16, 1]):  # all in the 16 bucket
        generate(
            model, input_ids=right_padded(lens, seed=13), prompt_lengths=lens, max_new_tokens=6
        )
    for lens in ([17, 2], [30, 20]):  # the 32 bucket
        generate(
            model, input_ids=right_padded(lens, seed=14), prompt_lengths=lens, max_new_tokens=6
        )
    new = {k: v - before.get(k, 0) for k, v in sampler.TRACES.items()}
    assert new[(16, 2, 6)] == 1 and new[(32, 2, 6)] == 1, new
    # changing only the float sampling values does not recompile either
    for t in (0.7, 1.3):
        generate(
            model,
            input_ids=right_padded([5, 7]),
            prompt_lengths=[5, 7],
            max_new_tokens=6,
            sampling=SamplingParams(temperature=t, top_p=0.9),
        )
    assert sampler.TRACES[(16, 2, 6)] - before.get((16, 2, 6), 0) == 2  # one greedy, one top-p


@pytest.mark.parametrize(
    "sp",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=7),
        SamplingParams(temperature=0.8, top_p=0.6),
        SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),
    ],
    ids=["temp", "topk", "topp", "release"],
)
def test_warpers_match_hf(sp):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rs = np.random.RandomState(0)
    logits = rs.randn(4, 200).astype(np.float32) * 3
    prev = rs.randint(0, 200, (4, 12))
    procs = []
    if sp.repetition_penalty != 1:
        procs.append(RepetitionPenaltyLogitsProcessor(sp.repetition_penalty))
    procs.append(TemperatureLogitsWarper(sp.temperature))
    if sp.top_k:
        procs.append(TopKLogitsWarper(sp.top_k))
    if sp.top_p < 1:
        procs.append(TopPLogitsWarper(sp.top_p))
    ref = LogitsProcessorList(procs)(torch.tensor(prev), torch.tensor(logits)).numpy()
    seen = np.zeros((4, 200), bool)
    np.put_along_axis(seen, prev, True, axis=1)
    out = np.asarray(warp_logits(jnp.asarray(logits), sp, jnp.asarray(seen)))
    np.testing.assert_array_equal(np.isinf(out), np.isinf(ref))
    fin = np.isfinite(ref)
    assert np.abs(out[fin] - ref[fin]).max() < 1e-6


def test_sampling_semantics(one):
    _, model, _ = one
    ids = right_padded(LENS, seed=15)
    kw = dict(input_ids=ids, prompt_lengths=LENS, max_new_tokens=12)
    greedy = generate(model, **kw).tokens
    # top-k 1 and a tiny top-p leave only the argmax: sampling must reduce to greedy
    k1 = generate(model, sampling=SamplingParams(temperature=1.0, top_k=1), rng=3, **kw)
    p0 = generate(model, sampling=SamplingParams(temperature=1.0, top_p=1e-6), rng=4, **kw)
    np.testing.assert_array_equal(k1.tokens, greedy)
    np.testing.assert_array_equal(p0.tokens, greedy)
    sp = SamplingParams(temperature=1.5, top_k=50)
    a = generate(model, sampling=sp, rng=1, **kw).tokens
    b = generate(model, sampling=sp, rng=1, **kw).tokens
    c = generate(model, sampling=sp, rng=jax.random.key(2), **kw).tokens
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy).any()


def test_errors(one):
    _, model, _ = one
    ids = right_padded([20])
    with pytest.raises(ValueError, match="exceeds the cache length"):
        generate(model, input_ids=ids, max_new_tokens=8, max_cache_length=24)
    with pytest.raises(ValueError, match="exceeds the cache length"):
        generate(model, input_ids=right_padded([500]), max_new_tokens=32)  # max_position 512
    with pytest.raises(ValueError, match="exactly one"):
        generate(model, max_new_tokens=8)
    with pytest.raises(ValueError, match="prompt_lengths"):
        generate(model, input_ids=ids, prompt_lengths=[0], max_new_tokens=8)
    with pytest.raises(ValueError, match="inputs_embeds"):
        generate(model, inputs_embeds=jnp.zeros((1, 4, 7)), max_new_tokens=8)
    # an exact fit still works: the bucket falls back to the prompt length
    out = generate(model, input_ids=ids, max_new_tokens=4, max_cache_length=24)
    assert out.tokens.shape == (1, 4)


def test_pallas_decode_kernel_matches_xla(converted_untied):
    """The GPU flash-decoding kernel (run by the Pallas interpreter on CPU) == XLA attention."""
    _, _, jd = converted_untied
    xla, _, _ = load_qwen2(jd, jnp.float32, decode_attention="xla")
    pal, _, _ = load_qwen2(jd, jnp.float32, decode_attention="pallas_interpret")
    ids = right_padded(LENS, seed=16)
    a = generate(xla, input_ids=ids, prompt_lengths=LENS, max_new_tokens=8)
    b = generate(pal, input_ids=ids, prompt_lengths=LENS, max_new_tokens=8)
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_decode_splits_fit_the_pallas_kernel():
    """Every (k_splits, block_k) chosen satisfies the kernel's asserts (jax's
    decode_attention: divisible splits of >= 16 slots, blocks of >= 16 dividing a split)."""
    from pam_jax.llm.qwen2 import _decode_splits

    for s in range(1, 20_000):
        got = _decode_splits(s)
        if got is None:
            continue
        ks, bk = got
        split = s // ks
        assert s % ks == 0 and split >= 16 and bk >= 16, (s, got)
        assert split % min(bk, split) == 0, (s, got)
    assert _decode_splits(1280) == (10, 128)  # PAM's cache: the H100 sweep's best


def test_decode_batch_padding(one):
    """GPU pads batch 1 to 2 for the decode loop (min_batch): same tokens, same output shape."""
    _, model, _ = one
    ids = right_padded([7], seed=17)
    sp = SamplingParams(repetition_penalty=1.3)
    a = generate(model, input_ids=ids, max_new_tokens=8, sampling=sp, min_batch=1)
    b = generate(model, input_ids=ids, max_new_tokens=8, sampling=sp, min_batch=2)
    assert b.tokens.shape == (1, 8)
    np.testing.assert_array_equal(a.tokens, b.tokens)
