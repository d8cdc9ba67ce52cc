"""The student: a DiT-style latent image transformer conditioned on the timestep and umT5 text.

Owns `Student`, a flax.linen Module, and its parts. Architecture (DiT, Peebles & Xie 2023, with
PixArt-alpha style cross-attention to the text):

  x [B, C, H, W] --patchify (p x p)--> tokens [B, N, p*p*C] --Dense--> [B, N, D] + 2D sincos pos emb
  t [B] in [0, 1000] --sinusoid(256)--> MLP --> t_emb [B, D]
  text [B, L, 4096] --Dense-GELU-Dense--> text tokens [B, L, D]; their masked mean --Dense--> added
      to t_emb, so the global modulation sees the prompt too.  c = t_emb + pooled text  [B, D]
  depth x Block:  x += gate1 * SelfAttn(modulate(LN(x), c))
                  x += CrossAttn(LN(x), text tokens, text_mask)
                  x += gate2 * MLP(modulate(LN(x), c))
  final: modulate(LN(x), c) --Dense--> [B, N, p*p*C] --unpatchify--> velocity [B, C, H, W] (float32)

Special initialisations (explicit on purpose; they make the untrained network start as the
identity on its residual stream and predict exactly zero, which is what keeps early distillation
steps stable):
  * adaLN-Zero: every modulation Dense (shift/scale/gate from c) starts at zero, so gates are 0
    and each block's self-attention and MLP branches are switched off at init.
  * The cross-attention output projection starts at zero, so no branch writes at init.
  * The final projection starts at zero: the initial prediction is exactly 0.
Other Dense kernels are xavier-uniform (DiT), the timestep MLP normal(0.02).

With cfg.scan_blocks (the default) the blocks run as one `flax.linen.scan` over parameters stacked
on a leading layer axis (`blocks/...` [depth, ...]), so XLA traces and compiles one block whatever the
depth; otherwise they are unrolled (`blocks_0/...`, `blocks_1/...`). Both compute the same function;
`stack_blocks` / `unstack_blocks` convert one layout into the other (exports use the unrolled names).
Initial values differ between the layouts: the scan draws each layer's key by splitting, the
unrolled blocks by their names.

Attention uses RMS-normalised queries and keys (QK-norm, as in the Wan DiT) for bf16 stability.
Text positions where text_mask is False are zeroed before the projection and masked out of the
cross-attention; a sample whose mask is all False gets no cross-attention contribution and a zero
pooled text, i.e. it is treated as unconditional.

With dtype="bfloat16" matmuls run in bf16 while parameters, the residual stream, normalisation
statistics, softmax and the output stay float32. Imports nothing distributed: parallelism is applied from outside.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from student_jax.config import StudentConfig

__all__ = ["STACKED_BLOCKS", "Student", "patchify", "sincos_pos_embed_2d", "stack_blocks", "timestep_embedding",
           "unpatchify", "unstack_blocks"]

# With cfg.scan_blocks the blocks' parameters live under this name, each with a leading layer axis.
STACKED_BLOCKS = "blocks"

_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros


def _compute_dtype(cfg: StudentConfig):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [B, dim] (float32) of timesteps t [B] (cos half first, then sin)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)  # [half]
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)  # [B, dim]


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2D sin/cos position embedding [grid_h * grid_w, dim] (row-major tokens), host numpy.

    First half of the channels encodes the row, second half the column (MAE / DiT layout).
    """
    if dim % 4:
        raise ValueError(f"sincos_pos_embed_2d: dim must be divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)  # [dim/4]

    def axis_embed(positions: np.ndarray) -> np.ndarray:
        angles = positions[:, None] * omega[None, :]  # [n, dim/4]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # [n, dim/2]

    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")
    embed = np.concatenate([axis_embed(rows.reshape(-1)), axis_embed(cols.reshape(-1))], axis=1)  # [N, dim]
    return embed.astype(np.float32)


def patchify(x: jax.Array, patch: int) -> jax.Array:
    """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C] tokens, row-major over the patch grid."""
    batch, channels, height, width = x.shape
    gh, gw = height // patch, width // patch
    x = x.reshape(batch, channels, gh, patch, gw, patch)  # [B, C, gh, p, gw, p]
    x = x.transpose(0, 2, 4, 3, 5, 1)  # [B, gh, gw, p, p, C]
    return x.reshape(batch, gh * gw, patch * patch * channels)  # [B, N, p*p*C]


def unpatchify(tokens: jax.Array, patch: int, channels: int, height: int, width: int) -> jax.Array:
    """Inverse of `patchify`: [B, N, p*p*C] -> [B, C, H, W]."""
    batch = tokens.shape[0]
    gh, gw = height // patch, width // patch
    x = tokens.reshape(batch, gh, gw, patch, patch, channels)  # [B, gh, gw, p, p, C]
    x = x.transpose(0, 5, 1, 3, 2, 4)  # [B, C, gh, p, gw, p]
    return x.reshape(batch, channels, height, width)  # [B, C, H, W]


def resolve_attention(cfg: StudentConfig) -> str:
    """cfg.attention_impl with "auto" resolved: "cudnn" on a GPU with bf16 compute, else "xla"."""
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    return "cudnn" if jax.default_backend() == "gpu" and cfg.dtype == "bfloat16" else "xla"


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale[:, None, :]) + shift[:, None, :]  # [B, N, D]


class Attention(nn.Module):
    """Multi-head attention with QK-norm; self-attention when `context` is None.

    `context_mask` [B, S] (True = attend) masks keys; queries whose keys are all masked output 0.
    """

    cfg: StudentConfig
    zero_init_out: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, context_mask: jax.Array | None = None):
        cfg = self.cfg
        dtype = _compute_dtype(cfg)
        heads, head_dim = cfg.num_heads, cfg.head_dim
        source = x if context is None else context

        def project(name, inputs):
            return nn.DenseGeneral(
                (heads, head_dim), dtype=dtype, param_dtype=jnp.float32, kernel_init=_xavier, name=name
            )(inputs)  # [B, T, heads, head_dim]

        q = nn.RMSNorm(epsilon=1e-6, dtype=dtype, name="norm_q")(project("q", x))  # [B, N, heads, hd]
        k = nn.RMSNorm(epsilon=1e-6, dtype=dtype, name="norm_k")(project("k", source))  # [B, S, heads, hd]
        v = project("v", source)  # [B, S, heads, hd]

        implementation = resolve_attention(cfg)
        if context_mask is None:
            out = jax.nn.dot_product_attention(q, k, v, implementation=implementation)  # [B, N, heads, hd]
        else:
            if implementation == "cudnn" and cfg.cudnn_text_attention:
                # cuDNN takes the mask as a key count per sample: the text is a prefix mask (valid tokens
                # first, as every caller pads it). A count of 0 would leave cuDNN a row with no key.
                lengths = jnp.maximum(jnp.sum(context_mask, axis=-1, dtype=jnp.int32), 1)  # [B]
                out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
            else:
                mask = context_mask[:, None, None, :]  # [B, 1, 1, S] broadcast over heads and queries
                out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")  # [B, N, heads, hd]
            # A fully masked row would otherwise average the padding values.
            has_keys = jnp.any(context_mask, axis=-1)[:, None, None, None]  # [B, 1, 1, 1]
            out = jnp.where(has_keys, out, jnp.zeros_like(out))

        return nn.DenseGeneral(
            cfg.hidden_size,
            axis=(-2, -1),
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=_zeros if self.zero_init_out else _xavier,
            name="out",
        )(out)  # [B, N, D]


class Mlp(nn.Module):
    cfg: StudentConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        dtype = _compute_dtype(cfg)
        x = nn.Dense(cfg.mlp_hidden, dtype=dtype, param_dtype=jnp.float32, kernel_init=_xavier, name="fc1")(x)
        x = nn.gelu(x, approximate=True)  # [B, N, mlp_hidden]
        return nn.Dense(cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32, kernel_init=_xavier, name="fc2")(x)


class Block(nn.Module):
    """One DiT block: adaLN-Zero gated self-attention and MLP, ungated (zero-init) cross-attention."""

    cfg: StudentConfig

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array, text: jax.Array, text_mask: jax.Array) -> jax.Array:
        cfg = self.cfg
        dtype = _compute_dtype(cfg)
        modulation = nn.Dense(
            6 * cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32, kernel_init=_zeros, name="adaLN_modulation"
        )(nn.silu(cond))  # [B, 6D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(modulation, 6, axis=-1)  # 6 x [B, D]

        def norm(name, affine=False):
            return nn.LayerNorm(epsilon=1e-6, use_bias=affine, use_scale=affine, dtype=dtype, name=name)

        h = _modulate(norm("norm1")(x), shift_msa, scale_msa)
        x = x + gate_msa[:, None, :] * Attention(cfg, name="self_attn")(h)  # [B, N, D]
        x = x + Attention(cfg, zero_init_out=True, name="cross_attn")(norm("norm2", affine=True)(x), text, text_mask)
        h = _modulate(norm("norm3")(x), shift_mlp, scale_mlp)
        return x + gate_mlp[:, None, :] * Mlp(cfg, name="mlp")(h)  # [B, N, D]


def _remat(cfg: StudentConfig, block_cls, **kwargs):
    """block_cls under nn.remat as cfg.remat and cfg.remat_policy ask (StudentConfig says what each keeps)."""
    if not cfg.remat:
        return block_cls
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if cfg.remat_policy == "dots" else None
    return nn.remat(block_cls, policy=policy, **kwargs)


def _block_step(block: Block, x: jax.Array, cond: jax.Array, text: jax.Array, text_mask: jax.Array):
    return block(x, cond, text, text_mask), None  # (carry [B, N, D], no per-layer output)


def _scanned_blocks(cfg: StudentConfig, tokens, cond, text, text_mask, name: str) -> jax.Array:
    """The `cfg.depth` blocks as one lax.scan: traced and compiled once, whatever the depth.

    Parameters get a leading layer axis ([depth, ...] under `name`); `split_rngs` draws each layer's
    initial values from its own key. The residual stream is the carry; cond, text and text_mask are
    the same for every layer (broadcast). remat wraps the block inside the scan, so the backward pass
    keeps one carry per layer and recomputes the rest; the scan already stops XLA from merging the
    recomputation with the forward pass, hence prevent_cse=False (flax's advice under scan).
    """
    block_cls = _remat(cfg, Block, prevent_cse=False)
    scan = nn.scan(
        _block_step,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.depth,
    )
    tokens, _ = scan(block_cls(cfg, name=name), tokens, cond, text, text_mask)
    return tokens  # [B, N, D]


def unstack_blocks(params: dict) -> dict:
    """Scanned parameter layout -> unrolled: `blocks/...` [depth, ...] becomes `blocks_0/...`, `blocks_1/...`.

    A tree without `blocks` (already unrolled) is returned as is. Works on numpy and jax leaves.
    """
    if STACKED_BLOCKS not in params:
        return params
    stacked = params[STACKED_BLOCKS]
    depth = {leaf.shape[0] for leaf in jax.tree.leaves(stacked)}
    if len(depth) != 1:
        raise ValueError(f"unstack_blocks: the leaves of {STACKED_BLOCKS!r} disagree on the layer count: {sorted(depth)}")
    out = {k: v for k, v in params.items() if k != STACKED_BLOCKS}
    for index in range(depth.pop()):
        out[f"blocks_{index}"] = jax.tree.map(lambda leaf, i=index: leaf[i], stacked)
    return out


def stack_blocks(params: dict, depth: int) -> dict:
    """Unrolled parameter layout -> scanned: `blocks_0/...` ... `blocks_{depth-1}/...` stacked on a new axis 0
    under `blocks`. The inverse of `unstack_blocks`, bitwise; numpy leaves stay numpy."""
    names = [f"blocks_{index}" for index in range(depth)]
    missing = [name for name in names if name not in params]
    unexpected = sorted(k for k in params if k == STACKED_BLOCKS or (k.startswith("blocks_") and k not in names))
    if missing or unexpected:
        raise ValueError(f"stack_blocks: expected exactly blocks_0 ... blocks_{depth - 1}; missing {missing}, "
                         f"unexpected {unexpected}")

    def stack(*leaves):
        return np.stack(leaves) if all(isinstance(leaf, np.ndarray) for leaf in leaves) else jnp.stack(leaves)

    out = {k: v for k, v in params.items() if k not in names}
    out[STACKED_BLOCKS] = jax.tree.map(stack, *(params[name] for name in names))  # each leaf [depth, ...]
    return out


class Student(nn.Module):
    """DiT-style flow-velocity predictor in the student's C-channel latent space.

    __call__(x [B, C, H, W], t [B] float in [0, 1000], text [B, L, text_dim], text_mask [B, L] bool)
    -> velocity [B, C, H, W] float32. H and W must be multiples of cfg.patch_size.
    """

    cfg: StudentConfig

    def _check_inputs(self, x, t, text, text_mask):
        cfg = self.cfg
        shapes = (
            f"got x {getattr(x, 'shape', None)}, t {getattr(t, 'shape', None)}, text {getattr(text, 'shape', None)}, "
            f"text_mask {getattr(text_mask, 'shape', None)}"
        )
        if getattr(x, "ndim", None) != 4 or x.shape[1] != cfg.latent_channels:
            raise ValueError(f"Student: x must be [B, {cfg.latent_channels}, H, W] (NCHW latents); {shapes}")
        batch, _, height, width = x.shape
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ValueError(
                f"Student: latent height and width must be multiples of patch_size={cfg.patch_size}, got "
                f"H={height}, W={width}; crop or pad the latents (image size a multiple of {8 * cfg.patch_size})"
            )
        if getattr(t, "shape", None) != (batch,):
            raise ValueError(f"Student: t must be [B] = [{batch}] timesteps in [0, 1000]; {shapes}")
        if getattr(text, "ndim", None) != 3 or text.shape[0] != batch or text.shape[2] != cfg.text_dim:
            raise ValueError(f"Student: text must be [B, L, {cfg.text_dim}] = [{batch}, L, {cfg.text_dim}]; {shapes}")
        if text.shape[1] > cfg.max_text_len:
            raise ValueError(
                f"Student: text length {text.shape[1]} exceeds max_text_len={cfg.max_text_len}; "
                "truncate the prompt tokens"
            )
        if getattr(text_mask, "shape", None) != text.shape[:2]:
            raise ValueError(f"Student: text_mask must be [B, L] = {tuple(text.shape[:2])}; {shapes}")
        if text_mask.dtype != jnp.bool_:
            raise ValueError(f"Student: text_mask must be boolean (True = real token), got dtype {text_mask.dtype}")

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, text: jax.Array, text_mask: jax.Array) -> jax.Array:
        self._check_inputs(x, t, text, text_mask)
        cfg = self.cfg
        dtype = _compute_dtype(cfg)
        dense = {"dtype": dtype, "param_dtype": jnp.float32}
        _, channels, height, width = x.shape
        patch = cfg.patch_size

        tokens = patchify(x.astype(dtype), patch)  # [B, N, p*p*C]
        tokens = nn.Dense(cfg.hidden_size, kernel_init=_xavier, name="x_embedder", **dense)(tokens)  # [B, N, D]
        pos = sincos_pos_embed_2d(cfg.hidden_size, height // patch, width // patch)  # [N, D] host constant
        # The residual stream stays float32 (bf16 branch outputs are promoted when added), so deep
        # bf16 students do not accumulate rounding error along the residual path.
        tokens = tokens.astype(jnp.float32) + jnp.asarray(pos)[None]

        t_emb = timestep_embedding(t, 256)  # [B, 256] float32
        t_init = nn.initializers.normal(0.02)
        t_emb = nn.Dense(cfg.hidden_size, kernel_init=t_init, name="t_embedder_fc1", **dense)(t_emb)
        t_emb = nn.Dense(cfg.hidden_size, kernel_init=t_init, name="t_embedder_fc2", **dense)(nn.silu(t_emb))  # [B, D]

        real = text_mask[..., None]  # [B, L, 1]
        text = jnp.where(real, text, 0).astype(dtype)  # padding carries no values into the projection
        text = nn.Dense(cfg.hidden_size, kernel_init=_xavier, name="text_embedder_fc1", **dense)(text)
        text = nn.Dense(cfg.hidden_size, kernel_init=_xavier, name="text_embedder_fc2", **dense)(
            nn.gelu(text, approximate=True)
        )  # [B, L, D]
        count = jnp.maximum(jnp.sum(text_mask, axis=1, keepdims=True), 1).astype(jnp.float32)  # [B, 1]
        pooled = jnp.sum(jnp.where(real, text, 0).astype(jnp.float32), axis=1) / count  # [B, D]
        pooled = nn.Dense(cfg.hidden_size, kernel_init=_xavier, name="text_pool", **dense)(pooled.astype(dtype))
        cond = t_emb + pooled  # [B, D]

        if cfg.scan_blocks:
            tokens = _scanned_blocks(cfg, tokens, cond, text, text_mask, name=STACKED_BLOCKS)  # [B, N, D]
        else:
            block_cls = _remat(cfg, Block)
            for index in range(cfg.depth):
                tokens = block_cls(cfg, name=f"blocks_{index}")(tokens, cond, text, text_mask)  # [B, N, D]

        final_modulation = nn.Dense(2 * cfg.hidden_size, kernel_init=_zeros, name="final_modulation", **dense)
        shift, scale = jnp.split(final_modulation(nn.silu(cond)), 2, axis=-1)  # 2 x [B, D]
        final_norm = nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype, name="final_norm")
        tokens = _modulate(final_norm(tokens), shift, scale)
        final_proj = nn.Dense(patch * patch * channels, kernel_init=_zeros, name="final_proj", **dense)
        tokens = final_proj(tokens)  # [B, N, p*p*C]
        return unpatchify(tokens.astype(jnp.float32), patch, channels, height, width)  # [B, C, H, W]
