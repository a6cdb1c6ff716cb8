"""`pam-jax convert llm HF_DIR OUT_DIR`: a local HF Qwen2 / Qwen2.5 checkpoint -> pam-jax model dir.

`pam-jax convert llm --export MODEL_DIR HF_OUT_DIR` (or `export_hf`) is the inverse: it writes
`config.json` + `model.safetensors` + the tokenizer files that
`transformers.Qwen2ForCausalLM.from_pretrained` loads.

Both directions stream: source tensors are memory-mapped, the output header is computed from
shapes first, then each tensor is read, transposed if it is a Linear weight, cast if asked, and
written before the next is touched. Peak anonymous memory is about one tensor (the largest is the
embedding, 151936 x H); the mapped source pages are page cache.

Key table (HF -> pam-jax; every Linear weight is transposed to flax's [in, out]):
    model.embed_tokens.weight                  -> model.embed_tokens.embedding
    model.layers.N.self_attn.{q,k,v}_proj.weight/bias, o_proj.weight -> ...kernel / ...bias
    model.layers.N.mlp.{gate,up,down}_proj.weight -> ...kernel
    model.layers.N.{input,post_attention}_layernorm.weight, model.norm.weight -> same key
    lm_head.weight                             -> lm_head.kernel (untied only; dropped if tied)
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pam_jax.convert.torch_nnx import short_list

from pam_jax.checkpoint import FORMAT, WEIGHTS_FILE, CheckpointError
from pam_jax.llm.config import Qwen2Config
from pam_jax.llm.io import KIND, copy_tokenizer_files, read_config, write_config
from pam_jax.llm.weights import (
    SafetensorsFile,
    TensorSource,
    expected_params,
    hf_key,
    write_safetensors,
)

# HF keys that carry no parameters of ours (old checkpoints saved the RoPE buffer)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def out_dtype(name: str | None) -> np.dtype | None:
    """--dtype: None / "keep" (the source's), "float32", "bfloat16" or "float16"."""
    import ml_dtypes

    if name in (None, "keep"):
        return None
    table = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
    if name not in table:
        raise CheckpointError(f"unknown dtype {name!r}; expected keep/float32/bfloat16/float16")
    return np.dtype(table[name])


def read_hf_config(directory: Path, what: str) -> dict:
    """The config.json of an HF-layout directory; `what` names the expected kind in errors."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory (expected {what})")
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{directory} has no config.json (expected {what})")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None


def check_llm_tensors(
    cfg: Qwen2Config, keys: list[str], shape_of: Callable[[str], tuple], label: str = ""
) -> tuple[dict[str, tuple[str, bool, tuple]], list[str]]:
    """HF tensor names `keys` against the Qwen2 key table of `cfg`.

    Returns ({HF key: (pam-jax key, transposed, pam-jax shape)}, error strings listing every
    unknown, missing and misshapen tensor). RoPE buffers and a tied `lm_head.weight` are
    skipped. `label` prefixes the kind in the messages (e.g. "LLM ").
    """
    by_hf = {}
    for k, shape in expected_params(cfg).items():
        hk, t = hf_key(k)
        by_hf[hk] = (k, t, shape)
    present, unknown, bad = set(), [], []
    for hk in keys:
        if hk.endswith(_IGNORED_SUFFIXES) or (cfg.tie_word_embeddings and hk == "lm_head.weight"):
            continue
        if hk not in by_hf:
            unknown.append(hk)
            continue
        present.add(hk)
        _, t, shape = by_hf[hk]
        got = tuple(shape_of(hk))
        if (got[::-1] if t else got) != shape:
            bad.append(f"{hk}: {got} (config.json implies {shape[::-1] if t else shape})")
    missing = sorted(set(by_hf) - present)
    errors = []
    if missing:
        errors.append(f"{len(missing)} missing {label}tensors: {short_list(missing)}")
    if unknown:
        errors.append(f"{len(unknown)} unknown {label}tensors: {short_list(sorted(unknown))}")
    if bad:
        errors.append(f"{len(bad)} {label}shapes that do not match config.json: {short_list(bad)}")
    return by_hf, errors


def convert_llm(
    hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str | None = None
) -> Path:
    """Convert an HF Qwen2 directory. `dtype`: None/"keep" (source dtype), "float32",
    "bfloat16" or "float16". Raises CheckpointError on anything that does not fit."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    hf_cfg = read_hf_config(hf_dir, "an HF model directory")
    cfg = Qwen2Config.from_hf(hf_cfg)
    src = TensorSource.from_dir(hf_dir)
    want = expected_params(cfg)  # pam-jax key -> shape
    by_hf, errors = check_llm_tensors(cfg, list(src.keys()), src.shape)
    if errors:
        raise CheckpointError(f"{hf_dir} does not match its config: " + "; ".join(errors))

    out_dt = out_dtype(dtype)
    to_hf = {k: hk for hk, (k, _, _) in by_hf.items()}
    transposed = {k: t for _, (k, t, _) in by_hf.items()}

    def produce(k):
        w = src.get(to_hf[k])
        w = w.T if transposed[k] else w
        return np.ascontiguousarray(w, dtype=out_dt or w.dtype)

    entries = [
        (k, out_dt or src.files[to_hf[k]].dtype(to_hf[k]), shape) for k, shape in want.items()
    ]
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / WEIGHTS_FILE, entries, produce, {"format": FORMAT, "kind": KIND})
    write_config(out, cfg, hf_cfg)
    copy_tokenizer_files(hf_dir, out)
    return out


def export_hf(
    model_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str | None = None
) -> Path:
    """pam-jax model directory -> HF directory loadable by `Qwen2ForCausalLM.from_pretrained`."""
    cfg = read_config(model_dir)
    f = Path(model_dir) / WEIGHTS_FILE
    if not f.is_file():
        raise CheckpointError(f"{model_dir} has no {WEIGHTS_FILE}")
    src = SafetensorsFile(f)
    want = expected_params(cfg)
    if set(src.keys()) != set(want):
        raise CheckpointError(
            f"{f} does not match its config: keys differ "
            f"({short_list(sorted(set(src.keys()) ^ set(want)))})"
        )
    out_dt = out_dtype(dtype)
    entries, to_ours = [], {}
    for k, shape in want.items():
        hk, t = hf_key(k)
        to_ours[hk] = (k, t)
        entries.append((hk, out_dt or src.dtype(k), shape[::-1] if t else shape))

    def produce(hk):
        k, t = to_ours[hk]
        w = src.get(k)
        return np.ascontiguousarray(w.T if t else w, dtype=out_dt or w.dtype)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", entries, produce, {"format": "pt"})
    hf = cfg.to_hf()
    first = entries[0][1]
    hf["torch_dtype"] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
        np.dtype(first).name, "float32"
    )
    hf["dtype"] = hf["torch_dtype"]
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    copy_tokenizer_files(model_dir, out)
    return out


def add_parser(conv_sub) -> argparse.ArgumentParser:
    p = conv_sub.add_parser(
        "llm",
        help="a local Hugging Face Qwen2 / Qwen2.5 directory",
        description="Convert a local HF Qwen2/Qwen2.5 directory (config.json, model.safetensors "
        "or sharded safetensors with an index, tokenizer files) into a pam-jax "
        "model directory. With --export, convert a pam-jax model directory back "
        "into an HF directory (SRC = pam-jax dir, DST = new HF dir).",
    )
    p.add_argument("src", metavar="HF_DIR", help="HF model directory (pam-jax dir with --export)")
    p.add_argument("dst", metavar="OUT_DIR", help="output directory")
    p.add_argument(
        "--export",
        action="store_true",
        help="inverse direction: pam-jax model dir -> HF safetensors dir",
    )
    p.add_argument(
        "--dtype",
        choices=["keep", "float32", "bfloat16", "float16"],
        default="keep",
        help="dtype of the written weights (default: keep)",
    )
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it is not empty")
    return p


def run(args) -> int:
    from pam_jax.cliutil import atomic_dir, check_new_dir

    what = "HF model" if args.export else "model"
    check_new_dir(args.dst, force=args.force, what=what)  # before reading the weights
    with atomic_dir(args.dst, force=args.force, what=what) as tmp:
        if args.export:
            export_hf(args.src, tmp, args.dtype)
        else:
            convert_llm(args.src, tmp, args.dtype)
    print(f"wrote {args.dst}")
    return 0
