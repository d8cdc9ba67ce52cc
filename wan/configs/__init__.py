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

EXTENSION_DEFAULTS = EasyDict(
    t5_vocab_size=256384,
    t5_dim=4096,
    t5_dim_attn=4096,
    t5_dim_ffn=10240,
    t5_num_heads=64,
    t5_num_layers=24,
    t5_num_buckets=32,
    t5_shared_pos=False,
    vae_dim=96,
    vae_z_dim=16,
    vae_dim_mult=(1, 2, 4, 4),
    vae_num_res_blocks=2,
    vae_attn_scales=(),
    vae_temperal_downsample=(False, True, True),
    dit_model_type="t2v",
    dit_in_dim=16,
    dit_out_dim=16,
    dit_text_dim=4096,
    dit_text_len=None,  # None: the config's text_len
)

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
