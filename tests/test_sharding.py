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


def test_axis_rules_context_is_scoped_and_checked():
    mine = (("embed", None), ("mlp", ("fsdp", "tensor")))
    assert sharding.current_rules() == sharding.RULES
    with sharding.axis_rules(mine):
        assert sharding.current_rules() == mine
        assert sharding.logical_to_spec(("embed", "mlp")) == P(None, ("fsdp", "tensor"))
        assert sharding.logical_to_spec(("heads",)) == P(None)  # not in the table: replicated
        with sharding.axis_rules({"embed": "data"}):
            assert sharding.logical_to_spec(("embed", "mlp")) == P("data", None)
        assert sharding.current_rules() == mine
    assert sharding.current_rules() == sharding.RULES
    assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    with pytest.raises(ValueError, match="unknown mesh axes"):
        with sharding.axis_rules((("embed", "model"),)):
            pass
    with pytest.raises(ValueError, match="logical name"):
        with sharding.axis_rules(("embed",)):
            pass


def test_make_mesh_shape_and_axis_types():
    from jax.sharding import AxisType

    mesh = sharding.make_mesh((1, 1, 1))
    assert mesh.axis_names == sharding.MESH_AXES
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    mesh = sharding.make_mesh((1, -1, 1), axis_types=AxisType.Explicit)
    assert all(t == AxisType.Explicit for t in mesh.axis_types)
    with pytest.raises(ValueError, match="data, fsdp, tensor"):
        sharding.make_mesh((1, 1))
    with pytest.raises(ValueError, match="positive"):
        sharding.make_mesh((0, 1, 1))


def test_named_sharding_replicates_dims_the_mesh_does_not_divide():
    code = textwrap.dedent(
        """
        from jax.sharding import PartitionSpec as P
        from pam_jax import sharding
        mesh = sharding.make_mesh((2, 2, 2))
        ns = lambda names, shape: sharding.named_sharding(mesh, names, shape).spec
        assert ns(("vocab", "embed"), (128, 64)) == P("tensor", "fsdp")
        assert ns(("vocab", "embed"), (259, 64)) == P(None, "fsdp")
        assert ns(("batch",), (6,)) == P(None)  # data x fsdp = 4 does not divide 6
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
