"""The student's optimizer: AdamW, linear warmup + cosine decay, global-norm clipping, accumulation.

Owns `learning_rate(cfg, step)` and `make_optimizer(cfg)`. Every step count is in train_step calls
(micro-steps): with grad_accum = k, the optimizer update that closes accumulation window j (the
j-th update, 0-based) uses learning_rate(cfg, j * k), so changing k does not stretch the schedule.

The learning rate is injected as a hyperparameter (optax.inject_hyperparams): it lives in the
optimizer state under the key "learning_rate", which is how `train_step` reports it without a
Python-side schedule. Gradient accumulation wraps the whole chain in optax.MultiSteps (mean of
the micro-batch gradients, then clip, then AdamW), so k micro-steps on batches b_1..b_k make the
same update as one step on their concatenation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from student_jax.config import OptimConfig
from student_jax.model import STACKED_BLOCKS

__all__ = ["current_learning_rate", "learning_rate", "make_optimizer"]


def learning_rate(cfg: OptimConfig, step) -> jax.Array:
    """Learning rate at train step `step` (0-based; int or int array): float32 array.

    Linear warmup lr * (step + 1) / warmup_steps for step < warmup_steps (non-zero from the first
    step), then cosine from lr down to end_lr_ratio * lr at step total_steps, constant after.
    """
    step = jnp.asarray(step, dtype=jnp.float32)
    peak = cfg.lr
    floor = cfg.lr * cfg.end_lr_ratio
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    progress = jnp.clip((step - cfg.warmup_steps) / decay_steps, 0.0, 1.0)
    cosine = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    if cfg.warmup_steps == 0:
        return cosine
    warmup = peak * (step + 1.0) / cfg.warmup_steps
    return jnp.where(step < cfg.warmup_steps, warmup, cosine)


def _decay_mask(params):
    # Decay matrices only: shrinking biases and norm scales towards 0 is not regularisation. The
    # scanned blocks' leaves carry a leading layer axis (a stacked bias is [depth, D]): not counted.
    def is_matrix(path, p):
        layer_axis = 1 if path and getattr(path[0], "key", None) == STACKED_BLOCKS else 0
        return p.ndim - layer_axis >= 2

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) -> AdamW(schedule), wrapped in MultiSteps when grad_accum > 1."""
    if not isinstance(cfg, OptimConfig):
        raise TypeError(f"make_optimizer: expected an OptimConfig, got {type(cfg).__name__}")
    accum = cfg.grad_accum

    def schedule(update_count):
        return learning_rate(cfg, update_count * accum)

    # Only the learning rate is injected (and so stored in the state); the rest are plain constants.
    static = ("b1", "b2", "eps", "eps_root", "weight_decay", "mask")
    adamw = optax.inject_hyperparams(optax.adamw, static_args=static)(
        learning_rate=schedule,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=1e-8,
        eps_root=0.0,
        weight_decay=cfg.weight_decay,
        mask=_decay_mask,
    )
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    tx = optax.chain(*parts, adamw)
    if accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum).gradient_transformation()
    return tx


def current_learning_rate(opt_state) -> jax.Array:
    """The learning rate of the latest update stored in an optimizer state from `make_optimizer`.

    Found as the injected hyperparameter `...hyperparams['learning_rate']` (inside MultiSteps too);
    NaN (float32) when the state has none, e.g. for an optimizer built some other way.
    """
    found = [
        leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
        if jax.tree_util.keystr(path).endswith(".hyperparams['learning_rate']")
    ]
    if len(found) != 1:
        return jnp.full((), jnp.nan, dtype=jnp.float32)
    return jnp.asarray(found[0], dtype=jnp.float32)
