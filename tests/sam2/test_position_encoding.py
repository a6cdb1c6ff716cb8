"""Parity of pam_jax.sam2.position_encoding with the official sam2 functions (float32, CPU).

All of these are closed-form float32 functions evaluated in the official op order; the only
differences are sin/cos/pow implementations (a few ulp), hence atol 1e-5 on O(1) values.
"""

import numpy as np
import pytest
import torch
from flax import nnx
from pam_jax.convert.torch_nnx import torch_to_nnx_params
from sam2.modeling import position_encoding as ref
from sam2.modeling.sam2_utils import get_1d_sine_pe as ref_1d_sine_pe
from torch_ref import perturb_, to_np

from pam_jax.sam2 import position_encoding as pe

ATOL = 1e-5  # O(1) outputs of float32 sin/cos; ulp-level library differences only


@pytest.mark.parametrize("h,w,d", [(64, 64, 256), (32, 48, 64), (7, 5, 256)])
def test_position_embedding_sine(h, w, d):
    want = to_np(ref.PositionEmbeddingSine(d)(torch.zeros(1, 3, h, w)))[0].transpose(1, 2, 0)
    got = np.asarray(pe.position_embedding_sine(h, w, d))
    assert got.shape == (h, w, d)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def _random_pe_pair(npf=128):
    torch.manual_seed(0)
    t = ref.PositionEmbeddingRandom(npf)
    perturb_(t)
    m = pe.PositionEmbeddingRandom(npf, rngs=nnx.Rngs(0))
    params = torch_to_nnx_params(m, {k: to_np(v) for k, v in t.state_dict().items()})
    m.positional_encoding_gaussian_matrix[...] = params["positional_encoding_gaussian_matrix"]
    return t, m


def test_position_embedding_random_dense():
    t, m = _random_pe_pair()
    want = to_np(t((64, 48))).transpose(1, 2, 0)
    got = np.asarray(m((64, 48)))
    assert got.shape == (64, 48, 256)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_position_embedding_random_coords():
    t, m = _random_pe_pair()
    coords = np.random.default_rng(0).uniform(0, 1024, size=(3, 5, 2)).astype(np.float32)
    want = to_np(t.forward_with_coords(torch.from_numpy(coords), (768, 1024)))
    got = np.asarray(m.forward_with_coords(coords, (768, 1024)))
    # args of sin/cos reach ~2pi * |G| * 1 ~ 20: float32 ulp there is ~2e-6
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("end,r", [(64, 1), (32, 2), (16, 3)])
def test_rope(end, r):
    dim = 256
    fc = ref.compute_axial_cis(dim, end, end)
    cos, sin = pe.compute_axial_cis(dim, end, end)
    # angles up to 63 rad: float32 ulp ~4e-6, so cos/sin may differ by that much
    np.testing.assert_allclose(np.asarray(cos), fc.real.numpy(), atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(sin), fc.imag.numpy(), atol=2e-5, rtol=0)
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 1, end * end, dim)).astype(np.float32)
    k = rng.standard_normal((2, 1, r * end * end, dim)).astype(np.float32)
    wq, wk = ref.apply_rotary_enc(
        torch.from_numpy(q), torch.from_numpy(k), fc, repeat_freqs_k=r > 1
    )
    gq, gk = pe.apply_rotary_enc(q, k, cos, sin, repeat_freqs_k=r > 1)
    assert gk.shape == k.shape
    np.testing.assert_allclose(np.asarray(gq), to_np(wq), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(gk), to_np(wk), atol=1e-4, rtol=0)


def test_1d_sine_pe():
    pos = np.linspace(-1, 1, 31, dtype=np.float32).reshape(1, 31)
    want = to_np(ref_1d_sine_pe(torch.from_numpy(pos), 256))
    got = np.asarray(pe.get_1d_sine_pe(pos, 256))
    assert got.shape == (1, 31, 256)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
