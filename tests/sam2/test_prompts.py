"""The one prompt module: rules, errors, the coordinate transform and padding."""

import numpy as np
import pytest
import torch

from pam_jax.sam2.prompts import (
    Prompt,
    PromptError,
    bbox_xywh_to_box,
    make_prompt,
    mask_to_model,
    pad_prompts,
    prompt_from_region,
    to_model,
    to_model_coords,
)

HW = (120, 160)  # H, W


def test_box_then_points_official_order():
    p = make_prompt([[10, 20], [30, 40]], [1, 0], box=[5, 6, 50, 60], image_hw=HW)
    np.testing.assert_array_equal(p.labels, [2, 3, 1, 0])
    np.testing.assert_array_equal(p.points, [[5, 6], [50, 60], [10, 20], [30, 40]])
    assert p.points.dtype == np.float32 and p.labels.dtype == np.int32 and p.mask is None
    box_only = make_prompt(box=[0, 0, 160, 120], image_hw=HW)
    np.testing.assert_array_equal(box_only.labels, [2, 3])
    # a degenerate (zero-width) box is allowed, as official
    assert make_prompt(box=[5, 5, 5, 9], image_hw=HW).num_points == 2


def test_edge_tolerance_clips():
    p = make_prompt([[-0.5, 120.8]], [1], box=[-1, 0, 161, 120], image_hw=HW)
    np.testing.assert_array_equal(p.points, [[0, 0], [160, 120], [0, 120]])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "empty prompt"),
        ({"points": [[1, 2]]}, "provided together"),
        ({"labels": [1]}, "provided together"),
        ({"points": [1, 2, 3], "labels": [1]}, r"\[P, 2\]"),
        ({"points": [[1, 2], [3, 4]], "labels": [1]}, "2 points but labels"),
        ({"points": [[1, 2]], "labels": [4]}, "labels must be 1"),
        ({"points": [[1, 2]], "labels": [-1]}, "labels must be 1"),
        ({"points": [[1, 2]], "labels": [0.5]}, "integers"),
        ({"points": [[np.nan, 2]], "labels": [1]}, "finite"),
        ({"points": [[-1.5, 2]], "labels": [1]}, "outside the 160x120 image"),
        ({"points": [[10, 122]], "labels": [1]}, "outside the 160x120 image"),
        ({"box": [1, 2, 3]}, "4 numbers"),
        ({"box": [50, 5, 20, 9]}, "x2 < x1"),
        ({"box": [5, 50, 20, 9]}, "y2 < y1"),
        ({"box": [5, 5, 170, 9]}, "box corner"),
        ({"box": [5, 5, np.inf, 9]}, "finite"),
        ({"points": np.zeros((0, 2)), "labels": []}, "no points"),
        ({"mask": np.ones((10, 10), bool)}, r"mask has shape \(10, 10\)"),
        ({"mask": np.zeros(HW, bool)}, "mask prompt is empty"),
        ({"mask": np.ones(HW, bool), "box": [1, 1, 5, 5]}, "takes no points or box"),
        ({"mask": np.full(HW, np.nan)}, "finite"),
    ],
)
def test_bad_prompts(kwargs, match):
    with pytest.raises(PromptError, match=match):
        make_prompt(**kwargs, image_hw=HW)


def test_prompt_error_is_value_error():
    assert issubclass(PromptError, ValueError)


def test_region_dicts():
    p = prompt_from_region({"points": [[3, 4]]}, image_hw=HW)  # labels default to positive
    np.testing.assert_array_equal(p.labels, [1])
    p = prompt_from_region({"box": [1, 2, 30, 40], "points": [3, 4]}, image_hw=HW)
    np.testing.assert_array_equal(p.labels, [2, 3, 1])
    with pytest.raises(PromptError, match="region 2: unknown keys"):
        prompt_from_region({"polygon": []}, image_hw=HW, index=2)
    with pytest.raises(PromptError, match="region 0: empty prompt"):
        prompt_from_region({}, image_hw=HW, index=0)


def test_to_model_coords_matches_official_transform():
    """Official SAM2Transforms.transform_coords (normalize=True), written out in torch float32
    (importing it needs torchvision's compiled ops): x / w, y / h, then * resolution. Exact."""
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 1, (7, 2)).astype(np.float32) * np.float32([160, 120])
    p = make_prompt(pts, np.ones(7, np.int32), image_hw=HW)
    ours = to_model_coords(p, HW, 1024)
    ref = torch.from_numpy(pts).clone()
    ref[..., 0] = ref[..., 0] / HW[1]
    ref[..., 1] = ref[..., 1] / HW[0]
    np.testing.assert_array_equal(ours, (ref * 1024).numpy())


def test_mask_to_model_matches_add_new_mask():
    """Official add_new_mask: antialiased bilinear (torch) then >= 0.5; bit-exact except for
    values within float rounding of the 0.5 threshold (none for this mask)."""
    m = np.zeros(HW, bool)
    m[30:90, 40:120] = True
    ours = mask_to_model(m, 64)
    t = torch.from_numpy(m)[None, None].float()
    ref = torch.nn.functional.interpolate(
        t, size=(64, 64), align_corners=False, mode="bilinear", antialias=True
    )
    np.testing.assert_array_equal(ours, (ref >= 0.5).float()[0, 0].numpy())
    same = np.zeros((64, 64), np.float32)
    same[3, 4] = 1
    np.testing.assert_array_equal(mask_to_model(same, 64), same)  # no resize at model size


def test_pad_prompts_buckets_and_masks():
    a = make_prompt(box=[0, 0, 16, 12], image_hw=HW)
    b = make_prompt([[1, 1], [2, 2], [3, 3]], [1, 0, 1], image_hw=HW)
    m = np.zeros(HW, bool)
    m[10:20, 10:20] = True
    c = make_prompt(mask=m, image_hw=HW)
    model = [to_model(p, HW, 64) for p in (a, b, c)]
    pad = pad_prompts(model)
    assert pad.coords.shape == (3, 4, 2) and pad.labels.shape == (3, 4)
    np.testing.assert_array_equal(pad.labels, [[2, 3, -1, -1], [1, 0, 1, -1], [-1, -1, -1, -1]])
    np.testing.assert_array_equal(pad.valid.sum(1), [2, 3, 1])  # mask row: the (0, 0) / -1 point
    np.testing.assert_array_equal(pad.is_mask, [False, False, True])
    assert pad.mask_inputs.shape == (3, 64, 64)
    assert pad.mask_inputs[:2].sum() == 0 and pad.mask_inputs[2].sum() > 0
    np.testing.assert_allclose(pad.coords[0, 1], [6.4, 6.4], rtol=1e-6)
    assert pad.num_prompts == 3
    fixed = pad_prompts(model[:2], bucket=8)
    assert fixed.coords.shape == (2, 8, 2) and fixed.mask_inputs is None
    with pytest.raises(PromptError, match="more than the bucket of 2"):
        pad_prompts(model, bucket=2)
    with pytest.raises(PromptError, match="no prompts"):
        pad_prompts([])
    with pytest.raises(PromptError, match="one square model size"):
        pad_prompts([Prompt(np.zeros((0, 2)), np.zeros((0,), np.int32), np.ones((3, 4)))])


def test_bbox_xywh_to_box_release_rounding():
    assert bbox_xywh_to_box([10.7, 20.2, 5.6, 3.9]) == [10, 20, 16, 24]
    assert bbox_xywh_to_box([0, 0, 1, 1]) == [0, 0, 1, 1]
    with pytest.raises(PromptError, match="4 numbers"):
        bbox_xywh_to_box([1, 2, 3])
