"""report.md / report.json: our numbers beside the paper's (pam.md section 3) where the
benchmark matches, the GPT-judged benchmarks that cannot run offline, and a PNG page of example
overlays (image, predicted mask, prediction, reference)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# benchmark -> {metric key: (PAM-1.5B, PAM-3B)}, the paper's tables (x100 where fractions)
PAPER: dict[str, dict[str, tuple[float, float]]] = {
    "LVIS": {"semantic_similarity": (87.4, 88.6), "semantic_iou": (76.5, 78.3)},
    "PACO": {"semantic_similarity": (85.1, 87.4), "semantic_iou": (73.5, 74.9)},
    "COCO-Text": {"exact_match": (39.4, 42.2)},
    "Total-Text": {"exact_match": (48.6, 52.3)},
    "VG": {"METEOR": (19.2, 20.8), "CIDEr": (132.9, 142.3)},
    "RefCOCOg": {"METEOR": (24.7, 26.9), "CIDEr": (135.0, 143.1)},
    "Ref-L4": {"ROUGE-L": (26.6, 31.3), "METEOR": (14.9, 17.2), "CIDEr": (49.8, 59.7)},
    "Elysium": {"METEOR": (20.7, 24.3)},
    "BensMOT": {"METEOR": (19.1, 21.6)},
    "HC-STVG": {"METEOR": (18.8, 23.3), "CIDEr": (58.9, 70.3)},
    "ActivityNet-stream": {"CIDEr": (27.3, 30.1), "METEOR": (22.6, 27.3)},
}
GPT_JUDGED = (
    "VideoRefer-Bench-D (GPT-4o scores SC / AD / TD / HD)",
    "ActivityNet streaming G-STDC (GPT-4o continuity score)",
    "Ferret-Bench referring description (GPT-4 judged)",
    "MDVP-Bench (GPT-4V judged)",
)
# file-name hints -> benchmark (lower-case substrings), checked in order
_HINTS = (
    ("lvis", "LVIS"), ("paco", "PACO"), ("cocotext", "COCO-Text"), ("coco-text", "COCO-Text"),
    ("coco_text", "COCO-Text"), ("totaltext", "Total-Text"), ("total-text", "Total-Text"),
    ("total_text", "Total-Text"), ("refl4", "Ref-L4"), ("ref-l4", "Ref-L4"), ("ref_l4", "Ref-L4"),
    ("refcocog", "RefCOCOg"), ("elysium", "Elysium"), ("bensmot", "BensMOT"),
    ("hcstvg", "HC-STVG"), ("hc-stvg", "HC-STVG"), ("hc_stvg", "HC-STVG"),
)  # fmt: skip
SCALED = {"mIoU", "cIoU", "J", "F", "J&F"}  # fractions shown x100 besides the text metrics
METRIC_KEYS = {
    "semantic_similarity", "semantic_iou", "exact_match", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4",
    "METEOR", "ROUGE-L", "CIDEr", *SCALED,
}  # fmt: skip


def guess_benchmark(data: str, fmt: str, benchmark: str | None = None) -> str | None:
    """The paper benchmark these results compare with: `benchmark` if given, else from the
    format (vg, refcocog, stream) or hints in the file name (lvis, paco, hcstvg, ...)."""
    if benchmark:
        if benchmark not in PAPER:
            raise ValueError(f"unknown benchmark {benchmark!r}; known: {', '.join(PAPER)}")
        return benchmark
    name = Path(data).name.lower()
    for hint, b in _HINTS:
        if hint in name:
            return b
    return {"vg": "VG", "refcocog": "RefCOCOg", "stream": "ActivityNet-stream"}.get(fmt)


def _shown(key: str, value: float) -> float:
    """Every metric is a fraction (CIDEr a ratio): the papers print them x100."""
    return 100.0 * value


def build_report(
    metrics_: Mapping[str, Any], *, benchmark: str | None, settings: Mapping[str, Any]
) -> dict[str, Any]:
    rows = []
    paper = PAPER.get(benchmark or "", {})
    for k, v in metrics_.items():
        if not isinstance(v, float | int) or isinstance(v, bool) or k in settings:
            continue
        if k.split("/")[-1] not in METRIC_KEYS:
            continue
        row = {"metric": k, "ours": round(_shown(k, float(v)), 2)}
        if k in paper:
            row["paper_pam_1.5b"], row["paper_pam_3b"] = paper[k]
        rows.append(row)
    return {
        "benchmark": benchmark,
        "rows": rows,
        "n_items": metrics_.get("n_items"),
        "n_skipped": metrics_.get("n_skipped"),
        "settings": dict(settings),
        "not_run_offline": list(GPT_JUDGED),
        "notes": [
            "Caption metrics: pycocoevalcap with its PTB tokenizer (streaming: raw strings, as "
            "the release's eval/eval.py); Chinese is scored split into characters.",
            "SPICE is not computed: it downloads Stanford CoreNLP 3.6.0 on first use.",
            "Values are x100 (CIDEr too), as the papers print them.",
        ],
    }


def write_report(out_dir: str | Path, report: Mapping[str, Any], overlays: str | None) -> None:
    out = Path(out_dir)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    lines = [f"# Evaluation report: {report.get('benchmark') or 'custom data'}", ""]
    lines.append(f"items scored: {report['n_items']}, skipped: {report['n_skipped']}")
    lines += ["", "| metric | ours | paper PAM-1.5B | paper PAM-3B |", "|---|---|---|---|"]
    for r in report["rows"]:
        a = r.get("paper_pam_1.5b", "–")
        b = r.get("paper_pam_3b", "–")
        lines.append(f"| {r['metric']} | {r['ours']:.2f} | {a} | {b} |")
    lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in report["settings"].items())]
    lines += ["", "Not runnable offline (GPT-judged): " + "; ".join(report["not_run_offline"])]
    lines += ["", *[f"- {n}" for n in report["notes"]]]
    if overlays:
        lines += ["", f"![examples]({overlays})"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def overlay_page(
    examples: Sequence[tuple[np.ndarray, np.ndarray | None, str, str]],
    path: str | Path,
    *,
    tile: int = 320,
    cols: int = 4,
) -> Path:
    """A PNG grid: each tile the image with the predicted mask, prediction and reference below."""
    from PIL import Image, ImageDraw, ImageFont

    from pam_jax.viz import overlay_masks

    n = max(1, len(examples))
    rows = (n + cols - 1) // cols
    text_h = 64
    page = Image.new("RGB", (cols * tile, rows * (tile + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=11)
    for k, (img, mask, pred, ref) in enumerate(examples):
        shown = overlay_masks(img, [mask] if mask is not None else [])
        shown.thumbnail((tile, tile))
        x, y = (k % cols) * tile, (k // cols) * (tile + text_h)
        page.paste(shown, (x, y))
        draw.text((x + 4, y + tile + 2), ("pred: " + pred)[:60], fill=(0, 0, 160), font=font)
        draw.text((x + 4, y + tile + 22), ("ref:  " + ref)[:60], fill=(0, 110, 0), font=font)
    p = Path(path)
    page.save(p)
    return p
