"""The Wan teacher as training sees it: build `WanT2V` from the run config, and turn noisy latents
into distillation targets (the conditional or the CFG-guided velocity), each sample routed to its
expert by its own timestep.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch

from wan.compile import resolve as resolve_compile
from wan.configs import WAN_CONFIGS, load_config
from wan.text2video import WanT2V, normalize_guide_scale

from .data import _digest, file_identity

log = logging.getLogger(__name__)


def release_config(folder: Path, config_path: str = ""):
    """The config of a release folder: explicit JSON, else the folder's config_*.json, else t2v-A14B."""
    if config_path:
        return load_config(config_path)
    found = sorted(folder.glob("config_*.json"))
    return load_config(found[0]) if found else WAN_CONFIGS["t2v-A14B"]


def teacher_id(folder: Path, config, dtype: str) -> str:
    """A key that changes whenever the teacher's weights or numerics change (cache keys use it).

    Built from the release's files relative to the folder (name, size, modification time), so a
    release folder moved or copied with its times keeps its caches."""
    files = [folder / config.t5_checkpoint]
    for sub in (config.high_noise_checkpoint, config.low_noise_checkpoint):
        files += sorted((folder / sub).glob("*"))
    identity = [[str(f.relative_to(folder)), *file_identity(f)[1:]] for f in files if f.is_file()]
    return _digest(identity, config.text_len, dtype)[:16]


def numerics_suffix(teacher_cfg) -> str:
    """What `--teacher.fp8` and its recipe add to `teacher_id` where a cache holds the DiT's outputs
    (teacher samples): "" for the bf16 / float32 teacher, else "-fp8-<scaling>" with "-fast" for fast
    accumulation; each recipe gives other numbers, so none reuses another's samples."""
    if not teacher_cfg.fp8:
        return ""
    return f"-fp8-{teacher_cfg.fp8_scaling}" + ("-fast" if teacher_cfg.fp8_fast_accum else "")


def build_pipeline(folder: Path, config, teacher_cfg, rt) -> WanT2V:
    """`WanT2V` placed as `--teacher_device_strategy`, `--teacher.sp` and `--teacher.offload` say.

    gpu / gpu0: a whole teacher on this rank's GPU (bf16); balanced: experts (and umT5 unless
    --teacher_on_cpu) sharded over every rank with FSDP2, each rank reading only its rows; cpu: the
    teacher on the CPU in float32. sp > 1 adds Ulysses sequence parallelism inside groups of sp ranks.
    """
    config = dict(config)
    strategy = teacher_cfg.device_strategy
    device = torch.device("cpu") if strategy == "cpu" else rt.torch_device
    on_gpu = device.type == "cuda"
    bf16 = on_gpu and teacher_cfg.dtype == "bfloat16"
    config["param_dtype"] = torch.bfloat16 if bf16 else torch.float32
    distributed = rt.world_size > 1
    fsdp = strategy == "balanced" and distributed
    if strategy == "balanced" and not distributed:
        log.info("--teacher_device_strategy balanced with one process: the whole teacher stays on this GPU")
    t5_cpu = teacher_cfg.on_cpu or not on_gpu
    parallel = None
    if distributed and (fsdp or teacher_cfg.sp > 1):
        from wan.distributed import TeacherParallel

        parallel = TeacherParallel(rt.torch_mesh)
    return WanT2V(config, folder, device=device, t5_cpu=t5_cpu, init_on_cpu=not on_gpu, convert_model_dtype=bf16,
                  dit_fsdp=fsdp, t5_fsdp=fsdp and not t5_cpu, use_sp=teacher_cfg.sp > 1, parallel=parallel,
                  expert_offload=teacher_cfg.offload, compile_dit=resolve_compile(teacher_cfg.compile, device),
                  fp8_linears=teacher_cfg.fp8, fp8_scaling=teacher_cfg.fp8_scaling,
                  fp8_fast_accum=teacher_cfg.fp8_fast_accum)


def free_text_encoder(pipe: WanT2V) -> None:
    """Drop the umT5 encoder once every prompt is cached (5.7B parameters in the real model)."""
    pipe.text_encoder = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Teacher:
    """Distillation targets from the two-expert teacher.

    loss='velocity': the conditional flow prediction; loss='cfg': uncond + g * (cond - uncond) with g
    per expert (cond and uncond evaluated as one batch).
    """

    def __init__(self, pipe: WanT2V, loss: str, guide_scale, context_null: torch.Tensor | None):
        if loss not in ("velocity", "cfg"):
            raise ValueError(f"loss must be 'velocity' or 'cfg', got {loss!r}")
        self.pipe = pipe
        self.parallel = pipe.parallel if pipe.sp_size > 1 else None
        self.loss = loss
        self.guide_scale = normalize_guide_scale(guide_scale)
        self.context_null = None if context_null is None else context_null.to(pipe.device)

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    @torch.no_grad()
    def targets(self, latents: list[torch.Tensor], timesteps: torch.Tensor, contexts: list[torch.Tensor]) -> list[torch.Tensor]:
        """latents: list of [16, 1, H, W]; timesteps [B] (t = 1000 s; on the host, or one sync to route
        them); contexts: list of [L_i, 4096]."""
        contexts = [c.to(self.device) for c in contexts]
        null = [self.context_null] * len(latents) if self.loss == "cfg" else None
        return self.pipe.denoise(latents, timesteps, contexts, null, self.guide_scale)

    @torch.no_grad()
    def group_targets(self, latents: list[torch.Tensor], group_timesteps: torch.Tensor,
                      group_contexts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Targets of this rank's samples when the teacher runs per sp group.

        latents: this rank's b samples; group_timesteps / group_contexts: those of the whole sp group's
        samples in rank order (every rank knows which rows its group holds; the timesteps on the host,
        so routing them to experts needs no device round trip). The group's latents are gathered, the
        teacher runs once on them with the sequence split over the group, and this rank keeps its own
        b targets.
        """
        if self.parallel is None:
            return self.targets(latents, group_timesteps, group_contexts)
        b = len(latents)
        group_x = self.parallel.gather_sp(torch.stack(latents))  # [sp * b, 16, 1, h, w]
        out = self.targets(list(group_x), group_timesteps, group_contexts)
        mine = self.parallel.sp_rank * b
        return out[mine : mine + b]
