"""The demo's synthetic region dataset, in the release's JSONL format (numpy + PIL, no downloads).

Each image is a textured background (noise, stripes, checks or a gradient over a muted colour)
with 1 or 2 shapes (`SHAPES`; `max_shapes`) of the saturated `COLOURS` in distinct cells of a
3 x 3 grid, in two sizes. Every shape is one region and gives records like the release's
(`pam.md` section 4):

    {"id": ..., "type": "image", "image": "images/train_00012.png",
     "conversations": [{"from": "human", "value": "<image>\\n<task prompt>"},
                       {"from": "gpt", "value": "<answer>"}],
     "bbox": [x, y, w, h], "points": [[x, y], ...], "labels": [1, ...],
     "segmentation": {"size": [h, w], "counts": "<COCO compressed RLE>"}}

Answers are fixed templates of the region's attributes, so an exact answer exists:

    recognize       "circle"                                       (the category)
    brief caption   "A red circle at the top left."                (colour, category, position)
    detailed        "A large red circle in the top left of the image, on a striped
                     background, with one other shape."            (+ size, texture, count)

and the same in Chinese (the release's Chinese task prompts). Everything is a pure function of
the seed: the same `generate(..., seed)` writes byte-identical files. `segmentation` is the
visible part of the shape (later shapes occlude earlier ones); `bbox` and `points` are derived
from it (points: positive clicks inside the eroded mask).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from pam_jax.pam import prompts as _prompts

# coarse silhouettes: the perceiver reads SAM 2's stride-16 map (8 x 8 cells at 128^2), where a
# shape is 2-4 cells across; polygons that differ only in their corners (hexagon / circle,
# diamond / square) are not separable there, these are (a hole, arms, an elongation, a point)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "bar")
SHAPES_ZH = {
    "circle": "圆形", "square": "正方形", "triangle": "三角形",
    "cross": "十字形", "ring": "圆环", "bar": "长条",
}  # fmt: skip
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 210, 30),
    "purple": (135, 50, 185),
    "orange": (245, 135, 20),
}
COLOURS_ZH = {
    "red": "红色", "green": "绿色", "blue": "蓝色",
    "yellow": "黄色", "purple": "紫色", "orange": "橙色",
}  # fmt: skip
# 3 x 3 grid cells, row-major (brief caption: "at the <pos>", detailed: "in the <pos>")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
POSITIONS_ZH = ("左上方", "上方", "右上方", "左侧", "中间", "右侧", "左下方", "下方", "右下方")
SIZES = ("small", "large")
# circumradius as a fraction of a grid cell (3 x 3 grid: 42.7 px at 128^2), and the jitters
SIZE_RADIUS = {"small": 0.30, "large": 0.45}
ROTATION = 0.15  # radians, +-
SIZES_ZH = {"small": "小", "large": "大"}
TEXTURES = ("noisy", "striped", "checkered", "shaded")
TEXTURES_ZH = {"noisy": "有噪点", "striped": "条纹", "checkered": "格子", "shaded": "渐变"}
COUNT_WORDS = ("no", "one", "two")
COUNT_ZH = ("没有其他形状", "还有一个其他形状", "还有两个其他形状")

# the release's task prompts (`pam_jax.pam.prompts`), by (evaluation task name, language)
_PROMPT_TASK = {"recognize": "recognize", "caption": "brief_caption",
                "detailed-caption": "detailed_caption"}  # fmt: skip
PROMPTS: dict[tuple[str, str], str] = {
    (t, lang): _prompts.TASKS[pt][lang] for t, pt in _PROMPT_TASK.items() for lang in ("en", "zh")
}
TASKS: tuple[str, ...] = ("recognize", "caption", "detailed-caption")
SYSTEM_PROMPT = _prompts.SYSTEM


@dataclasses.dataclass(frozen=True)
class Region:
    """One drawn shape: its attributes and its visible mask (bool [H, W])."""

    shape: str
    colour: str
    size: str
    position: int  # index into POSITIONS
    texture: str
    n_others: int
    mask: np.ndarray


def answer(region: Region, task: str, lang: str) -> str:
    """The reference answer of `task` (recognize | caption | detailed-caption) for a region."""
    r = region
    if lang == "en":
        pos = POSITIONS[r.position]
        if task == "recognize":
            return r.shape
        if task == "caption":
            return f"A {r.colour} {r.shape} at the {pos}."
        if task == "detailed-caption":
            other = "shape" if r.n_others == 1 else "shapes"
            return (
                f"A {r.size} {r.colour} {r.shape} in the {pos} of the image, on a {r.texture} "
                f"background, with {COUNT_WORDS[r.n_others]} other {other}."
            )
    elif lang == "zh":
        shape, colour = SHAPES_ZH[r.shape], COLOURS_ZH[r.colour]
        pos = POSITIONS_ZH[r.position]
        if task == "recognize":
            return shape
        if task == "caption":
            return f"图像{pos}的一个{colour}{shape}。"
        if task == "detailed-caption":
            return (
                f"图像{pos}的一个{SIZES_ZH[r.size]}的{colour}{shape}，背景是{TEXTURES_ZH[r.texture]}"
                f"的，{COUNT_ZH[r.n_others]}。"
            )
    raise ValueError(f"unknown task / language {task!r} / {lang!r}")


# ---- drawing --------------------------------------------------------------------------------


def _outline(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    """Vertices of a shape of circumradius ~r centred at (cx, cy), rotated by `rot` radians (a
    ring's outer circle; `_shape_mask` cuts its hole)."""
    if shape in ("circle", "ring"):
        ang = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = np.stack([r * np.cos(ang), r * np.sin(ang)], 1)
    elif shape == "square":  # axis-aligned at rot 0, side r * sqrt(2)
        a = r / np.sqrt(2)
        pts = np.array([(-a, -a), (a, -a), (a, a), (-a, a)])
    elif shape == "triangle":  # pointing up
        ang = -np.pi / 2 + 2 * np.pi * np.arange(3) / 3
        pts = 1.1 * r * np.stack([np.cos(ang), np.sin(ang)], 1)
    elif shape == "cross":  # a plus: arms of half-width 0.36 r
        w = 0.36 * r
        pts = np.array([(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w),
                        (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)])  # fmt: skip
    elif shape == "bar":  # horizontal, 2.3 r x 0.8 r
        pts = np.array([(-1.15 * r, -0.4 * r), (1.15 * r, -0.4 * r),
                        (1.15 * r, 0.4 * r), (-1.15 * r, 0.4 * r)])  # fmt: skip
    else:
        raise ValueError(f"unknown shape {shape!r}")
    c, s = np.cos(rot), np.sin(rot)
    return [(float(cx + c * x - s * y), float(cy + s * x + c * y)) for x, y in pts]


def _shape_mask(shape: str, cx: float, cy: float, r: float, rot: float, h: int, w: int):
    """bool [h, w]: the filled shape (a ring: the disc minus a concentric one of radius r / 2)."""
    from PIL import Image, ImageDraw

    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    d.polygon(_outline(shape, cx, cy, r, rot), fill=255)
    if shape == "ring":
        d.polygon(_outline("circle", cx, cy, 0.5 * r, 0.0), fill=0)
    return np.asarray(m) > 127


def _background(rng: np.random.Generator, h: int, w: int, texture: str) -> np.ndarray:
    """A muted (low-saturation) textured background, float [H, W, 3] in 0..255."""
    grey = rng.uniform(95, 175)
    base = grey + rng.uniform(-12, 12, 3)  # a tint, far from the saturated shape colours
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    if texture == "noisy":
        tex = rng.normal(0, 14, (h, w))
    elif texture == "striped":
        period, ang = rng.uniform(6, 12), rng.uniform(0, np.pi)
        tex = 18 * np.sign(np.sin(2 * np.pi * (x * np.cos(ang) + y * np.sin(ang)) / period))
    elif texture == "checkered":
        c = int(rng.integers(6, 12))
        tex = 16 * (((y // c) + (x // c)) % 2 * 2 - 1)
    elif texture == "shaded":
        ang = rng.uniform(0, 2 * np.pi)
        t = (x * np.cos(ang) + y * np.sin(ang)) / max(h, w)
        tex = 45 * (t - t.mean())
    else:
        raise ValueError(f"unknown texture {texture!r}")
    img = base[None, None] + tex[..., None] + rng.normal(0, 3, (h, w, 3))
    return img


def draw_image(
    rng: np.random.Generator, h: int = 128, w: int = 128, max_shapes: int = 2
) -> tuple[np.ndarray, list[Region]]:
    """One synthetic image (uint8 [H, W, 3]) and its regions, in drawing order."""
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    img = _background(rng, h, w, texture)
    n = int(rng.integers(1, max_shapes + 1))
    cells = rng.choice(9, size=n, replace=False)
    ch, cw = h / 3, w / 3
    masks, attrs = [], []
    for cell in cells:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        size = SIZES[int(rng.integers(2))]
        r = min(ch, cw) * SIZE_RADIUS[size] * rng.uniform(0.93, 1.07)
        jit = min(ch, cw) * 0.06
        cy = (cell // 3 + 0.5) * ch + rng.uniform(-jit, jit)
        cx = (cell % 3 + 0.5) * cw + rng.uniform(-jit, jit)
        mask = _shape_mask(shape, cx, cy, r, rng.uniform(-ROTATION, ROTATION), h, w)
        shade = rng.uniform(0.9, 1.05)
        rgb = np.clip(np.asarray(COLOURS[colour], np.float64) * shade, 0, 255)
        img[mask] = rgb + rng.normal(0, 4, (int(mask.sum()), 3))
        for prev in masks:  # later shapes occlude earlier ones
            prev &= ~mask
        masks.append(mask)
        attrs.append((shape, colour, size, int(cell)))
    image = np.clip(img, 0, 255).astype(np.uint8)
    regions = [
        Region(s, c, z, p, texture, n - 1, m) for (s, c, z, p), m in zip(attrs, masks) if m.any()
    ]
    return image, regions


# ---- annotations -----------------------------------------------------------------------------


def rle_encode(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a bool [H, W] mask (what `pycocotools.mask.encode` returns, with
    `counts` as str): run lengths over the column-major pixels, starting with zeros, each
    written as LEB128-like 5-bit chunks + 48, differences to the run two back after the third."""
    h, w = mask.shape
    flat = np.asarray(mask, bool).flatten(order="F")
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    out = []
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return {"size": [int(h), int(w)], "counts": "".join(out)}


def rle_decode(rle: dict) -> np.ndarray:
    """Inverse of `rle_encode`: bool [H, W]."""
    h, w = rle["size"]
    s, runs, i = rle["counts"], [], 0
    while i < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[i]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    flat = np.zeros(h * w, bool)
    pos = 0
    for j, r in enumerate(runs):
        if j % 2:
            flat[pos : pos + r] = True
        pos += r
    return flat.reshape((w, h)).T


def region_prompts(mask: np.ndarray, rng: np.random.Generator, n_points: int = 3) -> dict:
    """bbox [x, y, w, h] of the mask and `n_points` positive clicks inside it (away from the
    edge where the mask is thick enough), as the release stores them."""
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    inner = mask.copy()
    for _ in range(2):  # erode twice (4-neighbourhood) while something is left
        e = inner.copy()
        e[1:] &= inner[:-1]
        e[:-1] &= inner[1:]
        e[:, 1:] &= inner[:, :-1]
        e[:, :-1] &= inner[:, 1:]
        if not e.any():
            break
        inner = e
    iy, ix = np.nonzero(inner)
    pick = rng.choice(len(iy), size=min(n_points, len(iy)), replace=False)
    pts = [[float(ix[k]) + 0.5, float(iy[k]) + 0.5] for k in sorted(pick)]
    return {
        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
        "points": pts,
        "labels": [1] * len(pts),
    }


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """What `generate` wrote for one split."""

    jsonl: Path
    image_root: Path
    n_images: int
    n_records: int


def records_for_image(
    split: str,
    index: int,
    image_path: str,
    regions: Sequence[Region],
    rng: np.random.Generator,
    tasks: Sequence[tuple[str, str]],
    multi_turn: bool = False,
) -> Iterator[dict]:
    """The records of one image: one per (region, task, language) in `tasks`; or, with
    `multi_turn`, one per (region, language) holding every task of that language as a turn,
    in a random order (one SAM 2 pass then supervises all the region's answers; each task
    still comes first, as at inference, in a third of the records)."""
    for k, r in enumerate(regions):
        base = {"type": "image", "image": image_path, **region_prompts(r.mask, rng)}
        base["segmentation"] = rle_encode(r.mask)
        if multi_turn:
            groups = {}
            for task, lang in tasks:
                groups.setdefault(lang, []).append(task)
            chosen = [
                (lang, [ts[j] for j in rng.permutation(len(ts))]) for lang, ts in groups.items()
            ]
        else:
            chosen = [(lang, [task]) for task, lang in tasks]
        for lang, ts in chosen:
            conv = []
            for j, task in enumerate(ts):
                prompt = PROMPTS[(task, lang)]
                conv += [
                    {"from": "human", "value": ("<image>\n" if j == 0 else "") + prompt},
                    {"from": "gpt", "value": answer(r, task, lang)},
                ]
            name = ts[0] if not multi_turn else "all"
            rid = f"{region_id(split, index, k)}:{name}:{lang}"
            yield {"id": rid, **base, "conversations": conv}


def region_id(split: str, index: int, k: int) -> str:
    """The id prefix of region k of image `index`; a record's id is `<region>:<task>:<lang>`."""
    return f"{split}-{index:05d}-{k}"


ALL_TASKS = tuple((t, lang) for lang in ("en", "zh") for t in TASKS)
# held-out: English recognize / brief caption (exact match) and detailed caption (CIDEr)
EVAL_TASKS = tuple((t, "en") for t in TASKS)


def generate(
    out_dir: str | Path,
    split: str,
    n_images: int,
    seed: int,
    *,
    image_hw: tuple[int, int] = (128, 128),
    tasks: Sequence[tuple[str, str]] = ALL_TASKS,
    multi_turn: bool = False,
) -> SplitInfo:
    """Write `n_images` images (PNG) under out_dir/images and out_dir/{split}.jsonl.

    Image i is drawn from `np.random.default_rng([seed, i])`, so splits from different seeds
    share no image. Records: see `records_for_image`.
    """
    from PIL import Image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    n_rec = 0
    jsonl = out / f"{split}.jsonl"
    tmp = jsonl.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i in range(n_images):
            rng = np.random.default_rng([seed, i])
            image, regions = draw_image(rng, *image_hw)
            rel = f"images/{split}_{i:05d}.png"
            Image.fromarray(image).save(out / rel, optimize=False, compress_level=1)
            for rec in records_for_image(split, i, rel, regions, rng, tasks, multi_turn):
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n_rec += 1
    tmp.replace(jsonl)
    return SplitInfo(jsonl, out, n_images, n_rec)


# ---- tokenizer -------------------------------------------------------------------------------

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# a word with its leading space (" red"), one CJK character or punctuation mark, "\n", a space
_SPLIT = r" ?[A-Za-z0-9']+|[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]|\n| |[^\sA-Za-z0-9']"


def corpus() -> list[str]:
    """Every text the demo's conversations and chat template can hold (the vocabulary source)."""
    texts = [SYSTEM_PROMPT, "system", "user", "assistant", "\n", *PROMPTS.values()]
    for shape in SHAPES:
        for colour in COLOURS:
            for size in SIZES:
                for pos in range(len(POSITIONS)):
                    for tex in TEXTURES:
                        for n in range(len(COUNT_WORDS)):
                            r = Region(shape, colour, size, pos, tex, n, np.zeros((1, 1), bool))
                            texts += [answer(r, t, lang) for t, lang in ALL_TASKS]
    return texts


def build_tokenizer(texts: Sequence[str] | None = None):
    """A word-level tokenizer for the demo's vocabulary (the `tokenizers` library): words with
    their leading space, single CJK characters, punctuation, newline and space, plus the ChatML
    specials; `<|endoftext|>` pads, `<|im_end|>` ends a turn. Decoding concatenates tokens
    (`decoders.Fuse`), so decode(encode(text)) == text for any text of the vocabulary.
    Returns a `pam_jax.llm.tokenizer.Tokenizer`; ids are deterministic (sorted vocabulary)."""
    import re

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from pam_jax.llm.tokenizer import Tokenizer as PamTokenizer

    pattern = re.compile(_SPLIT)
    words = sorted({w for t in (corpus() if texts is None else texts) for w in pattern.findall(t)})
    vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS, "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    config = {
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "model_max_length": 512,
    }
    stops = [vocab["<|im_end|>"], vocab["<|endoftext|>"]]
    return PamTokenizer(tok, config, {"eos_token_id": stops})
