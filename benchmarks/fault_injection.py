"""Fault injection: SIGKILL a tiny training run at N random moments, restart it each time, and check
that it ends bitwise where an uninterrupted run ends, with every checkpoint it leaves readable.

The run is `train.py` on the fast random tiny teacher of the tests (`tests/tiny_random_release.py`),
from an empty cache (so the data stage runs too), a few steps with frequent asynchronous
checkpoints (`--train.steps 60 --ckpt.every 10`, keep 3). First one uninterrupted reference run
(keeping every checkpoint), then the faulty run: each incarnation is killed with SIGKILL (the whole
process, no handler runs) at a moment drawn from a seeded generator, aimed at one of

    data        the data stage (text embeddings, x0 shards being sampled and written)
    step        a training step: a random one of the interval after the next checkpoint (once it is
                committed: the restart resumes from it), a random fraction into it
    checkpoint  a checkpoint write: the moment an orbax temporary directory appears, plus 0-5 ms
    startup     a random moment between launch and the first step (imports, restore, compile)

and restarted, until N kills are done; the last incarnation runs to the end. The first fifth of the
kills aim at the data stage, the others at the three other kinds in seeded shuffles (`--aims` gives
the order instead). Where a kill really
landed is read from the files at that instant (a data stage still running, an orbax temporary
directory present, steps logged), not assumed from the aim.

Checked, between incarnations (the killed process is gone, so nothing races the reads):
  * the checkpoint the next incarnation resumes from (the newest readable one, the rule of
    `student_jax.checkpoint.Checkpointer.restore`) equals the reference's at that step, bitwise, and
    the incarnation's own log names that step ("resumed from ... at step N");
  * every committed checkpoint ever seen in the faulty run restores (state and config) and equals the
    reference's at its step bitwise (params, EMA, opt_state, rng, step, objective state);
  * at the end: the final state equals the reference's bitwise; no checkpoint left is unreadable,
    none was moved to `checkpoints/corrupt/`, no orbax temporary directory is left behind.

Prints one JSON line per figure:

    python benchmarks/fault_injection.py [--kills 20] [--seed 0] [--steps 60] [--ckpt-every 10]
                                         [--aims data,step,checkpoint] [--root DIR] [--verbose]

    {"figure": "fault_injection", "kills": 20, "resumed_bitwise": 20, "final_bitwise": true,
     "unreadable_checkpoints": 0, ..., "wall_s": ...}

A kill before the first checkpoint restarts from step 0; it counts as resumed bitwise (the initial
state is a function of the seed; the final comparison covers what follows). All processes share a
persistent JAX compilation cache under the root, so restarts do not recompile.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax writes step N into "N.orbax-checkpoint-tmp", then renames it
KINDS = ("step", "checkpoint", "startup")  # aims after the data stage; "data" comes first while it lasts


def run_flags(steps: int, ckpt_every: int) -> list[str]:
    """The faulty run's and the reference's flags (besides workdir, cache and the tiny teacher)."""
    return ["--train.steps", str(steps), "--ckpt.every", str(ckpt_every), "--train.log_every", "1",
            "--train.eval_every", str(10 * steps), "--train.sample_every", "0",
            # 4 samples per prompt in shards of 8: a data stage of 16 train shards, long enough to be hit
            "--data.samples_per_prompt", "4", "--data.shard_size", "8"]


# ---------------------------------------------------------------------------------------------- state


def bitwise_differences(a, b) -> list[str]:
    """Paths where two pytrees of arrays differ in structure, dtype, shape or bytes (empty: bitwise equal)."""
    import jax
    import numpy as np

    flat_a = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(a)[0]}
    flat_b = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(b)[0]}
    out = [f"{k} (only in one)" for k in sorted(set(flat_a) ^ set(flat_b))]
    for key in sorted(set(flat_a) & set(flat_b)):
        x, y = flat_a[key], flat_b[key]
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            out.append(key)
    return out


def read_checkpoint(step_dir: Path):
    """(state as a dict of numpy arrays, config dict) of one orbax step directory; raises when unreadable."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    if not (step_dir / "commit_success.txt").is_file() and not (step_dir / "_CHECKPOINT_METADATA").is_file():
        raise FileNotFoundError(f"{step_dir} holds no commit marker")
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(step_dir / "state")
    config = json.loads((step_dir / "config" / "metadata").read_text())
    if not isinstance(config, dict):
        raise TypeError(f"{step_dir}: config is {type(config).__name__}")
    return jax.tree_util.tree_map(np.asarray, state), config


def committed_steps(ckpt_dir: Path) -> list[int]:
    """Step directories (integer names) under `ckpt_dir`, newest first; temporary ones excluded."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)


def leftover_temporaries(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir() if TMP_SUFFIX in p.name) if ckpt_dir.is_dir() else []


# ---------------------------------------------------------------------------------------------- watching


@dataclass
class RunFiles:
    """What a run's files say about where it is (polled while it runs)."""

    workdir: Path
    cache: Path

    @property
    def checkpoints(self) -> Path:
        return self.workdir / "checkpoints"

    def data_active(self, since_ns: int) -> bool:
        """This incarnation is in the x0 data stage: it reported progress after `since_ns` (its launch)."""
        for board in (self.cache / "data").glob("*_*/progress/rank*.json"):
            try:
                if board.stat().st_mtime_ns >= since_ns:
                    return True
            except FileNotFoundError:
                continue  # being replaced
        return False

    def data_done(self) -> bool:
        data = self.cache / "data"
        return all(any(data.glob(f"{kind}_*/index.json")) for kind in ("train", "eval"))

    def shards_written(self) -> int:
        """x0 shards with their record (the sidecar written after the shard) in the train and eval sets."""
        return len(list((self.cache / "data").glob("*_*/shards/shard_*.json")))

    def temporaries(self) -> set[tuple[str, int, int]]:
        """orbax temporary directories as (name, inode, mtime): a dead run's leftovers keep theirs."""
        out = set()
        for name in leftover_temporaries(self.checkpoints):
            try:
                st = (self.checkpoints / name).stat()
            except FileNotFoundError:
                continue  # renamed on commit meanwhile
            out.add((name, st.st_ino, st.st_mtime_ns))
        return out

    def writing_checkpoint(self, stale: frozenset = frozenset()) -> bool:
        """A checkpoint write in progress: a temporary directory that is not a leftover in `stale`."""
        return bool(self.temporaries() - stale)

    def metrics_size(self) -> int:
        path = self.workdir / "metrics.jsonl"
        return path.stat().st_size if path.is_file() else 0

    def last_logged_step(self, since: int) -> int | None:
        """The last training step logged to metrics.jsonl after byte offset `since` (None: none yet)."""
        path = self.workdir / "metrics.jsonl"
        if not path.is_file():
            return None
        with path.open("rb") as f:
            f.seek(since)
            tail = f.read().decode(errors="replace")
        last = None
        for line in tail.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            if "loss" in record:
                last = record["step"]
        return last

    def phase(self, since: int, launched_ns: int, stale: frozenset = frozenset()) -> str:
        """Where the run is now: data, checkpoint (an orbax write in progress), step, or startup."""
        if not self.data_done():
            return "data" if self.data_active(launched_ns) else "startup"
        if self.writing_checkpoint(stale):
            return "checkpoint"
        return "step" if self.last_logged_step(since) is not None else "startup"


@dataclass
class Timings:
    """The reference run's pace, which scales the random kill moments."""

    startup_s: float = 20.0  # launch to the first logged step (lowered by faster restarts seen later)
    shard_s: float = 0.1  # one x0 shard of the data stage
    shards: int = 1  # x0 shards of the data stage (train and eval)
    step_s: float = 0.2


def launch(files: RunFiles, flags: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    from tests.tiny_random_release import tiny_flags

    cmd = [sys.executable, str(REPO / "train.py"), "--workdir", str(files.workdir), "--data.cache_dir",
           str(files.cache), *tiny_flags(files.cache), *flags]
    log = log_path.open("w")
    # its own session: the SIGKILL goes to this run's process group and nothing else
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return proc


def watch_reference(proc: subprocess.Popen, files: RunFiles, poll: float = 0.01) -> Timings:
    """Wait for the reference run, noting when its data stage and its steps start and end."""
    start = time.monotonic()
    data_start = data_end = first_step = None
    first_logged = last_logged = None
    while proc.poll() is None:
        now = time.monotonic() - start
        if data_start is None and files.data_active(0):
            data_start = now
        if data_end is None and files.data_done():
            data_end, shards = now, files.shards_written()
        step = files.last_logged_step(0)
        if step is not None:
            if first_step is None:
                first_step, first_logged = now, step
            last_logged = (now, step)
        time.sleep(poll)
    timings = Timings()
    if data_start is not None and data_end is not None:
        timings.shard_s = max(data_end - data_start, 0.1) / max(shards, 1)
        timings.shards = shards
    if first_step is not None:
        timings.startup_s = first_step
        if last_logged and last_logged[1] > first_logged:
            timings.step_s = (last_logged[0] - first_step) / (last_logged[1] - first_logged)
    return timings


@dataclass
class Kill:
    aim: str
    phase: str = ""  # where it landed
    after_s: float = 0.0  # since launch
    resume_step: int = 0  # where the next incarnation resumes (0: from scratch)
    resume_bitwise: bool = False


def kill_at(proc: subprocess.Popen, files: RunFiles, aim: str, rng: random.Random, timings: Timings,
            resume: int, steps: int, ckpt_every: int) -> Kill | None:
    """SIGKILL the run at a random moment of the kind `aim` names; None when it finished first.

    Each aim is a condition on the run's files and a random delay after it first holds."""
    start, launched_ns = time.monotonic(), time.time_ns()
    since, stale = files.metrics_size(), frozenset(files.temporaries())
    if aim == "startup":
        condition, delay = (lambda: True), rng.uniform(0.0, timings.startup_s)
    elif aim == "data":  # a random number of this incarnation's shards written, then up to a third of one
        target = files.shards_written() + rng.randint(0, max(timings.shards - files.shards_written() - 1, 0))

        def condition():  # (should the stage end first, the kill lands just after it: its phase says so)
            return files.data_active(launched_ns) and files.shards_written() >= target or files.data_done()

        delay = rng.uniform(0.0, min(timings.shard_s / 3, 0.1))
    elif aim == "checkpoint":  # an orbax temporary directory: a write in progress
        condition, delay = (lambda: files.writing_checkpoint(stale)), rng.uniform(0.0, 0.005)
    elif aim == "step":
        # the step logged just before the kill, then a fraction of a step: a random step of the interval
        # after the next checkpoint, once that checkpoint is committed (so the restart resumes from it)
        following = (resume // ckpt_every + 1) * ckpt_every
        if following < steps:
            target = following + rng.randint(0, min(ckpt_every, steps - following) - 1)
        else:
            following, target = resume, rng.randint(resume + 1, steps - 1)

        def condition():
            return (files.last_logged_step(since) or -1) >= target and \
                max(committed_steps(files.checkpoints), default=0) >= following

        delay = rng.uniform(0.0, timings.step_s)
    else:
        raise ValueError(f"unknown aim {aim!r}")
    poll = 0.002 if aim == "checkpoint" else 0.01
    held = None
    while proc.poll() is None:
        now = time.monotonic()
        if held is None and condition():
            held = now
        if held is not None and now >= held + delay:
            phase = files.phase(since, launched_ns, stale)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return Kill(aim=aim, phase=phase, after_s=round(now - start, 3))
        if files.metrics_size() > since:  # training began: start-up takes at most this long
            timings.startup_s = min(timings.startup_s, now - start)
        time.sleep(poll)
    return None


# ---------------------------------------------------------------------------------------------- the benchmark


class Verifier:
    """Compares the faulty run's checkpoints with the reference's, each step once (they never change)."""

    def __init__(self, reference: Path):
        self.reference = reference
        self.seen: dict[int, bool] = {}  # step -> bitwise equal to the reference
        self.unreadable: dict[int, str] = {}
        self._reference_cache: dict[int, object] = {}

    def _reference(self, step: int):
        if step not in self._reference_cache:
            self._reference_cache[step] = read_checkpoint(self.reference / str(step))[0]
        return self._reference_cache[step]

    def check_all(self, ckpt_dir: Path) -> None:
        for step in committed_steps(ckpt_dir):
            if step in self.seen or step in self.unreadable:
                continue
            try:
                state, _ = read_checkpoint(ckpt_dir / str(step))
            except Exception as error:  # noqa: BLE001 - any failure to read is the finding
                self.unreadable[step] = f"{type(error).__name__}: {str(error)[:200]}"
                continue
            self.seen[step] = not bitwise_differences(state, self._reference(step))

    def resume_point(self, ckpt_dir: Path) -> tuple[int, bool]:
        """(step the next incarnation resumes from, whether that state equals the reference's)."""
        for step in committed_steps(ckpt_dir):
            if step in self.unreadable:
                continue  # Checkpointer.restore falls back past it
            return step, self.seen.get(step, False)
        return 0, True  # from scratch: the initial state is a function of the seed


def plan_aims(kills: int, rng: random.Random) -> list[str]:
    """A fifth of the kills (at least one) in the data stage first, then seeded shuffles of KINDS
    one after another (so every kind gets its share)."""
    aims = ["data"] * min(kills, max(1, round(kills / 5)))
    while len(aims) < kills:
        block = list(KINDS)
        rng.shuffle(block)
        aims += block
    return aims[:kills]


def _resumed_step(log_path: Path) -> int | None:
    found = re.findall(r"resumed from \S+ at step (\d+)", log_path.read_text(errors="replace"))
    return int(found[-1]) if found else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--aims", default="", help="the kills' aims in order, e.g. data,step,checkpoint "
                        f"(of data, {', '.join(KINDS)}); default: planned from the seed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--ckpt-every", type=int, default=10)
    parser.add_argument("--root", default="/tmp/wan_fault_injection", help="scratch folder (emptied first)")
    parser.add_argument("--verbose", action="store_true", help="one JSON line per kill as well")
    args = parser.parse_args(argv)
    if args.aims:
        unknown = set(args.aims.split(",")) - {"data", *KINDS}
        if unknown:
            parser.error(f"unknown aims {sorted(unknown)}")
        args.kills = len(args.aims.split(","))
    t0 = time.perf_counter()
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    flags = run_flags(args.steps, args.ckpt_every)

    reference = RunFiles(root / "reference", root / "cache_reference")
    proc = launch(reference, [*flags, "--ckpt.keep", str(args.steps)], env, root / "reference.log")
    timings = watch_reference(proc, reference)
    if proc.returncode != 0:
        raise SystemExit(f"the reference run failed (rc {proc.returncode}); see {root / 'reference.log'}")

    rng = random.Random(args.seed)
    aims = args.aims.split(",") if args.aims else plan_aims(args.kills, rng)
    faulty = RunFiles(root / "faulty", root / "cache_faulty")  # its own empty cache: the data stage is hit
    verifier = Verifier(reference.checkpoints)
    kills: list[Kill] = []
    incarnation = 0
    log_mismatch = []
    while True:
        log_path = root / f"faulty_{incarnation:02d}.log"
        resume, _ = verifier.resume_point(faulty.checkpoints)
        proc = launch(faulty, flags, env, log_path)
        kill = None
        if len(kills) < len(aims):
            aim = aims[len(kills)]
            if aim == "data" and faulty.data_done():
                aim = "step"  # the data stage is over
            if aim == "step" and resume >= args.steps - 1:
                aim = "checkpoint"  # no step left after the resume point
            if resume >= args.steps:
                aim = "startup"  # finished: nothing but start-up is left to hit
            kill = kill_at(proc, faulty, aim, rng, timings, resume, args.steps, args.ckpt_every)
        else:
            proc.wait()
        logged = _resumed_step(log_path)
        if logged is not None and logged != resume:
            log_mismatch.append({"incarnation": incarnation, "predicted": resume, "logged": logged})
        verifier.check_all(faulty.checkpoints)
        if kill is None:
            if proc.returncode != 0:
                raise SystemExit(f"incarnation {incarnation} failed (rc {proc.returncode}); see {log_path}")
            break  # finished
        kill.resume_step, kill.resume_bitwise = verifier.resume_point(faulty.checkpoints)
        kills.append(kill)
        if args.verbose:
            print(json.dumps({"kill": len(kills), **kill.__dict__}), flush=True)
        incarnation += 1

    final_ref, _ = read_checkpoint(reference.checkpoints / str(args.steps))
    final_diff = (bitwise_differences(read_checkpoint(faulty.checkpoints / str(args.steps))[0], final_ref)
                  if args.steps in verifier.seen else ["no final checkpoint"])
    left = committed_steps(faulty.checkpoints)
    corrupt = faulty.checkpoints / "corrupt"
    phases = {k: sum(kill.phase == k for kill in kills) for k in ("data", "step", "checkpoint", "startup")}
    figure = {
        "figure": "fault_injection", "kills": len(kills), "seed": args.seed,
        "resumed_bitwise": sum(k.resume_bitwise for k in kills) if not final_diff else 0,
        "final_bitwise": not final_diff,
        "unreadable_checkpoints": len(verifier.unreadable) + (len(list(corrupt.iterdir())) if corrupt.is_dir() else 0),
        "checkpoints_bitwise": f"{sum(verifier.seen.values())}/{len(verifier.seen)}",
        "checkpoints_left": sorted(left), "leftover_tmp_dirs": len(leftover_temporaries(faulty.checkpoints)),
        "resume_log_mismatches": len(log_mismatch), "kills_by_phase": phases,
        "resume_steps": [k.resume_step for k in kills],
        "restarts": incarnation, "steps": args.steps, "ckpt_every": args.ckpt_every,
        "reference_startup_s": round(timings.startup_s, 2), "wall_s": round(time.perf_counter() - t0, 1),
    }
    if verifier.unreadable:
        figure["unreadable"] = {str(k): v for k, v in verifier.unreadable.items()}
    if final_diff:
        figure["final_differs"] = final_diff[:5]
    if log_mismatch:
        figure["log_mismatch"] = log_mismatch[:5]
    print(json.dumps(figure), flush=True)
    ok = (not final_diff and figure["resumed_bitwise"] == len(kills) and figure["unreadable_checkpoints"] == 0
          and all(verifier.seen.values()) and not log_mismatch and figure["leftover_tmp_dirs"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
