"""Distributed execution of the teacher, applied from outside the model files.

- `fsdp`: FSDP2 (`fully_shard` per block and at the root) for the DiT experts and umT5, and the
  local view that lets `wan.checkpoint.fill_module` read only each rank's rows.
- `sequence_parallel`: Ulysses sequence parallelism as a declared plan applied with hooks.
- `parallel`: `TeacherParallel`, the teacher's view of the dp x sp rank grid.
"""

from .fsdp import fsdp_local_view, shard_dit, shard_t5
from .parallel import TeacherParallel
from .sequence_parallel import WAN_DIT_SP_PLAN, SequenceParallelPlan, apply_sequence_parallel

__all__ = [
    "SequenceParallelPlan",
    "TeacherParallel",
    "WAN_DIT_SP_PLAN",
    "apply_sequence_parallel",
    "fsdp_local_view",
    "shard_dit",
    "shard_t5",
]
