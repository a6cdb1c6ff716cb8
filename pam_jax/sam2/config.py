"""SAM 2 / SAM 2.1 configuration: one frozen dataclass tree, JSON round-trippable.

Field names follow the official Hydra configs (`sam2/configs/sam2.1/*.yaml`) so a reader can check
them line by line. Only values that differ between the 8 official checkpoints are parameters of
the presets; everything else is the common default.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass(frozen=True)
class HieraConfig:
    embed_dim: int = 96
    num_heads: int = 1
    stages: tuple[int, ...] = (1, 2, 7, 2)
    global_att_blocks: tuple[int, ...] = (5, 7, 9)
    window_spec: tuple[int, ...] = (8, 4, 14, 7)
    window_pos_embed_bkg_spatial_size: tuple[int, int] = (7, 7)
    q_pool: int = 3  # number of q-pool stages
    q_stride: tuple[int, int] = (2, 2)
    dim_mul: float = 2.0
    head_mul: float = 2.0
    mlp_ratio: float = 4.0

    @property
    def stage_ends(self) -> list[int]:
        return [sum(self.stages[: i + 1]) - 1 for i in range(len(self.stages))]

    @property
    def q_pool_blocks(self) -> list[int]:
        return [x + 1 for x in self.stage_ends[:-1]][: self.q_pool]

    @property
    def channel_list(self) -> list[int]:
        """Neck input widths, deepest first (the official `backbone_channel_list`)."""
        dims = [int(self.embed_dim * self.dim_mul**i) for i in range(len(self.stages))]
        return dims[::-1]


@dataclasses.dataclass(frozen=True)
class SAM2Config:
    """The whole SAM2Base model. `image_size` may be any multiple of 32 (see `validate`)."""

    name: str = "sam2.1_hiera_t"
    version: str = "2.1"  # "2.0" or "2.1"
    image_size: int = 1024
    hiera: HieraConfig = HieraConfig()
    d_model: int = 256  # neck / decoder width
    mem_dim: int = 64  # memory-encoder output width
    num_maskmem: int = 7
    backbone_stride: int = 16
    # mask decoder
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    dynamic_multimask_via_stability: bool = True  # build_sam2(apply_postprocessing=True)
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98
    # memory / tracking
    sigmoid_scale_for_mem_enc: float = 20.0
    sigmoid_bias_for_mem_enc: float = -10.0
    max_obj_ptrs_in_encoder: int = 16
    memory_attention_layers: int = 4
    # the four flags that distinguish 2.0 from 2.1
    no_obj_embed_spatial: bool = True
    add_tpos_enc_to_obj_ptrs: bool = True
    proj_tpos_enc_in_obj_ptrs: bool = True
    use_signed_tpos_enc_to_obj_ptrs: bool = True

    @property
    def feat_size(self) -> int:
        """Side of the stride-16 feature map (64 at 1024)."""
        return self.image_size // self.backbone_stride

    @property
    def low_res_size(self) -> int:
        """Side of the low-resolution mask logits (256 at 1024)."""
        return self.feat_size * 4

    def validate(self) -> SAM2Config:
        if self.image_size <= 0 or self.image_size % 32:
            raise ValueError(
                f"image_size must be a positive multiple of 32 (the windowed position embedding "
                f"tiles 8x8 windows over the stride-4 map), got {self.image_size}"
            )
        if self.version not in ("2.0", "2.1"):
            raise ValueError(f"version must be '2.0' or '2.1', got {self.version!r}")
        return self

    def replace(self, **kw: Any) -> SAM2Config:
        return dataclasses.replace(self, **kw).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAM2Config:
        d = dict(d)
        check_fields(cls, d)
        h = d.pop("hiera", {})
        if isinstance(h, dict):
            h = HieraConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in h.items()})
        return cls(hiera=h, **d).validate()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def check_fields(cls: type, d: Any) -> None:
    """ValueError naming the keys of `d` that are not fields of dataclass `cls` (the config
    classes' `from_dict`)."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")


HIERA = {
    "t": HieraConfig(96, 1, (1, 2, 7, 2), (5, 7, 9), (8, 4, 14, 7), (7, 7)),
    "s": HieraConfig(96, 1, (1, 2, 11, 2), (7, 10, 13), (8, 4, 14, 7), (7, 7)),
    "b+": HieraConfig(112, 2, (2, 3, 16, 3), (12, 16, 20), (8, 4, 14, 7), (14, 14)),
    "l": HieraConfig(144, 2, (2, 6, 36, 4), (23, 33, 43), (8, 4, 16, 8), (7, 7)),
}
SIZE_NAMES = {"t": "tiny", "s": "small", "b+": "base_plus", "l": "large"}


def sam2_config(size: str, version: str = "2.1", image_size: int = 1024) -> SAM2Config:
    """Preset for one of the 8 official checkpoints: size in t/s/b+/l (or tiny/small/...)."""
    size = {v: k for k, v in SIZE_NAMES.items()}.get(size, size)
    if size not in HIERA:
        raise ValueError(
            f"unknown SAM 2 size {size!r}; expected one of {list(SIZE_NAMES.values())}"
        )
    v21 = version == "2.1"
    prefix = "sam2.1" if v21 else "sam2"
    return SAM2Config(
        name=f"{prefix}_hiera_{size.replace('b+', 'b+')}",
        version=version,
        image_size=image_size,
        hiera=HIERA[size],
        no_obj_embed_spatial=v21,
        add_tpos_enc_to_obj_ptrs=v21,
        proj_tpos_enc_in_obj_ptrs=v21,
        use_signed_tpos_enc_to_obj_ptrs=v21,
    ).validate()


# The 8 official checkpoints, by the file names Meta publishes.
OFFICIAL = {
    f"{p}_hiera_{n}": (s, v)
    for s, n in (("t", "tiny"), ("s", "small"), ("b+", "base_plus"), ("l", "large"))
    for p, v in (("sam2", "2.0"), ("sam2.1", "2.1"))
}
