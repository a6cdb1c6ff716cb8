"""Data loader throughput: records / s of the full pipeline (read ArrayRecord, decode JPEG,
PIL bicubic resize to S x S, prompt augmentation, chat template + label masking, collate into a
static Batch). Host-only; no accelerator is touched.

    python benchmarks/bench_data.py                       # 1024^2 images from 640x480 JPEGs
    python benchmarks/bench_data.py --threads 16          # the GPU machine's 16 cores (threads)
    python benchmarks/bench_data.py --workers 14          # ... or grain worker processes
    python benchmarks/bench_data.py --videos 64 --records 0 --batch 2   # 16-of-32-frame videos
    python benchmarks/bench_data.py --tiny --cpu          # smoke test (seconds)
    python benchmarks/bench_data.py --image-size 256 --pack 4 --seq-len 2048  # packed rows

Synthetic records (random-texture JPEGs at --image-hw, COCO-like 640x480 by default; a box and
5 points each; a ~40-word answer) are written with `pam-jax data prepare` into a temporary
folder (not timed), then `make_dataset(..., shuffle=True, augment=True)` is iterated: the first
--warmup batches are discarded, the next --batches timed. The tokenizer is a byte-level
ChatML BPE without merges (every byte a token: more tokens than Qwen's, so a pessimistic
tokenize cost). Prints one JSON line; `cpu_ms_per_record` (threads mode) is the pipeline's CPU
cost per record, independent of how busy the machine is. `first_batch_s` is the time from
building the pipeline to the first batch (worker mode: spawning the workers, each importing
pam_jax and opening the dataset). Stage times go to stderr as they happen (flushed), and the
result line is printed and flushed before the iterator (and its workers) is closed, so a slow
shutdown or a timeout never swallows it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ANSWER = (
    "A brown tabby cat with white paws sits on a wooden chair near the window, its tail curled "
    "around its legs, looking at something outside while the afternoon light falls across the "
    "floor and the cushions behind it."
)


def byte_tokenizer():
    """Byte-level BPE without merges plus the ChatML specials (Qwen2's structure)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from pam_jax.llm.tokenizer import Tokenizer as PamTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PamTokenizer(tok, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})


def write_records(d: Path, n_images: int, n_videos: int, hw: tuple[int, int], frames: int):
    from PIL import Image

    rs = np.random.RandomState(0)
    h, w = hw
    rows = []
    base = rs.randint(0, 255, (h // 8, w // 8, 3), np.uint8)

    def picture(path: Path, k: int) -> None:  # smooth texture: JPEG size like a photo's
        img = np.roll(base, k, axis=1).repeat(8, 0).repeat(8, 1)
        img = (img.astype(np.int16) + rs.randint(-20, 20, img.shape)).clip(0, 255)
        Image.fromarray(img.astype(np.uint8)).save(path, quality=90)

    box = [w * 0.2, h * 0.2, w * 0.4, h * 0.5]
    pts = [[w * (0.25 + 0.05 * i), h * (0.3 + 0.04 * i)] for i in range(5)]
    conv = [
        {"from": "human", "value": "<image>\nProvide a concise caption for this subject."},
        {"from": "gpt", "value": ANSWER},
    ]
    for i in range(n_images):
        picture(d / f"img{i}.jpg", i)
        rows.append(
            {"type": "image", "image": f"img{i}.jpg", "conversations": conv, "bbox": box,
             "points": pts, "labels": [1, 1, 0, 1, 0]}
        )  # fmt: skip
    for v in range(n_videos):
        (d / f"v{v}").mkdir()
        names = [f"{k:05d}.jpg" for k in range(frames)]
        for k, name in enumerate(names):
            picture(d / f"v{v}" / name, v + k)
        rows.append(
            {"type": "video", "image_root": f"v{v}", "frames": names, "masked_frames": names[:2],
             "conversations": conv, "bbox": [box, box], "points": [pts[:3], pts[:3]],
             "labels": [[1, 1, 0], [1, 1, 0]]}
        )  # fmt: skip
    jsonl = d / "records.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return jsonl


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--records", type=int, default=512, help="image records")
    p.add_argument("--videos", type=int, default=0, help="video records")
    p.add_argument("--video-frames", type=int, default=32, help="stored frames per video")
    p.add_argument("--num-frames", type=int, default=16, help="frames per video sample")
    p.add_argument("--image-hw", default="480,640", help="stored picture size H,W")
    p.add_argument("--image-size", type=int, default=1024, help="model input size S")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--workers", type=int, default=0, help="grain worker processes (0: threads)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--pack", type=int, default=0, help="pack up to N samples a row (0: off)")
    p.add_argument("--seq-len", type=int, default=0,
                   help="fixed row length, as the trainer pads (0: 64-multiples)")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="smoke test: few small records")
    p.add_argument("--cpu", action="store_true", help="(accepted; the loader is host-only)")
    args = p.parse_args(argv)
    if args.tiny:
        args.records, args.videos, args.video_frames = 16, min(args.videos, 2), 6
        args.image_hw, args.image_size, args.batch = "96,128", 128, 4
        args.warmup, args.batches = 1, 4
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pam_jax.data.pipeline import make_dataset
    from pam_jax.data.prepare import prepare
    from pam_jax.data.preprocess import PreprocessConfig

    hw = tuple(int(v) for v in args.image_hw.split(","))
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[bench_data {time.perf_counter() - t_start:6.1f} s] {msg}", file=sys.stderr,
              flush=True)  # fmt: skip

    if args.pack and not args.seq_len:
        p.error("--pack needs --seq-len (the packed row length)")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        jsonl = write_records(d, args.records, args.videos, hw, args.video_frames)
        t0 = time.perf_counter()
        rep = prepare([jsonl], d, d / "ds", workers=args.threads)
        prep_s = time.perf_counter() - t0
        log(f"prepared {rep['written']} records in {prep_s:.1f} s")
        # the visual block PAM sees at this size (1042 at 1024 px: (1024 / 32)^2 + 16 + 2)
        nv = (args.image_size // 16 // 2) ** 2 + 18
        cfg = PreprocessConfig(
            image_size=args.image_size, num_frames=args.num_frames, num_visual=nv
        )
        pack = dict(pack=True, pack_max=args.pack) if args.pack else {}
        if args.seq_len:
            pack["seq_bucket"] = [args.seq_len]
        ds = make_dataset(
            d / "ds",
            tokenizer=byte_tokenizer(),
            cfg=cfg,
            batch_size=args.batch,
            seed=0,
            shuffle=True,
            augment=True,
            num_threads=args.threads,
            worker_count=args.workers,
            **pack,
        )
        t0 = time.perf_counter()
        it = iter(ds)
        b = next(it)
        first_s = time.perf_counter() - t0
        log(f"first batch after {first_s:.1f} s ({args.workers} workers, {args.threads} threads)")
        for _ in range(args.warmup - 1):
            b = next(it)
        t0, c0 = time.perf_counter(), time.process_time()
        samples, real = 0, 0
        for _ in range(args.batches):
            b = next(it)
            samples += int((b.record_index >= 0).sum())
            real += int(b.mask.sum())
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        log(f"timed {args.batches} batches in {dt:.1f} s")
        n = samples
        out = {
            "bench": "data",
            "records_per_s": round(n / dt, 1),
            "batch_per_s": round(args.batches / dt, 2),
            # CPU seconds of this process per record (threads mode: the whole pipeline's cost, which
            # does not depend on how busy the machine is; 1 / this = records / s per free core)
            "cpu_ms_per_record": None if args.workers else round(1000 * cpu / n, 1),
            "load_avg_1m": round(os.getloadavg()[0], 1),
            "batch": args.batch,
            "threads": args.threads,
            "workers": args.workers,
            "cpus": os.cpu_count(),
            "stored_hw": list(hw),
            "image_size": args.image_size,
            "kinds": rep["written_by_kind"],
            "num_frames": args.num_frames if args.videos else 1,
            "first_batch_s": round(first_s, 1),
            "pack_max": args.pack,
            "samples_per_batch": round(n / args.batches, 2),
            # non-padding share of the LLM positions (what packing raises)
            "fill": round(real / (args.batches * b.mask.size), 3),
            "seq_len": int(b.text_ids.shape[1]),
            "batch_mb": round(sum(v.nbytes for v in vars(b).values()) / 2**20, 1),
            "prepare_records_per_s": round(rep["written"] / prep_s, 1),
        }
        print(json.dumps(out), flush=True)
        if hasattr(it, "close"):  # worker mode: stop the workers now, not one by one at exit
            it.close()
        log("closed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
