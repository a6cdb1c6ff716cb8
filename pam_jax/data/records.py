"""The release's training records (JSONL, one object a line) as typed `Record`s.

Schema (`pam.md` §1.12, §4; `llava/train/train.py::LazySupervisedDataset`):

    image: {"type": "image", "image": PATH, "conversations": [...], "bbox": [x, y, w, h] | null,
            "points": [[x, y], ...] | null, "labels": [1, 0, ...] | null}
    video: {"type": "video", "image_root": DIR, "frames": [NAME, ...], "masked_frames": [NAME, ...],
            "conversations": [...], "bbox": [[x, y, w, h], ...] (one per masked frame),
            "points": [[[x, y], ...], ...], "labels": [[1, 0, ...], ...]}

`conversations` turns are {"from": "human"|"gpt", "value"} or {"role": "user"|"assistant",
"content"}. Streaming-caption records are video records whose prompt carries the previous clip's
caption ("Previous caption: ..."); they parse like any video record. Beyond the release, a
record (or each masked frame of a video) may carry a ground-truth mask: `segmentation` as COCO
RLE ({"size": [h, w], "counts": ...}) or polygons ([[x0, y0, x1, y1, ...], ...]), or `mask`, a PNG
path (relative to the image root). For videos both are lists aligned with `masked_frames`.

`parse_record` checks the structure only; what needs the pictures (files exist, prompts inside
the image, mask sizes) is checked by `pam_jax.data.prepare.check_record`. Every problem is a
`RecordError(reason, detail)` with one of the stable `REASONS`. As the release
(`preprocess_qwen`), a first turn that is not the human's is dropped.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pam_jax.pam.prompts import IMAGE_PLACEHOLDER

# reason -> what it means (the keys are what prepare_report.json counts)
REASONS: dict[str, str] = {
    "malformed_json": "the line is not valid JSON",
    "not_an_object": "the line is not a JSON object",
    "bad_type": "`type` is neither 'image' nor 'video'",
    "bad_field": "a field has the wrong type or shape",
    "empty_conversations": "no conversation turns (or a turn with empty text)",
    "bad_role": "a turn's role is not human/user, gpt/assistant or system",
    "no_image_token": "no turn holds the <image> placeholder",
    "multiple_image_tokens": "more than one <image> placeholder",
    "no_assistant_turn": "nothing to supervise: no gpt/assistant turn",
    "points_labels_mismatch": "points and labels differ in count (or one is missing)",
    "bad_box": "bbox is not 4 numbers x, y, w, h with w, h >= 0",
    "no_prompt": "neither a bbox nor points",
    "bad_masked_frames": "masked_frames / per-frame prompts do not line up with frames",
    "missing_image": "the image file does not exist",
    "missing_frame": "a video frame file does not exist",
    "unreadable_image": "an image or frame cannot be decoded",
    "frame_size_mismatch": "video frames differ in size",
    "bad_prompt": "a box or point is outside the image (more than 1 pixel) or otherwise invalid",
    "bad_mask": "a ground-truth mask cannot be read or does not match the image size",
}

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class RecordError(ValueError):
    """A bad record: `reason` is one of REASONS, the message adds the detail."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown record error reason {reason!r}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclasses.dataclass(frozen=True)
class Turn:
    role: str  # "user" | "assistant" | "system"
    text: str


@dataclasses.dataclass(frozen=True)
class Annotation:
    """The prompt (and optional ground-truth mask) of one annotated frame, in stored pixels.

    box: [x1, y1, x2, y2] ints, already rounded as the release does (`bbox_xywh_to_box`);
    points float32 [P, 2] and labels int32 [P]; mask: a COCO RLE / polygon list / PNG path as
    given (`prepare` turns every form into compressed COCO RLE {"size", "counts"}).
    """

    frame: int  # index into Record.frames (0 for images)
    box: tuple[int, int, int, int] | None
    points: np.ndarray | None
    labels: np.ndarray | None
    mask: Any = None


@dataclasses.dataclass(frozen=True)
class Record:
    """One parsed training record.

    frames: image paths (one for an image, every frame of a video; relative to the image root
    unless absolute; a video's `image_root` already joined). annotations: one for an image, one
    per masked frame of a video (the first gives the prompt on frame 0, as the release).
    orig_hw: the stored pictures' (H, W) once known (set by `prepare`; None straight from JSONL).
    """

    id: str
    source: str
    line: int
    kind: str  # "image" | "video"
    frames: tuple[str, ...]
    annotations: tuple[Annotation, ...]
    conversations: tuple[Turn, ...]
    orig_hw: tuple[int, int] | None = None

    @property
    def is_video(self) -> bool:
        return self.kind == "video"


def _box(b: Any) -> tuple[int, int, int, int] | None:
    from pam_jax.sam2.prompts import bbox_xywh_to_box

    if b is None:
        return None
    if not isinstance(b, Sequence) or isinstance(b, str) or len(b) != 4:
        raise RecordError("bad_box", f"bbox {b!r} is not [x, y, w, h]")
    try:
        v = [float(x) for x in b]
    except (TypeError, ValueError):
        raise RecordError("bad_box", f"bbox {b!r} is not numbers") from None
    if not np.all(np.isfinite(v)) or v[2] < 0 or v[3] < 0:
        raise RecordError("bad_box", f"bbox {b!r} needs finite x, y and w, h >= 0")
    return tuple(bbox_xywh_to_box(v))


def _points(points: Any, labels: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    if points is None and labels is None:
        return None, None
    if points is None or labels is None:
        raise RecordError("points_labels_mismatch", "points and labels must be given together")
    try:
        pts = np.asarray(points, np.float32)
        lab = np.asarray(labels)
    except (TypeError, ValueError):
        raise RecordError("bad_field", f"points {points!r} / labels {labels!r}") from None
    if pts.size == 0 and lab.size == 0:
        return None, None
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise RecordError("bad_field", f"points must be [[x, y], ...], got shape {pts.shape}")
    if lab.ndim != 1 or not np.issubdtype(lab.dtype, np.number) or np.any(lab != np.round(lab)):
        raise RecordError("bad_field", f"labels must be a list of integers, got {labels!r}")
    if lab.shape[0] != pts.shape[0]:
        raise RecordError(
            "points_labels_mismatch", f"{pts.shape[0]} points but {lab.shape[0]} labels"
        )
    return pts, lab.astype(np.int32)


def _turns(conv: Any) -> tuple[Turn, ...]:
    if not isinstance(conv, list) or not conv:
        raise RecordError("empty_conversations", "`conversations` is missing or empty")
    turns = []
    for i, t in enumerate(conv):
        if not isinstance(t, Mapping):
            raise RecordError("bad_field", f"turn {i} is not an object")
        role = t.get("role", t.get("from"))
        text = t.get("content", t.get("value"))
        if role not in ROLES:
            raise RecordError("bad_role", f"turn {i} has role {role!r}")
        if not isinstance(text, str) or not text.strip():
            raise RecordError("empty_conversations", f"turn {i} has no text")
        turns.append(Turn(ROLES[role], text))
    if turns[0].role != "user":  # the release drops a first turn that is not the human's
        turns = turns[1:]
    n_img = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns)
    if n_img == 0:
        raise RecordError("no_image_token", "no turn holds <image>")
    if n_img > 1:
        raise RecordError("multiple_image_tokens", f"{n_img} <image> placeholders")
    if not any(t.role == "user" and IMAGE_PLACEHOLDER in t.text for t in turns):
        raise RecordError("no_image_token", "<image> is not in a human/user turn")
    if not any(t.role == "assistant" for t in turns):
        raise RecordError("no_assistant_turn")
    return tuple(turns)


def _per_frame(obj: Mapping, key: str, n: int) -> list:
    v = obj.get(key)
    if v is None:
        return [None] * n
    if not isinstance(v, list) or len(v) != n:
        raise RecordError(
            "bad_masked_frames", f"`{key}` must be a list of {n} (one per masked frame)"
        )
    return v


def _str(obj: Mapping, key: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not v:
        raise RecordError("bad_field", f"`{key}` must be a non-empty string, got {v!r}")
    return v


def parse_record(obj: dict, *, source: str, line: int = 0) -> Record:
    """A JSON object of the release's schema -> Record; raises RecordError(reason)."""
    if not isinstance(obj, Mapping):
        raise RecordError("not_an_object", f"got {type(obj).__name__}")
    kind = obj.get("type", "image")
    if kind not in ("image", "video"):
        raise RecordError("bad_type", f"type {kind!r}")
    turns = _turns(obj.get("conversations"))
    rid = str(obj.get("id", obj.get("obj_id", f"{Path(source).name}:{line}")))
    if kind == "image":
        frames = (_str(obj, "image"),)
        pts, lab = _points(obj.get("points"), obj.get("labels"))
        mask = obj.get("segmentation", obj.get("mask"))
        anns = (Annotation(0, _box(obj.get("bbox")), pts, lab, mask),)
    else:
        root = obj.get("image_root") or ""
        if not isinstance(root, str):
            raise RecordError("bad_field", "`image_root` must be a string")
        names = obj.get("frames")
        if not isinstance(names, list) or not names or not all(isinstance(f, str) for f in names):
            raise RecordError("bad_field", "`frames` must be a non-empty list of file names")
        frames = tuple(os.path.join(root, f) for f in names)
        masked = obj.get("masked_frames") or [names[0]]
        if not isinstance(masked, list) or any(f not in names for f in masked):
            raise RecordError("bad_masked_frames", f"masked_frames {masked!r} not all in frames")
        n = len(masked)
        boxes, pts_l, lab_l = (_per_frame(obj, k, n) for k in ("bbox", "points", "labels"))
        seg = _per_frame(obj, "segmentation" if "segmentation" in obj else "mask", n)
        anns = tuple(
            Annotation(names.index(m), _box(b), *_points(p, q), s)
            for m, b, p, q, s in zip(masked, boxes, pts_l, lab_l, seg)
        )
    first = anns[0]
    if first.box is None and first.points is None:
        raise RecordError(
            "no_prompt", "the (first masked frame's) record has no bbox and no points"
        )
    return Record(rid, str(source), int(line), kind, frames, anns, turns)


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Record | RecordError]]:
    """(line number from 1, Record or RecordError) for every non-blank line of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        for i, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield i, RecordError("malformed_json", str(e))
                continue
            try:
                yield i, parse_record(obj, source=str(path), line=i)
            except RecordError as e:
                yield i, e
            except Exception as e:  # a shape no rule above foresaw: reported, never a crash
                yield i, RecordError("bad_field", f"{type(e).__name__}: {e}")


def record_to_json(r: Record) -> dict:
    """A Record as a JSON object `record_from_json` reads back (what `prepare` stores)."""

    def ann(a: Annotation) -> dict:
        return {
            "frame": a.frame,
            "box": None if a.box is None else list(a.box),
            "points": None if a.points is None else a.points.tolist(),
            "labels": None if a.labels is None else a.labels.tolist(),
            "mask": a.mask,
        }

    return {
        "id": r.id,
        "source": r.source,
        "line": r.line,
        "kind": r.kind,
        "frames": list(r.frames),
        "annotations": [ann(a) for a in r.annotations],
        "conversations": [{"role": t.role, "text": t.text} for t in r.conversations],
        "orig_hw": None if r.orig_hw is None else list(r.orig_hw),
    }


def record_from_json(d: Mapping) -> Record:
    def arr(x, dt):
        return None if x is None else np.asarray(x, dt).reshape((-1, 2) if dt == np.float32 else -1)

    anns = tuple(
        Annotation(
            int(a["frame"]),
            None if a["box"] is None else tuple(int(v) for v in a["box"]),
            arr(a["points"], np.float32),
            arr(a["labels"], np.int32),
            a.get("mask"),
        )
        for a in d["annotations"]
    )
    return Record(
        str(d["id"]),
        str(d["source"]),
        int(d["line"]),
        str(d["kind"]),
        tuple(d["frames"]),
        anns,
        tuple(Turn(t["role"], t["text"]) for t in d["conversations"]),
        None if d.get("orig_hw") is None else tuple(int(v) for v in d["orig_hw"]),
    )
