"""Export a run's student: `python -m distill.export --workdir RUN --out DIR`.

Restores the run's latest checkpoint and writes its EMA parameters with `student_jax.export`:
DIR/model.safetensors (parameters named by their flax path, `blocks_0.self_attn.q.kernel`) and
DIR/config.json (the StudentConfig; under "sampling" the latent layout, the teacher's timestep
shift and text length, the image size and solver the run was evaluated with; under "teacher" the
release it was distilled from and its id; under "source" the run and step). The folder loads with
`student_jax.export.load_student(DIR)`, which needs neither torch nor this package.

Owns `restore_ema(workdir)`, the run's EMA student restored without building the teacher (also
what `distill.sample` draws with), `teacher_folder(cfg)` and `release_info(cfg, folder)`, the
run's teacher release and what an export records of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from . import config as config_lib
from . import errors
from .errors import UserError


@dataclasses.dataclass
class RestoredRun:
    """A run's config and its latest checkpoint's EMA parameters (jax arrays on the default device)."""

    cfg: config_lib.Config
    workdir: Path
    step: int
    ema: Any


def run_config(workdir: str | Path) -> config_lib.Config:
    """The resolved config a run wrote into its workdir (a clear error when it is no run directory).

    Student fields added since the run was saved take the value the run used (`config.from_dict`:
    a run from before `scan_blocks` has the unrolled layout in its checkpoints).
    """
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise UserError(f"{path} not found: --workdir must be a run directory made by train.py")
    return config_lib.from_dict(json.loads(path.read_text()))


def restore_ema(workdir: str | Path) -> RestoredRun:
    """The EMA of the newest readable checkpoint of `workdir` (the whole state is read, the EMA kept).

    Nothing of the teacher is built: the abstract state needs only the student and optimizer configs
    (latent size and text length only size the dummy inputs of the initialising pass, not the
    parameters; the optimizer state's layout does not depend on the schedule's lengths).
    """
    from student_jax.checkpoint import Checkpointer, NoCheckpointError
    from student_jax.config import saved_student_fields
    from student_jax.objectives import make_objective
    from student_jax.state import abstract_train_state

    workdir = Path(workdir)
    cfg = run_config(workdir)
    folder = workdir / "checkpoints"
    hint = f"train first (python train.py --workdir {workdir})"
    if not folder.is_dir():  # checked first: the Checkpointer would create the folder
        raise UserError(f"no checkpoint in {folder}: {hint}")
    checkpointer = Checkpointer(folder, max_to_keep=None)
    try:
        if checkpointer.latest_step() is None:
            raise UserError(f"no checkpoint in {folder}: {hint}")
        latent_hw = (cfg.data.height // 8, cfg.data.width // 8)
        abstract = abstract_train_state(cfg.student, cfg.optim, latent_hw, text_len=1,
                                        objective=make_objective(cfg.train.loss))
        try:
            state, saved_cfg, step = checkpointer.restore(abstract)
        except (NoCheckpointError, ValueError) as error:  # unreadable, or another model's layout
            raise UserError(str(error)) from None
    finally:
        checkpointer.close()
    if saved_student_fields(saved_cfg.get("student", {})) != config_lib.to_dict(cfg)["student"]:
        raise UserError(f"the checkpoint at step {step} in {folder} holds another student than "
                        f"{workdir / 'config.json'} says ({saved_cfg.get('student')})")
    return RestoredRun(cfg=cfg, workdir=workdir, step=int(step), ema=state.ema)


def teacher_folder(cfg: config_lib.Config) -> Path:
    """The run's teacher release folder (the shipped toy teacher is unpacked into the cache if needed)."""
    if cfg.teacher.path:
        folder = Path(cfg.teacher.path)
        if not folder.is_dir():
            raise UserError(f"the run's teacher release {folder} (its --teacher_path) is not a folder: its config, "
                            "text encoder and VAE are needed")
        return folder
    from .toy_teacher import toy_release

    return toy_release(cfg.data.cache_dir)


def release_info(cfg: config_lib.Config, folder: Path) -> tuple[Any, dict]:
    """(the release's Wan config, the "teacher" section of an export) for the run's teacher."""
    from .teacher import release_config, teacher_id

    wan_config = release_config(folder, cfg.teacher.config)
    teacher = {"path": str(folder.resolve()), "config": cfg.teacher.config, "name": wan_config.get("__name__", ""),
               "id": teacher_id(folder, wan_config, cfg.teacher.dtype), "dtype": cfg.teacher.dtype,
               "fp8": cfg.teacher.fp8, "objective": cfg.train.loss,
               "fp8_recipe": ({"scaling": cfg.teacher.fp8_scaling, "fast_accum": cfg.teacher.fp8_fast_accum}
                              if cfg.teacher.fp8 else None),
               "guide_scale": list(cfg.teacher.guide_scale or wan_config.sample_guide_scale),
               "t5_checkpoint": wan_config.t5_checkpoint, "t5_tokenizer": wan_config.t5_tokenizer,
               "vae_checkpoint": wan_config.vae_checkpoint}
    return wan_config, teacher


def export(workdir: str | Path, out: str | Path) -> dict:
    """Write the run's EMA student into `out`; returns the config.json written."""
    from student_jax.export import read_export_config, save_student

    run = restore_ema(workdir)
    cfg = run.cfg
    wan_config, teacher = release_info(cfg, teacher_folder(cfg))
    sampling = {
        "shift": float(wan_config.sample_shift),
        "text_len": int(wan_config.text_len),
        "vae_stride": int(wan_config.vae_stride[-1]),
        "height": cfg.data.height,
        "width": cfg.data.width,
        "solver": cfg.eval.sample_solver,
        "steps": list(cfg.eval.student_steps),
        # the cfg objective learns the guided velocity: one student pass per step, no negative prompt
        "guidance": "learned" if cfg.train.loss == "cfg" else "none",
        "train_timestep_shift": cfg.data.timestep_shift,
    }
    source = {"workdir": str(Path(workdir).resolve()), "step": run.step, "params": "ema",
              "ema_decay": cfg.optim.ema_decay}
    save_student(out, run.ema, cfg.student, info={"sampling": sampling, "teacher": teacher, "source": source})
    return read_export_config(out)


def main(argv: list[str] | None = None, prog: str = "python -m distill.export") -> int:
    """The command line; a user error prints `error: ...` and returns 2 (`distill.errors`)."""
    return errors.main(lambda args: _run(args, prog), argv)


def _run(argv: list[str], prog: str) -> int:
    from .cli import ArgumentParser

    paragraphs = __doc__.split("\n\n")
    parser = ArgumentParser(prog=prog, description=paragraphs[0], epilog=paragraphs[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="run directory made by train.py (its latest checkpoint)")
    parser.add_argument("--out", required=True, help="folder to write model.safetensors and config.json into")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    config = export(args.workdir, out)
    print(f"wrote {out / 'model.safetensors'} ({config['param_count']} parameters, EMA of step "
          f"{config['source']['step']}) and {out / 'config.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
