"""`pam-jax segment-video`: track objects through a video with SAM 2.

    pam-jax segment-video --model DIR --video FRAMES_DIR_OR_MP4
        (--prompts PROMPTS.json | [--frame F] [--obj ID] (--point X,Y[,L]... [--box X1,Y1,X2,Y2]
                                                          | --box X1,Y1,X2,Y2 | --mask-input PNG))
        --out OUT_DIR [--save-logits] [--reverse]

PROMPTS.json is a list of `{"frame": F, "obj": ID, "box": [x1, y1, x2, y2]?, "points": [[x, y],
...]?, "labels": [1, 0, ...]?, "mask": "file.png"?}`; each entry is one official
`add_new_points_or_box` call (or `add_new_mask` with "mask", a PNG at video resolution whose
non-zero pixels are the object; relative paths are relative to the JSON file), in order.
Coordinates are pixels of the video frames. Labels default to 1 (positive).

Writes, in OUT_DIR (created; files of an earlier run there are overwritten):
- frames/{frame:05d}.png: each frame with the masks overlaid (legend: object ids);
- masks/{obj}/{frame:05d}.png: each object's mask on each frame, black / white at video size;
- overlay.gif: the overlays animated;
- summary.json: per frame and object: area, bbox [x, y, w, h], COCO RLE `segmentation`,
  object score, mask file (names relative to OUT_DIR);
- with --save-logits, logits_{frame:05d}.npy: the video-resolution mask logits [objects, H, W]
  float32, objects in ascending id order, as `propagate_in_video` yields them.

Propagation runs forward from the earliest prompted frame; --reverse also tracks backward from
it afterwards (official `propagate_in_video(reverse=True)`), covering the frames before the first
prompt (a frame tracked by both passes keeps the forward result). Hole filling is not applied
(as the official CPU build).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from pam_jax.cliutil import (
    CLIError,
    add_click_arguments,
    add_dtype_argument,
    mask_bbox,
    mask_rle,
    output_dir,
    progress,
    read_mask,
    resolve_dtype,
    status,
    write_json,
    write_mask_png,
)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "segment-video",
        help="track objects through a video with SAM 2",
        description="Track objects through a video (a folder of <index>.jpg frames or an MP4) "
        "with a converted SAM 2 model. Coordinates are pixels of the video frames.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="model directory")
    p.add_argument(
        "--video", required=True, metavar="FRAMES_DIR_OR_MP4",
        help="folder of JPEG frames named by index (00000.jpg, ...) or an .mp4 file",
    )  # fmt: skip
    p.add_argument(
        "--prompts", metavar="PROMPTS.json",
        help='list of {"frame", "obj", "box"?, "points"?, "labels"?, "mask"?} prompts, applied in '
        "order (instead of --point/--box/--mask-input)",
    )  # fmt: skip
    p.add_argument("--frame", type=int, default=0, metavar="F", help="prompted frame (default 0)")
    p.add_argument("--obj", type=int, default=1, metavar="ID", help="object id (default 1)")
    add_click_arguments(p, box_help="a box prompt (one; more objects: --prompts)")
    p.add_argument(
        "--mask-input", metavar="PNG",
        help="mask prompt: a picture of the video frames' size, non-zero = object",
    )  # fmt: skip
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output directory")
    p.add_argument(
        "--save-logits", action="store_true", help="write logits_{frame:05d}.npy per frame"
    )
    p.add_argument(
        "--reverse", action="store_true", help="also track backward from the first prompted frame"
    )
    add_dtype_argument(p)
    return p


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Validate PROMPTS.json (structure only; coordinates are checked against the video later)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"prompts file {p}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"prompts file {p} is not valid JSON: {e}") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"prompts file {p} must hold a non-empty list of prompts")
    out = []
    for i, e in enumerate(data):
        where = f"prompts file {p}, entry {i}"
        if not isinstance(e, dict):
            raise ValueError(f"{where}: expected an object, got {e!r}")
        unknown = set(e) - {"frame", "obj", "box", "points", "labels", "mask"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        if not isinstance(e.get("frame", 0), int) or not isinstance(e.get("obj", 1), int):
            raise ValueError(f"{where}: 'frame' and 'obj' must be integers")
        has_pts = e.get("points") is not None
        if not has_pts and e.get("box") is None and e.get("mask") is None:
            raise ValueError(
                f"{where}: object {e.get('obj', 1)} has no prompt (points, box or mask)"
            )
        if e.get("mask") is not None and (has_pts or e.get("box") is not None):
            raise ValueError(f"{where}: a mask cannot be combined with points or a box")
        try:
            pts = np.asarray(e["points"], np.float32).reshape(-1, 2) if has_pts else None
            box = np.asarray(e["box"], np.float32).reshape(4) if e.get("box") is not None else None
        except (ValueError, TypeError):
            raise ValueError(
                f"{where}: points must be [[x, y], ...] and box [x1, y1, x2, y2]"
            ) from None
        labels = e.get("labels")
        if has_pts:
            labels = np.ones(len(pts), np.int32) if labels is None else np.asarray(labels, np.int32)
            if labels.shape != (len(pts),):
                raise ValueError(f"{where}: {len(pts)} points but labels {e.get('labels')}")
        mask = e.get("mask")
        if mask is not None:
            mp = Path(mask)
            mask = mp if mp.is_absolute() or not (p.parent / mp).exists() else p.parent / mp
        out.append(
            {"frame": e.get("frame", 0), "obj": e.get("obj", 1), "points": pts,
             "labels": labels, "box": box, "mask": mask}
        )  # fmt: skip
    return out


def prompts_from_args(args: argparse.Namespace) -> list[dict[str, Any]]:
    if len(args.box) > 1:
        raise CLIError(
            f"--box given {len(args.box)} times; one object takes one box (several objects: "
            "--prompts PROMPTS.json)"
        )
    box = np.asarray(args.box[0], np.float32) if args.box else None
    if args.prompts is not None:
        if args.point or box is not None or args.mask_input is not None:
            raise ValueError("give either --prompts or --point/--box/--mask-input, not both")
        return read_prompts(args.prompts)
    if not args.point and box is None and args.mask_input is None:
        raise ValueError(
            f"object {args.obj} has no prompt: give --prompts, --point, --box or --mask-input"
        )
    if args.mask_input is not None and (args.point or box is not None):
        raise ValueError("--mask-input cannot be combined with --point or --box")
    pts = np.array([p[:2] for p in args.point], np.float32).reshape(-1, 2)
    labels = np.array([p[2] for p in args.point], np.int32)
    return [
        {"frame": args.frame, "obj": args.obj, "points": pts if len(pts) else None,
         "labels": labels if len(pts) else None,
         "box": box,
         "mask": None if args.mask_input is None else Path(args.mask_input)}
    ]  # fmt: skip


def _frame_hw(video: str | Path) -> tuple[int, int]:
    """(H, W) of the video's first frame, read without decoding the whole video."""
    from PIL import Image

    from pam_jax.sam2.video_io import iter_mp4_frames, list_jpeg_frames

    p = Path(video)
    if p.suffix.lower() == ".mp4":
        if not p.is_file():
            raise CLIError(f"video {p}: no such file")
        first = next(iter(iter_mp4_frames(p)), None)
        if first is None:
            raise CLIError(f"video {p} has no frames")
        return tuple(first.shape[:2])
    frames = list_jpeg_frames(p)
    try:
        with Image.open(frames[0]) as im:
            return im.height, im.width
    except OSError as e:
        raise CLIError(f"frame {frames[0]} is not a readable image ({e})") from None


def _check_prompts(prompts: list[dict[str, Any]], hw: tuple[int, int]) -> None:
    """Every prompt against the frame size (the prompt module's rules), before the model load.
    Points and boxes within 1 pixel outside the frame are clipped in place."""
    from pam_jax.sam2.prompts import PromptError, make_prompt

    for i, pr in enumerate(prompts):
        where = f"object {pr['obj']} on frame {pr['frame']}"
        if pr["mask"] is not None:
            pr["mask_array"] = read_mask(pr["mask"], hw, f"{where}: mask")
            continue
        try:
            got = make_prompt(pr["points"], pr["labels"], pr["box"], image_hw=hw)
        except PromptError as e:
            raise CLIError(f"{where}: {e}".replace(" image", " frame")) from None
        k = 2 if pr["box"] is not None else 0
        if pr["box"] is not None:
            pr["box"] = got.points[:2].reshape(4)
        if pr["points"] is not None:
            pr["points"] = got.points[k:]
        prompts[i] = pr


def segment_video(args: argparse.Namespace) -> dict:
    from PIL import Image

    from pam_jax.sam2.loading import load_sam2
    from pam_jax.sam2.video_io import list_jpeg_frames
    from pam_jax.sam2.video_predictor import SAM2VideoPredictor
    from pam_jax.viz import color, overlay_masks

    # the prompts, the video's frame size and the output folder are checked before the model
    prompts = prompts_from_args(args)
    hw = _frame_hw(args.video)
    _check_prompts(prompts, hw)
    out = output_dir(args.out)
    status(f"loading {args.model}")
    model, cfg = load_sam2(args.model, dtype=resolve_dtype(args.dtype))
    predictor = SAM2VideoPredictor(model)
    status(f"reading {args.video}")
    state = predictor.init_state(args.video)
    hw = (state.video_height, state.video_width)
    for pr in prompts:
        if pr["mask"] is not None:
            predictor.add_new_mask(state, pr["frame"], pr["obj"], pr["mask_array"])
        else:
            predictor.add_new_points_or_box(
                state, pr["frame"], pr["obj"], points=pr["points"], labels=pr["labels"],
                box=pr["box"],
            )  # fmt: skip

    results: dict[int, tuple[list, np.ndarray, np.ndarray]] = {}
    first = min(p["frame"] for p in prompts)
    passes = [False, True] if args.reverse else [False]
    for reverse in passes:
        total = first + 1 if reverse else state.num_frames - first
        frames_iter = predictor.propagate_in_video(state, reverse=reverse)
        desc = "tracking backward" if reverse else "tracking"
        for f, ids, logits in progress(frames_iter, total=total, desc=desc, unit="frame"):
            if f not in results:
                results[f] = (list(ids), logits, predictor.get_object_scores(state, f))

    (out / "frames").mkdir(parents=True, exist_ok=True)
    obj_ids = sorted(state.obj_ids)
    pos = {o: i for i, o in enumerate(state.obj_ids)}
    order = [pos[o] for o in obj_ids]
    colors = [color(i) for i in range(len(obj_ids))]
    legend = [f"obj {o}" for o in obj_ids]
    frames_json, gif = [], []
    jpegs = list_jpeg_frames(args.video) if Path(args.video).is_dir() else None
    for f in progress(sorted(results), total=len(results), desc="writing", unit="frame"):
        _, logits, scores = results[f]
        logits, scores = logits[order].astype(np.float32), scores[order]
        masks = logits > 0
        frame_img = _original_frame(jpegs, f, hw, state.images.frames_u8[f])
        marks = [p for p in prompts if p["frame"] == f]
        boxes = [p["box"] for p in marks if p["box"] is not None]
        pts = [p["points"] for p in marks if p["points"] is not None]
        plabels = [p["labels"] for p in marks if p["points"] is not None]
        img = overlay_masks(
            frame_img, masks, labels=[f"obj {o}" if m.any() else None for o, m in
                                      zip(obj_ids, masks)],
            colors=colors, legend=legend,
            boxes=np.stack(boxes) if boxes else None,
            points=np.concatenate(pts) if pts else None,
            point_labels=np.concatenate(plabels) if pts else None,
        )  # fmt: skip
        png = out / "frames" / f"{f:05d}.png"
        img.save(png)
        gif.append(img.convert("P", palette=Image.ADAPTIVE))
        entry = {"frame": f, "overlay": str(png.relative_to(out)), "objects": []}
        for j, o in enumerate(obj_ids):
            mfile = write_mask_png(masks[j], out / "masks" / str(o) / f"{f:05d}.png")
            entry["objects"].append({
                "obj": o,
                "area": int(masks[j].sum()),
                "bbox": mask_bbox(masks[j]),
                "segmentation": mask_rle(masks[j]),
                "object_score_logit": None if np.isnan(scores[j]) else float(scores[j]),
                "present": bool(scores[j] > 0) if not np.isnan(scores[j]) else False,
                "file": str(mfile.relative_to(out)),
            })  # fmt: skip
        if args.save_logits:
            npy = out / f"logits_{f:05d}.npy"
            np.save(npy, logits)
            entry["logits"] = npy.name
        frames_json.append(entry)
    anim = out / "overlay.gif"
    if gif:
        gif[0].save(anim, save_all=True, append_images=gif[1:], duration=100, loop=0)
    summary = {
        "video": str(args.video),
        "width": hw[1],
        "height": hw[0],
        "num_frames": state.num_frames,
        "model": str(args.model),
        "model_name": cfg.name,
        "model_input_size": int(cfg.image_size),
        "object_ids": obj_ids,
        "prompts": [
            {
                "frame": p["frame"],
                "obj": p["obj"],
                "points": None if p["points"] is None else np.asarray(p["points"]).tolist(),
                "labels": None if p["labels"] is None else np.asarray(p["labels"]).tolist(),
                "box": None if p["box"] is None else np.asarray(p["box"]).tolist(),
                "mask": None if p["mask"] is None else str(p["mask"]),
            }
            for p in prompts
        ],  # fmt: skip
        "reverse": bool(args.reverse),
        "hole_filling": False,
        "frames": frames_json,
        "files": {
            "animation": anim.name,
            "summary": "summary.json",
            "masks": "masks",
            "overlays": "frames",
        },  # fmt: skip
    }
    write_json(out / "summary.json", summary)
    return summary


def _original_frame(jpegs: list | None, f: int, hw: tuple[int, int], resized: np.ndarray):
    """Frame f at video resolution for drawing (JPEG frames are re-read; MP4 frames, stored at
    the model size, are resized back)."""
    from PIL import Image

    if jpegs is not None:
        with Image.open(jpegs[f]) as im:
            return np.asarray(im.convert("RGB"))
    return np.asarray(Image.fromarray(resized).resize((hw[1], hw[0]), Image.BILINEAR))


def run(args: argparse.Namespace) -> int:
    summary = segment_video(args)
    n, out = len(summary["frames"]), Path(args.out)
    print(f"tracked {len(summary['object_ids'])} object(s) over {n} frame(s)")
    print(
        f"wrote {out / 'frames'}/*.png, {out / 'masks'}/<obj>/*.png, {out / 'overlay.gif'}, "
        f"{out / 'summary.json'}" + (f", {n} logits_*.npy" if args.save_logits else "")
    )
    return 0
