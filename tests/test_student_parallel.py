"""Data-parallel equivalence of the student's train_step on a 2-device CPU mesh.

JAX fixes its device count when it initialises, and the main pytest process has long started
JAX with one CPU device, so the check runs this file as a script in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=2 (what chex.set_n_cpu_devices(2) does).

The script initialises the state already sharded (eval_shape -> shardings -> jit(init,
out_shardings)), runs two train_steps with the batch split over a "data" mesh axis and the state
replicated, and compares with the same two steps on one device.
"""

from __future__ import annotations

import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_device_data_parallel_matches_one_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, f"subprocess failed:\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    assert "DATA_PARALLEL_OK" in result.stdout, result.stdout


def _main():
    import functools

    import chex
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from student_jax.config import OptimConfig, student_preset
    from student_jax.model import Student
    from student_jax.optim import make_optimizer
    from student_jax.state import abstract_train_state, create_train_state
    from student_jax.train_step import train_step

    assert jax.device_count() == 2, f"expected 2 CPU devices, got {jax.devices()}"
    cfg = student_preset("tiny")
    optim = OptimConfig(lr=2e-3, warmup_steps=0, total_steps=100, ema_decay=0.9)
    hw, text_len, batch_size = (8, 8), 32, 4

    rng = np.random.default_rng(0)
    batches = []
    for _ in range(2):
        mask = np.arange(text_len)[None, :] < np.array([32, 20, 8, 1])[:, None]  # [B, L]
        batches.append({
            "x_t": rng.standard_normal((batch_size, 16) + hw).astype(np.float32),
            "t": rng.uniform(0, 1000, (batch_size,)).astype(np.float32),
            "text": rng.standard_normal((batch_size, text_len, 4096)).astype(np.float32),
            "text_mask": mask,
            "target": rng.standard_normal((batch_size, 16) + hw).astype(np.float32),
        })

    step = functools.partial(train_step, model=Student(cfg), tx=make_optimizer(optim), ema_decay=optim.ema_decay)
    init = functools.partial(create_train_state, cfg, optim, latent_hw=hw, text_len=text_len)
    key = jax.random.PRNGKey(0)

    # One device.
    single_state = init(key)
    single_step = jax.jit(step)
    single_metrics = []
    for batch in batches:
        single_state, metrics = single_step(single_state, batch)
        single_metrics.append(metrics)

    # Two devices: replicated state created sharded, batch split over "data".
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    data = NamedSharding(mesh, PartitionSpec("data"))
    state_sharding = jax.tree.map(lambda _: replicated, abstract_train_state(cfg, optim, hw, text_len))
    batch_sharding = {name: data for name in batches[0]}
    state = jax.jit(init, out_shardings=state_sharding)(key)
    chex.assert_trees_all_equal(state.params, init(key).params)
    parallel_step = jax.jit(
        step,
        donate_argnums=(0,),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, replicated),
    )
    parallel_metrics = []
    for batch in batches:
        sharded = jax.device_put(batch, batch_sharding)
        shard_shapes = {s.data.shape for s in sharded["x_t"].addressable_shards}
        assert shard_shapes == {(batch_size // 2, 16) + hw}, shard_shapes
        state, metrics = parallel_step(state, sharded)
        parallel_metrics.append(metrics)

    assert state.params["final_proj"]["kernel"].sharding.is_equivalent_to(replicated, 2)
    # Reductions are split across devices, so equal up to float32 summation order.
    chex.assert_trees_all_close(state.params, single_state.params, atol=1e-5, rtol=1e-4)
    chex.assert_trees_all_close(state.ema, single_state.ema, atol=1e-5, rtol=1e-4)
    chex.assert_trees_all_close(parallel_metrics, single_metrics, atol=1e-5, rtol=1e-4)
    assert int(state.step) == 2
    moved = float(jnp.max(jnp.abs(state.params["final_proj"]["kernel"])))
    assert moved > 0, "the parameters did not change; the comparison would be vacuous"
    print("DATA_PARALLEL_OK")


if __name__ == "__main__":
    _main()
