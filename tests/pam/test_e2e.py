"""End to end: a tiny random PAM release in the official layout -> `pam-jax convert pam` ->
`pam-jax predict` on an image with a box and on a 6-frame video, against the official code.

The release is test_convert_pam.py's builder (HF `Qwen2ForCausalLM.save_pretrained` shards +
the release-style perceiver / projectors / newlines, every parameter perturbed) plus a
byte-level ChatML tokenizer and a generation_config.json with the release's repetition penalty
1.05; SAM 2 is an official tiny SAM 2.1 `.pt` with perturbed weights. To keep CPU time low the
converted model runs at image size 512 (32x32 features: 256 + 18 visual embeddings per image,
(S / 32)^2 + 18 = 1042 at the release's 1024), patched into the converted config.

References:
- masks and perceiver taps: the OFFICIAL `SAM2VideoPredictor` (sam2 1.1.0) on a 1-frame "video"
  (image) and on the 6 frames (video), as the release runs it, configured like PAM's fork
  (`multimask_output_in_sam=False`, single-mask decoder output without the stability fallback,
  tracked frames' memories kept float32). The fork's two taps (decoder image embedding after the
  two-way transformer; cat(stability-selected, single-mask) mask token) are read with hooks.
- visual embeddings: the release-style torch perceiver + projectors + newlines on those taps,
  spliced between the HF embeddings of the ChatML text (llava `prepare_inputs_labels_...`).
- generation: `transformers.Qwen2ForCausalLM.generate(inputs_embeds=..., do_sample=False,
  repetition_penalty=1.05)` fed pam-jax's own embeddings (from the Python API), compared with
  the token ids `pam-jax predict --llm-dtype float32` prints.
"""

import inspect
import json
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from torch_ref import to_np

from pam_jax.cli import main
from pam_jax.llm.sampler import SamplingParams
from pam_jax.pam import assembly, prompts
from pam_jax.pam.model import load_pam
from pam_jax.pam.predictor import PAMPredictor
from tests.pam.test_convert_pam import build_release, sam2_ckpt  # noqa: F401  (fixture)
from tests.pam.test_prompts import byte_tokenizer

SIZE = 512
FRAMES = 6
NEW = 8
PENALTY = 1.05
BOX = [60.0, 40.0, 260.0, 220.0]
HW = (240, 320)
EOS, PAD = 258, 256  # <|im_end|>, <|endoftext|> in byte_tokenizer (256 bytes + 3 specials)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    d, llm, parts = build_release(tmp_path_factory.mktemp("PAM-e2e"), vocab_size=259)
    byte_tokenizer().save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    )
    (d / "generation_config.json").write_text(
        json.dumps({"repetition_penalty": PENALTY, "eos_token_id": [EOS, PAD]})
    )
    return d, llm, parts


@pytest.fixture(scope="module")
def converted(release, sam2_ckpt, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("conv") / "pam"
    assert main(["convert", "pam", str(release[0]), str(out), "--sam2", str(sam2_ckpt)]) == 0
    patches = ((out / "config.json", ("config", "sam2")), (out / "sam2/config.json", ("config",)))
    for f, path in patches:
        meta = json.loads(f.read_text())
        node = meta
        for k in path:
            node = node[k]
        node["image_size"] = SIZE
        f.write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A smooth random image and a panning 6-frame JPEG video (JPEG: what the official
    `init_state` reads); frame 0 doubles as the image so both sides decode the same pixels."""
    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (HW[0] // 8, HW[1] // 8 + FRAMES, 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(base).resize((HW[1] + 8 * FRAMES, HW[0]), Image.BILINEAR))
    (d / "img").mkdir()
    (d / "vid").mkdir()
    for t in range(FRAMES):
        Image.fromarray(big[:, 6 * t : 6 * t + HW[1]]).save(d / "vid" / f"{t:05d}.jpg", quality=95)
    (d / "img" / "00000.jpg").write_bytes((d / "vid" / "00000.jpg").read_bytes())
    return d


class OfficialTaps:
    """PAM fork's decoder taps on the official SAM 2, one entry per mask-decoder call."""

    def __init__(self, model):
        self.calls = []
        dec = model.sam_mask_decoder
        self.dec = dec
        dec.transformer.register_forward_hook(self._transformer)
        orig = dec.predict_masks

        def predict_masks(*a, **k):
            out = orig(*a, **k)  # masks, iou_pred, mask_tokens_out, object_score_logits
            self.calls[-1].update(masks=out[0], iou=out[1])
            return out

        dec.predict_masks = predict_masks

    def _transformer(self, mod, inp, out):
        hs, src = out
        self.calls.append({"hs": hs, "src": src})

    def taps(self, i):
        """(mid_image_embed [1, C, h, w], mid_mask_tokens [1, 2, C]) of decoder call i."""
        c = self.calls[i]
        b, n, ch = c["src"].shape
        hw = int(round(n**0.5))
        embed = c["src"].transpose(1, 2).reshape(b, ch, hw, hw)
        tokens = c["hs"][:, 2 : 2 + self.dec.num_mask_tokens]  # after obj-score + IoU tokens
        stable = self.dec._get_stability_scores(c["masks"][:, 0])
        stable = stable >= self.dec.dynamic_multimask_stability_thresh
        best = torch.argmax(c["iou"][:, 1:], dim=-1) + 1
        sel = torch.where(stable, torch.zeros_like(best), best)
        chosen = tokens[torch.arange(b), sel][:, None]
        return embed, torch.cat([chosen, tokens[:, 0:1]], dim=1)


def _official_predictor(ckpt, monkeypatch):
    import sam2.sam2_video_predictor as svp
    from sam2.build_sam import build_sam2_video_predictor

    pred = build_sam2_video_predictor(
        "configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu",
        hydra_overrides_extra=[f"++model.image_size={SIZE}"],
    )  # fmt: skip
    pred.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["model"])
    pred.eval()
    # PAM's fork (pam.md 1.2, 1.3): single-mask decoding, the single-mask token's mask
    pred.multimask_output_in_sam = False
    pred.sam_mask_decoder.dynamic_multimask_via_stability = False
    # ... and tracked frames' memories stay float32 (only the consolidated prompt frame is bf16)
    src = textwrap.dedent(inspect.getsource(svp.SAM2VideoPredictor._run_single_frame_inference))
    cast = "maskmem_features = maskmem_features.to(torch.bfloat16)"
    assert src.count(cast) == 1
    ns = {}
    exec(src.replace(cast, "pass"), vars(svp), ns)
    monkeypatch.setattr(svp.SAM2VideoPredictor, "_run_single_frame_inference", ns[
        "_run_single_frame_inference"])  # fmt: skip
    return pred


def _torch_visual(parts, taps):
    """llava `encode_images` / `encode_videos` on the official taps: per frame [img tokens,
    image_newline, 16 sem tokens, semT_newline(, frame_newline for videos)]."""
    perc, img, sem, nls = parts
    video = len(taps) > 1
    pieces = []
    with torch.no_grad():
        for i, (embed, tokens) in enumerate(taps):
            s_t, i_t = perc(embed, tokens, 1 / 2 if i == 0 else 1 / 4)
            pieces += [img(i_t)[0], nls["image_newline"][None], sem(s_t)[0],
                       nls["semT_newline"][None]]  # fmt: skip
            if video:
                pieces.append(nls["frame_newline"][None])
    return torch.cat(pieces)


def _hf_greedy(llm, embeds, penalty=PENALTY):
    with torch.no_grad():
        out = llm.generate(
            inputs_embeds=torch.tensor(np.asarray(embeds, np.float32))[None],
            attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long),
            max_new_tokens=NEW, do_sample=False, repetition_penalty=penalty,
            eos_token_id=[EOS, PAD], pad_token_id=PAD,
        )  # fmt: skip
    ids = out[0].tolist()
    return ids[: ids.index(EOS) + 1] if EOS in ids else ids  # ours keeps the stop token


def _check_generation(api, inp, llm, cli_ids, what):
    """CLI tokens (the checkpoint's penalty 1.05) == HF on the same embeddings. A tiny random
    tied-embedding LLM tends to repeat one token, so the same embeddings are also decoded with
    a strong penalty (5.0, through the Python API), which gives varied tokens."""
    got = np.asarray(inp.embeds[0, : inp.lengths[0]])
    hf = _hf_greedy(llm, got)
    print(f"{what} tokens: pam-jax CLI {cli_ids}, HF generate {hf}")
    assert cli_ids == hf and len(hf) > 0
    strong = PAMPredictor(api.model, api.tokenizer, max_new_tokens=NEW,
                          sampling=SamplingParams(repetition_penalty=5.0))  # fmt: skip
    ids = strong.generate(inp)[0][1]
    hf = _hf_greedy(llm, got, 5.0)
    print(f"{what} tokens, penalty 5: pam-jax {ids}, HF generate {hf}")
    assert ids == hf and len(set(hf)) > 2


def _check_embeds(got, want, before, after, n_visual):
    """Layout [before text, visual, after text] and length, then values."""
    assert got.shape == (len(before) + n_visual + len(after), want.shape[1]) == want.shape
    err = np.abs(got - want).max()
    scale = np.abs(want).max()
    print(f"LLM input embeddings: max err {err:.2e} (max |x| {scale:.2f})")
    # float32 on both sides; the difference is SAM 2's (Hiera + decoder) accumulation order
    # propagated through the perceiver: measured ~1e-5 relative, bound 1e-3 relative
    np.testing.assert_allclose(got, want, atol=1e-3 * scale, rtol=0)


def _mask_agreement(got, want, what):
    diff = (got != want).mean()
    print(f"{what}: {int((got != want).sum())} of {got.size} mask pixels differ")
    # float32 logits on both sides; a pixel can flip only where |logit| ~ 1e-5
    assert diff <= 1e-3, f"{what}: {diff:.2%} of the mask pixels differ"


def test_image_box_end_to_end(release, converted, media, sam2_ckpt, monkeypatch, tmp_path, capsys):  # noqa: F811
    _, llm, parts = release
    img_path = media / "img" / "00000.jpg"
    out = tmp_path / "img"
    rc = main(["predict", "--model", str(converted), "--image", str(img_path),
               "--box", ",".join(map(str, BOX)), "--task", "recognize", "--llm-dtype", "float32",
               "--max-new-tokens", str(NEW), "--json", "--out", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    row = json.loads(capsys.readouterr().out.strip())
    cli_mask = np.asarray(Image.open(tmp_path / row["file"])) > 0

    # official SAM 2 video predictor on the 1-frame "video", as the release does
    pred = _official_predictor(sam2_ckpt, monkeypatch)
    taps = OfficialTaps(pred)
    with torch.inference_mode():
        state = pred.init_state(video_path=str(media / "img"))
        _, _, logits = pred.add_new_points_or_box(
            state, frame_idx=0, obj_id=1, box=np.asarray(BOX, np.float32)
        )
    assert len(taps.calls) == 1
    _mask_agreement(cli_mask, to_np(logits[0, 0]) > 0, "image")

    model, _, tok = load_pam(converted, llm_dtype=jnp.float32)
    api = PAMPredictor(model, tok, max_new_tokens=NEW)
    inp = api.image_inputs(np.asarray(Image.open(img_path)), [{"box": BOX}], "recognize")
    got = np.asarray(inp.llm.embeds[0, : inp.llm.lengths[0]])
    before, after = prompts.prompt_ids(tok, "recognize", "en")
    text = llm.get_input_embeddings()
    with torch.no_grad():
        want = torch.cat([text(torch.tensor(before)), _torch_visual(parts, [taps.taps(0)]),
                          text(torch.tensor(after))])  # fmt: skip
    _check_embeds(got, to_np(want), before, after, (SIZE // 32) ** 2 + 18)

    _check_generation(api, inp.llm, llm, row["token_ids"], "image")
    assert row["text"] == tok.decode(row["token_ids"], skip_special_tokens=True).strip()
    assert (tmp_path / "img.png").is_file()


def test_video_end_to_end(release, converted, media, sam2_ckpt, monkeypatch, tmp_path, capsys):  # noqa: F811
    _, llm, parts = release
    out = tmp_path / "vid"
    rc = main(["predict", "--model", str(converted), "--video", str(media / "vid"),
               "--box", ",".join(map(str, BOX)), "--llm-dtype", "float32",
               "--max-new-tokens", str(NEW), "--json", "--out", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    row = json.loads(capsys.readouterr().out.strip())
    res = json.loads((tmp_path / "vid.json").read_text())
    cli_masks = np.stack(
        [np.asarray(Image.open(tmp_path / fr["file"])) > 0 for fr in res["frames"]]
    )
    assert cli_masks.shape == (FRAMES, *HW) and (tmp_path / "vid.gif").is_file()

    pred = _official_predictor(sam2_ckpt, monkeypatch)
    taps = OfficialTaps(pred)
    want_masks = np.zeros_like(cli_masks)
    with torch.inference_mode():
        state = pred.init_state(video_path=str(media / "vid"))
        pred.add_new_points_or_box(state, frame_idx=0, obj_id=1, box=np.asarray(BOX, np.float32))
        for f, _, logits in pred.propagate_in_video(state):
            want_masks[f] = to_np(logits[0, 0]) > 0
    assert len(taps.calls) == FRAMES  # the prompt frame, then one call per tracked frame
    for f in range(FRAMES):
        _mask_agreement(cli_masks[f], want_masks[f], f"video frame {f}")

    chosen = assembly.select_frames(FRAMES)
    assert row["frames_fed"] == chosen.tolist() and len(chosen) == 16
    model, _, tok = load_pam(converted, llm_dtype=jnp.float32)
    api = PAMPredictor(model, tok, max_new_tokens=NEW)
    frames = [np.asarray(Image.open(media / "vid" / f"{t:05d}.jpg")) for t in range(FRAMES)]
    inp = api.video_inputs(frames, {"box": BOX}, "video_caption")
    got = np.asarray(inp.llm.embeds[0, : inp.llm.lengths[0]])
    before, after = prompts.prompt_ids(tok, "video_caption", "en")
    text = llm.get_input_embeddings()
    with torch.no_grad():
        visual = _torch_visual(parts, [taps.taps(int(f)) for f in chosen])
        want = torch.cat([text(torch.tensor(before)), visual, text(torch.tensor(after))])
    dense, sparse = (SIZE // 32) ** 2, (SIZE // 64) ** 2
    _check_embeds(got, to_np(want), before, after, dense + 19 + 15 * (sparse + 19))

    _check_generation(api, inp.llm, llm, row["token_ids"], "video")


def test_image_mask_prompt_batched(release, converted, media, sam2_ckpt, monkeypatch):  # noqa: F811
    """A mask prompt (which the release crashes on) batched with a box region in ONE call:
    each row equals the official predictor run on its own prompt (`add_new_mask` /
    `_use_mask_as_output`, taps from the decoder call that path makes)."""
    _, llm, parts = release
    img_path = media / "img" / "00000.jpg"
    image = np.asarray(Image.open(img_path))
    mask = np.zeros(HW, bool)
    mask[50:170, 90:230] = True
    mask[100:120, 120:140] = False  # a hole, so the mask is not just a box
    pred = _official_predictor(sam2_ckpt, monkeypatch)
    taps = OfficialTaps(pred)
    with torch.inference_mode():
        state = pred.init_state(video_path=str(media / "img"))
        _, _, mask_logits = pred.add_new_mask(state, frame_idx=0, obj_id=1, mask=mask)
        state = pred.init_state(video_path=str(media / "img"))
        _, _, box_logits = pred.add_new_points_or_box(
            state, frame_idx=0, obj_id=1, box=np.asarray(BOX, np.float32)
        )
    assert len(taps.calls) == 2

    model, _, tok = load_pam(converted, llm_dtype=jnp.float32)
    api = PAMPredictor(model, tok, max_new_tokens=NEW)
    inp = api.image_inputs(image, [{"mask": mask}, {"box": BOX}], "explain")
    _mask_agreement(inp.masks[0], to_np(mask_logits[0, 0]) > 0, "mask prompt")
    _mask_agreement(inp.masks[1], to_np(box_logits[0, 0]) > 0, "box (batched with a mask)")
    assert inp.scores[0] == 10.0  # _use_mask_as_output: +10 when the mask is not empty
    before, after = prompts.prompt_ids(tok, "explain", "en")
    text = llm.get_input_embeddings()
    for i in range(2):
        with torch.no_grad():
            want = torch.cat([text(torch.tensor(before)), _torch_visual(parts, [taps.taps(i)]),
                              text(torch.tensor(after))])  # fmt: skip
        got = np.asarray(inp.llm.embeds[i, : inp.llm.lengths[i]])
        _check_embeds(got, to_np(want), before, after, (SIZE // 32) ** 2 + 18)
