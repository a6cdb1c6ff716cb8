"""`pam-jax train --compile-only [--topology NAME]`: lower and compile the real sharded train
step with abstract inputs only (no weights, data or devices needed), for this host's devices
or for a TPU pod described by a topology name (`v5e:16x16`, `v5p:4x4x4`, ...; the `[tpu]`
extra brings libtpu, whose compiler runs on the CPU host).

Prints and writes `workdir/compile.json`: per-chip memory (arguments, temporaries, outputs,
total against the chip's HBM), FLOPs per step (the model count of `metrics.model_flops` and
the compiler's `cost_analysis`), the step time that implies at the chip's datasheet peak, and
the sharding of the largest arrays. `fits` is False (exit code 3) when the total exceeds HBM;
a compile that runs out of memory is reported the same way.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pam_jax.training import batch as batch_lib
from pam_jax.training.config import ConfigError, TrainConfig
from pam_jax.training.metrics import PEAKS, model_flops
from pam_jax.training.model import abstract_model, pam_config_for, spec_for
from pam_jax.training.optim import make_optimizer
from pam_jax.training.step import Trainer, TrainState, make_run_mesh
from pam_jax.training.trainer import default_seq_len

GiB = 1024**3
# HBM per chip
HBM = {"v4": 32 * GiB, "v5 lite": 16 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v5": 95 * GiB,
       "v6 lite": 32 * GiB, "v6e": 32 * GiB, "h100": 80 * GiB, "h200": 141 * GiB}  # fmt: skip


def _lookup(table: dict, kind: str):
    kind = kind.lower()
    for k in sorted(table, key=len, reverse=True):
        if k in kind:
            return table[k]
    return None


def topology_devices(name: str) -> list:
    import os

    # another process on the host may hold libtpu's lock file; compiling needs no chip
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # noqa: BLE001 - libtpu missing or unknown name: one line
        raise ConfigError(
            f"cannot describe TPU topology {name!r} ({type(e).__name__}: {str(e)[:200]}); "
            "install the [tpu] extra (pip install 'pam-jax[tpu]')"
        ) from None
    return list(topo.devices)


def _abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


@dataclasses.dataclass(frozen=True)
class AbstractStep:
    """The run's train step over abstract, sharded inputs (nothing allocated)."""

    trainer: Trainer
    spec: Any
    mesh: Any
    state: TrainState
    frozen: dict[str, jax.ShapeDtypeStruct]
    batch: dict[str, jax.ShapeDtypeStruct]
    seq_len: int
    frames: int

    def lower(self):
        with jax.set_mesh(self.mesh):
            return self.trainer.step_fn.lower(self.state, self.frozen, self.batch)


def abstract_step(cfg: TrainConfig, devices, *, accelerator: bool = False) -> AbstractStep:
    """The step of `cfg` on `devices` with abstract inputs; `accelerator`: dtype=auto means
    bfloat16 (a TPU topology compiled from this CPU host)."""
    mesh = make_run_mesh(cfg.mesh, devices)
    pc = pam_config_for(cfg)
    cfg_dt = cfg if cfg.dtype != "auto" or not accelerator else cfg.replace(dtype="bfloat16")
    model = abstract_model(cfg_dt, pc)
    spec = spec_for(model, cfg.parts)
    tx = make_optimizer(cfg, spec)
    trainer = Trainer.build(cfg, spec, tx, mesh)
    trainer.check_batch(cfg.batch_size)
    video = cfg.data == "synthetic:video"
    frames = pc.num_frames if video else 1
    seq_len = default_seq_len(cfg, pc.video_embeds_len if video else pc.image_embeds_len)
    params = {k: jax.ShapeDtypeStruct(spec.shapes[k], jnp.float32) for k in spec.keys}
    tr, fr = spec.split(params)
    state = jax.eval_shape(
        lambda p: TrainState(p, tx.init(p), jnp.int32(0), jax.random.key_data(jax.random.key(0))),
        tr,
    )
    state = _abstract(state, trainer.state_shardings)
    frozen = _abstract(fr, trainer.frozen_shardings)
    batch = batch_lib.abstract_batch(
        cfg.batch_size, seq_len, pc.sam2.image_size, frames=frames, masks=cfg.seg_loss > 0
    )
    bsh = batch_lib.batch_shardings(mesh, batch)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bsh[k]) for k, v in batch.items()}
    return AbstractStep(trainer, spec, mesh, state, frozen, batch, seq_len, frames)


def compile_only(cfg: TrainConfig, *, topology: str | None = None, write: bool = True) -> dict:
    """Compile the step and report memory / FLOPs (see module docstring)."""
    devices = topology_devices(topology) if topology else jax.devices()
    step = abstract_step(cfg, devices, accelerator=bool(topology))
    trainer, spec, mesh = step.trainer, step.spec, step.mesh
    seq_len, frames = step.seq_len, step.frames
    kind = getattr(devices[0], "device_kind", str(devices[0].platform))
    report: dict[str, Any] = {
        "topology": topology, "device_kind": kind, "chips": len(devices),
        "mesh": dict(mesh.shape), "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
        "seq_len": seq_len, "remat": cfg.remat, "train_parts": list(cfg.parts),
        "trainable_params": spec.count(spec.trainable), "frozen_params": spec.count(spec.frozen),
    }  # fmt: skip
    hbm = _lookup(HBM, kind)
    t0 = time.perf_counter()
    try:
        lowered = step.lower()
        report["lower_s"] = round(time.perf_counter() - t0, 1)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        report["compile_s"] = round(time.perf_counter() - t1, 1)
    except Exception as e:  # noqa: BLE001
        msg = str(e)
        if "RESOURCE_EXHAUSTED" in msg or "hbm" in msg.lower() or "memory" in msg.lower():
            report.update(fits=False, error=msg.splitlines()[0][:500])
            _finish(cfg, report, write)
            return report
        raise
    mem = compiled.memory_analysis()
    if mem is not None:
        arg, tmp = mem.argument_size_in_bytes, mem.temp_size_in_bytes
        out, alias = mem.output_size_in_bytes, mem.alias_size_in_bytes
        total = arg + tmp + out - alias
        report["memory_per_chip_gib"] = {
            "arguments": arg / GiB, "temporaries": tmp / GiB, "outputs": out / GiB,
            "aliased": alias / GiB, "total": total / GiB,
            "hbm": None if hbm is None else hbm / GiB,
        }  # fmt: skip
        report["fits"] = True if hbm is None else bool(total <= hbm)
    else:
        report["fits"] = True
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0
    mf = model_flops(spec, cfg.batch_size * seq_len, cfg.batch_size, seq_len, frames)
    peak = _lookup(PEAKS, kind)
    report["model_flops_per_step"] = mf
    report["compiler_flops_per_chip"] = xla_flops
    report["step_time_at_peak_s"] = None if peak is None else mf / (peak * len(devices))
    report["largest_arrays"] = _largest(spec, trainer)
    _finish(cfg, report, write)
    return report


def no_fit_message(report: dict) -> str:
    """One line saying why a compiled step does not fit (`fits` False)."""
    where = f"{report['chips']} x {report['device_kind']}"
    if "error" in report:
        return (
            f"the step does not fit on {where}: the compiler ran out of memory ({report['error']})"
        )
    m = report["memory_per_chip_gib"]
    return (
        f"the step does not fit on {where}: {m['total']:.2f} GiB per chip (arguments "
        f"{m['arguments']:.2f}, temporaries {m['temporaries']:.2f}, outputs {m['outputs']:.2f}) "
        f"> {m['hbm']:.2f} GiB HBM; lower batch_size, raise grad_accum, use remat or more chips"
    )


def _largest(spec, trainer, n: int = 8) -> list[dict]:
    rows = []
    for k in spec.keys:
        sh = trainer.param_shardings.get(k) or trainer.frozen_shardings[k]
        shape = spec.shapes[k]
        rows.append({
            "name": k, "shape": list(shape), "spec": str(sh.spec),
            "shard_shape": list(sh.shard_shape(shape)), "trained": k in spec.trainable,
            "bytes": int(np.prod(shape)) * 4,
        })  # fmt: skip
    return sorted(rows, key=lambda r: -r["bytes"])[:n]


def _finish(cfg: TrainConfig, report: dict, write: bool) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if write and jax.process_index() == 0:
        wd = Path(cfg.workdir)
        wd.mkdir(parents=True, exist_ok=True)
        (wd / "compile.json").write_text(text + "\n")
