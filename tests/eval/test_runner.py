"""The eval runner on the tiny random PAM of tests/eval/tiny.py (fixtures in conftest.py):
batched predictions equal unbatched ones (and the public per-image API); a run killed mid-way
and restarted ends with the same predictions and metrics, nothing duplicated or lost;
`pam-jax eval` end to end, settings recorded and a changed setting refused; predictions-file
scoring reports unknown and missing ids."""

import json

import numpy as np
import pytest
from PIL import Image

from pam_jax.cli import main
from pam_jax.evaluation import formats
from pam_jax.evaluation.runner import (
    PREDICTIONS,
    Runner,
    read_predictions,
    run_predictions,
)
from pam_jax.pam.predictor import PAMPredictor
from tests.eval.tiny import NEW


def _run(model, tok, items, out, batch_size, **kw):
    pred = PAMPredictor(model, tok, max_new_tokens=NEW)
    return run_predictions(Runner(pred, batch_size=batch_size), items, out, progress=False, **kw)


@pytest.fixture(scope="session")
def unbatched(tiny_pam, data, tmp_path_factory):
    """One region per batch (the reference), shared by the tests below."""
    model, tok = tiny_pam
    items = formats.load(data / "data.jsonl", "pam").items
    out = tmp_path_factory.mktemp("b1")
    _run(model, tok, items, out, 1)
    return items, read_predictions(out / PREDICTIONS)


def test_batched_equals_unbatched(tiny_pam, unbatched, tmp_path):
    model, tok = tiny_pam
    items, one = unbatched
    assert [it.task for it in items] == ["recognize"] * 5
    _run(model, tok, items, tmp_path / "b4", 4)  # 2 images per batch, 1-2 regions each
    four = read_predictions(tmp_path / "b4" / PREDICTIONS)
    # grouped by image: a.png's regions r0, r2, r4 first, then b.png's
    assert list(one) == list(four) == ["r0", "r2", "r4", "r1", "r3"]
    assert one == four  # texts and mask RLEs
    # not a vacuous comparison: the two images' regions get different texts
    assert one["r0"]["pred"] != one["r1"]["pred"]
    # and the public per-image API, one region per call
    pred = PAMPredictor(model, tok, max_new_tokens=NEW)
    for it in items[:2]:
        img = np.asarray(Image.open(it.media[0]).convert("RGB"))
        (res,) = pred.describe_image(img, [it.region], "recognize")
        assert res.text == one[it.id]["pred"]
        assert formats.encode_mask(res.mask) == one[it.id]["mask_rle"]


def test_kill_and_resume(tiny_pam, unbatched, data, tmp_path):
    model, tok = tiny_pam
    items, clean = unbatched

    class Killed(Exception):
        pass

    def kill(n):
        if n >= 2:
            raise Killed

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        _run(model, tok, items, out, 1, on_group=kill)
    assert len(read_predictions(out / PREDICTIONS)) == 2
    with open(out / PREDICTIONS, "a") as f:
        f.write('{"id": "r2", "pred": "half a li')  # killed while writing a line
    stats = _run(model, tok, items, out, 1)
    assert stats["n_done_before"] == 2 and stats["n_predicted"] == 3
    lines = (out / PREDICTIONS).read_text().splitlines()
    assert len(lines) == 5 and len({json.loads(x)["id"] for x in lines}) == 5
    got = read_predictions(out / PREDICTIONS)
    assert got == clean
    assert _run(model, tok, items, out, 1)["n_predicted"] == 0  # finished: nothing recomputed
    # the same predictions give the same metrics (exact match; the MiniLM and Java scorers
    # are deterministic functions of the same strings, tested in test_metrics.py)
    from pam_jax.evaluation.metrics import exact_match

    refs = [list(it.refs) for it in items]
    assert exact_match([got[it.id]["pred"] for it in items], refs) == exact_match(
        [clean[it.id]["pred"] for it in items], refs
    )


def _eval(*args):
    return main(["eval", *map(str, args)])


def test_cli_segment_resume_refuse_and_predictions(
    tiny_model_dir, data, tmp_path, capsys, monkeypatch
):
    import pam_jax.pam.model

    model_dir = tiny_model_dir
    loads = []
    real_load = pam_jax.pam.model.load_pam
    monkeypatch.setattr(
        pam_jax.pam.model, "load_pam", lambda *a, **k: loads.append(1) or real_load(*a, **k)
    )
    out = tmp_path / "res"
    base = ["--data", data / "coco.json", "--format", "coco", "--out", out, "--batch-size", 2]
    assert _eval("--model", model_dir, *base) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # the annotation on a missing image is recorded as failed and skipped, not fatal
    assert metrics["n_items"] == 3 and metrics["n_skipped"] == 1
    assert "13: " in (err := capsys.readouterr().err) and "gone.png" in err
    assert len(loads) == 1
    assert 0 <= metrics["mIoU"] <= 1 and 0 <= metrics["cIoU"] <= 1
    assert metrics["task"] == "segment" and metrics["temperature"] == 0.0
    assert (out / "report.md").is_file() and (out / "examples.png").is_file()
    rep = json.loads((out / "report.json").read_text())
    assert any("G-STDC" in x for x in rep["not_run_offline"])
    preds = (out / PREDICTIONS).read_text()
    # the same command again: resumed, nothing recomputed (the model is not even loaded), the
    # same metrics
    assert _eval("--model", model_dir, *base) == 0
    assert (out / PREDICTIONS).read_text() == preds
    again = json.loads((out / "metrics.json").read_text())
    assert {k: again[k] for k in ("mIoU", "cIoU")} == {k: metrics[k] for k in ("mIoU", "cIoU")}
    assert len(loads) == 1
    capsys.readouterr()
    # other decoding settings in the same folder: refused, one line, before loading the model
    assert _eval("--model", model_dir, *base, "--max-new-tokens", 7) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "max_new_tokens" in err and len(loads) == 1
    # scoring a predictions file: an unknown and a missing id are reported
    lines = [json.loads(x) for x in preds.splitlines()]
    assert [x["id"] for x in lines if "error" in x] == ["13"]
    lines[0]["id"] = "nope"
    pf = tmp_path / "p.jsonl"
    pf.write_text("".join(json.dumps(x) + "\n" for x in lines))
    base2 = ["--data", data / "coco.json", "--format", "coco", "--predictions", pf]
    assert _eval(*base2, "--out", tmp_path / "s") == 0
    err = capsys.readouterr().err
    assert "1 item(s) have no prediction" in err and "not in the data" in err
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert m["n_missing"] == 1 and m["n_unknown"] == 1 and m["n_items"] == 2
    assert _eval(*base2, "--out", tmp_path / "s2", "--strict") == 2
    assert "--strict" in capsys.readouterr().err


def test_evaluator_api_for_the_trainer(tiny_pam, data, tmp_path):
    from pam_jax.evaluation.api import EvalConfig, Evaluator

    model, tok = tiny_pam
    cfg = EvalConfig(data=str(data / "coco.json"), format="coco", batch_size=2, limit=2)
    ev = Evaluator(cfg, tok, tmp_path / "eval", tensorboard_dir=tmp_path / "tb")
    got = ev.run(model, step=5)
    assert set(got) >= {"mIoU", "cIoU", "n_items", "n_skipped"} and got["n_items"] == 2
    again = ev.run(model, step=5)  # same step: resumed from its predictions, same numbers
    assert again == got
    log = [json.loads(x) for x in (tmp_path / "eval" / "eval.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [5, 5] and log[0]["mIoU"] == got["mIoU"]
    assert list((tmp_path / "tb").iterdir())  # TensorBoard event file
    assert (tmp_path / "eval" / "step_5" / "report.md").is_file()


@pytest.mark.heavy
def test_video_and_stream_items(tiny_pam, tmp_path):
    """Video items == describe_video; stream events run in order with the previous event's
    prediction as history (about a minute of compilation on 2 CPU cores: heavy)."""
    from tests.eval.tiny import HW, image

    model, tok = tiny_pam
    d = tmp_path / "v"
    d.mkdir()
    frames = [np.roll(image(1), 7 * i, axis=1) for i in range(4)]  # a panning "video"
    for i, f in enumerate(frames):
        Image.fromarray(f).save(d / f"{i:05d}.png")
    names = [f"{i:05d}.png" for i in range(4)]
    rle = formats.encode_mask(np.ones(HW, bool))
    (tmp_path / "v.jsonl").write_text(json.dumps(
        {"id": "obj", "image_root": "v", "frames": names, "box": [10, 8, 60, 70],
         "caption": "x", "masks": [rle] * 4}) + "\n")  # fmt: skip
    (tmp_path / "s.jsonl").write_text(json.dumps(
        {"video_id": "vid", "image_root": "v", "annotations": [
            {"frames": names[:2], "gt": "a", "box": [[10, 8, 50, 62]]},
            {"frames": names[2:], "gt": "b", "box": [[20, 10, 30, 30]]}]}) + "\n")  # fmt: skip
    pred = PAMPredictor(model, tok, max_new_tokens=NEW)
    runner = Runner(pred, batch_size=2)
    (vid,) = formats.load(tmp_path / "v.jsonl", "video").items
    (line,) = runner.video_item(vid)
    want = pred.describe_video(frames, {"box": [10, 8, 60, 70]}, "video_caption")
    assert line["pred"] == want.text and len(line["masks_rle"]) == 4
    assert line["masks_rle"][2] == formats.encode_mask(want.masks[2])
    (st,) = formats.load(tmp_path / "s.jsonl", "stream").items
    lines = runner.stream_item(st)
    assert [x["id"] for x in lines] == ["vid#0", "vid#1"]
    first = pred.describe_video(frames[:2], {"box": [10, 8, 60, 70]}, "streaming_caption")
    second = pred.describe_video(frames[2:], {"box": [20, 10, 50, 40]}, "streaming_caption",
                                 history=first.text)  # fmt: skip
    assert [x["pred"] for x in lines] == [first.text, second.text]


@pytest.mark.heavy
def test_sigkill_and_restart(tiny_model_dir, data, tmp_path):
    """A real `pam-jax eval` process killed (SIGKILL) once predictions start landing, then run
    again: the same predictions and metrics as an uninterrupted run, none duplicated or lost."""
    model_dir = tiny_model_dir
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PAM_JAX_PROGRESS": "0", "JAX_PLATFORMS": "cpu"}

    def cmd(out):
        return [sys.executable, "-m", "pam_jax.cli", "eval", "--model", str(model_dir), "--data",
                str(data / "data.jsonl"), "--format", "pam", "--out", str(out), "--batch-size",
                "1", "--max-new-tokens", str(NEW)]  # fmt: skip

    out = tmp_path / "killed"
    p = subprocess.Popen(cmd(out), env=env)
    pf = out / PREDICTIONS
    t0 = time.time()
    while not (pf.is_file() and pf.read_text().count("\n") >= 1) and time.time() - t0 < 900:
        assert p.poll() is None, "eval ended before it could be killed"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    n_killed = pf.read_text().count("\n")
    assert 1 <= n_killed < 5
    assert subprocess.run(cmd(out), env=env).returncode == 0
    assert subprocess.run(cmd(tmp_path / "clean"), env=env).returncode == 0
    lines = pf.read_text().splitlines()
    assert len(lines) == 5 and len({json.loads(x)["id"] for x in lines}) == 5
    assert read_predictions(pf) == read_predictions(tmp_path / "clean" / PREDICTIONS)
    a = json.loads((out / "metrics.json").read_text())
    b = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    for k in ("semantic_similarity", "semantic_iou", "exact_match", "n_items", "n_skipped"):
        assert a[k] == b[k], k


def test_photo_sizes_share_the_sam2_and_perceiver_program(tiny_pam):
    """An eval over photos of many sizes compiles SAM 2 + perceiver once per region bucket:
    the original size only enters the small mask-upsample program."""
    from pam_jax.pam import predictor as pam_predictor

    model, tok = tiny_pam
    pred = PAMPredictor(model, tok, max_new_tokens=NEW)
    rng = np.random.default_rng(0)
    counts = []
    for h, w in [(90, 120), (75, 61), (128, 200)]:
        img = rng.integers(0, 256, (h, w, 3), np.uint8)
        inp = pred.image_inputs(img, [{"box": [5, 6, w // 2, h // 2]}], "recognize", "en")
        assert inp.masks.shape == (1, h, w)
        counts.append(
            (pam_predictor._image_step._cache_size(), pam_predictor.masks_at._cache_size())
        )
    assert counts[0][0] == counts[-1][0], counts  # no new SAM 2 + perceiver program
    assert counts[-1][1] >= counts[0][1] + 2, counts  # the upsample compiled per size


def test_generation_thread_only_without_collectives_elsewhere(tiny_pam, monkeypatch):
    """Generations get their own dispatch thread only when nothing else the runner launches
    can hold collectives; a sharded model or several processes keep every launch in one
    thread's order (two threads could interleave collective programs differently per device)."""
    import types
    from concurrent.futures import ThreadPoolExecutor

    import jax

    from pam_jax.evaluation import runner as runner_mod

    model, tok = tiny_pam
    pred = PAMPredictor(model, tok, max_new_tokens=NEW)
    first = Runner(pred, batch_size=2)._dispatch
    assert isinstance(first, ThreadPoolExecutor)
    assert Runner(pred, batch_size=2)._dispatch is first  # one thread for every runner

    sharded = types.SimpleNamespace(sharding=types.SimpleNamespace(is_fully_replicated=False))
    fake = types.SimpleNamespace(
        _vision=types.SimpleNamespace(leaves=[sharded]), _llm=types.SimpleNamespace(leaves=[])
    )
    assert not runner_mod._thread_safe(fake)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    r = Runner(pred, batch_size=2)
    assert isinstance(r._dispatch, runner_mod._Inline)
    # the inline executor re-raises what the call raised, from result(), like a thread would
    fut = r._dispatch.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        fut.result()
