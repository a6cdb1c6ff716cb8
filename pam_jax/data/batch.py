"""Examples -> one static-shape `Batch` (numpy) for the jitted training / evaluation step.

Sequences are right-padded (the release's training layout) to a length bucket: `seq_bucket`
an int (round the longest up to a multiple of it) or a list of allowed lengths (the smallest
that fits). Prompts pad to `num_points` (or the power-of-two bucket of the longest). Rows past
the examples (a short last batch) are padding: `example_valid` False, everything zero / -100.

`collate`: one sample per row (segment_ids 1 on it, 0 on padding). `collate_packed`: up to K
samples per row (`pack_max`), placed by `FirstFit` into rows of the largest bucket: each sample
is its own segment (segment_ids 1..K, positions restart at 0, attention never crosses
segments) with its own visual block (`pam_jax.pam.assembly.packed_layout`: the row's visual
sequence is K blocks of the batch's longest visual length), and every per-sample field gains a
slot axis K. It pays when the visual block is short against the row (small image sizes, the
micro model, text-heavy samples): an image sample at 1024 px is ~1042 of ~1100 positions
visual, so packing those saves little.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from pam_jax.data.preprocess import IGNORE, Example
from pam_jax.pam.assembly import Layout, packed_layout
from pam_jax.sam2.prompts import Prompt, pad_prompts


@dataclasses.dataclass(frozen=True)
class Batch(Layout):
    """B rows of L tokens; F frames of S x S; P prompt points.

    A `pam_jax.pam.assembly.Layout` (its fields, inherited, come first: text_ids, visual_index,
    is_visual, mask, positions [B, L], lengths [B]) with the training fields added. labels
    [B, L] aligned with the assembled sequence, NOT shifted (position t predicts labels[t + 1];
    -100 at visual / padding / masked positions).
    segment_ids [B, L] int32 (1 on the sample, 0 on padding). pixels uint8 [B, F, S, S, 3];
    prompt_coords [B, P, 2] model pixels, prompt_labels [B, P] (-1 padding), prompt_valid
    [B, P]; gt_masks uint8 [B, F, S, S], mask_valid [B, F], has_mask [B]; is_video [B];
    example_valid [B]; source_index [B] (mixture component); record_index [B] (index of the
    record in its component, -1 on padding rows); orig_hw [B, 2]; num_visual [B] (1042 image /
    5168 video rows, 0 on padding; a batch may mix both); truncated [B] the text tokens
    `make_example` cut to fit `model_max_length` (0: none, and on padding rows).

    Packed (`collate_packed`, `packed` True): segment_ids 1..K per sample; the per-sample
    fields take a slot axis after the row: pixels [B, K, F, S, S, 3], prompt_* [B, K, P, ...],
    gt_masks [B, K, F, S, S], mask_valid [B, K, F], has_mask, is_video, source_index,
    record_index (-1 on empty slots), orig_hw [B, K, 2], num_visual, truncated [B, K] (0 on
    empty slots); visual_index of slot k's positions is k * V + i (V = the batch's longest
    visual block). example_valid [B] says the row holds a sample.
    """

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
    truncated: np.ndarray

    @property
    def batch_size(self) -> int:
        return int(self.text_ids.shape[0])

    @property
    def packed(self) -> bool:
        """Rows hold up to K samples (per-sample fields carry a slot axis)."""
        return self.pixels.ndim == 6


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


class FirstFit:
    """Greedy first-fit of samples into at most `rows` rows of `capacity` positions and at most
    `pack_max` samples each: a sample goes to the first row with room, else opens a new row;
    `add` is False when it fits nowhere (the batch is full for it)."""

    def __init__(self, rows: int, capacity: int, pack_max: int):
        if rows < 1 or capacity < 1 or pack_max < 1:
            raise ValueError(f"FirstFit needs positive rows, capacity and pack_max, got "
                             f"{rows}, {capacity}, {pack_max}")  # fmt: skip
        self.rows, self.capacity, self.pack_max = rows, capacity, pack_max
        self.bins: list[list[int]] = []
        self.fill: list[int] = []

    def add(self, index: int, length: int) -> bool:
        if length > self.capacity:
            raise ValueError(f"a sequence of {length} tokens exceeds the packed row of "
                             f"{self.capacity}")  # fmt: skip
        for r, b in enumerate(self.bins):
            if len(b) < self.pack_max and self.fill[r] + length <= self.capacity:
                b.append(index)
                self.fill[r] += length
                return True
        if len(self.bins) < self.rows:
            self.bins.append([index])
            self.fill.append(length)
            return True
        return False


def first_fit(
    lengths: Sequence[int], rows: int, capacity: int, pack_max: int
) -> tuple[list[list[int]], int]:
    """`FirstFit` over `lengths` in order until one fits nowhere -> (rows of indices, how many
    of the lengths were placed: a prefix)."""
    ff = FirstFit(rows, capacity, pack_max)
    for i, n in enumerate(lengths):
        if not ff.add(i, int(n)):
            return ff.bins, i
    return ff.bins, len(lengths)


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
    """Stack examples into a Batch of `batch_size` rows (default len(examples)), one a row.

    num_frames: F of the batch (default the most frames of an example; image rows use frame
    0 and leave the rest zero). row_valid: False marks an example row that only fills a
    process's share (it is computed but example_valid is False, labels -100, record_index -1)."""
    if not examples:
        raise ValueError("collate needs at least one example")
    b = len(examples) if batch_size is None else int(batch_size)
    if len(examples) > b:
        raise ValueError(f"{len(examples)} examples do not fit a batch of {b}")
    rows = [[i] for i in range(len(examples))]
    L = bucket_length(max(e.length for e in examples), seq_bucket)
    return _build(examples, rows, b, 1, L, num_frames, num_points, source_index, record_index,
                  row_valid, packed=False)  # fmt: skip


def collate_packed(
    examples: Sequence[Example],
    rows: Sequence[Sequence[int]],
    *,
    pack_max: int,
    seq_bucket: Sequence[int],
    batch_size: int | None = None,
    num_frames: int | None = None,
    num_points: int | None = None,
    source_index: Sequence[int] | None = None,
    record_index: Sequence[int] | None = None,
    block: int | None = None,
) -> Batch:
    """A packed Batch (see module doc): `rows[r]` lists the examples of row r in order (e.g.
    `first_fit`'s), at most `pack_max` each; L is the smallest bucket holding the fullest row.

    block: the visual length the model gives every slot, V (`visual_index` = k * V + i): its
    video length whenever the batch has F > 1 frames, also for a batch of images only (the
    training forward pads image visuals to it); default the longest example's."""
    if not examples or not rows:
        raise ValueError("collate_packed needs at least one example")
    if isinstance(seq_bucket, int):
        raise ValueError("packing needs a list of row lengths as seq_bucket (rows are filled "
                         "up to the largest)")  # fmt: skip
    b = len(rows) if batch_size is None else int(batch_size)
    if len(rows) > b:
        raise ValueError(f"{len(rows)} packed rows do not fit a batch of {b}")
    if any(not 1 <= len(r) <= pack_max for r in rows):
        raise ValueError(f"a packed row holds 0 or more than pack_max={pack_max} samples")
    if sorted(i for r in rows for i in r) != list(range(len(examples))):
        raise ValueError("packed rows must hold every example exactly once")
    L = bucket_length(max(sum(examples[i].length for i in r) for r in rows), seq_bucket)
    return _build(examples, rows, b, pack_max, L, num_frames, num_points, source_index,
                  record_index, None, packed=True, block=block)  # fmt: skip


def _build(
    examples,
    rows,
    b,
    k,
    L,
    num_frames,
    num_points,
    source_index,
    record_index,
    row_valid,
    *,
    packed,
    block=None,
) -> Batch:
    """The one collate: B rows x K slots; slot (r, j) holds example rows[r][j] or padding."""
    f = max(e.pixels.shape[0] for e in examples) if num_frames is None else int(num_frames)
    if any(e.pixels.shape[0] > f for e in examples):
        raise ValueError(f"an example has more than num_frames={f} frames")
    s = examples[0].pixels.shape[1]
    n = len(examples)
    valid_ex = np.ones(n, bool) if row_valid is None else np.asarray(row_valid, bool)
    slot = np.full((b, k), -1, np.int64)  # example index per slot, -1 empty
    for r, idx in enumerate(rows):
        slot[r, : len(idx)] = idx
    flat = slot.reshape(-1)
    used = flat >= 0

    empty = np.zeros(0, np.int32)
    segs = [[(examples[i].ids_before, examples[i].ids_after, examples[i].num_visual) for i in r]
            for r in rows] + [[(empty, empty, 0)]] * (b - len(rows))  # fmt: skip
    longest = max(e.num_visual for e in examples)
    block = longest if block is None else int(block)
    lay, seg = packed_layout(segs, block=block, pad_to=L, pad_side="right")
    labels = np.full((b, L), IGNORE, np.int32)
    row_ok = np.zeros(b, bool)
    for r, idx in enumerate(rows):  # host-side, once per batch
        o = 0
        for j, i in enumerate(idx):
            e = examples[i]
            if valid_ex[i]:
                kb, nv = len(e.ids_before), e.num_visual
                labels[r, o : o + kb] = e.labels_before
                labels[r, o + kb + nv : o + e.length] = e.labels_after
                if j:  # the last token of the previous sample must not predict this one's first
                    labels[r, o] = IGNORE
                row_ok[r] = True
            o += e.length
    mask = lay.mask & row_ok[:, None]
    seg = seg * mask

    ex_ok = np.zeros(b * k, bool)  # per slot: a valid example
    ex_ok[used] = valid_ex[flat[used]]
    pixels = np.zeros((b * k, f, s, s, 3), np.uint8)
    gt = np.zeros((b * k, f, s, s), np.uint8)
    mask_valid = np.zeros((b * k, f), bool)
    no_prompt = Prompt(np.zeros((1, 2), np.float32), np.zeros(1, np.int32))
    prompts = [no_prompt] * (b * k)
    is_video = np.zeros(b * k, bool)
    orig_hw = np.zeros((b * k, 2), np.int32)
    num_visual = np.zeros(b * k, np.int32)
    cut = np.zeros(b * k, np.int32)
    src = np.zeros(b * k, np.int32)
    rec = np.full(b * k, -1, np.int32)
    for q in np.flatnonzero(used):
        i = int(flat[q])
        e = examples[i]
        pixels[q, : e.pixels.shape[0]] = e.pixels
        if e.gt_masks is not None:
            gt[q, : e.pixels.shape[0]] = e.gt_masks
            mask_valid[q, : e.pixels.shape[0]] = e.mask_valid
        prompts[q] = e.prompt
        is_video[q] = e.kind == "video"
        orig_hw[q] = e.orig_hw
        if ex_ok[q]:
            num_visual[q] = e.num_visual
            cut[q] = e.truncated
            src[q] = 0 if source_index is None else int(source_index[i])
            rec[q] = -1 if record_index is None else int(record_index[i])
    mask_valid &= ex_ok[:, None]
    pp = pad_prompts(prompts, bucket=num_points)
    pvalid = pp.valid & ex_ok[:, None]
    is_video &= ex_ok

    def per(x):  # [B * K, ...] -> [B, K, ...] packed, [B, ...] one sample a row
        return x.reshape(b, k, *x.shape[1:]) if packed else x.reshape(b, *x.shape[1:])

    return Batch(
        text_ids=lay.text_ids * mask,
        visual_index=lay.visual_index * mask,
        is_visual=lay.is_visual & mask,
        mask=mask,
        positions=lay.positions * mask,
        lengths=np.where(row_ok, lay.lengths, 0).astype(np.int32),
        labels=labels,
        segment_ids=seg.astype(np.int32),
        pixels=per(pixels),
        prompt_coords=per(np.where(pvalid[..., None], pp.coords, 0).astype(np.float32)),
        prompt_labels=per(np.where(pvalid, pp.labels, -1).astype(np.int32)),
        prompt_valid=per(pvalid),
        gt_masks=per(gt),
        mask_valid=per(mask_valid),
        has_mask=per(mask_valid.any(axis=1)),
        is_video=per(is_video),
        example_valid=row_ok,
        source_index=per(src),
        record_index=per(rec),
        orig_hw=per(orig_hw),
        num_visual=per(num_visual),
        truncated=per(cut),
    )
