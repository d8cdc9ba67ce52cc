"""The umT5 text encoder of Wan2.2: `T5Encoder`, the `umt5_xxl` builder and `T5EncoderModel`.

Owns the encoder stack (token embedding, per-layer relative position bias, unscaled attention, T5 RMS
norm, gelu-tanh gated FFN) under the exact key names of `models_t5_umt5-xxl-enc-bf16.pth`, and the
prompt -> trimmed embedding wrapper the pipeline calls. Numerics follow upstream in bf16 too: the RMS
norm computes in float32 and casts back to the weight dtype, softmax runs in float32, everything else
in the model dtype. Nothing here is distributed; `shard_fn` lets a caller wrap the loaded model.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from wan.checkpoint import CheckpointError, load_torch_file

from .tokenizers import HuggingfaceTokenizer

__all__ = [
    "T5LayerNorm",
    "T5Attention",
    "T5FeedForward",
    "T5SelfAttention",
    "T5RelativeEmbedding",
    "T5Encoder",
    "T5EncoderModel",
    "T5Config",
    "UMT5_XXL_CONFIG",
    "relative_position_buckets",
    "umt5_xxl",
]



@dataclass(frozen=True)
class T5Config:
    """Sizes of a umT5 encoder: the one place they are written (defaults: the released umT5-xxl).

    A release config's `extensions` block names them `t5_<field>` (`t5_vocab_size` for `vocab`);
    `from_extensions` and `extension_block` are the only translation between the two spellings.
    """

    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    shared_pos: bool = False
    dropout: float = 0.1

    EXTENSION_NAMES = {"vocab": "t5_vocab_size"}  # class constant (not a field): field -> extension key

    @classmethod
    def extension_key(cls, field: str) -> str:
        return cls.EXTENSION_NAMES.get(field, f"t5_{field}")

    @classmethod
    def size_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "dropout")

    @classmethod
    def explicit_sizes(cls, extensions: dict) -> dict:
        """The sizes an `extensions` block states (field -> value); absent ones are left out."""
        return {f: extensions[cls.extension_key(f)] for f in cls.size_fields() if cls.extension_key(f) in extensions}

    def extension_block(self) -> dict:
        return {self.extension_key(f): getattr(self, f) for f in self.size_fields()}

    def build(self) -> "T5Encoder":
        """The encoder with these sizes, on the current default device (use `torch.device('meta')`)."""
        return T5Encoder(**dataclasses.asdict(self))

    def param_count(self) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in self.build().parameters())


UMT5_XXL_CONFIG = T5Config()
# upstream's builder keywords (vocab_size / encoder_layers / decoder_layers), derived from the config
UMT5_XXL = dict(
    vocab_size=UMT5_XXL_CONFIG.vocab,
    dim=UMT5_XXL_CONFIG.dim,
    dim_attn=UMT5_XXL_CONFIG.dim_attn,
    dim_ffn=UMT5_XXL_CONFIG.dim_ffn,
    num_heads=UMT5_XXL_CONFIG.num_heads,
    encoder_layers=UMT5_XXL_CONFIG.num_layers,
    decoder_layers=UMT5_XXL_CONFIG.num_layers,
    num_buckets=UMT5_XXL_CONFIG.num_buckets,
    shared_pos=UMT5_XXL_CONFIG.shared_pos,
    dropout=UMT5_XXL_CONFIG.dropout,
)
MAX_DISTANCE = 128  # relative distances beyond this share the last log bucket


def fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    # float16 residual streams can overflow in T5; pull infinities back into range (no-op otherwise).
    if x.dtype == torch.float16 and torch.isinf(x).any():
        clamp = torch.finfo(x.dtype).max - 1000
        x = torch.clamp(x, min=-clamp, max=clamp)
    return x


class GELU(nn.Module):
    """gelu with the tanh approximation, written out op by op so bf16 rounds like upstream."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class T5LayerNorm(nn.Module):
    """RMS norm without mean or bias; statistics in float32, result cast to a half weight dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (maybe bf16) times a float32 rsqrt promotes to float32; the cast back happens before the
        # weight multiply, exactly where upstream rounds.
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.type_as(self.weight)
        return self.weight * x


def relative_position_buckets(
    query_len: int,
    key_len: int,
    num_buckets: int,
    bidirectional: bool = True,
    max_dist: int = MAX_DISTANCE,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """[query_len, key_len] int64 T5 bucket of rel = key - query (exact below max_exact, log above)."""
    rel_pos = (
        torch.arange(key_len, device=device).unsqueeze(0) - torch.arange(query_len, device=device).unsqueeze(1)
    )  # [Lq, Lk]
    if bidirectional:
        num_buckets //= 2
        buckets = (rel_pos > 0).long() * num_buckets  # keys after the query use the upper half
        rel_pos = rel_pos.abs()
    else:
        buckets = torch.zeros_like(rel_pos)
        rel_pos = -torch.min(rel_pos, torch.zeros_like(rel_pos))
    max_exact = num_buckets // 2
    # float32 log and truncation toward zero (.long()) decide the boundaries; rel 0 gives -inf here
    # but is taken from the exact branch below.
    rel_pos_large = max_exact + (
        torch.log(rel_pos.float() / max_exact) / math.log(max_dist / max_exact) * (num_buckets - max_exact)
    ).long()
    rel_pos_large = torch.min(rel_pos_large, torch.full_like(rel_pos_large, num_buckets - 1))
    return buckets + torch.where(rel_pos < max_exact, rel_pos, rel_pos_large)


class T5RelativeEmbedding(nn.Module):
    """Learned per-head bias for each relative position bucket -> [1, heads, Lq, Lk]."""

    def __init__(self, num_buckets: int, num_heads: int, bidirectional: bool = True, max_dist: int = MAX_DISTANCE):
        super().__init__()
        self.num_buckets = num_buckets
        self.num_heads = num_heads
        self.bidirectional = bidirectional
        self.max_dist = max_dist
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def buckets(self, query_len: int, key_len: int) -> torch.Tensor:
        return relative_position_buckets(
            query_len, key_len, self.num_buckets, self.bidirectional, self.max_dist, self.embedding.weight.device
        )

    def forward(self, query_len: int, key_len: int, buckets: torch.Tensor | None = None) -> torch.Tensor:
        """`buckets` ([Lq, Lk], shared by every layer of an encoder) skips recomputing the table."""
        if buckets is None:
            buckets = self.buckets(query_len, key_len)
        bias = self.embedding(buckets)  # [Lq, Lk, heads]
        return bias.permute(2, 0, 1).unsqueeze(0).contiguous()  # [1, heads, Lq, Lk]


class T5Attention(nn.Module):
    """Multi-head attention without the 1/sqrt(d) scale, plus an additive position/mask bias."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int, dropout: float = 0.1):
        if dim_attn % num_heads != 0:
            raise ValueError(f"dim_attn {dim_attn} is not divisible by num_heads {num_heads}")
        super().__init__()
        self.dim = dim
        self.dim_attn = dim_attn
        self.num_heads = num_heads
        self.head_dim = dim_attn // num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        pos_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, Lq, dim], context [B, Lk, dim] (default x), mask [B, Lk] or [B, Lq, Lk] (0 = masked)."""
        context = x if context is None else context
        batch, heads, head_dim = x.size(0), self.num_heads, self.head_dim
        q = self.q(x).view(batch, -1, heads, head_dim)  # [B, Lq, heads, head_dim]
        k = self.k(context).view(batch, -1, heads, head_dim)  # [B, Lk, heads, head_dim]
        v = self.v(context).view(batch, -1, heads, head_dim)  # [B, Lk, heads, head_dim]

        # The bias lives in the activation dtype (bf16 in the pipeline) like upstream's zero-initialised
        # bias; the mask then overwrites whole key columns with that dtype's most negative value.
        bias = x.new_zeros(1, 1, 1, 1) if pos_bias is None else pos_bias.to(x.dtype)  # [1 or B, heads, Lq, Lk]
        if mask is not None:
            if mask.dim() == 2:
                keep = mask.view(batch, 1, 1, -1)  # [B, 1, 1, Lk]
            else:
                keep = mask.view(batch, 1, *mask.shape[1:])  # [B, 1, Lq, Lk]
            bias = bias.masked_fill(keep == 0, torch.finfo(x.dtype).min)  # [B, heads or 1, Lq, Lk]

        logits = torch.einsum("binc,bjnc->bnij", q, k) + bias  # [B, heads, Lq, Lk]
        weights = torch.softmax(logits.float(), dim=-1).type_as(logits)
        out = torch.einsum("bnij,bjnc->binc", weights, v)  # [B, Lq, heads, head_dim]
        out = out.reshape(batch, -1, heads * head_dim)  # [B, Lq, dim_attn]
        return self.dropout(self.o(out))


class T5FeedForward(nn.Module):
    """fc2(fc1(x) * gelu_tanh(gate(x))); `gate` is a Sequential so its key is `gate.0.weight`."""

    def __init__(self, dim: int, dim_ffn: int, dropout: float = 0.1):
        super().__init__()
        self.dim = dim
        self.dim_ffn = dim_ffn
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), GELU())
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x) * self.gate(x)
        x = self.dropout(x)
        return self.dropout(self.fc2(x))


class T5SelfAttention(nn.Module):
    """One pre-norm encoder block; owns its relative position table unless it is shared."""

    def __init__(
        self,
        dim: int,
        dim_attn: int,
        dim_ffn: int,
        num_heads: int,
        num_buckets: int,
        shared_pos: bool = True,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.shared_pos = shared_pos
        self.norm1 = T5LayerNorm(dim)
        self.attn = T5Attention(dim, dim_attn, num_heads, dropout)
        self.norm2 = T5LayerNorm(dim)
        self.ffn = T5FeedForward(dim, dim_ffn, dropout)
        self.pos_embedding = None if shared_pos else T5RelativeEmbedding(num_buckets, num_heads, bidirectional=True)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        pos_bias: torch.Tensor | None = None,
        buckets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, L, dim]; pos_bias is the shared [1, heads, L, L] bias (shared_pos) else ignored."""
        if not self.shared_pos:
            pos_bias = self.pos_embedding(x.size(1), x.size(1), buckets)  # [1, heads, L, L]
        x = fp16_clamp(x + self.attn(self.norm1(x), mask=mask, pos_bias=pos_bias))
        return fp16_clamp(x + self.ffn(self.norm2(x)))


class T5Encoder(nn.Module):
    """umT5 encoder stack: ids [B, L] (+ mask [B, L]) -> hidden states [B, L, dim] after the final norm."""

    def __init__(
        self,
        vocab: int,
        dim: int,
        dim_attn: int,
        dim_ffn: int,
        num_heads: int,
        num_layers: int,
        num_buckets: int,
        shared_pos: bool = True,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.vocab = vocab
        self.dim = dim
        self.dim_attn = dim_attn
        self.dim_ffn = dim_ffn
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.num_buckets = num_buckets
        self.shared_pos = shared_pos

        self.token_embedding = nn.Embedding(vocab, dim)
        self.pos_embedding = T5RelativeEmbedding(num_buckets, num_heads, bidirectional=True) if shared_pos else None
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            [
                T5SelfAttention(dim, dim_attn, dim_ffn, num_heads, num_buckets, shared_pos, dropout)
                for _ in range(num_layers)
            ]
        )
        self.norm = T5LayerNorm(dim)
        self.apply(init_weights)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.token_embedding(ids)  # [B, L, dim]
        x = self.dropout(x)
        length = x.size(1)
        # One bucket table for every layer; each layer then gathers its own [1, heads, L, L] bias once
        # for the whole batch.
        buckets = relative_position_buckets(
            length, length, self.num_buckets, bidirectional=True, device=x.device
        )  # [L, L]
        shared_bias = self.pos_embedding(length, length, buckets) if self.shared_pos else None
        for block in self.blocks:
            x = block(x, mask, pos_bias=shared_bias, buckets=buckets)
        x = self.norm(x)
        return self.dropout(x)


def init_weights(module: nn.Module) -> None:
    """T5-style initialisation for a freshly built encoder (loading a checkpoint overwrites it)."""
    if isinstance(module, T5LayerNorm):
        nn.init.ones_(module.weight)
    elif isinstance(module, T5Encoder):
        nn.init.normal_(module.token_embedding.weight, std=1.0)
    elif isinstance(module, T5FeedForward):
        nn.init.normal_(module.gate[0].weight, std=module.dim**-0.5)
        nn.init.normal_(module.fc1.weight, std=module.dim**-0.5)
        nn.init.normal_(module.fc2.weight, std=module.dim_ffn**-0.5)
    elif isinstance(module, T5Attention):
        # The q scale absorbs the 1/sqrt(d) that the attention itself omits.
        nn.init.normal_(module.q.weight, std=(module.dim * module.dim_attn) ** -0.5)
        nn.init.normal_(module.k.weight, std=module.dim**-0.5)
        nn.init.normal_(module.v.weight, std=module.dim**-0.5)
        nn.init.normal_(module.o.weight, std=(module.num_heads * module.dim_attn) ** -0.5)
    elif isinstance(module, T5RelativeEmbedding):
        nn.init.normal_(module.embedding.weight, std=(2 * module.num_buckets * module.num_heads) ** -0.5)


# Builder keyword -> T5Encoder keyword (upstream's builder speaks vocab_size / encoder_layers).
_ENCODER_ALIASES = {"vocab_size": "vocab", "encoder_layers": "num_layers"}


def umt5_xxl(
    encoder_only: bool = True,
    return_tokenizer: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    **overrides,
):
    """Build the umT5-xxl encoder (random init; `device='meta'` for a weightless skeleton).

    overrides: any T5Encoder size (vocab / vocab_size, dim, dim_attn, dim_ffn, num_heads,
    num_layers / encoder_layers, num_buckets, shared_pos, dropout); decoder_layers is accepted and
    ignored. return_tokenizer=True also needs `tokenizer_path` (a local folder) and takes `text_len`.
    """
    if not encoder_only:
        raise NotImplementedError("only the umT5 encoder is ported (encoder_only=True); Wan never uses the decoder")
    tokenizer_path = overrides.pop("tokenizer_path", None)
    text_len = overrides.pop("text_len", None)
    overrides.pop("decoder_layers", None)

    config = dataclasses.asdict(UMT5_XXL_CONFIG)
    for key, value in overrides.items():
        name = _ENCODER_ALIASES.get(key, key)
        if name not in config:
            raise TypeError(f"umt5_xxl got an unknown size override {key!r}; known: {sorted(config)}")
        config[name] = value

    with torch.device(device):
        model = T5Encoder(**config)
    model = model.to(dtype=dtype, device=device)
    if not return_tokenizer:
        return model
    if tokenizer_path is None:
        raise ValueError("umt5_xxl(return_tokenizer=True) needs tokenizer_path=<local google/umt5-xxl folder>")
    return model, HuggingfaceTokenizer(tokenizer_path, seq_len=text_len, clean="whitespace")


def infer_sizes(state: dict[str, torch.Tensor], source: str) -> dict:
    """T5Encoder sizes read off a state dict's shapes (so a tiny or full release loads without a config)."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(
                f"cannot infer the umT5 sizes from {source}: key {key!r} is missing. "
                "Is this a T5Encoder state dict (models_t5_umt5-xxl-enc-bf16.pth)?"
            )
        return tuple(state[key].shape)

    shared_pos = "pos_embedding.embedding.weight" in state
    pos_key = "pos_embedding.embedding.weight" if shared_pos else "blocks.0.pos_embedding.embedding.weight"
    vocab, dim = shape("token_embedding.weight")
    num_buckets, num_heads = shape(pos_key)
    layer_ids = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    return dict(
        vocab=vocab,
        dim=dim,
        dim_attn=shape("blocks.0.attn.q.weight")[0],
        dim_ffn=shape("blocks.0.ffn.fc1.weight")[0],
        num_heads=num_heads,
        num_layers=max(layer_ids, default=-1) + 1,
        num_buckets=num_buckets,
        shared_pos=shared_pos,
    )


class T5EncoderModel:
    """Prompts -> list of [L_i, dim] umT5 embeddings trimmed to each prompt's token count.

    text_len: tokenizer length (512 in the pipeline). checkpoint_path: the `.pth` state dict.
    tokenizer_path: local folder with tokenizer.json. shard_fn(model) -> model wraps the loaded
    encoder (upstream's FSDP hook); `parallelize(meta_model) -> model` instead shards the encoder
    while it is still on meta, and `local_view` then says which rows of each tensor this rank reads
    (`wan.distributed` provides both), so no rank ever holds the whole encoder. Sizes (`T5Config`
    field names: vocab, dim, dim_attn, dim_ffn, num_heads, num_layers, num_buckets, shared_pos)
    default to the checkpoint's shapes.
    """

    def __init__(
        self,
        text_len: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        tokenizer_path: str | os.PathLike | None = None,
        shard_fn: Callable[[nn.Module], nn.Module] | None = None,
        parallelize: Callable[[nn.Module], nn.Module] | None = None,
        local_view=None,
        **sizes,
    ):
        from wan.checkpoint import StateDictSource, cast_like_source, check_state_dict, fill_module

        unknown = sorted(set(sizes) - set(T5Config.size_fields()))
        if unknown:
            raise TypeError(f"T5EncoderModel got unknown size arguments {unknown}; known: {list(T5Config.size_fields())}")
        if checkpoint_path is None:
            raise ValueError("T5EncoderModel needs checkpoint_path (models_t5_umt5-xxl-enc-bf16.pth)")
        if tokenizer_path is None:
            raise ValueError("T5EncoderModel needs tokenizer_path (the release's google/umt5-xxl folder)")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.text_len = text_len
        self.dtype = dtype
        self.device = torch.device(device)
        self.checkpoint_path = checkpoint_path
        self.tokenizer_path = tokenizer_path

        # Tokenizer first: a wrong folder fails fast, before reading gigabytes of weights.
        self.tokenizer = HuggingfaceTokenizer(name=tokenizer_path, seq_len=text_len, clean="whitespace")

        # mmapped: the pages of a tensor are read only when (the part this rank owns of) it is copied
        state = load_torch_file(checkpoint_path, "umT5 encoder checkpoint")
        # Sizes not given are read off the file, so the tiny and the full release both load as-is.
        config = {} if len(sizes) == len(T5Config.size_fields()) else infer_sizes(state, str(checkpoint_path))
        config = T5Config(**{**config, **sizes})
        with torch.device("meta"):
            model = config.build()
        source = StateDictSource(state, str(checkpoint_path))
        check_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()}, state, str(checkpoint_path))
        if len(self.tokenizer) > model.vocab:
            # Otherwise the first rare token would fail deep inside the embedding lookup.
            raise CheckpointError(
                f"tokenizer {tokenizer_path} has {len(self.tokenizer)} tokens but the token_embedding of "
                f"{checkpoint_path} has only {model.vocab} rows; the tokenizer and checkpoint do not belong together"
            )
        cast_like_source(model, source, dtype)
        model.eval().requires_grad_(False)
        if parallelize is not None:
            model = parallelize(model)
        target = self.device if (shard_fn is None or parallelize is not None) else torch.device("cpu")
        fill_module(model, source, target, **({} if local_view is None else {"local_view": local_view}))
        del state, source
        if shard_fn is not None:
            model = shard_fn(model)
        self.model = model

    @torch.no_grad()
    def __call__(self, texts: str | list[str], device: torch.device | str | None = None) -> list[torch.Tensor]:
        """Each prompt's [L_i, dim] hidden states (L_i = its tokens including </s>) in the model dtype."""
        device = self.device if device is None else device
        ids, mask = self.tokenizer(texts, return_mask=True, add_special_tokens=True)  # [B, text_len] each
        ids, mask = ids.to(device), mask.to(device)
        seq_lens = mask.gt(0).sum(dim=1).tolist()  # [B] python ints: one device sync
        hidden = self.model(ids, mask)  # [B, text_len, dim]
        return [u[:v] for u, v in zip(hidden, seq_lens)]
