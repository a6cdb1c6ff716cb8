"""Generic PyTorch state_dict -> NNX mapping for modules named like their torch originals.

The NNX path of a parameter is its torch key with the leaf renamed (kernel/scale/embedding ->
weight). Layout changes are fixed by the owning layer type:

    nnx.Linear         weight [out, in]          -> kernel [in, out]          (.T)
    nnx.Conv           weight [O, I/g, kh, kw]    -> kernel [kh, kw, I/g, O]   (2, 3, 1, 0)
    nnx.ConvTranspose  weight [I, O, kh, kw]      -> kernel [kh, kw, O, I]     (2, 3, 1, 0), used
                                                     with transpose_kernel=True
    anything else      unchanged (raw Params keep torch names and shapes)

A converter built on this fails on any unknown, missing or misshapen key and never fills values.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import nnx

from pam_jax.checkpoint import CheckpointError, path_key

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def _owners(model: nnx.Module) -> dict[tuple, Any]:
    return {tuple(p): n for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Module)}


def nnx_to_torch_key(path: tuple) -> str:
    *parent, leaf = (str(p) for p in path)
    return ".".join([*parent, _LEAF_TO_TORCH.get(leaf, leaf)])


def to_nnx_layout(owner: Any, leaf: str, w: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and isinstance(owner, nnx.Linear):
        return w.T
    if leaf == "kernel" and isinstance(owner, nnx.Conv | nnx.ConvTranspose):
        return w.transpose(2, 3, 1, 0)
    return w


def to_torch_layout(owner: Any, leaf: str, w: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and isinstance(owner, nnx.Linear):
        return w.T
    if leaf == "kernel" and isinstance(owner, nnx.Conv | nnx.ConvTranspose):
        return w.transpose(3, 2, 0, 1)
    return w


def torch_to_nnx_params(
    model: nnx.Module,
    state_dict: Mapping[str, Any],
    *,
    rename: Callable[[str], str | None] = lambda k: k,
    what: str = "checkpoint",
) -> dict[str, np.ndarray]:
    """Map a torch state_dict onto `model`'s (possibly abstract) parameters.

    `rename(torch_key)` maps a checkpoint key to the torch key of the NNX tree, or None to drop
    it on purpose. Returns {nnx_key: array in NNX layout}; raises CheckpointError listing every
    missing, unknown and misshapen key.
    """
    owners = _owners(model)
    targets = {}  # torch key -> (nnx path, owner, expected shape)
    for path, v in nnx.to_flat_state(nnx.state(model)):
        path = tuple(path)
        targets[nnx_to_torch_key(path)] = (path, owners.get(path[:-1]), tuple(v.shape))
    out, unknown, bad = {}, [], []
    seen = set()
    for key, w in state_dict.items():
        tk = rename(key)
        if tk is None:
            continue
        if tk not in targets:
            unknown.append(key)
            continue
        path, owner, shape = targets[tk]
        arr = np.asarray(w)
        arr = to_nnx_layout(owner, str(path[-1]), arr)
        if tuple(arr.shape) != shape:
            bad.append(f"{key}: {tuple(np.shape(w))} does not fit {path_key(path)} {shape}")
            continue
        out[path_key(path)] = np.ascontiguousarray(arr)
        seen.add(tk)
    missing = sorted(set(targets) - seen)
    errors = []
    if unknown:
        errors.append(f"{len(unknown)} unknown keys: {short_list(unknown)}")
    if missing:
        errors.append(f"{len(missing)} missing keys: {short_list(missing)}")
    if bad:
        errors.append(f"{len(bad)} wrong shapes: {short_list(bad)}")
    if errors:
        raise CheckpointError(f"{what} does not match the model: " + "; ".join(errors))
    return out


def nnx_to_torch_table(
    model: nnx.Module,
) -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """The inverse table of `torch_to_nnx_params`, from the same leaf renames and layout rules:
    {nnx key: (torch key, NNX -> torch layout function)} for every Variable of `model` (which
    may be abstract). Exporters stream through it; raises if two keys would collide."""
    owners = _owners(model)
    out, seen = {}, {}
    for path, _ in nnx.to_flat_state(nnx.state(model)):
        path = tuple(path)
        tk = nnx_to_torch_key(path)
        if tk in seen:
            raise CheckpointError(f"{path_key(path)} and {seen[tk]} both map to torch key {tk}")
        seen[tk] = path_key(path)
        layout = functools.partial(to_torch_layout, owners.get(path[:-1]), str(path[-1]))
        out[path_key(path)] = (tk, layout)
    return out


def nnx_to_torch_state(model: nnx.Module) -> dict[str, np.ndarray]:
    """The inverse mapping: {torch key: array in torch layout} (for export and tests)."""
    flat = {path_key(tuple(p)): v for p, v in nnx.to_flat_state(nnx.state(model))}
    return {
        tk: layout(np.asarray(flat[k].get_value()))
        for k, (tk, layout) in nnx_to_torch_table(model).items()
    }


def short_list(xs: list[str], n: int = 25) -> str:
    """The first n items, comma-separated, and how many more (for error messages)."""
    return ", ".join(xs[:n]) + (f" ... (+{len(xs) - n})" if len(xs) > n else "")
