"""pam_jax.cliutil: the shared CLI helpers (no model, milliseconds each)."""

from __future__ import annotations

import argparse
import json
import os
import stat

import numpy as np
import pytest
from PIL import Image

from pam_jax import cliutil
from pam_jax.cliutil import CLIError, RunFolder, atomic_dir


def test_fix_negative_values_joins_coordinates():
    argv = ["segment", "--point", "-3,10", "--box", "-0.5,1,5,6", "--frame", "-1", "--point", "4,5"]
    assert cliutil.fix_negative_values(argv) == [
        "segment", "--point=-3,10", "--box=-0.5,1,5,6", "--frame", "-1", "--point", "4,5",
    ]  # fmt: skip


def test_parse_point_and_box():
    assert cliutil.parse_point("1,2") == (1.0, 2.0, 1)
    assert cliutil.parse_point("1,2,0") == (1.0, 2.0, 0)
    with pytest.raises(argparse.ArgumentTypeError, match="label"):
        cliutil.parse_point("1,2,5")
    with pytest.raises(argparse.ArgumentTypeError, match="X1,Y1,X2,Y2"):
        cliutil.parse_box("1,2,3")
    with pytest.raises(argparse.ArgumentTypeError):
        cliutil.parse_box("1,2,3,nan")


def test_run_command_one_voice(capsys):
    def bad(_):
        raise ValueError("first line\nsecond line")

    def missing(_):
        open("/nonexistent/file")

    assert cliutil.run_command(bad, argparse.Namespace()) == cliutil.EXIT_USAGE
    assert capsys.readouterr().err == "error: first line\n"
    assert cliutil.run_command(missing, argparse.Namespace()) == cliutil.EXIT_USAGE
    assert capsys.readouterr().err.startswith("error: /nonexistent/file: No such file")


def test_read_image_exif_and_folder(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)  # landscape pixels, stored sideways
    img[:, :10] = 255
    pil = Image.fromarray(img)
    exif = pil.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    pil.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    got = cliutil.read_image(tmp_path / "phone.jpg")
    assert got.shape == (40, 20, 3)  # displayed as portrait
    assert got[:10, :, 0].mean() > 200 and got[-10:, :, 0].mean() < 50  # white band on top
    with pytest.raises(CLIError, match="is a folder, not a file"):
        cliutil.read_image(tmp_path)
    with pytest.raises(CLIError, match="no such file"):
        cliutil.read_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(CLIError, match="not a readable image"):
        cliutil.read_image(tmp_path / "bad.png")


def test_read_mask_size(tmp_path):
    m = np.zeros((8, 10), np.uint8)
    m[2:4, 3:6] = 7
    Image.fromarray(m).save(tmp_path / "m.png")
    got = cliutil.read_mask(tmp_path / "m.png", (8, 10))
    assert got.dtype == bool and got.sum() == 6
    with pytest.raises(CLIError, match="10x8 pixels; it must be the image's size, 12x8"):
        cliutil.read_mask(tmp_path / "m.png", (8, 12))


def test_mask_png_and_rle_roundtrip(tmp_path):
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    m = rng.random((13, 17)) > 0.6
    p = cliutil.write_mask_png(m, tmp_path / "a" / "m.png")
    back = np.asarray(Image.open(p))
    assert back.dtype == np.uint8 and set(np.unique(back)) <= {0, 255}
    np.testing.assert_array_equal(back > 0, m)
    rle = cliutil.mask_rle(m)
    assert rle["size"] == [13, 17] and isinstance(rle["counts"], str)
    dec = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    np.testing.assert_array_equal(dec.astype(bool), m)
    assert cliutil.mask_box(np.zeros((3, 3), bool)) is None
    assert cliutil.mask_box(m[:0].reshape(0, 17)) is None


def test_output_prefix(tmp_path):
    p = cliutil.output_prefix(str(tmp_path / "out") + "/", default_stem="cat")
    assert p.path(".png") == tmp_path / "out" / "cat.png" and (tmp_path / "out").is_dir()
    p = cliutil.output_prefix(tmp_path / "o2" / "seg", default_stem="cat")
    assert p.path(".json") == tmp_path / "o2" / "seg.json"
    p = cliutil.output_prefix(tmp_path / "o2", default_stem="cat")  # existing folder
    assert p.path(".json") == tmp_path / "o2" / "cat.json"
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(CLIError, match="is a file, not a folder"):
        cliutil.output_prefix(tmp_path / "file.jpg" / "x", default_stem="cat")
    with pytest.raises(CLIError, match="cannot write there"):
        cliutil.output_prefix("/proc/nope/x", default_stem="cat")
    os.mkdir(tmp_path / "o3")
    os.mkdir(tmp_path / "o3" / "seg.png")
    with pytest.raises(CLIError, match="is a folder"):
        cliutil.output_prefix(tmp_path / "o3" / "seg", default_stem="c", suffixes=(".png",))


def test_atomic_dir(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        assert tmp != target and not target.exists()
        (tmp / "w.bin").write_bytes(b"1")
        os.chmod(tmp / "w.bin", 0o600)
    assert (target / "w.bin").read_bytes() == b"1"
    assert stat.S_IMODE(os.stat(target / "w.bin").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o755
    with pytest.raises(CLIError, match="is not empty .*--force"):
        with atomic_dir(target):
            pass
    with pytest.raises(RuntimeError):  # an interrupted write leaves the old folder intact
        with atomic_dir(target, force=True) as tmp:
            (tmp / "w.bin").write_bytes(b"2")
            raise RuntimeError("interrupted")
    assert (target / "w.bin").read_bytes() == b"1"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["model"]  # no temporary left
    with atomic_dir(target, force=True) as tmp:
        (tmp / "v.bin").write_bytes(b"3")
    assert sorted(x.name for x in target.iterdir()) == ["v.bin"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["model"]
    (tmp_path / "f").write_text("x")
    with pytest.raises(CLIError, match="is a file"):
        cliutil.check_new_dir(tmp_path / "f")


def test_run_folder(tmp_path):
    d = tmp_path / "run"
    r = RunFolder.open(d, command="train", settings={"lr": 1e-4, "steps": 10})
    assert not r.resumed and json.loads(r.record.read_text())["settings"]["lr"] == 1e-4
    (d / "ckpt").mkdir()
    r = RunFolder.open(d, command="train", settings={"lr": 1e-4, "steps": 10})
    assert r.resumed
    r = RunFolder.open(d, command="train", settings={"lr": 1e-4, "steps": 20}, may_change=["steps"])
    assert r.resumed
    with pytest.raises(CLIError, match=r"other settings \(lr: 0.0001 then, 0.001 now\)"):
        RunFolder.open(d, command="train", settings={"lr": 1e-3, "steps": 20})
    with pytest.raises(CLIError, match="is a `train` run, not a `eval` run"):
        RunFolder.open(d, command="eval", settings={})
    r = RunFolder.open(d, command="train", settings={"lr": 1e-3}, force=True)
    assert not r.resumed
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("mine")
    with pytest.raises(CLIError, match="not a pam-jax run folder"):
        RunFolder.open(other, command="train", settings={})


def test_dtype_default():
    import jax.numpy as jnp

    assert cliutil.default_dtype("cpu") == jnp.float32
    assert cliutil.default_dtype("gpu") == jnp.bfloat16
    assert cliutil.default_dtype("tpu") == jnp.bfloat16
    assert cliutil.resolve_dtype("auto", "cpu") == jnp.float32
    assert cliutil.resolve_dtype("bfloat16", "cpu") == jnp.bfloat16


def test_repetition_penalty_default():
    class Tok:
        generation_config = {"repetition_penalty": 1.05}

    assert cliutil.repetition_penalty(None, Tok()) == 1.05
    assert cliutil.repetition_penalty(1.2, Tok()) == 1.2
    assert cliutil.repetition_penalty(None, None) == 1.0
