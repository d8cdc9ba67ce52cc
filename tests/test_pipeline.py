"""WanT2V: the two-expert CFG sampling loop and full `generate` against upstream's golden outputs."""

import shutil
import warnings

import chex
import pytest
import torch

from tests import golden
from wan.checkpoint import CheckpointError
from wan.configs import load_config, t2v_A14B
from wan.modules.model import WanModel
from wan.text2video import WanT2V


def _expert(tensors, meta, which):
    model = WanModel(**meta["constructor_high_and_low"])
    model.load_state_dict(golden.weights(tensors, f"weights.{which}."), strict=True)
    return model.eval()


@pytest.mark.parametrize("case, solver", [("generate_e2e", "unipc"), ("generate_e2e_dpmpp", "dpm++")])
def test_sampling_loop_matches_golden(case, solver):
    tensors, meta = golden.load_case(case)
    atol, rtol = golden.tolerance(meta)
    args = meta["generate_arguments"]
    pipe = WanT2V.from_modules(t2v_A14B, _expert(tensors, meta, "low"), _expert(tensors, meta, "high"), device="cpu")
    noise = tensors["inputs.noise"]
    width, height = args["size_(width,height)"]
    chex.assert_shape(noise, pipe.latent_shape((width, height), args["frame_num"]))
    assert pipe.seq_len_for(noise.shape) == meta["seq_len"]

    seen = []
    final = pipe.sample(
        noise[None],
        [tensors["inputs.context_cond.0"]],
        [tensors["inputs.context_uncond.0"]],
        sampling_steps=args["sampling_steps"],
        shift=args["shift"],
        guide_scale=tuple(args["guide_scale"]),
        sample_solver=solver,
        step_callback=lambda step, t, expert, latents: seen.append((t, expert, latents[0].clone())),
    )
    chex.assert_shape(final, (1, *noise.shape))
    assert [t for t, _, _ in seen] == tensors["outputs.timesteps"].tolist()
    assert [int(e == "high") for _, e, _ in seen] == tensors["outputs.expert_is_high"].tolist()
    scales = [4.0 if e == "high" else 3.0 for _, e, _ in seen]
    assert scales == tensors["outputs.guide_scale"].tolist()
    for step, (_, _, latent) in enumerate(seen):
        golden.assert_close(latent, tensors["intermediates.latents"][step], atol, rtol, case, f"latents.{step}")
    golden.assert_close(final[0], tensors["outputs.latent_final"], atol, rtol, case, "latent_final")


def test_denoise_batches_cond_uncond_and_mixed_experts():
    """One batched call (cond+uncond, samples at different timesteps) equals separate batch-1 calls."""
    tensors, meta = golden.load_case("generate_e2e")
    low, high = _expert(tensors, meta, "low"), _expert(tensors, meta, "high")
    pipe = WanT2V.from_modules(t2v_A14B, low, high, device="cpu")
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 1, 6, 8, generator=gen) for _ in range(3)]
    ctx = [torch.randn(n, 32, generator=gen) for n in (5, 9, 3)]
    null = [torch.randn(n, 32, generator=gen) for n in (7, 2, 4)]
    ts = torch.tensor([999, 500, 875])  # high, low, high (875 is inclusive)
    batched = pipe.denoise(xs, ts, ctx, null, guide_scale=(3.0, 4.0), seq_len=12)
    chex.assert_shape(batched, [(16, 1, 6, 8)] * 3)
    for i, (model, g) in enumerate([(high, 4.0), (low, 3.0), (high, 4.0)]):
        cond = model([xs[i]], t=ts[i : i + 1], context=[ctx[i]], seq_len=12)[0]
        uncond = model([xs[i]], t=ts[i : i + 1], context=[null[i]], seq_len=12)[0]
        golden.assert_close(batched[i], uncond + g * (cond - uncond), 1e-5, 1e-5, "denoise_batched", f"sample{i}")


def test_denoise_rejects_mismatched_batch():
    tensors, meta = golden.load_case("generate_e2e")
    pipe = WanT2V.from_modules(t2v_A14B, _expert(tensors, meta, "low"), _expert(tensors, meta, "high"))
    x = [torch.zeros(16, 1, 6, 8)] * 2
    with pytest.raises(ValueError, match="2 latents but 1 contexts"):
        pipe.denoise(x, torch.tensor([1, 2]), [torch.zeros(3, 32)])
    with pytest.raises(ValueError, match="one value per latent"):
        pipe.denoise(x, torch.tensor([1]), [torch.zeros(3, 32)] * 2)


# ---------------------------------------------------------------- the tiny release folder, end to end


@pytest.fixture(scope="module")
def release():
    path = golden.tiny_release_dir()
    from safetensors.torch import load_file
    import json

    tensors = load_file(str(path / "golden_pipeline.safetensors"))
    meta = json.loads((path / "golden_pipeline.json").read_text())
    pipe = WanT2V(load_config(path / "config_tiny_t2v.json"), path, device="cpu")
    return path, pipe, tensors, meta


RUNS = ["unipc", "dpmpp", "unipc_w96_h64", "unipc_5frame"]


def _run_args(meta, run):
    args = dict(meta["pipeline"]["runs"][run]["generate_arguments"])
    args["size"] = tuple(args["size"])
    args["guide_scale"] = tuple(args["guide_scale"])
    return args


@pytest.mark.parametrize("run", RUNS)
def test_release_sampling_with_recorded_contexts(release, run):
    """fp32 loop fed upstream's bf16 contexts and noise: every step within 1e-4 (README suggestion)."""
    _, pipe, tensors, meta = release
    args = _run_args(meta, run)
    noise = tensors[f"inputs.{run}.noise"]
    chex.assert_shape(noise, pipe.latent_shape(args["size"], args["frame_num"]))
    assert pipe.seq_len_for(noise.shape) == meta["pipeline"]["runs"][run]["seq_len"]
    seen = []
    final = pipe.sample(
        noise[None],
        [tensors["intermediates.pipeline.context_cond"].float()],
        [tensors["intermediates.pipeline.context_uncond"].float()],
        sampling_steps=args["sampling_steps"],
        shift=args["shift"],
        guide_scale=args["guide_scale"],
        sample_solver=args["sample_solver"],
        step_callback=lambda step, t, expert, latents: seen.append((t, expert, latents[0].clone())),
    )
    steps = meta["pipeline"]["runs"][run]["steps"]
    assert [t for t, _, _ in seen] == tensors[f"outputs.{run}.timesteps"].tolist()
    assert [e + "_noise_model" for _, e, _ in seen] == [s["expert"] for s in steps]
    for k, (_, _, latent) in enumerate(seen):
        golden.assert_close(latent, tensors[f"outputs.{run}.latents.{k}"], 1e-4, 1e-4, f"release/{run}", f"latents.{k}")
    video = pipe.vae.decode([final[0]])[0]
    golden.assert_close(video, tensors[f"outputs.{run}.video"], 1e-4, 1e-4, f"release/{run}", "video")


@pytest.mark.parametrize("run", ["unipc", "dpmpp"])
def test_release_generate_end_to_end(release, run):
    """Full generate from the prompt and seed: our own bf16 T5 and the CPU generator's noise."""
    _, pipe, tensors, meta = release
    args = _run_args(meta, run)
    video = pipe.generate(meta["pipeline"]["prompt"], progress=False, **args)
    chex.assert_shape(video, tuple(tensors[f"outputs.{run}.video"].shape))
    latents = pipe.generate(meta["pipeline"]["prompt"], progress=False, return_latents=True, **args)
    golden.assert_close(latents, tensors[f"outputs.{run}.final_latent"], 0.05, 0, f"release/{run}", "generate.final_latent")
    golden.assert_close(video, tensors[f"outputs.{run}.video"], 0.01, 0, f"release/{run}", "generate.video")


def test_release_generate_batched_prompts(release):
    """Several prompts in one call: the first reproduces the single-prompt call with the same seed.

    With ATen's own gemm: oneDNN's AMX bf16 kernels (Sapphire Rapids and later) round the bf16 umT5's
    rows differently for another batch shape, which this comparison is not about."""
    _, pipe, _, meta = release
    args = _run_args(meta, "unipc")
    args.update(sampling_steps=3)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        with torch.backends.mkldnn.flags(enabled=False):
            single = pipe.generate(meta["pipeline"]["prompt"], progress=False, return_latents=True, **args)
            both = pipe.generate([meta["pipeline"]["prompt"], "a red car"], progress=False, return_latents=True,
                                 **args)
    chex.assert_shape(both, [(16, 1, 8, 8)] * 2)
    golden.assert_close(both[0], single, 1e-5, 1e-5, "release/batched", "first_prompt")
    assert (both[0] - both[1]).abs().max() > 1e-2


def test_generate_rejects_bad_sizes(release):
    _, pipe, _, _ = release
    with pytest.raises(ValueError, match=r"multiples of vae_stride x patch_size = \(16, 16\)"):
        pipe.generate("a cat", size=(72, 64), frame_num=1, sampling_steps=1, progress=False)
    with pytest.raises(ValueError, match="frame_num must be 1 \\+ 4k"):
        pipe.generate("a cat", size=(64, 64), frame_num=2, sampling_steps=1, progress=False)
    with pytest.raises(ValueError, match="sample_solver must be one of"):
        pipe.generate("a cat", size=(64, 64), frame_num=1, sampling_steps=1, sample_solver="euler", progress=False)
    with pytest.raises(ValueError, match="input_prompt is empty"):
        pipe.generate([], size=(64, 64), frame_num=1, progress=False)


def test_construction_errors(tmp_path):
    path = golden.tiny_release_dir()
    cfg = load_config(path / "config_tiny_t2v.json")
    with pytest.raises(CheckpointError, match="is not a folder"):
        WanT2V(cfg, tmp_path / "nowhere", device="cpu")
    with pytest.raises(RuntimeError, match="dit_fsdp / t5_fsdp / use_sp need torch.distributed: launch with torchrun"):
        WanT2V(cfg, path, device="cpu", dit_fsdp=True)
    with pytest.raises(ValueError, match="t5_fsdp shards umT5 over the GPUs and t5_cpu keeps it on the CPU"):
        WanT2V(cfg, path, device="cpu", t5_fsdp=True, t5_cpu=True)
    with pytest.raises(ValueError, match="dit_fsdp already shards both experts"):
        WanT2V(cfg, path, device="cpu", dit_fsdp=True, expert_offload=True)
    broken = tmp_path / "release"
    shutil.copytree(path, broken)
    (broken / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(CheckpointError, match="Wan2.1_VAE.pth"):
        WanT2V(cfg, broken, device="cpu")
