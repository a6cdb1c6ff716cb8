"""The pure SAM 2 + PAM region forwards (contract 2): batched image regions and `video_regions`.

Tiny random model (SAM 2.1 tiny at 512^2, a 2-layer Qwen2). Checks: one region per image over
B images equals the images one by one; `video_regions` (a lax.scan over frames) equals the PAM
predictor's per-frame path (`track_video`), which the PyTorch-reference parity tests pin
(tests/pam/test_e2e.py); `video_regions` runs under jax.grad with finite, non-zero gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pam_jax.pam import assembly
from pam_jax.pam.model import image_region_outputs, image_regions, video_regions
from pam_jax.pam.video import track_video
from pam_jax.prepared import prepare
from pam_jax.sam2.prompts import pad_regions
from pam_jax.sam2.video_io import normalize, preprocess_frame
from tests.pam.test_model import setup  # noqa: F401 (the shared tiny model fixture)

HW = (300, 420)


def _video(seed: int, n: int) -> list[np.ndarray]:
    base = np.random.default_rng(seed).integers(0, 255, HW + (3,), dtype=np.uint8)
    return [np.roll(base, 9 * i, axis=1) for i in range(n)]


def _model_frames(frames, size: int) -> np.ndarray:
    return np.stack([normalize(preprocess_frame(f, size)[0]) for f in frames])


def test_image_regions_one_per_image(setup):  # noqa: F811
    cfg, model, _, _ = setup
    s = cfg.sam2.image_size
    images = [_video(i, 1)[0] for i in range(2)]
    regions = [{"box": [40, 30, 200, 250]}, {"points": [[100, 120], [50, 60]], "labels": [1, 0]}]
    p = pad_regions(regions, HW, s)
    px = jnp.asarray(np.stack([_model_frames([im], s)[0] for im in images]))
    fn = jax.jit(lambda m, *a: image_region_outputs(m.sam2, m.parts, *a))
    both = fn(model, px, p.coords, p.labels, p.valid)
    assert both.visual.shape[:2] == (2, 256 + 18) and both.decoder.masks.shape[1] == 4
    for i in range(2):
        one = fn(model, px[i : i + 1], p.coords[i : i + 1], p.labels[i : i + 1], p.valid[i : i + 1])
        # same computation at another batch size: float32 reassociation only
        np.testing.assert_allclose(both.visual[i], one.visual[0], atol=2e-5, rtol=0)
        np.testing.assert_allclose(both.low_res_masks[i], one.low_res_masks[0], atol=2e-4, rtol=0)
        np.testing.assert_allclose(
            both.decoder.iou_pred[i], one.decoder.iou_pred[0], atol=1e-5, rtol=0
        )
    with pytest.raises(ValueError, match="3 images for 2 regions"):
        image_regions(model.sam2, model.parts, jnp.concatenate([px, px[:1]]), p.coords, p.labels,
                      p.valid)  # fmt: skip


def test_video_regions_equal_predictor_path(setup):  # noqa: F811
    """Two videos (a box, a mask prompt), 3 frames: the scanned, batched forward gives the
    predictor's masks, scores and visual embeddings (float32; tolerance: batch-size and
    scan-vs-loop reassociation, ~1e-6 of the values' scale)."""
    cfg, model, _, _ = setup
    s = cfg.sam2.image_size
    mask = np.zeros(HW, bool)
    mask[60:200, 100:300] = True
    regions = [{"box": [40, 30, 200, 250]}, {"mask": mask}]
    videos = [_video(3, 3), _video(4, 3)]
    ref = [
        track_video(prepare(model.sam2), prepare(model.parts), cfg.sam2, v, r, cfg.num_frames)
        for v, r in zip(videos, regions)
    ]
    p = pad_regions(regions, HW, s)  # one region per video, same frame size
    coords, labels, valid, masks_in, is_mask = p.coords, p.labels, p.valid, p.mask_inputs, p.is_mask
    frames = jnp.asarray(np.stack([_model_frames(v, s) for v in videos]))
    out = jax.jit(lambda m, *a: video_regions(m.sam2, m.parts, *a))(
        model, frames, coords, labels, valid, masks_in, is_mask
    )
    assert out.visual.shape == (2,) + ref[0].visual.shape[1:]
    assert out.low_res_masks.shape == (2, 3, s // 4, s // 4)
    assert out.decoder.masks.shape[:3] == (2, 3, 4)
    np.testing.assert_array_equal(ref[0].frames, assembly.select_frames(3))
    for b in range(2):
        np.testing.assert_allclose(out.object_score_logits[b], ref[b].scores, atol=1e-4, rtol=0)
        scale = float(jnp.abs(ref[b].visual).max())
        np.testing.assert_allclose(out.visual[b], ref[b].visual[0], atol=1e-5 * scale, rtol=0)
    # frame 0 of the mask video is the mask itself (_use_mask_as_output): score +10
    assert float(out.object_score_logits[1, 0]) == 10.0


def test_regions_differentiable(setup):  # noqa: F811
    """jax.grad through video_regions (the trainer's use; its frame 0 is the image step):
    finite and non-zero for the perceiver / projectors and SAM 2's mask decoder (the
    backbone is held fixed, which keeps this test's compile small)."""
    cfg, model, _, _ = setup
    s = cfg.sam2.image_size
    p = pad_regions([{"box": [40, 30, 200, 250]}], HW, s)
    frames = jnp.asarray(_model_frames(_video(5, 2), s))[None]
    sam2_g, dec_state, rest = nnx.split(model.sam2, nnx.PathContains("sam_mask_decoder"), ...)
    parts_g, parts_state = nnx.split(model.parts)

    def loss(parts_state, dec_state):
        parts = nnx.merge(parts_g, parts_state)
        sam2 = nnx.merge(sam2_g, dec_state, rest)
        v = video_regions(sam2, parts, frames, p.coords, p.labels, p.valid)
        return jnp.mean(v.visual**2) + jnp.mean(jax.nn.sigmoid(v.low_res_masks))

    g_parts, g_dec = jax.jit(jax.grad(loss, argnums=(0, 1)))(parts_state, dec_state)
    for tree in (g_parts, g_dec):
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))
    flat = {
        jax.tree_util.keystr(k): x
        for tree in (g_parts, g_dec)
        for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    for part in ("mm_projector_img", "vision_resampler", "final_attn_token_to_image"):
        sub = [x for k, x in flat.items() if part in k]
        assert sub and float(sum(jnp.abs(x).sum() for x in sub)) > 0, part
