"""`pam-jax serve` on the demo's micro random PAM (SAM 2.1-style micro Hiera at 128, 2-layer
Qwen2, word-level tokenizer; `pam_jax.demo.write_initial_model`), built once per session, behind
a real uvicorn on a free localhost port. Every generation runs at one batch bucket (16) so the
whole session compiles one prefill and one decode program."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette", reason="pam-jax serve needs the serve extra (starlette)")
pytest.importorskip("uvicorn", reason="pam-jax serve needs the serve extra (uvicorn)")

NEW_TOKENS = 6  # > CHUNK: every description streams in at least two lines
CHUNK = 4
ARTIFACTS = Path(__file__).parent / "artifacts"  # git-ignored: screenshots of the page


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    from pam_jax.demo import write_initial_model

    # plain random weights (no demo alignment): their greedy text reaches no stop token within
    # NEW_TOKENS, so every description streams several lines (the aligned init stops after one)
    return write_initial_model(tmp_path_factory.mktemp("serve") / "pam", 128, 0, align=False)


@pytest.fixture(scope="session")
def engine(model_dir):
    import jax.numpy as jnp

    from pam_jax.pam.model import load_pam
    from pam_jax.serve.engine import Engine

    model, _, tok = load_pam(model_dir, llm_dtype=jnp.float32)
    return Engine(model, tok, max_new_tokens=NEW_TOKENS, chunk=CHUNK, batch_buckets=(16,))


class Live:
    """A uvicorn server on a thread (localhost, free port) and a tiny JSON client."""

    def __init__(self, server):
        import uvicorn

        from pam_jax.serve.app import create_app

        self.server = server
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(create_app(server), host="127.0.0.1", port=self.port,
                             log_level="warning")  # fmt: skip
        self.uv = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.uv.started:
            if time.monotonic() - t0 > 30:
                raise RuntimeError("uvicorn did not start in 30 s")
            time.sleep(0.05)

    def close(self) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout=10)
        self.server.worker.stop()

    def request(self, method: str, path: str, body: bytes | None = None,
                ctype: str | None = None, timeout: float = 120) -> tuple[int, bytes]:  # fmt: skip
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if ctype:
            req.add_header("Content-Type", ctype)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def post(self, path: str, doc: Any, timeout: float = 120) -> tuple[int, Any]:
        status, data = self.request("POST", path, json.dumps(doc).encode(), "application/json",
                                    timeout)  # fmt: skip
        return status, _parse(data)

    def get(self, path: str) -> tuple[int, Any]:
        status, data = self.request("GET", path)
        return status, _parse(data)

    def describe(self, doc: dict, timeout: float = 120) -> tuple[int, list[dict]]:
        """POST /describe -> (status, the NDJSON events)."""
        status, data = self.request("POST", "/describe", json.dumps(doc).encode(),
                                    "application/json", timeout)  # fmt: skip
        if status != 200:
            return status, [json.loads(data)]
        return status, [json.loads(line) for line in data.decode().splitlines() if line]


def _parse(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data


def make_server(engine, *, queue_size=64, max_batch=16, wait_s=0.05, limits=None) -> Live:
    from pam_jax.serve.app import Server
    from pam_jax.serve.worker import Worker

    worker = Worker(engine, queue_size=queue_size, max_batch=max_batch, wait_s=wait_s).start()
    return Live(Server(engine, worker, limits))


@pytest.fixture(scope="session")
def live(engine):
    from pam_jax.serve.media import Limits

    srv = make_server(engine, limits=Limits(max_upload_bytes=200_000, max_pixels=300_000))
    yield srv
    srv.close()


@pytest.fixture(scope="session")
def sample(live) -> dict:
    """The generated sample scene uploaded once: {"image_id", "width", "height"}."""
    status, doc = live.post("/sample", {})
    assert status == 200, doc
    return doc
