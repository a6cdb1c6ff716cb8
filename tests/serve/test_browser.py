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
            box = page.locator("#marks").bounding_box()
            page.mouse.click(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.6)
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
