"""Fixtures for the data tests: a Qwen-style byte-level tokenizer and small real-format records
(JPEG / PNG pictures written with PIL, JSONL lines, COCO RLE, polygons, PNG masks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2.5): punctuation keeps trailing newlines,
# so ".\n" is one pre-token (and one token with the merge below), as in the real tokenizer.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what byte-level BPE vocabularies hold)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_id(b: int) -> int:
    """The test tokenizer's id of one byte: the byte alphabet in REVERSED order (so the newline
    is 57, not Qwen's hard-coded 198: the masking must read the tokenizer's ids)."""
    return 255 - byte_alphabet().index(bytes_to_unicode()[b])


MERGED_DOT_NL = 256  # the one merge, ".\n"


def make_tokenizer():
    """Byte-level BPE: ids 0..255 the bytes (`byte_id`), 256 the merge ".\\n", then the
    specials <|endoftext|> 257, <|im_start|> 258, <|im_end|> 259."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from pam_jax.llm.tokenizer import Tokenizer as PamTokenizer

    alphabet = byte_alphabet()
    vocab = {c: 255 - i for i, c in enumerate(alphabet)}
    vocab[".Ċ"] = MERGED_DOT_NL
    tok = Tokenizer(models.BPE(vocab, [(".", "Ċ")]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PamTokenizer(tok, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def write_image(path: Path, hw=(48, 64), seed=0, fmt=None) -> Path:
    from PIL import Image

    rs = np.random.RandomState(seed)
    img = rs.randint(0, 255, (*hw, 3), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, fmt)
    return path


def conv(answer="A cat.", task="Classify this subject and provide its label."):
    return [{"from": "human", "value": f"<image>\n{task}"}, {"from": "gpt", "value": answer}]


def image_record(name="a.jpg", **kw):
    r = {
        "type": "image",
        "image": name,
        "conversations": conv(),
        "bbox": [4, 5, 20, 10],
        "points": [[10, 10], [20, 12], [30, 20], [12, 30], [40, 40]],
        "labels": [1, 1, 0, 1, 0],
    }
    r.update(kw)
    return r


def video_record(root="vid", n=6, **kw):
    frames = [f"{i:05d}.jpg" for i in range(n)]
    r = {
        "type": "video",
        "image_root": root,
        "frames": frames,
        "masked_frames": [frames[0], frames[n // 2]],
        "conversations": [
            {"from": "human", "value": "<image>\nProvide a caption.\nPrevious caption: None"},
            {"from": "gpt", "value": "It moves."},
        ],
        "bbox": [[4, 5, 20, 10], [6, 5, 20, 10]],
        "points": [[[10, 10], [20, 12], [5, 5]], [[11, 10], [20, 12], [5, 6]]],
        "labels": [[1, 1, 0], [1, 1, 0]],
        "obj_id": "2",
    }
    r.update(kw)
    return r


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    for i in range(12):
        write_image(root / f"img{i}.jpg", seed=i)
    write_image(root / "p.png", hw=(50, 45), seed=99)
    for i in range(6):
        write_image(root / "vid" / f"{i:05d}.jpg", seed=100 + i)
    return root
