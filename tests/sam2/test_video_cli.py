"""`pam-jax segment-video`: outputs, PROMPTS.json semantics and bad input.

The model is a random SAM 2.1-tiny at image_size 128 saved as a model directory (the CLI's
numbers are those of `SAM2VideoPredictor`, whose official parity is
tests/sam2/test_video_predictor.py); the saved logits must equal what the predictor API yields
for the same calls (exactly: same jitted code, same inputs), reordered by ascending object id.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from pycocotools import mask as mask_utils

from pam_jax.cli import main
from pam_jax.sam2.config import sam2_config
from pam_jax.sam2.loading import load_sam2, save_sam2
from pam_jax.sam2.model import SAM2Base
from pam_jax.sam2.video_predictor import SAM2VideoPredictor
from tests.sam2.test_video_predictor import H, W, write_frames

N = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vcli")
    model = SAM2Base(sam2_config("t", "2.1", 128), rngs=nnx.Rngs(0))
    b = model.sam_mask_decoder.pred_obj_score_head.layers[2].bias
    b[...] = b[...] + 3.0  # objects present, so masks are not all NO_OBJ_SCORE
    save_sam2(model, root / "model")
    write_frames(root / "frames", n=N)
    mask = np.zeros((H, W), np.uint8)
    mask[70:95, 85:120] = 255
    Image.fromarray(mask).save(root / "mask.png")
    prompts = [
        {"frame": 0, "obj": 5, "box": [30, 25, 80, 70]},
        {"frame": 0, "obj": 2, "points": [[110, 80], [20, 20]], "labels": [1, 0]},
        {"frame": 2, "obj": 2, "mask": "mask.png"},
    ]
    (root / "prompts.json").write_text(json.dumps(prompts))
    return root


def test_segment_video_outputs(setup, capsys, monkeypatch):
    monkeypatch.setenv("PAM_JAX_PROGRESS", "1")  # progress bars also where stderr is no terminal
    root = setup
    out = root / "out"
    rc = main(
        ["segment-video", "--model", str(root / "model"), "--video", str(root / "frames"),
         "--prompts", str(root / "prompts.json"), "--out", str(out), "--save-logits"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "tracking" in err and "frame" in err  # the progress bar (issue 10 item 4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["object_ids"] == [2, 5]
    assert [e["frame"] for e in summary["frames"]] == list(range(N))
    assert len(list((out / "frames").glob("*.png"))) == N
    with Image.open(out / "overlay.gif") as gif:
        assert gif.n_frames == N and gif.size == (W, H)

    # the same official-API calls through the predictor
    model, _ = load_sam2(root / "model")
    pred = SAM2VideoPredictor(model)
    st = pred.init_state(root / "frames")
    pred.add_new_points_or_box(st, 0, 5, box=[30, 25, 80, 70])
    pred.add_new_points_or_box(st, 0, 2, points=[[110, 80], [20, 20]], labels=[1, 0])
    m = np.zeros((H, W), bool)
    m[70:95, 85:120] = True
    pred.add_new_mask(st, 2, 2, m)
    for f, ids, logits in pred.propagate_in_video(st):
        assert ids == [5, 2]
        saved = np.load(out / f"logits_{f:05d}.npy")
        assert saved.shape == (2, H, W) and saved.dtype == np.float32
        np.testing.assert_array_equal(saved, logits[[1, 0]])  # ascending ids: 2, 5
        entry = summary["frames"][f]
        assert [o["obj"] for o in entry["objects"]] == [2, 5]
        assert [o["area"] for o in entry["objects"]] == [int((s > 0).sum()) for s in saved]
        # one mask PNG per object and frame, and the same mask as COCO RLE (issue 10 item 3)
        for o, s in zip(entry["objects"], saved):
            assert o["file"] == f"masks/{o['obj']}/{f:05d}.png"
            png = np.asarray(Image.open(out / o["file"])) > 0
            np.testing.assert_array_equal(png, s > 0)
            rle = dict(o["segmentation"], counts=o["segmentation"]["counts"].encode())
            np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), s > 0)
            if png.any():
                ys, xs = np.nonzero(png)
                assert o["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                     ys.max() - ys.min() + 1]  # fmt: skip


def test_segment_video_single_prompt_and_reverse(setup, capsys):
    root = setup
    out = root / "out_rev"
    rc = main(
        ["segment-video", "--model", str(root / "model"), "--video", str(root / "frames"),
         "--frame", "2", "--obj", "3", "--point", "40,40", "--point", "10,10,0",
         "--out", str(out), "--reverse", "--save-logits"]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["object_ids"] == [3]
    # forward 2..4, then reverse 1..0: every frame once
    assert [e["frame"] for e in summary["frames"]] == list(range(N))
    assert all(np.load(out / f"logits_{f:05d}.npy").shape == (1, H, W) for f in range(N))


@pytest.mark.parametrize(
    "extra, prompts, message",
    [
        (["--frame", "9", "--point", "5,5"], None, "outside the video"),
        (["--box", "100,50,200,90"], None, "outside the 160x120 frame"),
        ([], None, "has no prompt"),
        (["--box", "1,1,20,20", "--box", "2,2,30,30"], None, "--box given 2 times"),
        (["--box", "1,1,20,20", "--mask-input", "m.png"], None, "cannot be combined"),
        ([], [{"frame": 0, "obj": 4}], "object 4 has no prompt"),
        ([], [{"frame": 0, "obj": 1, "points": [[5, 5]], "labels": [1, 1]}], "labels"),
        ([], [{"frame": 7, "obj": 1, "box": [1, 1, 20, 20]}], "outside the video"),
        ([], [{"frame": 0, "obj": 1, "mask": "nope.png"}], "no such file"),
    ],
)
def test_segment_video_bad_prompts(setup, tmp_path, capsys, extra, prompts, message):
    root = setup
    args = ["segment-video", "--model", str(root / "model"), "--video", str(root / "frames")]
    if prompts is not None:
        (tmp_path / "p.json").write_text(json.dumps(prompts))
        args += ["--prompts", str(tmp_path / "p.json")]
    rc = main(args + extra + ["--out", str(tmp_path / "o")])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_segment_video_bad_video(setup, tmp_path, capsys):
    root = setup
    (tmp_path / "empty").mkdir()
    for video, message in [
        (tmp_path / "empty", "no JPEG frames"),
        (tmp_path / "nope", "not a directory"),
    ]:
        rc = main(
            ["segment-video", "--model", str(root / "model"), "--video", str(video),
             "--box", "1,1,20,20", "--out", str(tmp_path / "o")]
        )  # fmt: skip
        assert rc == 2
        assert message in capsys.readouterr().err
