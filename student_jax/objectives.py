"""Distillation objectives: what the student learns from the teacher's outputs.

An objective is one small frozen (hashable) object the jitted `train_step` is built with:

- `teacher_target`: which teacher output each step needs: "cfg" (the guided velocity
  uncond + g (cond - uncond)) or "velocity" (the conditional velocity);
- `init(rng, params) -> state`: the objective's own state (a target network, a fake-score network,
  ...), stored in `TrainState.objective` and so checkpointed and resumed with the rest; `{}` when none;
- `loss(params, objective_state, batch, model) -> (loss, aux)`: a pure function of the batch;
- `update(objective_state, params, updated) -> objective_state`: after the optimizer step (`updated`
  is False on accumulation micro-steps).

`VelocityMatching` is the objective of this project so far: mean squared error between the
student's velocity (mapped to the teacher's 16 channels) and the teacher's, at noisy latents.
Few-step objectives (consistency, DMD) plug in the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from student_jax.losses import velocity_loss

__all__ = ["OBJECTIVES", "VelocityMatching", "make_objective"]


@dataclasses.dataclass(frozen=True)
class VelocityMatching:
    """MSE to the teacher's velocity; guided=True matches its CFG velocity (one student pass at sampling)."""

    guided: bool = True

    @property
    def name(self) -> str:
        return "cfg" if self.guided else "velocity"

    @property
    def teacher_target(self) -> str:
        return "cfg" if self.guided else "velocity"

    def init(self, rng: jax.Array, params: Any) -> dict:
        return {}

    def loss(self, params, objective_state, batch, model) -> tuple[jax.Array, dict]:
        pred = model.apply({"params": params}, batch["x_t"], batch["t"], batch["text"], batch["text_mask"])
        return velocity_loss(pred, batch["target"], model.cfg), {}

    def update(self, objective_state, params, updated) -> dict:
        return objective_state


OBJECTIVES = {"cfg": lambda: VelocityMatching(guided=True), "velocity": lambda: VelocityMatching(guided=False)}


def make_objective(name: str):
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]()
