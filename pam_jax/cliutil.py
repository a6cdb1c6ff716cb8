"""What every `pam-jax` command shares: one error voice, exit codes, output checks, image and
mask reading, mask files, progress bars, dtype defaults, run folders and atomic directories.

Commands (segment, predict, convert, data, train, eval, demo, ...) raise `CLIError` (or any of
`USER_ERRORS`) for bad input; `pam_jax.cli.main` prints it as one line `error: ...` on stderr
and returns `EXIT_USAGE`. Outputs are checked with `output_prefix` / `output_dir` / `check_new_dir`
BEFORE the compute starts.

Run folders (`RunFolder.open`) and model / dataset folders (`atomic_dir`) follow the same rules
for every command:

- a command that writes a run folder records its settings in `run.json` there; running it again
  with the same settings resumes that run, a folder made with other settings (or by something
  else) is refused unless `force=True`;
- a model or dataset folder is written into a temporary sibling folder and renamed into place
  when complete, so an interrupted write never leaves half a model; a non-empty target is
  refused unless `force=True`. Files get mode 0644, folders 0755.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

EXIT_OK = 0
EXIT_FAILURE = 1  # the command ran and failed for a reason other than its input
EXIT_USAGE = 2  # bad input or usage (argparse uses 2 too)
EXIT_INTERRUPTED = 130

RUN_FILE = "run.json"
RUN_FORMAT = "pam-jax-run"
FILE_MODE = 0o644
DIR_MODE = 0o755

T = TypeVar("T")


class CLIError(ValueError):
    """A user-facing error: printed as `error: <message>` (one line), exit code `code`."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def _user_errors() -> tuple[type[BaseException], ...]:
    from pam_jax.checkpoint import CheckpointError

    # PromptError, RecordError, ... subclass ValueError; OSError covers missing / unreadable files
    return (CLIError, CheckpointError, ValueError, OSError)


def error_message(e: BaseException) -> str:
    """One line for the user: the first line of the message (OSError: its reason and file)."""
    if isinstance(e, OSError) and not isinstance(e, CLIError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    else:
        text = str(e)
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def report_error(e: BaseException, stream=None) -> int:
    """Print `error: ...` for `e` and return its exit code."""
    print(f"error: {error_message(e)}", file=stream or sys.stderr)
    return e.code if isinstance(e, CLIError) else EXIT_USAGE


def run_command(fn, args: argparse.Namespace) -> int:
    """fn(args) with the one error voice: user errors -> one line on stderr + EXIT_USAGE."""
    try:
        return int(fn(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _user_errors() as e:
        return report_error(e)


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


def status(message: str) -> None:
    """A progress line on stderr ("loading model ..."; see `progress_enabled`)."""
    if progress_enabled():
        print(message, file=sys.stderr, flush=True)


# -- reading images and masks --------------------------------------------------------------------


def _check_input_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise CLIError(f"{what} {path} is a folder, not a file")
    if not path.exists():
        raise CLIError(f"{what} {path}: no such file")


def read_image(path: str | os.PathLike, what: str = "image") -> np.ndarray:
    """A user's image as RGB uint8 [H, W, 3], EXIF orientation applied (as a viewer shows it)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    _check_input_file(p, what)
    try:
        with Image.open(p) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CLIError(f"{what} {p} is not a readable image ({error_message(e)})") from None


def read_mask(path: str | os.PathLike, hw: tuple[int, int], what: str = "mask") -> np.ndarray:
    """A mask picture -> bool [H, W] (non-zero in any channel = object). It must have the size
    `hw` (height, width) of the image or video it prompts."""
    m = read_image(path, what).max(axis=-1) > 0
    if m.shape != tuple(hw):
        raise CLIError(
            f"{what} {path} is {m.shape[1]}x{m.shape[0]} pixels; it must be the image's size, "
            f"{hw[1]}x{hw[0]}"
        )
    return m


# -- writing masks -------------------------------------------------------------------------------


def write_mask_png(mask: np.ndarray, path: str | os.PathLike) -> Path:
    """A boolean [H, W] mask as a black / white (0 / 255) 8-bit PNG."""
    from PIL import Image

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255, mode="L").save(p)
    return p


def mask_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO run-length encoding {"size": [h, w], "counts": str} (pycocotools' compressed form)."""
    from pycocotools import mask as mask_utils

    m = np.asfortranarray((np.asarray(mask) > 0).astype(np.uint8))
    rle = mask_utils.encode(m)
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def mask_box(mask: np.ndarray) -> list[int] | None:
    """The mask's bounding box [x1, y1, x2, y2] (exclusive x2, y2), None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def mask_bbox(mask: np.ndarray) -> list[int] | None:
    """The mask's bounding box as COCO's bbox [x, y, w, h], None for an empty mask."""
    b = mask_box(mask)
    return None if b is None else [b[0], b[1], b[2] - b[0], b[3] - b[1]]


def write_json(path: str | os.PathLike, data: Any) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return p


# -- output checks (before any compute) ----------------------------------------------------------


def _check_writable_dir(d: Path, flag: str) -> None:
    """CLIError unless folder `d` exists or can be created, and files can be written in it.
    Creates the missing folders (a probe file is written and removed)."""
    probe = d
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise CLIError(f"{flag} {d}: {probe} is a file, not a folder")
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".pam-jax-probe-"):
            pass
    except OSError as e:
        raise CLIError(f"{flag} {d}: cannot write there ({e.strerror or e})") from None


@dataclass(frozen=True)
class OutputPrefix:
    """Where a command's files go: `folder / (stem + suffix)`."""

    folder: Path
    stem: str

    def path(self, suffix: str) -> Path:
        return self.folder / f"{self.stem}{suffix}"

    def rel(self, p: Path) -> str:
        """`p` relative to the folder (how the JSON names the other outputs)."""
        return str(Path(p).relative_to(self.folder))


def output_prefix(
    out: str | os.PathLike, *, default_stem: str, flag: str = "--out",
    suffixes: Sequence[str] = (),
) -> OutputPrefix:  # fmt: skip
    """--out PREFIX: "out/cat" writes out/cat.png, out/cat.json, ...; a PREFIX ending in "/"
    (or an existing folder) is a folder: "out/" writes out/<default_stem>.png, ... The folder
    is created and checked writable now, before the compute; `suffixes` are checked not to be
    folders."""
    s = os.fspath(out)
    if not s:
        raise CLIError(f"{flag} is empty")
    p = Path(s)
    if s.endswith(("/", os.sep)) or p.is_dir():
        prefix = OutputPrefix(p, default_stem)
    else:
        prefix = OutputPrefix(p.parent, p.name)
    _check_writable_dir(prefix.folder, flag)
    for suf in suffixes:
        if prefix.path(suf).is_dir():
            raise CLIError(f"{flag} {s}: {prefix.path(suf)} is a folder")
    return prefix


def output_dir(
    out: str | os.PathLike, *, flag: str = "--out", force: bool = True, what: str = "output"
) -> Path:
    """A folder of outputs, created and checked writable now. With force=False a non-empty
    folder is refused."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise CLIError(f"{flag} {p} is a file; the {what} is written to a folder")
    if not force and p.is_dir() and any(p.iterdir()):
        raise CLIError(f"{flag} {p} is not empty; choose a new folder or add --force")
    _check_writable_dir(p, flag)
    return p


def check_new_dir(path: str | os.PathLike, *, force: bool = False, what: str = "model") -> Path:
    """Check (before compute) that a model / dataset folder can be written at `path` by
    `atomic_dir`: not a file, empty or absent unless `force`, parent writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CLIError(f"{p} is a file; a {what} is written as a folder")
    if p.is_dir() and any(p.iterdir()) and not force:
        raise CLIError(
            f"{p} is not empty (it holds {_describe(p)}); choose a new folder or add --force "
            "to replace it"
        )
    parent = p.absolute().parent
    _check_writable_dir(parent, what + " folder")
    return p


def _describe(p: Path) -> str:
    meta = p / "config.json"
    try:
        kind = json.loads(meta.read_text()).get("kind")
        if kind:
            return f"a {kind} model"
    except (OSError, ValueError, AttributeError):
        pass
    names = sorted(x.name for x in p.iterdir())
    return ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")


def set_modes(root: str | os.PathLike) -> None:
    """Files 0644 and folders 0755 under (and including) `root`."""
    root = Path(root)
    os.chmod(root, DIR_MODE)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(Path(dirpath) / d, DIR_MODE)
        for f in filenames:
            os.chmod(Path(dirpath) / f, FILE_MODE)


@contextlib.contextmanager
def atomic_dir(
    path: str | os.PathLike, *, force: bool = False, what: str = "model"
) -> Iterator[Path]:
    """Write a model / dataset folder atomically:

        with atomic_dir("models/sam2.1-l", force=args.force) as tmp:
            save_model_dir(tmp, ...)

    The body writes into a temporary sibling folder; on success it is renamed to `path` (an
    existing target, allowed only with `force`, is replaced); on any error the temporary folder
    is removed and the target is left untouched.
    """
    target = check_new_dir(path, force=force, what=what).absolute()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        set_modes(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- run folders ---------------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


@dataclass(frozen=True)
class RunFolder:
    """A run folder (train, eval, data jobs): `run.json` records the command and its settings.

    `RunFolder.open(path, command="train", settings={...})`:
    - absent or empty folder: a new run (`resumed` False), run.json written;
    - run.json of the same command with the same settings: the same run, `resumed` True;
    - other settings, another command, or files without run.json: CLIError naming the
      difference, unless `force` (then the record is rewritten and `resumed` is False; the
      other files are left to the command).
    `may_change` names settings allowed to differ on resume (e.g. a step count to extend).
    """

    path: Path
    command: str
    settings: dict[str, Any]
    resumed: bool

    @property
    def record(self) -> Path:
        return self.path / RUN_FILE

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        command: str,
        settings: Mapping[str, Any],
        force: bool = False,
        may_change: Sequence[str] = (),
    ) -> RunFolder:
        p = Path(path)
        settings = _jsonable(dict(settings))
        if p.exists() and not p.is_dir():
            raise CLIError(f"run folder {p} is a file")
        rec = p / RUN_FILE
        resumed = False
        if p.is_dir() and any(p.iterdir()):
            problem = None
            try:
                old = json.loads(rec.read_text()) if rec.is_file() else None
            except (OSError, ValueError):
                old = None
            if not isinstance(old, dict) or old.get("format") != RUN_FORMAT:
                problem = f"{p} holds files but no {RUN_FILE}: it is not a pam-jax run folder"
            elif old.get("command") != command:
                problem = f"{p} is a `{old.get('command')}` run, not a `{command}` run"
            else:
                was = old.get("settings") or {}
                diff = sorted(
                    k for k in set(was) | set(settings)
                    if k not in may_change and was.get(k) != settings.get(k)
                )  # fmt: skip
                if diff:
                    shown = "; ".join(
                        f"{k}: {was.get(k)!r} then, {settings.get(k)!r} now" for k in diff[:4]
                    )
                    more = f" (+{len(diff) - 4} more)" if len(diff) > 4 else ""
                    problem = f"{p} was made with other settings ({shown}{more})"
                else:
                    resumed = True
            if problem is not None and not force:
                raise CLIError(problem + "; choose a new folder or add --force")
        _check_writable_dir(p, "run folder")
        write_json(rec, {"format": RUN_FORMAT, "command": command, "settings": settings})
        return cls(p, command, settings, resumed)


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
    """The one default: the flag if given, else the model's generation_config.json, else 1."""
    if value is not None:
        return float(value)
    cfg = getattr(tokenizer, "generation_config", None) or {}
    return float(cfg.get("repetition_penalty", 1.0))


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
