"""The entry of a run: `train(cfg)` sets up the process grid and runs a `distill.distiller.Distiller`.

Before the Distiller builds anything heavy, the run's inputs are checked (`distill.preflight`, on
every rank; one rank's failure stops them all) and rank 0 takes the workdir's run lock
(`distill.runlock`), held until the run ends however it ends. SIGTERM is caught from the start: the
run saves a checkpoint at the next step boundary and exits. A disk that fills up while the run
writes becomes one `UserError` saying which checkpoints are kept.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from pathlib import Path

from . import errors, preflight
from .config import Config
from .distiller import Distiller, TrainingError
from .errors import UserError, describe, disk_full
from .runlock import RunLock

__all__ = ["TrainingError", "train"]


def _setup_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    absl = logging.getLogger("absl")
    absl.setLevel(logging.ERROR)  # orbax chatter about unrestored items
    for stale in [f for f in absl.filters if isinstance(f, _NoTraceback)]:  # one per process, not per run
        absl.removeFilter(stale)
    if not errors.debug:
        absl.addFilter(_NoTraceback())


class _NoTraceback(logging.Filter):
    """Drops the traceback orbax logs when a background save fails: the error is raised again in the
    main thread and reported there once (as `error: ...` when the user can fix it, e.g. a full disk)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


class _Stop:
    """SIGTERM sets a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.requested = None
        self._old = {}
        for sig in (signal.SIGTERM,):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def runtime(cfg: Config):
    """The process grid for `cfg` (torch.distributed + jax.distributed under torchrun)."""
    from bridge.runtime import Runtime

    gpu_bytes = cfg.train.gpu_memory_gb * 1e9 if cfg.train.gpu_memory_gb > 0 else None
    try:
        return Runtime.from_env(jax_memory_fraction=cfg.train.jax_memory_fraction, sp=cfg.teacher.sp,
                                gpu_memory_bytes=gpu_bytes)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


@contextlib.contextmanager
def _agreed(rt):
    """Run a block on every rank and stop every rank if it failed on any (else the others would wait
    for the failed rank in their first collective, forever). Rank 0 prints the error (its own, or the
    first failed rank's); the other ranks end quietly with the same exit status."""
    if rt.world_size == 1 or rt.torch_backend is None:  # nobody to tell
        yield
        return
    import torch.distributed as dist

    error = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised below, after every rank has heard of it
        error = exc
    message = None if error is None else (describe(error) or f"error: {type(error).__name__}: {error}")
    messages = [None] * rt.world_size
    dist.all_gather_object(messages, message)
    failed = [(rank, text) for rank, text in enumerate(messages) if text]
    if error is not None and (rt.is_main or describe(error) is None):
        raise error  # rank 0 reports its own error; a bug keeps its traceback on every rank
    if failed:
        rank, text = failed[0]
        raise UserError(f"rank {rank}: {text.removeprefix('error: ')}", quiet=not rt.is_main) from error


def _latest_checkpoint(workdir: Path) -> int | None:
    folder = workdir / "checkpoints"
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    return max(steps, default=None)


def _settle_checkpoints(distiller, timeout_s: float = 60.0) -> None:
    """Wait until no checkpoint write is in flight any more. When one item of an async save fails,
    orbax raises at once while the step's other items go on writing in background threads, and it
    has no public call that waits for them: its threads are joined here (they end within seconds)."""
    import threading
    import time

    checkpointer = getattr(distiller, "checkpointer", None)
    if checkpointer is not None:
        try:
            checkpointer.close()
        except Exception:  # noqa: BLE001 - the same failure again
            pass
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and type(thread).__module__.startswith("orbax"):
            thread.join(max(0.0, deadline - time.monotonic()))


def _remove_partial_checkpoints(workdir: Path) -> None:
    """Delete the half-written step orbax left behind (frees the space; a later save of that step
    would trip over it). Committed steps are never touched."""
    import shutil

    folder = workdir / "checkpoints"
    for partial in folder.glob("*.orbax-checkpoint-tmp*") if folder.is_dir() else []:
        shutil.rmtree(partial, ignore_errors=True)


def _disk_full_error(error: OSError, workdir: Path) -> UserError:
    where = f" while writing {error.filename}" if error.filename else ""
    step = _latest_checkpoint(workdir)
    kept = ("no checkpoint was written yet" if step is None
            else f"the checkpoints in {workdir / 'checkpoints'} are kept (latest: step {step})")
    return UserError(f"no space left on device{where}; {kept}",
                     "free some space or pass a --workdir / --data.cache_dir on a disk with room, then run the "
                     "same command again" + ("" if step is None else " to resume"))


def train(cfg: Config) -> dict:
    """Run (or resume) the distillation described by `cfg`; returns a summary of the run."""
    rt = runtime(cfg)
    with contextlib.ExitStack() as cleanup:  # undone in reverse: the lock, the signal handler, the grid
        cleanup.callback(rt.shutdown)
        _setup_logging(rt.is_main)
        stop = _Stop()  # from the start: a SIGTERM during setup stops at the first step boundary
        cleanup.callback(stop.restore)
        with _agreed(rt):
            preflight.check_inputs(cfg, rt)
            if rt.is_main:
                cleanup.enter_context(RunLock.acquire(preflight.check_workdir(cfg)))
                preflight.check_resume(cfg)
        distiller = None
        try:
            distiller = Distiller(cfg, rt, stop)
            return distiller.run()
        except Exception as error:  # noqa: BLE001 - only a full disk is translated; the rest goes on as is
            full = disk_full(error)
            if full is None:
                raise
            _settle_checkpoints(distiller)
            if rt.is_main:
                _remove_partial_checkpoints(Path(cfg.workdir))
            raise _disk_full_error(full, Path(cfg.workdir)) from error
