"""`pam-jax train --compile-only --topology v5e:2x4`: the micro config's sharded step lowers and
compiles for an 8-chip TPU v5e slice on this CPU host (libtpu from the [tpu] extra), and the
report holds memory, FLOPs and shardings. Subprocess: libtpu is loaded there only. A step that
does not fit exits 3 with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
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


@pytest.mark.heavy  # a CPU compile of the micro step: ~35 s on 2 busy cores
def test_step_that_does_not_fit_is_one_line(tmp_path, monkeypatch, capsys):
    """--compile-only on this CPU host, with the CPU given a 1 MiB "HBM": the real micro step
    compiles, its per-chip total exceeds that, so the command exits 3 with one line naming the
    sizes, and compile.json says fits false with the same total."""
    from pam_jax.cli import main
    from pam_jax.training import compile as CO

    monkeypatch.setitem(CO.HBM, "cpu", 2**20)
    argv = [
        "train",
        "--config",
        "micro",
        "--compile-only",
        f"workdir={tmp_path}",
        "batch_size=1",
        "train_parts=llm",
    ]  # the smallest backward: the visual path runs forward only
    assert main(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the step does not fit on 1 x cpu" in err[0], err
    rep = json.loads((tmp_path / "compile.json").read_text())
    mem = rep["memory_per_chip_gib"]
    assert rep["fits"] is False and mem["hbm"] == 2**20 / 2**30 < mem["total"]
    assert f"{mem['total']:.2f} GiB per chip" in err[0]


def test_compiler_out_of_memory_is_one_line():
    """A compile that fails with RESOURCE_EXHAUSTED is reported (fits false) in one line that
    names the chips and keeps the compiler's first line."""
    from pam_jax.training.compile import no_fit_message

    err = "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory"
    rep = {"chips": 256, "device_kind": "TPU v5 lite", "fits": False, "error": err}
    msg = no_fit_message(rep)
    assert "\n" not in msg and msg.startswith("the step does not fit on 256 x TPU v5 lite")
    assert "RESOURCE_EXHAUSTED" in msg


def test_bf16_compute_keeps_float32_master_weights():
    """dtype=bfloat16, lowered (not compiled) on this host: the step's matmuls take bf16
    operands, while the trained parameters and Adam moments it returns, and the loss, are
    float32 (the master weights)."""
    import re

    import jax

    from pam_jax.training.compile import abstract_step
    from pam_jax.training.config import load_config

    cfg = load_config("micro").replace(dtype="bfloat16", batch_size=2)
    lowered = abstract_step(cfg, jax.devices()[:1]).lower()
    state, metrics = lowered.out_info
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype(np.float32)}
    floats = {x.dtype for x in jax.tree.leaves(state.opt_state) if x.dtype.kind == "f"}
    assert floats == {np.dtype(np.float32)} and metrics["loss"].dtype == np.float32
    dots = re.findall(r"stablehlo\.dot_general.*?:\s*\(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)",
                      lowered.as_text())  # fmt: skip
    bf16 = sum(a == b == "bf16" for a, b in dots)
    assert len(dots) > 100 and bf16 >= 0.9 * len(dots), (bf16, len(dots))
