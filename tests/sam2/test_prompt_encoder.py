"""Parity of pam_jax.sam2.prompt_encoder.PromptEncoder with the official SAM 2 PromptEncoder.

Reference: `sam_prompt_encoder` of the official SAM 2.1-tiny built at image_size 512 (32x32
embedding grid, 128x128 mask input) with every parameter perturbed, converted with the generic
torch->NNX converter. float32 on CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from pam_jax.convert.torch_nnx import nnx_to_torch_state, torch_to_nnx_params
from torch_ref import build_official_sam2, to_np

from pam_jax.checkpoint import assign_params
from pam_jax.sam2.prompt_encoder import PromptEncoder
from pam_jax.sharding import unannotated_params

IMAGE_SIZE = 512
PREFIX = "sam_prompt_encoder."
# Sparse embeddings: sin/cos of arguments up to ~2pi*|G|*1 ~ 20 (float32 ulp ~2e-6) plus O(1)
# embeddings. Dense mask embeddings: three small convs + 2 LayerNorms on O(1) logits; float32
# summation-order differences only. 2e-5 absolute covers both with margin.
ATOL = 2e-5


@pytest.fixture(scope="module")
def pair():
    ref = build_official_sam2("t", "2.1", image_size=IMAGE_SIZE).sam_prompt_encoder
    h = IMAGE_SIZE // 16
    ours = PromptEncoder(256, (h, h), (IMAGE_SIZE, IMAGE_SIZE), 16, rngs=nnx.Rngs(0))
    sd = {k: to_np(v) for k, v in ref.state_dict().items()}
    assign_params(ours, torch_to_nnx_params(ours, sd, what="prompt encoder"))
    return ref, ours


def _points(rng, b, n):
    coords = rng.uniform(0, IMAGE_SIZE, size=(b, n, 2)).astype(np.float32)
    labels = rng.integers(0, 2, size=(b, n)).astype(np.int64)
    return coords, labels


def test_param_paths_and_annotations(pair):
    ref, ours = pair
    assert set(nnx_to_torch_state(ours)) == set(ref.state_dict())
    assert unannotated_params(ours) == []


def test_dense_pe(pair):
    ref, ours = pair
    want = to_np(ref.get_dense_pe()).transpose(0, 2, 3, 1)
    got = np.asarray(ours.get_dense_pe())
    assert got.shape == (1, IMAGE_SIZE // 16, IMAGE_SIZE // 16, 256)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("pad", [True, False])
def test_points(pair, pad):
    ref, ours = pair
    rng = np.random.default_rng(1)
    coords, labels = _points(rng, 3, 4)
    labels[0, 1] = -1  # an explicit not-a-point
    with torch.no_grad():
        ws = ref._embed_points(torch.from_numpy(coords), torch.from_numpy(labels), pad=pad)
        _, wd = ref((torch.from_numpy(coords), torch.from_numpy(labels)), None, None)
    gs, gd = ours(coords, labels, pad=pad)
    assert gs.shape == (3, 4 + pad, 256)
    np.testing.assert_allclose(np.asarray(gs), to_np(ws), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(gd), to_np(wd).transpose(0, 2, 3, 1), atol=0, rtol=0)


def test_box_as_points(pair):
    """SAM 2 feeds a box as two corner points (labels 2, 3) prepended to the clicks."""
    ref, ours = pair
    rng = np.random.default_rng(2)
    box = np.sort(rng.uniform(0, IMAGE_SIZE, size=(2, 2, 2)).astype(np.float32), axis=1)
    click, click_lab = _points(rng, 2, 1)
    coords = np.concatenate([box, click], axis=1)
    labels = np.concatenate([np.tile([[2, 3]], (2, 1)), click_lab], axis=1)
    with torch.no_grad():
        ws, _ = ref((torch.from_numpy(coords), torch.from_numpy(labels)), None, None)
    gs, _ = ours(coords, labels)
    assert gs.shape == (2, 4, 256)
    np.testing.assert_allclose(np.asarray(gs), to_np(ws), atol=ATOL, rtol=0)


def test_mask_and_has_mask(pair):
    ref, ours = pair
    rng = np.random.default_rng(3)
    coords, labels = _points(rng, 3, 2)
    masks = (4 * rng.standard_normal((3, 1, 128, 128))).astype(np.float32)
    with torch.no_grad():
        pts = (torch.from_numpy(coords), torch.from_numpy(labels))
        ws, wd = ref(pts, None, torch.from_numpy(masks))
        _, wd_none = ref(pts, None, None)
    wd, wd_none = to_np(wd).transpose(0, 2, 3, 1), to_np(wd_none).transpose(0, 2, 3, 1)
    masks_nhwc = masks.transpose(0, 2, 3, 1)
    gs, gd = ours(coords, labels, masks_nhwc)
    np.testing.assert_allclose(np.asarray(gs), to_np(ws), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(gd), wd, atol=ATOL, rtol=0)
    assert np.abs(wd).max() > 0.1  # the comparison is not between near-zeros
    # per-row mask / no-mask in one call
    has_mask = np.array([True, False, True])
    _, gd_mix = ours(coords, labels, masks_nhwc, has_mask=has_mask)
    want_mix = np.where(has_mask[:, None, None, None], wd, wd_none)
    np.testing.assert_allclose(np.asarray(gd_mix), want_mix, atol=ATOL, rtol=0)


def test_padded_batch_and_valid(pair):
    """Rows of different sizes padded with label -1: real tokens equal the unpadded rows."""
    _, ours = pair
    rng = np.random.default_rng(4)
    sizes = [1, 3, 2]
    rows = [_points(rng, 1, n) for n in sizes]
    n = max(sizes)
    coords = np.zeros((3, n, 2), np.float32)
    labels = -np.ones((3, n), np.int64)
    valid = np.zeros((3, n), bool)
    for i, (c, lab) in enumerate(rows):
        coords[i, : sizes[i]], labels[i, : sizes[i]], valid[i, : sizes[i]] = c[0], lab[0], True
    gs, _ = ours(coords, labels)
    tv = np.asarray(PromptEncoder.sparse_valid(valid))
    assert tv.shape == (3, n + 1) and tv[:, -1].all()
    for i, (c, lab) in enumerate(rows):
        one, _ = ours(c, lab)
        np.testing.assert_allclose(np.asarray(gs[i][tv[i]]), np.asarray(one[0]), atol=1e-6)


def test_jit_equals_eager(pair):
    _, ours = pair
    rng = np.random.default_rng(5)
    coords, labels = _points(rng, 2, 3)
    masks = rng.standard_normal((2, 128, 128, 1)).astype(np.float32)
    has_mask = np.array([True, False])

    @nnx.jit
    def f(m, c, lab, mk, hm):
        return m(c, lab, mk, has_mask=hm)

    for a, b in zip(
        f(ours, coords, labels, masks, has_mask), ours(coords, labels, masks, has_mask=has_mask)
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


def test_bf16_compute_runs(pair):
    """dtype=bfloat16 gives bf16 outputs close to float32 (bf16 has 8 mantissa bits)."""
    _, ours = pair
    h = IMAGE_SIZE // 16
    m16 = PromptEncoder(
        256, (h, h), (IMAGE_SIZE, IMAGE_SIZE), 16, rngs=nnx.Rngs(0), dtype=jnp.bfloat16
    )
    nnx.update(m16, nnx.state(ours))
    rng = np.random.default_rng(6)
    coords, labels = _points(rng, 2, 3)
    masks = rng.standard_normal((2, 128, 128, 1)).astype(np.float32)
    s16, d16 = m16(coords, labels, masks)
    s32, d32 = ours(coords, labels, masks)
    assert s16.dtype == jnp.bfloat16 and d16.dtype == jnp.bfloat16
    scale = float(jax.numpy.abs(d32).max())
    np.testing.assert_allclose(np.asarray(d16, np.float32), np.asarray(d32), atol=0.05 * scale)
    np.testing.assert_allclose(np.asarray(s16, np.float32), np.asarray(s32), atol=0.05)
