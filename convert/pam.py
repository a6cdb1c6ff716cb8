"""`pam-jax convert pam PAM_DIR --sam2 SAM2_CKPT.pt OUT_DIR`: an official PAM release.

A release directory (`Perceive-Anything/PAM-1.5B`, `PAM-3B`) is a LLaVA-Qwen `save_pretrained`:
`config.json` (Qwen2 fields + `mm_*` fields, model_type `llava_qwen`), `model.safetensors` or
sharded `model-*.safetensors` with `model.safetensors.index.json`, the tokenizer files and
`generation_config.json`. Its keys:

    model.embed_tokens.* model.layers.* model.norm.* [lm_head.*]   the Qwen2 LLM
    model.vision_resampler.*                                       Semantic Perceiver
    model.mm_projector_img.{0,2}.* model.mm_projector_semT.{0,2}.* projectors
    model.image_newline model.semT_newline model.frame_newline     separators
    model.vision_tower.sam2_model_predictor.*                      SAM 2 copy: IGNORED

The release's loader rebuilds SAM 2 from Meta's `sam2.1_hiera_large.pt` and reports the copy
inside the PAM files as unused; so does this converter (`--sam2` is required). Any other key, or
any expected key that is absent, stops the conversion with the full list. The output:

    OUT_DIR/config.json         kind "pam": PAMConfig (+ the release config.json)
    OUT_DIR/model.safetensors   PAM's own parts, NNX keys (model.py `PAMParts`), float32
    OUT_DIR/sam2/               a `pam-jax convert sam2` directory of the --sam2 checkpoint
    OUT_DIR/llm/                a `pam-jax convert llm` directory (+ tokenizer, generation config)

Everything is validated before anything is written. LLM tensors are streamed one at a time.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pam_jax.convert.llm import check_llm_tensors, out_dtype, read_hf_config
from pam_jax.convert.torch_nnx import short_list

from pam_jax.checkpoint import FORMAT, CheckpointError, save_model_dir
from pam_jax.llm.io import KIND as LLM_KIND
from pam_jax.llm.io import copy_tokenizer_files, write_config
from pam_jax.llm.weights import TensorSource, expected_params, write_safetensors
from pam_jax.pam.config import PAMConfig

KIND = "pam"
SAM2_SUBDIR = "sam2"
LLM_SUBDIR = "llm"
IGNORED_PREFIXES = ("model.vision_tower.",)
LLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
# old HF checkpoints saved RoPE's inverse frequencies; they carry no parameters
LLM_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
RELEASE_SAM2 = "sam2.1_hiera_l"


def _parts_prefixes() -> tuple[str, ...]:
    from pam_jax.pam.model import PARTS

    return tuple(f"model.{p}" for p in PARTS)


def classify(key: str) -> str:
    """'llm', 'parts', 'ignored' or 'unknown' for a release key."""
    if key.startswith(IGNORED_PREFIXES) or key.endswith(LLM_IGNORED_SUFFIXES):
        return "ignored"
    if key.startswith(LLM_PREFIXES):
        return "llm"
    for p in _parts_prefixes():
        if key == p or key.startswith(p + "."):
            return "parts"
    return "unknown"


def _read_release(pam_dir: Path) -> tuple[dict, TensorSource]:
    hf_cfg = read_hf_config(pam_dir, "a PAM release directory")
    try:
        src = TensorSource.from_dir(pam_dir)
    except CheckpointError as e:
        raise CheckpointError(
            f"{pam_dir} holds no PAM weights: {e}. A PAM release has model.safetensors or "
            "model-*.safetensors with model.safetensors.index.json"
        ) from None
    return hf_cfg, src


def convert_pam(
    pam_dir: str | os.PathLike,
    sam2_ckpt: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Convert a PAM release + Meta's SAM 2 checkpoint into a pam-jax model directory.

    `dtype` applies to the LLM weights (None/"keep", "float32", "bfloat16", "float16"); PAM's
    own parts are stored float32. Raises CheckpointError (listing every offending key) without
    writing anything when the inputs do not fit.
    """
    from flax import nnx
    from pam_jax.convert import sam2 as sam2_conv
    from pam_jax.convert.torch_nnx import torch_to_nnx_params

    from pam_jax.pam.model import PAMParts

    if sam2_ckpt is None:
        raise CheckpointError(
            "--sam2 SAM2_CKPT.pt is required: the PAM release loads SAM 2 from Meta's "
            "checkpoint (sam2.1_hiera_large.pt, https://dl.fbaipublicfiles.com/"
            "segment_anything_2/092824/sam2.1_hiera_large.pt), not from the PAM files"
        )
    pam_dir, out = Path(pam_dir), Path(out_dir)
    hf_cfg, src = _read_release(pam_dir)

    try:
        cfg = PAMConfig.from_release(hf_cfg)  # SAM 2 config filled in below, from --sam2
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{pam_dir}/config.json is not a PAM config: {e}") from None

    groups: dict[str, list[str]] = {"llm": [], "parts": [], "ignored": [], "unknown": []}
    for k in src.keys():
        groups[classify(k)].append(k)
    errors = []
    if groups["unknown"]:
        unknown = sorted(groups["unknown"])
        errors.append(f"{len(unknown)} unknown keys: {short_list(unknown)}")

    # LLM: the pam-jax Qwen2 key table; tied embeddings -> lm_head.weight absent (or dropped)
    want = expected_params(cfg.llm)
    by_hf, llm_errors = check_llm_tensors(cfg.llm, groups["llm"], src.shape, "LLM ")
    errors += llm_errors

    # PAM parts: the generic torch -> NNX mapping against PAMParts (strict on keys and shapes)
    abstract = nnx.eval_shape(lambda: PAMParts(cfg, rngs=nnx.Rngs(0)))
    parts_sd = {k[len("model.") :]: src.get(k) for k in groups["parts"]}
    parts = {}
    try:
        parts = torch_to_nnx_params(abstract, parts_sd, what="PAM parts")
    except CheckpointError as e:
        errors.append(str(e))
    if errors:
        raise CheckpointError(f"{pam_dir} does not match a PAM release: " + "; ".join(errors))

    # SAM 2 from Meta's checkpoint (validated completely before anything is written)
    sam2_sd = sam2_conv.load_state_dict(sam2_ckpt)
    sam2_cfg = sam2_conv.detect_config(sam2_sd)
    sam2_params = sam2_conv.map_state_dict(sam2_cfg, sam2_sd, what=str(sam2_ckpt))
    del sam2_sd
    if sam2_cfg.name != RELEASE_SAM2:
        log(f"warning: {sam2_ckpt} is {sam2_cfg.name}; the PAM release was trained on "
            f"{RELEASE_SAM2} (sam2.1_hiera_large.pt)")  # fmt: skip
    try:
        cfg = cfg.replace(sam2=sam2_cfg)
    except ValueError as e:
        raise CheckpointError(f"{sam2_ckpt} does not fit PAM: {e}") from None

    # ---- everything fits: write
    out.mkdir(parents=True, exist_ok=True)
    save_model_dir(
        out / SAM2_SUBDIR, sam2_conv.KIND, sam2_cfg.to_dict(), sam2_params,
        extra={"source": os.path.basename(str(sam2_ckpt))},
    )  # fmt: skip
    del sam2_params

    llm_out = out / LLM_SUBDIR
    llm_out.mkdir(parents=True, exist_ok=True)
    out_dt = out_dtype(dtype)
    to_hf = {k: (hk, t) for hk, (k, t, _) in by_hf.items()}

    def produce(k):
        hk, t = to_hf[k]
        w = src.get(hk)
        return np.ascontiguousarray(w.T if t else w, dtype=out_dt or w.dtype)

    entries = [
        (k, out_dt or src.files[to_hf[k][0]].dtype(to_hf[k][0]), shape) for k, shape in want.items()
    ]
    write_safetensors(
        llm_out / "model.safetensors", entries, produce, {"format": FORMAT, "kind": LLM_KIND}
    )
    llm_hf = {k: v for k, v in hf_cfg.items() if not k.startswith("mm_")}
    llm_hf.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    write_config(llm_out, cfg.llm, llm_hf)
    copy_tokenizer_files(pam_dir, llm_out)

    params = {k: np.asarray(v, np.float32) for k, v in parts.items()}
    save_model_dir(
        out, KIND, cfg.to_dict(), params,
        extra={
            "sam2_dir": SAM2_SUBDIR, "llm_dir": LLM_SUBDIR, "release_config": hf_cfg,
            "source": str(pam_dir.name), "sam2_source": os.path.basename(str(sam2_ckpt)),
            "ignored_keys": len(groups["ignored"]),
        },
    )  # fmt: skip
    if groups["ignored"]:
        log(f"ignored {len(groups['ignored'])} tensors of the PAM files "
            f"({short_list(sorted({_prefix(k) for k in groups['ignored']}), 5)}): SAM 2 comes "
            f"from {os.path.basename(str(sam2_ckpt))}, as in the release's loader")  # fmt: skip
    return out


def _prefix(key: str) -> str:
    """The first three components of a key, then `.*` (for the ignored-keys report)."""
    parts = key.split(".")
    return ".".join(parts[:3]) + ".*" if len(parts) > 3 else key


def add_parser(conv_sub) -> argparse.ArgumentParser:
    p = conv_sub.add_parser(
        "pam",
        usage="pam-jax convert pam PAM_DIR OUT_DIR --sam2 SAM2_CKPT.pt [--dtype D] [--force]\n"
        "       pam-jax convert pam --export MODEL_DIR OUT_DIR [--dtype D] [--force]",
        help="an official PAM release directory plus SAM 2 weights",
        description="Convert an official PAM release directory (config.json, safetensors, "
        "tokenizer) and Meta's SAM 2.1 checkpoint into a pam-jax model directory. The SAM 2 "
        "copy inside the PAM files is ignored, as the release's own loader does. With "
        "--export, the inverse: a pam-jax PAM model directory (PAM_DIR) -> the official "
        "release layout (OUT_DIR), SAM 2 included and also written as OUT_DIR/sam2.pt.",
    )
    p.add_argument(
        "pam_dir", metavar="PAM_DIR",
        help="the release directory (e.g. PAM-3B); with --export the pam-jax model directory",
    )  # fmt: skip
    p.add_argument(
        "out_dir", metavar="OUT_DIR",
        help="model directory to write; with --export the release directory to write",
    )  # fmt: skip
    p.add_argument(
        "--sam2", metavar="SAM2_CKPT.pt", default=None,
        help="Meta's SAM 2 checkpoint the release uses (sam2.1_hiera_large.pt from "
        "github.com/facebookresearch/sam2); required (not with --export)",
    )  # fmt: skip
    p.add_argument(
        "--export", action="store_true",
        help="inverse direction: pam-jax model dir -> official release layout (sharded "
        "safetensors + index, config.json, generation_config.json, tokenizer, sam2.pt)",
    )  # fmt: skip
    p.add_argument(
        "--dtype", choices=["keep", "float32", "bfloat16", "float16"], default="keep",
        help="dtype of the written LLM weights (default: keep the release's); with --export, "
        "of every written floating tensor (default: keep each tensor's)",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it is not empty")
    return p


def run(args: argparse.Namespace) -> int:
    from pam_jax.cliutil import CLIError, atomic_dir, check_new_dir

    if args.export:
        from pam_jax.convert.export_pam import run_export

        return run_export(args)
    if args.sam2 is None:
        raise CLIError(
            "--sam2 SAM2_CKPT.pt is required: the PAM release loads SAM 2 from Meta's "
            "checkpoint (sam2.1_hiera_large.pt), not from the PAM files"
        )
    check_new_dir(args.out_dir, force=args.force)  # before reading the release
    with atomic_dir(args.out_dir, force=args.force) as tmp:
        convert_pam(args.pam_dir, args.sam2, tmp, dtype=args.dtype)
    print(f"wrote {args.out_dir}")
    return 0
