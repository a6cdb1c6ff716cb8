"""Parity of pam_jax.pam.perceiver.SemanticPerceiver with the release's Semantic_Perceiver.

The reference is assembled here from the official `sam2` package's blocks (the release's own
`TwoWayAttentionBlock` / `Attention` in `sem_perceiver.py` / `modules.py` are line-for-line
copies of them with the same parameter names) and mirrors the release's `forward`, including its
`keys.reshape(bs, -1, h, w)` + InternVL `pixel_shuffle` compression. Real release sizes
(64x64x256 image embedding, 2 mask tokens, 16 semantic tokens), every parameter and the Fourier
buffer perturbed, weights moved by the real generic converter.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from pam_jax.convert.torch_nnx import torch_to_nnx_params
from sam2.modeling.position_encoding import PositionEmbeddingRandom
from sam2.modeling.sam.transformer import Attention, TwoWayAttentionBlock
from torch import nn
from torch_ref import perturb_, to_np

from pam_jax.checkpoint import assign_params
from pam_jax.pam.perceiver import SemanticPerceiver
from pam_jax.sharding import unannotated_params

# float32 on both sides; the outputs pass 2 two-way blocks (softmax over 4096 keys, 4 LayerNorms
# per block) and, for the sparse path, a 4096-wide Linear: accumulation-order differences of
# float32 matmuls (measured max 5e-6). 3e-5 absolute on O(1) (LayerNorm-scaled) values.
ATOL = 3e-5


def release_pixel_shuffle(x, scale_factor=0.5):
    """The release's `sem_perceiver.pixel_shuffle` (InternVL), copied op for op."""
    b, c, h, w = x.size()
    x = x.view(b, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(
        b, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor))
    )
    return x.permute(0, 3, 1, 2).contiguous()


class TorchSemanticPerceiver(nn.Module):
    """The release's `Semantic_Perceiver` built from official sam2 blocks."""

    def __init__(
        self,
        num_sem_tokens=16,
        depth=2,
        embedding_dim=256,
        num_heads=8,
        mlp_dim=2048,
        channel_downsample_rate=2,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim,
                num_heads,
                mlp_dim,
                nn.ReLU,
                channel_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.pe_layer = PositionEmbeddingRandom(embedding_dim // 2)
        self.sem_tokens = nn.Embedding(num_sem_tokens, embedding_dim)
        self.proj = nn.Linear(embedding_dim * 16, embedding_dim * 4)
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=channel_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding, point_embedding, scale_factor):
        bs, c, h, w = image_embedding.shape
        image_embedding = image_embedding.flatten(2).permute(0, 2, 1)
        bs, mp_t, _ = point_embedding.shape
        sem_tokens = self.sem_tokens.weight.unsqueeze(0).expand(bs, -1, -1)
        queries = torch.cat((point_embedding, sem_tokens), dim=1)
        keys = image_embedding
        tokens_pe = queries
        for layer in self.layers:
            image_pe = self.pe_layer((h, w)).unsqueeze(0).flatten(2).permute(0, 2, 1)
            queries, keys = layer(queries=queries, keys=keys, query_pe=tokens_pe, key_pe=image_pe)
        q = queries + tokens_pe
        k = keys + image_pe
        queries = queries + self.final_attn_token_to_image(q=q, k=k, v=keys)
        queries = self.norm_final_attn(queries)
        keys = keys.reshape(bs, -1, h, w)  # the release's transpose-free reshape
        if scale_factor == 1 / 2:
            keys = release_pixel_shuffle(keys, 1 / 2).flatten(2).permute(0, 2, 1)
        else:
            keys = release_pixel_shuffle(keys, 1 / 4).flatten(2).permute(0, 2, 1)
            keys = self.proj(keys)
        return queries[:, mp_t:, :], keys


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ref = TorchSemanticPerceiver().eval()
    perturb_(ref, seed=1)
    model = SemanticPerceiver(rngs=nnx.Rngs(0))
    sd = {k: to_np(v) for k, v in ref.state_dict().items()}
    assert "pe_layer.positional_encoding_gaussian_matrix" in sd  # the buffer is checkpointed
    assign_params(model, torch_to_nnx_params(model, sd, what="perceiver"))
    return ref, model


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(2)
    img = torch.randn(2, 256, 64, 64, generator=g)
    tok = torch.randn(2, 2, 256, generator=g)
    return img, tok


@pytest.mark.parametrize("scale", [2, 4])
def test_perceiver_parity(pair, inputs, scale):
    ref, model = pair
    img, tok = inputs
    with torch.no_grad():
        want_sem, want_img = ref(img, tok, 1 / scale)
    fwd = nnx.jit(lambda m, x, t: m(x, t, scale))
    got_sem, got_img = fwd(
        model, jnp.asarray(to_np(img).transpose(0, 2, 3, 1)), jnp.asarray(to_np(tok))
    )
    n = 1024 if scale == 2 else 256
    assert got_sem.shape == (2, 16, 256)
    assert got_img.shape == (2, n, 1024)
    err_sem = np.abs(np.asarray(got_sem) - to_np(want_sem)).max()
    err_img = np.abs(np.asarray(got_img) - to_np(want_img)).max()
    print(f"scale {scale}: max |sem err| {err_sem:.2e}, max |img err| {err_img:.2e}")
    np.testing.assert_allclose(np.asarray(got_sem), to_np(want_sem), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(got_img), to_np(want_img), atol=ATOL, rtol=0)


def test_perceiver_encode_shared_by_both_scales(pair, inputs):
    """A video runs the transformer once on all frames and compresses per frame; same result."""
    _, model = pair
    img, tok = inputs
    x = jnp.asarray(to_np(img).transpose(0, 2, 3, 1))
    t = jnp.asarray(to_np(tok))
    sem, keys = model.encode(x, t)
    for s in (2, 4):
        s2, i2 = model(x, t, s)
        np.testing.assert_array_equal(np.asarray(sem), np.asarray(s2))
        np.testing.assert_array_equal(np.asarray(model.compress(keys, s)), np.asarray(i2))


def test_perceiver_release_key_names_and_count(pair):
    ref, model = pair
    from pam_jax.convert.torch_nnx import nnx_to_torch_state

    ours = nnx_to_torch_state(model)
    assert set(ours) == set(ref.state_dict())
    # pam.md 1.4: 7,490,688 trainable parameters, plus the 2x128 Fourier buffer
    assert sum(int(np.prod(v.shape)) for v in ours.values()) == 7_490_688 + 2 * 128
    assert unannotated_params(model) == []


def test_perceiver_bad_scale(pair, inputs):
    _, model = pair
    with pytest.raises(ValueError, match="scale"):
        model.compress(jnp.zeros((1, 64, 64, 256)), 3)


def test_perceiver_bf16_close(pair, inputs):
    """bf16 compute (the accelerator setting) stays near float32: checks the dtype plumbing."""
    ref, model32 = pair
    img, tok = inputs
    model = SemanticPerceiver(rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    nnx.update(model, nnx.state(model32))
    x = jnp.asarray(to_np(img).transpose(0, 2, 3, 1))
    t = jnp.asarray(to_np(tok))
    s16, i16 = jax.jit(lambda x, t: model(x, t, 2))(x, t)
    s32, i32 = model32(x, t, 2)
    assert s16.dtype == jnp.bfloat16
    # bf16 has 8 mantissa bits: ~1e-2 relative per op, LayerNorm-bounded outputs of O(1)
    assert float(jnp.abs(s16.astype(jnp.float32) - s32).max()) < 0.25
    assert float(jnp.abs(i16.astype(jnp.float32) - i32).max()) < 0.25
