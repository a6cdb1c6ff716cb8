"""The page in headless Debian Chromium (playwright drives /usr/bin/chromium; nothing is
downloaded): load it on the micro model, pick the sample, click a point, and check the mask
overlay and the streamed caption against the API's answer for the same click. The screenshot
is kept in tests/serve/artifacts/page.png (git-ignored)."""

from __future__ import annotations

import base64
import io
import os
import shutil

import numpy as np
import pytest

from pam_jax.serve.media import mask_from_png_base64
from tests.serve.conftest import ARTIFACTS

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"{CHROMIUM} missing: apt-get install -y chromium chromium-driver (.ci/run does)",
)

# the overlay canvas' alpha channel as a PNG (alpha > 0 = the mask the page shows)
OVERLAY_ALPHA = """() => {
  const c = document.getElementById("overlay");
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  const out = document.createElement("canvas"); out.width = c.width; out.height = c.height;
  const o = out.getContext("2d"), img = o.createImageData(c.width, c.height);
  for (let i = 0; i < d.length; i += 4) {
    const v = d[i + 3] > 0 ? 255 : 0;
    img.data[i] = img.data[i + 1] = img.data[i + 2] = v; img.data[i + 3] = 255;
  }
  o.putImageData(img, 0, 0);
  return out.toDataURL("image/png").split(",")[1];
}"""


def test_click_shows_the_apis_mask_and_caption(live, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package")
    from PIL import Image

    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, args=ARGS, headless=True
        )
        try:
            page = ctx.new_page()
            page.goto(live.url + "/")
            assert page.title().startswith("pam-jax")
            page.click("#sample")
            page.wait_for_function(
                "document.getElementById('status').textContent.includes('click a point')",
                timeout=60_000,
            )
            box = page.locator("#marks").bounding_box()  # scrolled into view by click()
            page.locator("#marks").click(position={"x": box["width"] * 0.6,
                                                   "y": box["height"] * 0.6})  # fmt: skip
            page.wait_for_selector("#caption[data-state=done]", timeout=120_000)
            caption = page.locator("#caption").text_content()
            image_id = page.evaluate("img.image_id")
            points, labels = page.evaluate("points"), page.evaluate("labels")
            task, lang = page.evaluate("[$('task').value, $('lang').value]")
            overlay = page.evaluate(OVERLAY_ALPHA)
            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            ctx.close()
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "page.png")

    assert labels == [1] and len(points) == 1
    status, seg = live.post("/segment", {"image_id": image_id, "points": points, "labels": labels})
    assert status == 200, seg
    mask = mask_from_png_base64(seg["mask"])
    with Image.open(io.BytesIO(base64.b64decode(overlay))) as im:
        shown = np.asarray(im.convert("L")) > 127
    assert mask.any() and np.array_equal(shown, mask)
    doc = {"image_id": image_id, "points": points, "labels": labels, "task": task, "lang": lang}
    status, events = live.describe(doc)
    assert status == 200 and events[-1]["done"]
    assert caption == events[-1]["text"] and caption


@pytest.mark.heavy
def test_video_tracked_on_the_page(live, tmp_path):
    """Upload a clip on the page, click on frame 0, track: the page shows the API's caption
    and, on the last frame, the API's mask (heavy: compiles the tracking scan)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package")
    from PIL import Image

    from pam_jax.demo import sample_image
    from tests.serve.test_video import _mp4

    base = sample_image(96, 128)[0]
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(_mp4(np.stack([np.roll(base, 4 * i, axis=1) for i in range(4)])))
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, args=ARGS, headless=True
        )
        try:
            page = ctx.new_page()
            page.goto(live.url + "/")
            page.set_input_files("#vfile", str(clip))
            page.wait_for_function(
                "document.getElementById('vstatus').textContent.includes('frame 0')",
                timeout=60_000,
            )
            box = page.locator("#vmarks").bounding_box()
            page.locator("#vmarks").click(position={"x": box["width"] * 0.5,
                                                    "y": box["height"] * 0.6})  # fmt: skip
            page.click("#track")
            page.wait_for_function(
                "document.getElementById('vstatus').textContent.startsWith('tracked')",
                timeout=600_000,
            )
            page.fill("#vframe", "3")
            page.dispatch_event("#vframe", "input")
            page.wait_for_timeout(1000)
            caption = page.locator("#vcaption").text_content()
            video_id, points = page.evaluate("vid.video_id"), page.evaluate("vpts")
            overlay = page.evaluate(OVERLAY_ALPHA.replace('"overlay"', '"voverlay"'))
            page.screenshot(path=str(tmp_path / "video.png"), full_page=True)
        finally:
            ctx.close()
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(tmp_path / "video.png", ARTIFACTS / "video.png")
    status, doc = live.post("/track", {"video_id": video_id, "points": points, "labels": [1]})
    assert status == 200, doc
    assert caption == doc["text"]
    with Image.open(io.BytesIO(base64.b64decode(overlay))) as im:
        shown = np.asarray(im.convert("L")) > 127
    assert np.array_equal(shown, mask_from_png_base64(doc["masks"][3]))
