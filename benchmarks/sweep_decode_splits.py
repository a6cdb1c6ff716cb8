"""Sweep the Pallas decode kernel's (k_splits, block_k) at PAM's LLM shapes (GPU only).

    python benchmarks/sweep_decode_splits.py

Qwen2.5-3B with random bf16 weights, 1085 input embeddings (PAM's image prompt, bucketed to
1088 by `pam_jax.pam.predictor.LLM_BUCKETS`, so a 1280-slot cache with 128 new tokens), batch 1
and 32. Every setting generates the same 128 tokens; prefill does not depend on the setting, so
per-step time = (generate(128) - generate(1)) / 127. `qwen2._decode_splits` is patched per
setting (it is read at trace time; caches are cleared in between).
"""

from __future__ import annotations

import time

import numpy as np

SETTINGS = [None, (16, 16), (8, 32), (4, 64), (2, 128), (10, 128), (5, 256)]


def _median(fn, reps: int = 3) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main() -> int:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import pam_jax  # noqa: F401  (flax config)
    from pam_jax.llm import config as C
    from pam_jax.llm import qwen2
    from pam_jax.llm.sampler import generate, prepare
    from pam_jax.pam.predictor import LLM_BUCKETS

    cfg = C.qwen2_5_3b()
    model = prepare(
        qwen2.Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    )
    auto = qwen2._decode_splits
    print(f"{jax.devices()[0].device_kind}; default for 1280 slots: {auto(1280)}", flush=True)
    for b in (1, 32):
        emb = jax.random.normal(jax.random.key(0), (b, 1085, cfg.hidden_size), jnp.bfloat16)

        def run(n, emb=emb):
            return generate(model, inputs_embeds=emb, max_new_tokens=n, buckets=LLM_BUCKETS)

        run(1)
        t1 = _median(lambda: run(1))
        for setting in SETTINGS:
            qwen2._decode_splits = auto if setting is None else (lambda s, st=setting: st)
            jax.clear_caches()
            name = f"default {auto(1280)}" if setting is None else str(setting)
            try:
                run(128)
                tn = _median(lambda: run(128))
            except Exception as e:  # noqa: BLE001  (a setting the kernel rejects)
                print(f"batch {b} {name}: failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            step = (tn - t1) / 127 * 1e3
            print(f"batch {b} splits {name}: {step:.3f} ms/step (generate {tn * 1e3:.1f} ms, "
                  f"prefill {t1 * 1e3:.1f} ms)", flush=True)  # fmt: skip
        qwen2._decode_splits = auto
        jax.clear_caches()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
