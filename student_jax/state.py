"""The student's training state: one pytree holding everything a step reads and writes.

Owns `TrainState` (step, params, opt_state, ema, rng), `create_train_state` and
`abstract_train_state`. `create_train_state` is jittable with the configs and sizes bound, which
is how sharded initialisation works (params are created already sharded, never gathered on one
device):

    init = functools.partial(create_train_state, cfg, optim_cfg, latent_hw=(64, 64), text_len=512)
    abstract = jax.eval_shape(init, rng)              # == abstract_train_state(cfg, optim_cfg, ...)
    shardings = ...                                   # e.g. replicated NamedSharding per leaf
    state = jax.jit(init, out_shardings=shardings)(rng)

The same abstract tree (with shardings attached) is the target for an orbax restore.
`rng` is a raw uint32 key [2] (orbax saves it like any array); per-step randomness is
jax.random.fold_in(rng, step), never a split stored back into the state.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from student_jax.config import OptimConfig, StudentConfig
from student_jax.model import Student
from student_jax.optim import make_optimizer

__all__ = ["TrainState", "abstract_train_state", "create_train_state", "param_count"]


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar (train_step calls so far); params / ema: the Student's parameter tree;
    opt_state: make_optimizer(...)'s state; rng: uint32 [2] base key of the run; objective: the
    objective's own state (`student_jax.objectives`; {} for velocity matching)."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema: Any
    rng: jax.Array
    objective: Any = flax.struct.field(default_factory=dict)


def _raw_key(rng: jax.Array) -> jax.Array:
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    if rng.shape != (2,) or rng.dtype != jnp.uint32:
        raise ValueError(
            f"create_train_state: rng must be a key from jax.random.key / jax.random.PRNGKey, got "
            f"shape {rng.shape} dtype {rng.dtype}"
        )
    return rng


def create_train_state(
    cfg: StudentConfig,
    optim_cfg: OptimConfig,
    rng: jax.Array,
    latent_hw: tuple[int, int],
    text_len: int,
    objective=None,
) -> TrainState:
    """Initialise parameters (from `rng`), the optimizer state, the EMA (= params), the state key and
    the objective's state (`objective.init`; none for None).

    latent_hw and text_len only size the dummy inputs of the initialising forward pass; the
    parameters themselves do not depend on them (the position embedding is computed, not learned).
    Runs as one compiled program (fast eagerly too); inside an outer jit it is simply inlined.
    """
    if len(tuple(latent_hw)) != 2:
        raise ValueError(f"create_train_state: latent_hw must be (H, W), got {latent_hw!r}")
    if not isinstance(cfg, StudentConfig) or not isinstance(optim_cfg, OptimConfig):
        raise TypeError(
            f"create_train_state: expected (StudentConfig, OptimConfig), got ({type(cfg).__name__}, "
            f"{type(optim_cfg).__name__})"
        )
    latent_hw = tuple(int(v) for v in latent_hw)
    return _create_train_state(cfg, optim_cfg, _raw_key(rng), latent_hw, int(text_len), objective)


@functools.partial(jax.jit, static_argnums=(0, 1, 3, 4, 5))
def _create_train_state(cfg, optim_cfg, raw_key, latent_hw, text_len, objective) -> TrainState:
    init_key, state_key = jax.random.split(raw_key)
    height, width = latent_hw
    x = jnp.zeros((1, cfg.latent_channels, height, width), jnp.float32)  # [1, C, H, W]
    t = jnp.zeros((1,), jnp.float32)  # [1]
    text = jnp.zeros((1, text_len, cfg.text_dim), jnp.float32)  # [1, L, text_dim]
    text_mask = jnp.ones((1, text_len), jnp.bool_)  # [1, L]
    params = Student(cfg).init(init_key, x, t, text, text_mask)["params"]
    opt_state = make_optimizer(optim_cfg).init(params)
    # A real copy: params and ema must be distinct buffers because the state is donated to train_step.
    ema = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
    extra = {} if objective is None else objective.init(jax.random.fold_in(init_key, 1), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, ema=ema, rng=state_key,
                      objective=extra)


def abstract_train_state(
    cfg: StudentConfig, optim_cfg: OptimConfig, latent_hw: tuple[int, int], text_len: int, objective=None
) -> TrainState:
    """TrainState of jax.ShapeDtypeStruct leaves (no memory, no compute): for restore and sharded init."""
    init = functools.partial(create_train_state, cfg, optim_cfg, latent_hw=tuple(latent_hw), text_len=int(text_len),
                             objective=objective)
    return jax.eval_shape(init, jax.random.PRNGKey(0))


def param_count(params) -> int:
    """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
