"""Load and save Qwen2 pam-jax model directories (kind "qwen2").

DIR/config.json        {"format": "pam-jax", "kind": "qwen2", "config": Qwen2Config fields,
                        "hf_config": the source HF config.json (when converted)}
DIR/model.safetensors  keys as in `weights.expected_params` (unrolled layers, kernels [in, out])
DIR/tokenizer.json ... the HF tokenizer files, copied verbatim
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pam_jax.checkpoint import (
    CONFIG_FILE,
    FORMAT,
    WEIGHTS_FILE,
    CheckpointError,
    flat_params,
    read_model_config,
)
from pam_jax.llm.config import Qwen2Config
from pam_jax.llm.qwen2 import Qwen2ForCausalLM
from pam_jax.llm.tokenizer import TOKENIZER_FILES, Tokenizer
from pam_jax.llm.weights import SafetensorsFile, expected_params, unrolled_key, write_safetensors

KIND = "qwen2"


def write_config(out_dir: Path, cfg: Qwen2Config, hf_config: dict | None = None) -> None:
    meta = {"format": FORMAT, "kind": KIND, "config": cfg.to_dict()}
    if hf_config is not None:
        meta["hf_config"] = hf_config
    (out_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        p = Path(src) / name
        if p.is_file():
            shutil.copyfile(p, Path(dst) / name)
            copied.append(name)
    return copied


def read_config(model_dir: str | os.PathLike, **overrides) -> Qwen2Config:
    meta = read_model_config(model_dir, kind=KIND)
    return Qwen2Config.from_dict({**meta["config"], **overrides})


def load_qwen2(
    model_dir: str | os.PathLike,
    dtype=jnp.bfloat16,
    *,
    param_dtype=None,
    scan_layers: bool = False,
    remat: str = "none",
    decode_attention: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
    tokenizer: bool = True,
) -> tuple[Qwen2ForCausalLM, Qwen2Config, Tokenizer | None]:
    """Model, config and tokenizer (None if the directory has no tokenizer.json).

    `param_dtype` defaults to `dtype`: inference keeps the weights in the compute dtype (bf16
    halves the bytes read per decoded token). With `mesh`, every tensor is placed directly
    with the sharding its logical axis names map to under the current rules
    (`sharding.axis_rules`). Tensors are read one at a time.
    """
    from pam_jax.sharding import named_sharding, param_names

    cfg = read_config(
        model_dir, scan_layers=scan_layers, remat=remat, decode_attention=decode_attention
    )
    param_dtype = param_dtype or dtype
    f = Path(model_dir) / WEIGHTS_FILE
    if not f.is_file():
        raise CheckpointError(f"{model_dir} has no {WEIGHTS_FILE}")
    src = SafetensorsFile(f)
    want = expected_params(cfg.replace(scan_layers=False))
    have = set(src.keys())
    errors = []
    if missing := sorted(set(want) - have):
        errors.append(f"missing {len(missing)} keys: {missing[:10]}")
    if unknown := sorted(have - set(want)):
        errors.append(f"unknown {len(unknown)} keys: {unknown[:10]}")
    if bad := [
        f"{k}: {src.shape(k)} != {s}" for k, s in want.items() if k in have and src.shape(k) != s
    ]:
        errors.append(f"{len(bad)} wrong shapes: {bad[:10]}")
    if errors:
        raise CheckpointError(f"{f} does not match its config: " + "; ".join(errors))

    abstract = nnx.eval_shape(
        lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
    )
    graphdef, state = nnx.split(abstract)
    flat = []
    for path, var in nnx.to_flat_state(state):
        key = ".".join(map(str, path))
        if cfg.scan_layers and key.startswith("model.layers."):
            arr = np.stack([src.get(unrolled_key(key, i)) for i in range(cfg.num_hidden_layers)])
        else:
            arr = src.get(key)
        arr = np.asarray(arr).astype(var.dtype)  # numpy cast: one host tensor at a time
        sharding = None if mesh is None else named_sharding(mesh, param_names(var), arr.shape)
        flat.append((path, var.replace(value=jax.device_put(arr, sharding))))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    tok = None
    if tokenizer and (Path(model_dir) / "tokenizer.json").is_file():
        tok = Tokenizer.from_dir(model_dir)
    return model, cfg, tok


def save_qwen2(
    model: Qwen2ForCausalLM,
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    hf_config: dict | None = None,
) -> Path:
    """Write a model (scanned or not) as a pam-jax model directory (unrolled keys)."""
    cfg: Qwen2Config = model.cfg
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = {k: v for k, v in flat_params(model).items()}
    want = expected_params(cfg.replace(scan_layers=False))

    def produce(k):
        if cfg.scan_layers and k.startswith("model.layers."):
            i, rest = k[len("model.layers.") :].split(".", 1)
            return np.asarray(params["model.layers." + rest][int(i)])
        return np.asarray(params[k])

    entries = []
    for k, shape in want.items():
        entries.append((k, np.dtype(produce(k).dtype), shape))
    write_safetensors(out / WEIGHTS_FILE, entries, produce, {"format": FORMAT, "kind": KIND})
    write_config(
        out, cfg.replace(scan_layers=False, remat="none", decode_attention="auto"), hf_config
    )
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)
    return out
