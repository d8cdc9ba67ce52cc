"""The Wan teacher as training sees it: build `WanT2V` from the run config, and turn noisy latents
into distillation targets (the conditional or the CFG-guided velocity), each sample routed to its
expert by its own timestep.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch

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
    """A key that changes whenever the teacher's weights or numerics change (cache keys use it)."""
    files = [folder / config.t5_checkpoint]
    for sub in (config.high_noise_checkpoint, config.low_noise_checkpoint):
        files += sorted((folder / sub).glob("*.json"))
    return _digest([file_identity(f) for f in files if f.is_file()], config.text_len, dtype)[:16]


def build_pipeline(folder: Path, config, device: torch.device, dtype: str, t5_on_cpu: bool) -> WanT2V:
    config = dict(config)
    on_gpu = device.type == "cuda"
    config["param_dtype"] = torch.bfloat16 if (on_gpu and dtype == "bfloat16") else torch.float32
    pipe = WanT2V(config, folder, device=device, t5_cpu=t5_on_cpu or not on_gpu, init_on_cpu=not on_gpu,
                  convert_model_dtype=on_gpu and dtype == "bfloat16")
    return pipe


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
        self.loss = loss
        self.guide_scale = normalize_guide_scale(guide_scale)
        self.context_null = None if context_null is None else context_null.to(pipe.device)

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    @torch.no_grad()
    def targets(self, latents: list[torch.Tensor], timesteps: torch.Tensor, contexts: list[torch.Tensor]) -> list[torch.Tensor]:
        """latents: list of [16, 1, H, W]; timesteps [B] (t = 1000 s); contexts: list of [L_i, 4096]."""
        contexts = [c.to(self.device) for c in contexts]
        null = [self.context_null] * len(latents) if self.loss == "cfg" else None
        return self.pipe.denoise(latents, timesteps, contexts, null, self.guide_scale)
