"""Evaluation items and what every benchmark reader shares: the --format / --task names, the
`Item` / `Event` / `Problem` types, the mask and box conversions, and the record-file reading
helpers (`formats.load` is the entry point; the readers are `readers`, `coco` and `stored`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = ("pam", "osprey", "refcocog", "vg", "video", "stream", "coco")
# --task values -> the predictor's task names; "segment" and the video tasks are special
TASKS = {
    "recognize": "recognize",
    "explain": "explain",
    "caption": "brief_caption",
    "detailed-caption": "detailed_caption",
    "video-caption": "video_caption",
    "stream-caption": "streaming_caption",
    "segment": "recognize",  # SAM 2 only; no text is generated
}
DEFAULT_TASK = {
    "osprey": "recognize",
    "refcocog": "caption",
    "vg": "caption",
    "video": "video-caption",
    "stream": "stream-caption",
    "coco": "segment",
}
IMAGE_TASKS = ("recognize", "explain", "caption", "detailed-caption", "segment")


class FormatError(ValueError):
    """A malformed benchmark file or record (under --strict, the first bad record)."""


@dataclasses.dataclass(frozen=True)
class Problem:
    where: str  # "line 3" / "index 2" / "file"
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class Event:
    """One event of a streamed video: its frames (paths) and the prompt box on its first."""

    id: str
    frames: tuple[str, ...]
    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    ref: str


@dataclasses.dataclass(frozen=True)
class Item:
    """One unit of evaluation.

    kind "image": `media` = (image path,), `region` = the predictor's region dict (box /
    points / labels, or mask = a COCO RLE / polygon spec decoded at the image size).
    kind "video": `media` = frame paths, the region applies to frame 0.
    kind "stream": `events` hold the clips; predictions are one per event (ids `id#k`).
    refs: reference texts (empty for segmentation); gt_mask: COCO segmentation spec or a PNG
    path (image), or a list of per-frame specs (video), or None."""

    id: str
    kind: str
    task: str
    media: tuple[str, ...]
    region: dict[str, Any]
    refs: tuple[str, ...] = ()
    gt_mask: Any = None
    events: tuple[Event, ...] = ()
    hw: tuple[int, int] | None = None
    history: str | None = None  # video: the previous clip's caption (PAM streaming records)
    where: str = ""

    def prediction_ids(self) -> list[str]:
        return [e.id for e in self.events] if self.kind == "stream" else [self.id]


@dataclasses.dataclass
class Loaded:
    items: list[Item]
    problems: list[Problem]
    n_records: int


def xywh_to_box(bbox: Any) -> list[float]:
    """COCO [x, y, w, h] -> [x1, y1, x2, y2] with the release's rounding
    (`pam_jax.sam2.prompts.bbox_xywh_to_box`); negative sizes are an error."""
    from pam_jax.sam2.prompts import bbox_xywh_to_box

    if not isinstance(bbox, list | tuple) or len(bbox) != 4:
        raise ValueError(f"bbox {bbox!r} is not [x, y, w, h]")
    if float(bbox[2]) < 0 or float(bbox[3]) < 0:
        raise ValueError(f"bbox {bbox} has a negative width or height")
    return [float(v) for v in bbox_xywh_to_box(bbox)]


def decode_mask(spec: Any, hw: tuple[int, int]) -> np.ndarray:
    """A ground-truth or prompt mask as the data pipeline reads it (`pam_jax.data`): COCO
    polygons [[x, y, ...], ...], an uncompressed or compressed RLE {size, counts}, or a PNG
    path (nonzero = object) -> bool [H, W]. A mask of another size is a ValueError."""
    from pam_jax.data.prepare import _mask_rle
    from pam_jax.data.preprocess import decode_mask as data_decode_mask

    if isinstance(spec, str):  # a PNG: read and size-checked by the pipeline's reader
        spec = _mask_rle(spec, hw, None)
    return data_decode_mask(spec, hw).astype(bool)


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """bool [H, W] -> compressed COCO RLE {"size": [H, W], "counts": str} (`cliutil.mask_rle`,
    the commands' one encoder)."""
    from pam_jax.cliutil import mask_rle

    return mask_rle(mask)


# ---------------------------------------------------------------------------------------------
# reading


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) from a JSONL file (one per line, blank lines skipped) or a JSON list.
    A line that is not JSON yields (where, FormatError)."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".json" or stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}: not valid JSON ({e})") from e
        if isinstance(data, dict):
            yield "file", data
            return
        if not isinstance(data, list):
            raise FormatError(f"{path}: expected a JSON list or object, got {type(data).__name__}")
        for i, r in enumerate(data):
            yield f"index {i}", r
        return
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            yield f"line {i}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"line {i}", FormatError(f"not valid JSON ({e.msg})")


def _default_id(where: str, rec: dict, *keys: str) -> str:
    for k in keys:
        if rec.get(k) is not None:
            return str(rec[k])
    return where.split()[-1]


def _path(root: Path | None, rec_root: str | None, name: str) -> str:
    p = Path(name)
    if rec_root is not None:
        p = Path(rec_root) / p
    if root is not None and not p.is_absolute():
        p = root / p
    return str(p)


def _text(v: Any, what: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{what} must be a non-empty string")
    return v


def _refs(v: Any, what: str) -> tuple[str, ...]:
    vs = [v] if isinstance(v, str) else v
    if not isinstance(vs, list) or not vs:
        raise ValueError(f"{what} must be a string or a non-empty list of strings")
    return tuple(_text(x, what) for x in vs)


def _reason(e: Exception) -> str:
    if isinstance(e, KeyError):
        return f"missing key {e.args[0]!r}"
    return str(e)
