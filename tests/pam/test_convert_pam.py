"""`pam-jax convert pam`: a synthetic release directory in the official layout -> model dir.

The release is built the way the official code writes it: a tiny HF Qwen2 saved with
`save_pretrained` (sharded safetensors + index, tied embeddings so `lm_head.weight` is absent),
plus one more shard holding `model.vision_resampler.*` (the release-style perceiver of
test_perceiver.py), `model.mm_projector_{img,semT}.{0,2}.*`, the three newlines and a few
`model.vision_tower.sam2_model_predictor.*` tensors; config.json is LLaVA-Qwen's. SAM 2 is an
official tiny SAM 2.1 `.pt` with random perturbed weights.
"""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from pam_jax.convert import pam as conv
from safetensors.numpy import load_file, save_file
from torch import nn
from torch_ref import build_official_sam2, perturb_, to_np, tv_shim

from pam_jax.checkpoint import CheckpointError, assign_params, load_params, read_model_config
from pam_jax.llm.io import load_qwen2
from pam_jax.pam.config import PAMConfig
from pam_jax.pam.model import PAMParts
from pam_jax.sam2.loading import load_sam2
from tests.pam.test_perceiver import TorchSemanticPerceiver

H = 64  # tiny LLM width
# float32 end to end (perceiver -> projectors); same accumulation-order argument as the
# perceiver parity test, measured ~5e-6
ATOL = 5e-5


@pytest.fixture(scope="module")
def sam2_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("sam2")
    m = build_official_sam2("t", "2.1")
    p = d / "sam2.1_hiera_tiny.pt"
    torch.save({"model": m.state_dict()}, p)
    return p


def _torch_parts():
    torch.manual_seed(3)
    perc = TorchSemanticPerceiver().eval()
    img = nn.Sequential(nn.Linear(1024, H), nn.GELU(), nn.Linear(H, H)).eval()
    sem = nn.Sequential(nn.Linear(256, H), nn.GELU(), nn.Linear(H, H)).eval()
    for i, m in enumerate((perc, img, sem)):
        perturb_(m, seed=10 + i)
    nls = {n: torch.randn(H) / H**0.5 for n in ("image_newline", "semT_newline", "frame_newline")}
    return perc, img, sem, nls


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return build_release(tmp_path_factory.mktemp("PAM-tiny"))


def build_release(d, vocab_size: int = 256):
    """Write a tiny random PAM release (official layout) into `d`: (d, HF llm, torch parts)."""
    tv_shim()  # transformers imports torchvision, whose CUDA wheel needs the shim on CPU torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf_cfg = Qwen2Config(
        vocab_size=vocab_size, hidden_size=H, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        max_position_embeddings=8192,
    )  # fmt: skip
    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(hf_cfg).eval()
    # perturb parameters only: the RoPE inv_freq buffer is not a weight (not saved)
    freqs = {k: v.clone() for k, v in llm.named_buffers()}
    perturb_(llm, seed=4)
    with torch.no_grad():
        for k, v in llm.named_buffers():
            v.copy_(freqs[k])
    llm.save_pretrained(d, max_shard_size="100KB")  # several shards + index
    idx_file = d / "model.safetensors.index.json"
    index = json.loads(idx_file.read_text())
    assert "lm_head.weight" not in index["weight_map"]  # tied: save_pretrained drops it
    perc, img, sem, nls = _torch_parts()
    extra = {f"model.vision_resampler.{k}": to_np(v) for k, v in perc.state_dict().items()}
    extra |= {f"model.mm_projector_img.{k}": to_np(v) for k, v in img.state_dict().items()}
    extra |= {f"model.mm_projector_semT.{k}": to_np(v) for k, v in sem.state_dict().items()}
    extra |= {f"model.{k}": to_np(v) for k, v in nls.items()}
    tower = "model.vision_tower.sam2_model_predictor."
    extra |= {
        tower + "no_mem_embed": np.zeros((1, 1, 256), np.float32),
        tower + "image_encoder.trunk.pos_embed": np.zeros((1, 96, 7, 7), np.float32),
    }
    save_file(extra, str(d / "model-pam.safetensors"), metadata={"format": "pt"})
    index["weight_map"].update({k: "model-pam.safetensors" for k in extra})
    idx_file.write_text(json.dumps(index))
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(
        model_type="llava_qwen",
        architectures=["LlavaQwenForCausalLM"],
        mm_hidden_size=256,
        mm_projector_type="mlp2x_gelu",
        mm_vision_tower="sam2",
        mm_tunable_parts="mm_vision_resampler,mm_mlp_adapter",
    )
    (d / "config.json").write_text(json.dumps(cfg))
    return d, llm, (perc, img, sem, nls)


@pytest.fixture(scope="module")
def converted(release, sam2_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "pam"
    logs = []
    conv.convert_pam(release[0], sam2_ckpt, out, log=logs.append)
    return out, logs


def test_convert_pam_roundtrip(release, converted):
    d, llm, (perc, img, sem, nls) = release
    out, logs = converted
    assert any("ignored 2 tensors" in s and "model.vision_tower" in s for s in logs)
    assert any("warning" in s and "sam2.1_hiera_t" in s for s in logs)
    meta = read_model_config(out, "pam")
    cfg = PAMConfig.from_dict(meta["config"])
    assert (
        cfg.hidden_size == H and cfg.llm.tie_word_embeddings and cfg.sam2.name == "sam2.1_hiera_t"
    )
    assert meta["ignored_keys"] == 2

    # SAM 2 and LLM sub-directories load with their own loaders
    load_sam2(out / conv.SAM2_SUBDIR)
    model, lcfg, _ = load_qwen2(out / conv.LLM_SUBDIR, dtype=jnp.float32, tokenizer=False)
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    with torch.no_grad():
        want = to_np(llm(ids).logits)
    got = np.asarray(model(jnp.asarray(ids.numpy())))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)  # LLM weights moved intact

    # PAM parts: the image path (perceiver -> projectors -> [img, nl, sem, nl]) vs torch
    parts = PAMParts(cfg, rngs=nnx.Rngs(0))
    assign_params(parts, load_params(out))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 256, 64, 64, generator=g)
    t = torch.randn(1, 2, 256, generator=g)
    with torch.no_grad():
        s_t, i_t = perc(x, t, 1 / 2)
        want = torch.cat(
            [img(i_t)[0], nls["image_newline"][None], sem(s_t)[0], nls["semT_newline"][None]]
        )
    got = parts.image_visual_embeds(
        jnp.asarray(to_np(x).transpose(0, 2, 3, 1)), jnp.asarray(to_np(t))
    )
    assert got.shape == (1, 1042, H)
    err = np.abs(np.asarray(got[0]) - to_np(want)).max()
    print(f"converted image visual embeds: max err {err:.2e}")
    np.testing.assert_allclose(np.asarray(got[0]), to_np(want), atol=ATOL, rtol=0)


def test_video_visual_embeds_match_release_loop(release, converted):
    """The vectorized video path equals the release's per-frame loop. 4 frames keep CPU time
    low; the per-frame pieces do not depend on F (the 16-frame length is test_assembly's)."""
    d, _, (perc, img, sem, nls) = release
    out, _ = converted
    cfg = PAMConfig.from_dict(read_model_config(out, "pam")["config"])
    parts = PAMParts(cfg, rngs=nnx.Rngs(0))
    assign_params(parts, load_params(out))
    g = torch.Generator().manual_seed(6)
    f_n = 4
    x = torch.randn(f_n, 256, 64, 64, generator=g)
    t = torch.randn(f_n, 2, 256, generator=g)
    pieces = []
    with torch.no_grad():
        for f in range(f_n):  # llava_arch.encode_videos, frame by frame
            s_t, i_t = perc(x[f : f + 1], t[f : f + 1], 1 / 2 if f == 0 else 1 / 4)
            pieces += [
                img(i_t)[0],
                nls["image_newline"][None],
                sem(s_t)[0],
                nls["semT_newline"][None],
                nls["frame_newline"][None],
            ]
    want = to_np(torch.cat(pieces))
    got = np.asarray(
        parts.video_visual_embeds(
            jnp.asarray(to_np(x).transpose(0, 2, 3, 1)), jnp.asarray(to_np(t))
        )
    )
    assert got.shape == want.shape == (1024 + 19 + (f_n - 1) * (256 + 19), H)
    print(f"video visual embeds: max err {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_missing_sam2(release, tmp_path):
    d = release[0]
    with pytest.raises(CheckpointError, match="--sam2 SAM2_CKPT.pt is required"):
        conv.convert_pam(d, None, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_cli_missing_sam2(release, tmp_path, capsys):
    from pam_jax.cli import main

    rc = main(["convert", "pam", str(release[0]), str(tmp_path / "o")])
    assert rc == 2
    assert "--sam2" in capsys.readouterr().err


def test_dir_without_weights(release, sam2_ckpt, tmp_path):
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(release[0] / "config.json", d / "config.json")
    with pytest.raises(CheckpointError, match="holds no PAM weights"):
        conv.convert_pam(d, sam2_ckpt, tmp_path / "o")
    with pytest.raises(CheckpointError, match="no config.json"):
        conv.convert_pam(tmp_path, sam2_ckpt, tmp_path / "o")


def _edited_release(src, dst, drop=(), add=None):
    shutil.copytree(src, dst)
    f = dst / "model-pam.safetensors"
    t = load_file(str(f))
    for k in drop:
        t.pop(k)
    t.update(add or {})
    save_file(t, str(f), metadata={"format": "pt"})
    idx = json.loads((dst / "model.safetensors.index.json").read_text())
    for k in drop:
        idx["weight_map"].pop(k)
    idx["weight_map"].update({k: "model-pam.safetensors" for k in add or {}})
    (dst / "model.safetensors.index.json").write_text(json.dumps(idx))
    return dst


def test_unknown_and_missing_keys_listed(release, sam2_ckpt, tmp_path):
    d = _edited_release(
        release[0], tmp_path / "bad",
        drop=["model.frame_newline", "model.vision_resampler.proj.bias"],
        add={"model.mm_projector_extra.weight": np.zeros(3, np.float32),
             "model.some_new_head.bias": np.zeros(3, np.float32)},
    )  # fmt: skip
    with pytest.raises(CheckpointError) as e:
        conv.convert_pam(d, sam2_ckpt, tmp_path / "o", log=lambda s: None)
    msg = str(e.value)
    for k in (
        "model.mm_projector_extra.weight",
        "model.some_new_head.bias",
        "frame_newline",
        "vision_resampler.proj.bias",
    ):
        assert k in msg
    assert "unknown" in msg and "missing" in msg
    assert not (tmp_path / "o").exists()  # nothing written


def test_llm_shape_mismatch(release, sam2_ckpt, tmp_path):
    d = shutil.copytree(release[0], tmp_path / "badcfg")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mlp.gate_proj.weight"):
        conv.convert_pam(d, sam2_ckpt, tmp_path / "o", log=lambda s: None)


def test_classify():
    assert conv.classify("model.vision_tower.sam2_model_predictor.x") == "ignored"
    assert conv.classify("model.layers.0.mlp.up_proj.weight") == "llm"
    assert conv.classify("lm_head.weight") == "llm"
    assert conv.classify("model.image_newline") == "parts"
    assert conv.classify("model.mm_projector_semT.2.bias") == "parts"
    assert conv.classify("model.image_newline_x") == "unknown"
    assert conv.classify("model.mm_projector.0.weight") == "unknown"
