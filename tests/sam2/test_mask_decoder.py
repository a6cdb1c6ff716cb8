"""Parity of pam_jax.sam2 two-way transformer and mask decoder with the official SAM 2 modules.

Reference: `sam_mask_decoder` / `sam_prompt_encoder` of the official SAM 2.1-tiny built at
image_size 512 (the decoder is size-agnostic given its 32x32 feature map), every parameter
perturbed, converted with the generic torch->NNX converter. float32 on CPU.

Tolerances: tokens / image embeddings are LayerNorm outputs of O(1) (|x| up to ~5); mask
logits here reach |x| ~ 3.5. All differences are float32 summation order (torch SDPA vs einsum
softmax, torch conv vs XLA conv); measured max |diff| <= 2e-6 on every output, so 2e-5 absolute
(10x margin) for everything.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from pam_jax.convert.torch_nnx import nnx_to_torch_state, torch_to_nnx_params
from torch_ref import build_official_sam2, perturb_, to_np

from pam_jax.checkpoint import assign_params
from pam_jax.sam2.config import sam2_config
from pam_jax.sam2.mask_decoder import MaskDecoder
from pam_jax.sam2.prompt_encoder import PromptEncoder
from pam_jax.sam2.two_way_transformer import TwoWayTransformer
from pam_jax.sharding import unannotated_params

IMAGE_SIZE = 512
H = IMAGE_SIZE // 16
ATOL = 2e-5  # O(1) tokens / embeddings
ATOL_LOGITS = 2e-5  # mask logits, |x| up to ~3.5


def _convert(ours, ref_module, what):
    sd = {k: to_np(v) for k, v in ref_module.state_dict().items()}
    assign_params(ours, torch_to_nnx_params(ours, sd, what=what))


@pytest.fixture(scope="module")
def models():
    sam = build_official_sam2("t", "2.1", image_size=IMAGE_SIZE)
    cfg = sam2_config("t", "2.1", image_size=IMAGE_SIZE)
    dec = MaskDecoder.from_config(cfg, rngs=nnx.Rngs(0))
    _convert(dec, sam.sam_mask_decoder, "mask decoder")
    pe = PromptEncoder(256, (H, H), (IMAGE_SIZE, IMAGE_SIZE), 16, rngs=nnx.Rngs(1))
    _convert(pe, sam.sam_prompt_encoder, "prompt encoder")
    return sam.sam_prompt_encoder, sam.sam_mask_decoder, pe, dec


def _nhwc(x):
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def _inputs(seed, b_img=1):
    """Image embedding and high-res features (as after conv_s0 / conv_s1), NCHW numpy."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((b_img, 256, H, H)).astype(np.float32)
    s0 = rng.standard_normal((b_img, 32, 4 * H, 4 * H)).astype(np.float32)
    s1 = rng.standard_normal((b_img, 64, 2 * H, 2 * H)).astype(np.float32)
    return img, s0, s1


def _prompts(seed, b, n):
    rng = np.random.default_rng(seed)
    coords = rng.uniform(0, IMAGE_SIZE, size=(b, n, 2)).astype(np.float32)
    labels = rng.integers(0, 2, size=(b, n)).astype(np.int64)
    return coords, labels


def _ref_run(ref_pe, ref_dec, img, s0, s1, coords, labels, multimask, masks=None):
    """Official prompt encoder + decoder, capturing the transformer output (PAM's taps)."""
    captured = {}
    hook = ref_dec.transformer.register_forward_hook(
        lambda mod, inp, out: captured.update(hs=out[0], src=out[1])
    )
    try:
        with torch.no_grad():
            sparse, dense = ref_pe(
                (torch.from_numpy(coords), torch.from_numpy(labels)), None,
                None if masks is None else torch.from_numpy(masks),
            )  # fmt: skip
            out = ref_dec(
                torch.from_numpy(img), ref_pe.get_dense_pe(), sparse, dense,
                multimask_output=multimask, repeat_image=img.shape[0] != coords.shape[0],
                high_res_features=[torch.from_numpy(s0), torch.from_numpy(s1)],
            )  # fmt: skip
            # PAM's mid tokens: recompute all 4 masks / IoUs the official way (predict_masks)
            all_masks, all_iou, mask_tokens, _ = ref_dec.predict_masks(
                torch.from_numpy(img), ref_pe.get_dense_pe(), sparse, dense,
                repeat_image=img.shape[0] != coords.shape[0],
                high_res_features=[torch.from_numpy(s0), torch.from_numpy(s1)],
            )  # fmt: skip
    finally:
        hook.remove()
    b = coords.shape[0]
    stab = ref_dec._get_stability_scores(all_masks[:, 0:1])[:, 0]
    best = torch.argmax(all_iou[:, 1:], dim=-1) + 1
    sel = torch.where(stab >= ref_dec.dynamic_multimask_stability_thresh, 0, best)
    chosen = mask_tokens[torch.arange(b), sel][:, None]
    mid_tokens = mask_tokens[:, 1:] if multimask else torch.cat([chosen, mask_tokens[:, 0:1]], 1)
    return dict(
        masks=to_np(out[0]), iou_pred=to_np(out[1]), sam_tokens_out=to_np(out[2]),
        object_score_logits=to_np(out[3]),
        mid_image_embed=to_np(captured["src"]).reshape(b, H, H, 256),
        mid_mask_tokens=to_np(mid_tokens), stability=to_np(stab), all_masks=to_np(all_masks),
    )  # fmt: skip


def _ours_run(pe, dec, img, s0, s1, coords, labels, multimask, masks=None, **kw):
    sparse, dense = pe(coords, labels, None if masks is None else _nhwc(masks))
    return dec(
        _nhwc(img), pe.get_dense_pe(), sparse, dense, multimask,
        repeat_image=img.shape[0] != coords.shape[0],
        high_res_features=(_nhwc(s0), _nhwc(s1)), **kw,
    )  # fmt: skip


def _assert_close(got, want, keys=None):
    for k in keys or got._fields:
        tol = ATOL_LOGITS if k == "masks" else ATOL
        g = np.asarray(getattr(got, k))
        assert g.shape == want[k].shape, (k, g.shape, want[k].shape)
        np.testing.assert_allclose(g, want[k], atol=tol, rtol=0, err_msg=k)


def test_two_way_transformer_with_mask():
    """Standalone transformer parity, and key masking == dropping the masked tokens."""
    from sam2.modeling.sam.transformer import TwoWayTransformer as RefTWT

    torch.manual_seed(0)
    ref = RefTWT(2, 256, 8, 2048).eval()
    perturb_(ref)
    ours = TwoWayTransformer(2, 256, 8, 2048, rngs=nnx.Rngs(0))
    _convert(ours, ref, "two-way transformer")
    assert unannotated_params(ours) == []
    rng = np.random.default_rng(0)
    img = rng.standard_normal((2, 256, 12, 10)).astype(np.float32)
    pe = rng.standard_normal((1, 256, 12, 10)).astype(np.float32)
    pts = rng.standard_normal((2, 7, 256)).astype(np.float32)
    with torch.no_grad():
        t_img, t_pe = torch.from_numpy(img), torch.from_numpy(pe).expand(2, -1, -1, -1)
        wq, wk = ref(t_img, t_pe, torch.from_numpy(pts))
        wq5, wk5 = ref(t_img[1:], t_pe[1:], torch.from_numpy(pts[1:, :5]))
    gq, gk = ours(_nhwc(img), _nhwc(pe), pts)
    np.testing.assert_allclose(np.asarray(gq), to_np(wq), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(gk), to_np(wk), atol=ATOL, rtol=0)
    # row 1 with its last 2 tokens masked == the official run on its first 5 tokens
    mask = np.ones((2, 7), bool)
    mask[1, 5:] = False
    mq, mk = ours(_nhwc(img), _nhwc(pe), pts, mask)
    np.testing.assert_allclose(np.asarray(mq[1, :5]), to_np(wq5)[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(mk[1]), to_np(wk5)[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(mq[0]), to_np(wq)[0], atol=ATOL, rtol=0)


def test_param_paths_and_annotations(models):
    _, ref_dec, _, dec = models
    assert set(nnx_to_torch_state(dec)) == set(ref_dec.state_dict())
    assert unannotated_params(dec) == []


@pytest.mark.parametrize("multimask", [True, False])
def test_decoder_points(models, multimask):
    ref_pe, ref_dec, pe, dec = models
    img, s0, s1 = _inputs(0)
    coords, labels = _prompts(1, 3, 2)  # 3 prompt sets on one image (repeat_image)
    want = _ref_run(ref_pe, ref_dec, img, s0, s1, coords, labels, multimask)
    got = _ours_run(pe, dec, img, s0, s1, coords, labels, multimask)
    assert np.abs(want["masks"]).max() > 1.0  # logits are not all tiny
    _assert_close(got, want)


def test_decoder_box_and_mask_prompt(models):
    """A box (as corner points) plus a click, and a mask prompt, per-image batch (no repeat)."""
    ref_pe, ref_dec, pe, dec = models
    img, s0, s1 = _inputs(2, b_img=2)
    rng = np.random.default_rng(3)
    box = np.sort(rng.uniform(0, IMAGE_SIZE, size=(2, 2, 2)).astype(np.float32), axis=1)
    click, click_lab = _prompts(4, 2, 1)
    coords = np.concatenate([box, click], axis=1)
    labels = np.concatenate([np.tile([[2, 3]], (2, 1)), click_lab], axis=1)
    masks = (4 * rng.standard_normal((2, 1, 4 * H, 4 * H))).astype(np.float32)
    for multimask in (True, False):
        want = _ref_run(ref_pe, ref_dec, img, s0, s1, coords, labels, multimask, masks)
        got = _ours_run(pe, dec, img, s0, s1, coords, labels, multimask, masks)
        _assert_close(got, want)


def test_dynamic_stability_both_branches(models):
    """Single-mask output with the stability fallback taking each branch in one batch.

    Random weights give arbitrary stability scores, so the threshold is set (on both models)
    between the scores of two rows: one row keeps mask 0, the other falls back to the best-IoU
    multimask output. The mid tokens (PAM tap) follow the same selection.
    """
    ref_pe, ref_dec, pe, dec = models
    img, s0, s1 = _inputs(5)
    coords, labels = _prompts(6, 4, 1)
    probe = _ref_run(ref_pe, ref_dec, img, s0, s1, coords, labels, False)
    stab = probe["stability"]
    assert len(np.unique(stab)) > 1, stab
    thresh = float(np.sort(stab)[len(stab) // 2])  # rows at or above are "stable"
    old_ref, old_ours = (
        ref_dec.dynamic_multimask_stability_thresh,
        dec.dynamic_multimask_stability_thresh,
    )
    ref_dec.dynamic_multimask_stability_thresh = thresh
    dec.dynamic_multimask_stability_thresh = thresh
    try:
        want = _ref_run(ref_pe, ref_dec, img, s0, s1, coords, labels, False)
        stable = stab >= thresh
        assert stable.any() and not stable.all()
        # the fallback really changed the unstable rows' output
        assert not np.allclose(want["masks"][~stable, 0], want["all_masks"][~stable, 0])
        got = _ours_run(pe, dec, img, s0, s1, coords, labels, False)
        _assert_close(got, want)
        np.testing.assert_allclose(
            np.asarray(dec.stability_scores(got.masks[:, 0]))[stable], stab[stable], atol=1e-3
        )  # a pixel at +-delta may flip
        # PAM: masks are the single-mask output whatever the stability (dynamic off for masks)
        pam = _ours_run(pe, dec, img, s0, s1, coords, labels, False, dynamic_multimask=False)
        np.testing.assert_allclose(
            np.asarray(pam.masks[:, 0]), want["all_masks"][:, 0], atol=ATOL_LOGITS, rtol=0
        )
        np.testing.assert_allclose(
            np.asarray(pam.mid_mask_tokens), want["mid_mask_tokens"], atol=ATOL, rtol=0
        )
    finally:
        ref_dec.dynamic_multimask_stability_thresh = old_ref
        dec.dynamic_multimask_stability_thresh = old_ours


def test_batched_padded_prompts_equal_one_at_a_time(models):
    """Prompts with 1, 3 and 2 points in one padded batch (label -1 + token_valid) equal the
    official results of each prompt alone."""
    ref_pe, ref_dec, pe, dec = models
    img, s0, s1 = _inputs(7)
    sizes = [1, 3, 2]
    n = max(sizes)
    coords = np.zeros((3, n, 2), np.float32)
    labels = -np.ones((3, n), np.int64)
    valid = np.zeros((3, n), bool)
    rows = [_prompts(10 + i, 1, k) for i, k in enumerate(sizes)]
    for i, (c, lab) in enumerate(rows):
        coords[i, : sizes[i]], labels[i, : sizes[i]], valid[i, : sizes[i]] = c[0], lab[0], True
    for multimask in (True, False):
        got = _ours_run(
            pe,
            dec,
            img,
            s0,
            s1,
            coords,
            labels,
            multimask,
            token_valid=PromptEncoder.sparse_valid(valid),
        )
        # without the validity mask the padded rows differ (the padding tokens are attended)
        unmasked = _ours_run(pe, dec, img, s0, s1, coords, labels, multimask)
        assert np.abs(np.asarray(unmasked.masks[0]) - np.asarray(got.masks[0])).max() > 1e-3
        for i, (c, lab) in enumerate(rows):
            want = _ref_run(ref_pe, ref_dec, img, s0, s1, c, lab, multimask)
            one = type(got)(*(x[i : i + 1] for x in got))
            _assert_close(one, want)


def test_jit_equals_eager_and_bf16(models):
    ref_pe, ref_dec, pe, dec = models
    img, s0, s1 = _inputs(8)
    coords, labels = _prompts(9, 2, 2)
    valid = np.array([[True, True], [True, False]])

    @nnx.jit(static_argnums=(6,))
    def run(pe, dec, img, s0, s1, coords_labels, multimask, valid):
        c, lab = coords_labels
        sparse, dense = pe(c, lab)
        return dec(
            img,
            pe.get_dense_pe(),
            sparse,
            dense,
            multimask,
            True,
            (s0, s1),
            PromptEncoder.sparse_valid(valid),
        )

    args = (_nhwc(img), _nhwc(s0), _nhwc(s1), (coords, labels))
    for multimask in (True, False):
        jitted = run(pe, dec, *args, multimask, valid)
        sparse, dense = pe(coords, labels)
        eager = dec(
            args[0],
            pe.get_dense_pe(),
            sparse,
            dense,
            multimask,
            True,
            (args[1], args[2]),
            PromptEncoder.sparse_valid(valid),
        )
        for k in eager._fields:
            tol = ATOL_LOGITS if k == "masks" else ATOL
            np.testing.assert_allclose(
                np.asarray(getattr(jitted, k)),
                np.asarray(getattr(eager, k)),
                atol=tol,
                rtol=0,
                err_msg=k,
            )
    # bf16 compute: same shapes, float32 logits, close to float32 at bf16 precision
    cfg = sam2_config("t", "2.1", image_size=IMAGE_SIZE)
    dec16 = MaskDecoder.from_config(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    nnx.update(dec16, nnx.state(dec))
    sparse, dense = pe(coords, labels)
    o16 = dec16(args[0], pe.get_dense_pe(), sparse, dense, True, True, (args[1], args[2]))
    o32 = dec(args[0], pe.get_dense_pe(), sparse, dense, True, True, (args[1], args[2]))
    assert o16.masks.dtype == jnp.float32 and o16.mid_image_embed.dtype == jnp.bfloat16
    # bf16 (8 mantissa bits) through ~20 layers: a few percent of the logit range
    scale = float(np.abs(np.asarray(o32.masks)).max())
    assert np.abs(np.asarray(o16.masks) - np.asarray(o32.masks)).max() < 0.1 * scale


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_few_token_attention_equals_plain(dtype, monkeypatch):
    """`Attention`'s few-token paths (tokens folded into the projections) against the plain
    form, both directions, a shared (batch 1) and a per-prompt image, masked tokens and masked
    image positions. float32: the same products in another order, within 1e-5 of outputs ~5;
    bf16: within one bf16 step of the output's magnitude (1/32 at 4-8)."""
    import jax

    from pam_jax.sam2.two_way_transformer import Attention

    att = Attention(64, 8, downsample_rate=2, rngs=nnx.Rngs(0), dtype=dtype)
    for i, lin in enumerate((att.q_proj, att.k_proj, att.v_proj, att.out_proj)):
        lin.bias[...] = jax.random.normal(jax.random.key(10 + i), lin.bias.shape)
    img1 = jax.random.normal(jax.random.key(1), (1, 256, 64))
    img = jax.random.normal(jax.random.key(2), (3, 256, 64))
    tok = jax.random.normal(jax.random.key(3), (3, 7, 64))
    tok_valid = jnp.arange(7)[None] < jnp.array([[7], [5], [6]])
    img_valid = jnp.ones((3, 256), bool).at[1, 100:].set(False)
    calls = [(img1, tok, tok, tok_valid), (tok, img1, img1, None), (tok, img, img, img_valid),
             (img, tok, tok, tok_valid)]  # fmt: skip
    out = {}
    for few in ("32", "0"):
        monkeypatch.setenv("PAM_JAX_FEW_TOKENS", few)
        out[few] = [np.asarray(att(*c).astype(jnp.float32)) for c in calls]
    tol = 1e-5 if dtype is None else 1 / 32
    for a, b in zip(out["32"], out["0"]):
        assert np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max() / 4)
