"""Sharding: logical axis names on every tensor, a rules table per run, meshes, placement.

Every parameter and every large activation carries *logical* axis names ("embed", "mlp",
"heads", "vocab", "batch", ...). A rules table maps them to the three mesh axes `data`, `fsdp`,
`tensor`. `RULES` is the default table; a run chooses its own with the `axis_rules` context
(as MaxText's `nn_partitioning.axis_rules`), which `logical_to_spec`, `constrain`,
`state_shardings`, `place` and the loaders (`load_sam2`, `load_qwen2`, `load_pam` with `mesh=`)
all read:

    mesh = sharding.make_mesh((2, 4, 1))
    with sharding.axis_rules(my_rules), jax.set_mesh(mesh):
        model, cfg, tok = load_pam(d, mesh=mesh)      # every part placed by my_rules
        step = jax.jit(train_step)                    # constraints traced under my_rules

Rules are read when a function is *traced*: a jitted function keeps the rules it was traced
under. Modules attach names with `nnx.Param(value, out_sharding=names)` or
`kernel_metadata={"out_sharding": names}` and constrain activations with `constrain(x, names)`,
a no-op outside a mesh context so CPU tests and single-device runs need no mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Target = str | tuple[str, ...] | None
Rules = tuple[tuple[str, Target], ...]

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated). Ordered; first wins.
RULES: Rules = (
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

_ACTIVE: contextvars.ContextVar[Rules] = contextvars.ContextVar("pam_jax_axis_rules", default=RULES)


def _check_rules(rules: Sequence[tuple[str, Target]] | Mapping[str, Target]) -> Rules:
    items = rules.items() if isinstance(rules, Mapping) else rules
    out = []
    for item in items:
        if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"a sharding rule must be (logical name, mesh axes), got {item!r}")
        name, target = item
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        if bad := [a for a in axes if a not in MESH_AXES]:
            raise ValueError(f"rule {name!r} targets unknown mesh axes {bad}; use {MESH_AXES}")
        out.append((name, target if isinstance(target, str) or target is None else tuple(axes)))
    return tuple(out)


@contextlib.contextmanager
def axis_rules(rules: Sequence[tuple[str, Target]] | Mapping[str, Target]) -> Iterator[Rules]:
    """Use `rules` (logical name -> mesh axes) inside the block, in pam-jax and in flax.

    Names missing from `rules` are replicated. flax's `nnx.logical_axis_rules` is set to the
    same table, so parameters created under `jax.set_mesh` are sharded consistently.
    """
    checked = _check_rules(rules)
    token = _ACTIVE.set(checked)
    try:
        with nnx.logical_axis_rules(checked):
            yield checked
    finally:
        _ACTIVE.reset(token)


def current_rules() -> Rules:
    """The rules table in effect (`RULES` outside any `axis_rules` block)."""
    return _ACTIVE.get()


def logical_to_spec(
    names: Sequence[str | None] | None, rules: Sequence[tuple[str, Target]] | None = None
) -> PartitionSpec:
    """Logical axis names -> PartitionSpec under `rules` (default: `current_rules()`), never
    using a mesh axis twice (a later dimension that would reuse one is replicated)."""
    if names is None:
        return PartitionSpec()
    table = dict(current_rules() if rules is None else rules)
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
    shape: Sequence[int] | None = None,
    *,
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
    axis_types: AxisType | Sequence[AxisType] = AxisType.Auto,
) -> Mesh:
    """A (data, fsdp, tensor) mesh with explicitly given axis types (default `Auto`: sharding
    propagates from annotations and `constrain`; `jax.make_mesh` alone would pick Explicit).

    `shape=(data, fsdp, tensor)` or the keywords; one size may be -1 (the remaining devices).
    """
    devices = list(devices if devices is not None else jax.devices())
    if shape is not None:
        if len(shape) != 3:
            raise ValueError(f"mesh shape must be (data, fsdp, tensor), got {tuple(shape)}")
        sizes = [int(s) for s in shape]
    else:
        sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive (or one -1), got {sizes}")
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
    types = (axis_types,) * 3 if isinstance(axis_types, AxisType) else tuple(axis_types)
    if len(types) != 3:
        raise ValueError(f"give one axis type or three, got {types}")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=types, devices=devices)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Any) -> PartitionSpec:
    """`spec` with every dimension that its mesh axes do not divide evenly replicated."""
    dims = []
    for n, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        group = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[a] for a in group])) if group else 1
        dims.append(axes if n % size == 0 else None)
    return PartitionSpec(*dims)


def named_sharding(
    mesh: Mesh, names: Sequence[str | None] | None, shape: Sequence[int] | None = None
) -> NamedSharding:
    """NamedSharding on `mesh` for logical `names` under the current rules. With `shape`, a
    dimension that its mesh axes do not divide evenly is replicated instead (a 3-channel conv,
    a vocabulary cut to the tokenizer's 151665 rows)."""
    spec = logical_to_spec(names)
    return NamedSharding(mesh, spec if shape is None else fit_spec(spec, shape, mesh))


def current_mesh() -> Any | None:
    """The abstract mesh set by `jax.set_mesh`, or None."""
    m = jax.sharding.get_abstract_mesh()
    return None if m is None or m.empty else m


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names (current rules); a no-op when no mesh is set."""
    mesh = current_mesh()
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
        return named_sharding(mesh, names, getattr(v, "shape", None))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def place(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Put every Variable of `model` on `mesh` as its logical names map under the current
    rules (in place; returns `model`). Unannotated Variables are replicated."""
    state = nnx.state(model)
    flat = []
    for path, v in nnx.to_flat_state(state):
        x = v.get_value()
        if isinstance(x, jax.Array | np.ndarray):
            names = param_names(v)
            if names is not None and len(names) != x.ndim:
                where = ".".join(map(str, path))
                raise ValueError(f"{where}: sharding names {names} do not match rank {x.ndim}")
            v.set_value(jax.device_put(x, named_sharding(mesh, names, x.shape)))
        flat.append((path, v))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def misplaced_params(model: nnx.Module, mesh: Mesh) -> list[str]:
    """Paths of parameters whose sharding is not what the current rules give on `mesh`."""
    out = []
    for path, v in nnx.iter_graph(model):
        if isinstance(v, nnx.Param):
            x = v.get_value()
            want = named_sharding(mesh, param_names(v), np.shape(x))
            got = getattr(x, "sharding", None)
            if got is None or not want.is_equivalent_to(got, np.ndim(x)):
                out.append("/".join(map(str, path)))
    return out


def unannotated_params(model: nnx.Module) -> list[str]:
    """Paths of parameters that carry no logical axis names (a test asserts this is empty)."""
    out = []
    for path, v in nnx.iter_graph(model):
        if isinstance(v, nnx.Param) and np.ndim(v.get_value()) > 0 and param_names(v) is None:
            out.append("/".join(map(str, path)))
    return out


def linear(
    din: int,
    dout: int,
    rngs: nnx.Rngs,
    *,
    axes: tuple[str, str],
    use_bias: bool = True,
    dtype: Any = None,
    param_dtype: Any = np.float32,
    kernel_init: Any = None,
) -> nnx.Linear:
    """nnx.Linear whose kernel and bias carry logical axis names (every model's linear layer)."""
    init = {} if kernel_init is None else {"kernel_init": kernel_init}
    return nnx.Linear(
        din,
        dout,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        kernel_metadata={"out_sharding": axes},
        bias_metadata={"out_sharding": (axes[1],)},
        **init,
    )
