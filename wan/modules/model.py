"""The Wan2.2 diffusion transformer (`WanModel`): modules, forward pass and `from_pretrained`.

Owns the DiT with the release's state-dict names (t2v, i2v and ti2v layouts differ only in sizes and
in i2v's extra input channels), its 3-D rotary position embedding, the timestep embedding and the
loader for a diffusers-layout folder (`config.json` + safetensors shards).

Precision mirrors the reference pipeline, which calls the model under CUDA bfloat16 autocast:
the time embedding and projection, the modulation additions, the gated residual updates and the
whole head run in float32 (an autocast region forcing float32); norms compute in float32 and cast
back; rope angles are float64 (as upstream) but the rotation runs in float32 with autocast off (tables of
cos/sin per shape; the golden tests bound the difference); linear layers and attention follow the enclosing
autocast. Without autocast (CPU, golden tests) everything is plain float32.

Batching: each sample may have its own latent size, timestep (t of shape [B]) or per-token timesteps
(t of shape [B, seq_len]). Token sequences are zero-padded to `seq_len`; self-attention ignores a
sample's padded keys, so the outputs of valid tokens do not depend on `seq_len` or batch-mates. When
no sample is padded no key mask exists at all (SDPA's fastest kernels; no data-dependent branch for
`wan.compile`). The block's elementwise math (`modulate`, `gated_residual`, norms, rotary) is plain
torch, fused by `wan.compile` on GPU; the model itself knows nothing of compilation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import operator
import warnings
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..checkpoint import CheckpointError, check_state_dict, open_diffusers_weights, require_file
from .attention import attention

__all__ = [
    "WanModel",
    "DiTConfig",
    "AttentionCore",
    "WanAttentionBlock",
    "WanSelfAttention",
    "WanCrossAttention",
    "WanRMSNorm",
    "WanLayerNorm",
    "Head",
    "sinusoidal_embedding_1d",
    "rope_apply",
]

MODEL_TYPES = ("t2v", "i2v", "ti2v")
# config.json fields that become constructor arguments; the rest of WanModel's arguments are never
# saved by the release and always take their defaults (see golden dit_subfolder_config_json.json)
CONFIG_FIELDS = ("model_type", "text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "out_dim", "num_heads",
                 "num_layers", "eps")
CONFIG_IGNORED = ("patch_size", "cross_attn_norm", "qk_norm", "text_dim", "window_size")
ROPE_THETA = 10000.0




@dataclass(frozen=True)
class DiTConfig:
    """Sizes of one DiT expert: the one place they are written (defaults: a Wan2.2 A14B expert).

    `config.json` of a release expert folder holds the CONFIG_FIELDS subset; a task config's
    `extensions` block names the fields the task EasyDict lacks `dit_<field>`.
    """

    model_type: str = "t2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 16
    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 40
    num_layers: int = 40
    window_size: tuple[int, int] = (-1, -1)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6

    def build(self) -> "WanModel":
        """The model with these sizes, on the current default device (use `torch.device('meta')`)."""
        return WanModel(**dataclasses.asdict(self))

    def saved_fields(self) -> dict:
        """What a release's `config.json` records (CONFIG_FIELDS)."""
        return {k: getattr(self, k) for k in CONFIG_FIELDS}

    def config_json(self) -> dict:
        return {"_class_name": "WanModel", "_diffusers_version": "0.35.2", **self.saved_fields()}

    def param_count(self) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in self.build().parameters())

    @classmethod
    def from_folder(cls, folder: Path) -> "DiTConfig":
        """Read an expert folder's `config.json` (CONFIG_FIELDS only, as the release loader does)."""
        config_path = require_file(Path(folder) / "config.json", "DiT config.json")
        try:
            raw = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"DiT config {config_path} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise CheckpointError(f"DiT config {config_path} must be a JSON object; got {type(raw).__name__}")
        class_name = raw.get("_class_name", "WanModel")
        if class_name != "WanModel":
            warnings.warn(f"{config_path} describes a {class_name!r}, loading it as WanModel", stacklevel=3)
        kwargs = {k: raw[k] for k in CONFIG_FIELDS if k in raw}
        # upstream's WanModel defaults for what config.json leaves out
        defaults = dict(model_type="t2v", text_len=512, in_dim=16, dim=2048, ffn_dim=8192, freq_dim=256,
                        out_dim=16, num_heads=16, num_layers=32, eps=1e-6)
        try:
            return cls(**{**defaults, **kwargs})
        except TypeError as exc:
            raise CheckpointError(f"DiT config {config_path} has invalid values {kwargs}: {exc}") from exc


# ----------------------------------------------------------------------------------------------
# precision regions


def _float32_region(device_type: str):
    """Force float32 compute for the ops inside, whatever autocast the caller enabled."""
    if device_type == "cuda":
        # what the reference does: autocast with float32 also upcasts half-precision weights
        return torch.autocast("cuda", dtype=torch.float32)
    if torch.is_autocast_enabled(device_type):
        # CPU autocast cannot target float32; turning it off runs float32 inputs in float32
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _no_autocast(device_type: str):
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def matmul_dtype(device_type: str, linear: nn.Module) -> torch.dtype:
    """The dtype the block's linear layers compute in: the autocast dtype when autocast is on, else
    the weights' own (an `wan.fp8.Fp8Linear` states the dtype its float8 weight stands for)."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return getattr(linear, "compute_dtype", None) or linear.weight.dtype


# The block's elementwise math, as the reference computes it (float32 modulation and residual
# stream), written so that each is one pass in eager mode and fuses with its neighbours under
# torch.compile (`wan.compile.compile_dit`): the modulated activation is cast once to the matmul
# dtype instead of once per consuming linear layer.


def modulate(normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """normed * (1 + scale) + shift in float32 (adaLN), returned in `dtype` for the next linear layers."""
    return torch.addcmul(shift, normed.float(), 1 + scale).to(dtype)  # [B, L, dim]


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate in float32 (the residual stream stays float32 under autocast)."""
    return torch.addcmul(x.float(), y, gate)  # [B, L, dim]


# ----------------------------------------------------------------------------------------------
# embeddings


def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """[N] positions -> [N, dim] float64 embedding: cos of every frequency first, then sin."""
    half = dim // 2
    position = position.to(torch.float64)
    exponents = torch.arange(half, dtype=torch.float64, device=position.device).div(half)
    frequencies = torch.pow(10000.0, -exponents)  # [half]
    angles = torch.outer(position, frequencies)  # [N, half]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)  # [N, 2*half]


def rope_band_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of the (frame, row, column) rope bands; frames get the remainder."""
    side = 2 * (head_dim // 6)
    return head_dim - 2 * side, side, side


def _axis_angles(length: int, band_dim: int, device: torch.device) -> torch.Tensor:
    """[length + 1, band_dim/2] float64 angles pos * theta^(-2k/band_dim); the last row (all zero)
    is the identity rotation used for padded tokens."""
    inv_freq = 1.0 / torch.pow(ROPE_THETA, torch.arange(0, band_dim, 2, dtype=torch.float64, device=device) / band_dim)
    positions = torch.arange(length, dtype=torch.float64, device=device)
    angles = torch.outer(positions, inv_freq)  # [length, band_dim/2]
    return torch.cat([angles, angles.new_zeros(1, angles.shape[1])])  # [length + 1, band_dim/2]


def rope_table(grid: Sequence[int], seq_len: int, head_dim: int, device: torch.device) -> torch.Tensor:
    """Rotations (cos, sin) [seq_len, 1, head_dim/2, 2] (float32) of every token of one patch grid.

    Token n of a sample with patch grid (F, H, W) sits at (n // (H*W), n // W % H, n % W); the
    channel pairs of each band rotate by that band's position. The angles are computed in float64
    (as upstream) and only their cos/sin are rounded to float32, once per shape (the model caches
    the table), so the per-block rotation is float32 arithmetic: no float64 or complex kernels in the
    hot path. Padded tokens get angle 0 (cos 1, sin 0), which leaves them exactly unchanged. Built
    on `device` from `arange`: no host data is uploaded (so no host synchronisation).
    """
    f, h, w = (int(s) for s in grid)
    longest = max(f, h, w)
    token = torch.arange(seq_len, device=device)  # [L]
    valid = token < f * h * w
    positions = (token // (h * w), token // w % h, token % w)  # per axis [L]
    angles = []
    for position, band in zip(positions, rope_band_dims(head_dim)):
        table = _axis_angles(longest, band, device)  # [longest + 1, band/2]; the last row: identity
        angles.append(table[torch.where(valid, position, longest)])  # [L, band/2]
    angles = torch.cat(angles, dim=-1)[:, None]  # [L, 1, head_dim/2], broadcast over heads
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1).float()  # [L, 1, head_dim/2, 2]


def rope_tables(grid_sizes: Sequence[Sequence[int]], seq_len: int, head_dim: int,
                device: torch.device) -> torch.Tensor:
    """`rope_table` of every sample: [B, seq_len, 1, head_dim/2, 2] (float32)."""
    return torch.stack([rope_table(g, seq_len, head_dim, device) for g in grid_sizes])


def rope_apply(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x [B, L, heads, head_dim] in float32; returns float32.

    Pair (a, b) becomes (a cos - b sin, a sin + b cos) with (cos, sin) = freqs [B, L, 1, head_dim/2, 2]
    from `rope_tables`: the complex product (a + jb) exp(j angle) upstream computes in float64.
    """
    with _no_autocast(x.device.type):
        pairs = x.float().unflatten(-1, (-1, 2))  # [B, L, heads, head_dim/2, 2]
        a, b = pairs[..., 0], pairs[..., 1]  # [B, L, heads, head_dim/2]
        cos, sin = freqs[..., 0], freqs[..., 1]  # [B, L, 1, head_dim/2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)  # [B, L, heads, head_dim]


# ----------------------------------------------------------------------------------------------
# layers


class WanRMSNorm(nn.Module):
    """RMS norm over the last dim, computed in float32 and cast back; the weight multiplies afterwards."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type_as(x)


class AttentionCore(nn.Module):
    """The softmax attention of self-attention, as a parameterless module: the seam where sequence
    parallelism is applied from outside (hooks on it swap sequence and head shards around the call).

    forward(q, k, v, k_lens, window_size): q, k, v [B, L, heads, head_dim] -> [B, L, heads, head_dim].
    """

    def forward(self, q, k, v, k_lens=None, window_size=(-1, -1)):
        return attention(q, k, v, k_lens=k_lens, window_size=window_size)


class WanSelfAttention(nn.Module):
    """Self-attention with q/k RMS norm over the full dim, 3-D rope and per-sample key padding."""

    def __init__(self, dim: int, num_heads: int, window_size=(-1, -1), qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = tuple(window_size)
        self.qk_norm = qk_norm
        self.eps = eps
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.core = AttentionCore()

    def forward(self, x: torch.Tensor, seq_lens: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim]; seq_lens [B] valid tokens per sample (None: all); freqs [B, L, 1, head_dim/2, 2] rope."""
        heads_shape = (*x.shape[:2], self.num_heads, self.head_dim)
        q = self.norm_q(self.q(x)).view(heads_shape)  # [B, L, heads, head_dim]
        k = self.norm_k(self.k(x)).view(heads_shape)  # [B, L, heads, head_dim]
        v = self.v(x).view(heads_shape)  # [B, L, heads, head_dim]
        # rotated in float32, handed on in v's dtype: what attention would cast them to anyway, and
        # half the bytes through sequence parallelism's all-to-all
        q, k = rope_apply(q, freqs).type_as(v), rope_apply(k, freqs).type_as(v)
        out = self.core(q, k, v, seq_lens, self.window_size)
        return self.o(out.flatten(2))  # [B, L, dim]


class WanCrossAttention(WanSelfAttention):
    """Text cross-attention: queries from the video tokens, keys/values from the embedded context."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.core  # text keys are never sequence-sharded: no seam needed here

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_lens: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, dim]; context [B, L_text, dim]; context_lens None attends to every context row."""
        batch = x.shape[0]
        q = self.norm_q(self.q(x)).view(batch, -1, self.num_heads, self.head_dim)  # [B, L, heads, head_dim]
        k = self.norm_k(self.k(context)).view(batch, -1, self.num_heads, self.head_dim)  # [B, L_text, heads, hd]
        v = self.v(context).view(batch, -1, self.num_heads, self.head_dim)  # [B, L_text, heads, head_dim]
        out = attention(q, k, v, k_lens=context_lens)
        return self.o(out.flatten(2))  # [B, L, dim]


class WanAttentionBlock(nn.Module):
    """Modulated self-attention, cross-attention and FFN with float32 gated residual updates."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, window_size=(-1, -1), qk_norm: bool = True,
                 cross_attn_norm: bool = False, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.ffn_dim = ffn_dim
        self.num_heads = num_heads
        self.window_size = tuple(window_size)
        self.qk_norm = qk_norm
        self.cross_attn_norm = cross_attn_norm
        self.eps = eps
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = WanSelfAttention(dim, num_heads, window_size, qk_norm, eps)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(dim, num_heads, (-1, -1), qk_norm, eps)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, seq_lens: torch.Tensor | None, freqs: torch.Tensor,
                context: torch.Tensor,
                context_lens: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, dim]; e [B, L or 1, 6, dim] float32 (time projection, per token or per sample);
        seq_lens [B] valid tokens per sample, or None when every token is valid (no key mask)."""
        device_type = x.device.type
        dtype = matmul_dtype(device_type, self.ffn[0])
        with _float32_region(device_type):
            modulation = (self.modulation.unsqueeze(0) + e).chunk(6, dim=2)  # 6 x [B, L|1, 1, dim]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (m.squeeze(2) for m in modulation)

        y = self.self_attn(modulate(self.norm1(x), shift_msa, scale_msa, dtype), seq_lens, freqs)
        x = gated_residual(x, y, gate_msa)
        x = x + self.cross_attn(self.norm3(x), context, context_lens)
        y = self.ffn(modulate(self.norm2(x), shift_mlp, scale_mlp, dtype))
        return gated_residual(x, y, gate_mlp)


class Head(nn.Module):
    """Final modulated LayerNorm + Linear to patch pixels, all in float32; modulated by e (not e0)."""

    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim
        self.patch_size = tuple(patch_size)
        self.eps = eps
        self.norm = WanLayerNorm(dim, eps)
        self.head = nn.Linear(dim, out_dim * math.prod(patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim]; e [B, L or 1, dim] float32 -> [B, L, out_dim * prod(patch_size)]."""
        with _float32_region(x.device.type):
            shift, scale = (m.squeeze(2) for m in (self.modulation.unsqueeze(0) + e.unsqueeze(2)).chunk(2, dim=2))
            return self.head(self.norm(x) * (1 + scale) + shift)


# ----------------------------------------------------------------------------------------------
# the model


def _as_tuple(value, length: int, name: str) -> tuple[int, ...]:
    value = tuple(int(v) for v in value)
    if len(value) != length:
        raise ValueError(f"{name} must have {length} entries; got {value}")
    return value


class WanModel(nn.Module):
    """Wan2.2 DiT. forward(x, t, context, seq_len, y=None) -> list of [C_out, F, H, W] float32."""

    def __init__(
        self,
        model_type: str = "t2v",
        patch_size: tuple[int, int, int] = (1, 2, 2),
        text_len: int = 512,
        in_dim: int = 16,
        dim: int = 2048,
        ffn_dim: int = 8192,
        freq_dim: int = 256,
        text_dim: int = 4096,
        out_dim: int = 16,
        num_heads: int = 16,
        num_layers: int = 32,
        window_size: tuple[int, int] = (-1, -1),
        qk_norm: bool = True,
        cross_attn_norm: bool = True,
        eps: float = 1e-6,
    ):
        super().__init__()
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}; got {model_type!r}")
        patch_size = _as_tuple(patch_size, 3, "patch_size")
        window_size = _as_tuple(window_size, 2, "window_size")
        if min(patch_size) < 1:
            raise ValueError(f"patch_size entries must be positive; got {patch_size}")
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim {dim} must split into num_heads {num_heads} heads of even size (rope pairs)")
        if freq_dim % 2:
            raise ValueError(f"freq_dim must be even (cos and sin halves); got {freq_dim}")
        self.model_type = model_type
        self.patch_size = patch_size
        self.text_len = text_len
        self.in_dim = in_dim
        self.dim = dim
        self.ffn_dim = ffn_dim
        self.freq_dim = freq_dim
        self.text_dim = text_dim
        self.out_dim = out_dim
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.window_size = window_size
        self.qk_norm = qk_norm
        self.cross_attn_norm = cross_attn_norm
        self.eps = eps

        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=patch_size, stride=patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(
            WanAttentionBlock(dim, ffn_dim, num_heads, window_size, qk_norm, cross_attn_norm, eps)
            for _ in range(num_layers)
        )
        self.head = Head(dim, out_dim, patch_size, eps)
        # rope rotations per (patch grid, seq_len, device): training repeats a few shapes every step
        self._rope_cache: dict[tuple, torch.Tensor] = {}

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    # ------------------------------------------------------------------------------------------
    # input checks

    def _check_inputs(self, x, t, context, seq_len, y):
        if isinstance(x, torch.Tensor):
            x = list(x) if x.dim() == 5 else [x]
        if isinstance(context, torch.Tensor):
            context = list(context) if context.dim() == 3 else [context]
        x, context = list(x), list(context)
        if not x:
            raise ValueError("x is empty: pass a list of latents [C, F, H, W]")
        if len(x) != len(context):
            raise ValueError(
                f"x has {len(x)} latents but context has {len(context)} entries; give one context per latent"
            )
        try:
            seq_len = operator.index(seq_len)
        except TypeError:
            raise ValueError(f"seq_len must be a positive int; got {seq_len!r}") from None
        if seq_len < 1:
            raise ValueError(f"seq_len must be a positive int; got {seq_len!r}")
        if y is not None:
            if isinstance(y, torch.Tensor):
                y = list(y) if y.dim() == 5 else [y]
            y = list(y)
            if len(y) != len(x):
                raise ValueError(f"y has {len(y)} entries but x has {len(x)}; give one conditioning latent per sample")
        elif self.model_type == "i2v":
            raise ValueError("model_type 'i2v' needs y (mask + image latent channels, concatenated to x on channels)")
        for b, u in enumerate(x):
            if not isinstance(u, torch.Tensor) or u.dim() != 4:
                raise ValueError(f"x[{b}] must be a tensor [C, F, H, W]; got {getattr(u, 'shape', type(u))}")
            channels = u.shape[0]
            if y is not None:
                if not isinstance(y[b], torch.Tensor) or y[b].dim() != 4 or y[b].shape[1:] != u.shape[1:]:
                    raise ValueError(
                        f"y[{b}] must be [C_y, F, H, W] with the latent's F, H, W {tuple(u.shape[1:])}; "
                        f"got {tuple(getattr(y[b], 'shape', ()))}"
                    )
                channels += y[b].shape[0]
            if channels != self.in_dim:
                extra = " (x and y channels together)" if y is not None else ""
                raise ValueError(f"sample {b} has {channels} channels{extra}; this model takes in_dim={self.in_dim}")
            sizes = tuple(u.shape[1:])
            if any(s % p or s == 0 for s, p in zip(sizes, self.patch_size)):
                raise ValueError(
                    f"x[{b}] has (F, H, W) = {sizes}, not a positive multiple of patch_size {self.patch_size}"
                )
            count = math.prod(s // p for s, p in zip(sizes, self.patch_size))
            if count > seq_len:
                raise ValueError(
                    f"x[{b}] has {count} tokens, more than seq_len={seq_len}; pass a seq_len of at least "
                    "the largest sample's token count F*H*W/prod(patch_size)"
                )
        for b, c in enumerate(context):
            if not isinstance(c, torch.Tensor) or c.dim() != 2 or c.shape[1] != self.text_dim:
                raise ValueError(
                    f"context[{b}] must be [L, text_dim={self.text_dim}]; got {tuple(getattr(c, 'shape', ()))}"
                )
            if c.shape[0] > self.text_len:
                raise ValueError(
                    f"context[{b}] has {c.shape[0]} rows, more than text_len={self.text_len}; "
                    "truncate the text embedding"
                )
        t = torch.as_tensor(t)
        batch = len(x)
        if not (t.shape == (batch,) or t.shape == (batch, seq_len)):
            raise ValueError(
                f"t must be [B]={[batch]} (one timestep per sample) or [B, seq_len]={[batch, seq_len]} "
                f"(per token); got {list(t.shape)}"
            )
        if t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"t must hold real timesteps; got dtype {t.dtype}")
        return x, t, context, seq_len, y

    # ------------------------------------------------------------------------------------------
    # forward pieces

    def embed_patches(self, x: list[torch.Tensor], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch-embed each latent, flatten tokens in (f, h, w) order, zero-pad to seq_len.

        Returns hidden [B, seq_len, dim] and grid_sizes [B, 3] (patch grid per sample, int64 on CPU).
        """
        if all(u.shape == x[0].shape for u in x):  # one conv call when every sample has the same size
            grids = [self.patch_embedding(torch.stack(x))]  # [B, dim, F_p, H_p, W_p]
        else:
            grids = [self.patch_embedding(u.unsqueeze(0)) for u in x]  # each [1, dim, F_p, H_p, W_p]
        grid_sizes = torch.tensor([list(g.shape[2:]) for g in grids for _ in range(g.shape[0])], dtype=torch.long)
        hidden = []
        for g in grids:
            tokens = g.flatten(2).transpose(1, 2)  # [b, F_p*H_p*W_p, dim]
            hidden.append(nn.functional.pad(tokens, (0, 0, 0, seq_len - tokens.shape[1])))  # [b, seq_len, dim]
        return torch.cat(hidden), grid_sizes

    def embed_time(self, t: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """e [B, L', dim] and e0 [B, L', 6, dim] (float32), L' = 1 for per-sample t, seq_len for per-token t."""
        batch = t.shape[0]
        steps = t.reshape(batch, -1)  # [B, 1] or [B, seq_len]
        with _float32_region(t.device.type):
            sinusoid = sinusoidal_embedding_1d(self.freq_dim, steps.flatten())  # [B*L', freq_dim] float64
            e = self.time_embedding(sinusoid.unflatten(0, steps.shape).float())  # [B, L', dim]
            e0 = self.time_projection(e).unflatten(2, (6, self.dim))  # [B, L', 6, dim]
        return e, e0

    def embed_text(self, context: list[torch.Tensor]) -> torch.Tensor:
        """Zero-pad each [L_i, text_dim] context to text_len rows, then embed: [B, text_len, dim]."""
        padded = nn.utils.rnn.pad_sequence(context, batch_first=True)  # [B, max L_i, text_dim], one op
        padded = nn.functional.pad(padded, (0, 0, 0, self.text_len - padded.shape[1]))  # [B, text_len, text_dim]
        return self.text_embedding(padded)  # [B, text_len, dim]

    def rope(self, grid_sizes: torch.Tensor, seq_len: int, device: torch.device) -> torch.Tensor:
        """Rope (cos, sin) [B, seq_len, 1, head_dim/2, 2] float32 for these patch grids, from tables
        cached per grid, so a batch of any size and mix of known grids costs no new table (one
        broadcast view when every sample has the same grid)."""
        grids = [tuple(g) for g in grid_sizes.tolist()]
        tables = []
        for grid in grids:
            key = (grid, seq_len, str(device))
            if key not in self._rope_cache:
                if len(self._rope_cache) >= 64:  # shapes keep changing: start over rather than grow
                    self._rope_cache.clear()
                self._rope_cache[key] = rope_table(grid, seq_len, self.head_dim, device)
            tables.append(self._rope_cache[key])
        if all(g == grids[0] for g in grids):
            return tables[0].expand(len(grids), *tables[0].shape)  # [B, L, 1, head_dim/2, 2], no copy
        return torch.stack(tables)

    def forward(
        self,
        x: list[torch.Tensor],
        t: torch.Tensor,
        context: list[torch.Tensor],
        seq_len: int,
        y: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Denoise a batch of latents.

        x: list of [C_in, F, H, W] (C_in + C_y = in_dim); t: [B] per-sample or [B, seq_len] per-token
        timesteps; context: list of [L_i <= text_len, text_dim]; seq_len: padded token count, at least
        every sample's F*H*W/prod(patch_size); y: optional list of [C_y, F, H, W] concatenated to x on
        channels (required for i2v). Returns a list of [out_dim, F, H, W] float32.
        """
        x, t, context, seq_len, y = self._check_inputs(x, t, context, seq_len, y)
        weight = self.patch_embedding.weight
        device = weight.device
        # under autocast the layers cast for themselves; without it they need their weights' dtype
        # (e.g. the bf16 T5 context into a float32 model)
        dtype = None if torch.is_autocast_enabled(device.type) else weight.dtype
        if y is not None:
            x = [torch.cat([u, v.to(u.device)]) for u, v in zip(x, y)]  # [C_in + C_y, F, H, W]
        x = [u.to(device=device, dtype=dtype) for u in x]
        context = [c.to(device=device, dtype=dtype) for c in context]
        t = t.to(device)

        hidden, grid_sizes = self.embed_patches(x, seq_len)  # [B, seq_len, dim]
        seq_lens = grid_sizes.prod(dim=1)  # [B] valid tokens per sample (CPU)
        e, e0 = self.embed_time(t, seq_len)
        text = self.embed_text(context)
        freqs = self.rope(grid_sizes, seq_len, device)
        # no key mask at all when every sample fills seq_len (the distillation case): attention then
        # takes SDPA's fastest kernels, and a compiled block sees no data-dependent branch
        key_lens = None if bool((seq_lens == seq_len).all()) else seq_lens
        for block in self.blocks:
            hidden = block(hidden, e0, key_lens, freqs, text, None)
        out = self.head(hidden, e).float()  # [B, seq_len, out_dim * prod(patch)]
        return self.unpatchify(out, grid_sizes)

    def unpatchify(self, x: torch.Tensor, grid_sizes: torch.Tensor) -> list[torch.Tensor]:
        """[B, seq_len, out_dim*prod(patch)] -> list of [out_dim, F, H, W], dropping padded tokens."""
        pt, ph, pw = self.patch_size
        grids = grid_sizes.tolist()
        if all(g == grids[0] for g in grids):  # one batched reshape when every sample has the same grid
            f, h, w = grids[0]
            u = x[:, : f * h * w].reshape(x.shape[0], f, h, w, pt, ph, pw, self.out_dim)  # [B, F_p, H_p, W_p, pt, ph, pw, C]
            # a permute, not an einsum: an einsum would run in the enclosing autocast's bf16
            u = u.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, F_p, pt, H_p, ph, W_p, pw]
            return list(u.reshape(x.shape[0], self.out_dim, f * pt, h * ph, w * pw).unbind(0))  # B x [C, F, H, W]
        out = []
        for u, (f, h, w) in zip(x, grids):
            u = u[: f * h * w].view(f, h, w, pt, ph, pw, self.out_dim)  # [F_p, H_p, W_p, pt, ph, pw, C]
            u = u.permute(6, 0, 3, 1, 4, 2, 5)  # [C, F_p, pt, H_p, ph, W_p, pw]
            out.append(u.reshape(self.out_dim, f * pt, h * ph, w * pw))  # [C, F, H, W]
        return out

    # ------------------------------------------------------------------------------------------
    # loading

    @classmethod
    def from_pretrained(cls, checkpoint_dir, subfolder: str | None = None, torch_dtype=None,
                        device="cpu", parallelize: Callable[[nn.Module], nn.Module] | None = None,
                        local_view=None) -> "WanModel":
        """Load a diffusers-layout DiT folder (`config.json` + safetensors, single file or shards).

        Build on meta -> cast -> `parallelize(model)` (e.g. FSDP from `wan.distributed`) -> allocate on
        `device` and read each tensor (or, through `local_view`, only this rank's rows of it) straight
        from the shards, cast on the way: no second copy of the weights ever exists in host memory.
        Only the fields in CONFIG_FIELDS are read from config.json (patch_size, cross_attn_norm,
        qk_norm, text_dim and window_size always take their defaults, as in the release). The weights
        keep the file's dtype unless `torch_dtype` is given. Returns the model in eval mode without grads.
        """
        from ..checkpoint import cast_like_source, fill_module

        folder = Path(checkpoint_dir) / subfolder if subfolder else Path(checkpoint_dir)
        config = DiTConfig.from_folder(folder)
        try:
            with torch.device("meta"):
                model = config.build()
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"DiT config {folder / 'config.json'} has invalid values "
                                  f"{config.saved_fields()}: {exc}") from exc
        source = open_diffusers_weights(folder)
        check_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()}, source.shapes(),
                         source.description)
        dtype = None
        if torch_dtype is not None:
            from ..configs import parse_dtype

            dtype = parse_dtype(torch_dtype)
        cast_like_source(model, source, dtype)
        model.eval().requires_grad_(False)
        if parallelize is not None:
            model = parallelize(model)
        fill_module(model, source, device, **({} if local_view is None else {"local_view": local_view}))
        return model
