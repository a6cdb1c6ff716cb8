"""`pam-jax train` end to end on the micro config (subprocesses, synthetic data, CPU):
SIGKILL at a random step then --resume gives the uninterrupted run's losses; SIGTERM leaves a
checkpoint; a run saved on 8 devices resumes on 4 (heavy); the workdir holds the logs and an
exported model directory that `load_pam` reads.

Losses are compared with rtol 1e-6 on the same device count (the same compiled program on the
same data is deterministic on CPU; the tolerance only absorbs JSON float printing) and 1e-5
across device counts (float32 sums in another order).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

STEPS = 6


def _env(cache: Path, devices: int = 1) -> dict:
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PAM_JAX_COMPILATION_CACHE=str(cache),
    )


def _cmd(workdir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "pam_jax.train.cli", "--config", "micro", f"workdir={workdir}",
        f"steps={STEPS}", "save_every=2", "mesh=1,-1,1", *extra,
    ]  # fmt: skip


def _run(cmd, env, timeout=900) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(workdir: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x]
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"a step is logged twice: {steps}"
    return {r["step"]: r["loss"] for r in recs}


def _wait_lines(path: Path, n: int, proc, timeout=900) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, "the run ended before the signal"
        time.sleep(0.05)
    raise AssertionError("timed out waiting for metrics")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    wd = tmp_path_factory.mktemp("run") / "a"
    _run(_cmd(wd), _env(cache))
    return wd


def test_run_writes_logs_and_export(uninterrupted, cache):
    wd = uninterrupted
    assert any(cache.rglob("*")), "the persistent compilation cache is empty"
    losses = _losses(wd)
    assert sorted(losses) == list(range(STEPS))
    rec = json.loads((wd / "metrics.jsonl").read_text().splitlines()[0])
    for k in ("step", "loss", "learning_rate", "grad_norm", "tokens_per_s", "mfu"):
        assert k in rec
    assert rec["mfu"] is None  # CPU: no datasheet peak
    assert rec["truncated"] == rec["truncated_total"] == 0  # synthetic rows are never cut
    assert np.isfinite(rec["loss"]) and rec["grad_norm"] > 0
    assert json.loads((wd / "config.json").read_text())["steps"] == STEPS
    assert "jax" in json.loads((wd / "versions.json").read_text())
    assert (wd / "loss.png").stat().st_size > 0
    assert any((wd / "tb").iterdir())
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == [
        4,
        6,
    ]  # keep=2

    import jax.numpy as jnp

    from pam_jax.pam.model import load_pam

    model, cfg, _ = load_pam(wd / "export", llm_dtype=jnp.float32, resize_to_tokenizer=False)
    assert cfg.llm.vocab_size == 512 and model.parts.image_newline.shape == (64,)


def test_export_step_writes_a_saved_step(uninterrupted, cache):
    """--export-step 4: step 4's trained parameters (not the final ones), frozen ones as run."""
    import jax.numpy as jnp

    from pam_jax.checkpoint import flat_params
    from pam_jax.pam.model import load_pam

    wd = uninterrupted
    _run(_cmd(wd, "--export-step", "4"), _env(cache))
    kw = dict(llm_dtype=jnp.float32, resize_to_tokenizer=False)
    at4 = flat_params(load_pam(wd / "export-4", **kw)[0])
    final = flat_params(load_pam(wd / "export", **kw)[0])
    trained = "parts.mm_projector_img.0.kernel"
    assert not np.array_equal(np.asarray(at4[trained]), np.asarray(final[trained]))
    frozen = "sam2.sam_mask_decoder.iou_token.embedding"
    np.testing.assert_array_equal(np.asarray(at4[frozen]), np.asarray(final[frozen]))


def test_sigkill_then_resume_equals_uninterrupted(uninterrupted, tmp_path, cache):
    ref = _losses(uninterrupted)
    wd = tmp_path / "b"
    kill_after = random.randint(2, STEPS - 1)  # metrics lines seen before SIGKILL
    print("SIGKILL after", kill_after, "logged steps")
    p = subprocess.Popen(_cmd(wd), env=_env(cache), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_lines(wd / "metrics.jsonl", kill_after, p)
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait(timeout=60)
    assert len(_losses(wd)) < STEPS
    _run(_cmd(wd, "--resume"), _env(cache))
    got = _losses(wd)
    assert sorted(got) == list(range(STEPS))
    np.testing.assert_allclose([got[s] for s in range(STEPS)], [ref[s] for s in range(STEPS)],
                               rtol=1e-6)  # fmt: skip


def test_sigterm_leaves_checkpoint(tmp_path, cache):
    wd = tmp_path / "c"
    cmd = _cmd(wd, "steps=1000", "save_every=0")
    p = subprocess.Popen(cmd, env=_env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)  # fmt: skip
    try:
        _wait_lines(wd / "metrics.jsonl", 2, p)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "checkpoint saved" in err
    steps = [int(x.name) for x in (wd / "checkpoints").iterdir() if x.name.isdigit()]
    assert steps and max(steps) >= 2


@pytest.mark.heavy
def test_checkpoint_from_8_devices_resumes_on_4(uninterrupted, tmp_path, cache):
    """The same run (steps fixed, so the schedule is the same) stopped by SIGTERM on 8 devices,
    resumed on 4: the losses equal the uninterrupted one-device run's."""
    ref = _losses(uninterrupted)
    wd = tmp_path / "d"
    p = subprocess.Popen(_cmd(wd, "save_every=0"), env=_env(cache, devices=8),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait_lines(wd / "metrics.jsonl", 2, p)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert len(_losses(wd)) < STEPS
    _run(_cmd(wd, "--resume"), _env(cache, devices=4))
    got = _losses(wd)
    assert sorted(got) == list(range(STEPS))
    np.testing.assert_allclose([got[s] for s in range(STEPS)], [ref[s] for s in range(STEPS)],
                               rtol=1e-5)  # fmt: skip


@pytest.mark.heavy
def test_two_processes_give_the_one_process_loss(uninterrupted, tmp_path, cache):
    """jax.distributed with CPU (gloo) collectives: each process reads half of every global
    batch; the losses equal the one-process run's (rtol 1e-5, float32 sums in another order)."""
    import socket

    ref = _losses(uninterrupted)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    wd = tmp_path / "mp"
    procs = [
        subprocess.Popen(
            _cmd(
                wd,
                "steps=3",
                "export=false",
                f"--coordinator=127.0.0.1:{port}",
                "--num-processes=2",
                f"--process-id={i}",
            ),
            env=_env(cache),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outs = [p.communicate(timeout=1500) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    got = _losses(wd)
    np.testing.assert_allclose([got[s] for s in range(3)], [ref[s] for s in range(3)], rtol=1e-5)


@pytest.mark.heavy
def test_non_finite_loss_stops_naming_the_step(tmp_path, cache):
    """A learning rate of 1e38 overflows the parameters at the first update: step 1's loss is
    not finite; the run stops with exit code 1 naming step 1, the state of step 1 kept."""
    wd = tmp_path / "nan"
    cmd = _cmd(wd, "learning_rate=1e38", "min_lr=1e37", "warmup_steps=0", "save_every=1")
    r = subprocess.run(cmd, env=_env(cache), capture_output=True, text=True, timeout=900)
    assert r.returncode == 1, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]  # the one-line error, after the progress bar
    assert "non-finite loss or gradient at step 1" in last and "checkpoints/1" in last
