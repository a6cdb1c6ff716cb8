"""PAM image-item benchmark: pam-jax vs a composite PyTorch peer, random weights, no downloads.

    python benchmarks/bench_pam.py                 # GPU: SAM 2.1-L + Qwen2.5-3B shapes, bf16
    python benchmarks/bench_pam.py --tiny --cpu    # CPU smoke test (tiny SAM 2 + tiny Qwen2)

One image item = image -> SAM 2 (image encoder + prompt decoder, the release's conditioning-frame
path) -> Semantic Perceiver + projectors -> ChatML splice -> greedy generation of `--new` tokens
(128; stop tokens disabled so every run generates the same number). Measured end to end through
`PAMPredictor.describe_image` (host preprocessing included):

- latency of one item (one region, batch 1), median of `--reps`;
- throughput of `--regions` (32) regions of one image in one call (one image encoding, one
  batched decode + perceiver, one batched generation): regions / s.

Peer (same process, after the JAX side released its weights): the official SAM 2
(`build_sam2` + `SAM2ImagePredictor.set_image` / `predict(box=..., multimask_output=False)`,
bf16 autocast) followed by HF `Qwen2ForCausalLM.generate(inputs_embeds=...)` (bf16, sdpa,
greedy, min_new_tokens = max_new_tokens) on random embeddings of the same length as pam-jax's
LLM input (1085 at the release's shapes: 1042 visual + 43 text). The perceiver (7.5 M params) is
not in the peer; it is part of the pam-jax time. The paper reports ~1.05 s per image item for
PAM-3B. Goals (issue 15, on the H200): <= 0.28 s per item at batch 1, >= 50 regions / s batched.

The card's limits are measured first, in the same run (`benchmarks/hw.py`: bf16 matmul rate,
copy bandwidth, and the datasheet by the card's name), and each figure is reported as a fraction
of its limit: a decode step against (bf16 weights + KV cache at the mean context) / bandwidth,
the prefill against its matmul FLOPs / matmul rate, and the end-to-end call against SAM 2 +
perceiver as measured + the prefill at the matmul rate + the remaining steps at the floor.

The text around the visual embeddings comes from a stand-in tokenizer that yields the release's
token counts (14 before `<image>`, `--text-after` after), so no tokenizer download is needed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import numpy as np
from bench_llm import decode_step_bytes, prefill_flops
from hw import card_limits  # benchmarks/hw.py: the card's limits, measured in this run

# JAX and torch share the GPU: cap JAX's pool so the peer's weights and caches fit after it.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")


class StandInTokenizer:
    """Token counts of Qwen2.5's tokenizer for the PAM prompt; ids are arbitrary."""

    def __init__(self, vocab: int, before: int, after: int):
        self.vocab, self.before, self.after = vocab, before, after
        self.stop_ids: list[int] = []  # never stop: fixed-length generation
        self.pad_token_id = 0
        self.generation_config: dict = {}

    def encode(self, text: str) -> list[int]:
        n = self.before if text.rstrip().endswith("user") else self.after
        return [(7 * i + 11) % self.vocab for i in range(n)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def _median(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def _configs(tiny: bool):
    from pam_jax.llm import config as L
    from pam_jax.pam.config import PAMConfig
    from pam_jax.sam2.config import sam2_config

    if tiny:
        llm = L.tiny(vocab_size=512, hidden_size=64, intermediate_size=128)
        return PAMConfig(sam2=sam2_config("t", "2.1", image_size=256), llm=llm), "sam2.1_hiera_t"
    return PAMConfig(sam2=sam2_config("l", "2.1"), llm=L.qwen2_5_3b()), "sam2.1_hiera_l"


def _inputs(n_regions: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (768, 1024, 3), dtype=np.uint8)
    x1 = rng.uniform(0, 700, n_regions)
    y1 = rng.uniform(0, 500, n_regions)
    boxes = np.stack([x1, y1, x1 + rng.uniform(50, 300, n_regions),
                      y1 + rng.uniform(50, 260, n_regions)], 1)  # fmt: skip
    return image, [{"box": [float(v) for v in b]} for b in boxes]


def bench_jax(cfg, args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pam_jax.checkpoint import random_normal_params
    from pam_jax.llm.qwen2 import Qwen2ForCausalLM
    from pam_jax.pam.model import PAM, PAMParts
    from pam_jax.pam.predictor import PAMPredictor
    from pam_jax.sam2.model import SAM2Base

    dt = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    sam2 = random_normal_params(lambda: SAM2Base(cfg.sam2, rngs=nnx.Rngs(0), dtype=dt))
    parts = random_normal_params(lambda: PAMParts(cfg, rngs=nnx.Rngs(0), dtype=dt), seed=1)
    make_llm = lambda: Qwen2ForCausalLM(cfg.llm, rngs=nnx.Rngs(0), dtype=dt, param_dtype=dt)  # noqa: E731
    # 3B: flax's init runs on the accelerator (3e9 host normals would take minutes)
    llm = random_normal_params(make_llm, seed=2) if args.tiny else make_llm()
    model = PAM(cfg, sam2=sam2, parts=parts, llm=llm)
    tok = StandInTokenizer(cfg.llm.vocab_size, 14, args.text_after)
    pred = PAMPredictor(model, tok, max_new_tokens=args.new)
    image, regions = _inputs(args.regions)
    one = regions[:1]

    inp = pred.image_inputs(image, one, "recognize")
    seq = int(inp.llm.lengths[0])
    out = {"seq_len": seq, "visual_len": int(inp.llm.visual.shape[1])}

    def full(regs):
        return pred.describe_image(image, regs, "recognize")

    def prefix(regs):  # SAM 2 + perceiver + splice, for the breakdown
        return jax.block_until_ready(pred.image_inputs(image, regs, "recognize").llm.embeds)

    for name, regs in (("item", one), ("batch", regions)):
        res = full(regs)  # compile
        assert all(len(r.token_ids) == args.new for r in res)
        out[f"{name}_s"] = _median(lambda r=regs: full(r), args.reps)
        prefix(regs)
        out[f"{name}_prefix_s"] = _median(lambda r=regs: prefix(r), args.reps)
        # generation alone on fixed inputs, and its prefill alone (one new token)
        llm_in = pred.image_inputs(image, regs, "recognize").llm
        out[f"{name}_generate_s"] = _median(lambda x=llm_in: pred.generate(x), args.reps)
        pred.max_new_tokens = 1
        pred.generate(llm_in)  # compile
        out[f"{name}_prefill_s"] = _median(lambda x=llm_in: pred.generate(x), args.reps)
        pred.max_new_tokens = args.new
        out[f"{name}_decode_step_ms"] = (
            1e3 * (out[f"{name}_generate_s"] - out[f"{name}_prefill_s"]) / (args.new - 1)
        )
    out["regions_per_s"] = args.regions / out["batch_s"]
    if args.prefill_ab:  # the same calls with the prefill on the default GEMM backends
        before = os.environ.get("PAM_JAX_PREFILL_CUBLAS")
        os.environ["PAM_JAX_PREFILL_CUBLAS"] = "0"
        ab = {}
        for name, regs in (("item", one), ("batch", regions)):
            full(regs)  # compile
            ab[f"{name}_s"] = _median(lambda r=regs: full(r), args.reps)
            llm_in = pred.image_inputs(image, regs, "recognize").llm
            pred.max_new_tokens = 1
            pred.generate(llm_in)
            ab[f"{name}_prefill_s"] = _median(lambda x=llm_in: pred.generate(x), args.reps)
            pred.max_new_tokens = args.new
        out["prefill_default_gemms"] = ab
        if before is None:
            os.environ.pop("PAM_JAX_PREFILL_CUBLAS")
        else:
            os.environ["PAM_JAX_PREFILL_CUBLAS"] = before
        print(f"prefill on the default GEMM backends (A/B): item {ab['item_s']:.3f} s (prefill "
              f"{ab['item_prefill_s']:.3f}), {args.regions} regions {ab['batch_s']:.3f} s "
              f"(prefill {ab['batch_prefill_s']:.3f}); cuBLAS prefill: item {out['item_s']:.3f} "
              f"s ({out['item_prefill_s']:.3f}), batch {out['batch_s']:.3f} s "
              f"({out['batch_prefill_s']:.3f})", flush=True)  # fmt: skip
    pred = model = llm = sam2 = parts = None  # free the weights before the peer
    gc.collect()
    jax.clear_caches()
    return out


def bench_torch(cfg, sam2_name: str, seq: int, args) -> dict:
    import torch
    from bench_llm import _import_hf

    # first: it works around a torchvision wheel built for another torch, which sam2 imports
    Qwen2Config, Qwen2ForCausalLM = _import_hf()
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    dev = "cpu" if args.cpu else "cuda"
    dt = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    extra = [f"++model.image_size={cfg.sam2.image_size}"] if cfg.sam2.image_size != 1024 else []
    sam = build_sam2(f"configs/sam2.1/{sam2_name}.yaml", None, device=dev,
                     hydra_overrides_extra=extra).eval()  # fmt: skip
    sam_pred = SAM2ImagePredictor(sam)
    s = cfg.sam2.image_size  # the predictor hard-codes 1024's feature sizes
    sam_pred._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    hc = Qwen2Config(**{k: v for k, v in cfg.llm.to_hf().items()
                        if k not in ("architectures", "model_type", "torch_dtype")})  # fmt: skip
    torch.manual_seed(0)
    with torch.device(dev):
        llm = Qwen2ForCausalLM._from_config(hc, attn_implementation="sdpa", dtype=dt).eval()
    image, regions = _inputs(args.regions)
    boxes = np.asarray([r["box"] for r in regions], np.float32)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def item(n):
        with (
            torch.inference_mode(),
            torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"),
        ):
            sam_pred.set_image(image)
            sam_pred.predict(box=boxes[:n], multimask_output=False)
            emb = torch.randn(n, seq, cfg.llm.hidden_size, device=dev, dtype=dt)
            llm.generate(inputs_embeds=emb, attention_mask=torch.ones(n, seq, dtype=torch.long,
                         device=dev), max_new_tokens=args.new, min_new_tokens=args.new,
                         do_sample=False, pad_token_id=0, eos_token_id=None)  # fmt: skip
        sync()

    out = {}
    for name, n in (("item", 1), ("batch", args.regions)):
        item(n)  # warm up
        out[f"{name}_s"] = _median(lambda n=n: item(n), args.reps)
    out["regions_per_s"] = args.regions / out["batch_s"]
    return out


def limits(cfg, j: dict, lim, args) -> dict:
    """Each pam-jax figure against the card's ceilings, measured (`lim.matmul_flops`,
    `lim.copy_bytes_s`) and from the datasheet (`*_sheet`; absent where the card is unknown)."""
    out = {}
    for name, n in (("item", 1), ("batch", args.regions)):
        step_bytes = decode_step_bytes(cfg.llm, n, j["seq_len"] + args.new // 2)
        flops = prefill_flops(cfg.llm, n, j["seq_len"])
        r = {"prefill_tflop": flops / 1e12, "step_gb": step_bytes / 1e9}
        for sfx, fl, bw in (("", lim.matmul_flops, lim.copy_bytes_s),
                            ("_sheet", lim.datasheet_flops, lim.datasheet_bytes_s)):  # fmt: skip
            if not fl or not bw:
                continue
            step_floor = step_bytes / bw
            call_limit = j[f"{name}_prefix_s"] + flops / fl + (args.new - 1) * step_floor
            r |= {
                f"step_floor_ms{sfx}": 1e3 * step_floor,
                f"step_floor_frac{sfx}": 1e3 * step_floor / j[f"{name}_decode_step_ms"],
                f"prefill_frac{sfx}": flops / fl / j[f"{name}_prefill_s"],
                f"call_limit_s{sfx}": call_limit,
                f"call_frac{sfx}": call_limit / j[f"{name}_s"],
            }
        out[name] = r
    return out


def _pct(r: dict, key: str) -> str:
    sheet = r.get(f"{key}_sheet")
    return f"{r[key]:.1%} / {sheet:.1%}" if sheet is not None else f"{r[key]:.1%} / -"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tiny", action="store_true", help="tiny SAM 2 + Qwen2 (smoke test)")
    ap.add_argument("--cpu", action="store_true", help="run on CPU (JAX and torch)")
    ap.add_argument("--new", type=int, default=None, help="new tokens (default 128; tiny 8)")
    ap.add_argument("--regions", type=int, default=None, help="batched regions (default 32)")
    ap.add_argument("--reps", type=int, default=None, help="timed runs (default 5; tiny 1)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument(
        "--text-after", type=int, default=29,
        help="text tokens after <image> (release: 14 + 1042 + 29 = 1085)",
    )  # fmt: skip
    ap.add_argument("--no-peer", action="store_true", help="skip the PyTorch peer")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--prefill-ab", action="store_true",
                    help="also time the calls with the prefill on XLA's default GEMM backends "
                         "($PAM_JAX_PREFILL_CUBLAS=0)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
    args.new = args.new or (8 if args.tiny else 128)
    if args.new < 2:
        ap.error("--new must be >= 2 (the breakdown times one prefill token against the rest)")
    args.regions = args.regions or (4 if args.tiny else 32)
    args.reps = args.reps or (1 if args.tiny else 5)

    import jax

    cfg, sam2_name = _configs(args.tiny)
    lim = card_limits(small=args.tiny)
    print(json.dumps({"card": lim.as_dict()}), flush=True)
    print(lim.line(), flush=True)
    print(f"device: {jax.devices()[0].device_kind}; SAM 2 {sam2_name} at {cfg.sam2.image_size}, "
          f"LLM hidden {cfg.llm.hidden_size} x {cfg.llm.num_hidden_layers} layers, "
          f"{args.dtype}, {args.new} new tokens")  # fmt: skip
    res = {"config": {"sam2": sam2_name, "llm_hidden": cfg.llm.hidden_size,
                      "llm_layers": cfg.llm.num_hidden_layers, "new": args.new,
                      "regions": args.regions, "dtype": args.dtype}}  # fmt: skip
    res["pam_jax"] = j = bench_jax(cfg, args)
    res["card"] = lim.as_dict()
    res["limits"] = limits(cfg, j, lim, args)
    print(f"pam-jax: LLM input {j['seq_len']} embeddings ({j['visual_len']} visual)")
    print(f"  item (batch 1): {j['item_s']:.3f} s")
    print(f"  {args.regions} regions, one call: {j['batch_s']:.3f} s = {j['regions_per_s']:.1f} "
          "regions/s")  # fmt: skip
    for name in ("item", "batch"):
        print(
            f"  {name} breakdown: SAM 2 + perceiver + splice {j[f'{name}_prefix_s']:.3f} s, "
            f"generation {j[f'{name}_generate_s']:.3f} s (prefill + first token "
            f"{j[f'{name}_prefill_s']:.3f} s, {j[f'{name}_decode_step_ms']:.2f} ms / step)"
        )
    for name, r in res["limits"].items():
        print(
            f"  {name} of its limits ({lim.name}, measured / datasheet): decode step "
            f"{_pct(r, 'step_floor_frac')} of the bandwidth floor ({r['step_floor_ms']:.2f} ms), "
            f"prefill {_pct(r, 'prefill_frac')} of the bf16 matmul rate "
            f"({r['prefill_tflop']:.1f} TFLOP), call {_pct(r, 'call_frac')} of its limit "
            f"({r['call_limit_s']:.3f} s)"
        )
    if not args.no_peer:
        res["torch"] = t = bench_torch(cfg, sam2_name, j["seq_len"], args)
        print(
            f"PyTorch peer (official SAM 2 + HF generate): item {t['item_s']:.3f} s; "
            f"{args.regions} regions {t['batch_s']:.3f} s = {t['regions_per_s']:.1f} regions/s"
        )
        print(f"speed-up: item {t['item_s'] / j['item_s']:.2f}x, "
              f"batched {j['regions_per_s'] / t['regions_per_s']:.2f}x")  # fmt: skip
    if not args.tiny:
        ok1, ok2 = j["item_s"] <= 0.28, j["regions_per_s"] >= 50
        print(f"goals: item <= 0.28 s: {'met' if ok1 else 'NOT met'}; >= 50 regions/s: "
              f"{'met' if ok2 else 'NOT met'}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
