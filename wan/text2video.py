"""WanT2V: the Wan2.2 text-to-video A14B pipeline (two DiT experts, umT5, Wan2.1 VAE) and `generate`.

Same constructor and `generate` arguments as upstream, so existing scripts work unchanged. Beyond
upstream:
- `device=` lets the whole pipeline run on CPU (tests, the tiny default);
- several prompts per call (`input_prompt` may be a list);
- cond and uncond run as ONE DiT batch (same numbers as two passes: valid-token outputs do not
  depend on batch-mates);
- `denoise()` is the guided velocity of a batch whose samples may sit at different timesteps (each
  sample routed to its expert), which is what distillation calls; `generate()` is built on it.

Precision follows upstream: the DiT loop runs under bf16 autocast on CUDA (float32 on CPU), T5 in
`config.t5_dtype`, the VAE in float32, all scheduler maths in float32.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math
import os
import random
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
from easydict import EasyDict

from .checkpoint import CheckpointError
from .configs import extensions, load_config
from .modules.model import WanModel
from .modules.t5 import T5Config, T5EncoderModel
from .modules.vae2_1 import Wan2_1_VAE
from .offload import ExpertResidency
from .utils.fm_solvers import FlowDPMSolverMultistepScheduler, get_sampling_sigmas, retrieve_timesteps
from .utils.fm_solvers_unipc import FlowUniPCMultistepScheduler

log = logging.getLogger(__name__)

SAMPLE_SOLVERS = ("unipc", "dpm++")


def _stated_extensions(config) -> dict:
    """The config's own `extensions` (no defaults filled): sizes it does not state come from the weights."""
    return {k: v for k, v in dict(config.get("extensions", None) or {}).items() if not k.startswith("_")}


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def normalize_guide_scale(guide_scale) -> tuple[float, float]:
    """(low-noise scale, high-noise scale); one number means the same for both experts."""
    if isinstance(guide_scale, (int, float)):
        return float(guide_scale), float(guide_scale)
    scales = tuple(float(g) for g in guide_scale)
    if len(scales) != 2:
        raise ValueError(f"guide_scale must be a number or a (low_noise, high_noise) pair, got {guide_scale!r}")
    return scales


class WanT2V:
    """Text-to-video (and 1-frame text-to-image) with the two-expert Wan2.2 A14B model.

    Distributed (under torchrun, after `dist.init_process_group`): `dit_fsdp` / `t5_fsdp` shard the
    experts / umT5 with FSDP2 over every rank, each rank reading only its rows from the checkpoint;
    `use_sp` runs Ulysses sequence parallelism inside the sp groups of `parallel` (a
    `wan.distributed.TeacherParallel`; default: one group of all ranks, as upstream). Every rank of
    an sp group must call with the same samples; under `dit_fsdp` every rank must call `denoise`
    the same number of times (the experts used are agreed between ranks).
    `expert_offload=True` keeps one expert at a time on the GPU, the other in pinned host memory
    (`wan.offload.ExpertResidency`); upstream's per-call `offload_model` still works as there.
    `compile_dit=True` compiles every DiT block with torch.compile (`wan.compile`, after FSDP and
    sequence parallelism are applied): about 1.4x faster on an H200, the same numbers within bf16
    rounding. `fp8_linears=True` runs the blocks' linear layers in FP8 (`wan.fp8`; not with dit_fsdp),
    scaled per `fp8_scaling` ("row" or "tensor"), with the kernel's fast accumulation if `fp8_fast_accum`
    (the default).
    """

    def __init__(
        self,
        config,
        checkpoint_dir,
        device_id: int = 0,
        rank: int = 0,
        t5_fsdp: bool = False,
        dit_fsdp: bool = False,
        use_sp: bool = False,
        t5_cpu: bool = False,
        init_on_cpu: bool = True,
        convert_model_dtype: bool = False,
        device: str | torch.device | None = None,
        parallel=None,
        expert_offload: bool = False,
        compile_dit: bool = False,
        fp8_linears: bool = False,
        fp8_scaling: str = "row",
        fp8_fast_accum: bool = True,
    ):
        checkpoint_dir = Path(checkpoint_dir)
        if not checkpoint_dir.is_dir():
            raise CheckpointError(f"checkpoint_dir {checkpoint_dir} is not a folder (expected a Wan2.2 release folder)")
        if t5_fsdp and t5_cpu:
            raise ValueError("t5_fsdp shards umT5 over the GPUs and t5_cpu keeps it on the CPU: choose one")
        if fp8_linears and dit_fsdp:
            raise ValueError("fp8_linears quantises whole weight matrices and dit_fsdp shards them: choose one")
        if fp8_linears:
            from .fp8 import SCALINGS

            if fp8_scaling not in SCALINGS:
                raise ValueError(f"fp8_scaling must be {' or '.join(map(repr, SCALINGS))}, got {fp8_scaling!r}")
        if dit_fsdp and expert_offload:
            raise ValueError("dit_fsdp already shards both experts over the GPUs; expert_offload is for a whole teacher "
                             "per GPU: choose one")
        device = torch.device(device) if device is not None else torch.device(f"cuda:{device_id}")
        if (t5_fsdp or dit_fsdp or use_sp) and parallel is None:
            from .distributed import TeacherParallel

            parallel = TeacherParallel.from_world(sp=_world_size() if use_sp else 1, device_type=device.type)
        if parallel is not None:
            rank = parallel.rank
        self._setup(config, device, rank, t5_cpu=t5_cpu, init_on_cpu=init_on_cpu)
        self.parallel = parallel
        self.dit_fsdp = dit_fsdp
        config = self.config
        dist_kwargs = {}
        if t5_fsdp:
            from .distributed import fsdp_local_view, shard_t5

            dist_kwargs = dict(parallelize=functools.partial(shard_t5, mesh=parallel.fsdp_mesh),
                               local_view=fsdp_local_view)
        self.text_encoder = T5EncoderModel(
            text_len=config.text_len,
            dtype=config.t5_dtype,
            device=self.device if t5_fsdp else torch.device("cpu"),
            checkpoint_path=checkpoint_dir / config.t5_checkpoint,
            tokenizer_path=checkpoint_dir / config.t5_tokenizer,
            **dist_kwargs,
            **T5Config.explicit_sizes(_stated_extensions(config)),
        )
        self.t5_fsdp = t5_fsdp
        vae_dim = _stated_extensions(config).get("vae_dim")
        self.vae = Wan2_1_VAE(vae_pth=str(checkpoint_dir / config.vae_checkpoint), device=self.device, dim=vae_dim)

        log.info("loading DiT experts from %s", checkpoint_dir)
        dtype = self.param_dtype if convert_model_dtype else None
        if self.device.type == "cpu":
            dtype = torch.float32  # no autocast on the CPU: a bf16 release computes in float32 there
        if dit_fsdp:
            from .distributed import fsdp_local_view, shard_dit

            half = self.param_dtype if (self.device.type == "cuda" and self.param_dtype != torch.float32) else None
            load = dict(device=self.device, local_view=fsdp_local_view,
                        parallelize=functools.partial(shard_dit, mesh=parallel.fsdp_mesh, param_dtype=half))
        else:
            on_device = not init_on_cpu and not expert_offload
            load = dict(device=self.device if on_device else torch.device("cpu"))
        experts = {
            name: WanModel.from_pretrained(checkpoint_dir, subfolder=sub, torch_dtype=dtype, **load)
            for name, sub in (("low", config.low_noise_checkpoint), ("high", config.high_noise_checkpoint))
        }
        if use_sp and parallel.sp > 1:
            from .distributed import apply_sequence_parallel

            for model in experts.values():
                apply_sequence_parallel(model, parallel.sp_group)
            self.sp_size = parallel.sp
        if fp8_linears:
            from .fp8 import has_fp8_matmul, quantize_dit

            for name, model in experts.items():
                count = quantize_dit(model, work_device=self.device, scaling=fp8_scaling, fast_accum=fp8_fast_accum)
                log.info("expert %s: %d block linear layers in FP8 (e4m3, %s-wise scales%s)", name, count,
                         fp8_scaling, ", fast accumulation" if fp8_fast_accum else "")
            if not has_fp8_matmul(self.device):
                log.warning("%s has no FP8 matmul: the FP8 teacher's products run in float32 (its numbers, not its "
                            "speed)", self.device)
        if compile_dit:
            from .compile import compile_dit as compile_blocks

            for model in experts.values():
                compile_blocks(model)
        self._set_experts(experts["low"], experts["high"], "swap" if expert_offload else "resident")

    @classmethod
    def from_modules(
        cls, config, low_noise_model, high_noise_model, text_encoder=None, vae=None, device="cpu", rank: int = 0
    ) -> "WanT2V":
        """A pipeline around already-built modules (tests, custom loading); no files are read."""
        self = cls.__new__(cls)
        self._setup(config, torch.device(device), rank, t5_cpu=False, init_on_cpu=True)
        self.parallel, self.dit_fsdp, self.t5_fsdp = None, False, False
        self.text_encoder, self.vae = text_encoder, vae
        self._set_experts(low_noise_model.eval().requires_grad_(False),
                          high_noise_model.eval().requires_grad_(False), "resident")
        return self

    def _setup(self, config, device: torch.device, rank: int, t5_cpu: bool, init_on_cpu: bool) -> None:
        if isinstance(config, (str, os.PathLike)):
            config = load_config(config)
        self.config = config = EasyDict(config)
        self.device = device
        self.rank = rank
        self.t5_cpu = t5_cpu
        self.init_on_cpu = init_on_cpu
        self.num_train_timesteps = config.num_train_timesteps
        self.boundary = config.boundary
        self.param_dtype = config.param_dtype
        self.vae_stride = tuple(config.vae_stride)
        self.patch_size = tuple(config.patch_size)
        self.sample_neg_prompt = config.sample_neg_prompt
        self.z_dim = extensions(config).vae_z_dim
        self.sp_size = 1

    def _set_experts(self, low: WanModel, high: WanModel, mode: str) -> None:
        self.low_noise_model, self.high_noise_model = low, high
        self.residency = ExpertResidency({"low": low, "high": high}, self.device, mode)

    # ------------------------------------------------------------------ helpers

    def expert_for(self, timestep: float) -> str:
        """'high' for t >= boundary * num_train_timesteps (inclusive), else 'low'."""
        return "high" if timestep >= self.boundary * self.num_train_timesteps else "low"

    def _prepare_model(self, name: str, offload_model: bool) -> WanModel:
        """Put expert `name` on the run device; with offloading, park the other one on the CPU."""
        if self.dit_fsdp:  # sharded experts are always resident
            return self.high_noise_model if name == "high" else self.low_noise_model
        model = self.residency.activate(name)
        if offload_model and self.residency.mode == "resident":
            other = self.low_noise_model if name == "high" else self.high_noise_model
            if next(other.parameters()).device.type != "cpu":
                other.to("cpu")
        return model

    def _autocast(self):
        if self.device.type == "cuda" and self.param_dtype in (torch.bfloat16, torch.float16):
            return torch.amp.autocast("cuda", dtype=self.param_dtype)
        return contextlib.nullcontext()

    def latent_shape(self, size: tuple[int, int], frame_num: int) -> tuple[int, int, int, int]:
        """[z_dim, F', H/8, W/8] for size = (width, height); validates divisibility with a clear error."""
        width, height = size
        step_h = self.vae_stride[1] * self.patch_size[1]
        step_w = self.vae_stride[2] * self.patch_size[2]
        if width <= 0 or height <= 0 or width % step_w or height % step_h:
            raise ValueError(
                f"size (width, height) = {tuple(size)} must be positive multiples of "
                f"vae_stride x patch_size = ({step_w}, {step_h}); e.g. use {(max(step_w, width // step_w * step_w), max(step_h, height // step_h * step_h))}"
            )
        if frame_num < 1 or (frame_num - 1) % self.vae_stride[0]:
            raise ValueError(f"frame_num must be 1 + {self.vae_stride[0]}k (1, 5, 9, ..., 81), got {frame_num}")
        return (
            self.z_dim,
            (frame_num - 1) // self.vae_stride[0] + 1,
            height // self.vae_stride[1],
            width // self.vae_stride[2],
        )

    def seq_len_for(self, latent_shape: Sequence[int]) -> int:
        _, lat_f, lat_h, lat_w = latent_shape
        tokens = lat_h * lat_w / (self.patch_size[1] * self.patch_size[2]) * lat_f
        return math.ceil(tokens / self.sp_size) * self.sp_size

    def encode_text(self, prompts: list[str], offload_model: bool = False) -> list[torch.Tensor]:
        """umT5 embeddings (list of [L_i, 4096], T5 dtype) on the run device."""
        if self.t5_cpu:
            return [c.to(self.device) for c in self.text_encoder(prompts, torch.device("cpu"))]
        if self.t5_fsdp:  # sharded: resident on every rank, and every rank must call
            return self.text_encoder(prompts, self.device)
        self.text_encoder.model.to(self.device)
        context = self.text_encoder(prompts, self.device)
        if offload_model:
            self.text_encoder.model.cpu()
        return context

    # ------------------------------------------------------------------ the model call

    @torch.no_grad()
    def denoise(
        self,
        latents: list[torch.Tensor],
        timesteps: torch.Tensor,
        context: list[torch.Tensor],
        context_null: list[torch.Tensor] | None = None,
        guide_scale=None,
        seq_len: int | None = None,
        offload_model: bool = False,
    ) -> list[torch.Tensor]:
        """Guided flow prediction for a batch of latents, each at its own timestep.

        latents: list of [16, F, H, W]; timesteps: [B] (the integer timesteps the experts see);
        context / context_null: list of [L_i, 4096] per sample (context_null None: no guidance).
        Each sample goes to its expert by `t >= boundary * 1000`; with guidance the expert sees cond
        and uncond as one batch of 2B and the result is uncond + g * (cond - uncond), g per expert.
        Returns a list of float32 [16, F, H, W].
        """
        batch = len(latents)
        if len(context) != batch or (context_null is not None and len(context_null) != batch):
            raise ValueError(
                f"got {batch} latents but {len(context)} contexts"
                + ("" if context_null is None else f" and {len(context_null)} null contexts")
            )
        timesteps = torch.as_tensor(timesteps).reshape(-1)
        if timesteps.numel() != batch:
            raise ValueError(f"timesteps must hold one value per latent ({batch}), got shape {tuple(timesteps.shape)}")
        if seq_len is None:
            seq_len = max(self.seq_len_for(x.shape) for x in latents)
        scales = normalize_guide_scale(guide_scale) if context_null is not None else None

        out: list[torch.Tensor | None] = [None] * batch
        # routing is host-side work: free for host timesteps (training passes them), one transfer otherwise;
        # compared in float64 exactly as `expert_for` compares a Python float
        host_t = timesteps.cpu()
        high = host_t.double() >= self.boundary * self.num_train_timesteps  # [B] bool
        routes = {"high": high.nonzero().flatten().tolist(), "low": (~high).nonzero().flatten().tolist()}
        needed = [bool(routes["high"]), bool(routes["low"])]
        if self.dit_fsdp and self.parallel is not None:
            # every rank must run the same sharded experts (their all-gathers are collective)
            needed = self.parallel.any_rank(needed, self.device)
        for name, run in zip(("high", "low"), needed):
            idx = routes[name]
            if not run:
                continue
            model = self._prepare_model(name, offload_model)
            if not idx:  # another rank needs this expert: join its collectives with a throwaway sample
                t_dummy = self.boundary * self.num_train_timesteps + (1 if name == "high" else -1)
                with self._autocast():
                    model([torch.zeros_like(latents[0])], t=torch.full((1,), t_dummy, device=self.device),
                          context=[context[0].new_zeros(1, context[0].shape[-1]).float()], seq_len=seq_len)
                continue
            xs = [latents[i] for i in idx]
            ts = host_t[idx]
            ctx = [context[i] for i in idx]  # the model casts them (autocast on GPU, its weights' dtype on CPU)
            if context_null is not None:
                xs, ts = xs + xs, torch.cat([ts, ts])
                ctx = ctx + [context_null[i] for i in idx]
            with self._autocast():
                pred = model(xs, t=self._to_device(ts), context=ctx, seq_len=seq_len)
            if context_null is None:
                for j, i in enumerate(idx):
                    out[i] = pred[j]
                continue
            g = scales[1] if name == "high" else scales[0]
            n = len(idx)
            # the model returns float32: uncond + g * (cond - uncond) in float32
            if all(p.shape == pred[0].shape for p in pred):  # one batched combination (the training case)
                both = torch.stack(pred)  # [2n, C, F, H, W]: cond rows, then uncond rows
                guided = both[n:] + g * (both[:n] - both[n:])  # [n, C, F, H, W]
            else:
                guided = [pred[n + j] + g * (pred[j] - pred[n + j]) for j in range(n)]
            for j, i in enumerate(idx):
                out[i] = guided[j]
        return out

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A small host tensor on the run device without making the host wait for the GPU (page-locked,
        non-blocking copy); a tensor already there is returned as is."""
        if tensor.device == self.device:
            return tensor
        if self.device.type == "cuda" and tensor.device.type == "cpu":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    # ------------------------------------------------------------------ sampling

    def make_scheduler(self, sample_solver: str, sampling_steps: int, shift: float):
        """The flow solver set up exactly as upstream's generate does; returns (scheduler, timesteps)."""
        if sample_solver == "unipc":
            scheduler = FlowUniPCMultistepScheduler(
                num_train_timesteps=self.num_train_timesteps, shift=1, use_dynamic_shifting=False
            )
            scheduler.set_timesteps(sampling_steps, device=self.device, shift=shift)
            return scheduler, scheduler.timesteps
        if sample_solver == "dpm++":
            scheduler = FlowDPMSolverMultistepScheduler(
                num_train_timesteps=self.num_train_timesteps, shift=1, use_dynamic_shifting=False
            )
            timesteps, _ = retrieve_timesteps(
                scheduler, device=self.device, sigmas=get_sampling_sigmas(sampling_steps, shift)
            )
            return scheduler, timesteps
        raise ValueError(f"sample_solver must be one of {SAMPLE_SOLVERS}, got {sample_solver!r}")

    @torch.no_grad()
    def sample(
        self,
        noise: torch.Tensor,
        context: list[torch.Tensor],
        context_null: list[torch.Tensor],
        sampling_steps: int,
        shift: float,
        guide_scale,
        sample_solver: str = "unipc",
        seq_len: int | None = None,
        generator: torch.Generator | None = None,
        offload_model: bool = False,
        progress: bool = False,
        step_callback: Callable[[int, int, str, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Run the two-expert CFG sampling loop from `noise` [N, 16, F, H, W]; returns the final latents.

        `step_callback(step, t, expert, latents)` sees the latents after each step.
        """
        if noise.dim() != 5:
            raise ValueError(f"noise must be [N, C, F, H, W], got shape {tuple(noise.shape)}")
        scheduler, timesteps = self.make_scheduler(sample_solver, sampling_steps, shift)
        latents = noise.to(self.device, torch.float32)
        if seq_len is None:
            seq_len = self.seq_len_for(latents.shape[1:])
        steps = timesteps
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(timesteps, desc="sampling", disable=self.rank != 0)
        for step, t in enumerate(steps):
            batch_t = t.reshape(1).expand(latents.shape[0])
            pred = self.denoise(
                list(latents), batch_t, context, context_null, guide_scale, seq_len, offload_model
            )
            latents = scheduler.step(torch.stack(pred), t, latents, return_dict=False, generator=generator)[0]
            if step_callback is not None:
                step_callback(step, int(t), self.expert_for(float(t)), latents)
        return latents

    def generate(
        self,
        input_prompt: str | list[str],
        size: tuple[int, int] = (1280, 720),
        frame_num: int = 81,
        shift: float = 5.0,
        sample_solver: str = "unipc",
        sampling_steps: int = 50,
        guide_scale=5.0,
        n_prompt: str | list[str] = "",
        seed: int = -1,
        offload_model: bool = True,
        progress: bool = True,
        return_latents: bool = False,
    ):
        """Generate a video [3, F, H, W] in [-1, 1] per prompt (upstream arguments and defaults).

        size is (width, height). A list of prompts gives a list of videos, sampled as one batch; the
        first prompt gets the same noise upstream draws for that seed.
        `return_latents=True` returns the final latents [16, F', H/8, W/8] instead (no VAE decode).
        """
        single = isinstance(input_prompt, str)
        prompts = [input_prompt] if single else list(input_prompt)
        if not prompts:
            raise ValueError("input_prompt is empty: give a prompt or a non-empty list of prompts")
        if isinstance(n_prompt, str):
            n_prompts = [n_prompt] * len(prompts)
        else:
            n_prompts = list(n_prompt)
            if len(n_prompts) != len(prompts):
                raise ValueError(f"{len(n_prompts)} negative prompts for {len(prompts)} prompts")
        # Only the exact empty string means "use the config's negative prompt" (as upstream).
        n_prompts = [p if p != "" else self.sample_neg_prompt for p in n_prompts]

        target_shape = self.latent_shape(size, frame_num)
        seq_len = self.seq_len_for(target_shape)
        seed = seed if seed >= 0 else random.randint(0, sys.maxsize)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)

        context = self.encode_text(prompts, offload_model)
        context_null = self.encode_text(n_prompts, offload_model)
        # One float32 randn of the target shape per prompt, in order: the first prompt gets exactly
        # the noise upstream draws for this seed on this device.
        noise = torch.stack(
            [torch.randn(target_shape, dtype=torch.float32, device=self.device, generator=generator) for _ in prompts]
        )
        latents = self.sample(
            noise, context, context_null, sampling_steps, shift, guide_scale, sample_solver,
            seq_len=seq_len, generator=generator, offload_model=offload_model, progress=progress,
        )
        if offload_model and not self.dit_fsdp:
            self.residency.evict_all()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if return_latents:
            out = list(latents)
        else:
            out = self.vae.decode(list(latents)) if self.rank == 0 else None
        if offload_model:
            gc.collect()
        if out is None:
            return None
        return out[0] if single else out
