"""Where commands write: output checks before any compute, model / dataset folders written
atomically, run folders that resume their own run.

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

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pam_jax.errors import CLIError
from pam_jax.fileio import write_json

RUN_FILE = "run.json"
RUN_FORMAT = "pam-jax-run"
FILE_MODE = 0o644
DIR_MODE = 0o755

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
