"""Orbax checkpoints of a run: `workdir/checkpoints/<step>/` holding

    state   the TrainState (trainable parameters, optimizer state, step, RNG), sharded
    data    the data iterator's state (grain's `get_state()` dict, or the synthetic source's)
    meta    {"config": the run config, "step": n}

Saved asynchronously (`wait` blocks until the last save is on disk), atomically (orbax writes
to a temporary directory and commits it; a half-written step is never restored), the last
`keep` kept (and, when validation runs, the best by validation loss). Frozen parameters are
not saved: they come from the run's `model` (a directory, or a preset's seeded random init).
A checkpoint restores onto any mesh: the target shardings come from the restoring run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from pam_jax.training.step import TrainState


def _as_tree(state: TrainState) -> dict[str, Any]:
    return {
        "params": state.params,
        "opt_state": state.opt_state,
        "step": state.step,
        "rng": state.rng,
    }


def _val_loss(metrics: dict) -> float:
    return float(metrics["val_loss"])


class Checkpoints:
    def __init__(self, workdir: str | os.PathLike, keep: int, *, best: bool = False):
        self.dir = Path(workdir).resolve() / "checkpoints"
        policies: list[Any] = [cm.LatestN(max(keep, 1))]
        if best:  # reverse: sorted descending, BestN keeps the tail = the lowest val_loss
            policies.append(
                cm.BestN(get_metric_fn=_val_loss, reverse=True, n=1,
                         keep_checkpoints_without_metrics=False)
            )  # fmt: skip
        self.manager = ocp.CheckpointManager(
            self.dir,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=policies[0] if len(policies) == 1
                else cm.AnyPreservationPolicy(policies),
                # best_fn makes orbax write each step's metrics to disk and read them back
                # on --resume; without it they live in memory only and a resumed run's
                # BestN would drop the earlier best
                best_fn=_val_loss if best else None,
                best_mode="min",
                enable_async_checkpointing=True,
                create=True,
            ),
        )  # fmt: skip

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: TrainState,
        data_state: dict,
        config: dict,
        metrics: dict | None = None,
    ) -> bool:
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_as_tree(state)),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave({"config": config, "step": int(step)}),
            ),
            metrics=metrics,
            force=True,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        r = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return r["meta"]

    def restore(self, step: int, target: TrainState, shardings: TrainState):
        """(TrainState placed with `shardings`, data-iterator state) of a saved step."""
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            _as_tree(target),
            _as_tree(shardings),
        )
        r = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
            ),
        )
        t = r["state"]
        return TrainState(t["params"], t["opt_state"], t["step"], t["rng"]), r["data"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
