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
from .modules.t5 import T5EncoderModel
from .modules.vae2_1 import Wan2_1_VAE
from .utils.fm_solvers import FlowDPMSolverMultistepScheduler, get_sampling_sigmas, retrieve_timesteps
from .utils.fm_solvers_unipc import FlowUniPCMultistepScheduler

log = logging.getLogger(__name__)

SAMPLE_SOLVERS = ("unipc", "dpm++")


def _t5_sizes(config) -> dict:
    """T5 sizes the config states explicitly (extensions); the rest are inferred from the weights."""
    given = dict(config.get("extensions", None) or {})
    names = {
        "t5_vocab_size": "vocab_size", "t5_dim": "dim", "t5_dim_attn": "dim_attn", "t5_dim_ffn": "dim_ffn",
        "t5_num_heads": "num_heads", "t5_num_layers": "num_layers", "t5_num_buckets": "num_buckets",
        "t5_shared_pos": "shared_pos",
    }
    return {arg: given[key] for key, arg in names.items() if key in given}


def normalize_guide_scale(guide_scale) -> tuple[float, float]:
    """(low-noise scale, high-noise scale); one number means the same for both experts."""
    if isinstance(guide_scale, (int, float)):
        return float(guide_scale), float(guide_scale)
    scales = tuple(float(g) for g in guide_scale)
    if len(scales) != 2:
        raise ValueError(f"guide_scale must be a number or a (low_noise, high_noise) pair, got {guide_scale!r}")
    return scales


class WanT2V:
    """Text-to-video (and 1-frame text-to-image) with the two-expert Wan2.2 A14B model."""

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
    ):
        if t5_fsdp or dit_fsdp or use_sp:
            raise NotImplementedError(
                "t5_fsdp / dit_fsdp / use_sp are not yet supported by this port; run without them "
                "(one process) until the distributed teacher lands."
            )
        checkpoint_dir = Path(checkpoint_dir)
        if not checkpoint_dir.is_dir():
            raise CheckpointError(f"checkpoint_dir {checkpoint_dir} is not a folder (expected a Wan2.2 release folder)")
        device = torch.device(device) if device is not None else torch.device(f"cuda:{device_id}")
        self._setup(config, device, rank, t5_cpu=t5_cpu, init_on_cpu=init_on_cpu)
        config = self.config

        self.text_encoder = T5EncoderModel(
            text_len=config.text_len,
            dtype=config.t5_dtype,
            device=torch.device("cpu"),
            checkpoint_path=checkpoint_dir / config.t5_checkpoint,
            tokenizer_path=checkpoint_dir / config.t5_tokenizer,
            **_t5_sizes(config),
        )
        vae_dim = (config.get("extensions", None) or {}).get("vae_dim")
        self.vae = Wan2_1_VAE(vae_pth=str(checkpoint_dir / config.vae_checkpoint), device=self.device, dim=vae_dim)

        log.info("loading DiT experts from %s", checkpoint_dir)
        self.low_noise_model = self._configure_model(
            WanModel.from_pretrained(checkpoint_dir, subfolder=config.low_noise_checkpoint), convert_model_dtype
        )
        self.high_noise_model = self._configure_model(
            WanModel.from_pretrained(checkpoint_dir, subfolder=config.high_noise_checkpoint), convert_model_dtype
        )

    @classmethod
    def from_modules(
        cls, config, low_noise_model, high_noise_model, text_encoder=None, vae=None, device="cpu", rank: int = 0
    ) -> "WanT2V":
        """A pipeline around already-built modules (tests, custom loading); no files are read."""
        self = cls.__new__(cls)
        self._setup(config, torch.device(device), rank, t5_cpu=False, init_on_cpu=True)
        self.text_encoder, self.vae = text_encoder, vae
        self.low_noise_model = low_noise_model.eval().requires_grad_(False)
        self.high_noise_model = high_noise_model.eval().requires_grad_(False)
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

    def _configure_model(self, model: WanModel, convert_model_dtype: bool) -> WanModel:
        model.eval().requires_grad_(False)
        if convert_model_dtype:
            model.to(self.param_dtype)
        if not self.init_on_cpu:
            model.to(self.device)
        return model

    # ------------------------------------------------------------------ helpers

    def expert_for(self, timestep: float) -> str:
        """'high' for t >= boundary * num_train_timesteps (inclusive), else 'low'."""
        return "high" if timestep >= self.boundary * self.num_train_timesteps else "low"

    def _prepare_model(self, name: str, offload_model: bool) -> WanModel:
        """Put expert `name` on the run device; with offloading, park the other one on the CPU."""
        required = self.high_noise_model if name == "high" else self.low_noise_model
        other = self.low_noise_model if name == "high" else self.high_noise_model
        if offload_model and next(other.parameters()).device.type != "cpu":
            other.to("cpu")
        if next(required.parameters()).device != self.device:
            required.to(self.device)
        return required

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
        for name in ("high", "low"):
            idx = [i for i in range(batch) if self.expert_for(float(timesteps[i])) == name]
            if not idx:
                continue
            model = self._prepare_model(name, offload_model)
            xs = [latents[i] for i in idx]
            ts = timesteps[idx]
            ctx = [context[i].float() for i in idx]
            if context_null is not None:
                xs, ts = xs + xs, torch.cat([ts, ts])
                ctx = ctx + [context_null[i].float() for i in idx]
            with self._autocast():
                pred = model(xs, t=ts.to(self.device), context=ctx, seq_len=seq_len)
            if context_null is None:
                for j, i in enumerate(idx):
                    out[i] = pred[j].float()
                continue
            g = scales[1] if name == "high" else scales[0]
            for j, i in enumerate(idx):
                cond, uncond = pred[j].float(), pred[len(idx) + j].float()
                out[i] = uncond + g * (cond - uncond)
        return out

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
        if offload_model:
            self.low_noise_model.cpu()
            self.high_noise_model.cpu()
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
