"""Run in a subprocess with 8 fake CPU devices (test_sharded.py): the train step of the micro
PAM on several (data, fsdp, tensor) meshes equals the one-device step.

    python sharded_check.py MESH [MESH ...] [--accum]     MESH like 2,2,2

Checks, per mesh: with FSDP every large (>= 4096 elements) trained LLM parameter is really
sharded, and on every mesh with FSDP or tensor axes at least 8 large trained tensors are, each
with its Adam moments sharded the same way (shard shapes asserted); the loss equals the
one-device loss (rtol 1e-5: float32 sums in a different order) and the updated parameters
equal the one-device ones (atol 2e-7 with lr 1e-3 and adam_eps 1e-3, so an update is ~linear
in the gradient and sharded reduction-order noise (~1e-7 relative) moves parameters by
~1e-10); frozen parameters (SAM 2) are bit-identical and have no optimizer state; every
trained tensor gets an update (exemptions stated below). With --accum: grad_accum=2 over the
same global batch equals grad_accum=1 (same tolerances). Also: a mesh that does not divide
the 8 devices and a batch the mesh cannot split are one-line errors.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from pam_jax.checkpoint import flat_params, random_normal_params  # noqa: E402
from pam_jax.pam.model import PAM  # noqa: E402
from pam_jax.training import batch as B  # noqa: E402
from pam_jax.training.config import ConfigError, TrainConfig  # noqa: E402
from pam_jax.training.model import pam_config_for, spec_for  # noqa: E402
from pam_jax.training.optim import make_optimizer  # noqa: E402
from pam_jax.training.step import Trainer, make_run_mesh  # noqa: E402

CFG = TrainConfig(
    model="models/micro-pam.json", batch_size=8, dtype="float32", learning_rate=1e-3,
    warmup_steps=0, adam_eps=1e-3, weight_decay=0.01, clip_norm=0.0,
    train_parts="perceiver,projectors,newlines,llm",
)  # fmt: skip


def setup():
    pc = pam_config_for(CFG)
    model = random_normal_params(lambda: PAM(pc, rngs=nnx.Rngs(0)), seed=1)
    spec = spec_for(model, CFG.parts)
    params = {k: np.asarray(v) for k, v in flat_params(model).items()}
    batch = B.synthetic_batch(8, 128, pc.image_embeds_len, pc.sam2.image_size, pc.llm.vocab_size)
    return spec, params, batch


def run(cfg, spec, params, batch, mesh_shape, devices, steps=1):
    mesh = make_run_mesh(mesh_shape, devices)
    t = Trainer.build(cfg, spec, make_optimizer(cfg, spec), mesh)
    t.check_batch(cfg.batch_size)
    tr, fr = spec.split(params)
    state = t.init_state(tr)
    frozen = t.place_frozen(fr)
    losses = []
    for _ in range(steps):
        state, m = t.step(state, frozen, B.global_batch(mesh, batch))
        losses.append(float(m["loss"]))
    return t, state, frozen, losses


def check_sharded(spec, state, mesh_shape):
    mu = state.opt_state.inner_states  # multi_transform states per part (clip_norm=0)
    n_checked = 0
    for k in sorted(spec.trainable):
        x = state.params[k]
        size = int(np.prod(x.shape))
        shard = x.sharding.shard_shape(x.shape)
        if size >= 4096 and any(n > 1 for n in mesh_shape[1:]):
            if int(np.prod(shard)) == size:
                # FSDP shards every large LLM tensor; the rules replicate the perceiver's
                # vision-width ("vis_embed") dimensions, so it shards there by tensor only
                assert mesh_shape[1] == 1 or not k.startswith("llm."), (
                    f"{k} {x.shape} is not sharded on {mesh_shape}"
                )
                continue
            part = spec.parts[k]
            adam = mu[part].inner_state[0]
            for moment in (adam.mu[k], adam.nu[k]):
                assert moment.sharding.shard_shape(moment.shape) == shard, (k, moment.sharding)
            n_checked += 1
    return n_checked


def check_errors(spec) -> None:
    """On 8 devices: a mesh that does not divide them and a batch the mesh cannot split are
    one-line ConfigErrors (no compile needed)."""
    for mesh, batch, words in (("3,-1,1", 8, "does not fit 8 devices"),
                               ("2,2,2", 6, "cannot split over its 4 batch shards")):  # fmt: skip
        try:
            cfg = CFG.replace(batch_size=batch, mesh=mesh)
            Trainer.build(cfg, spec, make_optimizer(cfg, spec), make_run_mesh(mesh)).check_batch(
                batch
            )
        except ConfigError as e:
            assert words in str(e) and "\n" not in str(e), str(e)
        else:
            raise AssertionError(f"mesh {mesh} with batch {batch} was accepted on 8 devices")


def main(argv) -> int:
    jax.config.update("jax_default_matmul_precision", "highest")
    accum = "--accum" in argv
    meshes = [tuple(int(s) for s in a.split(",")) for a in argv if not a.startswith("--")]
    assert len(jax.devices()) == 8
    spec, params, batch = setup()
    _, ref_state, _, ref_loss = run(CFG, spec, params, batch, (1, 1, 1), jax.devices()[:1])
    ref = {k: np.asarray(v) for k, v in ref_state.params.items()}
    moved = max(float(np.abs(ref[k] - params[k]).max()) for k in ref)
    assert moved > 1e-5, f"one step did not change the trained parameters ({moved})"
    # the gradient reaches every trained tensor, except: attention key biases (softmax is
    # invariant to them: zero gradient), the video-only frame_newline and sparse-frame proj (an
    # image batch), and query biases whose updates (gradients ~1e-9 through adam_eps 1e-3) fall
    # below float32 resolution
    exempt = ("k_proj.bias", "q_proj.bias", "parts.frame_newline", "vision_resampler.proj.")
    still = [
        k for k in ref if np.array_equal(ref[k], params[k]) and not any(e in k for e in exempt)
    ]
    assert not still, f"no update for {still}"
    assert not any(k.endswith("positional_encoding_gaussian_matrix") for k in spec.trainable)

    def compare(state, loss, what):
        np.testing.assert_allclose(loss[0], ref_loss[0], rtol=1e-5, err_msg=what)
        err = max(float(np.abs(np.asarray(state.params[k]) - ref[k]).max()) for k in ref)
        print(f"{what}: loss {loss[0]:.7f} vs {ref_loss[0]:.7f}, max param diff {err:.2e}")
        assert err < 2e-7, (what, err)

    for shape in meshes:
        t, state, frozen, loss = run(CFG, spec, params, batch, shape, jax.devices(), steps=1)
        compare(state, loss, f"mesh {shape}")
        n = check_sharded(spec, state, shape)
        if shape[1] > 1 or shape[2] > 1:
            assert n >= 8, f"only {n} large trained parameters sharded on {shape}"
        # the frozen SAM 2 is an input only: bit-identical, no optimizer state
        for k, v in frozen.items():
            assert np.array_equal(np.asarray(v), params[k]), k
        opt_keys = {
            getattr(p, "key", None)
            for path, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
            for p in path
        }
        assert not (opt_keys & spec.frozen), "frozen parameters got optimizer state"
    check_errors(spec)
    if accum:
        shape = meshes[0] if meshes else (2, 2, 2)
        cfg2 = CFG.replace(grad_accum=2)
        _, state, _, loss = run(cfg2, spec, params, batch, shape, jax.devices())
        compare(state, loss, f"grad_accum=2 on {shape}")
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
