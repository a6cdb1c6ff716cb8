"""`pam-jax segment`: segment one image with SAM 2 from points, a box and / or a mask.

    pam-jax segment --model DIR --image IMG [--point X,Y[,LABEL]]... [--box X1,Y1,X2,Y2]
                    [--mask-input MASK] [--multimask] --out PREFIX [--save-logits]

Writes PREFIX.png (the image with the masks overlaid), PREFIX.json (IoU predictions, object
score, mask sizes) and, with --save-logits, PREFIX_logits.npy: the low-resolution mask logits
[M, 4h, 4w] float32 (M x 256 x 256 at the default size), the third value of the official
`SAM2ImagePredictor.predict(..., return_logits=True)` for the same image and prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pam_jax.checkpoint import CheckpointError


def _floats(text: str, n: tuple[int, ...], what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) not in n or not all(np.isfinite(vals)):
        raise argparse.ArgumentTypeError(f"{what} must be {_forms[what]}, got {text!r}")
    return vals


_forms = {"point": "X,Y or X,Y,LABEL (LABEL 1 or 0)", "box": "X1,Y1,X2,Y2"}


def parse_point(text: str) -> tuple[float, float, int]:
    """ "X,Y" or "X,Y,LABEL" -> (x, y, label); LABEL is 1 (positive, default) or 0 (negative)."""
    v = _floats(text, (2, 3), "point")
    label = 1 if len(v) == 2 else v[2]
    if label not in (0, 1):
        raise argparse.ArgumentTypeError(
            f"point label must be 1 (positive) or 0 (negative): {text!r}"
        )
    return v[0], v[1], int(label)


def parse_box(text: str) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = _floats(text, (4,), "box")
    return x1, y1, x2, y2


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "segment",
        help="segment an image with SAM 2 (points, box, mask)",
        description="Segment one image with a converted SAM 2 model. Coordinates are pixels of "
        "the original image.",
    )
    p.add_argument(
        "--model", required=True, metavar="DIR", help="model directory (pam-jax convert sam2)"
    )
    p.add_argument("--image", required=True, metavar="IMG", help="input image (any PIL format)")
    p.add_argument(
        "--point", type=parse_point, action="append", default=[], metavar="X,Y[,LABEL]",
        help="a click; LABEL 1 = positive (default), 0 = negative. Repeatable.",
    )  # fmt: skip
    p.add_argument("--box", type=parse_box, metavar="X1,Y1,X2,Y2", help="a box prompt")
    p.add_argument(
        "--mask-input", metavar="MASK",
        help="mask prompt: a .npy of low-res logits (e.g. an earlier PREFIX_logits.npy; its "
        "first mask is used) or an image (non-zero = object) at any size, turned into +-10 logits",
    )  # fmt: skip
    p.add_argument("--multimask", action="store_true", help="return 3 candidate masks")
    p.add_argument(
        "--out", required=True, metavar="PREFIX", help="output prefix (PREFIX.png, .json)"
    )
    p.add_argument("--save-logits", action="store_true", help="also write PREFIX_logits.npy")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32",
        help="compute dtype (bfloat16 on accelerators)",
    )  # fmt: skip
    return p


def load_image(path: str | Path) -> np.ndarray:
    """RGB uint8 [H, W, 3]; ValueError with the reason when the file is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"image {p}: no such file")
    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"image {p} is not a readable image: {e}") from None


def load_mask_input(path: str | Path, orig_hw: tuple[int, int], low_res: int) -> np.ndarray:
    """A mask prompt as low-res logits [1, low_res, low_res] (see --mask-input)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"mask input {p}: no such file")
    if p.suffix.lower() == ".npy":
        try:
            m = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ValueError(f"mask input {p} is not a readable .npy file: {e}") from None
        m = np.asarray(m, np.float32)
        while m.ndim > 2 and m.shape[0] >= 1:
            m = m[0]  # the first mask of an [M, h, w] (or [1, M, h, w]) logits file
        if m.shape != (low_res, low_res):
            raise ValueError(
                f"mask input {p} has shape {m.shape}; expected {low_res}x{low_res} low-res logits"
            )
        return m[None]
    import jax.numpy as jnp

    from pam_jax.sam2.ops import resize_bilinear

    mask = load_image(p).max(axis=-1) > 0
    if mask.shape != tuple(orig_hw):
        raise ValueError(f"mask input {p} is {mask.shape[1]}x{mask.shape[0]}, the image is "
                         f"{orig_hw[1]}x{orig_hw[0]}")  # fmt: skip
    # As the official _use_mask_as_output: 0/1 -> -10/+10 logits, antialiased bilinear down.
    logits = jnp.asarray(mask, jnp.float32)[None] * 20.0 - 10.0
    return np.asarray(resize_bilinear(logits, (low_res, low_res), True, axes=(-2, -1)))


def segment(args: argparse.Namespace) -> dict:
    import jax.numpy as jnp

    from pam_jax.sam2.image_predictor import SAM2ImagePredictor, check_box, check_points
    from pam_jax.sam2.loading import load_sam2
    from pam_jax.viz import overlay_masks

    if not args.point and args.box is None and args.mask_input is None:
        raise ValueError("empty prompt: give at least one --point, --box or --mask-input")
    image = load_image(args.image)
    h, w = image.shape[:2]
    pts = np.array([p[:2] for p in args.point], np.float32).reshape(-1, 2)
    labels = np.array([p[2] for p in args.point], np.int32)
    box = np.array(args.box, np.float32) if args.box is not None else None
    # check the prompts against the image before the (slow) model load
    if box is not None:
        check_box(box, (h, w), True, 0)
    if len(pts):
        check_points(pts, (h, w), True, 0)
    mask_in = None
    model, cfg = load_sam2(args.model, dtype=jnp.dtype(args.dtype))
    if args.mask_input is not None:
        mask_in = load_mask_input(args.mask_input, (h, w), cfg.low_res_size)

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
    masks, ious, low = pred.masks[0], pred.iou_predictions[0], pred.low_res_logits[0]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png, js = out.with_name(out.name + ".png"), out.with_name(out.name + ".json")
    order = np.argsort(-ious) if len(ious) > 1 else np.arange(len(ious))
    labels_txt = [f"mask {i} iou {ious[i]:.2f}" for i in order]
    overlay_masks(
        image, masks[order], labels=labels_txt, boxes=None if box is None else box[None],
        points=pts if len(pts) else None, point_labels=labels if len(pts) else None,
        alpha=0.45 if len(order) == 1 else 0.35,
    ).save(png)  # fmt: skip
    result = {
        "image": str(args.image),
        "image_size": [w, h],
        "model": str(args.model),
        "model_name": cfg.name,
        "prompt": {
            "points": [[float(x), float(y), int(lab)] for (x, y), lab in zip(pts, labels)],
            "box": None if box is None else [float(v) for v in box],
            "mask_input": None if args.mask_input is None else str(args.mask_input),
        },
        "multimask": bool(args.multimask),
        "object_score_logit": float(pred.object_score_logits[0]),
        "object_present": bool(pred.object_score_logits[0] > 0),
        "masks": [
            {"index": int(i), "iou_prediction": float(ious[i]), "area_pixels": int(masks[i].sum())}
            for i in range(len(ious))
        ],
        "outputs": {"overlay": str(png)},
    }
    if args.save_logits:
        npy = out.with_name(out.name + "_logits.npy")
        np.save(npy, np.asarray(low, np.float32))
        result["outputs"]["logits"] = str(npy)
    js.write_text(json.dumps(result, indent=2))
    return result


def run(args: argparse.Namespace) -> int:
    try:
        result = segment(args)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    best = max(result["masks"], key=lambda m: m["iou_prediction"])
    print(
        f"{len(result['masks'])} mask(s); best iou {best['iou_prediction']:.3f}, "
        f"{best['area_pixels']} px; object score {result['object_score_logit']:.2f}; "
        f"wrote {', '.join(result['outputs'].values())}"
    )
    return 0
