"""The trainer end to end on the tiny preset: learning, resume, SIGTERM, NaN policy, flags, bad input,
and a 2-process torchrun run on CPU against the single-process loss curve."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
import torch

from distill import config as config_lib
from distill.data import DataError
from distill.loop import TrainingError, train
from distill.metrics import read_metrics
from distill.teacher import Teacher

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One cache (tiny teacher, embeddings, x0 latents) shared by the runs of this module."""
    return tmp_path_factory.mktemp("cache")


def _cfg(workdir, cache_dir, *flags) -> config_lib.Config:
    return config_lib.parse([
        "--workdir", str(workdir), "--data.cache_dir", str(cache_dir), "--train.log_every", "1",
        "--train.eval_every", "4", "--train.sample_every", "0", "--ckpt.every", "4", "--ckpt.no_async_save",
        *flags,
    ])


def _params(state):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(state.params))


def test_tiny_default_learns(tmp_path, cache_dir):
    """Loss and held-out velocity error fall; metrics, TensorBoard, grid, config and checkpoint written."""
    cfg = _cfg(tmp_path / "run", cache_dir, "--train.steps", "60", "--train.eval_every", "30",
               "--train.sample_every", "60", "--train.log_every", "10")
    summary = train(cfg)
    assert summary["final_step"] == 60
    assert summary["last_loss"] < 0.9 * summary["first_loss"]
    first, last = summary["first_eval"]["eval/rel_velocity_error"], summary["last_eval"]["eval/rel_velocity_error"]
    assert last < first - 0.05, (first, last)
    run = tmp_path / "run"
    metrics = read_metrics(run)
    assert {"loss", "grad_norm", "lr", "samples_per_s", "skipped"} <= set(metrics[1])
    assert any("eval/rel_velocity_error_ema" in m for m in metrics)
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "samples" / "step_0000060.png").is_file()
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 60
    assert (run / "checkpoints" / "60").is_dir()


def test_sigterm_saves_and_resume_is_bitwise(tmp_path, cache_dir, monkeypatch):
    """Uninterrupted 0->8 equals: SIGTERM at step 4 (checkpoint saved, clean exit), then resume 4->8."""
    straight = train(_cfg(tmp_path / "a", cache_dir, "--train.steps", "8"))

    calls = {"n": 0}
    original = Teacher.targets

    def targets_then_sigterm(self, latents, *args, **kwargs):
        calls["n"] += len(latents) == 8  # training batches only (the held-out set goes in chunks of 16)
        if calls["n"] == 4 and len(latents) == 8:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, latents, *args, **kwargs)

    monkeypatch.setattr(Teacher, "targets", targets_then_sigterm)
    interrupted = train(_cfg(tmp_path / "b", cache_dir, "--train.steps", "8"))
    assert interrupted["interrupted"] == "SIGTERM"
    assert interrupted["final_step"] == 4
    assert (tmp_path / "b" / "checkpoints" / "4").is_dir()
    monkeypatch.setattr(Teacher, "targets", original)

    resumed = train(_cfg(tmp_path / "b", cache_dir, "--train.steps", "8"))
    assert resumed["start_step"] == 4 and resumed["final_step"] == 8
    a, b = _params(straight["state"]), _params(resumed["state"])
    chex.assert_trees_all_equal(a, b)  # bitwise on CPU
    losses_a = [m["loss"] for m in read_metrics(tmp_path / "a") if "loss" in m]
    losses_b = [m["loss"] for m in read_metrics(tmp_path / "b") if "loss" in m]
    assert losses_a == losses_b


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nan_from_teacher(tmp_path, cache_dir, monkeypatch, policy):
    original = Teacher.targets
    calls = {"n": 0}

    def nan_at_step_3(self, latents, *args, **kwargs):
        calls["n"] += len(latents) == 8  # training batches only
        out = original(self, latents, *args, **kwargs)
        if calls["n"] == 3 and len(latents) == 8:
            out[0] = torch.full_like(out[0], float("nan"))
        return out

    monkeypatch.setattr(Teacher, "targets", nan_at_step_3)
    cfg = _cfg(tmp_path / policy, cache_dir, "--train.steps", "5", "--train.nan_policy", policy)
    if policy == "stop":
        with pytest.raises(TrainingError, match="non-finite teacher output or loss at step 2"):
            train(cfg)
        return
    summary = train(cfg)
    skipped = [m["skipped"] for m in read_metrics(tmp_path / policy) if "skipped" in m]
    assert skipped == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert np.isfinite(summary["last_loss"])
    for leaf in jax.tree_util.tree_leaves(_params(summary["state"])):
        assert np.isfinite(leaf).all()


def test_student_with_4_channels_and_velocity_loss(tmp_path, cache_dir):
    """The seed's [B, 4, H, W] student: projected to the 16-channel teacher space; plain velocity loss."""
    cfg = _cfg(tmp_path / "c4", cache_dir, "--train.steps", "3", "--student.latent_channels", "4",
               "--train.loss", "velocity", "--train.sample_every", "3")
    summary = train(cfg)
    assert summary["final_step"] == 3
    from student_jax.model import Student

    x = np.zeros((2, 4, 8, 8), np.float32)
    out = Student(cfg.student).apply({"params": summary["state"].params}, x, np.full((2,), 500.0, np.float32),
                                     np.zeros((2, 32, 4096), np.float32), np.ones((2, 32), bool))
    chex.assert_shape(out, (2, 4, 8, 8))
    assert (tmp_path / "c4" / "samples" / "step_0000003.png").is_file()


# ---------------------------------------------------------------- flags and bad input


def test_flags_overrides_aliases_and_presets():
    cfg = config_lib.parse(["--student.latent_channels=4", "--optim.lr", "3e-4", "--teacher_path", "/x",
                            "--teacher_dtype", "float32", "--teacher_on_cpu", "--teacher_device_strategy", "cpu"])
    assert cfg.student.latent_channels == 4 and cfg.optim.lr == 3e-4
    assert (cfg.teacher.path, cfg.teacher.dtype, cfg.teacher.on_cpu, cfg.teacher.device_strategy) == ("/x", "float32", True, "cpu")
    a14b = config_lib.parse(["--preset", "a14b", "--teacher_path", "/data/wan"])
    assert a14b.student.hidden_size > 256 and a14b.data.height == 1024
    small = config_lib.parse(["--student_preset", "small", "--student.depth", "3"])
    assert small.student.depth == 3 and small.student.hidden_size == config_lib.student_preset("small").hidden_size


def test_every_preset_builds():
    from student_jax.state import abstract_train_state, param_count

    for name, preset in config_lib.PRESETS.items():
        cfg = preset()
        state = abstract_train_state(cfg.student, cfg.optim, (cfg.data.height // 8, cfg.data.width // 8), 32)
        assert param_count(state.params) > 0, name


def _run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_unknown_flag_names_closest_key():
    out = _run_cli("--optim.lrr", "1e-4")
    assert out.returncode != 0
    assert "--optim.lr" in out.stdout + out.stderr


def test_help_lists_every_option():
    out = _run_cli("--help")
    assert out.returncode == 0
    for flag in ("--train.steps", "--workdir", "--student.latent_channels", "--optim.lr", "--teacher_path",
                 "--teacher_device_strategy", "--teacher_dtype", "--teacher_on_cpu", "--ckpt.keep"):
        assert flag in out.stdout, flag
    assert "(default: 2000)" in out.stdout  # --train.steps of the tiny preset


def test_bad_resolution_and_shapes():
    with pytest.raises(SystemExit, match=r"--data.height=72 must be a positive multiple of 16"):
        config_lib.parse(["--data.height", "72"])
    with pytest.raises(SystemExit, match="teacher_channels must be 16"):
        config_lib.parse(["--student.teacher_channels", "8"])
    with pytest.raises(SystemExit, match="a14b preset needs --teacher_path"):
        config_lib.parse(["--preset", "a14b"])
    with pytest.raises(SystemExit, match=r"must be divisible by --student.patch_size=3"):
        config_lib.parse(["--student.patch_size", "3"])
    with pytest.raises(SystemExit, match="balanced .* is not supported yet"):
        config_lib.parse(["--teacher_device_strategy", "balanced"])


def test_image_folder_source(tmp_path, cache_dir):
    """x0 from an image folder (captions beside the images) encoded by the Wan VAE."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a red square", "a blue circle", "green stripes"]):
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(images / f"img{i}.png")
        (images / f"img{i}.txt").write_text(caption)
    summary = train(_cfg(tmp_path / "img", cache_dir, "--train.steps", "2", "--data.source", "images",
                         "--data.image_dir", str(images)))
    assert summary["final_step"] == 2
    (images / "img0.txt").unlink()
    with pytest.raises(DataError, match="has no caption file img0.txt"):
        train(_cfg(tmp_path / "img2", cache_dir, "--data.source", "images", "--data.image_dir", str(images)))


def test_empty_prompt_file(tmp_path, cache_dir):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="holds no prompts"):
        train(_cfg(tmp_path / "e", cache_dir, "--data.prompts", str(empty)))
    with pytest.raises(DataError, match="prompt file not found"):
        train(_cfg(tmp_path / "e", cache_dir, "--data.prompts", str(tmp_path / "nope.txt")))


# ---------------------------------------------------------------- 2 processes on CPU (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_matches_single(tmp_path, cache_dir):
    flags = ["--data.cache_dir", str(cache_dir), "--train.steps", "6", "--train.batch_size", "4",
             "--train.log_every", "1", "--train.eval_every", "6", "--train.sample_every", "0",
             "--ckpt.no_async_save"]
    single = _run_cli("--workdir", str(tmp_path / "one"), *flags, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    double = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
         str(REPO / "train.py"), "--workdir", str(tmp_path / "two"), *flags],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
    )
    assert double.returncode == 0, double.stderr[-3000:]
    one = [m["loss"] for m in read_metrics(tmp_path / "one") if "loss" in m]
    two = [m["loss"] for m in read_metrics(tmp_path / "two") if "loss" in m]
    assert len(one) == len(two) == 6
    np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-5)
    assert (tmp_path / "two" / "checkpoints" / "6").is_dir()
