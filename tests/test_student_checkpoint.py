"""Tests of student_jax/checkpoint.py: bitwise save/restore of a TrainState with its config,
keep-K and save intervals, falling back past a corrupt latest checkpoint (with a warning), and
the errors for empty directories, unreadable checkpoints and bad configs."""

from __future__ import annotations

import dataclasses
import glob
import logging
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from student_jax.checkpoint import Checkpointer, NoCheckpointError
from student_jax.config import OptimConfig, student_preset
from student_jax.state import TrainState, abstract_train_state, create_train_state

TINY = student_preset("tiny", scan_blocks=True)  # the scanned layout (every preset but tiny uses it)
# grad_accum=2: the optimizer state then holds optax.MultiStepsState around the injected AdamW,
# the deepest structure the trainer can produce.
OPTIM = OptimConfig(lr=2e-3, warmup_steps=0, total_steps=1000, end_lr_ratio=1.0, ema_decay=0.9, grad_accum=2)
LATENT_HW, TEXT_LEN = (8, 8), 32
CONFIG = {
    "student": dataclasses.asdict(TINY),
    "optim": dataclasses.asdict(OPTIM),
    "run": {"name": "t", "seeds": [1, 2]},
}


@pytest.fixture(scope="module")
def abstract() -> TrainState:
    return abstract_train_state(TINY, OPTIM, LATENT_HW, TEXT_LEN)


@pytest.fixture(scope="module")
def make_state():
    """state(n): a distinct, non-initial state per n (every leaf differs from init and from other n)."""
    base = create_train_state(TINY, OPTIM, jax.random.PRNGKey(0), LATENT_HW, TEXT_LEN)
    add = jax.jit(lambda tree, delta: jax.tree.map(jnp.add, tree, delta))  # one program, not 250 eager adds
    cache: dict[int, TrainState] = {}

    def state(n: int) -> TrainState:
        if n not in cache:
            rng = np.random.default_rng(n)

            def delta(leaf):
                if jnp.issubdtype(leaf.dtype, jnp.floating):
                    return rng.standard_normal(leaf.shape).astype(leaf.dtype)
                return np.full(leaf.shape, n, leaf.dtype)

            cache[n] = add(base, jax.tree.map(delta, base)).replace(step=jnp.asarray(n, jnp.int32))
        return cache[n]

    return state


def test_save_restore_is_bitwise(tmp_path, make_state, abstract):
    state = make_state(7)
    checkpointer = Checkpointer(tmp_path / "run", max_to_keep=3)
    assert checkpointer.latest_step() is None
    assert checkpointer.save(7, state, CONFIG) is True
    checkpointer.close()

    reopened = Checkpointer(tmp_path / "run")  # a new process resuming the run
    assert reopened.latest_step() == 7
    restored, config, step = reopened.restore(abstract)
    reopened.close()
    assert isinstance(restored, TrainState)
    chex.assert_trees_all_equal_shapes_and_dtypes(restored, state)
    chex.assert_trees_all_equal(restored, state)
    assert config == CONFIG and step == 7


def test_keep_k_and_save_interval(tmp_path, make_state):
    state = make_state(1)
    checkpointer = Checkpointer(tmp_path / "run", max_to_keep=2, save_interval_steps=2)
    saved = [checkpointer.save(step, state, CONFIG) for step in range(1, 7)]
    assert saved == [False, True, False, True, False, True]
    checkpointer.wait()
    assert checkpointer.all_steps() == [4, 6]
    assert checkpointer.save(7, state, CONFIG, force=True) is True  # e.g. the final step
    checkpointer.wait()
    assert checkpointer.all_steps() == [6, 7]
    assert checkpointer.save(7, state, CONFIG, force=True) is False  # already saved (e.g. again on exit)
    assert checkpointer.save(5, state, CONFIG, force=True) is False  # older than the latest
    checkpointer.close()
    assert sorted(os.listdir(tmp_path / "run")) == ["6", "7"]


def _corrupt(step_dir: str, kind: str):
    if kind == "array_data":
        files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
                 if os.path.isfile(f) and os.sep + "d" + os.sep in f]
        assert files, f"no array data files found under {step_dir}"
        for path in files:
            with open(path, "wb") as handle:
                handle.write(b"truncated")
    elif kind == "config_json":
        with open(os.path.join(step_dir, "config", "metadata"), "w") as handle:
            handle.write("{not json")
    else:
        raise AssertionError(kind)


# A failed tensorstore read leaves callbacks aimed at orbax's already-closed event loop; they
# print "Event loop is closed" (harmless, outside our code).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("kind", ["array_data", "config_json"])
def test_corrupt_latest_falls_back_with_a_warning(tmp_path, make_state, abstract, caplog, kind):
    directory = tmp_path / "run"
    checkpointer = Checkpointer(directory, max_to_keep=3)
    checkpointer.save(1, make_state(1), dict(CONFIG, at=1))
    checkpointer.save(2, make_state(2), dict(CONFIG, at=2))
    checkpointer.wait()
    _corrupt(str(directory / "2"), kind)

    with caplog.at_level(logging.WARNING, logger="student_jax.checkpoint"):
        restored, config, step = checkpointer.restore(abstract)
    assert step == 1 and config["at"] == 1
    chex.assert_trees_all_equal(restored, make_state(1))
    messages = [r.getMessage() for r in caplog.records if r.name == "student_jax.checkpoint"]
    assert any("step 2" in m and "cannot be restored" in m for m in messages), messages

    # The unreadable step was moved aside (not deleted), so training can save step 2 again.
    assert checkpointer.all_steps() == [1]
    assert len(os.listdir(directory / "corrupt")) == 1
    assert checkpointer.save(2, make_state(3), dict(CONFIG, at=3)) is True
    checkpointer.wait()
    restored, config, step = checkpointer.restore(abstract)
    assert step == 2 and config["at"] == 3
    chex.assert_trees_all_equal(restored, make_state(3))
    checkpointer.close()


def test_restore_and_save_errors(tmp_path, make_state, abstract):
    checkpointer = Checkpointer(tmp_path / "run")
    with pytest.raises(NoCheckpointError, match="no checkpoint in .*run"):
        checkpointer.restore(abstract)
    state = make_state(1)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        checkpointer.save(1, state, {"dtype": jnp.float32})
    with pytest.raises(TypeError, match="config must be a dict"):
        checkpointer.save(1, state, TINY)

    checkpointer.save(1, state, CONFIG)
    checkpointer.wait()
    # Restoring into the wrong model size fails on every step: an error listing them, and the
    # readable checkpoint is left where it is (a config mistake must not move good data aside).
    wrong = abstract_train_state(dataclasses.replace(TINY, hidden_size=32, num_heads=2), OPTIM, LATENT_HW, TEXT_LEN)
    with pytest.raises(NoCheckpointError, match="(?s)none of the checkpoints .* could be restored.*step 1.*"
                       r"shape mismatches \(e.g. ema.blocks\."):
        checkpointer.restore(wrong)
    assert checkpointer.all_steps() == [1]
    assert not os.path.exists(tmp_path / "run" / "corrupt")
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(tmp_path / "other", max_to_keep=0)
    checkpointer.close()


def test_the_other_block_layout_is_named_not_restored(tmp_path, abstract):
    """A checkpoint of unrolled blocks (scan_blocks=False, or a run from before the field existed) does not
    restore into the scanned layout; the error names both layouts' arrays, and the checkpoint stays where
    it is and restores unrolled. Read back by a fresh Checkpointer, as a resumed run does."""
    unrolled = dataclasses.replace(TINY, scan_blocks=False)
    with Checkpointer(tmp_path / "run") as writer:
        writer.save(1, create_train_state(unrolled, OPTIM, jax.random.PRNGKey(0), LATENT_HW, TEXT_LEN), CONFIG)
    checkpointer = Checkpointer(tmp_path / "run")
    with pytest.raises(NoCheckpointError, match=r"(?s)none of the checkpoints .* could be restored.*step 1: "
                       r"ValueError: the abstract state does not match the checkpoint: .*\bblocks\b.*\bblocks_0\b"):
        checkpointer.restore(abstract)  # the layout check (from the metadata) says it, not a deep tensorstore error
    assert checkpointer.all_steps() == [1] and not os.path.exists(tmp_path / "run" / "corrupt")
    state, _, step = checkpointer.restore(abstract_train_state(unrolled, OPTIM, LATENT_HW, TEXT_LEN))
    assert step == 1 and "blocks_1" in state.params and "blocks" not in state.params
    checkpointer.close()
