"""torch.compile for the DiT, applied from outside the model (as FSDP and sequence parallelism are).

Each transformer block is compiled in place (`nn.Module.compile`: state-dict names and hooks stay
as they are), so Inductor fuses the block's elementwise work (layer norms, adaLN modulation, q/k RMS
norm, rotary embedding, the float32 gated residuals, GELU) into a few kernels around the cuBLAS
matmuls and the SDPA call. All blocks of both experts share one code object and, with modules
inlined (torch's default since 2.5), one compiled graph: the first forward compiles once (10-13 s at
A14B width on an H200), a later shape (another batch size) adds a dynamic-shape recompile of about as
long. Measured there: 1024x1024 forward 183 ms compiled vs 259 ms eager (README "Speed").

Applied after FSDP2 (torch.compile skips FSDP's hooks, which run eagerly) and after sequence
parallelism (its all-to-all hooks run eagerly too, splitting the block's graph at the attention
kernel). `resolve` is the `--teacher.compile` policy: "auto" compiles on CUDA, where it measures
faster (benchmarks, README "Speed"), and leaves CPU runs eager (compiling costs more there than a
short CPU run saves).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

__all__ = ["COMPILE_SETTINGS", "compile_dit", "resolve"]

log = logging.getLogger(__name__)

COMPILE_SETTINGS = ("auto", "on", "off")


def resolve(setting: str, device: torch.device) -> bool:
    """Whether `--teacher.compile <setting>` compiles a teacher running on `device`."""
    if setting not in COMPILE_SETTINGS:
        raise ValueError(f"teacher compile setting must be one of {COMPILE_SETTINGS}; got {setting!r}")
    if setting == "auto":
        return torch.device(device).type == "cuda"
    return setting == "on"


def compile_dit(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile every block of a `WanModel` in place; returns the model. `backend`: torch.compile's
    (tests trace with "aot_eager", which checks the graphs without generating kernels)."""
    # the blocks of two 40-layer experts are 80 modules: make sure per-module guards could never
    # exhaust the recompile budget and silently fall back to eager
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for block in model.blocks:
        block.compile(backend=backend)
    return model
