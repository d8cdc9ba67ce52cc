"""Faults: SIGKILL at random moments (benchmarks/fault_injection.py) resumes bitwise; a rank killed under
torchrun ends the run with a clear message and a restart resumes from the last checkpoint; the SIGTERM
watchdog sees a SIGTERM the main thread cannot handle."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from distill.distiller import SigtermWatchdog
from distill.metrics import read_metrics
from tests.ports import free_port_pair
from tests.tiny_random_release import tiny_flags

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


# ---------------------------------------------------------------- SIGKILL at random moments


@pytest.mark.slow
def test_fault_injection_three_kills_resume_bitwise(tmp_path):
    """3 SIGKILLs (in the data stage; mid-step after a checkpoint, so the restart resumes from it; mid-write
    of the next checkpoint) and restarts: every resume point, every checkpoint seen and the final state
    equal the uninterrupted run's bitwise, nothing unreadable, nothing half-written left."""
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fault_injection.py"), "--aims",
                          "data,step,checkpoint", "--steps", "20", "--ckpt-every", "5", "--seed", "0",
                          "--root", str(tmp_path / "fi")], capture_output=True, text=True, timeout=600, cwd=REPO)
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert lines, out.stdout[-2000:] + out.stderr[-3000:]
    figure = lines[-1]
    assert figure["figure"] == "fault_injection"
    assert figure["kills"] == 3 and figure["resumed_bitwise"] == 3, figure
    assert max(figure["resume_steps"]) >= 5, figure  # a restart really restored a checkpoint
    assert figure["final_bitwise"] and figure["unreadable_checkpoints"] == 0, figure
    seen, total = map(int, figure["checkpoints_bitwise"].split("/"))
    assert seen == total > 0, figure
    assert figure["leftover_tmp_dirs"] == 0 and figure["resume_log_mismatches"] == 0, figure
    assert out.returncode == 0, out.stderr[-3000:]


# ---------------------------------------------------------------- the SIGTERM watchdog


def test_sigterm_watchdog_exits_when_the_checkpoint_does_not_come(tmp_path, caplog):
    """SIGTERM reaches the watchdog through the wakeup fd (no stop flag here, as when the main thread is
    stuck in a collective); `grace_s` later it logs the step it was in and the checkpoint a restart
    resumes from (the newest committed one, not the half-written one) and exits with status 1."""
    checkpoints = tmp_path / "checkpoints"
    for name in ("5", "10", "15.orbax-checkpoint-tmp"):
        (checkpoints / name).mkdir(parents=True)
    exited = []
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a Python handler that does nothing
    try:
        with caplog.at_level(logging.ERROR, logger="distill"):
            watchdog = SigtermWatchdog(1, checkpoints, grace_s=0.3, exit=exited.append)
            watchdog.where = "in training step 17"
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 10
            while not exited and time.monotonic() < deadline:
                time.sleep(0.05)
            watchdog.close()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exited == [1]
    message = caplog.text
    assert "rank 1: SIGTERM" in message and "still in training step 17" in message
    assert "a restart resumes from step 10" in message


def test_sigterm_watchdog_stands_down_when_the_run_ends_in_time(tmp_path):
    exited = []
    stop = type("Stop", (), {"requested": None})()
    watchdog = SigtermWatchdog(0, tmp_path / "checkpoints", stop, grace_s=0.5, exit=exited.append)
    stop.requested = "SIGTERM"  # the loop's flag: the main thread handled the signal itself
    time.sleep(0.1)
    watchdog.close()  # the checkpoint is on disk and the run ended
    time.sleep(1.0)
    assert exited == []
    assert not any(t.name == "sigterm-watchdog" for t in threading.enumerate())


# ---------------------------------------------------------------- a rank dies under torchrun


def _workers(parent: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (its children, read from /proc)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        ranks = [v[len(b"RANK="):] for v in env if v.startswith(b"RANK=")]
        if ranks:
            out[int(ranks[0])] = int(entry.name)
    return out


def _committed(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _logged_steps(workdir: Path) -> list[int]:
    return [m["step"] for m in read_metrics(workdir) if "loss" in m]


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_rank_death_under_torchrun(tmp_path, cache_dir, victim):
    """SIGKILL one of 2 ranks mid-training. Rank 1 dying: rank 0 blocks in the step's all-reduce (or gloo
    reports the reset and rank 0 blocks in the process group's shutdown); torchrun SIGTERMs it at once and
    the watchdog ends it 20 s later with a clear line (before torchrun's SIGKILL at 30 s). Or, seen once
    on a loaded machine, gloo's error reaches rank 0 first: it leaves the step, its SIGTERM handler is
    already stood down when torchrun's SIGTERM comes, and it ends at once (exit -15). Rank 0 dying: JAX's coordination service (hosted by rank 0) is gone and rank 1 aborts at
    once. Either way torchrun exits non-zero naming the killed rank, and the same command resumes from
    the last committed checkpoint and recomputes the steps after it exactly."""
    workdir = tmp_path / "run"
    cmd = lambda port: [  # noqa: E731
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
        str(REPO / "train.py"), "--workdir", str(workdir), "--data.cache_dir", str(cache_dir), *tiny_flags(cache_dir),
        "--train.steps", "16", "--train.batch_size", "4", "--train.log_every", "1", "--train.eval_every", "100",
        "--train.sample_every", "0", "--ckpt.every", "5"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log_path = tmp_path / "killed.log"
    with log_path.open("w") as log:
        run = subprocess.Popen(cmd(free_port_pair()), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while run.poll() is None and max(_logged_steps(workdir), default=0) < 7:
            assert time.monotonic() < deadline, "the run did not reach step 7"
            time.sleep(0.05)
        assert run.poll() is None, log_path.read_text()[-3000:]
        workers = _workers(run.pid)
        assert set(workers) == {0, 1}, workers
        killed_at = time.monotonic()
        os.kill(workers[victim], signal.SIGKILL)
        run.wait(timeout=60)
        took = time.monotonic() - killed_at
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    output = log_path.read_text()
    assert run.returncode != 0
    root_cause = output.partition("Root Cause (first observed failure)")[2]
    assert f"rank      : {victim} " in root_cause and "SIGKILL" in root_cause, output[-3000:]
    if victim == 1 and "rank 0: SIGTERM 20 s ago and still " in output:
        # blocked in the step's all-reduce, or (gloo saw the reset) in the process group's shutdown
        assert "a restart resumes from " in output
        assert 19 < took < 29, (took, output[-3000:])  # the watchdog, not torchrun's SIGKILL at 30 s
    elif victim == 1:  # rank 0 had left the step on gloo's error when torchrun's SIGTERM came
        assert "rank      : 0 (local_rank: 0)\n  exitcode  : -15" in output, output[-3000:]
        assert took < 15, (took, output[-3000:])
    else:
        assert "JAX distributed service detected fatal errors" in output, output[-3000:]
        assert took < 15, (took, output[-3000:])
    # step 5's checkpoint is written asynchronously: committed by now, unless the kill beat its commit
    resume = max(_committed(workdir), default=0)
    before = {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}

    restart = subprocess.run(cmd(free_port_pair()), cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert restart.returncode == 0, restart.stderr[-3000:]
    assert resume == 0 or f"resumed from {workdir / 'checkpoints'} at step {resume}" in restart.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["start_step"] == resume and summary["final_step"] == 16
    again = [m for m in read_metrics(workdir) if "loss" in m][len(before):]
    redone = {m["step"]: m["loss"] for m in again if m["step"] in before}
    assert redone and all(redone[s] == before[s] for s in redone), (redone, before)  # recomputed exactly
