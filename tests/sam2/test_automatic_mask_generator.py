"""The automatic mask generator against the official `SAM2AutomaticMaskGenerator` (sam2 1.1.0).

Reference: the official SAM 2.1 tiny at image size 256 (the official predictor hard-codes the
1024 feature sizes in `_bb_feat_sizes`; the test sets them for 256, nothing else changes), random
weights with every parameter perturbed (torch_ref.perturb_), converted by `pam-jax convert sam2`.
Input: scikit-image's `chelsea` photo (300 x 451, non-square). float32 on CPU.

The official generator needs torchvision's C++ `nms`, which the CPU torch wheel here cannot load
(torch_ref.tv_shim); `_torchvision_nms` below is a line-by-line port of torchvision's CPU kernel
(stable descending sort by score; a box is dropped when its IoU with a kept, higher-scored box is
> threshold), patched into the official module as its `batched_nms` (one category).

Tolerance: the two sides' logits differ by ~1e-6 of scale (tests/sam2/test_image_predictor.py),
so a pixel can flip only where a logit is within ~1e-5 of the mask threshold, and a mask only
changes side of a filter when its score is within 1e-4 of the threshold. Every official mask
must match one of ours one to one with mask IoU >= 0.99, predicted IoU / stability within 1e-4,
except masks whose score lies within 1e-4 of a threshold (excused, counted).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch_ref import build_official_sam2, tv_shim

from pam_jax.cli import main
from pam_jax.sam2 import amg_utils
from pam_jax.sam2.automatic_mask_generator import AMGError, SAM2AutomaticMaskGenerator
from pam_jax.sam2.loading import load_sam2

SIZE = 256
SCORE_EXCUSE = 1e-4
MIN_MASK_IOU = 0.99


def _torchvision_nms(boxes, scores, idxs, iou_threshold):
    """torchvision.ops.batched_nms with one category: its CPU nms kernel, in torch."""
    assert bool((idxs == idxs[0]).all()) if len(idxs) else True
    boxes = boxes.float()
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    order = torch.sort(scores, stable=True, descending=True)[1]
    suppressed = torch.zeros(len(scores), dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas - inter)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.int64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tv_shim()
    import sam2.automatic_mask_generator as official_amg

    official_amg.batched_nms = _torchvision_nms
    tmp = tmp_path_factory.mktemp("amg")
    ref = build_official_sam2("t", "2.1", image_size=SIZE, seed=0)
    ckpt = tmp / "sam2.pt"
    torch.save({"model": ref.state_dict()}, ckpt)
    assert main(["convert", "sam2", str(ckpt), str(tmp / "m"), "--image-size", str(SIZE)]) == 0
    ckpt.unlink()
    model, _ = load_sam2(tmp / "m")
    return ref, model


@pytest.fixture(scope="module")
def photo():
    from skimage import data

    return data.chelsea()  # (300, 451, 3) uint8


def official_generate(ref, image, **kw):
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator as Official

    gen = Official(ref, **kw)
    s = SIZE
    gen.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    with torch.no_grad():
        return gen.generate(image)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 1.0


def match(ours: list[dict], theirs: list[dict], kw: dict) -> dict:
    """One-to-one matching by mask IoU; unmatched masks must have a score within
    SCORE_EXCUSE of a threshold (returned counts)."""
    thr = {"predicted_iou": kw.get("pred_iou_thresh", 0.8),
           "stability_score": kw.get("stability_score_thresh", 0.95)}  # fmt: skip

    def borderline(r):
        return any(abs(r[k] - t) <= SCORE_EXCUSE and t > 0 for k, t in thr.items())

    used, matched, excused = set(), 0, 0
    for t in theirs:
        best, bj = -1.0, None
        for j, o in enumerate(ours):
            if j in used:
                continue
            v = _iou(o["segmentation"], t["segmentation"])
            if v > best:
                best, bj = v, j
        if best >= MIN_MASK_IOU:
            used.add(bj)
            matched += 1
            o = ours[bj]
            assert abs(o["predicted_iou"] - t["predicted_iou"]) <= 1e-4
            assert abs(o["stability_score"] - t["stability_score"]) <= 1e-3
            np.testing.assert_allclose(o["point_coords"], t["point_coords"], atol=1e-3)
            np.testing.assert_allclose(o["crop_box"], t["crop_box"])
            np.testing.assert_allclose(o["bbox"], t["bbox"], atol=1.0)
        else:
            assert borderline(t), f"official mask {t['bbox']} unmatched (best IoU {best:.4f})"
            excused += 1
    for j, o in enumerate(ours):
        if j not in used:
            assert borderline(o), f"our mask {o['bbox']} has no official match"
            excused += 1
    return {"matched": matched, "excused": excused}


# Random weights give low-contrast logits (|logit| < ~0.3) whose masks at threshold 0 cover most
# of the image (one mask survives NMS). Stated thresholds that keep a few dozen distinct masks:
# masks at logit 0.3, stability offset 0.02; the IoU / stability thresholds each drop some.
# 16 x 16 points in batches of 48: 6 batches, the last one padded (16 of 48 real).
BASE_KW = dict(points_per_side=16, points_per_batch=48, mask_threshold=0.3,
               stability_score_offset=0.02)  # fmt: skip
DEFAULT_KW = dict(BASE_KW, pred_iou_thresh=0.45, stability_score_thresh=0.12)
CROP_KW = dict(BASE_KW, pred_iou_thresh=0.445, stability_score_thresh=0.05, crop_n_layers=1,
               crop_n_points_downscale_factor=2, use_m2m=True)  # fmt: skip


@pytest.fixture(scope="module")
def small_photo(photo):
    from PIL import Image

    return np.asarray(Image.fromarray(photo).resize((226, 150), Image.BILINEAR))  # (150, 226)


def _check(ours, theirs, kw):
    print(f"official {len(theirs)} masks, ours {len(ours)}")  # shown with -s
    assert len(theirs) >= 15, "the stated thresholds must keep a few dozen masks"
    res = match(ours, theirs, kw)
    print(res)
    assert res["matched"] >= len(theirs) - 2, res
    assert set(ours[0]) == set(theirs[0])
    assert [r["area"] for r in ours] == [int(r["segmentation"].sum()) for r in ours]


def test_default_pipeline_matches_official(models, small_photo):
    ref, model = models
    theirs = official_generate(ref, small_photo, **DEFAULT_KW)
    ours = SAM2AutomaticMaskGenerator(model, **DEFAULT_KW).generate(small_photo)
    _check(ours, theirs, DEFAULT_KW)
    # larger device steps than points_per_batch: the same masks (per-point decoding is
    # independent; float32 rounding of the batched matmuls only)
    wide = SAM2AutomaticMaskGenerator(model, **DEFAULT_KW, device_batch=3 * 64)
    wide_out = wide.generate(small_photo)
    assert len(wide_out) == len(ours)
    for a, b in zip(wide_out, ours):
        inter = np.logical_and(a["segmentation"], b["segmentation"]).sum()
        union = np.logical_or(a["segmentation"], b["segmentation"]).sum()
        assert inter / max(union, 1) > 0.999 and abs(a["predicted_iou"] - b["predicted_iou"]) < 1e-5
    with pytest.raises(AMGError, match="device_batch"):
        SAM2AutomaticMaskGenerator(model, device_batch=0)
    # the filters bite: without them, masks below the thresholds survive
    t_iou, t_stab = DEFAULT_KW["pred_iou_thresh"], DEFAULT_KW["stability_score_thresh"]
    assert all(r["predicted_iou"] > t_iou and r["stability_score"] >= t_stab for r in ours)
    loose = dict(DEFAULT_KW, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    low = [
        r for r in SAM2AutomaticMaskGenerator(model, **loose).generate(small_photo)
        if r["predicted_iou"] <= t_iou or r["stability_score"] < t_stab
    ]  # fmt: skip
    assert low, "the thresholds must drop some masks"


@pytest.mark.heavy
def test_crop_layer_with_m2m_matches_official(models, small_photo):
    ref, model = models
    theirs = official_generate(ref, small_photo, **CROP_KW)
    ours = SAM2AutomaticMaskGenerator(model, **CROP_KW).generate(small_photo)
    _check(ours, theirs, CROP_KW)
    assert len({tuple(r["crop_box"]) for r in theirs}) > 1, "masks from more than one crop"


def test_output_modes_and_bad_input(models, small_photo):
    _, model = models
    kw = dict(BASE_KW, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    binary = SAM2AutomaticMaskGenerator(model, **kw).generate(small_photo)
    assert binary and all(r["segmentation"].shape == small_photo.shape[:2] for r in binary)
    rle = SAM2AutomaticMaskGenerator(model, output_mode="uncompressed_rle", **kw)
    coco = SAM2AutomaticMaskGenerator(model, output_mode="coco_rle", **kw)
    from pycocotools import mask as mask_utils

    for b, u, c in zip(binary, rle.generate(small_photo), coco.generate(small_photo)):
        np.testing.assert_array_equal(amg_utils.rle_to_mask(u["segmentation"]), b["segmentation"])
        np.testing.assert_array_equal(mask_utils.decode(c["segmentation"]) > 0, b["segmentation"])
        assert isinstance(c["segmentation"]["counts"], str)
    # a grid that leaves no mask: an honest empty answer
    none = SAM2AutomaticMaskGenerator(model, **dict(kw, pred_iou_thresh=1.0))
    assert none.generate(small_photo) == [] and len(none.generate_masks(small_photo)) == 0
    # the small-region clean-up (official postprocess_small_regions) runs and keeps masks whole
    clean = SAM2AutomaticMaskGenerator(model, **dict(kw, min_mask_region_area=5)).generate(
        small_photo
    )
    assert 0 < len(clean) <= len(binary)
    for r in clean:
        m = r["segmentation"]
        assert amg_utils.remove_small_regions(m, 5, "holes")[1] is False
        assert r["area"] == int(m.sum())
    gen = SAM2AutomaticMaskGenerator(model, **kw)
    with pytest.raises(AMGError, match="empty image"):
        gen.generate(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(AMGError, match="uint8"):
        gen.generate(small_photo.astype(np.float32))
    with pytest.raises(AMGError, match=r"RGB image \[H, W, 3\]"):
        gen.generate(small_photo[..., 0])
    absurd = [
        (dict(points_per_side=0), "points_per_side must be an integer >= 1"),
        (dict(points_per_batch=0), "points_per_batch must be an integer >= 1"),
        (dict(pred_iou_thresh=1.5), r"pred_iou_thresh must be a number in \[0, 1\]"),
        (dict(stability_score_thresh=float("nan")), "stability_score_thresh must be"),
        (dict(box_nms_thresh=-0.1), "box_nms_thresh must be"),
        (dict(crop_n_layers=-1), "crop_n_layers must be"),
        (dict(crop_overlap_ratio=1.0), "crop_overlap_ratio must be"),
        (dict(output_mode="png"), "output_mode must be one of"),
        (dict(min_mask_region_area=-3), "min_mask_region_area must be"),
        (dict(points_per_side=2, crop_n_layers=1, crop_n_points_downscale_factor=4),
         "crop layer 1 would have no points"),
        (dict(points_per_side=None), "exactly one of points_per_side or point_grids"),
    ]  # fmt: skip
    for bad, msg in absurd:
        with pytest.raises(AMGError, match=msg):
            SAM2AutomaticMaskGenerator(model, **bad)
    with pytest.raises(AMGError, match="must hold"):
        SAM2AutomaticMaskGenerator(
            model, points_per_side=None, point_grids=[np.array([[2.0, 0.5]])]
        )


# ---- the helpers against sam2.utils.amg (no model) -------------------------------------------


def test_grids_and_crop_boxes_match_official():
    from sam2.utils import amg as ref

    for n, layers, f in ((32, 0, 1), (12, 2, 2), (7, 1, 1)):
        for a, b in zip(amg_utils.build_all_layer_point_grids(n, layers, f),
                        ref.build_all_layer_point_grids(n, layers, f)):  # fmt: skip
            np.testing.assert_array_equal(a, b)
    for hw, layers, ratio in (
        ((300, 451), 1, 512 / 1500),
        ((1024, 768), 2, 0.2),
        ((17, 9), 1, 0.5),
    ):
        assert amg_utils.generate_crop_boxes(hw, layers, ratio) == ref.generate_crop_boxes(
            hw, layers, ratio
        )


def test_mask_numerics_match_official():
    """Stability, boxes, crop-edge test, RLE, COCO RLE, small-region clean-up: exact."""
    from sam2.utils import amg as ref

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (6, 37, 53)).astype(np.float32)
    logits[0] = -5.0  # empty mask: box [0, 0, 0, 0]; stability 0 / 0
    logits[1, 3:9, 40:52] = 9.0
    got = np.asarray(amg_utils.stability_score(logits, 0.0, 1.0))
    want = ref.calculate_stability_score(torch.from_numpy(logits), 0.0, 1.0).numpy()
    np.testing.assert_array_equal(got, want)
    masks = logits > 0
    boxes = np.array(amg_utils.masks_to_boxes(masks))
    np.testing.assert_array_equal(boxes, ref.batched_mask_to_box(torch.from_numpy(masks)).numpy())
    crop, orig = [10, 5, 63, 42], [0, 0, 100, 60]
    near = np.asarray(amg_utils.box_near_crop_edge(boxes, np.array(crop), np.array(orig)))
    want_near = ref.is_box_near_crop_edge(torch.from_numpy(boxes), crop, orig).numpy()
    np.testing.assert_array_equal(near, want_near)
    official_rles = ref.mask_to_rle_pytorch(torch.from_numpy(masks))
    for m, r in zip(masks, official_rles):
        ours = amg_utils.mask_to_rle(m)
        assert ours == r
        np.testing.assert_array_equal(amg_utils.rle_to_mask(ours), ref.rle_to_mask(r))
        assert amg_utils.area_from_rle(ours) == ref.area_from_rle(r) == int(m.sum())
        assert amg_utils.coco_encode_rle(m) == ref.coco_encode_rle(r)
    blob = np.zeros((40, 50), bool)
    blob[5:30, 5:30] = True
    blob[10:12, 10:12] = False  # a hole of 4
    blob[35:37, 40:43] = True  # an island of 6
    for mode in ("holes", "islands"):
        for area in (3, 5, 10, 1000):
            a, ca = amg_utils.remove_small_regions(blob, area, mode)
            b, cb = ref.remove_small_regions(blob, area, mode)
            np.testing.assert_array_equal(a, b)
            assert ca == cb


@pytest.mark.parametrize("form", ["taps", "matmul"])
def test_upsampled_stats_match_official(form):
    """Both forms of the filter's upsample (taps: accelerators, fused into the reductions;
    matmul: the CPU) against the official stability score and boxes on torch's bilinear
    upsample of smooth random logits to a non-integer scale. taps is torch's formula (stability
    and boxes exact); the matmul form differs from torch by ~1e-6 on the logits, so a pixel
    whose logit lies that close to a threshold may flip: stability within 1e-3 and boxes exact
    on these logits."""
    from sam2.utils import amg as ref

    rng = np.random.default_rng(3)
    low = 3 * rng.normal(0, 1, (6, 16, 16)).astype(np.float32)
    low = np.array(jax.image.resize(low, (6, 64, 64), "linear"))  # smooth, blobby masks
    low[0] = -4.0  # empty: stability NaN (0 / 0), box [0, 0, 0, 0]
    hw = (300, 451)
    stab, boxes = jax.jit(lambda x: amg_utils.upsampled_stats(x, hw, 0.0, 1.0, form))(low)
    full = torch.nn.functional.interpolate(
        torch.from_numpy(low.copy())[:, None], hw, mode="bilinear", align_corners=False
    )[:, 0]
    want_stab = ref.calculate_stability_score(full, 0.0, 1.0).numpy()
    tol = 0.0 if form == "taps" else 1e-3
    np.testing.assert_allclose(np.asarray(stab), want_stab, rtol=0, atol=tol)
    np.testing.assert_array_equal(np.asarray(boxes), ref.batched_mask_to_box(full > 0).numpy())
    masks = np.asarray(amg_utils.upsample_logits(jnp.asarray(low), hw, form) > 0)
    np.testing.assert_array_equal(np.asarray(amg_utils.masks_to_boxes(masks)), np.asarray(boxes))


def test_nms_matches_torchvision_kernel():
    """The jitted NMS against the torch port of torchvision's kernel: random boxes with
    duplicated scores (ties broken by index, stable sort) and degenerate boxes."""
    rng = np.random.default_rng(1)
    for n, thr in ((1, 0.5), (37, 0.3), (200, 0.7), (64, 0.0)):
        xy = rng.integers(0, 80, (n, 2))
        wh = rng.integers(0, 40, (n, 2))
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        scores = rng.choice(np.linspace(0, 1, 7), n).astype(np.float32)
        got = amg_utils.nms_host(boxes, scores, thr)
        want = _torchvision_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                torch.zeros(n), thr).numpy()  # fmt: skip
        np.testing.assert_array_equal(got, want)
    assert amg_utils.nms_host(np.zeros((0, 4)), np.zeros(0), 0.5).shape == (0,)


def test_postprocess_small_regions_matches_official():
    """`min_mask_region_area`'s clean-up against the official static method on masks with
    small holes / islands and duplicates (NMS afterwards prefers unchanged masks)."""
    from pam_jax.sam2.automatic_mask_generator import MaskSet, postprocess_small_regions

    tv_shim()  # before the official module imports torchvision
    import sam2.automatic_mask_generator as official_amg
    from sam2.utils.amg import MaskData, mask_to_rle_pytorch

    official_amg.batched_nms = _torchvision_nms
    rng = np.random.default_rng(3)
    masks = np.zeros((8, 40, 60), bool)
    for i, m in enumerate(masks):
        y, x = rng.integers(0, 20), rng.integers(0, 35)
        m[y : y + 15 + i, x : x + 20] = True
        if i % 2:
            m[y + 3 : y + 5, x + 3 : x + 5] = False  # hole of 4
        if i % 3 == 0:
            m[38:40, 0:2] = True  # island of 4
    masks[5] = masks[4]  # a duplicate: NMS drops one
    n = len(masks)
    ms = MaskSet(masks=masks, boxes=np.array(amg_utils.masks_to_boxes(masks), np.float32),
                 areas=masks.sum((1, 2)), predicted_iou=np.linspace(0.9, 0.5, n, dtype=np.float32),
                 stability_score=np.ones(n, np.float32), points=np.zeros((n, 2), np.float32),
                 crop_boxes=np.tile(np.float32([0, 0, 60, 40]), (n, 1)))  # fmt: skip
    ours = postprocess_small_regions(ms, 6, 0.7)
    data = MaskData(rles=mask_to_rle_pytorch(torch.from_numpy(masks)),
                    boxes=torch.from_numpy(ms.boxes.copy()),
                    iou_preds=torch.from_numpy(ms.predicted_iou.copy()))  # fmt: skip
    want = official_amg.SAM2AutomaticMaskGenerator.postprocess_small_regions(data, 6, 0.7)
    assert len(ours) == len(want["rles"]) < n
    for i, rle in enumerate(want["rles"]):
        np.testing.assert_array_equal(ours.masks[i], amg_utils.rle_to_mask(rle))
        assert ours.areas[i] == amg_utils.area_from_rle(rle)
    np.testing.assert_array_equal(ours.predicted_iou, want["iou_preds"].numpy())
    np.testing.assert_array_equal(ours.boxes, want["boxes"].numpy())


def test_photo_sizes_share_the_encoder_and_decoder_programs(models):
    """A folder of photos of many sizes compiles only the small per-size programs (the resize
    to the model size, the crop-size upsample and filter); the Hiera encoder and the point
    decoder compile once."""
    import pam_jax.sam2.automatic_mask_generator as amg
    from pam_jax.sam2 import image_predictor

    _, model = models
    gen = SAM2AutomaticMaskGenerator(model, points_per_side=4, points_per_batch=8)
    rng = np.random.default_rng(0)
    sizes = [(97, 131), (120, 88), (64, 200)]
    counts = []
    for h, w in sizes:
        gen.generate(rng.integers(0, 256, (h, w, 3), np.uint8))
        counts.append(
            (image_predictor._features._cache_size(), amg._decode_points._cache_size(),
             image_predictor._preprocess._cache_size(), amg._filter_candidates._cache_size())
        )  # fmt: skip
    assert counts[0][:2] == counts[-1][:2], counts  # encoder, decoder: no new program
    assert counts[-1][2] >= counts[0][2] + len(sizes) - 1, counts  # the resize did recompile
