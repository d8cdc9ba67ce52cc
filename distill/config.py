"""The typed config tree of a distillation run, its presets, and command-line parsing.

One dataclass tree (`Config`) holds every setting; presets are plain functions returning a full
config (`tiny`, the CPU default; `a14b`, a real release folder). The command line is preset first,
then dotted overrides (`--student.latent_channels=4 --optim.lr=1e-4`), parsed by tyro: `--help`
lists every option with its type and default, and an unknown key is an error naming the closest
valid one. The seed's flags (`--teacher_path`, `--teacher_device_strategy`, `--teacher_dtype`,
`--teacher_on_cpu`) are aliases of their `--teacher.*` keys.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

from student_jax.config import OptimConfig, StudentConfig, saved_student_fields, student_preset, PRESETS as STUDENT_PRESETS

ASSETS = Path(__file__).resolve().parent / "assets"


def _alias(name: str):
    return tyro.conf.arg(aliases=[name])


@dataclass
class TeacherConfig:
    """The Wan teacher (torch)."""

    path: Annotated[str, _alias("--teacher_path")] = ""
    """Wan2.2-T2V-A14B release folder; empty: the shipped toy-world teacher, unpacked into data.cache_dir."""
    config: str = ""
    """Config JSON for the release; empty: the folder's config_*.json if present, else t2v-A14B."""
    device_strategy: Annotated[Literal["gpu", "gpu0", "cpu", "balanced"], _alias("--teacher_device_strategy")] = "gpu"
    """gpu (= the seed's gpu0): a whole teacher on each rank's GPU (CPU when none); balanced: both experts and
    umT5 sharded over all GPUs with FSDP2 (each rank holds 1/world); cpu: teacher on the CPU (slow)."""
    sp: int = 1
    """Ulysses sequence-parallel group size for the teacher (a divisor of the number of processes): each
    group of sp ranks runs the teacher on the group's samples, each rank holding 1/sp of the tokens."""
    offload: bool = False
    """One expert on the GPU at a time, the other in pinned host memory, swapped asynchronously at expert
    changes (halves the teacher's GPU memory; pair with expert-phased batches, --train.expert_phase_steps)."""
    dtype: Annotated[Literal["bfloat16", "float32"], _alias("--teacher_dtype")] = "bfloat16"
    """DiT weights/compute dtype on GPU (bf16 autocast as upstream); the CPU always runs float32."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile each DiT block (fuses the norm / modulation / rotary / residual math around the matmuls:
    1.4x faster on an H200; each new shape compiles for about 10 s): auto = on for a GPU teacher, off on the CPU."""
    fp8: bool = False
    """FP8 (e4m3) matmuls for the DiT blocks' linear layers (`wan.fp8`): weights stored in
    float8 (half the memory), activations scaled per token; fast on FP8 GPUs (Hopper, Ada); an older GPU gives
    the same numbers in float32, slowly. Not with --teacher_device_strategy balanced. Moves the targets by a few
    percent or more (README "Speed"): check on your release first."""
    fp8_scaling: Literal["row", "tensor"] = "row"
    """With --teacher.fp8: row = a scale per token and per output channel (a sample's target does not depend
    on its batch); tensor = one scale per weight and per activation tensor (the whole batch)."""
    fp8_fast_accum: bool = True
    """With --teacher.fp8: the FP8 kernel's fast accumulation (partial sums kept in reduced precision between
    promotions): 0.64x instead of 0.69x the bf16 forward at 1024x1024 batch 2 on an H100, each product within
    0.4% of the exact one against FP8's 3.7% from bf16 (README "Speed"); --teacher.no_fp8_fast_accum for
    float32 accumulation throughout."""
    on_cpu: Annotated[bool, _alias("--teacher_on_cpu")] = False
    """Keep the umT5 encoder on the CPU (upstream t5_cpu)."""
    guide_scale: tuple[float, float] | None = None
    """(low-noise, high-noise) CFG scales for the cfg loss; None: the config's sample_guide_scale."""
    n_prompt: str = ""
    """Negative prompt for CFG; empty: the config's default negative prompt."""


@dataclass
class DataConfig:
    """Prompts, resolution and the x0 latent source."""

    prompts: str = str(ASSETS / "prompts_toy.txt")
    """Training prompts, one per line."""
    eval_prompts: str = str(ASSETS / "prompts_toy_heldout.txt")
    """Held-out prompts for evaluation and sample grids, one per line."""
    height: int = 64
    """Image height in pixels (multiple of 16 = VAE stride 8 x student/teacher patch 2)."""
    width: int = 64
    """Image width in pixels (multiple of 16)."""
    source: Literal["teacher", "images"] = "teacher"
    """x0 latents from teacher samples (generate, cached) or from an image folder encoded by the VAE."""
    image_dir: str = ""
    """For source=images: folder of images, each with a same-named .txt caption."""
    samples_per_prompt: int = 2
    """Teacher samples (different seeds) per prompt for source=teacher."""
    gen_steps: int = 0
    """Sampling steps of the teacher samples; 0: the config's sample_steps."""
    timestep_shift: float = 12.0
    """Shift of the training timestep density s = shift*u/(1+(shift-1)u), u~U(0,1); 12 = Wan's sampling shift."""
    cache_dir: str = "runs/cache"
    """Text embeddings, x0 datasets (data/<kind>_<key>/) and the unpacked toy teacher are kept here, shared between runs."""
    trajectory_steps: int = 0
    """Also store N latents of each sample's teacher ODE path (the latent entering N evenly spaced sampling
    steps, and those timesteps), for objectives that learn from trajectories; 0: only x0."""
    shard_size: int = 64
    """Samples per data shard (the unit of work, of resumption and of the checksum)."""
    wait_log_s: float = 300.0
    """A rank waiting for others in the data stage logs whom it waits for (and their progress) this often."""
    device_text_prompts: int = 256
    """Prompts whose text embeddings training keeps on the GPU, padded once (least recently used dropped
    first; 4 MB each at A14B size in bf16): a step then uploads only the embeddings of prompts not held."""


@dataclass
class TrainConfig:
    """The loop."""

    steps: int = 2000
    batch_size: int = 8
    """Global batch (split over ranks; must be divisible by the world size)."""
    seed: int = 0
    loss: Literal["cfg", "velocity"] = "cfg"
    """cfg: match the teacher's guided velocity (one student pass at sampling); velocity: the conditional velocity."""
    nan_policy: Literal["skip", "stop"] = "skip"
    """Non-finite teacher output / loss: skip the update, or stop the run (keeping the last checkpoint)."""
    log_every: int = 20
    eval_every: int = 250
    sample_every: int = 500
    """Quality evaluation against the teacher (metrics and the PNG grid) every N steps (0: never)."""
    jax_memory_fraction: float = 0.3
    """Share of the usable GPU memory JAX (the student) may take; the torch teacher gets the rest."""
    gpu_memory_gb: float = 0.0
    """Usable GPU memory per GPU in GB (1e9 bytes); 0: the whole card. Caps torch and JAX together, e.g. 80 to
    plan for (and emulate) an 80 GB card on a larger one, or to share a GPU."""
    expert_phase_steps: int = -1
    """Expert-phased batches: every run of K steps draws all its timesteps from one expert's range (the expert
    picked with the probability the timestep density gives it), so one expert serves K steps and swaps are
    rare. 0: off (each sample routed by its own timestep); -1: 8 with --teacher.offload, else off."""


@dataclass
class EvalConfig:
    num_noise: int = 2
    """Noise draws per held-out prompt and timestep."""
    timesteps: tuple[float, ...] = (100.0, 400.0, 700.0, 900.0, 980.0)
    """Fixed timesteps (t = 1000 s) of the held-out velocity error; both experts' ranges."""
    student_steps: tuple[int, ...] = (1, 2, 4, 8)
    """Sampling steps of the student in the quality evaluation (each is scored and shown in the grid)."""
    teacher_steps: int = 0
    """Sampling steps of the teacher's reference samples (CFG); 0: the config's sample_steps."""
    sample_solver: Literal["unipc", "euler"] = "unipc"
    quality_prompts: int = 8
    """Held-out prompts of the quality evaluation (the first N of --data.eval_prompts)."""
    quality_noises: int = 4
    """Noises per held-out prompt (diversity is measured across them)."""
    grid_prompts: int = 4
    """Rows of the sample grid (teacher, then the student at each of student_steps)."""


@dataclass
class CheckpointConfig:
    every: int = 500
    keep: int = 3
    async_save: bool = True


@dataclass
class Config:
    preset: str = "tiny"
    stage: Literal["all", "data", "train"] = "all"
    """data: make the teacher data (text embeddings, x0 shards) and stop; train: train on data made before
    (an error if it is missing); all: data (resuming whatever is missing), then training."""
    workdir: str = "runs/tiny"
    """Run directory: config.json, metrics.jsonl, tb/, samples/, checkpoints/. Resumes if it holds a checkpoint."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=lambda: student_preset("tiny"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)


# ---------------------------------------------------------------- presets


def tiny() -> Config:
    """CPU default: the shipped toy-world teacher, tiny student, 64x64 images, about 4.5 minutes on 2 cores."""
    return Config(
        preset="tiny",
        optim=OptimConfig(lr=1e-3, warmup_steps=50, total_steps=2000, end_lr_ratio=0.1, weight_decay=0.0,
                          clip_norm=1.0, ema_decay=0.99),
    )


def a14b() -> Config:
    """The real Wan2.2-T2V-A14B teacher (give --teacher_path), `small` student, 1024x1024 images."""
    return Config(
        preset="a14b",
        workdir="runs/a14b",
        # the student's step is ~4% of the teacher's: no remat, blocks unrolled, text attention on cuDNN is
        # its fastest layout that fits JAX's 40% of an 80 GB card (25 GB, README "Speed")
        student=student_preset("small", scan_blocks=False, cudnn_text_attention=True),
        optim=OptimConfig(lr=1e-4, warmup_steps=1000, total_steps=100_000, end_lr_ratio=0.1, weight_decay=0.01,
                          clip_norm=1.0, ema_decay=0.9999),
        data=DataConfig(prompts="", eval_prompts="", height=1024, width=1024, samples_per_prompt=1, gen_steps=40),
        train=TrainConfig(steps=100_000, batch_size=8, log_every=20, eval_every=1000, sample_every=2000,
                          jax_memory_fraction=0.4),
        ckpt=CheckpointConfig(every=1000, keep=3),
    )


PRESETS = {"tiny": tiny, "a14b": a14b}


class _PresetParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise SystemExit(f"error: {message}\nsee --help for every option")


def parse(argv: list[str] | None = None) -> Config:
    """`--preset NAME` and `--student_preset NAME` pick the defaults; every other flag overrides them."""
    argv = [arg for arg in (sys.argv[1:] if argv is None else argv) if arg != "--debug"]  # distill.errors' flag
    pre = _PresetParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    pre.add_argument("--student_preset", choices=list(STUDENT_PRESETS), default=None)
    known, rest = pre.parse_known_args(argv)
    cfg = PRESETS[known.preset]()
    if known.student_preset:
        cfg.student = student_preset(known.student_preset)
    description = (
        "Distil Wan2.2 T2V-A14B into a Flax image student. `--preset {tiny,a14b}` and "
        f"`--student_preset {{{','.join(STUDENT_PRESETS)}}}` choose the defaults below (now: preset "
        f"{known.preset}); every option overrides them."
    )
    cfg = _cli(cfg, rest, description + " `--debug` shows the traceback of an error (errors end with exit status 2).")
    cfg.preset = known.preset
    validate(cfg)
    return cfg


def _cli(default: Config, args: list[str], description: str | None = None) -> Config:
    """tyro's parse of `args` over `default`; a flag error becomes `SystemExit("error: ...")`, one or
    two lines (`_flag_error`), instead of tyro's box. --help is tyro's own."""
    if {"-h", "--help"} & set(args):
        return tyro.cli(Config, default=default, args=args, use_underscores=True, description=description)
    captured = io.StringIO()
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "10000"  # tyro wraps its box to the terminal: one problem, one line
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            cfg = tyro.cli(Config, default=default, args=args, use_underscores=True, description=description)
    except SystemExit as stop:
        if stop.code in (0, None):
            sys.stdout.write(captured.getvalue())
            raise
        raise SystemExit(_flag_error(captured.getvalue())) from None
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    sys.stderr.write(captured.getvalue())  # tyro's warnings, if any
    return cfg


def _flag_error(text: str) -> str:
    """tyro's error box (as printed to a file: sections between rules of dashes; title, problem,
    then 'Argument helptext:' or 'Perhaps you meant:', then 'For full helptext ...') -> `error: ...`,
    the problem on the first line and what to pass on the second. Unknown layouts are passed on whole."""
    sections, current = [], []
    for raw in text.splitlines():
        line = raw.strip().strip("│|").strip()
        if line and set(line) <= set("-─━╌┄╭╮╰╯├┤"):
            sections.append(current)
            current = []
        elif line:
            current.append(line)
    sections = [part for part in [*sections, current] if part]
    if len(sections) < 2:
        return "error: invalid command line\n" + text.strip()
    problem = sections[1][0]
    hint = "see --help for every option"
    for part in sections[2:]:
        if part[0].startswith("Argument helptext") and len(part) > 1:
            default = re.search(r"\(default: [^)]*\)", " ".join(part[1:]))
            hint = f"expected {part[1]}" + (f" {default.group(0)}" if default else "") + "; " + hint
        elif part[0].startswith("Perhaps you meant") and len(part) > 1:
            flags = [line.split()[0] for line in part[1:] if line.startswith("-")]
            hint = f"did you mean {', '.join(flags[:3])}? " + hint
    return f"error: {problem}\n{hint}"


def validate(cfg: Config) -> None:
    """Errors a user can fix from the command line, said before any work starts."""
    problems = []
    for name in ("height", "width"):
        value = getattr(cfg.data, name)
        if value <= 0 or value % 16:
            problems.append(
                f"--data.{name}={value} must be a positive multiple of 16 (VAE stride 8 x patch 2); "
                f"try {max(16, round(value / 16) * 16)}"
            )
    if cfg.train.steps < 1:
        problems.append(f"--train.steps must be >= 1, got {cfg.train.steps}")
    if cfg.train.batch_size < 1:
        problems.append(f"--train.batch_size must be >= 1, got {cfg.train.batch_size}")
    if cfg.data.source == "images" and not cfg.data.image_dir:
        problems.append("--data.source=images needs --data.image_dir")
    if cfg.preset == "a14b" and not cfg.teacher.path:
        problems.append("the a14b preset needs --teacher_path /path/to/Wan2.2-T2V-A14B")
    if cfg.teacher.offload and cfg.teacher.device_strategy in ("balanced", "cpu"):
        problems.append(
            f"--teacher.offload swaps experts between host and GPU for a whole teacher per GPU; with "
            f"--teacher_device_strategy {cfg.teacher.device_strategy} drop --teacher.offload"
        )
    recipe_flags = ([f"--teacher.fp8_scaling {cfg.teacher.fp8_scaling}"] if cfg.teacher.fp8_scaling != "row" else []) + (
        ["--teacher.no_fp8_fast_accum"] if not cfg.teacher.fp8_fast_accum else [])
    if recipe_flags and not cfg.teacher.fp8:  # would silently do nothing
        verb, them = ("change", "them") if len(recipe_flags) > 1 else ("changes", "it")
        problems.append(f"{' and '.join(recipe_flags)} only {verb} the FP8 teacher: add --teacher.fp8, or drop {them}")
    if cfg.teacher.fp8 and cfg.teacher.device_strategy == "balanced":
        problems.append("--teacher.fp8 quantises whole weight matrices and --teacher_device_strategy balanced shards "
                        "them with FSDP: drop --teacher.fp8, or keep a whole teacher per GPU (gpu, with --teacher.offload)")
    if cfg.teacher.sp < 1:
        problems.append(f"--teacher.sp must be >= 1, got {cfg.teacher.sp}")
    if cfg.train.expert_phase_steps < -1:
        problems.append(f"--train.expert_phase_steps must be -1 (auto), 0 (off) or K >= 1, got {cfg.train.expert_phase_steps}")
    if not 0 < cfg.train.jax_memory_fraction < 1:
        problems.append(f"--train.jax_memory_fraction must be in (0, 1), got {cfg.train.jax_memory_fraction}")
    if cfg.data.trajectory_steps < 0:
        problems.append(f"--data.trajectory_steps must be >= 0, got {cfg.data.trajectory_steps}")
    if cfg.data.shard_size < 1:
        problems.append(f"--data.shard_size must be >= 1, got {cfg.data.shard_size}")
    if cfg.data.device_text_prompts < 1:
        problems.append(f"--data.device_text_prompts must be >= 1, got {cfg.data.device_text_prompts}")
    at_least = [  # (flag, value, minimum, what the minimum means)
        ("--train.log_every", cfg.train.log_every, 1, ""), ("--train.eval_every", cfg.train.eval_every, 1, ""),
        ("--train.sample_every", cfg.train.sample_every, 0, " (0: never)"),
        ("--ckpt.every", cfg.ckpt.every, 1, ""), ("--ckpt.keep", cfg.ckpt.keep, 1, ""),
        ("--data.samples_per_prompt", cfg.data.samples_per_prompt, 1, ""),
        ("--data.gen_steps", cfg.data.gen_steps, 0, " (0: the teacher config's sample_steps)"),
        ("--eval.num_noise", cfg.eval.num_noise, 1, ""),
        ("--eval.teacher_steps", cfg.eval.teacher_steps, 0, " (0: the teacher config's sample_steps)"),
        ("--eval.quality_prompts", cfg.eval.quality_prompts, 1, ""),
        ("--eval.quality_noises", cfg.eval.quality_noises, 1, ""), ("--eval.grid_prompts", cfg.eval.grid_prompts, 0, ""),
    ]
    problems += [f"{flag} must be >= {low}{meaning}, got {value}" for flag, value, low, meaning in at_least if value < low]
    if not cfg.data.timestep_shift > 0:
        problems.append(f"--data.timestep_shift must be > 0, got {cfg.data.timestep_shift}")
    if not cfg.data.wait_log_s > 0:
        problems.append(f"--data.wait_log_s must be > 0 (seconds), got {cfg.data.wait_log_s}")
    if not cfg.eval.timesteps or not all(0 <= t <= 1000 for t in cfg.eval.timesteps):
        problems.append(f"--eval.timesteps must be one or more timesteps in [0, 1000], got {list(cfg.eval.timesteps)}")
    if not cfg.eval.student_steps or min(cfg.eval.student_steps) < 1:
        problems.append(f"--eval.student_steps must be one or more step counts >= 1, got {list(cfg.eval.student_steps)}")
    if cfg.teacher.guide_scale is not None and min(cfg.teacher.guide_scale) < 0:
        problems.append(f"--teacher.guide_scale must be >= 0, got {list(cfg.teacher.guide_scale)}")
    if cfg.train.gpu_memory_gb < 0:
        problems.append(f"--train.gpu_memory_gb must be >= 0 (0: the whole card), got {cfg.train.gpu_memory_gb}")
    patch = cfg.student.patch_size
    resolution_ok = all(v > 0 and v % 16 == 0 for v in (cfg.data.height, cfg.data.width))  # else said above
    if resolution_ok and ((cfg.data.height // 8) % patch or (cfg.data.width // 8) % patch):
        problems.append(
            f"the latent size {(cfg.data.height // 8, cfg.data.width // 8)} (image / 8) must be divisible by "
            f"--student.patch_size={patch}"
        )
    if cfg.student.teacher_channels != 16:
        problems.append(f"--student.teacher_channels must be 16 (the Wan VAE latent space), got {cfg.student.teacher_channels}")
    if problems:
        raise SystemExit("error: " + "\n       ".join(problems))


def from_dict(saved: dict, overrides: list[str] | None = None) -> Config:
    """A Config from `to_dict`'s output (a run's config.json), with optional command-line overrides."""
    nested = {"teacher": TeacherConfig, "student": StudentConfig, "optim": OptimConfig, "data": DataConfig,
              "train": TrainConfig, "eval": EvalConfig, "ckpt": CheckpointConfig}
    parts = {}
    for name, cls in nested.items():
        values = dict(saved.get(name, {}))
        if name == "student":
            values = saved_student_fields(values)  # fields added since the save: the values it used
        fields = {f.name for f in dataclasses.fields(cls)}
        # JSON gave lists where the config holds tuples
        parts[name] = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields})
    cfg = Config(**{k: v for k, v in saved.items() if k not in nested}, **parts)
    if overrides:
        cfg = _cli(cfg, overrides)
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Config, path: Path) -> None:
    path.write_text(json.dumps(to_dict(cfg), indent=2))
