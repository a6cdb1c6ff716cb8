"""`pam-jax convert pam --export`: model directory -> the official release layout, and back.

A tiny random release in the official layout (test_convert_pam.build_release, plus a ChatML
tokenizer without additional special tokens and the release's generation config) and a
perturbed official SAM 2.1 tiny `.pt` are converted, exported, and converted again. Checks are
bit-exact (no tolerance: nothing is computed, tensors are only moved, transposed and cast), the
SAM 2 `.pt` is loaded by the official `sam2.build_sam.build_sam2` (strict), and the tokenizer by
transformers.
"""

import json
import os
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from pam_jax.convert import export_pam as exp
from pam_jax.convert import pam as conv
from safetensors.numpy import load_file, save_file
from torch_ref import build_official_sam2, to_np, tv_shim

from pam_jax.checkpoint import CheckpointError, read_model_config
from pam_jax.llm.weights import SafetensorsFile, TensorSource
from pam_jax.pam.config import PAMConfig
from tests.pam.test_convert_pam import build_release
from tests.pam.test_prompts import byte_tokenizer

VOCAB = 272  # the byte alphabet (256) + 3 ChatML specials fit
SHARD = 40_000_000  # bytes: SAM 2.1 tiny (~156 MB float32) spreads over several shards
GENERATION = {"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20,
              "top_p": 0.8, "eos_token_id": [258, 256]}  # fmt: skip


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).reshape(-1)


def assert_bit_equal(a: np.ndarray, b: np.ndarray, what: str = "") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    assert np.array_equal(_bits(a), _bits(b)), what


@pytest.fixture(scope="module")
def sam2_official(tmp_path_factory):
    m = build_official_sam2("t", "2.1")
    p = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": m.state_dict()}, p)
    return p, {k: to_np(v) for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    d, _, _ = build_release(tmp_path_factory.mktemp("PAM-tiny"), vocab_size=VOCAB)
    tv_shim()
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=byte_tokenizer(), eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.save_pretrained(str(d))  # lists no additional special tokens
    assert "additional_special_tokens" not in json.loads((d / "tokenizer_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps(GENERATION))
    return d


@pytest.fixture(scope="module")
def model_dir(release, sam2_official, tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "pam"
    conv.convert_pam(release, sam2_official[0], out, log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("e") / "PAM-export"
    logs = []
    exp.export_pam(model_dir, out, max_shard_size=SHARD, log=logs.append)
    return out, logs


def _dir_tensors(d: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in load_file(str(d / "model.safetensors")).items()}


def test_round_trip_bit_identical(model_dir, exported, tmp_path):
    out, _ = exported
    again = tmp_path / "again"
    conv.convert_pam(out, out / exp.SAM2_PT, again, log=lambda s: None)
    for sub in (".", conv.SAM2_SUBDIR, conv.LLM_SUBDIR):
        a, b = _dir_tensors(model_dir / sub), _dir_tensors(again / sub)
        assert sorted(a) == sorted(b), sub
        for k in a:
            assert_bit_equal(a[k], b[k], f"{sub}/{k}")
    m1, m2 = read_model_config(model_dir, "pam"), read_model_config(again, "pam")
    assert PAMConfig.from_dict(m1["config"]) == PAMConfig.from_dict(m2["config"])
    assert m2["release_config"] == {**m1["release_config"], "torch_dtype": "float32"}
    for name in ("tokenizer.json", "generation_config.json"):
        assert (again / conv.LLM_SUBDIR / name).read_bytes() == (out / name).read_bytes()


def test_release_layout(release, exported, sam2_official):
    out, logs = exported
    index = json.loads((out / exp.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    got = TensorSource.from_dir(out)  # the importer's reader of the release layout
    total = sum(got.get(k).nbytes for k in got.keys())
    assert index["metadata"]["total_size"] == total
    for f in shards:
        assert SafetensorsFile(out / f).metadata == {"format": "pt"}  # transformers checks it

    # every tensor of the source release is exported unchanged, under the same key ...
    src = TensorSource.from_dir(release)
    own = [k for k in src.keys() if not k.startswith(exp.SAM2_PREFIX)]
    for k in own:
        assert_bit_equal(got.get(k), src.get(k), k)
    assert "lm_head.weight" not in got.keys()  # tied embeddings, as save_pretrained writes
    # ... and SAM 2 is complete under the release's prefix, equal to Meta's .pt
    sd = sam2_official[1]
    tower = {k[len(exp.SAM2_PREFIX) :] for k in got.keys() if k.startswith(exp.SAM2_PREFIX)}
    assert tower == set(sd)
    assert sorted(got.keys()) == sorted(own + [exp.SAM2_PREFIX + k for k in sd])
    for k, v in sd.items():
        assert_bit_equal(got.get(exp.SAM2_PREFIX + k), v, k)
    assert any("sam2.1_hiera_large.pt" in s for s in logs)

    # config.json: the release's own (its LLM fields match), generation config copied
    cfg = json.loads((out / "config.json").read_text())
    want = json.loads((release / "config.json").read_text())
    assert cfg == {**want, "torch_dtype": "float32"}
    assert json.loads((out / "generation_config.json").read_text()) == GENERATION


def test_tokenizer_lists_chatml_specials(exported):
    out, _ = exported
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
    tv_shim()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    try:  # what the release's preprocess_qwen reads (transformers 4, as the release pins)
        names = tok.additional_special_tokens
    except AttributeError:  # transformers 5 reads the same field as extra_special_tokens
        names = tok.extra_special_tokens
    assert names == ["<|im_start|>", "<|im_end|>"]
    assert tok.convert_tokens_to_ids(names) == [257, 258]
    assert tok("<|im_start|>user\nhi<|im_end|>").input_ids[0] == 257


def test_sam2_pt_loads_in_official_sam2(exported, sam2_official):
    from sam2.build_sam import build_sam2

    out, _ = exported
    # the official loader: torch.load(...)["model"], load_state_dict, raises on any key mismatch
    m = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", str(out / exp.SAM2_PT), device="cpu")
    sd = m.state_dict()
    assert set(sd) == set(sam2_official[1])
    for k, v in sam2_official[1].items():
        assert_bit_equal(to_np(sd[k]), v, k)
    raw = torch.load(out / exp.SAM2_PT, map_location="cpu", weights_only=True)
    assert list(raw) == ["model"]
    m.load_state_dict(raw["model"], strict=True)


def test_dtype_bfloat16(model_dir, exported, tmp_path):
    ref = TensorSource.from_dir(exported[0])  # float32 (keep)
    out = tmp_path / "bf16"
    exp.export_pam(model_dir, out, dtype="bfloat16", log=lambda s: None)
    got = TensorSource.from_dir(out)
    assert sorted(got.keys()) == sorted(ref.keys())
    bf16 = np.dtype(ml_dtypes.bfloat16)
    for k in got.keys():
        assert_bit_equal(got.get(k), ref.get(k).astype(bf16), k)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    pt = torch.load(out / exp.SAM2_PT, map_location="cpu", weights_only=True)["model"]
    for k, v in pt.items():
        assert v.dtype == torch.bfloat16
        want = ref.get(exp.SAM2_PREFIX + k).astype(bf16)
        assert_bit_equal(v.view(torch.int16).numpy().view(bf16), want, k)


def test_dtype_keep_preserves_each_tensor(release, sam2_official, tmp_path):
    """A bf16 LLM (as the release ships it) stays bf16 under `keep`; parts and SAM 2 float32."""
    m = tmp_path / "m"
    conv.convert_pam(release, sam2_official[0], m, dtype="bfloat16", log=lambda s: None)
    out = tmp_path / "keep"
    exp.export_pam(m, out, log=lambda s: None)
    got = TensorSource.from_dir(out)
    for k in got.keys():
        llm = k.startswith(conv.LLM_PREFIXES)
        want = np.dtype(ml_dtypes.bfloat16) if llm else np.dtype(np.float32)
        assert got.files[k].dtype(k) == want, k
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    out32 = tmp_path / "f32"
    exp.export_pam(m, out32, dtype="float32", log=lambda s: None)
    got32 = TensorSource.from_dir(out32)
    for k in got32.keys():
        assert_bit_equal(got32.get(k), np.asarray(got.get(k), np.float32), k)


def _linked_copy(model_dir: Path, dst: Path) -> Path:
    """A model directory sharing SAM 2 and the LLM with `model_dir` (symlinks), own parts."""
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, dst / name)
    for sub in (conv.SAM2_SUBDIR, conv.LLM_SUBDIR):
        os.symlink(model_dir / sub, dst / sub)
    return dst


def test_parameter_without_rule_fails(model_dir, tmp_path):
    d = _linked_copy(model_dir, tmp_path / "extra")
    t = _dir_tensors(d)
    t["vision_resampler.extra_head.kernel"] = np.zeros((2, 2), np.float32)
    del t["frame_newline"]
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        exp.export_pam(d, tmp_path / "o", log=lambda s: None)
    msg = str(e.value)
    assert "no export rule" in msg and "vision_resampler.extra_head.kernel" in msg
    assert "missing" in msg and "frame_newline" in msg
    assert not (tmp_path / "o").exists()  # validated before anything is written


def test_llm_tensor_without_rule_fails(model_dir, tmp_path):
    d = _linked_copy(model_dir, tmp_path / "llmx")
    os.unlink(d / conv.LLM_SUBDIR)
    shutil.copytree(model_dir / conv.LLM_SUBDIR, d / conv.LLM_SUBDIR)
    t = _dir_tensors(d / conv.LLM_SUBDIR)
    t["model.layers.0.self_attn.q_norm.weight"] = np.ones(4, np.float32)
    save_file(t, str(d / conv.LLM_SUBDIR / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no export rule.*q_norm"):
        exp.export_pam(d, tmp_path / "o", log=lambda s: None)
    # and a tokenizer without the ChatML specials cannot feed the release's preprocess_qwen
    tok = json.loads((d / conv.LLM_SUBDIR / "tokenizer.json").read_text())
    tok["added_tokens"] = [a for a in tok["added_tokens"] if a["content"] != "<|im_end|>"]
    (d / conv.LLM_SUBDIR / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(CheckpointError, match="no <\\|im_end\\|> token"):
        exp.export_pam(d, tmp_path / "o", log=lambda s: None)
    (d / conv.LLM_SUBDIR / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        exp.export_pam(d, tmp_path / "o", log=lambda s: None)
    assert not (tmp_path / "o").exists()


def test_fresh_model_gets_a_release_config(model_dir, tmp_path):
    """A model directory that never was a release (e.g. `pam-jax train`'s export)."""
    d = _linked_copy(model_dir, tmp_path / "fresh")
    meta = json.loads((d / "config.json").read_text())
    del meta["release_config"]
    (d / "config.json").write_text(json.dumps(meta))
    out = tmp_path / "o"
    exp.export_pam(d, out, log=lambda s: None)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llava_qwen" and cfg["architectures"] == ["LlavaQwenForCausalLM"]
    assert cfg["mm_hidden_size"] == 256 and cfg["mm_projector_type"] == "mlp2x_gelu"
    assert "sam2" in cfg["mm_vision_tower"] and cfg["mm_use_im_patch_token"] is False
    pam = PAMConfig.from_dict(meta["config"])
    assert PAMConfig.from_release(cfg).llm == pam.llm  # the importer reads it back


def test_out_dir_checks(model_dir, exported):
    with pytest.raises(CheckpointError, match="model directory itself"):
        exp.export_pam(model_dir, model_dir)
    from pam_jax.cliutil import CLIError

    with pytest.raises(CLIError, match="not empty"):
        exp.export_pam(model_dir, exported[0])


def test_shard_groups():
    def t(n):
        return exp.ExportTensor(f"k{n}", (n,), np.dtype(np.float32), lambda: None)

    groups = exp.shard([t(10), t(10), t(30), t(1), t(2)], max_bytes=80)
    assert [[e.shape[0] for e in g] for g in groups] == [[10, 10], [30], [1, 2]]
    assert len(exp.shard([t(100)], max_bytes=8)) == 1  # too large: a shard of its own


def test_export_sam2_pt(model_dir, sam2_official, tmp_path):
    pt = exp.export_sam2(model_dir / conv.SAM2_SUBDIR, tmp_path / "s" / "sam2.pt")
    sd = torch.load(pt, map_location="cpu", weights_only=True)["model"]
    assert set(sd) == set(sam2_official[1])
    for k, v in sam2_official[1].items():
        assert_bit_equal(sd[k].numpy(), v, k)


def test_cli(model_dir, tmp_path, capsys):
    from pam_jax.cli import main

    out = tmp_path / "rel"
    assert (
        main(["convert", "pam", "--export", str(model_dir), str(out), "--dtype", "bfloat16"]) == 0
    )
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (out / exp.INDEX_FILE).is_file() and (out / exp.SAM2_PT).is_file()
    assert main(["convert", "pam", "--export", str(model_dir), str(out)]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
    rc = main(["convert", "pam", "--export", "--sam2", "x.pt", str(model_dir), str(out)])
    assert rc == 2 and "--sam2" in capsys.readouterr().err

    pt = tmp_path / "sam2.pt"
    sam2_dir = str(model_dir / conv.SAM2_SUBDIR)
    assert main(["convert", "sam2", "--export", sam2_dir, str(pt)]) == 0
    assert main(["convert", "sam2", "--export", sam2_dir, str(pt)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["convert", "sam2", "--export", sam2_dir, str(pt), "--force"]) == 0
    assert list(torch.load(pt, map_location="cpu", weights_only=True)) == ["model"]


def test_save_pam_model_round_trips_untied(tmp_path):
    """A model written by `save_pam` (no release behind it; untied lm_head, as a trained model
    may be) round-trips too, lm_head.weight included."""
    from flax import nnx

    from pam_jax.checkpoint import random_normal_params
    from pam_jax.llm.config import tiny
    from pam_jax.pam.model import PAM, save_pam
    from pam_jax.sam2.config import sam2_config
    from pam_jax.sam2.model import SAM2Base

    cfg = PAMConfig(
        sam2=sam2_config("t", "2.1"),
        llm=tiny(vocab_size=VOCAB, hidden_size=64, intermediate_size=128),
    )
    assert not cfg.llm.tie_word_embeddings
    sam2 = random_normal_params(lambda: SAM2Base(cfg.sam2, rngs=nnx.Rngs(0)), seed=1)
    model = PAM(cfg, sam2=sam2, rngs=nnx.Rngs(2))
    tok = tmp_path / "tok"
    tok.mkdir()
    byte_tokenizer().save(str(tok / "tokenizer.json"))
    save_pam(model, tmp_path / "m", tokenizer_dir=tok)
    out = tmp_path / "rel"
    exp.export_pam(tmp_path / "m", out, log=lambda s: None)
    assert "lm_head.weight" in TensorSource.from_dir(out).keys()
    conv.convert_pam(out, out / exp.SAM2_PT, tmp_path / "m2", log=lambda s: None)
    for sub in (".", conv.SAM2_SUBDIR, conv.LLM_SUBDIR):
        a, b = _dir_tensors(tmp_path / "m" / sub), _dir_tensors(tmp_path / "m2" / sub)
        assert sorted(a) == sorted(b), sub
        for k in a:
            assert_bit_equal(a[k], b[k], f"{sub}/{k}")


@pytest.mark.heavy
@pytest.mark.parametrize(
    "name", ["sam2.1_hiera_large", "sam2_hiera_large", "sam2.1_hiera_base_plus", "sam2_hiera_small"]
)
def test_sam2_export_table_inverts_import_at_real_sizes(name):
    """The export table gives back every official tensor bit-exactly (SAM 2.1-L is PAM's)."""
    import gc

    from pam_jax.convert.sam2 import abstract_sam2, detect_config, map_state_dict
    from pam_jax.convert.torch_nnx import nnx_to_torch_table
    from sam2.build_sam import build_sam2

    from pam_jax.sam2.config import OFFICIAL

    size, version = OFFICIAL[name]
    folder = "sam2.1" if version == "2.1" else "sam2"
    torch.manual_seed(0)
    m = build_sam2(f"configs/{folder}/{folder}_hiera_{size}.yaml", None, device="cpu")
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    del m
    cfg = detect_config(sd)
    params = map_state_dict(cfg, sd, what=name)
    table = nnx_to_torch_table(abstract_sam2(cfg))
    assert sorted(tk for tk, _ in table.values()) == sorted(sd)
    for k, (tk, layout) in table.items():
        assert_bit_equal(np.ascontiguousarray(layout(params[k])), sd[tk], tk)
    del sd, params
    gc.collect()
