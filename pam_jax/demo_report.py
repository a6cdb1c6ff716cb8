"""The demo's report: held-out scores from a predictions file (`score`), the prediction sheet
(`prediction_sheet`: predictions.png) and the printed summary table (`summary_table`).

Used by `pam_jax.demo` (the `pam-jax demo` stages); the scoring reads the held-out JSONL that
`pam_jax.demo_data` writes and the predictions.jsonl of `pam-jax eval`'s runner.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

# ---- scores ---------------------------------------------------------------------------------


def score(pred_file: Path, data: dict[str, Path], *, cider: bool = True) -> dict[str, Any]:
    """mIoU / cIoU (every held-out region once, against its `segmentation`), exact_match
    (English recognize + brief caption) and CIDEr (detailed captions; where Java and
    pycocoevalcap are present), with `pam_jax.evaluation.metrics`."""
    from pam_jax.evaluation import formats, metrics
    from pam_jax.evaluation.runner import read_predictions

    preds = read_predictions(pred_file)
    recs = [json.loads(x) for x in data["heldout"].read_text().splitlines() if x.strip()]
    inter, union, seen = [], [], set()
    for r in recs:  # each region appears once per task: score its mask once
        region = r["id"].split(":")[0]
        line = preds.get(r["id"])
        if region in seen or line is None or line.get("mask_rle") is None:
            continue
        seen.add(region)
        gt = formats.decode_mask(r["segmentation"], tuple(r["segmentation"]["size"]))
        i, u = metrics.mask_iou(formats.decode_mask(line["mask_rle"], gt.shape), gt)
        inter.append(i)
        union.append(u)
    out: dict[str, Any] = {**metrics.segmentation_scores(inter, union), "n_regions": len(seen)}
    root = str(data["heldout"].parent)
    text = formats.load(str(data["heldout"]), "pam", image_root=root).items
    em = [it for it in text if it.task in ("recognize", "caption") and it.id in preds]

    def exact(items) -> float:
        return metrics.exact_match(
            [str(preds[it.id]["pred"]) for it in items], [list(it.refs) for it in items]
        )

    out["exact_match"] = exact(em)
    for task in ("recognize", "caption"):
        out[f"exact_match/{task}"] = exact([it for it in em if it.task == task])
    out["n_exact_match"] = len(em)
    det = [it for it in text if it.task == "detailed-caption" and it.id in preds]
    if cider and det and shutil.which("java"):
        try:
            caps = metrics.caption_scores(
                {it.id: str(preds[it.id]["pred"]) for it in det},
                {it.id: list(it.refs) for it in det},
                lang="en",
                metrics=("CIDEr",),
            )
            out["CIDEr"] = caps["CIDEr"]
        except ImportError as e:  # pycocoevalcap is a test extra
            out["CIDEr"] = None
            out["CIDEr_note"] = f"not computed: {e}"
    return out


# ---- pictures -------------------------------------------------------------------------------


def prediction_sheet(
    data: dict[str, Path], preds: dict[str, Path], out_png: Path, n: int = 6
) -> Path:
    """predictions.png: n held-out regions, one row each: for every model the mask overlay
    and its answers to the three English tasks, with the references."""
    from PIL import Image, ImageDraw

    from pam_jax.demo_data import rle_decode
    from pam_jax.evaluation.runner import read_predictions
    from pam_jax.viz import font, overlay_masks

    recs = [json.loads(x) for x in data["heldout"].read_text().splitlines()]
    lines = {name: read_predictions(p) for name, p in preds.items()}
    regions: dict[str, dict[str, dict]] = {}
    for r in recs:
        region, task, _ = r["id"].split(":")
        regions.setdefault(region, {})[task] = r
    keys = list(regions)[:n]
    scale, text_w = 2, 300
    tile = 128 * scale
    col_w = tile + text_w
    row_h = tile + 8
    f, fb = font(13), font(15)
    sheet = Image.new("RGB", (col_w * len(lines), 30 + row_h * len(keys)), "white")
    d = ImageDraw.Draw(sheet)
    for c, name in enumerate(lines):
        d.text((c * col_w + 8, 6), f"{name} model", fill="black", font=fb)
    for row, key in enumerate(keys):
        tasks = regions[key]
        first = next(iter(tasks.values()))
        img = np.asarray(Image.open(data["heldout"].parent / first["image"]).convert("RGB"))
        gt = rle_decode(first["segmentation"])
        x, y, w, h = first["bbox"]
        for c, pl in enumerate(lines.values()):
            line = pl.get(first["id"], {})
            rle = line.get("mask_rle")
            mask = rle_decode(rle) if rle else np.zeros_like(gt)
            inter, union = (mask & gt).sum(), (mask | gt).sum()
            ov = overlay_masks(img, mask[None], boxes=[[x, y, x + w, y + h]])
            ov = ov.resize((tile, tile), Image.NEAREST)
            x0, y0 = c * col_w, 30 + row * row_h
            sheet.paste(ov, (x0, y0))
            ty = y0 + 4
            d.text((x0 + tile + 8, ty), f"IoU {inter / max(union, 1):.2f}", fill="black", font=f)
            ty += 20
            for task, rec in tasks.items():
                got = str(pl.get(rec["id"], {}).get("pred", ""))
                ref = rec["conversations"][-1]["value"]
                ok = got.strip().lower().rstrip(".") == ref.strip().lower().rstrip(".")
                for label, txt, col in (
                    (task, got or "(nothing)", (0, 120, 0) if ok else (180, 0, 0)),
                    ("ref", ref, (90, 90, 90)),
                ):
                    for chunk in _wrap(f"{label}: {txt}", 42)[:3]:
                        d.text((x0 + tile + 8, ty), chunk, fill=col, font=f)
                        ty += 16
                ty += 4
    sheet.save(out_png)
    return out_png


def _wrap(text: str, width: int) -> list[str]:
    words, out, cur = text.split(), [], ""
    for wd in words:
        if cur and len(cur) + 1 + len(wd) > width:
            out.append(cur)
            cur = wd
        else:
            cur = f"{cur} {wd}" if cur else wd
    return out + ([cur] if cur else [])


# ---- the summary ----------------------------------------------------------------------------


def summary_table(result: dict[str, Any]) -> str:
    m = result["metrics"]
    keys = ["mIoU", "exact_match", "exact_match/recognize", "exact_match/caption"]
    if any(m[k].get("CIDEr") is not None for k in m):
        keys.append("CIDEr")
    rows = [f"{'metric':<24}{'untrained':>12}{'trained':>12}"]
    for k in keys:
        vals = [m[n].get(k) for n in ("untrained", "trained")]
        rows.append(
            f"{k:<24}" + "".join(f"{v:>12.3f}" if v is not None else f"{'-':>12}" for v in vals)
        )
    return "\n".join(rows)
