"""Every --format on small files written here: items, ids, prompts, references; malformed
records reported with their line / index and skipped, or a hard stop under strict."""

import json

import numpy as np
import pytest

from pam_jax.evaluation import formats as F


def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _human(task_text):
    return [{"from": "human", "value": "<image>\n" + task_text}, {"from": "gpt", "value": "a cat"}]


CAPTION = "Provide a concise caption for this subject."
VIDEO = "Provide a caption for this subject in this video.\nPrevious caption: "


def test_pam_jsonl_tasks_ids_and_problems(tmp_path):
    rows = [
        {"id": "x1", "type": "image", "image": "a.jpg", "bbox": [10.7, 20.2, 30, 40],
         "conversations": _human("Classify this subject and provide its label.")},
        {"type": "image", "image": "b.jpg", "points": [[5, 6]], "labels": [1],
         "conversations": _human("对该目标对象提供一个全面且详细的描述")},
        "{not json",
        {"type": "image", "image": "c.jpg", "conversations": _human(CAPTION)},
        {"type": "video", "image_root": "v1", "frames": ["0.jpg", "1.jpg"], "bbox": [[1, 2, 3, 4]],
         "conversations": _human(VIDEO + "he runs")},
        {"type": "image", "image": "d.jpg", "bbox": [0, 0, 5, 5],
         "conversations": _human("What is this?")},
    ]  # fmt: skip
    path = _jsonl(tmp_path / "d.jsonl", rows)
    got = F.load(path, "pam")
    ids = [it.id for it in got.items]
    assert ids == ["x1", "1", "4"]  # the record's id, else its 0-based line
    a, b, v = got.items
    assert a.task == "recognize" and a.refs == ("a cat",)
    assert a.region == {"box": [10.0, 20.0, 40.0, 60.0]}  # the release's int() rounding
    assert a.media == (str(tmp_path / "a.jpg"),)
    assert b.task == "detailed-caption" and b.region == {"points": [[5.0, 6.0]], "labels": [1]}
    assert v.kind == "video" and v.task == "video-caption" and v.history == "he runs"
    assert v.media == (str(tmp_path / "v1" / "0.jpg"), str(tmp_path / "v1" / "1.jpg"))
    assert [p.where for p in got.problems] == ["line 2", "line 3", "line 5"]
    assert "JSON" in got.problems[0].reason and "no_prompt" in got.problems[1].reason
    assert "task prompt" in got.problems[2].reason
    # --task overrides the human turn; --strict stops at the first bad record, naming it
    assert {it.task for it in F.load(path, "pam", task="caption").items if it.kind == "image"} == {
        "caption"
    }
    with pytest.raises(F.FormatError, match="line 2"):
        F.load(path, "pam", strict=True)
    assert len(F.load(path, "pam", limit=2).items) == 2


def _rle_square(h, w):
    from pycocotools import mask as mask_utils

    m = np.zeros((h, w), np.uint8)
    m[2:6, 3:9] = 1
    r = mask_utils.encode(np.asfortranarray(m))
    return {"size": [h, w], "counts": r["counts"].decode()}, m.astype(bool)


def test_osprey_masks_and_region_ids(tmp_path):
    rle, m = _rle_square(10, 12)
    poly = [[1, 1, 8, 1, 8, 6, 1, 6]]
    data = [
        {"id": 7, "file_name": "im.jpg", "height": 10, "width": 12,
         "categories": ["hot_dog", "person"],
         "annotations": [{"bbox": [0, 0, 1, 1], "segmentation": rle},
                         {"bbox": [0, 0, 1, 1], "segmentation": poly}]},
        {"file_name": "im2.jpg", "height": 10, "width": 12, "categories": ["cup"],
         "annotations": [{"segmentation": rle}]},
        {"file_name": "im3.jpg", "height": 10, "width": 12, "categories": ["a", "b"],
         "annotations": [{"segmentation": rle}]},
    ]  # fmt: skip
    path = tmp_path / "lvis_val_1k_category.json"
    path.write_text(json.dumps(data))
    got = F.load(path, "osprey")
    assert [it.id for it in got.items] == ["7#0", "7#1", "1"]
    assert got.items[0].task == "recognize" and got.items[0].refs == ("hot_dog",)
    np.testing.assert_array_equal(F.decode_mask(got.items[0].region["mask"], (10, 12)), m)
    pm = F.decode_mask(got.items[1].region["mask"], (10, 12))
    assert pm.dtype == bool and pm[3, 4] and not pm[9, 11]
    assert [str(p) for p in got.problems] == [
        "index 2: categories and annotations must be lists of the same length"
    ]
    assert F.encode_mask(m) == rle  # RLE round trip


def test_refcocog_vg_coco(tmp_path):
    rle, m = _rle_square(10, 12)
    images = [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 12, "caption": "a red car"},
              {"id": 2, "file_name": "b.jpg", "height": 10, "width": 12}]  # fmt: skip
    anns = [
        {"id": 11, "image_id": 1, "bbox": [1, 2, 3, 4], "segmentation": rle},
        {"id": 12, "image_id": 2, "bbox": [0, 0, 5, 5], "caption": "a tree",
         "segmentation": [[1, 1, 8, 1, 8, 6]]},
        {"id": 13, "image_id": 9, "bbox": [0, 0, 5, 5], "caption": "x"},
    ]  # fmt: skip
    path = tmp_path / "refcocog_val.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    ref = F.load(path, "refcocog")
    assert [(it.id, it.refs, it.region["box"]) for it in ref.items] == [
        ("11", ("a red car",), [1.0, 2.0, 4.0, 6.0]),
        ("12", ("a tree",), [0.0, 0.0, 5.0, 5.0]),
    ]
    assert ref.items[0].task == "caption"
    assert [p.where for p in ref.problems] == ["annotation 2"]
    seg = F.load(path, "coco")
    assert [it.task for it in seg.items] == ["segment", "segment"]
    np.testing.assert_array_equal(F.decode_mask(seg.items[0].gt_mask, seg.items[0].hw), m)
    vg = F.load(path, "vg", task="detailed-caption")
    assert vg.items[1].refs == ("a tree",) and vg.items[1].task == "detailed-caption"
    with pytest.raises(F.FormatError, match="annotation 2"):
        F.load(path, "vg", strict=True)
    with pytest.raises(F.FormatError, match="image format"):
        F.load(path, "vg", task="video-caption")


def test_video_and_stream(tmp_path):
    rle, _ = _rle_square(10, 12)
    rows = [
        {"id": "hc1", "image_root": "clip", "frames": ["0.jpg", "1.jpg"], "bbox": [1, 1, 4, 4],
         "caption": "a man walks", "masks": [rle, rle]},
        {"frames": ["0.jpg"], "box": [1, 1, 5, 5], "caption": ["a", "b"]},
        {"frames": ["0.jpg", "1.jpg"], "box": [1, 1, 5, 5], "caption": "c", "masks": [rle]},
    ]  # fmt: skip
    got = F.load(_jsonl(tmp_path / "hcstvg.jsonl", rows), "video")
    assert [it.id for it in got.items] == ["hc1", "1"]
    assert got.items[0].region == {"box": [1.0, 1.0, 5.0, 5.0]}
    assert got.items[0].media[1] == str(tmp_path / "clip" / "1.jpg")
    assert got.items[1].refs == ("a", "b")
    assert [p.where for p in got.problems] == ["line 2"]
    stream = [
        {"type": "video", "video_id": "v_abc", "image_root": "frames/v_abc", "annotations": [
            {"event_id": 1, "frames": ["0.jpg", "1.jpg"], "gt": "a man enters",
             "box": [[1, 2, 3, 4]]},
            {"event_id": 2, "frames": ["2.jpg"], "gt": "he sits", "box": [[2, 2, 3, 3]]}]},
        {"type": "video", "annotations": [{"frames": ["0.jpg"], "gt": "x"}]},
    ]  # fmt: skip
    got = F.load(_jsonl(tmp_path / "s.jsonl", stream), "stream")
    (it,) = got.items
    assert it.kind == "stream" and it.prediction_ids() == ["v_abc#0", "v_abc#1"]
    assert it.events[0].box == (1.0, 2.0, 4.0, 6.0) and it.events[1].ref == "he sits"
    assert it.events[1].frames == (str(tmp_path / "frames/v_abc/2.jpg"),)
    assert [str(p) for p in got.problems] == ["line 1: event 0: no box"]


def test_bad_files_and_duplicates(tmp_path):
    with pytest.raises(F.FormatError, match="no such file"):
        F.load(tmp_path / "none.jsonl", "pam")
    with pytest.raises(F.FormatError, match="unknown --format"):
        F.load(tmp_path / "none.jsonl", "lvis")
    rows = [{"id": "a", "frames": ["0.jpg"], "box": [0, 0, 1, 1], "caption": "x"}] * 2
    with pytest.raises(F.FormatError, match="duplicate id 'a'"):
        F.load(_jsonl(tmp_path / "dup.jsonl", rows), "video")


def test_pam_segmentation_kept_and_scored(tmp_path):
    """`--format pam --task segment`: each record's ground truth (`segmentation` RLE or polygons,
    or `mask`, a PNG under the image root) is kept and scored; a record without one is reported.
    mIoU / cIoU by hand: masks of 24, 35 and 16 pixels against 24-, 20- and 16-pixel predictions."""
    from PIL import Image

    from pam_jax.evaluation.api import EvalConfig, evaluate

    rle, m = _rle_square(10, 12)  # rows 2:6, cols 3:9 = 24 px
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "a.png")
    png = np.zeros((10, 12), np.uint8)
    png[0:4, 0:4] = 255  # 16 px
    (tmp_path / "masks").mkdir()
    Image.fromarray(png).save(tmp_path / "masks" / "p.png")
    conv = _human("Classify this subject and provide its label.")
    rows = [
        {"id": "rle", "image": "a.png", "bbox": [3, 2, 6, 4], "segmentation": rle,
         "conversations": conv},
        {"id": "poly", "image": "a.png", "bbox": [1, 1, 7, 5],
         "segmentation": [[1, 1, 8, 1, 8, 6, 1, 6]], "conversations": conv},
        {"id": "png", "image": "a.png", "bbox": [0, 0, 4, 4], "mask": "masks/p.png",
         "conversations": conv},
        {"id": "none", "image": "a.png", "bbox": [0, 0, 4, 4], "conversations": conv},
    ]  # fmt: skip
    path = _jsonl(tmp_path / "seg.jsonl", rows)
    got = F.load(path, "pam", task="segment")
    assert [it.id for it in got.items] == ["rle", "poly", "png"]
    assert [str(p) for p in got.problems] == [
        "line 3: --task segment needs the record's segmentation or mask"
    ]
    poly = F.decode_mask(got.items[1].gt_mask, (10, 12))
    np.testing.assert_array_equal(F.decode_mask(got.items[0].gt_mask, (10, 12)), m)
    np.testing.assert_array_equal(F.decode_mask(got.items[2].gt_mask, (10, 12)), png > 0)
    # without --task the records stay recognition items, their masks still attached
    assert F.load(path, "pam").items[0].gt_mask == rle
    with pytest.raises(ValueError, match="bad_mask"):
        F.decode_mask(got.items[2].gt_mask, (12, 10))  # a PNG of another size

    p_rle = m.copy()  # exact: IoU 1
    p_poly = np.zeros((10, 12), bool)
    p_poly[1:6, 1:5] = True  # 20 px, all inside the polygon
    p_png = np.zeros((10, 12), bool)
    p_png[0:4, 2:6] = True  # 8 px overlap, union 24
    n_poly = int(poly.sum())
    preds = [
        {"id": "rle", "pred": "", "mask_rle": F.encode_mask(p_rle)},
        {"id": "poly", "pred": "", "mask_rle": F.encode_mask(p_poly)},
        {"id": "png", "pred": "", "mask_rle": F.encode_mask(p_png)},
    ]
    assert (poly & p_poly).sum() == 20
    pf = _jsonl(tmp_path / "p.jsonl", preds)
    cfg = EvalConfig(data=str(path), format="pam", task="segment")
    flat = evaluate(cfg, tmp_path / "res", predictions=pf, progress=False)
    ious = [1.0, 20 / n_poly, 8 / 24]
    assert flat["mIoU"] == pytest.approx(sum(ious) / 3, abs=1e-12)
    assert flat["cIoU"] == pytest.approx((24 + 20 + 8) / (24 + n_poly + 24), abs=1e-12)
    assert flat["n_items"] == 3 and flat["n_skipped"] == 1 and flat["task"] == "segment"
