"""Fixtures: tiny random HF Qwen2 checkpoints (perturbed) with a tiny local tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
from torch_ref import perturb_, tv_shim

VOCAB = 128
WORDS = [
    "hello",
    "world",
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "a",
    "dog",
    "ran",
    "what",
    "is",
    "this",
    "system",
    "user",
    "assistant",
    "you",
    "are",
    "helpful",
    "\n",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def hf_qwen2(tied: bool, seed: int = 0, scale: float = 0.2, **kw):
    """transformers.Qwen2ForCausalLM, tiny, every parameter perturbed, eval mode.

    The RoPE buffers (inv_freq) are restored after perturbing: they are not weights (never in a
    checkpoint) and perturbing them would change the model's definition, not its parameters.
    `scale` 0.2 makes logits spread enough that greedy decoding has no near-ties.
    """
    import torch

    tv_shim()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        rope_theta=10000.0,
        max_position_embeddings=512,
        eos_token_id=None,
        pad_token_id=0,
    )
    cfg.update(kw)
    torch.manual_seed(seed)
    m = Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()
    bufs = {k: v.clone() for k, v in m.named_buffers()}
    perturb_(m, seed, scale=scale)
    with torch.no_grad():
        for k, v in m.named_buffers():
            v.copy_(bufs[k])
    return m


def save_tokenizer(d) -> None:
    """A WordLevel tokenizer (specials 0..2, words, filler) saved the transformers way."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tv_shim()
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    for i in range(len(vocab), VOCAB):
        vocab[f"w{i}"] = i
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(str(d))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))


def save_hf_dir(model, d, shard: bool = False) -> None:
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(d), max_shard_size="20KB" if shard else "10GB")
    save_tokenizer(d)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tied(request):
    return request.param


def make_converted(tied: bool, base):
    """(hf model, hf dir, pam-jax dir); the untied checkpoint is saved sharded with an index."""
    from pam_jax.convert.llm import convert_llm

    hm = hf_qwen2(tied)
    save_hf_dir(hm, base / "hf", shard=not tied)
    convert_llm(base / "hf", base / "jax")
    return hm, base / "hf", base / "jax"


@pytest.fixture(scope="module")
def converted(tied, tmp_path_factory):
    return make_converted(tied, tmp_path_factory.mktemp("tied" if tied else "untied"))


@pytest.fixture(scope="module")
def converted_untied(tmp_path_factory):
    return make_converted(False, tmp_path_factory.mktemp("untied1"))


def right_padded(lengths, seed=0):
    rs = np.random.RandomState(seed)
    ids = np.zeros((len(lengths), max(lengths)), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rs.randint(3, VOCAB, n)
    return ids
