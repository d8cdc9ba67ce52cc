"""Expert-phased batches: runs of K training steps whose timesteps all fall in one expert's range.

The A14B teacher has two experts split at t = boundary * 1000 (875). With a whole teacher per GPU
and only one expert resident (`--teacher.offload`), a batch mixing both ranges would swap 28.6 GB
of weights every step. Instead the run is cut into phases of K steps; each phase draws its expert
at random with the probability the timestep density gives that expert's range (for s = shift u /
(1 + (shift - 1) u), u ~ U(0, 1): P(high) = 1 - u_b with u_b the u of the boundary; 0.632 at shift
12), then every timestep of the phase from the density restricted to that range (u ~ U(u_b, 1) or
U(0, u_b)). A sample's timestep therefore has exactly the unphased marginal, and the expected loss
is unchanged; what changes is that one step's batch no longer mixes the two ranges, so the loss of
consecutive steps alternates in level between phases and the gradient noise per step is a little
higher. Phases are a function of (seed, step // K): a resumed run sees the same phases.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ExpertPhases", "high_noise_probability"]


def _u_of(s: float, shift: float) -> float:
    """Inverse of s = shift u / (1 + (shift - 1) u)."""
    return s / (shift - (shift - 1) * s)


def high_noise_probability(shift: float, boundary: float) -> float:
    """P(t >= boundary * 1000) under the shifted uniform timestep density."""
    return 1.0 - _u_of(boundary, shift)


class ExpertPhases:
    """Which expert (and timestep band) step `step` draws from; K = 0 means unphased (None)."""

    def __init__(self, steps_per_phase: int, shift: float, boundary: float, seed: int):
        self.k = steps_per_phase
        self.seed = seed
        self.p_high = high_noise_probability(shift, boundary)
        u_b = _u_of(boundary, shift)
        s_b = np.float32(boundary)
        below = np.nextafter(s_b, np.float32(0))  # the largest float32 s that is still low-noise
        self.bands = {
            "high": np.array([u_b, 1.0, s_b, 1.0], np.float32),
            "low": np.array([0.0, u_b, 0.0, below], np.float32),
        }

    @property
    def enabled(self) -> bool:
        return self.k > 0

    def expert(self, step: int) -> str | None:
        if not self.enabled:
            return None
        draw = np.random.default_rng([self.seed, 7919, step // self.k]).random()
        return "high" if draw < self.p_high else "low"

    def band(self, step: int) -> np.ndarray | None:
        name = self.expert(step)
        return None if name is None else self.bands[name]
