"""Multi-head attention kernels for the Wan DiT: padding-aware SDPA, flash-attn when available.

Owns `attention` (the function the DiT calls) and `flash_attention` (upstream's name, which always
computes in half precision). Both take q [B, Lq, heads, head_dim] and k, v [B, Lk, heads, head_dim]
and return [B, Lq, heads, head_dim] in q's dtype.

Key padding: `k_lens[b]` is the number of real keys of sample b; keys at positions >= k_lens[b] get
no weight. Query padding: with `q_lens`, output rows at positions >= q_lens[b] are zero (they are
computed or skipped, never used). The DiT always computes every query and masks keys only.

Precision: `dtype=None` means "the autocast dtype if autocast is on for q's device, else q's dtype",
so the same call is exact float32 on CPU (the golden vectors) and bfloat16 under the GPU pipeline's
autocast (what upstream's flash-attention call does). flash-attn (2 or 3) is used when importable and
the inputs are CUDA tensors computed in fp16/bf16; otherwise torch SDPA with a boolean key mask. No
mask is built when no lengths are given or every length equals the sequence length, so the common
batch-1 pipeline call runs SDPA's fastest fused backend (cuDNN on H100); on CUDA, unequal key lengths
run one unmasked SDPA call per sample on its real keys, which beats any masked kernel there.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F

try:  # flash-attn 3 (Hopper); its functions may return (out, softmax_lse)
    import flash_attn_interface as _fa3

    FLASH_ATTN_3_AVAILABLE = True
except Exception:  # noqa: BLE001 - any import failure means "not usable"
    _fa3 = None
    FLASH_ATTN_3_AVAILABLE = False

try:  # flash-attn 2
    import flash_attn as _fa2

    FLASH_ATTN_2_AVAILABLE = True
except Exception:  # noqa: BLE001
    _fa2 = None
    FLASH_ATTN_2_AVAILABLE = False

__all__ = ["attention", "flash_attention", "FLASH_ATTN_2_AVAILABLE", "FLASH_ATTN_3_AVAILABLE"]

_HALF = (torch.float16, torch.bfloat16)
Lengths = torch.Tensor | Sequence[int] | None


def _lengths(lens: Lengths, batch: int, length: int, name: str) -> torch.Tensor | None:
    """Validate per-sample lengths; None when absent or all equal to `length` (no masking needed)."""
    if lens is None:
        return None
    lens = torch.as_tensor(lens, dtype=torch.long)
    if lens.shape != (batch,):
        raise ValueError(f"{name} must hold one length per sample, shape [{batch}]; got {tuple(lens.shape)}")
    lens_cpu = lens.cpu()  # one small sync when the lengths live on the GPU; the DiT passes CPU lengths
    if int(lens_cpu.min()) < 1 or int(lens_cpu.max()) > length:
        raise ValueError(f"{name} must lie in [1, {length}]; got {lens_cpu.tolist()}")
    if bool((lens_cpu == length).all()):
        return None
    return lens


def _compute_dtype(q: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        autocast_dtype = torch.get_autocast_dtype(device_type)
        if autocast_dtype in _HALF:
            return autocast_dtype
    return q.dtype


def _flash_usable(q: torch.Tensor, compute_dtype: torch.dtype, dropout_p: float) -> bool:
    # flash-attn 3 has no dropout; flash-attn 2 takes any call
    have = FLASH_ATTN_2_AVAILABLE or (FLASH_ATTN_3_AVAILABLE and dropout_p == 0.0)
    return have and q.is_cuda and compute_dtype in _HALF


def _no_autocast(device_type: str):
    # our explicit casts decide the kernel's dtype; an enclosing autocast must not re-cast them
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _key_mask(
    batch: int,
    q_len: int,
    k_len: int,
    q_lens: torch.Tensor | None,
    k_lens: torch.Tensor | None,
    causal: bool,
    window_size: tuple[int, int],
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean attend-mask for SDPA (True = attend), broadcastable to [B, heads, Lq, Lk], or None."""
    left, right = window_size
    banded = causal or left >= 0 or right >= 0
    if k_lens is None and not banded:
        return None
    key_pos = torch.arange(k_len, device=device)
    k_valid = torch.full((batch,), k_len, device=device) if k_lens is None else k_lens.to(device)
    mask = key_pos[None, :] < k_valid[:, None]  # [B, Lk]
    mask = mask[:, None, None, :]  # [B, 1, 1, Lk]
    if banded:
        # flash-attn aligns the band to the bottom-right corner of each sample's (q_len, k_len) block
        q_valid = torch.full((batch,), q_len, device=device) if q_lens is None else q_lens.to(device)
        offset = (k_valid - q_valid)[:, None, None]  # [B, 1, 1]
        query_pos = torch.arange(q_len, device=device)[None, :, None]  # [1, Lq, 1]
        rel = key_pos[None, None, :] - (query_pos + offset)  # [B, Lq, Lk]: key minus aligned query
        band = torch.ones_like(rel, dtype=torch.bool)
        if causal or right >= 0:
            band &= rel <= (0 if causal else right)
        if left >= 0:
            band &= rel >= -left
        mask = mask & band[:, None]  # [B, 1, Lq, Lk]
    return mask


def _sdpa(q, k, v, q_lens, k_lens, dropout_p, softmax_scale, causal, window_size):
    batch, q_len, k_len = q.shape[0], q.shape[1], k.shape[1]
    extra = {"enable_gqa": True} if q.shape[2] != k.shape[2] else {}
    banded = causal or window_size[0] >= 0 or window_size[1] >= 0

    def sdpa(q, k, v, mask):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),  # [b, heads, Lq, head_dim]
            k.transpose(1, 2),  # [b, heads, Lk, head_dim]
            v.transpose(1, 2),
            attn_mask=mask,
            dropout_p=dropout_p,
            scale=softmax_scale,
            **extra,
        )
        return out.transpose(1, 2)  # [b, Lq, heads, head_dim]

    if k_lens is not None and not banded and q.is_cuda:
        # On CUDA a boolean mask rules out the fastest SDPA kernels (measured on H100, bf16, 2 x 75600
        # tokens: 609 ms masked vs 409 ms for one unmasked call per sample on its real keys).
        return torch.cat([sdpa(q[b : b + 1], k[b : b + 1, :n], v[b : b + 1, :n], None)
                          for b, n in enumerate(k_lens.tolist())])  # [B, Lq, heads, head_dim]
    mask = _key_mask(batch, q_len, k_len, q_lens, k_lens, causal, tuple(window_size), q.device)
    out = sdpa(q, k, v, mask)
    if banded:
        # a band can leave a query no key at all; flash-attn returns zeros there, SDPA NaN or garbage
        has_keys = mask.any(dim=-1).transpose(1, 2)[..., None]  # [B, Lq, 1, 1]
        out = torch.where(has_keys, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def _call_flash(fn_name: str, *args, dropout_p: float, **kwargs):
    if FLASH_ATTN_3_AVAILABLE and dropout_p == 0.0:
        out = getattr(_fa3, fn_name)(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out
    return getattr(_fa2, fn_name)(*args, dropout_p=dropout_p, **kwargs)


def _flash(q, k, v, q_lens, k_lens, dropout_p, softmax_scale, causal, window_size, deterministic):
    batch, q_len, heads, head_dim = q.shape
    k_len = k.shape[1]
    common = dict(softmax_scale=softmax_scale, causal=causal, window_size=tuple(window_size),
                  deterministic=deterministic, dropout_p=dropout_p)
    if q_lens is None and k_lens is None:
        return _call_flash("flash_attn_func", q, k, v, **common)
    device = q.device

    def packed(x, lens, length):
        if lens is None:
            full = torch.full((batch,), length, dtype=torch.int32, device=device)
            return x.flatten(0, 1), full, length  # [B*L, heads, head_dim]
        lens = lens.to(device=device, dtype=torch.int32)
        valid = torch.arange(length, device=device)[None, :] < lens[:, None]  # [B, L]
        return x[valid], lens, int(lens.max())  # [sum(lens), heads, head_dim]

    q_packed, q_valid, max_q = packed(q, q_lens, q_len)
    k_packed, k_valid, max_k = packed(k, k_lens, k_len)
    v_packed, _, _ = packed(v, k_lens, k_len)
    zero = torch.zeros(1, dtype=torch.int32, device=device)
    cu_q = torch.cat([zero, q_valid.cumsum(0, dtype=torch.int32)])
    cu_k = torch.cat([zero, k_valid.cumsum(0, dtype=torch.int32)])
    out = _call_flash("flash_attn_varlen_func", q_packed, k_packed, v_packed, cu_q, cu_k, max_q, max_k, **common)
    if q_lens is None:
        return out.view(batch, q_len, heads, head_dim)
    full = out.new_zeros(batch, q_len, heads, head_dim)
    full[torch.arange(q_len, device=device)[None, :] < q_valid[:, None]] = out
    return full


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_lens: Lengths = None,
    k_lens: Lengths = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    q_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    deterministic: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Softmax attention over [B, L, heads, head_dim] tensors with per-sample key/query lengths.

    softmax_scale defaults to 1/sqrt(head_dim). window_size (left, right) limits each query to keys
    within that distance (-1: unlimited), as in flash-attn. Returns [B, Lq, heads, head_dim] in q's dtype.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "attention expects q, k, v of shape [B, L, heads, head_dim]; "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, q_len, heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim or heads % k.shape[2]:
        raise ValueError(
            f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} do not fit q {tuple(q.shape)} "
            "(same batch and head_dim, k == v shape, q heads a multiple of k heads)"
        )
    args = (dropout_p, softmax_scale, q_scale, causal, window_size, deterministic, dtype)
    if q_lens is not None or k_lens is not None:
        return _attention_with_lengths(q, k, v, q_lens, k_lens, *args)
    return _attention(q, k, v, None, None, *args)


@torch.compiler.disable
def _attention_with_lengths(q, k, v, q_lens, k_lens, *args):
    """Lengths are host-side data: validating them and choosing the kernel branches on their values,
    so a compiled caller (`wan.compile`) runs this part eagerly (one clean graph break, no warnings);
    lengths that mask nothing take the unmasked path."""
    batch, q_len, k_len = q.shape[0], q.shape[1], k.shape[1]
    q_lens = _lengths(q_lens, batch, q_len, "q_lens")
    k_lens = _lengths(k_lens, batch, k_len, "k_lens")
    return _attention(q, k, v, q_lens, k_lens, *args)


def _attention(q, k, v, q_lens, k_lens, dropout_p, softmax_scale, q_scale, causal, window_size, deterministic,
               dtype):
    q_len, head_dim = q.shape[1], q.shape[3]
    out_dtype = q.dtype
    compute_dtype = _compute_dtype(q, dtype)
    if q_scale is not None:
        q = q * q_scale
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    q, k, v = (x.to(compute_dtype) for x in (q, k, v))
    with _no_autocast(q.device.type):
        if _flash_usable(q, compute_dtype, dropout_p):
            out = _flash(q, k, v, q_lens, k_lens, dropout_p, softmax_scale, causal, window_size, deterministic)
        else:
            out = _sdpa(q, k, v, q_lens, k_lens, dropout_p, softmax_scale, causal, window_size)
            if q_lens is not None:
                rows = torch.arange(q_len, device=q.device)[None, :] < q_lens.to(q.device)[:, None]  # [B, Lq]
                out = out * rows[:, :, None, None]
    return out.to(out_dtype)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_lens: Lengths = None,
    k_lens: Lengths = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    q_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    deterministic: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    version: int | None = None,
) -> torch.Tensor:
    """Upstream-compatible entry point: like `attention`, but always computes in half precision `dtype`.

    `version` is accepted for signature compatibility; the available flash-attn build is used
    (3 before 2), or SDPA when neither is installed or the tensors are not on CUDA.
    """
    if dtype not in _HALF:
        raise ValueError(f"flash_attention computes in float16 or bfloat16; got dtype={dtype}")
    del version
    return attention(q, k, v, q_lens=q_lens, k_lens=k_lens, dropout_p=dropout_p, softmax_scale=softmax_scale,
                     q_scale=q_scale, causal=causal, window_size=window_size, deterministic=deterministic,
                     dtype=dtype)
