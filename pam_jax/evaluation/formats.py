"""Benchmark files -> evaluation items (`--format pam|osprey|refcocog|vg|video|stream|coco`).

Every format becomes a list of `Item`s: one region of one image (or one object of one video, or
one streamed video with its events) with its references. Ids are strings: the record's `id`
(for `stream` also `video_id`), else its 0-based line (JSONL) or list index (JSON), with `#k`
appended for the k-th region / event of a record that has several. `pam` also reads a
prepared dataset folder (`pam-jax data prepare`): the same items, pictures read as stored
(`StoredFrame`). The accepted schemas are documented in the README's "Evaluation" section.

Malformed records never stop a run silently: each one becomes a `Problem` (line or index and
the reason) and is skipped, or raises `FormatError` at the first one under `strict=True`.

The pieces: `items` (the types, names and shared helpers), `readers` (the per-record formats),
`coco` (the COCO-style files), `stored` (prepared dataset folders); this module picks one.
"""

from __future__ import annotations

from pathlib import Path

from pam_jax.evaluation.coco import _coco_like
from pam_jax.evaluation.items import (
    DEFAULT_TASK,
    FORMATS,
    IMAGE_TASKS,
    TASKS,
    Event,
    FormatError,
    Item,
    Loaded,
    Problem,
    _reason,
    _records,
    decode_mask,
    encode_mask,
    xywh_to_box,
)
from pam_jax.evaluation.readers import _PER_RECORD
from pam_jax.evaluation.stored import StoredFrame, _load_dataset

# the public names stay importable from here (`formats.Item`, `formats.decode_mask`, ...)
__all__ = [
    "DEFAULT_TASK",
    "FORMATS",
    "IMAGE_TASKS",
    "TASKS",
    "Event",
    "FormatError",
    "Item",
    "Loaded",
    "Problem",
    "StoredFrame",
    "check_task",
    "decode_mask",
    "encode_mask",
    "load",
    "xywh_to_box",
]


def check_task(fmt: str, task: str | None) -> str | None:
    if fmt not in FORMATS:
        raise FormatError(f"unknown --format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if task is not None and task not in TASKS:
        raise FormatError(f"unknown --task {task!r}; expected one of {', '.join(TASKS)}")
    task = task or DEFAULT_TASK.get(fmt)
    video = {"video": ("video-caption",), "stream": ("stream-caption",)}
    if fmt in video and task not in video[fmt]:
        raise FormatError(f"--format {fmt} takes --task {video[fmt][0]}, not {task}")
    if fmt in ("osprey", "refcocog", "vg", "coco") and task not in IMAGE_TASKS:
        raise FormatError(f"--format {fmt} is an image format; --task {task} is not")
    if fmt in ("refcocog", "vg", "osprey") and task == "segment":
        raise FormatError(f"--format {fmt} has no reference masks; use --format coco")
    return task


def load(
    data: str | Path,
    fmt: str,
    *,
    task: str | None = None,
    image_root: str | Path | None = None,
    strict: bool = False,
    limit: int | None = None,
) -> Loaded:
    """Read a benchmark file (or, for `pam`, a prepared dataset folder: `image_root` is not
    used) into items (first `limit` items), reporting malformed records."""
    task = check_task(fmt, task)
    path = Path(data)
    if path.is_dir() and fmt != "pam":
        raise FormatError(f"--data {path}: a dataset folder is read by --format pam only")
    if not path.exists():
        raise FormatError(f"--data {path}: no such file or dataset folder")
    root = Path(image_root) if image_root is not None else path.parent
    items: list[Item] = []
    problems: list[Problem] = []
    n = 0
    if path.is_dir():
        items, problems, n = _load_dataset(path, task, strict)
    elif fmt in ("refcocog", "vg", "coco"):
        recs = list(_records(path))
        if len(recs) != 1 or recs[0][0] != "file":
            raise FormatError(f"--format {fmt}: {path} must be one COCO-style JSON object")
        items, problems = _coco_like(recs[0][1], root, task, fmt)
        n = len(items) + len(problems)
    else:
        fn = _PER_RECORD[fmt]
        for where, rec in _records(path):
            n += 1
            try:
                if isinstance(rec, Exception):
                    raise rec
                if not isinstance(rec, dict):
                    raise ValueError(f"a record is a JSON object, got {type(rec).__name__}")
                items.extend(fn(where, rec, root, task))
            except (ValueError, KeyError, TypeError, IndexError) as e:
                problems.append(Problem(where, _reason(e)))
                if strict:
                    break
    if strict and problems:
        raise FormatError(f"{path}: {problems[0]} (--strict)")
    seen: set[str] = set()
    for it in items:
        for pid in it.prediction_ids():
            if pid in seen:
                raise FormatError(f"{path}: duplicate id {pid!r} ({it.where})")
            seen.add(pid)
    if limit is not None:
        items = items[:limit]
    return Loaded(items, problems, n)
