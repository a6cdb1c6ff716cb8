"""The eval tests' tiny random PAM and data, built once per test session (conftest.py) and by
the subprocess checks (dp_check.py): the demo's micro config (`pam_jax.demo.micro_config`:
Hiera of width 16 at 128^2, a 64-wide perceiver, a 2-layer Qwen2 of width 128) over the byte
tokenizer of tests/pam, so every compile takes seconds, not the minutes SAM 2.1-tiny at 512^2
took. Weights: `pam_jax.demo.init_params` (a real initialisation: SAM 2 masks are non-empty)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

NEW = 3  # new tokens per region
REC = "Classify this subject and provide its label."
HW = (96, 128)  # the test images' size
REGIONS = [
    {"bbox": [10, 8, 50, 70]},
    {"points": [[30, 40], [100, 60]], "labels": [1, 0]},
    {"bbox": [4, 4, 120, 88], "points": [[64, 48]], "labels": [1]},
]
# (image, region) of records r0..r4: a.png holds r0, r2, r4; b.png r1, r3
SAM2_STD, PARTS_STD, LLM_STD = 0.1, 0.3, 0.3
LAYOUT = [("a.png", 0), ("b.png", 1), ("a.png", 2), ("b.png", 0), ("a.png", 1)]


def tokenizer():
    from pam_jax.llm.tokenizer import Tokenizer
    from tests.pam.test_prompts import byte_tokenizer

    return Tokenizer(byte_tokenizer(), {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})


def model():
    """The tiny PAM (deterministic: the same weights in every process)."""
    from flax import nnx

    from pam_jax.checkpoint import random_normal_params
    from pam_jax.demo import micro_config
    from pam_jax.llm.qwen2 import Qwen2ForCausalLM
    from pam_jax.pam.model import PAM, PAMParts
    from pam_jax.sam2.model import SAM2Base

    cfg = micro_config(128, 272)
    # wide enough weights that masks are non-empty and texts differ between regions
    sam2 = random_normal_params(lambda: SAM2Base(cfg.sam2, rngs=nnx.Rngs(0)), std=SAM2_STD)
    parts = random_normal_params(lambda: PAMParts(cfg, rngs=nnx.Rngs(0)), seed=1, std=PARTS_STD)
    make_llm = lambda: Qwen2ForCausalLM(cfg.llm, rngs=nnx.Rngs(0))  # noqa: E731
    llm = random_normal_params(make_llm, seed=2, std=LLM_STD)
    return PAM(cfg, sam2=sam2, parts=parts, llm=llm)


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (*HW, 3), dtype=np.uint8)


def write_data(d: Path) -> Path:
    """a.png, b.png; data.jsonl (5 recognition records, 3 prompt kinds, with segmentation);
    coco.json (3 annotations on a / b and one on a missing image)."""
    from PIL import Image

    from pam_jax.evaluation import formats

    img = image()
    Image.fromarray(img).save(d / "a.png")
    Image.fromarray(np.ascontiguousarray(img[::-1])).save(d / "b.png")
    m = np.zeros(HW, bool)
    m[8:78, 10:60] = True
    rle = formats.encode_mask(m)
    rows = []
    for k, (name, reg) in enumerate(LAYOUT):
        conv = [{"from": "human", "value": "<image>\n" + REC}, {"from": "gpt", "value": "cat"}]
        rows.append({"id": f"r{k}", "image": name, "conversations": conv, "segmentation": rle,
                     **REGIONS[reg]})  # fmt: skip
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    h, w = HW
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "height": h, "width": w},
                   {"id": 2, "file_name": "b.png", "height": h, "width": w},
                   {"id": 3, "file_name": "gone.png", "height": h, "width": w}],
        "annotations": [{"id": 10 + k, "image_id": 1 + k % 2, "bbox": [10, 8, 40, 62 - k],
                         "segmentation": rle} for k in range(3)]
                       + [{"id": 13, "image_id": 3, "bbox": [1, 1, 9, 9], "segmentation": rle}],
    }  # fmt: skip
    (d / "coco.json").write_text(json.dumps(coco))
    return d


def save_model_dir(m, tok, d: Path) -> Path:
    """`m` as a model directory with `tok` (what `pam-jax eval --model` reads)."""
    from pam_jax.pam.model import save_pam

    tok_dir = d / "tok"
    tok_dir.mkdir(parents=True)
    tok.tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    )
    save_pam(m, d / "m", tokenizer_dir=tok_dir)
    return d / "m"
