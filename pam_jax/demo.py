"""`pam-jax demo`: the whole PAM image path end to end, with no downloads.

Builds a SAM 2.1 tiny with RANDOM weights (or loads --model DIR), draws a synthetic image (or
reads --image), segments one region from a box and another from a point in one batched call,
and writes OUT/demo.png (overlay) and OUT/demo.json. Then (unless --no-pam, and only with random
weights) it wraps the same SAM 2 in a tiny random PAM (Semantic Perceiver, projectors, a 2-layer
Qwen2 over a byte-level ChatML tokenizer), captions both regions in one batched generation and
writes OUT/demo_pam.png with the text beside each region. With random weights the masks and the
text show that the pipeline runs (preprocessing, Hiera + FPN, prompt encoder, mask decoder,
perceiver, sequence assembly, jitted decoding), not what a trained model sees: convert real
checkpoints with `pam-jax convert sam2` / `pam-jax convert pam` for that.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pam_jax.sam2.config import SAM2Config
    from pam_jax.sam2.model import SAM2Base

RANDOM_WARNING = (
    "NOTE: the weights are RANDOM (untrained); the masks and captions demonstrate the pipeline, "
    "not segmentation or captioning quality. Use converted checkpoints for real results."
)


def random_sam2(
    size: str = "t", version: str = "2.1", image_size: int = 512, seed: int = 0
) -> tuple[SAM2Base, SAM2Config]:
    """A SAM2Base with random weights, filled on the host with numpy (fast on CPU).

    Kernels get LeCun-normal values (flax's default), biases 0, norm scales 1, learned tokens
    N(0, 1), other raw parameters N(0, 0.02) (the official trunc-normal scale).
    """
    from flax import nnx

    from pam_jax.checkpoint import assign_params, flat_params
    from pam_jax.sam2.config import sam2_config
    from pam_jax.sam2.model import SAM2Base

    cfg = sam2_config(size, version, image_size)
    model = nnx.eval_shape(lambda: SAM2Base(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    params = {}
    for key, v in flat_params(model).items():
        shape, leaf = tuple(v.shape), key.rsplit(".", 1)[-1]
        if leaf == "kernel":
            fan_in = int(np.prod(shape[:-1])) or 1
            x = rng.standard_normal(shape) / np.sqrt(fan_in)
        elif leaf == "bias":
            x = np.zeros(shape)
        elif leaf == "scale":
            x = np.ones(shape)
        elif leaf in ("embedding", "positional_encoding_gaussian_matrix"):
            x = rng.standard_normal(shape)
        else:
            x = 0.02 * rng.standard_normal(shape)
        params[key] = x.astype(np.float32)
    assign_params(model, params, what="random SAM 2")
    return model, cfg


def sample_image(h: int = 480, w: int = 640, seed: int = 0) -> tuple[np.ndarray, dict]:
    """A synthetic scene (sky, ground, sun, house, tree) and the shapes' boxes / centres."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, h)[:, None, None]
    sky = (1 - y) * np.array([110, 170, 235]) + y * np.array([200, 225, 250])
    img = np.broadcast_to(sky, (h, w, 3)).copy()
    ground = int(h * 0.7)
    img[ground:] = np.array([80, 150, 70])
    img += rng.normal(0, 4, img.shape)  # a little texture
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    house = (int(w * 0.45), int(h * 0.42), int(w * 0.72), int(ground + h * 0.05))
    d.rectangle(house, fill=(190, 60, 50))
    d.polygon([(house[0] - 15, house[1]), (house[2] + 15, house[1]),
               ((house[0] + house[2]) // 2, int(h * 0.25))], fill=(90, 50, 40))  # fmt: skip
    d.rectangle((int(w * 0.56), int(h * 0.58), int(w * 0.62), house[3]), fill=(70, 40, 25))
    sun_c, sun_r = (int(w * 0.15), int(h * 0.18)), int(min(h, w) * 0.08)
    d.ellipse((sun_c[0] - sun_r, sun_c[1] - sun_r, sun_c[0] + sun_r, sun_c[1] + sun_r),
              fill=(250, 210, 60))  # fmt: skip
    d.rectangle((int(w * 0.84), int(h * 0.5), int(w * 0.87), ground + 10), fill=(100, 70, 40))
    d.ellipse((int(w * 0.78), int(h * 0.3), int(w * 0.93), int(h * 0.56)), fill=(40, 110, 45))
    shapes = {"house_box": [float(v) for v in house], "sun_center": [float(c) for c in sun_c]}
    return np.asarray(im), shapes


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo",
        help="run the built-in demo (no downloads, random weights)",
        description="Segment a synthetic image with a randomly initialised SAM 2.1 tiny "
        "(no downloads) from a box and a point, writing OUT/demo.png and OUT/demo.json.",
    )
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output directory")
    p.add_argument(
        "--image-size", type=int, default=512, metavar="N",
        help="model input size for the random model, a multiple of 32 (default 512: quick on "
        "CPU; the official size is 1024)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and image")
    p.add_argument("--model", metavar="DIR", help="use a converted model instead of random weights")
    p.add_argument("--image", metavar="IMG", help="use this image instead of the synthetic one")
    p.add_argument("--no-pam", action="store_true", help="skip the (random) PAM captioning step")
    return p


def demo_tokenizer():
    """A byte-level BPE with no merges plus the ChatML specials (Qwen2 structure, 259 ids).

    No byte-level decoder: random tokens then print as the printable byte alphabet."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from pam_jax.llm.tokenizer import Tokenizer as PamTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PamTokenizer(tok, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})


def pam_captions(sam2_model, cfg, image, regions, seed: int, max_new_tokens: int = 24):
    """Caption regions with a tiny random PAM built around `sam2_model` (one batched call)."""
    from flax import nnx

    from pam_jax.llm.config import tiny
    from pam_jax.pam.config import PAMConfig
    from pam_jax.pam.model import PAM
    from pam_jax.pam.predictor import PAMPredictor

    pcfg = PAMConfig(sam2=cfg, llm=tiny(vocab_size=272, hidden_size=64, intermediate_size=128))
    model = PAM(pcfg, rngs=nnx.Rngs(seed), sam2=sam2_model)
    predictor = PAMPredictor(model, demo_tokenizer(), max_new_tokens=max_new_tokens)
    return predictor.describe_image(image, regions, task="detailed_caption")


def demo(args: argparse.Namespace) -> dict:
    from pam_jax.sam2.image_predictor import SAM2ImagePredictor
    from pam_jax.viz import overlay_masks

    t0 = time.perf_counter()
    if args.model:
        from pam_jax.sam2.loading import load_sam2

        model, cfg = load_sam2(args.model)
        weights = f"converted model {args.model}"
    else:
        if args.image_size <= 0 or args.image_size % 32:
            raise ValueError(
                f"--image-size must be a positive multiple of 32, got {args.image_size}"
            )
        model, cfg = random_sam2("t", "2.1", args.image_size, args.seed)
        weights = "random (untrained)"
    t_build = time.perf_counter() - t0

    if args.image:
        from pam_jax.sam2.cli import load_image

        image = load_image(args.image)
        h, w = image.shape[:2]
        shapes = {"house_box": [w * 0.25, h * 0.25, w * 0.75, h * 0.75],
                  "sun_center": [w * 0.5, h * 0.5]}  # fmt: skip
    else:
        image, shapes = sample_image(seed=args.seed)
    box = np.asarray(shapes["house_box"], np.float32)
    point = np.asarray(shapes["sun_center"], np.float32)

    predictor = SAM2ImagePredictor(model)
    t1 = time.perf_counter()
    predictor.set_image(image)
    # two prompt sets, one jitted decode: row 0 = the box, row 1 = one positive click
    pred = predictor.predict_batch(
        point_coords=[None, point[None]],
        point_labels=[None, np.array([1])],
        boxes=[box, None],
        multimask_output=False,
    )
    t_run = time.perf_counter() - t1
    masks = pred.masks[:, 0]
    ious = pred.iou_predictions[:, 0]
    names = ["box prompt", "point prompt"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overlay_masks(
        image, masks, labels=[f"{n} (iou {i:.2f})" for n, i in zip(names, ious)],
        boxes=box[None], points=point[None], point_labels=[1],
        label_xy=[box[:2], point + 8],
    ).save(out / "demo.png")  # fmt: skip
    result = {
        "weights": weights,
        "note": RANDOM_WARNING if not args.model else None,
        "model": cfg.name,
        "image_size": cfg.image_size,
        "image_hw": list(image.shape[:2]),
        "prompts": [{"box": box.tolist()}, {"point": point.tolist(), "label": 1}],
        "masks": [
            {
                "prompt": n,
                "iou_prediction": float(i),
                "object_score_logit": float(o),
                "area_pixels": int(m.sum()),
            }
            for n, i, o, m in zip(names, ious, pred.object_score_logits, masks)
        ],  # fmt: skip
        "seconds": {"build": round(t_build, 2), "encode_and_decode": round(t_run, 2)},
        "outputs": {"overlay": str(out / "demo.png"), "json": str(out / "demo.json")},
    }
    if not args.model and not getattr(args, "no_pam", False):
        t2 = time.perf_counter()
        regions = [{"box": box.tolist()}, {"points": [point.tolist()], "labels": [1]}]
        res = pam_captions(model, cfg, image, regions, args.seed)
        result["pam"] = [
            {"prompt": n, "text": r.text, "object_score_logit": r.score} for n, r in zip(names, res)
        ]
        result["seconds"]["pam"] = round(time.perf_counter() - t2, 2)
        overlay_masks(
            image, np.stack([r.mask for r in res]),
            labels=[f"{n}: {ascii(r.text[:32])}" for n, r in zip(names, res)],
            boxes=box[None], points=point[None], point_labels=[1],
            label_xy=[box[:2], point + 8],
        ).save(out / "demo_pam.png")  # fmt: skip
        result["outputs"]["pam_overlay"] = str(out / "demo_pam.png")
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    return result


def run(args: argparse.Namespace) -> int:
    from pam_jax.checkpoint import CheckpointError

    try:
        result = demo(args)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for m in result["masks"]:
        print(f"{m['prompt']}: iou {m['iou_prediction']:.3f}, {m['area_pixels']} px")
    for r in result.get("pam", []):
        print(f"{r['prompt']}: PAM caption {r['text']!r}")
    print("wrote " + ", ".join(result["outputs"].values()))
    if result["note"]:
        print(RANDOM_WARNING)
    return 0
