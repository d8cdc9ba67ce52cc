"""The memory plan (distill/memory.py): what goes on each GPU for the A14B presets, and refusals that
name the flag to change. Pure arithmetic on meta-device parameter counts: runs on CPU."""

import pytest

from distill import config as config_lib
from distill.memory import GB, MemoryPlanError, check, plan_memory
from wan.configs import t2v_A14B


def _plan(*flags, world=1, usable=80e9):
    cfg = config_lib.parse(["--preset", "a14b", "--teacher_path", "/data/wan", *flags])
    return cfg, plan_memory(cfg, t2v_A14B, world, usable)


def test_both_experts_on_an_80gb_card_is_refused_with_the_flag_to_use():
    cfg, plan = _plan()
    resident = dict(plan.torch_lines)["2 experts resident (14.3B params each)"]
    assert resident == pytest.approx(57.2e9, rel=0.01)  # what both bf16 experts measured on the H200
    with pytest.raises(MemoryPlanError, match=r"the teacher needs about .* GB per GPU but gets 48.0 GB.*--teacher.offload"):
        check(plan, cfg, world=1)


def test_fp8_experts_take_about_half_the_memory():
    """--teacher.fp8: the blocks' linear weights (98% of an expert's parameters) in one byte each."""
    cfg, plan = _plan("--teacher.fp8")
    resident = dict(plan.torch_lines)["2 experts resident (14.3B params each, FP8 linears)"]
    assert resident == pytest.approx(57.2e9 / 2, rel=0.03)
    check(plan, cfg, world=1)  # both experts now fit an 80 GB card beside the student
    _, offload = _plan("--teacher.fp8", "--teacher.offload")
    assert dict(offload.torch_lines)["1 expert resident (14.3B params, offload, FP8 linears)"] == resident / 2


def test_one_gpu_80gb_command_fits():
    """The README's 1-GPU command: one expert resident, umT5 on the CPU, the student without remat, 40% for JAX."""
    cfg, plan = _plan("--teacher.offload", "--teacher_on_cpu")  # the a14b preset: 40% for JAX
    check(plan, cfg, world=1)
    lines = dict(plan.torch_lines)
    assert lines["1 expert resident (14.3B params, offload)"] == pytest.approx(28.6e9, rel=0.01)
    assert lines["umT5 while encoding prompts (freed before training)"] == 0.0
    assert plan.torch_peak < plan.torch_budget and plan.student_need < plan.jax_budget
    assert "memory plan per GPU: 80.0 GB usable = torch 48.0 GB + JAX 32.0 GB" in plan.describe()


def test_eight_gpu_fsdp_command_fits_and_shards():
    cfg, plan = _plan("--teacher_device_strategy", "balanced", "--train.batch_size", "64", world=8)
    check(plan, cfg, world=8)
    sharded = dict(plan.torch_lines)["2 experts sharded over 8 GPUs (FSDP)"]
    assert sharded == pytest.approx(57.2e9 / 8, rel=0.01)


def test_student_that_does_not_fit_names_remat_and_batch():
    cfg, plan = _plan("--teacher.offload", "--teacher_on_cpu", "--student.no_remat", "--train.jax_memory_fraction", "0.3",
                      "--train.batch_size", "16")
    with pytest.raises(MemoryPlanError, match=r"the student needs about .* --student.remat, a smaller --train.batch_size \(now 16\)"):
        check(plan, cfg, world=1)


def test_student_estimate_is_near_the_measured_small_step():
    """`small`, batch 8, 1024^2, bf16, cuDNN self-attention; XLA's figures for the compiled step: no remat,
    XLA text attention 38.7 GB on an H200 (DESIGN.md); on an H100 (README "Speed") the a14b preset (no
    remat, blocks unrolled, cuDNN text attention) 24.9 GB, remat keeping the dense outputs 14.8 GB,
    remat keeping only each block's input 8.6 GB."""
    _, plan = _plan("--student.no_cudnn_text_attention")
    assert 30 * GB < plan.student_need < 50 * GB
    _, preset = _plan()
    assert 18 * GB < preset.student_need < 32 * GB
    _, dots = _plan("--student.remat", "--student.remat_policy", "dots")
    assert 10 * GB < dots.student_need < 20 * GB
    _, full = _plan("--student.remat", "--student.remat_policy", "full")
    assert 4 * GB < full.student_need < dots.student_need
