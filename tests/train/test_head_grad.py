"""The training loss head's custom VJP (`pam_jax.llm.loss.head_nll`): the chunked loss and
its gradients with respect to the hidden states and the head weight equal autodiff through
`Qwen2ForCausalLM.logits` of the whole [B, T, V] cross entropy, tied and untied heads; in bf16
the backward has no float32 x bf16 matmul; the head weight is not stacked per chunk.

Tolerances: float32, NLL 1e-5 relative and gradients 1e-5 absolute (the same math, float32
sums in another order); bf16 gradients 2% of the largest entry against the float32
reference (bf16 has 8 mantissa bits; the float32 path itself is checked exactly above).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pam_jax.checkpoint import random_normal_params
from pam_jax.llm.config import tiny
from pam_jax.llm.loss import lm_loss_sums
from pam_jax.llm.qwen2 import Qwen2ForCausalLM


def _model(tied: bool, dtype=jnp.float32):
    cfg = tiny(vocab_size=96, tie_word_embeddings=tied)
    return random_normal_params(
        lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype), std=0.3
    )


def _data(h: int):
    rs = np.random.RandomState(1)
    b, t = 3, 37
    hidden = jnp.asarray(rs.randn(b, t, h).astype(np.float32))
    labels = rs.randint(0, 96, (b, t))
    labels[rs.rand(b, t) < 0.3] = -100
    labels[2] = -100  # a row with nothing to learn
    return hidden, jnp.asarray(labels)


def _direct(model, hidden, labels):
    """Autodiff reference: full logits, log-softmax, shifted targets."""
    logits = model.logits(hidden)[:, :-1]
    y = labels[:, 1:]
    valid = y != -100
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(valid, y, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0))


def _grads(model, loss_fn, hidden, labels):
    graphdef, state = nnx.split(model)

    def f(state, h):
        return loss_fn(nnx.merge(graphdef, state), h, labels)

    (val, (gs, gh)) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(state, hidden)
    return val, nnx.to_flat_state(gs), gh


def _head_key(tied: bool) -> tuple:
    return ("model", "embed_tokens", "embedding") if tied else ("lm_head", "kernel")


@pytest.mark.parametrize("tied", [True, False])
def test_float32_values_and_gradients_equal_autodiff(tied):
    model = _model(tied)
    hidden, labels = _data(model.cfg.hidden_size)
    got_v, got_s, got_h = _grads(
        model, lambda m, h, y: lm_loss_sums(m, h, y, chunk=8)[0], hidden, labels
    )
    ref_v, ref_s, ref_h = _grads(model, _direct, hidden, labels)
    np.testing.assert_allclose(float(got_v), float(ref_v), rtol=1e-5)
    np.testing.assert_allclose(got_h, ref_h, atol=1e-5)
    assert float(jnp.abs(got_h[2]).max()) == 0.0  # the all-ignored row gets no gradient
    got, ref = dict(got_s), dict(ref_s)
    key = _head_key(tied)
    assert float(jnp.abs(ref[key][...]).max()) > 0
    for k in ref:
        np.testing.assert_allclose(got[k][...], ref[k][...], atol=1e-5, err_msg=str(k))


def _dots(jaxpr):
    from jax.extend import core as jcore

    for e in jaxpr.eqns:
        if e.primitive.name == "dot_general":
            yield e
        for v in e.params.values():
            subs = v if isinstance(v, tuple | list) else (v,)
            for s in subs:
                if isinstance(s, jcore.ClosedJaxpr):
                    yield from _dots(s.jaxpr)
                elif isinstance(s, jcore.Jaxpr):
                    yield from _dots(s)


@pytest.mark.parametrize("tied", [True, False])
def test_bf16_backward_runs_in_bf16(tied):
    model = _model(tied, jnp.bfloat16)
    hidden, labels = _data(model.cfg.hidden_size)
    hb = hidden.astype(jnp.bfloat16)
    graphdef, state = nnx.split(model)

    def f(state, h):
        return lm_loss_sums(nnx.merge(graphdef, state), h, labels, chunk=8)[0]

    jp = jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(state, hb)
    dots = list(_dots(jp.jaxpr))
    assert len(dots) >= 3  # forward logits, recomputed logits, dh, dw
    for e in dots:
        dt = {str(v.aval.dtype) for v in e.invars}
        assert dt == {"bfloat16"}, f"a head matmul on {dt} operands"
    _, gs, gh = _grads(model, lambda m, h, y: lm_loss_sums(m, h, y, chunk=8)[0], hb, labels)
    _, ref_s, ref_h = _grads(_model(tied), _direct, hidden, labels)
    key = _head_key(tied)
    for got, ref in ((gh, ref_h), (dict(gs)[key][...], dict(ref_s)[key][...])):
        got, ref = np.asarray(got, np.float32), np.asarray(ref)
        assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()


def test_head_weight_is_not_stacked_per_chunk():
    """Temporaries of the gradient with 16 chunks stay well under 16 copies of the head:
    the weight is a loop-invariant residual of the chunk scan, not saved per chunk."""
    cfg = tiny(vocab_size=8192, hidden_size=64, tie_word_embeddings=True)
    model = random_normal_params(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)), std=0.02)
    graphdef, state = nnx.split(model)
    b, t, chunk = 1, 256, 16
    hidden = jnp.zeros((b, t, cfg.hidden_size), jnp.float32)
    labels = jnp.zeros((b, t), jnp.int32)

    def f(state, h):
        return lm_loss_sums(nnx.merge(graphdef, state), h, labels, chunk=chunk)[0]

    comp = jax.jit(jax.grad(f, argnums=(0, 1))).lower(state, hidden).compile()
    head = cfg.vocab_size * cfg.hidden_size * 4
    tmp = comp.memory_analysis().temp_size_in_bytes
    assert tmp < 6 * head, (tmp, head)


def test_per_source_losses_split_the_total():
    """Mixture logs: each source's (NLL sum, tokens) equals the loss over that source's rows
    alone, and the sources add up to the batch's total (float32, 1e-5 relative)."""
    from pam_jax.training.loss import source_loss_sums

    model = _model(True)
    hidden, labels = _data(model.cfg.hidden_size)
    src = jnp.asarray([[1], [0], [1]])  # [B, 1]: one source per row
    nll, n = source_loss_sums(model, hidden, labels, src, 2, chunk=8)
    total, total_n = lm_loss_sums(model, hidden, labels, chunk=8)
    for i in range(2):
        rows = np.flatnonzero(np.asarray(src)[:, 0] == i)
        want, want_n = lm_loss_sums(model, hidden[rows], labels[rows], chunk=8)
        np.testing.assert_allclose(float(nll[i]), float(want), rtol=1e-5)
        assert float(n[i]) == int(want_n)
    np.testing.assert_allclose(float(nll.sum()), float(total), rtol=1e-5)
    assert float(n.sum()) == int(total_n) > 0
    assert source_loss_sums(model, hidden, labels, src, 1, chunk=8) is None  # one source: none


def test_only_chunks_with_targets_run():
    """The head runs on the leading chunks of each row's sorted supervised positions only:
    with answers at the rows' ends (the release's layout), 37 positions of which at most 6 a
    row are supervised take one chunk of 8, not five (unsorted, the last target sits in the
    fifth); values and gradients still equal the direct [B, T, V] computation (float32)."""

    from pam_jax.llm.loss import _live_chunks

    model = _model(True)
    hidden, _ = _data(model.cfg.hidden_size)
    labels = np.full((3, 37), -100)
    labels[0, 31:] = np.arange(6)  # the shifted targets: positions 30..35
    labels[1, 20:24] = 7
    labels = jnp.asarray(labels)
    targets = jnp.concatenate([labels[:, 1:], jnp.full((3, 1), -100)], axis=1)
    targets = jnp.pad(targets, ((0, 0), (0, 3)), constant_values=-100)  # 40 = 5 chunks of 8
    order = jnp.argsort(jnp.where(targets >= 0, 0, 1), axis=1, stable=True)
    assert int(_live_chunks(targets, 8)) == 5  # unsorted: up to the last target's chunk
    assert int(_live_chunks(jnp.take_along_axis(targets, order, axis=1), 8)) == 1
    got_v, got_s, got_h = _grads(
        model, lambda m, h, y: lm_loss_sums(m, h, y, chunk=8)[0], hidden, labels
    )
    ref_v, ref_s, ref_h = _grads(model, _direct, hidden, labels)
    np.testing.assert_allclose(float(got_v), float(ref_v), rtol=1e-5)
    np.testing.assert_allclose(got_h, ref_h, atol=1e-5)
    key = _head_key(True)
    np.testing.assert_allclose(dict(got_s)[key][...], dict(ref_s)[key][...], atol=1e-5)


def test_nothing_to_learn_is_zero():
    model = _model(False)
    hidden, _ = _data(model.cfg.hidden_size)
    labels = jnp.full(hidden.shape[:2], -100)
    nll, n = lm_loss_sums(model, hidden, labels, chunk=8)
    assert float(nll) == 0.0 and int(n) == 0
    _, gs, gh = _grads(model, lambda m, h, y: lm_loss_sums(m, h, y, chunk=8)[0], hidden, labels)
    assert float(jnp.abs(gh).max()) == 0.0
    assert float(jnp.abs(dict(gs)[_head_key(False)][...]).max()) == 0.0
