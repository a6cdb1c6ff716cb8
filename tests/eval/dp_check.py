"""Data-parallel eval checks run in subprocesses (tests/eval/test_parallel.py):

python tests/eval/dp_check.py devices DATA_DIR OUT_DIR
    (XLA_FLAGS=--xla_force_host_platform_device_count=8) the runner with every batch's
    generation sharded over 8 devices == one device: prints "OK <n>"
python tests/eval/dp_check.py process DATA_DIR OUT_DIR COORDINATOR INDEX COUNT
    one of COUNT jax.distributed processes running `evaluate` (CPU collectives)
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo: `tests.eval.tiny`


def devices(data: Path, out: Path) -> None:
    import jax

    from pam_jax.evaluation import formats
    from pam_jax.evaluation.runner import Runner, local_mesh, read_predictions, run_predictions
    from pam_jax.pam.predictor import PAMPredictor
    from pam_jax.sharding import misplaced_params, place
    from tests.eval import tiny

    assert jax.local_device_count() == 8, jax.devices()
    items = formats.load(data / "data.jsonl", "pam").items
    model, tok = tiny.model(), tiny.tokenizer()
    got = {}
    for name, mesh in (("one", None), ("eight", local_mesh())):
        if mesh is not None:
            place(model, mesh)
            assert not misplaced_params(model, mesh)
        pred = PAMPredictor(model, tok, max_new_tokens=tiny.NEW)
        runner = Runner(pred, batch_size=3, mesh=mesh)  # 3 regions -> 8 generation rows
        assert runner.rows == (3 if mesh is None else 8)
        run_predictions(runner, items, out / name, progress=False)
        got[name] = read_predictions(out / name / "predictions.jsonl")
    assert len(got["one"]) == len(items), got["one"]
    assert got["one"] == got["eight"], (got["one"], got["eight"])
    print("OK", len(items))


def gather(_data: Path, _out: Path) -> None:
    import jax
    import numpy as np

    from pam_jax.evaluation.runner import Runner, _gather, local_mesh

    mesh = local_mesh()
    assert mesh is not None and mesh.shape["data"] == 8, mesh
    runner = Runner(None, batch_size=3, mesh=mesh)
    assert runner.rows == 8 and Runner(None, batch_size=9, mesh=mesh).rows == 16
    flat = np.arange(4 * 5 * 2, dtype=np.float32).reshape(4, 5, 2)
    index = np.asarray([2, 0, 3] + [2] * 5, np.int32)  # 3 rows, padded with the first
    rows = runner._gather(flat, index)
    assert runner._gather is _gather(mesh)  # one jitted gather per mesh
    np.testing.assert_array_equal(np.asarray(rows), flat[index])
    assert rows.sharding.spec[0] in ("data", ("data", "fsdp")), rows.sharding
    assert len({s.device for s in rows.addressable_shards}) == 8
    assert all(s.data.shape == (1, 5, 2) for s in rows.addressable_shards)
    assert jax.local_device_count() == 8
    print("OK gather")


def process(data: Path, out: Path, coordinator: str, index: int, count: int) -> None:
    from pam_jax.training.distributed import maybe_initialize

    assert maybe_initialize(coordinator, count, index)
    from pam_jax.evaluation.api import EvalConfig, evaluate
    from pam_jax.evaluation.runner import DecodeSettings
    from tests.eval import tiny

    cfg = EvalConfig(
        data=str(data / "data.jsonl"), format="pam", batch_size=2,
        decode=DecodeSettings(max_new_tokens=tiny.NEW),
    )  # fmt: skip
    flat = evaluate(cfg, out, model=tiny.model(), tokenizer=tiny.tokenizer(), progress=False)
    print("METRICS", json.dumps(flat, sort_keys=True))


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    mode, data, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if mode == "devices":
        devices(data, out)
    elif mode == "gather":
        gather(data, out)
    else:
        process(data, out, sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
