"""The entry of a run: `train(cfg)` sets up the process grid and runs a `distill.distiller.Distiller`.

SIGTERM is caught from the start: the run saves a checkpoint at the next step boundary and exits.
"""

from __future__ import annotations

import logging
import signal

from .config import Config
from .distiller import Distiller, TrainingError

__all__ = ["TrainingError", "train"]


def _setup_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax chatter about unrestored items


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


def train(cfg: Config) -> dict:
    """Run (or resume) the distillation described by `cfg`; returns a summary of the run."""
    rt = runtime(cfg)
    _setup_logging(rt.is_main)
    stop = _Stop()  # from the start: a SIGTERM during setup stops at the first step boundary
    try:
        return Distiller(cfg, rt, stop).run()
    finally:
        stop.restore()
        rt.shutdown()
