"""Load a SAM 2 model directory written by `pam-jax convert sam2` (or `save_sam2`)."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from pam_jax.checkpoint import (
    CheckpointError,
    assign_params,
    flat_params,
    load_params,
    read_model_config,
    save_model_dir,
)
from pam_jax.sam2.config import SAM2Config
from pam_jax.sam2.model import SAM2Base
from pam_jax.sharding import place

KIND = "sam2"


def load_sam2(
    model_dir: str | os.PathLike, dtype=jnp.float32, *, mesh: jax.sharding.Mesh | None = None
) -> tuple[SAM2Base, SAM2Config]:
    """(model, config) from a model directory; parameters float32, compute in `dtype`.

    The model is built abstractly (no random init of parameters that are overwritten anyway) and
    filled strictly: any missing, unknown or misshapen tensor raises CheckpointError. With
    `mesh`, every tensor is placed as its logical axis names map under the current rules
    (`sharding.axis_rules`).
    """
    meta = read_model_config(model_dir, KIND)
    try:
        cfg = SAM2Config.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{model_dir}: invalid SAM 2 config: {e}") from None
    model = nnx.eval_shape(lambda: SAM2Base(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    assign_params(model, load_params(model_dir), what=str(model_dir))
    if mesh is not None:
        place(model, mesh)
    return model, cfg


def save_sam2(model: SAM2Base, out_dir: str | os.PathLike, **extra) -> Path:
    """Write `model` as a model directory (used by the demo and tests to skip conversion)."""
    return save_model_dir(out_dir, KIND, model.config.to_dict(), flat_params(model), extra=extra)
