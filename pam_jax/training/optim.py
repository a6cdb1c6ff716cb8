"""AdamW with linear warmup + cosine decay, global-norm clipping, no decay on norms / biases /
1-D tensors, and a learning rate per part (`lr_PART`, default `learning_rate`).

Only trainable parameters enter the optimizer: frozen parts have no optimizer state at all.
Each part's schedule has the same shape: 0 -> lr over `warmup_steps`, then cosine to
`min_lr * lr / learning_rate` at `steps` (so `min_lr` is the base rate's floor and parts keep
their ratio).
"""

from __future__ import annotations

import optax

from pam_jax.training.config import TrainConfig
from pam_jax.training.model import ModelSpec, decays


def schedule(cfg: TrainConfig, peak: float) -> optax.Schedule:
    end = cfg.min_lr * peak / cfg.learning_rate if cfg.learning_rate > 0 else 0.0
    if cfg.warmup_steps <= 0:
        return optax.cosine_decay_schedule(peak, max(cfg.steps, 1), alpha=end / peak if peak else 0)
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1), end
    )


def make_optimizer(cfg: TrainConfig, spec: ModelSpec) -> optax.GradientTransformation:
    """The optimizer over the trainable flat-dict parameters of `spec`."""
    keys = sorted(spec.trainable)
    parts = sorted({spec.parts[k] for k in keys})
    labels = {k: spec.parts[k] for k in keys}
    mask = {k: decays(k, len(spec.shapes[k])) for k in keys}

    def one(part: str) -> optax.GradientTransformation:
        return optax.adamw(
            schedule(cfg, cfg.lr_for(part)),
            b1=cfg.adam_b1,
            b2=cfg.adam_b2,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
            mask={k: mask[k] for k in keys},
        )

    tx = optax.multi_transform({p: one(p) for p in parts}, labels)
    if cfg.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return tx
