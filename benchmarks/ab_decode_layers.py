"""What a Qwen2.5 decode step's dense part costs, and what fusing its projections would save.

    python benchmarks/ab_decode_layers.py [--size 3b] [--batch 2] [--steps 64]

A decode step without attention or cache: per layer RMSNorm, q / k / v, o, residual, RMSNorm,
gate / up, SiLU x up, down, residual (the real layers' arithmetic, bf16, float32 norms), then the
final norm and the tied lm_head, at the real shapes with random weights; `--steps` steps in one
jitted `fori_loop` (each step feeds its output back, so none is hoisted). Variants, same run:

- `split`: the model's layout (gate and up, q, k and v as separate matmuls);
- `gate_up`: gate and up as one [H, 2, M] matmul (MaxText's fused `wi`);
- `gate_up_qkv`: that, and q / k / v as one [H, Q + 2 KV] matmul.

Reports ms per step and the fraction of the bandwidth floor (the weights read once per step,
copy bandwidth measured in the run, `hw.py`).
"""

from __future__ import annotations

import argparse
import json
import time

from hw import card_limits  # benchmarks/hw.py: the card's limits, measured in this run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="3b", choices=["1.5b", "3b", "tiny"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from pam_jax.llm import config as C

    cfg = {"1.5b": C.qwen2_5_1_5b, "3b": C.qwen2_5_3b, "tiny": C.tiny}[args.size]()
    lim = card_limits(small=args.size == "tiny")
    print(lim.line(), flush=True)
    h, m, q, kv, nl = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim, cfg.kv_dim,
                       cfg.num_hidden_layers)  # fmt: skip
    bf = jnp.bfloat16
    key = jax.random.key(0)

    def w(*shape):
        nonlocal key
        key, k = jax.random.split(key)
        return (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(bf)

    layers = [
        dict(q=w(h, q), k=w(h, kv), v=w(h, kv), qb=w(q), kb=w(kv), vb=w(kv), o=w(q, h),
             g=w(h, m), u=w(h, m), d=w(m, h), n1=w(h) + 1, n2=w(h) + 1)
        for _ in range(nl)
    ]  # fmt: skip
    emb = w(cfg.vocab_size, h)
    fnorm = w(h) + 1
    nbytes = sum(int(np.prod(a.shape)) * 2 for lw in layers for a in lw.values())
    nbytes += int(np.prod(emb.shape)) * 2

    def norm(x, s):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-6)
        return s * xf.astype(bf)

    def fused_weights(variant):
        out = []
        for lw in layers:
            lw = dict(lw)
            if variant in ("gate_up", "gate_up_qkv"):
                lw["gu"] = jnp.stack([lw.pop("g"), lw.pop("u")], axis=1)  # [H, 2, M]
            if variant == "gate_up_qkv":
                lw["qkv"] = jnp.concatenate([lw.pop("q"), lw.pop("k"), lw.pop("v")], axis=1)
                lw["qkvb"] = jnp.concatenate([lw.pop("qb"), lw.pop("kb"), lw.pop("vb")])
            out.append(lw)
        return out

    def step(ws, x):
        for lw in ws:
            y = norm(x, lw["n1"])
            if "qkv" in lw:
                a = y @ lw["qkv"] + lw["qkvb"]
                qa, ka, va = a[:, :q], a[:, q : q + kv], a[:, q + kv :]
            else:
                qa, ka, va = y @ lw["q"] + lw["qb"], y @ lw["k"] + lw["kb"], y @ lw["v"] + lw["vb"]
            # stand-in for attention: the step's output depends on q, k and v
            att = qa + jnp.tile(ka + va, (1, q // kv))
            x = x + att @ lw["o"]
            y = norm(x, lw["n2"])
            if "gu" in lw:
                gu = jnp.einsum("bh,hkm->bkm", y, lw["gu"])
                z = jax.nn.silu(gu[:, 0]) * gu[:, 1]
            else:
                z = jax.nn.silu(y @ lw["g"]) * (y @ lw["u"])
            x = x + z @ lw["d"]
        logits = norm(x, fnorm) @ emb.T
        # feed back: the argmax row's embedding (as the sampler's next token)
        return x + emb[jnp.argmax(logits, -1)] * 0.001

    res = {"card": lim.as_dict(), "size": args.size, "batch": args.batch}
    floor_ms = nbytes / lim.copy_bytes_s * 1e3
    for variant in ("split", "gate_up", "gate_up_qkv"):
        ws = fused_weights(variant)

        @jax.jit
        def run(ws, x):
            return jax.lax.fori_loop(0, args.steps, lambda i, x: step(ws, x), x)

        x0 = w(args.batch, h)
        jax.block_until_ready(run(ws, x0))
        ts = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            jax.block_until_ready(run(ws, x0))
            ts.append(time.perf_counter() - t0)
        ms = float(np.median(ts)) / args.steps * 1e3
        res[variant] = {"ms_per_step": ms, "of_floor": floor_ms / ms}
        print(json.dumps({variant: res[variant], "floor_ms": floor_ms}), flush=True)
        del ws
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
