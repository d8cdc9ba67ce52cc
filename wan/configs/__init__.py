"""Task configs (EasyDict, upstream field names) and loading a config from a JSON file.

A release folder may carry its own sizes: a JSON config's `extensions` block (t5_*, vae_*, dit_*
keys) overrides the sizes upstream hard-codes for umT5-xxl and the VAE. `EXTENSION_DEFAULTS` are
the real release's values, used when a key is absent.
"""

from __future__ import annotations

import json
import os

import torch
from easydict import EasyDict

from ..modules.model import DiTConfig
from ..modules.t5 import T5Config
from ..modules.vae2_1 import VAEConfig
from .wan_t2v_A14B import t2v_A14B
from .wan_t2v_tiny import t2v_tiny

WAN_CONFIGS = {"t2v-A14B": t2v_A14B, "t2v-tiny": t2v_tiny}

SIZE_CONFIGS = {
    "720*1280": (720, 1280),
    "1280*720": (1280, 720),
    "480*832": (480, 832),
    "832*480": (832, 480),
    "1024*1024": (1024, 1024),
    "512*512": (512, 512),
}

# The sizes a task EasyDict leaves to code (upstream hard-codes them), as the typed configs beside each
# module define them; `extensions` blocks use these keys.
DIT_EXTENSION_FIELDS = ("model_type", "in_dim", "out_dim", "text_dim", "text_len")
EXTENSION_DEFAULTS = EasyDict(
    **T5Config().extension_block(),
    **{k: (tuple(v) if isinstance(v, list) else v) for k, v in VAEConfig().extension_block().items()},
    **{f"dit_{f}": getattr(DiTConfig(), f) for f in DIT_EXTENSION_FIELDS},
)
EXTENSION_DEFAULTS.dit_text_len = None  # None: the config's text_len

_DTYPE_FIELDS = ("t5_dtype", "param_dtype")
_TUPLE_FIELDS = ("vae_stride", "patch_size", "window_size", "sample_guide_scale")


def parse_dtype(value) -> torch.dtype:
    """'bfloat16' / 'torch.bfloat16' / torch.bfloat16 -> torch.bfloat16, with a clear error otherwise."""
    if isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {value!r}; use one of 'float32', 'bfloat16', 'float16'")
    return dtype


def extensions(config) -> EasyDict:
    """The config's size extensions with every key filled (release defaults where absent)."""
    ext = EasyDict(EXTENSION_DEFAULTS)
    ext.update({k: v for k, v in dict(config.get("extensions", None) or {}).items() if not k.startswith("_")})
    for k in ("vae_dim_mult", "vae_attn_scales", "vae_temperal_downsample"):
        ext[k] = tuple(ext[k])
    if ext.dit_text_len is None:
        ext.dit_text_len = config.text_len
    return ext


def t5_config(config) -> T5Config:
    """The task's umT5 sizes (release defaults where its extensions are silent)."""
    return T5Config(**T5Config.explicit_sizes(extensions(config)))


def vae_config(config) -> VAEConfig:
    return VAEConfig(**VAEConfig.explicit_sizes(extensions(config)))


def dit_config(config, num_layers: int | None = None) -> DiTConfig:
    """The DiT expert sizes of a task config (its EasyDict fields + dit_* extensions)."""
    ext = extensions(config)
    return DiTConfig(
        **{f: ext[f"dit_{f}"] for f in DIT_EXTENSION_FIELDS},
        patch_size=tuple(config.patch_size), dim=config.dim, ffn_dim=config.ffn_dim, freq_dim=config.freq_dim,
        num_heads=config.num_heads, num_layers=config.num_layers if num_layers is None else num_layers,
        window_size=tuple(config.window_size), qk_norm=config.qk_norm, cross_attn_norm=config.cross_attn_norm,
        eps=config.eps,
    )


def extension_block(t5: T5Config, vae: VAEConfig, dit: DiTConfig) -> dict:
    """The `extensions` block that records these sizes in a task config."""
    return {**t5.extension_block(), **vae.extension_block(), **{f"dit_{f}": getattr(dit, f) for f in DIT_EXTENSION_FIELDS}}


def load_config(path: str | os.PathLike) -> EasyDict:
    """Load a JSON config (upstream field names; dtype strings; lists for tuples) into an EasyDict.

    Missing fields are filled from t2v_A14B; an unknown top-level field is an error (likely a typo).
    """
    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config {path} is not valid JSON: {exc}") from exc
    unknown = sorted(k for k in raw if k not in t2v_A14B and k not in ("extensions",) and not k.startswith("_"))
    if unknown:
        raise ValueError(f"config {path}: unknown field(s) {unknown}; valid fields: {sorted(t2v_A14B)}")
    cfg = EasyDict(t2v_A14B)
    for key, value in raw.items():
        if key.startswith("_") and key != "__name__":
            continue
        if key in _DTYPE_FIELDS:
            value = parse_dtype(value)
        elif key in _TUPLE_FIELDS:
            value = tuple(value)
        cfg[key] = value
    if "extensions" in raw:
        cfg.extensions = EasyDict({k: v for k, v in raw["extensions"].items() if not k.startswith("_")})
    return cfg
