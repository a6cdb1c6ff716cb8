"""`pam-jax demo --out DIR [--steps N] [--quick]`: the whole product on a model that learns.

With no downloads and on a CPU, in stages that each leave their result in DIR (an interrupted
demo resumes at the stage it stopped in; a DIR made with other settings is refused):

1. `data/`: a synthetic region dataset in the release's JSONL format (`pam_jax.demo_data`:
   shapes of several kinds, colours and sizes on textured backgrounds; masks as COCO RLE,
   boxes, clicks; recognize / brief / detailed caption conversations in English and Chinese),
   a training split and a held-out split drawn from other seeds, both prepared as datasets by
   `pam_jax.data.prepare` (what `pam-jax data prepare` runs).
2. `model_init/`: a micro PAM with fresh random weights (`micro_config`: a 6-block Hiera SAM 2
   at 128 x 128, the Semantic Perceiver, projectors, a 2-layer Qwen2), its SAM 2 decoder's
   prompt attention aligned to positions (`align_prompt_attention`: what the official SAM 2
   inherits from pre-training), and a word-level tokenizer of the dataset's vocabulary
   (`demo_data.build_tokenizer`).
3. `train_sam2/`, `train/`: `pam-jax train` twice: phase 0 trains SAM 2 alone on the
   segmentation loss on the generated masks (run config `configs/train/demo-sam2.json`,
   `lm_loss` 0), so its masks follow the prompt before the LLM reads it; phase 1 trains every
   part (SAM 2 at 3e-4, perceiver and projectors at 1e-4, newlines and LLM at 1e-3 / 2e-3) on
   the LM loss plus the segmentation loss from phase 0's export (`demo.json`;
   `demo-quick-sam2.json` / `demo-quick.json` with --quick). Unlike PAM's recipe SAM 2 is not
   frozen there: a from-scratch micro SAM 2 has no pre-trained features to keep, and training
   it on both losses raises the held-out mIoU (0.70 -> 0.82) and lets the region's colour into
   the answers. Orbax checkpoints, so an interrupted phase resumes; `train/export/` is the
   trained model.
4. `eval/untrained`, `eval/trained`: `pam-jax eval`'s runner on the held-out split (masks from
   the box prompt, greedy text), then `metrics.json` {"untrained": {...}, "trained": {...}}:
   `mIoU` over held-out regions at the images' resolution, `exact_match` over the English
   recognize and brief-caption answers (normalised as `pam_jax.evaluation.metrics`), and
   `CIDEr` of the detailed captions where Java and pycocoevalcap are present.
5. `loss_sam2.png`, `loss.png` (the two phases' loss curves) and `predictions.png` (held-out
   regions, untrained and trained side by side: mask overlay, generated text, reference).

Scoring, the prediction sheet and the summary table are in `pam_jax.demo_report`.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pam_jax.cliutil import CLIError, RunFolder, positive_int, status, write_json
from pam_jax.demo_report import prediction_sheet, score, summary_table

STAGE_DIRS = ("data", "model_init", "train_sam2", "train", "eval")
OUTPUTS = ("metrics.json", "loss_sam2.png", "loss.png", "predictions.png")


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """What a demo folder is made with (recorded in DIR/run.json; a resume must match)."""

    quick: bool = False
    steps: int = 0  # 0: the run config's
    seed: int = 0
    train_images: int = 600
    heldout_images: int = 40
    image_size: int = 128

    @classmethod
    def make(cls, *, quick: bool, steps: int | None, seed: int) -> DemoSettings:
        if quick:
            # 24 held-out images (~37 regions, ~74 exact-match answers): the quick test's margins
            # are then several answers, not one; evaluating them costs seconds
            return cls(True, steps or 0, seed, train_images=120, heldout_images=24)
        return cls(False, steps or 0, seed)

    @property
    def run_config(self) -> str:
        return "demo-quick" if self.quick else "demo"


# ---- the micro model ------------------------------------------------------------------------


def micro_config(image_size: int = 128, vocab_size: int = 160):
    """The demo's PAMConfig: SAM 2.1-style micro Hiera (embed 16, stages 1-2-2-1, d_model 64)
    at `image_size` (stride-16 map image_size / 16: 8 x 8 at 128, so 16 dense visual tokens, 34
    visual embeddings), a perceiver of width 64, and a 2-layer Qwen2 of width 128 with tied
    embeddings over `vocab_size` ids (the tokenizer's length, padded)."""
    from pam_jax.llm.config import Qwen2Config
    from pam_jax.pam.config import PAMConfig, PerceiverConfig
    from pam_jax.sam2.config import HieraConfig, SAM2Config

    hiera = HieraConfig(
        embed_dim=16, num_heads=1, stages=(1, 2, 2, 1), global_att_blocks=(4,),
        window_spec=(8, 4, 4, 2), window_pos_embed_bkg_spatial_size=(4, 4),
    )  # fmt: skip
    sam2 = SAM2Config(
        name="sam2.1_hiera_micro", image_size=image_size, hiera=hiera, d_model=64, mem_dim=32,
        memory_attention_layers=1,
    ).validate()  # fmt: skip
    llm = Qwen2Config(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
        tie_word_embeddings=True, max_position_embeddings=1024,
    )  # fmt: skip
    return PAMConfig(sam2=sam2, llm=llm, perceiver=PerceiverConfig(embedding_dim=64, num_heads=4,
                     mlp_dim=256))  # fmt: skip


def init_params(make: Callable[[], Any], seed: int = 0, *, what: str = "model") -> Any:
    """The module `make` builds, with a training initialisation filled on the host (numpy:
    flax's eager init of SAM 2's few hundred tensors is slow on a CPU).

    Kernels LeCun-normal (flax's default), biases 0, norm scales 1, SAM 2 / perceiver learned
    tokens and the Fourier matrix N(0, 1), LLM embeddings N(0, 0.02^2), the PAM newlines
    N(0, 1/H), other raw parameters N(0, 0.02^2) (the official trunc-normal scale)."""
    from flax import nnx

    from pam_jax.checkpoint import assign_params, flat_params

    model = nnx.eval_shape(make)
    rng = np.random.default_rng(seed)
    params = {}
    for key, v in flat_params(model).items():
        shape, leaf = tuple(v.shape), key.rsplit(".", 1)[-1]
        if leaf == "kernel":
            x = rng.standard_normal(shape) / np.sqrt(int(np.prod(shape[:-1])) or 1)
        elif leaf == "bias":
            x = np.zeros(shape)
        elif leaf in ("scale", "weight"):
            x = np.ones(shape)
        elif leaf in ("embedding", "positional_encoding_gaussian_matrix"):
            x = rng.standard_normal(shape) * (0.02 if key.startswith("llm.") else 1.0)
        elif leaf.endswith("newline"):
            x = rng.standard_normal(shape) / np.sqrt(shape[-1])
        else:
            x = 0.02 * rng.standard_normal(shape)
        params[key] = x.astype(np.float32)
    assign_params(model, params, what=what)
    return model


def align_prompt_attention(sam2, alpha: float = 25.0) -> None:
    """The demo's initialisation of the micro SAM 2's prompt path (in place, on `init_params`
    weights): the position alignment the official SAM 2 inherits from pre-training on SA-1B.

    SAM 2's decoder locates a prompt only through attention between the prompt tokens (Fourier
    PE of the point + a type embedding) and the image keys (+ the dense PE of the same Gaussian
    matrix). With random q / k the token-to-image attention starts uniform (the attention mass
    within 1.5 cells of a box corner is 0.11, uniform 0.09), so from scratch the cheapest cut of
    the loss is saliency and the prompt path dies within 100 steps (masks ignore the prompt).
    Here a position subspace S (the sin / cos pairs of the first d/4 Fourier features) is
    reserved: those frequencies are set to low x / y frequencies (each head's kernel peaks once
    over the image), the cross attentions' q / k read exactly S (W_q^T W_k = alpha x identity
    on S, a truncated identity since downsample_rate halves the width), and the content that
    enters them (neck outputs, learned tokens, the decoder's normed streams) starts at 0 on S.
    Token-to-image attention near the prompt then starts at 0.79 and stays there in training."""
    dec = sam2.sam_mask_decoder
    tr = dec.transformer
    d = dec.transformer_dim
    npf, nf = d // 2, d // 4  # Fourier features; frequencies in S (2 q / k dims each)
    S = np.r_[0:nf, npf : npf + nf]

    def zero_on_s(p) -> None:
        v = np.array(p[...])
        v[..., S] = 0
        p[...] = v

    atts = [tr.final_attn_token_to_image]
    for layer in tr.layers:
        atts += [layer.cross_attn_token_to_image, layer.cross_attn_image_to_token]
    heads = atts[0].num_heads
    per_head = atts[0].internal_dim // heads // 2  # frequencies per head
    # each head's frequencies: x, y, x, ... of one magnitude (1/4 of a cycle over the image
    # for half the heads: a single peak; 1/2 and 3/4 for the rest: sharper, still few peaks)
    mags = [0.25] * (heads // 2) + [0.5] * (heads // 4) + [0.75] * (heads - heads // 2 - heads // 4)
    g = sam2.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    gm = np.array(g[...])
    for f in range(nf):
        gm[:, f] = (mags[f // per_head], 0.0) if f % 2 == 0 else (0.0, mags[f // per_head])
    g[...] = gm
    w = np.zeros((d, atts[0].internal_dim), np.float32)
    for j in range(w.shape[1]):  # internal dim j: sin (even j) / cos (odd j) of frequency j // 2
        w[j // 2 + (npf if j % 2 else 0), j] = np.sqrt(alpha)
    for att in atts:
        att.q_proj.kernel[...] = w
        att.k_proj.kernel[...] = w
    for conv in sam2.image_encoder.neck.convs:
        zero_on_s(conv.conv.kernel)
    zero_on_s(sam2.no_mem_embed)
    pe = sam2.sam_prompt_encoder
    for e in (*pe.point_embeddings, pe.not_a_point_embed, pe.no_mask_embed, dec.iou_token,
              dec.mask_tokens, dec.obj_score_token):  # fmt: skip
        zero_on_s(e.embedding)
    for layer in tr.layers:
        for norm in (layer.norm1, layer.norm2, layer.norm3, layer.norm4):
            zero_on_s(norm.scale)
    zero_on_s(tr.norm_final_attn.scale)


def write_initial_model(out_dir: Path, image_size: int, seed: int, *, align: bool = True) -> Path:
    """A fresh micro PAM + the demo tokenizer as a model directory (atomically); `align`: the
    demo's prompt-attention initialisation (`align_prompt_attention`), off for plain random
    weights."""
    from flax import nnx

    from pam_jax.demo_data import build_tokenizer
    from pam_jax.pam.model import PAM, save_pam

    tok = build_tokenizer()
    vocab = -(-tok.vocab_size // 32) * 32  # padded, as released vocabularies are
    cfg = micro_config(image_size, vocab)
    model = init_params(lambda: PAM(cfg, rngs=nnx.Rngs(seed)), seed, what="micro PAM")
    if align:
        align_prompt_attention(model.sam2)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok_dir = tmp / "tokenizer"
    save_tokenizer(tok, tok_dir)
    save_pam(model, tmp, tokenizer_dir=tok_dir)
    shutil.rmtree(tok_dir)
    tmp.replace(out_dir)
    return out_dir


def save_tokenizer(tok, out_dir: Path) -> Path:
    """tokenizer.json + tokenizer_config.json + generation_config.json of a pam-jax Tokenizer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.tok.save(str(out_dir / "tokenizer.json"))
    write_json(out_dir / "tokenizer_config.json", tok.config)
    write_json(out_dir / "generation_config.json", tok.generation_config)
    return out_dir


# ---- helpers other tests use ------------------------------------------------------------------


def random_sam2(size: str = "t", version: str = "2.1", image_size: int = 512, seed: int = 0):
    """(SAM2Base with `init_params` weights, its SAM2Config) for one of the official sizes."""
    from flax import nnx

    from pam_jax.sam2.config import sam2_config
    from pam_jax.sam2.model import SAM2Base

    cfg = sam2_config(size, version, image_size)
    return init_params(lambda: SAM2Base(cfg, rngs=nnx.Rngs(0)), seed, what="random SAM 2"), cfg


def sample_image(h: int = 480, w: int = 640, seed: int = 0) -> tuple[np.ndarray, dict]:
    """A synthetic scene (sky, ground, sun, house, tree) and the shapes' boxes / centres."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, h)[:, None, None]
    sky = (1 - y) * np.array([110, 170, 235]) + y * np.array([200, 225, 250])
    img = np.broadcast_to(sky, (h, w, 3)).copy()
    ground = int(h * 0.7)
    img[ground:] = np.array([80, 150, 70])
    img += rng.normal(0, 4, img.shape)  # a little texture
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    house = (int(w * 0.45), int(h * 0.42), int(w * 0.72), int(ground + h * 0.05))
    d.rectangle(house, fill=(190, 60, 50))
    d.polygon([(house[0] - 15, house[1]), (house[2] + 15, house[1]),
               ((house[0] + house[2]) // 2, int(h * 0.25))], fill=(90, 50, 40))  # fmt: skip
    d.rectangle((int(w * 0.56), int(h * 0.58), int(w * 0.62), house[3]), fill=(70, 40, 25))
    sun_c, sun_r = (int(w * 0.15), int(h * 0.18)), int(min(h, w) * 0.08)
    d.ellipse((sun_c[0] - sun_r, sun_c[1] - sun_r, sun_c[0] + sun_r, sun_c[1] + sun_r),
              fill=(250, 210, 60))  # fmt: skip
    d.rectangle((int(w * 0.84), int(h * 0.5), int(w * 0.87), ground + 10), fill=(100, 70, 40))
    d.ellipse((int(w * 0.78), int(h * 0.3), int(w * 0.93), int(h * 0.56)), fill=(40, 110, 45))
    shapes = {"house_box": [float(v) for v in house], "sun_center": [float(c) for c in sun_c]}
    return np.asarray(im), shapes


# ---- stages ---------------------------------------------------------------------------------


def make_data(root: Path, s: DemoSettings) -> dict[str, Path]:
    """Stage 1: JSONL + images under root/data, prepared datasets root/data/{train,heldout}_ds."""
    from pam_jax import demo_data

    data = root / "data"
    out = {}
    for split, n, seed, tasks, multi in (
        ("train", s.train_images, s.seed, demo_data.ALL_TASKS, True),
        ("heldout", s.heldout_images, s.seed + 1_000_003, demo_data.EVAL_TASKS, False),
    ):
        jsonl = data / f"{split}.jsonl"
        if not jsonl.is_file():
            status(f"demo: drawing {n} {split} images")
            demo_data.generate(
                data, split, n, seed, image_hw=(s.image_size, s.image_size), tasks=tasks,
                multi_turn=multi,
            )  # fmt: skip
        ds = data / f"{split}_ds"
        if not ds.is_dir():
            from pam_jax.data.prepare import prepare

            status(f"demo: preparing {jsonl.name} (pam-jax data prepare)")
            prepare([str(jsonl)], str(data), str(ds), strict=True)
        out[split] = jsonl
        out[split + "_ds"] = ds
    return out


# the two training phases: (run config suffix, workdir, model to start from)
PHASES = (("-sam2", "train_sam2", "model_init"), ("", "train", "train_sam2/export"))


def train_config(root: Path, s: DemoSettings, data: dict[str, Path], phase: int = 1):
    """The TrainConfig of training phase `phase` (0: SAM 2 alone on the segmentation loss,
    from the random weights; 1: every part on the LM + segmentation losses, from phase 0's
    export): the run config with this folder's paths (and --steps)."""
    from pam_jax.training.config import resolve

    suffix, workdir, start = PHASES[phase]
    over = [
        f"model={root / start}",
        f"data={data['train_ds']}",
        f"workdir={root / workdir}",
        f"seed={s.seed}",
    ]
    if s.steps:
        over.append(f"steps={s.steps}")
    return resolve(s.run_config + suffix, over)


def run_training(root: Path, s: DemoSettings, data: dict[str, Path]) -> Path:
    """Stage 3: `pam-jax train` twice: phase 0 trains SAM 2 on the segmentation loss, phase 1
    every part on the LM + segmentation losses from phase 0's export; each phase resumes a
    workdir this demo started. Returns the final export/."""
    from pam_jax.training.trainer import train

    export = root
    for phase in range(len(PHASES)):
        cfg = train_config(root, s, data, phase)
        export = Path(cfg.workdir) / "export"
        if (export / "config.json").is_file():
            continue
        resume = (Path(cfg.workdir) / "config.json").is_file()
        what = "SAM 2 (segmentation loss)" if phase == 0 else "all parts (LM + segmentation loss)"
        status(
            f"demo: training {what} for {cfg.steps} steps "
            f"({'resuming' if resume else 'from ' + PHASES[phase][2]})"
        )
        train(cfg, resume=resume)
        if not (export / "config.json").is_file():  # stopped early (SIGTERM: checkpointed)
            raise CLIError(
                f"demo: training phase {phase} stopped before writing {export}; run the same "
                "command again to resume it"
            )
    return export


def run_eval(model_dir: Path, data: dict[str, Path], out_dir: Path, batch_size: int) -> Path:
    """Stage 4: predictions of one model on the held-out split (`pam-jax eval`'s runner:
    resumable predictions.jsonl, one line per region with text and mask)."""
    from pam_jax.cliutil import RunFolder
    from pam_jax.evaluation import formats
    from pam_jax.evaluation.runner import DecodeSettings, Runner, run_predictions
    from pam_jax.pam.model import load_pam
    from pam_jax.pam.predictor import PAMPredictor

    loaded = formats.load(str(data["heldout"]), "pam", image_root=str(data["heldout"].parent))
    decode = DecodeSettings(max_new_tokens=48)
    settings = {"model": str(model_dir.resolve()), "data": str(data["heldout"].resolve()),
                "max_new_tokens": decode.max_new_tokens}  # fmt: skip
    RunFolder.open(out_dir, command="eval", settings=settings)
    import jax.numpy as jnp

    model, _, tok = load_pam(model_dir, llm_dtype=jnp.float32)
    pred = PAMPredictor(
        model, tok, sampling=decode.sampling(), max_new_tokens=decode.max_new_tokens
    )
    runner = Runner(pred, batch_size=batch_size, lang="en", seed=0)
    run_predictions(runner, loaded.items, out_dir, progress=False)
    return out_dir / "predictions.jsonl"


# ---- the command ----------------------------------------------------------------------------


def demo(root: Path, s: DemoSettings, *, force: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    run = RunFolder.open(root, command="demo", settings=dataclasses.asdict(s), force=force)
    if force and not run.resumed:  # the stages of other settings are not reused
        for name in (*STAGE_DIRS, *OUTPUTS):
            p = root / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)

    def lap(name: str, t: float) -> float:
        now = time.perf_counter()
        times[name] = round(now - t, 1)
        return now

    t = t0
    data = make_data(root, s)
    t = lap("data", t)
    if not (root / "model_init" / "config.json").is_file():
        status("demo: building the micro PAM (random weights) and its tokenizer")
        write_initial_model(root / "model_init", s.image_size, s.seed)
    t = lap("model", t)
    export = run_training(root, s, data)
    t = lap("train", t)
    cfgs = [train_config(root, s, data, phase) for phase in range(len(PHASES))]
    bs = 16
    preds = {}
    for name, model_dir in (("untrained", root / "model_init"), ("trained", export)):
        status(f"demo: evaluating the {name} model on the held-out split")
        preds[name] = run_eval(model_dir, data, root / "eval" / name, bs)
    t = lap("eval", t)
    result = {name: score(p, data) for name, p in preds.items()}
    write_json(root / "metrics.json", result)
    for cfg, name in zip(cfgs, ("loss_sam2.png", "loss.png")):
        if (Path(cfg.workdir) / "loss.png").is_file():  # the trainer's, from metrics.jsonl
            shutil.copyfile(Path(cfg.workdir) / "loss.png", root / name)
    prediction_sheet(data, preds, root / "predictions.png")
    lap("pictures", t)
    times["total"] = round(time.perf_counter() - t0, 1)
    return {"metrics": result, "seconds": times, "steps": [c.steps for c in cfgs]}


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo",
        help="generate data, train, evaluate and show a micro PAM (no downloads, CPU minutes)",
        description="Generate a synthetic region dataset, train a micro PAM on it from scratch "
        "(pam-jax train), evaluate the untrained and trained models on a held-out split "
        "(pam-jax eval) and write DIR/metrics.json, DIR/loss.png and DIR/predictions.png. "
        "An interrupted demo resumes in the same DIR.",
    )
    p.add_argument("--out", default="demo_out", metavar="DIR", help="demo folder")
    p.add_argument(
        "--steps",
        type=positive_int,
        metavar="N",
        help="optimizer steps of each training phase (default: the run configs')",
    )
    p.add_argument(
        "--quick", action="store_true",
        help="smaller data and fewer steps (the test suite's form; lower scores)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the weights")
    p.add_argument(
        "--force", action="store_true",
        help="start over in a DIR made with other settings (its demo files are deleted)",
    )  # fmt: skip
    return p


def run(args: argparse.Namespace) -> int:
    from pam_jax.cliutil import run_command

    def go(a):
        s = DemoSettings.make(quick=a.quick, steps=a.steps, seed=a.seed)
        root = Path(a.out)
        result = demo(root, s, force=a.force)
        print(summary_table(result))
        secs = result["seconds"]
        print(f"training steps (SAM 2, rest): {result['steps']}; seconds: " +
              ", ".join(f"{k} {v}" for k, v in secs.items()))  # fmt: skip
        for name in OUTPUTS:
            print(f"wrote {root / name}")
        print(f"model: {root / 'train' / 'export'} (pam-jax predict --model ...); "
              f"data: {root / 'data'}")  # fmt: skip
        return 0

    return run_command(go, args)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pam-jax")
    sub = p.add_subparsers(dest="command", required=True)
    add_parser(sub)
    return run(p.parse_args(["demo", *(argv if argv is not None else sys.argv[1:])]))


__all__ = [
    "CLIError", "DemoSettings", "demo", "micro_config", "init_params", "run", "score",
    "prediction_sheet", "summary_table",
]  # fmt: skip
