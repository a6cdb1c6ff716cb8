"""The `pam-jax` command, run in-process through `pam_jax.cli.main` with temporary directories.

`segment` is checked against the official `SAM2ImagePredictor` (random perturbed SAM 2.1-tiny
converted with `pam-jax convert sam2`): PREFIX_logits.npy must be the third value of
`predict(..., return_logits=True)`. Tolerance as in tests/sam2/test_image_predictor.py: 2e-5
of the logits' max |value| (float32 summation-order differences, measured ~1.5e-6).
"""

from __future__ import annotations

import contextlib
import io
import json
import stat

import numpy as np
import pytest
import torch
from PIL import Image
from torch_ref import build_official_sam2, tv_shim

from pam_jax.cli import main

RTOL_SCALE = 2e-5


def sample_image(h: int, w: int, seed: int) -> np.ndarray:
    """A synthetic RGB picture with a few flat shapes on a noisy background."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    img[h // 3 : 4 * h // 5, w // 2 : 3 * w // 4] = (220, 80, 40)
    yy, xx = np.mgrid[:h, :w]
    img[(yy - h // 3) ** 2 + (xx - w // 4) ** 2 < (h // 6) ** 2] = (40, 200, 90)
    return img


def _close(got, want, rtol=RTOL_SCALE):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= rtol * np.abs(want).max()


def test_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("convert", "segment", "demo"):
        assert cmd in out
    assert main(["segment", "--help"]) == 0
    assert "--save-logits" in capsys.readouterr().out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tv_shim()
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    d = tmp_path_factory.mktemp("cli")
    ref = build_official_sam2("t", "2.1")
    ckpt = d / "sam2.1_hiera_tiny.pt"
    torch.save({"model": ref.state_dict()}, ckpt)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAM_JAX_PROGRESS", "1")
        assert main(["convert", "sam2", str(ckpt), str(d / "model")]) == 0
        # issue 10: files 0644, progress over the tensors, a non-empty target needs --force
        for f in (d / "model").iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
        assert "tensor" in err.getvalue()
        assert main(["convert", "sam2", str(ckpt), str(d / "model")]) == 2
        assert "not empty (it holds a sam2 model)" in err.getvalue()
        assert main(["convert", "sam2", str(ckpt), str(d / "model"), "--force"]) == 0
    assert sorted(p.name for p in d.iterdir()) == ["model", ckpt.name]  # no temporary left
    ckpt.unlink()
    img = sample_image(480, 640, seed=3)
    Image.fromarray(img).save(d / "img.png")
    official = SAM2ImagePredictor(ref)
    with torch.no_grad():
        official.set_image(img)
    return d, official


def test_segment_matches_official(setup, tmp_path, capsys):
    d, official = setup
    prefix = tmp_path / "out" / "seg"
    argv = ["segment", "--model", str(d / "model"), "--image", str(d / "img.png"),
            "--point", "300,200", "--point", "280,190,0", "--box", "260,170,470,380",
            "--out", str(prefix), "--save-logits"]  # fmt: skip
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    with torch.no_grad():
        masks, ious, low = official.predict(
            point_coords=[[300.0, 200.0], [280.0, 190.0]], point_labels=[1, 0],
            box=[260.0, 170.0, 470.0, 380.0], multimask_output=False, return_logits=True,
        )  # fmt: skip
    logits = np.load(str(prefix) + "_logits.npy")
    assert logits.dtype == np.float32 and logits.shape == (1, 256, 256)
    _close(logits, low)
    res = json.loads((tmp_path / "out" / "seg.json").read_text())
    assert len(res["masks"]) == 1
    np.testing.assert_allclose(res["masks"][0]["score"], ious[0], atol=1e-5)
    area = int((masks[0] > 0).sum())  # pixels whose logit is within float noise of 0 may flip
    assert abs(res["masks"][0]["area"] - area) <= 5 + 1e-4 * area
    assert isinstance(res["object_score_logit"], float)
    assert res["prompt"]["points"] == [[300.0, 200.0], [280.0, 190.0]]
    assert res["prompt"]["labels"] == [1, 0]
    with Image.open(str(prefix) + ".png") as im:
        assert im.size == (640, 480)

    # the saved logits fed back as a mask prompt, with three output masks
    argv = ["segment", "--model", str(d / "model"), "--image", str(d / "img.png"),
            "--point", "320,220", "--mask-input", str(prefix) + "_logits.npy", "--multimask",
            "--out", str(prefix) + "2", "--save-logits"]  # fmt: skip
    assert main(argv) == 0
    with torch.no_grad():
        _, ious2, low2 = official.predict(
            point_coords=[[320.0, 220.0]], point_labels=[1], mask_input=low[:1],
            multimask_output=True, return_logits=True,
        )  # fmt: skip
    logits2 = np.load(str(prefix) + "2_logits.npy")
    assert logits2.shape == (3, 256, 256)
    _close(logits2, low2)
    res2 = json.loads((tmp_path / "out" / "seg2.json").read_text())
    np.testing.assert_allclose([m["score"] for m in res2["masks"]], ious2, atol=1e-5)


def test_segment_errors(setup, tmp_path, capsys):
    d, _ = setup
    base = ["segment", "--model", str(d / "model"), "--image", str(d / "img.png"),
            "--out", str(tmp_path / "x")]  # fmt: skip

    def fails(extra, fragment, argv=None):
        rc = main((argv or base) + extra)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error: ") and fragment in err, err
        assert "Traceback" not in err and len(err.splitlines()) == 1

    fails([], "empty prompt")
    fails(["--box", "10,10,700,100"], "outside the 640x480 image")
    fails(["--point=-3,10"], "outside the 640x480 image")
    fails(["--box", "100,10,50,100"], "x2 < x1")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    fails(
        ["--point", "5,5"],
        "not a readable image",
        ["segment", "--model", str(d / "model"), "--image", str(broken), "--out", "x"],
    )
    fails(["--point", "5,5"], "not a directory",
          ["segment", "--model", str(tmp_path / "none"), "--image", str(d / "img.png"),
           "--out", "x"])  # fmt: skip
    np.save(tmp_path / "m.npy", np.zeros((64, 64), np.float32))
    fails(["--mask-input", str(tmp_path / "m.npy")], "low-res logits")
    for bad in (["--point", "1,2,3,4"], ["--point", "5,5,2"], ["--box", "1,2,3"]):
        assert main(base + bad) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: argument --") and len(err.splitlines()) == 1, err


def test_mask_input_files(tmp_path):
    """--mask-input: an image mask becomes +-10 logits at low resolution; a logits .npy is used
    as is (its first mask); wrong sizes are clear errors."""
    from pam_jax.sam2.cli import load_mask_input

    m = np.zeros((480, 640), np.uint8)
    m[100:300, 200:500] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    low = load_mask_input(tmp_path / "m.png", (480, 640), 256)
    assert low.shape == (1, 256, 256) and low.dtype == np.float32
    assert low.max() <= 10 + 1e-5 and low.min() >= -10 - 1e-5
    assert low[0, 106, 133] > 9 and low[0, 10, 10] < -9  # inside / outside the rectangle
    logits = np.random.default_rng(0).normal(size=(3, 256, 256)).astype(np.float32)
    np.save(tmp_path / "l.npy", logits)
    np.testing.assert_array_equal(load_mask_input(tmp_path / "l.npy", (480, 640), 256), logits[:1])
    with pytest.raises(ValueError, match="it must be the image.s size, 100x100"):
        load_mask_input(tmp_path / "m.png", (100, 100), 256)
    with pytest.raises(ValueError, match="no such file"):
        load_mask_input(tmp_path / "missing.png", (480, 640), 256)
