"""Space-to-depth ("pixel shuffle") of the perceiver's image tokens, in the release's token order.

The official `Semantic_Perceiver` reshapes its `[B, HW, C]` keys to `[B, C, H, W]` *without* a
transpose and then applies InternVL's `pixel_shuffle`; the two mis-laid-out reshapes cancel into
a clean space-to-depth whose tokens come out **column-major** (x-block-major). With the input
flattened row-major (`y * W + x`) and `s` the block side:

    token   t = xb * (H // s) + yb                  (xb = x // s, yb = y // s)
    channel e = (dy * s + dx) * C + c               (dy = y % s, dx = x % s)

(derivation and an index-by-index check: tests/pam/test_compression.py). The released projector
and LLM were trained on this order, so it must be reproduced exactly.
"""

from __future__ import annotations

import jax


def space_to_depth(x: jax.Array, s: int) -> jax.Array:
    """x [B, H, W, C] (NHWC, square) -> [B, (H // s) * (W // s), s * s * C] in release order."""
    b, h, w, c = x.shape
    if h != w:
        # the official reshape sequence only reduces to a space-to-depth for square maps
        raise ValueError(f"space_to_depth needs a square map, got {h}x{w}")
    if h % s:
        raise ValueError(f"map side {h} is not divisible by the block size {s}")
    n = h // s
    x = x.reshape(b, n, s, n, s, c)  # (yb, dy, xb, dx, c)
    x = x.transpose(0, 3, 1, 2, 4, 5)  # (xb, yb, dy, dx, c): column-major tokens
    return x.reshape(b, n * n, s * s * c)
