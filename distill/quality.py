"""Sample quality against the teacher: attribute accuracy, PSNR / R^2 to the teacher, diversity, saturation.

All figures are computed on a fixed held-out set: captions (toy-world captions are parsed back into
the attributes they ask for) times a few fixed noises each, so two evaluations of a run, or of two
runs, see exactly the same inputs.

- attribute accuracy: `distill.toyworld.detect` on the decoded image against the caption, per
  attribute and "all" (every attribute right); only for toy-world captions;
- PSNR (dB) and R^2 of a sample against the teacher's sample from the same noise and caption
  (R^2 = 1 - SSE / SST over all pixels: the share of the teacher images' variance the samples explain);
- diversity: the mean pairwise RMS distance (pixels in [0, 1]) between the samples of one caption
  across its noises, averaged over captions (collapse shows as a fall);
- saturation: the share of decoded pixel values at or beyond the [-1, 1] clip (over-saturation).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import torch

from . import toyworld

__all__ = ["QualitySet", "decode", "image_metrics", "make_quality_set", "teacher_samples"]


@dataclasses.dataclass
class QualitySet:
    captions: list[str]
    truths: list[dict | None]  # per caption: the toy-world attributes, or None
    caption_of: np.ndarray  # [N] caption index of each sample
    noise: np.ndarray  # [N, 16, h, w] float32, in the teacher's latent space

    @property
    def size(self) -> int:
        return len(self.caption_of)


def make_quality_set(captions: list[str], per_caption: int, latent_hw: tuple[int, int], seed: int = 4242,
                     channels: int = 16) -> QualitySet:
    truths = []
    for text in captions:
        try:
            truths.append(toyworld.parse(text))
        except ValueError:
            truths.append(None)
    caption_of = np.repeat(np.arange(len(captions)), per_caption)
    noise = np.random.default_rng(seed).standard_normal((len(caption_of), channels, *latent_hw)).astype(np.float32)
    return QualitySet(list(captions), truths, caption_of, noise)


@torch.no_grad()
def decode(vae, latents: torch.Tensor, batch: int = 16) -> tuple[np.ndarray, float]:
    """Latents [N, 16, h, w] -> (uint8 images [N, H, W, 3], the share of values clipped to [-1, 1])."""
    images, clipped, total = [], 0, 0
    for i in range(0, len(latents), batch):
        z = latents[i:i + batch].to(vae.device, torch.float32)[:, :, None]  # [b, 16, 1, h, w]
        with vae._autocast():
            video = vae.model.decode(z, vae.scale).float()[:, :, 0]  # [b, 3, H, W], not clamped
        clipped += int((video.abs() >= 1.0).sum())
        total += video.numel()
        images.append(((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(images), clipped / max(total, 1)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


def _r2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(1 - np.sum((a - b) ** 2) / max(np.sum((b - b.mean()) ** 2), 1e-10))


def image_metrics(images: np.ndarray, qset: QualitySet, saturation: float,
                  reference: np.ndarray | None = None) -> dict[str, float]:
    """The figures of one set of samples (see the module docstring); `reference` = the teacher's images."""
    out: dict[str, float] = {"saturation": saturation}
    scores: dict[str, list[bool]] = {}
    for image, c in zip(images, qset.caption_of):
        truth = qset.truths[c]
        if truth is None:
            continue
        result = toyworld.score(truth, toyworld.detect(image))
        for key, ok in result.items():
            scores.setdefault(key, []).append(ok)
        scores.setdefault("all", []).append(all(result.values()))
    for key, values in scores.items():
        out[f"accuracy/{key}"] = float(np.mean(values))
    if scores:
        out["accuracy"] = float(np.mean([np.mean(v) for k, v in scores.items() if k != "all"]))
    pixels = images.astype(np.float64) / 255.0
    distances = []
    for c in range(len(qset.captions)):
        group = pixels[qset.caption_of == c]
        for a, b in itertools.combinations(range(len(group)), 2):
            distances.append(np.sqrt(np.mean((group[a] - group[b]) ** 2)))
    if distances:
        out["diversity"] = float(np.mean(distances))
    if reference is not None:
        out["psnr_to_teacher"] = _psnr(images, reference)
        out["r2_to_teacher"] = _r2(images, reference)
    return out


@torch.no_grad()
def teacher_samples(pipe, qset: QualitySet, contexts: list[torch.Tensor], context_null: torch.Tensor, steps: int,
                    shift: float, guide_scale, batch: int = 16) -> torch.Tensor:
    """The teacher's x0 [N, 16, h, w] for the set (its own sampler: UniPC, both experts, CFG)."""
    out = []
    for i in range(0, qset.size, batch):
        rows = range(i, min(i + batch, qset.size))
        noise = torch.from_numpy(qset.noise[list(rows)])[:, :, None]  # [b, 16, 1, h, w]
        ctx = [contexts[qset.caption_of[r]] for r in rows]
        x0 = pipe.sample(noise, ctx, [context_null] * len(ctx), sampling_steps=steps, shift=shift,
                         guide_scale=tuple(guide_scale))
        out.append(x0[:, :, 0].float().cpu())
    return torch.cat(out)


def toy_teacher_report(pipe, captions: list[str], per_caption: int = 4, steps: int = 40, seed: int = 4242) -> dict:
    """Accuracy etc. of a toy-world teacher's 40-step CFG samples of `captions` (used after training)."""
    config = pipe.config
    qset = make_quality_set(captions, per_caption, (64 // 8, 64 // 8), seed)
    contexts = pipe.encode_text(captions)
    null = pipe.encode_text([config.sample_neg_prompt])[0]
    x0 = teacher_samples(pipe, qset, contexts, null, steps, config.sample_shift, config.sample_guide_scale)
    images, saturation = decode(pipe.vae, x0)
    return image_metrics(images, qset, saturation), images
