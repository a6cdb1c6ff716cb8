"""The space-to-depth token order of the release, checked three ways.

1. an explicit index formula derived from the release's reshape sequence:
       out[b, xb * (n) + yb, (dy * s + dx) * C + c] = x[b, yb * s + dy, xb * s + dx, c]
   (n = H // s; tokens column-major, channels (dy, dx, c)-major);
2. the release's own op sequence (`keys.reshape(bs, -1, h, w)` on a [B, HW, C] tensor, then
   InternVL's `pixel_shuffle`, `flatten(2).permute(0, 2, 1)`) run in torch;
3. pam_jax.pam.compression.space_to_depth.
All three must agree exactly (pure data movement).
"""

import numpy as np
import pytest
import torch

from pam_jax.pam.compression import space_to_depth
from tests.pam.test_perceiver import release_pixel_shuffle


def formula(x: np.ndarray, s: int) -> np.ndarray:
    b, h, w, c = x.shape
    n = h // s
    out = np.empty((b, n * n, s * s * c), x.dtype)
    for xb in range(n):
        for yb in range(n):
            for dy in range(s):
                for dx in range(s):
                    out[:, xb * n + yb, (dy * s + dx) * c : (dy * s + dx + 1) * c] = x[
                        :, yb * s + dy, xb * s + dx, :
                    ]
    return out


def release(x: np.ndarray, s: int) -> np.ndarray:
    b, h, w, c = x.shape
    keys = torch.from_numpy(x).reshape(b, h * w, c)  # [B, HW, C], row-major y * W + x
    keys = keys.reshape(b, -1, h, w)
    keys = release_pixel_shuffle(keys, 1 / s)
    return keys.flatten(2).permute(0, 2, 1).numpy()


@pytest.mark.parametrize("s,h,c", [(2, 64, 256), (4, 64, 256), (2, 8, 3), (4, 16, 5)])
def test_space_to_depth_order(s, h, c):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, h, h, c)).astype(np.float32)
    want = formula(x, s)
    np.testing.assert_array_equal(release(x, s), want)
    np.testing.assert_array_equal(np.asarray(space_to_depth(x, s)), want)
    n = h // s
    assert want.shape == (2, n * n, s * s * c)


def test_column_major_example():
    """Token 1 of the 2x2 compression holds rows 2-3, columns 0-1 (pam.md 1.5)."""
    x = np.arange(8 * 8, dtype=np.float32).reshape(1, 8, 8, 1)  # value = y * 8 + x
    out = np.asarray(space_to_depth(x, 2))
    np.testing.assert_array_equal(out[0, 1], [16, 17, 24, 25])  # (2,0) (2,1) (3,0) (3,1)
    np.testing.assert_array_equal(out[0, 4], [2, 3, 10, 11])  # next x-block starts after 4 ys


def test_space_to_depth_errors():
    with pytest.raises(ValueError, match="square"):
        space_to_depth(np.zeros((1, 8, 16, 2)), 2)
    with pytest.raises(ValueError, match="divisible"):
        space_to_depth(np.zeros((1, 6, 6, 2)), 4)
