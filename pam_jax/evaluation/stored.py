"""`--format pam` over a prepared dataset folder (`pam-jax data prepare`): the same items as
the JSONL gives, pictures read as stored (`StoredFrame`), prepare's skips as problems."""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

from pam_jax.data.records import Record
from pam_jax.data.source import load_element
from pam_jax.evaluation.items import FormatError, Item, Problem, _reason
from pam_jax.evaluation.readers import _pam_item


class StoredFrame(str):
    """A picture stored in a prepared dataset: frame `frame` of record `index` of the dataset
    folder `dataset`. A str ("<dir>#<index>/<frame>", stable) so image grouping, sorting,
    shard keys and reports treat it as a path; `runner.load_image` reads its bytes."""

    dataset: str
    index: int
    frame: int

    def __new__(cls, dataset: str, index: int, frame: int) -> StoredFrame:
        s = super().__new__(cls, f"{dataset}#{index}/{frame}")
        s.dataset, s.index, s.frame = str(dataset), int(index), int(frame)
        return s

    def __getnewargs__(self) -> tuple[str, int, int]:  # pickles (process pools) as itself
        return self.dataset, self.index, self.frame

    def read_bytes(self) -> bytes:
        """The frame's encoded bytes as prepare stored them."""
        return _stored_frames(self.dataset, self.index)[self.frame]


_SOURCES: dict[str, Any] = {}
_SOURCE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=16)  # a video's frames are read one by one: one read per record
def _stored_frames(dataset: str, index: int) -> tuple[bytes, ...]:
    from pam_jax.data.source import open_dataset_dir

    with _SOURCE_LOCK:  # one reader per dataset, shared by the prefetch threads
        if dataset not in _SOURCES:
            _SOURCES[dataset] = open_dataset_dir(dataset)
        element = _SOURCES[dataset][index]
    return tuple(bytes(f) for f in element["frames"])


def _dataset_id(r: Record, single_file: bool) -> str:
    """The stored record's id; without one (prepare then stores "<file name>:<line from 1>")
    its 0-based line, as the JSONL gives it, prefixed by the file name when several files
    were prepared together."""
    if r.id != f"{Path(r.source).name}:{r.line}":
        return r.id
    return str(r.line - 1) if single_file else f"{Path(r.source).name}:{r.line - 1}"


def _load_dataset(path: Path, task: str | None, strict: bool) -> tuple[list, list, int]:
    """A `pam-jax data prepare` folder -> (items, problems, n_records). Its pictures are read
    as stored (StoredFrame), its masks are the RLEs prepare checked; prepare's skipped records
    are problems named by file and line (1-based, as prepare reports them)."""
    from pam_jax.data.source import dataset_report, is_dataset_dir, open_dataset_dir

    if not is_dataset_dir(path):
        raise FormatError(f"--data {path}: not a prepared dataset (run `pam-jax data prepare`)")
    rep = dataset_report(path)
    if rep.get("image_size") is not None:
        raise FormatError(
            f"--data {path}: prepared with --image-size {rep['image_size']} (resized pictures, "
            "prompts in the original pixels); prepare it without --image-size to evaluate"
        )
    problems = [
        Problem(f"{s['file']}:{s['line']}", f"{s['reason']}: {s.get('detail', '')}".rstrip(": "))
        for s in rep.get("skipped", [])
    ]
    if strict and problems:
        raise FormatError(f"{path}: {problems[0]} (--strict; skipped by prepare)")
    single = len(rep.get("files") or []) <= 1
    src = open_dataset_dir(path)
    items: list[Item] = []
    for i in range(len(src)):
        r, _ = load_element(src[i])  # pictures are read later, by the runner
        where = f"index {i} ({r.source}:{r.line})"
        media = tuple(StoredFrame(str(path), i, k) for k in range(len(r.frames)))
        try:
            items.append(_pam_item(r, _dataset_id(r, single), media, r.annotations[0].mask,
                                   task, where))  # fmt: skip
        except (ValueError, KeyError, TypeError, IndexError) as e:
            problems.append(Problem(where, _reason(e)))
            if strict:
                raise FormatError(f"{path}: {problems[-1]} (--strict)") from None
    return items, problems, int(rep.get("records_read", len(src)))
