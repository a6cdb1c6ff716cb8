"""`pam-jax convert sam2`: key / shape mapping of all 8 official configs, and its failure modes.

The official models are built with random weights (sam2 1.1.0 `build_sam2`, no forward pass); the
mapping runs against the abstract (nnx.eval_shape) pam-jax model, so no JAX parameter is
allocated. Numerical parity of converted models is in test_image_predictor.py.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from pam_jax.convert.sam2 import convert_sam2, detect_config, load_state_dict, map_state_dict

from pam_jax.checkpoint import CheckpointError
from pam_jax.cli import main
from pam_jax.sam2.config import OFFICIAL, sam2_config

# state-dict sizes of the official checkpoints (2.0 lacks 3 tensors), from the reference notes
N_TENSORS = {"t": 471, "s": 519, "b+": 615, "l": 903}


def _official_state_dict(size: str, version: str) -> dict[str, torch.Tensor]:
    from sam2.build_sam import build_sam2

    folder = "sam2.1" if version == "2.1" else "sam2"
    torch.manual_seed(0)
    model = build_sam2(f"configs/{folder}/{folder}_hiera_{size}.yaml", None, device="cpu")
    return model.state_dict()


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_all_official_configs_map(name):
    size, version = OFFICIAL[name]
    sd = _official_state_dict(size, version)
    arrays = {k: v.numpy() for k, v in sd.items()}
    assert len(arrays) == N_TENSORS[size] - (3 if version == "2.0" else 0)
    cfg = detect_config(arrays)
    assert cfg == sam2_config(size, version)
    params = map_state_dict(cfg, arrays, what=name)  # raises on any unknown/missing/misshapen
    assert len(params) == len(arrays)
    # layouts: Linear transposed, conv and transposed-conv kernels permuted, the rest unchanged
    t = "image_encoder.trunk."
    conv = lambda w: w.transpose(2, 3, 1, 0)  # noqa: E731
    pairs = {
        t + "blocks.0.attn.qkv.kernel": (t + "blocks.0.attn.qkv.weight", lambda w: w.T),
        t + "patch_embed.proj.kernel": (t + "patch_embed.proj.weight", conv),
        t + "blocks.0.norm1.scale": (t + "blocks.0.norm1.weight", lambda w: w),
        t + "pos_embed": (t + "pos_embed", lambda w: w),
        "sam_mask_decoder.output_upscaling.0.kernel": (
            "sam_mask_decoder.output_upscaling.0.weight", conv),
        "memory_encoder.fuser.layers.0.dwconv.kernel": (
            "memory_encoder.fuser.layers.0.dwconv.weight", conv),
        "sam_prompt_encoder.point_embeddings.2.embedding": (
            "sam_prompt_encoder.point_embeddings.2.weight", lambda w: w),
        "maskmem_tpos_enc": ("maskmem_tpos_enc", lambda w: w),
    }  # fmt: skip
    if version == "2.1":
        pairs["obj_ptr_tpos_proj.kernel"] = ("obj_ptr_tpos_proj.weight", lambda w: w.T)
        pairs["no_obj_embed_spatial"] = ("no_obj_embed_spatial", lambda w: w)
    for ours, (theirs, layout) in pairs.items():
        np.testing.assert_array_equal(params[ours], layout(arrays[theirs]), err_msg=ours)
    del sd, arrays, params
    gc.collect()


# ----------------------------------------------------------------------------------------------
# failure modes: each must stop the CLI with one clear line on stderr (exit status 2)


@pytest.fixture(scope="module")
def tiny_sd():
    return _official_state_dict("t", "2.1")


def _run_cli(capsys, path, out):
    rc = main(["convert", "sam2", str(path), str(out)])
    err = capsys.readouterr().err.strip()
    return rc, err


def _assert_one_line_error(rc, err, *fragments):
    assert rc == 2
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in err, (f, err)


def test_truncated_file(tmp_path, capsys, tiny_sd):
    good = tmp_path / "good.pt"
    torch.save({"model": tiny_sd}, good)
    data = good.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    rc, err = _run_cli(capsys, bad, tmp_path / "out")
    _assert_one_line_error(rc, err, "truncated.pt", "not a readable PyTorch checkpoint")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_garbage_and_missing_file(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint\n" * 10)
    _assert_one_line_error(*_run_cli(capsys, junk, tmp_path / "o"), "not a readable PyTorch")
    _assert_one_line_error(*_run_cli(capsys, tmp_path / "nope.pt", tmp_path / "o"), "no such file")


@pytest.mark.parametrize(
    "obj,fragment",
    [
        ([1, 2, 3], "holds a list, not a SAM 2 checkpoint"),
        ({"optimizer": {"lr": torch.tensor(1.0)}}, 'no "model" entry'),
        ({"model": torch.zeros(3)}, "not a state dict"),
        ({"model": {"fc.weight": torch.zeros(2, 2)}}, "not a SAM 2 state dict"),
        (
            {"model": {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(64, 3, 7, 7)}},
            "not a known SAM 2 size",
        ),  # fmt: skip
    ],
    ids=["list", "no-model-key", "model-not-dict", "not-sam2", "unknown-size"],
)
def test_not_a_sam2_state_dict(tmp_path, capsys, obj, fragment):
    p = tmp_path / "x.pt"
    torch.save(obj, p)
    _assert_one_line_error(*_run_cli(capsys, p, tmp_path / "out"), fragment)


def _edit(sd, kind):
    sd = dict(sd)
    if kind == "missing":
        del sd["sam_mask_decoder.iou_token.weight"]
        return sd, ["1 missing keys", "sam_mask_decoder.iou_token.weight"]
    if kind == "extra":
        sd["image_encoder.trunk.blocks.0.extra.weight"] = torch.zeros(3)
        return sd, ["1 unknown keys", "image_encoder.trunk.blocks.0.extra.weight"]
    if kind == "shape":
        sd["sam_mask_decoder.conv_s0.weight"] = torch.zeros(16, 256, 1, 1)
        return sd, ["1 wrong shapes", "sam_mask_decoder.conv_s0.weight: (16, 256, 1, 1)"]
    # all three at once: every problem is listed, not just the first (the misshapen key also
    # counts as missing, since nothing fills its parameter)
    a, fa = _edit(sd, "missing")
    b, fb = _edit(a, "extra")
    c, fc = _edit(b, "shape")
    return c, [f for f in fa + fb + fc if not f.startswith("1 ")] + ["2 missing keys"]


@pytest.mark.parametrize("kind", ["missing", "extra", "shape", "all"])
def test_mismatching_keys(tmp_path, capsys, tiny_sd, kind):
    sd, fragments = _edit(tiny_sd, kind)
    p = tmp_path / f"{kind}.pt"
    torch.save({"model": sd}, p)
    rc, err = _run_cli(capsys, p, tmp_path / "out")
    _assert_one_line_error(rc, err, "does not match the model", *fragments)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_bad_image_size(tmp_path, capsys, tiny_sd):
    p = tmp_path / "t.pt"
    torch.save({"model": tiny_sd}, p)
    rc = main(["convert", "sam2", str(p), str(tmp_path / "out"), "--image-size", "1000"])
    _assert_one_line_error(rc, capsys.readouterr().err.strip(), "multiple of 32")


def test_convert_writes_model_dir(tmp_path, tiny_sd):
    """The written directory holds the detected config and every tensor (a bare state dict is
    accepted too)."""
    from pam_jax.checkpoint import load_params, read_model_config

    p = tmp_path / "bare.pt"
    torch.save(tiny_sd, p)
    out = convert_sam2(p, tmp_path / "m", image_size=512)
    meta = read_model_config(out, "sam2")
    assert meta["config"]["image_size"] == 512 and meta["config"]["version"] == "2.1"
    assert meta["config"]["name"] == "sam2.1_hiera_t"
    params = load_params(out)
    assert len(params) == len(tiny_sd)
    w = tiny_sd["sam_mask_decoder.iou_prediction_head.layers.0.weight"].numpy()
    np.testing.assert_array_equal(
        params["sam_mask_decoder.iou_prediction_head.layers.0.kernel"], w.T
    )
    with pytest.raises(CheckpointError, match="no such file"):
        load_state_dict(tmp_path / "missing.pt")
