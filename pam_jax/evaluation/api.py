"""The evaluation entry points: `evaluate(...)` (what `pam-jax eval` runs) and `Evaluator`
(what the trainer calls every `eval_every` steps on its live model)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from pam_jax.evaluation import formats, report
from pam_jax.evaluation.runner import (
    PREDICTIONS,
    DecodeSettings,
    Runner,
    read_predictions,
    run_predictions,
)
from pam_jax.evaluation.scoring import score

METRICS = "metrics.json"
N_EXAMPLES = 8  # overlay tiles on the report page


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to evaluate: a benchmark file, its format, the task, and how."""

    data: str
    format: str = "pam"
    task: str | None = None  # default: the format's (pam: each record's first human turn)
    image_root: str | None = None
    batch_size: int = 8
    limit: int | None = None
    strict: bool = False
    lang: str = "en"
    benchmark: str | None = None  # paper table to compare with (default: from the file name)
    decode: DecodeSettings = DecodeSettings()


class EvalError(ValueError):
    """A refused evaluation (bad ids in a predictions file under --strict, ...)."""


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def _is_model_dir(p: Path) -> bool:
    """A pam-jax model directory (config.json with `"format": "pam-jax"`), not a run folder."""
    try:
        return json.loads((p / "config.json").read_text()).get("format") == "pam-jax"
    except (OSError, ValueError, AttributeError):
        return False


def resolve_model_dir(path: str | Path, step: int | None = None) -> Path:
    """A PAM model directory, or a `pam-jax train` workdir: with `step`, that saved step (its
    `export-<step>/` model directory, exported from the checkpoint on first use); without, the
    run's final `export/`, else its latest saved step."""
    p = Path(path)
    if _is_model_dir(p):
        if step is not None:
            raise EvalError(
                f"--model {p} is a model directory; --step applies to a training workdir"
            )
        return p
    if not ((p / "checkpoints").is_dir() or (p / "export").is_dir()):
        raise EvalError(f"--model {p}: neither a model directory nor a training workdir")
    if step is None and _is_model_dir(p / "export"):
        return p / "export"
    if step is not None and _is_model_dir(p / f"export-{step}"):
        return p / f"export-{step}"
    if not (p / "checkpoints").is_dir():
        raise EvalError(f"{p}: no exported model for step {step} and no checkpoints to export")
    from pam_jax.training.config import ConfigError, load_config
    from pam_jax.training.trainer import export_step

    try:
        cfg = load_config(p / "config.json").replace(workdir=str(p))
        return export_step(cfg, step)  # writes workdir/export-<step>/ once; later calls reuse it
    except ConfigError as e:
        raise EvalError(str(e)) from None


def _settings(cfg: EvalConfig, model_id: str, tasks: list[str]) -> dict[str, Any]:
    """What makes predictions different: recorded in run.json, checked on resume."""
    d = cfg.decode
    return {
        "model": model_id,
        "data": str(Path(cfg.data).resolve()),
        "format": cfg.format,
        "task": cfg.task or ",".join(tasks),
        "image_root": str(Path(cfg.image_root).resolve()) if cfg.image_root else None,
        "lang": cfg.lang,
        "max_new_tokens": d.max_new_tokens,
        "temperature": d.temperature,
        "top_p": d.top_p,
        "top_k": d.top_k,
        "repetition_penalty": d.repetition_penalty,
        "seed": d.seed,
    }


def _examples(items, preds, n: int):
    from pam_jax.evaluation.formats import decode_mask
    from pam_jax.evaluation.runner import load_image

    out = []
    for it in items:
        if len(out) >= n:
            break
        line = preds.get(it.id)
        if it.kind != "image" or line is None:
            continue
        try:
            img = load_image(it.media[0])
        except (OSError, ValueError):
            continue
        rle = line.get("mask_rle")
        mask = decode_mask(rle, img.shape[:2]) if rle is not None else None
        ref = it.refs[0] if it.refs else "(mask)"
        out.append((img, mask, str(line.get("pred", "")), ref))
    return out


def finish(
    cfg: EvalConfig,
    loaded: formats.Loaded,
    preds: dict[str, dict],
    out_dir: Path,
    settings: dict[str, Any],
    *,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score, check ids, write metrics.json, report.md / report.json and the overlay page."""
    items = loaded.items
    wanted = {i for it in items for i in it.prediction_ids()}
    missing = sorted(wanted - set(preds))
    unknown = sorted(set(preds) - wanted)
    if missing:
        _warn(f"{len(missing)} item(s) have no prediction (first: {missing[:3]})")
    if unknown:
        _warn(f"{len(unknown)} prediction id(s) are not in the data (first: {unknown[:3]})")
    if cfg.strict and (missing or unknown):
        raise EvalError(
            f"predictions do not match the data: {len(missing)} missing, {len(unknown)} unknown "
            "ids (--strict)"
        )
    failed = {k: v["error"] for k, v in preds.items() if "error" in v and k in wanted}
    for k, e in list(failed.items())[:10]:
        _warn(f"{k}: {e} (skipped)")
    if len(failed) > 10:
        _warn(f"... {len(failed) - 10} more items could not run")
    values, unscored = score(items, preds, lang=cfg.lang)
    n_ids = len(wanted)
    flat: dict[str, Any] = dict(values)
    flat["n_items"] = n_ids - len(set(unscored))
    flat["n_skipped"] = len(loaded.problems) + len(set(unscored))
    flat["n_missing"] = len(missing)
    flat["n_unknown"] = len(unknown)
    flat.update(settings)
    flat.update(extra or {})
    (out_dir / METRICS).write_text(json.dumps(flat, indent=2, ensure_ascii=False) + "\n")
    bench = report.guess_benchmark(cfg.data, cfg.format, cfg.benchmark)
    rep = report.build_report(flat, benchmark=bench, settings=settings)
    rep["problems"] = [str(p) for p in loaded.problems]
    rep["failed_items"] = failed
    ex = _examples(items, preds, N_EXAMPLES)
    page = None
    if ex:
        report.overlay_page(ex, out_dir / "examples.png")
        page = "examples.png"
    report.write_report(out_dir, rep, page)
    return flat


def load_items(cfg: EvalConfig) -> formats.Loaded:
    loaded = formats.load(
        cfg.data, cfg.format, task=cfg.task, image_root=cfg.image_root, strict=cfg.strict,
        limit=cfg.limit,
    )  # fmt: skip
    for p in loaded.problems:
        _warn(f"{cfg.data} {p} (skipped)")
    return loaded


def evaluate(
    cfg: EvalConfig,
    out_dir: str | Path,
    *,
    model: Any = None,
    tokenizer: Any = None,
    model_id: str = "model",
    predictions: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    mesh: Any = "local",
    load_model: Any = None,
) -> dict[str, Any]:
    """Run (model given) or score (`predictions` given) an evaluation into out_dir.
    `load_model` (instead of `model`): a function returning the model, called only when some
    item is left to predict (a finished run is scored without loading anything).

    Data parallel: `mesh` "local" = every local device on the `data` axis (`runner.local_mesh`;
    the model is placed on it, replicated, in place), a mesh of your own, or None (one device).
    Under jax.distributed every process calls this; each predicts its shard of the items,
    process 0 merges and scores, and every process returns the same metrics."""
    import jax

    from pam_jax.cliutil import RunFolder
    from pam_jax.evaluation.runner import local_mesh, pending, sync_processes

    loaded = load_items(cfg)
    tasks = sorted({it.task for it in loaded.items})
    settings = _settings(cfg, model_id if predictions is None else "predictions", tasks)
    out = Path(out_dir)
    if predictions is not None:
        out.mkdir(parents=True, exist_ok=True)
        preds = read_predictions(predictions)
        settings["predictions"] = str(Path(predictions).resolve())
        return finish(cfg, loaded, preds, out, settings)
    if model is None and load_model is None:
        raise EvalError("evaluate: give a model or a predictions file")
    cfg = dataclasses.replace(cfg, decode=cfg.decode.resolved(tokenizer))
    settings = _settings(cfg, model_id, tasks)
    rank, count = jax.process_index(), jax.process_count()
    if rank == 0:  # one process checks and records the folder; the others wait for it
        RunFolder.open(out, command="eval", settings=settings, force=force)
    if count > 1:
        sync_processes("pam_jax_eval_folder")
    from pam_jax.pam.predictor import PAMPredictor

    if model is None and (count > 1 or pending(loaded.items, out)):
        model = load_model()
    runner = None
    if model is not None:
        if mesh == "local":
            mesh = local_mesh()
        if mesh is not None:
            from pam_jax.sharding import place

            place(model, mesh)
        pred = PAMPredictor(
            model, tokenizer, sampling=cfg.decode.sampling(),
            max_new_tokens=cfg.decode.max_new_tokens,
        )  # fmt: skip
        runner = Runner(
            pred, batch_size=cfg.batch_size, lang=cfg.lang, seed=cfg.decode.seed, mesh=mesh
        )
    stats = run_predictions(runner, loaded.items, out, progress=progress)
    if rank != 0:  # process 0 scores; the others return its metrics
        sync_processes("pam_jax_eval_scored")
        return json.loads((out / METRICS).read_text())
    preds = read_predictions(out / PREDICTIONS)
    # all processes together: process 0's rate times their count
    extra = {"items_per_s": stats["items_per_s"] * count} if stats["n_predicted"] else {}
    flat = finish(cfg, loaded, preds, out, settings, extra=extra)
    if count > 1:
        sync_processes("pam_jax_eval_scored")
    return flat


class Evaluator:
    """The trainer's evaluator: `Evaluator(cfg, tokenizer, out_dir).run(model, step)` evaluates
    the live PAM (a `PAM` module, or `(graphdef, state)` of one) on cfg's data and returns the
    numeric metrics. Each step gets its own folder out_dir/step_<N> (predictions, metrics,
    report); the metrics are appended to out_dir/eval.jsonl and, with `tensorboard_dir`, written
    as TensorBoard scalars `eval/<key>`."""

    def __init__(
        self,
        config: EvalConfig,
        tokenizer: Any,
        out_dir: str | Path,
        *,
        tensorboard_dir: str | Path | None = None,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.out_dir = Path(out_dir)
        self.tensorboard_dir = tensorboard_dir
        self.loaded = load_items(config)  # parsed once, reused every step

    def run(self, model_or_state: Any, step: int) -> dict[str, float]:
        import jax
        from flax import nnx

        from pam_jax.pam.predictor import PAMPredictor

        model = model_or_state
        if isinstance(model, tuple):
            model = nnx.merge(*model)
        # the trainer's model is one global (multi-process) array set: every process runs every
        # item in lockstep; process 0 writes the step's folder, the others a scratch one
        rank = jax.process_index()
        out = self.out_dir / (f"step_{int(step)}" + (f".process{rank}" if rank else ""))
        out.mkdir(parents=True, exist_ok=True)
        cfg = dataclasses.replace(self.config, decode=self.config.decode.resolved(self.tokenizer))
        pred = PAMPredictor(
            model, self.tokenizer, sampling=cfg.decode.sampling(),
            max_new_tokens=cfg.decode.max_new_tokens,
        )  # fmt: skip
        runner = Runner(pred, batch_size=cfg.batch_size, lang=cfg.lang, seed=cfg.decode.seed)
        run_predictions(runner, self.loaded.items, out, progress=False, process=(0, 1))
        preds = read_predictions(out / PREDICTIONS)
        settings = _settings(cfg, f"step {step}", sorted({it.task for it in self.loaded.items}))
        flat = finish(cfg, self.loaded, preds, out, settings)
        numeric = {
            k: float(v)
            for k, v in flat.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in settings
        }
        if rank:
            return numeric
        with open(self.out_dir / "eval.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": int(step), **numeric}) + "\n")
        if self.tensorboard_dir is not None:
            from tensorboardX import SummaryWriter

            w = SummaryWriter(str(self.tensorboard_dir))
            for k, v in numeric.items():
                w.add_scalar(f"eval/{k}", v, int(step))
            w.close()
        return numeric
