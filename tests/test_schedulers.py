"""Flow solvers (wan/utils/fm_solvers.py, fm_solvers_unipc.py): golden parity, input errors, solver paths.

Golden cases scheduler_unipc / scheduler_dpmpp: schedules and the full fake-model loop set up exactly
as WanT2V.generate does. The non-golden options (other orders, bh1, heun, SDE, thresholding, dynamic
shifting) are checked against the analytic probability-flow ODE of Gaussian data instead.
"""

import math

import chex
import numpy as np
import pytest
import torch

from tests import golden
from wan.utils.fm_solvers import (
    FlowDPMSolverMultistepScheduler,
    SchedulerOutput,
    get_sampling_sigmas,
    retrieve_timesteps,
)
from wan.utils.fm_solvers_unipc import FlowUniPCMultistepScheduler

torch.set_default_dtype(torch.float32)

CASES = ("scheduler_unipc", "scheduler_dpmpp")


def build_like_generate(case: str, steps: int, shift: float):
    """The scheduler and its timesteps as WanT2V.generate sets them up for `case`."""
    if case == "scheduler_unipc":
        scheduler = FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
        scheduler.set_timesteps(steps, device="cpu", shift=shift)
        return scheduler, scheduler.timesteps
    scheduler = FlowDPMSolverMultistepScheduler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
    timesteps, _ = retrieve_timesteps(scheduler, device="cpu", sigmas=get_sampling_sigmas(steps, shift))
    return scheduler, timesteps


def fake_model_loop(scheduler, timesteps, x_init, fixed_noise):
    """The golden loop: model_output = 0.3 * x + 0.7 * fixed_noise, each step's result fed back."""
    x, latents = x_init, []
    for t in timesteps:
        model_output = 0.3 * x + 0.7 * fixed_noise
        x = scheduler.step(model_output, t, x, return_dict=False)[0]
        latents.append(x)
    return torch.stack(latents), x


def golden_configs():
    params = []
    for case in CASES:
        for key, steps, shift in (("s40_shift12", 40, 12.0), ("s8_shift5", 8, 5.0)):
            params.append(pytest.param(case, key, steps, shift, id=f"{case}-{key}"))
    return params


@pytest.mark.parametrize("case,key,steps,shift", golden_configs())
def test_golden_schedule_and_loop(case, key, steps, shift):
    tensors, meta = golden.load_case(case)
    atol, rtol = golden.tolerance(meta)
    config = next(c for c in meta["configs"] if c["key"] == key)
    assert (config["sampling_steps"], config["shift"]) == (steps, shift)

    scheduler, timesteps = build_like_generate(case, steps, shift)
    chex.assert_shape(timesteps, (steps,))
    chex.assert_shape(scheduler.sigmas, (steps + 1,))
    assert timesteps.dtype == torch.int64 and scheduler.sigmas.dtype == torch.float32
    expected_t = tensors[f"outputs.{key}.timesteps"]
    assert torch.equal(timesteps, expected_t), f"{case}/{key}: timesteps {timesteps.tolist()} != {expected_t.tolist()}"
    assert timesteps.tolist() == config["timesteps"]
    golden.assert_close(scheduler.sigmas, tensors[f"outputs.{key}.sigmas"], atol, rtol, case, f"{key}.sigmas")

    x_init, fixed_noise = tensors["inputs.x_init"], tensors["inputs.fixed_noise"]
    latents, final = fake_model_loop(scheduler, timesteps, x_init, fixed_noise)
    chex.assert_shape(latents, (steps, *x_init.shape))
    chex.assert_shape(final, x_init.shape)
    golden.assert_close(latents, tensors[f"outputs.{key}.latents"], atol, rtol, case, f"{key}.latents")
    golden.assert_close(final, tensors[f"outputs.{key}.final"], atol, rtol, case, f"{key}.final")
    assert scheduler.step_index == steps


def test_first_sigmas_differ_between_solvers():
    unipc, unipc_t = build_like_generate("scheduler_unipc", 8, 5.0)
    dpm, dpm_t = build_like_generate("scheduler_dpmpp", 8, 5.0)
    assert (int(unipc_t[0]), int(dpm_t[0])) == (999, 1000)
    assert dpm.sigmas[0].item() == 1.0 and unipc.sigmas[0].item() < 1.0


def test_get_sampling_sigmas_is_float64_formula():
    sigmas = get_sampling_sigmas(8, 5.0)
    assert isinstance(sigmas, np.ndarray) and sigmas.dtype == np.float64
    chex.assert_shape(sigmas, (8,))
    s = np.arange(8, 0, -1) / 8  # the first 8 of linspace(1, 0, 9)
    np.testing.assert_allclose(sigmas, 5 * s / (1 + 4 * s), rtol=1e-15)
    assert sigmas[0] == 1.0


def test_retrieve_timesteps_paths_and_errors():
    scheduler = FlowDPMSolverMultistepScheduler()
    timesteps, n = retrieve_timesteps(scheduler, 6, device="cpu", shift=3.0)
    chex.assert_shape(timesteps, (6,))
    assert n == 6 and timesteps is scheduler.timesteps
    timesteps, n = retrieve_timesteps(scheduler, sigmas=[0.9, 0.6, 0.3])
    assert n == 3 and timesteps.tolist() == [900, 600, 300]
    with pytest.raises(ValueError, match="either `timesteps` or `sigmas`, not both"):
        retrieve_timesteps(scheduler, timesteps=[900, 500], sigmas=[0.9, 0.5])
    with pytest.raises(ValueError, match="does not accept custom `timesteps`"):
        retrieve_timesteps(scheduler, timesteps=[900, 500])
    with pytest.raises(ValueError, match="give `num_inference_steps`, `sigmas` or `timesteps`"):
        retrieve_timesteps(scheduler)


# ---------------------------------------------------------------- input errors


@pytest.mark.parametrize("cls", [FlowUniPCMultistepScheduler, FlowDPMSolverMultistepScheduler])
def test_bad_steps_and_shift(cls):
    scheduler = cls()
    with pytest.raises(ValueError, match="number of steps must be >= 1, got 0"):
        scheduler.set_timesteps(0)
    with pytest.raises(TypeError, match="must be an int"):
        scheduler.set_timesteps(2.5)
    with pytest.raises(ValueError, match=r"shift must be a finite number > 0, got 0"):
        scheduler.set_timesteps(10, shift=0)
    with pytest.raises(ValueError, match=r"shift must be a finite number > 0, got -2"):
        cls(shift=-2.0)
    with pytest.raises(ValueError, match="give `num_inference_steps` or custom `sigmas`"):
        scheduler.set_timesteps()
    with pytest.raises(ValueError, match=r"custom sigmas must lie in \(0, 1\]"):
        scheduler.set_timesteps(sigmas=[1.5, 0.5])
    with pytest.raises(ValueError, match=r"custom sigmas must lie in \(0, 1\], got \[0.5, 0.0\]"):
        scheduler.set_timesteps(sigmas=[0.5, 0.0])
    with pytest.raises(ValueError, match="disagrees with the 2 custom sigmas"):
        scheduler.set_timesteps(3, sigmas=[0.9, 0.5])
    with pytest.raises(ValueError, match="`mu` is required when use_dynamic_shifting=True"):
        cls(use_dynamic_shifting=True).set_timesteps(10)


def test_get_sampling_sigmas_errors():
    with pytest.raises(ValueError, match="number of steps must be >= 1, got 0"):
        get_sampling_sigmas(0, 5.0)
    with pytest.raises(ValueError, match="shift must be a finite number > 0, got 0"):
        get_sampling_sigmas(10, 0.0)


@pytest.mark.parametrize("cls", [FlowUniPCMultistepScheduler, FlowDPMSolverMultistepScheduler])
def test_step_errors(cls):
    scheduler = cls()
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match=r"step\(\) called before set_timesteps\(\)"):
        scheduler.step(x, 999, x)
    scheduler.set_timesteps(3, shift=5.0)
    with pytest.raises(ValueError, match=r"timestep 123 is not in this scheduler's timesteps"):
        scheduler.step(x, 123, x)
    with pytest.raises(ValueError, match=r"model_output shape \(1, 4, 2, 3\) does not match sample shape \(1, 4, 2, 2\)"):
        scheduler.step(torch.zeros(1, 4, 2, 3), scheduler.timesteps[0], x)
    for t in scheduler.timesteps:
        x = scheduler.step(x, t, x).prev_sample
    with pytest.raises(ValueError, match="all 3 steps are done; call set_timesteps"):
        scheduler.step(x, scheduler.timesteps[-1], x)


@pytest.mark.parametrize(
    "cls,kwargs,message",
    [
        (FlowUniPCMultistepScheduler, {"solver_type": "bh3"}, "solver_type='bh3' is not supported"),
        (FlowUniPCMultistepScheduler, {"prediction_type": "epsilon"}, "prediction_type='epsilon' is not supported"),
        (FlowUniPCMultistepScheduler, {"predict_x0": False}, "predict_x0=False is not supported"),
        (FlowUniPCMultistepScheduler, {"timestep_spacing": "trailing"}, "timestep_spacing='trailing' is not supported"),
        (FlowUniPCMultistepScheduler, {"steps_offset": 1}, "steps_offset=1 is not supported"),
        (FlowUniPCMultistepScheduler, {"final_sigmas_type": "last"}, "final_sigmas_type='last' is not supported"),
        (FlowDPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver"}, "algorithm_type='dpmsolver' is not supported"),
        (FlowDPMSolverMultistepScheduler, {"solver_type": "bh2"}, "solver_type='bh2' is not supported"),
        (FlowDPMSolverMultistepScheduler, {"solver_order": 4}, "solver_order=4 is not supported"),
        (FlowDPMSolverMultistepScheduler, {"variance_type": "learned"}, "variance_type='learned' is not supported"),
        (FlowDPMSolverMultistepScheduler, {"invert_sigmas": True}, "invert_sigmas=True is not supported"),
        (FlowDPMSolverMultistepScheduler, {"trained_betas": [0.1]}, "trained_betas is not supported"),
    ],
)
def test_unsupported_options_name_the_option(cls, kwargs, message):
    with pytest.raises(NotImplementedError, match=message):
        cls(**kwargs)


def test_unipc_high_order_rejects_sigma_one():
    scheduler = FlowUniPCMultistepScheduler(solver_order=3)
    with pytest.raises(ValueError, match="solver_order=3 needs every sigma < 1"):
        scheduler.set_timesteps(sigmas=get_sampling_sigmas(10, 5.0))


def test_dpm_generator_passed_positionally_as_bool_is_caught():
    scheduler = FlowDPMSolverMultistepScheduler()
    scheduler.set_timesteps(4)
    x = torch.zeros(1, 2, 2, 2)
    with pytest.raises(TypeError, match="pass return_dict by keyword"):
        scheduler.step(x, scheduler.timesteps[0], x, False)


# ---------------------------------------------------------------- interface behaviour


@pytest.mark.parametrize("cls", [FlowUniPCMultistepScheduler, FlowDPMSolverMultistepScheduler])
def test_return_forms_dtype_and_restart(cls):
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 4, 2, 2, generator=generator)
    noise = torch.randn(1, 4, 2, 2, generator=generator)
    scheduler = cls()
    scheduler.set_timesteps(5, shift=3.0)
    t0 = scheduler.timesteps[0]
    out = scheduler.step(0.3 * x0 + 0.7 * noise, t0, x0)
    assert isinstance(out, SchedulerOutput)
    chex.assert_shape(out.prev_sample, x0.shape)
    assert torch.equal(out[0], out.prev_sample)

    # A second set_timesteps resets all solver state: the same loop gives the same numbers.
    runs = []
    for _ in range(2):
        scheduler.set_timesteps(5, shift=3.0)
        assert scheduler.step_index is None
        runs.append(fake_model_loop(scheduler, scheduler.timesteps, x0, noise)[1])
    assert torch.equal(runs[0], runs[1])

    # Half-precision inputs are computed in float32 and returned in the model output's dtype.
    scheduler.set_timesteps(5, shift=3.0)
    half = scheduler.step(noise.bfloat16(), t0, x0.bfloat16(), return_dict=False)
    assert isinstance(half, tuple) and len(half) == 1 and half[0].dtype == torch.bfloat16
    scheduler.set_timesteps(5, shift=3.0)
    full = scheduler.step(noise.bfloat16().float(), t0, x0.bfloat16().float()).prev_sample
    torch.testing.assert_close(half[0], full.bfloat16(), atol=0, rtol=0)


def test_duplicated_timestep_starts_at_second_match():
    scheduler = FlowDPMSolverMultistepScheduler()
    scheduler.set_timesteps(sigmas=[0.9, 0.9, 0.5])
    assert scheduler.timesteps.tolist() == [900, 900, 500]
    x = torch.ones(1, 1, 1, 1)
    scheduler.step(x, 900, x)
    assert scheduler.step_index == 2  # started at index 1, then advanced


def test_begin_index_overrides_lookup():
    scheduler = FlowUniPCMultistepScheduler()
    scheduler.set_timesteps(6, shift=3.0)
    scheduler.set_begin_index(3)
    x = torch.ones(1, 1, 1, 1)
    scheduler.step(x, scheduler.timesteps[3], x)
    assert scheduler.step_index == 4 and scheduler.begin_index == 3
    with pytest.raises(ValueError, match="begin_index 9 is outside the 6-step schedule"):
        scheduler.set_begin_index(9)


def test_dynamic_shifting_uses_mu():
    scheduler = FlowUniPCMultistepScheduler(use_dynamic_shifting=True)
    scheduler.set_timesteps(4, mu=math.log(3.0))
    s = np.linspace(scheduler.sigma_max, 0.0, 5)[:-1]
    expected = 3.0 / (3.0 + (1 / s - 1))  # exp(mu) / (exp(mu) + (1/s - 1)), i.e. shift 3
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), expected.astype(np.float32), rtol=0, atol=0)


# ---------------------------------------------------------------- solver accuracy on an analytic ODE

# Gaussian data x0 ~ N(0, c^2): the exact x0 prediction at (x, sigma) is k(sigma) * x and the
# probability-flow ODE moves x proportionally to sqrt(D(sigma)), D = (1 - sigma)^2 c^2 + sigma^2.
C = 0.5


def _variance(sigma):
    return (1 - sigma) ** 2 * C * C + sigma * sigma


def _ode_error(scheduler, steps: int) -> float:
    """|x - exact| at the last nonzero sigma after integrating on a log-SNR-uniform grid in [-2, 2]."""
    scheduler.set_timesteps(sigmas=1 / (1 + np.exp(np.linspace(-2, 2, steps))))
    sigmas = scheduler.sigmas.double()
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    for i, t in enumerate(scheduler.timesteps[:-1]):
        sigma = sigmas[i].item()
        x0_pred = (1 - sigma) * C * C / _variance(sigma) * x
        x = scheduler.step((x - x0_pred) / sigma, t, x).prev_sample
    exact = math.sqrt(_variance(sigmas[steps - 1].item()) / _variance(sigmas[0].item()))
    return (x - exact).abs().max().item()


SOLVERS = [
    ("unipc-o1", lambda: FlowUniPCMultistepScheduler(solver_order=1), 2),  # UniC lifts order 1 to 2
    ("unipc-o2-bh2", lambda: FlowUniPCMultistepScheduler(), 2),
    ("unipc-o2-bh1", lambda: FlowUniPCMultistepScheduler(solver_type="bh1"), 2),
    ("unipc-o3-bh2", lambda: FlowUniPCMultistepScheduler(solver_order=3), 2),
    ("unipc-o3-bh1", lambda: FlowUniPCMultistepScheduler(solver_order=3, solver_type="bh1"), 2),
    ("dpm-o1", lambda: FlowDPMSolverMultistepScheduler(solver_order=1), 1),
    ("dpm-o2-midpoint", lambda: FlowDPMSolverMultistepScheduler(), 2),
    ("dpm-o2-heun", lambda: FlowDPMSolverMultistepScheduler(solver_type="heun"), 2),
    ("dpm-o3", lambda: FlowDPMSolverMultistepScheduler(solver_order=3), 2),
]


@pytest.mark.parametrize("name,make,order", SOLVERS, ids=[s[0] for s in SOLVERS])
def test_solver_converges_on_analytic_ode(name, make, order):
    errors = [_ode_error(make(), steps) for steps in (21, 41, 81)]
    # Each halving of the step at least ~halves (order 1) or ~quarters (order >= 2) the global
    # error; two halvings, so an error that merely crosses zero once cannot pass.
    factor = 1.8 if order == 1 else 3.0
    assert errors[1] < errors[0] / factor and errors[2] < errors[1] / factor, f"{name}: errors {errors}"
    assert errors[1] < (2e-2 if order == 1 else 2e-3), f"{name}: error {errors[1]:.3g} at 41 steps"


def test_final_step_lands_on_x0_prediction():
    for scheduler in (FlowUniPCMultistepScheduler(lower_order_final=False), FlowDPMSolverMultistepScheduler()):
        scheduler.set_timesteps(4, shift=2.0)
        x = torch.randn(1, 3, 2, 2)
        for t in scheduler.timesteps[:-1]:
            x = scheduler.step(0.5 * x, t, x).prev_sample
        velocity = torch.randn(1, 3, 2, 2)
        out = scheduler.step(velocity, scheduler.timesteps[-1], x).prev_sample
        torch.testing.assert_close(out, x - scheduler.sigmas[-2] * velocity, atol=0, rtol=0)


def test_thresholding_bounds_x0():
    x = torch.full((1, 2, 2, 2), 3.0)
    results = {}
    for thresholding in (False, True):
        scheduler = FlowDPMSolverMultistepScheduler(thresholding=thresholding, sample_max_value=1.0)
        scheduler.set_timesteps(sigmas=[0.5])
        results[thresholding] = scheduler.step(-4 * x, scheduler.timesteps[0], x).prev_sample
    assert results[False].abs().max().item() == pytest.approx(9.0)  # x0 = x + 0.5 * 4x = 3x
    assert results[True].abs().max().item() <= 1.0


def test_sde_dpm_noise_is_seeded_and_scaled():
    def run(seed=None, variance_noise=None):
        scheduler = FlowDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
        scheduler.set_timesteps(sigmas=[0.8, 0.4])
        x = torch.ones(1, 2, 3, 3)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        return scheduler.step(0.5 * x, 800, x, generator=generator, variance_noise=variance_noise).prev_sample

    assert torch.equal(run(seed=0), run(seed=0))
    assert not torch.equal(run(seed=0), run(seed=1))
    # First-order SDE step: the noise enters as sigma_t * sqrt(1 - exp(-2h)) * z.
    z = torch.randn(1, 2, 3, 3)
    h = math.log(0.6 / 0.4) - math.log(0.2 / 0.8)
    scale = 0.4 * math.sqrt(1 - math.exp(-2 * h))
    torch.testing.assert_close(run(variance_noise=z) - run(variance_noise=torch.zeros_like(z)), scale * z)
