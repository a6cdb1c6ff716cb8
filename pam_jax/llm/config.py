"""Qwen2 / Qwen2.5 configuration: a frozen dataclass read from (and written to) HF config.json."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pam_jax.checkpoint import CheckpointError

# HF config keys we understand; anything that changes the math and is not supported raises.
_ARCHS = ("Qwen2ForCausalLM",)
# remat policy names (qwen2.REMAT_POLICIES): "none" keeps every activation
REMAT = ("none", "full", "dots", "dots_all")


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (Qwen2 always)
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # training / execution options (not part of the HF config)
    scan_layers: bool = False
    # "none" | "full" | "dots" (save weight-matmul outputs) | "dots_all" (every matmul output)
    remat: str = "none"
    # one-token decode attention: "auto" (Pallas flash-decoding kernel on GPU, XLA elsewhere),
    # "xla", "pallas", or "pallas_interpret" (the Pallas kernel interpreted, for CPU tests)
    decode_attention: str = "auto"

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.decode_attention not in ("auto", "xla", "pallas", "pallas_interpret"):
            raise ValueError(f"unknown decode_attention {self.decode_attention!r}")
        if self.remat not in REMAT:
            raise ValueError(f"remat must be one of {REMAT}, got {self.remat!r}")

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def replace(self, **kw) -> Qwen2Config:
        return dataclasses.replace(self, **kw)

    # ---- serialization -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Qwen2Config:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> Qwen2Config:
        """From an HF `config.json` dict (transformers 4.x or 5.x layouts); strict on the model."""
        mt = hf.get("model_type")
        archs = hf.get("architectures") or []
        if mt != "qwen2" or (archs and not any(a in _ARCHS for a in archs)):
            raise CheckpointError(
                f"config is model_type={mt!r}, architectures={archs}: only Qwen2 / Qwen2.5 "
                f"(model_type 'qwen2', Qwen2ForCausalLM) is supported"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"hidden_act={hf['hidden_act']!r} is not supported (silu only)")
        if hf.get("use_sliding_window", False):
            raise CheckpointError("use_sliding_window=true is not supported")
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
        if rope_type not in (None, "default"):
            raise CheckpointError(f"rope type {rope_type!r} is not supported (default RoPE only)")
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        kw = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            rope_theta=float(theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """An HF Qwen2 config.json dict that transformers 4.x and 5.x both read."""
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }


def qwen2_5_1_5b(**kw) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        rope_theta=1e6,
        tie_word_embeddings=True,
        eos_token_id=151643,
        **kw,
    )


def qwen2_5_3b(**kw) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        rope_theta=1e6,
        tie_word_embeddings=True,
        eos_token_id=151643,
        **kw,
    )


def tiny(**kw) -> Qwen2Config:
    """A test-sized config (every dim divisible by 2 so it shards on a 2x2x2 mesh)."""
    base = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return Qwen2Config(**base)


PRESETS = {"qwen2.5-1.5b": qwen2_5_1_5b, "qwen2.5-3b": qwen2_5_3b, "tiny": tiny}
