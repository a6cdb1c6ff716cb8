"""`pam-jax train` on real records (the micro PAM with the test tokenizer, CPU, one device):
a mixture YAML of two JSONL sources, one of whose records all exceed `model_max_length`.

- per-source losses: every metrics line carries `loss/<source>` and `tokens/<source>` for
  both sources, the token-weighted mean of the sources' losses equals `loss` (rtol 1e-5: the
  per-source sums are separate float32 chunked passes over the same logits, summed in another
  order) and the sources' tokens add up to `tokens` exactly;
- the cut: `truncated` per step equals the long records in that step's batch (known from the
  unshuffled order), `truncated_total` their running count, and `--resume` from an earlier
  checkpoint gives the same counts (the running count is in the checkpoint);
- (heavy) `eval_bench`: the evaluator scores the live model during training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.data.conftest import write_image, write_jsonl

MAX_LEN = 192  # model_max_length = seq_len: a cut record fills its row exactly
SHORT = [{"from": "human", "value": "<image>\nName it."}, {"from": "gpt", "value": "A cat."}]
LONG = [
    {"from": "human", "value": "<image>\nDescribe it."},
    {"from": "gpt", "value": "A small grey cat sits on a red mat by the door. " * 4},
]


def _record(i: int, conv) -> dict:
    return {"type": "image", "image": f"i{i}.png", "bbox": [4, 5, 20, 10],
            "conversations": conv}  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory, micro_pam):
    d = tmp_path_factory.mktemp("mix")
    model_dir = micro_pam[0]
    for i in range(6):
        write_image(d / "img" / f"i{i}.png", seed=i)
    write_jsonl(d / "short.jsonl", [_record(i, SHORT) for i in range(3)])
    write_jsonl(d / "long.jsonl", [_record(3 + i, LONG) for i in range(3)])
    (d / "mix.yaml").write_text(
        "datasets:\n  - json_path: short.jsonl\n  - json_path: long.jsonl\n"
    )
    return d, model_dir


def _train(d: Path, model_dir: Path, steps: int, *extra: str) -> list[dict]:
    from pam_jax.cli import main

    argv = [
        "train", "--config", "micro", f"model={model_dir}", f"data={d / 'mix.yaml'}",
        f"image_root={d / 'img'}", f"workdir={d / 'run'}", f"steps={steps}", "batch_size=4",
        f"seq_len={MAX_LEN}", f"model_max_length={MAX_LEN}", "save_every=0", "export=false",
        *extra,
    ]  # fmt: skip
    assert main(argv) == 0
    lines = (d / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x]


def test_mixture_losses_and_cut_count(setup, monkeypatch):
    from pam_jax.data.preprocess import PreprocessConfig, make_example
    from pam_jax.data.records import parse_record
    from tests.data.conftest import make_tokenizer

    d, model_dir = setup
    monkeypatch.setenv("PAM_JAX_COMPILATION_CACHE", str(d / "xla"))
    # the long records really exceed model_max_length (and only they): 34 visual tokens
    pre = PreprocessConfig(image_size=128, num_visual=34, model_max_length=MAX_LEN)
    blank = [np.zeros((48, 64, 3), np.uint8)]
    for conv, cut in ((SHORT, False), (LONG, True)):
        r = parse_record(_record(0, conv), source="x.jsonl")
        assert (make_example(r, blank, make_tokenizer(), pre).truncated > 0) == cut

    # unshuffled, unweighted: short 0-2 then long 0-2, repeated; 4 a batch
    # step 0: s s s L (1 cut), step 1: L L s s (2), step 2: s L L L (3)
    recs = _train(d, model_dir, 3, "save_every=2")
    assert [r["step"] for r in recs] == [0, 1, 2]
    for r in recs:
        n = {s: r[f"tokens/{s}"] for s in ("short", "long")}
        assert n["short"] > 0 and n["long"] > 0 and n["short"] + n["long"] == r["tokens"]
        mean = sum(r[f"loss/{s}"] * n[s] for s in n) / r["tokens"]
        np.testing.assert_allclose(mean, r["loss"], rtol=1e-5)
        assert r["loss/short"] != r["loss/long"]  # two real sources, not one number twice
    want = [(1, 1), (2, 3), (3, 6)]
    assert [(r["truncated"], r["truncated_total"]) for r in recs] == want

    # as if killed after step 2's save: the final checkpoint gone, --resume (the same config,
    # so the same compiled step from the cache) redoes step 2 from the count saved at step 2
    shutil.rmtree(d / "run" / "checkpoints" / "3")
    recs = _train(d, model_dir, 3, "save_every=2", "--resume")
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert [(r["truncated"], r["truncated_total"]) for r in recs] == want


@pytest.mark.heavy  # the train step and the evaluator's generation compile: minutes on 2 cores
def test_eval_bench_runs_the_evaluator_during_training(setup, monkeypatch):
    """eval_bench=FILE with eval_every: pam_jax.evaluation's evaluator runs on the live model
    at those steps; its scores go to eval.jsonl with the step, its outputs to workdir/eval/."""
    d, model_dir = setup
    monkeypatch.setenv("PAM_JAX_COMPILATION_CACHE", str(d / "xla"))
    wd = d / "bench"
    from pam_jax.cli import main
    from tests.data.conftest import conv

    bench = write_jsonl(d / "bench.jsonl", [_record(i, conv()) for i in range(3)])  # a PAM task

    argv = [
        "train", "--config", "micro", f"model={model_dir}", f"data={d / 'short.jsonl'}",
        f"image_root={d / 'img'}", f"workdir={wd}", "steps=2", "batch_size=2",
        f"seq_len={MAX_LEN}", f"model_max_length={MAX_LEN}", "save_every=0", "export=false",
        f"eval_bench={bench}", "eval_every=2", "eval_limit=2",
    ]  # fmt: skip
    assert main(argv) == 0
    evals = [json.loads(x) for x in (wd / "eval.jsonl").read_text().splitlines() if x]
    assert [e["step"] for e in evals] == [2]
    e = evals[0]
    assert (e["n_items"], e["n_skipped"]) == (2, 0), e  # eval_limit items, all run
    scores = {k: v for k, v in e.items() if not k.startswith("n_") and k != "step"}
    assert scores and all(isinstance(v, float) for v in scores.values()), e
    step_dir = wd / "eval" / "step_2"
    assert step_dir.is_dir() and any(step_dir.iterdir())
