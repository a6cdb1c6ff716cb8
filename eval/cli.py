"""`pam-jax eval`: run a PAM model over a benchmark file, or score a predictions file.

    pam-jax eval --model DIR --data FILE_OR_DATASET --format FMT --task TASK --out RESULTS_DIR
                 [--image-root DIR] [--batch-size B] [--limit N] [--strict] [--lang en|zh]
                 [--max-new-tokens N] [--temperature T] [--top-p P] [--repetition-penalty R]
                 [--seed S] [--step N] [--benchmark NAME] [--force]
    pam-jax eval --predictions PRED.jsonl --data FILE_OR_DATASET --format FMT --task TASK
                 --out RESULTS_DIR

Formats (README, "Evaluation"): pam, osprey, refcocog, vg, video, stream, coco. Tasks: recognize,
explain, caption, detailed-caption, video-caption, stream-caption, segment (default: the
format's). RESULTS_DIR gets predictions.jsonl (appended as items finish: rerunning the same
command resumes; a folder made with other settings is refused), metrics.json (flat), report.md,
report.json and examples.png. --model is a model directory or a training workdir (its export,
else its latest saved step; --step N picks a saved step, exported on first use). Decoding:
greedy with the checkpoint's repetition penalty. Data parallel over every local device; under
several processes (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or SLURM / TPU
pods) each takes a shard of the items and process 0 merges and scores.
"""

from __future__ import annotations

import argparse

from pam_jax import cliutil


def add_parser(sub) -> argparse.ArgumentParser:
    from pam_jax.evaluation.formats import FORMATS, TASKS

    p = sub.add_parser(
        "eval",
        help="evaluate PAM on a benchmark (batched, resumable) or score predictions",
        description="Evaluate a PAM model on a benchmark file, or score a predictions file.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="PAM model directory or training workdir")
    src.add_argument("--predictions", metavar="PRED.jsonl", help="score these predictions")
    p.add_argument(
        "--data", required=True, metavar="FILE_OR_DATASET",
        help="the benchmark file (--format pam: or a `pam-jax data prepare` folder)",
    )  # fmt: skip
    p.add_argument("--format", required=True, choices=FORMATS, help="the file's schema")
    p.add_argument("--task", choices=list(TASKS), default=None, help="default: the format's")
    p.add_argument("--out", required=True, metavar="RESULTS_DIR", help="results folder")
    p.add_argument(
        "--image-root",
        metavar="DIR",
        help="image paths are relative to this (unused for a dataset folder)",
    )
    p.add_argument("--batch-size", type=cliutil.positive_int, default=8, metavar="B",
                   help="regions per batch (default 8)")  # fmt: skip
    p.add_argument("--limit", type=cliutil.positive_int, default=None, metavar="N",
                   help="only the first N items")  # fmt: skip
    p.add_argument(
        "--strict", action="store_true",
        help="stop at the first malformed record or mismatched prediction id",
    )  # fmt: skip
    p.add_argument("--lang", choices=["en", "zh"], default="en")
    cliutil.add_sampling_arguments(p, max_new_tokens=512)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--step", type=int, default=None, help="with a training workdir: the step")
    p.add_argument("--benchmark", default=None, help="paper table to compare with")
    p.add_argument("--force", action="store_true", help="reuse a folder made with other settings")
    cliutil.add_dtype_argument(p, what="SAM 2 and the perceiver")
    return p


def run(args: argparse.Namespace) -> int:
    return cliutil.run_command(_run, args)


def _run(args: argparse.Namespace) -> int:
    from pam_jax.evaluation.api import EvalConfig, evaluate, resolve_model_dir
    from pam_jax.evaluation.formats import check_task
    from pam_jax.evaluation.runner import DecodeSettings

    check_task(args.format, args.task)  # before loading anything
    model = tok = None
    model_id = "predictions"
    penalty = 1.0
    mesh = load = None
    if args.model is not None:
        from pam_jax.checkpoint import read_model_config
        from pam_jax.evaluation.runner import local_mesh
        from pam_jax.llm.tokenizer import Tokenizer
        from pam_jax.training.distributed import maybe_initialize

        maybe_initialize()  # several processes (JAX_COORDINATOR_ADDRESS, ...): one shard each
        d = resolve_model_dir(args.model, args.step)
        llm_dir = d / read_model_config(d, "pam").get("llm_dir", "llm")
        # the tokenizer alone settles the run's settings: a refused or finished run never
        # loads the model
        tok = Tokenizer.from_dir(llm_dir) if (llm_dir / "tokenizer.json").is_file() else None
        mesh = local_mesh()  # every local device: batches data-parallel over them
        model_id = str(d.resolve())

        def load():
            from pam_jax.pam.model import load_pam

            cliutil.status(f"loading {d} ...")
            return load_pam(d, dtype=cliutil.resolve_dtype(args.dtype), mesh=mesh)[0]

    sampling = cliutil.sampling_from_args(args, tok)
    penalty = sampling.repetition_penalty
    decode = DecodeSettings(
        max_new_tokens=args.max_new_tokens, temperature=sampling.temperature,
        top_p=sampling.top_p, top_k=sampling.top_k, repetition_penalty=penalty, seed=args.seed,
    )  # fmt: skip
    cfg = EvalConfig(
        data=args.data, format=args.format, task=args.task, image_root=args.image_root,
        batch_size=args.batch_size, limit=args.limit, strict=args.strict, lang=args.lang,
        benchmark=args.benchmark, decode=decode,
    )  # fmt: skip
    flat = evaluate(
        cfg, args.out, model=model, tokenizer=tok, model_id=model_id,
        predictions=args.predictions, force=args.force, mesh=mesh, load_model=load,
    )  # fmt: skip
    shown = {k: v for k, v in flat.items() if isinstance(v, float) and k != "items_per_s"}
    print(" ".join(f"{k}={v:.4f}" for k, v in shown.items()), f"n_items={flat['n_items']}",
          f"n_skipped={flat['n_skipped']}")  # fmt: skip
    return 0
