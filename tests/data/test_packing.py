"""Packing (`pack=True`): first-fit placement, the packed layout through the grain pipeline
(every record once, segments, restarted positions, per-sample visual blocks), exact resume, and
on the micro PAM: a packed batch's loss sums equal the unpacked batch's on the same examples,
and no token attends across segments."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from pam_jax.data.batch import collate, collate_packed, first_fit
from pam_jax.data.pipeline import make_dataset
from pam_jax.data.prepare import check_record, prepare
from pam_jax.data.preprocess import IGNORE, PreprocessConfig, make_example
from pam_jax.data.records import parse_record
from pam_jax.training.batch import step_arrays

from .conftest import conv, image_record, write_image, write_jsonl

N = 10
CFG = PreprocessConfig(image_size=16, num_visual=5, num_frames=4)
ROW = 256  # packed row length: 2-3 of these samples (~75-115 positions each) a row


def _answers(n):
    return ["A cat." + " and a dog" * (i % 4) for i in range(n)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("pack")
    root = d / "images"
    rows = []
    for i, a in enumerate(_answers(N)):
        write_image(root / f"img{i}.jpg", seed=i)
        rows.append(image_record(f"img{i}.jpg", id=f"r{i}", conversations=conv(a)))
    prepare([write_jsonl(d / "a.jsonl", rows)], root, d / "ds")
    return d / "ds"


def _ds(spec, tokenizer, **kw):
    kw = {"cfg": CFG, "batch_size": 2, "seed": 3, "num_threads": 2, "seq_bucket": [ROW], **kw}
    return make_dataset(spec, tokenizer=tokenizer, **kw)


def test_first_fit_places_a_prefix():
    # capacity 8, 2 rows, 2 a row: [5, 3] [4, 2], then 6 fits nowhere
    assert first_fit([5, 3, 4, 2, 6], rows=2, capacity=8, pack_max=2) == ([[0, 1], [2, 3]], 4)
    assert first_fit([5, 5, 3], rows=2, capacity=8, pack_max=3) == ([[0, 2], [1]], 3)
    with pytest.raises(ValueError, match="exceeds the packed row"):
        first_fit([9], rows=1, capacity=8, pack_max=1)


def test_packed_epoch_holds_every_record_once_as_its_own_segment(dataset, tokenizer):
    kw = dict(shuffle=False, augment=False, num_epochs=1)
    ref = {}  # record -> (tokens, labels) of its unpacked row
    for b in _ds(dataset, tokenizer, batch_size=1, seq_bucket=[ROW], **kw):
        n = int(b.lengths[0])
        ref[int(b.record_index[0])] = (b.text_ids[0, :n], b.labels[0, :n], b.visual_index[0, :n])
    packed = list(_ds(dataset, tokenizer, pack=True, pack_max=3, **kw))
    seen = []
    for b in packed:
        assert b.packed and b.text_ids.shape == (2, ROW) and b.pixels.shape[:2] == (2, 3)
        v = b.num_visual.max()
        for r in range(2):
            o = 0
            for j in range(3):
                rec = int(b.record_index[r, j])
                if rec < 0:
                    assert b.num_visual[r, j] == 0 and not b.prompt_valid[r, j].any()
                    continue
                seen.append(rec)
                tok, lab, vidx = ref[rec]
                n = len(tok)
                sl = slice(o, o + n)
                assert (b.segment_ids[r, sl] == j + 1).all()
                np.testing.assert_array_equal(b.positions[r, sl], np.arange(n))  # restart
                np.testing.assert_array_equal(b.text_ids[r, sl], tok)
                vis = b.is_visual[r, sl]
                np.testing.assert_array_equal(b.visual_index[r, sl][vis], vidx[vis] + j * v)
                # the previous sample's last token never predicts this sample's first one
                want = lab.copy()
                want[0] = IGNORE if j else want[0]
                np.testing.assert_array_equal(b.labels[r, sl], want)
                o += n
            assert (b.segment_ids[r, o:] == 0).all() and int(b.lengths[r]) == o
    assert sorted(seen) == list(range(N))
    assert len(packed) < N / 2  # rows really hold several samples (the unpacked epoch: 5 x 2)


def test_packed_resume_continues_with_the_next_batch(dataset, tokenizer):
    kw = dict(shuffle=True, augment=True, pack=True, pack_max=3)
    it = iter(_ds(dataset, tokenizer, **kw))
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    want = [next(it) for _ in range(3)]
    it2 = iter(_ds(dataset, tokenizer, **kw))  # a fresh pipeline, as after a restart
    it2.set_state(state)
    for w in want:
        g = next(it2)
        for f in ("text_ids", "labels", "segment_ids", "pixels", "prompt_coords", "record_index"):
            np.testing.assert_array_equal(getattr(g, f), getattr(w, f), err_msg=f)


def test_pack_needs_row_lengths(dataset, tokenizer):
    with pytest.raises(ValueError, match="list of row lengths"):
        _ds(dataset, tokenizer, pack=True, seq_bucket=64)
    with pytest.raises(ValueError, match="endless stream"):
        _ds(dataset, tokenizer, pack=True, num_epochs=1, process_count=2)


# ---- the micro PAM: loss sums and segment isolation ------------------------------------------


@pytest.fixture(scope="module")
def micro(tmp_path_factory, tokenizer):
    from pam_jax.checkpoint import random_normal_params
    from pam_jax.pam.model import PAM
    from pam_jax.training.config import TrainConfig
    from pam_jax.training.model import pam_config_for

    pc = pam_config_for(TrainConfig(model="models/micro-pam.json"))
    model = random_normal_params(lambda: PAM(pc, rngs=nnx.Rngs(0)), seed=1, std=0.05)
    d = tmp_path_factory.mktemp("micro")
    cfg = PreprocessConfig(image_size=pc.sam2.image_size, num_visual=pc.image_embeds_len)
    examples = []
    for i, a in enumerate(["A cat.", "A small brown dog on a mat.", "A red car."]):
        write_image(d / f"m{i}.jpg", hw=(40, 56), seed=20 + i)
        rec = image_record(f"m{i}.jpg", conversations=conv(a))
        r = check_record(parse_record(rec, source="m.jsonl", line=i + 1), d).record
        imgs = [np.asarray(Image.open(d / f).convert("RGB")) for f in r.frames]
        examples.append(make_example(r, imgs, tokenizer, cfg, None))
    return model, examples


@pytest.fixture(scope="module")
def forward(micro):
    """One jitted program: (loss sums, logits [B, L, V]) of a step batch."""
    from pam_jax.training.loss import LossOptions, forward_hidden, micro_batch_sums

    model, ex = micro
    graphdef, state = nnx.split(model)
    opts = LossOptions(num_sources=2, attention="chunked")

    @jax.jit
    def fn(st, mb):
        m = nnx.merge(graphdef, st)
        return micro_batch_sums(m, mb, opts), m.llm.logits(forward_hidden(m, mb, opts)[0])

    return lambda batch: jax.device_get(fn(state, step_arrays(batch)))


def _packed(ex, L):
    return collate_packed(ex, [[0, 1], [2]], pack_max=2, seq_bucket=[L], num_points=4,
                          source_index=[0, 1, 1], record_index=[0, 1, 2])  # fmt: skip


def _row_len(ex):
    return max(e.length for e in ex) * 2 + 8


def test_packed_loss_sums_equal_unpacked(micro, forward):
    """float32 on CPU; rtol 1e-5: the same per-token values, summed over other row layouts and
    attention blocks (float32 reassociation)."""
    _, ex = micro
    L = _row_len(ex)
    flat = collate(ex, seq_bucket=[L], num_points=4, source_index=[0, 1, 1], record_index=[0, 1, 2])
    a, _ = forward(flat)
    b, _ = forward(_packed(ex, L))
    assert int(a["n"]) == int(b["n"]) > 0
    np.testing.assert_allclose(b["nll"], a["nll"], rtol=1e-5)
    np.testing.assert_array_equal(b["src_n"], a["src_n"])  # per-source counts, per token
    np.testing.assert_allclose(b["src_nll"], a["src_nll"], rtol=1e-5)
    assert b["src_n"][1] > 0 and b["src_n"][0] > 0


def test_no_attention_across_segments(micro, forward):
    """Changing sample 2 (its pixels and its supervised text) of a packed row leaves sample 1's
    logits unchanged (atol / rtol 1e-6: float32, the same program; only segment 2's inputs
    differ) and does move sample 2's (so the perturbation is real)."""
    import dataclasses

    _, ex = micro
    L = _row_len(ex)
    e = ex[1]
    other = dataclasses.replace(
        e,
        pixels=255 - e.pixels,
        ids_after=np.where(e.labels_after >= 0, (e.ids_after + 7) % 250, e.ids_after),
    )
    b = _packed(ex, L)
    _, x = forward(b)
    _, y = forward(_packed([ex[0], other, ex[2]], L))
    s1, s2 = b.segment_ids[0] == 1, b.segment_ids[0] == 2
    np.testing.assert_allclose(y[0, s1], x[0, s1], rtol=1e-6, atol=1e-6)
    assert np.abs(y[0, s2] - x[0, s2]).max() > 1e-3
    np.testing.assert_allclose(y[1], x[1], rtol=1e-6, atol=1e-6)  # the other row too


@pytest.mark.heavy
def test_train_step_on_a_packed_batch(micro):
    """The real train step (grad_accum=2 splits the rows and their slots) on a packed batch of
    the micro PAM: loss and gradient norm equal the unpacked batch's (rtol 1e-5 / 1e-4:
    float32, other summation orders over rows, micro-batches and attention blocks)."""
    from pam_jax.checkpoint import flat_params
    from pam_jax.training import batch as B
    from pam_jax.training.config import TrainConfig
    from pam_jax.training.model import spec_for
    from pam_jax.training.optim import make_optimizer
    from pam_jax.training.step import Trainer, make_run_mesh

    model, ex = micro
    ex = [*ex, ex[0]]
    cfg = TrainConfig(model="models/micro-pam.json", batch_size=4, grad_accum=2, dtype="float32",
                      train_parts="perceiver,projectors,newlines,llm")  # fmt: skip
    spec = spec_for(model, cfg.parts)
    tr, fr = spec.split({k: np.asarray(v) for k, v in flat_params(model).items()})
    L = _row_len(ex)
    flat = collate(ex, seq_bucket=[L], num_points=4)
    packed = collate_packed(ex, [[0, 1], [2, 3]], pack_max=2, seq_bucket=[L], num_points=4)
    out = []
    for b in (flat, packed):
        mesh = make_run_mesh("1,-1,1", jax.devices()[:1])
        t = Trainer.build(cfg.replace(batch_size=b.batch_size), spec, make_optimizer(cfg, spec),
                          mesh)  # fmt: skip
        _, m = t.step(t.init_state(tr), t.place_frozen(fr), B.global_batch(mesh, step_arrays(b)))
        out.append(jax.device_get(m))
    assert int(out[0]["tokens"]) == int(out[1]["tokens"]) > 0
    np.testing.assert_allclose(out[1]["loss"], out[0]["loss"], rtol=1e-5)
    np.testing.assert_allclose(out[1]["grad_norm"], out[0]["grad_norm"], rtol=1e-4)


def test_packed_videos_and_images_take_the_video_block(tmp_path, tokenizer):
    """With videos in the data (F > 1) every slot's visual block is the video length (the
    training forward pads image visuals to it), also in a row of images."""
    from .conftest import video_record

    root = tmp_path / "images"
    for i in range(6):
        write_image(root / "vid" / f"{i:05d}.jpg", seed=i)
    for i in range(3):
        write_image(root / f"img{i}.jpg", seed=i)
    rows = [image_record("img0.jpg"), image_record("img1.jpg"), video_record()]
    rows.append(image_record("img2.jpg"))
    jsonl = write_jsonl(tmp_path / "v.jsonl", rows)
    cfg = PreprocessConfig(image_size=16, num_visual=5, num_visual_video=9, num_frames=4)
    ds = _ds((str(jsonl), str(root)), tokenizer, cfg=cfg, num_epochs=1, shuffle=False,
             augment=False, pack=True, pack_max=2, batch_size=1, seq_bucket=[250])  # fmt: skip
    batches = list(ds)
    assert [b.record_index[0].tolist() for b in batches] == [[0, 1], [2, 3]]
    for b in batches:
        assert b.pixels.shape == (1, 2, 4, 16, 16, 3)
        second = b.is_visual[0] & (b.segment_ids[0] == 2)
        assert b.visual_index[0][second].min() == 9  # slot 1 starts at the video block
    assert batches[1].is_video.tolist() == [[True, False]]
    assert batches[1].num_visual.tolist() == [[9, 5]]


def test_train_config_pack_keys():
    from pam_jax.training.config import ConfigError, TrainConfig, apply_overrides

    base = TrainConfig(model="models/micro-pam.json", data="data/ds")
    cfg = apply_overrides(base, ["pack=true", "pack_max=3", "seq_len=1024"]).validate()
    assert cfg.pack and cfg.pack_max == 3
    with pytest.raises(ConfigError, match="pack=true needs seq_len"):
        base.replace(pack=True).validate()
    with pytest.raises(ConfigError, match="pack=true needs seq_len"):
        base.replace(pack=True, seq_len=1024, data="synthetic").validate()
    with pytest.raises(ConfigError, match="pack_max must be >= 1"):
        base.replace(pack_max=0).validate()
