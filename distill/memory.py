"""The memory plan: what a run will put on each GPU, said before any work, refused when it cannot fit.

From the parameter counts (the typed module configs, counted on the meta device), the placement
(`--teacher_device_strategy`, `--teacher.offload`, `--teacher.sp`, `--teacher_on_cpu`), the student
preset, batch, resolution and the JAX share of the GPU, `plan_memory` lists per GPU:

- torch (the teacher): the resident expert weights (both, one with offload, 1/world of both under
  FSDP, plus the two blocks FSDP gathers at a time), umT5 while prompts are encoded (it is freed
  before the experts are used), the activations of one teacher forward (cond + uncond, calibrated on
  the A14B expert: a 1024^2 CFG pair peaks 1.6 GB above its weights on an H200), the VAE decode of
  the sample grids, and a fixed CUDA context / allocator allowance;
- JAX (the student): params, Adam moments, EMA and gradients in float32, plus the activations of a
  train step (an estimate here; `check_compiled` replaces it by XLA's own figure once the step is
  compiled).

The torch side must fit (1 - jax_memory_fraction) of the usable memory and the student its share;
otherwise `MemoryPlanError` names the flag that would make it fit.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch

log = logging.getLogger(__name__)

GB = 1e9
CUDA_CONTEXT = 1.5 * GB  # context, cuBLAS/cuDNN workspaces, allocator slack


class MemoryPlanError(RuntimeError):
    """The run cannot fit the GPU as configured; the message names what to change."""


@dataclasses.dataclass
class MemoryPlan:
    usable: float  # bytes per GPU the run may use (card or --train.gpu_memory_gb)
    jax_budget: float
    torch_lines: list[tuple[str, float]]
    torch_peak: float
    student_lines: list[tuple[str, float]]
    student_need: float

    @property
    def torch_budget(self) -> float:
        return self.usable - self.jax_budget

    def describe(self) -> str:
        rows = [f"memory plan per GPU: {self.usable / GB:.1f} GB usable = torch {self.torch_budget / GB:.1f} GB "
                f"+ JAX {self.jax_budget / GB:.1f} GB"]
        rows += [f"  torch  {what:48s} {size / GB:8.2f} GB" for what, size in self.torch_lines]
        rows.append(f"  torch  {'peak':48s} {self.torch_peak / GB:8.2f} GB of {self.torch_budget / GB:.1f}")
        rows += [f"  jax    {what:48s} {size / GB:8.2f} GB" for what, size in self.student_lines]
        rows.append(f"  jax    {'need':48s} {self.student_need / GB:8.2f} GB of {self.jax_budget / GB:.1f}")
        return "\n".join(rows)


def _dtype_bytes(name: str) -> int:
    return 2 if name in ("bfloat16", "float16") else 4


def teacher_activation_bytes(batch: int, tokens: int, dim: int, ffn_dim: int, text_len: int) -> float:
    """Peak activation memory of one DiT forward: the float32 residual stream and modulated input, q/k/v,
    attention output (bf16) and the FFN hidden layer, for `batch` samples of `tokens` tokens each."""
    per_token = dim * 24 + ffn_dim * 4  # bytes: ~6 float32 [dim] tensors + 2 bf16 [ffn_dim] live at once
    return batch * (tokens * per_token + text_len * dim * 8)


def vae_decode_bytes(height: int, width: int, vae_dim: int) -> float:
    """Peak of one 1-frame float32 VAE decode at full resolution (a dozen vae_dim-wide maps)."""
    return 12 * vae_dim * height * width * 4


def student_estimate(student_cfg, batch: int, latent_hw: tuple[int, int], text_len: int,
                     param_count: int) -> list[tuple[str, float]]:
    """The student's JAX memory for one train step on `batch` samples (an estimate before compiling)."""
    h, w = latent_hw
    tokens = (h // student_cfg.patch_size) * (w // student_cfg.patch_size)
    act_bytes = 2 if student_cfg.dtype == "bfloat16" else 4
    hidden = student_cfg.hidden_size
    # saved activations of attention + MLP (the factor fitted to XLA's figures for `small`: README "Speed")
    per_block = batch * tokens * hidden * act_bytes * 32
    impl = student_cfg.attention_impl
    if impl == "auto":  # the plan is made for a GPU: auto means cuDNN there in bf16
        impl = "cudnn" if student_cfg.dtype == "bfloat16" else "xla"
    if impl != "cudnn" or not student_cfg.cudnn_text_attention:
        per_block += batch * student_cfg.num_heads * tokens * text_len * 4 * 2  # masked cross-attention scores
    if impl != "cudnn":
        per_block += batch * student_cfg.num_heads * tokens * tokens * 4 * 2  # self-attention scores
    if student_cfg.remat:
        kept = 4  # the block's float32 input
        if student_cfg.remat_policy == "dots":  # + the dense layers' outputs: q k v out, cross q out, fc1 (4D), fc2
            kept += act_bytes * (7 + student_cfg.mlp_ratio)
        activations = student_cfg.depth * batch * tokens * hidden * kept + per_block
    else:
        activations = student_cfg.depth * per_block
    text = batch * text_len * student_cfg.text_dim * 4 * 2  # padded text input + its projection
    return [
        (f"student state ({param_count / 1e6:.0f}M params: f32 params, Adam, EMA, grads)", param_count * 20.0),
        (f"student activations (batch {batch}, {tokens} tokens, remat {student_cfg.remat})", float(activations)),
        ("text embeddings of the batch", float(text)),
    ]


def plan_memory(cfg, wan_config, world: int, usable_bytes: float, is_main: bool = True) -> MemoryPlan:
    """The plan for this run on one GPU (see the module docstring)."""
    from student_jax.state import abstract_train_state, param_count
    from wan.configs import dit_config, t5_config, vae_config

    teacher = cfg.teacher
    dit = dit_config(wan_config)
    expert_params = dit.param_count()
    wbytes = _dtype_bytes(teacher.dtype)
    expert_bytes = expert_params * wbytes
    fp8 = ""
    if teacher.fp8:  # the blocks' linear weights in 1 byte (+ a float32 scale per row), the rest as before
        linear = dit.num_layers * (8 * dit.dim * dit.dim + 2 * dit.dim * dit.ffn_dim)
        rows = dit.num_layers * (8 * dit.dim + dit.ffn_dim + dit.dim)
        expert_bytes = linear + 4 * rows + (expert_params - linear) * wbytes
        fp8 = ", FP8 linears"
    lines: list[tuple[str, float]] = []
    if teacher.device_strategy == "cpu":
        resident = 0.0
        lines.append(("experts (on the CPU)", 0.0))
    elif teacher.device_strategy == "balanced" and world > 1:
        resident = 2 * expert_params * wbytes / world
        per_block = (expert_params / dit.num_layers) * wbytes
        lines.append((f"2 experts sharded over {world} GPUs (FSDP)", resident))
        lines.append(("FSDP: 2 gathered blocks in flight", 2 * per_block))
        resident += 2 * per_block
    elif teacher.offload:
        resident = expert_bytes
        lines.append((f"1 expert resident ({expert_params / 1e9:.1f}B params, offload{fp8})", resident))
    else:
        resident = 2 * expert_bytes
        lines.append((f"2 experts resident ({expert_params / 1e9:.1f}B params each{fp8})", resident))

    t5 = t5_config(wan_config)
    t5_bytes = 0.0
    if not teacher.on_cpu and teacher.device_strategy != "cpu":
        t5_bytes = t5.param_count() * 2 / (world if teacher.device_strategy == "balanced" else 1)
    lines.append(("umT5 while encoding prompts (freed before training)", t5_bytes))
    from .data import text_dtype

    text_bytes = (cfg.data.device_text_prompts * wan_config.text_len * t5.dim
                  * (2 if text_dtype(cfg, "cuda") == torch.bfloat16 else 4))
    lines.append((f"text embeddings kept on the GPU ({cfg.data.device_text_prompts} prompts)", text_bytes))
    resident += text_bytes

    tokens = (cfg.data.height // 16) * (cfg.data.width // 16)
    per_rank = max(1, cfg.train.batch_size // world)
    # the held-out set goes through the teacher in chunks of the training batch too
    teacher_batch = per_rank * teacher.sp * (2 if cfg.train.loss == "cfg" else 1)
    activations = teacher_activation_bytes(teacher_batch, math.ceil(tokens / teacher.sp), dit.dim, dit.ffn_dim,
                                           wan_config.text_len)
    lines.append((f"teacher forward activations (batch {teacher_batch}, {math.ceil(tokens / teacher.sp)} tokens)",
                  activations))
    vae = vae_decode_bytes(cfg.data.height, cfg.data.width, vae_config(wan_config).dim) if is_main else 0.0
    lines.append(("VAE decode of the sample grid", vae))
    lines.append(("CUDA context and allocator slack", CUDA_CONTEXT))
    torch_peak = resident + max(t5_bytes, activations, vae) + CUDA_CONTEXT

    latent_hw = (cfg.data.height // 8, cfg.data.width // 8)
    abstract = abstract_train_state(cfg.student, cfg.optim, latent_hw, wan_config.text_len)
    student_lines = student_estimate(cfg.student, per_rank, latent_hw, wan_config.text_len,
                                     param_count(abstract.params))
    return MemoryPlan(usable=usable_bytes, jax_budget=cfg.train.jax_memory_fraction * usable_bytes,
                      torch_lines=lines, torch_peak=torch_peak, student_lines=student_lines,
                      student_need=sum(size for _, size in student_lines))


def _torch_advice(cfg, world: int) -> str:
    options = []
    if cfg.teacher.device_strategy != "balanced" and world > 1:
        options.append("--teacher_device_strategy balanced (shard the experts over the GPUs)")
    if not cfg.teacher.offload and cfg.teacher.device_strategy in ("gpu", "gpu0"):
        options.append("--teacher.offload (one expert on the GPU at a time)")
    if not cfg.teacher.on_cpu:
        options.append("--teacher_on_cpu (umT5 on the CPU)")
    options.append(f"a lower --train.jax_memory_fraction (now {cfg.train.jax_memory_fraction:g})")
    return "; or ".join(options)


def check(plan: MemoryPlan, cfg, world: int) -> None:
    """Raise MemoryPlanError naming the flags to change when either side cannot fit."""
    if plan.torch_peak > plan.torch_budget:
        raise MemoryPlanError(
            f"the teacher needs about {plan.torch_peak / GB:.1f} GB per GPU but gets "
            f"{plan.torch_budget / GB:.1f} GB ({1 - cfg.train.jax_memory_fraction:.0%} of {plan.usable / GB:.1f}); use "
            + _torch_advice(cfg, world) + ". The plan:\n" + plan.describe()
        )
    if plan.student_need > plan.jax_budget:
        raise MemoryPlanError(
            f"the student needs about {plan.student_need / GB:.1f} GB per GPU but JAX gets {plan.jax_budget / GB:.1f} GB; "
            f"use --student.remat, a smaller --train.batch_size (now {cfg.train.batch_size}) or a higher "
            f"--train.jax_memory_fraction (now {cfg.train.jax_memory_fraction:g}). The plan:\n" + plan.describe()
        )


def compiled_bytes(compiled) -> float | None:
    """XLA's own figure for a compiled computation's device memory (bytes): arguments, outputs and
    temporaries, donated buffers counted once; None where the backend does not report it."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    if stats is None:
        return None
    return float(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
                 - stats.alias_size_in_bytes)


def check_compiled(compiled, plan: MemoryPlan, cfg) -> float | None:
    """XLA's own figure for the compiled train step (bytes), checked against the JAX budget."""
    need = compiled_bytes(compiled)
    if need is None:
        return None
    if need > plan.jax_budget:
        raise MemoryPlanError(
            f"the compiled student step needs {need / GB:.1f} GB (XLA's figure) but JAX gets {plan.jax_budget / GB:.1f} GB; "
            f"use --student.remat, a smaller --train.batch_size (now {cfg.train.batch_size}) or a higher "
            f"--train.jax_memory_fraction (now {cfg.train.jax_memory_fraction:g})"
        )
    return need
