"""Checkpoint reading for the Wan teacher: `.pth` state dicts, (sharded) safetensors, strict loading.

Every failure is a `CheckpointError` that names the file and the first mismatches, so a user with a
half-downloaded release folder learns which file to fetch again. Nothing here downloads anything:
paths are local, and `.pth` files are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import warnings
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

SAFETENSORS_SINGLE = "diffusion_pytorch_model.safetensors"
SAFETENSORS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_MAX_LISTED = 5  # mismatches listed per category in an error message


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or does not fit the model it is loaded into."""


def require_file(path: str | os.PathLike, what: str) -> Path:
    """Return `path` as a Path, or raise a CheckpointError saying which `what` is missing."""
    path = Path(path)
    if not path.is_file():
        hint = " (the folder does not exist)" if not path.parent.is_dir() else ""
        raise CheckpointError(
            f"{what} not found: {path}{hint}. Point --teacher_path / checkpoint_dir at a complete "
            "Wan2.2-T2V-A14B release folder (see README, 'Checkpoint layout')."
        )
    return path


def _first_line(text: str, prefer: tuple[str, ...] = ()) -> str:
    """The line of a long library message that names the problem (one containing a `prefer` word), else the first."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    for line in lines:
        if any(word in line for word in prefer):
            return line
    return lines[0] if lines else ""


def load_torch_file(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Load a plain tensor state dict saved with torch.save, safely (weights_only=True), onto CPU.

    Nothing in the file is ever run: a pickle holding code or other objects than tensors is refused
    with a CheckpointError. Zip files (torch >= 1.6) are memory-mapped; legacy pickles are read whole."""
    import pickle

    path = require_file(path, what)
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap can only be used" not in str(exc):
                raise
            with warnings.catch_warnings():  # torch warns about the legacy format's pickle protocol
                warnings.simplefilter("ignore", UserWarning)
                state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        reason = _first_line(exc, ("GLOBAL", "Unsupported", "unsupported"))
        raise CheckpointError(
            f"{what} {path} is not a plain state dict of tensors: torch.load(weights_only=True) refused it "
            f"({reason}); nothing in it was run.\nRe-save it as a dict of tensors "
            "(torch.save(model.state_dict(), path)) or download the release file again."
        ) from exc
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name, cause attached
        raise CheckpointError(
            f"could not read {what} {path}: {type(exc).__name__}: {_first_line(exc)}\n"
            "The file is probably truncated or corrupt; download it again."
        ) from exc
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{what} {path} is not a state dict of tensors (it holds a {type(state).__name__})")
    stray = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if stray:
        raise CheckpointError(f"{what} {path} is not a state dict of tensors: {stray[0]!r} holds a "
                              f"{type(state[stray[0]]).__name__}" + (f" ({len(stray)} such entries)" if len(stray) > 1 else ""))
    return dict(state)


def _inside(folder: Path, name: str) -> Path:
    """Resolve `name` relative to `folder`, refusing anything that escapes the folder."""
    if not isinstance(name, str) or not name or os.path.isabs(name):
        raise CheckpointError(f"shard name {name!r} in {folder} must be a relative file name")
    target = (folder / name).resolve()
    if target.parent != folder.resolve():
        raise CheckpointError(
            f"shard {name!r} listed in the index of {folder} points outside that folder; refusing to read it"
        )
    return target


def read_safetensors_index(folder: str | os.PathLike, index_name: str = SAFETENSORS_INDEX) -> dict[str, Path]:
    """Parse a diffusers shard index: `{tensor name: shard path}`, every shard inside `folder`."""
    folder = Path(folder)
    index_path = require_file(folder / index_name, "safetensors index")
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path} is not a valid shard index (needs a 'weight_map'): {exc}") from exc
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: 'weight_map' must be a non-empty object")
    return {key: _inside(folder, shard) for key, shard in weight_map.items()}


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and its byte range inside the file."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the first element
    nbytes: int


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """Parse a safetensors file's header (no tensor data is read); checks every range lies inside the file."""
    path = require_file(path, "safetensors shard")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if not 0 < length <= min(size - 8, 100 << 20):
                raise ValueError(f"header length {length} does not fit a file of {size} bytes")
            header = json.loads(f.read(length))
        data_start = 8 + length
        entries = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            expected = math.prod(shape) * dtype.itemsize
            if end - begin != expected or data_start + end > size:
                raise ValueError(f"tensor {key!r} needs bytes [{begin}, {end}) of the data section, "
                                 f"which the {size}-byte file does not hold")
            entries[key] = TensorEntry(path, dtype, shape, data_start + begin, end - begin)
        return entries
    except Exception as exc:  # noqa: BLE001 - every parse failure means the same thing to the user
        raise CheckpointError(
            f"could not read safetensors file {path}: {type(exc).__name__}: {exc}. "
            "The file is probably truncated or corrupt; download it again."
        ) from exc


class TensorSource:
    """Tensors of a checkpoint, read on demand: whole, or a range of rows (dim 0) of one tensor.

    Built from safetensors headers (`open_diffusers_weights`) or from an in-memory / mmapped state
    dict (`StateDictSource`). Reading rows [start, stop) of a safetensors tensor reads exactly those
    bytes from disk (one pread), so a rank that owns a slice never touches the rest of the file.
    """

    description: str

    def shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        raise NotImplementedError


class SafetensorsSource(TensorSource):
    def __init__(self, entries: dict[str, TensorEntry], description: str):
        self.entries = entries
        self.description = description

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e.shape for k, e in self.entries.items()}

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key].dtype

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        entry = self.entries[key]
        if start is None or not entry.shape:
            start, stop, offset, nbytes, shape = 0, None, entry.begin, entry.nbytes, entry.shape
        else:
            row_bytes = math.prod(entry.shape[1:]) * entry.dtype.itemsize
            offset, nbytes = entry.begin + start * row_bytes, (stop - start) * row_bytes
            shape = (stop - start, *entry.shape[1:])
        buffer = bytearray(nbytes)
        with open(entry.path, "rb", buffering=0) as f:
            f.seek(offset)
            view, done = memoryview(buffer), 0
            while done < nbytes:
                got = f.readinto(view[done:])
                if not got:
                    raise CheckpointError(f"{entry.path} ended while reading {key!r}; the file is truncated")
                done += got
        if nbytes == 0:
            return torch.empty(shape, dtype=entry.dtype)
        return torch.frombuffer(buffer, dtype=entry.dtype).reshape(shape)


class StateDictSource(TensorSource):
    """A state dict (e.g. a `.pth` loaded with mmap=True) seen as a TensorSource; row reads are views."""

    def __init__(self, state: Mapping[str, torch.Tensor], description: str):
        self.state = state
        self.description = description

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.state.items()}

    def dtype(self, key: str) -> torch.dtype:
        return self.state[key].dtype

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        tensor = self.state[key]
        return tensor if start is None or tensor.dim() == 0 else tensor[start:stop]


def open_diffusers_weights(folder: str | os.PathLike) -> SafetensorsSource:
    """A diffusers-layout weight folder (single file, or shards + index) as a TensorSource.

    Only headers are read here; every index entry is checked against its shard's header (a key the
    index assigns to a shard that lacks it, or a range beyond the end of a truncated file, fails now).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    if (folder / SAFETENSORS_INDEX).is_file():
        weight_map = read_safetensors_index(folder)
        by_shard: dict[Path, list[str]] = {}
        for key, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(key)
        entries: dict[str, TensorEntry] = {}
        for shard, keys in sorted(by_shard.items()):
            header = read_safetensors_header(shard)
            missing = [k for k in keys if k not in header]
            if missing:
                raise CheckpointError(
                    f"{shard} lacks {len(missing)} tensor(s) its index assigns to it, e.g. {missing[:_MAX_LISTED]}"
                )
            entries.update({k: header[k] for k in keys})
        return SafetensorsSource(entries, f"{folder}/{SAFETENSORS_INDEX} ({len(by_shard)} shards)")
    if (folder / SAFETENSORS_SINGLE).is_file():
        path = folder / SAFETENSORS_SINGLE
        return SafetensorsSource(read_safetensors_header(path), str(path))
    raise CheckpointError(
        f"no weights in {folder}: expected {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} with its shards"
    )


def load_safetensors_file(path: str | os.PathLike, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Read tensors (all, or `keys`) from one safetensors file, reporting corruption with the file name."""
    header = read_safetensors_header(path)
    wanted = list(header) if keys is None else keys
    missing = [k for k in wanted if k not in header]
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} tensor(s) its index assigns to it, e.g. {missing[:_MAX_LISTED]}")
    source = SafetensorsSource(header, str(path))
    return {k: source.read(k) for k in wanted}


def load_diffusers_weights(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Load a whole diffusers-layout weight folder into memory. Returns (state, description)."""
    source = open_diffusers_weights(folder)
    return {k: source.read(k) for k in source.entries}, source.description


def check_state_dict(expected: Mapping[str, tuple], state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise one CheckpointError listing missing keys, unexpected keys and shape mismatches.

    `expected` maps key -> shape (tuple of ints), typically from `module.state_dict()`; `state` maps
    key -> tensor or shape.
    """
    def shape(value) -> tuple:
        return tuple(value.shape) if hasattr(value, "shape") else tuple(value)

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: file {shape(state[k])} vs model {tuple(expected[k])}"
        for k in expected
        if k in state and shape(state[k]) != tuple(expected[k])
    ]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s), first: {missing[:_MAX_LISTED]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), first: {unexpected[:_MAX_LISTED]}")
    if wrong:
        parts.append(f"{len(wrong)} shape mismatch(es), first: {wrong[:_MAX_LISTED]}")
    raise CheckpointError(
        f"checkpoint {source} does not match the model: " + "; ".join(parts)
        + ". Check that the config (sizes) fits this checkpoint."
    )


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Strictly load `state` into `module` after a full key/shape check.

    Works for modules built on the meta device (tensors are assigned, keeping the file's dtype, as
    upstream keeps the loaded dtype) and for materialised modules (copied in place).
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_state_dict(expected, state, source)
    on_meta = any(p.is_meta for p in module.parameters())
    module.load_state_dict(dict(state), strict=True, assign=on_meta)
    return module


# A view of one parameter's storage that this process fills: (local tensor, first global row it holds).
# The default is the whole tensor; `wan.distributed` supplies one for sharded (DTensor) parameters.
LocalView = Callable[[torch.Tensor], "tuple[torch.Tensor, int]"]


def _whole(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    return tensor, 0


def cast_like_source(module: nn.Module, source: TensorSource, dtype: torch.dtype | None = None) -> nn.Module:
    """On a meta module: give each floating parameter `dtype`, or (None) the dtype it has in the file.

    Casting on meta costs nothing and lets every later step (sharding, allocation, reading) happen in
    the final dtype, so no full-precision copy of a weight ever exists.
    """
    for name, tensor in module.state_dict(keep_vars=True).items():
        if not tensor.is_meta:
            raise ValueError(f"cast_like_source needs a module built on the meta device; {name} is on {tensor.device}")
        target = dtype if dtype is not None else source.dtype(name)
        if tensor.is_floating_point() and target.is_floating_point and tensor.dtype != target:
            tensor.data = tensor.data.to(target)
    return module


def fill_module(module: nn.Module, source: TensorSource, device: torch.device | str = "cpu",
                local_view: LocalView = _whole) -> nn.Module:
    """Strictly load `source` into a module built on meta (possibly sharded), reading only what it owns.

    The key/shape check runs first, on global shapes, before any memory is allocated. Then the module
    is materialised on `device` (`to_empty`) and each parameter is filled from the rows
    `local_view(param)` says this process holds, cast to the parameter's dtype on the way. Peak host
    memory is the module's own storage (if on the CPU) plus one tensor slice in flight.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_state_dict(expected, source.shapes(), source.description)
    names = set(expected)
    stray = [n for n, _ in module.named_buffers() if n not in names]
    if stray:
        raise ValueError(f"fill_module cannot restore non-persistent buffers {stray[:_MAX_LISTED]}; compute them after loading")
    module.to_empty(device=device)
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            local, first_row = local_view(tensor)
            if local.dim() == 0 or local.shape == tensor.shape:
                local.copy_(source.read(name))
            elif local.shape[0]:
                local.copy_(source.read(name, first_row, first_row + local.shape[0]))
    return module
