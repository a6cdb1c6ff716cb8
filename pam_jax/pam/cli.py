"""`pam-jax predict`: recognize, explain or caption image regions with a converted PAM model.

    pam-jax predict --model DIR --image IMG [--box X1,Y1,X2,Y2]... [--point X,Y[,LABEL]]...
                    [--task detailed_caption] [--lang en] [--max-new-tokens 512]
                    [--temperature T] [--top-p P] [--top-k K] [--out PREFIX]
    pam-jax predict --model DIR --video FRAMES_DIR|MP4 --box ... | --point ...
                    [--history TEXT] [--clip-ends 32,64,96] [--lang en]

Video: the prompt applies to frame 0 (one region); SAM 2 tracks it through every frame and 16
frames feed the LLM (`video_caption`). --history gives the previous clip's caption; with
--clip-ends the video is captioned clip by clip (streaming), each clip carrying the previous
caption.

Each --box is one region; the --point clicks (label 1 positive, 0 negative) form one more
region, or join the box when exactly one --box is given (the release accepts a box, clicks, or
both). All regions run as one batch. Prints one line per region (JSON with --json); with --out,
writes PREFIX.json and PREFIX.png (the image with the masks overlaid).
Tasks: recognize, explain, brief_caption, detailed_caption (release modes such as
`detail_cap_ch` work too). Decoding: greedy with the checkpoint's repetition penalty unless
--temperature > 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pam_jax.checkpoint import CheckpointError


def add_parser(sub) -> argparse.ArgumentParser:
    from pam_jax.sam2.cli import parse_box, parse_point

    p = sub.add_parser(
        "predict",
        help="recognize, explain and caption regions with PAM",
        description="Describe image regions with a PAM model directory (pam-jax convert pam). "
        "Coordinates are pixels of the original image.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="PAM model directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", metavar="IMG", help="input image (any PIL format)")
    src.add_argument("--video", metavar="VIDEO", help="a folder of JPEG frames or an .mp4")
    p.add_argument("--history", default=None, help="video: the previous clip's caption")
    p.add_argument(
        "--clip-ends",
        default=None,
        metavar="E1,E2,...",
        help="video: caption clip by clip, ending at these frame indices",
    )
    p.add_argument("--box", type=parse_box, action="append", default=[], metavar="X1,Y1,X2,Y2",
                   help="a region's box (repeatable: one region per box)")  # fmt: skip
    p.add_argument("--point", type=parse_point, action="append", default=[],
                   metavar="X,Y[,LABEL]", help="a click (repeatable)")  # fmt: skip
    p.add_argument("--task", default=None,
                   help="recognize | explain | brief_caption | detailed_caption (images, default "
                   "detailed_caption); video_caption for videos")  # fmt: skip
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
        help="compute dtype of SAM 2 and the perceiver (the LLM runs in bfloat16)",
    )
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.add_argument("--out", metavar="PREFIX", help="write PREFIX.json and PREFIX.png")
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


def run(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from pam_jax.llm.sampler import SamplingParams
    from pam_jax.pam import prompts
    from pam_jax.pam.model import load_pam
    from pam_jax.pam.predictor import PAMPredictor
    from pam_jax.sam2.cli import load_image

    regions = regions_from_args(args.box, args.point)
    if not regions:
        print("error: give at least one --box or --point", file=sys.stderr)
        return 2
    if args.video and len(regions) != 1:
        print("error: a video takes one region (one --box and / or clicks)", file=sys.stderr)
        return 2
    args.task = args.task or ("video_caption" if args.video else "detailed_caption")
    try:
        prompts.task_prompt(args.task, args.lang, args.history if args.video else None)
        image = load_image(args.image) if args.image else None
        frames = _load_frames(args.video) if args.video else None
        clip_ends = _ints(args.clip_ends) if args.clip_ends else None
        dt = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
        model, _, tok = load_pam(args.model, dtype=dt, llm_dtype=jnp.bfloat16)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tok is None:
        print(f"error: {args.model} has no tokenizer (llm/tokenizer.json)", file=sys.stderr)
        return 2
    penalty = args.repetition_penalty
    if penalty is None:
        penalty = float((tok.generation_config or {}).get("repetition_penalty", 1.0))
    sampling = SamplingParams(args.temperature, args.top_p, args.top_k, penalty)
    pred = PAMPredictor(model, tok, sampling=sampling, max_new_tokens=args.max_new_tokens)
    try:
        if frames is not None:
            return _run_video(args, pred, frames, regions[0], clip_ends)
        results = pred.describe_image(image, regions, args.task, args.lang)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = []
    for r, res in zip(regions, results):
        row = {**r, "text": res.text, "object_score": res.score, "mask_area": int(res.mask.sum())}
        rows.append(row)
        print(json.dumps(row, ensure_ascii=False) if args.json else res.text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(rows, ensure_ascii=False, indent=2))
        try:
            from pam_jax.viz import overlay_masks

            labels = [res.text[:40] or None for res in results]
            vis = overlay_masks(image, [res.mask for res in results], labels=labels)
            vis.save(out.with_suffix(".png"))
        except (ImportError, TypeError, ValueError) as e:  # the picture is optional
            print(f"warning: no overlay written: {e}", file=sys.stderr)
    return 0


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--clip-ends must be integers like 32,64,96, got {text!r}") from None


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


def _run_video(args, pred, frames, region, clip_ends) -> int:
    if clip_ends:
        results = pred.describe_stream(frames, region, clip_ends, args.lang)
        starts = [0, *clip_ends[:-1]]
    else:
        results = [pred.describe_video(frames, region, args.task, args.lang, history=args.history)]
        starts = [0]
    rows = []
    for s, res in zip(starts, results):
        row = {
            **region, "first_frame": s, "last_frame": s + len(res.masks) - 1, "text": res.text,
            "frames_fed": [s + int(f) for f in res.frames],
            "object_scores": [round(float(x), 4) for x in res.scores],
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row, ensure_ascii=False) if args.json else res.text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(rows, ensure_ascii=False, indent=2))
        np.save(out.with_name(out.name + "_masks.npy"), np.concatenate([r.masks for r in results]))
    return 0
