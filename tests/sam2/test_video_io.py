"""MP4 input: frames decoded with PyAV, resized like JPEG frames (PIL bicubic on uint8)."""

import numpy as np
import pytest

from pam_jax.sam2.video_io import iter_frames, load_video_frames, preprocess_frame

av = pytest.importorskip("av")


def _write_mp4(path, frames, fps=5):
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"qscale": "1"}  # near-lossless, so decoded colors stay close
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_mp4_frames_load_like_jpeg_frames(tmp_path):
    levels = [30, 90, 150, 210, 250]
    frames = [np.full((48, 64, 3), v, np.uint8) for v in levels]
    frames[2][10:30, 20:40] = (200, 20, 20)  # some structure
    _write_mp4(tmp_path / "clip.mp4", frames)

    video = load_video_frames(tmp_path / "clip.mp4", image_size=64)
    assert len(video) == len(frames)
    assert (video.video_height, video.video_width) == (48, 64)
    decoded = list(iter_frames(tmp_path / "clip.mp4"))
    for f_dec, f_src, f_vid in zip(decoded, frames, video.frames_u8):
        # lossy codec (even at qscale 1): a few levels of error on flat colors and edges
        assert np.abs(f_dec.astype(int) - f_src).mean() < 3
        # the resize applied to MP4 frames is exactly the JPEG path's
        np.testing.assert_array_equal(f_vid, preprocess_frame(f_dec, 64)[0])


def test_missing_mp4_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_video_frames(tmp_path / "nope.mp4", image_size=64)
