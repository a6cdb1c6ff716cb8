"""The training attention on the GPU: cuDNN fused attention vs the chunked (flash-style) path.

    python benchmarks/check_attention_gpu.py            # GPU: bf16, Qwen2.5-3B heads, T up to 12288
    python benchmarks/check_attention_gpu.py --cpu      # CPU smoke: tiny shapes, "dense" stands in
                                                        # for cuDNN (float32)

For each (batch, length): right-padded rows (one sequence each, lengths from 60% to 100% of T),
q/k/v ~ N(0, 1) in bf16 with Qwen2.5-3B's heads (16 query / 2 KV heads of 128). Outputs and the
gradients of sum(out * w) w.r.t. q, k, v are compared at valid positions. Tolerance: both sides
take bf16 inputs and accumulate in float32 but round P and the output to bf16 at different
points, so agreement is ~1 bf16 ulp of O(1) values: max |diff| <= 2e-2 on outputs and
5e-2 * max|grad| on gradients. Also a whole Qwen2 training forward (2 tiny layers,
`hidden_states_train`) with attention="cudnn" vs "chunked". Prints the card's limits
(`benchmarks/hw.py`, measured in this run), then one JSON line per check, with forward+backward
times of both paths and the fused path's causal attention FLOPs against the card's measured bf16
matmul rate and datasheet; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from hw import card_limits  # benchmarks/hw.py: the card's limits, measured in this run


def _time(f, *args, reps: int = 5) -> float:
    import jax

    jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(f(*args))
    return (time.perf_counter() - t0) / reps


def check_kernel(b: int, t: int, h: int, kv: int, d: int, ref_impl: str, dtype, lim) -> dict:
    import jax
    import jax.numpy as jnp

    from pam_jax.llm import attention as A

    rs = np.random.RandomState(t)
    q, k, v = (jnp.asarray(rs.randn(b, t, n, d), dtype) for n in (h, kv, kv))
    w = jnp.asarray(rs.randn(b, t, h, d), dtype)
    lens = np.linspace(0.6 * t, t, b).astype(int)
    seg = jnp.asarray((np.arange(t)[None] < lens[:, None]).astype(np.int32))
    valid = np.asarray(seg, bool)

    def run(impl):
        def loss(q, k, v):
            out = A.attend(q, k, v, seg, implementation=impl)
            return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32)), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    fast, chunked = run(ref_impl), run("chunked")
    (_, o1), g1 = fast(q, k, v)
    (_, o2), g2 = chunked(q, k, v)
    out_err = float(np.abs(np.float32(o1) - np.float32(o2))[valid].max())
    grad_err = [
        float(np.abs(np.float32(a) - np.float32(c)).max() / max(np.abs(np.float32(c)).max(), 1e-6))
        for a, c in zip(g1, g2)
    ]
    ok = out_err <= 2e-2 and max(grad_err) <= 5e-2
    s_fast = _time(fast, q, k, v)
    # causal: forward QK^T + PV over half the T^2 pairs = 2 b h T^2 d; backward 2.5x that
    tflop = 7 * b * h * t * t * d / 1e12
    return dict(
        check="kernel", impl=ref_impl, batch=b, length=t, out_max_abs_err=out_err,
        grad_max_rel_err=grad_err, ok=ok, s_fwd_bwd=s_fast,
        s_fwd_bwd_chunked=_time(chunked, q, k, v), fwd_bwd_tflop=tflop,
        frac_measured_peak=tflop * 1e12 / s_fast / lim.matmul_flops,
        frac_datasheet_peak=(
            tflop * 1e12 / s_fast / lim.datasheet_flops if lim.datasheet_flops else None
        ),
    )  # fmt: skip


def check_model(ref_impl: str, dtype) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pam_jax.checkpoint import random_normal_params
    from pam_jax.llm.config import tiny
    from pam_jax.llm.qwen2 import Qwen2ForCausalLM

    cfg = tiny(hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=1)
    model = random_normal_params(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    b, t = 2, 1024
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(b, t, cfg.hidden_size), dtype)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    seg = jnp.asarray((np.arange(t)[None] < np.array([[t], [700]])).astype(np.int32))
    f = jax.jit(
        lambda x, impl: model.hidden_states_train(x, pos, seg, attention=impl),
        static_argnums=1,
    )
    a, c = np.float32(f(x, ref_impl)), np.float32(f(x, "chunked"))
    valid = np.asarray(seg, bool)
    err = float(np.abs(a - c)[valid].max() / max(np.abs(c[valid]).max(), 1e-6))
    return dict(check="qwen2_hidden_states_train", impl=ref_impl, rel_err=err, ok=err <= 5e-2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="CPU smoke: tiny shapes, dense vs chunked")
    ap.add_argument("--lengths", default="1024,4096,12288", help="comma-separated T (GPU)")
    args = ap.parse_args()
    if args.cpu:
        import os

        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp

    if args.cpu:
        impl, dtype, shapes = "dense", jnp.float32, [(2, 256, 4, 2, 32)]
    else:
        if jax.default_backend() != "gpu":
            print("no GPU: run with --cpu for the smoke test", file=sys.stderr)
            return 2
        impl, dtype = "cudnn", jnp.bfloat16
        shapes = [(2, int(n), 16, 2, 128) for n in args.lengths.split(",")]
    lim = card_limits(small=args.cpu)
    print(json.dumps({"card": lim.as_dict()}), flush=True)
    print(lim.line(), flush=True)
    ok = True
    for shape in shapes:
        r = check_kernel(*shape, impl, dtype, lim)
        print(json.dumps(r), flush=True)
        ok &= r["ok"]
    r = check_model(impl, dtype)
    print(json.dumps(r), flush=True)
    ok &= r["ok"]
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
