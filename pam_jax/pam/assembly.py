"""The LLM input sequence in the release's layout (`llava_arch.py`).

Visual embeddings replacing `<image>` (all already projected to the LLM width H):

    image:  [1024 image tokens, image_newline, 16 semantic tokens, semT_newline]       = 1042
    video:  per chosen frame [tokens, image_newline, 16 sem, semT_newline, frame_newline],
            frame 0 dense (1024 tokens), the 15 others sparse (256)                     = 5168

Frame choice (`select_frames`): the release takes `[0] + linspace(1, n - 1, 15)` as integers
and raises for n < 16. pam-jax applies the same formula to shorter videos, which repeats frames
(n = 1 repeats frame 0): the LLM always sees the 16-frame layout it was trained on, so every
video has the same static sequence length. Frame 0 appears once, dense.

The text + visual splice is a gather from index arrays built on the host (`layout`), so a
batch of prompts with different text lengths assembles in one jitted op.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def select_frames(n: int, num: int = 16) -> np.ndarray:
    """Indices of the `num` frames (of `n`) fed to the LLM: [0] + floor(linspace(1, n-1, num-1)).

    Equal to the release for n >= num; for shorter videos frames repeat (see module doc).
    """
    if n < 1:
        raise ValueError("a video needs at least one frame")
    lo = min(1, n - 1)
    rest = np.linspace(lo, n - 1, num - 1).astype(np.int64)  # numpy's dtype=int truncation
    return np.concatenate([[0], rest]).astype(np.int64)


def image_embeds(
    image_tokens: jax.Array,
    sem_tokens: jax.Array,
    image_newline: jax.Array,
    semT_newline: jax.Array,
) -> jax.Array:
    """image_tokens [B, N, H], sem_tokens [B, S, H], newlines [H] -> [B, N + S + 2, H]."""
    b, _, h = image_tokens.shape
    nl = lambda v: jnp.broadcast_to(v.astype(image_tokens.dtype)[None, None], (b, 1, h))  # noqa: E731
    return jnp.concatenate(
        [image_tokens, nl(image_newline), sem_tokens.astype(image_tokens.dtype), nl(semT_newline)],
        axis=1,
    )


def video_embeds(
    dense_tokens: jax.Array,
    sparse_tokens: jax.Array,
    sem_tokens: jax.Array,
    image_newline: jax.Array,
    semT_newline: jax.Array,
    frame_newline: jax.Array,
) -> jax.Array:
    """One video's visual sequence.

    dense_tokens [N0, H] (frame 0), sparse_tokens [F-1, N1, H] (other frames),
    sem_tokens [F, S, H] -> [(N0 + S + 3) + (F - 1) * (N1 + S + 3), H].
    """
    h = dense_tokens.shape[-1]
    dt = dense_tokens.dtype
    f1 = sparse_tokens.shape[0]
    nl = lambda v, n: jnp.broadcast_to(v.astype(dt), (n, 1, h))  # noqa: E731
    sem = sem_tokens.astype(dt)
    first = jnp.concatenate(
        [
            dense_tokens,
            nl(image_newline, 1)[0],
            sem[0],
            nl(semT_newline, 1)[0],
            nl(frame_newline, 1)[0],
        ],
        axis=0,
    )
    rest = jnp.concatenate(
        [
            sparse_tokens.astype(dt),
            nl(image_newline, f1),
            sem[1:],
            nl(semT_newline, f1),
            nl(frame_newline, f1),
        ],
        axis=1,
    )
    return jnp.concatenate([first, rest.reshape(-1, h)], axis=0)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Host-built index arrays for a batch of [text before, visual, text after] sequences.

    text_ids     [B, L] int32 token ids (0 at visual and padding positions)
    visual_index [B, L] int32 position in the item's visual sequence (0 elsewhere)
    is_visual    [B, L] bool
    mask         [B, L] bool, True on real (non-padding) positions
    positions    [B, L] int32 RoPE positions, 0..len-1 over the real positions
    lengths      [B] int32 real lengths
    """

    text_ids: np.ndarray
    visual_index: np.ndarray
    is_visual: np.ndarray
    mask: np.ndarray
    positions: np.ndarray
    lengths: np.ndarray


Segment = tuple[Sequence[int], Sequence[int], int]  # (ids before, ids after, num visual)


def layout(
    ids_before: Sequence[Sequence[int]],
    ids_after: Sequence[Sequence[int]],
    num_visual: int,
    *,
    pad_to: int | None = None,
    pad_side: str = "left",
) -> Layout:
    """Index arrays placing `num_visual` embeddings between each item's two text parts.

    `pad_side="left"` (generation: every sequence ends at the last column) or "right" (the
    release's training default). `pad_to` fixes L (e.g. a bucket size) to limit recompiles.
    """
    if len(ids_before) != len(ids_after):
        raise ValueError("ids_before and ids_after differ in batch size")
    rows = [[(a, c, num_visual)] for a, c in zip(ids_before, ids_after)]
    return packed_layout(rows, block=num_visual, pad_to=pad_to, pad_side=pad_side)[0]


def packed_layout(
    rows: Sequence[Sequence[Segment]],
    *,
    block: int,
    pad_to: int | None = None,
    pad_side: str = "right",
) -> tuple[Layout, np.ndarray]:
    """Index arrays for rows of one or more packed [text before, visual, text after] segments.

    Segment j of a row takes its visual embeddings from block j of the row's visual sequence
    (visual [B, K * block, H]: `visual_index` = j * block + i), so `assemble` is the same
    gather for one or K samples a row. RoPE positions restart at 0 in every segment. Returns
    (Layout, segment_ids [B, L] int32: 1, 2, ... per segment, 0 on padding).
    """
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
    lens = [[len(a) + nv + len(c) for a, c, nv in segs] for segs in rows]
    if any(nv > block for segs in rows for _, _, nv in segs):
        raise ValueError(f"a segment has more visual positions than the block of {block}")
    totals = [sum(x) for x in lens]
    L = max(totals) if pad_to is None else pad_to
    if max(totals) > L:
        raise ValueError(f"a sequence of length {max(totals)} does not fit pad_to={L}")
    b = len(rows)
    text = np.zeros((b, L), np.int32)
    vidx = np.zeros((b, L), np.int32)
    isv = np.zeros((b, L), bool)
    pos = np.zeros((b, L), np.int32)
    seg = np.zeros((b, L), np.int32)
    for i, segs in enumerate(rows):  # host-side, once per batch
        o = L - totals[i] if pad_side == "left" else 0
        for j, ((a, c, nv), n) in enumerate(zip(segs, lens[i])):
            v0 = o + len(a)
            text[i, o:v0] = np.asarray(a, np.int32)
            text[i, v0 + nv : o + n] = np.asarray(c, np.int32)
            isv[i, v0 : v0 + nv] = True
            vidx[i, v0 : v0 + nv] = j * block + np.arange(nv)
            pos[i, o : o + n] = np.arange(n)
            seg[i, o : o + n] = j + 1
            o += n
    lay = Layout(text, vidx, isv, seg > 0, pos, np.asarray(totals, np.int32))
    return lay, seg


def assemble(text_embeds: jax.Array, visual: jax.Array, lay: Layout) -> jax.Array:
    """LLM input embeddings [B, L, H] from embedded `lay.text_ids` [B, L, H] and visual [B, V, H].

    Padding positions are zero (as in the release's padded batch).
    """
    vis = jnp.take_along_axis(visual, jnp.asarray(lay.visual_index)[..., None], axis=1)
    out = jnp.where(
        jnp.asarray(lay.is_visual)[..., None], vis.astype(text_embeds.dtype), text_embeds
    )
    return jnp.where(jnp.asarray(lay.mask)[..., None], out, 0)
