"""Checks of a run's inputs before any heavy work, each failure one `error: ...` with what to do.

The Distiller would trip over most of these too, but minutes later (after loading a 14B teacher,
compiling the student) and with a message from deep inside a library. Checked up front:

- `check_inputs` (every rank, before the teacher is built):
  * the global batch splits over the processes;
  * the prompt files (`--data.prompts`, `--data.eval_prompts`): present, a file, UTF-8 text, not
    empty, at most 100 MB and 1,000,000 prompts (`distill.data.read_prompt_lines`); with
    `--data.source images`, the image folder and its captions;
  * `--data.cache_dir`: a folder (made if missing) this process can write into;
  * a release folder (`--teacher_path`, when given): its config JSON, the umT5 tokenizer and
    `.pth`, the VAE `.pth` (both readable by `torch.load(weights_only=True)`: a pickle holding code
    is refused, never run), both experts' `config.json` and safetensors (an index pointing outside
    its folder is refused; shards are checked against the index, truncated files are found from
    their headers; no tensor data is read), and `--student.max_text_len` against its text_len.
    Prompts longer than the teacher's text_len are not errors: the tokenizer keeps their first
    text_len - 1 tokens and `</s>` as upstream does, and each is named here with a warning.
- `check_workdir` (rank 0): `--workdir` is a folder, or can be made (not a file, not inside one).
  Writing into it is tested by taking the run lock (`distill.runlock`).
- `check_resume` (rank 0, holding the lock): a workdir with checkpoints was trained with the same
  student and objective (the fields that shape the saved state), or the run stops naming the fields.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from student_jax.config import saved_student_fields

from . import config as config_lib
from .config import Config
from .data import image_folder, read_prompt_lines
from .errors import UserError

__all__ = ["RESUME_KEYS", "check_inputs", "check_resume", "check_workdir", "warn_truncated_prompts"]

log = logging.getLogger("distill")

RELEASE_HINT = "point --teacher_path at a complete Wan2.2-T2V-A14B release folder (see README, 'Checkpoint layout')"
# Settings that shape the state saved in a checkpoint: a resume with other values cannot restore it.
RESUME_KEYS = ("student", "train.loss", "optim.grad_accum")
_MAX_NAMED = 5  # truncated prompts / differing keys named one by one, the rest counted


def check_inputs(cfg: Config, rt) -> None:
    """Everything a run reads, checked on every rank before anything heavy (see the module docstring)."""
    world = rt.world_size
    if cfg.train.batch_size % world:
        multiple = -(-cfg.train.batch_size // world) * world
        raise UserError(f"--train.batch_size={cfg.train.batch_size} must be divisible by the number of processes "
                        f"({world})", f"use a multiple of {world}, e.g. --train.batch_size {multiple}")
    prompt_files = [(cfg.data.prompts, read_prompt_lines(cfg.data.prompts, "prompt file", "--data.prompts")),
                    (cfg.data.eval_prompts,
                     read_prompt_lines(cfg.data.eval_prompts, "eval prompt file", "--data.eval_prompts"))]
    if cfg.data.source == "images":
        if not Path(cfg.data.image_dir).is_dir():
            raise UserError(f"--data.image_dir {cfg.data.image_dir} is not a folder",
                            "pass a folder of images, each with a same-named .txt caption")
        image_folder(cfg.data.image_dir)
    writable_folder(Path(cfg.data.cache_dir), "--data.cache_dir", probe=True)
    if cfg.teacher.path:
        wan_config, tokenizer = check_release(cfg)
        warn_truncated_prompts(tokenizer, wan_config.text_len, prompt_files)


def writable_folder(path: Path, flag: str, probe: bool) -> None:
    """`path` is a folder (made if missing) and, with probe, a file can be created in it."""
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        if os.path.lexists(folder):
            if folder == path:
                raise UserError(f"{flag} {path} is a file, not a folder",
                                f"pass a folder to {flag} (it is made if missing)")
            raise UserError(f"{flag} {path} lies inside {folder}, which is a file, not a folder",
                            f"pass a folder path to {flag}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        if probe:
            fd, name = tempfile.mkstemp(prefix=".write_test_", dir=path)
            os.close(fd)
            os.unlink(name)
    except (PermissionError, FileExistsError, NotADirectoryError) as error:
        raise UserError(f"cannot write into {flag} {path}: {error.strerror}",
                        f"choose a {flag} you can write to") from None
    except OSError as error:
        if error.errno is None or error.strerror is None:
            raise
        raise UserError(f"cannot write into {flag} {path}: {error.strerror}",
                        f"choose a {flag} on a writable disk with room") from None


def check_workdir(cfg: Config) -> Path:
    workdir = Path(cfg.workdir)
    writable_folder(workdir, "--workdir", probe=False)  # the run lock is the write test
    return workdir


def check_release(cfg: Config):
    """The release folder's files, without reading any weights; returns (its Wan config, its tokenizer)."""
    from wan.checkpoint import load_torch_file, open_diffusers_weights, require_file
    from wan.modules.model import DiTConfig
    from wan.modules.tokenizers import HuggingfaceTokenizer

    from .teacher import release_config

    folder = Path(cfg.teacher.path)
    if not folder.exists():
        raise UserError(f"--teacher_path {folder} does not exist", RELEASE_HINT)
    if not folder.is_dir():
        raise UserError(f"--teacher_path {folder} is a file, not a release folder", RELEASE_HINT)
    if cfg.teacher.config and not Path(cfg.teacher.config).is_file():
        raise UserError(f"--teacher.config {cfg.teacher.config} not found",
                        "pass the release's config JSON, or leave it empty for the folder's config_*.json")
    try:
        wan_config = release_config(folder, cfg.teacher.config)
    except ValueError as error:  # wan.configs.load_config: bad JSON, unknown fields
        raise UserError(str(error), "fix the config JSON, or pass the release's own with --teacher.config") from None
    tokenizer = HuggingfaceTokenizer(folder / wan_config.t5_tokenizer, seq_len=wan_config.text_len, clean="whitespace")
    t5 = require_file(folder / wan_config.t5_checkpoint, "umT5 encoder checkpoint")
    vae = require_file(folder / wan_config.vae_checkpoint, "Wan2.1 VAE checkpoint")
    for sub, what in ((wan_config.high_noise_checkpoint, "high-noise expert"),
                      (wan_config.low_noise_checkpoint, "low-noise expert")):
        expert = folder / sub
        if not expert.is_dir():
            raise UserError(f"{what} folder not found: {expert}", RELEASE_HINT)
        DiTConfig.from_folder(expert)
        open_diffusers_weights(expert)
    for path, what in ((t5, "umT5 encoder checkpoint"), (vae, "Wan2.1 VAE checkpoint")):
        load_torch_file(path, what)  # memory-mapped: only the pickle is read (and never run)
    if cfg.student.max_text_len < wan_config.text_len:
        raise UserError(f"--student.max_text_len={cfg.student.max_text_len} is below the teacher's text_len "
                        f"{wan_config.text_len}", f"use --student.max_text_len {wan_config.text_len} or more")
    return wan_config, tokenizer


def warn_truncated_prompts(tokenizer, text_len: int, prompt_files) -> int:
    """Warn, naming file and line, about each prompt the tokenizer truncates to text_len; returns their number.

    prompt_files: [(path, [(line number, prompt), ...]), ...]. Only prompts that could be too long are
    tokenized: a prompt of c characters gives about c + 2 tokens at most (every piece covers a character
    or more; a leading word marker and </s> are added), and twice that leaves room for normalisation."""
    total = 0
    for path, lines in prompt_files:
        candidates = [(number, prompt) for number, prompt in lines if 2 * len(prompt) + 2 > text_len]
        if not candidates:
            continue
        counts = tokenizer.count_tokens([prompt for _, prompt in candidates])
        long = [(number, count) for (number, _), count in zip(candidates, counts) if count > text_len]
        for number, count in long[:_MAX_NAMED]:
            log.warning("%s line %d: the prompt has %d tokens; the teacher reads its first %d and </s> "
                        "(text_len %d, as upstream)", path, number, count, text_len - 1, text_len)
        if len(long) > _MAX_NAMED:
            log.warning("%s: %d more prompts are longer than text_len %d and truncated", path,
                        len(long) - _MAX_NAMED, text_len)
        total += len(long)
    return total


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def saved_run_config(workdir: Path) -> tuple[dict, int, Path] | None:
    """(config, step, where it was read) of the newest checkpoint in the workdir; None without checkpoints.

    The checkpoint's own copy of the config is read (orbax's JsonSave writes it as
    `<step>/config/metadata`), else the workdir's config.json."""
    folder = workdir / "checkpoints"
    steps = sorted((int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir()),
                   reverse=True) if folder.is_dir() else []
    if not steps:
        return None
    for path in (folder / str(steps[0]) / "config" / "metadata", workdir / "config.json"):
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(saved, dict):
            return saved, steps[0], path
    return None


def check_resume(cfg: Config) -> None:
    """A workdir with checkpoints resumes only with the student and objective its checkpoints hold."""
    if cfg.stage == "data":
        return  # the data stage does not touch checkpoints
    workdir = Path(cfg.workdir)
    found = saved_run_config(workdir)
    if found is None:
        return
    saved, step, source = found
    old = _flat({**saved, "student": saved_student_fields(saved.get("student", {}))})
    new = _flat(json.loads(json.dumps(config_lib.to_dict(cfg))))  # through JSON: tuples become lists
    differ = sorted(k for k in set(old) | set(new)
                    if any(k == key or k.startswith(key + ".") for key in RESUME_KEYS) and old.get(k) != new.get(k))
    if not differ:
        return
    named = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:_MAX_NAMED])
    more = f" and {len(differ) - _MAX_NAMED} more" if len(differ) > _MAX_NAMED else ""
    raise UserError(
        f"--workdir {workdir} holds checkpoints (latest step {step}) of a different student or objective: {named}{more}",
        f"pass a new --workdir for these settings, or the saved ones to resume (they are in {source})",
    )
