"""Shared pytest setup: make `import torch_ref` work and pin float32 numerics for parity tests."""

import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
# One persistent compilation cache for the whole run: the xdist workers and the subprocess tests
# (they inherit the environment) build many of the same tiny programs, and a program one process
# compiled is then read back by the others (a video parity scenario: 25 s of compiles -> 4 s).
# The controller makes the directory and removes it at exit; PAM_JAX_TEST_JIT_CACHE=DIR keeps
# one across runs instead (then time a suite with it empty: CI starts cold).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    keep = os.environ.get("PAM_JAX_TEST_JIT_CACHE")
    cache = keep or tempfile.mkdtemp(prefix="pam-jax-test-jit-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    if not keep:
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
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
