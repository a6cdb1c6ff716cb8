"""Run configs, overrides, parts, optimizer rules and the one-line errors (no compiles)."""

from __future__ import annotations

import json
import types

import jax
import numpy as np
import optax
import pytest

from pam_jax.training import config as C
from pam_jax.training.model import abstract_model, decays, part_of, spec_for
from pam_jax.training.optim import make_optimizer, schedule
from pam_jax.training.step import Trainer, make_run_mesh
from pam_jax.training.trainer import prepare_workdir

MICRO = C.load_config("micro")


def test_named_configs_resolve():
    names = C.run_config_names()
    for n in ("micro", "pam-3b-stage1", "pam-3b-stage1.5", "pam-3b-stage2", "pam-1.5b-stage2"):
        assert n in names
    s1, s2 = C.load_config("pam-3b-stage1"), C.load_config("pam-3b-stage2")
    assert s1.parts == ("perceiver", "projectors", "newlines")
    assert s2.parts == ("perceiver", "projectors", "newlines", "llm")
    assert (s1.batch_size, s2.batch_size) == (1024, 256)
    assert MICRO.validate() is MICRO
    visual = ("perceiver", "projectors", "newlines")
    for size in ("1.5b", "3b"):  # both sizes, every stage: SAM 2 frozen
        for stage, parts in (("1", visual), ("1.5", visual), ("2", (*visual, "llm"))):
            cfg = C.load_config(f"pam-{size}-stage{stage}")
            assert cfg.parts == parts and cfg.model == f"pam-{size}", (size, stage)


def test_overrides_are_typed():
    cfg = C.apply_overrides(
        MICRO, ["steps=7", "learning_rate=3e-4", "shuffle=false", "mesh=2,-1,1", "lr_llm=1e-6"]
    )
    assert (cfg.steps, cfg.learning_rate, cfg.shuffle, cfg.mesh_shape) == (
        7,
        3e-4,
        False,
        (2, -1, 1),
    )
    assert cfg.lr_for("llm") == 1e-6 and cfg.lr_for("perceiver") == 3e-4


def test_unknown_key_lists_valid_ones():
    with pytest.raises(C.ConfigError) as e:
        C.apply_overrides(MICRO, ["stepz=3"])
    msg = str(e.value)
    assert "stepz" in msg and "valid keys:" in msg
    for k in ("train_parts", "grad_accum", "seg_loss", "mesh", "remat", "keep", "eval_every"):
        assert k in msg
    assert "\n" not in msg


def test_config_file_errors_are_one_line(tmp_path):
    """A run config file with an unknown key names the file and lists the valid keys; an
    unknown config name lists the named ones."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"steps": 3, "stepz": 3}))
    with pytest.raises(C.ConfigError) as e:
        C.load_config(bad)
    msg = str(e.value)
    assert f"stepz in {bad}" in msg and "valid keys:" in msg and "grad_accum" in msg
    with pytest.raises(C.ConfigError) as e:
        C.load_config("pam-9b-stage7")
    msg = str(e.value)
    assert "named configs:" in msg and "pam-3b-stage2" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "override, words",
    [
        ("shuffle=maybe", "boolean"),
        ("steps=1.5", "integer"),
        ("mesh=2,2", "data,fsdp,tensor"),
        ("mesh=-1,-1,1", "at most one -1"),
        ("train_parts=perceiver,vision", "unknown ['vision']"),
        ("batch_size=6", "multiple of grad_accum"),
        ("remat=some", "remat must be"),
        ("loss_chunk=0", "loss_chunk must be >= 1"),
    ],
)
def test_bad_values(override, words):
    with pytest.raises(C.ConfigError, match=None) as e:
        C.apply_overrides(MICRO.replace(grad_accum=4), [override]).validate()
    assert words in str(e.value)


def test_print_config_cli(capsys):
    from pam_jax.cli import main

    assert main(["train", "--config", "micro", "steps=3", "--print-config"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 3 and out["model"] == "models/micro-pam.json"
    assert main(["train", "--config", "micro", "nope=1"]) == 2
    assert "unknown config key(s) nope" in capsys.readouterr().err


@pytest.fixture(scope="module")
def micro_model():
    return abstract_model(MICRO)


@pytest.fixture(scope="module")
def spec(micro_model):
    return spec_for(micro_model, MICRO.parts)


def test_parts_cover_every_parameter(spec):
    parts = {spec.parts[k] for k in spec.keys}
    assert parts == {"perceiver", "projectors", "newlines", "llm", "sam2_decoder", "sam2_encoder"}
    assert part_of("parts.image_newline") == "newlines"
    assert part_of("sam2.image_encoder.trunk.patch_embed.proj.kernel") == "sam2_encoder"
    assert part_of("sam2.sam_mask_decoder.iou_token.embedding") == "sam2_decoder"
    assert all(spec.parts[k] in MICRO.parts for k in spec.trainable)
    assert not any(k.startswith("sam2.") for k in spec.trainable)
    fourier = "parts.vision_resampler.pe_layer.positional_encoding_gaussian_matrix"
    assert spec.parts[fourier] == "perceiver" and fourier not in spec.trainable  # a buffer
    # decay only on matrices: no norms, biases, newline vectors
    assert decays("llm.model.layers.0.mlp.up_proj.kernel", 2)
    assert not decays("llm.model.layers.0.input_layernorm.weight", 1)
    assert not decays("llm.model.layers.0.self_attn.q_proj.bias", 1)
    assert not decays("parts.image_newline", 1)
    assert decays("llm.model.embed_tokens.embedding", 2)


def test_optimizer_state_only_for_trainable(spec):
    tx = make_optimizer(MICRO, spec)
    abstract = {k: jax.ShapeDtypeStruct(spec.shapes[k], np.float32) for k in spec.trainable}
    st = jax.eval_shape(tx.init, abstract)
    n_leaves = len(jax.tree.leaves(st))
    # Adam mu + nu per trainable tensor, plus step counters
    assert 2 * len(spec.trainable) <= n_leaves <= 2 * len(spec.trainable) + 16


def test_schedule_warmup_cosine():
    cfg = MICRO.replace(steps=100, warmup_steps=10, learning_rate=1e-3, min_lr=1e-4)
    s = schedule(cfg, cfg.learning_rate)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(s(100)), 1e-4, rtol=1e-5)
    half = schedule(cfg, 5e-4)  # a part at half the rate keeps the ratio down to its floor
    np.testing.assert_allclose(float(half(100)), 5e-5, rtol=1e-5)
    assert isinstance(
        make_optimizer(cfg, spec_for(abstract_model(cfg), cfg.parts)), optax.GradientTransformation
    )


def test_mesh_and_batch_errors():
    n = len(jax.devices())
    with pytest.raises(C.ConfigError, match="does not fit"):
        make_run_mesh(f"{n + 1},1,1")
    mesh = make_run_mesh("1,-1,1")
    fake = types.SimpleNamespace(cfg=MICRO.replace(batch_size=6, grad_accum=4), mesh=mesh)
    with pytest.raises(C.ConfigError, match="cannot split"):
        Trainer.check_batch(fake, 6)


def test_workdir_of_another_run_is_refused(tmp_path):
    cfg = MICRO.replace(workdir=str(tmp_path / "w"))
    prepare_workdir(cfg, resume=False)
    with pytest.raises(C.ConfigError, match="already holds a run"):
        prepare_workdir(cfg, resume=False)
    with pytest.raises(C.ConfigError, match="differs in learning_rate"):
        prepare_workdir(cfg.replace(learning_rate=0.5), resume=True)
    prepare_workdir(cfg.replace(steps=99), resume=True)  # steps may change
    # a run written before a key existed resumes when the key keeps its default
    path = tmp_path / "w" / "config.json"
    old = json.loads(path.read_text())
    del old["loss_chunk"]
    path.write_text(json.dumps(old))
    prepare_workdir(cfg, resume=True)
    with pytest.raises(C.ConfigError, match="differs in loss_chunk"):
        prepare_workdir(cfg.replace(loss_chunk=256), resume=True)


@pytest.mark.parametrize(
    "parts, frames, mult",
    [  # (SAM 2 encoder, SAM 2 decoder, visual path, LLM): 6 trained, 4 behind one, 2 forward
        ("perceiver,projectors,newlines,llm", 1, (2, 2, 6, 6)),  # stage 2
        ("perceiver,projectors,newlines", 1, (2, 2, 6, 4)),  # stage 1: LLM passes gradients
        ("perceiver,projectors,newlines", 16, (2, 2, 6, 4)),  # stage 1.5 video sample
        ("llm", 1, (2, 2, 2, 6)),
        ("sam2_decoder", 1, (2, 6, 4, 4)),  # the encoder before it runs forward only
        ("sam2_encoder,llm", 1, (6, 4, 4, 6)),
    ],
)
def test_model_flops_multipliers(micro_model, parts, frames, mult):
    """metrics.model_flops against the README's count, written out here with parameter counts
    taken by key prefix (not through the spec's part table)."""
    from pam_jax.training.metrics import model_flops

    spec = spec_for(micro_model, tuple(parts.split(",")))
    pc = spec.config

    def size(*prefixes):
        return sum(int(np.prod(spec.shapes[k])) for k in spec.keys if k.startswith(prefixes))

    enc, llm, vis = size("sam2.image_encoder."), size("llm."), size("parts.")
    dec = size("sam2.") - enc
    positions, rows, seq_len = 900.0, 4, 256
    m_enc, m_dec, m_vis, m_llm = mult
    q = pc.llm.num_attention_heads * pc.llm.head_dim
    attn = 2 * 2 * pc.llm.num_hidden_layers * seq_len**2 / 2 * q * rows  # causal, forward
    nvis = pc.video_embeds_len if frames > 1 else pc.image_embeds_len
    sam_tokens = (pc.sam2.image_size // 16) ** 2 * frames * rows
    want = (
        m_llm * llm * positions + m_llm / 2 * attn + m_vis * vis * nvis * rows
        + (m_enc * enc + m_dec * dec) * sam_tokens
    )  # fmt: skip
    got = model_flops(spec, positions, rows, seq_len, frames)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # packed rows: the per-sample visual and SAM 2 work once per slot, the LLM's per row
    two = model_flops(spec, positions, rows, seq_len, frames, slots=2)
    extra = m_vis * vis * nvis * rows + (m_enc * enc + m_dec * dec) * sam_tokens
    np.testing.assert_allclose(two - got, extra, rtol=1e-9)


def test_compute_dtype_default(monkeypatch):
    """dtype=auto: float32 on CPU, bfloat16 on accelerators; explicit values win."""
    import jax.numpy as jnp

    from pam_jax.training import model as M

    assert M.compute_dtype(MICRO.replace(dtype="auto")) == jnp.float32  # this CPU host
    monkeypatch.setattr(M.jax, "default_backend", lambda: "gpu")
    assert M.compute_dtype(MICRO.replace(dtype="auto")) == jnp.bfloat16
    assert M.compute_dtype(MICRO.replace(dtype="float32")) == jnp.float32
