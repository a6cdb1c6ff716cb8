"""The training loop: `train(cfg, resume=...)` builds mesh, model, optimizer, data and
checkpoints from the run config and runs `steps` optimizer steps.

Workdir layout:
    config.json         the resolved run config (+ package versions in versions.json)
    checkpoints/<step>/ orbax checkpoints (see checkpoint.py)
    metrics.jsonl       one line per logged step; eval.jsonl validation results
    tb/                 TensorBoard events (tensorboardX, no TensorFlow)
    loss.png            loss curves, written at the end
    export/             a model directory (`pam-jax predict` / `pam-jax eval` load it)

metrics.jsonl keys: step (updates done before this batch), loss (the global batch's mean NLL
over its supervised tokens, before the update), learning_rate, grad_norm (before clipping),
tokens (supervised tokens), tokens_per_s (non-padding LLM positions / s), mfu (null without a
known peak), step_time_s, truncated (samples of this step's global batch whose text was cut at
model_max_length), truncated_total (such samples in steps 0..step, exact over --resume: kept
in the checkpoint's data state); seg_loss with seg_loss > 0; for a mixture of several sources,
per source with tokens in the batch: loss/NAME (its tokens' mean NLL) and tokens/NAME (its
supervised tokens), so loss == sum(loss/NAME x tokens/NAME) / tokens.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pam_jax.training import batch as batch_lib
from pam_jax.training.checkpoint import Checkpoints
from pam_jax.training.config import ConfigError, TrainConfig
from pam_jax.training.data import make_source
from pam_jax.training.metrics import RunLog, device_peak, model_flops
from pam_jax.training.model import ModelSpec, load_model, spec_for
from pam_jax.training.optim import make_optimizer
from pam_jax.training.step import Trainer, TrainState, make_run_mesh

# the data state's key (beside the iterator's) for the samples cut at model_max_length so far
TRUNCATED_TOTAL = "truncated_total"
# keys that may change on --resume (they do not change the math of the steps already run)
RESUMABLE = {
    "steps", "workdir", "log_every", "save_every", "keep", "eval_every", "eval_data", "export",
    "nan_check", "eval_bench", "eval_format", "eval_limit",
}  # fmt: skip


class TrainingError(RuntimeError):
    """A run that cannot start or continue (one line)."""


def default_seq_len(cfg: TrainConfig, num_visual: int) -> int:
    if cfg.seq_len:
        return cfg.seq_len
    return -(-(num_visual + 128) // 64) * 64


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for p in ("pam-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    return out


def prepare_workdir(cfg: TrainConfig, resume: bool) -> Path:
    """Create the workdir and write config.json / versions.json; refuse a workdir of another
    run (or any earlier run without --resume), and a resume against an incompatible config."""
    wd = Path(cfg.workdir)
    path = wd / "config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if not resume:
            raise ConfigError(
                f"{wd} already holds a run (config.json); pass --resume to continue it or "
                "choose another workdir"
            )
        # a key newer than the run's config.json had its default in that run
        old = {**TrainConfig().to_dict(), **old}
        diff = sorted(k for k in set(old) | set(cfg.to_dict())
                      if k not in RESUMABLE and old.get(k) != cfg.to_dict().get(k))  # fmt: skip
        if diff:
            raise ConfigError(
                f"cannot resume {wd}: the config differs in {', '.join(diff)} "
                f"(only {', '.join(sorted(RESUMABLE))} may change)"
            )
    elif resume and (wd / "checkpoints").is_dir():
        raise ConfigError(f"cannot resume {wd}: it has checkpoints but no config.json")
    _barrier("workdir checked")  # every process checks before the first one writes
    if jax.process_index() == 0:
        wd.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        (wd / "versions.json").write_text(json.dumps(_versions(), indent=2) + "\n")
    _barrier("workdir written")
    return wd


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def enable_compilation_cache(path: str | None = None) -> None:
    import os

    d = (
        path
        or os.environ.get("PAM_JAX_COMPILATION_CACHE")
        or str(Path.home() / ".cache" / "pam_jax" / "xla")
    )
    jax.config.update("jax_compilation_cache_dir", d)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


class _Signals:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and exits after the step."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _all_processes_sum(n: int) -> int:
    """The sum of a host-side count over all processes (every process calls it)."""
    if jax.process_count() == 1:
        return int(n)
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.int32(n))))


def _host(m: dict[str, Any]) -> dict[str, Any]:
    return {k: np.asarray(jax.device_get(v)) for k, v in m.items()}


def export_model(spec: ModelSpec, params: dict, out_dir: Path, tokenizer_dir=None) -> Path:
    """Write a model directory (`pam_jax.pam.model.save_pam`) from the full parameter dict."""
    from pam_jax.pam.model import save_pam

    model = spec.merge({k: np.asarray(jax.device_get(v)) for k, v in params.items()})
    return save_pam(model, out_dir, tokenizer_dir=tokenizer_dir)


def train(cfg: TrainConfig, *, resume: bool = False, log: bool = True) -> dict[str, Any]:
    """Run (or continue) a training run; returns a summary dict. Raises ConfigError /
    TrainingError with a one-line message on bad input or a non-finite loss."""
    cfg.validate()
    enable_compilation_cache()
    wd = prepare_workdir(cfg, resume)
    main = jax.process_index() == 0
    mesh = make_run_mesh(cfg.mesh)
    model, tok = load_model(cfg)
    spec = spec_for(model, cfg.parts)
    pam_cfg = spec.config
    from pam_jax.checkpoint import flat_params

    trainable, frozen = spec.split(flat_params(model))
    del model
    synthetic = cfg.data.startswith("synthetic")
    video = cfg.data == "synthetic:video"
    nv = pam_cfg.video_embeds_len if video else pam_cfg.image_embeds_len
    # synthetic rows have one length; real data pads to seq_len, or to 64-multiples if 0
    seq_len = default_seq_len(cfg, nv) if synthetic else cfg.seq_len
    source = make_source(cfg, tok, pam_cfg, seq_len, jax.process_index(), jax.process_count())
    tx = make_optimizer(cfg, spec)
    trainer = Trainer.build(cfg, spec, tx, mesh, num_sources=source.num_sources)
    trainer.check_batch(cfg.batch_size)
    frozen_dev = trainer.place_frozen(frozen)
    ckpt = Checkpoints(wd, cfg.keep, best=bool(cfg.eval_data and cfg.eval_every))
    runlog = RunLog(wd, cfg.steps, enabled=log and main)
    start = 0
    if resume and ckpt.latest_step() is not None:
        last = ckpt.latest_step()
        target = jax.eval_shape(lambda: trainer.init_state(trainable, cfg.seed))
        state, data_state = ckpt.restore(last, target, trainer.state_shardings)
        truncated_total = int(data_state.pop(TRUNCATED_TOTAL, 0))
        source.set_state(data_state)
        start = int(jax.device_get(state.step))
        runlog.truncate(start)
    else:  # a fresh start (or a resume killed before its first checkpoint)
        state = trainer.init_state(trainable, cfg.seed)
        truncated_total = 0
        runlog.truncate(0)
    peak = device_peak()
    runlog.start(start)
    stopped = None
    last_loss = None
    t_prev = time.perf_counter()
    step = start
    evaluator = None
    last_val: tuple[int, dict] | None = None  # (step, metrics) of the last validation

    def save(step: int, state: TrainState, metrics: dict | None) -> None:
        data_state = {**source.get_state(), TRUNCATED_TOTAL: truncated_total}
        ckpt.save(step, state, data_state, cfg.to_dict(), metrics=metrics)

    with _Signals() as sig:
        while step < cfg.steps:
            local = next(source)
            # samples the data pipeline cut at model_max_length (the release cuts too)
            truncated = _all_processes_sum(source.last_truncated)
            truncated_total += truncated
            gb = batch_lib.global_batch(mesh, local)
            state, m = trainer.step(state, frozen_dev, gb)
            m = _host(m)
            now = time.perf_counter()
            dt, t_prev = now - t_prev, now
            if cfg.nan_check and not bool(m["finite"]):
                ckpt.wait()
                good = ckpt.latest_step()
                ckpt.close()
                runlog.close()  # the progress bar ends before the error line
                raise TrainingError(
                    f"non-finite loss or gradient at step {step} (loss {float(m['loss'])}, "
                    f"grad_norm {float(m['grad_norm'])}); last good checkpoint: "
                    f"{'none' if good is None else ckpt.dir / str(good)}"
                )
            last_loss = float(m["loss"])
            if step == start or (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                px = local["pixels"]  # [B, F, S, S, 3], packed [B, K, F, S, S, 3]
                slots, frames = (px.shape[1], px.shape[2]) if px.ndim == 6 else (1, px.shape[1])
                L = local["text_ids"].shape[1]
                flops = model_flops(
                    spec, float(m["positions"]), cfg.batch_size, L, frames, slots=slots
                )
                rec = {
                    "step": step,
                    "loss": last_loss,
                    "learning_rate": float(m["learning_rate"]),
                    "grad_norm": float(m["grad_norm"]),
                    "tokens_per_s": float(m["positions"]) / dt,
                    "mfu": None if peak is None else flops / dt / (peak * len(mesh.devices.flat)),
                    "tokens": int(m["tokens"]),
                    "step_time_s": dt,
                    "truncated": truncated,
                    "truncated_total": truncated_total,
                }
                if "seg_loss" in m:
                    rec["seg_loss"] = float(m["seg_loss"])
                if source.num_sources > 1:
                    for i, name in enumerate(getattr(source, "source_names", range(
                            source.num_sources))):  # fmt: skip
                        if m["source_tokens"][i] > 0:
                            rec[f"loss/{name}"] = float(m["source_loss"][i])
                            rec[f"tokens/{name}"] = int(m["source_tokens"][i])
                runlog.log(rec)
            runlog.advance()
            step += 1
            if sig.received is not None:
                stopped = sig.received
                break
            val = None
            if cfg.eval_data and cfg.eval_every and step % cfg.eval_every == 0:
                val = validate(cfg, trainer, state, frozen_dev, tok, pam_cfg, seq_len, mesh)
                runlog.log_eval({"step": step, **val})
            if cfg.eval_bench and cfg.eval_every and step % cfg.eval_every == 0:
                evaluator = evaluator or _evaluator(cfg, tok, wd)
                model = spec.merge({**state.params, **frozen_dev})
                runlog.log_eval({"step": step, **evaluator.run(model, step)})
            if val is not None:
                last_val = (step, {"val_loss": val["val_loss"]})
            # a validated step is saved too (with its val_loss), so the best-by-validation
            # policy can keep it even when eval_every and save_every do not line up
            due = cfg.save_every and step % cfg.save_every == 0
            if (due or val is not None) and step < cfg.steps:
                save(step, state, None if val is None else last_val[1])
    if ckpt.latest_step() != step:
        save(step, state, last_val[1] if last_val is not None and last_val[0] == step else None)
    ckpt.close()
    runlog.close()
    summary = {"step": step, "loss": last_loss, "truncated_total": truncated_total,
               "stopped_by_signal": stopped}  # fmt: skip
    if stopped is None:
        runlog.plot()
        if cfg.export:
            full = _gather({**state.params, **frozen_dev})  # every process takes part
            if main:
                export_model(spec, full, wd / "export", tokenizer_dir=_tokenizer_dir(cfg))
            summary["export"] = str(wd / "export")
    return summary


EVAL_BATCHES = 8


def _evaluator(cfg: TrainConfig, tok, wd: Path):
    """pam_jax.evaluation's Evaluator on `eval_bench` (outputs under workdir/eval/)."""
    from pam_jax.evaluation.api import EvalConfig, Evaluator

    if tok is None:
        raise ConfigError("eval_bench needs a tokenizer: train from a model directory")
    ec = EvalConfig(
        data=cfg.eval_bench, format=cfg.eval_format, image_root=cfg.image_root or None,
        limit=cfg.eval_limit or None,
    )  # fmt: skip
    return Evaluator(ec, tok, wd / "eval")


def validate(cfg, trainer, state, frozen, tok, pam_cfg, seq_len, mesh) -> dict[str, float]:
    """Validation loss over the first EVAL_BATCHES batches of `eval_data` (no shuffling or
    augmentation; the same batches every time)."""
    ecfg = cfg.replace(data=cfg.eval_data, shuffle=False, augment=False)
    src = make_source(ecfg, tok, pam_cfg, seq_len, jax.process_index(), jax.process_count())
    nll, n = 0.0, 0
    for _ in range(EVAL_BATCHES):
        try:
            local = next(src)
        except StopIteration:
            break
        s = _host(trainer.eval_sums(state, frozen, batch_lib.global_batch(mesh, local)))
        nll, n = nll + float(s["nll"]), n + int(s["n"])
    return {"val_loss": nll / max(n, 1), "val_tokens": n}


def _gather(arrays: dict) -> dict[str, np.ndarray]:
    """Host copies of (possibly multi-process sharded) arrays."""
    if jax.process_count() == 1:
        return {k: np.asarray(jax.device_get(v)) for k, v in arrays.items()}
    from jax.experimental import multihost_utils

    return {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
            for k, v in arrays.items()}  # fmt: skip


def _tokenizer_dir(cfg: TrainConfig):
    for d in (Path(cfg.model) / "llm" if cfg.model else None, Path(cfg.llm) if cfg.llm else None):
        if d is not None and d.is_dir() and any(d.glob("tokenizer*")):
            return d
    return None


__all__ = ["TrainState", "train", "TrainingError"]


def export_step(cfg: TrainConfig, step: int | None = None, out_dir=None) -> Path:
    """Write a saved step of the run in `cfg.workdir` (default: the latest) as a model
    directory (`workdir/export-<step>/` unless `out_dir`), without training."""
    cfg.validate()
    wd = Path(cfg.workdir)
    if not (wd / "checkpoints").is_dir():
        raise ConfigError(f"{wd} has no checkpoints to export")
    ckpt = Checkpoints(wd, cfg.keep)
    steps = ckpt.all_steps()
    if not steps:
        raise ConfigError(f"{wd} has no checkpoints to export")
    step = max(steps) if step is None else step
    if step not in steps:
        raise ConfigError(f"{wd} has no checkpoint of step {step}; saved steps: {steps}")
    mesh = make_run_mesh(cfg.mesh)
    model, tok = load_model(cfg)
    spec = spec_for(model, cfg.parts)
    from pam_jax.checkpoint import flat_params

    trainable, frozen = spec.split(flat_params(model))
    del model
    trainer = Trainer.build(cfg, spec, make_optimizer(cfg, spec), mesh)
    target = jax.eval_shape(lambda: trainer.init_state(trainable, cfg.seed))
    state, _ = ckpt.restore(step, target, trainer.state_shardings)
    ckpt.close()
    full = _gather({**state.params, **trainer.place_frozen(frozen)})
    out = Path(out_dir) if out_dir else wd / f"export-{step}"
    if jax.process_index() == 0:
        export_model(spec, full, out, tokenizer_dir=_tokenizer_dir(cfg))
    return out
