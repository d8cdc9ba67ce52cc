"""Isolation: a training run needs no network, and checkpoint files cannot run code.

- No network: `train.py` runs a short tiny training in a subprocess whose socket layer refuses every
  non-local connection, name lookup and datagram (installed before anything is imported, so import-
  time calls are caught too) and logs each attempt; the run must finish and the log stay empty.
- No pickle code execution: a `.pth` whose pickle would create a marker file when unpickled
  (a `__reduce__` payload) stands in for the umT5 and for the VAE checkpoint of a release folder;
  loading the release must fail with a CheckpointError naming the file, and the marker must not
  exist. Every `torch.load(` in wan/, distill/, student_jax/, bridge/ and train.py passes
  `weights_only=True` (checked on the syntax tree, aliases included), and nothing there calls a
  pickle-style loader.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.tiny_random_release import tiny_flags, tiny_release
from wan.checkpoint import CheckpointError

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("wan", "distill", "student_jax", "bridge")

# Installed in the child before train.py runs: refuses AF_INET / AF_INET6 traffic and name lookups,
# logging each attempt (a library that swallows the error would otherwise hide it). Unix sockets stay.
GUARD = textwrap.dedent('''
    import os, runpy, socket, sys

    _log = os.environ["NO_NETWORK_LOG"]

    def _refuse(what, detail):
        with open(_log, "a") as f:
            f.write(f"{what} {detail!r}\\n")
        raise OSError(f"network access blocked by tests/test_isolation.py: {what} {detail!r}")

    def _wrap(method):
        original = getattr(socket.socket, method)

        def guarded(self, *args):
            if self.family in (socket.AF_INET, socket.AF_INET6):
                _refuse(f"socket.{method}", args)
            return original(self, *args)
        return guarded

    for _method in ("connect", "connect_ex", "sendto", "sendmsg"):
        setattr(socket.socket, _method, _wrap(_method))
    for _name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "create_connection"):
        setattr(socket, _name, lambda *args, _name=_name, **kwargs: _refuse(f"socket.{_name}", args))

    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
''')


def _offline(tmp_path: Path, script: Path, *args, timeout: int = 400) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `script args` under the guard; returns the process and the logged network attempts."""
    runner, log = tmp_path / "offline_runner.py", tmp_path / "network_attempts.log"
    runner.write_text(GUARD)
    env = dict(os.environ, NO_NETWORK_LOG=str(log), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(runner), str(script), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc, (log.read_text().splitlines() if log.exists() else [])


def test_the_guard_blocks_and_logs(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent('''
        import socket
        for attempt in (lambda: socket.create_connection(("example.com", 80), timeout=1),
                        lambda: socket.socket().connect(("127.0.0.1", 9))):
            try:
                attempt()
            except OSError as error:
                print("refused:", error)
        a, b = socket.socketpair(socket.AF_UNIX)  # local IPC still works
        a.sendall(b"ok"); print(b.recv(2).decode())
    '''))
    proc, attempts = _offline(tmp_path, probe, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("refused: network access blocked") == 2 and proc.stdout.rstrip().endswith("ok")
    assert [a.split()[0] for a in attempts] == ["socket.create_connection", "socket.connect"]


def test_training_runs_without_network(tmp_path):
    cache = tmp_path / "cache"
    flags = tiny_flags(cache)  # builds the tiny release here, before the guarded child starts
    workdir = tmp_path / "run"
    proc, attempts = _offline(
        tmp_path, REPO / "train.py", "--workdir", str(workdir), "--data.cache_dir", str(cache), *flags,
        "--train.steps", "4", "--train.log_every", "1", "--train.eval_every", "4", "--train.sample_every", "0",
        "--ckpt.every", "4", "--ckpt.no_async_save", "--data.samples_per_prompt", "1", "--data.gen_steps", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not attempts, f"the run tried to reach the network: {attempts[:5]}"
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["final_step"] == 4
    assert (workdir / "checkpoints" / "4").is_dir()


# ------------------------------------------------------------------------------------ pickle payloads


class _Payload:
    """Unpickling this calls open(marker, "w"), i.e. runs code that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious_pth(path: Path, marker: Path, key: str) -> Path:
    torch.save({key: _Payload(marker)}, path)
    return path


def test_the_payload_is_live(tmp_path):
    """Positive control: an unsafe torch.load of the same kind of file does create its marker."""
    marker = tmp_path / "control_marker"
    path = _malicious_pth(tmp_path / "control.pth", marker, "token_embedding.weight")
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.fixture(scope="module")
def release_folder(tmp_path_factory):
    return tiny_release(tmp_path_factory.mktemp("release"), ["a cat", "a red circle"])


@pytest.mark.parametrize("entry, key", [("t5_checkpoint", "token_embedding.weight"),
                                        ("vae_checkpoint", "encoder.conv1.weight")])
def test_malicious_checkpoint_is_refused(tmp_path, release_folder, entry, key):
    from wan.configs import load_config
    from wan.text2video import WanT2V

    folder = tmp_path / "release"
    shutil.copytree(release_folder, folder)
    config = load_config(folder / "config_tiny_t2v.json")
    marker = tmp_path / f"{entry}_marker"
    target = _malicious_pth(folder / config[entry], marker, key)
    with pytest.raises(CheckpointError) as info:
        WanT2V(config, folder, device="cpu")
    assert not marker.exists(), f"loading {target.name} ran the pickle's code"
    message = str(info.value)
    assert str(target) in message, message
    assert "weights_only" in message.lower() or "unsupported global" in message.lower(), message


# ------------------------------------------------------------------------------------ the source tree


PICKLE_MODULES = ("pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib")
PICKLE_CALLS = ("load", "loads", "Unpickler")


def unsafe_loads(source: str, filename: str = "<source>") -> tuple[list[str], int]:
    """(`file:line what` for every torch.load call without a literal weights_only=True, every
    pickle-style load (pickle / dill / cloudpickle / joblib load, loads, Unpickler; importing pickle
    to catch its exceptions is fine) and every load with allow_pickle not False; the number of
    torch.load calls seen)."""
    tree = ast.parse(source, filename)
    torch_names, load_names, pickle_names, pickle_loads = {"torch"}, set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in ("torch", "torch.serialization"):
                    torch_names.add(alias.asname or alias.name.split(".")[0])
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    pickle_names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            load_names.update(alias.asname or alias.name for alias in node.names if alias.name == "load")
            torch_names.update(alias.asname or alias.name for alias in node.names if alias.name == "serialization")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            pickle_loads.update(alias.asname or alias.name for alias in node.names if alias.name in PICKLE_CALLS)
    found, calls = [], 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        where = f"{filename}:{node.lineno}"
        func, name = node.func, ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if (isinstance(func, ast.Attribute) and func.attr == "load" and ast.unparse(func.value) in
                {*torch_names, *(f"{t}.serialization" for t in torch_names)}) or (
                isinstance(func, ast.Name) and func.id in load_names):
            calls += 1
            value = keywords.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                found.append(f"{where} {name}(...) without weights_only=True")
        if (isinstance(func, ast.Attribute) and func.attr in PICKLE_CALLS and ast.unparse(func.value) in pickle_names) \
                or (isinstance(func, ast.Name) and func.id in pickle_loads):
            found.append(f"{where} {name}(...) unpickles")
        if name.endswith("load") and "allow_pickle" in keywords:
            value = keywords["allow_pickle"]
            if not (isinstance(value, ast.Constant) and value.value is False):
                found.append(f"{where} {name}(..., allow_pickle=...) may unpickle")
    return found, calls


def test_scanner_flags_unsafe_loads():
    bad = textwrap.dedent('''
        import torch as th
        from torch import load as tload
        import pickle
        from dill import loads
        import numpy as np
        th.load("a.pth")
        tload("b.pth", weights_only=False)
        torch.serialization.load("c.pth")
        np.load("d.npy", allow_pickle=True)
        pickle.load(open("e.pkl", "rb"))
        loads(b"")
        torch.load("f.pth", map_location="cpu", weights_only=True)
        try:
            pass
        except pickle.UnpicklingError:
            pass
    ''')
    found, calls = unsafe_loads(bad)
    assert sorted(int(f.split(":")[1].split()[0]) for f in found) == [7, 8, 9, 10, 11, 12], found
    assert calls == 4


def test_every_torch_load_in_the_package_is_weights_only():
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))] + [REPO / "train.py"]
    assert len(files) > 20
    found, calls = [], 0
    for path in files:
        unsafe, n = unsafe_loads(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
        found, calls = found + unsafe, calls + n
    assert calls >= 1, "no torch.load call found at all: the scan looks at the wrong files"
    assert not found, "unsafe deserialisation:\n" + "\n".join(found)
