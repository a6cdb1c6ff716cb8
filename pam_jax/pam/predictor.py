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
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pam_jax.llm import sampler
from pam_jax.llm.sampler import SamplingParams, generate
from pam_jax.pam import assembly, prompts
from pam_jax.pam.model import PAM, image_regions
from pam_jax.prepared import merge, prepare
from pam_jax.sam2.common import pow2_bucket
from pam_jax.sam2.ops import resize_bilinear
from pam_jax.sam2.video_io import normalize_device, preprocess_frame


@dataclasses.dataclass
class RegionResult:
    text: str
    mask: np.ndarray  # [H, W] bool at the original resolution
    score: float  # SAM 2 object score logit (> 0: object present)
    token_ids: list[int]


@partial(jax.jit, static_argnames=("structure", "orig_hw"))
def _image_step(structure, leaves, image_u8, coords, labels, valid, mask_in, is_mask, *, orig_hw):
    sam2, parts = merge(structure, leaves)
    image = normalize_device(image_u8)[None]
    visual, low, obj = image_regions(sam2, parts, image, coords, labels, valid, mask_in, is_mask)
    masks = resize_bilinear(low, orig_hw, False, axes=(-2, -1)) > 0
    return visual, masks, obj


@partial(jax.jit, static_argnames=("structure",))
def _embed(structure, leaves, text_ids, visual, visual_index, is_visual, mask):
    llm = merge(structure, leaves)
    lay = assembly.Layout(text_ids, visual_index, is_visual, mask, None, None)
    return assembly.assemble(llm.embed(text_ids), visual.astype(llm.dtype), lay)


@partial(jax.jit, static_argnames=("size",))
def _mask_to_model(mask: jax.Array, *, size: int) -> jax.Array:
    """`add_new_mask`: bool [H, W] -> antialiased bilinear to size x size, >= 0.5, float."""
    m = resize_bilinear(mask.astype(jnp.float32)[None], (size, size), True, axes=(-2, -1))[0]
    return (m >= 0.5).astype(jnp.float32)


REGION_KEYS = ("box", "points", "labels", "mask")

# LLM prompt buckets: PAM prompts are ~1085 embeddings for every region of a task, so a fine
# grid (<= 63 padding columns) costs few compilations; the generic four-per-octave grid would
# pad 1085 to 1280 and spend 18% more prefill FLOPs on padding.
LLM_BUCKETS = tuple(range(64, (1 << 17) + 1, 64))


def _check_inside(xy: np.ndarray, hw: tuple[int, int], what: str) -> None:
    h, w = hw
    if not np.all(np.isfinite(xy)):
        raise ValueError(f"{what} {xy.tolist()}: coordinates must be finite")
    bad = (xy[..., 0] < 0) | (xy[..., 0] > w) | (xy[..., 1] < 0) | (xy[..., 1] > h)
    if np.any(bad):
        raise ValueError(
            f"{what} {xy.tolist()} is outside the {w}x{h} image (x in [0, {w}], y in [0, {h}])"
        )


def region_prompts(
    regions: Sequence[Mapping[str, Any]], hw: tuple[int, int], image_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per region {"box": [x1, y1, x2, y2]} and / or {"points": [[x, y], ...], "labels": [...]}
    (original pixels), or {"mask": [H, W] bool} alone -> coords [N, P, 2] (model pixels),
    labels [N, P], valid [N, P]. A mask region's row is the prompt-less (0, 0) / -1 point
    (`region_masks` gives its mask). Prompts outside the image raise ValueError."""
    h, w = hw
    rows = []
    for i, r in enumerate(regions):
        unknown = set(r) - set(REGION_KEYS)
        if unknown:
            keys = ", ".join(REGION_KEYS)
            raise ValueError(f"region {i}: unknown keys {sorted(unknown)} (allowed: {keys})")
        cs, ls = [], []
        if r.get("mask") is not None:
            if r.get("box") is not None or r.get("points") is not None:
                raise ValueError(
                    f"region {i}: a mask prompt takes no box or points (as add_new_mask)"
                )
            m = np.asarray(r["mask"])
            if m.shape != (h, w):
                raise ValueError(f"region {i}: mask is {m.shape[::-1]} (WxH), the image {(w, h)}")
            if not np.any(m):
                raise ValueError(f"region {i}: the mask prompt is empty")
            rows.append((np.zeros((1, 2), np.float32), np.array([-1], np.int32)))
            continue
        if r.get("box") is not None:
            b = np.asarray(r["box"], np.float32)
            if b.shape != (4,):
                raise ValueError(f"region {i}: a box is x1,y1,x2,y2, got shape {b.shape}")
            if not (b[0] <= b[2] and b[1] <= b[3]):
                raise ValueError(f"region {i}: box {b.tolist()} has x2 < x1 or y2 < y1")
            _check_inside(b.reshape(2, 2), hw, f"region {i}: box")
            cs.append(b.reshape(2, 2))
            ls.append(np.array([2, 3], np.int32))
        if r.get("points") is not None:
            p = np.asarray(r["points"], np.float32).reshape(-1, 2)
            lab = np.asarray(r.get("labels", [1] * len(p)), np.int32).reshape(-1)
            if len(lab) != len(p):
                raise ValueError(f"region {i}: {len(p)} points but {len(lab)} labels")
            if np.any((lab != 0) & (lab != 1)):
                raise ValueError(f"region {i}: click labels are 1 (positive) or 0 (negative)")
            _check_inside(p, hw, f"region {i}: point(s)")
            cs.append(p)
            ls.append(lab)
        if not cs:
            raise ValueError(f"region {i} is empty: give a box, points or a mask")
        c = np.concatenate(cs)
        # the video predictor's normalize_coords: / (W, H) in float32, then * image_size
        c = c / np.array([w, h], np.float32) * np.float32(image_size)
        rows.append((c, np.concatenate(ls)))
    p = pow2_bucket(max(len(lab) for _, lab in rows))
    n = len(rows)
    coords = np.zeros((n, p, 2), np.float32)
    labels = -np.ones((n, p), np.int32)
    valid = np.zeros((n, p), bool)
    for i, (c, lab) in enumerate(rows):
        coords[i, : len(c)], labels[i, : len(lab)], valid[i, : len(lab)] = c, lab, True
    return coords, labels, valid


def region_masks(
    regions: Sequence[Mapping[str, Any]], image_size: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Mask prompts at model size: (mask_inputs [N, S, S] float, is_mask [N]) or (None, None)
    when no region has a mask (so mask-free batches compile without the mask branch)."""
    is_mask = np.array([r.get("mask") is not None for r in regions], bool)
    if not is_mask.any():
        return None, None
    out = np.zeros((len(regions), image_size, image_size), np.float32)
    for i in np.nonzero(is_mask)[0]:
        out[i] = np.asarray(_mask_to_model(jnp.asarray(regions[i]["mask"]), size=image_size))
    return out, is_mask


@dataclasses.dataclass
class LLMInputs:
    """What the LLM is fed: embeds [N, L, H] (ChatML text around the visual embeddings, right
    padded), lengths [N] (real rows), and the visual part alone, visual [N, V, H]."""

    embeds: jax.Array
    lengths: np.ndarray
    visual: jax.Array
    text_before: list[int]
    text_after: list[int]


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
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = model.config.sam2.image_size
        if sampling is None:
            gc = getattr(tokenizer, "generation_config", None) or {}
            sampling = SamplingParams(repetition_penalty=float(gc.get("repetition_penalty", 1.0)))
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        # split and hashed once (pam_jax.prepared), not per call
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

    def _image_inputs(self, image, regions, task, lang) -> ImageInputs:
        """`image_inputs` with masks and scores left on the device (nothing waits for them)."""
        prompts.task_prompt(task, lang)  # validates the task and language
        if task in prompts.VIDEO_TASKS or task.startswith("video_cap"):
            raise ValueError(f"{task!r} is a video task; image tasks: {prompts.IMAGE_TASKS}")
        if not regions:
            raise ValueError("no regions: give at least one box, points or mask")
        resized, h, w = preprocess_frame(image, self.image_size)
        coords, labels, valid = region_prompts(regions, (h, w), self.image_size)
        mask_in, is_mask = region_masks(regions, self.image_size)
        visual, masks, obj = _image_step(
            self._vision.structure, self._vision.leaves, resized, coords, labels, valid,
            mask_in, is_mask, orig_hw=(h, w),
        )  # fmt: skip
        return ImageInputs(self.llm_inputs(visual, task, lang, None), masks, obj)

    def describe_image(
        self,
        image: Any,
        regions: Sequence[Mapping[str, Any]],
        task: str = "detailed_caption",
        lang: str = "en",
        *,
        rng: int = 0,
    ) -> list[RegionResult]:
        """image: RGB uint8 [H, W, 3] array or PIL image; regions: {"box"}, {"points",
        "labels"}, both, or {"mask": bool [H, W]} (original pixels). All regions are decoded
        and generated in one batch; one result per region."""
        if not regions:
            return []
        inp = self._image_inputs(image, regions, task, lang)
        texts = self.generate(inp.llm, rng)  # queued behind SAM 2 on the device
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
    ) -> list[list[RegionResult]]:
        """Several (image, regions) items: SAM 2 + perceiver per image (one batched call over
        its regions), then ONE batched generation over every region of every image."""
        inps = [self._image_inputs(img, regs, task, lang) if regs else None for img, regs in items]
        real = [i for i in inps if i is not None]
        if not real:
            return [[] for _ in items]
        joined = LLMInputs(
            jnp.concatenate([i.llm.embeds for i in real]),
            np.concatenate([i.llm.lengths for i in real]),
            jnp.concatenate([i.llm.visual for i in real]),
            real[0].llm.text_before,
            real[0].llm.text_after,
        )
        texts = iter(self.generate(joined, rng))
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

    def generate(self, inp: LLMInputs, rng: int = 0) -> list[tuple[str, list[int]]]:
        """Batched generation from `LLMInputs` -> N (text, token ids)."""
        stops, pad = self._stop_and_pad()
        gen = generate(
            self._llm, inputs_embeds=inp.embeds, prompt_lengths=inp.lengths,
            max_new_tokens=self.max_new_tokens, sampling=self.sampling, stop_ids=stops,
            pad_id=pad, rng=rng, buckets=LLM_BUCKETS,
        )  # fmt: skip
        out = []
        for i in range(inp.embeds.shape[0]):
            ids = [int(t) for t in gen.tokens[i, : gen.lengths[i]]]
            out.append((self.tokenizer.decode(ids, skip_special_tokens=True).strip(), ids))
        return out

    def describe_video(
        self,
        frames: Sequence[Any],
        region: Mapping[str, Any],
        task: str = "video_caption",
        lang: str = "en",
        *,
        history: str | None = None,
        rng: int = 0,
    ) -> VideoResult:
        """frames: RGB uint8 [H, W, 3] arrays / PIL images; region: the prompt on frame 0
        ({"box": ...} and / or {"points": ..., "labels": ...}, original pixels). SAM 2 tracks
        through every frame; 16 frames (`assembly.select_frames`) feed the LLM. `history` is
        the previous clip's caption (streaming); None gives the release's "None" / "无"."""
        inp = self.video_inputs(frames, region, task, lang, history=history)
        text, ids = self.generate(inp.llm, rng)[0]
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
        return _video_inputs(self, frames, region, task, lang, history)

    def describe_stream(
        self,
        frames: Sequence[Any],
        region: Mapping[str, Any],
        clip_ends: Sequence[int],
        lang: str = "en",
        *,
        rng: int = 0,
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
                frames[start:end], prompt, "streaming_caption", lang, history=history, rng=rng
            )
            out.append(res)
            history = res.text
            box = _mask_box(res.masks[-1])
            prompt = {"box": box} if box is not None else dict(region)
            start = end
        return out


# ---------------------------------------------------------------------------------------------
# video: SAM 2 tracks the object through every frame (memory bank), PAM reads 16 of them


def _encode_memory_f32(model, vision, low, obj, binarize: bool) -> jax.Array:
    """`tracker.encode_memory` without its final bfloat16 rounding: in PAM's SAM 2 fork only
    the conditioning frame's memory is stored in bf16, tracked frames keep float32 (pam.md 8)."""
    cfg = model.config
    s = model.image_size
    high = resize_bilinear(low.astype(jnp.float32), (s, s), False, axes=(-2, -1))
    prob = (high > 0).astype(jnp.float32) if binarize else jax.nn.sigmoid(high)
    mask = prob * cfg.sigmoid_scale_for_mem_enc + cfg.sigmoid_bias_for_mem_enc
    feats, _ = model.memory_encoder(vision, mask[..., None], skip_mask_sigmoid=True)
    feats = feats.astype(jnp.float32)
    if model.no_obj_embed_spatial is not None:
        absent = (obj <= 0).astype(jnp.float32)
        feats = feats + absent[:, None, None, :] * model.no_obj_embed_spatial[...][None, None]
    return feats.reshape(feats.shape[0], -1, feats.shape[-1])


@partial(jax.jit, static_argnames=("structure", "is_cond", "video_hw"))
def _video_step(
    structure, leaves, bank, image_u8, coords, labels, valid, frame_idx, num_frames,
    mask_in=None, *, is_cond: bool, video_hw: tuple[int, int],
):  # fmt: skip
    """One frame of PAM's SAM 2 tracking (one object): the official `track_step` as PAM's fork
    runs it (`multimask_output_in_sam: False`, the mask is always the single-mask token's) plus
    the two perceiver taps. Frame 0 is the prompted conditioning frame (features +
    `no_mem_embed`); later frames attend the memory bank and get a prompt-less decoder call.
    A mask prompt on frame 0 (mask_in [1, S, S] binary) follows `_use_mask_as_output` as
    `pam_jax.pam.model.image_regions` documents (raw features, dense mask prompt, the mask is
    the output)."""
    from pam_jax.sam2.memory import insert_memory, prepare_memory_conditioned_features
    from pam_jax.sam2.model import NO_OBJ_SCORE
    from pam_jax.sam2.tracker import encode_memory, frame_features

    sam2 = merge(structure, leaves)
    cfg = sam2.config
    feats = frame_features(sam2, normalize_device(image_u8)[None])
    _, h, w, c = feats.vision.shape
    dense = has = None
    if is_cond and mask_in is not None:
        pix = feats.vision
        dense = sam2.mask_downsample(mask_in[..., None].astype(jnp.float32)).astype(jnp.float32)
        has = jnp.ones((1,), bool)
    elif is_cond:
        pix = feats.vision + sam2.no_mem_embed[...].reshape(1, 1, 1, c)
    else:
        pix = prepare_memory_conditioned_features(
            sam2.memory_attention, bank, cfg, frame_idx, num_frames,
            feats.vision.reshape(1, h * w, c), feats.pos.reshape(h * w, c),
            sam2.maskmem_tpos_enc[...], sam2.obj_ptr_tpos_proj, False,
        ).reshape(1, h, w, c).astype(jnp.float32)  # fmt: skip
    token_valid = sam2.sam_prompt_encoder.sparse_valid(valid, pad=True)
    out = sam2.decode_prompts(
        pix, feats.high_res, coords, labels, token_valid, dense, has,
        multimask_output=False, dynamic_multimask=False,
    )  # fmt: skip
    obj = out.object_score_logits  # [1, 1]
    low = jnp.where(obj[:, :, None] > 0, out.masks[:, 0], NO_OBJ_SCORE).astype(jnp.float32)
    ptr = sam2.obj_ptr_proj(out.sam_tokens_out[:, 0]).astype(jnp.float32)
    lam = (obj > 0).astype(jnp.float32)
    no_ptr = sam2.no_obj_ptr[...].astype(jnp.float32)
    ptr = lam * ptr + (1 - lam) * no_ptr
    if is_cond and mask_in is not None:
        m = mask_in.astype(jnp.float32)
        low = resize_bilinear(m * 20.0 - 10.0, low.shape[-2:], True, axes=(-2, -1))
        present = jnp.any(m > 0, axis=(1, 2))[:, None].astype(jnp.float32)
        ptr = present * ptr + (1 - present) * no_ptr
        obj = 20.0 * present - 10.0
    if is_cond:  # binarized mask (prompted frame), rounded to bf16 like the fork
        mem = encode_memory(sam2, feats.vision, low, obj, jnp.ones((1,), bool))
    else:
        mem = _encode_memory_f32(sam2, feats.vision, low, obj, False)
    bank = insert_memory(bank, frame_idx, mem, ptr, is_cond)
    video = resize_bilinear(low, video_hw, False, axes=(-2, -1))[0] > 0
    return bank, video, obj[0, 0], out.mid_image_embed[0], out.mid_mask_tokens[0]


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


def _video_bank(cfg):
    from pam_jax.sam2.memory import init_memory_bank

    bank = init_memory_bank(cfg, 1, num_cond=1)
    # tracked frames' memories stay float32 in PAM's fork: a float32 ring buffer keeps them
    return bank.replace(recent_feats=bank.recent_feats.astype(jnp.float32))


def _mask_box(mask: np.ndarray) -> list[float] | None:
    """The xyxy bounding box of a bool mask (the streaming notebook's re-prompt box)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _video_inputs(self: PAMPredictor, frames, region, task, lang, history) -> VideoInputs:
    if not len(frames):
        raise ValueError("a video needs at least one frame")
    size = self.image_size
    pre = [preprocess_frame(f, size) for f in frames]  # PIL resize per frame, as the loader
    h, w = pre[0][1], pre[0][2]
    if any((fh, fw) != (h, w) for _, fh, fw in pre):
        raise ValueError("all frames of a video must have the same size")
    coords, labels, valid = region_prompts([region], (h, w), size)
    mask_in, _ = region_masks([region], size)
    none_c = np.zeros_like(coords)
    none_l = -np.ones_like(labels)
    none_v = np.zeros_like(valid)
    none_v[:, 0] = True  # the official (0, 0) / -1 placeholder point of a prompt-less call
    n = len(pre)
    chosen = assembly.select_frames(n, self.model.config.num_frames)
    wanted = set(chosen.tolist())
    bank = _video_bank(self.model.sam2.config)
    masks, scores, taps = [], [], {}
    for f, (img, _, _) in enumerate(pre):  # tracking is sequential: one jitted step per frame
        cond = f == 0
        c, lab, v = (coords, labels, valid) if cond else (none_c, none_l, none_v)
        bank, m, s, emb, tok = _video_step(
            self._sam2.structure, self._sam2.leaves, bank, img, c, lab, v, np.int32(f), np.int32(n),
            mask_in if cond else None, is_cond=cond, video_hw=(h, w),
        )  # fmt: skip
        # left on the device so the next frame is queued without a host sync (bool masks at
        # video size: about 2 MB per 1080p frame until the loop ends)
        masks.append(m)
        scores.append(s)
        if f in wanted:
            taps[f] = (emb, tok)
    embeds = jnp.stack([taps[int(f)][0] for f in chosen])
    tokens = jnp.stack([taps[int(f)][1] for f in chosen])
    visual = _video_visual(self._parts.structure, self._parts.leaves, embeds, tokens)[None]
    llm_in = self.llm_inputs(visual, task, lang, history)
    masks = np.stack([np.asarray(m) for m in masks])
    return VideoInputs(llm_in, masks, np.asarray([float(s) for s in scores]), chosen)


@partial(jax.jit, static_argnames=("structure",))
def _video_visual(structure, leaves, embeds, tokens):
    return merge(structure, leaves).video_visual_embeds(embeds, tokens)
