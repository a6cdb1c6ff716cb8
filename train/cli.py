"""`pam-jax train --config NAME_OR_FILE [key=value ...] [--resume] [--print-config]
[--compile-only --topology NAME]`: parses and calls `pam_jax.training`."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    from pam_jax.training.config import run_config_names

    p = subparsers.add_parser(
        "train",
        help="train PAM (stages 1 / 1.5 / 2) on a device mesh",
        description="Train PAM from a run config (configs/train/NAME.json or a JSON file) "
        "with key=value overrides. Named configs: " + ", ".join(run_config_names()),
    )
    p.add_argument("--config", required=True, help="run config name or JSON file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--resume", action="store_true", help="continue the run in workdir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config")
    p.add_argument(
        "--compile-only", action="store_true",
        help="lower and compile the sharded step (with --topology: for a TPU pod, on this host)",
    )  # fmt: skip
    p.add_argument("--topology", help="TPU topology for --compile-only, e.g. v5e:16x16, v5p:4x4x4")
    p.add_argument(
        "--export-step", type=int, metavar="STEP", nargs="?", const=-1,
        help="write a saved step (default the latest) of the run as workdir/export-STEP/",
    )  # fmt: skip
    p.add_argument("--coordinator", help="jax.distributed coordinator host:port (multi-process)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    return p


def run(args) -> int:
    from pam_jax.training.config import ConfigError, resolve

    try:
        cfg = resolve(args.config, args.overrides)
    except ConfigError as e:
        print(f"pam-jax train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if args.topology and not args.compile_only:
        print("pam-jax train: --topology needs --compile-only", file=sys.stderr)
        return 2
    try:
        if args.compile_only:
            from pam_jax.training.compile import compile_only, no_fit_message

            report = compile_only(cfg, topology=args.topology)
            if not report["fits"]:
                print(f"pam-jax train: {no_fit_message(report)}", file=sys.stderr)
                return 3
            return 0
        from pam_jax.training.distributed import maybe_initialize
        from pam_jax.training.trainer import TrainingError, export_step, train

        maybe_initialize(args.coordinator, args.num_processes, args.process_id)
        if args.export_step is not None:
            out = export_step(cfg, None if args.export_step < 0 else args.export_step)
            print(json.dumps({"export": str(out)}))
            return 0
        summary = train(cfg, resume=args.resume)
    except ConfigError as e:
        print(f"pam-jax train: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"pam-jax train: {e}", file=sys.stderr)
        return 1
    if summary.get("stopped_by_signal") is not None:
        sig, step = summary["stopped_by_signal"], summary["step"]
        msg = f"stopped by signal {sig} at step {step}; checkpoint saved, continue with --resume"
        print(f"pam-jax train: {msg}", file=sys.stderr)
        return 128 + int(summary["stopped_by_signal"])
    print(json.dumps(summary))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pam-jax")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    return run(parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
