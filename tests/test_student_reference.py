"""The Flax student (student_jax/model.py) against an independent NumPy float64 reference.

The reference below is written from the architecture described in the model's docstring (patch
embedding + 2D sin/cos position embedding, sinusoidal timestep MLP, text MLP with masked mean
pooling, DiT blocks with adaLN-Zero modulation, masked cross-attention with QK-norm, final
modulated layer, unpatchify), loop by loop where a layout matters, and never calls the flax module
or its helpers. It reads the flax parameter tree of a tiny random student in which the zero-initialised
parts (adaLN / final modulation, cross-attention output, final projection) are set non-zero, so
every path changes the output; the test also checks that the reference reads every parameter.
Both block layouts are checked: the scanned one (the default; the reference reads its stacked
`blocks` unstacked into `blocks_0`, `blocks_1`, ...) and the unrolled one.
"""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from student_jax.config import StudentConfig
from student_jax.model import Student, unstack_blocks

CFG = StudentConfig(latent_channels=4, teacher_channels=4, patch_size=2, hidden_size=16, depth=2, num_heads=2,
                    mlp_ratio=2.0, text_dim=24, max_text_len=8)
BATCH, HEIGHT, WIDTH, TEXT_LEN = 3, 4, 6, 5  # non-square latent: a 2 x 3 patch grid catches H/W swaps
REAL_TOKENS = (5, 2, 0)  # full text, a padded one, and no text at all (the unconditional sample)
ATOL = 1e-5  # float32 model vs float64 reference, outputs of order 1


# ------------------------------------------------------------------------------------ the reference


class _Tracked:
    """A read-only view of the nested params dict that records which leaves were read."""

    def __init__(self, tree, prefix="", seen=None):
        self._tree, self._prefix = tree, prefix
        self.seen = set() if seen is None else seen

    def __getitem__(self, key):
        value, name = self._tree[key], f"{self._prefix}{key}"
        if isinstance(value, dict):
            return _Tracked(value, name + "/", self.seen)
        self.seen.add(name)
        return np.asarray(value, np.float64)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _dense(p, x):
    return x @ p["kernel"] + p["bias"]


def _layer_norm(x, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def _rms_norm(x, scale, eps=1e-6):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * scale


def _softmax(logits):
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _attention(p, x, source, key_mask=None):
    """One sample: x [N, D] attends to source [S, D]; key_mask [S] bool (None = all keys)."""
    heads, head_dim = CFG.num_heads, CFG.hidden_size // CFG.num_heads
    out = np.zeros((x.shape[0], heads, head_dim))
    keys = np.arange(source.shape[0]) if key_mask is None else np.flatnonzero(key_mask)
    for h in range(heads):
        q = x @ p["q"]["kernel"][:, h] + p["q"]["bias"][h]  # [N, hd]
        k = source[keys] @ p["k"]["kernel"][:, h] + p["k"]["bias"][h]  # [S', hd]
        v = source[keys] @ p["v"]["kernel"][:, h] + p["v"]["bias"][h]  # [S', hd]
        q, k = _rms_norm(q, p["norm_q"]["scale"]), _rms_norm(k, p["norm_k"]["scale"])
        if len(keys):  # no key at all: the branch contributes nothing but its output bias
            out[:, h] = _softmax(q @ k.T / math.sqrt(head_dim)) @ v
    # the output projection contracts heads and head_dim together
    return np.einsum("nhc,hcd->nd", out, p["out"]["kernel"]) + p["out"]["bias"]  # [N, D]


def _patch_tokens(latent, patch):
    """[C, H, W] -> [gh * gw, p * p * C]; token (i, j) row-major, features ordered (row in patch, column, channel)."""
    channels, height, width = latent.shape
    rows = []
    for i in range(height // patch):
        for j in range(width // patch):
            block = latent[:, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch]  # [C, p, p]
            rows.append(block.transpose(1, 2, 0).reshape(-1))
    return np.stack(rows)


def _untokens(tokens, patch, channels, height, width):
    out = np.zeros((channels, height, width))
    gw = width // patch
    for n, row in enumerate(tokens):
        i, j = divmod(n, gw)
        out[:, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch] = row.reshape(patch, patch, channels).transpose(2, 0, 1)
    return out


def _position_embedding(dim, grid_h, grid_w):
    """Token (i, j): [sin(i w), cos(i w), sin(j w), cos(j w)], w_k = 10000^(-k / (dim / 4))."""
    quarter = dim // 4
    omega = 10000.0 ** (-np.arange(quarter) / quarter)
    rows = []
    for i in range(grid_h):
        for j in range(grid_w):
            rows.append(np.concatenate([np.sin(i * omega), np.cos(i * omega), np.sin(j * omega), np.cos(j * omega)]))
    return np.stack(rows)  # [N, dim]


def _timestep_features(t, dim=256):
    """[cos(t f), sin(t f)], f_k = 10000^(-k / (dim / 2))."""
    half = dim // 2
    args = float(t) * 10000.0 ** (-np.arange(half) / half)
    return np.concatenate([np.cos(args), np.sin(args)])


def reference_forward(params, x, t, text, text_mask):
    """The student's velocity for a batch, computed sample by sample in float64; returns (out, leaves read)."""
    p = _Tracked(params)
    patch, dim = CFG.patch_size, CFG.hidden_size
    batch, channels, height, width = x.shape
    pos = _position_embedding(dim, height // patch, width // patch)
    out = np.zeros(x.shape)
    for b in range(batch):
        tokens = _dense(p["x_embedder"], _patch_tokens(np.asarray(x[b], np.float64), patch)) + pos  # [N, D]

        t_emb = _dense(p["t_embedder_fc2"], _silu(_dense(p["t_embedder_fc1"], _timestep_features(t[b]))))  # [D]
        real = np.asarray(text_mask[b])
        words = np.where(real[:, None], np.asarray(text[b], np.float64), 0.0)  # padding carries no values
        words = _dense(p["text_embedder_fc2"], _gelu_tanh(_dense(p["text_embedder_fc1"], words)))  # [L, D]
        pooled = words[real].sum(0) / max(int(real.sum()), 1)  # masked mean; zero without text
        cond = t_emb + _dense(p["text_pool"], pooled)  # [D]

        for index in range(CFG.depth):
            block = p[f"blocks_{index}"]
            mod = _dense(block["adaLN_modulation"], _silu(cond))  # [6D]
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = np.split(mod, 6)
            h = _layer_norm(tokens) * (1 + scale_msa) + shift_msa
            tokens = tokens + gate_msa * _attention(block["self_attn"], h, h)
            h = _layer_norm(tokens) * block["norm2"]["scale"] + block["norm2"]["bias"]
            tokens = tokens + _attention(block["cross_attn"], h, words, key_mask=real)
            h = _layer_norm(tokens) * (1 + scale_mlp) + shift_mlp
            tokens = tokens + gate_mlp * _dense(block["mlp"]["fc2"], _gelu_tanh(_dense(block["mlp"]["fc1"], h)))

        shift, scale = np.split(_dense(p["final_modulation"], _silu(cond)), 2)
        tokens = _dense(p["final_proj"], _layer_norm(tokens) * (1 + scale) + shift)  # [N, p*p*C]
        out[b] = _untokens(tokens, patch, channels, height, width)
    return out, p.seen


# ------------------------------------------------------------------------------------ fixtures


ZERO_INIT = ("adaLN_modulation", "final_modulation", "final_proj", "cross_attn/out")


def _leaf_names(tree, prefix=""):
    names = []
    for key, value in tree.items():
        names += _leaf_names(value, f"{prefix}{key}/") if isinstance(value, dict) else [f"{prefix}{key}"]
    return names


@pytest.fixture(scope="module", params=[True, False], ids=["scan", "unrolled"])
def case(request):
    """(model, params in the model's own layout, x, t, text, mask); the reference reads unstack_blocks(params)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, CFG.latent_channels, HEIGHT, WIDTH)).astype(np.float32)
    t = np.array([999.0, 412.5, 3.0], np.float32)
    text = rng.standard_normal((BATCH, TEXT_LEN, CFG.text_dim)).astype(np.float32)
    mask = np.arange(TEXT_LEN)[None, :] < np.asarray(REAL_TOKENS)[:, None]
    model = Student(dataclasses.replace(CFG, scan_blocks=request.param))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.asarray(x), jnp.asarray(t), jnp.asarray(text), jnp.asarray(mask))
    params = jax.tree_util.tree_map(np.asarray, params["params"])

    def randomise(path, leaf):
        name = "/".join(k.key for k in path)
        if any(part in name for part in ZERO_INIT):
            assert not leaf.any(), f"{name} is expected to start at zero (adaLN-Zero / zero-init output)"
            return (0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)
        return (leaf + 0.05 * rng.standard_normal(leaf.shape)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(randomise, params)
    return model, params, x, t, text, mask


def test_student_matches_numpy_reference(case):
    model, params, x, t, text, mask = case
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(text),
                               jnp.asarray(mask))
    chex.assert_shape(out, (BATCH, CFG.latent_channels, HEIGHT, WIDTH))
    chex.assert_type(out, jnp.float32)

    assert ("blocks" in params) == model.cfg.scan_blocks  # the layout under test
    per_block = unstack_blocks(params)
    expected, seen = reference_forward(per_block, x, t, text, mask)
    assert expected.shape == out.shape
    names = set(_leaf_names(per_block))
    assert seen == names, f"parameters the reference never reads: {names - seen}"
    out = np.asarray(out, np.float64)
    assert np.abs(expected).mean() > 0.1, "degenerate case: the reference output is almost zero"
    err = np.abs(out - expected)
    print(f"student vs numpy reference: max abs err {err.max():.3g}, mean |out| {np.abs(expected).mean():.3g}")
    assert err.max() <= ATOL, f"student vs numpy reference: max abs err {err.max():.3g} (per sample {err.max((1, 2, 3))})"


def test_every_input_and_zero_init_path_matters(case):
    """The case is not degenerate: the text (where a mask allows it), the timestep and each
    zero-initialised layer move the reference output by far more than ATOL."""
    model, params, x, t, text, mask = case
    params = unstack_blocks(params)
    base, _ = reference_forward(params, x, t, text, mask)

    other_text = text + 1.0
    moved, _ = reference_forward(params, x, t, other_text, mask)
    per_sample = np.abs(moved - base).max((1, 2, 3))
    assert per_sample[0] > 1e-2 and per_sample[1] > 1e-2, per_sample
    assert per_sample[2] == 0.0, "a sample without real tokens must ignore the text values"

    moved, _ = reference_forward(params, x, t + 50.0, text, mask)
    assert np.abs(moved - base).max() > 1e-2

    for part in ZERO_INIT:
        zeroed = jax.tree_util.tree_map_with_path(
            lambda path, leaf: np.zeros_like(leaf) if part in "/".join(k.key for k in path) else leaf, params)
        moved, _ = reference_forward(zeroed, x, t, text, mask)
        assert np.abs(moved - base).max() > 1e-2, f"zeroing {part} barely changes the output"
