"""`sam2=DIR llm=DIR` (no `model`): a fresh PAM for training, SAM 2 and the LLM loaded from
their model directories, the perceiver, projectors and newline vectors newly initialised
(flax init, seeded by `seed`), and the tokenizer taken from the LLM directory."""

from __future__ import annotations

import numpy as np

from pam_jax.checkpoint import flat_params
from pam_jax.llm.io import save_qwen2
from pam_jax.sam2.loading import save_sam2
from pam_jax.training.config import TrainConfig
from pam_jax.training.model import load_model


def test_fresh_pam_from_sam2_and_llm_directories(tmp_path, micro_pam):
    pam_dir, model, tok = micro_pam
    save_sam2(model.sam2, tmp_path / "sam2")
    save_qwen2(model.llm, tmp_path / "llm", tokenizer_dir=pam_dir / "llm")
    cfg = TrainConfig(sam2=str(tmp_path / "sam2"), llm=str(tmp_path / "llm"), dtype="float32")
    fresh, tok2 = load_model(cfg.validate())
    saved, got = flat_params(model), flat_params(fresh)
    loaded = [k for k in saved if k.startswith(("sam2.", "llm."))]
    assert loaded and set(loaded) == {k for k in got if k.startswith(("sam2.", "llm."))}
    for k in loaded:  # bit-identical: the directories' weights, nothing re-initialised
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(saved[k]), err_msg=k)
    parts = sorted(k for k in got if k.startswith("parts."))
    assert "parts.image_newline" in parts and any("vision_resampler" in k for k in parts)
    assert any("mm_projector_img" in k for k in parts)
    # new parts: flax's init seeded by `seed` (not the saved model's random parts)
    from flax import nnx

    from pam_jax.pam.model import PAMParts
    from pam_jax.training.model import pam_config_for

    init = flat_params(PAMParts(pam_config_for(cfg), rngs=nnx.Rngs(cfg.seed)))
    assert sorted(f"parts.{k}" for k in init) == parts
    for k in init:
        np.testing.assert_array_equal(np.asarray(got[f"parts.{k}"]), np.asarray(init[k]), k)
    assert tok2 is not None and tok2.encode("A cat.\n") == tok.encode("A cat.\n")
