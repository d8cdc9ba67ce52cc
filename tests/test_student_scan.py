"""The scanned student (StudentConfig.scan_blocks, the default) against the unrolled one.

Given the same per-layer weights both layouts compute the same function: outputs, gradients (with
and without remat) and a whole train_step (AdamW's weight-decay mask must skip stacked biases and
norm scales). `stack_blocks` / `unstack_blocks` convert between the layouts bitwise. The scan is
checked to stay a loop: the lowered program of a depth-12 student holds the block's matmuls once,
as many as a depth-2 one, where the unrolled program grows with depth.
"""

from __future__ import annotations

import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from student_jax.config import OptimConfig, StudentConfig, saved_student_fields
from student_jax.model import STACKED_BLOCKS, Student, stack_blocks, unstack_blocks
from student_jax.optim import make_optimizer
from student_jax.state import TrainState, create_train_state
from student_jax.train_step import train_step

CFG = StudentConfig(hidden_size=32, depth=3, num_heads=4, mlp_ratio=2.0, text_dim=24, max_text_len=8)
BATCH, HW, TEXT_LEN = 2, (4, 6), 5
# Tight: the same float32 ops in the same order; only XLA's fusion of the loop body may differ.
ATOL, RTOL = 1e-6, 1e-5


def _layouts(cfg: StudentConfig) -> tuple[Student, Student]:
    """(scanned, unrolled) students of one architecture."""
    return (Student(dataclasses.replace(cfg, scan_blocks=True)),
            Student(dataclasses.replace(cfg, scan_blocks=False)))


def _inputs(seed: int = 0, cfg: StudentConfig = CFG):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, cfg.latent_channels) + HW).astype(np.float32)  # [B, C, H, W]
    t = np.array([999.0, 212.5], np.float32)[:BATCH]  # [B]
    text = rng.standard_normal((BATCH, TEXT_LEN, cfg.text_dim)).astype(np.float32)  # [B, L, text_dim]
    mask = np.arange(TEXT_LEN)[None, :] < np.array([[TEXT_LEN], [2]])[:BATCH]  # [B, L]
    return tuple(jnp.asarray(a) for a in (x, t, text, mask))


def _unrolled_params(cfg: StudentConfig, seed: int = 0) -> dict:
    """Random unrolled parameters, the zero-initialised layers (adaLN-Zero, outputs) too."""
    _, unrolled = _layouts(cfg)
    params = jax.jit(unrolled.init)(jax.random.key(seed), *_inputs(cfg=cfg))["params"]
    rng = np.random.default_rng(seed + 1)
    return jax.tree.map(lambda p: np.asarray(p + 0.1 * rng.standard_normal(p.shape), np.float32), params)


def _max_err(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ------------------------------------------------------------------------------------ layout


def test_scanned_params_are_the_unrolled_ones_stacked():
    scanned, unrolled = _layouts(CFG)
    inputs = _inputs()
    p_scan = jax.eval_shape(scanned.init, jax.random.key(0), *inputs)["params"]
    p_unrolled = jax.eval_shape(unrolled.init, jax.random.key(0), *inputs)["params"]
    assert STACKED_BLOCKS in p_scan and not any(k.startswith("blocks_") for k in p_scan)
    assert sorted(k for k in p_unrolled if k.startswith("blocks")) == [f"blocks_{i}" for i in range(CFG.depth)]
    expected = jax.eval_shape(lambda p: stack_blocks(p, CFG.depth), p_unrolled)
    chex.assert_trees_all_equal_shapes_and_dtypes(p_scan, expected)
    chex.assert_shape(p_scan[STACKED_BLOCKS]["self_attn"]["q"]["kernel"],
                      (CFG.depth, CFG.hidden_size, CFG.num_heads, CFG.head_dim))
    chex.assert_shape(p_scan[STACKED_BLOCKS]["norm2"]["bias"], (CFG.depth, CFG.hidden_size))
    # split_rngs: every layer starts from its own draw (equal layers would stay equal in training)
    q = np.asarray(jax.jit(scanned.init)(jax.random.key(0), *inputs)["params"][STACKED_BLOCKS]["self_attn"]["q"]["kernel"])
    assert all(not np.array_equal(q[0], q[i]) for i in range(1, CFG.depth))


def test_stack_and_unstack_round_trip_bitwise():
    params = _unrolled_params(CFG)
    stacked = stack_blocks(params, CFG.depth)
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(stacked))  # numpy stays on the host
    back = unstack_blocks(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert unstack_blocks(params) is params  # already unrolled
    with pytest.raises(ValueError, match=r"missing \['blocks_2'\]"):
        stack_blocks({k: v for k, v in params.items() if k != "blocks_2"}, CFG.depth)
    with pytest.raises(ValueError, match=r"unexpected \['blocks_2'\]"):
        stack_blocks(params, CFG.depth - 1)


# ------------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("remat, policy", [(False, "full"), (True, "full"), (True, "dots")],
                         ids=["plain", "remat", "remat-dots"])
def test_scanned_matches_unrolled_forward_and_gradients(remat, policy):
    cfg = dataclasses.replace(CFG, remat=remat, remat_policy=policy)
    scanned, unrolled = _layouts(cfg)
    p_unrolled = _unrolled_params(cfg)
    p_scan = stack_blocks(p_unrolled, cfg.depth)
    inputs = _inputs(1)

    def loss(model, params):
        return jnp.mean(model.apply({"params": params}, *inputs) ** 2)

    out_scan = jax.jit(scanned.apply)({"params": p_scan}, *inputs)
    out_unrolled = jax.jit(unrolled.apply)({"params": p_unrolled}, *inputs)
    chex.assert_shape([out_scan, out_unrolled], (BATCH, cfg.latent_channels) + HW)
    chex.assert_type([out_scan, out_unrolled], jnp.float32)
    assert float(jnp.mean(jnp.abs(out_unrolled))) > 0.1, "degenerate case: the output is almost zero"
    print(f"scan vs unrolled (remat={remat}): max abs err {_max_err(out_scan, out_unrolled):.3g}")
    np.testing.assert_allclose(out_scan, out_unrolled, atol=ATOL, rtol=RTOL)

    g_scan = jax.jit(jax.grad(lambda p: loss(scanned, p)))(p_scan)
    g_unrolled = jax.jit(jax.grad(lambda p: loss(unrolled, p)))(p_unrolled)
    g_unrolled = stack_blocks(g_unrolled, cfg.depth)
    chex.assert_trees_all_equal_shapes_and_dtypes(g_scan, g_unrolled)
    print(f"gradients (remat={remat}): max abs err {_max_err(g_scan, g_unrolled):.3g}")
    chex.assert_trees_all_close(g_scan, g_unrolled, atol=ATOL, rtol=RTOL)


def test_optimizer_update_is_the_same_in_both_layouts():
    """AdamW with weight decay on the same gradients: the stacked update is the unrolled one stacked, to
    the bit. Fails if the decay mask took a stacked bias or norm scale [depth, D] for a matrix."""
    optim = OptimConfig(lr=1e-2, warmup_steps=0, total_steps=10, end_lr_ratio=1.0, weight_decay=0.5)
    tx = make_optimizer(optim)
    params = jax.tree.map(jnp.asarray, _unrolled_params(CFG, seed=4))
    grads = jax.tree.map(jnp.asarray, _unrolled_params(CFG, seed=5))

    def update(p, g):
        updates, _ = tx.update(g, tx.init(p), p)
        return updates

    expected = stack_blocks(jax.device_get(jax.jit(update)(params, grads)), CFG.depth)
    got = jax.jit(update)(stack_blocks(params, CFG.depth), stack_blocks(grads, CFG.depth))
    chex.assert_trees_all_equal(jax.device_get(got), expected)


def test_train_step_is_the_same_in_both_layouts():
    """One train_step from equal parameters: the same loss and gradient norm, and the same parameters
    after it up to Adam's first-step sensitivity (about lr * sign(g): a gradient within rounding of 0
    can move by up to lr, so the parameters are compared at lr / 20)."""
    optim = OptimConfig(lr=1e-2, warmup_steps=0, total_steps=10, end_lr_ratio=1.0, weight_decay=0.5, ema_decay=0.9)
    scanned, unrolled = _layouts(CFG)
    tx = make_optimizer(optim)
    x, t, text, mask = _inputs(2)
    target = jnp.asarray(np.random.default_rng(3).standard_normal(x.shape), jnp.float32)  # [B, 16, H, W]
    batch = {"x_t": x, "t": t, "text": text, "text_mask": mask, "target": target}

    def state_of(params):
        params = jax.tree.map(jnp.asarray, params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          ema=jax.tree.map(jnp.copy, params), rng=jnp.zeros((2,), jnp.uint32))

    def step(model, state):
        return jax.jit(lambda s: train_step(s, batch, model=model, tx=tx, ema_decay=optim.ema_decay))(state)

    p_unrolled = _unrolled_params(CFG, seed=4)
    new_unrolled, m_unrolled = step(unrolled, state_of(p_unrolled))
    new_scan, m_scan = step(scanned, state_of(stack_blocks(p_unrolled, CFG.depth)))
    np.testing.assert_allclose(m_scan["loss"], m_unrolled["loss"], rtol=RTOL)
    np.testing.assert_allclose(m_scan["grad_norm"], m_unrolled["grad_norm"], rtol=RTOL)
    expected = stack_blocks(jax.tree.map(np.asarray, new_unrolled.params), CFG.depth)
    print(f"params after one step: max abs err {_max_err(new_scan.params, expected):.3g} (lr {optim.lr})")
    chex.assert_trees_all_close(new_scan.params, expected, atol=optim.lr / 20, rtol=0)


# ------------------------------------------------------------------------------------ compile size


def _block_matmuls(cfg: StudentConfig, depth: int, policy: str = "full") -> tuple[int, str]:
    """(dot_general ops, program text) of the lowered (not compiled) forward + backward of a remat student."""
    cfg = dataclasses.replace(cfg, depth=depth, remat=True, remat_policy=policy)
    model = Student(cfg)
    inputs = _inputs(cfg=cfg)
    params = jax.eval_shape(model.init, jax.random.key(0), *inputs)

    def loss(variables):
        return jnp.mean(model.apply(variables, *inputs) ** 2)

    text = jax.jit(jax.grad(loss)).lower(params).as_text()
    return len(re.findall(r"\bdot_general\b", text)), text


def test_scan_keeps_deep_students_one_loop():
    """The program of a depth-12 scanned student holds the block once: a while loop, and exactly as many
    matmuls as depth 2; the unrolled one repeats them per block (which is why its compile time grows)."""
    cfg = dataclasses.replace(CFG, scan_blocks=True)
    shallow, _ = _block_matmuls(cfg, 2)
    deep, text = _block_matmuls(cfg, 12)
    assert re.search(r"stablehlo\.while|\bwhile\b", text), "no while loop in the lowered scanned student"
    assert deep == shallow, f"scanned student: {shallow} matmuls at depth 2, {deep} at depth 12 (unrolled?)"
    unrolled = dataclasses.replace(CFG, scan_blocks=False)
    assert _block_matmuls(unrolled, 12)[0] > 3 * _block_matmuls(unrolled, 2)[0]  # the measure does see unrolling


# ------------------------------------------------------------------------------------ config


def test_scan_is_the_default_and_old_runs_read_unrolled():
    assert StudentConfig().scan_blocks is True
    saved = {k: v for k, v in dataclasses.asdict(StudentConfig(scan_blocks=False)).items() if k != "scan_blocks"}
    assert saved_student_fields(saved) == dataclasses.asdict(StudentConfig(scan_blocks=False))
    assert saved_student_fields({**saved, "scan_blocks": True})["scan_blocks"] is True


def test_create_train_state_in_the_scanned_layout():
    state = create_train_state(dataclasses.replace(CFG, depth=2), OptimConfig(), jax.random.key(0), HW, TEXT_LEN)
    chex.assert_shape(state.params[STACKED_BLOCKS]["mlp"]["fc1"]["kernel"], (2, CFG.hidden_size, CFG.mlp_hidden))
    chex.assert_trees_all_equal_structs(state.params, state.ema)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_remat_dots_policy_keeps_the_dense_layers(scan):
    """remat_policy="dots" keeps the dense layers' outputs, so the backward pass reruns none of them:
    the program holds 11 matmuls fewer per block than "full" remat (adaLN 1, self-attention q k v out 4,
    cross-attention q k v out 4, MLP 2); the attention einsums have batch dimensions and are rerun by
    both. A scanned program holds one block, an unrolled one `depth`."""
    cfg = dataclasses.replace(CFG, scan_blocks=scan)
    depth = 3
    full, _ = _block_matmuls(cfg, depth, "full")
    dots, _ = _block_matmuls(cfg, depth, "dots")
    print(f"dot_general ops in forward + backward: full remat {full}, dots {dots}")
    assert full - dots == 11 * (1 if scan else depth), f"full remat {full} matmuls, dots {dots}"
