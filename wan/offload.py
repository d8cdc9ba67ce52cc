"""Where the two DiT experts live: both on the GPU, or one at a time refilled from pinned host memory.

`ExpertResidency` is what upstream's `offload_model` means, made fast enough for training: in
"swap" mode each expert's weights are mirrored once in page-locked host memory; making an expert
resident copies its mirror to the GPU asynchronously (non_blocking, on torch's current stream, so
the copy overlaps with whatever else the GPU runs, e.g. the JAX student step) and evicting one just
drops its GPU storage: the experts are frozen, so nothing is ever copied back. One expert is
28.6 GB in bf16: a swap takes about 0.5 s each way on an H200 (DESIGN.md), which is why training
draws expert-phased batches (`distill`) so that swaps are rare.

Nothing here is distributed; FSDP-sharded experts are always resident (each rank holds 1/world).
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

__all__ = ["ExpertResidency", "pin_module"]

log = logging.getLogger(__name__)

MODES = ("resident", "swap")


def pin_module(module: nn.Module) -> nn.Module:
    """Move every parameter and buffer of a CPU module into page-locked memory, one tensor at a time
    (so the transient extra memory is one tensor, not a second copy of the model)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.device.type != "cpu":
            raise ValueError(f"pin_module needs a CPU module; found a tensor on {tensor.device}")
        if not tensor.is_pinned():
            pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            pinned.copy_(tensor.data)
            tensor.data = pinned
    return module


class ExpertResidency:
    """The experts by name ('high', 'low') and which of them is on `device`.

    mode "resident": every expert is moved to `device` once and stays. mode "swap": at most one
    expert is on `device`; the others live in pinned host memory (CUDA) or plain memory (CPU runs,
    where it changes nothing but the bookkeeping).
    """

    def __init__(self, experts: dict[str, nn.Module], device: torch.device, mode: str = "resident"):
        if mode not in MODES:
            raise ValueError(f"expert residency mode must be one of {MODES}, got {mode!r}")
        self.experts = experts
        self.device = torch.device(device)
        self.mode = mode
        self.active: str | None = None
        self.swaps = 0
        self.swap_seconds = 0.0  # host-side time spent issuing swaps (the copies run asynchronously)
        self._events: list = []
        self._mirrors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        if mode == "swap":
            for name, module in experts.items():
                module.to("cpu")
                if self.device.type == "cuda":
                    pin_module(module)
                self._mirrors[name] = [(t, t.data) for t in list(module.parameters()) + list(module.buffers())]

    def _on_device(self, name: str) -> bool:
        first = next(self.experts[name].parameters())
        return first.device == self.device or (self.device.type == "cuda" and first.is_cuda
                                               and first.device.index == self.device.index)

    def activate(self, name: str) -> nn.Module:
        """Expert `name`, resident on the device (evicting the other in swap mode)."""
        if name not in self.experts:
            raise KeyError(f"unknown expert {name!r}; have {sorted(self.experts)}")
        if self.mode == "resident":
            module = self.experts[name]
            if not self._on_device(name):
                module.to(self.device)
            self.active = name
            return module
        if self.active != name:
            self._swap_in(name)
        return self.experts[name]

    prefetch = activate  # issuing the copies is asynchronous: calling it early overlaps the swap

    def _swap_in(self, name: str) -> None:
        start = time.perf_counter()
        if self.active is not None:  # drop the other expert's device storage (frozen: no copy back)
            for tensor, mirror in self._mirrors[self.active]:
                tensor.data = mirror
        if self.device.type == "cuda":
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
        for tensor, mirror in self._mirrors[name]:
            tensor.data = mirror.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((begin, end))
        self.active = name
        self.swaps += 1
        self.swap_seconds += time.perf_counter() - start

    def swap_ms(self) -> list[float]:
        """Device time of each swap so far (ms), measured with CUDA events; waits for pending ones."""
        out = []
        for begin, end in self._events:
            end.synchronize()
            out.append(begin.elapsed_time(end))
        return out

    def evict_all(self) -> None:
        """Leave no expert on the device (e.g. before decoding with the VAE)."""
        if self.mode == "swap":
            if self.active is not None:
                for tensor, mirror in self._mirrors[self.active]:
                    tensor.data = mirror
        else:
            for module in self.experts.values():
                module.to("cpu")
        self.active = None
