"""`prepare`: every kind of bad record reported with file and line (or a hard stop under strict,
nothing written), TFDS ArrayRecord read back without TensorFlow, masks in every form."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pam_jax.data.prepare import REPORT, TFDS_SUBDIR, prepare
from pam_jax.data.preprocess import decode_image, decode_mask
from pam_jax.data.records import RecordError
from pam_jax.data.source import iter_records, load_element, open_source

from .conftest import conv, image_record, video_record, write_jsonl

BAD = {  # line content -> expected reason
    "malformed_json": '{"type": "image", "image": ',
    "missing_image": image_record("nope.jpg"),
    "missing_frame": video_record(
        frames=["00000.jpg", "99999.jpg"], masked_frames=["00000.jpg", "99999.jpg"]
    ),
    "bad_prompt": image_record("img1.jpg", bbox=[50, 40, 30, 20]),  # x2 = 80 > 64 + 1
    "points_labels_mismatch": image_record("img2.jpg", labels=[1, 0]),
    "empty_conversations": image_record("img3.jpg", conversations=[]),
    "no_image_token": image_record("img4.jpg", conversations=conv()[1:] + conv()[1:]),
    "unreadable_image": image_record("broken.jpg"),
    "bad_mask": image_record("img5.jpg", segmentation={"size": [10, 10], "counts": [100]}),
}


def _files(tmp_path, image_root):
    (image_root / "broken.jpg").write_bytes(b"not a jpeg")
    bad = [BAD[k] for k in BAD]
    good_a = [image_record(f"img{i}.jpg") for i in (6, 7, 8)]
    # no_image_token above: two gpt turns; the first is dropped as a leading non-human turn
    a = write_jsonl(tmp_path / "a.jsonl", [good_a[0], *bad[:5], good_a[1], "", good_a[2]])
    b = write_jsonl(tmp_path / "b.jsonl", [*bad[5:], video_record(), image_record("p.png")])
    return a, b


def test_report_counts_every_bad_record_with_file_and_line(tmp_path, image_root):
    a, b = _files(tmp_path, image_root)
    out = tmp_path / "ds"
    rep = prepare([a, b], image_root, out, workers=2)
    assert rep["records_read"] == 14 == rep["written"] + rep["skipped_count"]  # blank: no record
    assert rep["written"] == 5 and rep["written_by_kind"] == {"image": 4, "video": 1}
    got = {(s["file"], s["line"], s["reason"]) for s in rep["skipped"]}
    want = {(str(a), i + 2, k) for i, k in enumerate(list(BAD)[:5])}
    want |= {(str(b), i + 1, k) for i, k in enumerate(list(BAD)[5:])}
    assert got == want
    assert rep["skipped_by_reason"] == {k: 1 for k in BAD}
    assert rep["per_file"][str(a)] == {"read": 8, "written": 3, "skipped": 5}
    assert json.loads((out / REPORT).read_text()) == rep
    assert (out / TFDS_SUBDIR / "dataset_info.json").is_file()

    src = open_source(out)
    assert len(src) == 5
    recs = [load_element(src[i])[0] for i in range(5)]
    assert [(r.source, r.line, r.kind) for r in recs] == [
        (str(a), 1, "image"),
        (str(a), 7, "image"),
        (str(a), 9, "image"),
        (str(b), 5, "video"),
        (str(b), 6, "image"),
    ]
    rec, frames = load_element(src[4])
    assert rec.orig_hw == (50, 45) and rec.frames == ("p.png",)
    stored = (image_root / "p.png").read_bytes()
    assert bytes(src[4]["frames"][0]) == stored  # bytes kept as stored
    assert [r.line for r, _ in iter_records(out)] == [1, 7, 9, 5, 6]
    assert [r.line for r, _ in iter_records(b, image_root)] == [5, 6]  # JSONL read in place
    video, vframes = load_element(src[3])
    assert len(vframes) == 6 and video.annotations[1].frame == 3


def test_strict_stops_and_writes_nothing(tmp_path, image_root):
    a, b = _files(tmp_path, image_root)
    out = tmp_path / "ds"
    with pytest.raises(RecordError, match=rf"malformed_json: {a}:2"):
        prepare([a, b], image_root, out, strict=True)
    assert not out.exists() and not list(tmp_path.glob(".ds.tmp-*"))


def test_image_size_and_masks_in_every_form(tmp_path, image_root):
    m = np.zeros((48, 64), bool)
    m[10:20, 5:40] = True
    Image.fromarray(m.astype(np.uint8) * 255).save(image_root / "m.png")
    poly = [[5, 10, 40, 10, 40, 20, 5, 20]]
    rle = {"size": [48, 64], "counts": [48 * 5 + 10, 10] + [38, 10] * 34 + [28 + 48 * 24]}
    rows = [
        image_record("img0.jpg", mask="m.png"),
        image_record("img1.jpg", segmentation=poly),
        image_record("img2.jpg", segmentation=rle),
    ]
    out = tmp_path / "ds"
    rep = prepare([write_jsonl(tmp_path / "m.jsonl", rows)], image_root, out, image_size=32)
    assert rep["written"] == 3 and rep["image_size"] == 32
    src = open_source(out)
    for i in range(3):
        rec, frames = load_element(src[i])
        assert rec.orig_hw == (48, 64) and np.asarray(frames[0]).shape == (32, 32, 3)
        mask = rec.annotations[0].mask
        assert set(mask) == {"size", "counts"} and isinstance(mask["counts"], str)
        got = decode_mask(mask, (48, 64)).astype(bool)
        if i == 1:  # polygon rasterization covers the filled rectangle (edges may add a pixel)
            assert got[m].all() and (got & ~m).sum() <= 2 * (35 + 11)
        else:
            np.testing.assert_array_equal(got, m)
    # the re-encoded picture is the lossless PNG of PIL's bicubic resize of the original
    orig = np.asarray(Image.open(image_root / "img0.jpg").convert("RGB"))
    ref = np.asarray(Image.fromarray(orig).resize((32, 32), Image.BICUBIC))
    np.testing.assert_array_equal(decode_image(bytes(src[0]["frames"][0])), ref)


def test_no_valid_record_is_an_error(tmp_path, image_root):
    j = write_jsonl(tmp_path / "a.jsonl", [image_record("nope.jpg"), "{x"])
    with pytest.raises(ValueError, match=r"2 read, all skipped .*missing_image"):
        prepare([j], image_root, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


WEIRD = [
    [1, 2],
    {"type": "audio", "image": "img0.jpg", "conversations": conv(), "bbox": [0, 0, 1, 1]},
    image_record("img0.jpg", image=5),
    image_record("img0.jpg", bbox="abc"),
    image_record("img0.jpg", bbox=[1, 2, -3, 4]),
    image_record("img0.jpg", points=[[1, 2], [3]], labels=[1, 1]),
    image_record("img0.jpg", points=[[None, 2]], labels=[1]),
    image_record("img0.jpg", labels=["a", "b", "c", "d", "e"]),
    image_record("img0.jpg", labels=[1, 1, 0, 7, 0]),
    image_record("img0.jpg", labels=[1, 1.5, 0, 1, 0]),
    image_record("img0.jpg", bbox=None, points=None, labels=None),
    image_record("img0.jpg", conversations=[{"from": "human", "value": None}]),
    image_record("img0.jpg", conversations=[{"from": "bot", "value": "<image>"}]),
    image_record("img0.jpg", conversations=conv()[:1]),
    image_record("img0.jpg", conversations=[{"from": "human", "value": "<image><image>"}]),
    image_record("img0.jpg", segmentation={"size": "x", "counts": 3}),
    image_record("img0.jpg", segmentation=[[1, 2, 3]]),
    image_record("img0.jpg", segmentation=12),
    video_record(frames=[], masked_frames=[]),
    video_record(masked_frames=["nope.jpg"]),
    video_record(bbox=[[4, 5, 20, 10]]),
]


def test_malformed_records_are_reported_never_a_crash(tmp_path, image_root):
    j = write_jsonl(tmp_path / "w.jsonl", [*WEIRD, image_record("img0.jpg")])
    rep = prepare([j], image_root, tmp_path / "ds")
    assert rep["records_read"] == len(WEIRD) + 1 and rep["written"] == 1
    assert [s["line"] for s in rep["skipped"]] == list(range(1, len(WEIRD) + 1))
