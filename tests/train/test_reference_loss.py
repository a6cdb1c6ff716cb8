"""The trainer's step-0 loss (augment=false shuffle=false dtype=float32) equals a reference
written here from the release's training rules (pam.md §8.1, `LlavaQwenForCausalLM.forward(
labels=...)` in eval mode) on the same record, for an image and a video sample.

The reference re-derives, independently of pam_jax.data and pam_jax.training: the picture
(PIL resize to S x S, official normalisation), the box prompt (xywh -> [int(x), int(y),
int(x + w), int(y + h)], / (W, H) x S, labels 2 / 3), the ChatML text around `<image>`, the
labels (system and user turns ignored, the assistant turn supervised, then every `<|im_start|>`,
`<|im_end|>` and standalone newline un-masked, visual positions ignored), the dense causal LLM
forward over the spliced embeddings, and torch's CrossEntropyLoss on the shifted labels over
the model's full padded vocabulary (512 rows for a 260-token tokenizer). SAM 2 and the
perceiver are the model's own functions (their parity with the official code is tested in
tests/sam2 and tests/pam). Tolerance rtol 2e-5: float32, the trainer's chunked loss and
segment attention sum in another order than the dense reference.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from pam_jax.pam.assembly import select_frames
from pam_jax.pam.model import image_regions, video_regions
from pam_jax.sam2.video_io import normalize
from pam_jax.training.config import TrainConfig
from pam_jax.training.trainer import train

SYSTEM = "You are a helpful assistant."
HW = (48, 64)
BBOX = [4.6, 5.2, 20.7, 10.9]  # xywh with fractions: the release truncates x, y, x + w, y + h


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, micro_pam):
    d = tmp_path_factory.mktemp("ref")
    pam_dir, model, tok = micro_pam
    (d / "pam").symlink_to(pam_dir)
    rs = np.random.RandomState(0)
    for i in range(16):
        Image.fromarray(rs.randint(0, 255, (*HW, 3), np.uint8)).save(d / f"f{i:02d}.png")
    return d, model, tok


def _ref_text(tok, user: str, answer: str):
    """ids and labels of [before <image>] and [after], by the release's rules."""
    system = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
    user_a, user_b = "<|im_start|>user\n", f"\n{user}<|im_end|>\n"
    asst = f"<|im_start|>assistant\n{answer}<|im_end|>\n"
    before = tok.encode(system) + tok.encode(user_a)
    after_user, after_asst = tok.encode(user_b), tok.encode(asst)
    after = after_user + after_asst
    lab_b = [-100] * len(before)
    lab_a = [-100] * len(after_user) + list(after_asst)
    keep = {tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>"), *tok.encode("\n")}
    lab_b = [i if i in keep else x for i, x in zip(before, lab_b)]
    lab_a = [i if i in keep else x for i, x in zip(after, lab_a)]
    return before, after, lab_b, lab_a


def _ref_loss(model, tok, visual, user, answer) -> float:
    before, after, lab_b, lab_a = _ref_text(tok, user, answer)
    llm = model.llm
    emb_b = llm.embed(jnp.asarray([before]))[0]
    emb_a = llm.embed(jnp.asarray([after]))[0]
    x = jnp.concatenate([emb_b, visual, emb_a])[None]
    logits = np.asarray(llm(inputs_embeds=x))[0]  # dense causal, full (padded) vocabulary
    assert logits.shape[-1] == 512 > tok.vocab_size
    labels = lab_b + [-100] * visual.shape[0] + lab_a
    lt, yt = torch.tensor(logits[:-1]), torch.tensor(labels[1:])
    return float(torch.nn.CrossEntropyLoss()(lt, yt))


def _box_prompt(s: int):
    x, y, w, h = BBOX
    box = np.array([int(x), int(y), int(x + w), int(y + h)], np.float32)
    pts = box.reshape(2, 2) / np.array([HW[1], HW[0]], np.float32) * s
    return jnp.asarray(pts[None]), jnp.asarray([[2, 3]]), jnp.asarray([[True, True]])


def _pixels(d, names, s: int) -> np.ndarray:
    return np.stack([np.asarray(Image.open(d / n).convert("RGB").resize((s, s))) for n in names])


def _train_step0(d, record: dict, tmp_path) -> float:
    (tmp_path / "data.jsonl").write_text(json.dumps(record) + "\n")
    cfg = TrainConfig(
        model=str(d / "pam"), data=str(tmp_path / "data.jsonl"), image_root=str(d),
        workdir=str(tmp_path / "run"), steps=1, batch_size=1, augment=False, shuffle=False,
        dtype="float32", train_parts="perceiver,projectors,newlines,llm", export=False,
        log_every=1, save_every=0,
    )  # fmt: skip
    train(cfg, log=True)
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["step"] == 0
    return rec["loss"]


def test_image_step0_loss_equals_release_rules(model_dir, tmp_path):
    d, model, tok = model_dir
    user, answer = "Classify this subject and provide its label.", "A cat.\n"
    record = {
        "type": "image", "image": "f00.png", "bbox": BBOX, "points": None, "labels": None,
        "conversations": [{"from": "human", "value": f"<image>\n{user}"},
                          {"from": "gpt", "value": answer}],
    }  # fmt: skip
    s = model.config.sam2.image_size
    px = normalize(_pixels(d, ["f00.png"], s))
    visual, _, _ = image_regions(model.sam2, model.parts, jnp.asarray(px), *_box_prompt(s))
    ref = _ref_loss(model, tok, visual[0], user, answer)
    got = _train_step0(d, record, tmp_path)
    np.testing.assert_allclose(got, ref, rtol=2e-5)


@pytest.mark.heavy
def test_video_step0_loss_equals_release_rules(model_dir, tmp_path):
    d, model, tok = model_dir
    user = "Provide a caption for this subject in this video.\nPrevious caption: None"
    answer = "It moves to the left。\n"
    frames = [f"f{i:02d}.png" for i in range(16)]
    record = {
        "type": "video", "frames": frames, "masked_frames": [frames[0]],
        "bbox": [BBOX], "points": None, "labels": None, "obj_id": "1",
        "conversations": [{"from": "human", "value": f"<image>\n{user}"},
                          {"from": "gpt", "value": answer}],
    }  # fmt: skip
    s = model.config.sam2.image_size
    assert list(select_frames(16)) == list(range(16))
    px = normalize(_pixels(d, frames, s))[None]
    out = video_regions(model.sam2, model.parts, jnp.asarray(px), *_box_prompt(s))
    ref = _ref_loss(model, tok, out.visual[0], user, answer)
    got = _train_step0(d, record, tmp_path)
    np.testing.assert_allclose(got, ref, rtol=2e-5)
    assert jax.devices()[0].platform == "cpu"
