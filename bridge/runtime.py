"""The process grid: torch.distributed + jax.distributed in the same processes, one per GPU.

``Runtime`` is the one object that reads the launcher's environment (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and the one place that initialises
process groups, pins devices and builds the JAX mesh. Everything else asks it.

Order of initialisation in ``Runtime.from_env`` (each step needs the previous one):

1. Read and check the environment (nothing is initialised when it is inconsistent).
2. On CUDA, pin torch's current device to LOCAL_RANK and set XLA_PYTHON_CLIENT_PREALLOCATE=false
   and XLA_PYTHON_CLIENT_MEM_FRACTION *before* JAX starts: JAX reads them once, and by default it
   claims 75% of the GPU (measured on H100), leaving the torch teacher too little.
3. torch.distributed (NCCL on GPU, gloo on CPU) through torchrun's store at MASTER_PORT.
4. jax.distributed with its coordinator at MASTER_ADDR:MASTER_PORT+1; on GPU each process keeps
   only its own GPU (``local_device_ids=[LOCAL_RANK]``), so JAX never touches (and never moves
   torch's current device to) another process's GPU; on CPU, cross-process collectives use gloo.
5. Re-pin torch's device (JAX's start-up may have switched the CUDA current device) and build
   the mesh over all processes' devices, ordered by process so that mesh position p on the
   "data" axis holds rank p's batch slice (``batch_slice``).

A single process without launcher variables is world 1: no process groups, no jax.distributed.
On CUDA it still keeps JAX on its one GPU. Under torchrun with one process (WORLD_SIZE=1) the
same holds.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings

import jax
import numpy as np
import torch
import torch.distributed as dist
from jax.sharding import Mesh

__all__ = ["LaunchEnv", "Runtime", "read_launch_env"]

logger = logging.getLogger(__name__)

_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """The launcher's view of this process, checked for consistency."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None


def _int_var(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def read_launch_env() -> LaunchEnv:
    """Read RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; raise ValueError when they disagree.

    None of the rank variables set means a plain single process (world 1).
    """
    present = [name for name in _RANK_VARS if name in os.environ]
    if not present:
        return LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr=None, master_port=None)
    missing = [name for name in _RANK_VARS if name not in os.environ]
    if missing:
        raise ValueError(
            f"inconsistent launch environment: {', '.join(present)} set but {', '.join(missing)} not; "
            "launch with torchrun (which sets all of RANK, WORLD_SIZE, LOCAL_RANK) or unset them for one process"
        )
    rank, world_size, local_rank = (_int_var(name) for name in _RANK_VARS)
    if world_size < 1:
        raise ValueError(f"inconsistent launch environment: WORLD_SIZE={world_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"inconsistent launch environment: RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    local_limit = _int_var("LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in os.environ else world_size
    if not 0 <= local_rank < min(local_limit, world_size):
        raise ValueError(
            f"inconsistent launch environment: LOCAL_RANK={local_rank} is outside "
            f"[0, {min(local_limit, world_size)}) (WORLD_SIZE={world_size}, LOCAL_WORLD_SIZE={local_limit})"
        )
    master_addr = os.environ.get("MASTER_ADDR")
    master_port = _int_var("MASTER_PORT") if "MASTER_PORT" in os.environ else None
    if world_size > 1:
        if not master_addr or master_port is None:
            raise ValueError(
                f"inconsistent launch environment: WORLD_SIZE={world_size} needs MASTER_ADDR and MASTER_PORT "
                "(torchrun sets them)"
            )
        if not 0 < master_port < 65535:
            raise ValueError(f"MASTER_PORT={master_port} must be in [1, 65534]: JAX's coordinator uses MASTER_PORT+1")
    return LaunchEnv(rank, world_size, local_rank, master_addr, master_port)


def _jax_backends_initialized() -> bool:
    """Whether JAX already created its backends (after which env vars and device lists are fixed)."""
    try:
        from jax._src import xla_bridge  # no public query exists in jax 0.10 / 0.11

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return False  # unknown: jax.distributed.initialize raises its own error if too late


def _resolve_platform(device: str) -> str:
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "CUDA was requested but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); use device='cpu' or a CUDA build of torch"
        )
    return device


class Runtime:
    """This process's place in the grid: ranks, devices, and the global JAX mesh (axis ``"data"``).

    Attributes:
      rank, world_size, local_rank: as launched (0, 1, 0 for a plain process).
      torch_device: ``cuda:<local_rank>`` or ``cpu``; torch's current CUDA device is pinned to it.
      jax_device: this process's JAX device (the same GPU as ``torch_device`` on CUDA).
      mesh: ``jax.sharding.Mesh`` over every process's devices, axis ``"data"``, ordered by rank.
      torch_backend: ``"nccl"`` / ``"gloo"`` when a torch process group exists, else ``None``.
      dp, sp, dp_rank, sp_rank: the rank grid ``world = dp x sp``; rank = dp_rank * sp + sp_rank, so an
        sp group is ``sp`` consecutive ranks (the teacher's sequence-parallel group; the student is
        data-parallel over all ranks whatever sp is).
      torch_mesh: the torch ``DeviceMesh`` of shape (dp, sp), dims ("dp", "sp"), for the teacher
        (``None`` in a single process).

    Build it with ``Runtime.from_env()`` first thing in the process, before any JAX computation.
    """

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        local_rank: int,
        torch_device: torch.device,
        jax_device: jax.Device,
        mesh: Mesh,
        torch_backend: str | None = None,
        jax_distributed: bool = False,
        sp: int = 1,
        torch_mesh=None,
    ):
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.sp = sp
        self.dp = world_size // sp
        self.sp_rank = rank % sp
        self.dp_rank = rank // sp
        self.torch_mesh = torch_mesh
        self.usable_gpu_bytes = 0.0  # set by from_env on CUDA: what this process may use of its GPU
        self.torch_device = torch_device
        self.jax_device = jax_device
        self.mesh = mesh
        self.torch_backend = torch_backend
        self._jax_distributed = jax_distributed
        self._shut_down = False

    @property
    def is_main(self) -> bool:
        """True on rank 0: the process that logs, writes sample grids, etc."""
        return self.rank == 0

    @property
    def platform(self) -> str:
        """``"cuda"`` or ``"cpu"``."""
        return self.torch_device.type

    def __repr__(self) -> str:
        return (
            f"Runtime(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank}, "
            f"torch_device={self.torch_device}, jax_device={self.jax_device}, mesh_shape={dict(self.mesh.shape)}, "
            f"dp={self.dp}, sp={self.sp}, torch_backend={self.torch_backend})"
        )

    @classmethod
    def from_env(cls, jax_memory_fraction: float | None = 0.35, *, device: str = "auto", sp: int = 1,
                 gpu_memory_bytes: float | None = None) -> Runtime:
        """Set up torch.distributed, jax.distributed, device pinning and the mesh from the launcher's env.

        Args:
          jax_memory_fraction: on CUDA, the share of GPU memory JAX may take (XLA_PYTHON_CLIENT_MEM_FRACTION);
            the rest is the torch teacher's. ``None`` leaves the variable as the environment has it.
          device: ``"auto"`` (CUDA when torch sees a GPU), ``"cuda"`` (error if unavailable) or ``"cpu"``.
          sp: the teacher's sequence-parallel group size; must divide the world size (dp = world / sp).
          gpu_memory_bytes: on CUDA, the memory this process may use on its GPU (None: the whole card).
            torch is capped at (1 - jax_memory_fraction) of it (``set_per_process_memory_fraction``) and
            JAX at jax_memory_fraction of it, so both together stay within it (e.g. 80e9 to plan for an
            80 GB card on a larger one). ``usable_gpu_bytes`` says what was applied.
        """
        if jax_memory_fraction is not None and not 0.0 < jax_memory_fraction <= 1.0:
            raise ValueError(f"jax_memory_fraction must be in (0, 1], got {jax_memory_fraction}")
        launch = read_launch_env()
        if isinstance(sp, bool) or not isinstance(sp, int) or sp < 1 or launch.world_size % sp:
            raise ValueError(
                f"sequence-parallel size {sp!r} must be a positive divisor of the number of processes "
                f"({launch.world_size}): dp x sp = world; use --teacher.sp with one of "
                f"{[d for d in range(1, launch.world_size + 1) if launch.world_size % d == 0]}"
            )
        platform = _resolve_platform(device)
        multi_process = launch.world_size > 1
        jax_started = _jax_backends_initialized()
        if multi_process and jax_started:
            raise RuntimeError(
                "JAX was initialised before Runtime.from_env(): jax.distributed and the device list can no longer "
                "be set up. Call Runtime.from_env() first thing in the process, before any JAX computation"
            )
        if multi_process and dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is already initialised; Runtime.from_env() sets it up and must be called once per process"
            )

        if platform == "cuda":
            if launch.local_rank >= torch.cuda.device_count():
                raise RuntimeError(
                    f"LOCAL_RANK={launch.local_rank} but torch sees {torch.cuda.device_count()} GPU(s): "
                    "launch at most one process per visible GPU"
                )
            torch_device = torch.device("cuda", launch.local_rank)
            torch.cuda.set_device(torch_device)
            total = torch.cuda.get_device_properties(torch_device).total_memory
            usable = float(total if gpu_memory_bytes is None else min(gpu_memory_bytes, total))
            if jax_memory_fraction is not None and gpu_memory_bytes is not None:
                torch.cuda.set_per_process_memory_fraction(usable * (1 - jax_memory_fraction) / total, torch_device)
                jax_memory_fraction = jax_memory_fraction * usable / total
            if jax_started:
                warnings.warn(
                    "JAX was initialised before Runtime.from_env(): its GPU memory fraction and device list are "
                    "already fixed (JAX may hold most of the GPU). Call Runtime.from_env() first in the process",
                    RuntimeWarning,
                    stacklevel=2,
                )
            else:
                os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
                if jax_memory_fraction is not None:
                    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{jax_memory_fraction:g}"
                if not multi_process:
                    # jax.distributed does this for the multi-process case via local_device_ids.
                    jax.config.update("jax_cuda_visible_devices", str(launch.local_rank))
        else:
            torch_device = torch.device("cpu")
            usable = float(gpu_memory_bytes or 0.0)
            if not jax_started and torch.cuda.is_available():
                jax.config.update("jax_platforms", "cpu")  # device='cpu' forced on a GPU machine

        torch_backend = None
        if multi_process:
            torch_backend = "nccl" if platform == "cuda" else "gloo"
            dist.init_process_group(
                backend=torch_backend,
                init_method="env://",
                rank=launch.rank,
                world_size=launch.world_size,
                **({"device_id": torch_device} if platform == "cuda" else {}),
            )
            if platform == "cpu":
                jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(
                coordinator_address=f"{launch.master_addr}:{launch.master_port + 1}",
                num_processes=launch.world_size,
                process_id=launch.rank,
                **(
                    {"local_device_ids": [launch.local_rank]}
                    if platform == "cuda"
                    else {"cluster_detection_method": "deactivate"}
                ),
            )
            if jax.process_count() != launch.world_size or jax.process_index() != launch.rank:
                raise RuntimeError(
                    f"jax.distributed sees process {jax.process_index()} of {jax.process_count()}, "
                    f"torch rank {launch.rank} of {launch.world_size}"
                )

        jax_backend = "gpu" if platform == "cuda" else "cpu"
        try:
            local_devices = jax.local_devices(backend=jax_backend)
        except RuntimeError as error:
            raise RuntimeError(
                f"JAX has no {jax_backend} backend ({error}); on GPU machines install a CUDA build of jax"
            ) from None
        if platform == "cuda":
            torch.cuda.set_device(torch_device)  # JAX's start-up may have moved the CUDA current device
            matching = [d for d in local_devices if d.local_hardware_id == launch.local_rank]
            if not matching:
                raise RuntimeError(
                    f"JAX's local GPUs {local_devices} do not include GPU {launch.local_rank} (torch's {torch_device})"
                )
            jax_device = matching[0]
            # One GPU per process: the mesh holds each process's pinned GPU, not any extra GPU an
            # already-initialised JAX may see.
            mesh_devices = [jax_device] if not multi_process else jax.devices(jax_backend)
        else:
            jax_device = local_devices[0]
            mesh_devices = jax.devices(jax_backend)
        mesh_devices = sorted(mesh_devices, key=lambda d: (d.process_index, d.id))
        mesh = Mesh(np.array(mesh_devices), (DATA_AXIS,))
        torch_mesh = None
        if multi_process:
            from torch.distributed.device_mesh import init_device_mesh

            torch_mesh = init_device_mesh(platform, (launch.world_size // sp, sp), mesh_dim_names=("dp", "sp"))
        runtime = cls(
            rank=launch.rank,
            world_size=launch.world_size,
            local_rank=launch.local_rank,
            torch_device=torch_device,
            jax_device=jax_device,
            mesh=mesh,
            torch_backend=torch_backend,
            jax_distributed=multi_process,
            sp=sp,
            torch_mesh=torch_mesh,
        )
        runtime.usable_gpu_bytes = usable
        logger.info("%r", runtime)
        return runtime

    def batch_slice(self, global_batch: int) -> slice:
        """Rows of a global batch that this rank holds (contiguous, rank-ordered; matches ``local_to_global``)."""
        if isinstance(global_batch, bool) or not isinstance(global_batch, (int, np.integer)) or global_batch < 1:
            raise ValueError(f"global batch must be a positive integer, got {global_batch!r}")
        if global_batch % self.world_size != 0:
            raise ValueError(
                f"global batch {global_batch} is not divisible by the world size {self.world_size}; "
                f"use a multiple of {self.world_size}"
            )
        per_rank = global_batch // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def barrier(self) -> None:
        """Wait for every rank (host-side, through torch.distributed); a no-op in a single process."""
        if self.torch_backend is None or self._shut_down:
            return
        if self.torch_backend == "nccl":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    def shutdown(self) -> None:
        """Tear down the process groups (idempotent). Every rank must call it."""
        if self._shut_down:
            return
        self._shut_down = True
        if self.torch_backend is not None and dist.is_initialized():
            dist.destroy_process_group()
        if self._jax_distributed:
            jax.distributed.shutdown()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()
