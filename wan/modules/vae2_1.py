"""The Wan2.1 causal video VAE (`Wan2.1_VAE.pth`): model, causal chunk cache, and the latent wrapper.

Owns:
- `WanVAE_`, the encoder/decoder network with the exact upstream state_dict layout (see the
  checkpoint manifest `wan2_1_vae.json`), and its chunked `encode` / `decode` that reproduce upstream's
  causal temporal processing: the video is encoded in chunks of 1, 4, 4, ... frames and the latent is
  decoded one frame at a time, each chunk seeing the previous chunk's last frames through a per-layer
  cache (`TemporalCache`), so the result equals a causal pass over the whole sequence - including the
  upstream quirks of the temporal resampling layers (see `Resample`).
- `_video_vae`, which builds the real-size model on the meta device and loads a `.pth` state dict.
- `Wan2_1_VAE`, the wrapper the pipeline uses: latent normalisation constants, list-in / list-out
  encode/decode, input validation, the clamp of decoded pixels to [-1, 1].

Everything runs in the weights' dtype (float32 for the release); on CUDA the wrapper autocasts to its
`dtype`. No state is global: the causal caches belong to a `WanVAE_` instance and `clear_cache()` resets them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wan.checkpoint import CheckpointError, load_into, load_torch_file

__all__ = ["CACHE_T", "TemporalCache", "CausalConv3d", "RMS_norm", "Resample", "ResidualBlock", "AttentionBlock",
           "Encoder3d", "Decoder3d", "WanVAE_", "_video_vae", "Wan2_1_VAE"]

# Frames of a conv's input remembered between chunks: enough for a temporal kernel of 3.
CACHE_T = 2

# Upstream marks the cache slot of an upsample3d layer with "Rep" after the first chunk: that layer
# does no temporal work on the first chunk, and on the second it pads with zeros instead of cached frames.
REP_MARKER = "Rep"

# Release latent statistics (per channel), as written in upstream's wrapper; held as float32.
LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# Frames the encoder takes per chunk after the first single frame (the VAE's temporal stride).
TEMPORAL_STRIDE = 4
SPATIAL_STRIDE = 8


class TemporalCache:
    """Per-layer causal state carried from one chunk to the next during a chunked encode or decode.

    Every cached layer claims one slot per chunk, in forward order, so the same layer finds its own slot
    again in the next chunk. A slot holds the last (up to CACHE_T) input frames of that layer, the
    REP_MARKER string, or None before the layer first ran. `begin_chunk(last=True)` tells layers that no
    chunk follows, so they skip saving state (the one-frame path then copies nothing).
    """

    def __init__(self) -> None:
        self._slots: list = []
        self._cursor = 0
        self.saving = True

    def clear(self) -> None:
        self._slots = []
        self._cursor = 0
        self.saving = True

    def begin_chunk(self, last: bool) -> None:
        self._cursor = 0
        self.saving = not last

    def claim(self) -> int:
        """Index of the calling layer's slot (creating it on the first chunk)."""
        index = self._cursor
        self._cursor += 1
        if index == len(self._slots):
            self._slots.append(None)
        return index

    def get(self, index: int):
        return self._slots[index]

    def set(self, index: int, value) -> None:
        if self.saving:
            self._slots[index] = value

    def __len__(self) -> int:
        return len(self._slots)


class CausalConv3d(nn.Conv3d):
    """Conv3d that is causal in time: all temporal padding (2 * padding_t) goes before the first frame.

    `forward(x, previous)` prepends `previous` (frames remembered from the last chunk) in place of as
    many zero frames. Spatial padding is the conv's own symmetric zero padding.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        padding = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, padding[1], padding[2]))
        self.front_pad = 2 * padding[0]

    def forward(self, x: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        front = self.front_pad
        if previous is not None and front > 0:
            x = torch.cat([previous.to(x.dtype), x], dim=2)  # [B, C, T_prev + T, H, W]
            front -= previous.shape[2]
        if front <= 0:
            return super().forward(x)
        kernel_t = self.kernel_size[0]
        if self.stride[0] == 1 and x.shape[2] + front == kernel_t:
            # Exactly one output frame whose first `front` taps see zero padding: skip those taps instead
            # of convolving zeros (the one-frame path of every 3x3x3 conv; 3x less work).
            return F.conv3d(x, self.weight[:, :, front:], self.bias, self.stride, self.padding)
        x = F.pad(x, (0, 0, 0, 0, front, 0))  # [B, C, front + T, H, W]
        return super().forward(x)


def cached_conv(conv: CausalConv3d, x: torch.Tensor, cache: TemporalCache | None) -> torch.Tensor:
    """Run a causal conv on one chunk, feeding it (and then updating) its slot in `cache`.

    Upstream's rule: the new slot content is the last CACHE_T frames of this chunk's input; when the chunk
    has a single frame, the last frame of the previous slot is kept in front of it.
    """
    if cache is None:
        return conv(x)
    slot = cache.claim()
    previous = cache.get(slot)
    if cache.saving:
        keep = x[:, :, -CACHE_T:]
        if keep.shape[2] < CACHE_T and previous is not None:
            keep = torch.cat([previous[:, :, -1:].to(keep.dtype), keep], dim=2)  # [B, C, 2, H, W]
        else:
            keep = keep.clone()  # a view would pin the whole chunk's activation
        cache.set(slot, keep)
    return conv(x, previous)


class RMS_norm(nn.Module):
    """L2-normalise over channels (dim 1), times sqrt(C) times a learned per-channel gain `gamma`.

    `images=False` is for 5-D video features (gamma [C, 1, 1, 1]), `images=True` for 4-D frames
    (gamma [C, 1, 1]). F.normalize's eps 1e-12 guards the L2 norm.
    """

    def __init__(self, dim: int, images: bool = True) -> None:
        super().__init__()
        shape = (dim, 1, 1) if images else (dim, 1, 1, 1)
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class _NearestExactUpsample(nn.Upsample):
    """2x spatial nearest-exact upsample, computed in float32 (an exact copy, whatever the input dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type_as(x)


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D (per frame) module to a video: [B, C, T, H, W] -> fn -> [B, C', T, H', W']."""
    b, c, t, h, w = x.shape
    frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # [B*T, C, H, W]
    frames = fn(frames)
    c2, h2, w2 = frames.shape[1:]
    return frames.reshape(b, t, c2, h2, w2).permute(0, 2, 1, 3, 4)  # [B, C', T, H', W']


class Resample(nn.Module):
    """2x spatial up/down-sampling, optionally with 2x temporal up/down-sampling (the `*3d` modes).

    - upsample2d / upsample3d: nearest-exact 2x, then Conv2d(dim -> dim // 2, 3x3); upsample3d first
      doubles the frames with `time_conv` (dim -> 2*dim, kernel (3,1,1), causal), interleaving the two
      channel halves in time. On the first chunk it does no temporal work and marks its slot REP_MARKER;
      on the next chunk time_conv sees plain zero padding (not the first chunk's frames), and if that chunk
      has a single frame the slot becomes [zero frame, that frame] - upstream's behaviour, kept exactly.
    - downsample2d / downsample3d: zero pad right/bottom by one, Conv2d(dim -> dim, 3x3, stride 2);
      downsample3d then halves the frames with `time_conv` (kernel (3,1,1), stride 2, no padding) over
      [last frame of the previous chunk, this chunk]. The first chunk skips the temporal conv.
    """

    MODES = ("none", "upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str) -> None:
        if mode not in self.MODES:
            raise ValueError(f"Resample mode must be one of {self.MODES}, got {mode!r}")
        super().__init__()
        self.dim = dim
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(
                _NearestExactUpsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                nn.Conv2d(dim, dim // 2, 3, padding=1),
            )
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        else:
            self.resample = nn.Identity()
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def _temporal_upsample(self, x: torch.Tensor, cache: TemporalCache) -> torch.Tensor:
        slot = cache.claim()
        previous = cache.get(slot)
        if previous is None:  # first chunk: one frame stays one frame
            cache.set(slot, REP_MARKER)
            return x
        is_marker = isinstance(previous, str)
        if cache.saving:
            keep = x[:, :, -CACHE_T:]
            if keep.shape[2] < CACHE_T:
                front = torch.zeros_like(keep) if is_marker else previous[:, :, -1:].to(keep.dtype)
                keep = torch.cat([front, keep], dim=2)  # [B, C, 2, H, W]
            else:
                keep = keep.clone()
            cache.set(slot, keep)
        x = self.time_conv(x, None if is_marker else previous)  # [B, 2C, T, H, W]
        b, c2, t, h, w = x.shape
        x = x.reshape(b, 2, c2 // 2, t, h, w)  # [B, 2, C, T, H, W]: channel halves = even/odd frames
        x = torch.stack((x[:, 0], x[:, 1]), dim=3)  # [B, C, T, 2, H, W]
        return x.reshape(b, c2 // 2, t * 2, h, w)  # [B, C, 2T, H, W]

    def _temporal_downsample(self, x: torch.Tensor, cache: TemporalCache) -> torch.Tensor:
        slot = cache.claim()
        previous = cache.get(slot)
        if previous is None:  # first chunk: frames pass through, remembered for the next chunk
            cache.set(slot, x[:, :, -1:].clone() if cache.saving else None)
            return x
        if cache.saving:
            cache.set(slot, x[:, :, -1:].clone())
        return self.time_conv(torch.cat([previous[:, :, -1:].to(x.dtype), x], dim=2))  # [B, C, T/2, H, W]

    def forward(self, x: torch.Tensor, cache: TemporalCache | None = None) -> torch.Tensor:
        if self.mode == "upsample3d" and cache is not None:
            x = self._temporal_upsample(x, cache)
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d" and cache is not None:
            x = self._temporal_downsample(x, cache)
        return x


class ResidualBlock(nn.Module):
    """RMS_norm, SiLU, causal 3x3x3 conv, RMS_norm, SiLU, Dropout, causal 3x3x3 conv, plus a shortcut
    (1x1x1 causal conv when the channel count changes). `residual.N` indices follow upstream's layout."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False),
            nn.SiLU(),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: TemporalCache | None = None) -> torch.Tensor:
        shortcut = self.shortcut(x)
        for layer in self.residual:
            x = cached_conv(layer, x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + shortcut


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame separately, with a residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _attend(self, frames: torch.Tensor) -> torch.Tensor:
        n, c, h, w = frames.shape
        qkv = self.to_qkv(self.norm(frames)).reshape(n, 1, c * 3, h * w)  # [N, 1, 3C, HW]
        q, k, v = qkv.permute(0, 1, 3, 2).chunk(3, dim=-1)  # each [N, 1, HW, C]
        out = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())  # [N, 1, HW, C]
        out = out.squeeze(1).permute(0, 2, 1).reshape(n, c, h, w)  # [N, C, H, W]
        return self.proj(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + _per_frame(self._attend, x)


def _stage_scales(n: int):
    """Encoder stage labels for attn_scales: 1, 1/2, 1/4, ... (halved after every downsample)."""
    return [1.0 / 2 ** i for i in range(n)]


def _decoder_stage_scales(n: int):
    """Decoder stage labels for attn_scales: upstream starts at 1 / 2**(n - 2) and doubles per stage.

    Every released config has attn_scales = [], so these labels are not covered by golden data.
    """
    return [2.0 ** i / 2 ** (n - 2) for i in range(n)]


class Encoder3d(nn.Module):
    """Video -> 2*z_dim feature channels at 1/8 spatial and 1/4 temporal resolution (causal)."""

    def __init__(self, dim=128, z_dim=4, dim_mult=(1, 2, 4, 4), num_res_blocks=2, attn_scales=(),
                 temperal_downsample=(True, True, False), dropout=0.0) -> None:
        super().__init__()
        self.dim = dim
        self.z_dim = z_dim
        self.temperal_downsample = list(temperal_downsample)
        dims = [dim * u for u in [1, *dim_mult]]
        scales = _stage_scales(len(dim_mult))

        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        downsamples = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                downsamples.append(ResidualBlock(in_dim, out_dim, dropout))
                if scales[i] in attn_scales:
                    downsamples.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                mode = "downsample3d" if temperal_downsample[i] else "downsample2d"
                downsamples.append(Resample(out_dim, mode=mode))
        self.downsamples = nn.Sequential(*downsamples)
        self.middle = nn.Sequential(
            ResidualBlock(out_dim, out_dim, dropout), AttentionBlock(out_dim), ResidualBlock(out_dim, out_dim, dropout)
        )
        self.head = nn.Sequential(RMS_norm(out_dim, images=False), nn.SiLU(), CausalConv3d(out_dim, z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: TemporalCache | None = None) -> torch.Tensor:
        x = cached_conv(self.conv1, x, cache)
        for layer in [*self.downsamples, *self.middle]:
            x = layer(x) if isinstance(layer, AttentionBlock) else layer(x, cache)
        for layer in self.head:
            x = cached_conv(layer, x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x


class Decoder3d(nn.Module):
    """z_dim latent channels -> RGB video at 8x spatial and 4x temporal resolution (causal)."""

    def __init__(self, dim=128, z_dim=4, dim_mult=(1, 2, 4, 4), num_res_blocks=2, attn_scales=(),
                 temperal_upsample=(False, True, True), dropout=0.0) -> None:
        super().__init__()
        self.dim = dim
        self.z_dim = z_dim
        self.temperal_upsample = list(temperal_upsample)
        dims = [dim * u for u in [dim_mult[-1], *dim_mult[::-1]]]
        scales = _decoder_stage_scales(len(dim_mult))

        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0], dropout), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0], dropout)
        )
        upsamples = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous stage's Resample halved the channels
            for _ in range(num_res_blocks + 1):
                upsamples.append(ResidualBlock(in_dim, out_dim, dropout))
                if scales[i] in attn_scales:
                    upsamples.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
                upsamples.append(Resample(out_dim, mode=mode))
        self.upsamples = nn.Sequential(*upsamples)
        self.head = nn.Sequential(RMS_norm(out_dim, images=False), nn.SiLU(), CausalConv3d(out_dim, 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: TemporalCache | None = None) -> torch.Tensor:
        x = cached_conv(self.conv1, x, cache)
        for layer in [*self.middle, *self.upsamples]:
            x = layer(x) if isinstance(layer, AttentionBlock) else layer(x, cache)
        for layer in self.head:
            x = cached_conv(layer, x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x


def _scale_parts(scale, z_dim: int, like: torch.Tensor):
    """(mean, inv_std) broadcastable over [B, z_dim, T, H, W]; floats pass through."""
    mean, inv_std = scale
    if isinstance(mean, torch.Tensor):
        mean = mean.to(like.device).view(1, z_dim, 1, 1, 1)  # [1, z_dim, 1, 1, 1]
    if isinstance(inv_std, torch.Tensor):
        inv_std = inv_std.to(like.device).view(1, z_dim, 1, 1, 1)  # [1, z_dim, 1, 1, 1]
    return mean, inv_std


def _describe(x) -> str:
    return f"shape {list(x.shape)}" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"


def valid_frame_counts_hint(frames: int) -> str:
    below = 1 + TEMPORAL_STRIDE * max((frames - 1) // TEMPORAL_STRIDE, 0)
    return f"use 1 + 4k frames (1, 5, 9, ..., 81); the nearest shorter valid count is {below}"


class WanVAE_(nn.Module):
    """Encoder3d + 1x1x1 `conv1` (moments) + 1x1x1 `conv2` (latent) + Decoder3d, with chunked causal
    encode/decode. The causal caches are owned by this module and emptied by `clear_cache()` (also done
    before and after every encode/decode, so a failed call cannot leak state into the next one)."""

    def __init__(self, dim=128, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[True, True, False], dropout=0.0) -> None:
        super().__init__()
        self.dim = dim
        self.z_dim = z_dim
        self.dim_mult = list(dim_mult)
        self.num_res_blocks = num_res_blocks
        self.attn_scales = list(attn_scales)
        self.temperal_downsample = list(temperal_downsample)
        self.temperal_upsample = self.temperal_downsample[::-1]

        self.encoder = Encoder3d(dim, z_dim * 2, self.dim_mult, num_res_blocks, self.attn_scales,
                                 self.temperal_downsample, dropout)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dim, z_dim, self.dim_mult, num_res_blocks, self.attn_scales,
                                 self.temperal_upsample, dropout)
        self.encode_cache = TemporalCache()
        self.decode_cache = TemporalCache()

    def clear_cache(self) -> None:
        self.encode_cache.clear()
        self.decode_cache.clear()

    def forward(self, x: torch.Tensor, scale=(0.0, 1.0)) -> torch.Tensor:
        """Reconstruction: decode(encode(x)) with the given latent normalisation."""
        return self.decode(self.encode(x, scale), scale)

    def encode(self, x: torch.Tensor, scale) -> torch.Tensor:
        """[B, 3, T, H, W] video -> normalised mean latent [B, z_dim, 1 + (T-1)//4, H/8, W/8].

        T must be 1 + 4k (upstream silently drops the frames past the last full chunk; we raise instead,
        so a clip is never shortened without notice). `scale` = (mean, 1/std), tensors of z_dim values or
        floats; the latent is (mu - mean) * (1/std). The log-variance half of the moments is discarded.
        """
        if x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"WanVAE_.encode expects a video batch [B, 3, T, H, W], got {_describe(x)}")
        frames = x.shape[2]
        if frames < 1 or (frames - 1) % TEMPORAL_STRIDE:
            raise ValueError(f"WanVAE_.encode got {frames} frames: {valid_frame_counts_hint(frames)}")
        chunks = [x[:, :, :1]] + [x[:, :, i:i + TEMPORAL_STRIDE] for i in range(1, frames, TEMPORAL_STRIDE)]
        self.clear_cache()
        try:
            outputs = []
            for i, chunk in enumerate(chunks):
                self.encode_cache.begin_chunk(last=i == len(chunks) - 1)
                outputs.append(self.encoder(chunk, self.encode_cache))
        finally:
            self.clear_cache()
        features = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)  # [B, 2z, T', h, w]
        mu = self.conv1(features)[:, : self.z_dim]  # [B, z, T', h, w]; log-variance half dropped
        mean, inv_std = _scale_parts(scale, self.z_dim, mu)
        return (mu - mean) * inv_std

    def decode(self, z: torch.Tensor, scale) -> torch.Tensor:
        """Normalised latent [B, z_dim, T', h, w] -> video [B, 3, 1 + 4(T'-1), 8h, 8w], NOT clamped.

        The latent is un-normalised as z / (1/std) + mean (division by the reciprocal, as upstream), then
        decoded one latent frame at a time with the causal cache.
        """
        if z.dim() != 5 or z.shape[1] != self.z_dim:
            raise ValueError(f"WanVAE_.decode expects a latent batch [B, {self.z_dim}, T, h, w], got {_describe(z)}")
        if z.shape[2] < 1:
            raise ValueError("WanVAE_.decode got a latent with 0 frames")
        mean, inv_std = _scale_parts(scale, self.z_dim, z)
        x = self.conv2(z / inv_std + mean)  # [B, z, T', h, w]
        frames = x.shape[2]
        self.clear_cache()
        try:
            outputs = []
            for i in range(frames):
                self.decode_cache.begin_chunk(last=i == frames - 1)
                outputs.append(self.decoder(x[:, :, i:i + 1], self.decode_cache))
        finally:
            self.clear_cache()
        return outputs[0] if frames == 1 else torch.cat(outputs, dim=2)  # [B, 3, 1 + 4(T'-1), H, W]


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Sizes of a Wan2.1 VAE: the one place they are written (defaults: the released Wan2.1_VAE.pth).

    A release config's `extensions` block names them `vae_<field>`.
    """

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0

    @classmethod
    def size_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "dropout")

    @classmethod
    def explicit_sizes(cls, extensions: dict) -> dict:
        return {f: extensions[f"vae_{f}"] for f in cls.size_fields() if f"vae_{f}" in extensions}

    def extension_block(self) -> dict:
        return {f"vae_{f}": (list(v) if isinstance(v := getattr(self, f), tuple) else v) for f in self.size_fields()}

    def kwargs(self) -> dict:
        """WanVAE_ constructor arguments."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


# Upstream's real Wan2.1 VAE configuration (the released Wan2.1_VAE.pth), as constructor arguments.
REAL_CONFIG = VAEConfig().kwargs()


def _build_loaded(state: dict, source: str, device, **config) -> WanVAE_:
    with torch.device("meta"):
        model = WanVAE_(**config)
    load_into(model, state, source)
    return model.to(device)


def _video_vae(pretrained_path=None, z_dim=16, device="cpu", **kwargs) -> WanVAE_:
    """The real-config WanVAE_ (dim 96, ...; `kwargs` override any field), loaded from `pretrained_path`.

    The model is built on the meta device and the file's tensors are assigned strictly (missing,
    unexpected or mis-shaped keys raise a CheckpointError naming the file). With `pretrained_path=None`
    the model is randomly initialised on `device` instead (for tests and experiments).
    """
    config = {**REAL_CONFIG, "z_dim": z_dim, **kwargs}
    if pretrained_path is None:
        with torch.device(device):
            return WanVAE_(**config)
    state = load_torch_file(pretrained_path, "Wan2.1 VAE checkpoint")
    return _build_loaded(state, str(pretrained_path), device, **config)


def _check_video(video, where: str) -> None:
    if not isinstance(video, torch.Tensor) or video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"{where} must be an RGB video tensor [3, F, H, W] in [-1, 1], got {_describe(video)}")
    frames, height, width = video.shape[1:]
    if height % SPATIAL_STRIDE or width % SPATIAL_STRIDE or height == 0 or width == 0:
        raise ValueError(f"{where}: height and width must be positive multiples of {SPATIAL_STRIDE}, "
                         f"got H={height}, W={width}; resize or crop the video")
    if frames < 1 or (frames - 1) % TEMPORAL_STRIDE:
        raise ValueError(f"{where} has {frames} frames: {valid_frame_counts_hint(frames)}")


def _check_latent(latent, z_dim: int, where: str) -> None:
    if not isinstance(latent, torch.Tensor) or latent.dim() != 4 or latent.shape[0] != z_dim:
        raise ValueError(f"{where} must be a latent tensor [{z_dim}, F, h, w], got {_describe(latent)}")
    if min(latent.shape[1:]) < 1:
        raise ValueError(f"{where} is empty: {_describe(latent)}")


def _as_list(items, name: str, element: str) -> list:
    if isinstance(items, torch.Tensor):
        raise ValueError(f"{name} must be a list of {element} tensors, got a single tensor of shape "
                         f"{list(items.shape)}; pass [tensor] (or list(batch) for a batch)")
    items = list(items)
    if not items:
        raise ValueError(f"{name} is empty: pass at least one {element} tensor")
    return items


class Wan2_1_VAE:
    """The pipeline's VAE: list of videos <-> list of normalised latents.

    Args:
        z_dim: latent channels (the release and the latent constants have 16).
        vae_pth: the `Wan2.1_VAE.pth` state dict.
        dtype: autocast dtype on CUDA (upstream's default float32); on CPU everything runs in the
            weights' dtype (float32 for the release), as upstream.
        device: where the model and the latent constants live.
        dim: base width of the network; None reads it from the file (`encoder.conv1.weight` is
            [dim, 3, 3, 3, 3]: 96 for the release, 16 for the tiny test release).

    `encode` returns float32 [16, 1 + (F-1)//4, H/8, W/8] latents; `decode` returns float32
    [3, 1 + 4(F'-1), 8h, 8w] videos clamped to [-1, 1]. Frame counts must be 1 + 4k: upstream silently
    drops trailing frames, this port raises a ValueError naming the valid counts instead.
    """

    def __init__(self, z_dim=16, vae_pth="cache/vae_step_411000.pth", dtype=torch.float, device="cuda", dim=None):
        if z_dim != len(LATENTS_MEAN):
            raise ValueError(f"Wan2_1_VAE has latent statistics for {len(LATENTS_MEAN)} channels, got z_dim={z_dim}")
        self.dtype = dtype
        self.device = torch.device(device)
        self.mean = torch.tensor(LATENTS_MEAN, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(LATENTS_STD, dtype=torch.float32, device=self.device)
        self.scale = [self.mean, 1.0 / self.std]  # reciprocal in float32, as upstream

        state = load_torch_file(vae_pth, "Wan2.1 VAE checkpoint")
        if dim is None:
            first = state.get("encoder.conv1.weight")
            if first is None or first.dim() != 5:
                raise CheckpointError(
                    f"Wan2.1 VAE checkpoint {vae_pth} has no 5-D 'encoder.conv1.weight' to read the model width "
                    "from; is this a Wan2.1 VAE state dict?"
                )
            dim = int(first.shape[0])
        self.model = _build_loaded(state, str(vae_pth), self.device, **{**REAL_CONFIG, "z_dim": z_dim, "dim": dim})
        self.model.eval().requires_grad_(False)

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    def _model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def encode(self, videos: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Videos [3, F, H, W] (values in [-1, 1], F = 1 + 4k, H and W multiples of 8) -> float32 latents."""
        videos = _as_list(videos, "videos", "[3, F, H, W]")
        for i, video in enumerate(videos):
            _check_video(video, f"videos[{i}]")
        dtype = self._model_dtype()
        with torch.no_grad(), self._autocast():
            return [
                self.model.encode(v.to(self.device, dtype).unsqueeze(0), self.scale).float().squeeze(0)  # [z, F', h, w]
                for v in videos
            ]

    def decode(self, zs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Latents [16, F', h, w] -> float32 videos [3, 1 + 4(F'-1), 8h, 8w] clamped to [-1, 1]."""
        zs = _as_list(zs, "zs", f"[{self.model.z_dim}, F, h, w]")
        for i, z in enumerate(zs):
            _check_latent(z, self.model.z_dim, f"zs[{i}]")
        dtype = self._model_dtype()
        with torch.no_grad(), self._autocast():
            return [
                self.model.decode(z.to(self.device, dtype).unsqueeze(0), self.scale).float().clamp_(-1, 1).squeeze(0)
                for z in zs
            ]
