"""PAM's own parameters (perceiver, projectors, newlines) and the visual-embedding path.

`PAMParts` holds exactly the release's PAM-specific tensors, with NNX paths equal to the release
keys minus the leading `model.`:

    vision_resampler.*                  model.vision_resampler.*    (Semantic Perceiver)
    mm_projector_img.{0,2}.*            model.mm_projector_img.{0,2}.*
    mm_projector_semT.{0,2}.*           model.mm_projector_semT.{0,2}.*
    image_newline, semT_newline, frame_newline   model.<same>

It maps SAM 2's tapped tensors (`image_embed` [B, 64, 64, 256] after the mask decoder's two-way
transformer, `mask_tokens` [B, 2, 256]) to the LLM-width visual embeddings that replace
`<image>` (`assembly.py` for the layout).
"""

from __future__ import annotations

import jax
from flax import nnx

from pam_jax.pam import assembly
from pam_jax.pam.config import PAMConfig
from pam_jax.pam.perceiver import SemanticPerceiver
from pam_jax.pam.projector import MLPProjector, newline_param

PARTS = (
    "vision_resampler", "mm_projector_img", "mm_projector_semT",
    "image_newline", "semT_newline", "frame_newline",
)  # fmt: skip


class PAMParts(nnx.Module):
    """The PAM-specific modules. `dtype` is the compute dtype (parameters stay float32)."""

    def __init__(self, config: PAMConfig, *, rngs: nnx.Rngs, dtype=None):
        self.config = config
        p = config.perceiver
        h = config.hidden_size
        self.vision_resampler = SemanticPerceiver(
            p.num_sem_tokens, p.depth, p.embedding_dim, p.num_heads, p.mlp_dim,
            channel_downsample_rate=p.channel_downsample_rate, rngs=rngs, dtype=dtype,
        )  # fmt: skip
        self.mm_projector_img = MLPProjector(4 * p.embedding_dim, h, rngs=rngs, dtype=dtype)
        self.mm_projector_semT = MLPProjector(p.embedding_dim, h, rngs=rngs, dtype=dtype)
        self.image_newline = newline_param(h, rngs)
        self.semT_newline = newline_param(h, rngs)
        self.frame_newline = newline_param(h, rngs)

    def _newlines(self, dt) -> tuple[jax.Array, jax.Array, jax.Array]:
        return tuple(
            v[...].astype(dt) for v in (self.image_newline, self.semT_newline, self.frame_newline)
        )

    def image_visual_embeds(self, image_embed: jax.Array, mask_tokens: jax.Array) -> jax.Array:
        """Per image: image_embed [B, 64, 64, 256], mask_tokens [B, 2, 256] -> [B, 1042, H]."""
        sem, img = self.vision_resampler(image_embed, mask_tokens, self.config.dense_scale)
        img = self.mm_projector_img(img)
        sem = self.mm_projector_semT(sem)
        inl, snl, _ = self._newlines(img.dtype)
        return assembly.image_embeds(img, sem, inl, snl)

    def video_visual_embeds(self, image_embed: jax.Array, mask_tokens: jax.Array) -> jax.Array:
        """One video's chosen frames (`assembly.select_frames`), frame 0 first:
        image_embed [F, 64, 64, 256], mask_tokens [F, 2, 256] -> [5168, H] for F = 16.

        The transformer runs once over all F frames; only the compression differs (frame 0
        dense, others sparse), so no per-frame Python loop.
        """
        vr = self.vision_resampler
        sem, keys = vr.encode(image_embed, mask_tokens)
        dense = self.mm_projector_img(vr.compress(keys[:1], self.config.dense_scale))[0]
        sparse = self.mm_projector_img(vr.compress(keys[1:], self.config.sparse_scale))
        sem = self.mm_projector_semT(sem)
        return assembly.video_embeds(dense, sparse, sem, *self._newlines(dense.dtype))
