"""Shared pytest setup: make `import torch_ref` work and pin float32 numerics for parity tests."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
# Appended, not prepended: tests/sam2 must never shadow the official `sam2` package. Test
# modules import as `tests.sam2.test_x` (tests/__init__.py), so tests/ need not lead sys.path.
sys.path.append(os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
from torch_ref import tv_shim  # noqa: E402

# Every test process sees an importable torchvision (the official sam2 generator and
# transformers import it), whichever test first touches it.
tv_shim()

jax.config.update("jax_enable_x64", False)
# Parity tests compare float32 against torch float32; on accelerators the default matmul precision
# would be bf16-pass (TF32-like) and break that comparison.
jax.config.update("jax_default_matmul_precision", "highest")
