"""Where an automatic-mask image's time goes: each stage of `SAM2AutomaticMaskGenerator` timed
(device work synchronised), pam-jax only, the model of `bench_amg.py`.

    python benchmarks/profile_amg.py            # SAM 2.1-L at 1024, 32 x 32 points, 1024 x 1536
    python benchmarks/profile_amg.py --tiny --cpu
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
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
    _, model, _ = bench_amg._official(size, image_size, "cpu", dtype)
    images = bench_amg._images(hw, 3)
    times: dict[str, list[float]] = collections.defaultdict(list)

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(*a, **k))
            times[name].append(time.perf_counter() - t0)
            return out

        return wrapper

    amg.encode_image = timed("encode_image", amg.encode_image)
    amg._decode_points = timed("decode_points (16 x 64 points)", amg._decode_points)
    amg._filter_candidates = timed("filter_candidates (upsample+filter)", amg._filter_candidates)
    amg_utils.nms_host = timed("nms_host", amg_utils.nms_host)
    amg._gather_upsample = timed("gather_upsample", amg._gather_upsample)
    gen = amg.SAM2AutomaticMaskGenerator(model, points_per_side=pps)
    gen._collect = timed("collect (upsample + host masks)", gen._collect)
    gen._process_crop = timed("process_crop (all)", gen._process_crop)
    gen.generate_masks = timed("generate_masks (all)", gen.generate_masks)
    for im in images:  # compile
        gen.generate(im)
    times.clear()
    tot = []
    for _ in range(args.reps):
        for im in images:
            t0 = time.perf_counter()
            recs = gen.generate(im)
            tot.append(time.perf_counter() - t0)
    n = len(tot)
    # the decoder alone over the same 16 x 64 points (what the filtering adds is the rest)
    from pam_jax.prepared import merge

    feats = amg.encode_image(gen._prep, images[0], image_size)
    nb, b = -(-pps * pps // 64), 64
    xy = jnp.asarray(np.random.default_rng(0).uniform(0, image_size, (nb, b, 2)), jnp.float32)

    @jax.jit
    def decode_only(leaves, feats, xy):
        m = merge(gen._prep.structure, leaves)

        def one(p):
            out = m.decode_prompts(
                feats["image_embed"], feats["high_res_feats"], p[:, None, :],
                jnp.ones((b, 1), jnp.int32), multimask_output=True,
            )  # fmt: skip
            return out.masks.astype(jnp.float32).sum(), out.iou_pred.sum()

        return jax.lax.map(one, xy)

    jax.block_until_ready(decode_only(gen._prep.leaves, feats, xy))
    t0 = time.perf_counter()
    for _ in range(3):
        jax.block_until_ready(decode_only(gen._prep.leaves, feats, xy))
    times["decoder alone (no upsample/filter)"] = [(time.perf_counter() - t0) / 3 * n]
    print(f"device {jax.devices()[0].device_kind}; images {hw}; masks per image {len(recs)}")
    print(f"generate total: median {np.median(tot) * 1e3:.1f} ms")
    for k, v in times.items():
        print(f"  {k:36s} {np.sum(v) / n * 1e3:8.1f} ms/image  ({len(v) / n:.1f} calls/image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
