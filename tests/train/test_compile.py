"""`pam-jax train --compile-only --topology v5e:2x4`: the micro config's sharded step lowers and
compiles for an 8-chip TPU v5e slice on this CPU host (libtpu from the [tpu] extra), and the
report holds memory, FLOPs and shardings. Subprocess: libtpu is loaded there only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.heavy  # a few minutes of XLA TPU compile on 2 CPU cores
def test_micro_step_compiles_for_v5e_2x4(tmp_path):
    pytest.importorskip("libtpu")
    cmd = [
        sys.executable, "-m", "pam_jax.train.cli", "--config", "micro", "--compile-only",
        "--topology", "v5e:2x4", f"workdir={tmp_path}", "mesh=2,2,2", "batch_size=8",
    ]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "compile.json").read_text())
    assert rep["chips"] == 8 and rep["device_kind"].startswith("TPU v5")
    assert rep["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    mem = rep["memory_per_chip_gib"]
    assert 0 < mem["total"] < mem["hbm"] == 16 and rep["fits"] is True
    assert rep["compiler_flops_per_chip"] > 0 and rep["model_flops_per_step"] > 0
    big = rep["largest_arrays"][0]
    assert big["shard_shape"] != big["shape"] or not big["trained"]


def test_unknown_topology_is_one_line(tmp_path):
    pytest.importorskip("libtpu")
    cmd = [sys.executable, "-m", "pam_jax.train.cli", "--config", "micro", "--compile-only",
           "--topology", "v9z:1x1", f"workdir={tmp_path}"]  # fmt: skip
    r = subprocess.run(cmd, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 2
    assert "cannot describe TPU topology 'v9z:1x1'" in r.stderr.strip().splitlines()[-1]
