"""The `pam-jax` command. Each subcommand lives in its own module, imported only when used.

A subcommand module exposes `add_parser(subparsers) -> argparse.ArgumentParser` and
`run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pam_jax import cliutil

# name -> (module, one-line help). Modules are imported lazily so `pam-jax --help` is instant.
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("pam_jax.convert.cli", "convert official PyTorch / HF checkpoints"),
    "segment": ("pam_jax.sam2.cli", "segment an image with SAM 2 (points, box, mask)"),
    "segment-video": ("pam_jax.sam2.video_cli", "track objects through a video with SAM 2"),
    "generate": ("pam_jax.llm.cli", "generate text with a Qwen2 model"),
    "predict": ("pam_jax.pam.cli", "recognize, explain and caption regions with PAM"),
    "perceive": ("pam_jax.pam.perceive", "segment everything in an image; describe each region"),
    "demo": ("pam_jax.demo", "generate data, train, evaluate and show a micro PAM (no downloads)"),
    "eval": ("pam_jax.eval.cli", "evaluate PAM on benchmarks (batched, resumable)"),
    "data": ("pam_jax.data.cli", "prepare and inspect training data (JSONL -> ArrayRecord)"),
    "train": ("pam_jax.train.cli", "train PAM on a device mesh (stages, resume, compile-only)"),
    "serve": ("pam_jax.serve.cli", "a web page and JSON API over a PAM model (click, read)"),
}


class Parser(argparse.ArgumentParser):
    """argparse with the commands' voice: a usage error is one line, `error: ...`, exit 2."""

    def error(self, message: str):
        self.exit(cliutil.EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = Parser(
        prog="pam-jax",
        description="pam-jax: region-level perception (SAM 2 + PAM) in JAX.",
    )
    parser.add_argument("--version", action="version", version=f"pam-jax {cliutil.version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in (argv or []) if not a.startswith("-")), None)
    for name, (mod, help_) in COMMANDS.items():
        if name == wanted:
            importlib.import_module(mod).add_parser(sub)
        else:
            sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse and run one command. Every command speaks with one voice: bad input is one line
    `error: ...` on stderr and exit code 2 (`cliutil.EXIT_USAGE`, as argparse's own errors)."""
    argv = cliutil.fix_negative_values(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) and argparse's usage errors (2)
        return e.code if isinstance(e.code, int) else cliutil.EXIT_USAGE
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    return cliutil.run_command(module.run, args)


if __name__ == "__main__":
    sys.exit(main())
