"""Examples -> one static-shape `Batch` (numpy) for the jitted training / evaluation step.

Sequences are right-padded (the release's training layout) to a length bucket: `seq_bucket`
an int (round the longest up to a multiple of it) or a list of allowed lengths (the smallest
that fits). Prompts pad to `num_points` (or the power-of-two bucket of the longest). Rows past
the examples (a short last batch) are padding: `example_valid` False, everything zero / -100.
No packing: every row holds one sample (segment_ids 1 on it, 0 on padding), because each row
carries exactly one visual block (`pam_jax.pam.assembly.Layout`), and an image sample is
already ~1042 of its ~1100 positions visual, so packing would save little.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import fields

import numpy as np

from pam_jax.data.preprocess import IGNORE, Example
from pam_jax.pam.assembly import Layout, layout
from pam_jax.sam2.prompts import Prompt, pad_prompts


@dataclasses.dataclass(frozen=True)
class Batch:
    """B rows of L tokens; F frames of S x S; P prompt points.

    Layout fields (`pam_jax.pam.assembly.Layout`): text_ids, visual_index, is_visual, mask,
    positions [B, L], lengths [B]. labels [B, L] aligned with the assembled sequence, NOT
    shifted (position t predicts labels[t + 1]; -100 at visual / padding / masked positions).
    segment_ids [B, L] int32 (1 on the sample, 0 on padding). pixels uint8 [B, F, S, S, 3];
    prompt_coords [B, P, 2] model pixels, prompt_labels [B, P] (-1 padding), prompt_valid
    [B, P]; gt_masks uint8 [B, F, S, S], mask_valid [B, F], has_mask [B]; is_video [B];
    example_valid [B]; source_index [B] (mixture component); record_index [B] (index of the
    record in its component, -1 on padding rows); orig_hw [B, 2]; num_visual [B] (1042 image /
    5168 video rows, 0 on padding; a batch may mix both).
    """

    text_ids: np.ndarray
    visual_index: np.ndarray
    is_visual: np.ndarray
    mask: np.ndarray
    positions: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    segment_ids: np.ndarray
    pixels: np.ndarray
    prompt_coords: np.ndarray
    prompt_labels: np.ndarray
    prompt_valid: np.ndarray
    gt_masks: np.ndarray
    mask_valid: np.ndarray
    has_mask: np.ndarray
    is_video: np.ndarray
    example_valid: np.ndarray
    source_index: np.ndarray
    record_index: np.ndarray
    orig_hw: np.ndarray
    num_visual: np.ndarray

    @property
    def batch_size(self) -> int:
        return int(self.text_ids.shape[0])


def bucket_length(n: int, seq_bucket: int | Sequence[int]) -> int:
    """n rounded up to the length bucket (see module doc); ValueError when none fits."""
    if isinstance(seq_bucket, int):
        if seq_bucket < 1:
            raise ValueError(f"seq_bucket must be positive, got {seq_bucket}")
        return -(-n // seq_bucket) * seq_bucket
    fits = sorted(b for b in seq_bucket if b >= n)
    if not fits:
        raise ValueError(f"a sequence of {n} tokens exceeds every length bucket {list(seq_bucket)}")
    return int(fits[0])


def collate(
    examples: Sequence[Example],
    *,
    seq_bucket: int | Sequence[int] = 64,
    batch_size: int | None = None,
    num_frames: int | None = None,
    num_points: int | None = None,
    source_index: Sequence[int] | None = None,
    record_index: Sequence[int] | None = None,
    row_valid: Sequence[bool] | None = None,
) -> Batch:
    """Stack examples into a Batch of `batch_size` rows (default len(examples)).

    num_frames: F of the batch (default the most frames of an example; image rows use frame
    0 and leave the rest zero). row_valid: False marks an example row that only fills a
    process's share (it is computed but example_valid is False, labels -100, record_index -1)."""
    if not examples:
        raise ValueError("collate needs at least one example")
    b = len(examples) if batch_size is None else int(batch_size)
    if len(examples) > b:
        raise ValueError(f"{len(examples)} examples do not fit a batch of {b}")
    f = max(e.pixels.shape[0] for e in examples) if num_frames is None else int(num_frames)
    if any(e.pixels.shape[0] > f for e in examples):
        raise ValueError(f"an example has more than num_frames={f} frames")
    s = examples[0].pixels.shape[1]
    n = len(examples)
    pad = b - n

    L = bucket_length(max(e.length for e in examples), seq_bucket)
    empty = np.zeros(0, np.int32)
    rows = [(e.ids_before, e.ids_after, e.num_visual) for e in examples] + [(empty, empty, 0)] * pad
    # one layout row per example: image and video rows (1042 / 5168 visual) may share a batch
    lays = [layout([a], [c], nv, pad_to=L, pad_side="right") for a, c, nv in rows]
    lay = Layout(*(np.concatenate([getattr(x, k.name) for x in lays]) for k in fields(Layout)))
    labels = np.full((b, L), IGNORE, np.int32)
    for i, e in enumerate(examples):  # host-side, once per batch
        k, nv = len(e.ids_before), e.num_visual
        labels[i, :k] = e.labels_before
        labels[i, k + nv : k + nv + len(e.ids_after)] = e.labels_after
    valid_rows = np.arange(b) < n
    if row_valid is not None:
        valid_rows[:n] &= np.asarray(row_valid, bool)
        labels[~valid_rows] = IGNORE
    mask = lay.mask & valid_rows[:, None]
    segment_ids = mask.astype(np.int32)

    pixels = np.zeros((b, f, s, s, 3), np.uint8)
    gt = np.zeros((b, f, s, s), np.uint8)
    mask_valid = np.zeros((b, f), bool)
    for i, e in enumerate(examples):
        k = e.pixels.shape[0]
        pixels[i, :k] = e.pixels
        if e.gt_masks is not None:
            gt[i, :k] = e.gt_masks
            mask_valid[i, :k] = e.mask_valid
    mask_valid &= valid_rows[:, None]
    no_prompt = Prompt(np.zeros((1, 2), np.float32), np.zeros(1, np.int32))
    pp = pad_prompts([e.prompt for e in examples] + [no_prompt] * pad, bucket=num_points)
    pvalid = pp.valid & valid_rows[:, None]

    def ints(x, fill):
        out = np.full(b, fill, np.int32)
        if x is not None:
            out[:n] = np.asarray(x, np.int32)
        return np.where(valid_rows, out, fill).astype(np.int32)

    return Batch(
        text_ids=lay.text_ids * mask,
        visual_index=lay.visual_index * mask,
        is_visual=lay.is_visual & mask,
        mask=mask,
        positions=lay.positions * mask,
        lengths=np.where(valid_rows, lay.lengths, 0).astype(np.int32),
        labels=labels,
        segment_ids=segment_ids,
        pixels=pixels,
        prompt_coords=np.where(pvalid[..., None], pp.coords, 0).astype(np.float32),
        prompt_labels=np.where(pvalid, pp.labels, -1).astype(np.int32),
        prompt_valid=pvalid,
        gt_masks=gt,
        mask_valid=mask_valid,
        has_mask=mask_valid.any(axis=1),
        is_video=np.array([e.kind == "video" for e in examples] + [False] * pad) & valid_rows,
        example_valid=valid_rows,
        source_index=ints(source_index, 0),
        record_index=ints(record_index, -1),
        orig_hw=np.array([e.orig_hw for e in examples] + [(0, 0)] * pad, np.int32).reshape(b, 2),
        num_visual=np.where(valid_rows, [r[2] for r in rows], 0).astype(np.int32),
    )
