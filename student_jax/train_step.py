"""The pure training-step functions of the student.

Owns `make_noisy_batch` (flow-matching noise from fold_in(rng, step)), `train_step` (loss, grads,
optax update, EMA, in-graph skip of non-finite steps) and `eval_velocity_error` (held-out relative
error against the teacher). All are module-level pure functions without Python state; the trainer
binds the static parts and jits them at the call site with its shardings:

    step_fn = jax.jit(
        functools.partial(train_step, model=Student(cfg), tx=make_optimizer(optim_cfg),
                          ema_decay=optim_cfg.ema_decay),
        donate_argnums=(0,), in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, metrics_sharding))

Under data parallelism (batch sharded over a "data" mesh axis, state replicated) the loss mean,
the gradients and the finiteness checks are global reductions inserted by XLA: no code here knows
about devices. Metrics stay device scalars so the step never waits for the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from student_jax.losses import noisy_latents, sample_timesteps
from student_jax.objectives import VelocityMatching
from student_jax.model import Student
from student_jax.optim import current_learning_rate
from student_jax.projection import to_teacher
from student_jax.state import TrainState

__all__ = ["BATCH_KEYS", "draw_noise_levels", "eval_velocity_error", "make_noisy_batch", "train_step"]

BATCH_KEYS = ("x_t", "t", "text", "text_mask", "target")
_NAN_POLICIES = ("skip", "apply")


def draw_noise_levels(rng: jax.Array, step, batch: int, shift: float, band: jax.Array | None = None) -> jax.Array:
    """The noise levels s [batch] of step `step`: exactly what `make_noisy_batch` draws.

    Cheap and small, so a trainer can draw them on the host's CPU device and route each sample to a
    teacher expert without a device round trip, then hand them to `make_noisy_batch(..., s=s)`."""
    s_key, _ = jax.random.split(jax.random.fold_in(rng, step))
    return sample_timesteps(s_key, batch, shift, band)  # [B]


def make_noisy_batch(rng: jax.Array, step, x0: jax.Array, shift: float, band: jax.Array | None = None,
                     s: jax.Array | None = None) -> dict[str, jax.Array]:
    """Noise a clean student-space batch x0 [B, C, H, W] for step `step`.

    band: see `losses.sample_timesteps` (None: the whole timestep density). s: the step's noise
    levels when already drawn (`draw_noise_levels`); shift and band are then unused.
    Returns dict(x_t [B, C, H, W], t [B] = 1000 * s float32, eps [B, C, H, W]); all randomness comes
    from jax.random.fold_in(rng, step), so a resumed run draws the same noise at the same step.
    """
    if getattr(x0, "ndim", None) != 4:
        raise ValueError(
            f"make_noisy_batch: x0 must be student latents [B, C, H, W], got shape {getattr(x0, 'shape', None)}"
        )
    key = jax.random.fold_in(rng, step)
    s_key, eps_key = jax.random.split(key)
    if s is None:
        s = sample_timesteps(s_key, x0.shape[0], shift, band)  # [B]
    eps = jax.random.normal(eps_key, x0.shape, dtype=x0.dtype)  # [B, C, H, W]
    return {"x_t": noisy_latents(x0, eps, s), "t": 1000.0 * s, "eps": eps}


def _check_batch(batch, cfg, where: str):
    if not hasattr(batch, "keys"):
        raise TypeError(f"{where}: batch must be a dict with keys {list(BATCH_KEYS)}, got {type(batch).__name__}")
    missing = [key for key in BATCH_KEYS if key not in batch]
    if missing:
        raise KeyError(f"{where}: batch is missing {missing}; it needs {list(BATCH_KEYS)} (has {sorted(batch.keys())})")
    x_t, target = batch["x_t"], batch["target"]
    if x_t.ndim != 4 or target.shape != (x_t.shape[0], cfg.teacher_channels) + tuple(x_t.shape[2:]):
        raise ValueError(
            f"{where}: target must be the teacher's [B, {cfg.teacher_channels}, H, W] at the size of x_t; got "
            f"x_t {tuple(x_t.shape)}, target {tuple(target.shape)}"
        )


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: Student,
    tx: optax.GradientTransformation,
    ema_decay: float,
    nan_policy: str = "skip",
    objective=None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One distillation step: objective loss -> grads -> tx -> EMA -> objective update.

    objective: a `student_jax.objectives` objective (default: VelocityMatching, i.e.
    MSE(to_teacher(student(x_t, t, text)), target)); its state lives in `state.objective`.

    batch: x_t [B, C, H, W], t [B] (timesteps in [0, 1000]), text [B, L, text_dim], text_mask [B, L]
    bool, target [B, 16, H, W] (the teacher's velocity or CFG velocity).
    The EMA moves only when the optimizer really updated the parameters (every grad_accum-th call
    under optax.MultiSteps). With nan_policy="skip", a step whose target, loss or gradients are not
    finite changes nothing but `step` and reports skipped = 1; "apply" applies it regardless.
    Returns (new state, metrics) with metrics loss, grad_norm (before clipping), lr, skipped: device
    scalars. loss is the batch's loss even when the step was skipped (so NaNs stay visible).
    """
    if nan_policy not in _NAN_POLICIES:
        raise ValueError(f"train_step: nan_policy must be one of {list(_NAN_POLICIES)}, got {nan_policy!r}")
    cfg = model.cfg
    _check_batch(batch, cfg, "train_step")
    objective = VelocityMatching() if objective is None else objective

    def loss_fn(params):
        return objective.loss(params, state.objective, batch, model)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    if isinstance(state.opt_state, optax.MultiStepsState):
        updated = opt_state.gradient_step > state.opt_state.gradient_step
    else:
        updated = jnp.bool_(True)
    ema = jax.tree.map(
        lambda old, new: jnp.where(updated, ema_decay * old + (1.0 - ema_decay) * new, old), state.ema, params
    )
    extra = objective.update(state.objective, params, updated)

    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(jnp.isfinite(batch["target"]))
    if nan_policy == "skip":
        def keep(new, old):  # select per leaf, in-graph: no host sync
            return jnp.where(finite, new, old)

        params = jax.tree.map(keep, params, state.params)
        opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        ema = jax.tree.map(keep, ema, state.ema)
        extra = jax.tree.map(keep, extra, state.objective)
        skipped = jnp.logical_not(finite).astype(jnp.int32)
    else:
        skipped = jnp.zeros((), jnp.int32)

    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema, objective=extra)
    metrics = {
        "loss": loss.astype(jnp.float32),
        "grad_norm": grad_norm.astype(jnp.float32),
        "lr": current_learning_rate(opt_state),
        "skipped": skipped,
        **{f"objective/{k}": v for k, v in aux.items()},
    }
    return new_state, metrics


def eval_velocity_error(params, batch: dict[str, jax.Array], *, model: Student) -> jax.Array:
    """Relative error ||to_teacher(pred) - target|| / ||target|| over the whole batch (float32 scalar).

    batch: as for train_step. Pass the EMA parameters to evaluate the EMA model.
    """
    cfg = model.cfg
    _check_batch(batch, cfg, "eval_velocity_error")
    pred = model.apply({"params": params}, batch["x_t"], batch["t"], batch["text"], batch["text_mask"])
    diff = to_teacher(pred, cfg) - batch["target"].astype(jnp.float32)  # [B, T, H, W]
    target_norm = jnp.sqrt(jnp.sum(jnp.square(batch["target"].astype(jnp.float32))))
    return jnp.sqrt(jnp.sum(jnp.square(diff))) / target_norm
