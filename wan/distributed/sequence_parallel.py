"""Ulysses sequence parallelism for the Wan DiT, declared as data and applied with hooks.

Inside a group of `sp` ranks that hold the same samples, every rank keeps 1/sp of the token
sequence through the transformer blocks; self-attention needs all tokens, so around its kernel
(`AttentionCore`) an all-to-all trades the sequence shards for head shards (each rank then attends
over the whole sequence with num_heads/sp heads) and a second all-to-all trades them back. Nothing
in the model changes: `WAN_DIT_SP_PLAN` says which module arguments are split, where the
all-to-alls go and which output is gathered, and `apply_sequence_parallel` registers forward
(pre-)hooks that do exactly that. Upstream instead replaces `forward` methods and supports only
sp = world; here `sp` is any divisor of the world size (the dp x sp grid of `bridge.Runtime`).

What is split is chosen by shape: a listed argument is cut along dim 1 when that dim is the padded
sequence length of the current call, so per-sample timestep embeddings ([B, 1, ...]) stay whole
and per-token ones ([B, L, ...]) are split. The root's `seq_len` is rounded up to a multiple of sp
(the extra tokens are padding, dropped by unpatchify). Rotary tables are built for the global
sequence before the split, so each rank rotates its tokens by their global positions. Key padding
(`seq_lens`) is global too: after the first all-to-all each rank sees the whole sequence.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["SequenceParallelPlan", "WAN_DIT_SP_PLAN", "apply_sequence_parallel", "heads_to_seq", "seq_to_heads"]


@dataclasses.dataclass(frozen=True)
class SequenceParallelPlan:
    """What Ulysses does to a model, by module name (`*` in a pattern is one name segment).

    seq_len_arg: the root forward's argument holding the padded token count (rounded up to sp).
    split_inputs: module pattern -> forward arguments cut along dim 1 (when it is the sequence).
    all_to_all: modules whose first three inputs (q, k, v: [B, L/sp, heads, head_dim]) become head
        shards [B, L, heads/sp, head_dim], and whose output goes back to sequence shards.
    gather_outputs: modules whose output [B, L/sp, ...] is gathered to [B, L, ...].
    heads_attr: root attribute giving the attention head count (must divide by sp).
    """

    seq_len_arg: str
    split_inputs: dict[str, tuple[str, ...]]
    all_to_all: tuple[str, ...]
    gather_outputs: tuple[str, ...]
    heads_attr: str = "num_heads"


WAN_DIT_SP_PLAN = SequenceParallelPlan(
    seq_len_arg="seq_len",
    split_inputs={"blocks.*": ("x", "e", "freqs"), "head": ("e",)},
    all_to_all=("blocks.*.self_attn.core",),
    gather_outputs=("head",),
)


# ---------------------------------------------------------------------------------------------- collectives


def seq_to_heads(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """[B, L/sp, H, D] sequence shard -> [B, L, H/sp, D] head shard (all-to-all inside `group`)."""
    batch, local_len, heads, head_dim = x.shape
    send = x.reshape(batch, local_len, size, heads // size, head_dim).permute(2, 0, 1, 3, 4).contiguous()
    received = torch.empty_like(send)  # [sp, B, L/sp, H/sp, D]: block j = rank j's tokens, my heads
    dist.all_to_all_single(received, send, group=group)
    return received.permute(1, 0, 2, 3, 4).reshape(batch, size * local_len, heads // size, head_dim)


def heads_to_seq(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """[B, L, H/sp, D] head shard -> [B, L/sp, H, D] sequence shard (the inverse of `seq_to_heads`)."""
    batch, length, local_heads, head_dim = x.shape
    local_len = length // size
    send = x.reshape(batch, size, local_len, local_heads, head_dim).permute(1, 0, 2, 3, 4).contiguous()
    received = torch.empty_like(send)  # [sp, B, L/sp, H/sp, D]: block j = head group j of my tokens
    dist.all_to_all_single(received, send, group=group)
    return received.permute(1, 2, 0, 3, 4).reshape(batch, local_len, size * local_heads, head_dim)


def _gather_seq(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """[B, L/sp, ...] -> [B, L, ...] in rank order."""
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


# ---------------------------------------------------------------------------------------------- hooks


class _Call:
    """The padded sequence length of the root call in flight (None outside one)."""

    seq_len: int | None = None


def _positions(module: nn.Module, names: tuple[str, ...]) -> dict[str, int]:
    params = list(inspect.signature(module.forward).parameters)
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"sequence-parallel plan names arguments {missing} that {type(module).__name__}.forward "
                         f"does not take (it takes {params})")
    return {n: params.index(n) for n in names}


def _matching(model: nn.Module, pattern: str) -> list[nn.Module]:
    """Modules whose dotted name matches `pattern`, where `*` stands for exactly one name segment."""
    regex = re.compile("".join("[^.]+" if part == "*" else re.escape(part) for part in re.split(r"(\*)", pattern)))
    found = [m for name, m in model.named_modules() if regex.fullmatch(name)]
    if not found:
        raise ValueError(f"sequence-parallel plan pattern {pattern!r} matches no module of {type(model).__name__}")
    return found


def apply_sequence_parallel(model: nn.Module, group, plan: SequenceParallelPlan = WAN_DIT_SP_PLAN) -> nn.Module:
    """Register the plan's hooks on `model` for the sp process `group`; returns the model (modified in place).

    Every rank of `group` must call the model with the same samples. With a group of size 1 nothing
    is registered.
    """
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if size == 1:
        return model
    heads = getattr(model, plan.heads_attr)
    if heads % size:
        raise ValueError(
            f"sequence parallel size {size} does not divide the {heads} attention heads; "
            f"use --teacher.sp with a divisor of {heads}"
        )
    call = _Call()
    seq_index = _positions(model, (plan.seq_len_arg,))[plan.seq_len_arg]

    def root_pre(module, args, kwargs):
        args = list(args)
        if plan.seq_len_arg in kwargs:
            seq_len = kwargs[plan.seq_len_arg]
        elif len(args) > seq_index:
            seq_len = args[seq_index]
        else:
            raise ValueError(f"{type(module).__name__} under sequence parallelism needs {plan.seq_len_arg}")
        padded = math.ceil(int(seq_len) / size) * size
        t = kwargs.get("t", args[1] if len(args) > 1 else None)
        if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == seq_len and padded != seq_len:
            t = nn.functional.pad(t, (0, padded - seq_len))  # per-token timesteps of the padding tokens
            if "t" in kwargs:
                kwargs["t"] = t
            else:
                args[1] = t
        if plan.seq_len_arg in kwargs:
            kwargs[plan.seq_len_arg] = padded
        else:
            args[seq_index] = padded
        call.seq_len = padded
        return tuple(args), kwargs

    def root_post(module, args, kwargs, output):
        call.seq_len = None

    model.register_forward_pre_hook(root_pre, with_kwargs=True)
    model.register_forward_hook(root_post, with_kwargs=True)

    def make_split(positions: dict[str, int]):
        def split(module, args, kwargs):
            if call.seq_len is None:
                return None
            local = call.seq_len // size

            def cut(value):
                if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == call.seq_len:
                    return value.narrow(1, rank * local, local)
                return value

            args = list(args)
            for name, index in positions.items():
                if name in kwargs:
                    kwargs[name] = cut(kwargs[name])
                elif index < len(args):
                    args[index] = cut(args[index])
            return tuple(args), kwargs

        return split

    for pattern, names in plan.split_inputs.items():
        for module in _matching(model, pattern):
            # forward's own parameter list excludes self, so positions index args directly
            module.register_forward_pre_hook(make_split(_positions(module, names)), with_kwargs=True)

    def to_heads(module, args):
        q, k, v = (seq_to_heads(x, group, size) for x in args[:3])
        return (q, k, v, *args[3:])

    def to_seq(module, args, output):
        return heads_to_seq(output, group, size)

    for pattern in plan.all_to_all:
        for module in _matching(model, pattern):
            module.register_forward_pre_hook(to_heads)
            module.register_forward_hook(to_seq)

    def gather(module, args, output):
        return _gather_seq(output, group, size)

    for pattern in plan.gather_outputs:
        for module in _matching(model, pattern):
            module.register_forward_hook(gather)
    model.sequence_parallel_size = size
    return model
