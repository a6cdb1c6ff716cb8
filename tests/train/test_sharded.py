"""The train step on 8 fake CPU devices equals one device (sharded_check.py, in a subprocess
because the device count is fixed when JAX starts; tolerances stated there)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _check(*args: str) -> None:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")  # fmt: skip
    script = Path(__file__).with_name("sharded_check.py")
    r = subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=1800
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "OK" in r.stdout


def test_fsdp_tensor_mesh_and_grad_accum():
    """(2, 2, 2): shard shapes, loss and parameters == one device; frozen SAM 2 bit-identical
    with no optimizer state; grad_accum=2 == one batch of 2 micro-batches."""
    _check("2,2,2", "--accum")


@pytest.mark.heavy
def test_all_meshes():
    """(8, 1, 1), (1, 8, 1), (1, 1, 8): loss and parameters == one device."""
    _check("8,1,1", "1,8,1", "1,1,8")
