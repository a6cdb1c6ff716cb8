"""The decode loop's per-token progress callback (`generate(on_step=...)`): it reports every
step from inside the one jitted loop, changes no token, and is absent when not asked for."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from pam_jax.llm import sampler
from pam_jax.llm.config import tiny
from pam_jax.llm.qwen2 import Qwen2ForCausalLM
from pam_jax.llm.sampler import SamplingParams, generate

MAX_NEW = 7


@pytest.fixture(scope="module")
def model():
    return sampler.prepare(Qwen2ForCausalLM(tiny(), rngs=nnx.Rngs(0)))


def _run(model, **kw):
    ids = np.random.default_rng(0).integers(0, 128, (2, 5))
    return generate(
        model, input_ids=ids, prompt_lengths=[5, 3], max_new_tokens=MAX_NEW,
        sampling=SamplingParams(repetition_penalty=1.1), **kw,
    )  # fmt: skip


def test_on_step_reports_every_token_and_changes_nothing(model):
    steps: list[int] = []
    with_bar = _run(model, on_step=steps.append)
    plain = _run(model)
    np.testing.assert_array_equal(with_bar.tokens, plain.tokens)  # exact: same program + a print
    np.testing.assert_array_equal(with_bar.lengths, plain.lengths)
    # no stop ids: the loop runs all MAX_NEW steps; unordered callbacks may arrive out of order
    assert sorted(steps) == list(range(1, MAX_NEW + 1))
    assert not sampler._STEP_HOOKS  # the hook is gone after the call


def test_no_callback_compiled_without_on_step(model):
    """Zero cost when off: the jitted program holds no host callback unless asked."""
    ids = np.zeros((1, 16), np.int32)
    args = (
        model.structure, model.leaves, ids, np.full((1,), 16, np.int32), None,
        np.asarray([-1], np.int32), jax.random.key(0), SamplingParams().values(), np.int32(0),
        np.int32(0),
    )  # fmt: skip
    kw = dict(max_new_tokens=4, cache_length=24, mode=SamplingParams().mode, from_ids=True,
              decode_batch=1)  # fmt: skip
    prefill = sampler.prefill_program()
    off = prefill.lower(*args, **kw).as_text()
    on = prefill.lower(*args, **kw, report_steps=True).as_text()
    assert "callback" not in off.lower()
    assert "callback" in on.lower()
    # the decode loop, lowered on the prefill's state
    model_args, rest = args[:2], args[2:]
    state0, lengths = prefill(*args, **kw)
    dkw = dict(prompt_len=16, mode=kw["mode"], rows=1)
    dargs = (*model_args, state0, lengths, rest[3], rest[5], rest[6], rest[7])
    off = sampler._decode.lower(*dargs, **dkw).as_text()
    on = sampler._decode.lower(*dargs, **dkw, report_steps=True).as_text()
    assert "callback" not in off.lower()
    assert "callback" in on.lower()
