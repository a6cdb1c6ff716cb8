"""SAM 2 prompt encoder (official `sam2.modeling.sam.prompt_encoder.PromptEncoder`), NHWC.

SAM 2 always passes boxes as two corner points (labels 2 and 3, prepended to the clicks) and
never uses the `boxes` argument of the official encoder, so this port has points and masks only.

Batching prompts of different sizes: pad each row's points with label -1 (which embeds as
`not_a_point_embed`, exactly like the one pad point the official code appends) and keep a
validity mask `valid [B, N]`. Because padded tokens still take part in the decoder's attention,
the mask decoder must be given `token_valid = PromptEncoder.sparse_valid(valid, pad)`; with it a
padded batch reproduces one-prompt-at-a-time results (tests/sam2/test_prompt_encoder.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pam_jax.sam2.common import gelu
from pam_jax.sam2.position_encoding import PositionEmbeddingRandom
from pam_jax.sam2.two_way_transformer import layer_norm

# LayerNorm2d in sam2_utils uses eps 1e-6 (channel-last LayerNorm in NHWC).
LN2D_EPS = 1e-6


def conv2d(
    din: int, dout: int, kernel: int, stride: int, rngs: nnx.Rngs, *, padding: int = 0, dtype=None
) -> nnx.Conv:
    """nnx.Conv with torch's explicit padding and logical axis names (HWIO kernel)."""
    return nnx.Conv(
        din, dout, kernel_size=(kernel, kernel), strides=(stride, stride),
        padding=((padding, padding), (padding, padding)), dtype=dtype, rngs=rngs,
        kernel_metadata={"out_sharding": ("conv_h", "conv_w", "conv_in", "conv_out")},
        bias_metadata={"out_sharding": ("conv_out",)},
    )  # fmt: skip


def embed(num: int, dim: int, rngs: nnx.Rngs, dtype=None) -> nnx.Embed:
    """nnx.Embed for learned tokens (torch nn.Embedding): embedding [num, dim]."""
    return nnx.Embed(
        num, dim, dtype=dtype, rngs=rngs,
        embedding_metadata={"out_sharding": ("tokens", "vis_embed")},
    )  # fmt: skip


class PromptEncoder(nnx.Module):
    """Official `PromptEncoder` (points incl. box corners, and mask prompts).

    Parameter paths equal the torch keys: `pe_layer.positional_encoding_gaussian_matrix`,
    `point_embeddings.{0..3}`, `not_a_point_embed`, `no_mask_embed`,
    `mask_downscaling.{0,1,3,4,6}` (an nnx.List with `None` at the GELU slots 2 and 5 so the
    indices match torch's nn.Sequential).
    """

    num_point_embeddings = 4  # negative / positive click, box top-left / bottom-right

    def __init__(
        self,
        embed_dim: int = 256,
        image_embedding_size: tuple[int, int] = (64, 64),
        input_image_size: tuple[int, int] = (1024, 1024),
        mask_in_chans: int = 16,
        *,
        rngs: nnx.Rngs,
        dtype=None,
    ):
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.dtype = dtype
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2, rngs=rngs)
        self.point_embeddings = nnx.List(
            [embed(1, embed_dim, rngs) for _ in range(self.num_point_embeddings)]
        )
        self.not_a_point_embed = embed(1, embed_dim, rngs)
        c = mask_in_chans
        self.mask_downscaling = nnx.List(
            [
                conv2d(1, c // 4, 2, 2, rngs, dtype=dtype),
                layer_norm(c // 4, LN2D_EPS, rngs, dtype),
                None,  # GELU
                conv2d(c // 4, c, 2, 2, rngs, dtype=dtype),
                layer_norm(c, LN2D_EPS, rngs, dtype),
                None,  # GELU
                conv2d(c, embed_dim, 1, 1, rngs, dtype=dtype),
            ]
        )
        self.no_mask_embed = embed(1, embed_dim, rngs)

    def get_dense_pe(self) -> jax.Array:
        """Positional encoding of the image-embedding grid: [1, h, w, embed_dim]."""
        return self.pe_layer(self.image_embedding_size)[None]

    @staticmethod
    def sparse_valid(
        valid: jax.Array, pad: bool = True, pad_valid: jax.Array | None = None
    ) -> jax.Array:
        """Token validity [B, N (+1)] of the sparse output for point validity `valid` [B, N].

        The appended official pad point is a real token (the official decoder attends to it)
        unless pad_valid [B] says otherwise (rows with no points at all have no tokens).
        """
        valid = jnp.asarray(valid, bool)
        if pad:
            b = valid.shape[0]
            last = jnp.ones((b,), bool) if pad_valid is None else jnp.asarray(pad_valid, bool)
            valid = jnp.concatenate([valid, last[:, None]], axis=1)
        return valid

    def _embed_points(self, coords: jax.Array, labels: jax.Array, pad: bool) -> jax.Array:
        coords = coords.astype(jnp.float32) + 0.5  # pixel centres; the pad point is not shifted
        labels = labels.astype(jnp.int32)
        if pad:
            b = coords.shape[0]
            coords = jnp.concatenate([coords, jnp.zeros((b, 1, 2), jnp.float32)], axis=1)
            labels = jnp.concatenate([labels, -jnp.ones((b, 1), jnp.int32)], axis=1)
        pe = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        table = jnp.concatenate([e.embedding[...] for e in self.point_embeddings], axis=0)
        # one-hot select (exact: one term plus zeros); labels outside 0..3 add nothing, as in torch
        onehot = (labels[..., None] == jnp.arange(self.num_point_embeddings)).astype(pe.dtype)
        emb = pe + onehot @ table
        return jnp.where((labels == -1)[..., None], self.not_a_point_embed.embedding[0], emb)

    def _embed_masks(self, masks: jax.Array) -> jax.Array:
        x = masks
        for layer in self.mask_downscaling:
            x = gelu(x) if layer is None else layer(x)
        return x

    def __call__(
        self,
        coords: jax.Array | None,
        labels: jax.Array | None,
        masks: jax.Array | None = None,
        *,
        has_mask: jax.Array | None = None,
        pad: bool = True,
    ) -> tuple[jax.Array, jax.Array]:
        """Embed prompts.

        coords [B, N, 2] (x, y) in input-image pixels (`input_image_size`), labels [B, N] int
        (-1 padding / not a point, 0 negative, 1 positive, 2/3 box corners); masks
        [B, 4h, 4w, 1] mask-prompt logits or None; has_mask [B] bool chooses per row between the
        mask embedding and `no_mask_embed` (rows without a mask may hold anything in `masks`);
        `pad` appends the official (0, 0) / -1 point (SAM 2 always does, as it never passes
        boxes separately).

        Returns (sparse [B, N + pad, C], dense [B, h, w, C]).
        """
        if coords is not None:
            sparse = self._embed_points(coords, labels, pad)
            bs = coords.shape[0]
        else:
            bs = masks.shape[0] if masks is not None else 1
            sparse = jnp.zeros((bs, 0, self.embed_dim), jnp.float32)
        h, w = self.image_embedding_size
        no_mask = jnp.broadcast_to(self.no_mask_embed.embedding[0], (bs, h, w, self.embed_dim))
        if masks is None:
            dense = no_mask
        else:
            dense = self._embed_masks(masks)
            if has_mask is not None:
                dense = jnp.where(jnp.asarray(has_mask, bool)[:, None, None, None], dense, no_mask)
        if self.dtype is not None:
            sparse, dense = sparse.astype(self.dtype), dense.astype(self.dtype)
        return sparse, dense
