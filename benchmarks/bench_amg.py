"""Automatic mask generation (issue 16): pam-jax vs the official `SAM2AutomaticMaskGenerator`.

    python benchmarks/bench_amg.py                 # GPU: SAM 2.1-L at 1024, 32 x 32 points
    python benchmarks/bench_amg.py --tiny --cpu    # CPU smoke test (SAM 2.1-t at 256, 8 x 8)

Both sides run the SAME random weights: the official model is built (random init, perturbed),
saved as an official `.pt` and converted with `pam-jax convert sam2`, so they find the same
masks. Images: scikit-image's photos (`astronaut` 512 x 512, `chelsea` 300 x 451, `coffee`
400 x 600) resized to `--image-hw` (default 1024 x 1536, a typical photo). Timed per image,
end to end (`generate(image)` -> records with binary masks; host RLE / decode included), median
over `--reps` passes of the images after one warm-up pass. On the GPU both compute in bf16
(pam-jax: `load_sam2(dtype=bfloat16)`; official: `torch.autocast(bfloat16)`, as its README
runs it); on the CPU float32. Settings:

- default: the official defaults (points_per_side 32, points_per_batch 64, pred_iou_thresh 0.8,
  stability_score_thresh 0.95, box NMS 0.7, no crops). With random weights few masks pass;
  the number kept is printed;
- loose: the same with both thresholds 0, so every mask reaches NMS (a busy image's load on the
  host side: RLE, records).

Then, at PAM-3B shapes (SAM 2.1-L + perceiver + Qwen2.5-3B, random weights, bf16), seconds per
image for the masks plus one `recognize` generation (`--new` tokens, stop tokens disabled) of
every region (at most `--regions`, largest first) in one batch (`pam_jax.pam.perceive.perceive`).

The official generator needs torchvision's compiled `nms`; where the installed torchvision
cannot load its C++ ops, a vectorised torch port of torchvision's kernel is patched in (said in
the output). Goal (issue 16): >= 5x the official generator's images/s (default settings).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")  # torch shares the GPU


def _images(hw: tuple[int, int], n: int) -> list[np.ndarray]:
    from PIL import Image

    try:
        from skimage import data

        photos = [data.astronaut(), data.chelsea(), data.coffee()]
    except ImportError:  # scikit-image is a test extra: smooth random pictures instead
        rng = np.random.default_rng(0)
        photos = [np.asarray(Image.fromarray(rng.integers(0, 256, (24, 32, 3), np.uint8))
                             .resize((640, 480), Image.BICUBIC)) for _ in range(3)]  # fmt: skip
    h, w = hw
    return [np.asarray(Image.fromarray(p).resize((w, h), Image.BICUBIC)) for p in photos[:n]]


def _torch_nms_port():
    """torchvision's CPU nms kernel semantics, vectorised (IoU matrix, greedy pass on host)."""
    import torch

    def batched_nms(boxes, scores, idxs, iou_threshold):
        boxes = boxes.float()
        order = torch.sort(scores, stable=True, descending=True)[1]
        b = boxes[order]
        x1, y1, x2, y2 = b.unbind(1)
        area = (x2 - x1) * (y2 - y1)
        iw = (torch.minimum(x2[:, None], x2) - torch.maximum(x1[:, None], x1)).clamp(min=0)
        ih = (torch.minimum(y2[:, None], y2) - torch.maximum(y1[:, None], y1)).clamp(min=0)
        inter = iw * ih
        over = (inter / (area[:, None] + area - inter) > iou_threshold).cpu().numpy()
        same = (idxs[order][:, None] == idxs[order][None]).cpu().numpy()
        over &= same
        keep = np.ones(len(order), bool)
        for i in range(len(order)):
            if keep[i]:
                keep[i + 1 :] &= ~over[i, i + 1 :]
        return order[torch.from_numpy(np.flatnonzero(keep)).to(order.device)]

    return batched_nms


def _official(size: str, image_size: int, dev: str, dtype):
    """The official model (random, perturbed) and a converted pam-jax copy."""
    import torch

    # appended: tests/sam2 must not shadow the official sam2 package
    sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
    from torch_ref import build_official_sam2, tv_shim

    tv_shim()
    import sam2.automatic_mask_generator as official_amg

    try:
        from torchvision.ops import batched_nms

        batched_nms(torch.zeros(1, 4), torch.zeros(1), torch.zeros(1, dtype=torch.long), 0.5)
        patched = False
    except Exception:
        official_amg.batched_nms = _torch_nms_port()
        patched = True
    ref = build_official_sam2(size, "2.1", image_size=image_size, seed=0)
    from pam_jax.cli import main as cli
    from pam_jax.sam2.loading import load_sam2

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "sam2.pt"
        torch.save({"model": ref.state_dict()}, ckpt)
        argv = ["convert", "sam2", str(ckpt), str(Path(tmp) / "m")]
        if image_size != 1024:
            argv += ["--image-size", str(image_size)]
        assert cli(argv) == 0
        model, _ = load_sam2(Path(tmp) / "m", dtype=dtype)  # compute dtype; params float32
    return ref.to(dev), model, patched


def _median_per_image(fn, images, reps: int) -> tuple[float, list[int]]:
    counts = [len(fn(im)) for im in images]  # warm-up / compile
    ts = []
    for _ in range(reps):
        for im in images:
            t0 = time.perf_counter()
            fn(im)
            ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), counts


def bench_masks(args, settings: dict) -> dict:
    import jax.numpy as jnp
    import torch

    from pam_jax.sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    dev = "cpu" if args.cpu else "cuda"
    # bf16 compute on the GPU on both sides (the official one under torch.autocast)
    dtype = jnp.float32 if args.cpu else jnp.bfloat16
    ref, model, patched = _official(args.size, args.image_size, dev, dtype)
    images = _images(args.image_hw, args.images)
    out = {"torchvision_nms_port": patched}
    for name, kw in settings.items():
        kw = dict(points_per_side=args.points_per_side, **kw)
        ours = SAM2AutomaticMaskGenerator(model, **kw)
        t, counts = _median_per_image(ours.generate, images, args.reps)
        out[name] = {"pam_jax_s": t, "pam_jax_masks": counts}
        if not args.no_peer:
            from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator as Official

            gen = Official(ref, **kw)
            s = args.image_size  # the official predictor hard-codes 1024's feature sizes
            gen.predictor._bb_feat_sizes = [(s // 4,) * 2, (s // 8,) * 2, (s // 16,) * 2]

            def official(im, gen=gen):
                with (
                    torch.inference_mode(),
                    torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"),
                ):
                    r = gen.generate(im)
                if dev == "cuda":
                    torch.cuda.synchronize()
                return r

            t2, c2 = _median_per_image(official, images, args.reps)
            out[name] |= {"official_s": t2, "official_masks": c2, "speedup": t2 / t}
        _print_setting(name, out[name])  # as soon as measured: a cut-off run keeps it
    ref = None
    gc.collect()
    if not args.cpu:
        torch.cuda.empty_cache()
    return out


def _print_setting(name: str, r: dict) -> None:
    line = f"{name}: pam-jax {r['pam_jax_s']:.3f} s/image ({1 / r['pam_jax_s']:.2f} img/s, "
    line += f"masks {r['pam_jax_masks']})"
    if "official_s" in r:
        line += (f"; official {r['official_s']:.3f} s/image (masks {r['official_masks']}); "
                 f"speed-up {r['speedup']:.2f}x")  # fmt: skip
    print(line, flush=True)


def bench_perceive(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    sys.path.insert(0, os.path.dirname(__file__))
    from bench_pam import StandInTokenizer, _configs

    from pam_jax.checkpoint import random_normal_params
    from pam_jax.llm.qwen2 import Qwen2ForCausalLM
    from pam_jax.pam.model import PAM, PAMParts
    from pam_jax.pam.perceive import perceive
    from pam_jax.pam.predictor import PAMPredictor
    from pam_jax.sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
    from pam_jax.sam2.model import SAM2Base

    jax.clear_caches()
    cfg, _ = _configs(args.tiny)
    dt = jnp.float32 if args.cpu else jnp.bfloat16
    sam2 = random_normal_params(lambda: SAM2Base(cfg.sam2, rngs=nnx.Rngs(0), dtype=dt))
    parts = random_normal_params(lambda: PAMParts(cfg, rngs=nnx.Rngs(0), dtype=dt), seed=1)
    make_llm = lambda: Qwen2ForCausalLM(cfg.llm, rngs=nnx.Rngs(0), dtype=dt, param_dtype=dt)  # noqa: E731
    llm = random_normal_params(make_llm, seed=2) if args.tiny else make_llm()
    model = PAM(cfg, sam2=sam2, parts=parts, llm=llm)
    pred = PAMPredictor(
        model, StandInTokenizer(cfg.llm.vocab_size, 14, 29), max_new_tokens=args.new
    )
    # loose thresholds: random weights keep enough regions to caption
    gen = SAM2AutomaticMaskGenerator(
        model.sam2, points_per_side=args.points_per_side, pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
    )  # fmt: skip
    images = _images(args.image_hw, args.images)

    def run(im):
        res = perceive(im, gen, pred, task="recognize", max_regions=args.regions)
        return res.texts

    t, counts = _median_per_image(run, images, args.reps)
    masks_only, _ = _median_per_image(gen.generate_masks, images, args.reps)
    return {"seconds_per_image": t, "regions": counts, "masks_only_s": masks_only}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tiny", action="store_true", help="SAM 2.1-t at 256, 8 x 8 points (smoke)")
    ap.add_argument("--cpu", action="store_true", help="run on CPU (JAX and torch)")
    ap.add_argument("--points-per-side", type=int, default=None, help="default 32 (tiny 8)")
    ap.add_argument("--images", type=int, default=3, help="photos per pass (1..3)")
    ap.add_argument("--reps", type=int, default=None, help="timed passes (default 3; tiny 1)")
    ap.add_argument("--regions", type=int, default=None, help="captioned regions (default 32)")
    ap.add_argument("--new", type=int, default=None, help="new tokens per region (default 32)")
    ap.add_argument("--no-peer", action="store_true", help="skip the official generator")
    ap.add_argument("--no-pam", action="store_true", help="skip the PAM-3B captions")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument(
        "--settings", default="default,loose", choices=["default", "loose", "default,loose"],
        help="which settings to time (default both)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
    args.size, args.image_size = ("t", 256) if args.tiny else ("l", 1024)
    args.image_hw = (240, 320) if args.tiny else (1024, 1536)
    args.points_per_side = args.points_per_side or (8 if args.tiny else 32)
    args.reps = args.reps or (1 if args.tiny else 3)
    args.regions = args.regions or (4 if args.tiny else 32)
    args.new = args.new or (4 if args.tiny else 32)
    args.images = max(1, min(3, args.images))

    import jax

    sys.path.insert(0, os.path.dirname(__file__))
    from hw import card_limits  # benchmarks/hw.py: the card's limits, measured in this run

    lim = card_limits(small=args.tiny)
    print(json.dumps({"card": lim.as_dict()}), flush=True)
    print(lim.line(), flush=True)
    print(f"device: {jax.devices()[0].device_kind}; SAM 2.1-{args.size} at {args.image_size}, "
          f"{args.points_per_side}^2 points, images {args.image_hw}")  # fmt: skip
    settings = {"default": {}, "loose": {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}}
    settings = {k: settings[k] for k in args.settings.split(",")}
    res = {"config": {k: v for k, v in vars(args).items() if k != "json"}, "card": lim.as_dict()}
    res["masks"] = m = bench_masks(args, settings)
    if m["torchvision_nms_port"]:
        print("note: torchvision's compiled nms is unavailable; the official generator ran with "
              "a torch port of it")  # fmt: skip
    if not args.no_pam:
        res["perceive"] = p = bench_perceive(args)
        print(f"PAM{'-tiny' if args.tiny else '-3B shapes'}: masks + captions "
              f"{p['seconds_per_image']:.3f} s/image (regions {p['regions']}, {args.new} tokens "
              f"each; masks alone {p['masks_only_s']:.3f} s)")  # fmt: skip
    if not args.tiny and not args.no_peer and "default" in m:
        ok = m["default"]["speedup"] >= 5
        print(f"goal >= 5x the official generator (default settings): {'met' if ok else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
