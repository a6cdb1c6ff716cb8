"""`pam-jax predict`: recognize, explain or caption regions with a converted PAM model.

    pam-jax predict --model DIR (--image IMG | --video FRAMES_DIR_OR_MP4 [--stream --clip-frames N])
                    (--point X,Y[,L]... | --box X1,Y1,X2,Y2 | --mask-input PNG | --regions R.json)
                    [--task recognize|explain|caption|detailed-caption] [--lang en|zh]
                    [--max-new-tokens N] [--temperature T] --out PREFIX

Prompts (pixels of the original image / first frame): each --box is one region; the --point
clicks (label 1 positive, 0 negative) form one more region, or join the box when exactly one
--box is given; --mask-input is a mask prompt (a PNG of the image's size, nonzero = object,
the release's `add_new_mask`); --regions REGIONS.json lists several regions, each
{"box": [x1, y1, x2, y2]?, "points": [[x, y], ...]?, "labels": [...]?, "mask": "file.png"?}
(mask paths relative to the JSON file). All regions of an image are decoded and generated in
one batched call.

Video: the prompt applies to frame 0 (one region); SAM 2 tracks it through every frame and 16
frames feed the LLM (the release's video caption prompt). --stream --clip-frames N captions the
video clip by clip (N frames each), each clip carrying the previous clip's caption
(`describe_stream`); --clip-ends E1,E2,... gives the clip ends explicitly and --history the
caption of an earlier clip (extras).

Outputs: PREFIX.png (the masks overlaid, each region's text drawn beside it), PREFIX.json (text,
object scores, mask file names), PREFIX_mask<i>.png; for video PREFIX_frames/<t>.png overlays,
PREFIX_masks/<t>.png masks and the animation PREFIX.gif. Prints one line per region / clip
(JSON with --json). Decoding: greedy with the checkpoint's repetition penalty unless
--temperature > 0. Bad input (a region outside the image, an empty prompt, a model directory
without weights) is a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pam_jax.checkpoint import CheckpointError
from pam_jax.pam.prompts import CLI_TASKS

LABEL_CHARS = 60  # text drawn on overlays is cut here (the JSON has all of it)


def add_parser(sub) -> argparse.ArgumentParser:
    from pam_jax.sam2.cli import parse_box, parse_point

    p = sub.add_parser(
        "predict",
        help="recognize, explain and caption regions with PAM",
        description="Describe image or video regions with a PAM model directory "
        "(pam-jax convert pam). Coordinates are pixels of the original image.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="PAM model directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", metavar="IMG", help="input image (any PIL format)")
    src.add_argument("--video", metavar="VIDEO", help="a folder of JPEG frames or an .mp4")
    p.add_argument("--stream", action="store_true", help="video: caption clip by clip")
    p.add_argument("--clip-frames", type=int, default=None, metavar="N",
                   help="with --stream: frames per clip")  # fmt: skip
    p.add_argument("--clip-ends", default=None, metavar="E1,E2,...",
                   help="video: caption clips ending at these frame indices (extra)")  # fmt: skip
    p.add_argument("--history", default=None, help="video: the previous clip's caption (extra)")
    p.add_argument("--box", type=parse_box, action="append", default=[], metavar="X1,Y1,X2,Y2",
                   help="a region's box (repeatable: one region per box)")  # fmt: skip
    p.add_argument("--point", type=parse_point, action="append", default=[],
                   metavar="X,Y[,LABEL]", help="a click (repeatable)")  # fmt: skip
    p.add_argument("--mask-input", metavar="PNG", help="a mask prompt (nonzero = object)")
    p.add_argument("--regions", metavar="REGIONS.json", help="several regions, one prompt each")
    p.add_argument("--task", default=None,
                   help="recognize | explain | caption | detailed-caption (default "
                   "detailed-caption; videos: caption)")  # fmt: skip
    p.add_argument("--lang", default="en", choices=["en", "zh", "ch"], help="prompt language")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="default: the checkpoint's generation_config.json")  # fmt: skip
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="compute dtype of SAM 2 and the perceiver (the LLM: --llm-dtype)",
    )
    p.add_argument("--llm-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="LLM parameter and compute dtype")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.add_argument("--out", metavar="PREFIX", help="write PREFIX.json, PREFIX.png and masks")
    return p


def regions_from_args(boxes: list, points: list) -> list[dict]:
    """Each box a region; the clicks one more region, or part of the single box's region."""
    regions = [{"box": list(b)} for b in boxes]
    if points:
        clicks = {"points": [[x, y] for x, y, _ in points], "labels": [lab for *_, lab in points]}
        if len(regions) == 1:
            regions[0].update(clicks)
        else:
            regions.append(clicks)
    return regions


def load_mask_png(path: str | Path, hw: tuple[int, int]) -> np.ndarray:
    """A mask prompt file -> bool [H, W] (nonzero in any channel = object)."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"mask {p}: no such file")
    try:
        with Image.open(p) as im:
            m = np.asarray(im.convert("L")) > 0
    except OSError as e:
        raise ValueError(f"mask {p} is not a readable image: {e}") from None
    if m.shape != tuple(hw):
        raise ValueError(f"mask {p} is {m.shape[1]}x{m.shape[0]}, the image {hw[1]}x{hw[0]}")
    return m


def read_regions(path: str | Path, hw: tuple[int, int]) -> tuple[list[dict], list[str | None]]:
    """REGIONS.json: a list of {"box"?, "points"?, "labels"?, "mask"?} objects (or
    {"regions": [...]}); mask file names are relative to the JSON file. Returns the regions
    (masks loaded as bool arrays) and each region's mask file name (None without a mask)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise ValueError(f"regions file {p}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"regions file {p} is not valid JSON: {e}") from None
    if isinstance(data, dict) and "regions" in data:
        data = data["regions"]
    if not isinstance(data, list) or not data or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"regions file {p}: expected a non-empty list of region objects")
    out, names = [], []
    for r in data:
        r = dict(r)
        names.append(None if r.get("mask") is None else str(r["mask"]))
        if r.get("mask") is not None:
            r["mask"] = load_mask_png(p.parent / r["mask"], hw)
        out.append(r)
    return out, names


def _task(args: argparse.Namespace) -> str:
    t = args.task
    if args.video:
        if t in (None, "caption", "detailed-caption", "video-caption", "video_caption"):
            return "video_caption"
        if t.startswith("video_cap"):
            return t
        raise ValueError(f"--task {t}: videos support captioning only (caption)")
    if t is None:
        return "detailed_caption"
    return CLI_TASKS.get(t, t)


def _prompt_regions(
    args: argparse.Namespace, hw: tuple[int, int]
) -> tuple[list[dict], list[str | None]]:
    """The regions and each one's mask-prompt file name (None without a mask)."""
    kinds = {
        "--box/--point": args.box or args.point,
        "--mask-input": args.mask_input,
        "--regions": args.regions,
    }
    given = [name for name, v in kinds.items() if v]
    if not given:
        raise ValueError("empty prompt: give --point, --box, --mask-input or --regions")
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} cannot be combined (one kind of prompt)")
    if args.regions:
        return read_regions(args.regions, hw)
    if args.mask_input:
        return [{"mask": load_mask_png(args.mask_input, hw)}], [args.mask_input]
    regions = regions_from_args(args.box, args.point)
    return regions, [None] * len(regions)


def _clip_ends(args: argparse.Namespace, n: int) -> list[int] | None:
    if args.stream:
        if args.clip_frames is None or args.clip_frames < 1:
            raise ValueError("--stream needs --clip-frames N (N >= 1)")
        return [*range(args.clip_frames, n, args.clip_frames), n]
    if args.clip_frames is not None:
        raise ValueError("--clip-frames needs --stream")
    if args.clip_ends:
        try:
            return [int(v) for v in args.clip_ends.split(",")]
        except ValueError:
            msg = f"--clip-ends must be integers like 32,64,96, got {args.clip_ends!r}"
            raise ValueError(msg) from None
    return None


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (CheckpointError, ValueError, OSError) as e:
        msg = str(e).strip().splitlines()
        print(f"error: {msg[0] if msg else type(e).__name__}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from pam_jax.llm.sampler import SamplingParams
    from pam_jax.pam import prompts
    from pam_jax.pam.model import load_pam
    from pam_jax.pam.predictor import PAMPredictor, region_prompts
    from pam_jax.sam2.cli import load_image

    if (args.stream or args.clip_frames or args.clip_ends or args.history) and not args.video:
        raise ValueError("--stream / --clip-frames / --clip-ends / --history need --video")
    task = _task(args)
    prompts.task_prompt(task, args.lang, args.history if args.video else None)
    # everything about the input is checked before the (slow) model load
    if args.video:
        frames = _load_frames(args.video)
        if not frames:
            raise ValueError(f"video {args.video}: no frames")
        image = frames[0]
    else:
        frames, image = None, load_image(args.image)
    hw = image.shape[:2]
    regions, mask_names = _prompt_regions(args, hw)
    if args.video and len(regions) != 1:
        raise ValueError("a video takes one region (one --box and / or clicks, or one mask)")
    region_prompts(regions, hw, 1024)  # validates (outside the image, empty, bad labels)
    clip_ends = _clip_ends(args, len(frames)) if frames is not None else None

    dt = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    llm_dt = jnp.float32 if args.llm_dtype == "float32" else jnp.bfloat16
    model, _, tok = load_pam(args.model, dtype=dt, llm_dtype=llm_dt)
    if tok is None:
        raise ValueError(f"{args.model} has no tokenizer (llm/tokenizer.json)")
    penalty = args.repetition_penalty
    if penalty is None:
        penalty = float((tok.generation_config or {}).get("repetition_penalty", 1.0))
    sampling = SamplingParams(args.temperature, args.top_p, args.top_k, penalty)
    pred = PAMPredictor(model, tok, sampling=sampling, max_new_tokens=args.max_new_tokens)
    if frames is not None:
        return _run_video(args, pred, frames, regions[0], mask_names[0], task, clip_ends)
    results = pred.describe_image(image, regions, task, args.lang)

    out = Path(args.out) if args.out else None
    rows = []
    for i, (r, res) in enumerate(zip(regions, results)):
        row = {k: v for k, v in r.items() if k != "mask"}
        if mask_names[i] is not None:
            row["mask_input"] = mask_names[i]
        row |= {"text": res.text, "token_ids": res.token_ids,
                "object_score": round(res.score, 4), "mask_area": int(res.mask.sum())}  # fmt: skip
        if out is not None:
            mask_path = out.with_name(f"{out.name}_mask{i}.png")
            row["mask_file"] = _save_mask(res.mask, mask_path, out.parent)
        rows.append(row)
        print(json.dumps(row, ensure_ascii=False) if args.json else res.text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_json(out, {"image": str(args.image), "task": task, "lang": args.lang,
                          "regions": rows})  # fmt: skip
        vis = _overlay(image, [res.mask for res in results], [res.text for res in results],
                       regions)  # fmt: skip
        vis.save(out.with_name(out.name + ".png"))
    return 0


def _write_json(out: Path, data: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".json").write_text(json.dumps(data, ensure_ascii=False, indent=2))


def _save_mask(mask: np.ndarray, path: Path, base: Path) -> str:
    """Write a bool mask as a 0 / 255 PNG; returns its name relative to `base`."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return str(path.relative_to(base))


def _label(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


def _overlay(image, masks, texts, regions):
    """The masks overlaid, each region's text beside it (right of its mask's bounding box)."""
    from pam_jax.viz import overlay_masks

    xy = []
    for m in masks:
        ys, xs = np.nonzero(m)
        xy.append((int(xs.max()) + 4, int(ys.min())) if len(xs) else None)
    boxes = [r["box"] for r in regions if r.get("box") is not None]
    pts = [p for r in regions for p in (r.get("points") or [])]
    pl = [lab for r in regions for lab in (r.get("labels") or [1] * len(r.get("points") or []))]
    return overlay_masks(
        image, masks, labels=[_label(t) or None for t in texts], label_xy=xy,
        boxes=boxes or None, points=pts or None, point_labels=pl or None,
    )  # fmt: skip


def _load_frames(path: str) -> list:
    """Frames as uint8 RGB arrays (JPEG folder in index order, or an .mp4)."""
    from PIL import Image

    from pam_jax.sam2.video_io import iter_mp4_frames, list_jpeg_frames

    p = Path(path)
    if p.suffix.lower() == ".mp4":
        if not p.is_file():
            raise ValueError(f"video {p}: no such file")
        return list(iter_mp4_frames(p))
    out = []
    for fp in list_jpeg_frames(p):
        with Image.open(fp) as im:
            out.append(np.asarray(im.convert("RGB")))
    return out


def _run_video(args, pred, frames, region, mask_name, task, clip_ends) -> int:
    if clip_ends:
        results = pred.describe_stream(frames, region, clip_ends, args.lang)
        starts = [0, *clip_ends[:-1]]
    else:
        results = [pred.describe_video(frames, region, task, args.lang, history=args.history)]
        starts = [0]
    out = Path(args.out) if args.out else None
    prompt = {k: v for k, v in region.items() if k != "mask"}
    if mask_name is not None:
        prompt["mask_input"] = mask_name
    rows = []
    for s, res in zip(starts, results):
        row = {
            **prompt, "first_frame": s, "last_frame": s + len(res.masks) - 1, "text": res.text,
            "token_ids": res.token_ids,
            "frames_fed": [s + int(f) for f in res.frames],
            "object_scores": [round(float(x), 4) for x in res.scores],
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row, ensure_ascii=False) if args.json else res.text)
    if out is None:
        return 0
    masks = np.concatenate([r.masks for r in results])
    texts = [r.text for r in results for _ in range(len(r.masks))]  # each clip's caption
    mask_dir = out.with_name(out.name + "_masks")
    frame_dir = out.with_name(out.name + "_frames")
    frame_dir.mkdir(parents=True, exist_ok=True)
    mask_files, pics = [], []
    for t, (frame, m, text) in enumerate(zip(frames, masks, texts)):
        mask_files.append(_save_mask(m, mask_dir / f"{t:05d}.png", out.parent))
        vis = _overlay(frame, [m], [text], [region] if t == 0 else [{}])
        vis.save(frame_dir / f"{t:05d}.png")
        pics.append(vis)
    pics[0].save(out.with_name(out.name + ".gif"), save_all=True, append_images=pics[1:],
                 duration=100, loop=0)  # fmt: skip
    _write_json(out, {"video": str(args.video), "task": task, "lang": args.lang, "clips": rows,
                      "mask_files": mask_files, "frame_files": [
                          str(Path(frame_dir.name) / f"{t:05d}.png") for t in range(len(masks))],
                      "animation": out.name + ".gif"})  # fmt: skip
    return 0
