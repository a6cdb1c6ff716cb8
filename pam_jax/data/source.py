"""Random-access sources of stored records: a prepared dataset folder (TFDS ArrayRecord, read
with `tfds` without TensorFlow) or a JSONL file read in place (checked when opened, pictures
read from disk on access). Both give the same element: {"record": JSON bytes, "frames": [bytes]}.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pam_jax.data.prepare import REPORT, TFDS_SUBDIR, _resolve, iter_checked
from pam_jax.data.preprocess import open_image
from pam_jax.data.records import Record, RecordError, record_from_json, record_to_json


class LazyFrames(Sequence):
    """Encoded frames decoded on access to RGB PIL images (make_example reads only the frames
    it keeps and resizes them without an array round trip)."""

    def __init__(self, frames: Sequence[bytes]):
        self._frames = frames

    def __len__(self) -> int:
        return len(self._frames)

    def __getitem__(self, i):
        return open_image(self._frames[i])


def is_dataset_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / REPORT).is_file() and (Path(path) / TFDS_SUBDIR).is_dir()


def dataset_report(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / REPORT).read_text(encoding="utf-8"))


def open_dataset_dir(path: str | os.PathLike):
    """The prepared dataset's random-access source (tfds ArrayRecordDataSource)."""
    import tensorflow_datasets as tfds

    if not is_dataset_dir(path):
        raise FileNotFoundError(
            2,
            f"not a prepared dataset (no {REPORT} / {TFDS_SUBDIR}; run `pam-jax data prepare`)",
            str(path),
        )
    return tfds.builder_from_directory(str(Path(path) / TFDS_SUBDIR)).as_data_source("train")


class JsonlSource:
    """A JSONL file's good records (bad ones are listed in `skipped`), pictures read on access."""

    def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike | None):
        self.path, self.image_root = str(path), image_root
        self.records: list[Record] = []
        self.skipped: list[dict] = []
        for file, line, c in iter_checked([path], image_root):
            if isinstance(c, RecordError):
                self.skipped.append({"file": file, "line": line, "reason": c.reason})
            else:
                self.records.append(c.record)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        frames = [_resolve(f, self.image_root).read_bytes() for f in r.frames]
        return {"record": json.dumps(record_to_json(r)).encode(), "frames": frames}


def open_source(path: str | os.PathLike, image_root: str | os.PathLike | None = None):
    """A prepared dataset folder or a JSONL file (with its image root) as a source."""
    p = Path(path)
    if p.is_dir():
        return open_dataset_dir(p)
    if p.is_file():
        return JsonlSource(p, image_root)
    raise FileNotFoundError(2, "no such dataset folder or JSONL file", str(p))


def source_kinds(src: Any) -> set[str]:
    """Which kinds ("image", "video") a source holds."""
    if isinstance(src, JsonlSource):
        return {r.kind for r in src.records}
    return {k for k, v in (getattr(src, "kinds", None) or {}).items() if v}


def load_element(element: dict) -> tuple[Record, LazyFrames]:
    """A source element -> (Record, lazily decoded frames)."""
    rec = element["record"]
    rec = rec.decode("utf-8") if isinstance(rec, bytes | np.bytes_) else rec
    return record_from_json(json.loads(rec)), LazyFrames(list(element["frames"]))


def iter_records(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None
) -> Iterator[tuple[Record, LazyFrames]]:
    """Every good record of a prepared dataset folder (or a JSONL file with its image root), in
    stored order, with its frames decoded on access: for evaluators that want records rather
    than batches (the same records and pictures the training pipeline reads)."""
    src = open_source(path, image_root)
    for i in range(len(src)):
        yield load_element(src[i])
