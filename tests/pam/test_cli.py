"""`pam-jax predict`: the CLI contract (prompts, --regions, --mask-input, --stream, outputs,
errors) on the tiny random PAM of test_model.py (SAM 2.1 tiny at 512^2, 2-layer Qwen2).

Numerical parity with the official code is test_e2e.py's; here the CLI's outputs are compared
with the Python API on the same inputs.
"""

import json

import numpy as np
import pytest
from PIL import Image

from pam_jax.cli import main
from pam_jax.pam.cli import _task, regions_from_args
from pam_jax.pam.predictor import PAMPredictor
from tests.pam.test_model import _frames, model_dir, setup  # noqa: F401  (fixtures)

NEW = "3"


@pytest.fixture(scope="module")
def files(setup, tmp_path_factory):  # noqa: F811
    _, _, _, image = setup
    d = tmp_path_factory.mktemp("cli_in")
    Image.fromarray(image).save(d / "img.png")
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[60:200, 100:300] = 255
    Image.fromarray(mask).save(d / "m.png")
    regions = [
        {"box": [40, 30, 200, 250]},
        {"points": [[100, 120], [300, 200]], "labels": [1, 0]},
        {"mask": "m.png"},
    ]
    (d / "regions.json").write_text(json.dumps(regions))
    vid = d / "frames"
    vid.mkdir()
    for i, f in enumerate(_frames(5)):
        Image.fromarray(f).save(vid / f"{i:05d}.jpg")
    return d, mask > 0


def _predict(model_dir, *args):  # noqa: F811
    return main(["predict", "--model", str(model_dir), *map(str, args)])


def test_regions_json_one_batched_call(setup, model_dir, files, tmp_path, capsys):  # noqa: F811
    cfg, model, tok, image = setup
    d, mask = files
    out = tmp_path / "r"
    rc = _predict(model_dir, "--image", d / "img.png", "--regions", d / "regions.json",
                  "--task", "recognize", "--max-new-tokens", NEW, "--json",
                  "--out", out)  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 3
    res = json.loads((tmp_path / "r.json").read_text())
    # the printed JSON lines are the file's regions without the (long) RLE
    assert [{k: v for k, v in r.items() if k != "segmentation"} for r in res["regions"]] == rows
    assert res["task"] == "recognize" and (res["width"], res["height"]) == (420, 300)
    assert (tmp_path / "r.png").is_file()
    # the CLI's answers == one batched Python call on the same regions (the CLI's default dtype
    # on the CPU is float32 for the LLM too: issue 10 item 7)
    import jax.numpy as jnp

    from pam_jax.pam.model import load_pam

    loaded, _, ltok = load_pam(model_dir, llm_dtype=jnp.float32)
    regs = [{"box": [40, 30, 200, 250]},
            {"points": [[100, 120], [300, 200]], "labels": [1, 0]}, {"mask": mask}]  # fmt: skip
    want = PAMPredictor(loaded, ltok, max_new_tokens=int(NEW)).describe_image(
        image, regs, "recognize"
    )
    from pycocotools import mask as mask_utils

    for row, reg, w in zip(rows, res["regions"], want):
        assert row["text"] == w.text
        m = np.asarray(Image.open(tmp_path / row["file"])) > 0
        np.testing.assert_array_equal(m, w.mask)
        rle = dict(reg["segmentation"], counts=reg["segmentation"]["counts"].encode())
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), m)
    # a mask prompt is its own output (_use_mask_as_output) with the +10 presence score
    assert rows[2]["object_score_logit"] == 10.0 and rows[2]["mask_input"] == "m.png"
    iou = (want[2].mask & mask).sum() / (want[2].mask | mask).sum()
    assert iou > 0.97  # only the 4x down / up resampling of the +-10 logits differs


def test_box_points_and_mask_input(model_dir, files, tmp_path, capsys):  # noqa: F811
    d, mask = files
    rc = _predict(model_dir, "--image", d / "img.png", "--box", "40,30,200,250", "--box",
                  "10,10,400,290", "--point", "100,120", "--point", "50,60,0", "--task",
                  "caption", "--max-new-tokens", NEW, "--out", tmp_path / "b")  # fmt: skip
    assert rc == 0
    cap = capsys.readouterr()
    assert len(cap.out.strip().splitlines()) == 3  # two boxes + the clicks
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["task"] == "caption"  # the name the user gave (issue 10 item 6)
    res = res["regions"]
    assert res[2]["labels"] == [1, 0] and all((tmp_path / r["file"]).is_file() for r in res)
    assert f"wrote {tmp_path / 'b.png'}" in cap.err and str(tmp_path / "b_mask2.png") in cap.err
    rc = _predict(model_dir, "--image", d / "img.png", "--mask-input", d / "m.png", "--lang",
                  "zh", "--max-new-tokens", NEW, "--out", tmp_path / "m")  # fmt: skip
    assert rc == 0
    row = json.loads((tmp_path / "m.json").read_text())["regions"][0]
    assert row["object_score_logit"] == 10.0 and row["area"] > 0.9 * mask.sum()


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--box", "40,30,500,250"], "outside the 420x300 image"),
        (["--point", "100,-3"], "outside"),
        ([], "empty prompt"),
        (["--box", "1,1,5,5", "--mask-input", "m.png"], "cannot be combined"),
        (["--box", "1,1,5,5", "--stream"], "need --video"),
        (
            ["--box", "1,1,5,5", "--task", "poem"],
            "invalid choice: 'poem' (choose from "
            "'recognize', 'explain', 'caption', 'detailed-caption')",
        ),
        (["--box", "-0.5,1,5,5", "--box", "1,1,5,5", "--point", "1,1,4"], "label"),
    ],
)
def test_bad_input_exit_2(model_dir, files, capsys, args, msg):  # noqa: F811
    d, _ = files
    args = [str(d / a) if a.endswith(".png") else a for a in args]
    rc = _predict(model_dir, "--image", d / "img.png", *args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and msg in err and len(err.splitlines()) == 1, err


def test_model_dir_without_weights(model_dir, files, tmp_path, capsys):  # noqa: F811
    import shutil

    d, _ = files
    (tmp_path / "empty").mkdir()
    rc = _predict(tmp_path / "empty", "--image", d / "img.png", "--box", "1,1,5,5")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no config.json" in err and len(err.splitlines()) == 1, err
    bare = shutil.copytree(model_dir, tmp_path / "bare")
    (bare / "model.safetensors").unlink()
    rc = _predict(bare, "--image", d / "img.png", "--box", "1,1,5,5")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "holds no PAM weights" in err and len(err.splitlines()) == 1, err


def test_video_stream(model_dir, files, tmp_path, capsys):  # noqa: F811
    d, _ = files
    out = tmp_path / "v"
    rc = _predict(model_dir, "--video", d / "frames", "--box", "40,30,200,250", "--stream",
                  "--clip-frames", "3", "--max-new-tokens", NEW, "--json",
                  "--out", out)  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [(r["first_frame"], r["last_frame"]) for r in rows] == [(0, 2), (3, 4)]
    res = json.loads((tmp_path / "v.json").read_text())
    assert res["clips"] == rows and len(res["frames"]) == 5
    for f in res["frames"]:
        assert (tmp_path / f["file"]).is_file() and (tmp_path / f["overlay"]).is_file()
    gif = Image.open(tmp_path / "v.gif")
    assert gif.n_frames == 5 and gif.size == (420, 300)
    # one mask-prompted clip through the whole video
    rc = _predict(model_dir, "--video", d / "frames", "--mask-input", d / "m.png",
                  "--max-new-tokens", NEW, "--json")  # fmt: skip
    assert rc == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert row["object_score_logits"][0] == 10.0 and row["frames_fed"][0] == 0
    rc = _predict(model_dir, "--video", d / "frames", "--box", "1,1,5,5", "--box", "2,2,6,6")
    assert rc == 2 and "one region" in capsys.readouterr().err
    rc = _predict(model_dir, "--video", d / "frames", "--box", "1,1,5,5", "--stream")
    assert rc == 2 and "--clip-frames" in capsys.readouterr().err


def test_task_names_and_regions_from_args():
    class A:
        video = None
        task = "detailed-caption"

    assert _task(A) == "detailed_caption"
    A.task = "caption"
    assert _task(A) == "brief_caption"
    A.video = "x"
    assert _task(A) == "video_caption"
    A.task = "recognize"
    with pytest.raises(ValueError, match="videos take --task caption"):
        _task(A)
    assert regions_from_args([(1, 2, 3, 4)], [(5, 6, 1)]) == [
        {"box": [1, 2, 3, 4], "points": [[5, 6]], "labels": [1]}
    ]
    assert len(regions_from_args([(1, 2, 3, 4), (0, 0, 1, 1)], [(5, 6, 0)])) == 3
