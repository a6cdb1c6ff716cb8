"""`pam-jax serve --model DIR [--host 127.0.0.1] [--port 8000]`: the page and the JSON API.

Listens on localhost unless --host says otherwise. The model is loaded and its steps compiled
before the first request (--no-warmup skips that: the first click then waits for the compile).
"""

from __future__ import annotations

import argparse
import sys

from pam_jax.cliutil import CLIError, add_dtype_argument, positive_int, resolve_dtype, status

LOCAL = ("127.0.0.1", "localhost", "::1")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        help="a web page and JSON API: click a region, read what it is",
        description="Serve a PAM model: upload an image or video, click points or drag a box, "
        "see the mask and the streamed label / caption; perceive everything.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="PAM model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default localhost)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N",
                   help="tokens per description at most (default 64)")  # fmt: skip
    p.add_argument("--chunk", type=positive_int, default=8, metavar="N",
                   help="tokens per streamed decode call (default 8)")  # fmt: skip
    p.add_argument("--queue-size", type=positive_int, default=32, metavar="N",
                   help="requests waiting beyond this get 503 (default 32)")  # fmt: skip
    p.add_argument("--max-batch", type=positive_int, default=16, metavar="N",
                   help="regions generated together at most (default 16)")  # fmt: skip
    p.add_argument("--batch-wait-ms", type=float, default=10.0, metavar="MS",
                   help="how long a description waits for others to share its batch")  # fmt: skip
    p.add_argument("--max-upload-mb", type=float, default=20.0, metavar="MB")
    p.add_argument("--max-pixels", type=positive_int, default=4096 * 4096, metavar="N")
    p.add_argument("--max-frames", type=positive_int, default=32, metavar="N",
                   help="frames of an uploaded clip kept (default 32)")  # fmt: skip
    p.add_argument("--no-warmup", action="store_true", help="compile on the first request")
    add_dtype_argument(p, what="SAM 2 and the perceiver")
    add_dtype_argument(p, "--llm-dtype", what="the LLM (weights too)")
    return p


def build_server(args: argparse.Namespace):
    """Load the model and make the app's `Server` (engine + started worker)."""
    from pam_jax.checkpoint import read_model_config
    from pam_jax.pam.model import load_pam
    from pam_jax.serve.app import Server
    from pam_jax.serve.engine import Engine
    from pam_jax.serve.media import Limits
    from pam_jax.serve.worker import Worker

    kind = read_model_config(args.model).get("kind")
    if kind != "pam":
        raise CLIError(f"{args.model} holds a {kind!r} model; serve takes a PAM model directory")
    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be in 1..65535, got {args.port}")
    limits = Limits(int(args.max_upload_mb * (1 << 20)), args.max_pixels, args.max_frames)
    status(f"loading {args.model}")
    model, _, tok = load_pam(
        args.model, dtype=resolve_dtype(args.dtype), llm_dtype=resolve_dtype(args.llm_dtype)
    )
    if tok is None:
        raise CLIError(f"{args.model} has no tokenizer (llm/tokenizer.json)")
    engine = Engine(model, tok, max_new_tokens=args.max_new_tokens, chunk=args.chunk)
    if not args.no_warmup:
        status("compiling (one mask and one description of a sample image)")
        warmup(engine)
    worker = Worker(engine, queue_size=args.queue_size, max_batch=args.max_batch,
                    wait_s=args.batch_wait_ms / 1000).start()  # fmt: skip
    return Server(engine, worker, limits)


def warmup(engine) -> None:
    """One segment and one description, so that the first user waits for neither compile."""
    from pam_jax.demo import sample_image
    from pam_jax.serve.engine import DescribeJob

    entry = engine.add_image(sample_image(360, 480)[0])
    region = {"points": [[240.0, 180.0]], "labels": [1]}
    engine.segment(entry, region)

    def fail(e):
        raise e

    engine.describe([DescribeJob(entry, region, "recognize", "en", lambda *a: None, fail)])


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from pam_jax.serve.app import create_app

    server = build_server(args)
    if args.host not in LOCAL:
        print(f"warning: listening on {args.host}: anyone who reaches it can use the model",
              file=sys.stderr)  # fmt: skip
    status(f"serving on http://{args.host}:{args.port}/")
    try:
        uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")
    finally:
        server.worker.stop()
    return 0
