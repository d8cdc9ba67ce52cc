"""Torch <-> JAX bridge: DLPack tensor exchange (``bridge.dlpack``) and the process grid (``bridge.runtime``).

Importing this package initialises nothing: ``Runtime.from_env()`` must run before any JAX
computation, so no module here touches a JAX backend at import time.
"""

from bridge.dlpack import (
    SUPPORTED_TORCH_DTYPES,
    copy_reason,
    global_to_local,
    jax_to_teacher_inputs,
    jax_to_torch,
    local_to_global,
    teacher_outputs_to_jax,
    torch_to_jax,
)
from bridge.runtime import LaunchEnv, Runtime, read_launch_env

__all__ = [
    "SUPPORTED_TORCH_DTYPES",
    "LaunchEnv",
    "Runtime",
    "copy_reason",
    "global_to_local",
    "jax_to_teacher_inputs",
    "jax_to_torch",
    "local_to_global",
    "read_launch_env",
    "teacher_outputs_to_jax",
    "torch_to_jax",
]
