"""Run in a subprocess with 8 fake CPU devices (see test_sharded.py): a (data=2, fsdp=2,
tensor=2) mesh-sharded forward and greedy generation equal the unsharded ones."""

from __future__ import annotations

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from pam_jax.llm.config import tiny  # noqa: E402
from pam_jax.llm.io import load_qwen2, save_qwen2  # noqa: E402
from pam_jax.llm.qwen2 import Qwen2ForCausalLM  # noqa: E402
from pam_jax.llm.sampler import generate  # noqa: E402
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
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
