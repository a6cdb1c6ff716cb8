"""Qwen2.5 decode / prefill benchmark: pam-jax vs HF transformers, random weights, no downloads.

    python benchmarks/bench_llm.py                    # GPU: 1.5B and 3B, batch 1 and 8, bf16
    python benchmarks/bench_llm.py --tiny             # CPU smoke test (tiny config)
    python benchmarks/bench_llm.py --sizes 3b --batches 1 --new 128 --no-hf

For each (size, batch): prefill latency of an `--prompt`-token prompt (1100, PAM's typical LLM
input) and decode tokens/s over `--new` new tokens, for pam-jax (`pam_jax.llm.sampler.generate`,
one jit: prefill + while_loop) and HF (`Qwen2ForCausalLM`, torch bf16, sdpa, `generate`
greedy with a static-length run). Decode time = (time of generate(new) - time of
generate(1)) / (new - 1), so prefill is excluded on both sides.

Memory-bandwidth floor per decode step: bytes = bf16 weights (the tied embedding counted once,
it is read once for the lookup row and once for the logits, the latter dominating) + KV cache
read at the mean context (prompt + new/2); floor = bytes / BW with BW the device-to-device copy
bandwidth measured in the same run (`benchmarks/hw.py`; `--bw` to override), and a second floor
from the card's datasheet bandwidth. Reported: fraction of each floor = floor / measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import numpy as np
from hw import card_limits  # benchmarks/hw.py: the card's limits, measured in this run


def _configs(tiny: bool):
    from pam_jax.llm import config as C

    if tiny:
        return {
            "tiny": C.tiny(
                vocab_size=512,
                hidden_size=64,
                intermediate_size=128,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        }
    return {"1.5b": C.qwen2_5_1_5b(), "3b": C.qwen2_5_3b()}


def _weight_bytes(cfg, itemsize=2) -> int:
    from pam_jax.llm.weights import expected_params

    return int(sum(np.prod(s) for s in expected_params(cfg).values())) * itemsize


def _kv_bytes(cfg, batch, ctx, itemsize=2) -> int:
    return 2 * cfg.num_hidden_layers * batch * ctx * cfg.kv_dim * itemsize


def decode_step_bytes(cfg, batch: int, ctx: int) -> int:
    """Bytes one decode step must read at least: bf16 weights + the KV cache at `ctx` tokens."""
    return _weight_bytes(cfg) + _kv_bytes(cfg, batch, ctx)


def prefill_flops(cfg, batch: int, tokens: int) -> float:
    """Matmul FLOPs of a causal prefill: 2 x non-embedding parameters x tokens, plus QK^T and PV
    over the causal half (2 x 2 x T^2 / 2 x hidden per layer); the logits of the last token."""
    from pam_jax.llm.weights import expected_params

    params = expected_params(cfg)
    embed = cfg.vocab_size * cfg.hidden_size
    dense = sum(int(np.prod(s)) for s in params.values()) - embed * (2 - cfg.tie_word_embeddings)
    per_row = 2 * dense * tokens + 2 * cfg.num_hidden_layers * tokens**2 * cfg.hidden_size
    return float(batch * (per_row + 2 * embed))


def _median_time(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def bench_jax(cfg, batch, prompt, new, reps, dtype_name):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import pam_jax  # noqa: F401  (sets flax config)
    from pam_jax.llm.qwen2 import Qwen2ForCausalLM
    from pam_jax.llm.sampler import generate, prepare

    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[dtype_name]
    model = Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, prompt)).astype(np.int32)
    model = prepare(model)  # split once: nnx.split of a 28-layer model is ~25 ms of Python

    def run(n):
        out = generate(model, input_ids=ids, max_new_tokens=n, stop_ids=())
        return out.tokens  # host arrays: generate returns after the device is done

    run(1), run(new)  # compile both
    t1 = _median_time(lambda: run(1), reps)
    tn = _median_time(lambda: run(new), reps)
    model = None  # free the weights before the next configuration
    gc.collect()
    jax.clear_caches()
    return t1, (tn - t1) / (new - 1)


def _import_hf():
    """transformers' Qwen2, after `tests/torch_ref.tv_shim` (the one torchvision work-around:
    a torchvision wheel built for another torch fails to import, which breaks transformers)."""
    from pathlib import Path

    # appended: tests/sam2 must not shadow the official sam2 package
    sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
    from torch_ref import tv_shim

    tv_shim()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2Config, Qwen2ForCausalLM


def bench_hf(cfg, batch, prompt, new, reps, dtype_name, device):
    import torch

    Qwen2Config, Qwen2ForCausalLM = _import_hf()

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    hc = Qwen2Config(
        **{
            k: v
            for k, v in cfg.to_hf().items()
            if k not in ("architectures", "model_type", "torch_dtype")
        }
    )
    torch.manual_seed(0)
    with torch.device(device):
        m = Qwen2ForCausalLM._from_config(hc, attn_implementation="sdpa", dtype=dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device=device)
    am = torch.ones_like(ids)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def run(n):
        with torch.no_grad():
            m.generate(
                ids,
                attention_mask=am,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        sync()

    run(1), run(new)
    t1 = _median_time(lambda: run(1), reps)
    tn = _median_time(lambda: run(new), reps)
    m = None
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return t1, (tn - t1) / (new - 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test)")
    p.add_argument("--sizes", default=None, help="comma list of 1.5b,3b (default both)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 1100)")
    p.add_argument("--new", type=int, default=None, help="new tokens (default 128)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument(
        "--bw", type=float, default=None, help="memory bandwidth, bytes/s (default: measured)"
    )
    p.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = p.parse_args(argv)

    import jax

    prompt = a.prompt or (48 if a.tiny else 1100)
    new = a.new or (32 if a.tiny else 128)
    cfgs = _configs(a.tiny)
    if a.sizes and not a.tiny:
        cfgs = {k: cfgs[k] for k in a.sizes.split(",")}
    device = "cpu" if a.tiny or jax.default_backend() == "cpu" else "cuda"
    lim = card_limits(small=a.tiny)
    print(json.dumps({"card": lim.as_dict()}), flush=True)
    print(lim.line(), flush=True)
    bw = a.bw or lim.copy_bytes_s
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; prompt {prompt}, "
        f"new {new}, {a.dtype}, floor bandwidth {bw / 1e12:.2f} TB/s"
    )
    rows = []
    for name, cfg in cfgs.items():
        for b in map(int, a.batches.split(",")):
            step_bytes = decode_step_bytes(cfg, b, prompt + new // 2)
            floor = step_bytes / bw
            sheet = step_bytes / lim.datasheet_bytes_s if lim.datasheet_bytes_s else None
            jp, jd = bench_jax(cfg, b, prompt, new, a.reps, a.dtype)
            row = dict(
                size=name,
                batch=b,
                prompt=prompt,
                new=new,
                jax_prefill_ms=jp * 1e3,
                jax_decode_ms=jd * 1e3,
                jax_tok_s=b / jd,
                floor_ms=floor * 1e3,
                jax_floor_frac=floor / jd,
                jax_datasheet_floor_frac=sheet / jd if sheet else None,
            )
            if not a.no_hf:
                hp, hd = bench_hf(cfg, b, prompt, new, a.reps, a.dtype, device)
                row.update(
                    hf_prefill_ms=hp * 1e3,
                    hf_decode_ms=hd * 1e3,
                    hf_tok_s=b / hd,
                    hf_floor_frac=floor / hd,
                    decode_speedup=hd / jd,
                    prefill_speedup=hp / jp,
                )
            rows.append(row)
            line = (
                f"{name:>5} b={b}: prefill jax {jp * 1e3:8.2f} ms | decode jax "
                f"{jd * 1e3:7.3f} ms/step = {b / jd:8.1f} tok/s, "
                f"{100 * floor / jd:5.1f}% of floor ({floor * 1e3:.3f} ms)"
            )
            if not a.no_hf:
                line += (
                    f" || HF prefill {hp * 1e3:8.2f} ms, decode {b / hd:8.1f} tok/s "
                    f"({100 * floor / hd:5.1f}% of floor) || speedup prefill "
                    f"{hp / jp:5.2f}x decode {hd / jd:5.2f}x"
                )
            print(line, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
