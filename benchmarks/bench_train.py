"""PAM stage-2 training step: pam-jax vs a PyTorch peer built the release's way, one GPU.

pam-jax: the real `pam_jax.training` step (SAM 2.1-L frozen, perceiver + projectors + newlines
+ LLM trained, bf16 compute with float32 master weights, AdamW, remat) on synthetic batches of
the real shapes (image samples: 1042 visual + text, rows of 80-100% of `--seq` tokens),
random weights made on the device. Peer (same run, after pam-jax frees the GPU): HF Qwen2 with
gradient checkpointing, SDPA and fused torch AdamW under bf16 autocast, plus the official SAM
2.1-L image encoder forward (frozen, bf16 autocast, no grad) per sample, as the release trains
(its perceiver / projector work is small and left out, so the peer is, if anything, favoured).
The peer runs first, in a subprocess, so JAX's memory pool does not starve it.

Reports tokens/s (non-padding LLM positions incl. visual ones) and MFU against the card's
measured bf16 matmul rate (benchmarks/hw.py, same run) and the datasheet (989 TFLOP/s), with
the model-FLOPs count of pam_jax.training.metrics (LLM 6 x N x tokens + attention, perceiver
and projectors 6 x N x visual tokens, SAM 2 2 x N x (S/16)^2). The peer's MFU uses the same
kind of count for its own work (LLM 6 N T + causal attention, SAM 2 encoder 2 N (S/16)^2).

    python benchmarks/bench_train.py --models 1.5b,3b --batches 4,8,16,32       # H200, ~8 min
    python benchmarks/bench_train.py --models 3b,1.5b --batches 16,32 --scan --remat dots \
        --mem-fraction 0.95 --loss-chunk 256 --peer-cache benchmarks/peer_train_h200.json
    python benchmarks/bench_train.py --tiny --cpu                                 # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _device_params(spec, shardings: dict, seed: int = 0) -> dict:
    """N(0, 0.02) parameters (norm scales 1) made on the device tensor by tensor (eager: one
    small kernel per shape, no giant init program), placed with the step's shardings."""
    import jax
    import jax.numpy as jnp

    out = {}
    key = jax.random.key(seed)
    for i, k in enumerate(spec.keys):
        shape = spec.shapes[k]
        leaf = k.rsplit(".", 1)[-1]
        if leaf in ("scale", "weight") and len(shape) == 1:
            x = jnp.ones(shape, jnp.float32)
        else:
            x = 0.02 * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
        out[k] = jax.device_put(x, shardings[k])
    return out


def bench_jax(size: str, batches: list[int], args) -> list[dict]:
    import jax

    from pam_jax.training import batch as B
    from pam_jax.training.config import TrainConfig
    from pam_jax.training.metrics import model_flops
    from pam_jax.training.model import abstract_model, spec_for
    from pam_jax.training.optim import make_optimizer
    from pam_jax.training.step import Trainer, make_run_mesh

    out = []
    model_name = "models/micro-pam.json" if args.tiny else f"pam-{size}"
    for b in batches:
        cfg = TrainConfig(
            model=model_name, batch_size=b, grad_accum=1, steps=1000, learning_rate=1e-5,
            warmup_steps=0, train_parts="perceiver,projectors,newlines,llm", mesh="1,1,1",
            dtype="float32" if args.cpu else "bfloat16", remat=args.remat,
            scan_layers=args.scan, attention=args.attention, loss_chunk=args.loss_chunk,
        )  # fmt: skip
        rec = {"impl": "pam-jax", "model": size, "batch": b, "remat": args.remat,
               "scan": args.scan, "loss_chunk": args.loss_chunk}  # fmt: skip
        trainer = state = frozen = gb = None
        try:
            spec = spec_for(abstract_model(cfg), cfg.parts)
            mesh = make_run_mesh("1,1,1", jax.devices()[:1])
            trainer = Trainer.build(cfg, spec, make_optimizer(cfg, spec), mesh)
            params = _device_params(spec, {**trainer.param_shardings, **trainer.frozen_shardings})
            tr, fr = spec.split(params)
            state, frozen = trainer.init_state(tr), fr
            pc = spec.config
            seq = args.seq if not args.tiny else 128
            host = B.synthetic_batch(b, seq, pc.image_embeds_len, pc.sam2.image_size,
                                     pc.llm.vocab_size, seed=1)  # fmt: skip
            gb = B.global_batch(mesh, host)
            t0 = time.perf_counter()
            state, m = trainer.step(state, frozen, gb)
            jax.block_until_ready(m["loss"])
            rec["compile_and_first_step_s"] = time.perf_counter() - t0
            state, m = trainer.step(state, frozen, gb)
            jax.block_until_ready(m["loss"])
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state, m = trainer.step(state, frozen, gb)
            jax.block_until_ready(m["loss"])
            dt = (time.perf_counter() - t0) / args.steps
            pos = float(host["mask"].sum())
            flops = model_flops(spec, pos, b, seq, 1)
            rec.update(step_s=dt, tokens_per_s=pos / dt, model_tflop_per_step=flops / 1e12,
                       loss=float(m["loss"]), seq=seq)  # fmt: skip
            rec.update(_mfu(flops / dt, args))
            stats = jax.devices()[0].memory_stats() or {}
            if "peak_bytes_in_use" in stats:
                rec["peak_mem_gb"] = stats["peak_bytes_in_use"] / 1e9
        except Exception as e:  # noqa: BLE001 - out of memory ends this batch size only
            msg = str(e)
            if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
                raise
            rec["oom"] = True
        print(json.dumps(rec), flush=True)
        out.append(rec)
        del trainer, state, frozen, gb
        gc.collect()
        jax.clear_caches()
        if rec.get("oom"):
            break
    return out


_LIMITS = {}


def _mfu(flops_s: float, args) -> dict:
    if args.cpu or "lim" not in _LIMITS:
        return {"mfu_datasheet": None, "mfu_measured": None}
    lim = _LIMITS["lim"]
    return {
        "mfu_datasheet": flops_s / lim.datasheet_flops if lim.datasheet_flops else None,
        "mfu_measured": flops_s / lim.matmul_flops,
    }


def bench_torch(size: str, batches: list[int], args) -> list[dict]:
    import torch
    from bench_llm import _import_hf

    from pam_jax import configs

    Qwen2Config, Qwen2ForCausalLM = _import_hf()
    from sam2.build_sam import build_sam2

    pc = configs.load(f"pam-{size}")
    dev = "cpu" if args.cpu else "cuda"
    hc = Qwen2Config(**{k: v for k, v in pc.llm.to_hf().items()
                        if k not in ("architectures", "model_type", "torch_dtype")})  # fmt: skip
    hc.use_cache = False
    torch.manual_seed(0)
    with torch.device(dev):
        llm = Qwen2ForCausalLM._from_config(hc, attn_implementation="sdpa",
                                            dtype=torch.float32)  # fmt: skip
    llm.gradient_checkpointing_enable()
    llm.train()
    sam = build_sam2("configs/sam2.1/sam2.1_hiera_l.yaml", None, device=dev).eval()
    for p in sam.parameters():
        p.requires_grad_(False)
    n_llm = sum(p.numel() for p in llm.parameters())
    n_sam = sum(p.numel() for p in sam.image_encoder.parameters())
    opt = torch.optim.AdamW(llm.parameters(), lr=1e-5, fused=dev == "cuda")
    seq = args.seq
    L, q = hc.num_hidden_layers, hc.num_attention_heads * (hc.hidden_size // hc.num_attention_heads)
    out = []
    for b in batches:
        rec = {"impl": "torch", "model": size, "batch": b}
        try:
            ids = torch.randint(0, hc.vocab_size, (b, seq), device=dev)
            img = torch.randn(b, 3, 1024, 1024, device=dev)

            def step(ids=ids, img=img):
                with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
                    with torch.no_grad():
                        sam.forward_image(img)
                    loss = llm(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            for _ in range(2):
                step()
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            if dev == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / args.steps
            flops = 6 * n_llm * b * seq + 3 * 2 * 2 * L * seq * seq / 2 * q * b
            flops += 2 * n_sam * (1024 // 16) ** 2 * b
            rec.update(step_s=dt, tokens_per_s=b * seq / dt, model_tflop_per_step=flops / 1e12,
                       seq=seq)  # fmt: skip
            if dev == "cuda":
                rec["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        except torch.OutOfMemoryError:
            rec["oom"] = True
        out.append(rec)
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if rec.get("oom"):
            break
    return out


def _read_peer_cache(path: str, args, batches: list[int]) -> dict | None:
    """The cached peer records for this run's models and batches (None: run the peer)."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        d = json.load(f)
    if d.get("seq") != args.seq:
        raise SystemExit(f"--peer-cache {path}: seq {d.get('seq')} != --seq {args.seq}")
    want = {(m, b) for m in args.models.split(",") for b in batches}
    recs = [{**r, "peer_cache": path} for r in d["results"]
            if r.get("impl") == "torch" and (r["model"], r["batch"]) in want]  # fmt: skip
    missing = want - {(r["model"], r["batch"]) for r in recs}
    if missing:
        raise SystemExit(f"--peer-cache {path} has no peer figures for {sorted(missing)}")
    return {**d, "results": recs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--models", default="1.5b,3b")
    ap.add_argument("--batches", default="4,8,16,32")
    ap.add_argument("--seq", type=int, default=1152, help="padded row length (~1100 tokens)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per point")
    ap.add_argument("--remat", default="full", help="LLM remat policy (none|full|dots|dots_all)")
    ap.add_argument("--scan", action="store_true", help="scan the LLM layers")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--loss-chunk", type=int, default=128, help="cross-entropy chunk positions")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument(
        "--peer-cache", metavar="FILE",
        help="reuse the PyTorch peer's figures from FILE (JSON of an earlier run on the same "
        "card kind, e.g. benchmarks/peer_train_h200.json) instead of running the peer; the "
        "output says so. FILE absent: the peer runs and its figures are written there",
    )  # fmt: skip
    ap.add_argument(
        "--mem-fraction", type=float, default=0.85,
        help="XLA_PYTHON_CLIENT_MEM_FRACTION for pam-jax (the peer runs before JAX allocates)",
    )  # fmt: skip
    ap.add_argument("--peer-only", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="the micro PAM (smoke test)")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--out", help="write all results as JSON here")
    args = ap.parse_args(argv)
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(args.mem_fraction)
    if args.cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
    batches = [int(x) for x in args.batches.split(",")]
    if args.tiny:
        args.models = "micro"
        batches = [min(b, 2) for b in batches[:1]]
        args.steps = min(args.steps, 2)
    res: dict = {"results": []}
    if args.peer_only:  # a subprocess of the main run: the GPU is still free of JAX's pool
        for size in args.models.split(","):
            res["results"] += bench_torch(size, batches, args)
        print("PEER " + json.dumps(res["results"]), flush=True)
        return 0
    peer = []
    cached = _read_peer_cache(args.peer_cache, args, batches) if args.peer_cache else None
    if cached is not None:
        peer = cached["results"]
    elif not args.no_peer and not args.tiny:  # first, before JAX reserves the GPU's memory
        import subprocess

        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--peer-only",
            "--models",
            args.models,
            "--batches",
            args.batches,
            "--seq",
            str(args.seq),
            "--steps",
            str(args.steps),
        ]
        if args.cpu:
            cmd.append("--cpu")
        r = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in r.stdout.splitlines() if x.startswith("PEER ")]
        if r.returncode or not lines:
            print("peer failed:", r.stderr[-3000:], flush=True)
        else:
            peer = json.loads(lines[-1][5:])
    if not args.cpu:
        from hw import card_limits

        _LIMITS["lim"] = card_limits()
        res["card"] = _LIMITS["lim"].as_dict()
        print(_LIMITS["lim"].line(), flush=True)
    if cached is not None:
        card = res.get("card", {}).get("name", "cpu" if args.cpu else "?")
        if cached["card"]["name"] != card:
            print(f"--peer-cache {args.peer_cache} is from {cached['card']['name']}, this card "
                  f"is {card}: run without it", file=sys.stderr)  # fmt: skip
            return 2
        print(f"peer: NOT run in this run; its figures are reused from {args.peer_cache} "
              f"({cached.get('source', 'an earlier run')}), MFU recomputed against this run's "
              "card", flush=True)  # fmt: skip
        res["peer_cache"] = args.peer_cache
    elif args.peer_cache and peer:
        with open(args.peer_cache, "w") as f:
            card = res.get("card", {"name": "cpu", "platform": "cpu"})
            src = "bench_train.py " + " ".join(sys.argv[1:])
            d = {"source": src, "card": card, "seq": args.seq, "steps": args.steps}
            json.dump({**d, "results": peer}, f, indent=2)
    for rec in peer:
        if "step_s" in rec:
            rec.update(_mfu(rec["model_tflop_per_step"] * 1e12 / rec["step_s"], args))
        print(json.dumps(rec), flush=True)
    res["results"] += peer
    for size in args.models.split(","):
        res["results"] += bench_jax(size, batches, args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
