"""Objectives plug into the pure train_step: an objective with its own state (here a target network
kept as an EMA of the params, as consistency / DMD objectives keep) lives in TrainState.objective, is
updated in the jitted step, skipped with the rest on non-finite steps, and checkpointed and restored
with the state."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from student_jax.checkpoint import Checkpointer
from student_jax.config import OptimConfig, student_preset
from student_jax.model import Student
from student_jax.objectives import VelocityMatching, make_objective
from student_jax.optim import make_optimizer
from student_jax.state import abstract_train_state, create_train_state
from student_jax.train_step import train_step

CFG = student_preset("tiny")
OPTIM = OptimConfig(lr=1e-3, warmup_steps=0, total_steps=100, ema_decay=0.9)


@dataclasses.dataclass(frozen=True)
class WithTarget(VelocityMatching):
    """Velocity matching plus a target network (an EMA of the params) and a step counter."""

    def init(self, rng, params):
        return {"target": jax.tree.map(jnp.copy, params), "updates": jnp.zeros((), jnp.int32)}

    def loss(self, params, objective_state, batch, model):
        loss, _ = super().loss(params, objective_state, batch, model)
        return loss, {"target_gap": optax_norm_diff(params, objective_state["target"])}

    def update(self, objective_state, params, updated):
        target = jax.tree.map(lambda t, p: 0.5 * t + 0.5 * p, objective_state["target"], params)
        return {"target": target, "updates": objective_state["updates"] + updated.astype(jnp.int32)}


def optax_norm_diff(a, b):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def _batch(key, target_nan=False):
    k1, k2, k3 = jax.random.split(key, 3)
    target = jax.random.normal(k3, (4, 16, 8, 8))
    if target_nan:
        target = target.at[0, 0, 0, 0].set(jnp.nan)
    return dict(x_t=jax.random.normal(k1, (4, 16, 8, 8)), t=jnp.full((4,), 500.0),
                text=jax.random.normal(k2, (4, 8, 4096)), text_mask=jnp.ones((4, 8), bool), target=target)


def test_objective_state_is_initialised_updated_skipped_and_checkpointed(tmp_path):
    objective = WithTarget()
    state = create_train_state(CFG, OPTIM, jax.random.key(0), (8, 8), 8, objective=objective)
    chex.assert_trees_all_equal(state.objective["target"], state.params)
    step = jax.jit(functools.partial(train_step, model=Student(CFG), tx=make_optimizer(OPTIM), ema_decay=0.9,
                                     objective=objective))
    state, metrics = step(state, _batch(jax.random.key(1)))
    assert int(state.objective["updates"]) == 1 and "objective/target_gap" in metrics
    before = jax.tree.map(np.asarray, state.objective)
    state, metrics = step(state, _batch(jax.random.key(2), target_nan=True))
    assert int(metrics["skipped"]) == 1
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, state.objective), before)  # skipped with the rest

    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(2, state, {"student": dataclasses.asdict(CFG)}, force=True)
    ckpt.wait()
    abstract = abstract_train_state(CFG, OPTIM, (8, 8), 8, objective)
    restored, _, _ = ckpt.restore(abstract)
    ckpt.close()
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, restored.objective), before)


def test_built_in_objectives():
    assert make_objective("cfg").teacher_target == "cfg" and make_objective("velocity").teacher_target == "velocity"
    state = create_train_state(CFG, OPTIM, jax.random.key(0), (8, 8), 8)
    assert state.objective == {}
