"""Sharding, declared once.

Every parameter and every large activation carries *logical* axis names ("embed", "mlp",
"heads", "vocab", "batch", ...). `RULES` maps them to the three mesh axes `data`, `fsdp`,
`tensor`. Changing the parallelism of a model means editing this table, nothing else.

Modules attach names with `P(...)` metadata (`nnx.Param(value, out_sharding=names)` or
`kernel_metadata={"out_sharding": names}`) and constrain activations with `constrain(x, names)`,
which is a no-op outside a mesh context so CPU tests and single-device runs need no mesh.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated). Ordered; first wins.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_length", None),
    # parameters
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("q_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),  # the scan axis of stacked layers
    ("norm", None),
    # vision (SAM 2): convolutions and small tensors are replicated; wide linears shard like
    # the LLM's so a Hiera-L trunk can still use FSDP.
    ("conv_h", None),
    ("conv_w", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("vis_embed", None),
    ("vis_mlp", "tensor"),
    ("vis_heads", "tensor"),
    ("tokens", None),
    ("spatial", None),
)


def logical_to_spec(names: Sequence[str | None] | None, rules=RULES) -> PartitionSpec:
    """Logical axis names -> PartitionSpec, never using a mesh axis twice."""
    if names is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for n in names:
        m = table.get(n) if n is not None else None
        axes = (m,) if isinstance(m, str) else tuple(m or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (sharding propagates from annotations).

    One of the sizes may be -1: it takes the remaining devices.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {np.prod(sizes)} devices, "
            f"have {len(devices)}"
        )
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def named_sharding(mesh: Mesh, names: Sequence[str | None] | None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names))


def _current_mesh() -> Mesh | None:
    m = jax.sharding.get_abstract_mesh()
    return None if m is None or m.empty else m


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op when no mesh is set."""
    mesh = _current_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def param_names(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    md = variable.get_metadata()
    return md.get("out_sharding") or md.get("sharding_names") or md.get("sharding")


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedSharding for every Variable of an (abstract) state, from its logical names."""

    def one(v):
        names = param_names(v) if isinstance(v, nnx.Variable) else None
        nd = len(v.shape) if hasattr(v, "shape") else 0
        if names is not None and len(names) != nd:
            raise ValueError(f"sharding names {names} do not match rank {nd}")
        return named_sharding(mesh, names)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def unannotated_params(model: nnx.Module) -> list[str]:
    """Paths of parameters that carry no logical axis names (a test asserts this is empty)."""
    out = []
    for path, v in nnx.iter_graph(model):
        if isinstance(v, nnx.Param) and np.ndim(v.get_value()) > 0 and param_names(v) is None:
            out.append("/".join(map(str, path)))
    return out
