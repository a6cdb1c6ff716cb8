"""The predictions file and the run over it: `run_predictions` drives a `runner.Runner`,
resumable and sharded across processes.

Across processes (`jax.distributed`), each process takes a disjoint, deterministic shard of the
items (whole images, so an image's regions stay together: `process_shard`), appends to its own
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

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pam_jax.evaluation.formats import Item

if TYPE_CHECKING:
    from pam_jax.evaluation.runner import Runner

PREDICTIONS = "predictions.jsonl"
PART = "predictions.part{}.jsonl"  # process k's lines in a multi-process run

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
