"""Why scanned LLM layers need far fewer temporaries under FSDP (benchmarks/README: PAM-3B
stage 2 on v5p:4x4x4, 16.47 GiB unrolled vs 4.30 GiB scanned), shown on a small model whose
temporaries are dominated by the layers' weights: the micro PAM with a wider 8-layer LLM
(hidden 1024, MLP 4096: 15.2 M parameters a layer), compiled for v5e:2x4 with mesh (1, 8, 1),
bf16, remat full, one row per chip.

What the compiled programs show (libtpu 0.0.42.1: 185 MiB unrolled vs 49 MiB scanned): most
weight gradients are reduce-scattered (on TPU an all-reduce + dynamic-slice pair inside a kCustom
`all-reduce-scatter` fusion, so a text search for "all-reduce(" finds those too), but down_proj's
gradient (with the layer's norm / bias gradients) is all-reduced whole, every chip holding the
layer's whole bf16 down_proj gradient before keeping its shard; a sharding constraint on that
cotangent (in the compute dtype, before the cast back to float32) did not change it. In
the scan each iteration reduces its own layer (one all-reduce of one layer's matrices) and
frees it. Unrolled, XLA's all-reduce combiner merges the reductions of many layers into one
tuple all-reduce at the end of the backward pass, so the whole gradients of all those layers
are alive together (the largest here: 102 operands, 80 MiB, every layer's down_proj and
o_proj), beside the all-gathered weights the scheduler fetches early. At PAM-3B's 36 layers
(147 MiB of bf16 weights a layer, 5.2 GiB in all) the same pattern would account for GiBs; the
PAM-3B dump itself was not taken (its unrolled compile takes about an hour here). Measured
here (2026-12-01, libtpu 0.0.42.1): scan 48.9 MiB, unrolled 184.7 MiB; the largest gradient
all-reduce carries 1 whole down_proj gradient scanned, 8 unrolled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import json, re, sys
from pam_jax.training.compile import abstract_step, topology_devices
from pam_jax.training.config import load_config

cfg = load_config("micro").replace(
    model=sys.argv[1], mesh="1,-1,1", batch_size=8, seq_len=128, dtype="bfloat16",
    remat="full", scan_layers=sys.argv[2] == "scan",
)
compiled = abstract_step(cfg, topology_devices("v5e:2x4"), accelerator=True).lower().compile()
# each all-reduce: its operand shapes (the result tuple)
reduces = [re.findall(r"bf16\[[\d,]*\]|f32\[[\d,]*\]", m)
           for m in re.findall(r"= (\(.*?\)|\S+) all-reduce\(", compiled.as_text())]
mem = compiled.memory_analysis()
print(json.dumps({"temporaries": mem.temp_size_in_bytes, "all_reduces": reduces}))
"""


def _compile(model: Path, mode: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(model), mode], env=env,
                       capture_output=True, text=True, timeout=1500)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.heavy  # two TPU compiles on the CPU host: ~2 + 3 minutes on 2 busy cores
def test_unrolled_layers_hold_many_layers_gradients(tmp_path):
    pytest.importorskip("libtpu")
    from pam_jax.training.config import TRAIN_CONFIG_DIR

    d = json.loads((TRAIN_CONFIG_DIR / "models" / "micro-pam.json").read_text())
    wide = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2, head_dim=128)  # fmt: skip
    d["config"]["llm"].update(wide)
    model = tmp_path / "wide-pam.json"
    model.write_text(json.dumps(d))
    scan, unrolled = _compile(model, "scan"), _compile(model, "unrolled")
    down = "bf16[4096,1024]"  # one layer's down_proj gradient, whole (8 MiB)

    def most(run):  # the most whole down_proj gradients one all-reduce carries
        return max(ops.count(down) for ops in run["all_reduces"])

    print("temporaries MiB: scan", scan["temporaries"] / 2**20, "unrolled",
          unrolled["temporaries"] / 2**20, "| down_proj grads per all-reduce:", most(scan),
          most(unrolled))  # fmt: skip
    assert unrolled["temporaries"] > 2.5 * scan["temporaries"]
    assert most(scan) == 1  # the loop body reduces its own layer only
    assert most(unrolled) >= 4  # one combined all-reduce holds many layers' whole gradients
    # every one of the 8 layers' whole down_proj gradients is all-reduced (not a shard)
    assert sum(ops.count(down) for ops in unrolled["all_reduces"]) >= 8
