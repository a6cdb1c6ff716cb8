"""lm_loss_sums: chunked shifted cross entropy == a direct [B, T, V] computation == torch's
CrossEntropyLoss(ignore_index=-100, reduction="sum") on the shifted logits.

Tolerance: 1e-4 relative on the NLL sum (float32 log-softmax, summation order differs by
chunk); gradients 1e-5 absolute. Token counts are exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from pam_jax.checkpoint import random_normal_params
from pam_jax.llm.config import tiny
from pam_jax.llm.loss import lm_loss_sums
from pam_jax.llm.qwen2 import Qwen2ForCausalLM


@pytest.fixture(scope="module")
def setup():
    cfg = tiny(vocab_size=96)
    model = random_normal_params(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)), std=0.3)
    rs = np.random.RandomState(0)
    b, t = 3, 37
    hidden = jnp.asarray(rs.randn(b, t, cfg.hidden_size).astype(np.float32))
    labels = rs.randint(0, cfg.vocab_size, (b, t))
    labels[rs.rand(b, t) < 0.3] = -100
    labels[2] = -100  # a row with nothing to learn
    return model, hidden, jnp.asarray(labels)


def _direct(model, hidden, labels):
    logits = model.logits(hidden)[:, :-1]
    y = labels[:, 1:]
    logp = jax.nn.log_softmax(logits, axis=-1)
    valid = y != -100
    picked = jnp.take_along_axis(logp, jnp.where(valid, y, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0)), jnp.sum(valid)


@pytest.mark.parametrize("chunk", [8, 37, 512])  # padded chunks, one exact chunk, > T
def test_matches_direct_and_torch(setup, chunk):
    model, hidden, labels = setup
    nll, n = jax.jit(lambda h, y: lm_loss_sums(model, h, y, chunk=chunk))(hidden, labels)
    ref, ref_n = _direct(model, hidden, labels)
    assert nll.dtype == jnp.float32 and n.dtype == jnp.int32
    assert int(n) == int(ref_n) == int(np.sum(np.asarray(labels)[:, 1:] != -100))
    np.testing.assert_allclose(float(nll), float(ref), rtol=1e-4)
    logits = torch.tensor(np.asarray(model.logits(hidden)))
    ce = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="sum")
    v = logits.shape[-1]
    want = ce(
        logits[:, :-1].reshape(-1, v),
        torch.tensor(np.asarray(labels), dtype=torch.long)[:, 1:].reshape(-1),
    )
    np.testing.assert_allclose(float(nll), float(want), rtol=1e-4)


def test_gradients_match_direct(setup):
    model, hidden, labels = setup
    g1 = jax.jit(jax.grad(lambda h: lm_loss_sums(model, h, labels, chunk=8)[0]))(hidden)
    g2 = jax.jit(jax.grad(lambda h: _direct(model, h, labels)[0]))(hidden)
    np.testing.assert_allclose(g1, g2, atol=1e-5)
    assert float(jnp.abs(g1[2]).max()) == 0.0  # the all-ignored row gets no gradient


def test_bad_shapes(setup):
    model, hidden, labels = setup
    with pytest.raises(ValueError, match="labels"):
        lm_loss_sums(model, hidden, labels[:, :-1])
    with pytest.raises(ValueError, match="chunk"):
        lm_loss_sums(model, hidden, labels, chunk=0)
