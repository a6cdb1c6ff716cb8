"""One record -> the model's inputs (`make_example`), shared by the trainer and the evaluators.

What the release does (`llava/train/train.py`, `pam.md` §1.8, §1.12, §8.1), and what pam-jax does:

- Pictures: PIL, no EXIF orientation (the release's boxes refer to the stored pixels), RGB,
  `resize((S, S))` bicubic, aspect ratio NOT kept (SAM 2's loader). Normalisation (ImageNet
  mean / std) is left to the device.
- Prompt: `bbox` x, y, w, h -> `[int(x), int(y), int(x + w), int(y + h)]`; with augmentation a
  box or points at 50 / 50 when both exist, 1 to 4 of the stored points (images) or 1 to 3
  (videos, first masked frame); without it the box when there is one, else all stored points.
  A video's prompt (its first masked frame's) goes on frame 0, as the release does.
- Video frames: `num_frames` of them, `[0] + linspace(1, n - 1, num_frames - 1)` as integers
  (`pam_jax.pam.assembly.select_frames`: with num_frames = 16 these are the frames the release
  feeds its LLM; SAM 2 tracks through the same frames).
- Text (`preprocess_qwen`): system "You are a helpful assistant." then every turn as
  `<|im_start|>{role}\\n{text}<|im_end|>\\n`, each tokenized on its own; a first turn that is
  not the user's is dropped; an `<image>` not at the start of its turn is moved there
  (`preprocess_multimodal`). System and user turns are ignored (-100), assistant turns
  supervised whole. `unmask_template_tokens` (default True, the release's LLaVA-OneVision quirk)
  then un-masks EVERY standalone newline, `<|im_start|>` and `<|im_end|>` token, by the
  tokenizer's own ids (the release hard-codes 198). The visual block sits where `<image>` was;
  its positions are ignored. Sequences longer than `model_max_length` are cut at the end
  (the text after the visual block loses its tail, ids and labels alike; `Example.truncated`
  says how many tokens went; the visual block is never cut).
  Not copied: the release's silent retry / substitution of failing records (reported instead).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from pam_jax.data.records import Annotation, Record, RecordError
from pam_jax.pam.assembly import select_frames
from pam_jax.pam.prompts import IMAGE_PLACEHOLDER, SYSTEM
from pam_jax.sam2.prompts import Prompt, PromptError, make_prompt, to_model

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """image_size S; num_frames F of a video sample; num_visual / num_visual_video the visual
    block lengths of an image / a video sample (1042 / 5168 for PAM at 1024); max points kept
    by augmentation."""

    image_size: int = 1024
    augment: bool = False
    unmask_template_tokens: bool = True
    model_max_length: int = 12288
    num_visual: int = 1042
    num_visual_video: int = 5168
    num_frames: int = 16
    system: str = SYSTEM
    max_image_points: int = 4
    max_video_points: int = 3

    def visual_length(self, kind: str) -> int:
        """The visual block length of a sample of `kind` ("image" | "video")."""
        return self.num_visual_video if kind == "video" else self.num_visual


@dataclasses.dataclass(frozen=True)
class Example:
    """One sample, unpadded numpy.

    pixels uint8 [F, S, S, 3] (F = 1 for images); prompt on frame 0 in model pixels;
    ids_before + visual + ids_after is the LLM sequence, labels_* aligned (-100 ignored);
    gt_masks uint8 [F, S, S] (0 / 1) or None, mask_valid [F] which frames have one;
    frame_index [F] the chosen frames of the record; orig_hw the stored pictures' (H, W);
    truncated: text tokens cut at the end to fit `model_max_length` (0: none)."""

    id: str
    source: str
    line: int
    kind: str
    pixels: np.ndarray
    prompt: Prompt
    ids_before: np.ndarray
    ids_after: np.ndarray
    labels_before: np.ndarray
    labels_after: np.ndarray
    gt_masks: np.ndarray | None
    mask_valid: np.ndarray
    frame_index: np.ndarray
    orig_hw: tuple[int, int]
    num_visual: int
    truncated: int = 0

    @property
    def length(self) -> int:
        return len(self.ids_before) + self.num_visual + len(self.ids_after)


# -- text ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TemplateIds:
    im_start: int
    im_end: int
    newline: int


def template_ids(tokenizer: Any) -> TemplateIds:
    """The tokenizer's ids of `<|im_start|>`, `<|im_end|>` and the standalone newline."""
    ids = [tokenizer.token_id(t) for t in ("<|im_start|>", "<|im_end|>")]
    nl = tokenizer.encode("\n")
    if None in ids:
        raise ValueError("the tokenizer has no <|im_start|> / <|im_end|> special tokens")
    if len(nl) != 1:
        raise ValueError(f"the tokenizer encodes a newline as {len(nl)} tokens, expected 1")
    return TemplateIds(int(ids[0]), int(ids[1]), int(nl[0]))


def release_text(text: str) -> str:
    """`preprocess_multimodal`: a single `<image>` not at the start moves there, + newline."""
    if text.count(IMAGE_PLACEHOLDER) == 1 and not text.startswith(IMAGE_PLACEHOLDER):
        text = IMAGE_PLACEHOLDER + "\n" + text.replace(IMAGE_PLACEHOLDER, "").strip()
        text = text.strip()
    return text


def tokenize_conversation(
    turns: Sequence[Any],
    tokenizer: Any,
    *,
    system: str = SYSTEM,
    unmask_template_tokens: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ids_before, ids_after, labels_before, labels_after) of a conversation, `<image>` removed
    (the visual block goes between), as the release's `preprocess_qwen(has_image=True)`."""
    pieces: list[tuple[list[int], bool]] = []  # (ids, supervised), one <image> split between

    def add(text: str, supervised: bool) -> None:
        pieces.append((tokenizer.encode(text), supervised))

    add(f"<|im_start|>system\n{system}<|im_end|>\n", False)
    split_at = None
    for t in turns:
        text = f"<|im_start|>{t.role}\n{release_text(t.text)}<|im_end|>\n"
        sup = t.role == "assistant"
        if IMAGE_PLACEHOLDER in text:
            a, b = text.split(IMAGE_PLACEHOLDER)
            add(a, sup)
            split_at = len(pieces)
            add(b, sup)
        else:
            add(text, sup)
    if split_at is None:
        raise RecordError("no_image_token", "no turn holds <image>")
    tid = template_ids(tokenizer)
    keep = np.array([tid.im_start, tid.im_end, tid.newline], np.int64)

    def join(ps):
        ids = np.array([i for p, _ in ps for i in p], np.int32)
        lab = np.array([i if s else IGNORE for p, s in ps for i in p], np.int32)
        if unmask_template_tokens:
            lab = np.where(np.isin(ids, keep), ids, lab).astype(np.int32)
        return ids, lab

    ib, lb = join(pieces[:split_at])
    ia, la = join(pieces[split_at:])
    return ib, ia, lb, la


# -- pictures and masks --------------------------------------------------------------------------


def open_image(data: bytes):
    """Encoded bytes -> an RGB PIL image, EXIF orientation ignored (as the release)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes -> RGB uint8 [H, W, 3], EXIF orientation ignored (as the release)."""
    return np.asarray(open_image(data))


def picture_hw(img: Any) -> tuple[int, int]:
    """(H, W) of a uint8 [H, W, 3] array or a PIL image."""
    if hasattr(img, "height"):
        return int(img.height), int(img.width)
    return int(img.shape[0]), int(img.shape[1])


def resize_image(img: Any, size: int) -> np.ndarray:
    """PIL bicubic resize to size x size (SAM 2's loader) -> uint8 [S, S, 3]; unchanged when
    already that size. Takes an array or a PIL RGB image (no array round trip)."""
    from PIL import Image

    if picture_hw(img) == (size, size):
        return np.asarray(img)
    im = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
    return np.asarray(im.resize((size, size), Image.BICUBIC))


def decode_mask(mask: Any, hw: tuple[int, int]) -> np.ndarray:
    """A COCO RLE dict or polygon list at image size hw -> uint8 [H, W] 0 / 1."""
    from pycocotools import mask as mask_utils

    h, w = hw
    if isinstance(mask, dict):
        rle = dict(mask)
        if [int(v) for v in rle.get("size", ())] != [h, w]:
            raise RecordError("bad_mask", f"RLE size {rle.get('size')} is not the image's {[h, w]}")
        if isinstance(rle["counts"], list):
            if sum(rle["counts"]) != h * w:
                raise RecordError(
                    "bad_mask", f"RLE counts sum to {sum(rle['counts'])}, not {h * w}"
                )
            rle = mask_utils.frPyObjects(rle, h, w)
        elif isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
        return mask_utils.decode(rle).astype(np.uint8)
    if isinstance(mask, list) and mask and all(isinstance(p, list) for p in mask):
        polys = [[float(v) for v in p] for p in mask]
        if any(len(p) < 6 or len(p) % 2 for p in polys):
            raise RecordError("bad_mask", "a polygon needs >= 3 (x, y) pairs")
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
        return mask_utils.decode(rle).astype(np.uint8)
    raise RecordError("bad_mask", f"unsupported mask form {type(mask).__name__}")


def resize_mask(m: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if m.shape == (size, size):
        return m.astype(np.uint8)
    return np.asarray(Image.fromarray(m.astype(np.uint8)).resize((size, size), Image.NEAREST))


# -- prompts -------------------------------------------------------------------------------------


def choose_prompt(
    ann: Annotation,
    image_hw: tuple[int, int],
    *,
    max_points: int,
    rng: np.random.Generator | None,
) -> Prompt:
    """The release's prompt choice (module doc) as a checked Prompt in stored pixels."""
    has_box, has_pts = ann.box is not None, ann.points is not None
    if rng is None:
        use_box = has_box
    else:
        use_box = has_box and (not has_pts or rng.random() < 0.5)
    try:
        if use_box:
            return make_prompt(box=ann.box, image_hw=image_hw)
        pts, lab = ann.points, ann.labels
        if rng is not None:
            k = int(rng.integers(1, min(max_points, len(pts)) + 1))
            idx = np.sort(rng.choice(len(pts), size=k, replace=False))
            pts, lab = pts[idx], lab[idx]
        return make_prompt(pts, lab, image_hw=image_hw)
    except PromptError as e:
        raise RecordError("bad_prompt", str(e)) from None


# -- the entry point -----------------------------------------------------------------------------


def make_example(
    record: Record,
    images: Sequence[np.ndarray],
    tokenizer: Any,
    cfg: PreprocessConfig,
    rng: np.random.Generator | None = None,
) -> Example:
    """One record and its decoded pictures (uint8 [H, W, 3] arrays or RGB PIL images, one per
    `record.frames`; only the chosen frames are read, so a lazy sequence works) -> Example.
    `rng=None` (or cfg.augment False) is deterministic. Raises RecordError for a bad record."""
    if len(images) != len(record.frames):
        raise ValueError(f"{len(record.frames)} frames in the record, {len(images)} images given")
    if not cfg.augment:
        rng = None
    s = cfg.image_size
    n = len(record.frames)
    index = select_frames(n, cfg.num_frames) if record.is_video else np.zeros(1, np.int64)
    frames = [images[int(i)] for i in index]
    hw = record.orig_hw or picture_hw(frames[0])
    pixels = np.stack([resize_image(f, s) for f in frames]).astype(np.uint8)
    ann0 = record.annotations[0]
    max_pts = cfg.max_video_points if record.is_video else cfg.max_image_points
    prompt = to_model(choose_prompt(ann0, hw, max_points=max_pts, rng=rng), hw, s)

    by_frame = {a.frame: a.mask for a in record.annotations if a.mask is not None}
    valid = np.array([int(i) in by_frame for i in index], bool)
    gt = None
    if valid.any():
        gt = np.zeros((len(index), s, s), np.uint8)
        for j, i in enumerate(index):
            if valid[j]:
                gt[j] = resize_mask(decode_mask(by_frame[int(i)], hw), s)

    ib, ia, lb, la = tokenize_conversation(
        record.conversations,
        tokenizer,
        system=cfg.system,
        unmask_template_tokens=cfg.unmask_template_tokens,
    )
    nv = cfg.visual_length(record.kind)
    room = cfg.model_max_length - len(ib) - nv
    if room < 0:
        raise ValueError(
            f"model_max_length {cfg.model_max_length} leaves no room for the {nv} visual "
            f"embeddings after {len(ib)} text tokens"
        )
    cut = max(0, len(ia) - room)
    ia, la = ia[:room], la[:room]
    return Example(
        record.id,
        record.source,
        record.line,
        record.kind,
        pixels,
        prompt,
        ib,
        ia,
        lb,
        la,
        gt,
        valid,
        index.astype(np.int32),
        (int(hw[0]), int(hw[1])),
        nv,
        cut,
    )
