"""Sampling images (latents) from the student: flow Euler and UniPC (order 2, bh2, data prediction).

Owns `sample` and `sampling_schedule`. Schedules and solver coefficients are computed on the host
in numpy (they depend only on steps and shift) and baked into a jitted lax.scan over the steps,
cached per (model, steps, shift, solver): a sampler call compiles once per those and the input
shapes, and never syncs with the host inside the loop. `sample` can itself be traced inside an
outer jit (with model, steps, shift and solver static).

Schedules (sigma = noise level s; the model is fed t = timesteps):
  euler: sigmas = shift*s / (1 + (shift-1)*s) over s = linspace(1, 0, steps + 1); t = 1000 * sigma.
         x <- x + (sigma_next - sigma) * v(x, t).
  unipc: exactly Wan's FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1) after
         set_timesteps(steps, shift=shift): s = linspace(0.999, 0, steps + 1)[:-1] (sigma_max is
         float32(0.999)), shifted, float32, with a final 0 appended; t = int(1000 * sigma) truncated
         toward zero, as the Wan teacher sees it.

UniPC (Zhao et al. 2023) in the data-prediction form of a flow model, x0 = x - sigma * v. Each
step i first corrects the current sample with UniC (using the new x0 at no extra model call), then
predicts the next one with UniP of order min(2, steps - i, i + 1) (order 1 when the next sigma is
0: the last step lands exactly on x0). Every update is linear in (x, the corrected sample of the
last step, x0_i, x0_{i-1}, x0_{i-2}), so the host precomputes 8 coefficients per step:

  x_c    = cx*x + c_last*last_sample + c_now*x0_i + c_prev*x0_{i-1} + c_prev2*x0_{i-2}
  x_next = px*x_c + p_now*x0_i + p_prev*x0_{i-1}

with B(h) = e^h - 1 ("bh2"), and the order-2 predictor using rho = 1/2 as in the paper.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SOLVERS", "sample", "sampling_schedule"]

SOLVERS = ("euler", "unipc")
_NUM_TRAIN_TIMESTEPS = 1000


def _check_args(steps, shift, solver):
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"sample: steps must be an int >= 1, got {steps!r}")
    is_number = isinstance(shift, (int, float, np.floating)) and not isinstance(shift, bool)
    if not is_number or not np.isfinite(shift) or shift <= 0:
        raise ValueError(f"sample: shift must be a finite number > 0, got {shift!r}")
    if solver not in SOLVERS:
        raise ValueError(f"sample: solver must be one of {list(SOLVERS)}, got {solver!r}")


def _shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sampling_schedule(steps: int, shift: float, solver: str = "unipc") -> tuple[np.ndarray, np.ndarray]:
    """(timesteps [steps] float32 fed to the model, sigmas [steps + 1] float32 ending in 0)."""
    _check_args(steps, shift, solver)
    if solver == "euler":
        sigmas = _shift(np.linspace(1.0, 0.0, steps + 1), float(shift)).astype(np.float32)
        return (sigmas[:-1].astype(np.float64) * _NUM_TRAIN_TIMESTEPS).astype(np.float32), sigmas
    # Wan's training sigmas 0.999 ... 0 are float32 (shift 1 at construction leaves them unchanged).
    alphas = np.linspace(1, 1 / _NUM_TRAIN_TIMESTEPS, _NUM_TRAIN_TIMESTEPS)[::-1]
    train_sigmas = (1.0 - alphas).astype(np.float32)
    sigma_max, sigma_min = float(train_sigmas[0]), float(train_sigmas[-1])
    sigmas = _shift(np.linspace(sigma_max, sigma_min, steps + 1)[:-1], float(shift))  # float64
    timesteps = (sigmas * _NUM_TRAIN_TIMESTEPS).astype(np.int64)  # truncation, as the teacher sees them
    return timesteps.astype(np.float32), np.concatenate([sigmas, [0.0]]).astype(np.float32)


def _log_snr(sigma: float) -> float:
    with np.errstate(divide="ignore"):
        return float(np.log(1.0 - sigma) - np.log(sigma))  # -inf at sigma 1, +inf at sigma 0


def _unipc_coefficients(sigmas32: np.ndarray) -> np.ndarray:
    """[steps, 8] float64: (cx, c_last, c_now, c_prev, c_prev2, px, p_now, p_prev) per step (module doc)."""
    sig = sigmas32.astype(np.float64)
    n = len(sig) - 1
    if not (sig[:-1] < 1).all() or not (sig[:-1] > 0).all():
        raise ValueError(f"UniPC needs sampling sigmas in (0, 1), got {sig[:-1].tolist()}")
    lam = [_log_snr(s) for s in sig]
    coeffs = np.zeros((n, 8), dtype=np.float64)
    previous_order = 1
    for i in range(n):
        cx = c_last = c_now = c_prev = c_prev2 = 0.0
        if i == 0:
            cx = 1.0  # nothing to correct yet
        else:
            # UniC: redo sigma[i-1] -> sigma[i] with the new x0_i, order = the previous predictor's.
            alpha_t, sigma_t, sigma_s0 = 1.0 - sig[i], sig[i], sig[i - 1]
            h = lam[i] - lam[i - 1]
            h_phi_1 = np.expm1(-h)
            b_h = np.expm1(-h)
            c_last = sigma_t / sigma_s0
            c_prev = -alpha_t * h_phi_1
            if previous_order == 1:
                rho_now = 0.5
                c_now = -alpha_t * b_h * rho_now
                c_prev += alpha_t * b_h * rho_now
            else:
                r1 = (lam[i - 2] - lam[i - 1]) / h
                h_phi_k = h_phi_1 / -h - 1.0
                b0 = h_phi_k / b_h
                h_phi_k = h_phi_k / -h - 0.5
                b1 = 2.0 * h_phi_k / b_h
                rho = np.linalg.solve(np.array([[1.0, 1.0], [r1, 1.0]]), np.array([b0, b1]))  # [2]
                c_prev2 = -alpha_t * b_h * rho[0] / r1
                c_now = -alpha_t * b_h * rho[1]
                c_prev += alpha_t * b_h * (rho[0] / r1 + rho[1])
        # UniP: sigma[i] -> sigma[i+1].
        order = min(2, n - i, i + 1)
        alpha_t, sigma_t, sigma_s0 = 1.0 - sig[i + 1], sig[i + 1], sig[i]
        p_prev = 0.0
        if sigma_t == 0:
            order = 1
            px, p_now = 0.0, alpha_t  # h = inf: the step lands on x0_i
        else:
            h = lam[i + 1] - lam[i]
            h_phi_1 = np.expm1(-h)
            b_h = np.expm1(-h)
            px = sigma_t / sigma_s0
            p_now = -alpha_t * h_phi_1
            if order == 2:
                r1 = (lam[i - 1] - lam[i]) / h
                p_prev = -alpha_t * b_h * 0.5 / r1
                p_now += alpha_t * b_h * 0.5 / r1
        coeffs[i] = (cx, c_last, c_now, c_prev, c_prev2, px, p_now, p_prev)
        previous_order = order
    if not np.isfinite(coeffs).all():
        raise ValueError(f"UniPC coefficients are not finite for sigmas {sig.tolist()}")
    return coeffs


def _velocity(model, params, x, t, text, text_mask):
    t_batch = jnp.full((x.shape[0],), t, dtype=jnp.float32)  # [B]
    return model.apply({"params": params}, x, t_batch, text, text_mask).astype(jnp.float32)  # [B, C, H, W]


def _euler_loop(model, timesteps, sigmas, params, noise, text, text_mask):
    def body(x, step_inputs):
        t, sigma, sigma_next = step_inputs
        v = _velocity(model, params, x, t, text, text_mask)
        return x + (sigma_next - sigma) * v, None

    x, _ = jax.lax.scan(body, noise.astype(jnp.float32), (timesteps, sigmas[:-1], sigmas[1:]))
    return x


def _unipc_loop(model, timesteps, sigmas, coeffs, params, noise, text, text_mask):
    x = noise.astype(jnp.float32)
    zeros = jnp.zeros_like(x)

    def body(carry, step_inputs):
        x, last_sample, x0_prev, x0_prev2 = carry
        t, sigma, c = step_inputs
        v = _velocity(model, params, x, t, text, text_mask)
        x0 = x - sigma * v  # data prediction at the uncorrected sample
        x_c = c[0] * x + c[1] * last_sample + c[2] * x0 + c[3] * x0_prev + c[4] * x0_prev2
        x_next = c[5] * x_c + c[6] * x0 + c[7] * x0_prev
        return (x_next, x_c, x0, x0_prev), None

    (x, _, _, _), _ = jax.lax.scan(body, (x, zeros, zeros, zeros), (timesteps, sigmas[:-1], coeffs))
    return x


@functools.lru_cache(maxsize=32)
def _compiled_sampler(model, steps: int, shift: float, solver: str):
    """A jitted (params, noise, text, text_mask) -> x0 for one (model, schedule), cached.

    The schedule and coefficients are baked in as constants: nothing host-side is passed per call,
    which keeps the call valid for multi-process global arrays too.
    """
    timesteps, sigmas = sampling_schedule(steps, shift, solver)
    if solver == "euler":
        return jax.jit(functools.partial(_euler_loop, model, timesteps, sigmas))
    coeffs = _unipc_coefficients(sigmas).astype(np.float32)  # [steps, 8]
    return jax.jit(functools.partial(_unipc_loop, model, timesteps, sigmas, coeffs))


def sample(
    params,
    model,
    noise: jax.Array,
    text: jax.Array,
    text_mask: jax.Array,
    steps: int,
    shift: float,
    solver: str = "unipc",
) -> jax.Array:
    """Integrate the student's flow from noise [B, C, H, W] (sigma = 1) to x0 [B, C, H, W] (float32).

    params: the model's parameter tree (e.g. the EMA); model: a Student (any flax Module with the
    same call signature and a hashable definition works); text [B, L, text_dim] / text_mask [B, L]:
    the prompt embeddings; steps, shift: the schedule; solver: "euler" or "unipc".
    """
    _check_args(steps, shift, solver)
    if getattr(noise, "ndim", None) != 4:
        raise ValueError(f"sample: noise must be [B, C, H, W], got shape {getattr(noise, 'shape', None)}")
    return _compiled_sampler(model, int(steps), float(shift), solver)(params, noise, text, text_mask)
