"""Tests of the Flax student (student_jax/): configs and presets, model, projection, losses,
optimizer schedule, the pure train_step (learning, purity, no retrace, NaN skip, accumulation,
EMA), evaluation, and the Euler / UniPC sampler (UniPC against the torch Wan scheduler).

Checkpointing is in test_student_checkpoint.py, the 2-device data-parallel check in
test_student_parallel.py. Everything runs on CPU with the tiny preset; one train_step
compilation is shared by the module (wrapped in chex.assert_max_traces).
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from student_jax.config import PRESETS, OptimConfig, StudentConfig, student_preset
from student_jax.losses import noisy_latents, sample_timesteps, velocity_loss
from student_jax.model import Student, patchify, sincos_pos_embed_2d, timestep_embedding, unpatchify
from student_jax.optim import current_learning_rate, learning_rate, make_optimizer
from student_jax.projection import from_teacher, projection_matrix, to_teacher
from student_jax.sampler import sample, sampling_schedule
from student_jax.state import TrainState, abstract_train_state, create_train_state, param_count
from student_jax.train_step import eval_velocity_error, make_noisy_batch, train_step

TINY = student_preset("tiny")
# Constant learning rate: the accumulation test compares states after several updates, and a
# schedule in micro-steps would give the k=1 and k=2 runs different rates after the first one.
OPTIM = OptimConfig(lr=2e-3, warmup_steps=0, total_steps=1000, end_lr_ratio=1.0, ema_decay=0.9)
BATCH, LATENT_HW, TEXT_LEN = 4, (8, 8), 32


def _copy(tree):
    # Eager copies: the shared step donates its state argument.
    return jax.tree.map(jnp.copy, tree)


def _batch(seed: int, batch=BATCH, hw=LATENT_HW, text_len=TEXT_LEN, real_tokens=(32, 20, 8, 1)):
    """A random train_step batch, drawn with numpy (no per-shape XLA compiles for random ops)."""
    rng = np.random.default_rng(seed)
    mask = np.arange(text_len)[None, :] < np.asarray(real_tokens[:batch])[:, None]  # [B, L]
    arrays = {
        "x_t": rng.standard_normal((batch, TINY.latent_channels) + hw),
        "t": rng.uniform(0.0, 1000.0, (batch,)),
        "text": rng.standard_normal((batch, text_len, TINY.text_dim)),
        "text_mask": mask,
        "target": rng.standard_normal((batch, TINY.teacher_channels) + hw),
    }
    return {k: jnp.asarray(v if v.dtype == bool else v.astype(np.float32)) for k, v in arrays.items()}


def _normal(seed: int, shape) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _perturbed(params, seed: int, scale=0.05):
    """All parameters random (the zero-initialised layers too), so every path affects the output."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + jnp.asarray(scale * rng.standard_normal(p.shape), jnp.float32), params)


@functools.partial(jax.jit, static_argnames=("model",))
def _apply(params, x, t, text, text_mask, *, model):
    return model.apply({"params": params}, x, t, text, text_mask)


@pytest.fixture(scope="module")
def state0() -> TrainState:
    return create_train_state(TINY, OPTIM, jax.random.PRNGKey(0), LATENT_HW, TEXT_LEN)


@pytest.fixture(scope="module")
def step_fn():
    """The trainer's call-site jit (donated state); retracing more than once fails the test using it."""
    model, tx = Student(TINY), make_optimizer(OPTIM)

    def shared_train_step(state, batch):
        return train_step(state, batch, model=model, tx=tx, ema_decay=OPTIM.ema_decay)

    return jax.jit(chex.assert_max_traces(shared_train_step, n=1), donate_argnums=(0,))


# ----------------------------------------------------------------------------- config / presets


def test_presets_build_with_expected_sizes(state0):
    assert PRESETS == ("tiny", "small", "base")
    chex.assert_shape(state0.params["x_embedder"]["kernel"], (2 * 2 * 16, 64))
    chex.assert_shape(state0.step, ())
    chex.assert_shape(state0.rng, (2,))
    tiny_count = param_count(state0.params)
    assert 100_000 < tiny_count < 1_000_000, tiny_count  # mostly the 4096 -> 64 text projection
    small = abstract_train_state(student_preset("small"), OptimConfig(), LATENT_HW, TEXT_LEN)
    base = abstract_train_state(student_preset("base"), OptimConfig(), LATENT_HW, TEXT_LEN)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(base))
    assert 100e6 <= param_count(small.params) <= 200e6, param_count(small.params)
    assert 0.5e9 <= param_count(base.params) <= 1.0e9, param_count(base.params)
    # bf16 compute keeps float32 master parameters and optimizer moments.
    assert {leaf.dtype for leaf in jax.tree.leaves(base.params)} == {jnp.dtype(jnp.float32)}


def test_preset_and_config_errors():
    with pytest.raises(ValueError, match="unknown student preset 'smal'.*did you mean 'small'"):
        student_preset("smal")
    with pytest.raises(ValueError, match="unknown StudentConfig field 'hiden_size'.*'hidden_size'"):
        student_preset("tiny", hiden_size=32)
    assert student_preset("tiny", depth=3).depth == 3
    with pytest.raises(ValueError, match="divisible by num_heads"):
        StudentConfig(hidden_size=64, num_heads=5)
    with pytest.raises(ValueError, match="dtype must be one of"):
        StudentConfig(dtype="float16")
    with pytest.raises(ValueError, match="cudnn.*bfloat16"):
        StudentConfig(attention_impl="cudnn")
    with pytest.raises(ValueError, match=r"remat_policy must be one of \['full', 'dots'\], got 'some'"):
        StudentConfig(remat_policy="some")
    with pytest.raises(ValueError, match="cudnn_text_attention needs dtype='bfloat16'"):
        StudentConfig(cudnn_text_attention=True)
    with pytest.raises(ValueError, match="warmup_steps=200 exceeds total_steps=100"):
        OptimConfig(warmup_steps=200, total_steps=100)
    with pytest.raises(ValueError, match="grad_accum"):
        OptimConfig(grad_accum=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.depth = 4  # type: ignore[misc]


# ----------------------------------------------------------------------------- model


def test_model_parts_shapes():
    x = jnp.arange(2 * 16 * 8 * 12, dtype=jnp.float32).reshape(2, 16, 8, 12)
    tokens = patchify(x, 2)
    chex.assert_shape(tokens, (2, 4 * 6, 2 * 2 * 16))
    chex.assert_trees_all_equal(unpatchify(tokens, 2, 16, 8, 12), x)
    # Token 1 is the patch at grid (0, 1): rows 0-1, columns 2-3 of the image, channels last.
    chex.assert_trees_all_equal(tokens[0, 1].reshape(2, 2, 16), x[0, :, 0:2, 2:4].transpose(1, 2, 0))
    emb = timestep_embedding(jnp.array([0.0, 500.0]), 256)
    chex.assert_shape(emb, (2, 256))
    chex.assert_trees_all_close(emb[0], jnp.concatenate([jnp.ones(128), jnp.zeros(128)]))
    pos = sincos_pos_embed_2d(64, 4, 6)
    chex.assert_shape(pos, (24, 64))
    assert len({tuple(row) for row in np.round(pos, 6)}) == 24  # every position distinct


def test_student_forward_shapes_and_zero_init(state0):
    model = Student(TINY)
    batch = _batch(1, hw=(8, 12))
    out = _apply(state0.params, batch["x_t"], batch["t"], batch["text"], batch["text_mask"], model=model)
    chex.assert_shape(out, (BATCH, 16, 8, 12))
    chex.assert_type(out, jnp.float32)
    # adaLN-Zero + zero final projection: the untrained student predicts exactly 0.
    assert float(jnp.max(jnp.abs(out))) == 0.0


def test_student_bad_input_errors(state0):
    model = Student(TINY)
    b = _batch(1, batch=1)
    params = {"params": state0.params}
    with pytest.raises(ValueError, match="multiples of patch_size=2.*H=9"):
        model.apply(params, jnp.zeros((1, 16, 9, 8)), b["t"], b["text"], b["text_mask"])
    with pytest.raises(ValueError, match=r"x must be \[B, 16, H, W\]"):
        model.apply(params, jnp.zeros((1, 4, 8, 8)), b["t"], b["text"], b["text_mask"])
    with pytest.raises(ValueError, match=r"t must be \[B\]"):
        model.apply(params, b["x_t"], jnp.zeros((1, 1)), b["text"], b["text_mask"])
    with pytest.raises(ValueError, match="text_mask must be boolean"):
        model.apply(params, b["x_t"], b["t"], b["text"], b["text_mask"].astype(jnp.int32))
    with pytest.raises(ValueError, match="exceeds max_text_len=512"):
        model.apply(params, b["x_t"], b["t"], jnp.zeros((1, 513, 4096)), jnp.ones((1, 513), bool))


def test_student_respects_text_mask(state0):
    model = Student(TINY)
    params = _perturbed(state0.params, 2)
    b = _batch(3)
    run = functools.partial(_apply, params, b["x_t"], b["t"], model=model)
    out = run(b["text"], b["text_mask"])
    chex.assert_shape(out, (BATCH, 16, 8, 8))
    assert float(jnp.std(out)) > 1e-3
    # Padding (mask False) must not matter: rewrite every padded token.
    noise = 100.0 * _normal(4, b["text"].shape)
    padded_changed = jnp.where(b["text_mask"][..., None], b["text"], noise)
    chex.assert_trees_all_close(run(padded_changed, b["text_mask"]), out, atol=1e-6)
    # A real token does matter (sample 3 has exactly one).
    real_changed = b["text"].at[3, 0].add(1.0)
    changed = run(real_changed, b["text_mask"])
    assert float(jnp.max(jnp.abs(changed[3] - out[3]))) > 1e-4
    chex.assert_trees_all_close(changed[:3], out[:3], atol=1e-6)
    # All-masked text is a valid (unconditional) input.
    empty = run(b["text"], jnp.zeros_like(b["text_mask"]))
    assert bool(jnp.all(jnp.isfinite(empty)))


def test_student_bf16_compute_matches_float32(state0):
    cfg16 = dataclasses.replace(TINY, dtype="bfloat16")
    params = _perturbed(state0.params, 5)
    b = _batch(6)
    args = (params, b["x_t"], b["t"], b["text"], b["text_mask"])
    out32 = _apply(*args, model=Student(TINY))
    out16 = _apply(*args, model=Student(cfg16))
    chex.assert_shape(out16, out32.shape)
    chex.assert_type(out16, jnp.float32)
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert 0 < rel < 0.05, rel


def _leaf(tree, path, last):
    for key in path:
        tree = tree[key.key]
    return tree[last]


@pytest.mark.gpu
def test_cudnn_attention_matches_xla_with_text_masks():
    """On a GPU (bf16) "auto" attention is cuDNN; with cudnn_text_attention the cross-attention takes the
    text mask as key counts: output and gradients match the masked XLA path within bf16 rounding, for
    32, 20, 1 and 0 (no text) real tokens, and the padded text tokens get no gradient."""
    cfg = StudentConfig(hidden_size=128, depth=2, num_heads=2, dtype="bfloat16", scan_blocks=False,
                        cudnn_text_attention=True)
    assert jax.default_backend() == "gpu"
    b = _batch(7)
    mask = jnp.arange(TEXT_LEN)[None, :] < jnp.asarray([32, 20, 1, 0])[:, None]  # [B, L]
    xla = Student(dataclasses.replace(cfg, attention_impl="xla", cudnn_text_attention=False))
    cudnn = Student(cfg)  # auto -> cudnn on the GPU
    params = xla.init(jax.random.key(0), b["x_t"], b["t"], b["text"], mask)["params"]
    params = _perturbed(params, 8)  # the cross-attention output projection starts at zero

    def loss(model, params, text):
        out = model.apply({"params": params}, b["x_t"], b["t"], text, mask)
        return jnp.mean(out.astype(jnp.float32) ** 2), out

    results = {}
    for name, model in (("xla", xla), ("cudnn", cudnn)):
        grad = jax.jit(jax.grad(functools.partial(loss, model), argnums=(0, 1), has_aux=True))
        results[name] = grad(params, b["text"])
    (g_params_x, g_text_x), out_x = results["xla"]
    (g_params_c, g_text_c), out_c = results["cudnn"]
    chex.assert_shape(out_c, (BATCH, 16, 8, 8))

    def rel(a, b):
        return float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))

    print(f"cudnn vs xla: output rel {rel(out_c, out_x):.2e}, text grad rel {rel(g_text_c, g_text_x):.2e}")
    assert rel(out_c, out_x) < 2e-2
    assert rel(g_text_c, g_text_x) < 5e-2
    for (path, gc), gx in zip(jax.tree_util.tree_leaves_with_path(g_params_c), jax.tree.leaves(g_params_x)):
        name = jax.tree_util.keystr(path)
        if name.endswith("['k']['bias']"):
            # softmax is unchanged by a shift common to every key, so this gradient is zero but for
            # rounding on both paths (measured on an H100: 2e-5 per element, rel 0.05 between them);
            # compare the difference with the scale of the same projection's kernel gradient instead
            kernel = _leaf(g_params_x, path[:-1], "kernel")
            assert float(jnp.linalg.norm(gc - gx)) < 5e-2 * float(jnp.linalg.norm(kernel)), name
            continue
        assert rel(gc, gx) < 5e-2, (name, rel(gc, gx))
    padded = ~mask[..., None]  # [B, L, 1]
    assert float(jnp.max(jnp.abs(jnp.where(padded, g_text_c, 0)))) == 0.0, "cuDNN attended to padded text"
    assert float(jnp.max(jnp.abs(g_text_c[0]))) > 0


# ----------------------------------------------------------------------------- projection


@pytest.mark.parametrize("channels", [4, 32])
def test_projection_orthonormal_and_round_trip(channels):
    cfg = dataclasses.replace(TINY, latent_channels=channels, projection_seed=7)
    matrix = projection_matrix(channels, 16, seed=7)
    chex.assert_shape(matrix, (16, channels))
    small = min(channels, 16)
    gram = matrix.T @ matrix if channels <= 16 else matrix @ matrix.T
    np.testing.assert_allclose(gram, np.eye(small), atol=1e-6)
    np.testing.assert_array_equal(projection_matrix(channels, 16, seed=7), matrix)  # deterministic
    assert not np.allclose(projection_matrix(channels, 16, seed=8), matrix)  # the seed matters

    x = _normal(0, (2, channels, 4, 6))
    y = _normal(1, (2, 16, 4, 6))
    x16, y_c = to_teacher(x, cfg), from_teacher(y, cfg)
    chex.assert_shape(x16, (2, 16, 4, 6))
    chex.assert_shape(y_c, (2, channels, 4, 6))
    if channels <= 16:  # student space embeds isometrically
        chex.assert_trees_all_close(from_teacher(x16, cfg), x, atol=1e-5)
        chex.assert_trees_all_close(jnp.linalg.norm(x16), jnp.linalg.norm(x), rtol=1e-5)
    else:  # teacher space embeds isometrically
        chex.assert_trees_all_close(to_teacher(y_c, cfg), y, atol=1e-5)
    np.testing.assert_allclose(np.einsum("tc,bchw->bthw", matrix, np.asarray(x)), np.asarray(x16), atol=1e-5)


def test_projection_identity_and_errors():
    x = jnp.ones((1, 16, 2, 2))
    assert to_teacher(x, TINY) is x and from_teacher(x, TINY) is x
    np.testing.assert_array_equal(projection_matrix(16, 16, seed=3), np.eye(16))
    with pytest.raises(ValueError, match="expected 16 channels"):
        to_teacher(jnp.ones((1, 4, 2, 2)), TINY)
    with pytest.raises(ValueError, match="channels must be an int >= 1"):
        projection_matrix(0)


# ----------------------------------------------------------------------------- losses / noise


def test_sample_timesteps_and_noisy_latents():
    key = jax.random.PRNGKey(0)
    s = sample_timesteps(key, 4096, 3.0)
    chex.assert_shape(s, (4096,))
    u = jax.random.uniform(key, (4096,))
    chex.assert_trees_all_close(s, jnp.clip(3 * u / (1 + 2 * u), 1e-3, 1.0), atol=1e-6)
    assert float(s.min()) >= 1e-3 and float(s.max()) <= 1.0
    assert float(s.mean()) > float(sample_timesteps(key, 4096, 1.0).mean()) + 0.1  # shift moves mass up
    with pytest.raises(ValueError, match="shift must be a number > 0"):
        sample_timesteps(key, 4, 0.0)

    x0 = _normal(1, (3, 16, 4, 4))
    eps = _normal(2, (3, 16, 4, 4))
    x_t = noisy_latents(x0, eps, jnp.array([0.0, 0.25, 1.0]))
    chex.assert_shape(x_t, (3, 16, 4, 4))
    chex.assert_trees_all_close(x_t[0], x0[0])
    chex.assert_trees_all_close(x_t[1], 0.75 * x0[1] + 0.25 * eps[1])
    chex.assert_trees_all_close(x_t[2], eps[2])
    with pytest.raises(ValueError, match=r"s must be \[B\]"):
        noisy_latents(x0, eps, jnp.zeros((3, 1)))


def test_velocity_loss_in_teacher_space():
    cfg4 = dataclasses.replace(TINY, latent_channels=4)
    pred = _normal(0, (2, 4, 4, 4))
    target = _normal(1, (2, 16, 4, 4))
    loss = velocity_loss(pred, target, cfg4)
    chex.assert_shape(loss, ())
    pred16 = np.einsum("tc,bchw->bthw", projection_matrix(4, 16, 0), np.asarray(pred))  # [B, 16, H, W]
    expected = np.mean((pred16 - np.asarray(target)) ** 2)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(velocity_loss(pred, to_teacher(pred, cfg4), cfg4)) == 0.0
    with pytest.raises(ValueError, match="teacher space"):
        velocity_loss(pred, target[:, :, :2], cfg4)


def test_make_noisy_batch_is_a_function_of_rng_and_step():
    x0 = _normal(0, (3, 16, 4, 4))
    rng = jax.random.PRNGKey(42)
    batch = make_noisy_batch(rng, 7, x0, 3.0)
    chex.assert_shape([batch["x_t"], batch["eps"]], (3, 16, 4, 4))
    chex.assert_shape(batch["t"], (3,))
    s = batch["t"] / 1000.0
    chex.assert_trees_all_close(batch["x_t"], noisy_latents(x0, batch["eps"], s), atol=1e-6)
    chex.assert_trees_all_equal(make_noisy_batch(rng, 7, x0, 3.0), batch)
    assert not np.allclose(make_noisy_batch(rng, 8, x0, 3.0)["eps"], batch["eps"])


# ----------------------------------------------------------------------------- optimizer


def test_learning_rate_schedule():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, total_steps=110, end_lr_ratio=0.1)
    values = {step: float(learning_rate(cfg, step)) for step in (0, 9, 10, 60, 110, 1000)}
    expected = {0: 0.1, 9: 1.0, 10: 1.0, 60: 0.55, 110: 0.1, 1000: 0.1}
    for step, value in expected.items():
        assert values[step] == pytest.approx(value, abs=1e-6), (step, values)
    chex.assert_shape(learning_rate(cfg, jnp.arange(5)), (5,))


def test_optimizer_injects_the_schedule_in_micro_steps():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, total_steps=110, end_lr_ratio=0.1, grad_accum=2)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    tx = make_optimizer(cfg)
    update = jax.jit(tx.update)
    opt_state = tx.init(params)
    seen = []
    for _ in range(6):
        _, opt_state = update(params, opt_state, params)
        seen.append(float(current_learning_rate(opt_state)))
    # Updates close each window (calls 1, 3, 5) with counts 0, 1, 2 -> learning_rate(0), (2), (4);
    # in between the state keeps the rate of the last update (0.1 from init before any).
    np.testing.assert_allclose(seen, [0.1, 0.1, 0.1, 0.3, 0.3, 0.5], rtol=1e-6)
    assert np.isnan(float(current_learning_rate(())))


# ----------------------------------------------------------------------------- train_step


def test_train_step_shapes_and_metrics(state0, step_fn):
    batch = _batch(10)
    new_state, metrics = step_fn(_copy(state0), batch)
    assert isinstance(new_state, TrainState)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state0)
    assert set(metrics) == {"loss", "grad_norm", "lr", "skipped"}
    chex.assert_shape(list(metrics.values()), ())
    assert int(new_state.step) == 1 and int(metrics["skipped"]) == 0
    assert float(metrics["lr"]) == pytest.approx(OPTIM.lr)
    assert float(metrics["grad_norm"]) > 0
    # At init the prediction is 0, so the loss is the target's mean square.
    np.testing.assert_allclose(float(metrics["loss"]), float(jnp.mean(batch["target"] ** 2)), rtol=1e-5)
    # The rng is the run's key: train_step never consumes it (per-step keys come from fold_in).
    chex.assert_trees_all_equal(new_state.rng, state0.rng)
    with pytest.raises(KeyError, match=r"missing \['target'\]"):
        train_step(state0, {k: v for k, v in batch.items() if k != "target"}, model=Student(TINY),
                   tx=make_optimizer(OPTIM), ema_decay=0.9)
    with pytest.raises(ValueError, match="nan_policy"):
        train_step(state0, batch, model=Student(TINY), tx=make_optimizer(OPTIM), ema_decay=0.9, nan_policy="raise")


def test_train_step_is_pure_and_does_not_retrace(state0, step_fn):
    batch = _batch(11)
    first = step_fn(_copy(state0), batch)
    second = step_fn(_copy(state0), batch)
    chex.assert_trees_all_equal(first, second)  # bitwise
    # Feeding the outputs back (3 more steps, new data) must hit the same compiled program:
    # assert_max_traces(n=1) on step_fn raises on any retrace (dtype / weak-type / structure drift).
    state = first[0]
    for i in range(3):
        state, metrics = step_fn(state, _batch(100 + i))
    assert int(state.step) == 4 and int(metrics["skipped"]) == 0


def test_train_step_learns_toy_regression(state0, step_fn):
    """A fixed random function of (x_t, t, text) is learnt: the loss falls well below its start."""
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((16, 16)) / 4
    t_dir = rng.standard_normal(16)
    text_dir = rng.standard_normal((4096, 16)) / 64

    def toy_batch(seed):
        b = {k: np.asarray(v) for k, v in _batch(seed).items()}
        count = b["text_mask"].sum(axis=1, keepdims=True)  # [B, 1]
        pooled = np.where(b["text_mask"][..., None], b["text"], 0).sum(axis=1) / count  # [B, 4096]
        b["target"] = (
            np.einsum("dc,bchw->bdhw", mix, b["x_t"])
            + np.sin(3 * b["t"] / 1000)[:, None, None, None] * t_dir[None, :, None, None]
            + (pooled @ text_dir)[:, :, None, None]
        ).astype(np.float32)  # [B, 16, H, W]
        return {k: jnp.asarray(v) for k, v in b.items()}

    data = [toy_batch(i) for i in range(4)]
    state, losses = _copy(state0), []
    for i in range(48):
        state, metrics = step_fn(state, data[i % 4])
        losses.append(metrics["loss"])
    losses = np.asarray(jax.device_get(losses))
    assert np.isfinite(losses).all()
    start, end = losses[:4].mean(), losses[-8:].mean()
    assert end < 0.6 * start, (start, end, losses.round(3))


def test_nan_target_skips_the_update(state0, step_fn):
    warm, _ = step_fn(_copy(state0), _batch(12))
    before = _copy(warm)
    bad = _batch(13)
    bad["target"] = bad["target"].at[1, 2, 3, 4].set(jnp.nan)
    after, metrics = step_fn(warm, bad)
    assert int(metrics["skipped"]) == 1
    assert np.isnan(float(metrics["loss"]))
    assert int(after.step) == int(before.step) + 1
    chex.assert_trees_all_equal(after.replace(step=before.step), before)  # bitwise unchanged otherwise
    # An infinite target is caught too, and a good batch afterwards trains normally.
    bad["target"] = bad["target"].at[1, 2, 3, 4].set(jnp.inf)
    after2, metrics2 = step_fn(after, bad)
    assert int(metrics2["skipped"]) == 1
    after3, metrics3 = step_fn(after2, _batch(14))
    assert int(metrics3["skipped"]) == 0 and np.isfinite(float(metrics3["loss"]))
    assert not np.array_equal(after3.params["final_proj"]["kernel"], before.params["final_proj"]["kernel"])


def test_ema_follows_the_params(state0, step_fn):
    new_state, _ = step_fn(_copy(state0), _batch(15))
    decay = OPTIM.ema_decay
    expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state0.ema, new_state.params)
    chex.assert_trees_all_close(new_state.ema, expected, rtol=1e-6, atol=1e-7)
    layer = "final_proj"  # the only layer with a non-zero gradient at init
    assert not np.allclose(new_state.ema[layer]["kernel"], state0.ema[layer]["kernel"])
    assert not np.allclose(new_state.ema[layer]["kernel"], new_state.params[layer]["kernel"])


def test_grad_accumulation_matches_the_concatenated_batch(state0, step_fn):
    """2 micro-steps of 2 samples == 1 step of the 4 concatenated ones (two updates compared)."""
    cfg2 = dataclasses.replace(OPTIM, grad_accum=2)
    tx2 = make_optimizer(cfg2)
    state2 = _copy(state0).replace(opt_state=jax.jit(tx2.init)(state0.params))
    accum_step = jax.jit(
        functools.partial(train_step, model=Student(TINY), tx=tx2, ema_decay=OPTIM.ema_decay)
    )
    state1 = _copy(state0)
    for update in range(2):
        full = _batch(20 + update)
        halves = [jax.tree.map(lambda a, i=i: a[2 * i: 2 * i + 2], full) for i in range(2)]
        before = state2
        state2, _ = accum_step(state2, halves[0])
        # Mid-window: parameters and EMA untouched, the step counter moves.
        chex.assert_trees_all_equal(state2.params, before.params)
        chex.assert_trees_all_equal(state2.ema, before.ema)
        assert int(state2.step) == int(before.step) + 1
        state2, _ = accum_step(state2, halves[1])
        state1, _ = step_fn(state1, full)
    chex.assert_trees_all_close(state2.params, state1.params, atol=2e-6, rtol=1e-5)
    chex.assert_trees_all_close(state2.ema, state1.ema, atol=2e-6, rtol=1e-5)
    assert int(state2.step) == 4 and int(state1.step) == 2


def test_eval_velocity_error(state0):
    model = Student(TINY)
    batch = _batch(30)
    evaluate = jax.jit(functools.partial(eval_velocity_error, model=model))
    err = evaluate(state0.params, batch)
    chex.assert_shape(err, ())
    assert float(err) == pytest.approx(1.0, abs=1e-6)  # zero prediction: ||0 - y|| / ||y||
    params = _perturbed(state0.params, 31)
    pred = _apply(params, batch["x_t"], batch["t"], batch["text"], batch["text_mask"], model=model)
    exact = dict(batch, target=pred + 0.1 * batch["target"])
    expected = 0.1 * jnp.linalg.norm(batch["target"]) / jnp.linalg.norm(exact["target"])
    np.testing.assert_allclose(float(evaluate(params, exact)), float(expected), rtol=1e-4)


# ----------------------------------------------------------------------------- sampler


class LinearFlow(nn.Module):
    """A fake velocity model linear in x and t, with a text term: v = M x + (t/1000) b + mean_text * g."""

    channels: int = 16

    @nn.compact
    def __call__(self, x, t, text, text_mask):
        mix = self.param("mix", nn.initializers.zeros, (self.channels, self.channels))
        bias = self.param("bias", nn.initializers.zeros, (self.channels,))
        gain = self.param("gain", nn.initializers.zeros, (self.channels,))
        text_mean = jnp.mean(text, axis=(1, 2))  # [B]
        return (
            jnp.einsum("dc,bchw->bdhw", mix, x, precision=jax.lax.Precision.HIGHEST)
            + (t / 1000.0)[:, None, None, None] * bias[None, :, None, None]
            + text_mean[:, None, None, None] * gain[None, :, None, None]
        )  # [B, C, H, W]


class StraightLine(nn.Module):
    """The exact velocity (x - x0) / s of a one-point data set at x0: Euler lands on x0."""

    @nn.compact
    def __call__(self, x, t, text, text_mask):
        x0 = self.param("x0", nn.initializers.zeros, x.shape[1:])
        return (x - x0[None]) / (t / 1000.0)[:, None, None, None]


def _linear_flow_params(channels=16, seed=0):
    rng = np.random.default_rng(seed)
    mix = -0.6 * np.eye(channels) + 0.15 * rng.standard_normal((channels, channels))
    return {
        "mix": jnp.asarray(mix, jnp.float32),
        "bias": jnp.asarray(rng.standard_normal(channels), jnp.float32),
        "gain": jnp.asarray(0.5 * rng.standard_normal(channels), jnp.float32),
    }


@pytest.mark.parametrize("steps, shift", [(1, 5.0), (4, 5.0), (12, 5.0), (12, 1.0)])
def test_unipc_matches_the_torch_wan_scheduler(steps, shift):
    torch = pytest.importorskip("torch")
    from wan.utils.fm_solvers_unipc import FlowUniPCMultistepScheduler

    params = _linear_flow_params()
    noise = np.random.default_rng(1).standard_normal((2, 16, 4, 6)).astype(np.float32)
    text = np.random.default_rng(2).standard_normal((2, 3, 8)).astype(np.float32)
    mask = np.ones((2, 3), bool)

    scheduler = FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
    scheduler.set_timesteps(steps, device="cpu", shift=shift)
    timesteps, sigmas = sampling_schedule(steps, shift, "unipc")
    chex.assert_shape(timesteps, (steps,))
    chex.assert_shape(sigmas, (steps + 1,))
    np.testing.assert_array_equal(timesteps, scheduler.timesteps.numpy().astype(np.float32))
    np.testing.assert_array_equal(sigmas, scheduler.sigmas.numpy())

    mix, bias, gain = (torch.tensor(np.array(params[k])) for k in ("mix", "bias", "gain"))
    text_mean = torch.from_numpy(text).mean(dim=(1, 2))  # [B]
    x = torch.from_numpy(noise)
    for t in scheduler.timesteps:
        t_batch = torch.full((2,), float(t))
        v = (
            torch.einsum("dc,bchw->bdhw", mix, x)
            + (t_batch / 1000.0)[:, None, None, None] * bias[None, :, None, None]
            + text_mean[:, None, None, None] * gain[None, :, None, None]
        )
        x = scheduler.step(v, t, x, return_dict=False)[0]

    out = sample(params, LinearFlow(), jnp.asarray(noise), jnp.asarray(text), jnp.asarray(mask), steps, shift, "unipc")
    chex.assert_shape(out, noise.shape)
    np.testing.assert_allclose(np.asarray(out), x.numpy(), atol=2e-5, rtol=1e-5)


def test_euler_is_exact_on_straight_paths():
    x0 = _normal(0, (16, 4, 4))
    noise = _normal(1, (3, 16, 4, 4))
    text, mask = jnp.zeros((3, 2, 8)), jnp.ones((3, 2), bool)
    for shift in (1.0, 4.0):
        timesteps, sigmas = sampling_schedule(6, shift, "euler")
        assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and np.all(np.diff(sigmas) < 0)
        np.testing.assert_allclose(timesteps, 1000 * sigmas[:-1], rtol=1e-6)
        out = sample({"x0": x0}, StraightLine(), noise, text, mask, 6, shift, "euler")
        chex.assert_shape(out, (3, 16, 4, 4))
        chex.assert_trees_all_close(out, jnp.broadcast_to(x0, out.shape), atol=1e-5)


def test_sample_with_the_student(state0):
    params = _perturbed(state0.params, 40, scale=0.02)
    noise = _normal(41, (2, 16, 8, 8))
    b = _batch(42, batch=2)
    outs = {}
    for solver in ("euler", "unipc"):
        outs[solver] = sample(params, Student(TINY), noise, b["text"], b["text_mask"], 3, 3.0, solver)
        chex.assert_shape(outs[solver], (2, 16, 8, 8))
        chex.assert_tree_all_finite(outs[solver])
        assert not np.allclose(outs[solver], noise)
    with pytest.raises(ValueError, match="solver must be one of"):
        sample(params, Student(TINY), noise, b["text"], b["text_mask"], 3, 3.0, "ddim")
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        sample(params, Student(TINY), noise, b["text"], b["text_mask"], 0, 3.0, "euler")
