"""PAM configuration: SAM 2 + Semantic Perceiver + projectors + Qwen2 LLM, JSON round-trippable.

The released models (`Perceive-Anything/PAM-1.5B`, `PAM-3B`) are SAM 2.1 Hiera-L at 1024^2, the
perceiver below (hard-coded in the release) and Qwen2.5-1.5B / 3B-Instruct.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pam_jax.checkpoint import CheckpointError
from pam_jax.llm.config import Qwen2Config, qwen2_5_1_5b, qwen2_5_3b
from pam_jax.sam2.config import SAM2Config, check_fields, sam2_config

# llava/constants.py: the `<image>` placeholder id inside `input_ids` (never a real token).
IMAGE_TOKEN_INDEX = -200


@dataclasses.dataclass(frozen=True)
class PerceiverConfig:
    """`build_vision_resampler` hard-codes these (`Semantic_Perceiver(...)` defaults)."""

    num_sem_tokens: int = 16
    depth: int = 2
    embedding_dim: int = 256  # = SAM 2 d_model = the release's mm_hidden_size
    num_heads: int = 8
    mlp_dim: int = 2048
    channel_downsample_rate: int = 2
    num_mask_tokens: int = 2  # [stability-selected token, single-mask token] from SAM 2


@dataclasses.dataclass(frozen=True)
class PAMConfig:
    sam2: SAM2Config = dataclasses.field(default_factory=lambda: sam2_config("l", "2.1"))
    llm: Qwen2Config = dataclasses.field(default_factory=qwen2_5_3b)
    perceiver: PerceiverConfig = PerceiverConfig()
    mm_projector_type: str = "mlp2x_gelu"
    dense_scale: int = 2  # images and a video's first frame: 2x2 space-to-depth
    sparse_scale: int = 4  # other video frames: 4x4 space-to-depth, then proj 4096 -> 1024
    num_frames: int = 16  # frames of a video fed to the LLM: first + 15 uniformly chosen
    image_token_index: int = IMAGE_TOKEN_INDEX

    def __post_init__(self):
        if self.mm_projector_type != "mlp2x_gelu":
            raise ValueError(
                f"only mlp2x_gelu projectors exist in PAM, got {self.mm_projector_type!r}"
            )
        if self.perceiver.embedding_dim != self.sam2.d_model:
            raise ValueError(
                f"perceiver width {self.perceiver.embedding_dim} != "
                f"SAM 2 d_model {self.sam2.d_model}"
            )

    @property
    def hidden_size(self) -> int:
        return self.llm.hidden_size

    @property
    def mm_hidden_size(self) -> int:
        return self.perceiver.embedding_dim

    @property
    def feat_size(self) -> int:
        return self.sam2.feat_size

    def num_tokens(self, scale: int) -> int:
        """Image tokens per frame after compression (1024 dense / 256 sparse at 1024^2)."""
        return (self.feat_size // scale) ** 2

    @property
    def image_embeds_len(self) -> int:
        """Visual embeddings replacing `<image>` for an image: 1024 + 1 + 16 + 1 = 1042."""
        return self.num_tokens(self.dense_scale) + self.perceiver.num_sem_tokens + 2

    @property
    def video_embeds_len(self) -> int:
        """(1024 + 1 + 16 + 1 + 1) + 15 * (256 + 1 + 16 + 1 + 1) = 5168 for the release."""
        s = self.perceiver.num_sem_tokens + 3
        dense = self.num_tokens(self.dense_scale) + s
        return dense + (self.num_frames - 1) * (self.num_tokens(self.sparse_scale) + s)

    def replace(self, **kw: Any) -> PAMConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sam2": self.sam2.to_dict(),
            "llm": self.llm.to_dict(),
            "perceiver": dataclasses.asdict(self.perceiver),
            "mm_projector_type": self.mm_projector_type,
            "dense_scale": self.dense_scale,
            "sparse_scale": self.sparse_scale,
            "num_frames": self.num_frames,
            "image_token_index": self.image_token_index,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PAMConfig:
        d = dict(d)
        check_fields(cls, d)
        kw: dict[str, Any] = {k: v for k, v in d.items() if k not in ("sam2", "llm", "perceiver")}
        if "sam2" in d:
            kw["sam2"] = SAM2Config.from_dict(d["sam2"])
        if "llm" in d:
            kw["llm"] = Qwen2Config.from_dict(d["llm"])
        if "perceiver" in d:
            kw["perceiver"] = PerceiverConfig(**d["perceiver"])
        return cls(**kw)

    @classmethod
    def from_release(cls, hf: Mapping[str, Any], sam2: SAM2Config | None = None) -> PAMConfig:
        """From the release's `config.json` (a LLaVA-Qwen config: Qwen2 fields + `mm_*` fields)."""
        mt = hf.get("model_type")
        if mt not in ("llava_qwen", "qwen2"):
            raise CheckpointError(
                f"config.json has model_type={mt!r}; a PAM release has 'llava_qwen'"
            )
        ptype = hf.get("mm_projector_type", "mlp2x_gelu")
        if ptype != "mlp2x_gelu":
            raise CheckpointError(f"mm_projector_type={ptype!r} is not PAM's mlp2x_gelu")
        mm_hidden = int(hf.get("mm_hidden_size", 256))
        if mm_hidden != PerceiverConfig.embedding_dim:
            raise CheckpointError(f"mm_hidden_size={mm_hidden}, PAM's perceiver is 256 wide")
        # the LLM half is a plain Qwen2 config under LLaVA's model_type / architecture names
        llm = Qwen2Config.from_hf(
            {**hf, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
        )
        return cls(sam2=sam2 or sam2_config("l", "2.1"), llm=llm)


def pam_1_5b() -> PAMConfig:
    return PAMConfig(llm=qwen2_5_1_5b())


def pam_3b() -> PAMConfig:
    return PAMConfig(llm=qwen2_5_3b())


PRESETS = {"pam-1.5b": pam_1_5b, "pam-3b": pam_3b}
