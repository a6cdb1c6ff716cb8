"""The model side of training: building a PAM for a run, naming its parts, splitting its
parameters into trainable and frozen flat dicts, and their shardings.

Parameters travel as flat dicts `{"llm.model.layers.0.self_attn.q_proj.kernel": array}`
(the model-directory keys). `ModelSpec` holds what is static: the GraphDef, the state treedef,
the keys in flatten order, each key's logical axis names and part.

Parts (`train_parts`), by key prefix:

    perceiver      parts.vision_resampler.*            (Semantic Perceiver, incl. the Fourier PE)
    projectors     parts.mm_projector_img.*, parts.mm_projector_semT.*
    newlines       parts.image_newline, parts.semT_newline, parts.frame_newline
    llm            llm.*                                (Qwen2: embeddings, layers, norm, head)
    sam2_encoder   sam2.image_encoder.*                 (Hiera trunk + FPN neck)
    sam2_decoder   every other sam2.* (prompt encoder, mask decoder, memory, pointers)

The release's `mm_language_model` also covers the newline vectors; here they are their own
part, and the stage configs list them with the perceiver and projectors. The random-Fourier
position matrices (`pe_layer.positional_encoding_gaussian_matrix`) are torch buffers in the
release: they stay frozen whatever the part.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from pam_jax import sharding
from pam_jax.checkpoint import path_key
from pam_jax.pam.config import PAMConfig, PerceiverConfig
from pam_jax.pam.model import PAM, PAMParts
from pam_jax.training.config import ConfigError, TrainConfig

_NEWLINES = ("parts.image_newline", "parts.semT_newline", "parts.frame_newline")
# torch buffers (not parameters) in the release: loaded, never trained
BUFFERS = ("positional_encoding_gaussian_matrix",)


def is_buffer(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in BUFFERS


def part_of(key: str) -> str:
    """The train part a parameter key belongs to."""
    if key.startswith("parts.vision_resampler."):
        return "perceiver"
    if key.startswith(("parts.mm_projector_img.", "parts.mm_projector_semT.")):
        return "projectors"
    if key in _NEWLINES:
        return "newlines"
    if key.startswith("llm."):
        return "llm"
    if key.startswith("sam2.image_encoder."):
        return "sam2_encoder"
    if key.startswith("sam2."):
        return "sam2_decoder"
    raise ValueError(f"parameter {key!r} belongs to no train part")


def decays(key: str, ndim: int) -> bool:
    """AdamW weight decay applies to matrices / kernels only: never to norms, biases, the
    newline vectors or other 1-D tensors."""
    leaf = key.rsplit(".", 1)[-1]
    return ndim >= 2 and leaf not in ("bias", "scale", "weight") or leaf == "embedding"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Static description of a PAM's parameters (hashable by identity)."""

    config: PAMConfig
    graphdef: Any
    treedef: Any
    keys: tuple[str, ...]  # flatten order of the state
    names: Mapping[str, tuple[str | None, ...] | None]  # logical axis names per key
    shapes: Mapping[str, tuple[int, ...]]
    parts: Mapping[str, str]
    trainable: frozenset[str]

    __hash__ = object.__hash__

    def __eq__(self, other):
        return self is other

    @property
    def frozen(self) -> frozenset[str]:
        return frozenset(self.keys) - self.trainable

    def merge(self, params: Mapping[str, jax.Array]) -> PAM:
        """The PAM module over `params` (all keys; traced arrays inside jit)."""
        leaves = [params[k] for k in self.keys]
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))

    def split(self, params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        tr = {k: params[k] for k in self.keys if k in self.trainable}
        fr = {k: params[k] for k in self.keys if k not in self.trainable}
        return tr, fr

    def shardings(self, mesh: Mesh, keys=None) -> dict[str, NamedSharding]:
        """NamedSharding per key from the logical names and the current rules."""
        keys = self.keys if keys is None else keys
        out = {}
        for k in keys:
            spec = sharding.logical_to_spec(self.names[k])
            out[k] = NamedSharding(mesh, _fit(spec, self.shapes[k], mesh))
        return out

    def count(self, keys) -> int:
        return int(sum(np.prod(self.shapes[k]) for k in keys))


def _fit(spec, shape, mesh: Mesh):
    """Drop mesh axes from dimensions they do not divide (e.g. Qwen2.5's 2 KV heads on a
    tensor axis of 8: K / V stay replicated over it), so every config shards on every mesh."""
    from jax.sharding import PartitionSpec

    out = []
    for i, s in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if s is None else (s,) if isinstance(s, str) else tuple(s)
        keep, size = [], 1
        for a in axes:
            if shape[i] % (size * mesh.shape[a]) == 0:
                keep.append(a)
                size *= mesh.shape[a]
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return PartitionSpec(*out)


def spec_for(model: PAM, trainable_parts: tuple[str, ...]) -> ModelSpec:
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    keys = tuple(path_key(p) for p, _ in flat)
    _, treedef = jax.tree.flatten(state)
    names = {path_key(p): sharding.param_names(v) for p, v in flat}
    shapes = {path_key(p): tuple(v.shape) for p, v in flat}
    parts = {k: part_of(k) for k in keys}
    trainable = frozenset(k for k in keys if parts[k] in trainable_parts and not is_buffer(k))
    return ModelSpec(model.config, graphdef, treedef, keys, names, shapes, parts, trainable)


def compute_dtype(cfg: TrainConfig):
    if cfg.dtype == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.dtype]


def _training_llm_config(llm_cfg, cfg: TrainConfig):
    return llm_cfg.replace(remat=cfg.remat, scan_layers=cfg.scan_layers)


def _is_dir(s: str) -> bool:
    return bool(s) and Path(s).is_dir()


def _preset(name: str, kind: str):
    from pam_jax import configs

    try:
        c = configs.load(name)
    except ValueError as e:
        raise ConfigError(f"{kind}={name!r} is neither a directory nor a preset: {e}") from None
    return c


def _config_file(name: str) -> PAMConfig:
    """A PAM config JSON ({"kind": "pam", "config": {...}}; random weights), by path or
    relative to configs/train/."""
    import json

    from pam_jax.training.config import TRAIN_CONFIG_DIR

    p = Path(name)
    if not p.is_file():
        p = TRAIN_CONFIG_DIR / name
    if not p.is_file():
        raise ConfigError(f"model={name!r}: no such PAM config file")
    d = json.loads(p.read_text())
    if d.get("kind") != "pam":
        raise ConfigError(f"model={name!r}: not a PAM config (kind {d.get('kind')!r})")
    return PAMConfig.from_dict(d["config"])


def pam_config_for(cfg: TrainConfig) -> PAMConfig:
    """The PAMConfig of the run's model without loading weights (compile-only, benchmarks)."""
    from pam_jax.checkpoint import read_model_config

    if cfg.model:
        if _is_dir(cfg.model):
            pc = PAMConfig.from_dict(read_model_config(cfg.model, "pam")["config"])
        elif cfg.model.endswith(".json"):
            pc = _config_file(cfg.model)
        else:
            pc = _preset(cfg.model, "model")
            if not isinstance(pc, PAMConfig):
                raise ConfigError(f"model={cfg.model!r} is not a PAM preset")
    else:
        if _is_dir(cfg.sam2):
            from pam_jax.sam2.config import SAM2Config

            s = SAM2Config.from_dict(read_model_config(cfg.sam2, "sam2")["config"])
        else:
            s = _preset(cfg.sam2, "sam2")
        if _is_dir(cfg.llm):
            from pam_jax.llm.config import Qwen2Config

            q = Qwen2Config.from_dict(read_model_config(cfg.llm, "qwen2")["config"])
        else:
            q = _preset(cfg.llm, "llm")
        # the release's perceiver (hard-coded at 256 = every official SAM 2's d_model) at this
        # SAM 2's width, so a smaller SAM 2 gets a fresh PAM too
        pc = PAMConfig(sam2=s, llm=q, perceiver=PerceiverConfig(embedding_dim=s.d_model))
    if cfg.image_size and cfg.image_size != pc.sam2.image_size:
        pc = pc.replace(sam2=pc.sam2.replace(image_size=cfg.image_size))
    return pc.replace(llm=_training_llm_config(pc.llm, cfg))


def abstract_model(cfg: TrainConfig, pam_cfg: PAMConfig | None = None) -> PAM:
    """The run's PAM with abstract (shape-only) parameters."""
    pc = pam_cfg or pam_config_for(cfg)
    dt = compute_dtype(cfg)
    return nnx.eval_shape(lambda: PAM(pc, rngs=nnx.Rngs(cfg.seed), dtype=dt, llm_dtype=dt))


def load_model(cfg: TrainConfig) -> tuple[PAM, Any]:
    """(PAM with float32 parameters and the run's compute dtype, tokenizer or None).

    A PAM directory is loaded whole, keeping the config's padded vocabulary (training runs over
    all logits, as the release does). A preset name gives random weights (N(0, 0.02), norm
    scales 1; for compile-only, benchmarks and tests). `sam2` + `llm` build a fresh PAM: the
    perceiver, projectors and newlines newly initialised (flax init), SAM 2 and the LLM loaded
    from their directories (or random from presets).
    """
    from pam_jax.checkpoint import assign_params, flat_params, load_params, random_normal_params

    pc = pam_config_for(cfg)
    dt = compute_dtype(cfg)
    tok = None
    model = abstract_model(cfg, pc)
    params: dict[str, Any] = {}
    if cfg.model and _is_dir(cfg.model):
        from pam_jax.pam.model import load_pam

        loaded, _, tok = load_pam(
            cfg.model, dtype=jnp.float32, llm_dtype=jnp.float32, resize_to_tokenizer=False
        )
        params = flat_params(loaded)
    elif cfg.model:  # a preset or config file: random weights
        params = flat_params(random_normal_params(lambda: model, seed=cfg.seed))
    else:
        rng_model = random_normal_params(lambda: model, seed=cfg.seed)
        params = flat_params(rng_model)
        if _is_dir(cfg.sam2):
            from pam_jax.sam2.loading import load_sam2

            s, _ = load_sam2(cfg.sam2, dtype=jnp.float32)
            params.update({f"sam2.{k}": v for k, v in flat_params(s).items()})
        if _is_dir(cfg.llm):
            from pam_jax.llm.io import load_qwen2

            q, _, tok = load_qwen2(cfg.llm, dtype=jnp.float32)
            params.update({f"llm.{k}": v for k, v in flat_params(q).items()})
        fresh = PAMParts(pc, rngs=nnx.Rngs(cfg.seed), dtype=dt)
        params.update({f"parts.{k}": v for k, v in flat_params(fresh).items()})
    params = {k: np.asarray(v, np.float32) for k, v in params.items()}
    del load_params
    assign_params(model, params, what="the run's PAM")
    return model, tok
