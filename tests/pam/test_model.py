"""The whole PAM image path: SAM 2 taps -> perceiver -> projectors -> ChatML splice -> LLM.

Tiny random model (SAM 2.1 tiny at 512^2, so 32x32 features -> 256 dense tokens; a 2-layer
Qwen2 over a byte-level ChatML tokenizer). Checks: batching regions (different prompt sizes)
equals running them one by one; the sampler's greedy tokens equal a cache-free greedy loop on
the assembled embeddings; save_pam / load_pam round trip; prompt validation.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pam_jax.checkpoint import random_normal_params
from pam_jax.llm.config import tiny
from pam_jax.llm.sampler import SamplingParams
from pam_jax.llm.tokenizer import Tokenizer
from pam_jax.pam import assembly, prompts
from pam_jax.pam.config import PAMConfig
from pam_jax.pam.model import PAM, load_pam, save_pam
from pam_jax.pam.predictor import PAMPredictor
from pam_jax.sam2.config import sam2_config
from pam_jax.sam2.model import SAM2Base
from pam_jax.sam2.prompts import pad_regions
from pam_jax.sam2.video_io import normalize, preprocess_frame
from tests.pam.test_prompts import byte_tokenizer

MAX_NEW = 6


def fast_random(make, seed: int = 0):
    """Norm scales near 1, everything else N(0, 0.05^2): enough structure for the consistency
    checks below (numpy fills: eager flax init of SAM 2 costs a minute on a 2-core CI box)."""
    return random_normal_params(make, seed=seed, std=0.05)


@pytest.fixture(scope="module")
def setup():
    tok = Tokenizer(byte_tokenizer(), {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    cfg = PAMConfig(
        sam2=sam2_config("t", "2.1", image_size=512),
        llm=tiny(vocab_size=272, hidden_size=64, intermediate_size=128),
    )
    model = PAM(cfg, sam2=fast_random(lambda: SAM2Base(cfg.sam2, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (300, 420, 3), dtype=np.uint8)
    return cfg, model, tok, image


REGIONS = [
    {"box": [40, 30, 200, 250]},
    {"points": [[100, 120], [300, 200], [50, 60]], "labels": [1, 1, 0]},
    {"box": [10, 10, 400, 290], "points": [[200, 150]], "labels": [1]},
]


def test_regions_batched_equal_single(setup):
    cfg, model, tok, image = setup
    pred = PAMPredictor(model, tok, max_new_tokens=MAX_NEW)
    together = pred.describe_image(image, REGIONS, "recognize")
    assert len(together) == 3
    for i, r in enumerate(REGIONS):
        alone = pred.describe_image(image, [r], "recognize")[0]
        assert alone.token_ids == together[i].token_ids
        np.testing.assert_array_equal(alone.mask, together[i].mask)
        assert abs(alone.score - together[i].score) < 1e-4
        assert together[i].mask.shape == (300, 420)
        assert isinstance(together[i].text, str)


def test_images_one_generation(setup):
    """describe_images: regions of several images, one batched generation == per image."""
    cfg, model, tok, image = setup
    pred = PAMPredictor(model, tok, max_new_tokens=MAX_NEW)
    image2 = np.ascontiguousarray(image[::-1])
    items = [(image, REGIONS[:2]), (image2, REGIONS[2:]), (image, [])]
    out = pred.describe_images(items, "recognize")
    assert [len(o) for o in out] == [2, 1, 0]
    for (img, regs), got in zip(items[:2], out):
        for a, b in zip(pred.describe_image(img, regs, "recognize"), got):
            assert a.token_ids == b.token_ids and a.text == b.text
            np.testing.assert_array_equal(a.mask, b.mask)


def test_greedy_tokens_match_cache_free_loop(setup):
    """Predictor tokens == argmax loop over full forwards of [text, 274 visual, text] embeds."""
    cfg, model, tok, image = setup
    pred = PAMPredictor(model, tok, max_new_tokens=MAX_NEW, sampling=SamplingParams())
    res = pred.describe_image(image, REGIONS[:1], "detailed_caption", "zh")[0]
    resized, h, w = preprocess_frame(image, 512)
    p = pad_regions(REGIONS[:1], (h, w), 512)
    coords, labels, valid = p.coords, p.labels, p.valid
    regions_fn = nnx.jit(lambda m, *a: m.image_regions(*a))
    visual, _, _ = regions_fn(model, jnp.asarray(normalize(resized))[None], coords, labels, valid)
    assert visual.shape == (1, 256 + 18, 64)  # 32x32 map -> 256 dense tokens + 2 nl + 16 sem
    before, after = prompts.prompt_ids(tok, "detailed_caption", "zh")
    emb = model.llm.embed(jnp.asarray([before + after]))[0]
    seq = jnp.concatenate([emb[: len(before)], visual[0], emb[len(before) :]])[None]
    forward = nnx.jit(lambda llm, x: llm(inputs_embeds=x)[0, -1])
    out = []
    for _ in range(MAX_NEW):
        nxt = int(jnp.argmax(forward(model.llm, seq)))
        out.append(nxt)
        if nxt in tok.stop_ids:
            break
        seq = jnp.concatenate([seq, model.llm.embed(jnp.asarray([[nxt]]))], axis=1)
    assert res.token_ids == out


def test_save_load_roundtrip(setup, tmp_path):
    cfg, model, tok, image = setup
    save_pam(model, tmp_path / "m")
    loaded, cfg2, _ = load_pam(tmp_path / "m", llm_dtype=jnp.float32)
    assert cfg2 == cfg
    a = PAMPredictor(model, tok, max_new_tokens=MAX_NEW).describe_image(image, REGIONS[:2])
    b = PAMPredictor(loaded, tok, max_new_tokens=MAX_NEW).describe_image(image, REGIONS[:2])
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.mask, y.mask)


def test_region_prompt_rules():
    p = pad_regions(REGIONS, (300, 420), 1024)
    coords, labels, valid = p.coords, p.labels, p.valid
    assert coords.shape == (3, 4, 2)  # 3 points max -> bucket 4
    np.testing.assert_array_equal(labels[0], [2, 3, -1, -1])  # box corners first
    np.testing.assert_array_equal(labels[2], [2, 3, 1, -1])
    np.testing.assert_allclose(coords[0, 0], [40 / 420 * 1024, 30 / 300 * 1024], rtol=1e-6)
    assert valid.sum(1).tolist() == [2, 3, 3]
    with pytest.raises(ValueError, match="empty"):
        pad_regions([{}], (10, 10), 1024)
    with pytest.raises(ValueError, match="labels"):
        pad_regions([{"points": [[1, 2]], "labels": [1, 0]}], (10, 10), 1024)
    with pytest.raises(ValueError, match="unknown keys"):
        pad_regions([{"polygon": 1}], (10, 10), 1024)


def test_video_task_rejected_for_images(setup):
    cfg, model, tok, image = setup
    with pytest.raises(ValueError, match="video task"):
        PAMPredictor(model, tok).describe_image(image, REGIONS[:1], "video_caption")


def test_assembly_positions_for_sampler():
    lay = assembly.layout([[1, 2]], [[3]], 5, pad_side="right")
    assert lay.lengths.tolist() == [8] and lay.mask.all()


@pytest.fixture(scope="module")
def model_dir(setup, tmp_path_factory):
    import json

    cfg, model, tok, image = setup
    d = tmp_path_factory.mktemp("pamdir")
    tok_dir = d / "tok"
    tok_dir.mkdir()
    tok.tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    )
    save_pam(model, d / "m", tokenizer_dir=tok_dir)
    return d / "m"


def _frames(n, seed=1):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (300, 420, 3), dtype=np.uint8)
    return [np.roll(base, 7 * i, axis=1) for i in range(n)]  # a panning "video"


def test_video_caption(setup):
    cfg, model, tok, image = setup
    pred = PAMPredictor(model, tok, max_new_tokens=MAX_NEW)
    frames = _frames(5)
    res = pred.describe_video(frames, REGIONS[0], "video_caption", "en")
    assert res.masks.shape == (5, 300, 420) and res.scores.shape == (5,)
    np.testing.assert_array_equal(res.frames, assembly.select_frames(5))
    # frame 0 is the prompted conditioning frame: the same SAM 2 path as an image
    img_res = pred.describe_image(frames[0], [REGIONS[0]], "recognize")[0]
    np.testing.assert_array_equal(res.masks[0], img_res.mask)
    assert abs(res.scores[0] - img_res.score) < 1e-4
    assert isinstance(res.text, str) and len(res.token_ids) <= MAX_NEW


def test_video_visual_length(setup):
    """512^2 model: dense 16x16=256 -> (256+19) + 15 * ((32/4)^2 + 19) embeddings."""
    cfg, model, tok, image = setup
    emb = jnp.zeros((16, 32, 32, 256))
    tokens = jnp.zeros((16, 2, 256))
    out = model.parts.video_visual_embeds(emb, tokens)
    assert out.shape == (256 + 19 + 15 * (64 + 19), 64)


def test_streaming(setup, monkeypatch):
    cfg, model, tok, image = setup
    pred = PAMPredictor(model, tok, max_new_tokens=MAX_NEW)
    seen = []
    real = prompts.prompt_ids

    def spy(tokenizer, task, lang="en", history=None, **kw):
        seen.append((task, history))
        return real(tokenizer, task, lang, history, **kw)

    monkeypatch.setattr(prompts, "prompt_ids", spy)
    out = pred.describe_stream(_frames(6), REGIONS[0], [3, 6])
    assert len(out) == 2 and out[1].masks.shape == (3, 300, 420)
    assert seen == [("streaming_caption", None), ("streaming_caption", out[0].text)]
    with pytest.raises(ValueError, match="clip_ends"):
        pred.describe_stream(_frames(2), REGIONS[0], [3])


def test_mask_box():
    from pam_jax.pam.video import mask_box

    m = np.zeros((10, 12), bool)
    assert mask_box(m) is None
    m[2:5, 3:9] = True
    assert mask_box(m) == [3.0, 2.0, 9.0, 5.0]


def test_resize_vocab(setup):
    """load_pam cuts the vocabulary to the tokenizer (the release's resize_token_embeddings)."""
    from pam_jax.pam.model import resize_vocab

    cfg, model, tok, image = setup
    gd, st = nnx.split(model.llm)
    llm = nnx.merge(gd, st)  # a second module over the same arrays; resize replaces values
    ids = jnp.asarray([[1, 2, 3, 200]])
    full = np.asarray(model.llm(ids))
    new = resize_vocab(llm, tok.vocab_size)
    assert new.vocab_size == tok.vocab_size == 259 and llm.cfg.vocab_size == 259
    out = np.asarray(llm(ids))
    assert out.shape == (1, 4, 259)
    np.testing.assert_allclose(out, full[..., :259], atol=1e-5, rtol=0)
    assert model.llm.cfg.vocab_size == 272  # the original is untouched


def test_parts_params_annotated(setup):
    from pam_jax.sharding import unannotated_params

    assert unannotated_params(setup[1].parts) == []
