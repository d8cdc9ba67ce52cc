"""Draw images with a run's student: `python -m distill.sample --workdir RUN --prompt "..." --out x.png`.

Restores the run's latest checkpoint (its EMA parameters), turns the prompts into umT5 embeddings
with the run's teacher text encoder, samples latents with the student (`student_jax.sampler`:
UniPC or Euler, `--steps` model calls, the teacher's timestep shift), decodes them with the
teacher's Wan VAE and writes PNGs. Of the teacher only the text encoder and the VAE are loaded,
never the DiT experts; prompts whose embeddings the run's cache already holds (every training
and held-out caption) are read from it, and the encoder is loaded only for the others.

The student of the default (`--train.loss cfg`) learned the teacher's classifier-free-guided
velocity, so it samples with one pass per step and no negative prompt.

Noise depends only on the seed (numpy PCG64, `[C, H/8, W/8]` standard normal): the same seed
gives the same noise for every prompt and on every machine. Images written:
  one prompt and one seed           --out itself;
  several, without --grid           OUT_p<prompt index>_s<seed>.png each (printed with its prompt);
  --grid                            --out as one grid, a row per prompt, a column per seed.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
from pathlib import Path

import numpy as np

from . import errors
from .cli import ArgumentParser
from .errors import UserError


def seed_noise(seed: int, channels: int, latent_hw: tuple[int, int]) -> np.ndarray:
    """The initial noise [C, h, w] float32 of one seed (the student's latent space)."""
    return np.random.default_rng(seed).standard_normal((channels, *latent_hw)).astype(np.float32)


def torch_device(cfg):
    """Where the text encoder and the VAE run: the GPU when there is one and the run used it."""
    import torch

    use_gpu = torch.cuda.is_available() and cfg.teacher.device_strategy != "cpu"
    return torch.device("cuda") if use_gpu else torch.device("cpu")


class RunSampler:
    """A run's EMA student with its teacher's text encoder and VAE (not the DiT experts)."""

    def __init__(self, workdir: str | Path, device=None):
        # Before JAX starts: by default it claims 75% of a GPU, leaving torch's VAE / umT5 too little.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        from student_jax.model import Student

        from .export import restore_ema, teacher_folder
        from .teacher import release_config

        self.run = restore_ema(workdir)
        self.cfg = cfg = self.run.cfg
        self.folder = teacher_folder(cfg)
        self.wan_config = release_config(self.folder, cfg.teacher.config)
        self.model = Student(cfg.student)
        self.device = device if device is not None else torch_device(cfg)
        self._vae = None
        self.encoder_loads = 0  # how often umT5 was loaded (0 when every prompt was cached)

    @property
    def step(self) -> int:
        return self.run.step

    # ------------------------------------------------------------------ text

    def _load_text_encoder(self):
        # As WanT2V builds it, but alone: sizes the config states, the rest read off the checkpoint.
        from wan.modules.t5 import T5Config, T5EncoderModel

        config = self.wan_config
        stated = {k: v for k, v in dict(config.get("extensions", None) or {}).items() if not k.startswith("_")}
        self.encoder_loads += 1
        return T5EncoderModel(text_len=config.text_len, dtype=config.t5_dtype, device=self.device,
                              checkpoint_path=self.folder / config.t5_checkpoint,
                              tokenizer_path=self.folder / config.t5_tokenizer, **T5Config.explicit_sizes(stated))

    def encode(self, prompts: list[str]) -> list:
        """umT5 embeddings [L_i, 4096] of `prompts`: from the run's embedding cache, else encoded."""
        from .data import EmbeddingCache
        from .teacher import teacher_id

        cache = EmbeddingCache(self.cfg.data.cache_dir, teacher_id(self.folder, self.wan_config, self.cfg.teacher.dtype))
        unique = list(dict.fromkeys(prompts))
        missing = set(cache.missing(unique))
        cached = [p for p in unique if p not in missing]
        found = dict(zip(cached, cache.get(cached)))
        if missing:
            todo = [p for p in unique if p in missing]
            encoder = self._load_text_encoder()
            found.update(zip(todo, (c.cpu() for c in encoder(todo, self.device))))
            del encoder  # umT5-xxl is 5.7B parameters: gone before the VAE and the student run
            gc.collect()
        return [found[p] for p in prompts]

    # ------------------------------------------------------------------ images

    def latents(self, contexts: list, seeds: list[int], steps: int, solver: str | None = None,
                latent_hw: tuple[int, int] | None = None, batch: int = 16):
        """Student samples [P, S, 16, h, w] (teacher latent space, a torch tensor on the student's device,
        handed over through `bridge`) for P contexts x S seeds.

        Rows go through the jitted sampler in batches of `batch`; the last one is padded to that size
        so that one compilation serves every batch."""
        import jax.numpy as jnp
        import torch

        from bridge.dlpack import jax_to_torch
        from student_jax.projection import to_teacher
        from student_jax.sampler import sample

        from .data import pad_text

        cfg = self.cfg
        solver = solver or cfg.eval.sample_solver
        latent_hw = latent_hw or (cfg.data.height // 8, cfg.data.width // 8)
        noises = [seed_noise(s, cfg.student.latent_channels, latent_hw) for s in seeds]
        rows = [(p, s) for p in range(len(contexts)) for s in range(len(seeds))]
        batch = max(1, min(batch, len(rows)))
        out = []
        for start in range(0, len(rows), batch):
            part = rows[start:start + batch]
            part = part + [part[-1]] * (batch - len(part))  # padding rows are dropped below
            noise = np.stack([noises[s] for _, s in part])  # [b, C, h, w]
            text, mask = pad_text([contexts[p] for p, _ in part], self.wan_config.text_len)  # [b, L, D], [b, L]
            x0 = sample(self.run.ema, self.model, jnp.asarray(noise), jnp.asarray(text), jnp.asarray(mask),
                        steps=steps, shift=float(self.wan_config.sample_shift), solver=solver)
            out.append(jax_to_torch(to_teacher(x0, cfg.student)))  # [b, 16, h, w], through the bridge: no copy
        flat = torch.cat(out)[:len(rows)]
        return flat.reshape(len(contexts), len(seeds), *flat.shape[1:])  # [P, S, 16, h, w]

    @property
    def vae(self):
        if self._vae is None:
            from wan.modules.vae2_1 import Wan2_1_VAE

            stated = dict(self.wan_config.get("extensions", None) or {})
            self._vae = Wan2_1_VAE(vae_pth=str(self.folder / self.wan_config.vae_checkpoint), device=self.device,
                                   dim=stated.get("vae_dim"))
        return self._vae

    def decode(self, latents) -> np.ndarray:
        """Teacher-space latents [..., 16, h, w] (a torch tensor) -> uint8 images [..., H, W, 3]."""
        from .quality import decode

        lead = latents.shape[:-3]
        images, _ = decode(self.vae, latents.reshape(-1, *latents.shape[-3:]))
        return images.reshape(*lead, *images.shape[1:])

    def images(self, prompts: list[str], seeds: list[int], steps: int, solver: str | None = None,
               latent_hw: tuple[int, int] | None = None, batch: int = 16) -> np.ndarray:
        """uint8 images [P, S, H, W, 3] of every prompt at every seed."""
        return self.decode(self.latents(self.encode(prompts), seeds, steps, solver, latent_hw, batch))


# ---------------------------------------------------------------------- command line


def _parser(prog: str) -> ArgumentParser:
    paragraphs = __doc__.split("\n\n")
    parser = ArgumentParser(prog=prog, description=paragraphs[0], epilog="\n\n".join(paragraphs[1:]),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="run directory made by train.py (its latest checkpoint)")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help="a prompt (repeat the flag for several)")
    parser.add_argument("--prompts", metavar="FILE", help="a text file of prompts, one per line")
    parser.add_argument("--out", default="sample.png", help="PNG to write (the name stem for several; default %(default)s)")
    parser.add_argument("--steps", type=int, default=4, help="student sampling steps (model calls; default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="first noise seed (default %(default)s)")
    parser.add_argument("--num-seeds", type=int, default=1, metavar="K", help="seeds S, S+1, ..., S+K-1 per prompt")
    parser.add_argument("--grid", action="store_true", help="one grid image: rows = prompts, columns = seeds")
    parser.add_argument("--solver", choices=("unipc", "euler"), default=None,
                        help="sampler (default: the run's --eval.sample_solver)")
    parser.add_argument("--height", type=int, default=None, help="image height (default: the run's --data.height)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: the run's --data.width)")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per student call (default %(default)s)")
    return parser


def _prompts(args) -> list[str]:
    from .data import load_prompts

    prompts = []
    for text in args.prompt:
        if not text.strip():
            raise UserError("--prompt is empty: give the text of the image, e.g. --prompt \"a red circle\"")
        prompts.append(text.strip())
    if args.prompts:
        prompts += load_prompts(args.prompts, "--prompts file", flag="--prompts")  # its DataError says what is wrong
    if not prompts:
        raise UserError("no prompt: give --prompt TEXT or --prompts FILE")
    return prompts


def _check(args) -> None:
    for flag, value in (("--steps", args.steps), ("--num-seeds", args.num_seeds), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if Path(args.out).suffix.lower() != ".png":
        raise UserError(f"--out {args.out} must name a .png file")


def _image_size(args, cfg) -> tuple[int, int]:
    """(height, width), checked against what the VAE (stride 8) and the student's patches divide."""
    multiple = 8 * cfg.student.patch_size
    size = (args.height or cfg.data.height, args.width or cfg.data.width)
    for flag, value in zip(("--height", "--width"), size):
        if value < multiple or value % multiple:
            raise UserError(f"{flag}={value} must be a positive multiple of {multiple} "
                            f"(VAE stride 8 x patch {cfg.student.patch_size})")
    return size


def main(argv: list[str] | None = None, prog: str = "python -m distill.sample") -> int:
    """The command line; a user error prints `error: ...` and returns 2 (`distill.errors`)."""
    return errors.main(lambda args: _run(args, prog), argv)


def _run(argv: list[str], prog: str) -> int:
    from PIL import Image

    from .export import run_config
    from .metrics import save_grid

    args = _parser(prog).parse_args(argv)
    _check(args)
    prompts = _prompts(args)
    height, width = _image_size(args, run_config(args.workdir))  # before anything heavy is loaded
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)

    sampler = RunSampler(args.workdir)
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    images = sampler.images(prompts, seeds, args.steps, args.solver, (height // 8, width // 8), args.batch_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    what = f"EMA of step {sampler.step}, {args.steps} {args.solver or sampler.cfg.eval.sample_solver} steps"
    if args.grid:
        save_grid(out, [list(row) for row in images])
        print(f"wrote {out}: {len(prompts)} prompts x {len(seeds)} seeds ({what})")
    elif images.shape[0] * images.shape[1] == 1:
        Image.fromarray(images[0, 0]).save(out)
        print(f"wrote {out} ({what})")
    else:
        for p, prompt in enumerate(prompts):
            for s, seed in enumerate(seeds):
                path = out.with_name(f"{out.stem}_p{p:03d}_s{seed}.png")
                Image.fromarray(images[p, s]).save(path)
                print(f"wrote {path}: seed {seed}, {prompt!r}")
        print(f"({what})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
