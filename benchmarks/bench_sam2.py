"""SAM 2 image encoder throughput: pam-jax vs the official PyTorch code, in one run.

    python benchmarks/bench_sam2.py               # GPU: Hiera-B+ / L, 1024^2, batch 1 and 8
    python benchmarks/bench_sam2.py --tiny --cpu    # smoke test on CPU
    python benchmarks/bench_sam2.py --layouts block,stage  # Hiera token layouts, A/B in one run

`--layouts` times pam-jax once per Hiera token layout (`PAM_JAX_HIERA_LAYOUT`: "block"
partitions windows in every block as the official code does, "stage" keeps them across blocks)
and `--fused-min-lens` once per `PAM_JAX_FUSED_MIN_LEN` (attention over fewer keys than this
runs XLA's kernel instead of cuDNN's); each pam-jax figure is one JSON line with its `layout`
and `fused_min_len`, beside the official figure measured once per model and batch.

Both sides get random weights at the real configs and run in bf16 (pam-jax: bf16 parameters and
activations, float32 softmax / norm statistics; official: `torch.autocast(bfloat16)` as its
notebooks do). The official code needs `sam2`, `hydra`, `omegaconf`, `iopath` on PYTHONPATH.
Prints the card's limits (`benchmarks/hw.py`, measured in this run), one JSON line per
measurement and a table at the end: the analytic FLOPs against the measured bf16 matmul rate and
the datasheet, and XLA's bytes-accessed estimate of the compiled program against the measured
copy bandwidth and the datasheet (how memory-bound the encoder is).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

import numpy as np
from hw import card_limits  # benchmarks/hw.py: the card's limits, measured in this run


def _median_time(fn, warm: int = 3, rep: int = 10) -> float:
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(rep):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def encoder_flops(cfg) -> float:
    """Multiply-adds x 2 of forward_image (Hiera trunk + FPN neck + conv_s0/s1), per image."""
    h = cfg.hiera
    side = cfg.image_size // 4
    n = side * side
    f = 2 * n * 3 * 49 * h.embed_dim  # patch embed
    dim, stage = h.embed_dim, 1
    for i in range(sum(h.stages)):
        dim_out = dim
        window = 0 if i in h.global_att_blocks else h.window_spec[stage - 1]
        if i - 1 in h.stage_ends:
            dim_out, stage = int(dim * h.dim_mul), stage + 1
        nq = n // 4 if i in h.q_pool_blocks else n
        lk = n if window == 0 else window * window
        f += 2 * n * dim * 3 * dim_out + 4 * nq * lk * dim_out + 2 * nq * dim_out**2
        f += 16 * nq * dim_out**2  # MLP, ratio 4
        if dim != dim_out:
            f += 2 * n * dim * dim_out
        n, dim = nq, dim_out
    sides = [cfg.image_size // s for s in (4, 8, 16, 32)]
    f += sum(2 * s * s * c * 256 for s, c in zip(sides, h.channel_list[::-1]))
    f += 2 * sides[0] ** 2 * 256 * 32 + 2 * sides[1] ** 2 * 256 * 64
    return float(f)


def bench_jax(
    cfg, batch: int, dtype_name: str, rep: int, env: dict[str, str], hlo_path: str | None = None
) -> dict:
    """`env`: variables the model reads at trace time (set while it compiles, then restored);
    `hlo_path`: where to write the optimized HLO of the compiled program (its fusions)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pam_jax.sam2.model import SAM2Base

    dtype = jnp.bfloat16 if dtype_name == "bf16" else jnp.float32
    model = SAM2Base(cfg, rngs=nnx.Rngs(0), dtype=dtype)
    graph, state = nnx.split(model)
    # Parameters stored in the compute dtype: halves the bytes read per call.
    state = jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state
    )

    @jax.jit
    def fwd(state, x):
        m = nnx.merge(graph, state)
        out = m.forward_image(x)
        return out["vision_features"], out["backbone_fpn"]

    s = cfg.image_size
    # fresh random input per rotation slot so nothing is served from cache
    xs = [jax.random.normal(jax.random.key(i), (batch, s, s, 3), dtype) for i in range(2)]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        compiled = fwd.lower(state, xs[0]).compile()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(compiled.as_text())
    flops = nbytes = None
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, list) else ca
        flops = float(ca.get("flops", 0.0)) or None
        nbytes = float(ca.get("bytes accessed", 0.0)) or None
    except Exception:  # cost analysis is best effort
        pass
    i = [0]

    def run():
        i[0] ^= 1
        jax.block_until_ready(compiled(state, xs[i[0]]))

    t = _median_time(run, rep=rep)
    return {"s": t, "flops": flops, "bytes": nbytes}


def bench_torch(cfg_name: str, batch: int, size: int, rep: int, device: str) -> dict:
    import torch
    from sam2.build_sam import build_sam2

    extra = [f"++model.image_size={size}"] if size != 1024 else []
    folder = "sam2.1" if cfg_name.startswith("sam2.1") else "sam2"
    m = build_sam2(
        f"configs/{folder}/{cfg_name}.yaml", None, device=device, hydra_overrides_extra=extra
    ).eval()
    x = torch.randn(batch, 3, size, size, device=device)

    def run():
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
            m.forward_image(x)
        if device == "cuda":
            torch.cuda.synchronize()

    t = _median_time(run, rep=rep)
    m = None
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"s": t}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="b+,l", help="Hiera sizes (t,s,b+,l)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--rep", type=int, default=20)
    ap.add_argument("--no-peer", action="store_true", help="skip the official PyTorch code")
    ap.add_argument(
        "--layouts",
        default=None,
        help="Hiera token layouts to time, e.g. block,stage (default: PAM_JAX_HIERA_LAYOUT, "
        "else block)",
    )
    ap.add_argument(
        "--fused-min-lens",
        default=None,
        help="PAM_JAX_FUSED_MIN_LEN values to time, e.g. 0,65,257 (default: the "
        "environment's, else 0)",
    )
    ap.add_argument("--hlo-dir", default=None, help="write each variant's optimized HLO here")
    ap.add_argument("--tiny", action="store_true", help="tiny model at 256^2 (CPU smoke test)")
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args(argv)
    if args.tiny:
        args.sizes, args.image_size, args.batches, args.rep = "t", 256, "1,2", 3

    from pam_jax.sam2.config import sam2_config
    from pam_jax.sam2.hiera import hiera_layout

    layouts = args.layouts.split(",") if args.layouts else [hiera_layout()]
    for layout in layouts:
        hiera_layout(layout)  # a clear error for an unknown name, before any timing
    min_lens = (args.fused_min_lens or os.environ.get("PAM_JAX_FUSED_MIN_LEN", "0")).split(",")
    min_lens = [str(int(n)) for n in min_lens]
    variants = list(itertools.product(layouts, min_lens))
    if args.hlo_dir:
        os.makedirs(args.hlo_dir, exist_ok=True)

    device = "cpu" if args.cpu else "cuda"
    lim = card_limits(small=args.tiny)
    print(json.dumps({"card": lim.as_dict()}), flush=True)
    print(lim.line(), flush=True)
    rows = []
    for size in args.sizes.split(","):
        cfg = sam2_config(size, "2.1", args.image_size)
        for b in map(int, args.batches.split(",")):
            peer = {}
            if not args.no_peer:
                try:
                    p = bench_torch(cfg.name, b, args.image_size, args.rep, device)
                    peer["torch_img_s"] = b / p["s"]
                except Exception as e:  # report, keep going
                    peer["torch_error"] = f"{type(e).__name__}: {e}"[:200]
            for layout, min_len in variants:
                env = {"PAM_JAX_HIERA_LAYOUT": layout, "PAM_JAX_FUSED_MIN_LEN": min_len}
                hlo = args.hlo_dir and os.path.join(
                    args.hlo_dir, f"{cfg.name}_b{b}_{layout}_min{min_len}.hlo.txt"
                )
                r = bench_jax(cfg, b, args.dtype, args.rep, env, hlo)
                row = {"model": cfg.name, "batch": b, "layout": layout}
                row["fused_min_len"] = int(min_len)
                row |= {"jax_img_s": b / r["s"], "jax_ms": r["s"] * 1e3}
                flops = encoder_flops(cfg) * b
                row["tflop_per_img"] = flops / b / 1e12
                row["frac_measured_peak"] = flops / r["s"] / lim.matmul_flops
                if lim.datasheet_flops:
                    row["frac_datasheet_peak"] = flops / r["s"] / lim.datasheet_flops
                if r["bytes"]:  # XLA's count of HBM traffic of the compiled program (its fusions)
                    row["xla_gb_per_call"] = r["bytes"] / 1e9
                    row["frac_measured_bw"] = r["bytes"] / r["s"] / lim.copy_bytes_s
                    if lim.datasheet_bytes_s:
                        row["frac_datasheet_bw"] = r["bytes"] / r["s"] / lim.datasheet_bytes_s
                row |= peer
                if "torch_img_s" in peer:
                    row["ratio"] = row["jax_img_s"] / peer["torch_img_s"]
                print(json.dumps(row), flush=True)
                rows.append(row)
    head = ("model", "batch", "layout", "min len", "pam-jax img/s", "official img/s", "ratio",
            "FLOP/meas.", "FLOP/sheet", "bytes/meas.", "bytes/sheet")  # fmt: skip
    print("\n" + "".join(f"{h:>16}" for h in head))
    nan = float("nan")
    for r in rows:
        vals = (r["jax_img_s"], r.get("torch_img_s", nan), r.get("ratio", nan))
        print(
            f"{r['model']:>16}{r['batch']:>16}{r['layout']:>16}{r['fused_min_len']:>16}"
            + "".join(f"{v:>16.2f}" for v in vals)
            + f"{r.get('frac_measured_peak', nan):>16.1%}"
            + f"{r.get('frac_datasheet_peak', nan):>16.1%}"
            + f"{r.get('frac_measured_bw', nan):>16.1%}"
            + f"{r.get('frac_datasheet_bw', nan):>16.1%}"
        )
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
