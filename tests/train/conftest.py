"""Shared helpers of the training tests: a micro PAM model directory with the data tests'
byte-level tokenizer (so real records train through `pam_jax.data`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.data.conftest import make_tokenizer


def write_micro_pam(d: Path, *, seed: int = 3, std: float = 0.05) -> tuple[Path, Any, Any]:
    """A random micro PAM (configs/train/models/micro-pam.json, N(0, std) weights) saved as a
    model directory `d/pam` with the test tokenizer -> (model dir, the PAM, the tokenizer)."""
    from flax import nnx

    from pam_jax.checkpoint import random_normal_params
    from pam_jax.pam.model import PAM, save_pam
    from pam_jax.training.config import TrainConfig
    from pam_jax.training.model import pam_config_for

    tok = make_tokenizer()
    tdir = d / "tok"
    tdir.mkdir(parents=True, exist_ok=True)
    tok.tok.save(str(tdir / "tokenizer.json"))
    (tdir / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    )
    pc = pam_config_for(TrainConfig(model="models/micro-pam.json"))
    model = random_normal_params(lambda: PAM(pc, rngs=nnx.Rngs(0)), seed=seed, std=std)
    save_pam(model, d / "pam", tokenizer_dir=tdir)
    return d / "pam", model, tok


@pytest.fixture(scope="session")
def micro_pam(tmp_path_factory) -> tuple[Path, Any, Any]:
    """`write_micro_pam` once per session (read-only for the tests that share it)."""
    return write_micro_pam(tmp_path_factory.mktemp("micro_pam"))
