"""Token ids and labels against the release's `preprocess_qwen` rules (written out by hand
here), prompts, pictures and masks of `make_example`, and `collate`."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from pam_jax.data.batch import collate, collate_packed
from pam_jax.data.prepare import check_record
from pam_jax.data.preprocess import PreprocessConfig, make_example, tokenize_conversation
from pam_jax.data.records import RecordError, parse_record
from pam_jax.pam.assembly import select_frames

from .conftest import MERGED_DOT_NL, byte_id, image_record, video_record, write_image

IM_START, IM_END = 258, 259
NL = byte_id(ord("\n"))
X = -100


def B(s: str) -> list[int]:
    """Byte-level ids of text with no merges in it."""
    return [byte_id(b) for b in s.encode("utf-8")]


def ign(s: str) -> list[int]:
    return [X] * len(B(s))


SYSTEM_IDS = [IM_START, *B("system"), NL, *B("You are a helpful assistant."), IM_END, NL]
SYSTEM_QUIRK = [IM_START, *ign("system"), NL, *ign("You are a helpful assistant."), IM_END, NL]
SYSTEM_PLAIN = [X] * len(SYSTEM_IDS)


def turns(conv):
    return parse_record(
        {"type": "image", "image": "a.jpg", "conversations": conv, "bbox": [0, 0, 1, 1]},
        source="t.jsonl",
    ).conversations


def run(conv, tokenizer, quirk):
    ib, ia, lb, la = tokenize_conversation(turns(conv), tokenizer, unmask_template_tokens=quirk)
    return ib.tolist(), ia.tolist(), lb.tolist(), la.tolist()


@pytest.mark.parametrize("quirk", [True, False], ids=["unmask", "plain"])
def test_one_turn_matches_release(tokenizer, quirk):
    task = "Classify this subject and provide its label."
    conv = [{"from": "human", "value": f"<image>\n{task}"}, {"from": "gpt", "value": "A cat."}]
    ib, ia, lb, la = run(conv, tokenizer, quirk)
    # <|im_start|>user\n | <image> | \n{task}<|im_end|>\n <|im_start|>assistant\nA cat.<|im_end|>\n
    assert ib == SYSTEM_IDS + [IM_START, *B("user"), NL]
    user_after = [NL, *B(task), IM_END, NL]
    asst = [IM_START, *B("assistant"), NL, *B("A cat."), IM_END, NL]
    assert ia == user_after + asst
    if quirk:  # every standalone \n, <|im_start|>, <|im_end|> is un-masked
        assert lb == SYSTEM_QUIRK + [IM_START, *ign("user"), NL]
        assert la == [NL, *ign(task), IM_END, NL] + asst
        # 8 template tokens of the system and user turns enter the loss (pam.md §8.1; label 0
        # is dropped by the shift)
        assert sum(v != X for v in (lb + la[: len(user_after)])[1:]) == 8
    else:
        assert lb == SYSTEM_PLAIN + [X] * 6
        assert la == [X] * len(user_after) + asst


@pytest.mark.parametrize("quirk", [True, False], ids=["unmask", "plain"])
def test_two_turns_merged_newlines_and_moved_image(tokenizer, quirk):
    # "<image>" not at the start moves there (preprocess_multimodal); ".\n" is ONE token (stays
    # masked in a user turn), "。\n" leaves a standalone newline (un-masked by the quirk).
    conv = [
        {"role": "user", "content": "Look. <image> 看。\nok"},
        {"role": "assistant", "content": "Cat.\nYes"},
        {"role": "user", "content": "Sure.\nGo"},
        {"role": "assistant", "content": "Yes."},
    ]
    ib, ia, lb, la = run(conv, tokenizer, quirk)
    moved = "\nLook.  看。\nok"  # "<image>\n" + "Look.  看。\nok" (the placeholder's spaces remain)
    u1 = [*B("\nLook.  看。"), NL, *B("ok"), IM_END, NL]
    a1 = [IM_START, *B("assistant"), NL, *B("Cat"), MERGED_DOT_NL, *B("Yes"), IM_END, NL]
    u2 = [IM_START, *B("user"), NL, *B("Sure"), MERGED_DOT_NL, *B("Go"), IM_END, NL]
    a2 = [IM_START, *B("assistant"), NL, *B("Yes."), IM_END, NL]
    assert u1[:-2] == B(moved)
    assert ib == SYSTEM_IDS + [IM_START, *B("user"), NL]
    assert ia == u1 + a1 + u2 + a2
    if quirk:
        u1_lab = [NL, *ign("Look.  看。"), NL, *ign("ok"), IM_END, NL]
        u2_lab = [IM_START, *ign("user"), NL, *ign("Sure"), X, *ign("Go"), IM_END, NL]
        assert lb == SYSTEM_QUIRK + [IM_START, *ign("user"), NL]
    else:
        u1_lab, u2_lab = [X] * len(u1), [X] * len(u2)
        assert lb == [X] * len(ib)
    assert la == u1_lab + a1 + u2_lab + a2


def test_formats_and_leading_assistant_turn(tokenizer):
    a = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]
    b = [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A."}]
    lead = [{"from": "gpt", "value": "dropped"}, *a]  # the release drops a first non-human turn
    assert run(a, tokenizer, True) == run(b, tokenizer, True) == run(lead, tokenizer, True)


def _example(tmp_path, tokenizer, rec, cfg=None, rng=None, hw=(48, 64)):
    write_image(tmp_path / rec.get("image", "a.jpg"), hw=hw)
    r = check_record(parse_record(rec, source="x.jsonl", line=3), tmp_path).record
    imgs = [np.asarray(Image.open(tmp_path / f).convert("RGB")) for f in r.frames]
    cfg = cfg or PreprocessConfig(image_size=32, num_visual=7)
    return make_example(r, imgs, tokenizer, cfg, rng), imgs


def test_image_example_box_pixels_and_truncation(tmp_path, tokenizer):
    ex, imgs = _example(tmp_path, tokenizer, image_record())
    # bbox [4, 5, 20, 10] -> box [4, 5, 24, 15] at 64 x 48 -> model pixels at 32
    np.testing.assert_allclose(ex.prompt.points, [[2, 5 / 48 * 32], [12, 15 / 48 * 32]], rtol=1e-6)
    assert ex.prompt.labels.tolist() == [2, 3]
    ref = np.asarray(Image.fromarray(imgs[0]).resize((32, 32), Image.BICUBIC))
    np.testing.assert_array_equal(ex.pixels[0], ref)
    assert ex.pixels.shape == (1, 32, 32, 3) and ex.orig_hw == (48, 64) and ex.gt_masks is None
    assert (ex.id, ex.line, ex.kind) == ("x.jsonl:3", 3, "image")
    # no box: all stored points; model_max_length cuts the end of the text
    cfg = PreprocessConfig(image_size=32, num_visual=7, model_max_length=60)
    ex2, _ = _example(tmp_path, tokenizer, image_record(bbox=None), cfg)
    assert ex2.prompt.labels.tolist() == [1, 1, 0, 1, 0] and ex2.length == 60
    room = 60 - 7 - len(ex.ids_before)
    np.testing.assert_array_equal(ex2.ids_after, ex.ids_after[:room])
    # the cut: the text's tail only, labels cut alike, the visual block whole, and counted
    np.testing.assert_array_equal(ex2.labels_after, ex.labels_after[:room])
    np.testing.assert_array_equal(ex2.ids_before, ex.ids_before)
    np.testing.assert_array_equal(ex2.labels_before, ex.labels_before)
    assert ex2.num_visual == 7 and ex.truncated == 0
    assert ex2.truncated == len(ex.ids_after) - room > 0
    b = collate([ex2, ex], seq_bucket=64, batch_size=3)
    assert b.truncated.tolist() == [ex2.truncated, 0, 0]
    k = len(ex.ids_before)
    assert b.is_visual[0, k : k + 7].all() and b.is_visual[0].sum() == 7
    np.testing.assert_array_equal(b.labels[0, k + 7 : 60], ex2.labels_after)
    assert (b.labels[0, 60:] == -100).all() and b.lengths[0] == 60
    p = collate_packed([ex2, ex], [[0, 1]], pack_max=3, seq_bucket=[256], batch_size=2)
    assert p.truncated.tolist() == [[ex2.truncated, 0, 0], [0, 0, 0]]  # per slot


def test_augmentation_follows_release(tmp_path, tokenizer):
    cfg = PreprocessConfig(image_size=32, num_visual=7, augment=True)
    stored = np.array([[10, 10], [20, 12], [30, 20], [12, 30], [40, 40]]) / [64, 48] * 32
    kinds, counts = [], set()
    for seed in range(60):
        ex, _ = _example(tmp_path, tokenizer, image_record(), cfg, np.random.default_rng(seed))
        box = ex.prompt.labels.tolist() == [2, 3]
        kinds.append(box)
        if not box:  # 1..4 distinct stored points with their labels, in stored order
            counts.add(len(ex.prompt.labels))
            rows = [int(np.argmin(np.abs(stored - p).sum(1))) for p in ex.prompt.points]
            assert rows == sorted(set(rows))
            assert ex.prompt.labels.tolist() == [[1, 1, 0, 1, 0][i] for i in rows]
    assert 15 < sum(kinds) < 45 and counts == {1, 2, 3, 4}
    ex, _ = _example(tmp_path, tokenizer, image_record(), dataclasses.replace(cfg, augment=False))
    assert ex.prompt.labels.tolist() == [2, 3]  # augment off: the box


def test_video_example_frames_prompt_masks(tmp_path, tokenizer, image_root):
    rle_frame = {"size": [48, 64], "counts": [48 * 10, 48 * 20, 48 * 34]}  # columns 10..29
    poly = [[30, 10, 50, 10, 50, 30, 30, 30]]
    rec = parse_record(video_record(n=6, segmentation=[rle_frame, poly]), source="v.jsonl")
    r = check_record(rec, image_root).record
    imgs = [np.asarray(Image.open(image_root / f).convert("RGB")) for f in r.frames]
    cfg = PreprocessConfig(image_size=16, num_frames=4, num_visual_video=9)
    ex = make_example(r, imgs, tokenizer, cfg)
    assert ex.frame_index.tolist() == select_frames(6, 4).tolist() == [0, 1, 3, 5]
    assert ex.pixels.shape == (4, 16, 16, 3) and ex.kind == "video" and ex.num_visual == 9
    assert ex.prompt.labels.tolist() == [2, 3]  # the first masked frame's box, on frame 0
    assert ex.mask_valid.tolist() == [True, False, True, False]  # masked frames 0 and 3
    full = np.zeros((48, 64), np.uint8)
    full[:, 10:30] = 1
    ref = np.asarray(Image.fromarray(full).resize((16, 16), Image.NEAREST))
    np.testing.assert_array_equal(ex.gt_masks[0], ref)
    assert ex.gt_masks[2].sum() > 0 and ex.gt_masks[1].sum() == 0


def test_video_png_masks_per_masked_frame(tmp_path, tokenizer, image_root):
    m = np.zeros((48, 64), np.uint8)
    m[4:20, 8:40] = 255
    Image.fromarray(m).save(image_root / "vid" / "m3.png")
    rec = parse_record(video_record(n=6, mask=[None, "vid/m3.png"]), source="v.jsonl")
    r = check_record(rec, image_root).record
    assert r.annotations[0].mask is None and set(r.annotations[1].mask) == {"size", "counts"}
    imgs = [Image.open(image_root / f).convert("RGB") for f in r.frames]  # PIL images work too
    ex = make_example(r, imgs, tokenizer, PreprocessConfig(image_size=64, num_frames=6))
    assert ex.mask_valid.tolist() == [False, False, False, True, False, False]
    ref = np.asarray(Image.fromarray((m > 0).astype(np.uint8)).resize((64, 64), Image.NEAREST))
    np.testing.assert_array_equal(ex.gt_masks[3], ref)
    bad = parse_record(video_record(n=6, mask=[None, "vid/none.png"]), source="v.jsonl")
    with pytest.raises(RecordError, match="bad_mask"):
        check_record(bad, image_root)


def test_collate_aligns_labels_with_the_sequence(tmp_path, tokenizer):
    ex, _ = _example(tmp_path, tokenizer, image_record())
    ex2, _ = _example(tmp_path, tokenizer, image_record(bbox=None))
    b = collate([ex, ex2], seq_bucket=64, batch_size=3, source_index=[0, 1], record_index=[5, 6])
    L = b.text_ids.shape[1]
    assert L % 64 == 0 and L >= ex.length
    assert b.example_valid.tolist() == [True, True, False]
    k, nv = len(ex.ids_before), 7
    assert b.is_visual[0, k : k + nv].all() and b.is_visual[0].sum() == nv
    np.testing.assert_array_equal(
        b.text_ids[0, : ex.length], [*ex.ids_before, *[0] * nv, *ex.ids_after]
    )
    np.testing.assert_array_equal(b.labels[0, :k], ex.labels_before)
    assert (b.labels[0, k : k + nv] == -100).all() and (b.labels[0, ex.length :] == -100).all()
    np.testing.assert_array_equal(b.labels[0, k + nv : ex.length], ex.labels_after)
    assert (b.labels[2] == -100).all() and not b.mask[2].any() and b.lengths.tolist()[2] == 0
    assert b.segment_ids[0].sum() == ex.length and b.positions[0, ex.length - 1] == ex.length - 1
    assert b.prompt_coords.shape == (3, 8, 2) and b.prompt_valid.sum(1).tolist() == [2, 5, 0]
    assert b.record_index.tolist() == [5, 6, -1] and b.num_visual.tolist() == [7, 7, 0]
    assert b.pixels.shape == (3, 1, 32, 32, 3) and not b.has_mask.any()
    with pytest.raises(ValueError, match="exceeds every length bucket"):
        collate([ex], seq_bucket=[16, 32])


def test_box_edge_clipped_within_one_pixel_else_bad(tmp_path, tokenizer):
    # 64 x 48 image: x + w = 65 rounds to 65, 1 pixel out -> clipped to 64; 66 is a bad record
    ex, _ = _example(tmp_path, tokenizer, image_record(bbox=[40.7, 30, 24.9, 18.9]))
    np.testing.assert_allclose(ex.prompt.points, [[20, 20], [32, 32]], rtol=1e-6)
    with pytest.raises(RecordError, match="bad_prompt"):
        _example(tmp_path, tokenizer, image_record(bbox=[40, 30, 26, 10]))
    with pytest.raises(RecordError, match="bad_prompt"):
        _example(tmp_path, tokenizer, image_record(bbox=[50, 40, 30, 20]))
