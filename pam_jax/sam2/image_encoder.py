"""SAM 2 image encoder = Hiera trunk + FPN neck (`sam2.modeling.backbones.image_encoder`), NHWC."""

from __future__ import annotations

import jax
from flax import nnx

from pam_jax.sam2.config import SAM2Config
from pam_jax.sam2.hiera import Hiera
from pam_jax.sam2.neck import FpnNeck


class ImageEncoder(nnx.Module):
    """`trunk` + `neck`, scalp=1 (the stride-32 level is computed for the top-down path, then
    dropped), as in every official SAM 2 / 2.1 config."""

    def __init__(self, cfg: SAM2Config, *, rngs: nnx.Rngs, dtype=None, scalp: int = 1):
        self.trunk = Hiera(cfg.hiera, rngs=rngs, dtype=dtype)
        self.neck = FpnNeck(cfg.d_model, cfg.hiera.channel_list, rngs=rngs, dtype=dtype)
        self.scalp = scalp

    def __call__(self, image: jax.Array) -> dict[str, jax.Array | list[jax.Array]]:
        """image [B, H, W, 3] normalized, H, W multiples of 32 ->
        vision_features [B, H/16, W/16, d_model]; vision_pos_enc and backbone_fpn: 3 maps
        [B, H/s, W/s, d_model] for s = 4, 8, 16."""
        features, pos = self.neck(self.trunk(image))
        if self.scalp > 0:
            features, pos = features[: -self.scalp], pos[: -self.scalp]
        return {"vision_features": features[-1], "vision_pos_enc": pos, "backbone_fpn": features}
