"""`pam-jax eval --model`: model directories and `pam-jax train` workdirs."""

import json

import pytest

from pam_jax.evaluation.api import EvalError, resolve_model_dir


def _model_dir(p):
    p.mkdir(parents=True)
    (p / "config.json").write_text(json.dumps({"format": "pam-jax", "kind": "pam", "config": {}}))
    return p


def test_model_dir_and_workdir(tmp_path):
    m = _model_dir(tmp_path / "model")
    assert resolve_model_dir(m) == m
    with pytest.raises(EvalError, match="--step applies to a training workdir"):
        resolve_model_dir(m, 3)

    wd = tmp_path / "run"
    wd.mkdir()
    # A workdir's own config.json is the run config, not a model: never taken as the model.
    (wd / "config.json").write_text(json.dumps({"workdir": str(wd), "steps": 10}))
    (wd / "checkpoints").mkdir()
    final = _model_dir(wd / "export")
    step5 = _model_dir(wd / "export-5")  # what `pam-jax train --export-step 5` writes
    assert resolve_model_dir(wd) == final
    assert resolve_model_dir(wd, 5) == step5


def test_not_a_model(tmp_path):
    with pytest.raises(EvalError, match="neither a model directory nor a training workdir"):
        resolve_model_dir(tmp_path)
    wd = tmp_path / "run"
    _model_dir(wd / "export")
    with pytest.raises(EvalError, match="no checkpoints"):
        resolve_model_dir(wd, 7)
