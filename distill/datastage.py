"""The teacher-data stage: text embeddings and x0 samples (optionally ODE trajectories), made by every
rank in resumable, checksummed shards; and the streaming reader the training stage uses.

A dataset is one folder `cache_dir/data/<kind>_<key>/` whose key is a digest of its manifest (teacher
id, resolution, steps, shift, guide scales, solver, seed, samples per prompt, negative prompt,
trajectory steps, shard size, the prompts or images): a different setting makes a different folder
and never reuses a stale one; the old one is left as it is.

    manifest.json                 what the data is (written first)
    shards/shard_00000.safetensors  latents [n, 16, h, w] float32, prompt_index, sample_index, noise_seed
                                    [+ trajectory [n, T, 16, h, w], trajectory_t [T]]
    shards/shard_00000.json        its size and sha256 (written after the shard, both atomically)
    progress/rank<r>.json          samples done per rank (the progress bar sums them)
    index.json                     every shard, its rows, bytes and checksum (rank 0, at the end)

Sample j (= sample k of prompt p, j = k * P + p) starts from noise drawn with its own seed
(`noise_seed(seed, j)`, a CPU generator), and shard s holds samples [s * S, (s + 1) * S) computed in
fixed batches, so the data does not depend on the number of ranks or on interruptions. Shards are
dealt round-robin to the dp groups (the sp ranks of a group work on one shard together); a restart
recomputes only the shards that are missing or fail their size/checksum check (with a warning).
With a distributed teacher (FSDP / sp) every rank must take part in every teacher call, so a rank
without a shard in a round runs the same number of throwaway batches.

Waiting is done on files, not collectives: a rank that finished waits for the others by polling
their progress files and logs which ranks it waits for every `wait_log_s` seconds, so no barrier sits
silently (nor hits NCCL's 10-minute timeout) while other ranks are still sampling.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .data import DataError, _digest, file_identity, load_image

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
GEN_BATCH = 8  # samples per teacher sampling loop (part of the manifest: it fixes the batch partition)


def noise_seed(seed: int, sample: int) -> int:
    """The seed of sample `sample`'s initial noise: independent of batching and of the world size."""
    return int(np.random.SeedSequence([seed, sample]).generate_state(1, dtype=np.uint64)[0] % (2**63))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class ShardStore:
    """One dataset folder (see the module docstring)."""

    def __init__(self, root: Path, kind: str, manifest: dict):
        self.manifest = {"version": MANIFEST_VERSION, "kind": kind, **manifest}
        self.key = _digest(self.manifest)[:16]
        self.folder = Path(root) / "data" / f"{kind}_{self.key}"
        self.num_samples = int(self.manifest["num_samples"])
        self.shard_size = int(self.manifest["shard_size"])
        self.num_shards = math.ceil(self.num_samples / self.shard_size)

    def shard_path(self, shard: int) -> Path:
        return self.folder / "shards" / f"shard_{shard:05d}.safetensors"

    def shard_rows(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_samples))

    def write_manifest(self) -> None:
        path = self.folder / "manifest.json"
        if not path.is_file():
            _atomic_write_text(path, json.dumps(self.manifest, indent=1, sort_keys=True))

    def check(self, shard: int, checksum: bool = True) -> str | None:
        """Why shard `shard` is not usable, or None when it is (size and sha256 against its sidecar)."""
        path = self.shard_path(shard)
        side = path.with_suffix(".json")
        if not path.is_file() or not side.is_file():
            return "missing"
        try:
            meta = json.loads(side.read_text())
        except (json.JSONDecodeError, OSError) as exc:
            return f"unreadable record ({exc})"
        if path.stat().st_size != meta.get("bytes"):
            return f"size {path.stat().st_size} != recorded {meta.get('bytes')} (truncated?)"
        if checksum and _sha256(path) != meta.get("sha256"):
            return "checksum mismatch (corrupt)"
        return None

    def write(self, shard: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write a shard and then its record, each atomically (temp file + rename)."""
        from safetensors.torch import save_file

        path = self.shard_path(shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".safetensors", dir=path.parent)
        os.close(fd)
        try:
            # one metadata entry: safetensors writes several in a per-process random order
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp,
                      metadata={"shard": f"{self.key}/{shard}"})
            record = {"rows": len(self.shard_rows(shard)), "bytes": os.path.getsize(tmp), "sha256": _sha256(Path(tmp))}
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _atomic_write_text(path.with_suffix(".json"), json.dumps(record))

    def finalize(self) -> None:
        shards = []
        for s in range(self.num_shards):
            record = json.loads(self.shard_path(s).with_suffix(".json").read_text())
            shards.append({"file": self.shard_path(s).name, **record})
        _atomic_write_text(self.folder / "index.json", json.dumps(
            {"manifest": self.manifest, "num_samples": self.num_samples, "shard_size": self.shard_size,
             "shards": shards}, indent=1))

    def complete(self) -> bool:
        return (self.folder / "index.json").is_file()


# ---------------------------------------------------------------------------------------------- waiting


class ProgressBoard:
    """Per-rank progress files of one dataset; rank 0 reads them for the progress bar and the final wait."""

    def __init__(self, store: ShardStore, world: int, rank: int):
        self.folder = store.folder / "progress"
        self.world, self.rank = world, rank

    def report(self, done: int, total: int, finished: bool = False) -> None:
        _atomic_write_text(self.folder / f"rank{self.rank}.json",
                           json.dumps({"done": done, "total": total, "finished": finished, "time": time.time()}))

    def read(self) -> dict[int, dict]:
        out = {}
        for r in range(self.world):
            try:
                out[r] = json.loads((self.folder / f"rank{r}.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                out[r] = {"done": 0, "total": None, "finished": False, "time": None}
        return out


def wait_until(ready: Callable[[], bool], describe: Callable[[], str], what: str, log_every: float,
               poll: float = 0.5) -> None:
    """Poll `ready()`; every `log_every` seconds of waiting, log what is being waited for and why."""
    start = last = time.monotonic()
    while not ready():
        now = time.monotonic()
        if now - last >= log_every:
            log.warning("still waiting %.0f s for %s: %s", now - start, what, describe())
            last = now
        time.sleep(poll)


# ---------------------------------------------------------------------------------------------- the stage


class DataStage:
    """Runs the stage for one process: `embeddings(...)`, then `teacher_samples(...)` / `image_latents(...)`."""

    def __init__(self, rt, pipe, cache_dir: Path, collective: bool, wait_log_s: float = 300.0, progress: bool = True):
        self.rt, self.pipe, self.cache = rt, pipe, Path(cache_dir)
        self.collective = collective
        self.wait_log_s = wait_log_s
        self.progress = progress and rt.is_main
        self.generated = 0  # samples made by all ranks together (shards that were missing)

    # ------------------------------------------------------------------ text

    def embeddings(self, cache, prompts: list[str], batch: int = 8) -> int:
        """Encode the prompts not cached yet, split over the ranks (each writes its own); returns how many.

        The batches are fixed chunks of the sorted prompt list (a batch is encoded when any of its prompts
        is missing), so an embedding does not depend on the world size or on what was cached before
        (in bf16, a prompt's numbers can depend on its batch-mates)."""
        rt = self.rt
        rt.barrier()  # everyone sees the same cache state
        ordered = sorted(set(prompts))
        missing = set(cache.missing(ordered))
        chunks = [ordered[i:i + batch] for i in range(0, len(ordered), batch)]
        todo = [c for c in chunks if missing.intersection(c)]
        if self.pipe.t5_fsdp:  # a sharded encoder: every rank in every call (a throwaway chunk when short)
            rounds = math.ceil(len(todo) / rt.world_size)
            for r in range(rounds):
                index = r * rt.world_size + rt.rank
                chunk = todo[index] if index < len(todo) else todo[0]
                out = self.pipe.encode_text(chunk)
                if index < len(todo):
                    cache.store(chunk, out)
        else:
            for chunk in todo[rt.rank::rt.world_size]:
                cache.store(chunk, self.pipe.encode_text(chunk))
        rt.barrier()
        return len(missing)

    # ------------------------------------------------------------------ shards

    def _run(self, store: ShardStore, build: Callable[[int], dict], batches_of: Callable[[int], int],
             dummy_batch: Callable[[], None], run: bool = True) -> ShardStore:
        rt = self.rt
        if not run:
            return store
        rt.barrier()
        if rt.is_main:
            store.write_manifest()
        # every shard is checked (size and sha256), also in a finished dataset: a damaged one is made again
        bad = {}
        for s in range(store.num_shards):
            why = store.check(s)
            if why is not None:
                bad[s] = why
        if not bad and store.complete():
            return store
        rt.barrier()  # every rank has looked before rank 0 drops the index of a damaged dataset
        if rt.is_main and store.complete():
            (store.folder / "index.json").unlink()
        damaged = {s: why for s, why in bad.items() if why != "missing"}
        if damaged and rt.is_main:
            for s, why in sorted(damaged.items()):
                log.warning("dataset %s: shard %d is %s; regenerating it", store.folder.name, s, why)
        rt.barrier()  # nobody writes until every rank has decided what is missing
        missing = sorted(bad)
        self.generated += sum(len(store.shard_rows(s)) for s in missing)  # every rank counts the same total
        groups, group = rt.dp, rt.dp_rank
        rounds = math.ceil(len(missing) / groups)
        board = ProgressBoard(store, rt.world_size, rt.rank)
        mine = [missing[r * groups + group] for r in range(rounds) if r * groups + group < len(missing)]
        my_total = sum(len(store.shard_rows(s)) for s in mine)
        board.report(0, my_total)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            total = sum(len(store.shard_rows(s)) for s in missing)
            bar = tqdm(total=total, desc=f"data {store.manifest['kind']}", unit="sample", dynamic_ncols=True)
        done = 0
        for r in range(rounds):
            index = r * groups + group
            shard = missing[index] if index < len(missing) else None
            round_shards = missing[r * groups:(r + 1) * groups]
            if shard is not None:
                tensors = build(shard)
                if rt.sp_rank == 0:
                    store.write(shard, tensors)
                done += len(store.shard_rows(shard))
            if self.collective:  # match the busiest rank's number of teacher calls this round
                extra = max(batches_of(s) for s in round_shards) - (batches_of(shard) if shard is not None else 0)
                for _ in range(extra):
                    dummy_batch()
            board.report(done, my_total)
            if bar is not None:
                board_now = board.read()
                bar.n = sum(v["done"] for v in board_now.values()) // rt.sp  # the sp ranks of a group report alike
                bar.refresh()
        board.report(done, my_total, finished=True)

        def all_finished() -> bool:
            return all(v["finished"] for v in board.read().values())

        def waiting_for() -> str:
            status = board.read()
            late = [f"rank {r} ({v['done']}/{v['total']} samples, last report "
                    f"{time.time() - v['time']:.0f} s ago)" if v["time"] else f"rank {r} (no report yet)"
                    for r, v in status.items() if not v["finished"]]
            return ", ".join(late) or "nothing"

        wait_until(all_finished, waiting_for, f"the other ranks to finish {store.folder.name}", self.wait_log_s)
        if bar is not None:
            bar.n = bar.total
            bar.close()
        if rt.is_main:
            still = [s for s in range(store.num_shards) if store.check(s, checksum=False) is not None]
            if still:
                raise DataError(f"dataset {store.folder}: shards {still} are missing after the stage; run it again")
            store.finalize()
        wait_until(store.complete, lambda: "rank 0 writing index.json", f"the index of {store.folder.name}",
                   self.wait_log_s)
        return store

    def teacher_samples(self, kind: str, prompts: list[str], contexts: Callable[[list[int]], list[torch.Tensor]],
                        context_null: torch.Tensor, *, teacher_id: str, size: tuple[int, int], steps: int,
                        shift: float, guide_scale, solver: str, seed: int, samples_per_prompt: int, n_prompt: str,
                        trajectory_steps: int = 0, shard_size: int = 64, run: bool = True) -> ShardStore:
        """x0 latents sampled by the teacher (WanT2V's loop: both experts, CFG), sharded; see the module docstring."""
        num = samples_per_prompt * len(prompts)
        store = ShardStore(self.cache, kind, dict(
            teacher_id=teacher_id, size=list(size), steps=steps, shift=shift, guide_scale=list(guide_scale),
            solver=solver, seed=seed, samples_per_prompt=samples_per_prompt, n_prompt=n_prompt,
            trajectory_steps=trajectory_steps, shard_size=shard_size, gen_batch=GEN_BATCH,
            prompts_sha=_digest(prompts), num_prompts=len(prompts), num_samples=num))
        pipe = self.pipe
        shape = pipe.latent_shape(size, 1)
        record = np.unique(np.linspace(0, steps - 1, trajectory_steps).round().astype(int)) if trajectory_steps else []

        def batches_of(shard: int) -> int:
            return math.ceil(len(store.shard_rows(shard)) / GEN_BATCH)

        def sample_batch(noise, ctx):
            entering = {0: noise}  # step k -> the latent entering it (the one after step k - 1)
            at = {}  # step k -> its timestep

            def keep(step, t, expert, latents):
                entering[step + 1] = latents.float().cpu()
                at[step] = float(t)

            out = pipe.sample(noise, ctx, [context_null] * len(ctx), sampling_steps=steps, shift=shift,
                              guide_scale=tuple(guide_scale), sample_solver=solver,
                              step_callback=keep if trajectory_steps else None)
            x0 = out[:, :, 0].float().cpu()  # [b, 16, h, w]
            if not trajectory_steps:
                return x0, None, None
            traj = torch.stack([entering[k][:, :, 0] for k in record], dim=1)  # [b, T, 16, h, w]
            return x0, traj, torch.tensor([at[k] for k in record])

        def build(shard: int) -> dict:
            rows = list(store.shard_rows(shard))
            latents, trajs, traj_t = [], [], None
            seeds = [noise_seed(seed, j) for j in rows]
            prompt_index = [j % len(prompts) for j in rows]
            for i in range(0, len(rows), GEN_BATCH):
                noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s))
                                     for s in seeds[i:i + GEN_BATCH]])  # [b, 16, 1, h, w]
                x0, traj, traj_t = sample_batch(noise, contexts(prompt_index[i:i + GEN_BATCH]))
                latents.append(x0)
                if traj is not None:
                    trajs.append(traj)
            out = {"latents": torch.cat(latents), "prompt_index": torch.tensor(prompt_index),
                   "sample_index": torch.tensor(rows), "noise_seed": torch.tensor(seeds)}
            if trajs:
                out.update(trajectory=torch.cat(trajs), trajectory_t=traj_t)
            return out

        def dummy_batch():
            noise = torch.zeros((1, *shape))
            sample_batch(noise, contexts([0]))

        return self._run(store, build, batches_of, dummy_batch, run)

    def image_latents(self, pairs: list[tuple[Path, str]], prompts: list[str], size: tuple[int, int], *,
                      teacher_id: str, shard_size: int = 64, run: bool = True) -> ShardStore:
        """Images encoded by the Wan VAE, sharded and resumable like the teacher samples."""
        store = ShardStore(self.cache, "images", dict(
            teacher_id=teacher_id, size=list(size), images=[file_identity(p)[1:] + [p.name] for p, _ in pairs],
            images_sha=_digest([str(p) for p, _ in pairs]), shard_size=shard_size, num_samples=len(pairs)))
        vae = self.pipe.vae

        def build(shard: int) -> dict:
            rows = list(store.shard_rows(shard))
            latents = [vae.encode([load_image(pairs[j][0], size).to(vae.device)])[0][:, 0].float().cpu() for j in rows]
            return {"latents": torch.stack(latents),
                    "prompt_index": torch.tensor([prompts.index(pairs[j][1]) for j in rows]),
                    "sample_index": torch.tensor(rows), "noise_seed": torch.zeros(len(rows), dtype=torch.int64)}

        return self._run(store, build, lambda shard: 0, lambda: None, run)


# ---------------------------------------------------------------------------------------------- reading


class ShardedDataset:
    """A finished dataset, read lazily: `prompt_index` in memory (8 bytes a sample), latents row by row.

    Each shard's size and checksum are verified the first time it is opened; rows are read with one
    pread each (`wan.checkpoint.SafetensorsSource`), so memory does not grow with the dataset.
    """

    def __init__(self, store: ShardStore):
        from wan.checkpoint import read_safetensors_header

        if not store.complete():
            raise DataError(f"dataset {store.folder} is not complete (no index.json): run the data stage "
                            "(python train.py ... --stage data) first")
        self.store = store
        index = json.loads((store.folder / "index.json").read_text())
        self.num_samples = index["num_samples"]
        self.shard_size = index["shard_size"]
        self._read_header = read_safetensors_header
        self._sources: dict[int, object] = {}
        self._lock = threading.Lock()
        self.prompt_index = np.concatenate([self._source(s).read("prompt_index").numpy()
                                            for s in range(store.num_shards)])
        first = self._source(0).entries["latents"].shape
        self.latent_shape = tuple(first[1:])

    def __len__(self) -> int:
        return self.num_samples

    def _source(self, shard: int):
        from wan.checkpoint import SafetensorsSource

        with self._lock:
            if shard not in self._sources:
                why = self.store.check(shard)
                if why is not None:
                    raise DataError(f"dataset {self.store.folder}: shard {shard} is {why}; run the data stage "
                                    "again to regenerate it")
                path = self.store.shard_path(shard)
                self._sources[shard] = SafetensorsSource(self._read_header(path), str(path))
            return self._sources[shard]

    def latents(self, rows) -> np.ndarray:
        """x0 latents of these rows [len(rows), 16, h, w] float32."""
        out = np.empty((len(rows), *self.latent_shape), np.float32)
        for i, row in enumerate(rows):
            shard, offset = divmod(int(row), self.shard_size)
            out[i] = self._source(shard).read("latents", offset, offset + 1)[0].numpy()
        return out

    def all_latents(self) -> np.ndarray:
        return self.latents(range(self.num_samples))


class EmbeddingLRU:
    """Per-prompt embeddings read on demand from the EmbeddingCache, keeping the last `capacity`."""

    def __init__(self, cache, prompts: list[str], capacity: int = 4096):
        self.cache, self.prompts, self.capacity = cache, prompts, capacity
        self._items: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __getitem__(self, index: int) -> torch.Tensor:
        index = int(index)
        with self._lock:
            if index in self._items:
                self._items.move_to_end(index)
                return self._items[index]
        value = self.cache.get([self.prompts[index]])[0]
        with self._lock:
            self._items[index] = value
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value


class Prefetcher:
    """Runs `load(step)` for steps [start, stop) in a background thread, `depth` steps ahead."""

    def __init__(self, load: Callable[[int], object], start: int, stop: int, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()

        def work():
            for step in range(start, stop):
                if self._stop.is_set():
                    return
                try:
                    item = (step, load(step), None)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                    item = (step, None, exc)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if item[2] is not None:
                    return

        self._thread = threading.Thread(target=work, name="prefetch", daemon=True)
        self._thread.start()

    def get(self, step: int):
        got, value, error = self._queue.get()
        if error is not None:
            raise error
        assert got == step, (got, step)
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
