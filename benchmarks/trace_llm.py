"""Capture a JAX profiler trace of PAM's LLM work (GPU): batch-32 prefill and a few decode steps.

    python benchmarks/trace_llm.py --out /tmp/trace [--batch 32] [--new 8]

Qwen2.5-3B shapes, random bf16 weights, 1085 input embeddings (PAM's image prompt). The trace
(`plugins/profile/*/*.xplane.pb`) opens in TensorBoard / xprof; its `hlo_stats` and
`kernel_stats` tools give per-fusion and per-kernel GPU time.
"""

from __future__ import annotations

import argparse

from hw import card_limits  # benchmarks/hw.py: the card's limits


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, help="trace directory")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new", type=int, default=8, help="new tokens in the traced decode")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    import pam_jax  # noqa: F401  (flax config)
    from pam_jax.llm import config as C
    from pam_jax.llm.qwen2 import Qwen2ForCausalLM
    from pam_jax.llm.sampler import generate, prepare
    from pam_jax.pam.predictor import LLM_BUCKETS

    cfg = C.qwen2_5_3b()
    model = prepare(
        Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    )
    emb = jax.random.normal(jax.random.key(0), (args.batch, 1085, cfg.hidden_size), jnp.bfloat16)

    def run(n):
        return generate(model, inputs_embeds=emb, max_new_tokens=n, buckets=LLM_BUCKETS)

    print(card_limits().line(), flush=True)  # the card, measured outside the trace
    run(1), run(args.new)  # compile outside the trace
    with jax.profiler.trace(args.out):
        run(1)  # prefill + first token
        run(args.new)
    print(f"trace written under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
