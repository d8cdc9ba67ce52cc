"""The fixed linear map between the student's latent channels and the teacher's (Wan VAE) channels.

A student with C != 16 latent channels (the seed's `[B, 4, H, W]` example) lives in a linear
image of the teacher's 16-channel VAE space. The map is fixed (never trained) and determined by
(C, T, seed): `projection_matrix` draws a Gaussian [T, C] (or [C, T]) matrix from numpy's PCG64
generator seeded with `seed` and orthonormalises it by QR with the sign convention diag(R) > 0, so
the same seed gives the same matrix on every machine and every JAX version.

  C <= T: P [T, C] has orthonormal columns (P^T P = I_C): to_teacher embeds the student space
          isometrically, from_teacher is the orthogonal projection back (pseudo-inverse P^T).
  C >  T: P [T, C] has orthonormal rows (P P^T = I_T): from_teacher embeds the teacher space,
          to_teacher is the projection (again pinv(P) = P^T).
  C == T: the identity, applied as no operation at all.

The matrix is a host numpy constant: under jit it becomes a literal in the graph, not a parameter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["from_teacher", "projection_matrix", "to_teacher"]


@functools.cache
def _cached_projection(channels: int, teacher_channels: int, seed: int) -> np.ndarray:
    if channels == teacher_channels:
        return np.eye(teacher_channels, dtype=np.float32)
    rng = np.random.Generator(np.random.PCG64(seed))
    tall = max(channels, teacher_channels)
    narrow = min(channels, teacher_channels)
    gaussian = rng.standard_normal((tall, narrow))  # [max, min], float64
    q, r = np.linalg.qr(gaussian)  # q [max, min] with orthonormal columns
    q = q * np.sign(np.diag(r))[None, :]  # unique QR: diag(R) > 0
    matrix = q if channels < teacher_channels else q.T  # [T, C]
    matrix = matrix.astype(np.float32)
    matrix.setflags(write=False)
    return matrix


def projection_matrix(channels: int, teacher_channels: int = 16, seed: int = 0) -> np.ndarray:
    """The fixed [teacher_channels, channels] float32 map from student to teacher channels.

    Orthonormal columns when channels <= teacher_channels, orthonormal rows otherwise; the
    identity when they are equal. Read-only (cached).
    """
    for name, value in (("channels", channels), ("teacher_channels", teacher_channels)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"projection_matrix: {name} must be an int >= 1, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"projection_matrix: seed must be an int >= 0, got {seed!r}")
    return _cached_projection(int(channels), int(teacher_channels), int(seed))


def _check_latents(x: jax.Array, channels: int, where: str, space: str):
    if getattr(x, "ndim", None) != 4:
        raise ValueError(
            f"{where}: expected {space} latents [B, {channels}, H, W], got shape {getattr(x, 'shape', None)}"
        )
    if x.shape[1] != channels:
        raise ValueError(
            f"{where}: expected {channels} channels ({space} space) in [B, C, H, W], got shape {tuple(x.shape)}"
        )


def to_teacher(x: jax.Array, cfg) -> jax.Array:
    """Student latents [B, C, H, W] -> teacher latents [B, T, H, W] (cfg: StudentConfig).

    Returns `x` itself when C == T.
    """
    channels, teacher = cfg.latent_channels, cfg.teacher_channels
    _check_latents(x, channels, "to_teacher", "student")
    if channels == teacher:
        return x
    matrix = jnp.asarray(projection_matrix(channels, teacher, cfg.projection_seed), dtype=x.dtype)
    # HIGHEST: keep the fixed map exact on GPUs whose default matmul precision is TF32.
    return jnp.einsum("tc,bchw->bthw", matrix, x, precision=jax.lax.Precision.HIGHEST)  # [B, T, H, W]


def from_teacher(x: jax.Array, cfg) -> jax.Array:
    """Teacher latents [B, T, H, W] -> student latents [B, C, H, W] through the pseudo-inverse P^T.

    Returns `x` itself when C == T.
    """
    channels, teacher = cfg.latent_channels, cfg.teacher_channels
    _check_latents(x, teacher, "from_teacher", "teacher")
    if channels == teacher:
        return x
    matrix = jnp.asarray(projection_matrix(channels, teacher, cfg.projection_seed), dtype=x.dtype)
    return jnp.einsum("tc,bthw->bchw", matrix, x, precision=jax.lax.Precision.HIGHEST)  # [B, C, H, W]
