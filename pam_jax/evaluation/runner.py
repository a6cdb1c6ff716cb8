"""Batched PAM inference over evaluation items, appended to `predictions.jsonl` as it goes.

Image items are batched across images: each batch holds up to `batch_size` regions from
several images; SAM 2 + perceiver run per image (all its regions in one call, the region count
padded to a power of two so one program serves every image with that bucket, prompt lengths
bucketed by the predictor), then ONE generation over the batch, its rows padded to
`batch_size` (one compiled decoding program for the whole run). Images are decoded ahead on
host threads. Video items run one SAM 2 tracking pass each; streamed videos run their events in
order, each prompted by its own box and carrying the previous event's prediction as history.

Data parallel: with a `mesh` (`local_mesh()`: every local device on the `data` axis; the model
placed on it, replicated) each batch's generation rows, padded to a multiple of the device
count, are sharded over `data` (padding rows are dropped). Across processes
(`jax.distributed`), each process takes a disjoint, deterministic shard of the items (whole
images, so an image's regions stay together: `process_shard`), appends to its own
`predictions.part<k>.jsonl`, and process 0 merges every part into `predictions.jsonl` once all
have finished.

Resuming: `predictions.jsonl` holds one line per finished id ({"id", "pred"} plus "mask_rle"
for images and "masks_rle" (one RLE per frame) for videos; {"id", "error"} for an item that
could not run: an unreadable image, a prompt outside its image); a restart skips the finished ids
(and drops a half-written last line), so a killed run loses nothing and repeats nothing: a
restart, with any number of processes, skips every id in `predictions.jsonl` or any part file.
Lines are flushed and fsynced per batch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pam_jax.cliutil import CLIError
from pam_jax.evaluation.formats import TASKS, Item, decode_mask, encode_mask

PREDICTIONS = "predictions.jsonl"
PART = "predictions.part{}.jsonl"  # process k's lines in a multi-process run


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
# predictions file


def read_predictions(path: str | os.PathLike, *, repair: bool = False) -> dict[str, dict]:
    """{id: line} of a predictions JSONL. A last line without its newline (a run killed while
    writing) is dropped, and with `repair` cut from the file. A duplicated id or a bad line
    elsewhere is an error naming the line."""
    p = Path(path)
    if not p.is_file():
        return {}
    data = p.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if repair and len(complete) != len(data):
        with open(p, "r+b") as f:
            f.truncate(len(complete))
    out: dict[str, dict] = {}
    for i, line in enumerate(complete.decode("utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} line {i}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
            raise ValueError(f'{p} line {i}: a prediction is {{"id": str, "pred": ...}}')
        if obj["id"] in out:
            raise ValueError(f"{p} line {i}: id {obj['id']!r} appears twice")
        out[obj["id"]] = obj
    return out


def part_files(out_dir: Path) -> list[Path]:
    """Every process's part file in out_dir (any process count), by process index."""
    found = []
    for f in out_dir.glob(PART.format("*")):
        k = f.name[len(PART.split("{")[0]) : -len(PART.split("}")[1])]
        if k.isdigit():
            found.append((int(k), f))
    return [f for _, f in sorted(found)]


def merge_parts(out_dir: Path, order: Sequence[str] = ()) -> dict[str, dict]:
    """Fold every part file into predictions.jsonl (written whole, then renamed; the parts are
    deleted after): one line per id, in `order` first, then the rest as read. An id in several
    files (a stream item redone after a kill) keeps its last line (part files after
    predictions.jsonl, by process index)."""
    merged: dict[str, dict] = {}
    for f in [out_dir / PREDICTIONS, *part_files(out_dir)]:
        merged.update(read_predictions(f))
    known = [i for i in order if i in merged]
    first = set(known)
    rest = [i for i in merged if i not in first]
    tmp = out_dir / (PREDICTIONS + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(merged[i], ensure_ascii=False) + "\n" for i in known + rest))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / PREDICTIONS)
    for f in part_files(out_dir):
        f.unlink()
    return merged


def finished_ids(out_dir: Path) -> set[str]:
    """Every id with a complete line in out_dir's predictions.jsonl or any part file."""
    done: set[str] = set()
    for f in [out_dir / PREDICTIONS, *part_files(out_dir)]:
        done.update(read_predictions(f))
    return done


def pending(items: Sequence[Item], out_dir: str | os.PathLike) -> bool:
    """Whether some item of `items` is not finished in out_dir (any process's file)."""
    done = finished_ids(Path(out_dir))
    return any(i not in done for it in items for i in it.prediction_ids())


def process_shard(items: Sequence[Item], index: int, count: int) -> list[Item]:
    """Process `index` of `count`'s items: whole images (or videos) dealt round-robin in sorted
    order of their path (id for videos), so the shards are disjoint, cover every item, keep an
    image's regions in one process and are the same on every restart."""
    if count == 1:
        return list(items)
    keys = sorted({_shard_key(it) for it in items})
    owner = {k: i % count for i, k in enumerate(keys)}
    return [it for it in items if owner[_shard_key(it)] == index]


def _shard_key(it: Item) -> str:
    return ("i:" + it.media[0]) if it.kind == "image" else ("v:" + it.id)


class PredictionWriter:
    """Appends prediction lines; `write` flushes and fsyncs each group."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, lines: Sequence[dict]) -> None:
        for obj in lines:
            self.f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


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


def _prefetch(groups: Sequence[list[Item]], workers: int = 4) -> Iterator[tuple[list, dict]]:
    """(group, {path: image}) with the images of the next groups decoded on host threads."""
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = []

        def submit(g):
            paths = sorted({it.media[0] for it in g})
            return {p: pool.submit(load_image, p) for p in paths}

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

    def image_group(self, group: Sequence[Item], images: dict[str, np.ndarray]) -> list[dict]:
        """One batch of image items: SAM 2 per image, one padded generation for all regions."""
        from pam_jax.pam.predictor import LLMInputs

        task = group[0].task
        by_image: dict[str, list[int]] = {}
        for i, it in enumerate(group):
            by_image.setdefault(it.media[0], []).append(i)
        masks: dict[int, np.ndarray] = {}
        errors: dict[int, str] = {}
        parts: list[tuple[list[int], Any]] = []
        for path, idx in by_image.items():
            img = images[path]
            if isinstance(img, BaseException):
                errors.update({i: _error(img) for i in idx})
                continue
            try:
                inp = self._image(img, [group[i] for i in idx], task)
            except FAILURES:  # find the bad region(s); the others still run together
                ok = []
                for i in idx:
                    try:
                        self._image(img, [group[i]], task)
                        ok.append(i)
                    except FAILURES as e:
                        errors[i] = _error(e)
                if not ok:
                    continue
                idx = ok
                inp = self._image(img, [group[i] for i in idx], task)
            for j, i in enumerate(idx):
                masks[i] = inp.masks[j]
            parts.append((idx, inp.llm))
        texts: dict[int, str] = {}
        if task != "segment" and parts:
            rows = [(i, k, llm) for idx, llm in parts for k, i in enumerate(idx)]
            # fixed batch (self.rows): one decoding program; padding rows repeat row 0 and
            # are dropped below
            take = [(j, k) for j, (idx, _) in enumerate(parts) for k in range(len(idx))]
            take += [take[0]] * (self.rows - len(take))
            import jax.numpy as jnp

            flat = jnp.concatenate([llm.embeds for _, llm in parts])
            offsets = np.cumsum([0] + [llm.embeds.shape[0] for _, llm in parts])
            emb = self._gather(flat, np.asarray([offsets[j] + k for j, k in take], np.int32))
            lengths = np.asarray([parts[j][1].lengths[k] for j, k in take])
            first = parts[0][1]
            joined = LLMInputs(emb, lengths, emb[:, :0], first.text_before, first.text_after)
            gen = self.pred.generate(joined, self.seed)
            for r, (i, _, _) in enumerate(rows):
                texts[i] = gen[r][0]
        out = []
        for i, it in enumerate(group):
            if i in errors:
                out.append({"id": it.id, "error": errors[i]})
            else:
                out.append(
                    {"id": it.id, "pred": texts.get(i, ""), "mask_rle": encode_mask(masks[i])}
                )
        return out

    def _image(self, img: np.ndarray, items: Sequence[Item], task: str):
        """image_inputs for some regions of one image, their count padded to a power of two
        (one SAM 2 program per bucket; the padding rows repeat the first region)."""
        from pam_jax.sam2.common import pow2_bucket

        regions = [_region(it, img.shape[:2]) for it in items]
        regions += [regions[0]] * (pow2_bucket(len(regions)) - len(regions))
        return self.pred.image_inputs(img, regions, TASKS[task], self.lang)

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
        for group, decoded in _prefetch(_batches(images, self.batch_size)):
            yield len(group), self.image_group(group, decoded)
        for it in items:
            if it.kind == "video":
                yield 1, self.video_item(it)
            elif it.kind == "stream":
                yield 1, self.stream_item(it)


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


def sync_processes(name: str) -> None:
    """Wait until every jax.distributed process reaches `name`."""
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def run_predictions(
    runner: Runner | None,
    items: Sequence[Item],
    out_dir: str | os.PathLike,
    *,
    progress: bool = True,
    on_group: Callable[[int], None] | None = None,
    process: tuple[int, int] | None = None,
    barrier: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Predict every item not yet in out_dir (predictions.jsonl or any part file), appending as
    groups finish. `process` = (index, count) (default: jax's): with several, this process runs
    its `process_shard` into its part file, then (after `barrier`, default a jax.distributed
    sync) process 0 merges the parts into predictions.jsonl; every process returns after the
    merge. Returns {"n_done_before", "n_predicted", "seconds", "items_per_s"} (this process's)."""
    if process is None:
        import jax

        process = (jax.process_index(), jax.process_count())
    rank, count = process
    barrier = barrier or sync_processes
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    order = [i for it in items for i in it.prediction_ids()]
    if count == 1:
        if part_files(out):  # left by a killed multi-process run: fold them in first
            merge_parts(out, order)
        path = out / PREDICTIONS
        done = read_predictions(path, repair=True)
    else:
        path = out / PART.format(rank)
        done = read_predictions(out / PREDICTIONS)
        for f in part_files(out):  # other processes only append ids outside this shard
            done.update(read_predictions(f, repair=f == path))
    mine = process_shard(items, rank, count)
    todo = [it for it in mine if not all(i in done for i in it.prediction_ids())]
    if todo and runner is None:
        raise ValueError(f"{len(todo)} item(s) left to predict and no model to run")
    partial = {i for it in todo for i in it.prediction_ids() if i in done}
    if partial:  # a stream item cut between events: its events are redone together
        own = read_predictions(path)
        keep = [line for k, line in own.items() if k not in partial]
        path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in keep))
    writer = PredictionWriter(path)
    t0 = time.perf_counter()
    n = 0
    try:
        progress = progress and rank == 0 and os.environ.get("PAM_JAX_PROGRESS", "1") != "0"
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="eval", unit="item", dynamic_ncols=True)
        for k, lines in runner.predict(todo) if todo else ():
            writer.write(lines)
            n += k
            if progress:
                bar.update(k)
            if on_group is not None:
                on_group(n)
        if progress:
            bar.close()
    finally:
        writer.close()
    dt = time.perf_counter() - t0
    if count > 1:
        barrier("pam_jax_eval_predicted")
        if rank == 0:
            merge_parts(out, order)
        barrier("pam_jax_eval_merged")
    return {
        "n_done_before": len(mine) - len(todo),
        "n_predicted": n,
        "seconds": dt,
        "items_per_s": n / dt if dt > 0 else 0.0,
    }
