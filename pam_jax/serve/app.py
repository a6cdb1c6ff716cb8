"""The HTTP API and the page (Starlette). Every answer is JSON (or an NDJSON stream, or PNG);
bad input is a 4xx `{"error": "..."}` with one clear sentence, and no request can stop the
server (an unexpected exception is a 500 for that request only).

    GET  /                      the page (static/index.html; no external resource)
    GET  /health                {"status": "ok", model facts, queue}
    POST /images                raw image bytes -> {"image_id", "width", "height"} (encoded once)
    POST /sample                a generated sample scene, as /images
    GET  /images/{id}           the stored image (PNG)
    POST /segment               {"image_id", "points"?, "labels"?, "box"?} -> {"mask", "score"}
    POST /describe              ... + "task", "lang" -> NDJSON lines {"text"} ... {"done": true,
                                "text", "token_ids", "mask", "score"} (streamed as generated)
    POST /perceive              {"image_id", "task"?, "lang"?, "points_per_side"?, ...}
                                -> {"regions": [{"mask", "box", "text", "area"}]}
    POST /videos                raw MP4 / WebM bytes -> {"video_id", "num_frames", ...}
    GET  /videos/{id}/{i}       frame i (PNG)
    POST /track                 {"video_id", "points"?, "labels"?, "box"?, "lang"?}
                                -> {"masks": [...], "text"}

Ids are made by the server (16 hex digits) and only looked up in memory. Masks are base64 PNGs
(0 / 255 grey) at the image's own size.
"""

from __future__ import annotations

import asyncio
import json
import re
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pam_jax.sam2.prompts import PromptError, pad_regions
from pam_jax.serve.engine import DescribeJob, Engine, check_task
from pam_jax.serve.media import (
    Limits,
    MediaError,
    decode_image,
    decode_video,
    png_base64,
    png_bytes,
)
from pam_jax.serve.worker import Busy, Task, Worker

ID = re.compile(r"[0-9a-f]{16}")
JSON_LIMIT = 1 << 20  # a prompt is a few hundred bytes
REGION_KEYS = ("points", "labels", "box")
MAX_POINTS = 16  # per prompt: each power-of-two point count is one more compiled decoder
AMG_KEYS = {  # perceive's generator parameters: (type, lowest, highest)
    "points_per_side": (int, 1, 64),
    "pred_iou_thresh": (float, 0.0, 1.0),
    "stability_score_thresh": (float, 0.0, 1.0),
    "box_nms_thresh": (float, 0.0, 1.0),
    "max_regions": (int, 1, 64),
}


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes `limit`, whatever Content-Length says."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"request body of {declared} bytes is over the {limit} byte limit")
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > limit:
            raise HTTPError(413, f"request body is over the {limit} byte limit")
    return bytes(data)


async def _json(request: Request, allowed: set[str]) -> dict[str, Any]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise HTTPError(415, f"expected Content-Type application/json, got {ctype or 'none'!r}")
    try:
        doc = json.loads(await _body(request, JSON_LIMIT))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HTTPError(400, f"the body is not valid JSON ({e})") from None
    except RecursionError:
        raise HTTPError(400, "the JSON body is nested too deeply") from None
    if not isinstance(doc, dict):
        raise HTTPError(400, "the body must be a JSON object")
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise HTTPError(400, f"unknown fields {unknown} (allowed: {', '.join(sorted(allowed))})")
    return doc


def _lookup(store, doc: dict[str, Any], key: str):
    value = doc.get(key)
    if not isinstance(value, str) or not ID.fullmatch(value):
        raise HTTPError(400, f"{key} must be an id this server gave (16 hex digits)")
    item = store.get(value)
    if item is None:
        raise HTTPError(404, f"no such {key.split('_')[0]} (ids expire; upload it again)")
    return item


def _region(doc: dict[str, Any], hw: tuple[int, int], size: int) -> dict[str, Any]:
    region = {k: doc[k] for k in REGION_KEYS if doc.get(k) is not None}
    if isinstance(region.get("points"), list) and len(region["points"]) > MAX_POINTS:
        raise HTTPError(400, f"at most {MAX_POINTS} points per prompt")
    try:
        pad_regions([region], hw, size)  # the one prompt check, before the queue
    except (PromptError, ValueError, TypeError) as e:
        raise HTTPError(400, str(e).removeprefix("region 0: ")) from None
    return region


class Server:
    """The app's state: an engine, its worker and the upload limits."""

    def __init__(self, engine: Engine, worker: Worker, limits: Limits | None = None):
        self.engine, self.worker, self.limits = engine, worker, limits or Limits()

    async def call(self, fn, *args: Any) -> Any:
        """Run fn(*args) on the worker; Busy (-> 503) at once when the queue is full."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def done(result, error):
            def put():
                if not fut.done():
                    fut.set_exception(error) if error else fut.set_result(result)

            loop.call_soon_threadsafe(put)

        self.worker.submit(Task(lambda: fn(*args), done))
        return await fut

    # -- routes -------------------------------------------------------------------------------
    async def index(self, request: Request) -> Response:
        html = resources.files("pam_jax.serve").joinpath("static/index.html").read_bytes()
        return Response(html, media_type="text/html; charset=utf-8")

    async def health(self, request: Request) -> Response:
        e = self.engine
        return JSONResponse({
            "status": "ok", "image_size": e.size, "max_new_tokens": e.max_new_tokens,
            "queued": self.worker.queue.qsize(), "queue_size": self.worker.queue.maxsize,
            "max_batch": self.worker.max_batch, "max_upload_bytes": self.limits.max_upload_bytes,
            "max_pixels": self.limits.max_pixels, "max_frames": self.limits.max_frames,
        })  # fmt: skip

    async def _add_image(self, image) -> Response:
        entry = await self.call(self.engine.add_image, image)
        h, w = entry.hw
        return JSONResponse({"image_id": entry.id, "width": w, "height": h})

    async def upload(self, request: Request) -> Response:
        data = await _body(request, self.limits.max_upload_bytes)
        image = await run_in_threadpool(decode_image, data, self.limits)
        return await self._add_image(image)

    async def sample(self, request: Request) -> Response:
        from pam_jax.demo import sample_image

        return await self._add_image(sample_image(360, 480)[0])

    async def image(self, request: Request) -> Response:
        entry = _lookup(self.engine.images, dict(request.path_params), "image_id")
        return Response(await run_in_threadpool(png_bytes, entry.image), media_type="image/png")

    async def segment(self, request: Request) -> Response:
        doc = await _json(request, {"image_id", *REGION_KEYS})
        entry = _lookup(self.engine.images, doc, "image_id")
        region = _region(doc, entry.hw, self.engine.size)
        mask, score = await self.call(self.engine.segment, entry, region)
        return JSONResponse({"mask": png_base64(mask), "score": score, "area": int(mask.sum())})

    async def describe(self, request: Request) -> Response:
        doc = await _json(request, {"image_id", "task", "lang", *REGION_KEYS})
        entry = _lookup(self.engine.images, doc, "image_id")
        region = _region(doc, entry.hw, self.engine.size)
        try:
            task, lang = check_task(doc.get("task", "recognize"), doc.get("lang", "en"))
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = DescribeJob(entry, region, task, lang, None, None)

        def emit(text, ids, done):
            ev = {"text": text}
            if done:
                ev.update(done=True, token_ids=ids, mask=png_base64(job.mask), score=job.score)
            loop.call_soon_threadsafe(events.put_nowait, ev)

        job.emit = emit
        job.fail = lambda e: loop.call_soon_threadsafe(
            events.put_nowait, {"done": True, "error": f"generation failed: {e}"}
        )
        self.worker.submit(job)  # Busy -> 503 before the stream starts

        async def lines():
            while True:
                ev = await events.get()
                yield json.dumps(ev, ensure_ascii=False) + "\n"
                if ev.get("done"):
                    return

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def perceive(self, request: Request) -> Response:
        doc = await _json(request, {"image_id", "task", "lang", *AMG_KEYS})
        entry = _lookup(self.engine.images, doc, "image_id")
        try:
            task, lang = check_task(doc.get("task", "recognize"), doc.get("lang", "en"))
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        amg = {}
        for key, (kind, lo, hi) in AMG_KEYS.items():
            if key in doc:
                v = doc[key]
                ok = isinstance(v, (int, float)) and not isinstance(v, bool)
                if not ok or (kind is int and v != int(v)) or not lo <= v <= hi:
                    raise HTTPError(
                        400, f"{key} must be {kind.__name__} in [{lo}, {hi}], got {v!r}"
                    )
                amg[key] = kind(v)
        regions = await self.call(lambda: self.engine.perceive(entry, task, lang, **amg))
        for r in regions:
            r["mask"] = png_base64(r["mask"])
        return JSONResponse({"regions": regions})

    async def upload_video(self, request: Request) -> Response:
        data = await _body(request, self.limits.max_upload_bytes)
        frames = await run_in_threadpool(decode_video, data, self.limits)
        entry = self.engine.add_video(frames)
        t, h, w = frames.shape[:3]
        return JSONResponse({"video_id": entry.id, "num_frames": t, "width": w, "height": h})

    async def frame(self, request: Request) -> Response:
        entry = _lookup(self.engine.videos, dict(request.path_params), "video_id")
        i = request.path_params["index"]
        if not 0 <= i < len(entry.frames):
            raise HTTPError(404, f"frame {i} is not in this {len(entry.frames)}-frame clip")
        return Response(await run_in_threadpool(png_bytes, entry.frames[i]), media_type="image/png")

    async def track(self, request: Request) -> Response:
        doc = await _json(request, {"video_id", "lang", *REGION_KEYS})
        entry = _lookup(self.engine.videos, doc, "video_id")
        region = _region(doc, entry.frames.shape[1:3], self.engine.size)
        try:
            _, lang = check_task("recognize", doc.get("lang", "en"))
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        masks, text = await self.call(self.engine.track, entry, region, lang)
        return JSONResponse({"masks": [png_base64(m) for m in masks], "text": text})


def _guard(handler):
    """Turns any failure into one JSON answer; the server keeps serving."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except HTTPError as e:
            return _error(e.status, str(e))
        except MediaError as e:
            return _error(e.status, str(e))
        except Busy:
            return _error(503, "the server is busy (queue full); try again shortly")
        except (PromptError, ValueError) as e:
            return _error(400, str(e))
        except Exception as e:  # a bug, not the client's fault; logged by the caller's uvicorn
            return _error(500, f"internal error ({type(e).__name__}: {e})")

    return run


def create_app(server: Server) -> Starlette:
    s = server
    routes = [
        Route("/", _guard(s.index), methods=["GET"]),
        Route("/health", _guard(s.health), methods=["GET"]),
        Route("/images", _guard(s.upload), methods=["POST"]),
        Route("/sample", _guard(s.sample), methods=["POST"]),
        Route("/images/{image_id}", _guard(s.image), methods=["GET"]),
        Route("/segment", _guard(s.segment), methods=["POST"]),
        Route("/describe", _guard(s.describe), methods=["POST"]),
        Route("/perceive", _guard(s.perceive), methods=["POST"]),
        Route("/videos", _guard(s.upload_video), methods=["POST"]),
        Route("/videos/{video_id}/{index:int}", _guard(s.frame), methods=["GET"]),
        Route("/track", _guard(s.track), methods=["POST"]),
    ]

    async def not_found(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        return _error(status, f"{request.method} {request.url.path}: {exc.detail}")

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
