"""pam-jax: the Perceive Anything Model (SAM 2 + Semantic Perceiver + Qwen2.5) in JAX / Flax NNX."""

import flax as _flax

# Parameters carry logical axis names as metadata; shardings are applied explicitly from
# `pam_jax.sharding.RULES` (jit in/out shardings), so variables must not need a mesh at creation.
_flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
