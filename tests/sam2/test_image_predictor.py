"""End-to-end parity of the SAM 2 image path with the official `SAM2ImagePredictor`.

Reference: the official SAM 2.1 model (sam2 1.1.0) built with random weights at the real config,
every parameter and buffer perturbed (torch_ref.perturb_), saved as an official `.pt`
(`{"model": state_dict}`), converted by `pam-jax convert sam2` and loaded with `load_sam2`.
Compared in float32 on CPU: preprocessing, image embedding, high-resolution features, low-res
logits, upsampled logits, IoU and object score for a point, a box, a box with points, and a mask
prompt; the official `_forward_sam_heads`; batched prompts against one at a time; a non-1024 model
size against the official modules; bad input.

Tolerance: float32 everywhere, the two sides differ only in summation order (XLA vs torch
kernels) through the 12-block Hiera, the FPN, and the two-way transformer. Measured on tiny:
max |diff| about 1.5e-6 of the tensor's max |value| for every output. We assert 2e-5 of that
scale (RTOL_SCALE): 10x headroom for other CPUs / thread counts, still far below any layout or
numerics bug (those give 1e-3 or more).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_ref import build_official_sam2, to_np, tv_shim

from pam_jax.cli import main
from pam_jax.demo import sample_image
from pam_jax.sam2.image_predictor import SAM2ImagePredictor, preprocess
from pam_jax.sam2.loading import load_sam2

RTOL_SCALE = 2e-5
IOU_ATOL = 1e-5  # IoU predictions are sigmoids in [0, 1]


def assert_close_scaled(got, want, rtol=RTOL_SCALE, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = max(np.abs(want).max(), 1e-6)
    err = np.abs(got - want).max()
    print(f"{what}: max|diff| / scale = {err / scale:.2e} (scale {scale:.3g})")  # shown with -s
    assert err <= rtol * scale, f"{what}: max|diff| {err:.3g} > {rtol:g} * {scale:.3g}"


def _nhwc(t):
    return to_np(t).transpose(0, 2, 3, 1)


def convert_official(tmp_path, size="t", version="2.1", image_size=1024, seed=0):
    """Official model with perturbed random weights -> .pt -> `pam-jax convert sam2` -> load."""
    ref = build_official_sam2(size, version, image_size=image_size, seed=seed)
    ckpt = tmp_path / f"sam2_{size}_{version}.pt"
    torch.save({"model": ref.state_dict()}, ckpt)
    out = tmp_path / f"model_{size}_{version}_{image_size}"
    argv = ["convert", "sam2", str(ckpt), str(out)]
    if image_size != 1024:
        argv += ["--image-size", str(image_size)]
    assert main(argv) == 0
    ckpt.unlink()  # keep the disk footprint small
    model, cfg = load_sam2(out)
    assert cfg.image_size == image_size and cfg.version == version
    return ref, model


class ObjScoreHook:
    """Captures the object-score logits of the official decoder (predict() does not return it)."""

    def __init__(self, decoder):
        self.value = None
        decoder.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.value = to_np(output[3])


@pytest.fixture(scope="module")
def image():
    img, _ = sample_image(480, 640, seed=1)  # non-square: exercises x / w, y / h scaling
    return img


@pytest.fixture(scope="module")
def predictors(tmp_path_factory, image):
    tv_shim()
    from sam2.sam2_image_predictor import SAM2ImagePredictor as OfficialPredictor

    ref, model = convert_official(tmp_path_factory.mktemp("sam2_t"))
    official = OfficialPredictor(ref)
    hook = ObjScoreHook(ref.sam_mask_decoder)
    ours = SAM2ImagePredictor(model)
    with torch.no_grad():
        official.set_image(image)
    ours.set_image(image)
    return official, ours, hook, ref


def test_preprocess_matches_torchvision():
    tv_shim()
    from sam2.utils.transforms import SAM2Transforms

    rng = np.random.default_rng(0)
    for hw, size in (((300, 410), 256), ((150, 90), 256)):  # downscale (AA) and upscale
        img = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        want = to_np(SAM2Transforms(size, 0.0)(img)[None]).transpose(0, 2, 3, 1)
        got = np.asarray(preprocess(img, size))
        # float32 resize + normalize; measured 5e-7, values are O(2)
        np.testing.assert_allclose(got, want, atol=5e-6, rtol=0)


def test_image_features(predictors):
    official, ours, _, _ = predictors
    f = ours.features
    assert_close_scaled(f["image_embed"], _nhwc(official._features["image_embed"]), what="embed")
    for i, (got, want) in enumerate(zip(f["high_res_feats"], official._features["high_res_feats"])):
        assert_close_scaled(got, _nhwc(want), what=f"high_res_feats[{i}]")
    assert f["image_embed"].shape == (1, 64, 64, 256)


PROMPTS = {
    "point": dict(point_coords=[[300.0, 200.0]], point_labels=[1], multimask_output=True),
    "box": dict(box=[260.0, 170.0, 470.0, 380.0], multimask_output=False),
    "box_points": dict(
        box=[260.0, 170.0, 470.0, 380.0],
        point_coords=[[360.0, 300.0], [280.0, 190.0]],
        point_labels=[1, 0],
        multimask_output=False,
    ),
    "points_multi": dict(
        point_coords=[[100.0, 90.0], [500.0, 250.0], [50.0, 400.0]],
        point_labels=[1, 1, 0],
        multimask_output=True,
    ),
}


def _both(predictors, **prompt):
    official, ours, hook, _ = predictors
    with torch.no_grad():
        t_masks, t_iou, t_low = official.predict(**prompt, return_logits=True)
    t_obj = hook.value
    pred = ours.predict_batch(
        [np.asarray(prompt["point_coords"])] if "point_coords" in prompt else None,
        [np.asarray(prompt["point_labels"])] if "point_labels" in prompt else None,
        np.asarray(prompt["box"])[None] if "box" in prompt else None,
        [prompt["mask_input"]] if "mask_input" in prompt else None,
        multimask_output=prompt["multimask_output"],
        return_logits=True,
    )
    return (t_masks, t_iou, t_low, t_obj), pred


@pytest.mark.parametrize("name", list(PROMPTS))
def test_prompt_parity(predictors, name):
    (t_masks, t_iou, t_low, t_obj), pred = _both(predictors, **PROMPTS[name])
    m = 3 if PROMPTS[name]["multimask_output"] else 1
    assert pred.low_res_logits.shape == (1, m, 256, 256)
    assert pred.masks.shape == (1, m, 480, 640)
    assert_close_scaled(pred.low_res_logits[0], t_low, what="low-res logits")
    assert_close_scaled(pred.masks[0], t_masks, what="upsampled logits")
    np.testing.assert_allclose(pred.iou_predictions[0], t_iou, atol=IOU_ATOL, rtol=0)
    assert_close_scaled(pred.object_score_logits, t_obj[:, 0], what="object score")
    if name != "point":
        return
    # the single-prompt API returns the official triple (bool masks by default)
    _, ours, _, _ = predictors
    masks, iou, low = ours.predict(**PROMPTS[name])
    assert masks.dtype == bool and masks.shape == (m, 480, 640)
    np.testing.assert_array_equal(masks, pred.masks[0] > 0)
    np.testing.assert_allclose(low, pred.low_res_logits[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(iou, pred.iou_predictions[0], rtol=0, atol=1e-7)


def test_mask_prompt_parity(predictors):
    official, _, _, _ = predictors
    with torch.no_grad():
        _, _, low = official.predict(point_coords=[[300.0, 200.0]], point_labels=[1])
    prompt = dict(
        point_coords=[[320.0, 220.0]], point_labels=[1], mask_input=low[:1],
        multimask_output=False,
    )  # fmt: skip
    (t_masks, t_iou, t_low, t_obj), pred = _both(predictors, **prompt)
    assert_close_scaled(pred.low_res_logits[0], t_low, what="low-res logits")
    assert_close_scaled(pred.masks[0], t_masks, what="upsampled logits")
    np.testing.assert_allclose(pred.iou_predictions[0], t_iou, atol=IOU_ATOL, rtol=0)
    assert_close_scaled(pred.object_score_logits, t_obj[:, 0], what="object score")
    # a mask alone (no points: the official encoder then has no sparse tokens at all)
    (t_masks, t_iou, t_low, t_obj), pred = _both(
        predictors, mask_input=low[1:2], multimask_output=True
    )
    assert_close_scaled(pred.low_res_logits[0], t_low, what="mask-only low-res logits")
    np.testing.assert_allclose(pred.iou_predictions[0], t_iou, atol=IOU_ATOL, rtol=0)


def test_batched_equals_one_at_a_time(predictors):
    """Rows of different kinds and token counts in one call == each row decoded alone."""
    _, ours, _, _ = predictors
    _, _, low = ours.predict(point_coords=[[300.0, 200.0]], point_labels=[1])
    box = np.array([260.0, 170.0, 470.0, 380.0], np.float32)
    rows = [
        dict(point_coords=np.array([[300.0, 200.0]]), point_labels=np.array([1])),
        dict(box=box),
        dict(
            box=box,
            point_coords=np.array([[360.0, 300.0], [280, 190]]),
            point_labels=np.array([1, 0]),
        ),  # fmt: skip
        dict(
            point_coords=np.array([[10.0, 20], [600, 470], [320, 240]]),
            point_labels=np.array([1, 0, 1]),
        ),  # fmt: skip
        dict(
            point_coords=np.array([[320.0, 220.0]]), point_labels=np.array([1]), mask_input=low[:1]
        ),  # fmt: skip
        dict(mask_input=low[2]),
    ]
    for multimask in (True,):  # one setting: each extra shape is another compile
        batch = ours.predict_batch(
            [r.get("point_coords") for r in rows],
            [r.get("point_labels") for r in rows],
            [r.get("box") for r in rows],
            [r.get("mask_input") for r in rows],
            multimask_output=multimask,
            return_logits=True,
        )
        for i, r in enumerate(rows):
            single = ours.predict_batch(
                [r["point_coords"]] if "point_coords" in r else None,
                [r["point_labels"]] if "point_labels" in r else None,
                [r["box"]] if "box" in r else None,
                [r["mask_input"]] if "mask_input" in r else None,
                multimask_output=multimask,
                return_logits=True,
            )
            # masked padding contributes exactly 0; only XLA's kernels for the other shapes
            # differ (measured up to 1.1e-6 of the scale): 5e-6
            assert_close_scaled(batch.low_res_logits[i], single.low_res_logits[0], 5e-6, f"row {i}")
            assert_close_scaled(batch.masks[i], single.masks[0], 5e-6, f"row {i} masks")
            np.testing.assert_allclose(
                batch.iou_predictions[i], single.iou_predictions[0], atol=1e-6, rtol=0
            )
            np.testing.assert_allclose(
                batch.object_score_logits[i], single.object_score_logits[0], atol=1e-5, rtol=1e-6
            )


def test_photo_sizes_share_the_encoder_and_decoder(predictors):
    """Photos of other sizes reuse the compiled encoder and decoder: the size only enters the
    small resize and upsample programs."""
    from pam_jax.sam2 import image_predictor as ip

    _, ours, _, _ = predictors
    model = ours.model
    pred = SAM2ImagePredictor(model)
    rng = np.random.default_rng(0)
    counts = []
    for h, w in [(120, 90), (77, 150)]:
        pred.set_image(rng.integers(0, 256, (h, w, 3), np.uint8))
        masks, _, _ = pred.predict(point_coords=[[w / 2, h / 2]], point_labels=[1])
        assert masks.shape[-2:] == (h, w)
        counts.append((ip._features._cache_size(), ip._decode._cache_size()))
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("shift", [0.0, 30.0], ids=["as-is", "objects-present"])
def test_forward_sam_heads_parity(predictors, shift):
    """SAM2Base.forward_sam_heads == official _forward_sam_heads (gating, upsampling, obj ptr).

    With random weights the object score may be negative for every row, which replaces all
    masks by NO_OBJ_SCORE; `shift` raises the object-score bias on both sides so the ungated
    mask path is compared too. Masks are compared row by row, each at its own scale.
    """
    official, ours, _, ref = predictors
    feats = official._features
    emb, hr = feats["image_embed"], feats["high_res_feats"]
    coords = torch.tensor([[[400.0, 300.0], [700.0, 500.0]], [[100.0, 900.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, 0], [1, -1]], dtype=torch.int32)
    mask = torch.zeros(2, 1, 1024, 1024)
    mask[0, 0, 200:600, 300:800] = 1.0
    model = ours.model
    cases = [
        dict(point_inputs={"point_coords": coords, "point_labels": labels}, multimask_output=True),
        dict(mask_inputs=mask, multimask_output=False),
    ]
    t_bias = ref.sam_mask_decoder.pred_obj_score_head.layers[2].bias
    j_bias = model.sam_mask_decoder.pred_obj_score_head.layers[2].bias
    old = j_bias[...]
    try:
        with torch.no_grad():
            t_bias += shift
        j_bias[...] = old + shift
        for case in cases:
            b = 2
            with torch.no_grad():
                want = ref._forward_sam_heads(
                    backbone_features=emb.expand(b, -1, -1, -1),
                    high_res_features=[h.expand(b, -1, -1, -1) for h in hr],
                    **case,
                )
            pi = case.get("point_inputs")
            got = model.forward_sam_heads(
                np.repeat(_nhwc(emb), b, 0),
                None if pi is None else to_np(pi["point_coords"]),
                None if pi is None else to_np(pi["point_labels"]).astype(np.int32),
                None if "mask_inputs" not in case else _nhwc(case["mask_inputs"]),
                tuple(np.repeat(_nhwc(h), b, 0) for h in hr),
                multimask_output=case["multimask_output"],
            )
            if shift:
                assert (to_np(want[6]) > 0).all()  # every object present: masks not gated
            names = ["low_res_multimasks", "high_res_multimasks", "ious", "low_res_masks",
                     "high_res_masks", "obj_ptr", "object_score_logits"]  # fmt: skip
            for name, g, w in zip(names, got, want):
                if "masks" not in name:  # scores / pointers: one scale for the batch
                    assert_close_scaled(g, to_np(w), what=name)
                    continue
                for r in range(b):  # a gated row (-1024) must not hide the other row's error
                    assert_close_scaled(np.asarray(g)[r], to_np(w)[r], what=f"{name}[{r}]")
    finally:
        with torch.no_grad():
            t_bias -= shift
        j_bias[...] = old


def test_other_image_size(tmp_path):
    """At image_size 256 (the official predictor hard-codes 1024) against the official modules."""
    tv_shim()
    from sam2.utils.transforms import SAM2Transforms

    ref, model = convert_official(tmp_path, image_size=256)
    img, _ = sample_image(200, 300, seed=2)
    ours = SAM2ImagePredictor(model)
    ours.set_image(img)
    coords = np.array([[120.0, 80.0], [40.0, 150.0]], np.float32)
    labels = np.array([1, 0])
    pred = ours.predict_batch([coords], [labels], multimask_output=True, return_logits=True)
    with torch.no_grad():  # the official predictor's steps with the feature sizes of 256
        x = SAM2Transforms(256, 0.0)(img)[None]
        _, feats, _, _ = ref._prepare_backbone_features(ref.forward_image(x))
        feats[-1] = feats[-1] + ref.no_mem_embed
        sizes = [(64, 64), (32, 32), (16, 16)]
        maps = [f.permute(1, 2, 0).view(1, -1, *s) for f, s in zip(feats, sizes)]
        c = torch.tensor(coords / np.array([300, 200], np.float32) * 256)[None]
        sparse, dense = ref.sam_prompt_encoder((c, torch.tensor(labels)[None]), None, None)
        low, iou, _, obj = ref.sam_mask_decoder(
            maps[-1], ref.sam_prompt_encoder.get_dense_pe(), sparse, dense, True, False, maps[:2]
        )
        up = torch.nn.functional.interpolate(low, (200, 300), mode="bilinear", align_corners=False)
    assert pred.low_res_logits.shape == (1, 3, 64, 64)
    assert_close_scaled(ours.features["image_embed"], _nhwc(maps[-1]), what="embed 256")
    assert_close_scaled(pred.low_res_logits[0], to_np(low[0]).clip(-32, 32), what="low 256")
    assert_close_scaled(pred.masks[0], to_np(up[0]), what="masks 256")
    np.testing.assert_allclose(pred.iou_predictions[0], to_np(iou[0]), atol=IOU_ATOL, rtol=0)
    assert_close_scaled(pred.object_score_logits, to_np(obj[:, 0]), what="obj 256")


def test_bad_input(predictors):
    _, ours, _, _ = predictors
    with pytest.raises(ValueError, match="prompt 0: box corner.* outside the 640x"):
        ours.predict(box=[10, 10, 700, 100])  # the image is 640 wide
    with pytest.raises(ValueError, match="outside the 640x"):  # > 1 pixel out: not clipped
        ours.predict(point_coords=[[-1.5, 5]], point_labels=[1])
    with pytest.raises(ValueError, match="x2 < x1"):
        ours.predict(box=[100, 10, 50, 100])
    with pytest.raises(ValueError, match="empty prompt"):
        ours.predict()
    with pytest.raises(ValueError, match="is empty"):
        ours.predict_batch(boxes=[[10, 10, 50, 50], None])
    with pytest.raises(ValueError, match="provided together"):
        ours.predict(point_coords=[[5, 5]])
    with pytest.raises(ValueError, match="2 points but labels have shape"):
        ours.predict(point_coords=[[5, 5], [6, 6]], point_labels=[1])
    with pytest.raises(ValueError, match="labels must be 1"):
        ours.predict(point_coords=[[5, 5]], point_labels=[7])
    with pytest.raises(ValueError, match="low-res logits of shape"):
        ours.predict(mask_input=np.zeros((1, 64, 64), np.float32))
    with pytest.raises(ValueError, match="disagree on the number of prompts"):
        ours.predict_batch([[[1, 1]], [[2, 2]]], [[1], [1]], [[0, 0, 5, 5]])
    with pytest.raises(ValueError, match="uint8"):
        ours.set_image(np.zeros((8, 8, 3), np.float32))
    fresh = SAM2ImagePredictor(ours.model)
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.predict(point_coords=[[1, 1]], point_labels=[1])


@pytest.mark.heavy
@pytest.mark.parametrize("size,version", [("b+", "2.1"), ("l", "2.0")])
def test_end_to_end_large(tmp_path, image, size, version):
    """base_plus (2.1) and large (2.0) at 1024 against the official predictor. Deeper trunks
    (24 / 48 blocks) accumulate more float32 reordering error: 1e-4 of the scale."""
    tv_shim()
    from sam2.sam2_image_predictor import SAM2ImagePredictor as OfficialPredictor

    ref, model = convert_official(tmp_path, size, version)
    official, ours = OfficialPredictor(ref), SAM2ImagePredictor(model)
    hook = ObjScoreHook(ref.sam_mask_decoder)
    with torch.no_grad():
        official.set_image(image)
    ours.set_image(image)
    want = official._features
    assert_close_scaled(ours.features["image_embed"], _nhwc(want["image_embed"]), 1e-4, "embed")
    for got, w in zip(ours.features["high_res_feats"], want["high_res_feats"]):
        assert_close_scaled(got, _nhwc(w), 1e-4, "high-res")
    for name in ("point", "box_points"):
        p = PROMPTS[name]
        with torch.no_grad():
            t_masks, t_iou, t_low = official.predict(**p, return_logits=True)
        pred = ours.predict_batch(
            [np.asarray(p["point_coords"])], [np.asarray(p["point_labels"])],
            np.asarray(p["box"])[None] if "box" in p else None,
            multimask_output=p["multimask_output"], return_logits=True,
        )  # fmt: skip
        assert_close_scaled(pred.low_res_logits[0], t_low, 1e-4, f"{name} low-res")
        np.testing.assert_allclose(pred.iou_predictions[0], t_iou, atol=1e-4, rtol=0)
        assert_close_scaled(pred.object_score_logits, hook.value[:, 0], 1e-4, f"{name} obj")


def test_annotations_and_bfloat16():
    """Every parameter has logical axis names; a bf16-compute predictor agrees with float32 to
    bf16 precision (random weights at image size 128, no reference needed: same model)."""
    import jax.numpy as jnp
    from flax import nnx

    from pam_jax.demo import random_sam2
    from pam_jax.sam2.model import SAM2Base
    from pam_jax.sharding import unannotated_params

    model, cfg = random_sam2("t", "2.1", image_size=128, seed=0)
    assert unannotated_params(model) == []
    bf16 = nnx.eval_shape(lambda: SAM2Base(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    nnx.update(bf16, nnx.state(model))
    img, _ = sample_image(96, 128, seed=4)
    outs = []
    for m in (model, bf16):
        p = SAM2ImagePredictor(m)
        p.set_image(img)
        outs.append(p.predict_batch([[[40.0, 30.0]]], [[1]], [[10.0, 10.0, 90.0, 70.0]],
                                    multimask_output=True, return_logits=True))  # fmt: skip
    f32, b16 = outs
    assert np.isfinite(b16.low_res_logits).all() and b16.low_res_logits.dtype == np.float32
    # bf16 has an 8-bit mantissa: a few percent of the logits' scale after ~20 layers
    assert_close_scaled(b16.low_res_logits, f32.low_res_logits, 0.1, "bf16 low-res logits")
    np.testing.assert_allclose(b16.iou_predictions, f32.iou_predictions, atol=0.05)
