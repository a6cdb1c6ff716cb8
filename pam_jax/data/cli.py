"""`pam-jax data prepare` (JSONL -> dataset folder) and `pam-jax data inspect` (counts, token
lengths, a sheet of samples)."""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from pam_jax.cliutil import CLIError, positive_int


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "data",
        help="prepare and inspect training data (release JSONL -> TFDS ArrayRecord)",
        description="Prepare the release's JSONL region records as one dataset folder, or "
        "inspect a prepared one.",
    )
    cmd = p.add_subparsers(dest="data_command", metavar="WHAT", required=True)
    pr = cmd.add_parser(
        "prepare",
        help="check JSONL records and write them as one TFDS ArrayRecord dataset",
        description="Check every record (bad ones are reported with file and line in "
        "DATASET_DIR/prepare_report.json and skipped) and write one dataset folder, atomically.",
    )
    pr.add_argument("--jsonl", nargs="+", required=True, metavar="FILE", help="record files")
    pr.add_argument("--image-root", help="folder the records' image / frame paths are relative to")
    pr.add_argument("--out", required=True, metavar="DATASET_DIR", help="dataset folder to write")
    pr.add_argument("--strict", action="store_true", help="stop at the first bad record")
    pr.add_argument(
        "--image-size",
        type=positive_int,
        metavar="N",
        help="store pictures resized once to N x N (PIL bicubic, lossless PNG; original size kept)",
    )
    pr.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1)
    pr.add_argument("--force", action="store_true", help="replace an existing DATASET_DIR")
    ins = cmd.add_parser(
        "inspect",
        help="counts, token-length statistics and a sheet of samples of a dataset",
        description="Print counts and length statistics of a prepared dataset; --out draws "
        "samples with their prompts, masks and conversations.",
    )
    ins.add_argument("dataset", metavar="DATASET_DIR")
    ins.add_argument("--out", metavar="PNG", help="write a sheet of samples there")
    ins.add_argument(
        "--tokenizer", metavar="DIR", help="a model or tokenizer folder (token lengths)"
    )
    ins.add_argument("--samples", type=positive_int, default=8, help="samples on the sheet")
    ins.add_argument("--limit", type=positive_int, help="read at most this many records")
    return p


def run(args) -> int:
    if args.data_command == "prepare":
        return run_prepare(args)
    return run_inspect(args)


def run_prepare(args) -> int:
    from pam_jax.data.prepare import REPORT, prepare
    from pam_jax.data.records import RecordError

    for f in args.jsonl:
        if not Path(f).is_file():
            raise CLIError(f"--jsonl {f}: no such file")
    if args.image_root is not None and not Path(args.image_root).is_dir():
        raise CLIError(f"--image-root {args.image_root}: no such folder")
    try:
        rep = prepare(
            args.jsonl,
            args.image_root,
            args.out,
            strict=args.strict,
            image_size=args.image_size,
            force=args.force,
            workers=args.workers,
        )
    except RecordError as e:  # --strict
        raise CLIError(f"bad record (--strict; nothing written): {e}") from None
    print(  # the command's result (stdout), not a progress line
        f"{rep['written']} of {rep['records_read']} records written to {args.out} "
        f"({', '.join(f'{v} {k}' for k, v in rep['written_by_kind'].items()) or 'none'}); "
        f"{rep['skipped_count']} skipped"
        + (f": {json.dumps(rep['skipped_by_reason'])}" if rep["skipped_count"] else "")
        + f"; report: {Path(args.out) / REPORT}"
    )
    return 0


def _stats(x: list[int]) -> str:
    if not x:
        return "-"
    a = np.asarray(x)
    p50, p95 = np.percentile(a, [50, 95])
    return f"min {a.min()}  mean {a.mean():.1f}  p50 {p50:.0f}  p95 {p95:.0f}  max {a.max()}"


def run_inspect(args) -> int:
    from pam_jax.data.preprocess import PreprocessConfig, tokenize_conversation
    from pam_jax.data.source import dataset_report, is_dataset_dir, load_element, open_source

    if not is_dataset_dir(args.dataset):
        raise CLIError(f"{args.dataset} is not a prepared dataset (run `pam-jax data prepare`)")
    rep = dataset_report(args.dataset)
    src = open_source(args.dataset)
    tok = None
    if args.tokenizer:
        from pam_jax.llm.tokenizer import Tokenizer

        d = Path(args.tokenizer)
        tok = Tokenizer.from_dir(d / "llm" if (d / "llm" / "tokenizer.json").is_file() else d)
    cfg = PreprocessConfig()
    n = len(src) if args.limit is None else min(len(src), args.limit)
    kinds, prompts, masks, lengths, words = Counter(), Counter(), 0, {}, []
    for i in range(n):
        rec, _ = load_element(src[i])
        kinds[rec.kind] += 1
        a = rec.annotations[0]
        prompts[
            "box+points" if a.box and a.points is not None else "box" if a.box else "points"
        ] += 1
        masks += any(x.mask is not None for x in rec.annotations)
        words.append(sum(len(t.text.split()) for t in rec.conversations))
        if tok is not None:
            ib, ia, _, la = tokenize_conversation(rec.conversations, tok)
            total = len(ib) + len(ia) + cfg.visual_length(rec.kind)
            lengths.setdefault(rec.kind, []).append(total)
            lengths.setdefault("supervised", []).append(int((la != -100).sum()))
    print(f"dataset {args.dataset}: {len(src)} records ({n} read)")
    print(f"  kinds: {dict(kinds)}   first-frame prompts: {dict(prompts)}   with masks: {masks}")
    print(
        f"  prepare: {rep['records_read']} read, {rep['written']} written, "
        f"{rep['skipped_count']} skipped {rep.get('skipped_by_reason', {})}"
    )
    for f, c in rep.get("per_file", {}).items():
        print(f"    {f}: {c}")
    print(f"  words per conversation: {_stats(words)}")
    for k, v in lengths.items():
        what = "supervised tokens" if k == "supervised" else f"LLM sequence length ({k})"
        print(f"  {what}: {_stats(v)}")
    if args.out:
        sheet(src, min(args.samples, len(src)), args.out)
        print(f"  sheet: {args.out}")
    return 0


def sheet(src, k: int, out: str | os.PathLike, cell: int = 320) -> Path:
    """k samples (evenly spread) as a grid: frame 0 with its prompt and mask, conversation."""
    from PIL import Image, ImageDraw

    from pam_jax import viz
    from pam_jax.data.preprocess import decode_mask
    from pam_jax.data.source import load_element

    cols = min(4, max(k, 1))
    rows = -(-k // cols)
    text_h = 120
    page = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(page)
    font = viz.font(12)
    for j, i in enumerate(np.linspace(0, len(src) - 1, k).astype(int) if k else []):
        rec, frames = load_element(src[int(i)])
        img = np.asarray(frames[0])
        hw = rec.orig_hw or img.shape[:2]
        a = rec.annotations[0]
        m = np.zeros(hw, bool) if a.mask is None else decode_mask(a.mask, hw).astype(bool)
        pic = Image.fromarray(img).resize((hw[1], hw[0])) if img.shape[:2] != hw else img
        drawn = viz.overlay_masks(
            pic,
            [m],
            boxes=None if a.box is None else [a.box],
            points=None if a.points is None else a.points,
            point_labels=None if a.labels is None else a.labels.tolist(),
        )
        scale = cell / max(drawn.size)
        drawn = drawn.resize(
            (max(1, round(drawn.width * scale)), max(1, round(drawn.height * scale)))
        )
        x0, y0 = (j % cols) * cell, (j // cols) * (cell + text_h)
        page.paste(drawn, (x0, y0))
        lines = [f"{rec.kind} {Path(rec.source).name}:{rec.line} ({len(rec.frames)} frames)"]
        lines += [viz.shorten(f"{t.role}: {t.text}", 52) for t in rec.conversations[:5]]
        draw.multiline_text((x0 + 4, y0 + cell + 2), "\n".join(lines), fill="black", font=font)
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    page.save(p)
    return p
