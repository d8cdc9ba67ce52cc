"""The teacher's view of the rank grid: FSDP mesh, sequence-parallel group, and the collectives the
pipeline needs (expert agreement, gathering an sp group's samples).

`TeacherParallel` is built from the 2-D `(dp, sp)` DeviceMesh that `bridge.Runtime` owns (ranks
r = dp_rank * sp + sp_rank), or, for upstream-style scripts that only called
`dist.init_process_group`, from the world with `TeacherParallel.from_world(sp)`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["TeacherParallel"]


class TeacherParallel:
    """FSDP over all ranks, Ulysses inside groups of `sp` consecutive ranks.

    Attributes: world_size, rank, dp, sp, sp_rank, sp_group (None when sp == 1), fsdp_mesh (1-D over
    every rank), device_mesh (the 2-D (dp, sp) mesh).
    """

    def __init__(self, device_mesh):
        from torch.distributed.device_mesh import init_device_mesh

        if device_mesh.mesh_dim_names != ("dp", "sp"):
            raise ValueError(f"TeacherParallel needs a ('dp', 'sp') DeviceMesh; got dims {device_mesh.mesh_dim_names}")
        self.device_mesh = device_mesh
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.dp, self.sp = device_mesh.shape
        self.sp_rank = device_mesh.get_local_rank("sp")
        self.sp_group = device_mesh.get_group("sp") if self.sp > 1 else None
        self.device_type = device_mesh.device_type
        # FSDP shards over every rank; a 1-D mesh over the world reuses the default process group
        self.fsdp_mesh = init_device_mesh(self.device_type, (self.world_size,), mesh_dim_names=("fsdp",))

    @classmethod
    def from_world(cls, sp: int = 1, device_type: str | None = None) -> "TeacherParallel":
        """From an initialised default process group: dp = world / sp."""
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            raise RuntimeError(
                "dit_fsdp / t5_fsdp / use_sp need torch.distributed: launch with torchrun and call "
                "dist.init_process_group first (train.py does this through bridge.Runtime)"
            )
        world = dist.get_world_size()
        if sp < 1 or world % sp:
            raise ValueError(f"sequence parallel size {sp} must divide the world size {world}")
        if device_type is None:
            device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        return cls(init_device_mesh(device_type, (world // sp, sp), mesh_dim_names=("dp", "sp")))

    def __repr__(self) -> str:
        return f"TeacherParallel(world={self.world_size}, dp={self.dp}, sp={self.sp}, rank={self.rank})"

    def any_rank(self, flags: list[bool], device: torch.device) -> list[bool]:
        """Element-wise OR of `flags` over every rank (so all ranks run the same FSDP experts)."""
        values = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return [bool(v) for v in values.tolist()]

    def gather_sp(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate along dim 0 the tensors of every rank of this sp group (in sp-rank order)."""
        if self.sp_group is None:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.sp)]
        dist.all_gather(parts, tensor.contiguous(), group=self.sp_group)
        return torch.cat(parts)
