"""`SAM2VideoPredictor(prefetch=K)`: upcoming frames encoded in one batched call give the same
tracking as one frame per step (`prefetch=1`, the path the official-parity tests run).

Tiny SAM 2.1 at 128², random weights, CPU float32. Tolerance: logits within 1e-4 absolute
(scale ~1-10): the two paths run the same float32 operations, the image encoder at batch K
instead of 1, so only the order of accumulation in the batched convolutions / matmuls may differ
(measured: 0 on this CPU); thresholded masks must be identical.
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from pam_jax.checkpoint import random_normal_params
from pam_jax.sam2.config import sam2_config
from pam_jax.sam2.model import SAM2Base
from pam_jax.sam2.video_predictor import SAM2VideoPredictor

ATOL = 1e-4
N_FRAMES = 7


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    rng = np.random.default_rng(0)
    for t in range(N_FRAMES):
        img = rng.integers(0, 60, (48, 64, 3), dtype=np.uint8)
        img[8 + t : 30 + t, 10 + 2 * t : 34 + 2 * t] = (220, 50, 40)  # a moving square
        Image.fromarray(img).save(folder / f"{t:05d}.jpg", quality=95)
    cfg = sam2_config("t", "2.1", 128)
    model = random_normal_params(lambda: SAM2Base(cfg, rngs=nnx.Rngs(0)), seed=3)
    return folder, model


def scenario(pred: SAM2VideoPredictor, folder) -> dict:
    """Two objects (a box on frame 0, a click on frame 3: frame 3 is conditioning for one of
    them only, so every frame takes a step); forward over the clip, then reverse from frame 5
    over 3 frames."""
    state = pred.init_state(folder)
    pred.add_new_points_or_box(state, 0, 1, box=[10, 8, 36, 30])
    pred.add_new_points_or_box(state, 3, 2, points=[[50, 30]], labels=[1])
    outs = {("fwd", f): m for f, _, m in pred.propagate_in_video(state)}
    outs |= {
        ("rev", f): m
        for f, _, m in pred.propagate_in_video(
            state, start_frame_idx=5, max_frame_num_to_track=3, reverse=True
        )
    }
    return outs


def test_prefetch_equals_one_frame_per_step(setup):
    folder, model = setup
    want = scenario(SAM2VideoPredictor(model, prefetch=1), folder)
    # 4: the forward pass takes frames 0-3 and 4-6 (padded to 4), the reverse one 5-2
    got = scenario(SAM2VideoPredictor(model, prefetch=4), folder)
    assert list(got) == list(want)
    assert [key for key in want if key[0] == "rev"] == [("rev", f) for f in (5, 4, 3, 2)]
    for key, m in want.items():
        assert m.shape == got[key].shape == (2, 48, 64)
        np.testing.assert_allclose(got[key], m, atol=ATOL, err_msg=str(key))
        np.testing.assert_array_equal(got[key] > 0, m > 0, err_msg=str(key))
    fwd = np.stack([m for key, m in want.items() if key[0] == "fwd"])
    print("max |diff|", max(float(np.abs(got[k] - m).max()) for k, m in want.items()))
    assert 0 < (fwd > 0).mean() < 1, "masks must be neither empty nor full for the check to bite"


def test_prefetch_setting(setup, monkeypatch):
    _, model = setup
    monkeypatch.setenv("PAM_JAX_VIDEO_PREFETCH", "8")
    assert SAM2VideoPredictor(model).prefetch == 8
    assert SAM2VideoPredictor(model, prefetch=2).prefetch == 2  # the argument wins
    for bad in ("0", "two", "-3"):
        monkeypatch.setenv("PAM_JAX_VIDEO_PREFETCH", bad)
        with pytest.raises(ValueError, match="whole number of frames >= 1"):
            SAM2VideoPredictor(model)
    monkeypatch.delenv("PAM_JAX_VIDEO_PREFETCH")
    with pytest.raises(ValueError, match="whole number of frames >= 1"):
        SAM2VideoPredictor(model, prefetch=0)


def test_video_sizes_share_the_tracking_step(setup, tmp_path):
    """Videos of another size reuse the compiled tracking step (the default, prefetched path;
    `prefetch=1`'s step takes the same arguments): the video size only enters the small
    upsample program (`_video_res`)."""
    from pam_jax.sam2 import video_steps

    _, model = setup
    prefetch, step = 4, video_steps._propagate_prefetched
    counts = []
    for h, w in [(48, 64), (40, 90)]:
        folder = tmp_path / f"{h}x{w}"
        folder.mkdir()
        for t in range(4):
            Image.fromarray(np.full((h, w, 3), 40 * t, np.uint8)).save(folder / f"{t:05d}.jpg")
        pred = SAM2VideoPredictor(model, prefetch=prefetch)
        state = pred.init_state(folder)
        pred.add_new_points_or_box(state, 0, 1, box=[2, 3, w // 2, h // 2])
        masks = [m for _, _, m in pred.propagate_in_video(state)]
        assert masks[-1].shape == (1, h, w)
        counts.append((step._cache_size(), video_steps._video_res._cache_size()))
    assert counts[0][0] == counts[1][0], counts
    assert counts[1][1] >= 2, counts  # one upsample program per size
