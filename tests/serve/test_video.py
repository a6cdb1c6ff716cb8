"""Video: an MP4 made in memory is uploaded (decoded by PyAV, checked by content), its frames
served back; a region prompted on frame 0 is tracked and the clip captioned as
`PAMPredictor.describe_video` does (heavy: compiles the tracking scan)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pam_jax.serve.media import mask_from_png_base64

av = pytest.importorskip("av", reason="video uploads need PyAV (the serve extra)")


def _mp4(frames: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def clip(live):
    from pam_jax.demo import sample_image

    base = sample_image(96, 128)[0]
    frames = np.stack([np.roll(base, 4 * i, axis=1) for i in range(4)])
    status, doc = live.request("POST", "/videos", _mp4(frames), "video/mp4")
    assert status == 200, doc
    return json.loads(doc)


def test_upload_and_frames(live, clip):
    assert (clip["num_frames"], clip["width"], clip["height"]) == (4, 128, 96)
    status, data = live.request("GET", f"/videos/{clip['video_id']}/3")
    assert status == 200 and Image.open(io.BytesIO(data)).size == (128, 96)
    status, doc = live.get(f"/videos/{clip['video_id']}/4")
    assert status == 404 and "4-frame clip" in doc["error"]


@pytest.mark.heavy
def test_track_equals_the_python_api(live, engine, clip):
    region = {"points": [[64.0, 60.0]], "labels": [1]}
    status, doc = live.post("/track", {"video_id": clip["video_id"], **region})
    assert status == 200, doc
    frames = engine.videos.get(clip["video_id"]).frames
    ref = engine.predictor.describe_video(list(frames), region, "video_caption", "en")
    assert doc["text"] == ref.text and len(doc["masks"]) == 4
    for m, r in zip(doc["masks"], ref.masks):
        assert np.array_equal(mask_from_png_base64(m), r)
