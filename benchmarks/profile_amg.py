"""Where an automatic-mask image's time goes: each stage of `SAM2AutomaticMaskGenerator` timed
(device work synchronised), pam-jax only, the model of `bench_amg.py`.

    python benchmarks/profile_amg.py            # SAM 2.1-L at 1024, 32 x 32 points, 1024 x 1536
    python benchmarks/profile_amg.py --variants highest:64,bf16x6:64,taps:64,bf16x6:256 --peer
    python benchmarks/profile_amg.py --peer --variants \
        bf16x3:64:PAM_JAX_AMG_FILTER=matmul:PAM_JAX_CONVT=conv:PAM_JAX_FEW_TOKENS=0,bf16x3:64
    python benchmarks/profile_amg.py --tiny --cpu

`--variants MODE:BATCH[:NAME=VALUE...],...` times the generator once per variant: a
`PAM_JAX_BILINEAR` mode, a device batch and environment settings read at trace time
(`PAM_JAX_AMG_FILTER=matmul|taps`, the filter's upsample; `PAM_JAX_CONVT=conv|matmul`, the
decoder's 2x2 up-convolutions; `PAM_JAX_FEW_TOKENS=0|32`, the few-token attention), in one
process (caches cleared between); `--peer` times the official generator (default
settings, bf16 autocast) on the same images first, so each variant gets its ratio in the run.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", default="highest:64", help="MODE:BATCH[:NAME=VALUE...],...")
    ap.add_argument("--peer", action="store_true", help="time the official generator too")
    args = ap.parse_args(argv)
    if args.cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.dirname(__file__))
    import bench_amg

    import pam_jax.sam2.automatic_mask_generator as amg
    from pam_jax.sam2 import amg_utils

    size, image_size = ("t", 256) if args.tiny else ("l", 1024)
    hw = (240, 320) if args.tiny else (1024, 1536)
    pps = 8 if args.tiny else 32
    dtype = jnp.float32 if args.cpu else jnp.bfloat16
    dev = "cpu" if args.cpu else "cuda"
    ref, model, _ = bench_amg._official(size, image_size, dev, dtype)
    images = bench_amg._images(hw, 3)
    print(f"device {jax.devices()[0].device_kind}; images {hw}; {pps} x {pps} points", flush=True)
    official_s = None
    if args.peer:
        import torch
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator as Official

        gen = Official(ref, points_per_side=pps)
        s = image_size
        gen.predictor._bb_feat_sizes = [(s // 4,) * 2, (s // 8,) * 2, (s // 16,) * 2]

        def official(im):
            with torch.inference_mode(), torch.autocast(dev, torch.bfloat16, enabled=dev == "cuda"):
                r = gen.generate(im)
            if dev == "cuda":
                torch.cuda.synchronize()
            return r

        official_s, counts = bench_amg._median_per_image(official, images, args.reps)
        print(f"official: {official_s * 1e3:.1f} ms/image (masks {counts})", flush=True)
        del gen
        if dev == "cuda":
            torch.cuda.empty_cache()
    ref = None
    names = ("encode_image", "_decode_points", "_filter_candidates", "_gather_upsample")
    orig = {name: getattr(amg, name) for name in names}
    orig_nms = amg_utils.nms_host
    for variant in args.variants.split(","):
        mode, batch, *rest = variant.split(":")
        os.environ["PAM_JAX_BILINEAR"] = mode
        for name in ("PAM_JAX_AMG_FILTER", "PAM_JAX_CONVT", "PAM_JAX_FEW_TOKENS"):
            os.environ.pop(name, None)
        for kv in rest:  # NAME=VALUE settings of this variant
            name, value = kv.split("=", 1)
            os.environ[name] = value
        jax.clear_caches()
        times: dict[str, list[float]] = collections.defaultdict(list)

        def timed(name, fn, times=times):
            def wrapper(*a, **kw):
                t0 = time.perf_counter()
                out = jax.block_until_ready(fn(*a, **kw))
                times[name].append(time.perf_counter() - t0)
                return out

            return wrapper

        amg.encode_image = timed("encode_image", orig["encode_image"])
        amg._decode_points = timed("decode_points", orig["_decode_points"])
        amg._filter_candidates = timed("filter_candidates (upsample+filter)",
                                       orig["_filter_candidates"])  # fmt: skip
        amg_utils.nms_host = timed("nms_host", orig_nms)
        amg._gather_upsample = timed("gather_upsample", orig["_gather_upsample"])
        gen = amg.SAM2AutomaticMaskGenerator(model, points_per_side=pps, device_batch=int(batch))
        counts = [len(gen.generate(im)) for im in images]  # compile
        times.clear()
        tot = []
        for _ in range(args.reps):
            for im in images:
                t0 = time.perf_counter()
                gen.generate(im)
                tot.append(time.perf_counter() - t0)
        n = len(tot)
        med = float(np.median(tot))
        rec = {"variant": variant, "ms_per_image": med * 1e3, "masks": counts}
        if official_s:
            rec["speedup"] = official_s / med
        rec["stages_ms"] = {k: round(float(np.sum(v) / n * 1e3), 2) for k, v in times.items()}
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
