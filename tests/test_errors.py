"""The catalogue of user errors: each bad input ends `train.py` with `error: ...` (what is wrong, what
to do) in at most two lines, exit status 2 and no traceback; `--debug` shows the traceback instead.

Most cases fail in the preflight (distill/preflight.py) within a second, in-process, on the fast
random tiny teacher (tests/tiny_random_release.py). Three short real runs cover what only training
reaches: NaN teacher outputs under --train.nan_policy stop and skip, and a full disk during a
checkpoint write. The run lock (distill/runlock.py) is tested with a second process holding it.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest
import torch

import train as train_entry
from distill import config as config_lib
from distill import preflight
from distill.runlock import LOCK_NAME, RunLock, WorkdirBusy
from tests.tiny_random_release import PROMPTS, tiny_flags

REPO = Path(__file__).resolve().parents[1]
T5_FILE, VAE_FILE = "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth"
SHARD = "diffusion_pytorch_model-00002-of-00002.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
# the real runs: 2 steps, a checkpoint every step, evaluation and data as small as they go
FAST = ["--train.steps", "2", "--train.batch_size", "2", "--train.log_every", "1", "--train.eval_every", "2",
        "--train.sample_every", "0", "--ckpt.every", "1", "--data.samples_per_prompt", "1", "--data.gen_steps", "2",
        "--data.shard_size", "4", "--eval.num_noise", "1", "--eval.timesteps", "500"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def release(cache_dir) -> Path:
    return Path(tiny_flags(cache_dir)[1])


@pytest.fixture(scope="module")
def small_prompts(tmp_path_factory) -> tuple[Path, Path]:
    """4 training and 2 held-out prompts of the tiny teacher's vocabulary: little data to make."""
    lines = [p for p in PROMPTS.read_text().splitlines() if p.strip()]
    folder = tmp_path_factory.mktemp("prompts")
    (folder / "train.txt").write_text("\n".join(lines[:4]) + "\n")
    (folder / "eval.txt").write_text("\n".join(lines[4:6]) + "\n")
    return folder / "train.txt", folder / "eval.txt"


@pytest.fixture(autouse=True)
def _drop_run_log_handlers():
    """A run installs a stderr handler (logging.basicConfig): drop it after each test, else the next
    run's first log line goes to this test's closed capture stream."""
    yield
    for handler in [h for h in logging.root.handlers if type(h) is logging.StreamHandler]:
        logging.root.removeHandler(handler)


@dataclasses.dataclass
class Ctx:
    tmp: Path
    cache: Path
    release: Path
    prompts: tuple[Path, Path]
    monkeypatch: pytest.MonkeyPatch

    @property
    def workdir(self) -> Path:
        return self.tmp / "run"

    def flags(self, *extra, teacher: Path | None = None, workdir: Path | None = None) -> list[str]:
        return ["--workdir", str(workdir or self.workdir), "--data.cache_dir", str(self.cache),
                "--teacher_path", str(teacher or self.release), "--data.prompts", str(self.prompts[0]),
                "--data.eval_prompts", str(self.prompts[1]), *FAST, *extra]

    def broken_release(self, change) -> Path:
        """A copy of the tiny release (hard links: no bytes copied) with `change(folder)` applied;
        a changed file must be replaced (unlink, then write), never edited in place."""
        folder = self.tmp / "release"
        shutil.copytree(self.release, folder, copy_function=os.link)
        change(folder)
        return folder

    def text_file(self, name: str, content: bytes | str) -> Path:
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path


@pytest.fixture
def ctx(tmp_path, cache_dir, release, small_prompts, monkeypatch):
    return Ctx(tmp_path, cache_dir, release, small_prompts, monkeypatch)


def run_train(capsys, argv) -> tuple[int, str]:
    """train.py's main in this process: (exit status, stdout + stderr)."""
    code = train_entry.main(argv)
    out, err = capsys.readouterr()
    return code, out + err


def error_lines(text: str) -> list[str]:
    """The `error: ...` line and what follows it (the end of the output)."""
    lines = text.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert starts, f"no 'error: ' line in:\n{text[-2000:]}"
    return lines[starts[-1]:]


def assert_user_error(code: int, text: str, *expected: str) -> list[str]:
    """Exit status 2, no traceback, one or two `error:` lines holding every part of `expected`."""
    assert "Traceback" not in text, text[-3000:]
    assert code == 2, (code, text[-2000:])
    lines = error_lines(text)
    assert 1 <= len(lines) <= 2, lines
    for part in expected:
        assert part in "\n".join(lines), (part, lines)
    return lines


# ---------------------------------------------------------------- the catalogue

CASES = []


def case(*expected: str):
    """Register a bad input: `make(ctx)` returns train.py's argv; `expected`: the key parts of the message."""
    def register(make):
        CASES.append(pytest.param(make, expected, id=make.__name__))
        return make
    return register


# flags: tyro's parse errors (one or two lines instead of its box) and config.validate


@case("Error parsing --train.steps: invalid literal for int() with base 10: 'abc'", "expected --train.steps INT (default: 2000)")
def flag_not_an_int(ctx):
    return ctx.flags("--train.steps", "abc")


@case("Unrecognized options: --optim.lrr", "did you mean --optim.lr?")
def unknown_flag(ctx):
    return ctx.flags("--optim.lrr", "1e-4")


@case("invalid choice 'maybe' for argument '--train.nan_policy'")
def flag_not_a_choice(ctx):
    return ctx.flags("--train.nan_policy", "maybe")


@case("Missing value for argument '--train.steps'")
def flag_without_value(ctx):
    return ctx.flags("--train.steps")


@case("Error parsing --teacher.guide_scale", "expected --teacher.guide_scale {None}|{FLOAT FLOAT}")
def flag_with_three_values_for_two(ctx):
    return ctx.flags("--teacher.guide_scale", "1", "2", "3")


@case("hidden_size=64 must be divisible by num_heads=3")
def student_heads_do_not_divide_width(ctx):
    return ctx.flags("--student.num_heads", "3")


@case("OptimConfig: lr must be > 0, got -1.0")
def negative_learning_rate(ctx):
    return ctx.flags("--optim.lr=-1")


@case("--data.height=72 must be a positive multiple of 16 (VAE stride 8 x patch 2); try 64")
def resolution_not_divisible_by_16(ctx):
    return ctx.flags("--data.height", "72")


@case("--train.steps must be >= 1, got 0")
def zero_steps(ctx):
    return ctx.flags("--train.steps", "0")


@case("--train.eval_every must be >= 1, got 0")
def zero_eval_period(ctx):
    return ctx.flags("--train.eval_every", "0")


@case("--teacher.fp8_scaling tensor only changes the FP8 teacher: add --teacher.fp8, or drop it")
def fp8_scaling_without_fp8(ctx):
    return ctx.flags("--teacher.fp8_scaling", "tensor")


@case("--teacher.fp8_scaling tensor and --teacher.no_fp8_fast_accum only change the FP8 teacher: add --teacher.fp8, "
      "or drop them")
def fp8_recipe_without_fp8(ctx):
    return ctx.flags("--teacher.fp8_scaling", "tensor", "--teacher.no_fp8_fast_accum")


@case("--train.jax_memory_fraction must be in (0, 1), got 1.5")
def memory_fraction_above_one(ctx):
    return ctx.flags("--train.jax_memory_fraction", "1.5")


@case("--eval.timesteps must be one or more timesteps in [0, 1000], got [1200.0]")
def timestep_out_of_range(ctx):
    return ctx.flags("--eval.timesteps", "1200")


@case("argument --preset: invalid choice: 'huge' (choose from 'a14b', 'tiny')")
def unknown_preset(ctx):
    return ["--preset", "huge", *ctx.flags()]


@case("the a14b preset needs --teacher_path /path/to/Wan2.2-T2V-A14B")
def a14b_without_teacher(ctx):
    return ["--preset", "a14b", "--workdir", str(ctx.workdir)]


# the process grid


@case("--train.batch_size=2 must be divisible by the number of processes (3)")
def batch_not_divisible_by_world(ctx):
    from distill import loop

    real = loop.runtime

    def three_ranks(cfg):  # the real single-process grid, seen as one of 3 ranks
        rt = real(cfg)
        ctx.monkeypatch.setattr(rt, "world_size", 3)
        return rt

    ctx.monkeypatch.setattr(loop, "runtime", three_ranks)
    return ctx.flags()


@case("sequence-parallel size 2 must be a positive divisor of the number of processes (1)")
def sequence_parallel_larger_than_world(ctx):
    return ctx.flags("--teacher.sp", "2")


@case("inconsistent launch environment: RANK set but WORLD_SIZE, LOCAL_RANK not")
def half_a_torchrun_environment(ctx):
    ctx.monkeypatch.setenv("RANK", "0")
    ctx.monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx.monkeypatch.delenv("LOCAL_RANK", raising=False)
    return ctx.flags()


# workdir and cache folder


@case("--workdir", "run is a file, not a folder", "pass a folder to --workdir")
def workdir_is_a_file(ctx):
    ctx.text_file("run", "not a folder")
    return ctx.flags()


@case("--workdir", "file.txt/run lies inside", "file.txt, which is a file, not a folder")
def workdir_inside_a_file(ctx):
    ctx.text_file("file.txt", "x")
    return ctx.flags(workdir=ctx.tmp / "file.txt" / "run")


@case("cannot write into --workdir", "Permission denied", "choose a --workdir you can write to")
def workdir_not_writable(ctx):
    # we run as root, where permissions do not stop writes: the lock file's creation is refused instead
    real_open = os.open

    def refuse(path, flags, *args, **kwargs):
        if str(path).endswith(LOCK_NAME):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    ctx.monkeypatch.setattr(os, "open", refuse)
    return ctx.flags()


@case("--data.cache_dir", "cache is a file, not a folder")
def cache_dir_is_a_file(ctx):
    return ctx.flags("--data.cache_dir", str(ctx.text_file("cache", "x")))


@case("cannot write into --data.cache_dir", "cache_ro: Permission denied")
def cache_dir_not_writable(ctx):
    real_mkstemp = tempfile.mkstemp
    cache = ctx.tmp / "cache_ro"

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == cache:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    ctx.monkeypatch.setattr(tempfile, "mkstemp", refuse)
    return ctx.flags("--data.cache_dir", str(cache))


# prompt files


@case("prompt file not found: ", "nope.txt", "pass an existing file to --data.prompts")
def prompt_file_missing(ctx):
    return ctx.flags("--data.prompts", str(ctx.tmp / "nope.txt"))


@case("empty.txt holds no prompts", "write one prompt per line")
def prompt_file_empty(ctx):
    return ctx.flags("--data.prompts", str(ctx.text_file("empty.txt", "\n   \n\n")))


@case("latin1.txt is not UTF-8 text: byte 0xe9 at line 2, column 11", "save it as UTF-8")
def prompt_file_not_utf8(ctx):
    return ctx.flags("--data.prompts", str(ctx.text_file("latin1.txt", "a red square\na blue caf\xe9\n".encode("latin-1"))))


@case("holds a NUL byte at line 1: it is not a text file")
def prompt_file_binary(ctx):
    return ctx.flags("--data.prompts", str(ctx.text_file("binary.txt", b"\x00\x01\x02 red")))


@case("huge.txt is 101 MB, over the limit of 100 MB", "at most 1,000,000 prompts per file")
def prompt_file_huge(ctx):
    path = ctx.tmp / "huge.txt"
    with open(path, "wb") as f:
        f.truncate(101 * 2**20)  # sparse: nothing is written, the size alone is refused
    return ctx.flags("--data.prompts", str(path))


@case("holds 1,000,001 prompts, over the limit of 1,000,000")
def prompt_file_too_many_prompts(ctx):
    return ctx.flags("--data.prompts", str(ctx.text_file("many.txt", "a red square\n" * 1_000_001)))


@case("eval prompt file", "is not a file", "--data.eval_prompts")
def eval_prompt_file_is_a_folder(ctx):
    return ctx.flags("--data.eval_prompts", str(ctx.tmp))


@case("--data.image_dir", "no_images is not a folder")
def image_folder_missing(ctx):
    return ctx.flags("--data.source", "images", "--data.image_dir", str(ctx.tmp / "no_images"))


# the teacher's release folder


@case("--teacher_path", "no_release does not exist", "Wan2.2-T2V-A14B release folder")
def teacher_folder_missing(ctx):
    return ctx.flags(teacher=ctx.tmp / "no_release")


@case("Wan2.1 VAE checkpoint not found: ", VAE_FILE)
def teacher_without_vae(ctx):
    return ctx.flags(teacher=ctx.broken_release(lambda f: (f / VAE_FILE).unlink()))


@case("tokenizer folder not found: ", "umt5-xxl", "nothing is downloaded")
def teacher_without_tokenizer(ctx):
    return ctx.flags(teacher=ctx.broken_release(lambda f: shutil.rmtree(f / "google")))


@case("could not read safetensors file", SHARD, "truncated or corrupt; download it again")
def teacher_with_truncated_shard(ctx):
    def truncate(folder):
        shard = folder / "low_noise_model" / SHARD
        data = shard.read_bytes()
        shard.unlink()
        shard.write_bytes(data[: len(data) // 2])

    return ctx.flags(teacher=ctx.broken_release(truncate))


@case("'../x.safetensors' listed in the index of", "points outside that folder; refusing to read it")
def teacher_index_points_outside(ctx):
    def escape(folder):
        index = folder / "high_noise_model" / INDEX
        data = json.loads(index.read_text())
        data["weight_map"] = {k: "../x.safetensors" for k in data["weight_map"]}
        index.unlink()
        index.write_text(json.dumps(data))

    return ctx.flags(teacher=ctx.broken_release(escape))


class _Payload:
    """A pickle that would run code when loaded without weights_only (it would make a folder)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@case(T5_FILE, "is not a plain state dict of tensors: torch.load(weights_only=True) refused it", "nothing in it was run",
      "Re-save it as a dict of tensors")
def teacher_pth_with_code(ctx):
    def poison(folder):
        (folder / T5_FILE).unlink()
        torch.save({"token_embedding.weight": torch.zeros(2, 2), "x": _Payload(ctx.tmp / "pwned")}, folder / T5_FILE)

    return ctx.flags(teacher=ctx.broken_release(poison))


@case(VAE_FILE, "is not a state dict of tensors: 'shared_pos' holds a list")
def teacher_pth_not_only_tensors(ctx):
    def listy(folder):
        (folder / VAE_FILE).unlink()
        torch.save({"conv1.weight": torch.zeros(2), "shared_pos": [1, 2]}, folder / VAE_FILE)

    return ctx.flags(teacher=ctx.broken_release(listy))


@case("--teacher.config", "config_t2v.json not found")
def teacher_config_missing(ctx):
    return ctx.flags("--teacher.config", str(ctx.tmp / "config_t2v.json"))


@case("--student.max_text_len=16 is below the teacher's text_len 32")
def student_text_shorter_than_teacher(ctx):
    return ctx.flags("--student.max_text_len", "16")


# resuming a workdir with other settings


def _fake_checkpoint(ctx, **changes) -> None:
    """A workdir whose step-4 checkpoint holds the config of `ctx.flags()` with `changes` (what
    orbax's JsonSave writes: <step>/config/metadata; a real one is checked in test_nan_stop)."""
    saved = config_lib.to_dict(config_lib.parse(ctx.flags()))
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        saved[section][key] = value
    folder = ctx.workdir / "checkpoints" / "4" / "config"
    folder.mkdir(parents=True)
    (folder / "metadata").write_text(json.dumps(saved))


@case("of a different student or objective: student.depth 3 -> 2")
def resume_with_another_student(ctx):
    _fake_checkpoint(ctx, **{"student.depth": 3})
    return ctx.flags()


@case("of a different student or objective: train.loss 'velocity' -> 'cfg'")
def resume_with_another_objective(ctx):
    _fake_checkpoint(ctx, **{"train.loss": "velocity"})
    return ctx.flags()


@pytest.mark.parametrize("make, expected", CASES)
def test_user_error(ctx, capsys, make, expected):
    code, text = run_train(capsys, make(ctx))
    assert_user_error(code, text, *expected)
    assert not (ctx.tmp / "pwned").exists()  # the pickle's code never ran
    assert not (ctx.workdir / LOCK_NAME).exists()  # released on the error path (or never taken)


def test_catalogue_size():
    assert len(CASES) >= 30, len(CASES)


def test_debug_shows_the_traceback(ctx, capsys):
    ctx.text_file("run", "not a folder")
    code, text = run_train(capsys, ["--debug", *ctx.flags()])
    assert code == 2 and "Traceback (most recent call last)" in text and "raise UserError(" in text
    assert error_lines(text)[0].endswith("run is a file, not a folder")
    code, text = run_train(capsys, ["--debug", *ctx.flags("--train.steps", "0")])
    assert code == 2 and "Traceback" in text and "SystemExit: error: --train.steps must be >= 1, got 0" in text


def test_cli_exit_status_and_output():
    """The real command line: status 2 and exactly the error's lines on stderr."""
    out = subprocess.run([sys.executable, str(REPO / "train.py"), "--train.steps", "0"], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert (out.returncode, out.stdout, out.stderr) == (2, "", "error: --train.steps must be >= 1, got 0\n")


def test_long_prompt_is_truncated_with_a_warning(ctx, caplog):
    """A 10k-character prompt is no error: the tokenizer keeps its first text_len - 1 tokens and </s>
    (as upstream), and the preflight names its line and token count."""
    from wan.modules.tokenizers import HuggingfaceTokenizer

    long = ("a small red square " * 600).strip()  # 11k characters, 2400 words of the tiny vocabulary
    prompts = ctx.text_file("long.txt", f"a red square\na blue circle\n{long}\n")
    cfg = config_lib.parse(ctx.flags("--data.prompts", str(prompts)))
    with caplog.at_level(logging.WARNING, logger="distill"):
        preflight.check_inputs(cfg, types.SimpleNamespace(world_size=1))
    warnings = [r.getMessage() for r in caplog.records if "tokens" in r.getMessage()]
    assert warnings == [f"{prompts} line 3: the prompt has 2401 tokens; the teacher reads its first 31 and </s> "
                        "(text_len 32, as upstream)"]
    tokenizer = HuggingfaceTokenizer(ctx.release / "google" / "umt5-xxl", seq_len=32, clean="whitespace")
    ids = tokenizer(long)
    assert ids.shape == (1, 32) and ids[0, -1].item() == tokenizer.eos_id


# ---------------------------------------------------------------- the run lock


def test_second_run_in_a_locked_workdir_is_refused(ctx, capsys):
    ctx.workdir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from distill.runlock import RunLock; RunLock.acquire(sys.argv[1]); "
         "print('locked', flush=True); time.sleep(120)", str(ctx.workdir)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, text = run_train(capsys, ctx.flags())
        lines = assert_user_error(code, text, f"is in use by another run: pid {holder.pid} on host "
                                              f"{socket.gethostname()} since ")
        assert lines[1].strip() == "wait for it to finish, or pass a different --workdir"
        assert (ctx.workdir / LOCK_NAME).exists()  # the holder's lock is left alone
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: the lock is stale now and the next run takes it over
    lock = RunLock.acquire(ctx.workdir)
    assert (f"WARNING distill.runlock: took over the stale run lock {ctx.workdir / LOCK_NAME} of pid {holder.pid} "
            f"on host {socket.gethostname()}") in capsys.readouterr().err  # (the run's log handler)
    assert json.loads((ctx.workdir / LOCK_NAME).read_text())["pid"] == os.getpid()
    with pytest.raises(WorkdirBusy, match=f"pid {os.getpid()}"):
        RunLock.acquire(ctx.workdir)  # held by a live process (this one)
    lock.release()
    assert not (ctx.workdir / LOCK_NAME).exists()


def test_lock_is_taken_by_exactly_one_of_runs_starting_together(tmp_path):
    # the winner holds the lock until every racer has tried (a lock whose holder exited is stale)
    racer = ("import sys, time; from distill.runlock import RunLock, WorkdirBusy\n"
             "try:\n    RunLock.acquire(sys.argv[1]); print('got it', flush=True); time.sleep(4)\n"
             "except WorkdirBusy as e:\n    print('busy')")
    racers = [subprocess.Popen([sys.executable, "-c", racer, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
              for _ in range(4)]
    results = sorted(p.communicate(timeout=60)[0].strip() for p in racers)
    assert results == ["busy", "busy", "busy", "got it"]


def test_lock_of_another_host_is_never_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps(dict(pid=1, host="elsewhere", started="2026-12-01T10:00:00+00:00",
                                                      command="python train.py", token="t")))
    with pytest.raises(WorkdirBusy, match="if that run is gone, delete"):
        RunLock.acquire(tmp_path)


# ---------------------------------------------------------------- what only training reaches


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """XLA's persistent compilation cache for the real runs below: the student step compiles once."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.reset_cache()  # checked again at the next compile, with the settings above
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def _teacher_nan_at(monkeypatch, call: int, then=None) -> None:
    from distill.teacher import Teacher

    original, calls = Teacher.group_targets, {"n": 0}

    def targets(self, latents, *args, **kwargs):
        calls["n"] += 1
        out = original(self, latents, *args, **kwargs)
        if calls["n"] == call:
            out[0] = torch.full_like(out[0], float("nan"))
        if then is not None:
            then(calls["n"])
        return out

    monkeypatch.setattr(Teacher, "group_targets", targets)


def test_nan_stop_keeps_the_last_checkpoint(ctx, capsys, compile_cache):
    """nan_policy=stop: a clean error at the NaN step; the checkpoint of the step before is kept and
    the lock released. Then a resume with another student is refused from that real checkpoint."""
    _teacher_nan_at(ctx.monkeypatch, call=2)  # step index 1: step 1 is saved, step 2 never is
    code, text = run_train(capsys, ctx.flags("--train.nan_policy", "stop"))
    assert_user_error(code, text, "non-finite teacher output or loss at step 1; stopping (--train.nan_policy=stop)")
    assert sorted(p.name for p in (ctx.workdir / "checkpoints").iterdir()) == ["1"]
    assert not (ctx.workdir / LOCK_NAME).exists()
    saved, step, source = preflight.saved_run_config(ctx.workdir)
    assert (step, source.name, saved["train"]["nan_policy"]) == (1, "metadata", "stop")  # orbax's own copy
    code, text = run_train(capsys, ctx.flags("--student.hidden_size", "32"))
    assert_user_error(code, text, "holds checkpoints (latest step 1) of a different student or objective: "
                                  "student.hidden_size 64 -> 32")


def test_nan_skip_continues_and_counts(ctx, capsys, compile_cache):
    """nan_policy=skip: the NaN step is skipped and counted, the run goes on; a SIGTERM in the last
    step ends it cleanly (checkpoint saved), and the lock is released on that path too."""
    import signal

    from distill.metrics import read_metrics

    def sigterm_in_step_2(n):
        if n == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    _teacher_nan_at(ctx.monkeypatch, call=1, then=sigterm_in_step_2)
    code, text = run_train(capsys, ctx.flags("--train.steps", "3"))
    assert code == 0 and "Traceback" not in text, text[-3000:]
    assert [m["skipped"] for m in read_metrics(ctx.workdir) if "skipped" in m] == [1.0, 0.0]
    assert "SIGTERM received: saving a checkpoint at step 2 and exiting" in text
    assert (ctx.workdir / "checkpoints" / "2").is_dir()
    assert not (ctx.workdir / LOCK_NAME).exists()


def test_disk_full_during_checkpoint_write(ctx, capsys, compile_cache):
    """ENOSPC while orbax writes step 2 (the async default): a clean error naming the kept checkpoint;
    the half-written step is removed, step 1 stays restorable, the lock is released."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch

    from student_jax.checkpoint import Checkpointer

    original, calls = jch.JsonCheckpointHandler._save_fn, {"n": 0}

    async def full_disk(self, item, directory):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(directory / "metadata"))
        return await original(self, item, directory)

    ctx.monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", full_disk)
    code, text = run_train(capsys, ctx.flags())
    lines = assert_user_error(code, text, "no space left on device while writing ")
    assert f"the checkpoints in {ctx.workdir / 'checkpoints'} are kept (latest: step 1)" in lines[0]
    assert "free some space" in lines[1]
    assert sorted(p.name for p in (ctx.workdir / "checkpoints").iterdir()) == ["1"]
    checkpointer = Checkpointer(ctx.workdir / "checkpoints")
    assert checkpointer.latest_step() == 1
    checkpointer.close()
    assert not (ctx.workdir / LOCK_NAME).exists()
