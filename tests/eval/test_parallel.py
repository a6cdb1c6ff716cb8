"""Data-parallel evaluation: the process shards, their part files, the merge and resuming
after a kill (a stand-in runner in threads: the bookkeeping alone, fast); the tiny PAM with
each batch sharded over 8 fake CPU devices == one device; two jax.distributed processes (CPU
collectives) == one process (subprocesses, tests/eval/dp_check.py)."""

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pam_jax.evaluation.formats import Event, Item
from pam_jax.evaluation.runner import (
    PREDICTIONS,
    part_files,
    process_shard,
    read_predictions,
    run_predictions,
)

CHECK = Path(__file__).with_name("dp_check.py")


def _items():
    """9 regions over 4 images (3, 3, 2, 1) and a stream item of 2 events."""
    out = [
        Item(f"r{k}", "image", "recognize", (f"/img/{'abcd'[k % 4] if k < 8 else 'a'}.png",),
             {"box": [0, 0, 1, 1]}, ("x",))
        for k in range(9)
    ]  # fmt: skip
    ev = tuple(Event(f"s#{k}", ("/v/0.png",), (0, 0, 1, 1), "y") for k in range(2))
    out.append(Item("s", "stream", "stream-caption", ("/v/0.png",), {}, events=ev))
    return out


class FakeRunner:
    """`Runner.predict`'s contract without a model: one group per item, pred = f(id); counts
    every id it predicts."""

    def __init__(self, seen):
        self.seen = seen

    def predict(self, items):
        for it in items:
            ids = it.prediction_ids()
            self.seen.extend(ids)
            yield 1, [{"id": i, "pred": f"p({i})"} for i in ids]


class Killed(Exception):
    pass


def _killer(after):
    def on_group(n):
        if n >= after:
            raise Killed

    return on_group


def _together(out, count, seen, **kw):
    """`count` processes as threads, with a real barrier between them."""
    bar = threading.Barrier(count, timeout=60)
    errors = []

    def one(rank):
        try:
            run_predictions(FakeRunner(seen), _items(), out, progress=False,
                            process=(rank, count), barrier=lambda _: bar.wait(), **kw)  # fmt: skip
        except Exception as e:  # noqa: BLE001  (re-raised below in the test thread)
            errors.append(e)

    threads = [threading.Thread(target=one, args=(r,)) for r in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_shards_disjoint_cover_and_keep_images_together():
    items = _items()
    for count in (1, 2, 3):
        shards = [process_shard(items, r, count) for r in range(count)]
        ids = [it.id for s in shards for it in s]
        assert sorted(ids) == sorted(it.id for it in items)  # every item once
        for s in shards:  # an image's regions never split between processes
            imgs = {it.media[0] for it in s if it.kind == "image"}
            assert all(it in s for it in items if it.kind == "image" and it.media[0] in imgs)
    # deterministic: the same shard from the items in another order (a restart re-reads them)
    again = {it.id for it in process_shard(items[::-1], 1, 2)}
    assert again == {it.id for it in process_shard(items, 1, 2)}


def test_two_processes_merge_and_resume(tmp_path):
    want = {i: {"id": i, "pred": f"p({i})"} for it in _items() for i in it.prediction_ids()}
    # one clean run of two processes: merged into predictions.jsonl, in data order, no parts left
    seen = []
    _together(tmp_path / "clean", 2, seen)
    lines = (tmp_path / "clean" / PREDICTIONS).read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == list(want)
    assert read_predictions(tmp_path / "clean" / PREDICTIONS) == want
    assert not part_files(tmp_path / "clean") and sorted(seen) == sorted(want)

    # both processes killed mid-run (process 1 while writing a line), restarted as two
    out, seen = tmp_path / "killed", []
    for rank, after in ((0, 2), (1, 1)):
        with pytest.raises(Killed):
            run_predictions(FakeRunner(seen), _items(), out, progress=False,
                            process=(rank, 2), on_group=_killer(after))  # fmt: skip
    parts = part_files(out)
    assert [p.name for p in parts] == ["predictions.part0.jsonl", "predictions.part1.jsonl"]
    first = len(seen)
    with open(parts[1], "a") as f:
        f.write('{"id": "r1", "pred": "half a li')
    _together(out, 2, seen)
    assert read_predictions(out / PREDICTIONS) == want
    assert not part_files(out)
    # nothing predicted twice: the finished ids of the killed run were skipped
    assert sorted(seen) == sorted(want) and len(seen) > first
    assert len((out / PREDICTIONS).read_text().splitlines()) == len(want)

    # killed as two, restarted as one process: the parts are folded in, the rest predicted
    out, seen = tmp_path / "two_then_one", []
    for rank in (0, 1):
        with pytest.raises(Killed):
            run_predictions(FakeRunner(seen), _items(), out, progress=False,
                            process=(rank, 2), on_group=_killer(1))  # fmt: skip
    stats = run_predictions(FakeRunner(seen), _items(), out, progress=False, process=(0, 1))
    assert stats["n_done_before"] == 2 and sorted(seen) == sorted(want)
    assert read_predictions(out / PREDICTIONS) == want and not part_files(out)

    # finished: a rerun with three processes predicts nothing
    seen = []
    _together(out, 3, seen)
    assert seen == [] and read_predictions(out / PREDICTIONS) == want


def _env(**kw):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PAM_JAX_PROGRESS": "0", **kw}
    env["PYTHONPATH"] = os.pathsep.join([str(CHECK.parents[2]), env.get("PYTHONPATH", "")])
    return env


def test_eight_devices_gather_rows(tmp_path):
    """The cheap twin of the next test: on 8 fake CPU devices a Runner pads 3 regions to 8
    generation rows and its jitted gather returns them split over the `data` axis, values
    unchanged (no model: the row bookkeeping and the explicit shardings alone)."""
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    r = subprocess.run([sys.executable, str(CHECK), "gather", str(tmp_path), str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "OK gather" in r.stdout


@pytest.mark.heavy
def test_eight_devices_equal_one(data, tmp_path):
    """The tiny PAM, each batch's generation sharded over 8 fake CPU devices (3 regions per
    batch: 8 rows, 5 of them padding) == the one-device run, texts and masks (about 3 minutes
    of compilation on a busy 2-core box: heavy; the twin above is the default)."""
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    r = subprocess.run([sys.executable, str(CHECK), "devices", str(data), str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "OK 5" in r.stdout


@pytest.mark.heavy
def test_two_processes_equal_one(tiny_pam, data, tmp_path):
    """`evaluate` in two jax.distributed processes (each its shard, process 0 merges and
    scores) == one process: the same predictions.jsonl lines and metrics."""
    from pam_jax.evaluation.api import EvalConfig, evaluate
    from pam_jax.evaluation.runner import DecodeSettings
    from tests.eval.tiny import NEW

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two"
    cmd = [sys.executable, str(CHECK), "process", str(data), str(out), f"localhost:{port}"]
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen([*cmd, str(i), "2"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]  # fmt: skip
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-3000:] for x in logs)
    got = [json.loads(x.split("METRICS ", 1)[1].splitlines()[0]) for x in logs]
    assert got[0] == got[1]  # every process returns process 0's metrics

    model, tok = tiny_pam
    cfg = EvalConfig(data=str(data / "data.jsonl"), format="pam", batch_size=2,
                     decode=DecodeSettings(max_new_tokens=NEW))  # fmt: skip
    one = evaluate(cfg, tmp_path / "one", model=model, tokenizer=tok, progress=False)
    assert read_predictions(out / PREDICTIONS) == read_predictions(tmp_path / "one" / PREDICTIONS)
    assert not part_files(out)
    drop = ("items_per_s",)
    assert {k: v for k, v in got[0].items() if k not in drop} == {
        k: v for k, v in one.items() if k not in drop
    }
