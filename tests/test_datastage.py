"""The teacher-data stage: shards independent of the world size, bitwise resumption after SIGKILL,
a new cache for a changed setting, damaged shards regenerated, lazy reading with bounded memory,
trajectories, and waits that say what they wait for."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import pytest
import torch

from distill.datastage import ShardedDataset, ShardStore, wait_until
from tests.ports import free_port_pair
from tests.tiny_random_release import tiny_flags

REPO = Path(__file__).resolve().parents[1]
STAGE = ["--stage", "data", "--data.shard_size", "13"]  # 64 train samples -> 5 shards (the last has 12)


def _train_py(*args, nproc: int = 1, cache: Path, workdir: Path, background: bool = False):
    cmd = [str(REPO / "train.py"), "--workdir", str(workdir), "--data.cache_dir", str(cache), *tiny_flags(cache), *args]
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port_pair()}", *cmd]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if background:
        return subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    out = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def _datasets(cache: Path) -> dict[str, Path]:
    return {p.name.split("_")[0]: p for p in sorted((cache / "data").iterdir())}


def _shard_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "shards").glob("*.safetensors"))}


def _assert_same_data(a: Path, b: Path) -> None:
    """Every shard of dataset folder `a` holds bitwise the tensors of `b`'s (the file bytes also carry
    the dataset key, which names the teacher's files, so two caches differ there)."""
    from safetensors.torch import load_file

    names = sorted(p.name for p in (a / "shards").glob("*.safetensors"))
    assert names == sorted(p.name for p in (b / "shards").glob("*.safetensors"))
    for name in names:
        x, y = load_file(str(a / "shards" / name)), load_file(str(b / "shards" / name))
        assert x.keys() == y.keys(), name
        for key in x:
            assert torch.equal(x[key], y[key]), (name, key, (x[key].double() - y[key].double()).abs().max())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted single-process data stage."""
    cache = tmp_path_factory.mktemp("ref")
    _train_py(*STAGE, cache=cache, workdir=cache / "run")
    return cache


def test_stage_writes_manifest_index_and_shards(reference):
    sets = _datasets(reference)
    assert set(sets) == {"train", "eval"}
    train = sets["train"]
    manifest = json.loads((train / "manifest.json").read_text())
    for key in ("teacher_id", "size", "steps", "shift", "guide_scale", "solver", "seed", "samples_per_prompt",
                "n_prompt", "trajectory_steps", "shard_size"):
        assert key in manifest, key
    index = json.loads((train / "index.json").read_text())
    assert index["num_samples"] == 64 and [s["rows"] for s in index["shards"]] == [13, 13, 13, 13, 12]
    data = ShardedDataset(_store(reference, train))
    chex.assert_shape(data.latents([0, 63, 20]), (3, 16, 8, 8))
    assert data.prompt_index.tolist() == [j % 32 for j in range(64)]
    summary = json.loads((reference / "run" / "summary.json").read_text())
    assert summary["stage"] == "data" and summary["samples_generated"] == 64 + 8 and summary["samples_per_s"] > 0


def _store(cache: Path, folder: Path) -> ShardStore:
    manifest = json.loads((folder / "manifest.json").read_text())
    kind = manifest.pop("kind")
    manifest.pop("version")
    store = ShardStore(cache, kind, manifest)
    assert store.folder == folder
    return store


@pytest.mark.parametrize("layout", [pytest.param([], id="dp2"),
                                    pytest.param(["--teacher_device_strategy", "balanced"], id="fsdp")])
def test_two_ranks_make_the_same_shards_as_one(reference, tmp_path, layout):
    """Each sample's noise has its own seed and shards are fixed batches: the world size changes nothing.
    (fsdp: 5 shards over 2 ranks, so one rank runs throwaway batches to keep the collectives paired.)"""
    _train_py(*STAGE, *layout, nproc=2, cache=tmp_path, workdir=tmp_path / "run")
    for kind, folder in _datasets(reference).items():
        _assert_same_data(_datasets(tmp_path)[kind], folder)


def test_sigkill_and_restart_is_bitwise_equal(reference, tmp_path):
    """Kill the stage with SIGKILL once some shards exist; the restart redoes only what is missing and
    ends with the same bytes as the uninterrupted stage."""
    proc = _train_py(*STAGE, cache=tmp_path, workdir=tmp_path / "run", background=True)
    deadline = time.time() + 300
    shards = tmp_path / "data"
    while time.time() < deadline and proc.poll() is None:
        written = list(shards.glob("train_*/shards/shard_*.json")) if shards.is_dir() else []
        if len(written) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the stage finished before it could be killed: " + proc.stderr.read()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    folder = next(shards.glob("train_*"))
    before = _shard_digests(folder)
    assert 2 <= len(before) < 5 and not (folder / "index.json").exists()
    _train_py(*STAGE, cache=tmp_path, workdir=tmp_path / "run")
    for kind, ref in _datasets(reference).items():
        _assert_same_data(_datasets(tmp_path)[kind], ref)
    after = _shard_digests(folder)
    assert all(after[name] == digest for name, digest in before.items())  # kept, not recomputed wrongly


def test_changed_setting_makes_a_new_cache_and_a_damaged_shard_is_regenerated(reference, tmp_path, caplog):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(reference, cache)
    old = {k: _shard_digests(v) for k, v in _datasets(cache).items()}
    _train_py(*STAGE, "--data.gen_steps", "3", cache=cache, workdir=cache / "run2")
    sets = sorted((cache / "data").iterdir())
    assert len(sets) == 4  # a new train and eval dataset beside the old ones
    for kind, folder in _datasets(reference).items():
        assert _shard_digests(cache / "data" / folder.name) == old[kind]  # untouched

    train = cache / "data" / _datasets(reference)["train"].name
    victim = train / "shards" / "shard_00002.safetensors"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # truncated
    flipped = train / "shards" / "shard_00003.safetensors"
    raw = bytearray(flipped.read_bytes())
    raw[-5] ^= 0xFF  # same size, one byte changed
    flipped.write_bytes(bytes(raw))
    with pytest.raises(Exception, match=r"shard 2 is size .* \(truncated\?\); run the data stage again"):
        ShardedDataset(_store(cache, train)).latents([2 * 13])
    out = _train_py(*STAGE, cache=cache, workdir=cache / "run")
    assert "shard 2 is size" in out.stderr and "shard 3 is checksum mismatch (corrupt); regenerating it" in out.stderr
    assert _shard_digests(train) == old["train"]  # the same cache: the same bytes again


def test_trajectories_are_stored_on_request(tmp_path):
    _train_py("--stage", "data", "--data.trajectory_steps", "3", "--data.shard_size", "32", cache=tmp_path,
              workdir=tmp_path / "run")
    from safetensors.torch import load_file

    shard = load_file(str(next((tmp_path / "data").glob("train_*")) / "shards" / "shard_00000.safetensors"))
    chex.assert_shape(shard["trajectory"], (32, 3, 16, 8, 8))
    chex.assert_shape(shard["latents"], (32, 16, 8, 8))
    t = shard["trajectory_t"].tolist()
    assert len(t) == 3 and t[0] > t[1] > t[2] and t[0] >= 990  # the first entry is the initial noise level
    # the first recorded latent is the sample's initial noise, drawn from its own seed
    gen = torch.Generator().manual_seed(int(shard["noise_seed"][5]))
    torch.testing.assert_close(shard["trajectory"][5, 0], torch.randn(16, 1, 8, 8, generator=gen)[:, 0], rtol=0, atol=0)


def test_each_teacher_numerics_keys_its_own_samples(tmp_path):
    """Teacher samples are keyed by the DiT's numerics: bf16 (float32 here), FP8 with fast accumulation
    and FP8 without each write their own datasets (a recipe never reuses another's samples); the same
    recipe again finds its own."""
    folders = []
    for flags in ([], ["--teacher.fp8"], ["--teacher.fp8", "--teacher.no_fp8_fast_accum"], ["--teacher.fp8"]):
        _train_py("--stage", "data", *flags, cache=tmp_path, workdir=tmp_path / "run")
        folders.append(set((tmp_path / "data").iterdir()))
        generated = json.loads((tmp_path / "run" / "summary.json").read_text())["samples_generated"]
        assert generated == (0 if len(folders) == 4 else 64 + 8), flags  # the repeat: all found
    assert [len(f) for f in folders] == [2, 4, 6, 6]  # a train and an eval dataset per recipe


def test_training_stage_needs_the_data(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "train.py"), "--stage", "train", "--workdir", str(tmp_path / "r"),
                          "--data.cache_dir", str(tmp_path / "c"), "--train.steps", "2"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "run the data stage first (--stage data, or --stage all)" in out.stderr


READER = """
import json, sys
sys.path.insert(0, {repo!r})
import numpy as np
from pathlib import Path
from distill.datastage import ShardStore, ShardedDataset
manifest = json.loads(Path({folder!r}, "manifest.json").read_text())
kind = manifest.pop("kind"); manifest.pop("version")
data = ShardedDataset(ShardStore(Path({root!r}), kind, manifest))

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS:")
rng = np.random.default_rng(0)
for step in range(200):
    data.latents(rng.integers(0, len(data), 8))
print(json.dumps({{"growth_kb": status("VmHWM:") - before}}))
"""


def _synthetic_dataset(root: Path, shards: int) -> Path:
    store = ShardStore(root, "train", dict(num_samples=shards * 64, shard_size=64, note=f"rss test {shards}"))
    store.write_manifest()
    gen = torch.Generator().manual_seed(shards)
    for s in range(shards):
        store.write(s, {"latents": torch.randn(64, 16, 32, 32, generator=gen),
                        "prompt_index": torch.zeros(64, dtype=torch.int64)})
    store.finalize()
    return store.folder


def test_reading_is_lazy_memory_does_not_grow_with_the_dataset(tmp_path):
    """Peak RSS of 200 random batches is the same for 4 and 48 shards (16 MB vs 192 MB of latents)."""
    growth = {}
    for shards in (4, 48):
        folder = _synthetic_dataset(tmp_path / str(shards), shards)
        script = READER.format(repo=str(REPO), folder=str(folder), root=str(tmp_path / str(shards)))
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        growth[shards] = json.loads(out.stdout.strip().splitlines()[-1])["growth_kb"] / 1024
    print(f"peak RSS growth while reading: 4 shards {growth[4]:.1f} MB, 48 shards {growth[48]:.1f} MB")
    assert growth[48] < growth[4] + 24, growth  # 176 MB more data, (nearly) no more memory


def test_waits_log_what_they_wait_for(caplog):
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="distill.datastage"):
        wait_until(lambda: time.monotonic() - start > 0.35, lambda: "rank 1 (3/8 samples)", "the other ranks",
                   log_every=0.1, poll=0.02)
    assert any("still waiting" in r.message and "rank 1 (3/8 samples)" in r.message for r in caplog.records)
