"""`pam-jax data prepare`: release JSONL files -> one TFDS dataset in ArrayRecord (no TensorFlow).

DATASET_DIR layout (written atomically: a temporary sibling folder renamed at the end):

    DATASET_DIR/prepare_report.json      records read / written / skipped by reason (file, line)
    DATASET_DIR/pam_regions/1.0.0/       the TFDS dataset (dataset_info.json, features.json,
                                         pam_regions-train.array_record-*)

Each TFDS example: `record` (the checked Record as JSON: source file, line, frames, prompts,
masks as compressed COCO RLE at the stored size, orig_hw), `frames` (encoded picture bytes as
stored, or lossless PNG at image_size x image_size with --image-size), `kind`, `source`, `line`.
Records keep the order of the files and lines given.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pam_jax.data.records import Record, RecordError, read_jsonl, record_to_json

TFDS_NAME = "pam_regions"
TFDS_VERSION = "1.0.0"
TFDS_SUBDIR = f"{TFDS_NAME}/{TFDS_VERSION}"
REPORT = "prepare_report.json"
FORMAT = "pam-jax-data"


@dataclasses.dataclass(frozen=True)
class Checked:
    """A record that passed every check, with its pictures' bytes (as they will be stored)."""

    record: Record
    frames: list[bytes]


def _resolve(path: str, image_root: str | os.PathLike | None) -> Path:
    p = Path(path)
    return p if p.is_absolute() or image_root is None else Path(image_root) / p


def _open_picture(path: Path, reason: str) -> tuple[bytes, Any]:
    from PIL import Image

    if not path.is_file():
        raise RecordError(reason, str(path))
    data = path.read_bytes()
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as e:  # PIL raises many types for broken files
        raise RecordError("unreadable_image", f"{path}: {e}") from None
    return data, im


def _mask_rle(mask: Any, hw: tuple[int, int], image_root) -> dict:
    """Any accepted mask form -> compressed COCO RLE at hw (checked)."""
    from pam_jax.cliutil import mask_rle
    from pam_jax.data.preprocess import decode_mask

    if isinstance(mask, str):
        _, im = _open_picture(_resolve(mask, image_root), "bad_mask")
        m = np.asarray(im.convert("L")) > 0
        if m.shape != tuple(hw):
            raise RecordError(
                "bad_mask", f"mask {mask} is {m.shape[::-1]}, image {hw[::-1]} (W, H)"
            )
        return mask_rle(m)
    try:
        return mask_rle(decode_mask(mask, hw))
    except RecordError:
        raise
    except Exception as e:
        raise RecordError("bad_mask", f"cannot decode mask ({e})") from None


def check_record(
    record: Record, image_root: str | os.PathLike | None, *, image_size: int | None = None
) -> Checked:
    """Everything that needs the pictures: files exist and decode, one size for all frames,
    every stored box and point set inside the image (make_prompt's rules), masks readable at
    the image size. Raises RecordError; returns the record with orig_hw and RLE masks."""
    from PIL import Image

    from pam_jax.sam2.prompts import PromptError, make_prompt

    missing = "missing_frame" if record.is_video else "missing_image"
    datas, hw = [], None
    for f in record.frames:
        data, im = _open_picture(_resolve(f, image_root), missing)
        size = (im.height, im.width)
        if hw is not None and size != hw:
            raise RecordError("frame_size_mismatch", f"{f} is {size}, frame 0 is {hw} (H, W)")
        hw = size
        if image_size is not None and size != (image_size, image_size):
            out = io.BytesIO()
            im.convert("RGB").resize((image_size, image_size), Image.BICUBIC).save(out, "PNG")
            data = out.getvalue()
        datas.append(data)
    anns = []
    for a in record.annotations:
        try:
            if a.box is not None:
                make_prompt(box=a.box, image_hw=hw)
            if a.points is not None:
                make_prompt(a.points, a.labels, image_hw=hw)
        except PromptError as e:
            raise RecordError("bad_prompt", f"frame {record.frames[a.frame]}: {e}") from None
        mask = None if a.mask is None else _mask_rle(a.mask, hw, image_root)
        anns.append(dataclasses.replace(a, mask=mask))
    rec = dataclasses.replace(record, annotations=tuple(anns), orig_hw=hw)
    return Checked(rec, datas)


@dataclasses.dataclass
class Report:
    """Counts of a prepare run; `skipped` lists every bad record with file, line and reason."""

    records_read: int = 0
    written: int = 0
    skipped: list[dict] = dataclasses.field(default_factory=list)
    written_by_kind: dict[str, int] = dataclasses.field(default_factory=dict)
    per_file: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    def add(self, file: str, ok: Record | RecordError, line: int) -> None:
        self.records_read += 1
        pf = self.per_file.setdefault(file, {"read": 0, "written": 0, "skipped": 0})
        pf["read"] += 1
        if isinstance(ok, RecordError):
            pf["skipped"] += 1
            self.skipped.append(
                {"file": file, "line": line, "reason": ok.reason, "detail": ok.detail}
            )
        else:
            pf["written"] += 1
            self.written += 1
            self.written_by_kind[ok.kind] = self.written_by_kind.get(ok.kind, 0) + 1

    def to_json(self, **extra: Any) -> dict:
        by_reason = collections.Counter(s["reason"] for s in self.skipped)
        return {
            "format": FORMAT,
            "tfds_dir": TFDS_SUBDIR,
            **extra,
            "records_read": self.records_read,
            "written": self.written,
            "skipped_count": len(self.skipped),
            "skipped_by_reason": dict(sorted(by_reason.items())),
            "written_by_kind": self.written_by_kind,
            "per_file": self.per_file,
            "skipped": self.skipped,
        }


def iter_checked(
    files: Sequence[str | os.PathLike],
    image_root: str | os.PathLike | None,
    *,
    image_size: int | None = None,
    workers: int = 1,
) -> Iterator[tuple[str, int, Checked | RecordError]]:
    """(file, line, Checked or RecordError) for every record of the files, in order."""

    def one(item):
        path, line, r = item
        if isinstance(r, RecordError):
            return path, line, r
        try:
            return path, line, check_record(r, image_root, image_size=image_size)
        except RecordError as e:
            return path, line, e
        except Exception as e:  # a shape no check foresaw: reported, never a crash mid-run
            return path, line, RecordError("bad_field", f"{type(e).__name__}: {e}")

    items = ((str(p), line, r) for p in files for line, r in read_jsonl(p))
    if workers <= 1:
        yield from map(one, items)
        return
    with ThreadPoolExecutor(workers) as ex:
        chunk: list = []
        for it in items:
            chunk.append(it)
            if len(chunk) == 64 * workers:
                yield from ex.map(one, chunk)
                chunk = []
        yield from ex.map(one, chunk)


def _builder_class():
    """The TFDS builder (defined lazily: importing tfds costs ~2 s)."""
    global _BUILDER
    if _BUILDER is not None:
        return _BUILDER
    import tensorflow_datasets as tfds

    class PamRegions(tfds.core.GeneratorBasedBuilder):
        """PAM region records: encoded frames + the checked record as JSON."""

        VERSION = tfds.core.Version(TFDS_VERSION)
        # no checksums file to find next to the code (tfds' lookup of it needs
        # importlib_resources, which tfds does not install)
        code_path = None
        examples: Iterable[tuple[int, dict]] = ()

        def _info(self):
            f = tfds.features
            return tfds.core.DatasetInfo(
                builder=self,
                description="PAM region annotations (pam-jax data prepare)",
                features=f.FeaturesDict(
                    {
                        "record": f.Text(),
                        "frames": f.Sequence(f.Tensor(shape=(), dtype=np.object_)),
                        "kind": f.Text(),
                        "source": f.Text(),
                        "line": f.Scalar(dtype=np.int64),
                    }
                ),
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            yield from self.examples

    _BUILDER = PamRegions
    return PamRegions


_BUILDER = None


def prepare(
    files: Sequence[str | os.PathLike],
    image_root: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    strict: bool = False,
    image_size: int | None = None,
    force: bool = False,
    workers: int = 1,
) -> dict:
    """Check and write every record of `files` into the dataset folder `out`; returns the
    report (also written as out/prepare_report.json). Under `strict` the first bad record
    raises RecordError naming file and line, and nothing is written."""
    import tensorflow_datasets as tfds

    from pam_jax.cliutil import atomic_dir, write_json

    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(2, "no such JSONL file", str(f))
    report = Report()

    def examples() -> Iterator[tuple[int, dict]]:
        for file, line, c in iter_checked(
            files, image_root, image_size=image_size, workers=workers
        ):
            if isinstance(c, RecordError):
                if strict:
                    raise RecordError(c.reason, f"{file}:{line}: {c.detail}")
                report.add(file, c, line)
                continue
            report.add(file, c.record, line)
            r = c.record
            yield (
                report.written - 1,
                {
                    "record": json.dumps(record_to_json(r), ensure_ascii=False),
                    "frames": c.frames,
                    "kind": r.kind,
                    "source": r.source,
                    "line": r.line,
                },
            )
        if report.written == 0:  # tfds cannot write an empty split; say why instead
            reasons = report.to_json()["skipped_by_reason"]
            raise ValueError(
                f"no valid record: {report.records_read} read, all skipped {reasons}; "
                "nothing written"
            )

    tfds.disable_progress_bar()
    with atomic_dir(out, force=force, what="dataset") as tmp:
        cls = _builder_class()
        builder = cls(data_dir=str(tmp), file_format="array_record")
        builder.examples = examples()
        with contextlib.redirect_stdout(io.StringIO()):  # tfds prints "Downloading and ..."
            builder.download_and_prepare()
        summary = report.to_json(
            image_size=image_size,
            image_root=None if image_root is None else str(image_root),
            files=[str(f) for f in files],
        )
        write_json(Path(tmp) / REPORT, summary)
    return summary
