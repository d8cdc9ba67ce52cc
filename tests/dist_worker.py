"""Worker for tests/test_distributed.py: one rank of `torchrun --nproc_per_node=2` on CPU (gloo).

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker.py CASE FOLDER OUT

CASE "dit": FOLDER is one expert folder. Compares FSDP2, sequence parallel (sp=2) and both against
the same expert loaded whole in this process, on a mixed batch (different frame counts and sizes,
an odd seq_len, per-sample and per-token timesteps), and checks the shards really are shards.
CASE "pipeline": FOLDER is the golden tiny release. `WanT2V(dit_fsdp=True, t5_fsdp=True,
use_sp=True)` against upstream's recorded outputs and against the plain pipeline, including a
denoise call whose ranks need different experts (FSDP alone, dp = 2).
Each rank writes OUT/rank<r>.json with the max abs errors it measured; failures raise.
"""

import functools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

from wan.distributed import TeacherParallel, apply_sequence_parallel, fsdp_local_view, shard_dit
from wan.modules.model import WanModel


def _err(a, b) -> float:
    if isinstance(a, (list, tuple)):
        return max(_err(x, y) for x, y in zip(a, b))
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.double() - b.double()).abs().max())


def _inputs(model: WanModel, seed: int):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(16, 3, 8, 12, generator=gen), torch.randn(16, 2, 6, 10, generator=gen)]
    ctx = [torch.randn(11, model.text_dim, generator=gen), torch.randn(3, model.text_dim, generator=gen)]
    return xs, ctx


def case_dit(folder: Path) -> dict:
    rank = dist.get_rank()
    reference = WanModel.from_pretrained(folder)
    fsdp = TeacherParallel.from_world(sp=1, device_type="cpu")
    sp = TeacherParallel.from_world(sp=2, device_type="cpu")
    sharded = WanModel.from_pretrained(folder, parallelize=functools.partial(shard_dit, mesh=fsdp.fsdp_mesh),
                                       local_view=fsdp_local_view)
    # the shards are real: each rank holds about half, together exactly every element
    local = sum(p.to_local().numel() for p in sharded.parameters())
    total = sum(p.numel() for p in reference.parameters())
    counts = torch.tensor([local])
    dist.all_reduce(counts)
    assert int(counts) == total and local < 0.6 * total, (local, total)
    full = {k: v.full_tensor() for k, v in sharded.state_dict().items()}
    load_err = max(_err(full[k], v) for k, v in reference.state_dict().items())

    sequence = apply_sequence_parallel(WanModel.from_pretrained(folder), sp.sp_group)
    both = apply_sequence_parallel(
        WanModel.from_pretrained(folder, parallelize=functools.partial(shard_dit, mesh=fsdp.fsdp_mesh),
                                 local_view=fsdp_local_view), sp.sp_group)
    xs, ctx = _inputs(reference, seed=1)
    seq_len = 77  # odd: sequence parallel pads it to 78
    t = torch.tensor([937.0, 412.0])
    t_tok = torch.linspace(0, 999, 2 * seq_len).reshape(2, seq_len)
    errors = {"load": load_err}
    with torch.no_grad():
        for label, timesteps in (("per_sample", t), ("per_token", t_tok)):
            ref = reference(xs, t=timesteps, context=ctx, seq_len=seq_len)
            for name, model in (("fsdp", sharded), ("sp", sequence), ("fsdp_sp", both)):
                errors[f"{name}.{label}"] = _err(model(xs, t=timesteps, context=ctx, seq_len=seq_len), ref)
    # the head count must split over the sp group
    odd = WanModel(dim=48, ffn_dim=64, freq_dim=32, num_heads=3, num_layers=1, text_len=8, text_dim=16)
    try:
        apply_sequence_parallel(odd, sp.sp_group)
    except ValueError as error:
        assert "does not divide the 3 attention heads" in str(error), error
        errors["heads_check"] = 0.0
    else:
        raise AssertionError("apply_sequence_parallel accepted 3 heads on 2 ranks")
    return {"rank": rank, **errors}


def case_pipeline(release: Path) -> dict:
    from safetensors.torch import load_file

    from wan.configs import load_config
    from wan.text2video import WanT2V

    rank = dist.get_rank()
    meta = json.loads((release / "golden_pipeline.json").read_text())
    tensors = load_file(str(release / "golden_pipeline.safetensors"))
    config = load_config(release / "config_tiny_t2v.json")
    pipe = WanT2V(config, release, device="cpu", dit_fsdp=True, t5_fsdp=True, use_sp=True)
    assert pipe.sp_size == 2 and pipe.parallel.sp == 2, pipe.parallel
    plain = WanT2V(config, release, device="cpu")
    run = meta["pipeline"]["runs"]["unipc"]
    args = dict(run["generate_arguments"], size=tuple(run["generate_arguments"]["size"]),
                guide_scale=tuple(run["generate_arguments"]["guide_scale"]))
    errors = {}
    steps = []
    final = pipe.sample(
        tensors["inputs.unipc.noise"][None], [tensors["intermediates.pipeline.context_cond"].float()],
        [tensors["intermediates.pipeline.context_uncond"].float()], sampling_steps=args["sampling_steps"],
        shift=args["shift"], guide_scale=args["guide_scale"], sample_solver=args["sample_solver"],
        step_callback=lambda step, t, expert, latents: steps.append(latents[0].clone()))
    errors["recorded.latents"] = max(_err(x, tensors[f"outputs.unipc.latents.{k}"]) for k, x in enumerate(steps))
    errors["recorded.video"] = _err(pipe.vae.decode([final[0]])[0], tensors["outputs.unipc.video"])

    video = pipe.generate(meta["pipeline"]["prompt"], progress=False, **args)
    latents = pipe.generate(meta["pipeline"]["prompt"], progress=False, return_latents=True, **args)
    if rank == 0:  # upstream decodes on rank 0 only
        errors["generate.video"] = _err(video, tensors["outputs.unipc.video"])
    else:
        assert video is None
    errors["generate.latent"] = _err(latents, tensors["outputs.unipc.final_latent"])
    errors["generate.latent_vs_plain"] = _err(
        latents, plain.generate(meta["pipeline"]["prompt"], progress=False, return_latents=True, **args))

    # ranks routing to different experts in one call (dp = 2: no sp group, so the ranks hold different
    # samples): rank 0 only high-noise, rank 1 only low-noise; the FSDP all-gathers must still pair up
    pipe = WanT2V(config, release, device="cpu", dit_fsdp=True)
    gen = torch.Generator().manual_seed(5)
    x = [torch.randn(16, 1, 8, 8, generator=gen)]
    ctx = [torch.randn(6, 4096, generator=gen)]
    null = [torch.randn(4, 4096, generator=gen)]
    t = torch.tensor([990.0 if rank == 0 else 300.0])
    errors["denoise.mixed_experts"] = _err(pipe.denoise(x, t, ctx, null, (3.0, 4.0)), plain.denoise(x, t, ctx, null, (3.0, 4.0)))
    return {"rank": rank, **errors}


def main(case: str, folder: str, out: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    try:
        result = {"dit": case_dit, "pipeline": case_pipeline}[case](Path(folder))
        Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
