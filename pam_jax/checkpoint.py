"""The pam-jax model directory: `config.json` + `model.safetensors` (+ tokenizer files).

    OUT_DIR/
      config.json          {"format": "pam-jax", "kind": "sam2" | "qwen2" | "pam", "config": {...}}
      model.safetensors    flat parameters keyed by NNX path ("image_encoder.trunk.blocks.0...")

safetensors keeps the directory self-contained, readable without JAX, and loadable tensor by
tensor (memory stays near one copy of the weights). Training checkpoints use orbax instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

FORMAT = "pam-jax"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A model directory or checkpoint that cannot be used, with the reason."""


def path_key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def flat_params(model: nnx.Module | nnx.State) -> dict[str, jax.Array]:
    """{"a.b.kernel": array} for every Variable of a module (or state)."""
    state = model if isinstance(model, nnx.State) else nnx.state(model)
    out = {}
    for path, v in nnx.to_flat_state(state):
        out[path_key(path)] = v.get_value() if isinstance(v, nnx.Variable) else v
    return out


def random_normal_params(
    make: Callable[[], nnx.Module], *, seed: int = 0, std: float = 0.02
) -> nnx.Module:
    """The module `make` builds, with NumPy N(0, std^2) parameters (norm `scale`s around 1).

    Built abstractly then filled: milliseconds, where flax's eager init of SAM 2's ~300
    tensors takes over a minute on a 2-core CPU. For tests, benchmarks and smoke runs; not a
    training initialization.
    """
    model = nnx.eval_shape(make)
    rng = np.random.default_rng(seed)
    flat = {}
    for path, v in nnx.to_flat_state(nnx.state(model)):
        x = rng.standard_normal(v.shape).astype(np.float32) * std
        flat[".".join(map(str, path))] = x + 1.0 if path[-1] == "scale" else x
    return assign_params(model, flat)


def assign_params(
    model: nnx.Module, params: Mapping[str, Any], *, strict: bool = True, what: str = "model"
) -> nnx.Module:
    """Copy `params` into `model` in place, checking names and shapes.

    With `strict`, any key of the model missing from `params` and any key of `params` unknown to
    the model is an error listing all of them. Values are cast to each Variable's dtype.
    """
    state = nnx.state(model)
    flat = dict(nnx.to_flat_state(state))
    by_key = {path_key(p): p for p in flat}
    missing = sorted(set(by_key) - set(params))
    unknown = sorted(set(params) - set(by_key))
    errors = []
    if strict and missing:
        errors.append(
            f"missing {len(missing)} keys: {missing[:20]}{' ...' if len(missing) > 20 else ''}"
        )
    if unknown:
        errors.append(
            f"unknown {len(unknown)} keys: {unknown[:20]}{' ...' if len(unknown) > 20 else ''}"
        )
    bad_shape = []
    for k, v in params.items():
        if k in by_key:
            var = flat[by_key[k]]
            want = tuple(var.shape)
            if tuple(np.shape(v)) != want:
                bad_shape.append(f"{k}: got {tuple(np.shape(v))}, expected {want}")
    if bad_shape:
        errors.append(f"{len(bad_shape)} wrong shapes: {bad_shape[:20]}")
    if errors:
        raise CheckpointError(f"cannot load {what}: " + "; ".join(errors))
    for k, v in params.items():
        var = flat[by_key[k]]
        var.set_value(jax.numpy.asarray(v, dtype=var.dtype))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def save_model_dir(
    out_dir: str | os.PathLike,
    kind: str,
    config: Mapping[str, Any],
    params: Mapping[str, Any] | Iterator[tuple[str, Any]],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write config.json and model.safetensors (files 0644). `params` may be a dict or an
    iterator. For a whole new model folder wrap this in `pam_jax.cliutil.atomic_dir`, which
    refuses a non-empty target and renames the finished folder into place."""
    from safetensors.numpy import save_file

    from pam_jax.cliutil import FILE_MODE, progress

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = params.items() if isinstance(params, Mapping) else params
    total = len(params) if isinstance(params, Mapping) else None
    tensors = {
        k: np.ascontiguousarray(np.asarray(v))
        for k, v in progress(items, total=total, desc=f"writing {kind}", unit="tensor")
    }
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "kind": kind})
    os.replace(tmp, out / WEIGHTS_FILE)
    meta = {"format": FORMAT, "kind": kind, "config": dict(config), **(extra or {})}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    for f in (WEIGHTS_FILE, CONFIG_FILE):
        os.chmod(out / f, FILE_MODE)
    return out


def read_model_config(model_dir: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    d = Path(model_dir)
    cfg = d / CONFIG_FILE
    if not d.is_dir():
        raise CheckpointError(f"{d} is not a directory (expected a pam-jax model directory)")
    if not cfg.is_file():
        raise CheckpointError(
            f"{d} has no {CONFIG_FILE}; convert a checkpoint with `pam-jax convert`"
        )
    try:
        meta = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg} is not valid JSON: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{cfg} is not a pam-jax model config (format={meta.get('format')!r})"
        )
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{d} holds a {meta.get('kind')!r} model, expected {kind!r}")
    return meta


def load_params(model_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    f = Path(model_dir) / WEIGHTS_FILE
    if not f.is_file():
        raise CheckpointError(f"{model_dir} has no {WEIGHTS_FILE}")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{f} is unreadable or corrupt: {e}") from None
