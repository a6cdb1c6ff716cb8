"""The CLI as users expect it (issue 10): one test (or more) per item, on a random SAM 2.1-tiny
at 128^2 saved as a model directory (the numbers are the predictor's; parity with the official
code is tests/test_cli.py's and the predictor tests')."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from pycocotools import mask as mask_utils

from pam_jax.checkpoint import random_normal_params
from pam_jax.cli import main
from pam_jax.sam2.config import sam2_config
from pam_jax.sam2.loading import save_sam2
from pam_jax.sam2.model import SAM2Base

H, W = 120, 160
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("issue10")
    cfg = sam2_config("t", "2.1", 128)
    model = random_normal_params(lambda: SAM2Base(cfg, rngs=nnx.Rngs(0)), seed=1)
    save_sam2(model, root / "model")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    img[30:90, 40:120] = (200, 60, 60)
    Image.fromarray(img).save(root / "img.png")
    return root


def _seg(env, *extra):
    return main(["segment", "--model", str(env / "model"), "--image", str(env / "img.png"),
                 *map(str, extra)])  # fmt: skip


def _one_line_error(capsys, rc, fragment):
    """rc 2 and one `error: ...` line, the last on stderr (progress lines may come before)."""
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    assert errors[0].startswith("error: ") and fragment in errors[0], err
    assert "Traceback" not in err, err
    return errors[0]


# -- item 1: convert refuses a non-empty target ---------------------------------------------------


def test_convert_refuses_a_model_folder(env, tmp_path, capsys):
    pam = tmp_path / "pam-model"
    pam.mkdir()
    (pam / "config.json").write_text(json.dumps({"format": "pam-jax", "kind": "pam"}))
    before = (pam / "config.json").read_text()
    (tmp_path / "x.pt").write_bytes(b"not read: the target is checked first")
    rc = main(["convert", "sam2", str(tmp_path / "x.pt"), str(pam)])
    _one_line_error(capsys, rc, "not empty (it holds a pam model)")
    assert (pam / "config.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pam-model", "x.pt"]  # no temp left
    (tmp_path / "scene.jpg").write_bytes(b"a photo")
    rc = main(["convert", "sam2", str(tmp_path / "x.pt"), str(tmp_path / "scene.jpg")])
    _one_line_error(capsys, rc, "is a file; a model is written as a folder")


# -- item 2: outputs checked before compute; trailing slash = folder ------------------------------


def test_unwritable_out_before_compute(env, tmp_path, capsys):
    # the model does not exist: an --out error first proves the outputs are checked before it
    rc = main(["segment", "--model", str(tmp_path / "no-model"), "--image", str(env / "img.png"),
               "--box", "10,10,50,50", "--out", "/proc/nope/x"])  # fmt: skip
    _one_line_error(capsys, rc, "cannot write there")
    (tmp_path / "file").write_text("x")
    rc = _seg(env, "--box", "10,10,50,50", "--out", tmp_path / "file" / "x")
    _one_line_error(capsys, rc, "is a file, not a folder")


def test_trailing_slash_is_a_folder(env, tmp_path, capsys):
    rc = _seg(env, "--box", "40,30,120,90", "--out", f"{tmp_path / 'out'}/")
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "img.png").is_file() and (tmp_path / "out" / "img.json").is_file()
    assert not (tmp_path / "out.png").exists()


# -- items 3 and 10: mask files, RLE, multimask; clipping; a folder as the image -----------------


def test_mask_files_rle_and_multimask(env, tmp_path, capsys):
    rc = _seg(env, "--box", "40,30,120,90", "--point", "80,60", "--multimask",
              "--out", tmp_path / "m", "--save-logits")  # fmt: skip
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    res = json.loads((tmp_path / "m.json").read_text())
    low = np.load(tmp_path / "m_logits.npy")
    assert len(res["masks"]) == 3 == low.shape[0]
    for i, m in enumerate(res["masks"]):
        png = np.asarray(Image.open(tmp_path / m["file"]))
        assert png.shape == (H, W) and set(np.unique(png)) <= {0, 255}
        mask = png > 0
        rle = dict(m["segmentation"], counts=m["segmentation"]["counts"].encode())
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)
        assert m["area"] == int(mask.sum())
        # one picture per candidate, labelled with its score
        with Image.open(tmp_path / m["overlay"]) as im:
            assert im.size == (W, H)
        assert m["overlay"] == f"m_candidate{i}.png" and isinstance(m["score"], float)
        assert str(tmp_path / m["file"]) in cap.out  # every file is reported
    assert res["best_mask"] == int(np.argmax([m["score"] for m in res["masks"]]))
    assert (res["width"], res["height"], res["model_input_size"]) == (W, H, 128)


def test_box_within_a_pixel_is_clipped(env, tmp_path, capsys):
    rc = _seg(env, "--box", f"-0.5,0,{W + 0.5},{H}", "--out", tmp_path / "c")
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "c.json").read_text())["prompt"]["box"] == [0, 0, W, H]
    rc = _seg(env, "--point", "-3,10", "--out", tmp_path / "d")  # no argparse confusion
    _one_line_error(capsys, rc, f"outside the {W}x{H} image")
    rc = main(["segment", "--model", str(env / "model"), "--image", str(env), "--point", "5,5",
               "--out", str(tmp_path / "e")])  # fmt: skip
    _one_line_error(capsys, rc, "is a folder, not a file")


# -- item 5: repeated --box, ids outside the vocabulary, EXIF ------------------------------------


def test_repeated_box_is_an_error(env, tmp_path, capsys):
    rc = _seg(env, "--box", "1,1,20,20", "--box", "5,5,30,30", "--out", tmp_path / "x")
    _one_line_error(capsys, rc, "--box given 2 times")


def test_generate_ids_outside_vocabulary(tmp_path, capsys):
    from pam_jax import configs
    from pam_jax.llm.io import write_config

    cfg = configs.load("qwen2-tiny")
    write_config(tmp_path, cfg)  # the ids are checked before the weights are read
    for ids in ("999999", "-5", "1,-5,2"):
        rc = main(["generate", "--model", str(tmp_path), "--input-ids", ids])
        _one_line_error(capsys, rc, "outside the vocabulary")


# -- item 4: a progress bar on tokens (frames: tests/sam2/test_video_cli.py; conversion:
# tests/test_cli.py's setup) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from pam_jax import configs
    from pam_jax.llm.io import save_qwen2
    from pam_jax.llm.qwen2 import Qwen2ForCausalLM

    d = tmp_path_factory.mktemp("llm")
    save_qwen2(Qwen2ForCausalLM(configs.load("qwen2-tiny"), rngs=nnx.Rngs(0)), d)
    return d


def test_generate_token_progress(tiny_llm, capsys, monkeypatch):
    argv = ["generate", "--model", str(tiny_llm), "--input-ids", "1,2,3", "--input-ids", "4,5",
            "--max-new-tokens", "6", "--print-ids"]  # fmt: skip
    monkeypatch.setenv("PAM_JAX_PROGRESS", "1")
    assert main(argv) == 0
    cap = capsys.readouterr()
    # the bar counts the decode loop's steps up to 6 (no stop id in this model: all 6 run)
    assert re.search(r"decoding:\s+100%.*6/6 .*token", cap.err), cap.err
    with_bar = cap.out
    monkeypatch.setenv("PAM_JAX_PROGRESS", "0")
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert "decoding" not in cap.err and cap.out == with_bar  # off: the same tokens, no bar


def test_exif_orientation(env, tmp_path, capsys):
    img = np.asarray(Image.open(env / "img.png"))  # 160 wide, 120 high as stored
    pil = Image.fromarray(img)
    exif = pil.getexif()
    exif[0x0112] = 6  # shown rotated: 120 wide, 160 high
    pil.save(tmp_path / "phone.jpg", exif=exif)
    box = "10,130,100,155"  # inside the portrait picture, outside the stored pixels
    rc = main(["segment", "--model", str(env / "model"), "--image", str(tmp_path / "phone.jpg"),
               "--box", box, "--out", str(tmp_path / "p")])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "p.json").read_text())
    assert (res["width"], res["height"]) == (H, W)
    with Image.open(tmp_path / "p_mask0.png") as im:
        assert im.size == (H, W)


# -- item 6: one voice ----------------------------------------------------------------------------


def test_one_wording_and_exit_code(env, tmp_path, capsys):
    rc = _seg(env, "--box", "10,10,500,50", "--out", tmp_path / "x")
    seg = _one_line_error(capsys, rc, "outside the 160x120 image")
    rc = main(["predict", "--model", str(tmp_path / "none"), "--image", str(env / "img.png"),
               "--box", "10,10,500,50"])  # fmt: skip
    pred = _one_line_error(capsys, rc, "outside the 160x120 image")
    assert seg.split("outside")[1] == pred.split("outside")[1]
    # argparse's usage errors: the same one-line form and exit code 2, returned
    rc = main(["segment", "--model", "m", "--image", "i", "--out", "o", "--point", "1,2,7"])
    _one_line_error(capsys, rc, "label is 1 (positive) or 0 (negative)")
    rc = main(["predict", "--model", "m", "--image", "i", "--task", "poem"])
    _one_line_error(capsys, rc, "choose from 'recognize', 'explain', 'caption'")


# -- item 7: dtype defaults -----------------------------------------------------------------------


def test_dtype_default_everywhere():
    import jax.numpy as jnp

    from pam_jax.cli import build_parser

    parsed = []
    for argv in (
        ["segment", "--model", "m", "--image", "i", "--out", "o"],
        ["segment-video", "--model", "m", "--video", "v", "--out", "o"],
        ["predict", "--model", "m", "--image", "i"],
        ["generate", "--model", "m", "--prompt", "p"],
    ):
        args = build_parser(argv).parse_args(argv)
        assert args.dtype == "auto", argv  # the parser first: this check runs on any main
        if argv[0] == "predict":
            assert args.llm_dtype == "auto"
        parsed.append(args)
    from pam_jax.cliutil import resolve_dtype

    for args in parsed:
        assert resolve_dtype(args.dtype, "cpu") == jnp.float32
        assert resolve_dtype(args.dtype, "gpu") == jnp.bfloat16


# -- item 9: help, --version, presets -------------------------------------------------------------


def _help(capsys, *argv) -> str:
    assert main([*argv, "--help"]) == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_texts(capsys):
    assert "same size as --image" in _help(capsys, "segment")
    text = _help(capsys, "predict")
    assert "ch, the release's name for it" in text and "(default 512)" in text
    assert "(default 128)" in _help(capsys, "generate")
    usage = _help(capsys, "convert", "pam").split("Convert")[0]
    assert "--sam2 SAM2_CKPT.pt" in usage and "[--sam2" not in usage
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("pam-jax ")


def test_configs_help_does_not_rewrite_presets():
    presets = sorted((REPO / "configs").glob("*.json"))
    before = {p: p.stat().st_mtime_ns for p in presets}
    out = subprocess.run([sys.executable, "-m", "pam_jax.configs", "--help"], capture_output=True,
                         text=True, check=True, cwd=REPO)  # fmt: skip
    assert "--write" in out.stdout
    assert {p: p.stat().st_mtime_ns for p in presets} == before


def test_demo_out_ignored():
    assert "/demo_out/" in (REPO / ".gitignore").read_text().splitlines()
