"""A (data=2, fsdp=2, tensor=2) mesh on 8 fake CPU devices: sharded == unsharded (forward,
generation, training forward + loss and gradients); load_pam / load_sam2 place every part by
the default rules and by a run's own `axis_rules` (tests/llm/sharded_check.py).

Runs in a subprocess because the device count is fixed when JAX starts. Tolerance 1e-5:
sharded matmuls reduce in a different order (float32).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_mesh_sharded_forward_equals_unsharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    script = Path(__file__).with_name("sharded_check.py")
    r = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "OK" in r.stdout
