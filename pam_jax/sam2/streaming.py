"""Streaming SAM 2 tracker: frames that arrive one at a time (a generator, a camera)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any

import jax
import numpy as np

from pam_jax.prepared import merge, prepare
from pam_jax.sam2.memory import MemoryBank, init_memory_bank, insert_memory
from pam_jax.sam2.model import NO_OBJ_SCORE, SAM2Base
from pam_jax.sam2.ops import resize_bilinear
from pam_jax.sam2.prompts import Prompt, PromptError, make_prompt, pad_prompts, to_model
from pam_jax.sam2.tracking import INACTIVE, MASK, POINTS, TRACK, StepPrompts
from pam_jax.sam2.video_io import normalize_device, preprocess_frame


def _stream_step_fn(
    structure, leaves, bank: MemoryBank, image_u8, prompts: StepPrompts, frame_idx, num_frames,
    *, video_hw, counter,
):  # fmt: skip
    counter[0] += 1  # runs at trace time only: counts compilations
    model = merge(structure, leaves)
    feats = model.frame_features(normalize_device(image_u8)[None])
    out = model.track_step(feats, prompts, bank, frame_idx, num_frames, encode=True)
    mode = prompts.mode
    is_cond = (mode == POINTS) | (mode == MASK)
    bank = insert_memory(
        bank, frame_idx, out.maskmem_features, out.obj_ptr, is_cond, update=mode != INACTIVE
    )
    video = resize_bilinear(out.pred_masks, video_hw, False, axes=(-2, -1))
    return bank, video, out.object_score_logits[:, 0]


@dataclasses.dataclass
class _Pending:
    """A prompt given with `add_prompt`, checked against the frame size when it is used."""

    points: Any
    labels: Any
    box: Any
    mask: Any


class StreamingTracker:
    """Track objects through frames that arrive one at a time (a generator, a camera).

    Every frame is one call of one jitted function (backbone, memory attention over a
    fixed-capacity bank, SAM heads, memory encoding, bank update: `SAM2Base.track_step`) with
    static shapes: objects occupy `max_objects` slots, prompts are padded to `max_points`
    points, and the bank has `num_cond` conditioning slots (ring buffer: beyond that, the
    oldest prompted frame is dropped), the 6 most recent memories and 15 most recent object
    pointers, each with validity flags. Nothing recompiles as the bank fills, and memory stays
    bounded for any video length.

    Prompts given with `add_prompt` apply to the next frame passed to `step`; an object is
    tracked from its first prompt on. Tracking is causal: a prompt never influences earlier
    frames (the offline predictor, which sees all prompts first, lets a later prompt condition
    earlier frames too). With prompts on the first frame only and `num_frames` set, the results
    equal `SAM2VideoPredictor.propagate_in_video`.
    """

    def __init__(
        self,
        model: SAM2Base,
        max_objects: int = 4,
        *,
        max_points: int = 8,
        num_cond: int = 4,
        num_frames: int | None = None,
    ):
        self.config = model.config
        self.image_size = model.image_size
        self.max_objects = int(max_objects)
        self.max_points = int(max_points)
        self.num_frames = num_frames
        self.set_model(model)
        self.bank = init_memory_bank(self.config, self.max_objects, num_cond=num_cond)
        self.obj_ids: list[Any] = []
        self.frame_idx = 0
        self.video_hw: tuple[int, int] | None = None
        self._pending: dict[int, _Pending] = {}
        self._started = np.zeros(self.max_objects, bool)
        self.compilations = [0]  # traces of the step function (1 after any number of frames)
        donate = ("bank",) if jax.default_backend() != "cpu" else ()
        self._jit = jax.jit(
            partial(_stream_step_fn, counter=self.compilations),
            static_argnames=("structure", "video_hw"),
            donate_argnames=donate,
        )

    def set_model(self, model: SAM2Base) -> None:
        """Run on `model`'s current parameters from the next frame on."""
        self.model = model
        self._prep = prepare(model)

    def add_prompt(
        self, obj_id: Any, points: Any = None, labels: Any = None, box: Any = None, mask: Any = None
    ) -> None:
        """Prompt `obj_id` on the next frame: points [n, 2] + labels [n], and / or a box, in
        video pixels, or a mask [H, W] (bool) at video resolution (`pam_jax.sam2.prompts`
        rules; checked now once the frame size is known, else at the next `step`)."""
        pending = _Pending(points, labels, box, mask)
        if self.video_hw is not None:
            self._prompt(pending, self.video_hw)
        elif points is None and labels is None and box is None and mask is None:
            raise PromptError("empty prompt: give points (with labels), a box or a mask")
        n = (0 if points is None else len(np.asarray(points).reshape(-1, 2))) + (
            2 if box is not None else 0
        )
        if n > self.max_points:
            raise PromptError(f"{n} prompt points (box = 2) > max_points {self.max_points}")
        if obj_id not in self.obj_ids:
            if len(self.obj_ids) >= self.max_objects:
                raise ValueError(f"at most {self.max_objects} objects (max_objects)")
            self.obj_ids.append(obj_id)
        self._pending[self.obj_ids.index(obj_id)] = pending

    def _prompt(self, p: _Pending, hw: tuple[int, int]) -> Prompt:
        prompt = make_prompt(p.points, p.labels, p.box, p.mask, image_hw=hw)
        return to_model(prompt, hw, self.image_size)

    def _step_prompts(self, hw: tuple[int, int]) -> StepPrompts:
        b, s = self.max_objects, self.image_size
        mode = np.full(b, INACTIVE, np.int32)
        mode[: len(self.obj_ids)] = TRACK
        mode[~self._started] = INACTIVE  # declared but not yet prompted
        multimask = np.ones(b, bool)
        empty = Prompt(np.zeros((0, 2), np.float32), np.zeros(0, np.int32))
        rows = [empty] * b
        for slot, p in self._pending.items():
            rows[slot] = self._prompt(p, hw)
            mode[slot] = MASK if rows[slot].is_mask else POINTS
            multimask[slot] = not rows[slot].is_mask and rows[slot].num_points <= 1
        padded = pad_prompts(rows, bucket=self.max_points)
        valid = padded.valid.copy()
        valid[mode < POINTS, 0] = True  # prompt-less rows: the official (0, 0) / -1 point
        masks = padded.mask_inputs
        if masks is None:
            masks = np.zeros((b, s, s), np.float32)
        return StepPrompts(mode, multimask, padded.coords, padded.labels, valid, masks)

    def step(self, frame: Any) -> tuple[int, list[Any], np.ndarray, np.ndarray]:
        """Process the next frame (uint8 [H, W, 3] or PIL image). Returns (frame_idx, obj_ids,
        logits [O, H, W] at video resolution, object score logits [O]) for the objects added so
        far (objects not yet prompted get NO_OBJ_SCORE logits)."""
        img, h, w = preprocess_frame(frame, self.image_size)
        if self.video_hw is None:
            self.video_hw = (h, w)
        elif (h, w) != self.video_hw:
            raise ValueError(
                f"frame is {w}x{h}, the stream is {self.video_hw[1]}x{self.video_hw[0]}"
            )
        prompts = self._step_prompts((h, w))
        nf = self.num_frames if self.num_frames is not None else 2**30
        self.bank, video, scores = self._jit(
            self._prep.structure, self._prep.leaves, self.bank, img, prompts,
            np.int32(self.frame_idx), np.int32(nf), video_hw=self.video_hw,
        )  # fmt: skip
        self._started |= prompts.mode != INACTIVE
        self._pending.clear()
        f = self.frame_idx
        self.frame_idx += 1
        n = len(self.obj_ids)
        video = np.array(video)[:n]  # a writable host copy
        video[~self._started[:n]] = NO_OBJ_SCORE
        return f, list(self.obj_ids), video, np.array(scores)[:n]

    def track(
        self, frames: Iterable[Any]
    ) -> Iterator[tuple[int, list[Any], np.ndarray, np.ndarray]]:
        """`step` over an iterable of frames (prompts must be added before / between frames)."""
        for frame in frames:
            yield self.step(frame)
