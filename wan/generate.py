"""`python -m wan.generate`: sample images/videos from a Wan2.2 T2V release folder (teacher smoke run).

Writes a PNG (1 frame) or a PNG strip of the frames. Runs on CPU with `--device cpu` (the tiny
release), on GPU by default.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointError
from .configs import WAN_CONFIGS, load_config


def video_to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> [H, F*W, 3] uint8 (frames side by side)."""
    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [3, F, H, W]
    return frames.permute(2, 1, 3, 0).reshape(frames.shape[2], -1, 3).cpu().numpy()  # [H, F*W, 3]


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().replace("x", "*").split("*"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like WIDTH*HEIGHT (e.g. 1280*720), got {text!r}") from None
    return width, height


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m wan.generate", description=__doc__)
    p.add_argument("--ckpt_dir", required=True, help="Wan2.2-T2V-A14B release folder")
    p.add_argument("--config", default=None, help="config JSON; default: t2v-A14B, or the folder's config_*.json")
    p.add_argument("--prompt", default="A cat walks on the grass, realistic photo.")
    p.add_argument("--n_prompt", default="", help="negative prompt ('' = the config default)")
    p.add_argument("--size", type=parse_size, default=(1280, 720), help="WIDTH*HEIGHT")
    p.add_argument("--frame_num", type=int, default=None, help="frames (1 + 4k); default from the config")
    p.add_argument("--sample_steps", type=int, default=None)
    p.add_argument("--sample_shift", type=float, default=None)
    p.add_argument("--sample_solver", default="unipc", choices=["unipc", "dpm++"])
    p.add_argument("--sample_guide_scale", type=float, nargs="+", default=None, help="one value or LOW HIGH")
    p.add_argument("--base_seed", type=int, default=42)
    p.add_argument("--device", default=None, help="default cuda:0 when available, else cpu")
    p.add_argument("--offload_model", action="store_true")
    p.add_argument("--save_file", default="wan_sample.png")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    from PIL import Image

    from .text2video import WanT2V

    ckpt = Path(args.ckpt_dir)
    config_path = args.config or next(iter(sorted(ckpt.glob("config_*.json"))), None)
    config = load_config(config_path) if config_path else WAN_CONFIGS["t2v-A14B"]
    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    guide = config.sample_guide_scale if args.sample_guide_scale is None else args.sample_guide_scale
    guide = guide[0] if len(guide) == 1 else tuple(guide)
    try:
        pipe = WanT2V(config, ckpt, device=device)
        start = time.perf_counter()
        video = pipe.generate(
            args.prompt,
            size=args.size,
            frame_num=args.frame_num or config.frame_num,
            shift=args.sample_shift or config.sample_shift,
            sample_solver=args.sample_solver,
            sampling_steps=args.sample_steps or config.sample_steps,
            guide_scale=guide,
            n_prompt=args.n_prompt,
            seed=args.base_seed,
            offload_model=args.offload_model,
        )
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    Image.fromarray(video_to_uint8(video)).save(args.save_file)
    print(f"wrote {args.save_file} ({tuple(video.shape)}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
