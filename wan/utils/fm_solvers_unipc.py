"""Flow-matching UniPC scheduler (the default `unipc` solver of WanT2V.generate).

Owns `FlowUniPCMultistepScheduler`: the UniPC predictor-corrector (Zhao et al. 2023) on the
data-prediction (x0) form of a flow-matching model, with the B(h) variants bh1 (B = h) and bh2
(B = e^h - 1, Wan's default). Each step first corrects the current sample with the UniC corrector
(which uses the new model evaluation at no extra cost), then predicts the next sample with UniP.
Schedule, step index and validation come from `FlowSchedulerBase` in `fm_solvers.py`.

All solver coefficients are float32 0-d tensors computed from the float32 `sigmas`, matching the
reference bit-for-bit in the order of operations where it matters (golden case scheduler_unipc).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Sequence, Union

import torch

from .fm_solvers import FlowSchedulerBase, SchedulerOutput, _check_choice

__all__ = ["FlowUniPCMultistepScheduler"]


class FlowUniPCMultistepScheduler(FlowSchedulerBase):
    """UniPC multistep sampler for flow-matching (velocity-predicting) models.

    Predictor order on step i is min(solver_order, steps - i [if lower_order_final], steps taken + 1),
    so order 1 on the first step and on the last step for Wan's order 2. When the next sigma is
    zero the predictor always uses order 1: the step then lands exactly on the x0 prediction, and a
    higher order would divide by an infinite step size. `disable_corrector` lists step indices whose
    following corrector is skipped; `solver_p` is an optional other scheduler used as the predictor.
    Only predict_x0=True is implemented: the noise-prediction form has no finite update to sigma 0.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        solver_order: int = 2,
        prediction_type: str = "flow_prediction",
        shift: Optional[float] = 1.0,
        use_dynamic_shifting: bool = False,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: Sequence[int] = [],  # noqa: B006 - upstream signature; copied, never mutated
        solver_p=None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: Optional[str] = "zero",
    ):
        cls = type(self).__name__
        if isinstance(solver_order, bool) or not isinstance(solver_order, int) or solver_order < 1:
            raise ValueError(f"{cls}: solver_order must be an int >= 1, got {solver_order!r}")
        _check_choice("prediction_type", prediction_type, ("flow_prediction",), cls)
        _check_choice("solver_type", solver_type, ("bh1", "bh2"), cls)
        _check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"), cls)
        _check_choice("timestep_spacing", timestep_spacing, ("linspace",), cls)
        if not predict_x0:
            raise NotImplementedError(
                f"{cls}: predict_x0=False is not supported (its update to a zero final sigma is not finite); "
                "use predict_x0=True"
            )
        if steps_offset != 0:
            raise NotImplementedError(f"{cls}: steps_offset={steps_offset!r} is not supported (use 0)")
        if not 0 < dynamic_thresholding_ratio < 1:
            raise ValueError(f"{cls}: dynamic_thresholding_ratio must be in (0, 1), got {dynamic_thresholding_ratio}")
        if solver_p is not None and not callable(getattr(solver_p, "step", None)):
            raise TypeError(f"{cls}: solver_p must be a scheduler with a step() method, got {type(solver_p).__name__}")
        self.config = SimpleNamespace(
            num_train_timesteps=num_train_timesteps,
            solver_order=solver_order,
            prediction_type=prediction_type,
            shift=shift,
            use_dynamic_shifting=use_dynamic_shifting,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            sample_max_value=sample_max_value,
            predict_x0=predict_x0,
            solver_type=solver_type,
            lower_order_final=lower_order_final,
            disable_corrector=list(disable_corrector),
            solver_p=solver_p,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            final_sigmas_type=final_sigmas_type,
        )
        self.predict_x0 = predict_x0
        self.disable_corrector = list(disable_corrector)
        self.solver_p = solver_p
        self._init_schedule(num_train_timesteps, shift, use_dynamic_shifting)

    def _reset_solver_state(self):
        order = self.config.solver_order
        self.model_outputs: list[Optional[torch.Tensor]] = [None] * order  # x0 predictions, newest last
        self.timestep_list: list = [None] * order
        self.lower_order_nums = 0
        self.last_sample: Optional[torch.Tensor] = None  # sample the previous predictor started from
        self.this_order = 1  # order of the previous predictor = order of the next corrector

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        sigmas=None,
        mu: Optional[float] = None,
        shift: Optional[float] = None,
    ):
        """Build the sampling schedule: linspace(sigma_max, sigma_min, steps + 1)[:-1] in float64 (or
        custom `sigmas`), shifted by `shift` (else the config shift). Sets `timesteps` (int64,
        truncated, on `device`) and `sigmas` (float32 on CPU, with the final sigma appended)."""
        sigmas = self._schedule_sigmas(num_inference_steps, sigmas, mu, shift)
        if self.config.solver_order >= 3 and (sigmas >= 1).any():
            # sigma = 1 has log-SNR -inf; the order >= 3 corrector then solves a system with an
            # infinite entry and returns NaN. Orders 1 and 2 evaluate the limit correctly.
            raise ValueError(
                f"{type(self).__name__}.set_timesteps: solver_order={self.config.solver_order} needs every "
                "sigma < 1 (the schedule starts at sigma 1.0); use solver_order <= 2 or sigmas below 1"
            )
        self._install_schedule(sigmas, device)
        if self.solver_p is not None:
            self.solver_p.set_timesteps(self.num_inference_steps, device=device, sigmas=None, mu=mu, shift=shift)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        return_dict: bool = True,
        generator: Optional[torch.Generator] = None,
    ):
        """One UniC-corrected UniP step from sigma[i] to sigma[i+1].

        model_output is the raw flow prediction at `sample`; returns SchedulerOutput or `(prev_sample,)`.
        `generator` is accepted for interface compatibility (UniPC is deterministic).
        """
        index = self._begin_step(model_output, timestep, sample)
        out_dtype = model_output.dtype
        use_corrector = index > 0 and (index - 1) not in self.disable_corrector and self.last_sample is not None

        x0_pred = self._x0_from_flow(model_output, sample)
        sample = sample.to(torch.float32)
        if use_corrector:
            sample = self._uni_c_update(x0_pred, self.last_sample, sample, self.this_order)

        self.model_outputs = self.model_outputs[1:] + [x0_pred]
        self.timestep_list = self.timestep_list[1:] + [timestep]

        n = len(self.timesteps)
        order = min(self.config.solver_order, n - index) if self.config.lower_order_final else self.config.solver_order
        order = min(order, self.lower_order_nums + 1)
        if self.sigmas[index + 1] == 0:
            order = 1
        self.this_order = order

        self.last_sample = sample
        if self.solver_p is not None:
            prev_sample = self.solver_p.step(model_output, timestep, sample, return_dict=True).prev_sample
        else:
            prev_sample = self._uni_p_update(sample, order)

        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        prev_sample = prev_sample.to(out_dtype)
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def _b_coefficients(self, h: torch.Tensor, rks: torch.Tensor, order: int):
        """(h*phi_1, B(h), R, b) of the UniPC linear system for the data-prediction form (hh = -h).

        R[k] = rks**k and b[k] = k! * h*phi_{k+1}(hh) / B(h), with phi_k the exponential-integrator
        functions built by the recurrence phi_{k+1} = (phi_k - 1/k!) / hh.
        """
        hh = -h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if self.config.solver_type == "bh1" else torch.expm1(hh)
        rows, b = [], []
        factorial = 1
        for i in range(1, order + 1):
            rows.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        return h_phi_1, b_h, torch.stack(rows), torch.stack(b)

    @staticmethod
    def _weighted_sum(weights: torch.Tensor, terms: list[torch.Tensor]) -> torch.Tensor:
        total = weights[0] * terms[0]
        for weight, term in zip(weights[1:], terms[1:]):
            total = total + weight * term
        return total

    def _uni_p_update(self, sample: torch.Tensor, order: int) -> torch.Tensor:
        """UniP predictor: sample at sigma[i] -> sample at sigma[i+1] from the last `order` x0 predictions."""
        i = self._step_index
        m0 = self.model_outputs[-1]
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(i + 1)
        _, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(i)
        h = lambda_t - lambda_s0

        rks, d1s = [], []
        for k in range(1, order):
            _, _, lambda_sk = self._alpha_sigma_lambda(i - k)
            rk = (lambda_sk - lambda_s0) / h
            rks.append(rk)
            d1s.append((self.model_outputs[-(k + 1)] - m0) / rk)
        rks.append(torch.ones((), dtype=torch.float32))
        h_phi_1, b_h, r_matrix, b = self._b_coefficients(h, torch.stack(rks), order)

        x_t = sigma_t / sigma_s0 * sample - alpha_t * h_phi_1 * m0
        if d1s:
            # Order 2 uses the fixed rho = 1/2 (as in the UniPC paper) instead of solving a 1x1 system.
            rhos_p = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(r_matrix[:-1, :-1], b[:-1])
            x_t = x_t - alpha_t * b_h * self._weighted_sum(rhos_p, d1s)
        return x_t

    def _uni_c_update(
        self, x0_now: torch.Tensor, last_sample: torch.Tensor, this_sample: torch.Tensor, order: int
    ) -> torch.Tensor:
        """UniC corrector: redo the previous step sigma[i-1] -> sigma[i] using the new x0 prediction too."""
        i = self._step_index
        m0 = self.model_outputs[-1]  # x0 prediction at sigma[i-1]
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(i)
        _, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(i - 1)
        h = lambda_t - lambda_s0

        rks, d1s = [], []
        for k in range(1, order):
            _, _, lambda_sk = self._alpha_sigma_lambda(i - (k + 1))
            rk = (lambda_sk - lambda_s0) / h
            rks.append(rk)
            d1s.append((self.model_outputs[-(k + 1)] - m0) / rk)
        rks.append(torch.ones((), dtype=torch.float32))
        h_phi_1, b_h, r_matrix, b = self._b_coefficients(h, torch.stack(rks), order)

        rhos_c = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(r_matrix, b)
        x_t = sigma_t / sigma_s0 * last_sample - alpha_t * h_phi_1 * m0
        correction = rhos_c[-1] * (x0_now - m0)
        if d1s:
            correction = self._weighted_sum(rhos_c[:-1], d1s) + correction
        return x_t - alpha_t * b_h * correction
