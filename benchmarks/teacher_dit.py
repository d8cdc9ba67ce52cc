"""Benchmark: one A14B-size Wan DiT expert forward (random bf16 weights) on one GPU.

Prints one JSON line per case: tokens, batch, median ms, TFLOP/s. Batch 2 is the cond/uncond pair
that `WanT2V.denoise` evaluates as one batch.
    python benchmarks/teacher_dit.py [--sizes 512 1024] [--layers 40]
"""

import argparse
import json
import time

import torch

from wan.configs.wan_t2v_A14B import t2v_A14B as cfg
from wan.modules.model import WanModel


def flops(model: WanModel, tokens: int, text: int, batch: int) -> float:
    d, f = model.dim, model.ffn_dim
    per_block = (
        2 * 4 * tokens * d * d  # self-attn q, k, v, o
        + 2 * 2 * tokens * tokens * d  # self-attn scores + values
        + 2 * 2 * tokens * d * d + 2 * 2 * text * d * d  # cross-attn q, o and k, v
        + 2 * 2 * tokens * text * d  # cross-attn scores + values
        + 2 * 2 * tokens * d * f  # ffn
    )
    return batch * model.num_layers * per_block


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--layers", type=int, default=cfg.num_layers)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    torch.manual_seed(0)
    with torch.device("meta"):
        model = WanModel(dim=cfg.dim, ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim, num_heads=cfg.num_heads,
                         num_layers=args.layers, text_len=cfg.text_len)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        for p_ in model.parameters():
            p_.normal_(0, 0.02)
    model.eval().requires_grad_(False)
    for size in args.sizes:
        for batch in (1, 2):
            lat = size // 8
            x = [torch.randn(16, 1, lat, lat, device="cuda") for _ in range(batch)]
            ctx = [torch.randn(120, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(batch)]
            t = torch.full((batch,), 900.0, device="cuda")
            tokens = (lat // 2) ** 2
            times = []
            with torch.amp.autocast("cuda", dtype=torch.bfloat16):
                for i in range(args.iters + 2):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    model(x, t=t, context=ctx, seq_len=tokens)
                    torch.cuda.synchronize()
                    if i >= 2:
                        times.append(time.perf_counter() - start)
            ms = sorted(times)[len(times) // 2] * 1e3
            print(json.dumps({"bench": "teacher_dit", "image": size, "tokens": tokens, "batch": batch,
                              "layers": args.layers, "median_ms": round(ms, 2),
                              "tflops": round(flops(model, tokens, cfg.text_len, batch) / ms / 1e9, 1),
                              "gpu": torch.cuda.get_device_name()}), flush=True)


if __name__ == "__main__":
    main()
