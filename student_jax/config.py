"""Configs of the student model and its optimizer, and the named model presets.

Owns `StudentConfig` (architecture, compute dtype, the channel projection seed), `OptimConfig`
(AdamW + warmup/cosine schedule + clipping + accumulation + EMA), `student_preset(name)` and
`PRESETS`. Every field is a plain type so tyro can expose it as a flag
(`--student.hidden-size 768 --optim.lr 3e-4`).

Both dataclasses are frozen: `Student(cfg)` is a flax Module whose config must be hashable (jit
caches on it), and a config that cannot change under a running trainer is easier to reason
about. Derive variants with `dataclasses.replace(cfg, total_steps=...)`.

Step counts in `OptimConfig` (warmup_steps, total_steps) count `train_step` calls, i.e.
micro-steps when grad_accum > 1; see `student_jax.optim`.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

__all__ = ["PRESETS", "OptimConfig", "StudentConfig", "saved_student_fields", "student_preset"]

_DTYPES = ("float32", "bfloat16")
_ATTENTION_IMPLS = ("auto", "xla", "cudnn")
_REMAT_POLICIES = ("full", "dots")


def _require(condition: bool, message: str):
    if not condition:
        raise ValueError(message)


def _positive_int(name: str, value, where: str):
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= 1,
        f"{where}: {name} must be an int >= 1, got {value!r}",
    )


@dataclass(frozen=True)
class StudentConfig:
    """Architecture of the DiT-style student (see student_jax/model.py for what each part does).

    latent_channels: channels C of the student's latent space (its input and output).
    teacher_channels: channels of the teacher / Wan VAE latent space (16). When it differs from
        latent_channels, a fixed orthonormal projection seeded by `projection_seed` maps between them.
    patch_size: side of the square latent patches that become tokens (H and W must be multiples).
    hidden_size, depth, num_heads, mlp_ratio: transformer width, number of blocks, attention heads
        (hidden_size must be divisible by num_heads and by 4 for the 2D sincos position embedding),
        MLP width multiplier.
    text_dim: width of the umT5 text embeddings (4096); max_text_len: longest accepted text.
    dtype: "float32", or "bfloat16" for bf16 compute with float32 parameters.
    remat: rematerialise each block in the backward pass (less activation memory, more compute).
    remat_policy: what a rematerialised block keeps from its forward pass: "full" keeps only its input
        (the least memory; the backward pass reruns the whole block), "dots" also keeps the outputs of
        its dense layers (`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`), so the backward
        pass reruns only attention and the elementwise work. Ignored without `remat`.
    scan_blocks: run the `depth` blocks as one `flax.linen.scan` over parameters stacked on a leading
        layer axis (`blocks/...` [depth, ...]), so compile time does not grow with depth; False keeps
        the unrolled layout (`blocks_0/...`, `blocks_1/...`). Both compute the same function; exports
        always name the blocks one by one (`student_jax.export`).
    attention_impl: "auto" (the default: "cudnn" on a GPU with dtype="bfloat16", else "xla"), "xla"
        (any backend) or "cudnn" (GPU flash attention for the unmasked self-attention; needs
        dtype="bfloat16"; measured on an H200 for `small`, batch 8, 1024^2: 142 ms and 38.7 GB against
        340 ms and 126 GB with "xla"). The cross-attention to the masked text uses "xla" unless
        `cudnn_text_attention`.
    cudnn_text_attention: where the self-attention runs on cuDNN, run the cross-attention there too,
        the text mask read as a prefix (the first `sum(mask)` tokens real, as every caller pads the
        text) instead of a materialised [B, heads, N, L] score matrix. Off here, on in the a14b preset
        (distill.config): 22% off `small`'s step at 1024^2 on an H100 (README "Speed")."""

    latent_channels: int = 16
    teacher_channels: int = 16
    patch_size: int = 2
    hidden_size: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    text_dim: int = 4096
    max_text_len: int = 512
    dtype: str = "float32"
    projection_seed: int = 0
    remat: bool = False
    remat_policy: str = "full"
    attention_impl: str = "auto"
    cudnn_text_attention: bool = False
    scan_blocks: bool = True

    def __post_init__(self):
        where = "StudentConfig"
        for name in ("latent_channels", "teacher_channels", "patch_size", "hidden_size", "depth",
                     "num_heads", "text_dim", "max_text_len"):
            _positive_int(name, getattr(self, name), where)
        _require(
            self.hidden_size % self.num_heads == 0,
            f"{where}: hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}",
        )
        _require(
            self.hidden_size % 4 == 0,
            f"{where}: hidden_size={self.hidden_size} must be divisible by 4 (2D sincos position embedding)",
        )
        _require(
            isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio > 0,
            f"{where}: mlp_ratio must be a number > 0, got {self.mlp_ratio!r}",
        )
        _require(self.dtype in _DTYPES, f"{where}: dtype must be one of {list(_DTYPES)}, got {self.dtype!r}")
        _require(
            self.attention_impl in _ATTENTION_IMPLS,
            f"{where}: attention_impl must be one of {list(_ATTENTION_IMPLS)}, got {self.attention_impl!r}",
        )
        _require(
            self.remat_policy in _REMAT_POLICIES,
            f"{where}: remat_policy must be one of {list(_REMAT_POLICIES)}, got {self.remat_policy!r}",
        )
        _require(
            self.attention_impl != "cudnn" or self.dtype == "bfloat16",
            f"{where}: attention_impl='cudnn' needs dtype='bfloat16' (cuDNN flash attention has no float32 kernel)",
        )
        _require(
            not self.cudnn_text_attention or (self.dtype == "bfloat16" and self.attention_impl != "xla"),
            f"{where}: cudnn_text_attention needs dtype='bfloat16' and attention_impl 'auto' or 'cudnn'",
        )
        _require(
            isinstance(self.projection_seed, int) and not isinstance(self.projection_seed, bool)
            and self.projection_seed >= 0,
            f"{where}: projection_seed must be an int >= 0, got {self.projection_seed!r}",
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup, cosine decay to `end_lr_ratio * lr`, global-norm clipping, optional
    gradient accumulation (grad_accum micro-steps per update) and a parameter EMA.

    warmup_steps and total_steps count train_step calls (micro-steps); the trainer sets total_steps
    to its number of training steps. clip_norm <= 0 disables clipping; weight decay applies to
    matrices (ndim >= 2) only, not to biases and norm scales.
    """

    lr: float = 1e-4
    warmup_steps: int = 100
    total_steps: int = 10000
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    clip_norm: float = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.999

    def __post_init__(self):
        where = "OptimConfig"
        _require(self.lr > 0, f"{where}: lr must be > 0, got {self.lr!r}")
        _require(
            isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
            f"{where}: warmup_steps must be an int >= 0, got {self.warmup_steps!r}",
        )
        _positive_int("total_steps", self.total_steps, where)
        _require(
            self.warmup_steps <= self.total_steps,
            f"{where}: warmup_steps={self.warmup_steps} exceeds total_steps={self.total_steps}; "
            "lower warmup_steps or raise total_steps",
        )
        _require(0 <= self.end_lr_ratio <= 1, f"{where}: end_lr_ratio must be in [0, 1], got {self.end_lr_ratio!r}")
        _require(self.weight_decay >= 0, f"{where}: weight_decay must be >= 0, got {self.weight_decay!r}")
        _require(
            0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"{where}: b1 and b2 must be in [0, 1), got {self.b1}, {self.b2}"
        )
        _positive_int("grad_accum", self.grad_accum, where)
        _require(0 <= self.ema_decay <= 1, f"{where}: ema_decay must be in [0, 1], got {self.ema_decay!r}")


def _tiny() -> StudentConfig:
    # CPU tests and smoke runs: a training step at 8x8 latents takes milliseconds. Two blocks compile
    # faster unrolled than scanned (8.0 vs 11.3 s on 2 CPU cores) and run a little faster too.
    return StudentConfig(hidden_size=64, depth=2, num_heads=4, scan_blocks=False)


def _small() -> StudentConfig:
    # DiT-B width/depth with cross-attention: ~0.16B parameters.
    return StudentConfig(hidden_size=768, depth=12, num_heads=12, dtype="bfloat16")


def _base() -> StudentConfig:
    # DiT-XL width/depth with cross-attention: ~0.82B parameters.
    return StudentConfig(hidden_size=1152, depth=28, num_heads=16, dtype="bfloat16")


_PRESET_BUILDERS = {"tiny": _tiny, "small": _small, "base": _base}
PRESETS: tuple[str, ...] = tuple(_PRESET_BUILDERS)


def student_preset(name: str, **overrides) -> StudentConfig:
    """The named preset ("tiny", "small" or "base"), with optional field overrides.

    Unknown names or fields raise a ValueError naming the closest valid one.
    """
    if name not in _PRESET_BUILDERS:
        close = difflib.get_close_matches(str(name), PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown student preset {name!r}{hint}; choose one of {list(PRESETS)}")
    cfg = _PRESET_BUILDERS[name]()
    fields = {f.name for f in dataclasses.fields(StudentConfig)}
    for key in overrides:
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"student_preset({name!r}): unknown StudentConfig field {key!r}{hint}")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


# StudentConfig fields added since runs were first saved, with the value that reproduces such a run:
# a checkpoint written before `scan_blocks` existed holds the unrolled per-block parameter layout.
_FIELDS_OF_OLDER_RUNS = {"scan_blocks": False, "remat_policy": "full", "cudnn_text_attention": False}


def saved_student_fields(fields: dict) -> dict:
    """The StudentConfig fields of a saved run (a checkpoint's config or a run's config.json "student"
    section) with every field added since that save set to the value the saved run used.

    Compare a checkpoint's student with the current config through this: a run saved before
    `scan_blocks` existed then reads as `scan_blocks=False`, which is the layout its checkpoint holds.
    """
    return {**_FIELDS_OF_OLDER_RUNS, **fields}
