"""An exported student: its parameters as one safetensors file and its config as JSON.

Owns the export format, which needs only `student_jax`, numpy, safetensors, flax and jax (no torch,
no `distill`, no orbax), so a student can be used where the distillation code cannot be installed:

    DIR/model.safetensors   every parameter, float32 as trained, named by its path in the flax
                            tree joined with "." (`blocks_0.self_attn.q.kernel`, `final_proj.bias`),
                            the blocks always one by one: a scanned student's stacked `blocks`
                            (`StudentConfig.scan_blocks`) are unstacked on save and restacked on load
    DIR/config.json         {"format": "wan-distill-student", "format_version": 1,
                             "student": the StudentConfig fields,
                             "sampling": what drawing a sample needs besides the weights (see below),
                             ...: any further sections the exporter adds (the teacher, the source run)}

The "sampling" section always holds the latent layout, taken from the StudentConfig so the two
cannot disagree: `latent_channels`, `teacher_channels`, `patch_size`, `projection_seed` (the
fixed map into the VAE's 16 channels when latent_channels != 16, `student_jax.projection`) and
`text_dim`; the exporter adds the schedule and text layout (`shift`, `text_len`, ...).

`save_student(dir, params, cfg)` writes both files (each atomically: a temporary file renamed
into place); `load_student(dir) -> (model, params, cfg)` reads them back bit for bit and checks
every parameter's name and shape against the model the config builds, naming what differs. So the
file does not depend on `scan_blocks`: an export written by either layout, or before the field
existed (the config's default, True, then applies), loads into the layout its config.json names.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from student_jax.config import StudentConfig
from student_jax.model import Student, stack_blocks, unstack_blocks

__all__ = ["CONFIG_FILE", "EXPORT_FORMAT", "ExportError", "WEIGHTS_FILE", "flatten_params", "load_student",
           "read_export_config", "save_student", "unflatten_params"]

EXPORT_FORMAT = "wan-distill-student"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_SEPARATOR = "."


class ExportError(ValueError):
    """An export folder that cannot be read (missing file, other format, parameters that do not fit)."""


def _named_leaves(tree: Any) -> dict[str, Any]:
    """{"a.b.kernel": leaf} of a nested dict, in the tree's (sorted) key order."""
    named = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        if any(_SEPARATOR in k for k in keys):
            raise ExportError(f"parameter path {keys} has a {_SEPARATOR!r} in a name; it could not be read back")
        named[_SEPARATOR.join(keys)] = leaf
    return named


def flatten_params(params: Any) -> dict[str, np.ndarray]:
    """A nested parameter dict -> {"a.b.kernel": host numpy array}."""
    return {name: np.asarray(jax.device_get(leaf)) for name, leaf in _named_leaves(params).items()}


def unflatten_params(flat: dict[str, np.ndarray]) -> dict:
    """The inverse of `flatten_params`: {"a.b.kernel": array} -> {"a": {"b": {"kernel": array}}}."""
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(_SEPARATOR)
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def _latent_layout(cfg: StudentConfig) -> dict:
    return {"latent_channels": cfg.latent_channels, "teacher_channels": cfg.teacher_channels,
            "patch_size": cfg.patch_size, "projection_seed": cfg.projection_seed, "text_dim": cfg.text_dim}


def _atomic_write(path: Path, write) -> None:
    """write(tmp_path) into a temporary file beside `path`, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # opened normally: the umask sets its mode
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_student(directory: str | os.PathLike, params: Any, cfg: StudentConfig,
                 info: dict[str, dict] | None = None) -> Path:
    """Write `params` (a Student parameter tree, e.g. a run's EMA) and `cfg` into `directory`.

    info: further JSON sections of config.json, e.g. {"sampling": {"shift": 12.0, "text_len": 512},
    "teacher": {...}}; its "sampling" entries are merged with the latent layout taken from `cfg`
    (a value that contradicts `cfg` is an error). Returns the folder.
    """
    from safetensors.numpy import save_file

    if not isinstance(cfg, StudentConfig):
        raise TypeError(f"save_student: cfg must be a StudentConfig, got {type(cfg).__name__}")
    info = dict(info or {})
    for reserved in ("format", "format_version", "student"):
        if reserved in info:
            raise ValueError(f"save_student: info may not set {reserved!r}; it is written from cfg")
    layout = _latent_layout(cfg)
    sampling = dict(info.pop("sampling", {}))
    clashes = [f"{k}={sampling[k]!r} (cfg: {v!r})" for k, v in layout.items() if k in sampling and sampling[k] != v]
    if clashes:
        raise ValueError(f"save_student: info['sampling'] contradicts the StudentConfig: {', '.join(clashes)}")
    flat = flatten_params(unstack_blocks(params))  # per-block names whatever the layout
    not_float32 = sorted(k for k, v in flat.items() if v.dtype != np.float32)
    if not_float32:  # the student keeps float32 parameters (bf16 is a compute dtype only)
        raise ValueError(f"save_student: parameters must be float32, got {flat[not_float32[0]].dtype} for "
                         f"{not_float32[:3]}")
    config = {"format": EXPORT_FORMAT, "format_version": FORMAT_VERSION, "student": dataclasses.asdict(cfg),
              "sampling": {**layout, **sampling}, "param_count": int(sum(v.size for v in flat.values())), **info}
    text = json.dumps(config, indent=1)  # fails here, before any file is written, if info is not JSON
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(flat, tmp, metadata={"format": EXPORT_FORMAT}))
    _atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    return folder


def read_export_config(directory: str | os.PathLike) -> dict:
    """The whole config.json of an export folder (checked to be this format)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ExportError(f"{path} not found: not an exported student (python -m distill.export writes one)")
    config = json.loads(path.read_text())
    if config.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path} is not a {EXPORT_FORMAT} config (format {config.get('format')!r})")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ExportError(f"{path} has format_version {config['format_version']}; this student_jax reads "
                          f"up to {FORMAT_VERSION}: update it")
    return config


def _expected_shapes(model: Student) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter the model defines (abstractly: no memory, no compute), in the
    export's per-block naming."""
    cfg = dataclasses.replace(model.cfg, scan_blocks=False)
    model = Student(cfg)
    x = jax.ShapeDtypeStruct((1, cfg.latent_channels, cfg.patch_size, cfg.patch_size), jnp.float32)  # [1, C, p, p]
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    text = jax.ShapeDtypeStruct((1, 1, cfg.text_dim), jnp.float32)  # [1, L=1, text_dim]
    mask = jax.ShapeDtypeStruct((1, 1), jnp.bool_)
    abstract = jax.eval_shape(model.init, jax.random.key(0), x, t, text, mask)["params"]
    return {k: tuple(v.shape) for k, v in _named_leaves(abstract).items()}


def load_student(directory: str | os.PathLike) -> tuple[Student, dict, StudentConfig]:
    """(model, params, cfg) of an export folder: `model.apply({"params": params}, x, t, text, text_mask)`.

    params are jax arrays on the default device, bitwise the exported ones.
    """
    from safetensors.numpy import load_file

    folder = Path(directory)
    config = read_export_config(folder)
    fields = {f.name for f in dataclasses.fields(StudentConfig)}
    unknown = sorted(set(config["student"]) - fields)
    if unknown:
        raise ExportError(f"{folder / CONFIG_FILE}: unknown StudentConfig fields {unknown}; was it written by a newer "
                          "student_jax?")
    cfg = StudentConfig(**config["student"])
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ExportError(f"{weights} not found (the export folder holds {CONFIG_FILE} but no weights)")
    flat = load_file(str(weights))
    model = Student(cfg)
    expected = _expected_shapes(model)
    got = {k: tuple(v.shape) for k, v in flat.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    mismatched = [f"{k} {got[k]} (model: {expected[k]})" for k in sorted(set(got) & set(expected)) if got[k] != expected[k]]
    if missing or unexpected or mismatched:
        parts = [f"{len(items)} {label} (e.g. {', '.join(items[:3])})"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched))
                 if items]
        raise ExportError(f"{weights} does not fit the student of {folder / CONFIG_FILE}: " + "; ".join(parts))
    params = unflatten_params(flat)
    if cfg.scan_blocks:
        params = stack_blocks(params, cfg.depth)  # numpy: stacked on the host
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return model, params, cfg
