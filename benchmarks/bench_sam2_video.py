"""SAM 2 video tracking throughput: pam-jax vs the official `SAM2VideoPredictor`, in one run.

    python benchmarks/bench_sam2_video.py               # GPU: Hiera-L 2.1, 1024^2, 16x 720p, bf16
    python benchmarks/bench_sam2_video.py --tiny --cpu  # CPU smoke test: tiny, 256^2, 6x 160x120

A clip of random JPEG frames is written to a temp dir; both predictors load it (`init_state`),
get one box on frame 0 (`add_new_points_or_box`) and track it through the clip
(`propagate_in_video`, every yielded mask copied to the host). Timed: prompt + propagation (the
frames/s the official README quotes, ~24 frames/s for Hiera-L on an H100 under bf16 autocast),
after one untimed warm-up pass (compilation / cudnn autotuning); median of `--rep` passes.

`--prefetch 1,8` times pam-jax once per value in the same run (`SAM2VideoPredictor(prefetch=K)`:
K upcoming frames through the image encoder in one batched call; 1 = one frame per step), for a
side-by-side A/B. The card's limits are measured first (`benchmarks/hw.py`), and each pam-jax
figure is also given as the image encoder's FLOPs per frame (`bench_sam2.encoder_flops`) x frames/s
against the card's measured bf16 matmul rate and its datasheet: the share of the card's FLOP rate
the encoder alone would use, a lower bound on the step's (memory attention and the decoder add
to it).

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
from bench_sam2 import encoder_flops
from hw import card_limits  # benchmarks/hw.py: the card's limits, measured in this run


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


def bench_jax(cfg, frames: Path, box, dtype_name: str, rep: int, prefetch: list) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pam_jax.sam2.model import SAM2Base
    from pam_jax.sam2.video_predictor import SAM2VideoPredictor

    dtype = jnp.bfloat16 if dtype_name == "bf16" else jnp.float32
    model = SAM2Base(cfg, rngs=nnx.Rngs(0), dtype=dtype)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), params))  # bf16 weights
    out = []
    for k in prefetch:
        pred = SAM2VideoPredictor(model, prefetch=k)
        t = time.perf_counter()
        state = pred.init_state(frames)
        load_s = time.perf_counter() - t
        n = state.num_frames

        def run(pred=pred, state=state):
            pred.reset_state(state)
            pred.add_new_points_or_box(state, 0, 1, box=box)
            for _, _, m in pred.propagate_in_video(state):
                assert m.shape[0] == 1  # host numpy array: the frame is done

        out.append(
            {"s": _median(run, rep), "frames": n, "load_s": load_s, "prefetch": pred.prefetch}
        )
        state = pred = None
    return out


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
    ap.add_argument(
        "--prefetch", default=None,
        help="comma list of frames encoded ahead per batched call, one pam-jax run each "
        "(default: the predictor's default)",
    )  # fmt: skip
    ap.add_argument("--no-peer", action="store_true", help="skip the official PyTorch code")
    ap.add_argument("--tiny", action="store_true", help="tiny model, 256^2, 6 small frames")
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args(argv)
    if args.tiny:
        args.size, args.image_size, args.frames, args.height, args.width, args.rep = (
            "t", 256, 6, 120, 160, 1,
        )  # fmt: skip

    from pam_jax.sam2.config import sam2_config

    try:
        prefetch = [None] if args.prefetch is None else [int(k) for k in args.prefetch.split(",")]
    except ValueError:
        ap.error(f"--prefetch takes a comma list of whole numbers, got {args.prefetch!r}")
    cfg = sam2_config(args.size, args.version, args.image_size)
    device = "cpu" if args.cpu else "cuda"
    lim = card_limits(small=args.tiny)
    print(json.dumps({"card": lim.as_dict()}), flush=True)
    print(lim.line(), flush=True)
    enc = encoder_flops(cfg)
    h, w = args.height, args.width
    box = [w * 0.3, h * 0.3, w * 0.6, h * 0.7]
    rows, peer = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        frames = Path(tmp) / "frames"
        write_clip(frames, args.frames, h, w)
        for r in bench_jax(cfg, frames, box, args.dtype, args.rep, prefetch):
            fps = r["frames"] / r["s"]
            row = {
                "model": cfg.name, "image_size": args.image_size, "frames": r["frames"],
                "video": f"{w}x{h}", "dtype": args.dtype, "prefetch": r["prefetch"],
                "jax_fps": fps, "jax_load_s": r["load_s"], "card": lim.name,
                "encoder_tflop_per_frame": enc / 1e12,
                "encoder_frac_measured_peak": enc * fps / lim.matmul_flops,
                "encoder_frac_datasheet_peak": (
                    enc * fps / lim.datasheet_flops if lim.datasheet_flops else None
                ),
            }  # fmt: skip
            rows.append(row)
        if not args.no_peer:
            try:
                p = bench_torch(cfg.name, args.image_size, frames, box, args.rep, device)
                peer = {"torch_fps": p["frames"] / p["s"], "torch_load_s": p["load_s"]}
            except Exception as e:  # report, keep going
                peer = {"torch_error": f"{type(e).__name__}: {e}"[:300]}
    nan = float("nan")
    for row in rows:
        row |= peer
        if "torch_fps" in peer:
            row["ratio"] = row["jax_fps"] / peer["torch_fps"]
        print(json.dumps(row), flush=True)
    head = ("model", "frames", "prefetch", "pam-jax fps", "official fps", "ratio", "enc/meas.",
            "enc/sheet")  # fmt: skip
    print("\n" + "".join(f"{x:>14}" for x in head))
    for row in rows:
        print(
            f"{row['model']:>14}{row['frames']:>14}{row['prefetch']:>14}{row['jax_fps']:>14.2f}"
            f"{row.get('torch_fps', nan):>14.2f}{row.get('ratio', nan):>14.2f}"
            f"{row['encoder_frac_measured_peak']:>14.1%}"
            f"{row['encoder_frac_datasheet_peak'] or nan:>14.1%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
