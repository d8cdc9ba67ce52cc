"""Torch <-> JAX tensor exchange through DLPack, and per-process <-> global JAX batches.

This module owns every crossing between the torch teacher and the JAX student:

* ``torch_to_jax`` / ``jax_to_torch``: one tensor, zero-copy (the result aliases the source's
  memory) whenever the source is contiguous and suitably aligned.
* ``jax_to_teacher_inputs`` / ``teacher_outputs_to_jax``: the batch layouts each side wants
  (the Wan teacher takes and returns a list of ``[C, 1, H, W]`` per-sample latents; the student
  works on ``[B, C, H, W]``).
* ``local_to_global`` / ``global_to_local``: this process's batch shard <-> one global
  ``jax.Array`` sharded over the data axis of a mesh that spans all processes.

When a crossing copies (``copy_reason`` answers it for a given tensor). Measured with torch 2.13 /
jax 0.10.2 on CPU; zero-copy of whole fp32/bf16 tensors both ways, device pinning with 2 GPUs in
one process and the stream ordering below were checked with torch 2.11 / jax 0.11.2 on H100
(tests/test_bridge.py, ``gpu`` tests):

* Non-contiguous torch tensors are made contiguous first (one copy on the torch side; the JAX
  array then aliases that fresh buffer). How JAX treats strided DLPack input differs between
  versions; a dense row-major buffer is the one layout every jitted consumer takes as is.
* JAX's CPU client only aliases buffers aligned to 64 bytes; anything else it copies silently
  (and refuses with ``copy=False``). torch's CPU allocator returns 64-byte aligned memory, so
  whole tensors alias; a view at an odd offset (``x[1:]``) does not. Such views are cloned on the
  torch side first (one copy, same cost as JAX's own) so that the result always aliases a torch
  buffer and the behaviour does not depend on the jax version. On CUDA the same is done below
  256 bytes (cudaMalloc's guarantee, which XLA's kernels may assume of their inputs). That
  threshold is a conservative choice, not a measured JAX limit; batch-row views of latents
  (offsets in multiples of C*H*W*itemsize bytes, a multiple of 256 for any real latent size)
  stay zero-copy.
* Dtypes are kept. float64 / int64 are refused rather than letting JAX (without x64) silently
  narrow them with a copy: convert on the torch side first.
* JAX arrays always export zero-copy.

Stream ordering on CUDA (why a DLPack'd buffer is safe to read without a device sync):

* torch -> JAX: ``jax.dlpack.from_dlpack`` hands JAX's stream to torch's ``__dlpack__(stream=...)``,
  and torch records an event on its *current stream of the tensor's device* that JAX's stream
  waits on. Work torch queued on that current stream is therefore ordered before JAX reads. Work
  on a side stream is not: join it into the current stream first
  (``torch.cuda.current_stream().wait_stream(side)``). The export runs under
  ``torch.cuda.device(tensor.device)`` because torch looks up "the current stream" on its current
  device, which JAX's initialisation may have moved (see DESIGN.md, measured on 2 GPUs).
* JAX -> torch: ``torch.from_dlpack`` passes torch's current stream of the array's device, and
  JAX makes that stream wait until the array's producing computation is done.
* Lifetimes: each side keeps the other's buffer alive while it holds a reference. A torch view
  of a JAX array must not be written to (JAX arrays are immutable; writes are undefined
  behaviour) and the JAX array must not be donated (``donate_argnums``) while torch still uses
  the view. Keep the JAX source alive until torch's work on the view has been handed back
  through ``torch_to_jax`` (which orders JAX's stream after it).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "SUPPORTED_TORCH_DTYPES",
    "copy_reason",
    "global_to_local",
    "jax_to_teacher_inputs",
    "jax_to_torch",
    "local_to_global",
    "teacher_outputs_to_jax",
    "torch_to_jax",
]

# Dtypes that cross unchanged in both directions. float64/int64 are missing on purpose: JAX without
# x64 would narrow them with a silent copy.
SUPPORTED_TORCH_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
)
_SUPPORTED_JAX_DTYPES = frozenset(
    np.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32, jnp.int8, jnp.uint8, jnp.bool_)
)
_NARROWING_HINT = {
    torch.float64: "convert with tensor.float() (or .bfloat16())",
    torch.int64: "convert with tensor.to(torch.int32)",
}

# Minimum address alignment (bytes) at which a buffer is aliased rather than copied.
# CPU: measured on jax 0.10.2, whose CPU client copies anything less aligned than 64 bytes.
# CUDA: cudaMalloc's guarantee; torch's caching allocator hands out blocks aligned at least that much.
ALIGNMENT_BYTES = {"cpu": 64, "cuda": 256}


def _device_guard(device: torch.device):
    """Make ``device`` torch's current CUDA device for the duration (no-op on CPU).

    torch's ``__dlpack__`` records its stream event on the current device's stream and refuses to
    export a tensor of another device; JAX's initialisation can move the current device.
    """
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _check_torch_tensor(tensor: torch.Tensor, what: str = "tensor") -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type not in ALIGNMENT_BYTES:
        raise ValueError(
            f"{what} is on device {tensor.device}; only CPU and CUDA tensors can be shared with JAX "
            "(move it with .cpu() or .cuda() first)"
        )
    if tensor.dtype not in SUPPORTED_TORCH_DTYPES:
        hint = _NARROWING_HINT.get(tensor.dtype, "convert it to one of the supported dtypes first")
        supported = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_TORCH_DTYPES)
        raise TypeError(f"{what} has dtype {tensor.dtype}, which the bridge does not carry ({supported}); {hint}")
    if tensor.is_conj() or tensor.is_neg():
        raise ValueError(f"{what} has a lazy conj/neg bit set; materialise it with .resolve_conj().resolve_neg()")


def copy_reason(tensor: torch.Tensor) -> str | None:
    """Why ``torch_to_jax(tensor)`` would copy, or ``None`` when the result will alias ``tensor``."""
    _check_torch_tensor(tensor)
    if not tensor.is_contiguous():
        return f"non-contiguous (shape {tuple(tensor.shape)}, strides {tensor.stride()}): made contiguous first"
    alignment = ALIGNMENT_BYTES[tensor.device.type]
    if tensor.numel() > 0 and tensor.data_ptr() % alignment != 0:
        return (
            f"data pointer {tensor.data_ptr():#x} is not {alignment}-byte aligned "
            f"(a view at an offset into a larger buffer): cloned first"
        )
    return None


def torch_to_jax(tensor: torch.Tensor) -> jax.Array:
    """Share a torch tensor with JAX; the result aliases ``tensor``'s memory unless ``copy_reason`` says otherwise.

    Args:
      tensor: a CPU or CUDA tensor of a dtype in ``SUPPORTED_TORCH_DTYPES``, any shape. A tensor
        that requires grad is detached (gradients never flow into JAX).
    Returns:
      A ``jax.Array`` of the same shape and dtype on the JAX device of ``tensor``'s device (same CUDA
      ordinal). Writes to ``tensor`` after the call show through it: treat ``tensor`` as frozen.
    """
    _check_torch_tensor(tensor)
    tensor = tensor.detach()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()  # fresh allocation, so aligned: the only copy
    elif copy_reason(tensor) is not None:
        tensor = tensor.clone(memory_format=torch.contiguous_format)  # fresh, aligned allocation
    with _device_guard(tensor.device):
        return jax.dlpack.from_dlpack(tensor)


def _single_device(array: jax.Array, what: str):
    if not isinstance(array, jax.Array):
        raise TypeError(f"{what} must be a jax.Array, got {type(array).__name__}")
    devices = array.devices()
    if len(devices) != 1 or not array.is_fully_addressable:
        raise ValueError(
            f"{what} is spread over {len(devices)} devices (sharding {array.sharding}); DLPack shares one "
            "buffer: take this process's shard with bridge.dlpack.global_to_local first"
        )
    (device,) = devices
    return device


def jax_to_torch(array: jax.Array) -> torch.Tensor:
    """Share a single-device JAX array with torch, zero-copy.

    Args:
      array: a ``jax.Array`` on one CPU or CUDA device, dtype in the supported set.
    Returns:
      A contiguous torch tensor aliasing ``array``'s buffer, on the same device (``cuda:<ordinal>``).
      Do not write to it, and do not donate ``array`` while the tensor is in use.
    """
    device = _single_device(array, "array")
    if np.dtype(array.dtype) not in _SUPPORTED_JAX_DTYPES:
        raise TypeError(f"array has dtype {array.dtype}, which the bridge does not carry; cast it first (array.astype)")
    if device.platform == "cpu":
        torch_device = torch.device("cpu")
    elif device.platform in ("gpu", "cuda"):
        torch_device = torch.device("cuda", device.local_hardware_id)
    else:
        raise ValueError(
            f"array is on a {device.platform} device ({device}); only CPU and CUDA arrays can be shared with torch"
        )
    with _device_guard(torch_device):
        return torch.from_dlpack(array)


def teacher_outputs_to_jax(
    outputs: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...], *, channels: int | None = 16
) -> jax.Array:
    """Teacher output(s) -> one ``[B, channels, H, W]`` JAX array on the outputs' device.

    Args:
      outputs: what ``WanT2V.denoise`` returns, in any of three layouts:
        a list of per-sample ``[C, 1, H, W]`` tensors (stacked on the torch side: one copy into a
        fresh contiguous buffer, then zero-copy), a ``[B, C, 1, H, W]`` tensor, or a ``[B, C, H, W]``
        tensor (both zero-copy when contiguous; the size-1 frame axis is dropped as a view).
      channels: expected C (16 = the Wan VAE latent space); ``None`` skips the check.
    Returns:
      ``jax.Array`` [B, C, H, W] with the outputs' dtype.
    """
    if isinstance(outputs, (list, tuple)):
        if len(outputs) == 0:
            raise ValueError("teacher outputs list is empty: expected one [C, 1, H, W] tensor per sample")
        first = outputs[0]
        _check_torch_tensor(first, "teacher output 0")
        for index, sample in enumerate(outputs):
            _check_torch_tensor(sample, f"teacher output {index}")
            if sample.dim() != 4 or sample.shape[1] != 1:
                raise ValueError(
                    f"teacher output {index} has shape {tuple(sample.shape)}; expected [C, 1, H, W] "
                    "(one 1-frame latent per sample)"
                )
            mismatches = [
                f"{name} {getattr(sample, name)} != {getattr(first, name)}"
                for name in ("shape", "dtype", "device")
                if getattr(sample, name) != getattr(first, name)
            ]
            if mismatches:
                raise ValueError(
                    f"teacher output {index} does not match output 0: {'; '.join(mismatches)}. "
                    "All samples of a batch must share shape, dtype and device"
                )
        with torch.no_grad():
            batch = torch.stack([sample.detach()[:, 0] for sample in outputs])  # [B, C, H, W]
    else:
        _check_torch_tensor(outputs, "teacher outputs")
        if outputs.dim() == 5:
            if outputs.shape[2] != 1:
                raise ValueError(
                    f"teacher outputs have shape {tuple(outputs.shape)} with {outputs.shape[2]} frames; "
                    "the distillation works on 1-frame latents [B, C, 1, H, W]"
                )
            batch = outputs[:, :, 0]  # [B, C, H, W]; still contiguous since the frame axis has size 1
        elif outputs.dim() == 4:
            batch = outputs
        else:
            raise ValueError(
                f"teacher outputs have shape {tuple(outputs.shape)}; expected [B, C, 1, H, W], [B, C, H, W] "
                "or a list of [C, 1, H, W]"
            )
    if channels is not None and batch.shape[1] != channels:
        raise ValueError(
            f"teacher outputs have {batch.shape[1]} channels (shape {tuple(batch.shape)}); expected {channels}"
        )
    return torch_to_jax(batch)


def jax_to_teacher_inputs(array: jax.Array, *, channels: int | None = 16) -> list[torch.Tensor]:
    """``[B, C, H, W]`` JAX batch -> list of B torch ``[C, 1, H, W]`` views (zero-copy), the teacher's input layout.

    Args:
      array: a single-device ``jax.Array`` [B, C, H, W] (for a global array, pass ``global_to_local(array)``).
      channels: expected C; ``None`` skips the check.
    Returns:
      B torch tensors, each a view into ``array``'s buffer: read-only by contract (see module docstring).
    """
    _single_device(array, "array")
    if array.ndim != 4:
        raise ValueError(f"expected a [B, C, H, W] latent batch, got shape {array.shape}")
    if channels is not None and array.shape[1] != channels:
        raise ValueError(
            f"latent batch has {array.shape[1]} channels (shape {array.shape}); the teacher takes {channels}: "
            "map student latents to teacher space first (student_jax.projection.to_teacher)"
        )
    batch = jax_to_torch(array)  # [B, C, H, W]
    return [sample.unsqueeze(1) for sample in batch]  # B x [C, 1, H, W] views


def _process_devices(mesh: Mesh, axis: str):
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has axes {mesh.axis_names}; no axis named {axis!r}")
    return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


def local_to_global(local: jax.Array, mesh: Mesh, axis: str = "data") -> jax.Array:
    """Assemble every process's local batch into one global array sharded over ``mesh``'s ``axis``.

    Every process must call this with the same local shape (collective in spirit: no data moves,
    but the global array only makes sense if all processes contribute). Process p's rows land at
    the rows its devices own in the mesh, so with ``Runtime.mesh`` process p's batch is global rows
    ``Runtime.batch_slice(global_batch)``.

    Args:
      local: this process's batch ``[B_local, ...]`` on one of its devices.
      mesh: a mesh whose devices include this process's devices (e.g. ``Runtime.mesh``).
      axis: the mesh axis the batch dimension is split over.
    Returns:
      ``jax.Array`` [B_local * num_processes_in_mesh, ...] with ``NamedSharding(mesh, P(axis))``.
      With one device per process the shard is ``local`` itself (zero-copy); with several local
      devices ``local`` is sliced and placed on each (copies).
    """
    _single_device(local, "local")
    if local.ndim == 0:
        raise ValueError("local must have a leading batch dimension, got a scalar")
    my_devices = _process_devices(mesh, axis)
    if not my_devices:
        raise ValueError(f"mesh {mesh} holds none of process {jax.process_index()}'s devices")
    num_processes = len({d.process_index for d in mesh.devices.flat})
    local_batch = local.shape[0]
    global_shape = (local_batch * num_processes,) + tuple(local.shape[1:])
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    index_map = sharding.addressable_devices_indices_map(global_shape)
    row_ranges = {device: index[0].indices(global_shape[0])[:2] for device, index in index_map.items()}
    first_row = min(start for start, _ in row_ranges.values())
    last_row = max(stop for _, stop in row_ranges.values())
    if last_row - first_row != local_batch:
        raise ValueError(
            f"this process's devices own global rows [{first_row}, {last_row}) of {global_shape[0]}, which is not "
            f"its {local_batch} local rows: order the mesh's {axis!r} axis by process (as Runtime.mesh does)"
        )
    if global_shape[0] % mesh.shape[axis] != 0:
        raise ValueError(
            f"global batch {global_shape[0]} is not divisible by the {mesh.shape[axis]} devices of mesh axis {axis!r}"
        )
    (source_device,) = local.devices()
    shards = []
    for device, (start, stop) in row_ranges.items():
        if (start, stop) == (first_row, last_row):
            piece = local
        else:
            piece = local[start - first_row : stop - first_row]
        if device != source_device:
            piece = jax.device_put(piece, device)
        shards.append(piece)
    return jax.make_array_from_single_device_arrays(global_shape, sharding, shards)


def global_to_local(array: jax.Array) -> jax.Array:
    """This process's part of a global array, as a single-device array (the inverse of ``local_to_global``).

    With one local shard this is that shard's buffer (zero-copy); replicated copies are counted once;
    several distinct local shards are concatenated along the batch axis on the first local device.
    """
    if not isinstance(array, jax.Array):
        raise TypeError(f"array must be a jax.Array, got {type(array).__name__}")
    if len(array.devices()) == 1 and array.is_fully_addressable:
        return array
    unique = {}
    for shard in array.addressable_shards:
        if array.ndim == 0:
            return shard.data  # a scalar is always replicated
        for dim, index in enumerate(shard.index[1:], start=1):
            if index.indices(array.shape[dim])[:2] != (0, array.shape[dim]):
                raise ValueError(
                    f"array is split along axis {dim} (sharding {array.sharding}); global_to_local only "
                    "gathers arrays split along the batch axis"
                )
        start = shard.index[0].indices(array.shape[0])[0]
        unique.setdefault(start, shard.data)
    pieces = [unique[start] for start in sorted(unique)]
    if len(pieces) == 1:
        return pieces[0]
    target = pieces[0].devices().pop()
    return jnp.concatenate([jax.device_put(piece, target) for piece in pieces], axis=0)
