"""Flow-matching DPM-Solver++ scheduler, the sampling-sigma helpers, and the pieces both flow solvers share.

Owns `FlowDPMSolverMultistepScheduler` (the `dpm++` option of WanT2V.generate), `get_sampling_sigmas`,
`retrieve_timesteps`, and `FlowSchedulerBase`, the schedule/state/validation logic that the UniPC
solver in `fm_solvers_unipc.py` builds on. Self-contained: no diffusers import. The attribute names
(`config`, `order`, `timesteps`, `sigmas`, `step_index`, `begin_index`) follow the diffusers-style
scheduler interface so code written against upstream keeps working.

Flow-matching convention: x_sigma = (1 - sigma) * x0 + sigma * noise, the model predicts the
velocity v = noise - x0, so x0 = x_sigma - sigma * v; alpha = 1 - sigma and the log-SNR is
lambda = log(alpha) - log(sigma).

Precision contract (checked against the golden cases scheduler_unipc / scheduler_dpmpp):
schedule arithmetic is float64 numpy up to the final float32 cast of `sigmas`; integer timesteps
are float64 `sigma * num_train_timesteps` truncated to int64; every solver coefficient is a float32
0-d tensor computed from the float32 `sigmas`. Endpoints sigma = 1 and sigma = 0 give infinite
log-SNRs that are evaluated as IEEE infinities on purpose (they reduce to the exact limits).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "FlowDPMSolverMultistepScheduler",
    "FlowSchedulerBase",
    "SchedulerOutput",
    "get_sampling_sigmas",
    "retrieve_timesteps",
]


@dataclass
class SchedulerOutput:
    """Result of `step()`; indexable like a one-element tuple for diffusers-style `out[0]`."""

    prev_sample: torch.Tensor

    def __getitem__(self, index):
        return (self.prev_sample,)[index]

    def to_tuple(self) -> tuple[torch.Tensor]:
        return (self.prev_sample,)


def _check_shift(shift: float, where: str) -> float:
    if isinstance(shift, bool) or not isinstance(shift, (int, float, np.floating, np.integer)):
        raise TypeError(f"{where}: shift must be a positive number, got {shift!r}")
    if not math.isfinite(float(shift)) or float(shift) <= 0:
        raise ValueError(f"{where}: shift must be a finite number > 0, got {shift!r}")
    return float(shift)


def _check_steps(steps: Any, where: str) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"{where}: the number of steps must be an int >= 1, got {steps!r}")
    if steps < 1:
        raise ValueError(f"{where}: the number of steps must be >= 1, got {steps}")
    return int(steps)


def _shift_sigmas(sigmas, shift: float):
    """The flow time shift s' = shift*s / (1 + (shift-1)*s); works on numpy arrays and tensors alike."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def get_sampling_sigmas(sampling_steps: int, shift: float) -> np.ndarray:
    """float64 sampling sigmas: the shifted first `sampling_steps` values of linspace(1, 0, steps + 1).

    WanT2V.generate hands these to the DPM++ scheduler as custom sigmas; the first is exactly 1.0.
    """
    sampling_steps = _check_steps(sampling_steps, "get_sampling_sigmas")
    shift = _check_shift(shift, "get_sampling_sigmas")
    sigma = np.linspace(1, 0, sampling_steps + 1)[:sampling_steps]
    return _shift_sigmas(sigma, shift)


def retrieve_timesteps(
    scheduler,
    num_inference_steps: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    timesteps: Optional[Sequence[int]] = None,
    sigmas: Optional[Sequence[float]] = None,
    **kwargs,
) -> tuple[torch.Tensor, int]:
    """Run `scheduler.set_timesteps` with custom timesteps, custom sigmas, or a step count.

    Returns (scheduler.timesteps, number of inference steps). Extra kwargs go to set_timesteps.
    """
    if timesteps is not None and sigmas is not None:
        raise ValueError("retrieve_timesteps: pass either `timesteps` or `sigmas`, not both")
    accepted = set(inspect.signature(scheduler.set_timesteps).parameters)
    if timesteps is not None:
        if "timesteps" not in accepted:
            raise ValueError(
                f"retrieve_timesteps: {type(scheduler).__name__}.set_timesteps does not accept custom "
                "`timesteps`; pass custom `sigmas` or `num_inference_steps` instead"
            )
        scheduler.set_timesteps(timesteps=timesteps, device=device, **kwargs)
        return scheduler.timesteps, len(scheduler.timesteps)
    if sigmas is not None:
        if "sigmas" not in accepted:
            raise ValueError(
                f"retrieve_timesteps: {type(scheduler).__name__}.set_timesteps does not accept custom "
                "`sigmas`; pass `num_inference_steps` instead"
            )
        scheduler.set_timesteps(sigmas=sigmas, device=device, **kwargs)
        return scheduler.timesteps, len(scheduler.timesteps)
    if num_inference_steps is None:
        raise ValueError("retrieve_timesteps: give `num_inference_steps`, `sigmas` or `timesteps`")
    scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
    return scheduler.timesteps, num_inference_steps


def _threshold_x0(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Imagen): clamp each sample to its `ratio` quantile of |x0|, then rescale."""
    dtype = x0.dtype
    if x0.ndim < 2:
        raise ValueError(f"thresholding needs a batched sample [B, C, ...], got shape {tuple(x0.shape)}")
    batch = x0.shape[0]
    flat = x0.float().reshape(batch, -1)  # [B, C*F*H*W]
    bound = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)  # [B, 1]
    flat = torch.clamp(flat, -bound, bound) / bound
    return flat.reshape(x0.shape).to(dtype)


class FlowSchedulerBase:
    """Schedule construction, step-index bookkeeping and input checks shared by the flow solvers.

    Subclasses call `_init_schedule` from their constructor, implement `_reset_solver_state`, and
    use `_begin_step` / `_alpha_sigma_lambda` inside `step`.
    """

    order = 1  # one model evaluation per step (diffusers' meaning of `scheduler.order`)
    init_noise_sigma = 1.0

    def _init_schedule(self, num_train_timesteps: int, shift: float, use_dynamic_shifting: bool):
        name = type(self).__name__
        _check_steps(num_train_timesteps, f"{name}(num_train_timesteps=...)")
        shift = _check_shift(shift, f"{name}(shift=...)")
        # Training sigmas 0.999 ... 0 built in float64 and held in float32: sigma_max is float32(0.999).
        alphas = np.linspace(1, 1 / num_train_timesteps, num_train_timesteps)[::-1].copy()
        sigmas = torch.from_numpy(1.0 - alphas).to(torch.float32)
        if not use_dynamic_shifting:
            sigmas = _shift_sigmas(sigmas, shift)
        self.sigmas = sigmas
        self.timesteps = sigmas * num_train_timesteps
        self.sigma_min = self.sigmas[-1].item()
        self.sigma_max = self.sigmas[0].item()
        self.num_inference_steps: Optional[int] = None
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None
        self._reset_solver_state()

    def _reset_solver_state(self):
        raise NotImplementedError

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @property
    def step_index(self) -> Optional[int]:
        """Index of the next step in `timesteps`; None until the first `step()` after set_timesteps."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        """First step index when set through `set_begin_index` (pipelines that skip steps)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        if self.num_inference_steps is not None and not 0 <= begin_index < len(self.timesteps):
            raise ValueError(f"begin_index {begin_index} is outside the {len(self.timesteps)}-step schedule")
        self._begin_index = int(begin_index)

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Flow solvers need no input scaling; kept for the diffusers interface."""
        return sample

    def _schedule_sigmas(
        self,
        num_inference_steps: Optional[int],
        sigmas,
        mu: Optional[float],
        shift: Optional[float],
    ) -> np.ndarray:
        """The float64 sampling sigmas before the final one is appended, with the shift applied."""
        name = f"{type(self).__name__}.set_timesteps"
        if self.config.use_dynamic_shifting and mu is None:
            raise ValueError(f"{name}: `mu` is required when use_dynamic_shifting=True")
        if sigmas is None:
            if num_inference_steps is None:
                raise ValueError(f"{name}: give `num_inference_steps` or custom `sigmas`")
            num_inference_steps = _check_steps(num_inference_steps, name)
            # The shifted float32 training sigma_max, spaced in float64: first timestep 999 for Wan.
            sigmas = np.linspace(self.sigma_max, self.sigma_min, num_inference_steps + 1).copy()[:-1]
        else:
            if isinstance(sigmas, torch.Tensor):
                sigmas = sigmas.detach().cpu().numpy()
            sigmas = np.array(sigmas, dtype=np.float64)
            if sigmas.ndim != 1 or sigmas.size == 0:
                raise ValueError(f"{name}: custom sigmas must be a non-empty 1-D sequence, got shape {sigmas.shape}")
            # sigma 0 is only valid as the appended final sigma: a step cannot start from it (0/0).
            if not np.isfinite(sigmas).all() or (sigmas <= 0).any() or (sigmas > 1).any():
                raise ValueError(f"{name}: custom sigmas must lie in (0, 1], got {sigmas.tolist()}")
            if num_inference_steps is not None and num_inference_steps != sigmas.size:
                raise ValueError(
                    f"{name}: num_inference_steps={num_inference_steps} disagrees with the "
                    f"{sigmas.size} custom sigmas; pass only `sigmas`"
                )
        if self.config.use_dynamic_shifting:
            # Resolution-dependent shift: exp(mu) / (exp(mu) + (1/s - 1)).
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        else:
            shift = self.config.shift if shift is None else _check_shift(shift, name)
            sigmas = _shift_sigmas(sigmas, shift)
        return sigmas

    def _install_schedule(self, sigmas: np.ndarray, device):
        """Set `timesteps` (int64, truncated) and `sigmas` (float32, one more: the final sigma)."""
        final_type = self.config.final_sigmas_type
        sigma_last = 0.0 if final_type == "zero" else self.sigma_min
        timesteps = sigmas * self.config.num_train_timesteps
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))
        # Truncation toward zero (not rounding): the DiT sees these integers, e.g. 999 not 1000.
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self._step_index = None
        self._begin_index = None
        self._reset_solver_state()

    def index_for_timestep(self, timestep, schedule_timesteps: Optional[torch.Tensor] = None) -> int:
        """Position of `timestep` in the schedule; the second match when it occurs twice.

        The second match matters for image-to-image style starts that duplicate a timestep: the
        first occurrence would skip a sigma.
        """
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        value = timestep
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"step() takes one timestep, got a tensor of shape {tuple(value.shape)}")
            value = value.reshape(()).to(schedule_timesteps.device)  # [] (0-d)
        matches = (schedule_timesteps == value).nonzero()
        if len(matches) == 0:
            raise ValueError(
                f"timestep {float(value):g} is not in this scheduler's timesteps "
                f"{schedule_timesteps.tolist()}; pass the values of `scheduler.timesteps` in order"
            )
        return int(matches[1 if len(matches) > 1 else 0].item())

    def _begin_step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> int:
        """Validate a step() call, set the step index on the first call, and return it."""
        name = type(self).__name__
        if self.num_inference_steps is None:
            raise ValueError(f"{name}.step() called before set_timesteps(); set up the schedule first")
        if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
            raise TypeError(f"{name}.step(): model_output and sample must be tensors")
        if model_output.shape != sample.shape:
            raise ValueError(
                f"{name}.step(): model_output shape {tuple(model_output.shape)} does not match "
                f"sample shape {tuple(sample.shape)}"
            )
        if self._step_index is None:
            self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index
        if self._step_index >= len(self.timesteps):
            raise ValueError(
                f"{name}.step(): all {len(self.timesteps)} steps are done; call set_timesteps() to sample again"
            )
        return self._step_index

    def _alpha_sigma_lambda(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(alpha, sigma, log-SNR) at schedule index `index`, as float32 0-d tensors.

        sigma = 1 gives lambda = -inf and sigma = 0 gives +inf; the solvers rely on that.
        """
        sigma = self.sigmas[index]
        alpha = 1 - sigma
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)

    def _x0_from_flow(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """x0 prediction from a flow (velocity) prediction at the current sigma, optionally thresholded."""
        if self.config.prediction_type != "flow_prediction":
            raise ValueError(f"prediction_type {self.config.prediction_type!r} is not supported; use 'flow_prediction'")
        x0_pred = sample - self.sigmas[self._step_index] * model_output
        if self.config.thresholding:
            x0_pred = _threshold_x0(x0_pred, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        return x0_pred


def _check_choice(name: str, value, allowed: Sequence, cls: str):
    if value not in allowed:
        raise NotImplementedError(f"{cls}: {name}={value!r} is not supported; choose one of {list(allowed)}")


class FlowDPMSolverMultistepScheduler(FlowSchedulerBase):
    """Multistep DPM-Solver++ (data prediction) for flow-matching models.

    Order 1 on the first step (no history) and on the last step when the final sigma is zero or
    euler_at_final / lower_order_final with < 15 steps; the second-to-last step also drops to order
    2 in that short-schedule case. `sde-dpmsolver++` adds fresh Gaussian noise each step from
    `generator`. The beta_* / trained_betas arguments exist only for signature compatibility: the
    flow schedule does not use betas.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        solver_order: int = 2,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "flow_prediction",
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: Optional[str] = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: Optional[str] = None,
        invert_sigmas: bool = False,
    ):
        cls = type(self).__name__
        _check_choice("solver_order", solver_order, (1, 2, 3), cls)
        _check_choice("prediction_type", prediction_type, ("flow_prediction",), cls)
        _check_choice("algorithm_type", algorithm_type, ("dpmsolver++", "sde-dpmsolver++"), cls)
        _check_choice("solver_type", solver_type, ("midpoint", "heun"), cls)
        _check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"), cls)
        if trained_betas is not None:
            raise NotImplementedError(f"{cls}: trained_betas is not supported (the flow schedule uses no betas)")
        if variance_type is not None:
            raise NotImplementedError(f"{cls}: variance_type={variance_type!r} is not supported (use None)")
        if lambda_min_clipped != -float("inf"):
            raise NotImplementedError(f"{cls}: lambda_min_clipped is not supported (leave it at -inf)")
        if invert_sigmas:
            raise NotImplementedError(f"{cls}: invert_sigmas=True is not supported")
        if not 0 < dynamic_thresholding_ratio < 1:
            raise ValueError(f"{cls}: dynamic_thresholding_ratio must be in (0, 1), got {dynamic_thresholding_ratio}")
        self.config = SimpleNamespace(
            num_train_timesteps=num_train_timesteps,
            solver_order=solver_order,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            prediction_type=prediction_type,
            shift=shift,
            use_dynamic_shifting=use_dynamic_shifting,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            sample_max_value=sample_max_value,
            algorithm_type=algorithm_type,
            solver_type=solver_type,
            lower_order_final=lower_order_final,
            euler_at_final=euler_at_final,
            final_sigmas_type=final_sigmas_type,
            lambda_min_clipped=lambda_min_clipped,
            variance_type=variance_type,
            invert_sigmas=invert_sigmas,
        )
        self._init_schedule(num_train_timesteps, shift, use_dynamic_shifting)

    def _reset_solver_state(self):
        self.model_outputs: list[Optional[torch.Tensor]] = [None] * self.config.solver_order
        self.lower_order_nums = 0

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        sigmas=None,
        mu: Optional[float] = None,
        shift: Optional[float] = None,
    ):
        """Build the sampling schedule: `num_inference_steps` evenly spaced sigmas from sigma_max, or
        custom `sigmas` (float64, e.g. from get_sampling_sigmas); the shift (argument, else config) is
        applied in both cases. Sets `timesteps` (int64 on `device`) and `sigmas` (float32, CPU)."""
        self._install_schedule(self._schedule_sigmas(num_inference_steps, sigmas, mu, shift), device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        variance_noise: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ):
        """One solver step from sigma[i] to sigma[i+1]; returns SchedulerOutput or `(prev_sample,)`."""
        if isinstance(generator, bool):
            raise TypeError("step(): `generator` got a bool; pass return_dict by keyword (return_dict=False)")
        index = self._begin_step(model_output, timestep, sample)
        cfg = self.config
        n = len(self.timesteps)
        final_order_one = index == n - 1 and (
            cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
        )
        second_order_second_last = index == n - 2 and cfg.lower_order_final and n < 15

        out_dtype = model_output.dtype
        x0_pred = self._x0_from_flow(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [x0_pred]
        sample = sample.to(torch.float32)

        noise = None
        if cfg.algorithm_type == "sde-dpmsolver++":
            if variance_noise is not None:
                if variance_noise.shape != model_output.shape:
                    raise ValueError(
                        f"step(): variance_noise shape {tuple(variance_noise.shape)} != {tuple(model_output.shape)}"
                    )
                noise = variance_noise.to(device=model_output.device, dtype=torch.float32)
            else:
                noise_device = generator.device if generator is not None else model_output.device
                noise = torch.randn(
                    model_output.shape, generator=generator, device=noise_device, dtype=torch.float32
                ).to(model_output.device)

        if cfg.solver_order == 1 or self.lower_order_nums < 1 or final_order_one:
            prev_sample = self._first_order(x0_pred, sample, noise)
        elif cfg.solver_order == 2 or self.lower_order_nums < 2 or second_order_second_last:
            prev_sample = self._second_order(sample, noise)
        else:
            prev_sample = self._third_order(sample, noise)

        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        prev_sample = prev_sample.to(out_dtype)
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def _first_order(self, x0: torch.Tensor, sample: torch.Tensor, noise) -> torch.Tensor:
        """DDIM-like update. At sigma_s = 1 (h = inf) it reduces to sigma_t*x + alpha_t*x0, at sigma_t = 0 to x0."""
        i = self._step_index
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(i + 1)
        _, sigma_s, lambda_s = self._alpha_sigma_lambda(i)
        h = lambda_t - lambda_s
        if self.config.algorithm_type == "dpmsolver++":
            return (sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        return (
            (sigma_t / sigma_s * torch.exp(-h)) * sample
            + (alpha_t * (1 - torch.exp(-2.0 * h))) * x0
            + sigma_t * torch.sqrt(1.0 - torch.exp(-2.0 * h)) * noise
        )

    def _second_order(self, sample: torch.Tensor, noise) -> torch.Tensor:
        """Two-step multistep update. Right after sigma = 1, r0 = inf makes the D1 correction exactly 0."""
        i = self._step_index
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(i + 1)
        _, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(i)
        _, _, lambda_s1 = self._alpha_sigma_lambda(i - 1)
        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        d0, d1 = m0, (1.0 / r0) * (m0 - m1)
        midpoint = self.config.solver_type == "midpoint"
        if self.config.algorithm_type == "dpmsolver++":
            x_t = (sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * d0
            if midpoint:
                return x_t - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
            return x_t + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
        x_t = (sigma_t / sigma_s0 * torch.exp(-h)) * sample + (alpha_t * (1 - torch.exp(-2.0 * h))) * d0
        if midpoint:
            x_t = x_t + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * d1
        else:
            x_t = x_t + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * d1
        return x_t + sigma_t * torch.sqrt(1.0 - torch.exp(-2.0 * h)) * noise

    def _third_order(self, sample: torch.Tensor, noise) -> torch.Tensor:
        """Three-step multistep update (solver_order=3)."""
        i = self._step_index
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(i + 1)
        _, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(i)
        _, _, lambda_s1 = self._alpha_sigma_lambda(i - 1)
        _, _, lambda_s2 = self._alpha_sigma_lambda(i - 2)
        m0, m1, m2 = self.model_outputs[-1], self.model_outputs[-2], self.model_outputs[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        if self.config.algorithm_type == "dpmsolver++":
            return (
                (sigma_t / sigma_s0) * sample
                - (alpha_t * (torch.exp(-h) - 1.0)) * m0
                + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
                - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * d2
            )
        e2h = torch.exp(-2.0 * h)
        return (
            (sigma_t / sigma_s0 * torch.exp(-h)) * sample
            + (alpha_t * (1.0 - e2h)) * m0
            + (alpha_t * ((1.0 - e2h) / (-2.0 * h) + 1.0)) * d1
            # integral of 2 e^{-2(h-u)} u^2/2 du / h^2 over [0, h]: 0.5 + (1 - e^{-2h} - 2h) / (2h)^2
            + (alpha_t * ((1.0 - e2h - 2.0 * h) / (2.0 * h) ** 2 + 0.5)) * d2
            + sigma_t * torch.sqrt(1.0 - e2h) * noise
        )
