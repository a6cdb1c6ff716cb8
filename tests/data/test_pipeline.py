"""The grain pipeline: determinism, exact resume (in-process and, through orbax, in a new
process), disjoint per-process shares, mixture proportions, JSONL read in place."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pam_jax.data.pipeline import make_dataset, read_mixture, select_indices
from pam_jax.data.prepare import prepare
from pam_jax.data.preprocess import PreprocessConfig

from .conftest import image_record, video_record, write_image, write_jsonl

N = 10
CFG = PreprocessConfig(image_size=16, num_visual=5, num_visual_video=9, num_frames=4)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    root = d / "images"
    for i in range(N):
        write_image(root / f"img{i}.jpg", seed=i)
    rows = [image_record(f"img{i}.jpg", id=f"r{i}") for i in range(N)]
    jsonl = write_jsonl(d / "a.jsonl", rows)
    prepare([jsonl], root, d / "ds")
    return d


def _ds(spec, tokenizer, **kw):
    kw = {"cfg": CFG, "batch_size": 4, "seed": 3, "num_threads": 2, **kw}
    return make_dataset(spec, tokenizer=tokenizer, **kw)


def digest(batch) -> str:
    h = hashlib.sha256()
    for f in dataclasses.fields(batch):
        h.update(np.ascontiguousarray(getattr(batch, f.name)).tobytes())
    return h.hexdigest()


def test_deterministic_epoch_with_padded_last_batch(dataset, tokenizer):
    kw = dict(shuffle=False, augment=False, num_epochs=1)
    a = list(_ds(dataset / "ds", tokenizer, **kw))
    b = list(_ds(dataset / "ds", tokenizer, **kw))
    assert [digest(x) for x in a] == [digest(x) for x in b]
    assert [x.record_index.tolist() for x in a] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, -1, -1]]
    assert a[2].example_valid.tolist() == [True, True, False, False]
    assert all(x.text_ids.shape == a[0].text_ids.shape for x in a)  # one length bucket
    assert all((x.prompt_labels[x.example_valid][:, :2] == [2, 3]).all() for x in a)  # boxes


def test_resume_continues_with_the_next_batch(dataset, tokenizer):
    kw = dict(shuffle=True, augment=True)
    it = iter(_ds(dataset / "ds", tokenizer, **kw))
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [digest(next(it)) for _ in range(2)]
    it2 = iter(_ds(dataset / "ds", tokenizer, **kw))
    it2.set_state(state)
    assert [digest(next(it2)) for _ in range(2)] == want


RESTORE = """
import sys, hashlib, dataclasses
sys.path.insert(0, {tests!r})
import numpy as np, orbax.checkpoint as ocp, grain
from data.conftest import make_tokenizer
from data.test_pipeline import _ds, digest
it = iter(_ds({spec!r}, make_tokenizer(), shuffle=True, augment=True))
mngr = ocp.CheckpointManager({ckpt!r})
mngr.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(it)))
print("DIGEST", digest(next(it)))
"""


def test_orbax_restore_in_a_new_process(dataset, tokenizer, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    it = iter(_ds(dataset / "ds", tokenizer, shuffle=True, augment=True))
    for _ in range(3):
        next(it)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    mngr.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    want = digest(next(it))
    tests = str(Path(__file__).parents[1])
    code = RESTORE.format(tests=tests, spec=str(dataset / "ds"), ckpt=str(tmp_path / "ckpt"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"DIGEST {want}" in out.stdout


def test_two_processes_read_disjoint_halves(dataset, tokenizer):
    seen = []
    for pi in range(2):
        ds = _ds(dataset / "ds", tokenizer, process_index=pi, process_count=2, num_epochs=1)
        seen.append([i for b in ds for i in b.record_index[b.example_valid].tolist()])
    assert len(seen[0]) == len(seen[1]) == N // 2
    assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(N))
    assert seen[0] != sorted(seen[0]) or seen[1] != sorted(seen[1])  # shuffled


def test_finite_shares_have_equal_batch_counts(dataset, tokenizer):
    # 10 records over 3 processes: shares of 4, 3, 3 (+1 filler) -> every process 2 batches of 3
    seen, nbatches = [], []
    for pi in range(3):
        batches = list(_ds(dataset / "ds", tokenizer, batch_size=3, process_index=pi,
                           process_count=3, num_epochs=1))  # fmt: skip
        nbatches.append(len(batches))
        seen += [i for b in batches for i in b.record_index[b.example_valid].tolist()]
        for b in batches:  # filler rows carry no labels, no lengths, no record index
            bad = ~b.example_valid
            assert (b.labels[bad] == -100).all() and (b.record_index[bad] == -1).all()
            assert not b.mask[bad].any() and (b.num_visual[bad] == 0).all()
    assert nbatches == [2, 2, 2] and sorted(seen) == list(range(N))


def test_mixture_yaml_counts_and_weights(dataset, tokenizer, tmp_path):
    y = tmp_path / "mix.yaml"
    y.write_text(
        f"datasets:\n  - json_path: {dataset / 'ds'}\n    sampling_strategy: first:4\n"
        f"  - json_path: {dataset / 'ds'}\n    sampling_strategy: end:30%\n"
    )
    assert [e.sampling_strategy for e in read_mixture(y)] == ["first:4", "end:30%"]
    rows = [
        (s, r)
        for b in _ds(y, tokenizer, num_epochs=1)
        for s, r in zip(b.source_index[b.example_valid], b.record_index[b.example_valid])
    ]
    assert sorted(rows) == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 7), (1, 8), (1, 9)]
    y.write_text(
        f"datasets:\n  - json_path: {dataset / 'ds'}\n    weight: 3\n"
        f"  - json_path: {dataset / 'a.jsonl'}\n    weight: 1\n"
        f"    image_root: {dataset / 'images'}\n"
    )
    it = iter(_ds(y, tokenizer, batch_size=8))
    counts = Counter(int(s) for _ in range(25) for s in next(it).source_index)
    assert abs(counts[0] / 200 - 0.75) < 0.05  # 3 : 1 by weight


def test_select_indices_release_strategies():
    rng = np.random.default_rng(0)
    assert select_indices(10, "all", rng).tolist() == list(range(10))
    assert select_indices(10, "first:3", rng).tolist() == [0, 1, 2]
    assert select_indices(10, "end:25%", rng).tolist() == [7, 8, 9]  # ceil(2.5)
    r = select_indices(10, "random:4", rng)
    assert len(set(r.tolist())) == 4 and r.max() < 10
    with pytest.raises(ValueError, match="sampling_strategy"):
        select_indices(10, "last:3", rng)


def test_jsonl_in_place_with_videos(tmp_path, tokenizer):
    root = tmp_path / "images"
    for i in range(6):
        write_image(root / "vid" / f"{i:05d}.jpg", seed=i)
    write_image(root / "img0.jpg")
    rows = [video_record(), image_record("img0.jpg"), image_record("missing.jpg")]
    jsonl = write_jsonl(tmp_path / "v.jsonl", rows)
    ds = _ds((str(jsonl), str(root)), tokenizer, num_epochs=1, shuffle=False, augment=False)
    assert ds.num_sources == 1 and ds.source_names == [str(jsonl)]
    (b,) = list(ds)
    assert b.pixels.shape == (4, 4, 16, 16, 3) and b.is_video.tolist() == [
        True,
        False,
        False,
        False,
    ]
    assert b.num_visual.tolist() == [9, 5, 0, 0] and b.example_valid.sum() == 2
    assert b.is_visual.sum(1).tolist() == [9, 5, 0, 0]


def test_weighted_mixture_resume_continues_with_the_next_batch(dataset, tokenizer, tmp_path):
    y = tmp_path / "mix.yaml"
    y.write_text(
        f"datasets:\n  - json_path: {dataset / 'ds'}\n    weight: 2\n"
        f"  - json_path: {dataset / 'ds'}\n    sampling_strategy: first:3\n    weight: 1\n"
    )
    it = iter(_ds(y, tokenizer, shuffle=True, augment=True))
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    want = [digest(next(it)) for _ in range(2)]
    it2 = iter(_ds(y, tokenizer, shuffle=True, augment=True))  # a fresh pipeline
    it2.set_state(state)
    assert [digest(next(it2)) for _ in range(2)] == want
