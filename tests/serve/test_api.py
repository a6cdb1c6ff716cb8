"""The JSON API against the Python API on the same clicks, streaming, batching of concurrent
requests, the bounded queue (503) and bad requests (4xx, the server keeps serving)."""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from pam_jax.serve.media import mask_from_png_base64
from tests.serve.conftest import NEW_TOKENS, make_server

CLICK = {"points": [[300.0, 200.0]], "labels": [1]}


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_health_and_upload(live):
    import json

    status, doc = live.get("/health")
    assert status == 200 and doc["status"] == "ok" and doc["image_size"] == 128
    img = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    status, doc = live.request("POST", "/images", _png(img), "image/png")
    assert status == 200, doc
    info = json.loads(doc)
    assert (info["width"], info["height"]) == (70, 50)
    status, data = live.request("GET", f"/images/{info['image_id']}")
    assert status == 200
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), img)


def test_segment_and_describe_equal_the_python_api(live, engine, sample):
    """A click's mask (cached features, decoder only) and its streamed description equal
    `PAMPredictor.describe_image` on the same image and click: the same mask pixels, the same
    greedy token ids (exact: the same float32 ops on CPU)."""
    from pam_jax.demo import sample_image

    image = sample_image(360, 480)[0]
    (ref,) = engine.predictor.describe_image(image, [CLICK], "detailed_caption", "en")
    status, seg = live.post("/segment", {"image_id": sample["image_id"], **CLICK})
    assert status == 200, seg
    mask = mask_from_png_base64(seg["mask"])
    assert mask.shape == (360, 480) and np.array_equal(mask, ref.mask)
    assert seg["area"] == int(ref.mask.sum())
    doc = {"image_id": sample["image_id"], **CLICK, "task": "detailed_caption", "lang": "en"}
    status, events = live.describe(doc)
    assert status == 200, events
    final = events[-1]
    assert final["done"] and final["token_ids"] == ref.token_ids and final["text"] == ref.text
    assert np.array_equal(mask_from_png_base64(final["mask"]), ref.mask)
    # streamed: several lines (NEW_TOKENS > CHUNK), each a prefix of the next
    assert len(ref.token_ids) == NEW_TOKENS and len(events) >= 2
    texts = [e["text"] for e in events]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), texts


def test_concurrent_requests_equal_each_alone(live, sample):
    """16 requests at once (16 different regions, four tasks: prompts of different lengths in
    one batch, two languages) are batched into shared generations and each answer equals the
    same request made alone."""
    tasks = ("recognize", "explain", "brief_caption", "detailed_caption")
    docs = [
        {"image_id": sample["image_id"], "points": [[20.0 + 28 * i, 40.0 + 17 * i]],
         "labels": [1], "task": tasks[i % 4], "lang": ("en", "zh")[i // 8]}
        for i in range(16)
    ]  # fmt: skip
    alone = []
    for d in docs:
        status, events = live.describe(d)
        assert status == 200, events
        alone.append(events[-1])
    before = len(live.server.worker.batches)
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda d: live.describe(d, timeout=60), docs))
    assert time.monotonic() - t0 < 60
    for (status, events), ref in zip(together, alone):
        assert status == 200, events
        assert events[-1]["token_ids"] == ref["token_ids"] and events[-1]["mask"] == ref["mask"]
    sizes = live.server.worker.batches[before:]
    assert sum(sizes) == 16 and max(sizes) > 1, sizes  # regions shared generations


def test_full_queue_answers_503_at_once(engine, sample):
    """Queue of 2, batches of 1, the model paused: of 6 requests at once, one is taken by the
    worker, two wait, the rest get 503 without waiting; after the pause all the rest finish."""
    srv = make_server(engine, queue_size=2, max_batch=1, wait_s=0.0)
    try:
        status, up = srv.post("/sample", {})
        assert status == 200
        doc = {"image_id": up["image_id"], **CLICK}
        srv.server.worker.lock.acquire()
        try:
            with ThreadPoolExecutor(6) as pool:
                futs = []
                for _ in range(6):
                    futs.append(pool.submit(srv.describe, doc, 120))
                    time.sleep(0.2)  # in order: the first is in the worker's hands
                t0 = time.monotonic()
                fast = [f.result(timeout=5) for f in futs[3:]]
                assert time.monotonic() - t0 < 5
                srv.server.worker.lock.release()
                slow = [f.result(timeout=120) for f in futs[:3]]
        finally:
            if srv.server.worker.lock.locked():
                srv.server.worker.lock.release()
        assert [s for s, _ in fast] == [503] * 3, fast
        assert "busy" in fast[0][1][0]["error"]
        assert [s for s, _ in slow] == [200] * 3 and all(e[-1]["done"] for _, e in slow)
    finally:
        srv.close()


def _bad_requests(sample):
    iid = sample["image_id"]
    big = np.random.default_rng(1).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    many = np.zeros((700, 700, 3), np.uint8)  # 490 000 pixels > the 300 000 limit, small file
    return [
        ("json as text/plain", "POST", "/segment", b'{"image_id": "%s"}' % iid.encode(),
         "text/plain", 415, "application/json"),
        ("no content type", "POST", "/describe", b"{}", None, 415, "application/json"),
        ("non-image upload", "POST", "/images", b"hello, I am text pretending" * 4, "image/png",
         415, "not an image"),
        ("truncated PNG", "POST", "/images", _png(big[:100])[:300], "image/png", 415, "decoded"),
        ("oversized upload", "POST", "/images", _png(big), "image/png", 413, "byte limit"),
        ("too many pixels", "POST", "/images", _png(many), "image/png", 413, "pixel limit"),
        ("point outside", "POST", "/segment",
         b'{"image_id": "%s", "points": [[5000, 10]], "labels": [1]}' % iid.encode(),
         "application/json", 400, "outside"),
        ("box outside", "POST", "/describe",
         b'{"image_id": "%s", "box": [0, 0, 10, 9000]}' % iid.encode(), "application/json",
         400, "outside"),
        ("path as image id", "POST", "/segment",
         b'{"image_id": "../../etc/passwd", "points": [[1, 1]], "labels": [1]}',
         "application/json", 400, "id this server gave"),
        ("path in the URL id", "GET", "/images/..%2F..%2Fetc%2Fpasswd", None, None, 404,
         "Not Found"),  # no route matches a path with slashes
        ("dots as the URL id", "GET", "/images/..", None, None, 400, "id this server gave"),
        ("path in an extra field", "POST", "/segment",
         b'{"image_id": "%s", "file": "/etc/passwd"}' % iid.encode(), "application/json", 400,
         "unknown fields"),
        ("unknown id", "POST", "/segment", b'{"image_id": "0123456789abcdef", "box": [1,1,5,5]}',
         "application/json", 404, "no such image"),
        ("bad JSON", "POST", "/segment", b'{"image_id": ', "application/json", 400, "JSON"),
        ("deeply nested JSON", "POST", "/segment", b"[" * 200_000, "application/json", 400,
         "nested"),
        ("JSON list", "POST", "/segment", b"[1, 2]", "application/json", 400, "object"),
        ("too many points", "POST", "/segment",
         b'{"image_id": "%s", "points": %s, "labels": %s}'
         % (iid.encode(), str([[1, 1]] * 40).encode(), str([1] * 40).encode()),
         "application/json", 400, "at most 16 points"),
        ("labels without points", "POST", "/segment",
         b'{"image_id": "%s", "labels": [1]}' % iid.encode(), "application/json", 400,
         "together"),
        ("bad task", "POST", "/describe",
         b'{"image_id": "%s", "box": [1, 1, 9, 9], "task": "poem"}' % iid.encode(),
         "application/json", 400, "unknown task"),
        ("bad perceive parameter", "POST", "/perceive",
         b'{"image_id": "%s", "points_per_side": 5000}' % iid.encode(), "application/json",
         400, "points_per_side"),
        ("non-video upload", "POST", "/videos", _png(many[:10, :10]), "video/mp4", 415,
         "not a video"),
        ("unknown route", "GET", "/etc/passwd", None, None, 404, "Not Found"),
        ("wrong method", "GET", "/segment", None, None, 405, "Not Allowed"),
    ]  # fmt: skip


def test_bad_requests_get_4xx_and_the_server_keeps_serving(live, sample):
    import json

    for name, method, path, body, ctype, want, words in _bad_requests(sample):
        status, data = live.request(method, path, body, ctype)
        doc = json.loads(data)
        assert status == want, (name, status, doc)
        assert words in doc["error"], (name, doc)
    status, doc = live.get("/health")
    assert status == 200 and doc["status"] == "ok"
    status, seg = live.post("/segment", {"image_id": sample["image_id"], **CLICK})
    assert status == 200 and "mask" in seg


@pytest.mark.heavy
def test_perceive_everything(live, engine, sample):
    """/perceive = `pam_jax.pam.perceive.perceive` (heavy: compiles the mask generator)."""
    from pam_jax.demo import sample_image
    from pam_jax.pam.perceive import perceive
    from pam_jax.sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    amg = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
               box_nms_thresh=1.0)  # fmt: skip
    doc = {"image_id": sample["image_id"], "max_regions": 3, **amg}
    status, doc = live.post("/perceive", doc, timeout=600)
    assert status == 200, doc
    gen = SAM2AutomaticMaskGenerator(engine.model.sam2, **amg)
    ref = perceive(sample_image(360, 480)[0], gen, engine.predictor, max_regions=3)
    assert [r["text"] for r in doc["regions"]] == ref.texts and len(ref.texts) == 3
    for r, m in zip(doc["regions"], ref.masks.masks):
        assert np.array_equal(mask_from_png_base64(r["mask"]), m)
