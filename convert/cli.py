"""`pam-jax convert {sam2,llm,pam}`: each converter module has add_parser(sub) and run(args)."""

from __future__ import annotations

import argparse
import importlib

CONVERTERS = {
    "sam2": ("pam_jax.convert.sam2", "an official SAM 2 / 2.1 .pt checkpoint"),
    "llm": ("pam_jax.convert.llm", "a local Hugging Face Qwen2 / Qwen2.5 directory"),
    "pam": ("pam_jax.convert.pam", "an official PAM release directory plus SAM 2 weights"),
}


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "convert",
        help="convert official PyTorch / HF checkpoints",
        description="Convert official checkpoints into pam-jax model directories.",
    )
    conv = p.add_subparsers(dest="converter", metavar="WHAT", required=True)
    for name, (mod, help_) in CONVERTERS.items():
        try:
            importlib.import_module(mod).add_parser(conv)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            conv.add_parser(name, help=f"{help_} (not available in this build)")
    return p


def run(args) -> int:
    return importlib.import_module(CONVERTERS[args.converter][0]).run(args)
