"""Checkpoint reading for the Wan teacher: `.pth` state dicts, (sharded) safetensors, strict loading.

Every failure is a `CheckpointError` that names the file and the first mismatches, so a user with a
half-downloaded release folder learns which file to fetch again. Nothing here downloads anything:
paths are local, and `.pth` files are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

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


def load_torch_file(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Load a plain tensor state dict saved with torch.save, safely (weights_only=True), onto CPU."""
    path = require_file(path, what)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name, cause attached
        raise CheckpointError(f"could not read {what} {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{what} {path} is not a state dict of tensors (got {type(state).__name__})")
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


def load_safetensors_file(path: str | os.PathLike, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Read tensors (all, or `keys`) from one safetensors file, reporting corruption with the file name."""
    from safetensors import safe_open

    path = require_file(path, "safetensors shard")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            available = set(f.keys())
            wanted = list(available) if keys is None else keys
            missing = [k for k in wanted if k not in available]
            if missing:
                raise CheckpointError(
                    f"{path} lacks {len(missing)} tensor(s) its index assigns to it, e.g. {missing[:_MAX_LISTED]}"
                )
            return {k: f.get_tensor(k) for k in wanted}
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(
            f"could not read safetensors file {path}: {type(exc).__name__}: {exc}. "
            "The file is probably truncated or corrupt; download it again."
        ) from exc


def load_diffusers_weights(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Load a diffusers-layout weight folder (single file or shards + index). Returns (state, description)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    if (folder / SAFETENSORS_INDEX).is_file():
        weight_map = read_safetensors_index(folder)
        by_shard: dict[Path, list[str]] = {}
        for key, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(key)
        state: dict[str, torch.Tensor] = {}
        for shard, keys in sorted(by_shard.items()):
            state.update(load_safetensors_file(shard, keys))
        return state, f"{folder}/{SAFETENSORS_INDEX} ({len(by_shard)} shards)"
    if (folder / SAFETENSORS_SINGLE).is_file():
        return load_safetensors_file(folder / SAFETENSORS_SINGLE), str(folder / SAFETENSORS_SINGLE)
    raise CheckpointError(
        f"no weights in {folder}: expected {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} with its shards"
    )


def check_state_dict(expected: Mapping[str, tuple], state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise one CheckpointError listing missing keys, unexpected keys and shape mismatches.

    `expected` maps key -> shape (tuple of ints), typically from `module.state_dict()`.
    """
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k])}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])
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
