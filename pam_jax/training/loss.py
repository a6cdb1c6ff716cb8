"""PAM's training loss on one micro-batch: SAM 2 -> perceiver -> projectors -> spliced LLM
sequence -> next-token cross entropy, returned as sums (never means) so the trainer can
normalise by the supervised tokens of the whole global batch.

The release (`LlavaQwenForCausalLM.forward(labels=...)`, pam.md §8.1): labels are shifted
(position t predicts labels[t + 1]), -100 is ignored, the visual positions are ignored, and the
cross entropy runs over **all** logits of the model's padded vocabulary (151936 for Qwen2.5),
not the tokenizer's length. Its reduction is a token mean per micro-batch, then HF Trainer
weighs micro-batches equally over accumulation steps and GPUs; pam-jax divides the sum of
token NLLs of the global batch by its supervised token count (invariant to mesh and
accumulation).

The LLM runs through `hidden_states_train` (pam_jax.llm: segment-aware attention that never
builds [B, T, T]) and `pam_jax.llm.loss.lm_loss_sums` (vocabulary-chunked cross entropy) when
they exist; until then through the fallbacks below (one function each, switched here only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from pam_jax.pam import assembly
from pam_jax.pam.model import PAM, image_regions
from pam_jax.sam2.video_io import normalize_device

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class LossOptions:
    num_sources: int = 1
    attention: str = "auto"
    chunk: int = 512
    seg_loss: float = 0.0


def llm_hidden(llm, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, attention: str):
    """Final-normed hidden states [B, T, H] for right-padded (or packed) rows."""
    if hasattr(llm, "hidden_states_train"):
        return llm.hidden_states_train(x, positions, segment_ids, attention=attention)
    t = x.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    mask = causal[None] & same & (segment_ids > 0)[:, None, :]
    h, _ = llm.hidden_states(x, positions, mask)
    return h


def _lm_loss_sums_fallback(llm, hidden: jax.Array, labels: jax.Array, *, chunk: int = 512):
    """(nll_sum, n_tokens) of next-token prediction, labels not yet shifted; the sequence is
    cut into chunks whose float32 logits are recomputed in the backward pass."""
    b, t, h = hidden.shape
    tgt = jnp.concatenate([labels[:, 1:], jnp.full((b, 1), IGNORE, labels.dtype)], axis=1)
    c = min(chunk, t)
    pad = (-t) % c
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        tgt = jnp.pad(tgt, ((0, 0), (0, pad)), constant_values=IGNORE)
    n = (t + pad) // c
    hs = hidden.reshape(b, n, c, h).swapaxes(0, 1)
    ts = tgt.reshape(b, n, c).swapaxes(0, 1)

    @jax.checkpoint
    def one(hc, tc):
        logits = llm.logits(hc)  # [B, c, V] float32
        lse = jax.nn.logsumexp(logits, axis=-1)
        ok = tc != IGNORE
        picked = jnp.take_along_axis(logits, jnp.where(ok, tc, 0)[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(ok, lse - picked, 0.0)), jnp.sum(ok.astype(jnp.int32))

    def body(carry, xs):
        s, k = one(*xs)
        return (carry[0] + s, carry[1] + k), None

    (s, k), _ = jax.lax.scan(body, (jnp.float32(0), jnp.int32(0)), (hs, ts))
    return s, k


def lm_loss_sums(llm, hidden: jax.Array, labels: jax.Array, *, chunk: int = 512):
    try:
        from pam_jax.llm.loss import lm_loss_sums as impl
    except ImportError:
        impl = _lm_loss_sums_fallback
    return impl(llm, hidden, labels, chunk=chunk)


def row_loss_sums(llm, hidden, labels, chunk: int):
    """Per-row (nll_sum [B], n_tokens [B])."""
    return jax.vmap(lambda h, lab: lm_loss_sums(llm, h[None], lab[None], chunk=chunk))(
        hidden, labels
    )


def visual_embeds(model: PAM, mb: Mapping[str, jax.Array]) -> jax.Array:
    """[B, V, H] visual embeddings of a micro-batch of image samples (frame 0, one region each).

    SAM 2 is run under stop_gradient unless one of its parts is trained: the perceiver reads
    its decoder taps, so with SAM 2 frozen no backward pass goes through it.
    """
    if mb["pixels"].shape[1] != 1:
        raise NotImplementedError(
            "video samples need the batched video-regions forward (pam_jax.pam.model."
            "video_regions), not available yet: train on image data"
        )
    px = normalize_device(mb["pixels"][:, 0])
    visual, _, _ = image_regions(
        model.sam2, model.parts, px, mb["coords"].astype(jnp.float32), mb["point_labels"],
        mb["point_valid"],
    )  # fmt: skip
    return visual


def micro_batch_sums(model: PAM, mb: Mapping[str, jax.Array], opts: LossOptions):
    """Loss sums of one micro-batch: dict of nll [S] and n [S] per mixture source (S =
    opts.num_sources), plus scalars nll, n, positions (non-padding LLM positions)."""
    visual = visual_embeds(model, mb)
    llm = model.llm
    emb = llm.embed(mb["text_ids"])
    lay = assembly.Layout(
        mb["text_ids"], mb["visual_index"], mb["is_visual"], mb["mask"], mb["positions"], None
    )
    x = assembly.assemble(emb, visual, lay)
    valid_row = mb["example_valid"]
    seg = jnp.where(valid_row[:, None], mb["segment_ids"], 0)
    hidden = llm_hidden(llm, x, mb["positions"], seg, opts.attention)
    labels = jnp.where(valid_row[:, None] & mb["mask"], mb["labels"], IGNORE)
    nll_r, n_r = row_loss_sums(llm, hidden, labels, opts.chunk)
    src = jax.nn.one_hot(mb["source_index"], opts.num_sources, dtype=jnp.float32)
    return {
        "nll": jnp.sum(nll_r),
        "n": jnp.sum(n_r),
        "positions": jnp.sum((mb["mask"] & valid_row[:, None]).astype(jnp.int32)),
        "src_nll": nll_r @ src,
        "src_n": n_r.astype(jnp.float32) @ src,
    }
