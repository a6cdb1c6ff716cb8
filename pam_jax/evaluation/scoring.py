"""Predictions + items -> the flat metrics of a task (`metrics.json`'s keys)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pam_jax.evaluation import metrics
from pam_jax.evaluation.formats import Item, decode_mask

# task -> the metric keys it reports
TASK_METRICS = {
    "recognize": ("semantic_similarity", "semantic_iou", "exact_match"),
    "explain": metrics.CAPTION_KEYS,
    "caption": metrics.CAPTION_KEYS,
    "detailed-caption": metrics.CAPTION_KEYS,
    "video-caption": metrics.CAPTION_KEYS,
    "stream-caption": ("METEOR", "CIDEr"),
    "segment": ("mIoU", "cIoU"),
}


def _pred_mask(line: Mapping[str, Any], hw: tuple[int, int]) -> np.ndarray | None:
    rle = line.get("mask_rle")
    return None if rle is None else decode_mask(rle, hw)


def score(
    items: Sequence[Item], preds: Mapping[str, Mapping[str, Any]], *, lang: str = "en"
) -> tuple[dict[str, float], list[str]]:
    """(metrics, ids that could not be scored). Items whose predictions are missing or lack the
    field the task needs are left out (their ids returned); the caller reports them."""
    unscored: list[str] = []
    if not items:
        return {}, unscored
    task = items[0].task
    if any(it.task != task for it in items):
        # a PAM JSONL can mix tasks: score each and prefix the keys with the task
        out: dict[str, float] = {}
        for t in dict.fromkeys(it.task for it in items):
            sub = [it for it in items if it.task == t]
            m, u = score(sub, preds, lang=lang)
            out.update({f"{t}/{k}": v for k, v in m.items()})
            unscored += u
        return out, unscored
    if task == "stream-caption":
        p, r = {}, {}
        for it in items:
            for ev in it.events:
                line = preds.get(ev.id)
                if line is None or not isinstance(line.get("pred"), str):
                    unscored.append(ev.id)
                    continue
                p[ev.id], r[ev.id] = line["pred"], ev.ref
        return metrics.stream_scores(p, r), unscored
    ok = []
    for it in items:
        line = preds.get(it.id)
        need = "mask_rle" if task == "segment" else "pred"
        if line is None or line.get(need) is None:
            unscored.append(it.id)
        else:
            ok.append((it, line))
    if task == "segment":
        inter, union = [], []
        for it, line in ok:
            # PAM records carry no image size: the prediction is at the image's resolution
            hw = it.hw or tuple(int(v) for v in line["mask_rle"]["size"])
            gt = decode_mask(it.gt_mask, hw)
            i, u = metrics.mask_iou(_pred_mask(line, gt.shape), gt)
            inter.append(i)
            union.append(u)
        return metrics.segmentation_scores(inter, union), unscored
    preds_t = [str(line["pred"]) for _, line in ok]
    if task == "recognize":
        out = metrics.recognition_scores(preds_t, [it.refs[0] for it, _ in ok])
        out["exact_match"] = metrics.exact_match(preds_t, [list(it.refs) for it, _ in ok])
        return out, unscored
    p = {it.id: s for (it, _), s in zip(ok, preds_t)}
    r = {it.id: list(it.refs) for it, _ in ok}
    out = metrics.caption_scores(p, r, lang=lang)
    video = [(it, line) for it, line in ok if it.kind == "video" and it.gt_mask is not None]
    if video:
        js, fs = [], []
        for it, line in video:
            rles = line.get("masks_rle") or []
            if len(rles) != len(it.gt_mask):
                unscored.append(it.id)
                continue
            gt = np.stack([decode_mask(s, tuple(rles[0]["size"])) for s in it.gt_mask])
            pr = np.stack([decode_mask(s, tuple(s["size"])) for s in rles])
            j, f = metrics.davis_sequence(pr, gt)
            js.append(j)
            fs.append(f)
        out.update(metrics.video_scores(js, fs))
    return out, unscored
