"""Benchmark: peak host memory of loading one DiT expert, one process against two FSDP ranks (CPU, gloo).

Writes a synthetic expert (release layout, float32, several shards) of about `--gb` GB, then loads it
(a) in one process with `WanModel.from_pretrained` and (b) under `torchrun --nproc_per_node=2` with
FSDP2, each rank reading only its rows (`fsdp_local_view`). Each process reports its peak resident
set (ru_maxrss) above what it held before loading. Prints one JSON line per process and one with
the ratio world-2 / world-1:

    python benchmarks/streaming_load.py [--gb 1.2] [--folder /tmp/wan_stream_bench]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from wan.modules.model import DiTConfig, WanModel
from wan.synthetic import random_state, write_expert


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(folder: Path) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        from wan.distributed import TeacherParallel, fsdp_local_view, shard_dit

        dist.init_process_group("gloo")
        mesh = TeacherParallel.from_world(sp=1, device_type="cpu").fsdp_mesh
        kwargs = dict(parallelize=functools.partial(shard_dit, mesh=mesh), local_view=fsdp_local_view)
    else:
        kwargs = {}
    before = _rss_mb()
    model = WanModel.from_pretrained(folder, **kwargs)
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in model.parameters())
    result = {"bench": "streaming_load", "world": world, "rank": int(os.environ.get("RANK", "0")),
              "rss_before_mb": round(before, 1), "peak_rss_mb": round(_peak_mb(), 1),
              "peak_above_before_mb": round(_peak_mb() - before, 1), "local_params_mb": round(local / 2**20, 1)}
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gb", type=float, default=1.2, help="size of the synthetic expert (float32)")
    p.add_argument("--folder", default="/tmp/wan_stream_bench")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    folder = Path(args.folder)
    if args.worker:
        print("RESULT " + json.dumps(load(folder)), flush=True)
        return
    # width 1024: one block is ~17M parameters (68 MB in float32)
    layers = max(1, round(args.gb * 1e9 / 4 / 17.3e6))
    config = DiTConfig(dim=1024, ffn_dim=4096, num_heads=16, num_layers=layers, freq_dim=256)
    if not (folder / "config.json").is_file() or DiTConfig.from_folder(folder) != dataclasses.replace(
            config, text_dim=4096, window_size=(-1, -1)):
        with torch.device("meta"):
            meta = config.build()
        write_expert(folder, config, random_state(meta, 0, dtype=torch.float32), shard_bytes=256 << 20)
    size_mb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    runs = []
    for world in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, __file__, "--worker", "--folder", str(folder)]
        if world > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={port}",
                   *cmd[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if out.returncode:
            raise SystemExit(out.stderr[-4000:])
        for line in out.stdout.splitlines():
            if line.startswith("RESULT "):
                row = json.loads(line[7:]) | {"checkpoint_mb": round(size_mb, 1)}
                runs.append(row)
                print(json.dumps(row), flush=True)
    one = max(r["peak_above_before_mb"] for r in runs if r["world"] == 1)
    two = max(r["peak_above_before_mb"] for r in runs if r["world"] == 2)
    print(json.dumps({"bench": "streaming_load_ratio", "checkpoint_mb": round(size_mb, 1),
                      "peak_above_before_world1_mb": one, "peak_above_before_world2_mb": two,
                      "ratio_world2_over_world1": round(two / one, 3)}), flush=True)


if __name__ == "__main__":
    main()
