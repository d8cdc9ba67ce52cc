"""The `Distiller`: one distillation run, its parts built from the config, with `step()` and `train()`.

Parts, in the order data walks through them (nothing reaches back up the chain):

    prompts -> text embeddings and x0 shards (the data stage, `distill.datastage`)
            -> noisy latents x_t (JAX, `_prepare_batch`) -> bridge -> teacher targets (`Teacher`, torch)
            -> bridge -> the objective's loss and the optimizer update (`train_step`, JAX)
            -> evaluators (held-out velocity error, sample quality and grid) and checkpoints.

- `StudentStep`: the student model, optimizer, abstract state, shardings and the jitted (on GPU
  ahead-of-time compiled, its memory checked) train step, built around an objective
  (`student_jax.objectives`): the objective says which teacher output it needs and may carry state
  inside the one orbax-checkpointed `TrainState`.
- `Teacher` (distill/teacher.py): `WanT2V` placed as the config says, giving the objective's target.
- evaluators (distill/evaluators.py): each with its own period.

Per step (every rank): pick the global batch rows from the step number, build the noisy latents in
JAX (noise from `fold_in(state.rng, step)`), hand this rank's shard to the torch teacher through
DLPack, bring its targets back as one global array sharded over the data axis, and run the jitted,
donated `train_step`. Every jitted computation runs on all ranks (JAX multi-controller); only
rank 0 writes files.

Faults: SIGTERM saves a checkpoint at the next step boundary, on the checkpoint schedule or not.
With several processes, a rank whose peer died blocks inside a collective, where Python's SIGTERM
handler cannot run; `SigtermWatchdog` then ends it `SIGTERM_GRACE_S` after the SIGTERM, saying
so and naming the checkpoint a restart resumes from (torchrun sends SIGTERM to the survivors at
once and SIGKILL 30 s later).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from student_jax.config import saved_student_fields

from . import config as config_lib
from .config import Config
from .data import DeviceText, EmbeddingCache, image_folder, load_prompts, text_dtype
from .datastage import DataStage, EmbeddingLRU, Prefetcher, ShardedDataset
from .evaluators import QualityEvaluator, VelocityError, eval_batch
from .memory import MemoryPlanError, check as check_memory, plan_memory
from .metrics import MetricsWriter
from .phases import ExpertPhases
from .teacher import Teacher, build_pipeline, free_text_encoder, numerics_suffix, release_config, teacher_id
from .toy_teacher import toy_release

log = logging.getLogger("distill")


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite values with nan_policy=stop, incompatible resume...)."""


SIGTERM_GRACE_S = 20.0  # below torchrun's 30 s between the SIGTERM to the surviving ranks and SIGKILL


def committed_checkpoints(folder: Path) -> list[int]:
    """Committed checkpoint steps in `folder` (orbax renames a step's temporary directory on commit)."""
    try:
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())
    except FileNotFoundError:
        return []


class SigtermWatchdog:
    """Multi-process runs: after SIGTERM, the checkpoint is saved and the run ends within `grace_s`,
    or this rank says why not and exits (status 1).

    When a peer rank dies, the others block in their next collective (the student step's all-reduce, a
    teacher FSDP gather, the checkpoint's barrier) until the launcher kills them: torchrun sends SIGTERM
    within 0.1 s and SIGKILL 30 s later; without torchrun, JAX's coordination service aborts them when
    the dead rank misses its heartbeats (100 s). Python runs a signal handler only between bytecodes of
    the main thread, so a blocked rank never sees the SIGTERM and dies without a word. This thread
    learns of SIGTERM through `signal.set_wakeup_fd` (written by the C-level handler whatever the
    main thread does) and from the loop's stop flag; `where` is what the run was doing (set by the
    Distiller), the message names the last committed checkpoint, which a restart resumes from.
    """

    def __init__(self, rank: int, checkpoints: Path, stop=None, grace_s: float = SIGTERM_GRACE_S,
                 exit=os._exit):
        self.rank, self.checkpoints, self.stop, self.grace_s, self._exit = rank, checkpoints, stop, grace_s, exit
        self.where = "setting up"
        self._done = threading.Event()
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        os.set_blocking(self._read, False)
        # main thread only; a previous wakeup fd (none in this project) gets the bytes passed on
        self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="sigterm-watchdog", daemon=True)
        self._thread.start()

    def _sigterm_seen(self) -> bool:
        seen = False
        while True:
            try:
                data = os.read(self._read, 64)
            except (BlockingIOError, OSError):
                break
            if not data:
                break
            if self._previous >= 0:
                try:
                    os.write(self._previous, data)
                except OSError:
                    pass
            seen = seen or signal.SIGTERM in data
        return seen or bool(self.stop is not None and self.stop.requested)

    def _watch(self) -> None:
        while not self._sigterm_seen():
            select.select([self._read], [], [], 0.5)
            if self._done.is_set():
                return
        if self._done.wait(self.grace_s):
            return  # saved and finished in time
        steps = committed_checkpoints(self.checkpoints)
        resume = f"step {steps[-1]}" if steps else "the start (no checkpoint yet)"
        log.error("rank %d: SIGTERM %.0f s ago and still %s: most likely a peer rank died and a collective waits "
                  "for it forever. Exiting without a new checkpoint; a restart resumes from %s in %s", self.rank,
                  self.grace_s, self.where, resume, self.checkpoints)
        for handler in logging.getLogger().handlers:
            handler.flush()
        self._exit(1)

    def close(self) -> None:
        """The run ended (or its SIGTERM checkpoint is on disk): stand down; main thread."""
        if self._done.is_set():
            return
        self._done.set()
        signal.set_wakeup_fd(self._previous)
        self._thread.join(timeout=2)
        os.close(self._read)
        os.close(self._write)


def _noise_levels(rng, step, band=None, *, batch, shift):
    """The step's noise levels s [B] and timesteps t = 1000 s [B] (run on the host's CPU device).

    band: the expert phase's timestep band (distill.phases), or None for the whole density."""
    from student_jax.train_step import draw_noise_levels

    s = draw_noise_levels(rng, step, batch, shift, band)
    return s, 1000.0 * s


def _prepare_batch(rng, step, x0_teacher, s, *, student_cfg):
    """x0 in teacher space [B,16,H,W] and noise levels s [B] -> student-space x_t, t, and the teacher's
    input x_t [B,16,H,W]."""
    from student_jax.projection import from_teacher, to_teacher
    from student_jax.train_step import make_noisy_batch

    x0 = from_teacher(x0_teacher, student_cfg)
    noisy = make_noisy_batch(rng, step, x0, shift=None, s=s)
    return noisy["x_t"], noisy["t"], to_teacher(noisy["x_t"], student_cfg)


class StudentStep:
    """The student's model, optimizer, objective, abstract state, shardings and train step."""

    def __init__(self, cfg: Config, rt, latent_hw, text_len: int, text_array_dtype=np.float32):
        import jax
        from jax.sharding import NamedSharding, PartitionSpec as P

        from student_jax.model import Student
        from student_jax.objectives import make_objective
        from student_jax.optim import make_optimizer
        from student_jax.state import abstract_train_state
        from student_jax.train_step import train_step

        self.model = Student(cfg.student)
        self.objective = make_objective(cfg.train.loss)
        # The schedule spans the run; a warmup longer than a (short, test) run is cut to its length.
        self.optim_cfg = dataclasses.replace(cfg.optim, total_steps=cfg.train.steps,
                                             warmup_steps=min(cfg.optim.warmup_steps, cfg.train.steps))
        self.tx = make_optimizer(self.optim_cfg)
        self.replicated = NamedSharding(rt.mesh, P())
        self.sharded = NamedSharding(rt.mesh, P("data"))
        self.abstract = abstract_train_state(cfg.student, self.optim_cfg, latent_hw, text_len, self.objective)
        self.state_shardings = jax.tree_util.tree_map(lambda _: self.replicated, self.abstract)
        batch_shardings = {k: self.sharded for k in ("x_t", "t", "text", "text_mask", "target")}
        self.step_fn = jax.jit(
            functools.partial(train_step, model=self.model, tx=self.tx, ema_decay=self.optim_cfg.ema_decay,
                              nan_policy="skip", objective=self.objective),
            in_shardings=(self.state_shardings, batch_shardings),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=(0,),
        )
        b, c, (h, w) = cfg.train.batch_size, cfg.student.latent_channels, latent_hw
        shapes = dict(x_t=((b, c, h, w), np.float32), t=((b,), np.float32),
                      text=((b, text_len, cfg.student.text_dim), text_array_dtype), text_mask=((b, text_len), bool),
                      target=((b, cfg.student.teacher_channels, h, w), np.float32))
        self.abstract_batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.sharded)
                               for k, (shape, dtype) in shapes.items()}

    def compile_and_check(self, plan, cfg) -> float | None:
        """Compile the step ahead of time (the loop then runs this executable); with a memory plan,
        check XLA's figure for it against the JAX budget and return it (bytes)."""
        import jax

        from .memory import check_compiled

        state = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                       self.abstract, self.state_shardings)
        compiled = self.step_fn.lower(state, self.abstract_batch).compile()
        self.step_fn = compiled
        return None if plan is None else check_compiled(compiled, plan, cfg)

    def init_state(self, cfg: Config, latent_hw, text_len: int):
        import jax

        from student_jax.state import create_train_state

        init = jax.jit(functools.partial(create_train_state, cfg.student, self.optim_cfg, latent_hw=latent_hw,
                                         text_len=text_len, objective=self.objective),
                       out_shardings=self.state_shardings)
        return init(jax.random.key(cfg.train.seed))


class Distiller:
    """One run: `Distiller(cfg, rt).train()` (the data stage first, as `--stage` says)."""

    def __init__(self, cfg: Config, rt, stop=None, mode: str = "train"):
        self.cfg, self.rt, self.stop = cfg, rt, stop
        self.t_start = time.time()
        self.workdir = Path(cfg.workdir)
        if cfg.train.batch_size % rt.world_size:
            raise SystemExit(f"error: --train.batch_size={cfg.train.batch_size} must be divisible by the number of "
                             f"processes ({rt.world_size})")
        if rt.is_main and mode == "train":
            self.workdir.mkdir(parents=True, exist_ok=True)
            partial = self.workdir / "config.json.tmp"  # a kill mid-write leaves the previous config.json whole
            config_lib.dump(cfg, partial)
            os.replace(partial, self.workdir / "config.json")
        self.cache = Path(cfg.data.cache_dir)
        self.latent_hw = (cfg.data.height // 8, cfg.data.width // 8)
        self.watchdog = None
        if rt.world_size > 1 and threading.current_thread() is threading.main_thread():
            self.watchdog = SigtermWatchdog(rt.rank, self.workdir / "checkpoints", stop)
        try:
            self._build_teacher(compile_student=cfg.stage != "data" or mode != "train")
            self._at("the data stage")
            self._build_data(run=cfg.stage != "train" and mode == "train")
        except BaseException:
            self.close()
            raise

    def _at(self, where: str) -> None:
        """What the run is doing, for the SIGTERM watchdog's message."""
        if self.watchdog is not None:
            self.watchdog.where = where

    def close(self) -> None:
        """Stand the SIGTERM watchdog down (the run ended well); `run()` and `evaluate()` call it."""
        if self.watchdog is not None:
            self.watchdog.close()

    # ------------------------------------------------------------------ construction

    def _build_teacher(self, compile_student: bool) -> None:
        cfg, rt = self.cfg, self.rt
        self.prompts = load_prompts(cfg.data.prompts)
        self.eval_prompts = load_prompts(cfg.data.eval_prompts, "eval prompt file")
        self.pairs = image_folder(cfg.data.image_dir) if cfg.data.source == "images" else []
        if self.pairs:
            self.prompts = sorted({caption for _, caption in self.pairs})
        if cfg.teacher.path:
            folder = Path(cfg.teacher.path)
        else:
            if rt.is_main:
                toy_release(self.cache)
            rt.barrier()
            folder = toy_release(self.cache)
        self.wan_config = wan_config = release_config(folder, cfg.teacher.config)
        self.text_len = wan_config.text_len
        if cfg.student.max_text_len < self.text_len:
            raise SystemExit(f"error: --student.max_text_len={cfg.student.max_text_len} is below the teacher's "
                             f"text_len {self.text_len}")
        self.plan = None
        if rt.platform == "cuda":
            self.plan = plan_memory(cfg, wan_config, rt.world_size, rt.usable_gpu_bytes, rt.is_main)
            if rt.is_main:
                log.info("%s", self.plan.describe())
            try:
                check_memory(self.plan, cfg, rt.world_size)
            except MemoryPlanError as error:
                raise SystemExit(f"error: {error}") from None
        # the student step is compiled ahead, before the teacher takes any memory: on GPU XLA's own
        # figure for it is checked against the JAX budget
        import jax.numpy as jnp

        self.text_dtype = text_dtype(cfg, rt.platform)
        self.student = StudentStep(cfg, rt, self.latent_hw, self.text_len,
                                   text_array_dtype=jnp.bfloat16 if self.text_dtype == torch.bfloat16 else np.float32)
        if compile_student:
            try:
                need = self.student.compile_and_check(self.plan, cfg)
            except MemoryPlanError as error:
                raise SystemExit(f"error: {error}") from None
            if need is not None and rt.is_main:
                log.info("compiled student step: %.2f GB (XLA), JAX budget %.2f GB", need / 1e9,
                         self.plan.jax_budget / 1e9)
        log.info("teacher: %s, strategy %s, sp %d, offload %s (%s)", folder, cfg.teacher.device_strategy,
                 cfg.teacher.sp, cfg.teacher.offload, cfg.teacher.dtype)
        self.pipe = build_pipeline(folder, wan_config, cfg.teacher, rt)
        self.collective = self.pipe.dit_fsdp or self.pipe.sp_size > 1  # every rank joins each teacher call
        self.teacher_id = teacher_id(folder, wan_config, cfg.teacher.dtype)
        self.guide = tuple(cfg.teacher.guide_scale or wan_config.sample_guide_scale)
        self.n_prompt = cfg.teacher.n_prompt or wan_config.sample_neg_prompt

    def _build_data(self, run: bool) -> None:
        cfg, rt = self.cfg, self.rt
        embeddings = EmbeddingCache(self.cache, self.teacher_id)
        self.stage = stage = DataStage(rt, self.pipe, self.cache, self.collective, wait_log_s=cfg.data.wait_log_s)
        all_prompts = self.prompts + self.eval_prompts + [self.n_prompt]
        if run:
            encoded = stage.embeddings(embeddings, all_prompts)
            log.info("text embeddings: %d encoded, %d cached in %s", encoded, len(set(all_prompts)) - encoded,
                     embeddings.folder)
        elif embeddings.missing(all_prompts):
            raise SystemExit(f"error: {len(embeddings.missing(all_prompts))} prompt embeddings are not cached in "
                             f"{embeddings.folder}: run the data stage first (--stage data, or --stage all)")
        free_text_encoder(self.pipe)
        self.train_contexts = EmbeddingLRU(embeddings, self.prompts)  # on demand: memory independent of the count
        self.eval_contexts = embeddings.get(self.eval_prompts)
        self.context_null = embeddings.get([self.n_prompt])[0]
        size = (cfg.data.width, cfg.data.height)
        sampler_id = self.teacher_id + numerics_suffix(cfg.teacher)  # the DiT's numerics key its samples
        gen_args = dict(teacher_id=sampler_id, size=size, steps=cfg.data.gen_steps or self.wan_config.sample_steps,
                        shift=self.wan_config.sample_shift, guide_scale=self.guide, solver="unipc",
                        samples_per_prompt=cfg.data.samples_per_prompt, n_prompt=self.n_prompt,
                        trajectory_steps=cfg.data.trajectory_steps, shard_size=cfg.data.shard_size, run=run)
        self.data_start = time.perf_counter()
        if cfg.data.source == "images":
            self.train_store = stage.image_latents(self.pairs, self.prompts, size, teacher_id=self.teacher_id,
                                                   shard_size=cfg.data.shard_size, run=run)
        else:
            self.train_store = stage.teacher_samples(
                "train", self.prompts, lambda idx: [self.train_contexts[i] for i in idx], self.context_null,
                seed=cfg.train.seed, **gen_args)
        self.eval_store = stage.teacher_samples(
            "eval", self.eval_prompts, lambda idx: [self.eval_contexts[i] for i in idx], self.context_null,
            seed=cfg.train.seed + 1, **gen_args)
        self.train_data, self.eval_data = ShardedDataset(self.train_store), ShardedDataset(self.eval_store)
        log.info("x0 latents: %d train rows (%s), %d held-out rows (%s), latent %s", len(self.train_data),
                 self.train_store.folder, len(self.eval_data), self.eval_store.folder, self.train_data.latent_shape)

    def _restore(self, required: bool = False) -> bool:
        """Restore the latest checkpoint of the workdir into self.state; False when there is none."""
        import jax

        from student_jax.checkpoint import Checkpointer

        cfg, student = self.cfg, self.student
        self.checkpointer = Checkpointer(self.workdir / "checkpoints", max_to_keep=cfg.ckpt.keep,
                                         save_interval_steps=cfg.ckpt.every, async_save=cfg.ckpt.async_save)
        self.cfg_dict = config_lib.to_dict(cfg)
        if self.checkpointer.latest_step() is None:
            if required:
                raise SystemExit(f"error: no checkpoint in {self.workdir / 'checkpoints'}: train first "
                                 f"(python train.py --workdir {self.workdir})")
            return False
        target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                        student.abstract, student.state_shardings)
        self.state, saved_cfg, restored = self.checkpointer.restore(target)
        if saved_student_fields(saved_cfg.get("student", {})) != self.cfg_dict["student"]:
            raise TrainingError(
                f"{self.workdir} holds a checkpoint of a different student ({saved_cfg.get('student')}); "
                "use another --workdir or the same --student.* settings"
            )
        log.info("resumed from %s at step %d", self.checkpointer.directory, restored)
        return True

    def _build_training(self) -> None:
        import jax

        cfg, rt, student = self.cfg, self.rt, self.student
        self.teacher = Teacher(self.pipe, student.objective.teacher_target, self.guide, self.context_null)
        if not self._restore():
            self.state = student.init_state(cfg, self.latent_hw, self.text_len)
        self.start_step = int(jax.device_get(self.state.step))

        phase_steps = cfg.train.expert_phase_steps
        if phase_steps < 0:
            phase_steps = 8 if cfg.teacher.offload else 0
        self.phases = ExpertPhases(phase_steps, cfg.data.timestep_shift, self.wan_config.boundary, cfg.train.seed)
        if self.phases.enabled:
            log.info("expert-phased batches: %d steps per phase, high-noise expert with p = %.3f", phase_steps,
                     self.phases.p_high)
        # Per-step randomness stays fold_in(state.rng, step). The noise levels are drawn on the host's
        # CPU device (a few floats): the teacher routes samples to experts by them with no device round
        # trip. The base key is copied once to both sides, so preparing step k never waits for the
        # student step before it (the donated state is not an input).
        rng = np.asarray(jax.device_get(self.state.rng))
        self.host_cpu = jax.local_devices(backend="cpu")[0]
        self.host_rng = jax.device_put(rng, self.host_cpu)
        self.device_rng = jax.device_put(rng, student.replicated)
        self.noise_levels_fn = jax.jit(functools.partial(_noise_levels, batch=cfg.train.batch_size,
                                                         shift=cfg.data.timestep_shift))
        self.prepare_fn = jax.jit(
            functools.partial(_prepare_batch, student_cfg=cfg.student),
            in_shardings=(student.replicated, student.replicated, student.sharded, student.replicated),
            out_shardings=(student.sharded, student.sharded, student.sharded),
        )
        self.evaluators = self._build_evaluators()
        self.local_rows = rt.batch_slice(cfg.train.batch_size)
        per_rank = cfg.train.batch_size // rt.world_size
        self.group_rows = slice(rt.dp_rank * rt.sp * per_rank, (rt.dp_rank + 1) * rt.sp * per_rank)
        self.mine_in_group = slice(rt.sp_rank * per_rank, (rt.sp_rank + 1) * per_rank)
        self.text = DeviceText(self.train_contexts, self.text_len, rt.torch_device, self.text_dtype,
                               capacity=cfg.data.device_text_prompts)

    def _replicate(self, array: np.ndarray):
        import jax

        return jax.make_array_from_callback(array.shape, self.student.replicated, lambda index: array[index])

    def _build_evaluators(self) -> list:
        cfg, rt = self.cfg, self.rt
        eval_x0 = {"latents": torch.from_numpy(self.eval_data.all_latents()),
                   "prompt_index": torch.from_numpy(self.eval_data.prompt_index)}
        batch = eval_batch(cfg, eval_x0, self.eval_contexts, self.text_len, self.teacher, self._replicate,
                           chunk=cfg.train.batch_size // rt.world_size * rt.sp)
        evaluators = [VelocityError(cfg.train.eval_every, self.student.model, batch, self.student.replicated)]
        if cfg.train.sample_every:
            evaluators.append(QualityEvaluator(
                cfg, self.wan_config, self.pipe, self.eval_prompts, self.eval_contexts, self.context_null,
                self.text_len, self.latent_hw, self.guide, self._replicate, self.student.model, rt.is_main,
                self.collective, self.workdir, every=cfg.train.sample_every))
        return evaluators

    # ------------------------------------------------------------------ running

    def _load_batch(self, step: int):
        """Step `step`'s rows: this rank's x0 latents (read from the shards and already on their way to
        the device) and the prompt of each row of its sp group. Runs ahead in the prefetch thread."""
        import jax

        cfg = self.cfg
        rows = np.random.default_rng([cfg.train.seed, step]).integers(0, len(self.train_data), cfg.train.batch_size)
        x0 = jax.device_put(self.train_data.latents(rows[self.local_rows]), self.rt.jax_device)  # async upload
        return x0, self.train_data.prompt_index[rows[self.group_rows]]

    def _noisy(self, step: int, batch):
        """Step `step`'s noisy latents from its batch: (x_t, t, teacher input, t on the host, prompts).

        The noise levels come from the host's CPU device, everything else is queued on the device:
        nothing here waits for it."""
        from bridge.dlpack import local_to_global

        x0_mine, group_prompts = batch
        band = self.phases.band(step)
        s, t_host = self.noise_levels_fn(self.host_rng, step, *(() if band is None else (band,)))
        t_host = torch.from_numpy(np.array(t_host))  # [B] on the host: expert routing needs no sync
        x_t, t, x_t_teacher = self.prepare_fn(self.device_rng, np.int32(step), local_to_global(x0_mine, self.rt.mesh),
                                              np.asarray(s))
        return x_t, t, x_t_teacher, t_host, group_prompts

    def step(self, step: int, batch) -> dict:
        """One optimisation step on `batch` (from `_load_batch(step)`); returns device metrics.

        Nothing here waits for the device: the noise levels come from the host, the text from the
        device cache, and every tensor crosses between torch and JAX through `bridge` without a copy
        (tests/test_data_path.py checks for synchronisation on the GPU), so the host queues the next
        step while this one runs."""
        from bridge.dlpack import global_to_local, jax_to_teacher_inputs, local_to_global, teacher_outputs_to_jax
        from bridge.dlpack import torch_to_jax

        mesh = self.rt.mesh
        x_t, t, x_t_teacher, t_host, group_prompts = self._noisy(step, batch)
        # the teacher runs once per sp group on the group's rows (sp = 1: this rank's)
        text, mask, lengths = self.text.get(group_prompts)  # [g, text_len, D], [g, text_len] on the device
        contexts = [text[i, :n] for i, n in enumerate(lengths)]  # views, no copies
        latents = [x.to(self.teacher.device) for x in jax_to_teacher_inputs(global_to_local(x_t_teacher))]
        target = self.teacher.group_targets(latents, t_host[self.group_rows], contexts)
        target_global = local_to_global(teacher_outputs_to_jax(target), mesh)
        next_expert = self.phases.expert(step + 1)
        residency = self.pipe.residency
        if next_expert is not None and residency.mode == "swap" and next_expert != residency.active:
            residency.prefetch(next_expert)  # the copy overlaps the student step queued next
        mine = self.mine_in_group
        inputs = dict(x_t=x_t, t=t, text=local_to_global(torch_to_jax(text[mine]), mesh),
                      text_mask=local_to_global(torch_to_jax(mask[mine]), mesh), target=target_global)
        self.state, metrics = self.student.step_fn(self.state, inputs)
        return metrics

    def _evaluate(self, step: int, writer, summary: dict) -> None:
        for evaluator in self.evaluators:
            if step % evaluator.every == 0 or step == self.cfg.train.steps or step == 0:
                metrics = evaluator(step, self.state)
                if metrics:
                    writer.write(step, metrics)
                if evaluator.name == "velocity_error":
                    summary.setdefault("first_eval", metrics)
                    summary["last_eval"] = metrics
                elif metrics:
                    summary.setdefault("first_quality", metrics)
                    summary["last_quality"] = metrics

    def run(self) -> dict:
        """`--stage data`: the data stage's summary; otherwise train (after the data stage of `all`)."""
        try:
            summary = self._run()
        except BaseException as error:
            # the watchdog stays up: with a dead peer, shutting the process group down blocks next
            text = f"{type(error).__name__}: {error}".splitlines()[0] if str(error) else type(error).__name__
            self._at(f"shutting down after {text[:300]}")
            raise
        self.close()
        return summary

    def _run(self) -> dict:
        if self.cfg.stage == "data":
            made = self.stage.generated
            wall = time.perf_counter() - self.data_start
            summary = {"stage": "data", "train_data": str(self.train_store.folder),
                       "eval_data": str(self.eval_store.folder), "samples_generated": made, "data_wall_s": wall,
                       "samples_per_s": made / max(wall, 1e-9)}
            log.info("data stage: %d samples generated in %.1f s (%.2f samples/s over %d ranks)", made, wall,
                     summary["samples_per_s"], self.rt.world_size)
            if self.rt.is_main:
                self.workdir.mkdir(parents=True, exist_ok=True)
                (self.workdir / "summary.json").write_text(json.dumps(summary, indent=1))
            return summary
        return self.train()

    def train(self) -> dict:
        import jax

        self._at("restoring the checkpoint and building the evaluators")
        self._build_training()
        cfg, rt = self.cfg, self.rt
        writer = MetricsWriter(self.workdir, enabled=rt.is_main)
        batches = Prefetcher(self._load_batch, self.start_step, cfg.train.steps)
        summary = {"start_step": self.start_step}
        progress = None
        if rt.is_main:
            from tqdm.auto import tqdm

            progress = tqdm(total=cfg.train.steps, initial=self.start_step, desc="distill", dynamic_ncols=True,
                            disable=None, file=sys.stderr)
        pending, window_start, window_steps = [], time.perf_counter(), 0
        if self.start_step == 0:
            self._evaluate(0, writer, summary)
        try:
            for step in range(self.start_step, cfg.train.steps):
                self._at(f"in training step {step + 1}")
                metrics = self.step(step, batches.get(step))
                pending.append(metrics)
                window_steps += 1
                if cfg.train.nan_policy == "stop" and bool(jax.device_get(metrics["skipped"])):
                    raise TrainingError(
                        f"non-finite teacher output or loss at step {step}; stopping (--train.nan_policy=stop). "
                        f"The last good checkpoint in {self.checkpointer.directory} is kept."
                    )
                done = step + 1
                if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                    host = jax.device_get(pending)
                    elapsed = time.perf_counter() - window_start
                    # Skipped (non-finite) steps report NaN loss on purpose; average the applied steps.
                    applied = [m for m in host if not m["skipped"]] or host
                    scalars = {k: float(np.mean([m[k] for m in applied])) for k in host[0]}
                    scalars["skipped"] = float(np.sum([m["skipped"] for m in host]))
                    scalars["samples_per_s"] = window_steps * cfg.train.batch_size / max(elapsed, 1e-9)
                    if self.pipe.residency.mode == "swap":
                        scalars["teacher/expert_swaps"] = float(self.pipe.residency.swaps)
                    writer.write(done, scalars)
                    summary.setdefault("first_loss", scalars["loss"])
                    summary["last_loss"] = scalars["loss"]
                    if progress is not None:
                        progress.set_postfix(loss=f"{scalars['loss']:.4f}",
                                             samples_s=f"{scalars['samples_per_s']:.1f}")
                    pending, window_start, window_steps = [], time.perf_counter(), 0
                if progress is not None:
                    progress.update(1)
                self._evaluate(done, writer, summary)
                self.checkpointer.save(done, self.state, self.cfg_dict, force=done == cfg.train.steps)
                if self.stop is not None and self.stop.requested:
                    log.warning("%s received: saving a checkpoint at step %d and exiting", self.stop.requested, done)
                    self._at(f"saving the checkpoint of step {done}")
                    self.checkpointer.save(done, self.state, self.cfg_dict, force=True)
                    summary["interrupted"] = self.stop.requested
                    break
        finally:
            batches.close()
            self.checkpointer.wait()
            self.checkpointer.close()
            writer.close()
            if progress is not None:
                progress.close()
        if "interrupted" in summary:
            log.warning("checkpoint of step %d saved in %s", int(jax.device_get(self.state.step)),
                        self.checkpointer.directory)
        self._at("finishing the run")
        for evaluator in self.evaluators:
            if hasattr(evaluator, "plot"):
                evaluator.plot(self.workdir / "quality.png")
        return self._finish(summary)

    def evaluate(self) -> dict:
        """Every evaluator once on the workdir's latest checkpoint (the standalone `evaluate` entry)."""
        import jax

        try:
            self.teacher = Teacher(self.pipe, self.student.objective.teacher_target, self.guide, self.context_null)
            self._restore(required=True)
            self.checkpointer.close()
            self.evaluators = self._build_evaluators()
            step = int(jax.device_get(self.state.step))
            out = {"step": step}
            self._at(f"evaluating step {step}")
            for evaluator in self.evaluators:
                out.update(evaluator(step, self.state))
        finally:
            self.close()
        if self.rt.is_main:
            (self.workdir / "evaluation.json").write_text(json.dumps(out, indent=1))
        return out

    def _finish(self, summary: dict) -> dict:
        import jax

        rt = self.rt
        summary.update(final_step=int(jax.device_get(self.state.step)), wall_s=time.time() - self.t_start,
                       workdir=str(self.workdir))
        if self.pipe.residency.mode == "swap":
            summary["expert_swaps"] = self.pipe.residency.swaps
            summary["expert_swap_ms"] = self.pipe.residency.swap_ms()
        if rt.platform == "cuda":
            summary["torch_peak_gb"] = torch.cuda.max_memory_allocated(rt.torch_device) / 1e9
            stats = rt.jax_device.memory_stats() or {}
            summary["jax_peak_gb"] = stats.get("peak_bytes_in_use", 0) / 1e9
            if rt.is_main:
                log.info("peak GPU memory: torch %.2f GB, JAX %.2f GB", summary["torch_peak_gb"], summary["jax_peak_gb"])
        if rt.is_main:  # what the run did, for people and scripts (the state itself is in checkpoints/)
            (self.workdir / "summary.json").write_text(json.dumps(summary, indent=1))
        summary["state"] = self.state
        return summary
