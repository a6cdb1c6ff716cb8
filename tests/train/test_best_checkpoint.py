"""Checkpoint retention with validation: the last `keep` steps are kept, and the best step by
validation loss is kept beyond them (orbax LatestN + BestN over the `val_loss` the trainer
passes with each validated step's save).

The micro config trains in this process (one CPU device, synthetic data). The real
`validate` runs at every eval step; its loss is then replaced by a scripted curve that falls
to its minimum and rises after it, because a few micro steps on random tokens give no
reliable overfitting curve. The scripted values are the test's input, not expected results:
what is asserted is which checkpoints the trainer leaves on disk and the metrics stored with
them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pam_jax.training import trainer as T
from pam_jax.training.checkpoint import Checkpoints
from pam_jax.training.config import load_config

# step -> scripted validation loss: best at step 2, worse at every later step
CURVE = {1: 3.0, 2: 1.0, 3: 1.5, 4: 2.0, 5: 2.5, 6: 3.5, 7: 4.0, 8: 4.5}


@pytest.fixture
def scripted_validation(monkeypatch):
    seen: list[dict] = []
    real = T.validate

    def fake(cfg, trainer, state, *args):
        out = real(cfg, trainer, state, *args)
        seen.append(out)
        step = int(np.asarray(state.step))
        return {**out, "val_loss": CURVE[step]}

    monkeypatch.setattr(T, "validate", fake)
    return seen


def _saved(wd) -> list[int]:
    return sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())


def _run(tmp_path, monkeypatch, steps: int, resume: bool = False):
    monkeypatch.setenv("PAM_JAX_COMPILATION_CACHE", str(tmp_path / "xla"))
    # eval every step, save every 4: validated steps are saved too (with their val_loss)
    cfg = load_config("micro").replace(
        workdir=str(tmp_path / "w"), steps=steps, keep=2, eval_data="synthetic", eval_every=1,
        save_every=4, export=False,
    )  # fmt: skip
    T.train(cfg, resume=resume)
    return tmp_path / "w"


@pytest.mark.heavy  # two micro runs + the validation step compile: minutes on 2 cores
def test_best_by_validation_is_kept_beyond_keep(tmp_path, monkeypatch, scripted_validation):
    wd = _run(tmp_path, monkeypatch, steps=6)
    assert len(scripted_validation) == 6
    for out in scripted_validation:  # the real validation ran on real batches
        assert np.isfinite(out["val_loss"]) and out["val_tokens"] > 0
    # keep=2: the latest two (5, 6) and the best by validation loss (2), nothing else
    assert _saved(wd) == [2, 5, 6]
    # --resume (a new checkpoint manager, the metrics read back from disk) for two more
    # worse steps: step 2 is still the best and still kept
    _run(tmp_path, monkeypatch, steps=8, resume=True)
    assert _saved(wd) == [2, 7, 8]
    ck = Checkpoints(wd, keep=2, best=True)
    try:
        assert ck.manager.metrics(2) == {"val_loss": 1.0}
        assert ck.manager.metrics(8) == {"val_loss": 4.5}  # the final save carries its metric
        assert ck.manager.best_step() == 2
    finally:
        ck.close()
    evals = [json.loads(x) for x in (wd / "eval.jsonl").read_text().splitlines() if x]
    assert [e["step"] for e in evals] == list(CURVE)
    assert [e["val_loss"] for e in evals] == list(CURVE.values())
