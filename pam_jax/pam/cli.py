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

Outputs (PREFIX "out/cat" -> out/cat.*; a PREFIX ending in "/" is a folder, named after the
input): PREFIX.png (the masks overlaid, each region's text drawn beside it), PREFIX.json (per
region: the prompt, text, object score, mask area, bbox [x, y, w, h], COCO RLE `segmentation`,
mask file), PREFIX_mask<i>.png; for video PREFIX_frames/<t>.png overlays, PREFIX_masks/<t>.png
masks and the animation PREFIX.gif. Prints each region's / clip's text on stdout (JSON lines
with --json) and the files written on stderr. Decoding: greedy with the model's repetition
penalty (its generation_config.json) unless --temperature > 0. Bad input (a region outside the
image, an empty prompt, a model directory without weights) is a one-line error and exit code 2,
found before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pam_jax.cliutil import (
    CLIError,
    add_click_arguments,
    add_dtype_argument,
    add_sampling_arguments,
    clicks_region,
    mask_bbox,
    mask_rle,
    output_prefix,
    read_image,
    read_mask,
    resolve_dtype,
    sampling_from_args,
    status,
    step_progress,
    write_json,
    write_mask_png,
)
from pam_jax.pam.prompts import CLI_IMAGE_TASKS as IMAGE_TASKS
from pam_jax.pam.prompts import CLI_LANGS as LANGS
from pam_jax.pam.prompts import CLI_TASKS, normalize_lang

# The command's task names (the one table: pam_jax.pam.prompts.CLI_TASKS maps them to the
# prompts); JSON outputs name the task as given here.
VIDEO_TASKS = ("caption",)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "predict",
        help="recognize, explain and caption regions with PAM",
        description="Describe image or video regions with a PAM model directory "
        "(pam-jax convert pam). Coordinates are pixels of the image as a viewer shows it "
        "(EXIF orientation applied); within 1 pixel outside the edge they are moved onto it.",
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
    add_click_arguments(p, box_help="a region's box (repeatable: one region per box)")
    p.add_argument("--mask-input", metavar="PNG",
                   help="a mask prompt: a picture of the same size as the image (or the "
                   "video's frames), non-zero = object")  # fmt: skip
    p.add_argument("--regions", metavar="REGIONS.json", help="several regions, one prompt each")
    p.add_argument("--task", default=None, choices=IMAGE_TASKS,
                   help="images: recognize | explain | caption | detailed-caption (default "
                   "detailed-caption); videos: caption (the default)")  # fmt: skip
    p.add_argument("--lang", default="en", choices=LANGS,
                   help="language of the prompt and answer: en (English, default) or zh "
                   "(Chinese; ch, the release's name for it, is accepted too)")  # fmt: skip
    add_sampling_arguments(p, max_new_tokens=512)
    add_dtype_argument(p, what="SAM 2 and the perceiver")
    add_dtype_argument(p, "--llm-dtype", what="the LLM (weights too)")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.add_argument(
        "--out", metavar="PREFIX",
        help="write PREFIX.json, PREFIX.png and masks (a trailing / = folder)",
    )  # fmt: skip
    return p


def regions_from_args(boxes: list, points: list) -> list[dict]:
    """Each box a region; the clicks one more region, or part of the single box's region."""
    regions = [{"box": list(b)} for b in boxes]
    if points:
        clicks = clicks_region(points)
        if len(regions) == 1:
            regions[0].update(clicks)
        else:
            regions.append(clicks)
    return regions


def read_regions(path: str | Path, hw: tuple[int, int]) -> tuple[list[dict], list[str | None]]:
    """REGIONS.json: a list of {"box"?, "points"?, "labels"?, "mask"?} objects (or
    {"regions": [...]}); mask file names are relative to the JSON file. Returns the regions
    (masks loaded as bool arrays) and each region's mask file name (None without a mask)."""
    p = Path(path)
    if p.is_dir():
        raise CLIError(f"regions file {p} is a folder, not a file")
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise CLIError(f"regions file {p}: {e.strerror or e}") from None
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
            r["mask"] = read_mask(p.parent / r["mask"], hw, "mask")
        out.append(r)
    return out, names


def _task(args: argparse.Namespace) -> str:
    """The prompt table's task for the command's --task (videos: caption only)."""
    if args.video:
        if args.task not in (None, *VIDEO_TASKS):
            raise CLIError(f"--task {args.task}: videos take --task caption (the default)")
        return "video_caption"
    return CLI_TASKS.get(args.task or "detailed-caption", args.task)


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
        return [{"mask": read_mask(args.mask_input, hw, "--mask-input")}], [args.mask_input]
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
    from pam_jax.pam.model import load_pam
    from pam_jax.pam.predictor import PAMPredictor
    from pam_jax.pam.prompts import task_prompt
    from pam_jax.sam2.prompts import prompt_from_region

    if (args.stream or args.clip_frames or args.clip_ends or args.history) and not args.video:
        raise CLIError("--stream / --clip-frames / --clip-ends / --history need --video")
    task = _task(args)
    args.task_name = "caption" if args.video else (args.task or "detailed-caption")
    args.lang = normalize_lang(args.lang)
    task_prompt(task, args.lang, args.history if args.video else None)
    # everything about the input and the outputs is checked before the (slow) model load
    if args.video:
        frames = _load_frames(args.video)
        if not frames:
            raise CLIError(f"video {args.video}: no frames")
        image = frames[0]
    else:
        frames, image = None, read_image(args.image)
    hw = image.shape[:2]
    regions, mask_names = _prompt_regions(args, hw)
    if args.video and len(regions) != 1:
        raise CLIError("a video takes one region (one --box and / or clicks, or one mask)")
    for i, r in enumerate(regions):
        prompt_from_region(r, image_hw=hw, index=i)  # outside the image, empty, bad labels
    clip_ends = _clip_ends(args, len(frames)) if frames is not None else None
    prefix = None
    if args.out:
        stem = Path(args.video or args.image).stem or "predict"
        prefix = output_prefix(args.out, default_stem=stem, suffixes=(".json", ".png"))

    status(f"loading {args.model}")
    dt, llm_dt = resolve_dtype(args.dtype), resolve_dtype(args.llm_dtype)
    model, _, tok = load_pam(args.model, dtype=dt, llm_dtype=llm_dt)
    if tok is None:
        raise CLIError(f"{args.model} has no tokenizer (llm/tokenizer.json)")
    sampling = sampling_from_args(args, tok)
    pred = PAMPredictor(model, tok, sampling=sampling, max_new_tokens=args.max_new_tokens)
    if frames is not None:
        status(f"tracking and describing {len(frames)} frames")
        written = _run_video(args, pred, frames, regions[0], mask_names[0], task, clip_ends, prefix)
    else:
        status(f"describing {len(regions)} region(s)")
        with step_progress(args.max_new_tokens, desc="decoding") as on_step:
            results = pred.describe_image(image, regions, task, args.lang, on_step=on_step)
        written = _write_image(args, prefix, image, regions, mask_names, results)
    if written:  # stdout holds the answers; the files written are reported on stderr
        print("wrote " + ", ".join(written), file=sys.stderr)
    return 0


def _write_image(args, prefix, image, regions, mask_names, results) -> list[str]:
    rows = []
    for i, (r, res) in enumerate(zip(regions, results)):
        row = {k: (np.asarray(v).tolist() if k != "mask" else None) for k, v in r.items()}
        row.pop("mask", None)
        if mask_names[i] is not None:
            row["mask_input"] = mask_names[i]
        row |= {"text": res.text, "token_ids": res.token_ids,
                "object_score_logit": round(float(res.score), 4),
                "area": int(res.mask.sum()), "bbox": mask_bbox(res.mask)}  # fmt: skip
        if prefix is not None:
            row["segmentation"] = mask_rle(res.mask)
            row["file"] = prefix.rel(write_mask_png(res.mask, prefix.path(f"_mask{i}.png")))
        rows.append(row)
        line = {k: v for k, v in row.items() if k != "segmentation"}
        print(json.dumps(line, ensure_ascii=False) if args.json else res.text)
    if prefix is None:
        return []
    h, w = image.shape[:2]
    vis = _overlay(image, [res.mask for res in results], [res.text for res in results], regions)
    vis.save(prefix.path(".png"))
    write_json(prefix.path(".json"), {
        "image": str(args.image), "width": w, "height": h, "task": args.task_name,
        "lang": args.lang, "regions": rows,
        "files": {"overlay": prefix.rel(prefix.path(".png"))},
    })  # fmt: skip
    return [str(prefix.path(".png")), *(str(prefix.folder / r["file"]) for r in rows),
            str(prefix.path(".json"))]  # fmt: skip


def _anchor(region: dict) -> tuple[float, float] | None:
    """Where a region's label goes when its mask is empty: its box corner or first click."""
    if region.get("box") is not None:
        return tuple(region["box"][:2])
    pts = region.get("points")
    return tuple(np.asarray(pts, np.float32).reshape(-1, 2)[0]) if pts else None


def _overlay(image, masks, texts, regions):
    """The masks overlaid, each region's text beside it (right of its mask's bounding box; at
    its prompt when the mask is empty)."""
    from pam_jax.viz import overlay_masks

    xy = []
    for m in masks:
        ys, xs = np.nonzero(m)
        xy.append((int(xs.max()) + 4, int(ys.min())) if len(xs) else None)
    boxes = [r["box"] for r in regions if r.get("box") is not None]
    pts = [p for r in regions for p in (r.get("points") or [])]
    pl = [lab for r in regions for lab in (r.get("labels") or [1] * len(r.get("points") or []))]
    return overlay_masks(
        image, masks, labels=[t or None for t in texts], label_xy=xy,
        anchors=[_anchor(r) for r in regions] if len(regions) == len(masks) else None,
        boxes=boxes or None, points=pts or None, point_labels=pl or None,
    )  # fmt: skip


def _load_frames(path: str) -> list:
    """Frames as uint8 RGB arrays (JPEG folder in index order, or an .mp4)."""
    from PIL import Image

    from pam_jax.sam2.video_io import iter_mp4_frames, list_jpeg_frames

    p = Path(path)
    if p.suffix.lower() == ".mp4":
        if not p.is_file():
            raise CLIError(f"video {p}: no such file")
        return list(iter_mp4_frames(p))
    out = []
    for fp in list_jpeg_frames(p):
        with Image.open(fp) as im:
            out.append(np.asarray(im.convert("RGB")))
    return out


def _run_video(args, pred, frames, region, mask_name, task, clip_ends, prefix) -> list[str]:
    from pam_jax.cliutil import progress

    with step_progress(args.max_new_tokens, desc="decoding") as on_step:
        if clip_ends:  # the bar restarts at each clip's caption
            results = pred.describe_stream(frames, region, clip_ends, args.lang, on_step=on_step)
            starts = [0, *clip_ends[:-1]]
        else:
            results = [
                pred.describe_video(
                    frames, region, task, args.lang, history=args.history, on_step=on_step
                )
            ]
            starts = [0]
    prompt = {k: np.asarray(v).tolist() for k, v in region.items() if k != "mask"}
    if mask_name is not None:
        prompt["mask_input"] = mask_name
    rows = []
    for s, res in zip(starts, results):
        row = {
            **prompt, "first_frame": s, "last_frame": s + len(res.masks) - 1, "text": res.text,
            "token_ids": res.token_ids,
            "frames_fed": [s + int(f) for f in res.frames],
            "object_score_logits": [round(float(x), 4) for x in res.scores],
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row, ensure_ascii=False) if args.json else res.text)
    if prefix is None:
        return []
    masks = np.concatenate([r.masks for r in results])
    texts = [r.text for r in results for _ in range(len(r.masks))]  # each clip's caption
    mask_dir = prefix.path("_masks")
    frame_dir = prefix.path("_frames")
    frame_dir.mkdir(parents=True, exist_ok=True)
    per_frame, pics = [], []
    items = list(zip(frames, masks, texts))
    for t, (frame, m, text) in progress(enumerate(items), total=len(items), desc="writing",
                                        unit="frame"):  # fmt: skip
        mfile = write_mask_png(m, mask_dir / f"{t:05d}.png")
        vis = _overlay(frame, [m], [text], [region] if t == 0 else [{}])
        vis.save(frame_dir / f"{t:05d}.png")
        pics.append(vis)
        per_frame.append({
            "frame": t, "area": int(m.sum()), "bbox": mask_bbox(m), "segmentation": mask_rle(m),
            "file": prefix.rel(mfile), "overlay": prefix.rel(frame_dir / f"{t:05d}.png"),
        })  # fmt: skip
    anim = prefix.path(".gif")
    pics[0].save(anim, save_all=True, append_images=pics[1:], duration=100, loop=0)
    h, w = frames[0].shape[:2]
    write_json(prefix.path(".json"), {
        "video": str(args.video), "width": w, "height": h, "task": args.task_name,
        "lang": args.lang, "clips": rows, "frames": per_frame,
        "files": {"animation": prefix.rel(anim), "masks": prefix.rel(mask_dir),
                  "overlays": prefix.rel(frame_dir)},
    })  # fmt: skip
    return [f"{frame_dir}/*.png", f"{mask_dir}/*.png", str(anim), str(prefix.path(".json"))]
