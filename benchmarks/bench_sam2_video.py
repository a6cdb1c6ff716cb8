"""SAM 2 video tracking throughput: pam-jax vs the official `SAM2VideoPredictor`, in one run.

    python benchmarks/bench_sam2_video.py               # GPU: Hiera-L 2.1, 1024^2, 16x 720p, bf16
    python benchmarks/bench_sam2_video.py --tiny --cpu  # CPU smoke test: tiny, 256^2, 6x 160x120

A clip of random JPEG frames is written to a temp dir; both predictors load it (`init_state`),
get one box on frame 0 (`add_new_points_or_box`) and track it through the clip
(`propagate_in_video`, every yielded mask copied to the host). Timed: prompt + propagation (the
frames/s the official README quotes, ~24 frames/s for Hiera-L on an H100 under bf16 autocast),
after one untimed warm-up pass (compilation / cudnn autotuning); median of `--rep` passes.

pam-jax runs with bf16 parameters and activations (float32 softmax / norm statistics / mask
logits); the official code runs `torch.autocast(bfloat16)` as its notebooks do. Both use random
weights at the real config (no downloads). The official code needs `sam2`, `hydra`, `omegaconf`,
`iopath` importable. Prints one JSON line and a short table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_clip(folder: Path, n: int, h: int, w: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for t in range(n):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"{t:05d}.jpg", quality=90)


def _median(fn, rep: int) -> float:
    fn()  # warm-up: compilation / autotuning
    ts = []
    for _ in range(rep):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bench_jax(cfg, frames: Path, box, dtype_name: str, rep: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pam_jax.sam2.model import SAM2Base
    from pam_jax.sam2.video_predictor import SAM2VideoPredictor

    dtype = jnp.bfloat16 if dtype_name == "bf16" else jnp.float32
    model = SAM2Base(cfg, rngs=nnx.Rngs(0), dtype=dtype)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), params))  # bf16 weights
    pred = SAM2VideoPredictor(model)
    t = time.perf_counter()
    state = pred.init_state(frames)
    load_s = time.perf_counter() - t
    n = state.num_frames

    def run():
        pred.reset_state(state)
        pred.add_new_points_or_box(state, 0, 1, box=box)
        for _, _, m in pred.propagate_in_video(state):
            assert m.shape[0] == 1  # host numpy array: the frame is done

    return {"s": _median(run, rep), "frames": n, "load_s": load_s}


def bench_torch(cfg_name: str, image_size: int, frames: Path, box, rep: int, device: str) -> dict:
    import torch
    from sam2.build_sam import build_sam2_video_predictor

    folder = "sam2.1" if cfg_name.startswith("sam2.1") else "sam2"
    extra = [f"++model.image_size={image_size}"] if image_size != 1024 else []
    pred = build_sam2_video_predictor(
        f"configs/{folder}/{cfg_name}.yaml", None, device=device, hydra_overrides_extra=extra
    )
    ctx = torch.autocast(device, dtype=torch.bfloat16)
    with torch.inference_mode(), ctx:
        t = time.perf_counter()
        state = pred.init_state(str(frames))
        load_s = time.perf_counter() - t
    n = state["num_frames"]

    def run():
        with torch.inference_mode(), ctx:
            pred.reset_state(state)
            pred.add_new_points_or_box(state, 0, 1, box=box)
            for _, _, m in pred.propagate_in_video(state):
                m.float().cpu()
        if device == "cuda":
            torch.cuda.synchronize()

    return {"s": _median(run, rep), "frames": n, "load_s": load_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="l", help="Hiera size (t, s, b+, l)")
    ap.add_argument("--version", default="2.1", choices=["2.0", "2.1"])
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--rep", type=int, default=3)
    ap.add_argument("--no-peer", action="store_true", help="skip the official PyTorch code")
    ap.add_argument("--tiny", action="store_true", help="tiny model, 256^2, 6 small frames")
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args(argv)
    if args.tiny:
        args.size, args.image_size, args.frames, args.height, args.width, args.rep = (
            "t", 256, 6, 120, 160, 1,
        )  # fmt: skip

    from pam_jax.sam2.config import sam2_config

    cfg = sam2_config(args.size, args.version, args.image_size)
    device = "cpu" if args.cpu else "cuda"
    h, w = args.height, args.width
    box = [w * 0.3, h * 0.3, w * 0.6, h * 0.7]
    with tempfile.TemporaryDirectory() as tmp:
        frames = Path(tmp) / "frames"
        write_clip(frames, args.frames, h, w)
        r = bench_jax(cfg, frames, box, args.dtype, args.rep)
        row = {
            "model": cfg.name, "image_size": args.image_size, "frames": r["frames"],
            "video": f"{w}x{h}", "dtype": args.dtype, "jax_fps": r["frames"] / r["s"],
            "jax_load_s": r["load_s"],
        }  # fmt: skip
        if not args.no_peer:
            try:
                p = bench_torch(cfg.name, args.image_size, frames, box, args.rep, device)
                row["torch_fps"] = p["frames"] / p["s"]
                row["torch_load_s"] = p["load_s"]
                row["ratio"] = row["jax_fps"] / row["torch_fps"]
            except Exception as e:  # report, keep going
                row["torch_error"] = f"{type(e).__name__}: {e}"[:300]
    print(json.dumps(row), flush=True)
    print(f"\n{'model':<18}{'frames':>7}{'pam-jax fps':>13}{'official fps':>14}{'ratio':>8}")
    print(
        f"{row['model']:<18}{row['frames']:>7}{row['jax_fps']:>13.2f}"
        f"{row.get('torch_fps', float('nan')):>14.2f}{row.get('ratio', float('nan')):>8.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
