"""The jitted train step: gradient accumulation over micro-batches, global sum / count loss
normalisation, clipping, AdamW, with explicit in / out shardings and a donated state.

    trainer = Trainer.build(cfg, spec, tx, mesh)      # shardings, the jitted step
    state = trainer.init_state(trainable)              # TrainState on the mesh
    state, metrics = trainer.step(state, frozen, batch)

Frozen parameters are a separate argument (never donated, never updated, no gradients); the
model is merged from both inside the step. A step whose loss or gradient norm is not finite
reports metrics["finite"] False; the trainer then stops without saving it (the checkpoints on
disk are the last good states).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pam_jax.training import batch as batch_lib
from pam_jax.training.config import ConfigError, TrainConfig
from pam_jax.training.loss import LossOptions, micro_batch_sums, seg_rows, supervised_tokens
from pam_jax.training.model import ModelSpec


def make_run_mesh(mesh: str | tuple[int, int, int], devices=None) -> Mesh:
    """The run's (data, fsdp, tensor) mesh from `mesh=1,-1,1`; a clear error when it does not
    divide the devices."""
    from pam_jax import sharding
    from pam_jax.training.config import parse_mesh

    shape = parse_mesh(mesh) if isinstance(mesh, str) else tuple(mesh)
    devices = list(devices if devices is not None else jax.devices())
    try:
        return sharding.make_mesh(shape=shape, devices=devices)
    except ValueError as e:
        raise ConfigError(
            f"mesh={','.join(map(str, shape))} does not fit {len(devices)} devices: {e}"
        ) from None


@struct.dataclass
class TrainState:
    """What a checkpoint holds besides the data iterator."""

    params: dict[str, jax.Array]  # trainable parameters, float32 master copies
    opt_state: Any
    step: jax.Array  # int32 scalar: optimizer updates done
    rng: jax.Array  # uint32 key data (no dropout today; kept so resume is exact if added)


def _opt_shardings(opt_abstract, param_sh: Mapping[str, NamedSharding], mesh: Mesh):
    """Sharding of every optimizer-state leaf: a leaf under a parameter's key with that
    parameter's shape takes its sharding (Adam's mu / nu); the rest is replicated."""
    rep = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        for p in reversed(path):
            k = getattr(p, "key", None)
            if isinstance(k, str) and k in param_sh:
                return param_sh[k]
        return rep

    return jax.tree_util.tree_map_with_path(one, opt_abstract)


@dataclasses.dataclass
class Trainer:
    cfg: TrainConfig
    spec: ModelSpec
    tx: optax.GradientTransformation
    mesh: Mesh
    opts: LossOptions
    param_shardings: dict[str, NamedSharding]
    frozen_shardings: dict[str, NamedSharding]
    state_shardings: TrainState
    step_fn: Any = None
    _eval_fn: Any = None

    @classmethod
    def build(
        cls,
        cfg: TrainConfig,
        spec: ModelSpec,
        tx: optax.GradientTransformation,
        mesh: Mesh,
        *,
        num_sources: int = 1,
    ) -> Trainer:
        psh = spec.shardings(mesh, sorted(spec.trainable))
        fsh = spec.shardings(mesh, sorted(spec.frozen))
        abstract = {k: jax.ShapeDtypeStruct(spec.shapes[k], jnp.float32) for k in psh}
        opt_abs = jax.eval_shape(tx.init, abstract)
        rep = NamedSharding(mesh, PartitionSpec())
        ssh = TrainState(psh, _opt_shardings(opt_abs, psh, mesh), rep, rep)
        opts = LossOptions(
            num_sources=num_sources, attention=cfg.attention, chunk=cfg.loss_chunk,
            seg_loss=cfg.seg_loss, lm_loss=cfg.lm_loss,
        )  # fmt: skip
        t = cls(cfg, spec, tx, mesh, opts, psh, fsh, ssh)
        t.step_fn = jax.jit(
            t._step,
            in_shardings=(ssh, fsh, None),
            out_shardings=(ssh, rep),
            donate_argnums=(0,),
        )
        return t

    def check_batch(self, global_rows: int) -> None:
        k = self.cfg.grad_accum
        shards = batch_lib.row_shards(self.mesh)
        if global_rows % k or (global_rows // k) % shards:
            raise ConfigError(
                f"batch_size={global_rows} with grad_accum={k} gives micro-batches of "
                f"{global_rows / k:g} rows, which the mesh {dict(self.mesh.shape)} cannot split "
                f"over its {shards} batch shards"
            )

    def init_state(self, params: Mapping[str, Any], seed: int = 0) -> TrainState:
        """A step-0 state with `params` (trainable) placed on the mesh."""
        params = {
            k: jax.device_put(params[k], self.param_shardings[k]) for k in self.param_shardings
        }
        init = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)
        rep = self.state_shardings.step
        return TrainState(
            params,
            init(params),
            jax.device_put(jnp.int32(0), rep),
            jax.device_put(jax.random.key_data(jax.random.key(seed)), rep),
        )

    def place_frozen(self, frozen: Mapping[str, Any]) -> dict[str, jax.Array]:
        return {
            k: jax.device_put(frozen[k], self.frozen_shardings[k]) for k in self.frozen_shardings
        }

    # ---- the step ----------------------------------------------------------------------
    def _micro(self, params, frozen, mb, n_tok, n_seg):
        """The micro-batch's share of the global objective: its token NLL sum over the global
        batch's supervised token count (+ seg_loss x its mask-loss sum over the global mask
        count), so summing micro-batch gradients gives the global gradient exactly."""
        model = self.spec.merge({**params, **frozen})
        sums = micro_batch_sums(model, mb, self.opts)
        obj = self.opts.lm_loss * sums["nll"] / n_tok
        if self.opts.seg_loss:
            obj = obj + self.opts.seg_loss * sums["seg"] / n_seg
        return obj, sums

    def _step(self, state: TrainState, frozen, batch) -> tuple[TrainState, dict[str, jax.Array]]:
        k = self.cfg.grad_accum
        row = batch_lib.batch_spec(1)[0]

        def split(x):  # [B, ...] -> [k, B/k, ...]; micro-batch j = rows j, j+k, ...
            b = x.shape[0]
            y = x.reshape(b // k, k, *x.shape[1:]).swapaxes(0, 1)
            spec = PartitionSpec(None, row, *([None] * (x.ndim - 1)))
            return jax.lax.with_sharding_constraint(y, NamedSharding(self.mesh, spec))

        n_tok = jnp.maximum(supervised_tokens(batch), 1).astype(jnp.float32)
        n_seg = jnp.maximum(seg_rows(batch), 1.0) if self.opts.seg_loss else jnp.float32(1)
        grad_fn = jax.grad(self._micro, has_aux=True)
        if k == 1:  # no accumulator: one pass less over the gradients
            g, sums = grad_fn(state.params, frozen, batch, n_tok, n_seg)
        else:
            mbs = jax.tree.map(split, batch)
            zeros = jax.tree.map(jnp.zeros_like, state.params)

            def body(acc, mb):
                g, sums = grad_fn(state.params, frozen, mb, n_tok, n_seg)
                g_acc, s_acc = acc
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, sums)), None

            s0 = {
                "nll": jnp.float32(0),
                "n": jnp.int32(0),
                "positions": jnp.int32(0),
                "src_nll": jnp.zeros(self.opts.num_sources, jnp.float32),
                "src_n": jnp.zeros(self.opts.num_sources, jnp.float32),
            }
            if self.opts.seg_loss:
                s0.update(seg=jnp.float32(0), seg_rows=jnp.float32(0))
            (g, sums), _ = jax.lax.scan(body, (zeros, s0), mbs)
        grads = g
        loss = sums["nll"] / n_tok
        gnorm = optax.global_norm(grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        # a non-finite step is applied (no select over the whole state, ~3% of a PAM-3B step):
        # the trainer stops at once and never saves it, so the checkpoints stay the good ones
        new = TrainState(params, opt_state, state.step + 1, state.rng)
        from pam_jax.training.optim import schedule

        lr = schedule(self.cfg, self.cfg.learning_rate)(state.step)
        metrics = {
            "loss": loss,
            "grad_norm": gnorm,
            "learning_rate": lr,
            "tokens": sums["n"],
            "positions": sums["positions"],
            "source_loss": sums["src_nll"] / jnp.maximum(sums["src_n"], 1.0),
            "source_tokens": sums["src_n"],
            "finite": finite,
        }
        if self.opts.seg_loss:
            metrics["seg_loss"] = sums["seg"] / n_seg
        return new, metrics

    def _eval(self, params, frozen, batch) -> dict[str, jax.Array]:
        model = self.spec.merge({**params, **frozen})
        sums = micro_batch_sums(model, batch, self.opts)
        return {"nll": sums["nll"], "n": sums["n"]}

    def eval_sums(self, state: TrainState, frozen, batch) -> dict[str, jax.Array]:
        """Validation loss sums (token NLL, token count) of one batch, no update."""
        if self._eval_fn is None:
            rep = self.state_shardings.step
            self._eval_fn = jax.jit(
                self._eval, in_shardings=(self.param_shardings, self.frozen_shardings, None),
                out_shardings=rep,
            )  # fmt: skip
        with jax.set_mesh(self.mesh):
            return self._eval_fn(state.params, frozen, batch)

    def step(self, state: TrainState, frozen, batch) -> tuple[TrainState, dict[str, jax.Array]]:
        with jax.set_mesh(self.mesh):
            return self.step_fn(state, frozen, batch)
