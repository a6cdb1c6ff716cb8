"""The per-record benchmark formats (`--format pam|osprey|video|stream`): one JSON record ->
its item(s), a malformed record a ValueError / KeyError / TypeError that `formats.load` turns
into a `Problem`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pam_jax.data.records import Record
from pam_jax.evaluation.items import (
    TASKS,
    Event,
    Item,
    _default_id,
    _path,
    _refs,
    _text,
    xywh_to_box,
)
from pam_jax.pam import prompts as task_prompts


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
