"""Batched PAM inference over evaluation items (`Runner`); `run_predictions` (in `predictions`,
re-exported here) drives it and appends its lines to `predictions.jsonl`.

Image items are batched across images: each batch holds up to `batch_size` regions from
several images; SAM 2 + perceiver run once for all of them (the images encoded as one batch,
each region reading its image's maps; image and region counts bucketed, prompt lengths bucketed
by the predictor), then ONE generation over the batch, its rows padded to `batch_size` (one
compiled decoding program for the whole run). One batch is in flight: while the device runs
batch k + 1, the host copies batch k's masks, RLE-encodes them and writes its lines; images are
decoded and resized ahead on loader threads, and generations are dispatched from a thread of
their own (see `Runner.__init__`). Video items run one SAM 2 tracking pass each; streamed
videos run their events in order, each prompted by its own box and carrying the previous
event's prediction as history.

Data parallel: with a `mesh` (`local_mesh()`: every local device on the `data` axis; the model
placed on it, replicated) each batch's generation rows, padded to a multiple of the device
count, are sharded over `data` (padding rows are dropped). Across processes: `predictions`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pam_jax.cliutil import CLIError
from pam_jax.evaluation.formats import TASKS, Item, decode_mask, encode_mask
from pam_jax.evaluation.predictions import (
    PART,
    PREDICTIONS,
    PredictionWriter,
    finished_ids,
    merge_parts,
    part_files,
    pending,
    process_shard,
    read_predictions,
    run_predictions,
    sync_processes,
)

# the prediction-file names stay importable from here (`runner.run_predictions`, ...)
__all__ = [
    "FAILURES",
    "PART",
    "PREDICTIONS",
    "DecodeSettings",
    "PredictionWriter",
    "Runner",
    "finished_ids",
    "load_image",
    "local_mesh",
    "merge_parts",
    "part_files",
    "pending",
    "process_shard",
    "read_predictions",
    "run_predictions",
    "sync_processes",
]


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """Decoding: greedy (temperature 0) with the checkpoint's repetition penalty by default."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float | None = None  # None: the checkpoint's generation_config.json
    seed: int = 0

    def resolved(self, tokenizer: Any) -> DecodeSettings:
        """These settings with the repetition penalty filled in from the tokenizer's
        generation config (else 1 = off)."""
        from pam_jax.cliutil import repetition_penalty

        pen = repetition_penalty(self.repetition_penalty, tokenizer)
        return dataclasses.replace(self, repetition_penalty=pen)

    def sampling(self):
        from pam_jax.llm.sampler import SamplingParams

        pen = 1.0 if self.repetition_penalty is None else self.repetition_penalty
        return SamplingParams(self.temperature, self.top_p, self.top_k, pen)


# ---------------------------------------------------------------------------------------------
# inference


def load_image(path: str) -> np.ndarray:
    """RGB uint8 [H, W, 3] decoded as training decodes it (`pam_jax.data.preprocess`): EXIF
    orientation ignored, as the release (benchmark boxes are in the stored pixels). `path` is a
    file or a `formats.StoredFrame` (a prepared dataset's stored bytes)."""
    from PIL import UnidentifiedImageError

    from pam_jax.data.preprocess import decode_image
    from pam_jax.evaluation.formats import StoredFrame

    try:
        data = path.read_bytes() if isinstance(path, StoredFrame) else Path(path).read_bytes()
        return decode_image(data)
    except (UnidentifiedImageError, SyntaxError) as e:
        raise ValueError(f"image {path} is not a readable image ({e})") from None


def _region(item: Item, hw: tuple[int, int]) -> dict[str, Any]:
    """The item's region for the predictor, a mask spec decoded at the image size."""
    r = dict(item.region)
    if r.get("mask") is not None and not isinstance(r["mask"], np.ndarray):
        r["mask"] = decode_mask(r["mask"], hw)
    return r


# what a bad item raises (an unreadable image, a prompt outside the image, a mask of another
# size): the item gets {"id", "error"} and the run goes on; anything else stops the run
FAILURES = (ValueError, OSError, CLIError)


def _error(e: BaseException) -> str:
    from pam_jax.cliutil import error_message

    return error_message(e)


def _batches(items: Sequence[Item], batch_size: int) -> list[list[Item]]:
    """Consecutive items in groups of `batch_size` regions (one task per group)."""
    out: list[list[Item]] = []
    for it in items:
        if out and len(out[-1]) < batch_size and out[-1][0].task == it.task:
            out[-1].append(it)
        else:
            out.append([it])
    return out


def _prefetch(
    groups: Sequence[list[Item]], workers: int = 4, load: Callable[[Any], Any] = load_image
) -> Iterator[tuple[list, dict]]:
    """(group, {path: load(path) or the exception it raised}) with the images of the next
    groups loaded on host threads."""
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = []

        def submit(g):
            paths = sorted({it.media[0] for it in g})
            return {p: pool.submit(load, p) for p in paths}

        ahead = 2
        for g in groups[:ahead]:
            futures.append(submit(g))
        for k, g in enumerate(groups):
            if k + ahead < len(groups):
                futures.append(submit(groups[k + ahead]))
            yield g, {p: f.exception() or f.result() for p, f in futures[k].items()}
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class Runner:
    """Runs a `PAMPredictor` over items; `predict(items)` yields prediction lines per group."""

    def __init__(
        self,
        predictor: Any,
        *,
        batch_size: int,
        lang: str = "en",
        seed: int = 0,
        mesh: Any = None,
    ):
        """`mesh`: shard each batch's generation over its `data` axis (the predictor's model
        must already be placed on it, e.g. `sharding.place(model, mesh)`); None: one device."""
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.pred = predictor
        self.batch_size = batch_size
        self.lang = lang
        self.seed = seed
        self.mesh = mesh
        n = 1 if mesh is None else int(mesh.shape["data"])
        self.rows = -(-batch_size // n) * n  # generation rows: a multiple of the data axis
        self._gather = _gather(mesh)
        # generations are dispatched from their own thread: on GPU a jitted `while_loop` with
        # a data-dependent stop reads its predicate back every step, so the dispatching thread
        # blocks until the decode loop has (nearly) run; from the main thread that would hold
        # the host work of the previous batch (masks, RLE, lines) off the device's idle time.
        # Only where the main thread's programs hold no collectives (see `_thread_safe`):
        # otherwise two threads could launch collective programs in different orders on
        # different devices or processes, and deadlock.
        self._dispatch: Any = _generation_thread() if _thread_safe(predictor) else _Inline()

    def image_group(self, group: Sequence[Item], images: dict[str, Any]) -> list[dict]:
        """One batch of image items: SAM 2 + perceiver for all its images in one call, one
        padded generation for all regions.
        `images`: path -> RGB array, `PreparedImage` or the exception its loading raised."""
        return self.launch_image_group(group, images).finish()

    def launch_image_group(self, group: Sequence[Item], images: dict[str, Any]) -> PendingGroup:
        """`image_group` dispatched to the device without waiting for it: bad items are found
        here (on the host); `finish()` waits for the texts and masks and makes the lines."""
        masks, errors, parts = self._launch_sam2(group, images)
        texts, rows = self._launch_llm(group[0].task, parts)
        return PendingGroup(list(group), masks, errors, texts, rows)

    def _launch_sam2(self, group: Sequence[Item], images: dict[str, Any]):
        """SAM 2 + perceiver for every image of the group in one call, dispatched: (item ->
        (its image's device masks, row), item -> error, [(items, LLMInputs)] per image)."""
        from pam_jax.pam.predictor import PreparedImage
        from pam_jax.sam2.common import pow2_bucket
        from pam_jax.sam2.prompts import pad_regions

        task = group[0].task
        by_image: dict[str, list[int]] = {}
        for i, it in enumerate(group):
            by_image.setdefault(it.media[0], []).append(i)
        errors: dict[int, str] = {}
        runnable: list[tuple[Any, list[int], list[dict]]] = []
        for path, idx in by_image.items():
            img = images[path]
            if not isinstance(img, BaseException | PreparedImage):
                try:  # a caller's raw array (the loader threads prepare theirs)
                    img = self.pred.prepare_image(img)
                except FAILURES as e:
                    img = e
            if isinstance(img, BaseException):
                errors.update({i: _error(img) for i in idx})
                continue
            hw = img.hw
            ok, regions = [], []
            for i in idx:  # bad prompts are found on the host, region by region
                try:
                    r = _region(group[i], hw)
                    pad_regions([r], hw, self.pred.image_size)
                except FAILURES as e:
                    errors[i] = _error(e)
                    continue
                ok.append(i)
                regions.append(r)
            if ok:
                runnable.append((img, ok, regions))
        if len(runnable) == 1:  # one image: its regions padded to a power of two (one program
            regions = runnable[0][2]  # per bucket; several images are padded all together)
            regions += [regions[0]] * (pow2_bucket(len(regions)) - len(regions))
        masks: dict[int, tuple[Any, int]] = {}
        parts: list[tuple[list[int], Any]] = []
        if runnable:
            inps = self.pred.images_inputs(
                [r[0] for r in runnable], [r[2] for r in runnable], TASKS[task], self.lang
            )
            for (_, idx, _), inp in zip(runnable, inps):
                masks.update({i: (inp.masks, j) for j, i in enumerate(idx)})
                parts.append((idx, inp.llm))
        return masks, errors, parts

    def _launch_llm(self, task: str, parts: list[tuple[list[int], Any]]):
        """One padded generation over every region of the group, dispatched on the generation
        thread: (`DispatchedTexts` or None, the item index of each generation row)."""
        if task == "segment" or not parts:
            return None, []
        rows = [i for idx, _ in parts for i in idx]
        return DispatchedTexts(self._dispatch.submit(self._generate, parts)), rows

    def _generate(self, parts: list[tuple[list[int], Any]]) -> Any:
        """(generation thread) gather the group's rows and dispatch their generation."""
        import jax.numpy as jnp

        from pam_jax.pam.predictor import LLMInputs

        # fixed batch (self.rows): one decoding program; padding rows repeat row 0 and are
        # dropped in finish()
        take = [(j, k) for j, (idx, _) in enumerate(parts) for k in range(len(idx))]
        take += [take[0]] * (self.rows - len(take))
        flat = jnp.concatenate([llm.embeds for _, llm in parts])
        offsets = np.cumsum([0] + [llm.embeds.shape[0] for _, llm in parts])
        emb = self._gather(flat, np.asarray([offsets[j] + k for j, k in take], np.int32))
        lengths = np.asarray([parts[j][1].lengths[k] for j, k in take])
        first = parts[0][1]
        joined = LLMInputs(emb, lengths, emb[:, :0], first.text_before, first.text_after)
        return self.pred.generate_async(joined, self.seed)

    def video_item(self, it: Item) -> list[dict]:
        try:
            return self._video_item(it)
        except FAILURES as e:
            return [{"id": it.id, "error": _error(e)}]

    def stream_item(self, it: Item) -> list[dict]:
        try:
            return self._stream_item(it)
        except FAILURES as e:
            return [{"id": ev.id, "error": _error(e)} for ev in it.events]

    def _video_item(self, it: Item) -> list[dict]:
        frames = [load_image(p) for p in it.media]
        region = _region(it, frames[0].shape[:2])
        res = self.pred.describe_video(
            frames, region, "video_caption", self.lang, history=it.history, rng=self.seed
        )
        return [{"id": it.id, "pred": res.text, "masks_rle": [encode_mask(m) for m in res.masks]}]

    def _stream_item(self, it: Item) -> list[dict]:
        out, history = [], None
        for ev in it.events:
            frames = [load_image(p) for p in ev.frames]
            res = self.pred.describe_video(
                frames, {"box": list(ev.box)}, "streaming_caption", self.lang,
                history=history, rng=self.seed,
            )  # fmt: skip
            history = res.text
            out.append({"id": ev.id, "pred": res.text})
        return out

    def predict(self, items: Sequence[Item]) -> Iterator[tuple[int, list[dict]]]:
        """(number of items finished, their prediction lines), group by group."""
        # grouped by task, then image: an image's regions share one SAM 2 call when they fit
        images = sorted(
            (it for it in items if it.kind == "image"), key=lambda it: (it.task, it.media[0])
        )
        # one group in flight: the device runs group k + 1 while the host waits for, encodes
        # and writes group k (its masks' RLE, its texts)
        pending: PendingGroup | None = None
        load = self._load_prepared
        for group, decoded in _prefetch(_batches(images, self.batch_size), load=load):
            launched = self.launch_image_group(group, decoded)
            if pending is not None:
                yield len(pending.group), pending.finish()
            pending = launched
        if pending is not None:
            yield len(pending.group), pending.finish()
        for it in items:
            if it.kind == "video":
                yield 1, self.video_item(it)
            elif it.kind == "stream":
                yield 1, self.stream_item(it)

    def _load_prepared(self, path: Any) -> Any:
        """Decode and resize on a loader thread (both off the device's critical path)."""
        return self.pred.prepare_image(load_image(path))


@dataclasses.dataclass
class DispatchedTexts:
    """A generation submitted to the runner's generation thread; `result()` waits for the
    dispatch (re-raising what it raised), then for the texts."""

    future: Future

    def result(self) -> list[tuple[str, list[int]]]:
        return self.future.result().result()


@dataclasses.dataclass
class PendingGroup:
    """A launched image group (`Runner.launch_image_group`); `finish()` makes its lines."""

    group: list[Item]
    masks: dict[int, tuple[Any, int]]
    errors: dict[int, str]
    texts: Any  # DispatchedTexts, or None (segmentation, or no runnable item)
    rows: list[int]  # the generation's rows: item indices in order

    def finish(self) -> list[dict]:
        texts: dict[int, str] = {}
        if self.texts is not None:
            gen = self.texts.result()
            texts = {i: gen[r][0] for r, i in enumerate(self.rows)}
        host: dict[int, np.ndarray] = {}  # each image's masks, copied once
        out = []
        for i, it in enumerate(self.group):
            if i in self.errors:
                out.append({"id": it.id, "error": self.errors[i]})
                continue
            dev, j = self.masks[i]
            key = id(dev)
            if key not in host:
                host[key] = np.asarray(dev)
            out.append(
                {"id": it.id, "pred": texts.get(i, ""), "mask_rle": encode_mask(host[key][j])}
            )
        return out


class _Inline:
    """An executor running each submitted call at once on the caller's thread."""

    def submit(self, fn: Callable, *args: Any) -> Future:
        f: Future = Future()
        try:
            f.set_result(fn(*args))
        except BaseException as e:  # re-raised by result(), as a thread's would be
            f.set_exception(e)
        return f


@functools.cache
def _generation_thread() -> ThreadPoolExecutor:
    """The one generation-dispatch thread, shared by every Runner (the trainer's evaluator
    makes a Runner per evaluation: one thread each would pile up idle)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="pam-jax-generate")


def _thread_safe(predictor: Any) -> bool:
    """Whether generations may be dispatched from a second thread: one process, and SAM 2,
    the parts and the LLM replicated (or on one device), so that the only programs with
    collectives are the generations (data-parallel rows), all launched in order from that one
    thread. A model sharded over devices or processes (the trainer's live state) keeps every
    dispatch on the calling thread."""
    import jax

    if jax.process_count() > 1:
        return False
    parts = [getattr(predictor, name, None) for name in ("_vision", "_llm")]
    leaves = [x for part in parts if part is not None for x in part.leaves]
    return all(getattr(getattr(x, "sharding", None), "is_fully_replicated", True) for x in leaves)


def _take_rows(flat: Any, index: Any) -> Any:
    return flat[index]


@functools.cache
def _gather(mesh: Any = None) -> Callable:
    """rows = flat[index], jitted; with a mesh, explicit shardings: in replicated, the rows out
    split over `data` (what the generation then runs sharded on)."""
    import jax

    if mesh is None:
        return jax.jit(_take_rows)
    from pam_jax import sharding

    rep = sharding.named_sharding(mesh, None)
    rows = sharding.named_sharding(mesh, ("batch", "length", "act_embed"))
    return jax.jit(_take_rows, in_shardings=(rep, rep), out_shardings=rows)


def local_mesh() -> Any:
    """Every local device of this process on the `data` axis (None with one device)."""
    import jax

    from pam_jax import sharding

    devices = jax.local_devices()
    if len(devices) == 1:
        return None
    return sharding.make_mesh((len(devices), 1, 1), devices=devices)
