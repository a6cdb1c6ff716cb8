"""The one thread that runs the model, fed by a bounded queue.

Requests never wait for room: `submit` raises `Busy` at once when the queue is full (the server
answers 503). The worker takes a job; if it is a description it gathers further description
jobs for up to `wait_s` (up to `max_batch`), so regions of concurrent requests share one
generation (`Engine.describe`). Other jobs (encode, segment, perceive, track) run one by one.
An exception in a job goes to that job's caller; the worker keeps running.
"""

from __future__ import annotations

import dataclasses
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from pam_jax.serve.engine import DescribeJob, Engine


class Busy(Exception):
    """The queue is full."""


@dataclasses.dataclass
class Task:
    """A non-batched job: `run()` on the worker, then `done(result, error)`."""

    run: Callable[[], Any]
    done: Callable[[Any, BaseException | None], None]


class Worker:
    def __init__(self, engine: Engine, *, queue_size: int = 32, max_batch: int = 16,
                 wait_s: float = 0.01):  # fmt: skip
        if queue_size < 1 or max_batch < 1:
            raise ValueError("queue_size and max_batch must be >= 1")
        self.engine = engine
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        # held while the model runs (tests hold it to pause the worker)
        self.lock = threading.Lock()
        self.batches: list[int] = []  # sizes of the generations run (observability, tests)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pam-serve-worker", daemon=True)

    def start(self) -> Worker:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def submit(self, job: Task | DescribeJob) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise Busy from None

    def _next(self, timeout: float | None) -> Task | DescribeJob | None:
        try:
            return self.queue.get(timeout=timeout) if timeout else self.queue.get_nowait()
        except queue.Empty:
            return None

    def _loop(self) -> None:
        later: list[Task] = []
        while not self._stop.is_set():
            job = later.pop(0) if later else self._next(0.2)
            if job is None:
                continue
            if isinstance(job, Task):
                self._run_task(job)
                continue
            jobs = [job]
            deadline = time.monotonic() + self.wait_s
            while len(jobs) < self.max_batch:
                left = deadline - time.monotonic()
                nxt = self._next(left) if left > 0 else self._next(None)
                if nxt is None:
                    break
                (jobs if isinstance(nxt, DescribeJob) else later).append(nxt)
            self._run_describe(jobs)

    def _run_task(self, task: Task) -> None:
        try:
            with self.lock:
                result = task.run()
        except Exception as e:  # the caller answers it; the worker lives on
            _quietly(task.done, None, e)
            return
        _quietly(task.done, result, None)

    def _run_describe(self, jobs: list[DescribeJob]) -> None:
        try:
            with self.lock:
                self.batches.append(len(jobs))
                self.engine.describe(jobs)
        except Exception as e:
            for job in jobs:
                _quietly(job.fail, e)


def _quietly(fn, *args) -> None:
    """A reply callback whose caller is gone (e.g. the event loop closed at shutdown) must not
    end the worker."""
    try:
        fn(*args)
    except Exception as e:
        print(f"pam-jax serve: a reply could not be delivered ({e})", file=sys.stderr)
