"""`pam-jax segment`: segment one image with SAM 2 from points, a box and / or a mask.

    pam-jax segment --model DIR --image IMG [--point X,Y[,LABEL]]... [--box X1,Y1,X2,Y2]
                    [--mask-input MASK] [--multimask] --out PREFIX [--save-logits]

Writes (PREFIX "out/cat" -> out/cat.*; a PREFIX ending in "/" is a folder: "out/" -> out/<image
name>.*):
- PREFIX.png: the image with the best mask (highest predicted IoU) overlaid, and the prompt;
- PREFIX_mask<i>.png: each mask as a black / white PNG at the image's size (i = the model's
  output order; one mask, or three candidates with --multimask);
- with --multimask, PREFIX_candidate<i>.png: one overlay per candidate, labelled with its score;
- PREFIX.json: the prompt, each mask's score (predicted IoU), area, bbox [x, y, w, h] and COCO
  RLE `segmentation`, the object score, and the files written (names relative to the JSON);
- with --save-logits, PREFIX_logits.npy: the low-resolution mask logits [M, 4h, 4w] float32 (M x
  256 x 256 at the default size), the third value of the official
  `SAM2ImagePredictor.predict(..., return_logits=True)` for the same image and prompt.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pam_jax.cliutil import (
    CLIError,
    add_click_arguments,
    add_dtype_argument,
    clicks_region,
    mask_bbox,
    mask_rle,
    output_prefix,
    parse_box,
    parse_point,
    read_image,
    read_mask,
    resolve_dtype,
    status,
    write_json,
    write_mask_png,
)

__all__ = ["add_parser", "load_mask_input", "parse_box", "parse_point", "run", "segment"]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "segment",
        help="segment an image with SAM 2 (points, box, mask)",
        description="Segment one image with a converted SAM 2 model. Coordinates are pixels of "
        "the image as a viewer shows it (EXIF orientation applied); points or box corners "
        "within 1 pixel outside the edge are moved onto it.",
    )
    p.add_argument(
        "--model", required=True, metavar="DIR", help="model directory (pam-jax convert sam2)"
    )
    p.add_argument("--image", required=True, metavar="IMG", help="input image (any PIL format)")
    add_click_arguments(p, box_help="a box prompt (corners; one per run)")
    p.add_argument(
        "--mask-input", metavar="MASK",
        help="mask prompt: a picture of the same size as --image (non-zero = object), or a .npy "
        "of low-resolution logits (e.g. an earlier PREFIX_logits.npy; its first mask is used)",
    )  # fmt: skip
    p.add_argument(
        "--multimask", action="store_true",
        help="return 3 candidate masks (one picture each, with its score)",
    )  # fmt: skip
    p.add_argument(
        "--out", required=True, metavar="PREFIX",
        help="output prefix: PREFIX.png, PREFIX.json, PREFIX_mask<i>.png (a trailing / = folder)",
    )  # fmt: skip
    p.add_argument("--save-logits", action="store_true", help="also write PREFIX_logits.npy")
    add_dtype_argument(p)
    return p


def load_mask_input(path: str | Path, orig_hw: tuple[int, int], low_res: int) -> np.ndarray:
    """A mask prompt as low-res logits [1, low_res, low_res] (see --mask-input)."""
    p = Path(path)
    if p.suffix.lower() != ".npy":
        import jax.numpy as jnp

        from pam_jax.sam2.ops import resize_bilinear

        mask = read_mask(p, orig_hw, "--mask-input")
        # As the official _use_mask_as_output: 0/1 -> -10/+10 logits, antialiased bilinear down.
        logits = jnp.asarray(mask, jnp.float32)[None] * 20.0 - 10.0
        return np.asarray(resize_bilinear(logits, (low_res, low_res), True, axes=(-2, -1)))
    if p.is_dir() or not p.exists():
        raise CLIError(f"--mask-input {p}: {'a folder' if p.is_dir() else 'no such file'}")
    try:
        m = np.asarray(np.load(p, allow_pickle=False), np.float32)
    except (ValueError, OSError) as e:
        raise CLIError(f"--mask-input {p} is not a readable .npy file: {e}") from None
    while m.ndim > 2 and m.shape[0] >= 1:
        m = m[0]  # the first mask of an [M, h, w] (or [1, M, h, w]) logits file
    if m.shape != (low_res, low_res):
        raise CLIError(
            f"--mask-input {p} has shape {m.shape}; expected {low_res}x{low_res} low-res logits"
        )
    return m[None]


def _prompt(args: argparse.Namespace, hw: tuple[int, int]):
    """(clicks [P, 2], labels [P], box [4] | None), checked and clipped by the prompt module."""
    from pam_jax.sam2.prompts import prompt_from_region

    if len(args.box) > 1:
        raise CLIError(
            f"--box given {len(args.box)} times; segment takes one box (use pam-jax predict "
            "--regions, or one segment run per box)"
        )
    if not args.point and not args.box and args.mask_input is None:
        raise CLIError("empty prompt: give at least one --point, --box or --mask-input")
    region = {}
    if args.point:
        region.update(clicks_region(args.point))
    if args.box:
        region["box"] = list(args.box[0])
    if not region:
        return np.zeros((0, 2), np.float32), np.zeros((0,), np.int32), None
    pr = prompt_from_region(region, image_hw=hw)
    k = 2 if args.box else 0  # the box's two corners come first
    box = pr.points[:2].reshape(4) if args.box else None
    return pr.points[k:], pr.labels[k:], box


def segment(args: argparse.Namespace) -> dict:
    from pam_jax.sam2.image_predictor import SAM2ImagePredictor
    from pam_jax.sam2.loading import load_sam2
    from pam_jax.viz import overlay_masks

    # everything about the input and the outputs is checked before the (slow) model load
    image = read_image(args.image)
    h, w = image.shape[:2]
    pts, labels, box = _prompt(args, (h, w))
    suffixes = [".png", ".json", "_mask0.png"] + (["_logits.npy"] if args.save_logits else [])
    prefix = output_prefix(args.out, default_stem=Path(args.image).stem, suffixes=suffixes)
    dtype = resolve_dtype(args.dtype)
    status(f"loading {args.model}")
    model, cfg = load_sam2(args.model, dtype=dtype)
    mask_in = None
    if args.mask_input is not None:
        mask_in = load_mask_input(args.mask_input, (h, w), cfg.low_res_size)

    status("segmenting")
    predictor = SAM2ImagePredictor(model)
    predictor.set_image(image)
    pred = predictor.predict_batch(
        [pts] if len(pts) else None,
        [labels] if len(pts) else None,
        box[None] if box is not None else None,
        [mask_in] if mask_in is not None else None,
        multimask_output=args.multimask,
        return_logits=False,
    )
    masks, ious, low = pred.masks[0] > 0, pred.iou_predictions[0], pred.low_res_logits[0]
    best = int(np.argmax(ious))

    prompt_marks = dict(
        boxes=None if box is None else box[None],
        points=pts if len(pts) else None,
        point_labels=labels if len(pts) else None,
    )
    anchor = [(box[0], box[1]) if box is not None else (tuple(pts[0]) if len(pts) else None)]
    files = {"overlay": prefix.path(".png")}
    overlay_masks(
        image, masks[best : best + 1], labels=[f"mask {best}: score {ious[best]:.2f}"],
        anchors=anchor, alpha=0.45, **prompt_marks,
    ).save(files["overlay"])  # fmt: skip
    mask_entries = []
    for i in range(len(ious)):
        entry = {
            "index": i,
            "score": float(ious[i]),
            "area": int(masks[i].sum()),
            "bbox": mask_bbox(masks[i]),
            "segmentation": mask_rle(masks[i]),
            "file": prefix.rel(write_mask_png(masks[i], prefix.path(f"_mask{i}.png"))),
        }
        if args.multimask:
            cand = prefix.path(f"_candidate{i}.png")
            overlay_masks(
                image, masks[i : i + 1], labels=[f"mask {i}: score {ious[i]:.2f}"],
                anchors=anchor, alpha=0.45, **prompt_marks,
            ).save(cand)  # fmt: skip
            entry["overlay"] = prefix.rel(cand)
        mask_entries.append(entry)
    result = {
        "image": str(args.image),
        "width": w,
        "height": h,
        "model": str(args.model),
        "model_name": cfg.name,
        "model_input_size": int(cfg.image_size),
        "prompt": {
            "points": pts.tolist(),
            "labels": labels.tolist(),
            "box": None if box is None else box.tolist(),
            "mask_input": None if args.mask_input is None else str(args.mask_input),
        },
        "multimask": bool(args.multimask),
        "object_score_logit": float(pred.object_score_logits[0]),
        "object_present": bool(pred.object_score_logits[0] > 0),
        "best_mask": best,
        "masks": mask_entries,
        "files": {"overlay": prefix.rel(files["overlay"])},
    }
    if args.save_logits:
        npy = prefix.path("_logits.npy")
        np.save(npy, np.asarray(low, np.float32))
        result["files"]["logits"] = prefix.rel(npy)
    result["files"]["json"] = prefix.rel(prefix.path(".json"))
    write_json(prefix.path(".json"), result)
    result["written"] = [
        str(prefix.path(".png")),
        *(str(prefix.folder / m["file"]) for m in mask_entries),
        *(str(prefix.folder / m["overlay"]) for m in mask_entries if "overlay" in m),
        *([str(prefix.path("_logits.npy"))] if args.save_logits else []),
        str(prefix.path(".json")),
    ]
    return result


def run(args: argparse.Namespace) -> int:
    result = segment(args)
    best = result["masks"][result["best_mask"]]
    print(
        f"{len(result['masks'])} mask(s); best score {best['score']:.3f}, {best['area']} px; "
        f"object score {result['object_score_logit']:.2f}"
    )
    print("wrote " + ", ".join(result["written"]))
    return 0
