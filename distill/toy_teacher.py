"""A trained toy-world Wan teacher: the embedded default's teacher, and the script that trains it.

The teacher is a Wan2.2 release in miniature, trained by this project on `distill.toyworld`: a
Wan2.1-architecture VAE (the same module code as the real one, base width 12), two DiT experts
(high-noise for t >= 875, low-noise below; flow matching with Wan's conventions, x_t = (1 - s) x0 +
s eps, v = eps - x0, t = 1000 s; captions dropped to the negative prompt 10% of the time so CFG
works) and the small umT5-architecture encoder with a word-level tokenizer. umT5 is not trained:
its random weights come from a seed (a frozen random text encoder still gives every word its own
features, which the DiT learns to read), so only the VAE and the experts are shipped, in bf16, in
`distill/assets/toy_teacher/` (each file under 5 MiB). `toy_release(cache_dir)` unpacks them into
the exact release layout (float32), which loads through `WanT2V` unchanged.

Train it again (one GPU: minutes; CPU: slowly) and write the assets:

    python -m distill.toy_teacher --out distill/assets/toy_teacher [--device cuda]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from wan.modules.model import DiTConfig
from wan.modules.t5 import T5Config
from wan.modules.vae2_1 import LATENTS_MEAN, LATENTS_STD, VAEConfig

from . import toyworld

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets" / "toy_teacher"
BUILDER_VERSION = 1
IMAGE = 64
DIT = DiTConfig(text_len=16, dim=128, ffn_dim=512, freq_dim=64, num_heads=4, num_layers=4)
T5 = T5Config(vocab=64, dim=4096, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2)  # vocab set below
VAE = VAEConfig(dim=12)
T5_SEED = 1234
BOUNDARY = 0.875


def vocabulary() -> list[str]:
    """Every word a toy caption can use (the tokenizer is built from these)."""
    words = list(toyworld.COUNTS.values()) + list(toyworld.SIZES) + list(toyworld.COLOURS)
    words += [s for shape in toyworld.SHAPES for s in (shape, shape + "s")]
    words += list(toyworld.POSITIONS) + list(toyworld.BACKGROUNDS) + ["at", "the", "in", "on", "background"]
    return words


def _write_release(folder: Path, vae_state: dict, experts: dict[str, dict]) -> None:
    """The release layout: tokenizer, umT5 (from its seed), VAE, two experts, task config."""
    from wan.configs.wan_t2v_A14B import t2v_A14B
    from wan.synthetic import build_tokenizer, write_expert, write_task_config

    vocab = build_tokenizer([" ".join(vocabulary())], folder / "google" / "umt5-xxl")
    t5 = dataclasses.replace(T5, vocab=vocab, dropout=0.0)
    torch.manual_seed(T5_SEED)
    encoder = t5.build()
    torch.save({k: v.to(torch.bfloat16) for k, v in encoder.state_dict().items()}, folder / t2v_A14B.t5_checkpoint)
    torch.save({k: v.float() for k, v in vae_state.items()}, folder / t2v_A14B.vae_checkpoint)
    for name, sub in (("high", t2v_A14B.high_noise_checkpoint), ("low", t2v_A14B.low_noise_checkpoint)):
        write_expert(folder / sub, DIT, ((k, v.float()) for k, v in experts[name].items()), shard_bytes=4 << 20)
    write_task_config(folder, DIT, t5, VAE, name="config_toy_t2v.json",
                      __name__="Config: Wan T2V toy world (wan-distill default teacher)", frame_num=1,
                      sample_steps=40)


def toy_release(cache_dir: str | os.PathLike, assets: Path = ASSETS) -> Path:
    """The shipped toy teacher unpacked into `cache_dir/toy_release_<hash>/` (built on first use)."""
    from safetensors.torch import load_file

    from wan.synthetic import atomic_folder

    files = sorted(assets.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no toy teacher weights in {assets}: train them with python -m distill.toy_teacher")
    import hashlib

    digest = hashlib.sha1(str(BUILDER_VERSION).encode())
    for f in files:  # the content, not the size: retrained bf16 weights have the same size
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    folder = Path(cache_dir) / f"toy_release_{digest.hexdigest()[:12]}"
    if not (folder / "config_toy_t2v.json").is_file():
        weights = {f.stem: load_file(str(f)) for f in files}
        with atomic_folder(folder) as tmp:
            _write_release(tmp, weights["vae"], {"high": weights["high_noise_model"], "low": weights["low_noise_model"]})
    return folder


# ---------------------------------------------------------------------------------------------- training


def _images(scenes: list[toyworld.Scene]) -> torch.Tensor:
    """[N, 3, 1, H, W] float32 in [-1, 1]."""
    pixels = np.stack([toyworld.render(s, IMAGE) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(0, 3, 1, 2)[:, :, None]


def _cosine(step: int, total: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def train_vae(images: torch.Tensor, steps: int, batch: int, device: torch.device, seed: int, lr: float = 5e-4):
    """An autoencoder on the images; returns WanVAE_.

    The loss is MSE + L1 on pixels, weighted 10x on the shapes' pixels: flat backgrounds are most of
    every image, and an unweighted loss learns them long before the shapes' colours and outlines."""
    from wan.modules.vae2_1 import WanVAE_

    torch.manual_seed(seed)
    model = WanVAE_(**VAE.kwargs()).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)  # 2e-3 stalled at the mean image
    gen = torch.Generator().manual_seed(seed)
    raw = (0.0, 1.0)
    on_device = images.to(device)
    start = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine(step, steps, 200, lr)
        x = on_device[torch.randint(len(images), (batch,), generator=gen).to(device)]
        shapes = ((x - x[:, :, :, :1, :1]).abs().amax(dim=1, keepdim=True) > 0.05).float()  # corner = background
        mu = model.encode(x, raw)
        recon = model.decode(mu, raw)
        weight = 1 + 9 * shapes
        loss = torch.mean(weight * ((recon - x) ** 2 + 0.1 * (recon - x).abs())) + 1e-6 * torch.mean(mu ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log.info("vae step %d/%d loss %.5f (%.0f s)", step, steps, loss.item(), time.time() - start)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def fold_latent_scale(model, images: torch.Tensor, device: torch.device) -> None:
    """Rescale the VAE so that the wrapper's fixed latent constants map its latents to ~N(0, 1).

    `Wan2_1_VAE` normalises mu as (mu - LATENTS_MEAN) / LATENTS_STD, constants of the real VAE; the
    encoder's mu output and the decoder's first convolution are given the affine map that makes the
    normalised latents zero-mean, unit-std per channel, with the same reconstructions.
    """
    mus = torch.cat([model.encode(images[i:i + 256].to(device), (0.0, 1.0)) for i in range(0, len(images), 256)])
    m = mus.mean(dim=(0, 2, 3, 4))
    s = mus.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    mean = torch.tensor(LATENTS_MEAN, device=device)
    std = torch.tensor(LATENTS_STD, device=device)
    a = std / s  # mu' = a mu + b has mean `mean` and std `std`
    b = mean - a * m
    z = model.z_dim
    model.conv1.weight[:z] *= a.view(-1, 1, 1, 1, 1)
    model.conv1.bias[:z] = model.conv1.bias[:z] * a + b
    # conv2 sees mu' now: conv2'(mu') = conv2((mu' - b) / a)
    w = model.conv2.weight  # [z, z, 1, 1, 1]
    model.conv2.bias += -(w[:, :, 0, 0, 0] * (b / a)[None, :]).sum(dim=1)
    w /= a.view(1, -1, 1, 1, 1)


def train_expert(name: str, latents: torch.Tensor, caption_ids: np.ndarray, contexts: list[torch.Tensor],
                 null: torch.Tensor, steps: int, batch: int, device: torch.device, seed: int, lr: float = 3e-4):
    """One DiT expert by flow matching on its noise range (high: s >= 0.875, low: s < 0.875)."""
    torch.manual_seed(seed)
    model = DIT.build().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (BOUNDARY, 1.0) if name == "high" else (0.0, BOUNDARY)
    ctx_all = [c.to(device).float() for c in contexts]
    null = null.to(device).float()
    latents = latents.to(device)
    start = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine(step, steps, 200, lr)
        rows = torch.randint(len(latents), (batch,), generator=gen)
        x0 = latents[rows.to(device)]  # [B, 16, 1, h, w]
        s = lo + (hi - lo) * torch.rand(batch, generator=gen)
        s = s.clamp(1e-3, 1.0).to(device)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        x_t = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * eps
        drop = torch.rand(batch, generator=gen) < 0.1
        ctx = [null if drop[i] else ctx_all[caption_ids[r]] for i, r in enumerate(rows.tolist())]
        pred = torch.stack(model(list(x_t), t=1000.0 * s, context=ctx, seq_len=latents.shape[-1] * latents.shape[-2] // 4))
        loss = torch.mean((pred - (eps - x0)) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 500 == 0 or step == steps - 1:
            log.info("%s expert step %d/%d loss %.4f (%.0f s)", name, step, steps, loss.item(), time.time() - start)
    return model.eval().requires_grad_(False)


def train(out: Path, device: torch.device, images: int = 16384, vae_steps: int = 3000, dit_steps: int = 5000,
          batch: int = 16, seed: int = 0, dit_batch: int = 64, stage: str = "all", experts: tuple = ("high", "low"),
          dit_lr: float = 3e-4) -> dict:
    """Train the VAE and the experts, write the assets into `out`, return the training record.

    stage "vae" trains and writes only the VAE; "experts" loads it from `out` and trains `experts` (one
    process per expert can train them side by side); "eval" only scores the assets in `out`.

    The VAE never sees a caption: like the real Wan VAE it is a codec trained on images of every kind,
    here `images` training scenes plus `images // 4` scenes of the held-out pairs. The experts never see
    a held-out pair, neither its caption nor its image: held-out captions test the text conditioning."""
    import tempfile

    from safetensors.torch import load_file, save_file

    from wan.configs import load_config
    from wan.modules.t5 import T5EncoderModel
    from wan.modules.vae2_1 import WanVAE_

    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "toy_teacher.json"
    record = json.loads(record_path.read_text()) if stage != "all" and record_path.is_file() else {}
    if stage == "eval":
        for part in sorted(out.glob("toy_teacher.*.json")):  # side-by-side expert runs
            record.update(json.loads(part.read_text()))
        record.update(evaluate(out, device))
        record_path.write_text(json.dumps(record, indent=1))
        return record
    scenes = toyworld.scenes("train", images, seed)
    pixels = _images(scenes)
    if stage in ("all", "vae"):
        codec_pixels = torch.cat([pixels, _images(toyworld.scenes("heldout", images // 4, seed))])
        vae = train_vae(codec_pixels, vae_steps, batch, device, seed)
        fold_latent_scale(vae, pixels, device)
        save_file({k: v.to(torch.bfloat16).cpu().contiguous() for k, v in vae.state_dict().items()},
                  str(out / "vae.safetensors"))
        record.update(vae_command=f"--images {images} --vae-steps {vae_steps} --batch {batch} --seed {seed}",
                      vae_device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      vae_wall_s=round(time.time() - start, 1))
    else:
        vae = WanVAE_(**VAE.kwargs())
        vae.load_state_dict({k: v.float() for k, v in load_file(str(out / "vae.safetensors")).items()})
        vae = vae.to(device).eval().requires_grad_(False)
    with torch.no_grad():
        scale = [torch.tensor(LATENTS_MEAN, device=device), 1.0 / torch.tensor(LATENTS_STD, device=device)]
        latents = torch.cat([vae.encode(pixels[i:i + 256].to(device), scale).cpu() for i in range(0, len(pixels), 256)])
        recon = torch.cat([vae.decode(latents[i:i + 256].to(device), scale).clamp(-1, 1).cpu()
                           for i in range(0, 512, 256)])
        held = _images(toyworld.scenes("heldout", 512, seed + 100))
        held_recon = vae.decode(vae.encode(held.to(device), scale), scale).clamp(-1, 1).cpu()
    vae_psnr = float(10 * torch.log10(4.0 / torch.mean((recon - pixels[:512]) ** 2)))
    held_psnr = float(10 * torch.log10(4.0 / torch.mean((held_recon - held) ** 2)))
    log.info("vae: PSNR %.1f dB on training images, %.1f dB on held-out pairs, normalised latent std %.2f",
             vae_psnr, held_psnr, latents.std().item())
    record["vae_psnr_db"] = round(vae_psnr, 2)
    record["vae_psnr_heldout_db"] = round(held_psnr, 2)
    if stage == "vae":
        record_path.write_text(json.dumps(record, indent=1))
        return record

    # the release's own umT5 (random, from its seed) encodes every caption, exactly as the pipeline will
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        placeholder = {k: torch.zeros(v.shape) for k, v in DIT.build().state_dict().items()}
        _write_release(tmp, vae.state_dict(), {"high": placeholder, "low": placeholder})
        config = load_config(tmp / "config_toy_t2v.json")
        encoder = T5EncoderModel(text_len=config.text_len, dtype=config.t5_dtype, device="cpu",
                                 checkpoint_path=tmp / config.t5_checkpoint,
                                 tokenizer_path=tmp / config.t5_tokenizer)
        captions = sorted({toyworld.caption(s) for s in scenes})
        contexts = []
        for i in range(0, len(captions), 64):
            contexts += encoder(captions[i:i + 64])
        null = encoder([config.sample_neg_prompt])[0]
    index = {c: i for i, c in enumerate(captions)}
    caption_ids = np.array([index[toyworld.caption(s)] for s in scenes])
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for name in experts:
        expert_start = time.time()
        offset = ("high", "low").index(name)
        model = train_expert(name, latents, caption_ids, contexts, null, dit_steps, dit_batch, device,
                             seed + 1 + offset, dit_lr)
        save_file({k: v.to(torch.bfloat16).cpu().contiguous() for k, v in model.state_dict().items()},
                  str(out / f"{name}_noise_model.safetensors"))
        part = {f"{name}_expert": {
            "command": (f"--images {images} --dit-steps {dit_steps} --dit-batch {dit_batch} --dit-lr {dit_lr} "
                        f"--seed {seed}"),
            "device": device_name, "wall_s": round(time.time() - expert_start, 1)}}
        (out / f"toy_teacher.{name}.json").write_text(json.dumps(part, indent=1))
    if len(experts) < 2:  # a side-by-side run: the final "eval" stage writes the record
        return record
    for part in sorted(out.glob("toy_teacher.*.json")):
        record.update(json.loads(part.read_text()))
    record.update(evaluate(out, device))
    record_path.write_text(json.dumps(record, indent=1))
    return record


def evaluate(assets: Path, device: torch.device, captions: int = 48, per_caption: int = 4) -> dict:
    """The unpacked teacher's 40-step CFG samples of held-out and of training captions, scored."""
    import tempfile

    from wan.configs import load_config
    from wan.text2video import WanT2V

    from .metrics import save_grid
    from .quality import toy_teacher_report

    results = {"sizes": {"dit": dataclasses.asdict(DIT), "vae": dataclasses.asdict(VAE),
                         "t5": dict(dataclasses.asdict(T5), vocab=len(vocabulary()) + 3, dropout=0.0)},
               "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as cache:
        folder = toy_release(cache, assets)
        pipe = WanT2V(load_config(folder / "config_toy_t2v.json"), folder, device=device, t5_cpu=True,
                      init_on_cpu=False)
        for split in ("heldout", "train"):
            texts = sorted({toyworld.caption(s) for s in toyworld.scenes(split, 4000, seed=99)})
            texts = [texts[i] for i in np.random.default_rng(7).permutation(len(texts))[:captions]]
            metrics, images = toy_teacher_report(pipe, texts, per_caption)
            results[f"teacher_{split}"] = {k: round(v, 4) for k, v in metrics.items()}
            log.info("teacher on %s captions: %s", split, results[f"teacher_{split}"])
            if split == "heldout":
                save_grid(assets / "teacher_heldout_samples.png", [list(images[r * 8:(r + 1) * 8]) for r in range(4)])
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train the toy-world Wan teacher and write its assets.")
    parser.add_argument("--out", default=str(ASSETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=16384)
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--dit-steps", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=16, help="VAE batch")
    parser.add_argument("--dit-batch", type=int, default=64)
    parser.add_argument("--dit-lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage", choices=["all", "vae", "experts", "eval"], default="all",
                        help="vae: only the VAE; experts: the experts on the VAE already in --out; "
                             "eval: score the assets in --out")
    parser.add_argument("--experts", default="high,low", help="with --stage experts: which experts to train")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    experts = tuple(e for e in args.experts.split(",") if e)
    if not experts or set(experts) - {"high", "low"}:
        parser.error(f"--experts takes a comma-separated subset of high,low; got {args.experts!r}")
    record = train(Path(args.out), torch.device(args.device), args.images, args.vae_steps, args.dit_steps,
                   args.batch, args.seed, args.dit_batch, args.stage, experts, args.dit_lr)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
