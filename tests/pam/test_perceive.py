"""`pam-jax perceive` and `pam_jax.pam.perceive.perceive` on the demo's micro random PAM (SAM 2.1-
style micro Hiera at 128, 2-layer Qwen2, word-level tokenizer; `pam_jax.demo.write_initial_model`).

The masks' parity with the official generator is tests/sam2/test_automatic_mask_generator.py's.
Here: every region captioned in one batch equals each region captioned alone (greedy decoding:
the same token ids), the command's outputs (JSON ordered by area, COCO RLE = mask PNG, overlay),
a SAM 2 model (masks only), an empty result and absurd parameters.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pam_jax.cli import main
from pam_jax.pam.perceive import perceive
from pam_jax.sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

# Random weights: loose filters and no box NMS (1.0) keep several masks of a 4 x 4 grid.
LOOSE = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
LOOSE_ARGS = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
              "--box-nms-thresh", "1.0"]  # fmt: skip


@pytest.fixture(scope="module")
def pam_dir(tmp_path_factory):
    from pam_jax.demo import write_initial_model

    return write_initial_model(tmp_path_factory.mktemp("perceive") / "pam", 128, 0)


@pytest.fixture(scope="module")
def loaded(pam_dir):
    import jax.numpy as jnp

    from pam_jax.pam.model import load_pam
    from pam_jax.pam.predictor import PAMPredictor

    model, _, tok = load_pam(pam_dir, llm_dtype=jnp.float32)
    return model, PAMPredictor(model, tok, max_new_tokens=6)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from skimage import data

    img = np.asarray(Image.fromarray(data.coffee()).resize((150, 100), Image.BILINEAR))
    path = tmp_path_factory.mktemp("perceive_img") / "coffee.png"
    Image.fromarray(img).save(path)
    return img, path


def test_batched_regions_equal_each_alone(loaded, image):
    model, pred = loaded
    img, _ = image
    gen = SAM2AutomaticMaskGenerator(model.sam2, **LOOSE)
    res = perceive(img, gen, pred, task="recognize", max_regions=4)
    n = len(res.masks)
    assert n == 4, n
    areas = res.masks.areas
    assert list(areas) == sorted(areas, reverse=True)  # ordered by area
    assert all(t is not None for t in res.texts)
    for i in range(n):
        (alone,) = pred.describe_image(img, [{"mask": res.masks.masks[i]}], "recognize")
        assert alone.token_ids == res.token_ids[i], i
        assert alone.text == res.texts[i]


def test_command_outputs(pam_dir, image, tmp_path, capsys):
    from pycocotools import mask as mask_utils

    _, path = image
    out = tmp_path / "out" / "x"
    argv = ["perceive", "--model", str(pam_dir), "--image", str(path), "--out", str(out),
            "--max-regions", "4", "--max-new-tokens", "6", *LOOSE_ARGS]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads((tmp_path / "out" / "x.json").read_text())
    rows = doc["regions"]
    assert doc["num_regions"] == len(rows) == 4 and doc["task"] == "recognize"
    assert [r["area"] for r in rows] == sorted((r["area"] for r in rows), reverse=True)
    for r in rows:
        png = np.asarray(Image.open(tmp_path / "out" / r["file"])) > 0
        rle = dict(r["segmentation"], counts=r["segmentation"]["counts"].encode())
        np.testing.assert_array_equal(mask_utils.decode(rle) > 0, png)
        assert r["area"] == int(png.sum())
        x, y, w, h = r["bbox"]
        assert r["box"] == [x, y, x + w, y + h]
        assert isinstance(r["text"], str) and 0 <= r["predicted_iou"] <= 1
        assert {"stability_score", "point_coords", "crop_box"} <= set(r)
    assert Image.open(tmp_path / "out" / "x.png").size == (150, 100)
    assert "wrote" in capsys.readouterr().err


def test_sam2_model_empty_result_and_errors(loaded, image, tmp_path, capsys):
    from pam_jax.sam2.loading import save_sam2

    model, _ = loaded
    _, path = image
    sam_dir = save_sam2(model.sam2, tmp_path / "sam2")
    out = tmp_path / "s"
    assert main(["perceive", "--model", str(sam_dir), "--image", str(path), "--out", str(out),
                 *LOOSE_ARGS]) == 0  # fmt: skip
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["num_regions"] > 0 and all(r["text"] is None for r in doc["regions"])
    assert doc["task"] is None
    capsys.readouterr()
    # a grid that leaves no mask: said so, an empty (valid) result
    argv = ["perceive", "--model", str(sam_dir), "--image", str(path), "--out", str(tmp_path / "e"),
            "--pred-iou-thresh", "1.0", "--points-per-side", "4"]  # fmt: skip
    assert main(argv) == 0
    assert "no mask passed the filters" in capsys.readouterr().err
    assert json.loads((tmp_path / "e.json").read_text())["regions"] == []
    # absurd parameters and bad input: one-line errors, exit 2, before the model loads
    base = ["perceive", "--model", str(sam_dir), "--image", str(path)]
    for extra, msg in (
        (["--points-per-side", "0"], "points_per_side must be an integer >= 1"),
        (["--pred-iou-thresh", "7"], "pred_iou_thresh must be a number in [0, 1]"),
        (["--crop-n-layers", "9"], "crop_n_layers must be an integer in 0..4"),
        (["--max-regions", "0"], "--max-regions must be >= 1"),
    ):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err, err
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert main(["perceive", "--model", str(sam_dir), "--image", str(empty)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
