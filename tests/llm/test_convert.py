"""Converter errors, streaming format, tokenizer / chat template, and the CLI commands."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from pam_jax.convert.llm import convert_llm

from pam_jax.checkpoint import CheckpointError
from pam_jax.cli import main
from pam_jax.llm.io import load_qwen2
from pam_jax.llm.sampler import generate
from pam_jax.llm.tokenizer import Tokenizer
from pam_jax.llm.weights import SafetensorsFile
from tests.llm.conftest import right_padded


def test_errors(converted_untied, tmp_path):
    _, hd, jd = converted_untied
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        convert_llm(tmp_path / "empty", tmp_path / "o1")
    with pytest.raises(CheckpointError, match="not a directory"):
        convert_llm(tmp_path / "missing", tmp_path / "o1")
    # config but no weights
    (tmp_path / "now").mkdir()
    shutil.copy(hd / "config.json", tmp_path / "now" / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        convert_llm(tmp_path / "now", tmp_path / "o2")
    # a config of another architecture
    other = tmp_path / "llama"
    shutil.copytree(hd, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(
        json.dumps({**cfg, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    with pytest.raises(CheckpointError, match="only Qwen2"):
        convert_llm(other, tmp_path / "o3")
    # shapes that do not match the config
    bad = tmp_path / "bad"
    shutil.copytree(hd, bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    with pytest.raises(CheckpointError, match="shapes that do not match"):
        convert_llm(bad, tmp_path / "o4")
    # a pam-jax dir of another kind / a missing dir at load time
    with pytest.raises(CheckpointError):
        load_qwen2(tmp_path / "empty")
    # nothing was written for the failed conversions
    assert not (tmp_path / "o4" / "model.safetensors").exists()


def test_converted_layout(converted_untied):
    _, hd, jd = converted_untied
    f = SafetensorsFile(jd / "model.safetensors")
    assert f.shape("model.layers.0.self_attn.q_proj.kernel") == (32, 32)
    assert f.shape("model.layers.1.mlp.down_proj.kernel") == (64, 32)
    assert f.shape("lm_head.kernel") == (32, 128)
    meta = json.loads((jd / "config.json").read_text())
    assert meta["format"] == "pam-jax" and meta["kind"] == "qwen2"
    assert meta["hf_config"]["model_type"] == "qwen2"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (jd / name).is_file()
    # bf16 output through the same streaming writer
    out = convert_llm(hd, jd.parent / "bf16", dtype="bfloat16")
    g = SafetensorsFile(out / "model.safetensors")
    a = g.get("model.layers.0.mlp.up_proj.kernel").astype(np.float32)
    b = f.get("model.layers.0.mlp.up_proj.kernel")
    assert str(g.dtype("model.layers.0.mlp.up_proj.kernel")) == "bfloat16"
    assert np.abs(a - b).max() <= np.abs(b).max() * 2**-8


def test_tokenizer_matches_transformers(converted_untied):
    from transformers import PreTrainedTokenizerFast

    _, hd, jd = converted_untied
    ours = Tokenizer.from_dir(jd)
    ref = PreTrainedTokenizerFast.from_pretrained(str(hd))  # what the saved files describe
    msgs = [
        {"role": "system", "content": "you are helpful"},
        {"role": "user", "content": "what is this cat"},
    ]
    text = ours.apply_chat_template(msgs)
    assert text == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"]
    assert ours.stop_ids == [2, 0] and ours.pad_token_id == 0
    ids = ours.encode("the cat sat on the mat")
    assert ours.decode(ids) == "the cat sat on the mat"


def test_cli_generate_and_convert(converted_untied, tmp_path, capsys):
    _, hd, jd = converted_untied
    assert main(["convert", "llm", str(hd), str(tmp_path / "cli")]) == 0
    assert main(["convert", "llm", "--export", str(tmp_path / "cli"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    capsys.readouterr()
    ids = right_padded([6, 3], seed=20)
    argv = [
        "generate",
        "--model",
        str(tmp_path / "cli"),
        "--input-ids",
        ",".join(map(str, ids[0, :6])),
        "--input-ids",
        ",".join(map(str, ids[1, :3])),
        "--max-new-tokens",
        "8",
        "--print-ids",
    ]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    model, _, tok = load_qwen2(jd, jnp.float32)
    ref = generate(
        model, input_ids=ids, prompt_lengths=[6, 3], max_new_tokens=8, stop_ids=tok.stop_ids
    )
    assert len(lines) == 2
    for line, row, n in zip(lines, ref.tokens, ref.lengths):
        assert line == ",".join(map(str, row[:n]))
    # chat prompt with text output
    assert (
        main(
            [
                "generate",
                "--model",
                str(jd),
                "--prompt",
                "what is this",
                "--chat",
                "--max-new-tokens",
                "5",
                "--temperature",
                "0.7",
                "--top-k",
                "5",
                "--top-p",
                "0.9",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() != ""
    assert main(["generate", "--model", str(tmp_path / "nothing"), "--input-ids", "1"]) == 2
