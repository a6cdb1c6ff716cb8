"""Qwen2 / Qwen2.5 language model (PAM's LLM) in Flax NNX.

    from pam_jax.llm.io import load_qwen2, save_qwen2      # model dirs (kind "qwen2")
    from pam_jax.llm.qwen2 import Qwen2ForCausalLM         # the module (HF names)
    from pam_jax.llm.config import Qwen2Config             # + presets qwen2_5_1_5b / qwen2_5_3b
    from pam_jax.llm.sampler import generate, prepare, SamplingParams
    from pam_jax.llm.attention import attend               # training / prefill attention kernels
    from pam_jax.llm.loss import lm_loss_sums              # chunked shifted cross entropy
    from pam_jax.llm.tokenizer import Tokenizer            # tokenizer.json + chat template
    from pam_jax.convert.llm import convert_llm, export_hf # HF dir <-> model dir

Submodules are not imported here so `pam-jax --help` stays fast.
"""
