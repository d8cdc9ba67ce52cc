"""Synthetic Wan2.2-T2V-A14B release folders: the exact release layout, random weights, any size.

For GPU runs and benchmarks without the real checkpoint (126 GB, not on our machines) and for
tests at tiny size. The folder holds what a release holds (tokenizer folder, umT5 `.pth`, VAE
`.pth`, two expert folders with `config.json` + sharded safetensors + index) plus a task config
`config_synthetic_t2v.json` whose `extensions` block records the umT5 / VAE sizes, so it loads
through `WanT2V` and `train.py --teacher_path` unchanged. Widths default to the real model's; the
layer counts are parameters because two full 40-layer experts (57 GB in bf16) plus their load do
not fit a 64 GB disk.

    python -m wan.synthetic /tmp/wan_synth --layers 20 --t5-layers 2        # full width, 20 layers
    python -m wan.synthetic /tmp/wan_tiny --tiny                            # test size

Weights: N(0, 1/fan_in) for matrices (so activations keep unit scale through many layers), ones for
norm scales, small random biases and modulation tables, drawn per tensor from a seeded generator
on `device` (a GPU makes a full-width expert in seconds), written shard by shard so host memory
holds one shard at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .checkpoint import SAFETENSORS_INDEX
from .configs import dit_config, extension_block
from .configs.wan_t2v_A14B import t2v_A14B
from .modules.model import DiTConfig
from .modules.t5 import T5Config
from .modules.vae2_1 import VAEConfig

__all__ = ["TINY", "atomic_folder", "build_release", "build_tokenizer", "random_state", "write_expert", "write_task_config"]

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]
DEFAULT_PROMPTS = [
    "a red circle on a blue background", "two green squares", "a yellow triangle above a grey line",
    "a cat walks on the grass", "a small white star in the corner", "three purple dots",
]
CONFIG_NAME = "config_synthetic_t2v.json"

# test size: the widths of tests/golden's tiny release (T5 width 4096 = the DiT's fixed text_dim)
TINY = dict(
    dit=DiTConfig(text_len=32, dim=64, ffn_dim=128, freq_dim=32, num_heads=4, num_layers=2),
    t5=T5Config(vocab=384, dim=4096, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2),
    vae=VAEConfig(dim=16),
)


def build_tokenizer(prompts: list[str], folder: Path) -> int:
    """A word-level T5-style tokenizer.json (<pad>=0, </s>=1 appended, <unk>=2) over the prompts' words.

    Returns its size. The real umT5 tokenizer is not ours to ship; a synthetic release needs a
    tokenizer the offline `tokenizers` library reads, with ids below the embedding's row count.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    pieces = set()
    for prompt in prompts:
        pieces.update(piece for piece, _ in Whitespace().pre_tokenize_str(prompt.lower()))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(pieces))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.add_special_tokens(SPECIAL_TOKENS)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return len(vocab)


def _random_tensor(name: str, meta: torch.Tensor, gen: torch.Generator, device, dtype) -> torch.Tensor:
    shape = tuple(meta.shape)
    if name.endswith("modulation"):
        value = torch.randn(shape, generator=gen, device=device) / shape[-1] ** 0.5
    elif len(shape) >= 2:
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        value = torch.randn(shape, generator=gen, device=device) / fan_in ** 0.5
    elif name.endswith("bias"):
        value = 0.02 * torch.randn(shape, generator=gen, device=device)
    else:  # norm scales
        value = 1.0 + 0.02 * torch.randn(shape, generator=gen, device=device)
    return value.to(dtype).cpu()


def random_state(module: torch.nn.Module, seed: int, device="cpu", dtype=torch.bfloat16):
    """(name, random tensor) for every entry of a (meta) module's state dict, in order, one at a time."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, meta in module.state_dict().items():
        yield name, _random_tensor(name, meta, gen, device, dtype)


def write_expert(folder: Path, config: DiTConfig, tensors, shard_bytes: int = 4 << 30) -> None:
    """One expert folder: config.json, safetensors shards of at most `shard_bytes`, and the index.

    `tensors` yields (name, tensor) in state-dict order; a shard is written (and freed) when full.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.config_json(), indent=2, sort_keys=True))
    shards: list[dict[str, torch.Tensor]] = [{}]
    names: list[str] = []
    weight_map, total, current = {}, 0, 0

    def flush():
        index = len(names) + 1
        name = f"diffusion_pytorch_model-{index:05d}.safetensors"  # renamed to -of- once the count is known
        save_file(shards[-1], str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shards[-1]})
        names.append(name)
        shards[-1] = {}

    for key, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and current + size > shard_bytes:
            flush()
            current = 0
        shards[-1][key] = tensor.contiguous()
        current += size
        total += size
    if shards[-1]:
        flush()
    renames = {old: f"diffusion_pytorch_model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i, old in enumerate(names)}
    for old, new in renames.items():
        os.replace(folder / old, folder / new)
    weight_map = {k: renames[v] for k, v in weight_map.items()}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                        indent=2))


def write_task_config(folder: Path, dit: DiTConfig, t5: T5Config, vae: VAEConfig, name: str = CONFIG_NAME,
                      **fields) -> Path:
    """The release's task config (upstream t2v_A14B field names) with the sizes in `extensions`."""
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in t2v_A14B.items() if not k.startswith("_")}
    cfg.update(__name__="Config: Wan T2V (synthetic release)", t5_dtype="bfloat16", param_dtype="bfloat16",
               text_len=dit.text_len, dim=dit.dim, ffn_dim=dit.ffn_dim, freq_dim=dit.freq_dim,
               num_heads=dit.num_heads, num_layers=dit.num_layers)
    cfg.update(fields)
    cfg["extensions"] = extension_block(t5, vae, dit)
    path = folder / name
    path.write_text(json.dumps(cfg, indent=1, ensure_ascii=False))
    return path


@contextlib.contextmanager
def atomic_folder(folder: Path):
    """A temporary folder beside `folder` that replaces it (one rename) when the block succeeds and is
    removed when it fails: readers never see a half-written release."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}_", dir=folder.parent))
    try:
        yield tmp
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def build_release(folder: str | os.PathLike, dit: DiTConfig | None = None, t5: T5Config | None = None,
                  vae: VAEConfig | None = None, prompts: list[str] | None = None, seed: int = 0,
                  dtype: torch.dtype = torch.bfloat16, device: str = "cpu", shard_bytes: int = 4 << 30) -> Path:
    """Write a synthetic release into `folder` (built in a temporary folder beside it, then renamed).

    dit / t5 / vae default to the real sizes (A14B expert, umT5-xxl, Wan2.1 VAE); the experts are
    stored in `dtype`, umT5 in bf16 (as the release's file name says), the VAE in float32.
    """
    from .modules.vae2_1 import WanVAE_

    dit = dit or dit_config(t2v_A14B)
    t5 = t5 or T5Config()
    vae = vae or VAEConfig()
    prompts = prompts or DEFAULT_PROMPTS
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        vocab = build_tokenizer(prompts, tmp / "google" / "umt5-xxl")
        if vocab > t5.vocab:
            raise ValueError(f"the prompts have {vocab} distinct tokens, more than the umT5 vocab {t5.vocab}")
        with torch.device("meta"):
            t5_meta, vae_meta = t5.build(), WanVAE_(**vae.kwargs())
        torch.save(dict(random_state(t5_meta, seed, device, torch.bfloat16)), tmp / t2v_A14B.t5_checkpoint)
        torch.save(dict(random_state(vae_meta, seed + 1, device, torch.float32)), tmp / t2v_A14B.vae_checkpoint)
        for offset, sub in enumerate((t2v_A14B.high_noise_checkpoint, t2v_A14B.low_noise_checkpoint)):
            with torch.device("meta"):
                meta = dit.build()
            write_expert(tmp / sub, dit, random_state(meta, seed + 2 + offset, device, dtype), shard_bytes)
        write_task_config(tmp, dit, t5, vae, frame_num=1)
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--layers", type=int, default=None, help="DiT blocks per expert (default: 40, as released)")
    parser.add_argument("--t5-layers", type=int, default=None, help="umT5 blocks (default: 24, as released)")
    parser.add_argument("--tiny", action="store_true", help="test sizes instead of the real widths")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = dict(TINY) if args.tiny else dict(dit=dit_config(t2v_A14B), t5=T5Config(), vae=VAEConfig())
    if args.layers is not None:
        sizes["dit"] = dataclasses.replace(sizes["dit"], num_layers=args.layers)
    if args.t5_layers is not None:
        sizes["t5"] = dataclasses.replace(sizes["t5"], num_layers=args.t5_layers)
    start = time.perf_counter()
    path = build_release(args.folder, **sizes, seed=args.seed, dtype=getattr(torch, args.dtype), device=args.device)
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(json.dumps({"folder": str(path), "bytes": total, "dit_layers": sizes["dit"].num_layers,
                      "t5_layers": sizes["t5"].num_layers, "seconds": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
