"""Parity of the mlp2x_gelu projectors with the release's nn.Sequential(Linear, GELU, Linear)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from pam_jax.convert.torch_nnx import nnx_to_torch_state, torch_to_nnx_params
from torch import nn
from torch_ref import perturb_, to_np

from pam_jax.checkpoint import assign_params
from pam_jax.pam.projector import MLPProjector, newline_param
from pam_jax.sharding import unannotated_params

# float32; two matmuls of width <= 1024 and an exact-erf GELU: accumulation-order differences
# only (~1e-6 relative on O(1..10) outputs).
ATOL = 2e-5


@pytest.mark.parametrize("din,h", [(1024, 64), (256, 96)])  # img / semT projectors, small LLM H
def test_projector_parity(din, h):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(din, h), nn.GELU(), nn.Linear(h, h)).eval()
    perturb_(ref)
    model = MLPProjector(din, h, rngs=nnx.Rngs(0))
    sd = {k: to_np(v) for k, v in ref.state_dict().items()}
    assert set(sd) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assign_params(model, torch_to_nnx_params(model, sd))
    assert set(nnx_to_torch_state(model)) == set(sd)
    x = torch.randn(2, 7, din, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = to_np(ref(x))
    got = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(to_np(x))))
    print(f"projector {din}->{h}: max err {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert unannotated_params(model) == []


def test_newline_param():
    p = newline_param(64, nnx.Rngs(0))
    assert p.shape == (64,)
    assert p.get_metadata()["out_sharding"] == ("embed",)
