"""Benchmark files -> evaluation items (`--format pam|osprey|refcocog|vg|video|stream|coco`).

Every format becomes a list of `Item`s: one region of one image (or one object of one video, or
one streamed video with its events) with its references. Ids are strings: the record's `id`
(for `stream` also `video_id`), else its 0-based line (JSONL) or list index (JSON), with `#k`
appended for the k-th region / event of a record that has several. `pam` also reads a
prepared dataset folder (`pam-jax data prepare`): the same items, pictures read as stored
(`StoredFrame`). The accepted schemas are documented in the README's "Evaluation" section.

Malformed records never stop a run silently: each one becomes a `Problem` (line or index and
the reason) and is skipped, or raises `FormatError` at the first one under `strict=True`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pam_jax.data.records import Record
from pam_jax.data.source import load_element
from pam_jax.pam import prompts as task_prompts

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


def _point_region(rec: dict, box: list[float] | None) -> dict[str, Any]:
    region: dict[str, Any] = {}
    if box is not None:
        region["box"] = box
    pts = rec.get("points")
    if pts is not None:
        p = np.asarray(pts, np.float32)
        if p.ndim != 2 or p.shape[1] != 2:
            raise ValueError(f"points must be [[x, y], ...], got shape {p.shape}")
        labels = rec.get("labels")
        lab = [1] * len(p) if labels is None else [int(v) for v in labels]
        if len(lab) != len(p):
            raise ValueError(f"{len(p)} points but {len(lab)} labels")
        region["points"], region["labels"] = p.tolist(), lab
    if not region:
        raise ValueError("no prompt: give bbox, box or points")
    return region


def _task_of(human: str) -> tuple[str, str | None] | None:
    """(--task name, history) whose release prompt is this human turn (text after <image>)."""
    text = human.replace(task_prompts.IMAGE_PLACEHOLDER, "").strip()
    for name in ("recognize", "explain", "caption", "detailed-caption"):
        for lang in task_prompts.LANGS:
            if text == task_prompts.TASKS[TASKS[name]][lang]:
                return name, None
    for lang in task_prompts.LANGS:
        head = task_prompts.TASKS["video_caption"][lang].split("{history}")[0]
        if text.startswith(head):
            history = text[len(head) :].strip()
            return "video-caption", None if history == task_prompts.NO_HISTORY[lang] else history
    return None


def _pam(where, rec, root, task):
    """The PAM JSONL (the release's training schema, parsed by `pam_jax.data.records`)."""
    from pam_jax.data.records import parse_record

    r = parse_record(rec, source="eval", line=int(where.split()[-1]))
    media = tuple(_path(root, None, f) for f in r.frames)
    gt = r.annotations[0].mask  # `segmentation` (RLE / polygons) or `mask` (a PNG under root)
    if isinstance(gt, str):
        gt = _path(root, None, gt)
    return [_pam_item(r, _default_id(where, rec, "id"), media, gt, task, where)]


def _pam_item(r: Record, rid: str, media: tuple[str, ...], gt: Any, task: str | None,
              where: str) -> Item:  # fmt: skip
    """One PAM record (from a JSONL line or a prepared dataset) -> its item."""
    humans = [t.text for t in r.conversations if t.role == "user"]
    answers = [t.text for t in r.conversations if t.role == "assistant"]
    if not humans or not answers:
        raise ValueError("conversations need a human and a gpt turn")
    ref = _text(answers[-1], "the last gpt turn")
    found = _task_of(humans[0])
    history = found[1] if found is not None else None
    if task is None:
        if found is None:
            raise ValueError(f"the first human turn is no PAM task prompt: {humans[0][:60]!r}")
        task = found[0]
    ann = r.annotations[0]
    region: dict[str, Any] = {}
    if ann.box is not None:
        region["box"] = [float(v) for v in ann.box]
    if ann.points is not None:
        region["points"] = np.asarray(ann.points).tolist()
        region["labels"] = [int(v) for v in ann.labels]
    if r.kind == "image":
        if task == "segment" and gt is None:
            raise ValueError("--task segment needs the record's segmentation or mask")
        return Item(rid, "image", task, media, region, (ref,), gt, where=where)
    vtask = task if task in ("video-caption", "stream-caption") else "video-caption"
    return Item(rid, "video", vtask, media, region, (ref,), history=history, where=where)


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


def _osprey(where, rec, root, task):
    cats, anns = rec.get("categories"), rec.get("annotations")
    if not isinstance(cats, list) or not isinstance(anns, list) or len(cats) != len(anns):
        raise ValueError("categories and annotations must be lists of the same length")
    if not cats:
        raise ValueError("no regions")
    h, w = int(rec["height"]), int(rec["width"])
    media = (_path(root, None, _text(rec.get("file_name"), "file_name")),)
    rid = _default_id(where, rec, "id")
    out = []
    for k, (c, a) in enumerate(zip(cats, anns)):
        seg = a.get("segmentation")
        if seg is None:
            raise ValueError(f"region {k}: no segmentation (Osprey prompts with masks)")
        iid = f"{rid}#{k}" if len(cats) > 1 else rid
        out.append(
            Item(iid, "image", task, media, {"mask": seg}, (_text(c, "category"),), hw=(h, w),
                 where=where)
        )  # fmt: skip
    return out


def _coco_like(data: dict, root: Path | None, task: str, fmt: str) -> tuple[list, list]:
    """refcocog / vg / coco: one item per annotation, prompted by its box."""
    images = data.get("images")
    anns = data.get("annotations")
    if not isinstance(images, list) or not isinstance(anns, list):
        raise FormatError("a COCO-style file needs 'images' and 'annotations' lists")
    by_id = {im.get("id"): im for im in images if isinstance(im, dict)}
    items, problems = [], []
    for i, a in enumerate(anns):
        where = f"annotation {i}"
        try:
            if not isinstance(a, dict):
                raise ValueError("not an object")
            im = by_id.get(a.get("image_id"))
            if im is None:
                raise ValueError(f"image_id {a.get('image_id')!r} is not in images")
            hw = (int(im["height"]), int(im["width"])) if "height" in im else None
            region = {"box": xywh_to_box(a["bbox"])}
            media = (_path(root, None, _text(im.get("file_name"), "file_name")),)
            aid = str(a["id"]) if a.get("id") is not None else str(i)
            if fmt == "coco":
                if a.get("segmentation") is None or hw is None:
                    raise ValueError("segmentation needs a segmentation and image height/width")
                item = Item(aid, "image", task, media, region, (), a["segmentation"], hw=hw,
                            where=where)  # fmt: skip
            else:
                src = a if ("caption" in a or "captions" in a) else im
                cap = src.get("captions", src.get("caption"))
                if cap is None:
                    raise ValueError("no caption on the annotation or its image")
                item = Item(aid, "image", task, media, region, _refs(cap, "caption"), hw=hw,
                            where=where)  # fmt: skip
            items.append(item)
        except (ValueError, KeyError, TypeError) as e:
            problems.append(Problem(where, _reason(e)))
    return items, problems


def _video(where, rec, root, task):
    frames = rec.get("frames")
    if frames is None and rec.get("video") is not None:
        d = Path(_path(root, None, rec["video"]))
        frames = sorted(str(p.relative_to(d)) for p in d.glob("*.jpg")) if d.is_dir() else None
        base = str(d)
    else:
        base = rec.get("image_root")
    if not isinstance(frames, list) or not frames:
        raise ValueError("a video record needs frames (or a video folder of JPEGs)")
    box = rec.get("box")
    if box is None and rec.get("bbox") is not None:
        box = xywh_to_box(rec["bbox"])
    region = _point_region(rec, [float(v) for v in box] if box is not None else None)
    refs = _refs(rec.get("caption", rec.get("gt")), "caption")
    masks = rec.get("masks")
    if masks is not None and (not isinstance(masks, list) or len(masks) != len(frames)):
        raise ValueError(f"masks must be one RLE per frame ({len(frames)})")
    media = tuple(_path(root if rec.get("video") is None else None, base, f) for f in frames)
    return [Item(_default_id(where, rec, "id"), "video", task, media, region, refs, masks,
                 where=where)]  # fmt: skip


def _stream(where, rec, root, task):
    anns = rec.get("annotations")
    if not isinstance(anns, list) or not anns:
        raise ValueError("a stream record needs a non-empty annotations list")
    rid = _default_id(where, rec, "id", "video_id")
    events = []
    for k, a in enumerate(anns):
        frames = a.get("frames")
        if not isinstance(frames, list) or not frames:
            raise ValueError(f"event {k}: no frames")
        b = a.get("box")
        if b is None:
            raise ValueError(f"event {k}: no box")
        b = b[0] if isinstance(b, list) and b and isinstance(b[0], list) else b
        box = tuple(xywh_to_box(b))
        media = tuple(_path(root, rec.get("image_root"), f) for f in frames)
        eid = f"{rid}#{k}" if len(anns) > 1 else rid
        events.append(Event(eid, media, box, _text(a.get("gt"), f"event {k}: gt")))
    media = tuple(f for e in events for f in e.frames)
    return [Item(rid, "stream", task, media, {"box": list(events[0].box)}, events=tuple(events),
                 where=where)]  # fmt: skip


_PER_RECORD = {"pam": _pam, "osprey": _osprey, "video": _video, "stream": _stream}


def _reason(e: Exception) -> str:
    if isinstance(e, KeyError):
        return f"missing key {e.args[0]!r}"
    return str(e)


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
