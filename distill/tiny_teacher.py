"""Build a tiny Wan2.2-T2V release folder deterministically (the teacher of the CPU default run).

The folder has the exact layout of the real release (tokenizer folder, umT5 `.pth`, VAE `.pth`,
two diffusers-style expert folders with sharded safetensors + index, a JSON config whose
`extensions` block gives the T5/VAE sizes), so the default run goes through the same loading code
as the A14B teacher. Weights are random but deliberately non-degenerate: the reference inits make
the timestep and the text almost irrelevant in a tiny DiT, so (as in the golden fixtures) the
embedding weights get an extra perturbation. Built from seeds in seconds; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from wan.configs.wan_t2v_A14B import t2v_A14B

BUILDER_VERSION = 1  # bump when the recipe changes: the cache key includes it

# Sizes: T5 width must be 4096 because the DiT's text_dim is never read from config.json
# (upstream always uses the default 4096).
T5_SIZES = dict(dim=4096, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2, num_buckets=32, shared_pos=False)
VAE_DIM = 16
DIT_SIZES = dict(model_type="t2v", text_len=32, in_dim=16, dim=64, ffn_dim=128, freq_dim=32, out_dim=16,
                 num_heads=4, num_layers=2, eps=1e-6)
SPECIAL = ["<pad>", "</s>", "<unk>"]


def _words(prompts: list[str]) -> list[str]:
    """Vocabulary: every lower-cased word/punctuation piece of the prompts, sorted (deterministic)."""
    from tokenizers.pre_tokenizers import Whitespace

    pieces = set()
    for prompt in prompts:
        pieces.update(piece for piece, _ in Whitespace().pre_tokenize_str(prompt.lower()))
    return sorted(pieces)


def build_tokenizer(prompts: list[str], folder: Path) -> int:
    """A word-level T5-style tokenizer.json (<pad>=0, </s>=1 appended, <unk>=2). Returns its size."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {tok: i for i, tok in enumerate(SPECIAL + _words(prompts))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.add_special_tokens(SPECIAL)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return len(vocab)


@torch.no_grad()
def _perturb(module: torch.nn.Module, seed: int, extra: dict[str, float]) -> None:
    """Add 0.1 * std noise to every parameter (0.1 for constant ones) plus `extra[name]` * N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        std = param.float().std().item() if param.numel() > 1 else 0.0
        scale = 0.1 * std if std > 0 else 0.1
        noise = torch.randn(param.shape, generator=gen) * scale
        noise += torch.randn(param.shape, generator=gen) * extra.get(name, 0.0)
        param.add_(noise.to(param.dtype))


def _save_expert(folder: Path, seed: int) -> None:
    from safetensors.torch import save_file

    from wan.checkpoint import SAFETENSORS_INDEX
    from wan.modules.model import WanModel

    torch.manual_seed(seed)
    model = WanModel(**DIT_SIZES)
    _perturb(model, seed, {"time_embedding.0.weight": 0.3, "time_embedding.2.weight": 0.2,
                           "text_embedding.2.weight": 0.15, "head.head.weight": 0.1, "head.head.bias": 0.05})
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "WanModel", "_diffusers_version": "0.35.2", **DIT_SIZES}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    # Two shards + index, like the release (the text embedding alone in the first shard).
    first = {k: v for k, v in state.items() if k.startswith("text_embedding.0")}
    rest = {k: v for k, v in state.items() if k not in first}
    names = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    weight_map = {}
    for name, part in zip(names, (first, rest)):
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (folder / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _config(vocab_size: int) -> dict:
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in t2v_A14B.items() if not k.startswith("_")}
    cfg.update(__name__="Config: Wan T2V tiny (wan-distill default teacher)", t5_dtype="bfloat16",
               param_dtype="bfloat16", text_len=DIT_SIZES["text_len"], frame_num=1, sample_steps=8,
               dim=DIT_SIZES["dim"], ffn_dim=DIT_SIZES["ffn_dim"], freq_dim=DIT_SIZES["freq_dim"],
               num_heads=DIT_SIZES["num_heads"], num_layers=DIT_SIZES["num_layers"])
    cfg["extensions"] = {
        "t5_vocab_size": vocab_size, **{f"t5_{k}": v for k, v in T5_SIZES.items()},
        "vae_dim": VAE_DIM, "vae_z_dim": 16,
    }
    return cfg


def build_tiny_release(folder: str | os.PathLike, prompts: list[str], seed: int = 0) -> Path:
    """Write the tiny release into `folder` (atomically: built in a temp dir, then renamed)."""
    from wan.modules.t5 import T5Encoder
    from wan.modules.vae2_1 import _video_vae

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny_release_", dir=folder.parent))
    try:
        vocab_size = build_tokenizer(prompts, tmp / "google" / "umt5-xxl")
        torch.manual_seed(seed)
        t5 = T5Encoder(vocab=vocab_size, dropout=0.0, **T5_SIZES)
        _perturb(t5, seed + 1, {})
        torch.save({k: v.to(torch.bfloat16) for k, v in t5.state_dict().items()}, tmp / "models_t5_umt5-xxl-enc-bf16.pth")
        torch.manual_seed(seed + 2)
        vae = _video_vae(pretrained_path=None, z_dim=16, device="cpu", dim=VAE_DIM)
        _perturb(vae, seed + 2, {})
        torch.save(vae.state_dict(), tmp / "Wan2.1_VAE.pth")
        _save_expert(tmp / "high_noise_model", seed + 3)
        _save_expert(tmp / "low_noise_model", seed + 4)
        (tmp / "config_tiny_t2v.json").write_text(json.dumps(_config(vocab_size), indent=1, ensure_ascii=False))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def tiny_release(cache_dir: str | os.PathLike, prompts: list[str], seed: int = 0) -> Path:
    """The cached tiny release for these prompts and seed, built on first use."""
    key = hashlib.sha1(json.dumps([BUILDER_VERSION, seed, sorted(set(prompts))]).encode()).hexdigest()[:12]
    folder = Path(cache_dir) / f"tiny_release_{key}"
    if not (folder / "config_tiny_t2v.json").is_file():
        build_tiny_release(folder, prompts, seed)
    return folder
