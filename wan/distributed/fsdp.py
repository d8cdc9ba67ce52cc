"""FSDP2 for the teacher: `fully_shard` per block and at the root, applied from outside the models.

Both experts (`shard_dit`) and the umT5 encoder (`shard_t5`) are sharded over a 1-D DeviceMesh that
spans every rank (not the dp x sp grid: a 2-D mesh would mean HSDP). Call them on a model built on
the meta device, then `wan.checkpoint.fill_module(model, source, device, local_view=fsdp_local_view)`
reads from the checkpoint only the rows each rank owns.

Precision: `MixedPrecisionPolicy(param_dtype=...)` with `cast_forward_inputs=False`, so the float32
inputs the DiT keeps in float32 (time embedding, modulation, the residual stream) are not cast at
block boundaries and a sharded forward computes exactly what the unsharded one does. With weights
already stored in the compute dtype (what `convert_model_dtype` does) the policy cast is a no-op.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["fsdp_local_view", "shard_dit", "shard_t5"]


def _policy(param_dtype: torch.dtype | None):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


def _shard_blocks(model: nn.Module, blocks, mesh, param_dtype, reshard_after_forward: bool) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    policy = _policy(param_dtype)
    blocks = list(blocks)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # the root holds the embeddings and the head; it stays gathered for the whole forward
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for current, following in zip(blocks, blocks[1:]):
        current.set_modules_to_forward_prefetch([following])  # all-gather block i+1 while i computes
    return model


def shard_dit(model: nn.Module, mesh, param_dtype: torch.dtype | None = None,
              reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 over `mesh` (1-D, all ranks): one unit per `WanAttentionBlock`, the rest at the root."""
    return _shard_blocks(model, model.blocks, mesh, param_dtype, reshard_after_forward)


def shard_t5(model: nn.Module, mesh, param_dtype: torch.dtype | None = None,
             reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 over `mesh` for the umT5 encoder: one unit per encoder block, embedding and norm at the root."""
    return _shard_blocks(model, model.blocks, mesh, param_dtype, reshard_after_forward)


def fsdp_local_view(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's storage of `tensor`, the first global row it holds) for `fill_module`.

    FSDP2 shards dim 0 like `torch.chunk`: rank r holds rows [r * ceil(n / world), ...), the last
    ranks possibly fewer or none. A plain tensor is held whole.
    """
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(tensor, DTensor):
        return tensor, 0
    placements = tensor.placements
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"fsdp_local_view handles dim-0 sharding on a 1-D mesh; got placements {placements}")
    mesh = tensor.device_mesh
    rows, world, rank = tensor.shape[0], mesh.size(), mesh.get_local_rank()
    chunk = math.ceil(rows / world)
    start = min(rank * chunk, rows)
    local = tensor.to_local()
    expected = max(0, min(chunk, rows - start))
    if local.shape[0] != expected:
        raise RuntimeError(f"FSDP shard of rank {rank} holds {local.shape[0]} rows of {rows}; expected {expected}")
    return local, start
