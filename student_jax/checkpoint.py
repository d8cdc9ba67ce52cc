"""Orbax checkpointing of the student's TrainState together with the run's resolved config.

Owns `Checkpointer`, a thin wrapper over ocp.CheckpointManager saving
ocp.args.Composite(state=StandardSave(state), config=JsonSave(config)) per step, keeping the
newest `max_to_keep`, saving the steps that are multiples of `save_interval_steps` (or when forced).

Guarantees and behaviour:
  * Atomic: orbax writes into a temporary directory and renames it on commit; a crash mid-save
    leaves no step directory that `latest_step()` would report.
  * Async by default: `save` returns after the device -> host copy; the write continues in the
    background (so donating the state to the next train_step right after is safe). `wait()`
    blocks until it is on disk; `close()` waits and releases the manager.
  * Multi-process: every process calls `save` / `restore` with its own shards; orbax coordinates.
  * Corrupt latest: `restore` tries the newest step first; if it cannot be read it logs a warning
    naming the step and the error and falls back to the next older one. Array names and shapes
    are compared with the checkpoint's metadata first, so restoring with the wrong model config
    fails with a message naming the mismatched arrays. Unreadable steps newer than
    the restored one are then moved (by process 0) into `<directory>/corrupt/` - kept for
    inspection, never deleted - because orbax would otherwise refuse to save those step numbers
    again and would skip every save up to them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "NoCheckpointError"]

logger = logging.getLogger(__name__)

_QUARANTINE_DIR = "corrupt"


class NoCheckpointError(FileNotFoundError):
    """Raised by Checkpointer.restore when the directory holds no (readable) checkpoint."""


def _short(error: Exception, limit: int = 400) -> str:
    # tensorstore errors embed whole JSON specs; the first few hundred characters name the problem.
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= limit else text[:limit] + " ..."


def _dotted(path) -> str:
    """A pytree key path in orbax's array naming: keys, attribute names and indices joined by dots."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)


def _absolute(directory) -> str:
    directory = os.fspath(directory)
    # Cloud paths (gs://...) are left alone; local ones must be absolute for orbax.
    return directory if "://" in directory else os.path.abspath(directory)


class Checkpointer:
    """Save / restore (TrainState, config dict) pairs under `directory`, one sub-directory per step."""

    def __init__(self, directory, max_to_keep: int | None = 3, save_interval_steps: int = 1, async_save: bool = True):
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ValueError(f"Checkpointer: max_to_keep must be None or an int >= 1, got {max_to_keep!r}")
        if not isinstance(save_interval_steps, int) or save_interval_steps < 1:
            raise ValueError(f"Checkpointer: save_interval_steps must be an int >= 1, got {save_interval_steps!r}")
        self.directory = _absolute(directory)
        self.save_interval_steps = save_interval_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            # Exactly "every save_interval_steps-th step": orbax's default policy would also save
            # the first step it is offered in an empty directory.
            should_save_fn=lambda step, _latest: step % save_interval_steps == 0,
            enable_async_checkpointing=async_save,
            create=True,
        )
        # Handlers named up front: a fresh process (a resumed run) can then read the items' metadata
        # before any save or restore, which `_check_layout` needs (without them it reads None).
        handlers = {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def save(self, step: int, state: Any, config: dict, force: bool = False) -> bool:
        """Save `state` (any pytree of arrays, normally a TrainState) and `config` (JSON-serialisable
        dict) as `step`. Returns False when the save interval says this step is not saved (unless
        force) or the step is not newer than the latest checkpoint (silently when it is that step)."""
        step = int(step)
        if not isinstance(config, dict):
            raise TypeError(f"Checkpointer.save: config must be a dict, got {type(config).__name__}")
        try:
            json.dumps(config)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"Checkpointer.save: config must be JSON-serialisable (plain str/int/float/bool/list/dict); {error}"
            ) from None
        latest = self._manager.latest_step()
        if latest is not None and step <= latest:
            if step < latest:  # step == latest is a harmless repeat (e.g. a forced save on exit)
                logger.warning(
                    "Checkpointer.save: step %d is older than the latest checkpoint %d; not saved", step, latest
                )
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config))
        return bool(self._manager.save(step, args=args, force=force))

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None when there is none."""
        return self._manager.latest_step()

    def restore(self, abstract_state: Any) -> tuple[Any, dict, int]:
        """Restore the newest readable checkpoint into the structure, dtypes and shardings of
        `abstract_state` (e.g. abstract_train_state(...) with shardings attached; leaves without a
        sharding land on the default device). Returns (state, config, step).

        Raises NoCheckpointError when there is no checkpoint or none can be read.
        """
        self._manager.reload()
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise NoCheckpointError(
                f"no checkpoint in {self.directory}; start a fresh run or point to another directory"
            )
        unreadable: list[int] = []
        errors: list[str] = []
        for step in steps:
            try:
                self._check_layout(step, abstract_state)
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore()
                    ),
                )
                state, config = restored["state"], restored["config"]
                if not isinstance(config, dict):
                    raise TypeError(f"its config is {type(config).__name__}, not a JSON object")
            except Exception as error:  # noqa: BLE001 - any failure to read makes the step unusable
                reason = _short(error)
                logger.warning(
                    "checkpoint step %d in %s cannot be restored (%s); falling back to an older checkpoint",
                    step, self.directory, reason,
                )
                unreadable.append(step)
                errors.append(f"step {step}: {reason}")
                continue
            if unreadable:
                self._quarantine(unreadable)
            return state, config, step
        raise NoCheckpointError(
            f"none of the checkpoints in {self.directory} could be restored:\n  " + "\n  ".join(errors)
        )

    def _check_layout(self, step: int, abstract_state: Any):
        """Compare array names and shapes with the checkpoint's metadata before reading any data.

        A run resumed with a different model config then fails with a message naming the arrays,
        instead of a tensorstore error from deep inside the restore. Shapes only: orbax casts dtypes.
        """
        try:
            metadata = self._manager.item_metadata(step)["state"]
        except Exception:  # noqa: BLE001 - unreadable metadata: the restore itself will report it
            return
        saved = {
            leaf.name: tuple(leaf.shape)
            for leaf in jax.tree.leaves(metadata)
            if hasattr(leaf, "name") and hasattr(leaf, "shape")
        }
        expected = {
            _dotted(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
        }
        if not saved or not set(saved) & set(expected):
            return  # metadata naming we do not understand: leave the verdict to the restore
        missing = sorted(set(expected) - set(saved))
        unexpected = sorted(set(saved) - set(expected))
        mismatched = [f"{name} saved {saved[name]} expected {expected[name]}"
                      for name in sorted(set(saved) & set(expected)) if saved[name] != expected[name]]
        if missing or unexpected or mismatched:
            parts = []
            for label, items in (("shape mismatches", mismatched), ("missing in checkpoint", missing),
                                 ("not in the abstract state", unexpected)):
                if items:
                    parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
            raise ValueError(
                "the abstract state does not match the checkpoint: " + "; ".join(parts)
                + "; was the run saved with a different model or optimizer config?"
            )

    def _quarantine(self, steps: list[int]):
        """Move unreadable step directories aside so orbax can save those step numbers again."""
        if jax.process_index() == 0:
            target_root = os.path.join(self.directory, _QUARANTINE_DIR)
            os.makedirs(target_root, exist_ok=True)
            for step in steps:
                source = os.path.join(self.directory, str(step))
                if not os.path.isdir(source):
                    logger.warning("cannot move unreadable checkpoint %s aside: not a local directory", source)
                    continue
                target = os.path.join(target_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(source, target)
                logger.warning("moved unreadable checkpoint step %d to %s", step, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("student_jax.checkpoint.quarantine")
        self._manager.reload()

    def wait(self):
        """Block until every pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self):
        """Wait for pending saves and release the manager's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info):
        self.close()
