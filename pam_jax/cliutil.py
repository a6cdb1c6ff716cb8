"""What every `pam-jax` command shares, in one import: the error voice (`pam_jax.errors`),
argparse types, dtype defaults, progress bars, the sampling flags, and (re-exported) image / mask
I/O (`pam_jax.fileio`) and output / run folders (`pam_jax.folders`).

Commands (segment, predict, convert, data, train, eval, demo, ...) raise `CLIError` (or any of
the user errors) for bad input; `pam_jax.cli.main` prints it as one line `error: ...` on stderr
and returns `EXIT_USAGE`. Outputs are checked with `output_prefix` / `output_dir` /
`check_new_dir` BEFORE the compute starts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from pam_jax.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CLIError,
    error_message,
    report_error,
    run_command,
)
from pam_jax.fileio import (
    mask_bbox,
    mask_box,
    mask_rle,
    read_image,
    read_mask,
    write_json,
    write_mask_png,
)
from pam_jax.folders import (
    DIR_MODE,
    FILE_MODE,
    RUN_FILE,
    RUN_FORMAT,
    OutputPrefix,
    RunFolder,
    atomic_dir,
    check_new_dir,
    output_dir,
    output_prefix,
    set_modes,
)

__all__ = [
    "COORD_FLAGS", "DIR_MODE", "DTYPE_CHOICES", "EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK",
    "EXIT_USAGE", "FILE_MODE", "RUN_FILE", "RUN_FORMAT", "CLIError", "OutputPrefix", "RunFolder",
    "add_click_arguments", "add_dtype_argument", "add_sampling_arguments", "atomic_dir",
    "check_new_dir", "clicks_region", "default_dtype", "error_message", "fix_negative_values",
    "mask_bbox", "mask_box", "mask_rle", "output_dir", "output_prefix", "parse_box", "parse_point",
    "positive_int", "progress", "progress_enabled", "read_image", "read_mask",
    "repetition_penalty", "report_error", "resolve_dtype", "run_command", "sampling_from_args",
    "set_modes", "status", "step_progress", "version", "write_json", "write_mask_png",
]  # fmt: skip

T = TypeVar("T")


# -- argparse types ------------------------------------------------------------------------------

# flags whose values may start with "-" (a negative coordinate): `fix_negative_values` joins them
# as "--point=-3,10" so argparse does not take "-3,10" for an option.
COORD_FLAGS = ("--point", "--box", "--input-ids")


def fix_negative_values(argv: Sequence[str], flags: Sequence[str] = COORD_FLAGS) -> list[str]:
    out: list[str] = []
    it = iter(range(len(argv)))
    for i in it:
        a = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if a in flags and nxt is not None and len(nxt) > 1 and nxt[0] == "-":
            if nxt[1].isdigit() or nxt[1] == ".":
                out.append(f"{a}={nxt}")
                next(it, None)
                continue
        out.append(a)
    return out


def _floats(text: str, counts: tuple[int, ...], form: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) not in counts or not all(np.isfinite(vals)):
        raise argparse.ArgumentTypeError(f"expected {form}, got {text!r}")
    return vals


def parse_point(text: str) -> tuple[float, float, int]:
    """ "X,Y" or "X,Y,LABEL" -> (x, y, label); LABEL 1 = positive (default), 0 = negative."""
    v = _floats(text, (2, 3), "X,Y or X,Y,LABEL (LABEL 1 positive or 0 negative)")
    label = 1 if len(v) == 2 else v[2]
    if label not in (0, 1):
        raise argparse.ArgumentTypeError(
            f"a point's label is 1 (positive) or 0 (negative), got {text!r}"
        )
    return v[0], v[1], int(label)


def parse_box(text: str) -> tuple[float, float, float, float]:
    """ "X1,Y1,X2,Y2" (corners in pixels) -> a tuple."""
    x1, y1, x2, y2 = _floats(text, (4,), "X1,Y1,X2,Y2")
    return x1, y1, x2, y2


def add_click_arguments(p: argparse.ArgumentParser, *, box_help: str) -> None:
    """--point (repeatable clicks) and --box (repeatable; `box_help` says what several mean):
    one definition for every command that takes them."""
    p.add_argument(
        "--point", type=parse_point, action="append", default=[], metavar="X,Y[,LABEL]",
        help="a click; LABEL 1 = positive (default), 0 = negative. Repeatable.",
    )  # fmt: skip
    p.add_argument(
        "--box", type=parse_box, action="append", default=[], metavar="X1,Y1,X2,Y2",
        help=box_help,
    )  # fmt: skip


def clicks_region(points: Sequence[tuple[float, float, int]]) -> dict[str, list]:
    """--point values -> a region's {"points": [[x, y], ...], "labels": [...]}."""
    return {"points": [[x, y] for x, y, _ in points], "labels": [lab for *_, lab in points]}


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {v}")
    return v


# -- dtypes --------------------------------------------------------------------------------------

DTYPE_CHOICES = ("auto", "float32", "bfloat16")


def default_dtype(backend: str | None = None):
    """The one default: bfloat16 on accelerators (GPU, TPU), float32 on the CPU."""
    import jax
    import jax.numpy as jnp

    backend = jax.default_backend() if backend is None else backend
    return jnp.float32 if backend == "cpu" else jnp.bfloat16


def resolve_dtype(name: str | None, backend: str | None = None):
    """ "auto" / None -> `default_dtype()`, else the named dtype ("float32", "bfloat16")."""
    import jax.numpy as jnp

    if name in (None, "auto"):
        return default_dtype(backend)
    if name not in DTYPE_CHOICES:
        raise CLIError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_CHOICES)}")
    return jnp.dtype(name)


def add_dtype_argument(p: argparse.ArgumentParser, flag: str = "--dtype", what: str = "") -> None:
    p.add_argument(
        flag, choices=DTYPE_CHOICES, default="auto",
        help=f"compute dtype{' of ' + what if what else ''} (default auto: bfloat16 on GPU / "
        "TPU, float32 on CPU)",
    )  # fmt: skip


# -- progress ------------------------------------------------------------------------------------


def progress_enabled() -> bool:
    """Progress output on stderr: PAM_JAX_PROGRESS=1 always, =0 never; unset: when stderr is a
    terminal (logs and pipes then keep only results and errors)."""
    env = os.environ.get("PAM_JAX_PROGRESS")
    if env is not None:
        return env != "0"
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def progress(
    iterable: Iterable[T], *, total: int | None = None, desc: str, unit: str = "it"
) -> Iterator[T]:
    """A tqdm bar on stderr (see `progress_enabled`)."""
    from tqdm.auto import tqdm

    yield from tqdm(
        iterable, total=total, desc=desc, unit=unit, file=sys.stderr,
        disable=not progress_enabled(), dynamic_ncols=True, leave=False,
    )  # fmt: skip


@contextlib.contextmanager
def step_progress(
    total: int, *, desc: str, unit: str = "token"
) -> Iterator[Callable[[int], None] | None]:
    """A bar for work that reports a running count from elsewhere (the decode loop's
    `on_step`): yields a callback that moves the bar to n, or None when progress is off (then
    nothing is compiled into the loop)."""
    if not progress_enabled():
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False
    )  # fmt: skip

    def update(n: int) -> None:
        if n == 1 and bar.n > 1:  # the next generation (a stream's next clip) starts
            bar.reset(total)
        if n > bar.n:  # unordered callbacks: never move back within one generation
            bar.update(n - bar.n)

    try:
        yield update
    finally:
        bar.refresh()  # the last count is drawn even when it came within tqdm's mininterval
        bar.close()


def status(message: str) -> None:
    """A progress line on stderr ("loading model ..."; see `progress_enabled`)."""
    if progress_enabled():
        print(message, file=sys.stderr, flush=True)


# -- sampling (generate, predict) ----------------------------------------------------------------


def add_sampling_arguments(p: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    """The decoding flags, one definition for every command that generates text."""
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=max_new_tokens, metavar="N",
        help=f"most tokens generated per sequence (default {max_new_tokens})",
    )  # fmt: skip
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (default 0 = off)")
    p.add_argument(
        "--repetition-penalty", type=float, default=None, metavar="P",
        help="HF-style penalty on tokens already seen (default: the model's "
        "generation_config.json, else 1 = off)",
    )  # fmt: skip


def repetition_penalty(value: float | None, tokenizer: Any) -> float:
    """`pam_jax.llm.sampler.repetition_penalty` (imported on use: `--help` loads no JAX)."""
    from pam_jax.llm.sampler import repetition_penalty as default

    return default(value, tokenizer)


def sampling_from_args(args: argparse.Namespace, tokenizer: Any):
    """SamplingParams from the flags of `add_sampling_arguments`, with one-line errors."""
    from pam_jax.llm.sampler import SamplingParams

    if args.temperature < 0:
        raise CLIError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise CLIError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise CLIError(f"--top-k must be >= 0, got {args.top_k}")
    pen = repetition_penalty(args.repetition_penalty, tokenizer)
    if pen <= 0:
        raise CLIError(f"--repetition-penalty must be > 0, got {pen}")
    return SamplingParams(args.temperature, args.top_p, args.top_k, pen)


def version() -> str:
    """The installed pam-jax version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _v

    try:
        return _v("pam-jax")
    except PackageNotFoundError:
        return "0+unknown"
