"""`--format pam` on a prepared dataset folder (`pam-jax data prepare`) gives the items, pixels
and scores of the JSONL it was made from."""

import json

import numpy as np
import pytest

from pam_jax.cli import main
from pam_jax.evaluation import formats as F
from pam_jax.evaluation.runner import load_image
from tests.data.conftest import conv, write_image, write_jsonl

RECOGNIZE = "Classify this subject and provide its label."
VIDEO = "Provide a caption for this subject in this video.\nPrevious caption: he runs"
HW = (24, 32)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(JSONL, dataset folder prepared from it): ids, no ids, RLE / polygon / PNG masks, a video,
    a line that is not JSON and a record whose image is missing (prepare skips both)."""
    from PIL import Image

    from pam_jax.cliutil import mask_rle
    from pam_jax.data.prepare import prepare

    d = tmp_path_factory.mktemp("ds")
    for i in range(3):
        write_image(d / f"i{i}.jpg", hw=HW, seed=i)
        write_image(d / "v" / f"{i}.jpg", hw=HW, seed=10 + i)
    m = np.zeros(HW, bool)
    m[3:9, 4:20] = True
    Image.fromarray(m.astype(np.uint8) * 255).save(d / "m.png")
    rle = mask_rle(m)
    rows = [
        {"id": "a", "type": "image", "image": "i0.jpg", "bbox": [4, 3, 16, 6],
         "segmentation": rle, "conversations": conv("a cat", RECOGNIZE)},
        {"type": "image", "image": "i1.jpg", "points": [[5, 6], [9, 9]], "labels": [1, 0],
         "segmentation": [[2, 2, 20, 2, 20, 12, 2, 12]], "conversations": conv("a dog", RECOGNIZE)},
        "{not json",
        {"id": "c", "type": "image", "image": "i2.jpg", "bbox": [1, 1, 10, 10], "mask": "m.png",
         "conversations": conv("a cat", RECOGNIZE)},
        {"id": "gone", "type": "image", "image": "nope.jpg", "bbox": [1, 1, 5, 5],
         "conversations": conv("x", RECOGNIZE)},
        {"id": "vid", "type": "video", "image_root": "v", "frames": ["0.jpg", "1.jpg", "2.jpg"],
         "bbox": [[2, 3, 10, 8]], "conversations": conv("he walks", VIDEO)},
    ]  # fmt: skip
    jsonl = write_jsonl(d / "d.jsonl", rows)
    prepare([jsonl], d, d / "dataset")
    return jsonl, d / "dataset"


def _same(a: F.Item, b: F.Item) -> None:
    assert (a.id, a.kind, a.task, a.region, a.refs, a.history) == (
        b.id, b.kind, b.task, b.region, b.refs, b.history
    )  # fmt: skip
    assert len(a.media) == len(b.media)
    for pa, pb in zip(a.media, b.media):  # the stored bytes decode to the file's pixels
        np.testing.assert_array_equal(load_image(pa), load_image(pb))
    if a.gt_mask is None:
        assert b.gt_mask is None
    else:
        np.testing.assert_array_equal(F.decode_mask(a.gt_mask, HW), F.decode_mask(b.gt_mask, HW))


def test_dataset_items_equal_the_jsonl(pair):
    jsonl, ds = pair
    j, s = F.load(jsonl, "pam"), F.load(ds, "pam", image_root="/ignored")
    assert [it.id for it in j.items] == ["a", "1", "c", "gone", "vid"]
    assert [it.id for it in s.items] == ["a", "1", "c", "vid"]  # prepare dropped "gone"
    by_id = {it.id: it for it in j.items}
    for it in s.items:
        _same(by_id[it.id], it)
    assert isinstance(s.items[0].media[0], F.StoredFrame)
    assert str(s.items[0].media[0]) == f"{ds}#0/0" and s.items[3].media[2].frame == 2
    # prepare's skips are the dataset's problems, by file and (1-based) line
    assert [p.where for p in j.problems] == ["line 2"]
    assert [str(p).split(": ")[0] for p in s.problems] == [f"{jsonl}:3", f"{jsonl}:5"]
    assert "malformed_json" in s.problems[0].reason and "missing_image" in s.problems[1].reason
    assert s.n_records == 6
    with pytest.raises(F.FormatError, match="malformed_json.*--strict"):
        F.load(ds, "pam", strict=True)
    seg = F.load(ds, "pam", task="segment")
    assert [it.task for it in seg.items if it.kind == "image"] == ["segment"] * 3
    assert len(F.load(ds, "pam", limit=2).items) == 2


def test_dataset_errors(pair, tmp_path):
    _, ds = pair
    with pytest.raises(F.FormatError, match="--format pam only"):
        F.load(ds, "osprey")
    with pytest.raises(F.FormatError, match="not a prepared dataset"):
        F.load(tmp_path, "pam")
    with pytest.raises(F.FormatError, match="no such file or dataset folder"):
        F.load(tmp_path / "missing", "pam")


def test_cli_scores_a_dataset_as_its_jsonl(pair, tmp_path, capsys):
    jsonl, ds = pair
    # the video item goes unpredicted here (its captioning metrics need Java: slow)
    preds = {"a": "a cat", "1": "a cat", "c": "Cat."}
    pf = tmp_path / "pred.jsonl"
    pf.write_text("".join(json.dumps({"id": k, "pred": v}) + "\n" for k, v in preds.items()))
    got = {}
    for name, data in (("jsonl", jsonl), ("ds", ds)):
        argv = ["eval", "--predictions", pf, "--data", data, "--format", "pam"]
        assert main([*map(str, argv), "--task", "recognize", "--out", str(tmp_path / name)]) == 0
        m = json.loads((tmp_path / name / "metrics.json").read_text())
        got[name] = {k: v for k, v in m.items() if k.startswith("recognize/")}
    err = capsys.readouterr().err
    assert "1 item(s) have no prediction" in err  # the dataset's: "vid" ("gone" was skipped)
    assert set(got["ds"]) == {f"recognize/{k}" for k in ("semantic_similarity", "semantic_iou",
                                                        "exact_match")}  # fmt: skip
    assert got["ds"] == got["jsonl"]
    assert got["ds"]["recognize/exact_match"] == pytest.approx(1 / 3)  # only "a cat" == "a cat"
    assert (tmp_path / "ds" / "report.md").is_file()
    assert (tmp_path / "ds" / "examples.png").is_file()  # overlays read the stored pictures
