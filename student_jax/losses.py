"""Flow-matching noise for training and the distillation loss.

Owns `sample_timesteps` (shifted uniform noise levels), `noisy_latents` (the Wan interpolation
x_t = (1 - s) * x0 + s * eps) and `velocity_loss` (mean squared error against the teacher's
velocity, measured in the teacher's 16-channel space). Velocity distillation and CFG distillation
differ only in which target the trainer asks the teacher for, so both use this one loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from student_jax.projection import to_teacher

__all__ = ["S_MIN", "noisy_latents", "sample_timesteps", "velocity_loss"]

# Noise levels below this are clipped up: at s -> 0 the velocity target is pure -x0 and carries
# no information about the noise, and the teacher is never sampled there either.
S_MIN = 1e-3


def sample_timesteps(rng: jax.Array, batch: int, shift: float, band: jax.Array | None = None) -> jax.Array:
    """Noise levels s [batch] float32: u ~ U(0, 1), s = shift*u / (1 + (shift-1)*u), clipped to [1e-3, 1].

    shift > 1 moves mass towards high noise (the Wan2.2 A14B config samples with shift 12).
    band: optional [4] float32 (u_lo, u_hi, s_lo, s_hi): draw u ~ U(u_lo, u_hi) instead and clip s to
    [s_lo, s_hi], i.e. the same density restricted to one expert's range (expert-phased batches);
    the s clip keeps float rounding at the boundary from sending a sample to the other expert.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"sample_timesteps: batch must be an int >= 1, got {batch!r}")
    # shift may also be a traced scalar (a jitted trainer can pass it as an argument).
    if isinstance(shift, bool) or (isinstance(shift, (int, float)) and not shift > 0):
        raise ValueError(f"sample_timesteps: shift must be a number > 0, got {shift!r}")
    u = jax.random.uniform(rng, (batch,), dtype=jnp.float32)  # [B]
    if band is not None:
        u = band[0] + (band[1] - band[0]) * u
    s = shift * u / (1 + (shift - 1) * u)
    s = jnp.clip(s, S_MIN, 1.0)  # [B]
    if band is not None:
        s = jnp.clip(s, band[2], band[3])
    return s


def noisy_latents(x0: jax.Array, eps: jax.Array, s: jax.Array) -> jax.Array:
    """x_t = (1 - s) * x0 + s * eps for latents [B, C, H, W] and noise levels s [B]."""
    if x0.shape != eps.shape or x0.ndim != 4:
        raise ValueError(f"noisy_latents: x0 and eps must both be [B, C, H, W], got {x0.shape} and {eps.shape}")
    if s.shape != (x0.shape[0],):
        raise ValueError(f"noisy_latents: s must be [B] = [{x0.shape[0]}], got shape {s.shape}")
    s = s.astype(x0.dtype)[:, None, None, None]  # [B, 1, 1, 1]
    return (1 - s) * x0 + s * eps  # [B, C, H, W]


def velocity_loss(pred_student: jax.Array, target_teacher: jax.Array, cfg) -> jax.Array:
    """Mean squared error (float32 scalar) between to_teacher(pred) [B, 16, H, W] and the teacher's target.

    pred_student: the student's velocity [B, C, H, W]; target_teacher: the teacher's [B, 16, H, W];
    cfg: the StudentConfig (channels and projection seed).
    """
    pred = to_teacher(pred_student.astype(jnp.float32), cfg)  # [B, T, H, W]
    if pred.shape != target_teacher.shape:
        raise ValueError(
            f"velocity_loss: the student's prediction maps to {pred.shape} in teacher space but the target is "
            f"{target_teacher.shape}; both must be [B, {cfg.teacher_channels}, H, W] at the same latent size"
        )
    return jnp.mean(jnp.square(pred - target_teacher.astype(jnp.float32)))
