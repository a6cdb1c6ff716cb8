"""The run configuration of `pam-jax train`: one frozen dataclass, JSON run configs, overrides.

A run config is a JSON file of `TrainConfig` keys (`configs/train/NAME.json`, installed as
`pam_jax.configs/train/`), or any JSON file path. `key=value` overrides are parsed by the key's
type; an unknown key is an error that lists the valid ones. Run configs are kept apart from
the model presets (`configs/*.json`): `model=pam-3b` names a model preset (random weights),
`model=path/to/dir` a converted PAM directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TRAIN_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "train"

PARTS = ("perceiver", "projectors", "newlines", "llm", "sam2_decoder", "sam2_encoder")
REMAT = ("none", "full", "dots", "dots_all")  # pam_jax.llm.config.REMAT


class ConfigError(ValueError):
    """A bad run config or override (one line, naming the problem)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # model: a converted PAM directory or a PAM model preset name (random weights); or a
    # fresh PAM from `sam2` + `llm` (directories or presets; new perceiver and projectors)
    model: str = ""
    sam2: str = ""
    llm: str = ""
    image_size: int = 0  # SAM 2 input size (0: the model's; the release trains at 1024)
    # data: a prepared dataset dir, a mixture YAML, a JSONL (+ image_root), or
    # "synthetic" / "synthetic:video" (random batches of the real shapes, for benchmarks)
    data: str = "synthetic"
    image_root: str = ""
    eval_data: str = ""
    eval_every: int = 0
    # the evaluator (pam_jax.evaluation) on a benchmark file every eval_every steps
    eval_bench: str = ""
    eval_format: str = "pam"
    eval_limit: int = 0  # items (0: all)
    workdir: str = "runs/train"
    steps: int = 100
    batch_size: int = 8  # global, per optimizer step (over all micro-batches and devices)
    grad_accum: int = 1
    seq_len: int = 0  # padded sequence length (0: the smallest 64-multiple fitting one visual)
    # pack samples into rows of seq_len (first-fit, at most pack_max a row; pam_jax.data.batch)
    pack: bool = False
    pack_max: int = 4
    model_max_length: int = 12288
    learning_rate: float = 1e-5
    lr_perceiver: float = 0.0  # 0: learning_rate
    lr_projectors: float = 0.0
    lr_newlines: float = 0.0
    lr_llm: float = 0.0
    lr_sam2_decoder: float = 0.0
    lr_sam2_encoder: float = 0.0
    warmup_steps: int = 0
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    clip_norm: float = 1.0  # 0: no clipping
    train_parts: str = "perceiver,projectors,newlines"
    mesh: str = "1,-1,1"  # data,fsdp,tensor; -1 takes the remaining devices
    dtype: str = "auto"  # compute dtype: auto (bf16 on accelerators, float32 on CPU)
    # LLM layers: none | full (recompute each layer) | dots (keep weight-matmul outputs) |
    # dots_all (keep every matmul output)
    remat: str = "none"
    scan_layers: bool = False  # LLM layers under lax.scan (faster compiles at depth)
    attention: str = "auto"  # LLM training attention (pam_jax.llm hidden_states_train)
    # positions per cross-entropy chunk ([B, chunk, V] float32 logits at a time); the head runs
    # on each row's supervised positions only, in chunks of this many, so smaller wastes less
    loss_chunk: int = 128
    seg_loss: float = 0.0  # weight of SAM 2's segmentation loss (0 = off)
    # weight of the LM loss in the objective (0: SAM 2 alone on seg_loss, e.g. a first phase;
    # the LM loss is still computed and logged)
    lm_loss: float = 1.0
    seed: int = 0
    shuffle: bool = True
    augment: bool = True
    log_every: int = 10
    save_every: int = 500
    keep: int = 3
    export: bool = True  # write workdir/export/ (a model directory) at the end
    nan_check: bool = True

    # ---- derived ---------------------------------------------------------------------
    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p in (s.strip() for s in self.train_parts.split(",")) if p)

    def lr_for(self, part: str) -> float:
        v = getattr(self, f"lr_{part}")
        return v if v > 0 else self.learning_rate

    @property
    def mesh_shape(self) -> tuple[int, int, int]:
        return parse_mesh(self.mesh)

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum

    def validate(self) -> TrainConfig:
        bad = [p for p in self.parts if p not in PARTS]
        if bad:
            raise ConfigError(f"train_parts: unknown {bad}; valid parts: {', '.join(PARTS)}")
        if not self.parts:
            raise ConfigError("train_parts is empty: nothing to train")
        if not self.model and not (self.sam2 and self.llm):
            raise ConfigError("give `model` (a PAM directory or preset) or both `sam2` and `llm`")
        if self.model and (self.sam2 or self.llm):
            raise ConfigError("give either `model` or `sam2` + `llm`, not both")
        if self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ConfigError(
                f"batch_size={self.batch_size} is not a positive multiple of "
                f"grad_accum={self.grad_accum}"
            )
        if not self.workdir:
            raise ConfigError("workdir is empty: give workdir=DIR")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.remat not in REMAT:
            raise ConfigError(f"remat must be one of {', '.join(REMAT)}, got {self.remat!r}")
        if self.pack and (not self.seq_len or self.data.startswith("synthetic")):
            raise ConfigError("pack=true needs seq_len (the packed row length) and real data")
        if self.pack_max < 1:
            raise ConfigError(f"pack_max must be >= 1, got {self.pack_max}")
        if self.lm_loss < 0 or self.seg_loss < 0 or not (self.lm_loss or self.seg_loss):
            raise ConfigError(
                f"lm_loss={self.lm_loss} and seg_loss={self.seg_loss} must be >= 0, not both 0"
            )
        if self.loss_chunk < 1:
            raise ConfigError(f"loss_chunk must be >= 1, got {self.loss_chunk}")
        if self.seq_len and self.seq_len % 8:
            raise ConfigError(f"seq_len must be a multiple of 8, got {self.seq_len}")
        parse_mesh(self.mesh)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **kw) -> TrainConfig:
        return dataclasses.replace(self, **kw)


def parse_mesh(text: str) -> tuple[int, int, int]:
    """ "data,fsdp,tensor" (one may be -1) -> a 3-tuple of ints."""
    try:
        sizes = tuple(int(s) for s in str(text).split(","))
    except ValueError:
        raise ConfigError(f"mesh must be three integers data,fsdp,tensor, got {text!r}") from None
    if len(sizes) != 3 or any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise ConfigError(
            f"mesh must be data,fsdp,tensor with positive sizes and at most one -1, got {text!r}"
        )
    return sizes  # type: ignore[return-value]


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def valid_keys() -> list[str]:
    return sorted(_FIELDS)


def _unknown(keys: Sequence[str], where: str) -> ConfigError:
    return ConfigError(
        f"unknown config key(s) {', '.join(sorted(keys))} in {where}; valid keys: "
        + ", ".join(valid_keys())
    )


def _coerce(key: str, value: Any) -> Any:
    t = _HINTS[key]
    if isinstance(value, str):
        s = value.strip()
        if t is bool:
            low = s.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key} is a boolean (true/false), got {value!r}")
        if t is int:
            try:
                return int(s)
            except ValueError:
                raise ConfigError(f"{key} is an integer, got {value!r}") from None
        if t is float:
            try:
                return float(s)
            except ValueError:
                raise ConfigError(f"{key} is a number, got {value!r}") from None
        return s
    if t is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} is a boolean, got {value!r}")
    if t is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key} is an integer, got {value!r}")
    if t is float and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ConfigError(f"{key} is a number, got {value!r}")
    if t is float:
        return float(value)
    if t is str and not isinstance(value, str):
        raise ConfigError(f"{key} is a string, got {value!r}")
    return value


def from_dict(d: Mapping[str, Any], where: str = "config") -> TrainConfig:
    unknown = [k for k in d if k not in _FIELDS]
    if unknown:
        raise _unknown(unknown, where)
    return TrainConfig(**{k: _coerce(k, v) for k, v in d.items()})


def run_config_names() -> list[str]:
    return sorted(p.stem for p in TRAIN_CONFIG_DIR.glob("*.json"))


def load_config(name_or_file: str | os.PathLike) -> TrainConfig:
    """A run config by name (`configs/train/NAME.json`) or JSON file path."""
    p = Path(name_or_file)
    if not p.is_file():
        p = TRAIN_CONFIG_DIR / f"{name_or_file}.json"
    if not p.is_file():
        raise ConfigError(
            f"no run config {str(name_or_file)!r} (not a file); named configs: "
            + ", ".join(run_config_names())
        )
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: a run config is a JSON object of keys")
    return from_dict(d, where=str(p))


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """`key=value` strings applied in order."""
    kw: dict[str, Any] = {}
    unknown = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        k, v = item.split("=", 1)
        k = k.strip()
        if k not in _FIELDS:
            unknown.append(k)
            continue
        kw[k] = _coerce(k, v)
    if unknown:
        raise _unknown(unknown, "overrides")
    return cfg.replace(**kw)


def resolve(name_or_file: str, overrides: Sequence[str] = ()) -> TrainConfig:
    """load_config + apply_overrides + validate."""
    return apply_overrides(load_config(name_or_file), overrides).validate()
