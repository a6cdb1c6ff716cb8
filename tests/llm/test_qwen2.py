"""Parity of the NNX Qwen2 with transformers.Qwen2ForCausalLM (CPU, float32, perturbed weights).

Tolerances: logits agree to 1e-4 absolute (measured ~2e-7: both sides are float32 with the same
op order except matmul accumulation order); generation must be token-identical.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from pam_jax.llm.io import load_qwen2, save_qwen2
from pam_jax.sharding import unannotated_params
from tests.llm.conftest import right_padded

ATOL = 1e-4


def _hf_logits(hm, ids, mask=None):
    with torch.no_grad():
        am = None if mask is None else torch.tensor(mask)
        return hm(torch.tensor(ids), attention_mask=am).logits.numpy()


def test_logits_parity(converted):
    hm, _, jd = converted
    model, cfg, tok = load_qwen2(jd, jnp.float32)
    assert tok is not None and cfg.tie_word_embeddings == hm.config.tie_word_embeddings
    assert unannotated_params(model) == []
    ids = right_padded([11, 11], seed=1)
    ref = _hf_logits(hm, ids)
    out = np.asarray(model(jnp.asarray(ids)))
    err = np.abs(out - ref).max()
    assert err < ATOL, err
    # left padding with an attention mask: HF derives positions from the mask the same way
    lens = [11, 6]
    ids = right_padded(lens, seed=2)
    mask = (np.arange(11)[None] < np.array(lens)[:, None]).astype(np.int64)
    ids_l = np.stack([np.roll(r, 11 - n) for r, n in zip(ids, lens)])
    mask_l = np.stack([np.roll(r, 11 - n) for r, n in zip(mask, lens)])
    ref = _hf_logits(hm, ids_l, mask_l)
    out = np.asarray(model(jnp.asarray(ids_l), attention_mask=jnp.asarray(mask_l)))
    err = np.abs(out - ref)[mask_l.astype(bool)].max()
    assert err < ATOL, err


def test_round_trip_export(converted, tmp_path):
    """convert -> export -> transformers.from_pretrained gives the original logits."""
    from pam_jax.convert.llm import export_hf
    from transformers import Qwen2ForCausalLM

    hm, _, jd = converted
    export_hf(jd, tmp_path / "hf2")
    assert (tmp_path / "hf2" / "tokenizer.json").is_file()
    hm2 = Qwen2ForCausalLM.from_pretrained(str(tmp_path / "hf2")).eval()
    ids = right_padded([9], seed=3)
    err = np.abs(_hf_logits(hm2, ids) - _hf_logits(hm, ids)).max()
    assert err < 1e-6, err  # the same float32 weights: bit-identical up to layout


def test_save_load_scanned_remat(converted, tmp_path):
    """scan_layers + remat give the same logits and gradients; save_qwen2 un-stacks on write."""
    import jax

    _, _, jd = converted
    ref_model, _, _ = load_qwen2(jd, jnp.float32)
    model, cfg, _ = load_qwen2(jd, jnp.float32, scan_layers=True, remat="full")
    assert cfg.scan_layers and unannotated_params(model) == []
    ids = jnp.asarray(right_padded([10, 10], seed=4))
    a, b = np.asarray(ref_model(ids)), np.asarray(model(ids))
    assert np.abs(a - b).max() < 1e-5

    def loss(m):
        return jnp.mean(jax.nn.log_softmax(m(ids))[..., 5])

    g1 = nnx.grad(loss)(ref_model)
    g2 = nnx.grad(loss)(model)
    q1 = np.asarray(g1["model"]["layers"][1]["self_attn"]["q_proj"]["kernel"][...])
    q2 = np.asarray(g2["model"]["layers"]["self_attn"]["q_proj"]["kernel"][...][1])
    assert np.abs(q1 - q2).max() < 1e-5 * max(1.0, np.abs(q1).max())
    save_qwen2(model, tmp_path / "re", tokenizer_dir=jd)
    m3, _, _ = load_qwen2(tmp_path / "re", jnp.float32)
    assert np.abs(np.asarray(m3(ids)) - a).max() < 1e-6


def test_kv_cache_matches_full_recompute(converted):
    """Prefill + one-token decode steps through the cache == full forward, left-padded rows."""
    hm, _, jd = converted
    model, _, _ = load_qwen2(jd, jnp.float32)
    lens, total, steps = np.array([7, 4]), 7, 5
    seq = right_padded([total + steps] * 2, seed=5)
    # row b: prompt = its first lens[b] tokens, then `steps` more tokens; left-pad the prompt
    full = np.zeros((2, total + steps), np.int64)
    mask = np.zeros_like(full)
    for b, n in enumerate(lens):
        start = total - n
        full[b, start:] = seq[b, : n + steps]
        mask[b, start:] = 1
    ref = np.asarray(model(jnp.asarray(full), attention_mask=jnp.asarray(mask)))
    start = jnp.asarray(total - lens)
    slots = jnp.arange(total)
    pos = jnp.maximum(slots[None] - start[:, None], 0)
    valid = slots[None] >= start[:, None]
    m = (slots[None, :, None] >= slots[None, None, :]) & valid[:, None, :]
    cache = model.init_cache(2, total + steps)
    h, cache = model.hidden_states(model.embed(jnp.asarray(full[:, :total])), pos, m, cache, 0)
    errs = [np.abs(np.asarray(model.logits(h[:, -1])) - ref[:, total - 1]).max()]
    kv_slots = jnp.arange(total + steps)
    for i in range(steps):
        slot = total + i
        mm = ((kv_slots[None] >= start[:, None]) & (kv_slots[None] <= slot))[:, None]
        x = model.embed(jnp.asarray(full[:, slot : slot + 1]))
        h, cache = model.hidden_states(
            x, jnp.asarray(lens + i)[:, None], mm, cache, slot, attend_cache=True
        )
        errs.append(np.abs(np.asarray(model.logits(h[:, 0])) - ref[:, slot]).max())
    assert max(errs) < 1e-5, errs
    # and HF agrees on the unpadded row
    assert np.abs(_hf_logits(hm, full[:1]) - ref[:1]).max() < ATOL


def test_parameters_annotated_and_bf16(converted):
    _, _, jd = converted
    model, _, _ = load_qwen2(jd, jnp.bfloat16)
    assert unannotated_params(model) == []
    assert model.model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    out = model(jnp.asarray(right_padded([6], seed=6)))
    assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
