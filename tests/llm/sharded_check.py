"""Run in a subprocess with 8 fake CPU devices (see test_sharded.py) on a (data=2, fsdp=2,
tensor=2) mesh: the sharded forward and greedy generation equal the unsharded ones; load_pam
places every part (SAM 2, PAM parts, LLM) by the rules in effect, default or a run's own
(`axis_rules`); the sharded training forward + loss (and gradients) equal the unsharded ones."""

from __future__ import annotations

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # the repo root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from pam_jax import sharding  # noqa: E402
from pam_jax.checkpoint import random_normal_params  # noqa: E402
from pam_jax.llm.config import tiny  # noqa: E402
from pam_jax.llm.io import load_qwen2, save_qwen2  # noqa: E402
from pam_jax.llm.loss import lm_loss_sums  # noqa: E402
from pam_jax.llm.qwen2 import Qwen2ForCausalLM  # noqa: E402
from pam_jax.llm.sampler import generate  # noqa: E402
from pam_jax.pam.config import PAMConfig  # noqa: E402
from pam_jax.pam.model import PAM, load_pam, save_pam  # noqa: E402
from pam_jax.sam2.config import sam2_config  # noqa: E402
from pam_jax.sam2.loading import load_sam2  # noqa: E402
from pam_jax.sam2.model import SAM2Base  # noqa: E402
from pam_jax.sharding import make_mesh  # noqa: E402


def main() -> int:
    jax.config.update("jax_default_matmul_precision", "highest")
    assert len(jax.devices()) == 8
    cfg = tiny(num_attention_heads=8, num_key_value_heads=4, hidden_size=64, head_dim=8)
    model = Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0))
    # random RMSNorm weights too, so no parameter is at a constant
    for path, v in nnx.iter_graph(model):
        if isinstance(v, nnx.Param) and path[-1] == "weight":
            v.set_value(v.get_value() + 0.1 * jax.random.normal(jax.random.key(len(path)), v.shape))
    d = tempfile.mkdtemp()
    save_qwen2(model, d)
    ref_model, _, _ = load_qwen2(d, jnp.float32)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (4, 12))
    ref = np.asarray(ref_model(jnp.asarray(ids)))
    ref_gen = generate(ref_model, input_ids=ids, prompt_lengths=[12, 5, 9, 3], max_new_tokens=8)

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded, _, _ = load_qwen2(d, jnp.float32, mesh=mesh)
    q = sharded.model.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == PartitionSpec("fsdp", "tensor"), q.sharding
    emb = sharded.model.embed_tokens.embedding[...]
    assert emb.sharding.spec == PartitionSpec("tensor", "fsdp"), emb.sharding
    with jax.set_mesh(mesh):
        x = jax.device_put(jnp.asarray(ids), NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
        out = jax.jit(lambda m, x: m(x))(sharded, x)
        assert not out.sharding.is_fully_replicated, out.sharding
        gen = generate(sharded, input_ids=ids, prompt_lengths=[12, 5, 9, 3], max_new_tokens=8)
    err = np.abs(np.asarray(out) - ref).max()
    print("max abs logit error sharded vs unsharded:", err)
    assert err < 1e-5, err
    np.testing.assert_array_equal(gen.tokens, ref_gen.tokens)
    check_pam_placement(mesh)
    check_training_forward(sharded, ref_model, mesh)
    print("OK")
    return 0


def _spec(x) -> PartitionSpec:
    return x.sharding.spec


def check_pam_placement(mesh) -> None:
    from tests.pam.test_prompts import byte_tokenizer

    cfg = PAMConfig(
        sam2=sam2_config("t", "2.1", image_size=512),
        llm=tiny(vocab_size=272, hidden_size=64, intermediate_size=128),
    )
    make_sam2 = lambda: SAM2Base(cfg.sam2, rngs=nnx.Rngs(0))  # noqa: E731
    model = PAM(cfg, sam2=random_normal_params(make_sam2, std=0.05))
    d = tempfile.mkdtemp()
    save_pam(model, d)
    byte_tokenizer().save(os.path.join(d, "llm", "tokenizer.json"))  # 259 < 272 rows: resized

    pam, _, tok = load_pam(d, llm_dtype=jnp.float32, mesh=mesh)
    assert tok is not None and pam.llm.cfg.vocab_size == 259
    for part in (pam.sam2, pam.parts, pam.llm):
        assert sharding.misplaced_params(part, mesh) == []
    q = pam.llm.model.layers[0].self_attn.q_proj.kernel[...]
    assert _spec(q) == PartitionSpec("fsdp", "tensor"), q.sharding
    # 259 rows cannot split over tensor=2: that axis is replicated, embed still on fsdp
    assert _spec(pam.llm.model.embed_tokens.embedding[...]) == PartitionSpec(None, "fsdp")
    mlp = pam.sam2.image_encoder.trunk.blocks[0].mlp.layers[0].kernel[...]
    assert not mlp.sharding.is_fully_replicated, mlp.sharding
    perc = [v for _, v in nnx.iter_graph(pam.parts) if isinstance(v, nnx.Param)]
    assert any(not v[...].sharding.is_fully_replicated for v in perc)

    # a run's own rules: no tensor parallelism, FSDP over fsdp x tensor for the wide dims
    rules = tuple(
        (n, ("fsdp", "tensor") if n in ("embed", "vis_embed") else None if t == "tensor" else t)
        for n, t in sharding.RULES
    )
    with sharding.axis_rules(rules):
        assert sharding.current_rules() == rules
        pam2, _, _ = load_pam(d, llm_dtype=jnp.float32, mesh=mesh)
        sam2, _ = load_sam2(os.path.join(d, "sam2"), mesh=mesh)
        for part in (pam2.sam2, pam2.parts, pam2.llm, sam2):
            assert sharding.misplaced_params(part, mesh) == []
        q = pam2.llm.model.layers[0].self_attn.q_proj.kernel[...]
        assert _spec(q) == PartitionSpec(("fsdp", "tensor"), None), q.sharding
    assert sharding.current_rules() == sharding.RULES
    # the values are the same whatever the placement
    a = np.asarray(pam.llm.model.layers[1].mlp.up_proj.kernel[...])
    b = np.asarray(pam2.llm.model.layers[1].mlp.up_proj.kernel[...])
    np.testing.assert_array_equal(a, b)
    print("PAM placement OK")


def check_training_forward(sharded, ref_model, mesh) -> None:
    """hidden_states_train (chunked attention, packed rows) + lm_loss_sums and its gradients:
    sharded == unsharded to 1e-5 (float32, a different reduction order)."""
    cfg = ref_model.cfg
    b, t = 4, 48
    rs = np.random.RandomState(1)
    ids = jnp.asarray(rs.randint(0, cfg.vocab_size, (b, t)))
    seg = np.ones((b, t), np.int32)
    seg[1, 20:] = 2
    seg[2, 30:] = 0
    seg[3, 10:25], seg[3, 25:] = 2, 0
    labels = jnp.asarray(np.where(seg > 0, np.asarray(ids), -100))
    seg = jnp.asarray(seg)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    def loss(m, ids, pos, seg, labels):
        h = m.hidden_states_train(m.embed(ids), pos, seg, attention="chunked", packed=True)
        nll, n = lm_loss_sums(m, h, labels, chunk=16)
        return nll / n

    step = jax.jit(nnx.value_and_grad(loss))
    ref, ref_g = step(ref_model, ids, pos, seg, labels)
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    with jax.set_mesh(mesh):
        args = [jax.device_put(a, batch) for a in (ids, pos, seg, labels)]
        got, got_g = step(sharded, *args)
    assert abs(float(got) - float(ref)) < 1e-5, (float(got), float(ref))
    g1 = np.asarray(ref_g["model"]["layers"][0]["self_attn"]["k_proj"]["kernel"][...])
    g2 = np.asarray(got_g["model"]["layers"][0]["self_attn"]["k_proj"]["kernel"][...])
    assert np.abs(g1 - g2).max() < 1e-5, np.abs(g1 - g2).max()
    print("training forward OK", float(got))


if __name__ == "__main__":
    sys.exit(main())
