"""Sweep the decode attention at PAM's LLM shapes (GPU only): the Pallas kernel's
(k_splits, block_k), warps and stages, and XLA's own attention.

    python benchmarks/sweep_decode_splits.py [--batches 1,32]

Qwen2.5-3B with random bf16 weights, 1085 input embeddings (PAM's image prompt, bucketed to
1088 by `pam_jax.pam.predictor.LLM_BUCKETS`, so a 1280-slot cache with 128 new tokens). Every
setting generates the same 128 tokens; prefill does not depend on the setting, so per-step time
= (generate(128) - generate(1)) / 127. The settings are patched in (`qwen2._decode_splits`,
`qwen2._use_pallas`, the Pallas `gqa` keywords; all read at trace time, caches cleared between).
Each step is also given against the bandwidth floor (bf16 weights + the cache at the mean context,
over the copy bandwidth measured in this run by `benchmarks/hw.py`, and over the datasheet's).
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np
from bench_llm import decode_step_bytes
from hw import card_limits  # benchmarks/hw.py: the card's limits, measured in this run

# (name, (k_splits, block_k) or None for the default rule, gqa keywords, XLA attention)
SETTINGS = [
    ("default", None, {}, False),
    ("16 x 16", (16, 16), {}, False),
    ("8 x 32", (8, 32), {}, False),
    ("4 x 64", (4, 64), {}, False),
    ("2 x 128", (2, 128), {}, False),
    ("10 x 128", (10, 128), {}, False),
    ("5 x 256", (5, 256), {}, False),
    ("5 x 128, 3 stages", (5, 128), {"num_stages": 3}, False),
    ("default, 8 warps", None, {"num_warps": 8}, False),
    ("default, 1 stage", None, {"num_stages": 1}, False),
    ("20 x 64, 2 warps", (20, 64), {"num_warps": 2}, False),
    ("XLA attention", None, {}, True),
]


def _median(fn, reps: int = 3) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--only", default=None, help="run only the setting of this name")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.experimental.pallas.ops.gpu import decode_attention as da

    import pam_jax  # noqa: F401  (flax config)
    from pam_jax.llm import config as C
    from pam_jax.llm import qwen2
    from pam_jax.llm.sampler import generate, prepare
    from pam_jax.pam.predictor import LLM_BUCKETS

    cfg = C.qwen2_5_3b()
    model = prepare(
        qwen2.Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    )
    auto_splits, auto_use, gqa = qwen2._decode_splits, qwen2._use_pallas, da.gqa
    lim = card_limits()
    print(lim.line(), flush=True)
    print(f"{jax.devices()[0].device_kind}; default for 1280 slots: {auto_splits(1280)}")
    for b in (int(x) for x in args.batches.split(",")):
        emb = jax.random.normal(jax.random.key(0), (b, 1085, cfg.hidden_size), jnp.bfloat16)

        def run(n, emb=emb):
            return generate(model, inputs_embeds=emb, max_new_tokens=n, buckets=LLM_BUCKETS)

        run(1)
        t1 = _median(lambda: run(1))
        for name, splits, kw, xla in SETTINGS:
            if args.only is not None and name != args.only:
                continue
            qwen2._decode_splits = auto_splits if splits is None else (lambda s, st=splits: st)
            qwen2._use_pallas = (lambda impl, n: False) if xla else auto_use
            da.gqa = functools.partial(gqa, **kw)
            jax.clear_caches()
            try:
                run(128)
                tn = _median(lambda: run(128))
            except Exception as e:  # noqa: BLE001  (a setting the kernel rejects)
                print(f"batch {b} {name}: failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            step = (tn - t1) / 127 * 1e3
            floor = decode_step_bytes(cfg, b, 1085 + 64) / lim.copy_bytes_s * 1e3
            sheet = (decode_step_bytes(cfg, b, 1085 + 64) / lim.datasheet_bytes_s * 1e3
                     if lim.datasheet_bytes_s else float("nan"))  # fmt: skip
            print(f"batch {b} {name}: {step:.3f} ms/step (generate {tn * 1e3:.1f} ms, "
                  f"prefill {t1 * 1e3:.1f} ms; {floor / step:.1%} / {sheet / step:.1%} of the "
                  "measured / datasheet bandwidth floor)", flush=True)  # fmt: skip
        qwen2._decode_splits, qwen2._use_pallas, da.gqa = auto_splits, auto_use, gqa
        jax.clear_caches()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
