"""The training / evaluation input pipeline: sources -> grain -> static-shape `Batch`es.

    ds = make_dataset("data/refcoco", tokenizer=tok, cfg=PreprocessConfig(), batch_size=8, seed=0)
    it = iter(ds)
    batch = next(it)                 # pam_jax.data.batch.Batch
    state = it.get_state()           # or orbax: grain.checkpoint.CheckpointSave(it)
    it.set_state(state)              # continues with exactly the next batch

`spec` is a prepared dataset folder, a JSONL file (read in place, with `image_root`), or a
mixture YAML in the release's format:

    datasets:
      - json_path: refcoco.jsonl        # or a prepared dataset folder (relative to the YAML)
        sampling_strategy: all          # all | first:N | end:N | random:N | any of these with N%
        weight: 2.0                     # pam-jax extension (optional)
        image_root: images/             # pam-jax extension (optional; else the image_root arg)

Without weights the selected records are concatenated (the release: proportions by counts);
with weights on every entry, each entry is shuffled and repeated on its own and drawn with
those proportions (`grain.MapDataset.mix`; an infinite stream).

Order of operations: global shuffle (seeded; a new order each epoch) -> repeat -> per-record
preprocessing (augmentation seeded by the global position, so it does not depend on the
process count) -> this process's share `[process_index::process_count]` -> threads ->
batches. Over an epoch the processes read disjoint shares whose union is every record.
`augment=False, shuffle=False` is fully deterministic.

Packing (`pack=True`, off by default): instead of `batch_size` samples a batch, samples are
placed in stream order by greedy first-fit (`pam_jax.data.batch.FirstFit`) into `batch_size`
rows of the largest length bucket, at most `pack_max` a row; the first sample that fits no row
closes the batch and opens the next one (`collate_packed` layout: segment ids, one visual block
per sample). The iterator state is the upstream state before that carried sample, so a restored
iterator continues with exactly the next batch. A batch then holds a varying number of samples,
so processes of a finite stream would get different batch counts: packing needs an endless
stream (or one process) there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pam_jax.data.batch import collate
from pam_jax.data.preprocess import PreprocessConfig, make_example
from pam_jax.data.source import (
    JsonlSource,
    dataset_report,
    is_dataset_dir,
    load_element,
    open_source,
)

STRATEGIES = ("all", "first", "end", "random")


@dataclasses.dataclass(frozen=True)
class MixtureEntry:
    path: str
    sampling_strategy: str = "all"
    weight: float | None = None
    image_root: str | None = None


def read_mixture(path: str | os.PathLike) -> list[MixtureEntry]:
    """The release's mixture YAML (`datasets:` list) -> entries; paths relative to the YAML."""
    import yaml

    p = Path(path)
    doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("datasets"), list)
        or not doc["datasets"]
    ):
        raise ValueError(f"{p}: a mixture YAML needs a non-empty `datasets:` list")
    out = []
    for i, d in enumerate(doc["datasets"]):
        if not isinstance(d, dict) or "json_path" not in d:
            raise ValueError(f"{p}: datasets[{i}] needs a json_path")
        unknown = set(d) - {"json_path", "sampling_strategy", "weight", "image_root"}
        if unknown:
            raise ValueError(f"{p}: datasets[{i}] has unknown keys {sorted(unknown)}")

        def rel(x):
            return None if x is None else str(x if Path(x).is_absolute() else p.parent / x)

        w = d.get("weight")
        out.append(
            MixtureEntry(
                rel(d["json_path"]),
                str(d.get("sampling_strategy", "all")),
                None if w is None else float(w),
                rel(d.get("image_root")),
            )
        )
        select_indices(10, out[-1].sampling_strategy, np.random.default_rng(0))  # check syntax
    if len({e.weight is None for e in out}) > 1:
        raise ValueError(f"{p}: give a weight to every dataset or to none")
    if any(e.weight is not None and not e.weight > 0 for e in out):
        raise ValueError(f"{p}: weights must be positive")
    return out


def select_indices(n: int, strategy: str, rng: np.random.Generator) -> np.ndarray:
    """The release's `sampling_strategy` over n records: all, first:N, end:N, random:N, with N
    a count or a percentage (ceil(N% of n))."""
    name, _, num = strategy.partition(":")
    if name not in STRATEGIES or (name == "all") != (num == ""):
        raise ValueError(f"bad sampling_strategy {strategy!r} (all, first:N, end:N, random:N[%])")
    if name == "all":
        return np.arange(n)
    try:
        k = math.ceil(int(num[:-1]) * n / 100) if num.endswith("%") else int(num)
    except ValueError:
        raise ValueError(f"bad sampling_strategy {strategy!r}: N must be an integer") from None
    k = max(0, min(k, n))
    if name == "first":
        return np.arange(k)
    if name == "end":
        return np.arange(n - k, n)
    return np.sort(rng.permutation(n)[:k])


def parse_spec(spec: Any, image_root: str | os.PathLike | None = None) -> list[MixtureEntry]:
    """A spec -> mixture entries: a path (dataset folder, JSONL, mixture YAML), a
    (JSONL, image_root) pair, a MixtureEntry, or a list of these."""
    if isinstance(spec, MixtureEntry):
        return [spec]
    if isinstance(spec, tuple) and len(spec) == 2 and str(spec[0]).endswith(".jsonl"):
        if spec[1] is None or (Path(spec[1]).is_dir() and not is_dataset_dir(spec[1])):
            return [
                MixtureEntry(str(spec[0]), image_root=None if spec[1] is None else str(spec[1]))
            ]
    if isinstance(spec, list | tuple):
        return [e for s in spec for e in parse_spec(s, image_root)]
    p = Path(spec)
    root = None if image_root is None else str(image_root)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return [
            e if e.image_root else dataclasses.replace(e, image_root=root) for e in read_mixture(p)
        ]
    return [MixtureEntry(str(p), image_root=root)]


class _Selected:
    """(component, record index, element) for the selected records of one source."""

    def __init__(self, src: Any, index: np.ndarray, component: int):
        self.src, self.index, self.component = src, index, component

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        j = int(self.index[i])
        return self.component, j, self.src[j]


def _check_size(entry: MixtureEntry, cfg: PreprocessConfig) -> None:
    if is_dataset_dir(entry.path):
        stored = dataset_report(entry.path).get("image_size")
        if stored is not None and stored != cfg.image_size:
            warnings.warn(
                f"{entry.path} was prepared at --image-size {stored}, read at image_size "
                f"{cfg.image_size}: pictures are resized twice (not the release's pixels)",
                stacklevel=3,
            )


def _kinds(entry: MixtureEntry, src: Any) -> set[str]:
    if isinstance(src, JsonlSource):
        return {r.kind for r in src.records}
    if is_dataset_dir(entry.path):
        return {k for k, v in dataset_report(entry.path).get("written_by_kind", {}).items() if v}
    return {"image", "video"}


def _preprocess(item, rng=None, *, tokenizer, cfg):
    component, index, element = item
    record, frames = load_element(element)
    return make_example(record, frames, tokenizer, cfg, rng), component, index


def _flag(item, valid: bool):
    return (*item, valid)


def _collate(items, *, batch_size, **kw):
    return collate(
        [x[0] for x in items],
        batch_size=batch_size,
        source_index=[x[1] for x in items],
        record_index=[x[2] for x in items],
        row_valid=[x[3] for x in items],
        **kw,
    )


def make_dataset(
    spec: Any,
    *,
    tokenizer: Any,
    cfg: PreprocessConfig,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    augment: bool | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    image_root: str | os.PathLike | None = None,
    seq_bucket: int | Sequence[int] = 64,
    num_points: int | None = None,
    drop_remainder: bool | None = None,
    num_threads: int = 4,
    prefetch: int | None = None,
    worker_count: int = 0,
    pack: bool = False,
    pack_max: int = 4,
):
    """A grain IterDataset of `Batch`es (see module doc). `batch_size` is per process.

    augment: overrides cfg.augment when given. num_epochs: None = endless. drop_remainder:
    default True when endless; a finite stream's last batch is padded (example_valid False),
    and every process gets the same number of batches (a short share is topped up with rows
    marked not valid), so multi-host evaluation loops stay in step.
    num_points: fixed prompt width (default 4 when augmenting, else the batch's power-of-two
    bucket). prefetch: samples prepared ahead (default max(2 x batch, 2 x threads)).
    worker_count > 0 adds grain worker processes (`mp_prefetch`, spawned: each imports pam_jax
    and opens the sources, seconds per worker before the first batch); `num_threads` and
    `prefetch` are then split over the workers (each one's own thread pool reads its slice),
    so W workers do not start W x num_threads decode threads. Close a worker-mode iterator
    (`it.close()`) when done: else interpreter exit joins the workers one by one.
    pack: first-fit packing of up to `pack_max` samples a row (module doc; seq_bucket must then
    be a list of lengths, rows are filled up to the largest). The dataset carries
    `num_sources` and `source_names` (the mixture components `Batch.source_index` counts)."""
    import grain

    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if augment is not None:
        cfg = dataclasses.replace(cfg, augment=bool(augment))
    if pack:
        if isinstance(seq_bucket, int):
            raise ValueError("pack=True needs seq_bucket as a list of row lengths (e.g. [4096])")
        if pack_max < 1:
            raise ValueError(f"pack_max must be >= 1, got {pack_max}")
        if num_epochs is not None and process_count > 1:
            raise ValueError(
                "pack=True with several processes needs an endless stream (num_epochs=None): "
                "packed batch counts differ per process"
            )
    entries = parse_spec(spec, image_root)
    weighted = entries[0].weight is not None
    parts, kinds = [], set()
    for k, e in enumerate(entries):
        src = open_source(e.path, e.image_root)
        idx = select_indices(len(src), e.sampling_strategy, np.random.default_rng([seed, k]))
        if len(idx) == 0:
            bad = len(getattr(src, "skipped", ()))
            raise ValueError(
                f"{e.path}: no records selected ({e.sampling_strategy}; {len(src)} good records"
                + (f", {bad} bad ones skipped" if bad else "")
                + ")"
            )
        kinds |= _kinds(e, src)
        _check_size(e, cfg)
        parts.append(grain.MapDataset.source(_Selected(src, idx, k)))
    if weighted:
        if num_epochs is not None:
            raise ValueError("a weighted mixture is an endless stream; leave num_epochs unset")
        parts = [
            (p.shuffle(seed=seed + 7919 * k) if shuffle else p).repeat()
            for k, p in enumerate(parts)
        ]
        ds = grain.MapDataset.mix(parts, weights=[e.weight for e in entries])
    else:
        ds = grain.MapDataset.concatenate(parts) if len(parts) > 1 else parts[0]
        if shuffle:
            ds = ds.shuffle(seed=seed)
        ds = ds.repeat(num_epochs)
    fn = functools.partial(_preprocess, tokenizer=tokenizer, cfg=cfg)
    ds = ds.random_map(fn, seed=seed) if cfg.augment else ds.map(fn)
    finite = num_epochs is not None
    share = ds[process_index::process_count].map(functools.partial(_flag, valid=True))
    if finite:  # every process gets ceil(n / count) rows (so the same number of batches): a
        # short share is topped up with a repeat of its first record, marked not valid
        short = -(-len(ds) // process_count) - len(share)
        if short:
            extra = ds[:short].map(functools.partial(_flag, valid=False))
            share = grain.MapDataset.concatenate([share, extra])
    ds = share
    if drop_remainder is None:
        drop_remainder = not finite
    if num_points is None and cfg.augment:
        num_points = max(cfg.max_image_points, cfg.max_video_points, 2)
    if prefetch is None:  # samples are MBs (a 16-frame video at 1024: 48 MB): keep few ahead
        prefetch = max(2 * batch_size, 2 * num_threads)
    if worker_count > 0:  # per worker (each worker runs this read stage on its slice)
        num_threads = max(1, num_threads // worker_count)
        prefetch = max(2, -(-prefetch // worker_count))
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    )
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults suffice)
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    collate_kw = dict(
        seq_bucket=seq_bucket,
        num_frames=cfg.num_frames if "video" in kinds else 1,
        num_points=num_points,
    )
    if pack:
        from pam_jax.data.packing import PackIterDataset

        # one visual block per slot of the model's length: the video one when F > 1
        block = cfg.num_visual_video if collate_kw["num_frames"] > 1 else cfg.num_visual
        out = PackIterDataset(
            it, batch_size=batch_size, capacity=max(seq_bucket), pack_max=pack_max,
            drop_remainder=drop_remainder, collate_kw={**collate_kw, "block": block},
        )  # fmt: skip
    else:
        out = it.batch(
            batch_size,
            drop_remainder=drop_remainder,
            batch_fn=functools.partial(_collate, batch_size=batch_size, **collate_kw),
        )
    out.num_sources = len(entries)  # mixture components (Batch.source_index in [0, n))
    out.source_names = [e.path for e in entries]
    return out
