"""The one rules table: logical names -> PartitionSpecs, mesh construction, annotation coverage."""

import os
import subprocess
import sys
import textwrap

import pytest
from jax.sharding import PartitionSpec as P

from pam_jax import sharding


def test_logical_to_spec_maps_through_rules():
    assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("batch", "length", "act_embed")) == P(
        ("data", "fsdp"), None, None
    )
    assert sharding.logical_to_spec(None) == P()


def test_logical_to_spec_never_reuses_a_mesh_axis():
    # "batch" already takes fsdp, so "embed" (fsdp) must fall back to replication.
    assert sharding.logical_to_spec(("batch", "embed")) == P(("data", "fsdp"), None)


def test_every_rule_targets_a_mesh_axis():
    for name, target in sharding.RULES:
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        assert set(axes) <= set(sharding.MESH_AXES), name


def test_make_mesh_rejects_wrong_sizes():
    with pytest.raises(ValueError, match="needs"):
        sharding.make_mesh(data=2, fsdp=2, tensor=1)  # one CPU device in the test process


def test_mesh_on_fake_devices():
    # A fresh process, because the device count is fixed when JAX starts.
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp
        from jax.sharding import AxisType
        from pam_jax import sharding
        mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
        assert mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}, mesh.shape
        assert all(t == AxisType.Auto for t in mesh.axis_types)
        x = jax.device_put(jnp.ones((8, 16)), sharding.named_sharding(mesh, ("batch", "act_mlp")))
        assert x.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), "tensor")
        with jax.set_mesh(mesh):
            y = jax.jit(lambda a: sharding.constrain(a * 2, ("batch", None)))(x)
        assert float(y.sum()) == 256.0
        print("ok")
        """
    )
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok")
