"""Evaluators of a distillation run, built from the config: held-out velocity error, and sample quality
against the teacher (with the sample grid). Each has `every` and `__call__(step, state) -> metrics`.

`QualityEvaluator` samples the teacher once (its own sampler, `--eval.teacher_steps`, CFG) and the
student's EMA parameters at each of `--eval.student_steps` (1, 2, 4, 8) on fixed held-out captions
and noises, decodes both with the Wan VAE and scores them (`distill.quality`); it writes the grid
(one row per held-out caption: the teacher, then the student at each step count, from the same
noise) and warns when the student's diversity or attribute accuracy falls below half its first
evaluation after step 0 (collapse). Every jitted computation runs on every rank; only rank 0 decodes and writes.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import torch

from . import quality
from .data import pad_text

log = logging.getLogger(__name__)


def eval_batch(cfg, eval_x0, eval_contexts, text_len, teacher, replicate, chunk: int):
    """Held-out batch: every eval latent x num_noise draws x cfg.eval.timesteps, teacher targets once.

    The teacher sees the rows in chunks of `chunk` (the training teacher batch, so evaluation never
    needs more activation memory than a step), high-noise rows first so that a chunk rarely mixes
    experts (with --teacher.offload every mixed chunk would swap them)."""
    import jax.numpy as jnp

    from bridge.dlpack import jax_to_torch, teacher_outputs_to_jax
    from student_jax.projection import from_teacher, to_teacher

    x0_16 = eval_x0["latents"].numpy()
    prompt_index = eval_x0["prompt_index"].numpy()
    rng = np.random.default_rng(12345)
    rows, ts = [], []
    for r in range(len(x0_16)):
        for _ in range(cfg.eval.num_noise):
            for t in cfg.eval.timesteps:
                rows.append(r)
                ts.append(t)
    rows, ts = np.array(rows), np.array(ts, np.float32)
    x0 = np.asarray(from_teacher(jnp.asarray(x0_16[rows]), cfg.student))
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    s = (ts / 1000.0)[:, None, None, None]
    x_t = ((1 - s) * x0 + s * eps).astype(np.float32)  # student space [E, C, h, w]
    x_t16 = jax_to_torch(to_teacher(jnp.asarray(x_t), cfg.student))  # [E, 16, h, w]
    ctx = [eval_contexts[prompt_index[r]] for r in rows]
    order = np.argsort(-ts, kind="stable")  # high-noise expert's rows first
    chunks = []
    for i in range(0, len(rows), chunk):
        part = order[i : i + chunk]
        latents = [x_t16[j][:, None].to(teacher.device) for j in part]
        outs = teacher.targets(latents, torch.from_numpy(ts[part]), [ctx[j] for j in part])
        chunks.append(teacher_outputs_to_jax([o.float() for o in outs]))  # [b, 16, h, w], through the bridge
    target = jnp.concatenate(chunks)[np.argsort(order)]  # back to row order  [E, 16, h, w]
    text, mask = pad_text(ctx, text_len)
    return dict(x_t=replicate(x_t), t=replicate(ts), text=replicate(text), text_mask=replicate(mask),
                target=replicate(target))


class VelocityError:
    """Held-out relative velocity error ||v_student - v_teacher|| / ||v_teacher|| of params and EMA."""

    name = "velocity_error"

    def __init__(self, every: int, model, batch, replicated):
        import jax

        from student_jax.train_step import eval_velocity_error

        self.every, self.batch = every, batch
        self.fn = jax.jit(functools.partial(eval_velocity_error, model=model), in_shardings=(replicated, replicated),
                          out_shardings=replicated)

    def __call__(self, step: int, state) -> dict[str, float]:
        import jax

        errors = {"eval/rel_velocity_error": float(jax.device_get(self.fn(state.params, self.batch))),
                  "eval/rel_velocity_error_ema": float(jax.device_get(self.fn(state.ema, self.batch)))}
        log.info("step %d: held-out relative velocity error %.4f (ema %.4f)", step, errors["eval/rel_velocity_error"],
                 errors["eval/rel_velocity_error_ema"])
        return errors


class QualityEvaluator:
    """Teacher vs student samples on fixed held-out captions and noise (see the module docstring)."""

    name = "quality"

    def __init__(self, cfg, wan_config, pipe, eval_prompts, eval_contexts, context_null, text_len, latent_hw,
                 guide, replicate, model, is_main: bool, collective: bool, workdir: Path, every: int):
        import jax
        import jax.numpy as jnp

        from bridge.dlpack import jax_to_torch
        from student_jax.projection import to_teacher
        from student_jax.sampler import sample

        self.every, self.is_main, self.pipe, self.workdir = every, is_main, pipe, workdir
        count = min(cfg.eval.quality_prompts, len(eval_prompts))
        self.qset = quality.make_quality_set(eval_prompts[:count], cfg.eval.quality_noises, latent_hw,
                                             channels=cfg.student.latent_channels)
        self.grid_rows = min(cfg.eval.grid_prompts, count)
        contexts = eval_contexts[:count]
        text, mask = pad_text([contexts[c] for c in self.qset.caption_of], text_len)
        self.inputs = (replicate(self.qset.noise), replicate(text), replicate(mask))
        self.to_teacher = jax.jit(functools.partial(to_teacher, cfg=cfg.student))
        self.steps = tuple(cfg.eval.student_steps)
        self.samplers = {k: functools.partial(sample, model=model, steps=k, shift=wan_config.sample_shift,
                                              solver=cfg.eval.sample_solver) for k in self.steps}
        self.history: list[dict] = []
        self.first: dict | None = None
        self.teacher_images = None
        self.teacher_metrics: dict = {}
        if is_main or collective:  # a distributed teacher samples on every rank; rank 0 decodes
            noise16 = jax_to_torch(self.to_teacher(jnp.asarray(self.qset.noise)))  # [N, 16, h, w]
            teacher_set = quality.QualitySet(self.qset.captions, self.qset.truths, self.qset.caption_of,
                                             noise16.cpu().numpy())
            g = guide if cfg.train.loss == "cfg" else (1.0, 1.0)
            steps = cfg.eval.teacher_steps or wan_config.sample_steps
            x0 = quality.teacher_samples(pipe, teacher_set, contexts, context_null, steps, wan_config.sample_shift, g,
                                         batch=max(1, cfg.train.batch_size))
            if is_main:
                self.teacher_images, saturation = quality.decode(pipe.vae, x0)
                self.teacher_metrics = quality.image_metrics(self.teacher_images, self.qset, saturation)
                log.info("teacher (%d steps, CFG) on %d held-out samples: %s", steps, self.qset.size,
                         _short(self.teacher_metrics))

    def __call__(self, step: int, state) -> dict[str, float]:
        from bridge.dlpack import global_to_local, jax_to_torch

        noise, text, mask = self.inputs
        latents = {k: jax_to_torch(global_to_local(self.to_teacher(fn(state.ema, noise=noise, text=text, text_mask=mask))))
                   for k, fn in self.samplers.items()}  # all ranks run the jitted samplers
        if not self.is_main:
            return {}
        out = {f"quality/teacher/{k}": v for k, v in self.teacher_metrics.items()}
        images = {}
        for k, z in latents.items():
            images[k], saturation = quality.decode(self.pipe.vae, z)
            metrics = quality.image_metrics(images[k], self.qset, saturation, reference=self.teacher_images)
            out.update({f"quality/student_{k}step/{name}": v for name, v in metrics.items()})
        self._warn_on_collapse(step, out)
        self.history.append({"step": step, **out})
        rows = []
        for c in range(self.grid_rows):
            first = int(np.flatnonzero(self.qset.caption_of == c)[0])
            rows.append([self.teacher_images[first]] + [images[k][first] for k in self.steps])
        from .metrics import save_grid

        save_grid(self.workdir / "samples" / f"step_{step:07d}.png", rows)
        log.info("step %d: student (EMA) %s", step, {k: _short(
            {n.split("/")[-1]: v for n, v in out.items() if n.startswith(f"quality/student_{k}step/")}) for k in self.steps})
        return out

    def _warn_on_collapse(self, step: int, out: dict) -> None:
        if step == 0:  # the untrained student is no baseline: its samples are decoded noise
            return
        if self.first is None:
            self.first = dict(out)
            return
        for k in self.steps:
            for name, fall in (("diversity", 0.5), ("accuracy", 0.5)):
                key = f"quality/student_{k}step/{name}"
                if key in out and self.first.get(key, 0) > 0.02 and out[key] < fall * self.first[key]:
                    log.warning("step %d: the %d-step student's %s fell from %.3f (first evaluation) to %.3f: "
                                "collapse or lost diversity?", step, k, name, self.first[key], out[key])

    def plot(self, path: Path) -> None:
        """A PNG of every quality figure over the run (the teacher as a flat reference line)."""
        if not self.is_main or not self.history:
            return
        from .metrics import plot_series

        panels = {}
        for name in ("accuracy", "psnr_to_teacher", "r2_to_teacher", "diversity", "saturation"):
            series = {f"{k} step": [(h["step"], h.get(f"quality/student_{k}step/{name}")) for h in self.history]
                      for k in self.steps}
            if name in self.teacher_metrics:
                series["teacher"] = [(h["step"], self.teacher_metrics[name]) for h in self.history]
            if any(v is not None for s in series.values() for _, v in s):
                panels[name] = series
        plot_series(path, panels)


def _short(metrics: dict) -> str:
    keys = ("accuracy", "accuracy/all", "psnr_to_teacher", "r2_to_teacher", "diversity", "saturation")
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if k in metrics)
