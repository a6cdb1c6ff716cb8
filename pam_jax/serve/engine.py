"""The model side of `pam-jax serve`: a loaded PAM, images encoded once and cached, SAM 2 masks
from the cached features (a click costs the decoder only), region descriptions of several
requests in one streamed generation, perceive-everything and video tracking.

Everything here is blocking device work; `worker.Worker` is its only caller (one thread).
The region path composes `pam_jax.pam.model`'s own pieces (`region_prompts_step`,
`pam_track_step`, `image_visual_embeds`, as `image_region_outputs` does) on cached features, so
a described region equals `PAMPredictor.describe_image` on the same click
(tests/serve/test_api.py).
"""

from __future__ import annotations

import collections
import dataclasses
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pam_jax.llm import sampler
from pam_jax.pam import prompts as pam_prompts
from pam_jax.pam.model import PAM, pam_track_step, region_prompts_step
from pam_jax.pam.predictor import LLM_BUCKETS, PAMPredictor, masks_at
from pam_jax.prepared import merge, prepare
from pam_jax.sam2.prompts import pad_regions
from pam_jax.sam2.video_io import normalize_device, preprocess_frame
from pam_jax.serve.stream import stream_generate

# batch buckets of one generation: concurrent requests are padded up to one of these
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)


@partial(jax.jit, static_argnames=("structure",))
def _encode(structure, leaves, image_u8):
    sam2 = merge(structure, leaves)
    return sam2.frame_features(normalize_device(image_u8)[None])


def _track(sam2, feats, coords, labels, valid):
    return pam_track_step(
        sam2, feats, region_prompts_step(coords, labels, valid), None, 0, 1, is_cond=True
    )[0]


# no photo size in these two: uploads of every size share them (`masks_at` upsamples)
@partial(jax.jit, static_argnames=("structure",))
def _masks(structure, leaves, feats, coords, labels, valid):
    out = _track(merge(structure, leaves), feats, coords, labels, valid)
    return out.pred_masks, out.object_score_logits[:, 0]


@partial(jax.jit, static_argnames=("structure",))
def _regions(structure, leaves, feats, coords, labels, valid):
    sam2, parts = merge(structure, leaves)
    out = _track(sam2, feats, coords, labels, valid)
    dec = out.decoder
    visual = parts.image_visual_embeds(dec.mid_image_embed, dec.mid_single_tokens)
    return visual, out.pred_masks, out.object_score_logits[:, 0]


@dataclasses.dataclass
class ImageEntry:
    """One uploaded image: server-made id, the pixels, and SAM 2's features of it."""

    id: str
    image: np.ndarray  # uint8 [H, W, 3]
    feats: Any  # FrameFeatures (device), batch 1

    @property
    def hw(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]


@dataclasses.dataclass
class VideoEntry:
    id: str
    frames: np.ndarray  # uint8 [T, H, W, 3]


@dataclasses.dataclass
class DescribeJob:
    """One region to describe; the worker calls `emit(text_so_far, token_ids, done)` as tokens
    arrive, or `fail(error)`."""

    entry: ImageEntry
    region: Mapping[str, Any]
    task: str
    lang: str
    emit: Callable[[str, list[int], bool], None]
    fail: Callable[[BaseException], None]
    mask: np.ndarray | None = None
    score: float = 0.0


class Store:
    """Server-made ids -> entries, least recently used dropped beyond `capacity`."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, make: Callable[[str], Any]) -> Any:
        key = secrets.token_hex(8)
        item = make(key)
        with self._lock:
            self._items[key] = item
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return item

    def get(self, key: str) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item


class Engine:
    """A loaded PAM and its compiled steps. `max_new_tokens` caps every generation; `chunk` is
    the number of tokens per streamed decode call; a generation of n regions runs at the
    smallest of `batch_buckets` holding n (one compilation per bucket)."""

    def __init__(
        self,
        model: PAM,
        tokenizer: Any,
        *,
        max_new_tokens: int = 64,
        chunk: int = 8,
        capacity: int = 32,
        batch_buckets: Sequence[int] = BATCH_BUCKETS,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.predictor = PAMPredictor(model, tokenizer, max_new_tokens=max_new_tokens)
        self.max_new_tokens = max_new_tokens
        self.chunk = chunk
        self.batch_buckets = tuple(sorted(batch_buckets))
        self.size = model.config.sam2.image_size
        self._sam2 = prepare(model.sam2)
        self._vision = prepare((model.sam2, model.parts))
        self._llm = sampler.prepare(model.llm)
        self.images = Store(capacity)
        self.videos = Store(max(1, capacity // 8))

    # -- images ---------------------------------------------------------------------------------
    def add_image(self, image: np.ndarray) -> ImageEntry:
        resized, _, _ = preprocess_frame(image, self.size)
        feats = _encode(self._sam2.structure, self._sam2.leaves, jnp.asarray(resized))
        return self.images.add(lambda key: ImageEntry(key, image, feats))

    def segment(self, entry: ImageEntry, region: Mapping[str, Any]) -> tuple[np.ndarray, float]:
        """The mask [H, W] bool and object score of one region, from the cached features."""
        p = pad_regions([region], entry.hw, self.size)
        low, scores = _masks(
            self._sam2.structure, self._sam2.leaves, entry.feats, p.coords, p.labels, p.valid
        )
        return np.asarray(masks_at(low, orig_hw=entry.hw)[0]), float(scores[0])

    # -- descriptions ---------------------------------------------------------------------------
    def describe(self, jobs: Sequence[DescribeJob], rng: int = 0) -> None:
        """Every job's region through SAM 2 + the perceiver (cached features), then ONE
        generation over all of them (rows padded to a batch bucket), streamed to each job."""
        embeds, lengths = [], []
        for job in jobs:
            p = pad_regions([job.region], job.entry.hw, self.size)
            visual, low, scores = _regions(
                self._vision.structure, self._vision.leaves, job.entry.feats, p.coords,
                p.labels, p.valid,
            )  # fmt: skip
            job.mask = np.asarray(masks_at(low, orig_hw=job.entry.hw)[0])
            job.score = float(scores[0])
            inp = self.predictor.llm_inputs(visual, job.task, job.lang, None)
            embeds.append(inp.embeds[0])
            lengths.append(int(inp.lengths[0]))
        width = max(e.shape[0] for e in embeds)
        rows = [jnp.pad(e, ((0, width - e.shape[0]), (0, 0))) for e in embeds]
        n = len(rows)
        # padding rows are copies of row 0; their results are dropped
        pad_rows = next((b for b in self.batch_buckets if b >= n), n) - n
        x = jnp.stack(rows + [rows[0]] * pad_rows)
        lens = np.asarray(lengths + [lengths[0]] * pad_rows)
        stops, pad = self.predictor._stop_and_pad()
        sent = [""] * len(jobs)
        for ch in stream_generate(
            self._llm, x, lens, max_new_tokens=self.max_new_tokens, chunk=self.chunk,
            sampling=self.predictor.sampling, stop_ids=stops, pad_id=pad, rng=rng,
            buckets=LLM_BUCKETS,
        ):  # fmt: skip
            last = ch.finished or ch.tokens.shape[1] >= self.max_new_tokens
            for i, job in enumerate(jobs):
                ids = [int(t) for t in ch.tokens[i, : ch.lengths[i]]]
                text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
                if last or text != sent[i]:
                    sent[i] = text
                    job.emit(text, ids, last)

    def perceive(self, entry: ImageEntry, task: str, lang: str, **amg: Any) -> list[dict]:
        """Every region of the image (`pam_jax.pam.perceive`) with its text, largest first."""
        from pam_jax.pam.perceive import perceive
        from pam_jax.sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

        max_regions = amg.pop("max_regions", None)
        gen = SAM2AutomaticMaskGenerator(self.model.sam2, **amg)
        res = perceive(entry.image, gen, self.predictor, task=task, lang=lang,
                       max_regions=max_regions)  # fmt: skip
        out = []
        for i in range(len(res.masks)):
            box = [float(v) for v in res.masks.boxes[i]]
            out.append({"mask": res.masks.masks[i], "box": box, "text": res.texts[i],
                        "area": int(res.masks.areas[i])})  # fmt: skip
        return out

    # -- video ----------------------------------------------------------------------------------
    def add_video(self, frames: np.ndarray) -> VideoEntry:
        return self.videos.add(lambda key: VideoEntry(key, frames))

    def track(self, entry: VideoEntry, region: Mapping[str, Any], lang: str) -> tuple[Any, str]:
        """The region (prompted on frame 0) tracked through the clip and the clip captioned:
        (masks [T, H, W] bool, caption)."""
        res = self.predictor.describe_video(list(entry.frames), region, "video_caption", lang)
        return res.masks, res.text


def check_task(task: Any, lang: Any) -> tuple[str, str]:
    """A request's task / language -> the canonical names (ValueError with the choices)."""
    if not isinstance(task, str) or not isinstance(lang, str):
        raise ValueError("task and lang must be strings")
    task = pam_prompts.CLI_TASKS.get(task, task)
    if task not in pam_prompts.IMAGE_TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {pam_prompts.IMAGE_TASKS}")
    return task, pam_prompts.normalize_lang(lang)
