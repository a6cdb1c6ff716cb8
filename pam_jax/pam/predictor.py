"""PAM inference on images: regions (box and / or clicks) -> mask + text, batched over regions.

What the release does per region (`notebooks/image_infer_example.ipynb`), reproduced here:

1. the image is PIL-resized to S x S (aspect ratio NOT kept, bicubic), scaled and normalized
   (`video_io.preprocess_frame`, then `normalize_device` on the device: the SAM 2 video
   predictor's loader);
2. the box (x1, y1, x2, y2) becomes two points labelled 2 / 3, followed by any clicks
   (1 positive, 0 negative); coordinates are divided by the original W / H and scaled by S;
   a mask prompt goes through `add_new_mask` / `_use_mask_as_output` (which the release's
   fork crashes on; see `pam_jax.pam.model.image_regions` for the semantics chosen here);
3. SAM 2 (conditioning frame: features + `no_mem_embed`, single-mask decoder) gives the mask
   and the two tapped tensors; the perceiver + projectors give 1042 visual embeddings;
4. the ChatML prompt with the task instruction is embedded around them and the LLM generates.

All regions of one image share one image encoding and run as one batch (one compiled step per
number of regions and of points, both bucketed). Decoding defaults to greedy with the
checkpoint's repetition penalty (generation_config.json, 1.05 for the release: HF applies it in
greedy decoding too); the notebooks sample at temperature 0.1 (pass `SamplingParams`).
The vocabulary is cut to the tokenizer's length by `load_pam`, as the release does.
Known difference: SAM 2's `fill_hole_area=8` post-processing (it needs the official CUDA
extension `sam2._C`, which PAM's fork ships) is not applied to the masks, as in pam_jax.sam2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pam_jax.llm import sampler
from pam_jax.llm.sampler import PendingGeneration, SamplingParams, generate_async
from pam_jax.pam import assembly, prompts
from pam_jax.pam.model import PAM, image_regions
from pam_jax.pam.video import TrackedVideo, mask_box, track_video
from pam_jax.prepared import merge, prepare
from pam_jax.sam2.common import pow2_bucket
from pam_jax.sam2.ops import resize_bilinear
from pam_jax.sam2.prompts import PromptError, pad_prompts, prompt_from_region, to_model
from pam_jax.sam2.video_io import normalize_device, preprocess_frame


@dataclasses.dataclass
class RegionResult:
    text: str
    mask: np.ndarray  # [H, W] bool at the original resolution
    score: float  # SAM 2 object score logit (> 0: object present)
    token_ids: list[int]


@partial(jax.jit, static_argnames=("structure",))
def _image_step(structure, leaves, images_u8, image_index, coords, labels, valid, mask_in, is_mask):
    # no original size in here: images of every size share this program (an eval over a
    # dataset of many photo sizes compiles SAM 2 + perceiver once per image / region / point
    # bucket); images_u8 [M, S, S, 3], region i on image image_index[i]
    sam2, parts = merge(structure, leaves)
    images = normalize_device(images_u8)
    index = None if images_u8.shape[0] == 1 else image_index
    return image_regions(sam2, parts, images, coords, labels, valid, mask_in, is_mask, index)


def image_bucket(n: int) -> int:
    """Images per SAM 2 call: 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (at most a third padding: each
    padding image is a whole encoder pass)."""
    k = pow2_bucket(n)
    return 3 * k // 4 if k >= 4 and n <= 3 * k // 4 else k


@partial(jax.jit, static_argnames=("orig_hw",))
def masks_at(low: jax.Array, *, orig_hw: tuple[int, int]) -> jax.Array:
    """Low-res mask logits [N, 4h, 4w] -> bool masks [N, H, W] at the photo's size (its own
    small program, compiled per size, so the SAM 2 programs before it are not)."""
    return resize_bilinear(low, orig_hw, False, axes=(-2, -1)) > 0


@partial(jax.jit, static_argnames=("structure",))
def _embed(structure, leaves, text_ids, visual, visual_index, is_visual, mask):
    llm = merge(structure, leaves)
    lay = assembly.Layout(text_ids, visual_index, is_visual, mask, None, None)
    return assembly.assemble(llm.embed(text_ids), visual.astype(llm.dtype), lay)


OnStep = Callable[[int], None]  # host progress callback: tokens generated so far

# LLM prompt buckets: PAM prompts are ~1085 embeddings for every region of a task, so a fine
# grid (<= 63 padding columns) costs few compilations; the generic four-per-octave grid would
# pad 1085 to 1280 and spend 18% more prefill FLOPs on padding.
LLM_BUCKETS = tuple(range(64, (1 << 17) + 1, 64))


@dataclasses.dataclass
class LLMInputs:
    """What the LLM is fed: embeds [N, L, H] (ChatML text around the visual embeddings, right
    padded), lengths [N] (real rows), and the visual part alone, visual [N, V, H]."""

    embeds: jax.Array
    lengths: np.ndarray
    visual: jax.Array
    text_before: list[int]
    text_after: list[int]


@dataclasses.dataclass(frozen=True)
class PreparedImage:
    """An image resized for SAM 2 on the host (`PAMPredictor.prepare_image`: what an eval's
    loader threads do ahead of the device) and its original size."""

    resized: np.ndarray  # uint8 [S, S, 3]
    hw: tuple[int, int]  # the original height and width


@dataclasses.dataclass
class PendingTexts:
    """A dispatched generation (`PAMPredictor.generate_async`); `result()` waits and decodes."""

    gen: PendingGeneration
    tokenizer: Any
    rows: int

    def result(self) -> list[tuple[str, list[int]]]:
        g = self.gen.result()
        out = []
        for i in range(self.rows):
            ids = [int(t) for t in g.tokens[i, : g.lengths[i]]]
            out.append((self.tokenizer.decode(ids, skip_special_tokens=True).strip(), ids))
        return out


@dataclasses.dataclass
class ImageInputs:
    llm: LLMInputs
    masks: np.ndarray  # [N, H, W] bool (a device array on the internal `_image_inputs` path)
    scores: np.ndarray  # [N] object score logits (likewise)


class PAMPredictor:
    """Region recognition / explanation / captioning on images with a loaded `PAM`."""

    def __init__(
        self,
        model: PAM,
        tokenizer: Any,
        *,
        sampling: SamplingParams | None = None,
        max_new_tokens: int = 512,
    ):
        self.tokenizer = tokenizer
        self.image_size = model.config.sam2.image_size
        if sampling is None:
            pen = sampler.repetition_penalty(None, tokenizer)  # the checkpoint's default
            sampling = SamplingParams(repetition_penalty=pen)
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.set_model(model)

    def set_model(self, model: PAM) -> None:
        """Run on `model`'s current parameters (e.g. a live training state) from now on. The
        parts are split and hashed here once (pam_jax.prepared), not per call."""
        self.model = model
        self._vision = prepare((model.sam2, model.parts))
        self._sam2 = prepare(model.sam2)
        self._parts = prepare(model.parts)
        self._llm = sampler.prepare(model.llm)

    def _stop_and_pad(self) -> tuple[list[int], int]:
        tok = self.tokenizer
        stops = list(getattr(tok, "stop_ids", []) or [])
        pad = getattr(tok, "pad_token_id", None)
        return stops, int(pad if pad is not None else 0)

    def image_inputs(
        self,
        image: Any,
        regions: Sequence[Mapping[str, Any]],
        task: str = "detailed_caption",
        lang: str = "en",
    ) -> ImageInputs:
        """SAM 2 + perceiver + ChatML splice for N regions of one image (one batched call):
        the LLM input embeddings, the masks [N, H, W] and object scores, before generation."""
        inp = self._image_inputs(image, regions, task, lang)
        return dataclasses.replace(inp, masks=np.asarray(inp.masks), scores=np.asarray(inp.scores))

    def prepare_image(self, image: Any) -> PreparedImage:
        """The host-side resize to the model's size (safe on loader threads)."""
        resized, h, w = preprocess_frame(image, self.image_size)
        return PreparedImage(resized, (h, w))

    def _image_inputs(self, image, regions, task, lang) -> ImageInputs:
        """`image_inputs` with masks and scores left on the device (nothing waits for them);
        `image` may be a `PreparedImage`."""
        return self.images_inputs([image], [regions], task, lang)[0]

    def images_inputs(
        self,
        images: Sequence[Any],
        regions: Sequence[Sequence[Mapping[str, Any]]],
        task: str = "detailed_caption",
        lang: str = "en",
    ) -> list[ImageInputs]:
        """`image_inputs` for several images in ONE SAM 2 + perceiver call (the images encoded
        as one batch, each once; `image_bucket` images), left on the device: per image, its
        LLM inputs, masks [n, H, W] at its size and scores. `images`: arrays, PIL images or
        `PreparedImage`s; `regions[k]` the region dicts of image k (at least one each). One
        image runs as many rows as it has regions; several run their regions' count padded
        to a power of two."""
        prompts.task_prompt(task, lang)  # validates the task and language
        if task in prompts.VIDEO_TASKS or task.startswith("video_cap"):
            raise ValueError(f"{task!r} is a video task; image tasks: {prompts.IMAGE_TASKS}")
        if len(images) != len(regions) or not images:
            raise ValueError(f"{len(images)} images for {len(regions)} region lists")
        prep = [im if isinstance(im, PreparedImage) else self.prepare_image(im) for im in images]
        rows = []  # every image's prompts in model pixels, then padded together
        for im, regs in zip(prep, regions):
            if not regs:
                raise PromptError("no regions: give at least one box, points or mask")
            rows += [
                to_model(prompt_from_region(r, image_hw=im.hw, index=i), im.hw, self.image_size)
                for i, r in enumerate(regs)
            ]
        counts = [len(r) for r in regions]
        # one image: its rows as given (callers bucket them); several: a power of two
        n_rows = counts[0] if len(prep) == 1 else pow2_bucket(sum(counts))
        p = pad_prompts(rows + [rows[0]] * (n_rows - len(rows)))
        m = image_bucket(len(prep))
        stack = np.stack([im.resized for im in prep] + [prep[0].resized] * (m - len(prep)))
        index = np.repeat(np.arange(len(prep), dtype=np.int32), counts)
        index = np.concatenate([index, np.zeros(n_rows - len(index), np.int32)])
        is_mask = None if p.mask_inputs is None else p.is_mask
        visual, low, obj = _image_step(
            self._vision.structure, self._vision.leaves, stack, index, p.coords, p.labels,
            p.valid, p.mask_inputs, is_mask,
        )  # fmt: skip
        llm = self.llm_inputs(visual, task, lang, None)
        if len(prep) == 1:  # the whole arrays: no slicing on the single-image hot path
            return [ImageInputs(llm, masks_at(low, orig_hw=prep[0].hw), obj)]
        out, start = [], 0
        for im, c in zip(prep, counts):
            rows = slice(start, start + c)
            masks = masks_at(low[rows], orig_hw=im.hw)
            part = LLMInputs(
                llm.embeds[rows], llm.lengths[rows], llm.visual[rows], llm.text_before,
                llm.text_after,
            )  # fmt: skip
            out.append(ImageInputs(part, masks, obj[rows]))
            start += c
        return out

    def describe_image(
        self,
        image: Any,
        regions: Sequence[Mapping[str, Any]],
        task: str = "detailed_caption",
        lang: str = "en",
        *,
        rng: int = 0,
        on_step: OnStep | None = None,
    ) -> list[RegionResult]:
        """image: RGB uint8 [H, W, 3] array or PIL image; regions: {"box"}, {"points",
        "labels"}, both, or {"mask": bool [H, W]} (original pixels). All regions are decoded
        and generated in one batch; one result per region. `on_step`: see `generate`."""
        if not regions:
            return []
        inp = self._image_inputs(image, regions, task, lang)
        texts = self.generate(inp.llm, rng, on_step=on_step)  # queued behind SAM 2
        masks, scores = np.asarray(inp.masks), np.asarray(inp.scores)
        return [
            RegionResult(text, masks[i], float(scores[i]), ids)
            for i, (text, ids) in enumerate(texts)
        ]

    def describe_images(
        self,
        items: Sequence[tuple[Any, Sequence[Mapping[str, Any]]]],
        task: str = "detailed_caption",
        lang: str = "en",
        *,
        rng: int = 0,
        on_step: OnStep | None = None,
    ) -> list[list[RegionResult]]:
        """Several (image, regions) items: SAM 2 + perceiver for all images in one call
        (`images_inputs`), then ONE batched generation over every region of every image."""
        given = [(img, regs) for img, regs in items if regs]
        if not given:
            return [[] for _ in items]
        real = self.images_inputs([g[0] for g in given], [g[1] for g in given], task, lang)
        it = iter(real)
        inps = [next(it) if regs else None for _, regs in items]
        joined = LLMInputs(
            jnp.concatenate([i.llm.embeds for i in real]),
            np.concatenate([i.llm.lengths for i in real]),
            jnp.concatenate([i.llm.visual for i in real]),
            real[0].llm.text_before,
            real[0].llm.text_after,
        )
        texts = iter(self.generate(joined, rng, on_step=on_step))
        out = []
        for inp in inps:
            rows = []
            if inp is not None:
                masks, scores = np.asarray(inp.masks), np.asarray(inp.scores)
                for i in range(len(scores)):
                    text, ids = next(texts)
                    rows.append(RegionResult(text, masks[i], float(scores[i]), ids))
            out.append(rows)
        return out

    def llm_inputs(self, visual: jax.Array, task: str, lang: str, history: str | None) -> LLMInputs:
        """visual [N, V, H] -> the ChatML-spliced input embeddings (the release's layout)."""
        before, after = prompts.prompt_ids(self.tokenizer, task, lang, history)
        n = visual.shape[0]
        lay = assembly.layout([before] * n, [after] * n, visual.shape[1], pad_side="right")
        embeds = _embed(
            self._llm.structure, self._llm.leaves, jnp.asarray(lay.text_ids), visual,
            jnp.asarray(lay.visual_index), jnp.asarray(lay.is_visual), jnp.asarray(lay.mask),
        )  # fmt: skip
        return LLMInputs(embeds, np.asarray(lay.lengths), visual, before, after)

    def generate(
        self, inp: LLMInputs, rng: int = 0, *, on_step: OnStep | None = None
    ) -> list[tuple[str, list[int]]]:
        """Batched generation from `LLMInputs` -> N (text, token ids). `on_step(n)` is called
        on the host after each decode step (`pam_jax.llm.sampler.generate`: a progress bar)."""
        return self.generate_async(inp, rng, on_step=on_step).result()

    def generate_async(
        self, inp: LLMInputs, rng: int = 0, *, on_step: OnStep | None = None
    ) -> PendingTexts:
        """`generate`, dispatched without waiting (a batch eval prepares the next batch while
        this one runs); `.result()` gives the texts."""
        stops, pad = self._stop_and_pad()
        gen = generate_async(
            self._llm, inputs_embeds=inp.embeds, prompt_lengths=inp.lengths,
            max_new_tokens=self.max_new_tokens, sampling=self.sampling, stop_ids=stops,
            pad_id=pad, rng=rng, buckets=LLM_BUCKETS, on_step=on_step,
        )  # fmt: skip
        return PendingTexts(gen, self.tokenizer, int(inp.embeds.shape[0]))

    def describe_video(
        self,
        frames: Sequence[Any],
        region: Mapping[str, Any],
        task: str = "video_caption",
        lang: str = "en",
        *,
        history: str | None = None,
        rng: int = 0,
        on_step: OnStep | None = None,
    ) -> VideoResult:
        """frames: RGB uint8 [H, W, 3] arrays / PIL images; region: the prompt on frame 0
        ({"box": ...} and / or {"points": ..., "labels": ...}, original pixels). SAM 2 tracks
        through every frame; 16 frames (`assembly.select_frames`) feed the LLM. `history` is
        the previous clip's caption (streaming); None gives the release's "None" / "无"."""
        inp = self.video_inputs(frames, region, task, lang, history=history)
        text, ids = self.generate(inp.llm, rng, on_step=on_step)[0]
        return VideoResult(text, inp.masks, inp.scores, inp.frames, ids)

    def video_inputs(
        self,
        frames: Sequence[Any],
        region: Mapping[str, Any],
        task: str = "video_caption",
        lang: str = "en",
        *,
        history: str | None = None,
    ) -> VideoInputs:
        """SAM 2 tracking + perceiver + ChatML splice for one video, before generation. The
        region may also be {"mask": bool [H, W]} (`add_new_mask` on frame 0)."""
        if task not in prompts.VIDEO_TASKS and not task.startswith("video_cap"):
            raise ValueError(f"{task!r} is not a video task; expected {prompts.VIDEO_TASKS}")
        prompts.task_prompt(task, lang, history)
        tv: TrackedVideo = track_video(
            self._sam2, self._parts, self.model.sam2.config, frames, region,
            self.model.config.num_frames,
        )  # fmt: skip
        llm_in = self.llm_inputs(tv.visual, task, lang, history)
        return VideoInputs(llm_in, tv.masks, tv.scores, tv.frames)

    def describe_stream(
        self,
        frames: Sequence[Any],
        region: Mapping[str, Any],
        clip_ends: Sequence[int],
        lang: str = "en",
        *,
        rng: int = 0,
        on_step: OnStep | None = None,
    ) -> list[VideoResult]:
        """Streaming captions (`video_stream_infer_example.ipynb`): clip k = frames
        [clip_ends[k-1], clip_ends[k]), each an independent SAM 2 + PAM call whose prompt
        carries the previous clip's caption as history. Clip k > 0 is prompted with the box of
        the previous clip's last-frame mask (what the notebook intends; its own loop references
        an undefined name), or the original region when that mask is empty."""
        ends = [int(e) for e in clip_ends]
        if not ends or any(b <= a for a, b in zip([0, *ends], ends)) or ends[-1] > len(frames):
            raise ValueError(f"clip_ends must increase within 1..{len(frames)}, got {ends}")
        out: list[VideoResult] = []
        history, prompt, start = None, dict(region), 0
        for end in ends:
            res = self.describe_video(
                frames[start:end],
                prompt,
                "streaming_caption",
                lang,
                history=history,
                rng=rng,
                on_step=on_step,
            )
            out.append(res)
            history = res.text
            box = mask_box(res.masks[-1])
            prompt = {"box": box} if box is not None else dict(region)
            start = end
        return out


@dataclasses.dataclass
class VideoResult:
    text: str
    masks: np.ndarray  # [T, H, W] bool, every input frame
    scores: np.ndarray  # [T] object score logits
    frames: np.ndarray  # the 16 frame indices fed to the LLM
    token_ids: list[int]


@dataclasses.dataclass
class VideoInputs:
    llm: LLMInputs
    masks: np.ndarray  # [T, H, W] bool
    scores: np.ndarray  # [T]
    frames: np.ndarray  # the frame indices fed to the LLM
