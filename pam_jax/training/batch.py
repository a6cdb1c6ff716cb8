"""Batches as the train step sees them: a dict of fixed-shape numpy / jax arrays.

The fields follow the data pipeline's `pam_jax.data.batch.Batch` (contract 6): the Layout
fields (right-padded), labels aligned with the assembled sequence, segment ids, pixels, the
region prompt, ground-truth masks, validity and mixture source. `step_arrays` takes them from
a `Batch` (or any object / mapping with those names); `synthetic_batch` makes random ones of
the real shapes (benchmarks, compile-only, tests). `global_batch` builds global jax.Arrays
from each process's rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pam_jax import sharding
from pam_jax.training.loss import IGNORE

# step field -> (dtype, names tried on a data Batch)
FIELDS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "text_ids": (np.int32, ("text_ids",)),
    "visual_index": (np.int32, ("visual_index",)),
    "is_visual": (np.bool_, ("is_visual",)),
    "mask": (np.bool_, ("mask",)),
    "positions": (np.int32, ("positions",)),
    "labels": (np.int32, ("labels",)),
    "segment_ids": (np.int32, ("segment_ids",)),
    "pixels": (np.uint8, ("pixels",)),
    "coords": (np.float32, ("prompt_coords", "coords")),
    "point_labels": (np.int32, ("prompt_labels", "point_labels")),
    "point_valid": (np.bool_, ("prompt_valid", "point_valid", "valid")),
    "example_valid": (np.bool_, ("example_valid",)),
    "is_video": (np.bool_, ("is_video",)),
    "source_index": (np.int32, ("source_index",)),
}
# only with seg_loss > 0
MASK_FIELDS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "gt_masks": (np.uint8, ("gt_masks",)),
    "mask_valid": (np.bool_, ("mask_valid",)),
    "has_mask": (np.bool_, ("has_mask",)),
}


class BatchError(ValueError):
    pass


def step_arrays(batch: Any, *, masks: bool = False) -> dict[str, np.ndarray]:
    """The step's fields of a data `Batch` (attribute or key access), cast to their dtypes;
    `masks` adds the ground-truth mask fields (for seg_loss)."""
    get = (
        (lambda n: batch.get(n))
        if isinstance(batch, Mapping)
        else (lambda n: getattr(batch, n, None))
    )
    out = {}
    for k, (dt, names) in (FIELDS | MASK_FIELDS if masks else FIELDS).items():
        v = next((get(n) for n in names if get(n) is not None), None)
        if v is None:
            raise BatchError(f"batch has no field {names[0]!r}")
        out[k] = np.asarray(v, dt)
    return out


def synthetic_batch(
    batch_size: int,
    seq_len: int,
    num_visual: int,
    image_size: int,
    vocab_size: int,
    *,
    seed: int = 0,
    text_before: int = 24,
    frames: int = 1,
    num_sources: int = 1,
    prompt_points: int = 2,
    masks: bool = False,
) -> dict[str, np.ndarray]:
    """Random right-padded image (or video) samples of the release's layout: `text_before`
    template tokens, the visual block, then a supervised answer filling the row up to a random
    length (at least 80% of seq_len); a random box prompt."""
    rng = np.random.default_rng(seed)
    b, L = batch_size, seq_len
    if text_before + num_visual + 8 > L:
        raise BatchError(f"seq_len={L} cannot hold {text_before} + {num_visual} + 8 positions")
    text = np.zeros((b, L), np.int32)
    vidx = np.zeros((b, L), np.int32)
    isv = np.zeros((b, L), bool)
    mask = np.zeros((b, L), bool)
    pos = np.zeros((b, L), np.int32)
    labels = np.full((b, L), IGNORE, np.int32)
    lo = max(text_before + num_visual + 8, int(0.8 * L))
    for i in range(b):
        n = int(rng.integers(lo, L + 1))
        ids = rng.integers(1, vocab_size, n).astype(np.int32)
        v0, v1 = text_before, text_before + num_visual
        ids[v0:v1] = 0
        text[i, :n] = ids
        isv[i, v0:v1] = True
        vidx[i, v0:v1] = np.arange(num_visual)
        mask[i, :n] = True
        pos[i, :n] = np.arange(n)
        labels[i, v1 + 4 : n] = ids[v1 + 4 : n]
    seg = mask.astype(np.int32)
    s = image_size
    x0 = rng.uniform(0, s / 2, (b, 2))
    x1 = x0 + rng.uniform(8, s / 2, (b, 2))
    coords = np.zeros((b, prompt_points, 2), np.float32)
    coords[:, 0], coords[:, 1] = x0, np.minimum(x1, s - 1)
    plab = np.full((b, prompt_points), -1, np.int32)
    plab[:, 0], plab[:, 1] = 2, 3
    out = {
        "text_ids": text,
        "visual_index": vidx,
        "is_visual": isv,
        "mask": mask,
        "positions": pos,
        "labels": labels,
        "segment_ids": seg,
        "pixels": rng.integers(0, 256, (b, frames, s, s, 3), dtype=np.uint8),
        "coords": coords,
        "point_labels": plab,
        "point_valid": plab >= 0,
        "example_valid": np.ones(b, bool),
        "is_video": np.full(b, frames > 1),
        "source_index": rng.integers(0, num_sources, b).astype(np.int32),
    }
    if masks:  # the box of the prompt, filled
        yy, xx = np.mgrid[0:s, 0:s]
        gt = (xx[None] >= x0[:, :1, None]) & (xx[None] <= x1[:, :1, None])
        gt &= (yy[None] >= x0[:, 1:, None]) & (yy[None] <= x1[:, 1:, None])
        out["gt_masks"] = np.repeat(gt[:, None], frames, axis=1).astype(np.uint8)
        out["mask_valid"] = np.ones((b, frames), bool)
        out["has_mask"] = np.ones(b, bool)
    return out


def batch_spec(ndim: int) -> PartitionSpec:
    """Rows over the batch mesh axes (the rules' "batch"), the rest replicated."""
    return PartitionSpec(sharding.logical_to_spec(("batch",))[0], *([None] * (ndim - 1)))


def batch_shardings(mesh: Mesh, arrays: Mapping[str, Any]) -> dict[str, NamedSharding]:
    return {k: NamedSharding(mesh, batch_spec(len(v.shape))) for k, v in arrays.items()}


def row_shards(mesh: Mesh) -> int:
    """How many ways the batch rows are split on this mesh."""
    spec = sharding.logical_to_spec(("batch",))[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def global_batch(mesh: Mesh, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Global arrays from this process's rows (`jax.make_array_from_process_local_data`);
    with one process the local rows are the whole batch."""
    shard = batch_shardings(mesh, local)
    return {
        k: jax.make_array_from_process_local_data(shard[k], np.asarray(v)) for k, v in local.items()
    }


def abstract_batch(
    batch_size: int,
    seq_len: int,
    image_size: int,
    *,
    frames: int = 1,
    prompt_points: int = 2,
    masks: bool = False,
) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes / dtypes of a global batch (compile-only: no host arrays)."""
    b, L, s = batch_size, seq_len, image_size
    shapes = {
        "text_ids": (b, L), "visual_index": (b, L), "is_visual": (b, L), "mask": (b, L),
        "positions": (b, L), "labels": (b, L), "segment_ids": (b, L),
        "pixels": (b, frames, s, s, 3), "coords": (b, prompt_points, 2),
        "point_labels": (b, prompt_points), "point_valid": (b, prompt_points),
        "example_valid": (b,), "is_video": (b,), "source_index": (b,),
    }  # fmt: skip
    if masks:
        shapes.update(gt_masks=(b, frames, s, s), mask_valid=(b, frames), has_mask=(b,))
    dts = FIELDS | MASK_FIELDS
    return {k: jax.ShapeDtypeStruct(v, dts[k][0]) for k, v in shapes.items()}
