"""`pam-jax perceive`: segment everything in an image (SAM 2's automatic mask generator) and, with
a PAM model, name or caption every region in one batched generation.

    pam-jax perceive --model DIR --image IMG [--task recognize|explain|caption|detailed-caption]
                     [--lang en|zh] [--points-per-side N] [--pred-iou-thresh X]
                     [--stability-score-thresh X] [--points-per-batch N] [--box-nms-thresh X]
                     [--crop-n-layers N] [--min-mask-region-area A] [--use-m2m]
                     [--max-regions N] --out PREFIX

With a PAM model directory, every kept mask is a mask prompt to PAM's own (release) image path
(`PAMPredictor.describe_image` with {"mask": ...} regions, all regions in one batch); with a SAM 2
model directory, masks only. Writes PREFIX.png (the masks overlaid, each region's label),
PREFIX_mask<i>.png per region and PREFIX.json: regions ordered by area (largest first), each
with its COCO RLE `segmentation`, `bbox` [x, y, w, h], `box` [x1, y1, x2, y2], `area`,
`predicted_iou`, `stability_score`, `point_coords`, `crop_box`, `text` (null without PAM) and
`file`. A grid that leaves no mask is an empty result, said on stderr, exit code 0.

Python API: `perceive(image, generator, predictor=None, task=..., lang=...)` -> `Perception`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from pam_jax.cliutil import (
    CLIError,
    add_dtype_argument,
    add_sampling_arguments,
    mask_rle,
    output_prefix,
    read_image,
    resolve_dtype,
    sampling_from_args,
    status,
    step_progress,
    write_json,
    write_mask_png,
)
from pam_jax.pam.prompts import CLI_IMAGE_TASKS as IMAGE_TASKS
from pam_jax.pam.prompts import CLI_LANGS as LANGS
from pam_jax.pam.prompts import normalize_lang
from pam_jax.sam2.automatic_mask_generator import AMGConfig, MaskSet, SAM2AutomaticMaskGenerator


@dataclasses.dataclass
class Perception:
    """The regions of one image, ordered by area (largest first): the generator's `MaskSet`
    and one text per region (None without a PAM model)."""

    masks: MaskSet
    texts: list[str | None]
    token_ids: list[list[int] | None]


def perceive(
    image: np.ndarray,
    generator: SAM2AutomaticMaskGenerator,
    predictor: Any | None = None,
    *,
    task: str = "recognize",
    lang: str = "en",
    max_regions: int | None = None,
    rng: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> Perception:
    """Masks of everything in `image` (uint8 [H, W, 3]); with a `PAMPredictor`, each region
    described in ONE batched generation (mask prompts through the release image path).
    `max_regions` keeps the largest ones; `on_step(n)`: the decode loop's progress."""
    ms = generator.generate_masks(image)
    order = np.argsort(-ms.areas, kind="stable")
    if max_regions is not None:
        order = order[:max_regions]
    ms = ms.take(order)
    if predictor is None or len(ms) == 0:
        return Perception(ms, [None] * len(ms), [None] * len(ms))
    from pam_jax.pam.prompts import CLI_TASKS

    results = predictor.describe_image(
        image,
        [{"mask": m} for m in ms.masks],
        CLI_TASKS.get(task, task),
        lang,
        rng=rng,
        on_step=on_step,
    )
    return Perception(ms, [r.text for r in results], [r.token_ids for r in results])


# ---------------------------------------------------------------------------------------------
# command


def add_parser(sub) -> argparse.ArgumentParser:
    d = AMGConfig()
    p = sub.add_parser(
        "perceive",
        help="segment everything in an image and describe every region (PAM)",
        description="SAM 2's automatic mask generator over the whole image; with a PAM model "
        "directory every region is then recognized / captioned in one batch (a SAM 2 model "
        "directory gives the masks only). The generator's defaults are the official ones.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="PAM or SAM 2 model directory")
    p.add_argument("--image", required=True, metavar="IMG", help="input image")
    p.add_argument(
        "--task", default="recognize", choices=IMAGE_TASKS,
        help="with PAM: recognize (default), explain, caption, detailed-caption",
    )  # fmt: skip
    p.add_argument("--lang", default="en", choices=LANGS, help="en (default) or zh (ch accepted)")
    g = p.add_argument_group("mask generator (official SAM2AutomaticMaskGenerator parameters)")
    g.add_argument("--points-per-side", type=int, default=d.points_per_side, metavar="N")
    g.add_argument("--points-per-batch", type=int, default=d.points_per_batch, metavar="N")
    g.add_argument("--pred-iou-thresh", type=float, default=d.pred_iou_thresh, metavar="X")
    g.add_argument("--stability-score-thresh", type=float, default=d.stability_score_thresh,
                   metavar="X")  # fmt: skip
    g.add_argument("--stability-score-offset", type=float, default=d.stability_score_offset,
                   metavar="X")  # fmt: skip
    g.add_argument("--box-nms-thresh", type=float, default=d.box_nms_thresh, metavar="X")
    g.add_argument("--crop-n-layers", type=int, default=d.crop_n_layers, metavar="N")
    g.add_argument("--crop-nms-thresh", type=float, default=d.crop_nms_thresh, metavar="X")
    g.add_argument("--crop-n-points-downscale-factor", type=int,
                   default=d.crop_n_points_downscale_factor, metavar="N")  # fmt: skip
    g.add_argument("--min-mask-region-area", type=int, default=d.min_mask_region_area, metavar="A")
    g.add_argument("--use-m2m", action="store_true", help="one mask-to-mask refinement step")
    p.add_argument("--max-regions", type=int, default=None, metavar="N",
                   help="describe only the N largest regions")  # fmt: skip
    add_sampling_arguments(p, max_new_tokens=128)
    add_dtype_argument(p, what="SAM 2 and the perceiver")
    add_dtype_argument(p, "--llm-dtype", what="the LLM (weights too)")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.add_argument("--out", metavar="PREFIX", help="write PREFIX.json, PREFIX.png and masks")
    return p


def _amg_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh,
        stability_score_offset=args.stability_score_offset, box_nms_thresh=args.box_nms_thresh,
        crop_n_layers=args.crop_n_layers, crop_nms_thresh=args.crop_nms_thresh,
        crop_n_points_downscale_factor=args.crop_n_points_downscale_factor,
        min_mask_region_area=args.min_mask_region_area, use_m2m=args.use_m2m,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from pam_jax.checkpoint import read_model_config
    from pam_jax.pam.prompts import task_prompt

    args.lang = normalize_lang(args.lang)
    task_prompt(args.task, args.lang)
    kw = _amg_kwargs(args)
    AMGConfig(**{k: v for k, v in kw.items()}).validate()  # absurd parameters: before any load
    if args.max_regions is not None and args.max_regions < 1:
        raise CLIError(f"--max-regions must be >= 1, got {args.max_regions}")
    image = read_image(args.image)
    prefix = None
    if args.out:
        stem = Path(args.image).stem or "perceive"
        prefix = output_prefix(args.out, default_stem=stem, suffixes=(".json", ".png"))
    kind = read_model_config(args.model).get("kind")
    if kind not in ("pam", "sam2"):
        raise CLIError(f"{args.model} holds a {kind!r} model; perceive takes a PAM or SAM 2 model")

    status(f"loading {args.model}")
    dt = resolve_dtype(args.dtype)
    predictor = None
    if kind == "pam":
        from pam_jax.pam.model import load_pam
        from pam_jax.pam.predictor import PAMPredictor

        model, _, tok = load_pam(args.model, dtype=dt, llm_dtype=resolve_dtype(args.llm_dtype))
        if tok is None:
            raise CLIError(f"{args.model} has no tokenizer (llm/tokenizer.json)")
        predictor = PAMPredictor(
            model, tok, sampling=sampling_from_args(args, tok), max_new_tokens=args.max_new_tokens
        )
        sam2 = model.sam2
    else:
        from pam_jax.sam2.loading import load_sam2

        sam2, _ = load_sam2(args.model, dtype=dt)
    gen = SAM2AutomaticMaskGenerator(sam2, **kw)
    status("generating masks" + (" and describing every region" if predictor else ""))
    bar = step_progress(args.max_new_tokens, desc="decoding") if predictor else nullcontext()
    with bar as on_step:
        res = perceive(image, gen, predictor, task=args.task, lang=args.lang,
                       max_regions=args.max_regions, on_step=on_step)  # fmt: skip
    if len(res.masks) == 0:
        print("no mask passed the filters (lower --pred-iou-thresh / --stability-score-thresh "
              "or raise --points-per-side)", file=sys.stderr)  # fmt: skip
    written = write_outputs(args, prefix, image, res)
    if written:
        print("wrote " + ", ".join(written), file=sys.stderr)
    return 0


def region_rows(res: Perception) -> list[dict[str, Any]]:
    """The JSON rows (without segmentation / file), ordered by area."""
    ms = res.masks
    rows = []
    for i in range(len(ms)):
        x1, y1, x2, y2 = (float(v) for v in ms.boxes[i])
        cx1, cy1, cx2, cy2 = (float(v) for v in ms.crop_boxes[i])
        rows.append({
            "id": i, "text": res.texts[i], "area": int(ms.areas[i]),
            "bbox": [x1, y1, x2 - x1, y2 - y1], "box": [x1, y1, x2, y2],
            "predicted_iou": round(float(ms.predicted_iou[i]), 6),
            "stability_score": round(float(ms.stability_score[i]), 6),
            "point_coords": [[float(v) for v in ms.points[i]]],
            "crop_box": [cx1, cy1, cx2 - cx1, cy2 - cy1],
        })  # fmt: skip
        if res.token_ids[i] is not None:
            rows[-1]["token_ids"] = res.token_ids[i]
    return rows


def write_outputs(args, prefix, image: np.ndarray, res: Perception) -> list[str]:
    rows = region_rows(res)
    for row in rows:
        line = row if args.json else None
        if line is not None:
            print(json.dumps(line, ensure_ascii=False))
        elif row["text"] is not None:
            print(f"{row['id']}: {row['text']}")
    if prefix is None:
        return []
    files = []
    for i, row in enumerate(rows):
        m = res.masks.masks[i]
        row["segmentation"] = mask_rle(m)
        row["file"] = prefix.rel(write_mask_png(m, prefix.path(f"_mask{i}.png")))
        files.append(str(prefix.folder / row["file"]))
    from pam_jax.viz import overlay_masks

    labels = [row["text"] or str(row["id"]) for row in rows]
    overlay_masks(image, list(res.masks.masks), labels=labels).save(prefix.path(".png"))
    h, w = image.shape[:2]
    write_json(prefix.path(".json"), {
        "image": str(args.image), "width": w, "height": h, "model": str(args.model),
        "task": args.task if res.texts and res.texts[0] is not None else None,
        "lang": args.lang, "generator": _amg_kwargs(args), "num_regions": len(rows),
        "regions": rows, "files": {"overlay": prefix.rel(prefix.path(".png"))},
    })  # fmt: skip
    return [str(prefix.path(".png")), *files, str(prefix.path(".json"))]
