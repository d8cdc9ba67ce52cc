"""A tiny random-weight Wan2.2-T2V release, built deterministically: the teacher of the golden loss curves.

It was the CPU default's teacher before the trained toy-world teacher (distill/toy_teacher.py); the
golden curves in tests/assets/losses/ were recorded on it, so it stays as a test fixture.

The folder has the exact layout of the real release (tokenizer folder, umT5 `.pth`, VAE `.pth`,
two diffusers-style expert folders with sharded safetensors + index, a JSON config whose
`extensions` block gives the T5/VAE sizes), so the default run goes through the same loading code
as the A14B teacher. Weights are random but deliberately non-degenerate: the reference inits make
the timestep and the text almost irrelevant in a tiny DiT, so (as in the golden fixtures) the
embedding weights get an extra perturbation. Built from seeds in seconds; nothing is downloaded.
The sizes are `wan.synthetic.TINY` (the typed configs beside each module); the tokenizer and task
config writers are `wan.synthetic`'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

from wan.synthetic import TINY, atomic_folder, build_tokenizer, write_task_config

BUILDER_VERSION = 1  # bump when the recipe changes: the cache key includes it

# T5 width must be 4096 because the DiT's text_dim is never read from config.json (upstream always
# uses the default 4096); the umT5 vocab is the tokenizer's, set per prompt list.
DIT, T5, VAE = TINY["dit"], TINY["t5"], TINY["vae"]


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
    torch.manual_seed(seed)
    model = DIT.build()
    _perturb(model, seed, {"time_embedding.0.weight": 0.3, "time_embedding.2.weight": 0.2,
                           "text_embedding.2.weight": 0.15, "head.head.weight": 0.1, "head.head.bias": 0.05})
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(DIT.config_json(), indent=2, sort_keys=True))
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


def build_tiny_release(folder: str | os.PathLike, prompts: list[str], seed: int = 0) -> Path:
    """Write the tiny release into `folder` (atomically: built in a temp dir, then renamed)."""
    from wan.modules.vae2_1 import _video_vae

    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        vocab_size = build_tokenizer(prompts, tmp / "google" / "umt5-xxl")
        torch.manual_seed(seed)
        t5 = dataclasses.replace(T5, vocab=vocab_size, dropout=0.0).build()
        _perturb(t5, seed + 1, {})
        torch.save({k: v.to(torch.bfloat16) for k, v in t5.state_dict().items()}, tmp / "models_t5_umt5-xxl-enc-bf16.pth")
        torch.manual_seed(seed + 2)
        vae = _video_vae(pretrained_path=None, z_dim=VAE.z_dim, device="cpu", dim=VAE.dim)
        _perturb(vae, seed + 2, {})
        torch.save(vae.state_dict(), tmp / "Wan2.1_VAE.pth")
        _save_expert(tmp / "high_noise_model", seed + 3)
        _save_expert(tmp / "low_noise_model", seed + 4)
        write_task_config(tmp, DIT, dataclasses.replace(T5, vocab=vocab_size), VAE, name="config_tiny_t2v.json",
                          __name__="Config: Wan T2V tiny (wan-distill default teacher)", frame_num=1, sample_steps=8)
    return folder


def tiny_release(cache_dir: str | os.PathLike, prompts: list[str], seed: int = 0) -> Path:
    """The cached tiny release for these prompts and seed, built on first use."""
    key = hashlib.sha1(json.dumps([BUILDER_VERSION, seed, sorted(set(prompts))]).encode()).hexdigest()[:12]
    folder = Path(cache_dir) / f"tiny_release_{key}"
    if not (folder / "config_tiny_t2v.json").is_file():
        build_tiny_release(folder, prompts, seed)
    return folder


ASSETS = Path(__file__).resolve().parent / "assets"
PROMPTS, EVAL_PROMPTS = ASSETS / "prompts_tiny.txt", ASSETS / "prompts_tiny_eval.txt"


def tiny_flags(cache_dir: str | os.PathLike) -> list[str]:
    """train.py flags that run on this fast random teacher (built in `cache_dir`) and its prompts."""
    prompts = [p.strip() for f in (PROMPTS, EVAL_PROMPTS) for p in f.read_text().splitlines() if p.strip()]
    folder = tiny_release(cache_dir, prompts)
    return ["--teacher_path", str(folder), "--data.prompts", str(PROMPTS), "--data.eval_prompts", str(EVAL_PROMPTS)]
