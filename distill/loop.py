"""The online distillation loop: `train(cfg)`.

Per step (every rank): pick the global batch rows from the step number, build the noisy latents in
JAX (noise from `fold_in(state.rng, step)`), hand this rank's shard to the torch teacher through
DLPack, bring its targets back as one global array sharded over the data axis, and run the jitted,
donated `train_step`. Around it: caches (text embeddings, x0 latents), held-out evaluation,
sample grids, metrics, orbax checkpoints with automatic resume, SIGTERM handling.

Every jitted computation runs on all ranks (JAX multi-controller); only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import config as config_lib
from .config import Config
from .data import EmbeddingCache, image_folder, load_prompts, pad_text
from .datastage import DataStage, EmbeddingLRU, Prefetcher, ShardedDataset
from .memory import MemoryPlanError, check as check_memory, plan_memory
from .metrics import MetricsWriter, save_grid, to_uint8
from .phases import ExpertPhases
from .teacher import Teacher, build_pipeline, free_text_encoder, release_config, teacher_id
from .tiny_teacher import tiny_release

log = logging.getLogger("distill")


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite values with nan_policy=stop, incompatible resume...)."""


def _setup_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax chatter about unrestored items


def _prepare_batch(rng, step, x0_teacher, band=None, *, shift, student_cfg):
    """x0 in teacher space [B,16,H,W] -> student-space x_t, t, and the teacher's input x_t [B,16,H,W].

    band: the expert phase's timestep band (distill.phases), or None for the whole density."""
    from student_jax.projection import from_teacher, to_teacher
    from student_jax.train_step import make_noisy_batch

    x0 = from_teacher(x0_teacher, student_cfg)
    noisy = make_noisy_batch(rng, step, x0, shift, band)
    return noisy["x_t"], noisy["t"], to_teacher(noisy["x_t"], student_cfg)


class _StudentStep:
    """The student's model, optimizer, abstract state, shardings and jitted (or AOT-compiled) train step."""

    def __init__(self, cfg: Config, rt, latent_hw, text_len: int):
        import jax
        from jax.sharding import NamedSharding, PartitionSpec as P

        from student_jax.model import Student
        from student_jax.optim import make_optimizer
        from student_jax.state import abstract_train_state
        from student_jax.train_step import train_step

        self.model = Student(cfg.student)
        # The schedule spans the run; a warmup longer than a (short, test) run is cut to its length.
        self.optim_cfg = dataclasses.replace(cfg.optim, total_steps=cfg.train.steps,
                                             warmup_steps=min(cfg.optim.warmup_steps, cfg.train.steps))
        self.tx = make_optimizer(self.optim_cfg)
        self.replicated = NamedSharding(rt.mesh, P())
        self.sharded = NamedSharding(rt.mesh, P("data"))
        self.abstract = abstract_train_state(cfg.student, self.optim_cfg, latent_hw, text_len)
        self.state_shardings = jax.tree_util.tree_map(lambda _: self.replicated, self.abstract)
        batch_shardings = {k: self.sharded for k in ("x_t", "t", "text", "text_mask", "target")}
        self.step_fn = jax.jit(
            functools.partial(train_step, model=self.model, tx=self.tx, ema_decay=self.optim_cfg.ema_decay,
                              nan_policy="skip"),
            in_shardings=(self.state_shardings, batch_shardings),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=(0,),
        )
        b, c, (h, w) = cfg.train.batch_size, cfg.student.latent_channels, latent_hw
        shapes = dict(x_t=((b, c, h, w), np.float32), t=((b,), np.float32),
                      text=((b, text_len, cfg.student.text_dim), np.float32), text_mask=((b, text_len), bool),
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


class _Stop:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.requested = None
        self._old = {}
        for sig in (signal.SIGTERM,):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train(cfg: Config) -> dict:
    """Run (or resume) the distillation described by `cfg`; returns a summary of the run."""
    from bridge.runtime import Runtime

    gpu_bytes = cfg.train.gpu_memory_gb * 1e9 if cfg.train.gpu_memory_gb > 0 else None
    try:
        rt = Runtime.from_env(jax_memory_fraction=cfg.train.jax_memory_fraction, sp=cfg.teacher.sp,
                              gpu_memory_bytes=gpu_bytes)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    _setup_logging(rt.is_main)
    stop = _Stop()  # from the start: a SIGTERM during setup stops at the first step boundary
    try:
        return _train(cfg, rt, stop)
    finally:
        stop.restore()
        rt.shutdown()


def _train(cfg: Config, rt, stop: _Stop) -> dict:
    import jax
    import jax.numpy as jnp

    from bridge.dlpack import global_to_local, jax_to_teacher_inputs, local_to_global, teacher_outputs_to_jax
    from student_jax.checkpoint import Checkpointer
    from student_jax.projection import to_teacher
    from student_jax.sampler import sample as student_sample
    from student_jax.state import create_train_state
    from student_jax.train_step import eval_velocity_error

    t_start = time.time()
    workdir = Path(cfg.workdir)
    if cfg.train.batch_size % rt.world_size:
        raise SystemExit(
            f"error: --train.batch_size={cfg.train.batch_size} must be divisible by the number of processes "
            f"({rt.world_size})"
        )
    if rt.is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        config_lib.dump(cfg, workdir / "config.json")
    cache = Path(cfg.data.cache_dir)

    # ------------------------------------------------------------ prompts and teacher
    prompts = load_prompts(cfg.data.prompts)
    eval_prompts = load_prompts(cfg.data.eval_prompts, "eval prompt file")
    pairs = image_folder(cfg.data.image_dir) if cfg.data.source == "images" else []
    if pairs:
        prompts = sorted({caption for _, caption in pairs})
    if cfg.teacher.path:
        folder = Path(cfg.teacher.path)
    else:
        if rt.is_main:
            tiny_release(cache, prompts + eval_prompts)
        rt.barrier()
        folder = tiny_release(cache, prompts + eval_prompts)
    wan_config = release_config(folder, cfg.teacher.config)
    if rt.platform == "cuda":
        plan = plan_memory(cfg, wan_config, rt.world_size, rt.usable_gpu_bytes, rt.is_main)
        if rt.is_main:
            log.info("%s", plan.describe())
        try:
            check_memory(plan, cfg, rt.world_size)
        except MemoryPlanError as error:
            raise SystemExit(f"error: {error}") from None
    else:
        plan = None
    latent_hw = (cfg.data.height // 8, cfg.data.width // 8)
    # the student step is compiled ahead, before the teacher takes any memory: on GPU XLA's own figure
    # for it is checked against the JAX budget
    student = _StudentStep(cfg, rt, latent_hw, wan_config.text_len)
    try:
        need = student.compile_and_check(plan, cfg) if cfg.stage != "data" else None
    except MemoryPlanError as error:
        raise SystemExit(f"error: {error}") from None
    if need is not None and rt.is_main:
        log.info("compiled student step: %.2f GB (XLA), JAX budget %.2f GB", need / 1e9, plan.jax_budget / 1e9)
    log.info("teacher: %s, strategy %s, sp %d, offload %s (%s)", folder, cfg.teacher.device_strategy,
             cfg.teacher.sp, cfg.teacher.offload, cfg.teacher.dtype)
    pipe = build_pipeline(folder, wan_config, cfg.teacher, rt)
    collective = pipe.dit_fsdp or pipe.sp_size > 1  # every rank must take part in each teacher call
    tid = teacher_id(folder, wan_config, cfg.teacher.dtype)
    guide = tuple(cfg.teacher.guide_scale or wan_config.sample_guide_scale)
    n_prompt = cfg.teacher.n_prompt or wan_config.sample_neg_prompt
    size = (cfg.data.width, cfg.data.height)
    text_len = wan_config.text_len
    if cfg.student.max_text_len < text_len:
        raise SystemExit(f"error: --student.max_text_len={cfg.student.max_text_len} is below the teacher's text_len {text_len}")

    # ------------------------------------------------------------ the data stage: text, then x0 shards
    embeddings = EmbeddingCache(cache, tid)
    stage = DataStage(rt, pipe, cache, collective, wait_log_s=cfg.data.wait_log_s)
    run_data = cfg.stage != "train"
    all_prompts = prompts + eval_prompts + [n_prompt]
    if run_data:
        encoded = stage.embeddings(embeddings, all_prompts)
        log.info("text embeddings: %d encoded, %d cached in %s", encoded, len(set(all_prompts)) - encoded,
                 embeddings.folder)
    elif embeddings.missing(all_prompts):
        raise SystemExit(f"error: {len(embeddings.missing(all_prompts))} prompt embeddings are not cached in "
                         f"{embeddings.folder}: run the data stage first (--stage data, or --stage all)")
    free_text_encoder(pipe)
    train_contexts = EmbeddingLRU(embeddings, prompts)  # read on demand: memory independent of the prompt count
    eval_contexts = embeddings.get(eval_prompts)
    context_null = embeddings.get([n_prompt])[0]

    steps_gen = cfg.data.gen_steps or wan_config.sample_steps
    gen_args = dict(teacher_id=tid, size=size, steps=steps_gen, shift=wan_config.sample_shift, guide_scale=guide,
                    solver="unipc", samples_per_prompt=cfg.data.samples_per_prompt, n_prompt=n_prompt,
                    trajectory_steps=cfg.data.trajectory_steps, shard_size=cfg.data.shard_size, run=run_data)
    data_start = time.perf_counter()
    if cfg.data.source == "images":
        train_store = stage.image_latents(pairs, prompts, size, teacher_id=tid, shard_size=cfg.data.shard_size,
                                          run=run_data)
    else:
        train_store = stage.teacher_samples("train", prompts, lambda idx: [train_contexts[i] for i in idx],
                                            context_null, seed=cfg.train.seed, **gen_args)
    eval_store = stage.teacher_samples("eval", eval_prompts, lambda idx: [eval_contexts[i] for i in idx],
                                       context_null, seed=cfg.train.seed + 1, **gen_args)
    train_data, eval_data = ShardedDataset(train_store), ShardedDataset(eval_store)
    log.info("x0 latents: %d train rows (%s), %d held-out rows (%s), latent %s", len(train_data),
             train_store.folder, len(eval_data), eval_store.folder, train_data.latent_shape)
    if cfg.stage == "data":
        made = stage.generated
        wall = time.perf_counter() - data_start
        summary = {"stage": "data", "train_data": str(train_store.folder), "eval_data": str(eval_store.folder),
                   "samples_generated": made, "data_wall_s": wall, "samples_per_s": made / max(wall, 1e-9)}
        log.info("data stage: %d samples generated in %.1f s (%.2f samples/s over %d ranks)", made, wall,
                 summary["samples_per_s"], rt.world_size)
        if rt.is_main:
            (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary
    eval_x0 = {"latents": torch.from_numpy(eval_data.all_latents()), "prompt_index": torch.from_numpy(eval_data.prompt_index)}
    teacher = Teacher(pipe, cfg.train.loss, guide, context_null)

    # ------------------------------------------------------------ student state, checkpoints
    scfg, model, optim_cfg = cfg.student, student.model, student.optim_cfg
    mesh, replicated, sharded = rt.mesh, student.replicated, student.sharded
    abstract, state_shardings = student.abstract, student.state_shardings
    init_rng = jax.random.key(cfg.train.seed)
    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=cfg.ckpt.keep,
                                save_interval_steps=cfg.ckpt.every, async_save=cfg.ckpt.async_save)
    cfg_dict = config_lib.to_dict(cfg)
    if checkpointer.latest_step() is not None:
        target = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings
        )
        state, saved_cfg, restored_step = checkpointer.restore(target)
        if saved_cfg.get("student") != cfg_dict["student"]:
            raise TrainingError(
                f"{workdir} holds a checkpoint of a different student ({saved_cfg.get('student')}); "
                "use another --workdir or the same --student.* settings"
            )
        log.info("resumed from %s at step %d", checkpointer.directory, restored_step)
    else:
        init = jax.jit(
            functools.partial(create_train_state, scfg, optim_cfg, latent_hw=latent_hw, text_len=text_len),
            out_shardings=state_shardings,
        )
        state = init(init_rng)
    start_step = int(jax.device_get(state.step))

    step_fn = student.step_fn
    phase_steps = cfg.train.expert_phase_steps
    if phase_steps < 0:
        phase_steps = 8 if cfg.teacher.offload else 0
    phases = ExpertPhases(phase_steps, cfg.data.timestep_shift, wan_config.boundary, cfg.train.seed)
    if phases.enabled:
        log.info("expert-phased batches: %d steps per phase, high-noise expert with p = %.3f", phase_steps,
                 phases.p_high)
    prepare_fn = jax.jit(
        functools.partial(_prepare_batch, shift=cfg.data.timestep_shift, student_cfg=scfg),
        in_shardings=(replicated, replicated, sharded) + ((replicated,) if phases.enabled else ()),
        out_shardings=(sharded, sharded, sharded),
    )

    def replicate(array: np.ndarray):
        return jax.make_array_from_callback(array.shape, replicated, lambda index: array[index])

    # ------------------------------------------------------------ held-out set: fixed prompts, noise, timesteps
    eval_batch = _eval_batch(cfg, eval_x0, eval_contexts, text_len, teacher, replicate,
                             chunk=cfg.train.batch_size // rt.world_size * rt.sp)
    eval_fn = jax.jit(functools.partial(eval_velocity_error, model=model), in_shardings=(replicated, replicated),
                      out_shardings=replicated)

    # ------------------------------------------------------------ sample grid: teacher images once
    grid = _GridMaker(cfg, wan_config, pipe, teacher, eval_contexts, context_null, text_len, latent_hw, guide,
                      replicate, rt.is_main, model, student_sample, to_teacher,
                      collective) if cfg.train.sample_every else None

    # ------------------------------------------------------------ the loop
    writer = MetricsWriter(workdir, enabled=rt.is_main)
    row_prompt = train_data.prompt_index  # [N] ints: the latents stay on disk
    local_rows = rt.batch_slice(cfg.train.batch_size)
    per_rank = cfg.train.batch_size // rt.world_size
    group_rows = slice(rt.dp_rank * rt.sp * per_rank, (rt.dp_rank + 1) * rt.sp * per_rank)  # this sp group's

    def load_batch(step: int):
        """This rank's rows of step `step` (read from the shards) and its text; runs ahead in a thread."""
        rows = np.random.default_rng([cfg.train.seed, step]).integers(0, len(train_data), cfg.train.batch_size)
        mine = rows[local_rows]
        text, mask = pad_text([train_contexts[row_prompt[r]] for r in mine], text_len)
        group_contexts = [train_contexts[row_prompt[r]] for r in rows[group_rows]]
        return train_data.latents(mine), text, mask, group_contexts

    batches = Prefetcher(load_batch, start_step, cfg.train.steps)
    summary = {"start_step": start_step}
    progress = None
    if rt.is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.train.steps, initial=start_step, desc="distill", dynamic_ncols=True,
                        disable=None, file=sys.stderr)
    pending, window_start, window_steps = [], time.perf_counter(), 0

    def evaluate(step):
        errors = {
            "eval/rel_velocity_error": float(jax.device_get(eval_fn(state.params, eval_batch))),
            "eval/rel_velocity_error_ema": float(jax.device_get(eval_fn(state.ema, eval_batch))),
        }
        writer.write(step, errors)
        summary.setdefault("first_eval", errors)
        summary["last_eval"] = errors
        log.info("step %d: held-out relative velocity error %.4f (ema %.4f)", step,
                 errors["eval/rel_velocity_error"], errors["eval/rel_velocity_error_ema"])

    if start_step == 0:
        evaluate(0)
    step = start_step
    try:
        for step in range(start_step, cfg.train.steps):
            x0_mine, text, mask, group_contexts = batches.get(step)
            x0_global = local_to_global(jnp.asarray(x0_mine), mesh)
            band = phases.band(step)
            x_t, t, x_t_teacher = prepare_fn(state.rng, jnp.int32(step), x0_global,
                                             *(() if band is None else (band,)))

            # torch teacher on this rank's shard (zero-copy both ways where devices match); with sp > 1
            # the teacher runs once per sp group on the group's rows
            t_local = torch.from_numpy(np.asarray(global_to_local(t)).copy())
            latents = [x.to(teacher.device) for x in jax_to_teacher_inputs(global_to_local(x_t_teacher))]
            target = teacher.group_targets(latents, t_local, group_contexts)
            target_global = local_to_global(teacher_outputs_to_jax(target), mesh)
            upcoming = phases.expert(step + 1)
            if upcoming is not None and pipe.residency.mode == "swap" and upcoming != pipe.residency.active:
                pipe.residency.prefetch(upcoming)  # the copy overlaps the student step queued next

            batch = dict(x_t=x_t, t=t, text=local_to_global(jnp.asarray(text), mesh),
                         text_mask=local_to_global(jnp.asarray(mask), mesh), target=target_global)
            state, metrics = step_fn(state, batch)
            pending.append(metrics)
            window_steps += 1
            if cfg.train.nan_policy == "stop" and bool(jax.device_get(metrics["skipped"])):
                raise TrainingError(
                    f"non-finite teacher output or loss at step {step}; stopping (--train.nan_policy=stop). "
                    f"The last good checkpoint in {checkpointer.directory} is kept."
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
                if pipe.residency.mode == "swap":
                    scalars["teacher/expert_swaps"] = float(pipe.residency.swaps)
                writer.write(done, scalars)
                summary.setdefault("first_loss", scalars["loss"])
                summary["last_loss"] = scalars["loss"]
                if progress is not None:
                    progress.set_postfix(loss=f"{scalars['loss']:.4f}", samples_s=f"{scalars['samples_per_s']:.1f}")
                pending, window_start, window_steps = [], time.perf_counter(), 0
            if progress is not None:
                progress.update(1)
            if done % cfg.train.eval_every == 0 or done == cfg.train.steps:
                evaluate(done)
            if grid is not None and (done % cfg.train.sample_every == 0 or done == cfg.train.steps):
                grid.write(state.ema, done, workdir / "samples" / f"step_{done:07d}.png")
            checkpointer.save(done, state, cfg_dict, force=done == cfg.train.steps)
            if stop.requested:
                log.warning("%s received: saving a checkpoint at step %d and exiting", stop.requested, done)
                checkpointer.save(done, state, cfg_dict, force=True)
                summary["interrupted"] = stop.requested
                break
    finally:
        batches.close()
        checkpointer.wait()
        checkpointer.close()
        writer.close()
        if progress is not None:
            progress.close()
    summary.update(final_step=int(jax.device_get(state.step)), wall_s=time.time() - t_start, workdir=str(workdir))
    if pipe.residency.mode == "swap":
        summary["expert_swaps"] = pipe.residency.swaps
        summary["expert_swap_ms"] = pipe.residency.swap_ms()
    if rt.platform == "cuda":
        summary["torch_peak_gb"] = torch.cuda.max_memory_allocated(rt.torch_device) / 1e9
        stats = rt.jax_device.memory_stats() or {}
        summary["jax_peak_gb"] = stats.get("peak_bytes_in_use", 0) / 1e9
        if rt.is_main:
            log.info("peak GPU memory: torch %.2f GB, JAX %.2f GB", summary["torch_peak_gb"], summary["jax_peak_gb"])
    if rt.is_main:  # what the run did, for people and scripts (the state itself is in checkpoints/)
        (workdir / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "state"}, indent=1))
    summary["state"] = state
    return summary


def _eval_batch(cfg, eval_x0, eval_contexts, text_len, teacher, replicate, chunk: int):
    """Held-out batch: every eval latent x num_noise draws x cfg.eval.timesteps, teacher targets once.

    The teacher sees the rows in chunks of `chunk` (the training teacher batch, so evaluation never
    needs more activation memory than a step), high-noise rows first so that a chunk rarely mixes
    experts (with --teacher.offload every mixed chunk would swap them)."""
    import jax.numpy as jnp

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
    x_t16 = torch.from_numpy(np.asarray(to_teacher(jnp.asarray(x_t), cfg.student)).copy())
    ctx = [eval_contexts[prompt_index[r]] for r in rows]
    order = np.argsort(-ts, kind="stable")  # high-noise expert's rows first
    targets = [None] * len(rows)
    for i in range(0, len(rows), chunk):
        part = order[i : i + chunk]
        latents = [x_t16[j][:, None].to(teacher.device) for j in part]
        outs = teacher.targets(latents, torch.from_numpy(ts[part]), [ctx[j] for j in part])
        for j, o in zip(part, outs):
            targets[j] = o[:, 0].float().cpu()
    text, mask = pad_text(ctx, text_len)
    return dict(x_t=replicate(x_t), t=replicate(ts), text=replicate(text), text_mask=replicate(mask),
                target=replicate(torch.stack(targets).numpy()))


class _GridMaker:
    """PNG grids: per held-out prompt, the teacher's sample and the student's from the same noise."""

    def __init__(self, cfg, wan_config, pipe, teacher, eval_contexts, context_null, text_len, latent_hw, guide,
                 replicate, is_main, model, student_sample, to_teacher, collective=False):
        import jax
        import jax.numpy as jnp

        k = min(cfg.eval.grid_prompts, len(eval_contexts))
        noise = np.random.default_rng(777).standard_normal((k, cfg.student.latent_channels, *latent_hw)).astype(np.float32)
        text, mask = pad_text(eval_contexts[:k], text_len)
        self.pipe, self.is_main = pipe, is_main
        self.inputs = (replicate(noise), replicate(text), replicate(mask))
        self.to_teacher = jax.jit(functools.partial(to_teacher, cfg=cfg.student))
        self.sample = functools.partial(
            student_sample, model=model, steps=cfg.eval.sample_steps, shift=wan_config.sample_shift,
            solver=cfg.eval.sample_solver)
        self.teacher_images = None
        if is_main or collective:  # a distributed teacher samples on every rank; rank 0 decodes
            noise16 = torch.from_numpy(np.asarray(to_teacher(jnp.asarray(noise), cfg.student)).copy())[:, :, None]
            g = guide if cfg.train.loss == "cfg" else (1.0, 1.0)
            x0 = pipe.sample(noise16, eval_contexts[:k], [context_null] * k, sampling_steps=cfg.eval.sample_steps,
                             shift=wan_config.sample_shift, guide_scale=g)
            if is_main:
                self.teacher_images = [to_uint8(v[:, 0]) for v in pipe.vae.decode(list(x0))]

    def write(self, params, step: int, path: Path) -> None:
        import jax

        noise, text, mask = self.inputs
        x0 = self.sample(params, noise=noise, text=text, text_mask=mask)  # all ranks run the jitted sampler
        x0_16 = np.asarray(jax.device_get(self.to_teacher(x0)))
        if not self.is_main:
            return
        latents = [torch.from_numpy(z.copy())[:, None].to(self.pipe.device) for z in x0_16]
        student = [to_uint8(v[:, 0]) for v in self.pipe.vae.decode(latents)]
        save_grid(path, [[t, s] for t, s in zip(self.teacher_images, student)])
