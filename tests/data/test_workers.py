"""grain worker processes (`worker_count=2`): the same batches as threads mode, exact resume in
worker mode, and a clean close, in a subprocess bounded by a timeout (a hang fails the test
instead of stalling the suite)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pam_jax.data.prepare import prepare

from .conftest import image_record, write_image, write_jsonl
from .test_pipeline import _ds, digest

SCRIPT = """
import json, sys, time
sys.path.insert(0, {tests!r})
from data.conftest import make_tokenizer
from data.test_pipeline import _ds, digest

def main():
    t0 = time.time()
    tok = make_tokenizer()
    it = iter(_ds({spec!r}, tok, shuffle=True, augment=True, worker_count=2))
    got = [digest(next(it)) for _ in range(2)]
    first = time.time() - t0
    state = it.get_state()
    got += [digest(next(it)) for _ in range(2)]
    it.close()
    it2 = iter(_ds({spec!r}, tok, shuffle=True, augment=True, worker_count=2))
    it2.set_state(json.loads(json.dumps(state)))
    resumed = digest(next(it2))
    it2.close()
    print("RESULT", json.dumps(dict(got=got, resumed=resumed, first_s=round(first, 1))), flush=True)

if __name__ == "__main__":  # grain spawns its workers: they re-import this file
    main()
"""


def test_two_workers_match_threads_and_resume(tmp_path, tokenizer):
    root = tmp_path / "images"
    for i in range(8):
        write_image(root / f"img{i}.jpg", seed=i)
    rows = [image_record(f"img{i}.jpg", id=f"r{i}") for i in range(8)]
    prepare([write_jsonl(tmp_path / "a.jsonl", rows)], root, tmp_path / "ds")
    spec = str(tmp_path / "ds")
    it = iter(_ds(spec, tokenizer, shuffle=True, augment=True))
    want = [digest(next(it)) for _ in range(4)]

    script = tmp_path / "workers.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parents[1]), spec=spec))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
    )  # bounded: on a loaded 2-core machine the 2 spawned workers need ~15 s to start
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    res = json.loads(line[len("RESULT ") :])
    assert res["got"] == want  # worker processes give the threads-mode stream, in order
    assert res["resumed"] == want[2]  # a restored worker-mode iterator: exactly the next batch
