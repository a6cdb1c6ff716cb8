"""`resize_bilinear`'s GPU options against torch on the CPU: the two-tap form must equal torch's
bilinear (float32 rounding only), and a bad `PAM_JAX_BILINEAR` is refused by name."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pam_jax.sam2 import ops


@pytest.mark.parametrize("hw_out", [(1024, 1536), (480, 640), (37, 41), (200, 75)])
def test_taps_equal_torch(monkeypatch, hw_out):
    monkeypatch.setattr(ops, "_bilinear_mode", lambda: "taps")
    x = (10 * np.random.default_rng(0).standard_normal((1, 2, 256, 256))).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x), size=hw_out, mode="bilinear", align_corners=False)
    # logits of +-40: 1e-5 absolute is a few float32 ulps (torch's fused src = s (o + .5) - .5)
    got = np.asarray(ops.resize_bilinear(x, hw_out, False, axes=(-2, -1)))
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)
    got = np.asarray(ops.resize_bilinear(x.transpose(0, 2, 3, 1), hw_out, False))
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), want.numpy(), atol=1e-5, rtol=0)


def test_linear_taps_rows():
    i0, i1, w0, w1 = ops.linear_taps(256, 1024)
    assert i0[0] == 0 and i1[-1] == 255
    np.testing.assert_allclose(w0 + w1, 1.0, atol=1e-7)
    assert np.all(np.diff(i0) >= 0)


def test_bad_mode(monkeypatch):
    monkeypatch.setenv("PAM_JAX_BILINEAR", "fast")
    with pytest.raises(ValueError, match="PAM_JAX_BILINEAR='fast'"):
        ops._bilinear_mode()


def test_accelerator_default_follows_matmul_precision(monkeypatch):
    """On an accelerator the upsample runs three bf16 passes, except in float32 parity runs
    (default matmul precision "highest", which tests/conftest.py sets)."""
    import jax

    monkeypatch.delenv("PAM_JAX_BILINEAR", raising=False)
    monkeypatch.setattr(ops.jax, "default_backend", lambda: "gpu")
    with jax.default_matmul_precision("highest"):
        assert ops._bilinear_mode() == "highest"
    with jax.default_matmul_precision("default"):
        assert ops._bilinear_mode() == "bf16x3"
        monkeypatch.setenv("PAM_JAX_BILINEAR", "taps")
        assert ops._bilinear_mode() == "taps"
