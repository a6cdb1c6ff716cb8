"""The training attention: chunked (flash-style) == dense reference == the current forward.

Tolerances (float32, CPU): attention outputs and gradients 1e-5 absolute on O(1) values (the
online softmax only reorders float32 sums; measured ~1e-6); decoder hidden states / logits 1e-4
(two layers of the same reordering, measured ~1e-6). The splash kernel in interpret mode is the
same math in float32: 1e-5.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pam_jax.checkpoint import random_normal_params
from pam_jax.llm import attention as A
from pam_jax.llm.config import tiny
from pam_jax.llm.qwen2 import Qwen2ForCausalLM


def _qkv(b, t, h, kv, d, seed=0):
    rs = np.random.RandomState(seed)
    return tuple(jnp.asarray(rs.randn(b, t, n, d).astype(np.float32)) for n in (h, kv, kv))


def _segments(t: int) -> jnp.ndarray:
    """Row 0: one sequence, right padding. Row 1: three packed sequences, then padding."""
    seg = np.zeros((2, t), np.int32)
    seg[0, : t * 3 // 4] = 1
    a, b_, c = t // 5, t // 2, t - t // 10
    seg[1, :a], seg[1, a:b_], seg[1, b_:c] = 1, 2, 3
    return jnp.asarray(seg)


@pytest.mark.parametrize("block", [512, 64, 48])  # one block; many (skipping); padded length
def test_chunked_equals_dense_forward_and_grads(block):
    q, k, v = _qkv(2, 200, 4, 2, 8)
    seg = _segments(200)
    w = jnp.asarray(np.random.RandomState(1).randn(*q.shape).astype(np.float32))
    chunked = jax.jit(lambda q, k, v: A.chunked_attention(q, k, v, seg, block=block))
    dense = jax.jit(lambda q, k, v: A.dense_attention(q, k, v, seg))
    np.testing.assert_allclose(chunked(q, k, v), dense(q, k, v), atol=1e-5)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * w)  # noqa: E731
    g1 = jax.jit(jax.grad(loss(chunked), argnums=(0, 1, 2)))(q, k, v)
    g2 = jax.jit(jax.grad(loss(dense), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # padding queries give zeros and receive no gradient
    assert float(jnp.abs(chunked(q, k, v)[0, 150:]).max()) == 0.0
    assert float(jnp.abs(g1[0][0, 150:]).max()) == 0.0


def _model(**kw):
    cfg = tiny(**kw)
    return random_normal_params(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)), std=0.2), cfg


def test_training_forward_equals_current_forward_with_padding_and_packing():
    model, cfg = _model()
    t = 40
    rs = np.random.RandomState(2)
    ids = jnp.asarray(rs.randint(0, cfg.vocab_size, (2, t)))
    seg = _segments(t)
    # positions restart in each segment (packing); padding positions are arbitrary
    pos = jnp.asarray(np.arange(t)[None] - np.asarray(A._runs(seg)[0]), jnp.int32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, pos, seg):
        m = nnx.merge(graphdef, state)
        x = m.embed(ids)
        chunked = m.hidden_states_train(x, pos, seg, attention="chunked")
        dense = m.hidden_states_train(x, pos, seg, attention="dense")
        # the current attention code: an explicit [B, T, T] mask, block-diagonal and causal
        i = jnp.arange(t)
        mask = (seg[:, :, None] == seg[:, None, :]) & (i[:, None] >= i[None, :])[None]
        current, _ = m.hidden_states(x, pos, mask)
        # and the current full forward on row 0 (one sequence, right-padded, HF's mask)
        hf_style = m(ids[:1], attention_mask=seg[:1] != 0)
        return m.logits(chunked), m.logits(dense), m.logits(current), hf_style

    chunked, dense, current, hf_style = (np.asarray(a) for a in run(state, ids, pos, seg))
    valid = np.asarray(seg) != 0
    np.testing.assert_allclose(chunked[valid], dense[valid], atol=1e-4)
    np.testing.assert_allclose(chunked[valid], current[valid], atol=1e-4)
    np.testing.assert_allclose(chunked[0][valid[0]], hf_style[0][valid[0]], atol=1e-4)


def test_remat_policies_give_the_same_gradients():
    model, cfg = _model(num_hidden_layers=1)  # scan + remat: test_qwen2
    rs = np.random.RandomState(3)
    x = jnp.asarray(rs.randn(2, 20, cfg.hidden_size).astype(np.float32))
    seg = _segments(20)
    pos = jnp.broadcast_to(jnp.arange(20, dtype=jnp.int32), (2, 20))

    graphdef, state = nnx.split(model)

    def grads(remat):
        def f(state):
            m = nnx.merge(graphdef, state)
            return jnp.sum(m.hidden_states_train(x, pos, seg, remat=remat) ** 2)

        g = jax.jit(jax.grad(f))(state)
        return np.asarray(g["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"][...])

    ref = grads("none")
    for name in ("full", "dots_all"):
        np.testing.assert_allclose(grads(name), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="remat"):
        grads("everything")


def test_12288_tokens_without_a_t_by_t_buffer():
    """Forward and backward at the release's model_max_length: XLA's temp buffers stay far
    below one [T, T] float32 score matrix (604 MB), and the step runs."""
    t = 12288
    model, cfg = _model(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64,
    )  # fmt: skip
    graphdef, state = nnx.split(model)
    x = jnp.asarray(np.random.RandomState(4).randn(1, t, 16).astype(np.float32))
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    seg = jnp.asarray((np.arange(t) < t - 100)[None].astype(np.int32))

    def loss(state, x):
        m = nnx.merge(graphdef, state)
        return jnp.mean(m.hidden_states_train(x, pos, seg, attention="chunked") ** 2)

    step = jax.jit(jax.value_and_grad(loss))
    compiled = step.lower(state, x).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    print("temp bytes", temp)
    assert temp < t * t * 4 // 20, temp  # measured ~13 MB
    value, grads = compiled(state, x)
    assert np.isfinite(float(value))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_splash_kernel_interpreted_equals_dense():
    q, k, v = _qkv(2, 256, 4, 2, 128, seed=5)
    seg = _segments(256)
    out = jax.jit(lambda *a: A.splash_attention(*a, interpret=True))(q, k, v, seg)
    np.testing.assert_allclose(out, A.dense_attention(q, k, v, seg), atol=1e-5)


def test_implementation_choice_and_errors():
    assert A.resolve("auto", jnp.float32) == (
        "splash" if jax.default_backend() == "tpu" else "chunked"
    )
    with pytest.raises(ValueError, match="packed"):
        A.resolve("cudnn", jnp.bfloat16, packed=True)
    with pytest.raises(ValueError, match="bf16"):
        A.resolve("cudnn", jnp.float32)
    with pytest.raises(ValueError, match="unknown attention"):
        A.resolve("flash", jnp.float32)
    q, k, v = _qkv(1, 8, 2, 1, 4)
    with pytest.raises(ValueError, match="segment_ids"):
        A.attend(q, k, v, jnp.ones((1, 7), jnp.int32))


@pytest.mark.heavy  # ~40 s of TPU compilation
def test_splash_compiles_for_a_tpu_topology():
    """The splash path (forward and backward) compiles for TPU v5e on this CPU host: one chip,
    and a 2x2 slice under a (data=2, fsdp=1, tensor=2) mesh (the kernel per shard)."""
    pytest.importorskip("libtpu")
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax.experimental import topologies
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from pam_jax import sharding
        from pam_jax.llm import attention as A
        topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
        def loss(q, k, v, seg):
            out = A.attend(q, k, v, seg, implementation="splash", packed=True)
            return jnp.sum(out.astype(jnp.float32))
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        def args(mesh):
            s = lambda *names: sharding.named_sharding(mesh, names)
            qs = s("batch", "length", "act_heads", None)
            ks = s("batch", "length", "act_kv_heads", None)
            return [
                jax.ShapeDtypeStruct((2, 1024, 16, 128), jnp.bfloat16, sharding=qs),
                jax.ShapeDtypeStruct((2, 1024, 2, 128), jnp.bfloat16, sharding=ks),
                jax.ShapeDtypeStruct((2, 1024, 2, 128), jnp.bfloat16, sharding=ks),
                jax.ShapeDtypeStruct((2, 1024), jnp.int32, sharding=s("batch", "length")),
            ]
        one = Mesh(np.array(topo.devices[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
        c = step.lower(*args(one)).compile()
        print("one chip", "tpu_custom_call" in c.as_text())  # the Pallas (Mosaic) kernel
        mesh = sharding.make_mesh((2, 1, 2), devices=topo.devices)
        with jax.set_mesh(mesh):
            c = step.lower(*args(mesh)).compile()
        print("sliced", "tpu_custom_call" in c.as_text())
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "one chip True" in r.stdout and "sliced True" in r.stdout, r.stdout
