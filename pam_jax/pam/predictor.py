"""PAM inference on images: regions (box and / or clicks) -> mask + text, batched over regions.

What the release does per region (`notebooks/image_infer_example.ipynb`), reproduced here:

1. the image is PIL-resized to S x S (aspect ratio NOT kept, bicubic), scaled and normalized
   (`video_io.preprocess_frame` / `normalize`, the SAM 2 video predictor's loader);
2. the box (x1, y1, x2, y2) becomes two points labelled 2 / 3, followed by any clicks
   (1 positive, 0 negative); coordinates are divided by the original W / H and scaled by S;
3. SAM 2 (conditioning frame: features + `no_mem_embed`, single-mask decoder) gives the mask
   and the two tapped tensors; the perceiver + projectors give 1042 visual embeddings;
4. the ChatML prompt with the task instruction is embedded around them and the LLM generates.

All regions of one image share one image encoding and run as one batch (one compiled step per
number of regions and of points, both bucketed). Decoding defaults to greedy with the
checkpoint's repetition penalty (generation_config.json, 1.05 for the release: HF applies it in
greedy decoding too); the notebooks sample at temperature 0.1 (pass `SamplingParams`).
Known difference: the release shrinks the embedding to the tokenizer's length (151665) before
generating; pam-jax keeps the padded vocabulary (151936), whose extra rows are never trained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pam_jax.llm.sampler import SamplingParams, generate
from pam_jax.pam import assembly, prompts
from pam_jax.pam.model import PAM
from pam_jax.sam2.ops import resize_bilinear
from pam_jax.sam2.video_io import normalize, preprocess_frame


@dataclasses.dataclass
class RegionResult:
    text: str
    mask: np.ndarray  # [H, W] bool at the original resolution
    score: float  # SAM 2 object score logit (> 0: object present)
    token_ids: list[int]


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@partial(jax.jit, static_argnames=("graphdef", "orig_hw"))
def _image_step(graphdef, state, image, coords, labels, valid, *, orig_hw):
    model = nnx.merge(graphdef, state)
    visual, low, obj = model.image_regions(image, coords, labels, valid)
    masks = resize_bilinear(low, orig_hw, False, axes=(-2, -1)) > 0
    return visual, masks, obj


@partial(jax.jit, static_argnames=("graphdef",))
def _embed(graphdef, state, text_ids, visual, visual_index, is_visual, mask):
    llm = nnx.merge(graphdef, state)
    lay = assembly.Layout(text_ids, visual_index, is_visual, mask, None, None)
    return assembly.assemble(llm.embed(text_ids), visual.astype(llm.dtype), lay)


def region_prompts(
    regions: Sequence[Mapping[str, Any]], hw: tuple[int, int], image_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per region {"box": [x1, y1, x2, y2]} and / or {"points": [[x, y], ...], "labels": [...]}
    (original pixels) -> coords [N, P, 2] (model pixels), labels [N, P], valid [N, P]."""
    h, w = hw
    rows = []
    for i, r in enumerate(regions):
        unknown = set(r) - {"box", "points", "labels"}
        if unknown:
            raise ValueError(f"region {i}: unknown keys {sorted(unknown)} (box, points, labels)")
        cs, ls = [], []
        if r.get("box") is not None:
            b = np.asarray(r["box"], np.float32)
            if b.shape != (4,):
                raise ValueError(f"region {i}: a box is x1,y1,x2,y2, got shape {b.shape}")
            if not (b[0] <= b[2] and b[1] <= b[3]):
                raise ValueError(f"region {i}: box {b.tolist()} has x2 < x1 or y2 < y1")
            cs.append(b.reshape(2, 2))
            ls.append(np.array([2, 3], np.int32))
        if r.get("points") is not None:
            p = np.asarray(r["points"], np.float32).reshape(-1, 2)
            lab = np.asarray(r.get("labels", [1] * len(p)), np.int32).reshape(-1)
            if len(lab) != len(p):
                raise ValueError(f"region {i}: {len(p)} points but {len(lab)} labels")
            if np.any((lab != 0) & (lab != 1)):
                raise ValueError(f"region {i}: click labels are 1 (positive) or 0 (negative)")
            cs.append(p)
            ls.append(lab)
        if not cs:
            raise ValueError(f"region {i} is empty: give a box and / or points")
        c = np.concatenate(cs)
        # the video predictor's normalize_coords: / (W, H) in float32, then * image_size
        c = c / np.array([w, h], np.float32) * np.float32(image_size)
        rows.append((c, np.concatenate(ls)))
    p = _bucket(max(len(lab) for _, lab in rows))
    n = len(rows)
    coords = np.zeros((n, p, 2), np.float32)
    labels = -np.ones((n, p), np.int32)
    valid = np.zeros((n, p), bool)
    for i, (c, lab) in enumerate(rows):
        coords[i, : len(c)], labels[i, : len(lab)], valid[i, : len(lab)] = c, lab, True
    return coords, labels, valid


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
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = model.config.sam2.image_size
        if sampling is None:
            gc = getattr(tokenizer, "generation_config", None) or {}
            sampling = SamplingParams(repetition_penalty=float(gc.get("repetition_penalty", 1.0)))
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self._graphdef, self._state = nnx.split(model)
        self._llm_graphdef, self._llm_state = nnx.split(model.llm)

    def _stop_and_pad(self) -> tuple[list[int], int]:
        tok = self.tokenizer
        stops = list(getattr(tok, "stop_ids", []) or [])
        pad = getattr(tok, "pad_token_id", None)
        return stops, int(pad if pad is not None else 0)

    def describe_image(
        self,
        image: Any,
        regions: Sequence[Mapping[str, Any]],
        task: str = "detailed_caption",
        lang: str = "en",
        *,
        rng: int = 0,
    ) -> list[RegionResult]:
        """image: RGB uint8 [H, W, 3] array or PIL image; one result per region."""
        prompts.task_prompt(task, lang)  # validates the task and language
        if task in prompts.VIDEO_TASKS or task.startswith("video_cap"):
            raise ValueError(f"{task!r} is a video task; image tasks: {prompts.IMAGE_TASKS}")
        if not regions:
            return []
        resized, h, w = preprocess_frame(image, self.image_size)
        img = jnp.asarray(normalize(resized))[None]
        coords, labels, valid = region_prompts(regions, (h, w), self.image_size)
        visual, masks, obj = _image_step(
            self._graphdef, self._state, img, coords, labels, valid, orig_hw=(h, w)
        )
        before, after = prompts.prompt_ids(self.tokenizer, task, lang)
        n = len(regions)
        lay = assembly.layout([before] * n, [after] * n, visual.shape[1], pad_side="right")
        embeds = _embed(
            self._llm_graphdef, self._llm_state, jnp.asarray(lay.text_ids), visual,
            jnp.asarray(lay.visual_index), jnp.asarray(lay.is_visual), jnp.asarray(lay.mask),
        )  # fmt: skip
        stops, pad = self._stop_and_pad()
        gen = generate(
            self.model.llm, inputs_embeds=embeds, prompt_lengths=lay.lengths,
            max_new_tokens=self.max_new_tokens, sampling=self.sampling, stop_ids=stops,
            pad_id=pad, rng=rng,
        )  # fmt: skip
        masks, obj = np.asarray(masks), np.asarray(obj)
        out = []
        for i in range(n):
            ids = [int(t) for t in gen.tokens[i, : gen.lengths[i]]]
            text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            out.append(RegionResult(text, masks[i], float(obj[i]), ids))
        return out
