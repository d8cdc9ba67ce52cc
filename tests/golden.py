"""Access to the golden vectors (../shared/golden, or $WAN_GOLDEN_DIR) and a recording allclose.

Cases are looked up in the golden folder first and then in `tests/golden_subset/`, a small copy
shipped with the repo so a fresh clone still runs real parity tests. A case found in neither skips
with a message that names the folder it looked for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SUBSET = Path(__file__).resolve().parent / "golden_subset"
GOLDEN_ENV = "WAN_GOLDEN_DIR"

# (case, tensor, max_abs_err, max_rel_err, atol, rtol) of every comparison made in this session;
# printed by conftest's terminal summary so issue notes quote measured numbers.
RECORDS: list[tuple[str, str, float, float, float, float]] = []


def golden_dir() -> Path:
    return Path(os.environ.get(GOLDEN_ENV, REPO.parent / "shared" / "golden"))


def case_path(name: str) -> Path:
    """Folder holding `<name>.safetensors`, or skip naming where we looked."""
    for folder in (golden_dir(), SUBSET):
        if (folder / f"{name}.safetensors").is_file():
            return folder
    pytest.skip(f"golden case {name!r} not found: {golden_dir()} is missing it (set ${GOLDEN_ENV})")


def load_case(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, json meta) of a golden case."""
    from safetensors.torch import load_file

    folder = case_path(name)
    return load_file(str(folder / f"{name}.safetensors")), json.loads((folder / f"{name}.json").read_text())


def tiny_release_dir() -> Path:
    """The tiny release-layout checkpoint folder, or skip naming the missing folder."""
    path = golden_dir() / "tiny_release"
    if not (path / "golden_pipeline.safetensors").is_file():
        pytest.skip(f"tiny release folder not found: {path} (set ${GOLDEN_ENV})")
    return path


def weights(tensors: dict[str, torch.Tensor], prefix: str = "weights.") -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def listed(tensors: dict[str, torch.Tensor], name: str) -> list[torch.Tensor]:
    """Collect `name.0`, `name.1`, ... into a list."""
    out, i = [], 0
    while f"{name}.{i}" in tensors:
        out.append(tensors[f"{name}.{i}"])
        i += 1
    assert out, f"no tensors named {name}.<i>"
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, case: str, name: str):
    """torch.allclose with shape/dtype checks first; records the max abs / rel error."""
    assert tuple(actual.shape) == tuple(expected.shape), f"{case}/{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{case}/{name}: non-finite values"
    err = (a - e).abs()
    max_abs = err.max().item() if err.numel() else 0.0
    max_rel = (err / (e.abs() + 1e-3)).max().item() if err.numel() else 0.0
    RECORDS.append((case, name, max_abs, max_rel, atol, rtol))
    ok = torch.allclose(a, e, atol=atol, rtol=rtol)
    assert ok, f"{case}/{name}: max abs err {max_abs:.3g}, max rel err {max_rel:.3g} (atol {atol}, rtol {rtol})"


def tolerance(meta: dict) -> tuple[float, float]:
    tol = meta["tolerance"]
    return tol["suggested_atol"], tol["suggested_rtol"]


def manifest(name: str) -> dict:
    """A full-size checkpoint manifest (key -> shape/dtype), from the golden folder or the subset."""
    for folder in (golden_dir(), SUBSET):
        path = folder / "checkpoint_manifests" / name
        if path.is_file():
            return json.loads(path.read_text())
    pytest.skip(f"checkpoint manifest {name!r} not found in {golden_dir() / 'checkpoint_manifests'} (set ${GOLDEN_ENV})")
