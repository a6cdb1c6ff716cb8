"""Evaluation throughput: `pam-jax eval`'s runner vs the release's way (one region per call).

    python benchmarks/bench_eval.py               # GPU: PAM-3B shapes (SAM 2.1-L + Qwen2.5-3B)
    python benchmarks/bench_eval.py --tiny --cpu  # CPU smoke test (tiny SAM 2 + tiny Qwen2)

Items / s of a recognition eval (8 new tokens) and a detailed-caption eval (128 new tokens) over
`--regions` (1000) box regions on `--images` (250) JPEG files (random pixels, 1024x768), random
weights, stop tokens off (every region generates exactly N tokens), through
`pam_jax.evaluation.runner` as `pam-jax eval` runs it: images decoded ahead on host threads,
regions of several images per batch (`--batch-size`, 32), SAM 2 + perceiver once per batch, one
generation per batch (dispatched from the runner's generation thread; `--ab-dispatch` also times
it dispatched from the main thread), predictions appended to predictions.jsonl. A warm-up
pass over the first and the last batch compiles every program first (the timed pass reuses
them).

The release's way (no batch eval code exists; its notebooks call `model.generate` once per
region): `bench_pam.py`'s PyTorch peer (official SAM 2 `set_image` + `predict(box)` + HF
`generate(inputs_embeds=...)`, bf16) with one region per call, timed on `--peer-regions` (16)
calls and scaled to the full set, right after the pam-jax figure of the same eval (JAX keeps
half the GPU, torch takes the rest). Goal: >= 20x.

Every figure is printed (flushed, with the seconds since start) as soon as it is measured, so a
run stopped by a time limit still reports what it finished. Needs the runtime dependencies
only (no pycocoevalcap, sentence-transformers: nothing is scored); the peer needs torch,
transformers and the official sam2 package (checked first; `--no-peer` skips it).
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

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")


def _items(d: Path, n_images: int, n_regions: int, task: str, size=(768, 1024)):
    from PIL import Image

    from pam_jax.evaluation.formats import Item

    rng = np.random.default_rng(0)
    h, w = size
    paths = []
    for i in range(n_images):
        p = d / f"{i:04d}.jpg"
        if not p.exists():
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p, quality=90)
        paths.append(str(p))
    items = []
    for k in range(n_regions):
        x1, y1 = rng.uniform(0, w - 320), rng.uniform(0, h - 280)
        box = [x1, y1, x1 + rng.uniform(50, 300), y1 + rng.uniform(50, 260)]
        items.append(Item(f"r{k}", "image", task, (paths[k * n_images // n_regions],),
                          {"box": [float(v) for v in box]}, ("ref",)))  # fmt: skip
    return items


T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


def check_deps(peer: bool) -> None:
    """Stop at once, in one line, when a module a later step imports is missing."""
    import importlib.util

    need = ["jax", "flax", "PIL", "pycocotools", "tqdm"]  # pycocotools: the RLE masks written
    if peer:
        need += ["torch", "transformers", "sam2"]
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if missing:
        hint = " (or --no-peer)" if set(missing) & {"torch", "transformers", "sam2"} else ""
        raise SystemExit(
            f"bench_eval: missing module(s) {', '.join(missing)}: pip install them{hint}"
        )


def bench_runner(model, tok, items, args, new: int, work: Path, inline: bool = False) -> dict:
    tag = f"{items[0].task}_{new}" + ("_inline" if inline else "")
    from pam_jax.evaluation.runner import Runner, run_predictions
    from pam_jax.pam.predictor import PAMPredictor

    pred = PAMPredictor(model, tok, max_new_tokens=new)
    runner = Runner(pred, batch_size=args.batch_size)
    if inline:
        from pam_jax.evaluation.runner import _Inline

        runner._dispatch = _Inline()
    # warm-up: the first and the last batch (a partial last batch has its own image and region
    # buckets), so the timed pass compiles nothing
    tail = len(items) % args.batch_size or args.batch_size
    warm = items[: args.batch_size] + (items[-tail:] if len(items) > args.batch_size else [])
    run_predictions(runner, warm, work / f"warm_{tag}", progress=False)
    t0 = time.perf_counter()
    stats = run_predictions(runner, items, work / f"run_{tag}", progress=False)
    dt = time.perf_counter() - t0
    assert stats["n_predicted"] == len(items), stats
    lines = (work / f"run_{tag}" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == len(items)
    n_tok = [len(json.loads(x)["pred"].split()) for x in lines[:4]]
    assert all(n == new for n in n_tok), n_tok  # stand-in decode: one word per token
    return {"seconds": dt, "items_per_s": len(items) / dt}


def bench_phases(model, tok, items, args, new: int) -> dict:
    """Seconds per group of each stage, the device synchronised after each (so they add up to
    more than the pipelined run): load + resize (host), SAM 2 + perceiver (all images of the
    group), the generation, the lines (masks to host, RLE)."""
    import jax

    from pam_jax.evaluation.runner import PendingGroup, Runner, _batches, load_image
    from pam_jax.pam.predictor import PAMPredictor

    pred = PAMPredictor(model, tok, max_new_tokens=new)
    runner = Runner(pred, batch_size=args.batch_size)
    groups = _batches(sorted(items, key=lambda it: it.media[0]), args.batch_size)
    groups = groups[: args.phases + 1]
    acc = {"load_s": 0.0, "sam2_s": 0.0, "llm_s": 0.0, "finish_s": 0.0, "llm_dispatch_s": 0.0}
    for k, g in enumerate(groups):  # group 0 warms up
        t0 = time.perf_counter()
        imgs = {p: pred.prepare_image(load_image(p)) for p in sorted({it.media[0] for it in g})}
        t1 = time.perf_counter()
        masks, errors, parts = runner._launch_sam2(g, imgs)
        jax.block_until_ready([m for m, _ in masks.values()] + [p[1].embeds for p in parts])
        t2 = time.perf_counter()
        texts, rows = runner._launch_llm(g[0].task, parts)
        pending = texts.future.result()  # the generation thread's dispatch has returned
        td = time.perf_counter()
        pending.gen.tokens.block_until_ready()
        t3 = time.perf_counter()
        PendingGroup(list(g), masks, errors, texts, rows).finish()
        t4 = time.perf_counter()
        if k:
            for key, dt in zip(acc, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, td - t2)):
                acc[key] += dt / (len(groups) - 1)
    out = {key: round(v, 4) for key, v in acc.items()}
    out["regions_per_group"] = args.batch_size
    say(f"phases per group of {args.batch_size} (synchronised): " +
        ", ".join(f"{key} {v * 1e3:.1f} ms" for key, v in acc.items()))  # fmt: skip
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tiny", action="store_true", help="tiny SAM 2 + Qwen2 (smoke test)")
    ap.add_argument("--cpu", action="store_true", help="run on CPU (JAX and torch)")
    ap.add_argument("--regions", type=int, default=None, help="regions (default 1000; tiny 16)")
    ap.add_argument("--images", type=int, default=None, help="images (default 250; tiny 4)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 32; tiny 8")
    ap.add_argument("--peer-regions", type=int, default=None, help="default 16; tiny 2")
    ap.add_argument("--new", default="8,128",
                    help="new tokens: recognition,detailed-caption (default 8,128)")  # fmt: skip
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--text-after", type=int, default=29)
    ap.add_argument("--no-peer", action="store_true", help="skip the PyTorch peer")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--phases", type=int, default=4,
                    help="time each stage of this many groups, synchronised (0: skip)")  # fmt: skip
    ap.add_argument("--tasks", default="recognize,detailed-caption",
                    help="which evals to run (default both)")  # fmt: skip
    ap.add_argument("--ab-dispatch", action="store_true",
                    help="also time each eval with its generations dispatched from the main "
                         "thread (the runner before its generation thread)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
    args.regions = args.regions or (16 if args.tiny else 1000)
    args.images = args.images or (4 if args.tiny else 250)
    args.batch_size = args.batch_size or (8 if args.tiny else 32)
    args.peer_regions = args.peer_regions or (2 if args.tiny else 16)
    news = [int(v) for v in args.new.split(",")]
    if len(news) != 2 or min(news) < 1:
        ap.error("--new is two token counts: recognition,detailed-caption")
    if args.tiny:
        news = [min(n, 8) for n in news]
    evals = [e for e in zip(("recognize", "detailed-caption"), news) if e[0] in args.tasks]
    os.environ.setdefault("PAM_JAX_PROGRESS", "0")
    check_deps(not args.no_peer)

    import gc

    import jax
    import jax.numpy as jnp
    from bench_pam import StandInTokenizer, _configs, bench_torch
    from flax import nnx

    from pam_jax.checkpoint import random_normal_params
    from pam_jax.cliutil import read_image
    from pam_jax.llm.qwen2 import Qwen2ForCausalLM
    from pam_jax.pam.model import PAM, PAMParts
    from pam_jax.pam.predictor import PAMPredictor
    from pam_jax.sam2.model import SAM2Base

    cfg, sam2_name = _configs(args.tiny)
    dt = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    say(f"device: {jax.devices()[0].device_kind}; SAM 2 {sam2_name} at {cfg.sam2.image_size}, "
        f"LLM hidden {cfg.llm.hidden_size} x {cfg.llm.num_hidden_layers}; {args.regions} "
        f"regions over {args.images} images, batch {args.batch_size}")  # fmt: skip
    sam2 = random_normal_params(lambda: SAM2Base(cfg.sam2, rngs=nnx.Rngs(0), dtype=dt))
    parts = random_normal_params(lambda: PAMParts(cfg, rngs=nnx.Rngs(0), dtype=dt), seed=1)
    make_llm = lambda: Qwen2ForCausalLM(cfg.llm, rngs=nnx.Rngs(0), dtype=dt, param_dtype=dt)  # noqa: E731
    llm = random_normal_params(make_llm, seed=2) if args.tiny else make_llm()
    model = PAM(cfg, sam2=sam2, parts=parts, llm=llm)
    tok = StandInTokenizer(cfg.llm.vocab_size, 14, args.text_after)
    say("models built")
    res: dict = {"config": vars(args) | {"sam2": sam2_name, "new": news}}

    def dump():  # after every figure: a stopped run keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "img").mkdir()
        for task, new in evals:
            items = _items(work / "img", args.images, args.regions, task)
            r = bench_runner(model, tok, items, args, new, work)
            if args.ab_dispatch:
                r["inline_dispatch"] = bench_runner(model, tok, items, args, new, work, True)
                say(f"pam-jax eval, {task}, generations dispatched from the main thread: "
                    f"{r['inline_dispatch']['items_per_s']:.1f} items/s; from the generation "
                    f"thread: {r['items_per_s']:.1f}")  # fmt: skip
            if args.phases:
                r["phases"] = bench_phases(model, tok, items, args, new)
            res[f"jax_{task}"] = r
            say(f"pam-jax eval, {task} ({new} new tokens): {r['items_per_s']:.1f} items/s "
                f"({r['seconds']:.1f} s for {args.regions})")  # fmt: skip
            if "seq_len" not in res:  # the LLM input length, for the peer
                img = read_image(items[0].media[0])
                inp = PAMPredictor(model, tok).image_inputs(img, [items[0].region], "recognize")
                res["seq_len"] = int(inp.llm.lengths[0])
            dump()
            if args.no_peer:
                continue
            gc.collect()
            peer_args = argparse.Namespace(
                regions=1, reps=max(1, args.peer_regions // 2), new=new, cpu=args.cpu,
                dtype=args.dtype,
            )  # fmt: skip
            t = bench_torch(cfg, sam2_name, res["seq_len"], peer_args)
            per = (t["item_s"] + t["batch_s"]) / 2  # both are one-region calls here
            ips = 1.0 / per
            res[f"torch_{task}"] = {"s_per_region": per, "items_per_s": ips,
                                   "scaled_s": per * args.regions}  # fmt: skip
            ratio = res[f"jax_{task}"]["items_per_s"] / ips
            say(f"release's way, {task} ({new} new tokens, one region per call, "
                f"{2 * peer_args.reps} calls): {ips:.2f} items/s -> {per * args.regions:.0f} s "
                f"for {args.regions}; pam-jax {ratio:.1f}x (goal 20x)")  # fmt: skip
            res[f"speedup_{task}"] = ratio
            dump()
            t = None
            gc.collect()
            _free_torch()
    return 0


def _free_torch() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    raise SystemExit(main())
