"""The Flax image student distilled from the Wan2.2 teacher.

Owns everything on the JAX side of the distillation: the student's config and presets
(`config`), the DiT-style model (`model`), the fixed channel projection into the teacher's
latent space (`projection`), flow-matching noise and the distillation loss (`losses`), the
optimizer (`optim`), the train state (`state`), the pure `train_step` (`train_step`), the
Euler / UniPC sampler (`sampler`) and orbax checkpointing (`checkpoint`).

Nothing here imports torch or `bridge`; tensors arrive as jax.Arrays. Latents are NCHW
[B, C, H, W] at every public API (H, W = latent size = image size / 8).
"""

from student_jax.config import PRESETS, OptimConfig, StudentConfig, student_preset
from student_jax.model import Student

__all__ = ["PRESETS", "OptimConfig", "Student", "StudentConfig", "student_preset"]
