"""`python -m benchmarks`: every speed figure of the project, one JSON line per figure.

    python -m benchmarks                       # CPU, tiny sizes (seconds): what the test runs
    python -m benchmarks --full --device cuda  # one GPU, A14B width, random weights
    python -m benchmarks --figures student_step --presets small base --size 1024
    python -m benchmarks --figures distill_step -- --teacher_path /data/synthetic --preset a14b ...

Figures (each line has "figure", its sizes, and its numbers; times are medians over --iters after
--warmup untimed runs, with the device synchronised around each):

- teacher_forward: one DiT expert forward (bf16 autocast on GPU, float32 on CPU) per image size and
  batch (1, 2 = the CFG pair): ms, TFLOP/s from the analytic FLOP count (`dit_flops`), and the share
  of --peak-tflops when given; eager and with `--teacher.compile` (`wan.compile`) side by side
  (--compile both, the GPU default), the compiled line with its speed-up over eager in the same run.
- teacher_sol: the speed of light of that forward: one block's matmuls and attention alone (bf16,
  no norms, modulation or rotary), times the layer count: ms, TFLOP/s, and each measured
  teacher_forward over it (the same sizes, measured in the same run).
- teacher_fp8: the expert with its blocks' linear layers in FP8 (`--teacher.fp8`, `wan.fp8`; each of
  --fp8-recipes: row- or tensor-wise scales, "+fast" with the kernel's fast accumulation) against
  the same random weights in bf16 (both compiled on GPU unless --compile off; float32 and eager on
  CPU, where `torch._scaled_mm` runs without FP8 hardware), per size and batch: ms (FP8), base_ms and their ratio; for batch 2 (one latent,
  a cond / uncond context pair) the deviation of the CFG target uncond + 3 (cond - uncond) from the base one (relative L2 norm, and the
  largest element error over the target's largest magnitude); on GPU the kernel time of both by kind
  (`kernel_kinds`: matmul, attention, other; the FP8 run's largest other kernels): what FP8 speeds up and
  what it leaves.
- fp8_linear: each kind of linear layer of a block (attention d x d, the FFN's two) at a CFG pair's
  rows, alone: the bf16 product's ms and TFLOP/s, and per recipe the FP8 product of pre-quantised
  operands (`torch._scaled_mm`), the whole `Fp8Linear` (activation scaling, product, bias) eager and
  compiled, each over the bf16 product.
- sdpa: the self-attention kernel at the teacher's shapes through each SDPA backend torch offers
  here (flash, cuDNN, memory-efficient; math on CPU): ms and TFLOP/s.
- t5_encode: the umT5 encoder on a batch of --text-len token ids: ms per prompt.
- vae_decode: one [16, 1, h, w] latent decoded to an image: ms.
- student_step: the jitted, donated `train_step` of each student preset at the image size: compile s,
  ms per step, samples/s, peak device memory (GPU only).
- bridge: the hand-off of one step's tensors between the frameworks through `bridge/` (x_t to torch,
  the teacher's outputs to JAX): ms, and its share of the student step measured in the same run.
- distill_step: the real loop's step (`Distiller.step`: data, noise, teacher targets, bridge, student)
  on the run that the flags after `--` describe (default: the tests' fast random tiny teacher):
  ms per step, samples/s per process, the teacher's ms inside it and the ratio step / teacher, the
  student step's ms (the teacher and the student each timed alone, synchronised on both sides), the
  rest (ms minus both: noise, text, bridge and whatever waits between them), the host's ms to issue
  one step (far below ms when the host runs ahead of the device, as it should); the
  teacher's layer count, and for a teacher with fewer layers than the A14B's 40 the ratio the same
  step would have at 40 (teacher time scaled by 40 / layers, the rest unchanged); the bridge's share
  of the step (the bridge figure of the same run); on GPU the host synchronisations torch counted
  inside the timed steps (`torch.cuda.set_sync_debug_mode`), and the same steps once more under torch's
  profiler (`gpu_timeline`): the device's busy and idle ms per step, each stream's busy ms, and the
  longest idle gaps with the kernels on either side (where the rest goes). On GPU, JAX starts with the
  run's --train.jax_memory_fraction (`loop_jax_env`), as in train.py, even when figures before it use JAX.

Random weights everywhere (no checkpoint is read, nothing downloads); `--layers` shortens the DiT
and states the count in every line, so a figure for fewer layers is labelled as such.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext

FIGURES = ("teacher_forward", "teacher_sol", "teacher_fp8", "fp8_linear", "sdpa", "t5_encode", "vae_decode",
           "student_step", "bridge", "distill_step")
CFG_SCALE = 3.0  # the A14B's low-noise guide scale: the CFG target of the teacher_fp8 figure
A14B_LAYERS = 40


FP8_RECIPES = ("row", "row+fast", "tensor", "tensor+fast")  # --fp8-recipes: scaling, "+fast" = fast accumulation


def fp8_recipe(name: str) -> dict:
    """"row", "tensor+fast", ... -> `Fp8Linear`'s keyword arguments (scaling, fast_accum)."""
    scaling, _, fast = name.partition("+")
    return dict(scaling=scaling, fast_accum=fast == "fast")


def emit(figure: str, **fields) -> dict:
    line = {"figure": figure, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in fields.items()}}
    print(json.dumps(line), flush=True)
    return line


def _timed(fn, sync, iters: int, warmup: int) -> float:
    """Median wall ms of fn() over iters runs, synchronised before and after each."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def dit_flops(dit, tokens: int, text: int, batch: int) -> float:
    """Matmul FLOPs of one DiT forward (2 per multiply-add; norms, modulation and rotary left out)."""
    d, f = dit.dim, dit.ffn_dim
    per_block = (
        2 * 4 * tokens * d * d  # self-attention q, k, v, o projections
        + 2 * 2 * tokens * tokens * d  # self-attention scores and weighted values
        + 2 * 2 * tokens * d * d + 2 * 2 * text * d * d  # cross-attention q, o and k, v
        + 2 * 2 * tokens * text * d  # cross-attention scores and weighted values
        + 2 * 2 * tokens * d * f  # feed-forward
    )
    return batch * dit.num_layers * per_block


GPU_ACTIVITY = ("kernel", "gpu_memcpy", "gpu_memset")


def gpu_timeline(trace_events: list[dict], steps: int, wall_ms: float, gaps: int = 5) -> dict:
    """What the GPU did over `steps` steps of `wall_ms` each, from a profiler's chrome-trace events.

    busy: the union of the device activities' intervals (kernels, copies, sets; streams overlap),
    per step; idle = wall - busy; the busy time of each stream (``args.stream``), and of torch's
    streams together (those running any ATen kernel, ``at::native``: the teacher's, with its few
    bridge and text copies) and the others' (JAX's); and the longest gaps between activities, each
    with the names of the activities on either side."""
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0), e.get("name", "?"), e.get("args", {}).get("stream", -1))
                   for e in trace_events if e.get("cat") in GPU_ACTIVITY and "ts" in e)
    if not spans:
        return {}
    busy, per_stream, holes, torch_streams = 0.0, {}, [], set()
    start, end, last = spans[0][0], spans[0][1], spans[0][2]
    for s, e, name, stream in spans:
        per_stream[stream] = per_stream.get(stream, 0.0) + (e - s)
        if "at::native" in name:
            torch_streams.add(stream)
        if s > end:  # a hole: nothing ran on the device between `end` and `s`
            busy += end - start
            holes.append((s - end, last, name))
            start = s
        if e >= end:
            end, last = e, name
    busy += end - start
    holes.sort(key=lambda h: -h[0])
    return dict(gpu_busy_ms=busy / 1e3 / steps, gpu_idle_ms=wall_ms - busy / 1e3 / steps,
                gpu_stream_ms={str(k): round(v / 1e3 / steps, 3) for k, v in sorted(per_stream.items())},
                gpu_torch_ms=sum(v for k, v in per_stream.items() if k in torch_streams) / 1e3 / steps,
                gpu_jax_ms=sum(v for k, v in per_stream.items() if k not in torch_streams) / 1e3 / steps,
                gpu_gaps=[[round(g / 1e3, 3), before[:60], after[:60]] for g, before, after in holes[:gaps]])


ATTENTION_KERNELS = ("flash", "fmha", "sdpa", "attention", "attn")
MATMUL_KERNELS = ("gemm", "nvjet", "xmma", "cutlass", "matmul", "scaled_mm")


def kernel_kinds(trace_events: list[dict], runs: int, top: int = 5) -> dict:
    """Kernel time per run from a profiler's chrome-trace events, by kind, told by the kernel's name:
    attention (flash, fmha, sdpa, attention, attn), matmul (gemm, nvjet, xmma, cutlass, matmul,
    scaled_mm; attention first, so a CUTLASS attention kernel counts as attention) and other: copies,
    ATen's elementwise kernels and every Triton kernel (``triton_*``: Inductor names its fused
    elementwise and reduction kernels after the ops they fuse, as ``triton_red_fused__scaled_mm_...``
    for the quantisation of a matmul's input), with the `top` other kernels by time."""
    kinds, other = {"matmul": 0.0, "attention": 0.0, "other": 0.0}, {}
    for e in trace_events:
        if e.get("cat") != "kernel":
            continue
        name, us = e.get("name", "?"), e.get("dur", 0)
        low = name.lower()
        kind = ("other" if low.startswith("triton_") else
                "attention" if any(k in low for k in ATTENTION_KERNELS) else
                "matmul" if any(k in low for k in MATMUL_KERNELS) else "other")
        kinds[kind] += us
        if kind == "other":
            other[name[:90]] = other.get(name[:90], 0.0) + us
    top_other = sorted(other.items(), key=lambda kv: -kv[1])[:top]
    return dict(**{f"{k}_kernel_ms": v / 1e3 / runs for k, v in kinds.items()},
                top_other_kernels=[[name, round(us / 1e3 / runs, 3)] for name, us in top_other])


class Bench:
    def __init__(self, args):
        import torch

        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if self.cuda else nullcontext
        self.dtype = torch.bfloat16 if self.cuda else torch.float32

    def sync(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn) -> float:
        return _timed(fn, self.sync, self.args.iters, self.args.warmup)

    def _random(self, config_build, dtype=None):
        """A module built on meta and filled with small random values on the device (no init cost), its
        floating-point tensors in `dtype` when given (built in it: a 40-block expert in bf16 is 28 GB,
        its float32 copy would not fit beside it on an 80 GB card)."""
        import torch

        with torch.device("meta"):
            module = config_build()
            if dtype is not None:
                module = module.to(dtype)
        module = module.to_empty(device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(0)
        with torch.no_grad():
            for p in list(module.parameters()) + list(module.buffers()):
                if p.is_floating_point():
                    p.normal_(0, 0.02, generator=gen)
        return module.eval().requires_grad_(False)

    # ---------------------------------------------------------------- teacher

    def configs(self):
        from wan.modules.model import DiTConfig
        from wan.modules.t5 import T5Config
        from wan.modules.vae2_1 import VAEConfig
        from wan.synthetic import TINY

        if self.args.full:
            dit, t5, vae = DiTConfig(), T5Config(), VAEConfig()
        else:
            dit, t5, vae = TINY["dit"], TINY["t5"], TINY["vae"]
        if self.args.layers:
            import dataclasses

            dit = dataclasses.replace(dit, num_layers=self.args.layers)
        return dit, t5, vae

    def _teacher_cases(self, dit):
        """(size, batch, tokens, x, context, t) of every teacher_forward case."""
        import torch

        text = min(self.args.text_tokens, dit.text_len)
        for size in self.args.sizes:
            lat = size // 8
            tokens = (lat // 2) * (lat // 2)
            for batch in (1, 2):
                x = [torch.randn(16, 1, lat, lat, device=self.device) for _ in range(batch)]
                ctx = [torch.randn(text, 4096, device=self.device, dtype=self.dtype) for _ in range(batch)]
                t = torch.full((batch,), 900.0, device=self.device)
                yield size, batch, tokens, x, ctx, t

    def teacher_forward(self):
        import torch

        from wan.compile import compile_dit

        dit, _, _ = self.configs()
        model = self._random(dit.build, torch.bfloat16 if self.cuda else None)
        modes = {"off": [False], "on": [True], "both": [False, True]}[self.args.compile]
        eager_ms = {}
        self.teacher_ms = {}
        for compiled in modes:
            if compiled:
                compile_dit(model)
            for size, batch, tokens, x, ctx, t in self._teacher_cases(dit):
                def run():
                    with torch.no_grad(), self.autocast():
                        model(x, t=t, context=ctx, seq_len=tokens)

                start = time.perf_counter()
                run()  # the first call of a shape compiles when compiled
                self.sync()
                first_s = time.perf_counter() - start
                ms = self.time(run)
                tflops = dit_flops(dit, tokens, dit.text_len, batch) / (ms * 1e-3) / 1e12
                extra = {"peak_fraction": tflops / self.args.peak_tflops} if self.args.peak_tflops else {}
                if compiled and (size, batch) in eager_ms:
                    extra["speedup_over_eager"] = eager_ms[(size, batch)] / ms
                if not compiled:
                    eager_ms[(size, batch)] = ms
                self.teacher_ms[(size, batch, compiled)] = ms
                emit("teacher_forward", size=size, batch=batch, tokens=tokens, layers=dit.num_layers, dim=dit.dim,
                     device=str(self.device), compiled=compiled, first_call_s=first_s, ms=ms, tflops=tflops, **extra)
        del model

    def teacher_fp8(self):
        import torch

        from wan.compile import compile_dit
        from wan.fp8 import quantize_dit

        dit, _, _ = self.configs()
        compiled = self.cuda and self.args.compile != "off"
        runs = {}
        for recipe in (None, *self.args.fp8_recipes):  # None: the bf16 (float32 on CPU) base
            model = self._random(dit.build, torch.bfloat16 if self.cuda else None)  # the same seeded weights each time
            if recipe:
                quantize_dit(model, **fp8_recipe(recipe))
            if compiled:
                compile_dit(model)
            torch.manual_seed(0)
            for size, batch, tokens, x, ctx, t in self._teacher_cases(dit):
                x = x[:1] * batch  # a CFG pair: one latent, two contexts (cond, uncond)

                def run():
                    with torch.no_grad(), self.autocast():
                        return model(x, t=t, context=ctx, seq_len=tokens)

                out = [o.float() for o in run()]  # (compiles when compiled)
                kinds = self._kernel_kinds(run) if self.cuda else {}
                runs[(recipe, size, batch)] = (self.time(run), out, kinds)
            del model
        for (recipe, size, batch), (ms, out, kinds) in runs.items():
            if recipe is None:
                continue
            base_ms, base, base_kinds = runs[(None, size, batch)]
            line = dict(size=size, batch=batch, recipe=recipe, layers=dit.num_layers, dim=dit.dim,
                        device=str(self.device), compiled=compiled, base_dtype=str(self.dtype).replace("torch.", ""),
                        base_ms=base_ms, ms=ms, fp8_over_base=ms / base_ms, **kinds,
                        **{f"base_{k}": v for k, v in base_kinds.items() if k != "top_other_kernels"})
            if batch == 2:
                def target(o):
                    return o[1] + CFG_SCALE * (o[0] - o[1])  # [16, 1, h, w]

                err = target(out) - target(base)
                line.update(cfg_target_rel_l2=float(err.norm() / target(base).norm()),
                            cfg_target_max_err_over_max=float(err.abs().max() / target(base).abs().max()))
            emit("teacher_fp8", **line)

    def fp8_linear(self):
        """One block's linear layers alone at a CFG pair's rows: the bf16 (fp32 on CPU) product, and per
        FP8 recipe the product of operands quantised beforehand and the whole `Fp8Linear` (quantising
        its input, the product, the bias), compiled too where --compile allows. What separates
        teacher_fp8's ratio from the matmul's."""
        import torch
        from torch import nn

        from wan.fp8 import Fp8Linear

        dit, _, _ = self.configs()
        d, f = dit.dim, dit.ffn_dim
        compiled = self.cuda and self.args.compile != "off"
        gen = torch.Generator(device=self.device).manual_seed(0)
        for size in self.args.sizes:
            rows = 2 * (size // 16) ** 2  # batch 2 (cond, uncond) x tokens
            for name, n_in, n_out in (("attention", d, d), ("ffn_in", d, f), ("ffn_out", f, d)):
                linear = nn.Linear(n_in, n_out, device=self.device, dtype=self.dtype).requires_grad_(False)
                nn.init.normal_(linear.weight, 0, 0.02, generator=gen)
                x = torch.randn(rows, n_in, device=self.device, generator=gen).to(self.dtype)
                flops = 2 * rows * n_in * n_out
                with torch.no_grad():
                    base_ms = self.time(lambda: linear(x))
                for recipe in self.args.fp8_recipes:
                    fp8 = Fp8Linear(linear, **fp8_recipe(recipe))
                    xq, x_scale = fp8.quantize(x)
                    kernel_dtype = torch.bfloat16 if self.cuda else self.dtype

                    def product():
                        return torch._scaled_mm(xq, fp8.weight_fp8.t(), scale_a=x_scale, scale_b=fp8.weight_scale,
                                                out_dtype=kernel_dtype, use_fast_accum=fp8.fast_accum)

                    with torch.no_grad():
                        mm_ms = self.time(product) if fp8.use_kernel else None
                        layer_ms = self.time(lambda: fp8(x))
                        compiled_ms = None
                        if compiled:
                            torch._dynamo.reset()  # a fresh budget: 24 layers would pass dynamo's recompile limit
                            layer = torch.compile(fp8)
                            compiled_ms = self.time(lambda: layer(x))
                    line = dict(size=size, rows=rows, layer=name, recipe=recipe, n_in=n_in, n_out=n_out,
                                device=str(self.device), base_dtype=str(self.dtype).replace("torch.", ""),
                                base_ms=base_ms, base_tflops=flops / base_ms * 1e-9, ms=layer_ms,
                                fp8_over_base=layer_ms / base_ms)
                    if mm_ms is not None:
                        line.update(mm_ms=mm_ms, mm_tflops=flops / mm_ms * 1e-9, mm_over_base=mm_ms / base_ms)
                    if compiled_ms is not None:
                        line.update(compiled_ms=compiled_ms, compiled_over_base=compiled_ms / base_ms)
                    emit("fp8_linear", **line)

    def teacher_sol(self):
        """One block's matmuls + attention in plain bf16 (fp32 on CPU), x layers: what the forward could be."""
        import torch
        import torch.nn.functional as F

        dit, _, _ = self.configs()
        d, f, heads, text = dit.dim, dit.ffn_dim, dit.num_heads, dit.text_len
        gen = torch.Generator(device=self.device).manual_seed(0)

        def weight(n, m):
            return (torch.randn(n, m, device=self.device, generator=gen) * 0.02).to(self.dtype)

        w = {name: weight(d, d) for name in ("q", "k", "v", "o", "cq", "ck", "cv", "co")}
        w1, w2 = weight(f, d), weight(d, f)
        for size in self.args.sizes:
            tokens = (size // 16) ** 2
            for batch in (1, 2):
                x = torch.randn(batch, tokens, d, device=self.device, dtype=self.dtype)
                ctx = torch.randn(batch, text, d, device=self.device, dtype=self.dtype)

                def heads_of(y):
                    return y.unflatten(-1, (heads, -1)).transpose(1, 2)  # [B, heads, L, head_dim]

                def block():
                    q, k, v = (heads_of(F.linear(x, w[n])) for n in ("q", "k", "v"))
                    a = F.linear(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2), w["o"])
                    cq, ck, cv = heads_of(F.linear(a, w["cq"])), heads_of(F.linear(ctx, w["ck"])), heads_of(
                        F.linear(ctx, w["cv"]))
                    c = F.linear(F.scaled_dot_product_attention(cq, ck, cv).transpose(1, 2).flatten(2), w["co"])
                    return F.linear(F.gelu(F.linear(c, w1), approximate="tanh"), w2)

                with torch.no_grad():
                    ms = self.time(block) * dit.num_layers
                tflops = dit_flops(dit, tokens, text, batch) / (ms * 1e-3) / 1e12
                extra = {f"teacher_{'compiled' if c else 'eager'}_over_sol": self.teacher_ms[(size, batch, c)] / ms
                         for c in (False, True) if (size, batch, c) in getattr(self, "teacher_ms", {})}
                emit("teacher_sol", size=size, batch=batch, tokens=tokens, layers=dit.num_layers, dim=dit.dim,
                     device=str(self.device), ms=ms, tflops=tflops, **extra)

    def sdpa(self):
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        dit, _, _ = self.configs()
        heads, head_dim = dit.num_heads, dit.dim // dit.num_heads
        backends = {"math": SDPBackend.MATH}
        if self.cuda:
            backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION}
        for size in self.args.sizes:
            tokens = (size // 16) ** 2
            for batch in (1, 2):
                q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=self.device, dtype=self.dtype)
                           for _ in range(3))
                for name, backend in [("default", None), *backends.items()]:
                    def run():
                        with torch.no_grad(), (sdpa_kernel([backend]) if backend is not None else nullcontext()):
                            F.scaled_dot_product_attention(q, k, v)

                    try:
                        ms = self.time(run)
                    except RuntimeError as error:  # a backend that does not take these inputs here
                        emit("sdpa", size=size, batch=batch, tokens=tokens, backend=name, ms=None,
                             error=str(error).splitlines()[0][:200])
                        continue
                    flops = 4 * batch * heads * tokens * tokens * head_dim
                    emit("sdpa", size=size, batch=batch, tokens=tokens, backend=name, device=str(self.device), ms=ms,
                         tflops=flops / (ms * 1e-3) / 1e12)

    def t5_encode(self):
        import torch

        _, t5, _ = self.configs()
        model = self._random(lambda: t5.build(), torch.bfloat16 if self.cuda else None)
        batch, length = self.args.t5_batch, self.args.text_len
        ids = torch.randint(0, t5.vocab, (batch, length), device=self.device)
        mask = torch.ones(batch, length, dtype=torch.long, device=self.device)

        def run():
            with torch.no_grad():
                model(ids, mask)

        ms = self.time(run)
        emit("t5_encode", batch=batch, text_len=length, layers=t5.num_layers, dim=t5.dim, device=str(self.device),
             ms=ms, ms_per_prompt=ms / batch)
        del model

    def vae_decode(self):
        import torch

        from wan.modules.vae2_1 import WanVAE_

        _, _, vae = self.configs()
        model = self._random(lambda: WanVAE_(**vae.kwargs()))
        scale = (torch.zeros(16, device=self.device), torch.ones(16, device=self.device))
        for size in self.args.sizes:
            z = torch.randn(1, 16, 1, size // 8, size // 8, device=self.device)

            def run():
                with torch.no_grad(), self.autocast():
                    model.decode(z, scale)

            emit("vae_decode", size=size, dim=vae.dim, device=str(self.device), ms=self.time(run))
        del model

    # ---------------------------------------------------------------- student and bridge

    def _student(self, preset: str, size: int, **overrides):
        import functools

        import jax
        import jax.numpy as jnp

        from student_jax.config import OptimConfig, student_preset
        from student_jax.model import Student
        from student_jax.optim import make_optimizer
        from student_jax.state import create_train_state
        from student_jax.train_step import train_step

        cfg = student_preset(preset, **overrides) if self.cuda else student_preset(preset, dtype="float32", **overrides)
        optim = OptimConfig()
        lat, batch, text_len = size // 8, self.args.batch, self.args.text_len
        state = create_train_state(cfg, optim, jax.random.key(0), (lat, lat), text_len)
        keys = jax.random.split(jax.random.key(1), 3)
        inputs = dict(
            x_t=jax.random.normal(keys[0], (batch, cfg.latent_channels, lat, lat)),
            t=jnp.full((batch,), 500.0),
            text=jax.random.normal(keys[1], (batch, text_len, cfg.text_dim)).astype(jnp.bfloat16 if self.cuda else jnp.float32),
            text_mask=jnp.ones((batch, text_len), bool),
            target=jax.random.normal(keys[2], (batch, 16, lat, lat)),
        )
        step = jax.jit(functools.partial(train_step, model=Student(cfg), tx=make_optimizer(optim), ema_decay=0.999),
                       donate_argnums=(0,))
        start = time.perf_counter()
        compiled = step.lower(state, inputs).compile()
        compile_s = time.perf_counter() - start
        return cfg, compiled, state, inputs, compile_s

    def student_step(self):
        import jax

        from distill.memory import compiled_bytes
        from student_jax.config import student_preset
        from student_jax.model import resolve_attention

        results = {}
        choices = {"on": [True], "off": [False], "both": [True, False]}
        for preset in self.args.presets:
            for size in self.args.student_sizes:
                variants = [(scan, remat, policy, text) for scan in choices[self.args.scan]
                            for remat in choices[self.args.remat]
                            for policy in (self.args.remat_policy if remat else ["full"])
                            for text in self.args.text_attention]
                for scan, remat, policy, text in variants:
                    if text == "cudnn" and not (self.cuda and student_preset(preset).dtype == "bfloat16"):
                        continue  # cuDNN attention: bf16 on a GPU only
                    cfg, compiled, state, inputs, compile_s = self._student(
                        preset, size, scan_blocks=scan, remat=remat, remat_policy=policy,
                        cudnn_text_attention=text == "cudnn")
                    holder = [state]

                    def run():
                        holder[0], metrics = compiled(holder[0], inputs)
                        jax.block_until_ready(metrics["loss"])

                    need = compiled_bytes(compiled)
                    line = dict(preset=preset, size=size, batch=self.args.batch, text_len=self.args.text_len,
                                dtype=cfg.dtype, attention=resolve_attention(cfg),
                                text_attention="cudnn" if cfg.cudnn_text_attention else "xla",
                                scan_blocks=scan, remat=remat,
                                remat_policy=policy if remat else None,
                                compile_s=compile_s, xla_gb=None if need is None else need / 1e9)
                    try:
                        ms = self.time(run)
                    except jax.errors.JaxRuntimeError as error:  # e.g. out of memory: say so, go on
                        emit("student_step", **line, ms=None, error=str(error).splitlines()[0][:200])
                        del holder, state, compiled
                        continue
                    stats = jax.devices()[0].memory_stats() or {}
                    peak = stats.get("peak_bytes_in_use")
                    results.setdefault((preset, size), ms)
                    emit("student_step", **line, ms=ms, samples_per_s=self.args.batch / (ms * 1e-3),
                         peak_gb=None if peak is None else peak / 1e9)
                    del holder, state, compiled
        return results

    def bridge(self, step_ms: dict | None = None):
        import jax
        import torch

        from bridge.dlpack import jax_to_teacher_inputs, teacher_outputs_to_jax

        preset = self.args.presets[0]
        for size in self.args.student_sizes:
            lat, batch = size // 8, self.args.batch
            x_t = jax.random.normal(jax.random.key(0), (batch, 16, lat, lat))
            outputs = [torch.randn(16, 1, lat, lat, device=self.device) for _ in range(batch)]

            def run():
                jax_to_teacher_inputs(x_t)
                jax.block_until_ready(teacher_outputs_to_jax(outputs))

            ms = self.time(run)
            if step_ms is None or (preset, size) not in step_ms:
                step_ms = self.student_step_for(preset, size)
            total = step_ms[(preset, size)]
            self.bridge_ms = ms
            emit("bridge", size=size, batch=batch, preset=preset, ms=ms, student_step_ms=total,
                 percent_of_student_step=100 * ms / total)

    def student_step_for(self, preset, size):
        saved = self.args.presets, self.args.student_sizes
        self.args.presets, self.args.student_sizes = [preset], [size]
        try:
            return self.student_step()
        finally:
            self.args.presets, self.args.student_sizes = saved

    # ---------------------------------------------------------------- the real loop

    def distill_step(self):
        """`Distiller.step` of a real run, with the teacher's share timed by wrapping its target call."""
        import os
        import tempfile
        import warnings

        import jax

        from distill.config import parse
        from distill.distiller import Distiller
        from distill.loop import _Stop, runtime
        from wan.compile import resolve as resolve_compile

        with tempfile.TemporaryDirectory() as tmp:
            flags = list(self.args.train_flags)
            if not any(f.startswith("--teacher_path") or f.startswith("--teacher.path") for f in flags):
                sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
                from tests.tiny_random_release import tiny_flags

                # few sampling steps and one sample per prompt: the data stage is not what is timed
                flags = tiny_flags(f"{tmp}/cache") + ["--data.cache_dir", f"{tmp}/cache", "--data.gen_steps", "4",
                                                      "--data.samples_per_prompt", "1"] + flags
            if not any(f.startswith("--workdir") for f in flags):
                flags += ["--workdir", f"{tmp}/run"]
            cfg = parse(flags)
            with warnings.catch_warnings():
                set_early = loop_jax_env(self.args.train_flags) if self.cuda else {}
                if set_early and all(os.environ.get(k) == v for k, v in set_early.items()):
                    # main() gave JAX this run's memory settings before the earlier figures started it
                    warnings.filterwarnings("ignore", message="JAX was initialised before Runtime.from_env")
                rt = runtime(cfg)
            stop = _Stop()
            try:
                d = Distiller(cfg, rt, stop)
                d._build_training()
                warmup, iters = self.args.warmup, self.args.iters
                batches = [d._load_batch(i) for i in range(warmup + iters + 1)]
                jax.block_until_ready(batches)

                issue_ms = []

                def steps(first: int, last: int):
                    for i in range(first, last):  # as the training loop issues them: no wait between steps
                        start = time.perf_counter()
                        metrics = d.step(i, batches[i])
                        issue_ms.append((time.perf_counter() - start) * 1e3)
                    jax.block_until_ready(metrics)
                    self.sync()

                steps(0, warmup)
                issue_ms.clear()
                start = time.perf_counter()
                steps(warmup, warmup + iters)
                ms = (time.perf_counter() - start) * 1e3 / iters  # wall time per step
                # the teacher's and the student's shares, each timed alone: synchronised on both sides
                teacher_ms, student_ms = [], []

                def timed(fn, into):
                    def call(*a, **k):
                        jax.block_until_ready((a, k))
                        self.sync()
                        start = time.perf_counter()
                        out = jax.block_until_ready(fn(*a, **k))
                        self.sync()
                        into.append((time.perf_counter() - start) * 1e3)
                        return out
                    return call

                inner_teacher, inner_student = d.teacher.group_targets, d.student.step_fn
                d.teacher.group_targets = timed(inner_teacher, teacher_ms)
                d.student.step_fn = timed(inner_student, student_ms)
                for i in range(warmup, warmup + iters):
                    jax.block_until_ready(d.step(i, batches[i]))
                d.teacher.group_targets, d.student.step_fn = inner_teacher, inner_student
                tms, sms = statistics.median(teacher_ms), statistics.median(student_ms)
                layers = d.pipe.low_noise_model.num_layers
                extra = {}
                if layers < A14B_LAYERS:  # the rest of the step does not depend on the teacher's depth
                    scaled = tms * A14B_LAYERS / layers
                    extra["step_over_teacher_at_40_layers"] = (ms - tms + scaled) / scaled
                if getattr(self, "bridge_ms", None):
                    extra["bridge_percent_of_step"] = 100 * self.bridge_ms / ms
                if self.cuda:
                    extra["host_syncs_per_step"] = self._count_syncs(d) / 2
                    profiled = self._profile_steps(d, batches[warmup:warmup + iters], warmup)
                    extra.update(profiled)
                    if layers < A14B_LAYERS and profiled.get("gpu_torch_ms"):
                        # the same ratio from the profiled steps alone: the teacher's kernels and the step's wall
                        # time of the same steps, at the same clocks (a power-capped GPU's clock moves between
                        # the timings above)
                        scaled = profiled["gpu_torch_ms"] * A14B_LAYERS / layers
                        extra["profiled_step_over_teacher_at_40_layers"] = (
                            profiled["profiled_ms"] - profiled["gpu_torch_ms"] + scaled) / scaled
                emit("distill_step", teacher=cfg.teacher.path, size=cfg.data.height, batch=cfg.train.batch_size,
                     student=cfg.student.hidden_size, processes=rt.world_size, teacher_layers=layers,
                     teacher_compiled=resolve_compile(cfg.teacher.compile, d.teacher.device), ms=ms, teacher_ms=tms,
                     student_ms=sms, rest_ms=ms - tms - sms, host_issue_ms=statistics.median(issue_ms),
                     step_over_teacher=ms / tms,
                     samples_per_s_per_process=cfg.train.batch_size / rt.world_size / (ms * 1e-3), **extra)
            finally:
                stop.restore()
                rt.shutdown()

    @staticmethod
    def _kernel_kinds(fn, runs: int = 3) -> dict:
        """`kernel_kinds` of `runs` calls of fn() under torch's profiler (GPU only)."""
        import tempfile

        import torch
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(runs):
                fn()
            torch.cuda.synchronize()
        with tempfile.TemporaryDirectory() as tmp:
            prof.export_chrome_trace(f"{tmp}/trace.json")
            with open(f"{tmp}/trace.json") as f:
                return kernel_kinds(json.load(f)["traceEvents"], runs)

    @staticmethod
    def _profile_steps(d, batches, first: int) -> dict:
        """`gpu_timeline` of the loop's steps issued back to back under torch's profiler (CUPTI sees the
        kernels of both frameworks: they share the process's CUDA context)."""
        import tempfile

        import jax
        import torch
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for k, batch in enumerate(batches):
                metrics = d.step(first + k, batch)
            jax.block_until_ready(metrics)
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - start) * 1e3 / len(batches)
        with tempfile.TemporaryDirectory() as tmp:
            prof.export_chrome_trace(f"{tmp}/trace.json")
            with open(f"{tmp}/trace.json") as f:
                events = json.load(f)["traceEvents"]
        timeline = gpu_timeline(events, len(batches), wall_ms)
        return dict(profiled_ms=wall_ms, **timeline)

    @staticmethod
    def _count_syncs(d, steps: int = 2) -> int:
        """Synchronising CUDA calls torch makes while the loop issues `steps` more steps (each warns once
        under sync-debug mode), the batches loaded beforehand as the prefetch thread does."""
        import warnings

        import jax
        import torch

        start = int(jax.device_get(d.state.step))
        batches = [d._load_batch(start + k) for k in range(steps)]
        jax.block_until_ready(batches)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for k, batch in enumerate(batches):
                    metrics = d.step(start + k, batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        jax.block_until_ready(metrics)
        syncs = [w for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
        for w in syncs[:5]:
            print(f"# host sync: {w.filename}:{w.lineno}: {w.message}", file=sys.stderr)
        return len(syncs)


def parse_args(argv):
    argv = list(argv)
    train_flags = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_flags = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--figures", nargs="+", choices=FIGURES, default=list(FIGURES))
    p.add_argument("--full", action="store_true", help="A14B sizes (DiT, umT5-xxl, Wan2.1 VAE); default: tiny")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="image sizes of the teacher and VAE figures (default: 512 1024 with --full, else 64 128)")
    p.add_argument("--student-sizes", type=int, nargs="+", default=None,
                   help="image sizes of the student and bridge figures (default: 1024 with --full, else 64)")
    p.add_argument("--layers", type=int, default=0, help="DiT layers (0: the config's)")
    p.add_argument("--presets", nargs="+", default=None, help="student presets (default: all with --full, else tiny)")
    p.add_argument("--batch", type=int, default=8, help="student / bridge batch")
    p.add_argument("--text-len", type=int, default=None, help="text tokens (default: 512 with --full, else 32)")
    p.add_argument("--text-tokens", type=int, default=120, help="real (unpadded) text tokens in the DiT context")
    p.add_argument("--t5-batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--fp8-recipes", nargs="+", choices=FP8_RECIPES, default=["row+fast"],
                   help="teacher_fp8 / fp8_linear: FP8 scalings (row, tensor), '+fast' with fast accumulation (default: "
                        "--teacher.fp8's recipe)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="measured bf16 matmul peak, for peak_fraction")
    p.add_argument("--scan", choices=("on", "off", "both"), default="on",
                   help="student_step with the blocks under nn.scan (the default layout), unrolled, or both")
    p.add_argument("--remat", choices=("on", "off", "both"), default="off",
                   help="student_step with remat (the a14b preset's setting), without, or both")
    p.add_argument("--remat-policy", nargs="+", choices=("full", "dots"), default=["full"],
                   help="student_step with remat: what each block keeps (StudentConfig.remat_policy); several to compare")
    p.add_argument("--text-attention", nargs="+", choices=("xla", "cudnn"), default=["xla"],
                   help="student_step's cross-attention to the text: masked XLA (the default) or cuDNN "
                        "(StudentConfig.cudnn_text_attention; bf16 GPU presets only); several to compare")
    p.add_argument("--compile", choices=("auto", "off", "on", "both"), default="auto",
                   help="teacher_forward eager, compiled (wan.compile), or both; auto: both on cuda, off on cpu")
    args = p.parse_args(argv)
    args.train_flags = train_flags
    args.sizes = args.sizes or ([512, 1024] if args.full else [64, 128])
    args.student_sizes = args.student_sizes or ([1024] if args.full else [64])
    args.presets = args.presets or (["tiny", "small", "base"] if args.full else ["tiny"])
    args.text_len = args.text_len or (512 if args.full else 32)
    if args.compile == "auto":
        args.compile = "both" if args.device.startswith("cuda") else "off"
    for size in args.sizes + args.student_sizes:
        if size % 16:
            p.error(f"image sizes must be multiples of 16 (VAE stride 8 x patch 2), got {size}")
    return args


def loop_jax_env(train_flags: list[str]) -> dict:
    """The JAX memory settings the loop's `Runtime` would make for these run flags (no preallocation,
    --train.jax_memory_fraction of the GPU); {} when the flags do not parse (distill_step then says why).
    JAX reads them once, when it starts: on a GPU the figures before distill_step (student_step,
    bridge) would otherwise start it at its default 75% and leave the loop's teacher too little."""
    from distill.config import parse

    try:
        cfg = parse(list(train_flags))
    except SystemExit:
        return {}
    return {"XLA_PYTHON_CLIENT_PREALLOCATE": "false",
            "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{cfg.train.jax_memory_fraction:g}"}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device != "cpu" and "distill_step" in args.figures:
        import os

        os.environ.update(loop_jax_env(args.train_flags))
    bench = Bench(args)
    step_ms = None
    for figure in FIGURES:  # in this order: the bridge's share reuses the student step just measured
        if figure not in args.figures:
            continue
        if figure == "student_step":
            step_ms = bench.student_step()
        elif figure == "bridge":
            bench.bridge(step_ms)
        else:
            getattr(bench, figure)()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
