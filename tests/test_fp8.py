"""FP8 teacher linears (`wan/fp8.py`, `--teacher.fp8`).

`torch._scaled_mm` runs on the CPU too (float32 output), so these tests go through the call a GPU run
makes: the quantisation (scales, exactness where e4m3 represents the values), the kernel against the
float32 product of the same operands, the deviation FP8 brings to the golden tiny DiT and its CFG
target, the wiring (which layers, the pipeline, flags, errors). The GPU test checks cuBLASLt's kernel
against the same reference, compiled and eager.
"""

from __future__ import annotations

import copy
import json

import chex
import pytest
import torch
from torch import nn

from tests import golden
from tests.test_dit import case_inputs, golden_model, rel_l2
from wan.fp8 import (FP8_DTYPE, Fp8Linear, fp8_linear_reference, gelu_quantize_rows, gelu_quantize_rows_reference,
                     quantize_dit, quantize_rows, quantize_tensor)

CFG_SCALE = 3.0


def _exact_linear(rows: int, cols: int, seed: int) -> nn.Linear:
    """A linear layer whose rows, scaled to a largest magnitude of 448, are exact in e4m3: entries in
    {0, +-1, +-2, +-4} with a 4 in every row become {0, 112, 224, 448} = 1.75 * 2^{6,7,8}."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.tensor([0.0, 1.0, -1.0, 2.0, -2.0, 4.0, -4.0])
    weight = values[torch.randint(0, len(values), (rows, cols), generator=gen)]
    weight[:, 0] = 4.0
    layer = nn.Linear(cols, rows)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(torch.randn(rows, generator=gen))
    return layer


def test_quantize_rows_scales_each_row_to_e4m3_max():
    x = torch.randn(6, 40) * torch.logspace(-3, 3, 6)[:, None]  # rows over six orders of magnitude
    x[3] = 0.0
    q, scale = quantize_rows(x)
    assert q.dtype == FP8_DTYPE and scale.dtype == torch.float32
    chex.assert_shape(scale, (6, 1))
    amax = x.abs().amax(dim=1, keepdim=True)
    torch.testing.assert_close(scale[[0, 1, 2, 4, 5]], amax[[0, 1, 2, 4, 5]] / 448)
    assert scale[3].item() == 1.0 and q[3].float().abs().max().item() == 0.0
    assert q.float().abs().amax(dim=1)[[0, 1, 2, 4, 5]].eq(448).all()  # each row's largest value is e4m3's max
    # e4m3 keeps 3 mantissa bits: every element within 2^-4 of itself relative to its row's scale
    back = q.float() * scale
    assert ((back - x).abs() <= (x.abs() * 2**-4 + scale * 2**-9)).all()


def test_quantize_tensor_scales_the_whole_tensor_to_e4m3_max():
    x = torch.randn(6, 40) * torch.logspace(-3, 3, 6)[:, None]
    q, scale = quantize_tensor(x)
    assert q.dtype == FP8_DTYPE and scale.dtype == torch.float32
    chex.assert_shape(scale, ())
    torch.testing.assert_close(scale, x.abs().max() / 448)
    assert q.float().abs().max().item() == 448
    assert q[0].float().abs().max().item() == 0.0  # rows 1e6 below the largest vanish with one scale
    back = q.float() * scale
    assert ((back - x).abs() <= (x.abs() * 2**-4 + scale * 2**-9)).all()
    q0, scale0 = quantize_tensor(torch.zeros(3, 16))
    assert scale0.item() == 1.0 and q0.float().abs().max().item() == 0.0


@pytest.mark.parametrize("scaling", ["row", "tensor"])
@pytest.mark.parametrize("fast_accum", [False, True], ids=["exact_accum", "fast_accum"])
def test_fp8_linear_is_exact_where_e4m3_is_for_each_recipe(scaling, fast_accum):
    """Both scalings, with and without fast accumulation (the CPU kernel accumulates in float32 either
    way), give the float product of values that e4m3 holds exactly after scaling."""
    layer = _exact_linear(24, 32, seed=0)
    x = _exact_linear(10, 32, seed=1).weight * 0.25
    fp8 = Fp8Linear(layer, scaling=scaling, fast_accum=fast_accum)
    chex.assert_shape(fp8.weight_scale, (1, 24) if scaling == "row" else ())
    assert f"{scaling}-wise" in repr(fp8) and ("fast accumulation" in repr(fp8)) == fast_accum
    # (scales like 4 / 448 are not exact in binary: float32 rounding of sums up to 128, far below e4m3's 2^-4)
    torch.testing.assert_close(fp8(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fast_accum", [False, True])
def test_fast_accumulation_reaches_the_kernel(monkeypatch, fast_accum):
    """The CPU kernel accumulates in float32 either way, so the flag is checked where it goes: the
    `use_fast_accum` argument of every `torch._scaled_mm` call."""
    calls, kernel = [], torch._scaled_mm

    def recording(*args, **kwargs):
        calls.append(kwargs.get("use_fast_accum"))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    Fp8Linear(nn.Linear(32, 16), fast_accum=fast_accum)(torch.randn(4, 32))
    assert calls == [fast_accum]


def test_tensor_scaling_kernel_equals_the_reference_and_differs_from_row():
    """Scalar scales through `torch._scaled_mm` equal the float32 product of the same operands (to float32
    rounding: the kernel scales the sum, the reference each operand); on rows
    of very different magnitudes one scale for the tensor loses the small rows that row scales keep."""
    torch.manual_seed(2)
    layer = nn.Linear(64, 32)
    x = torch.randn(2, 8, 64) * torch.logspace(-3, 2, 8)[:, None]  # [2, 8, 64]: token rows over 5 decades
    tensor = Fp8Linear(layer, scaling="tensor")
    out = tensor(x)
    reference = fp8_linear_reference(*quantize_tensor(x.reshape(-1, 64)), tensor.weight_fp8, tensor.weight_scale,
                                     tensor.bias, torch.float32)
    torch.testing.assert_close(out.reshape(-1, 32), reference, rtol=1e-5, atol=1e-5)
    row = Fp8Linear(layer)(x)
    want = layer(x) - layer.bias
    small = slice(0, 2)  # the two smallest token rows
    err_row = rel_l2((row - layer.bias)[:, small], want[:, small])
    err_tensor = rel_l2((out - layer.bias)[:, small], want[:, small])
    print(f"small rows: row-wise rel L2 {err_row:.2e}, tensor-wise {err_tensor:.2e}")
    assert err_row < 0.05 < err_tensor
    with pytest.raises(ValueError, match="FP8 scaling must be one of row, tensor, got 'column'"):
        Fp8Linear(layer, scaling="column")


def test_fp8_linear_is_exact_where_e4m3_is():
    """Weights and activations that e4m3 holds exactly (after row scaling) give the float product:
    the scales are applied on the right side of the matmul, once each."""
    layer = _exact_linear(24, 32, seed=0)
    x = _exact_linear(10, 32, seed=1).weight * 0.25  # [10, 32], rows again {0, .25, .5, 1} * sign
    fp8 = Fp8Linear(layer)
    assert fp8.weight_fp8.dtype == FP8_DTYPE and fp8.weight_fp8.shape == (24, 32)
    chex.assert_shape(fp8.weight_scale, (1, 24))
    out = fp8(x.reshape(2, 5, 32))  # torch._scaled_mm on the CPU
    chex.assert_shape(out, (2, 5, 24))
    torch.testing.assert_close(out.reshape(10, 24), layer(x), rtol=1e-6, atol=1e-6)
    reference = fp8_linear_reference(*quantize_rows(x), fp8.weight_fp8, fp8.weight_scale.t(), fp8.bias, torch.float32)
    torch.testing.assert_close(reference, layer(x), rtol=1e-6, atol=1e-6)


def test_scaled_mm_equals_the_float32_reference_on_cpu(monkeypatch):
    """The kernel path (row-wise scales [M, 1] and [1, N], the weight transposed to column-major) and the
    float32 product of the same quantised operands agree to the bit on random values; a layer made for a
    device without FP8 matmuls takes the reference path, decided once when it is built."""
    import wan.fp8

    torch.manual_seed(1)
    layer = nn.Linear(80, 40)
    x = torch.randn(3, 11, 80)
    fp8 = Fp8Linear(layer)
    assert fp8.use_kernel and "torch._scaled_mm" in repr(fp8)
    out = fp8(x)
    reference = fp8_linear_reference(*quantize_rows(x.reshape(-1, 80)), fp8.weight_fp8, fp8.weight_scale.t(),
                                     fp8.bias, torch.float32)
    assert torch.equal(out.reshape(-1, 40), reference)
    monkeypatch.setattr(wan.fp8, "has_fp8_matmul", lambda device: False)
    emulated = Fp8Linear(layer)
    assert not emulated.use_kernel and "float32 reference" in repr(emulated)
    assert torch.equal(emulated(x), out)


def test_fp8_linear_on_random_weights_is_close_and_keeps_the_dtype():
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    x = torch.randn(3, 7, 64)
    fp8 = Fp8Linear(layer)
    err = rel_l2(fp8(x), layer(x))
    print(f"Fp8Linear vs float32, random: rel L2 {err:.3e}")
    assert 1e-3 < err < 4e-2  # clearly quantised, still close
    assert fp8(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp8(x).dtype == torch.bfloat16  # what nn.Linear gives under autocast
    assert Fp8Linear(layer.to(torch.bfloat16))(x).dtype == torch.bfloat16


def test_quantize_dit_replaces_the_block_linears_only():
    model, _, _ = golden_model("dit_t2v_1frame_b2")
    model = copy.deepcopy(model)
    layers = len(model.blocks)
    assert quantize_dit(model) == 10 * layers  # self q k v o, cross q k v o, ffn 2
    for block in model.blocks:
        assert not [name for name, m in block.named_modules() if isinstance(m, nn.Linear)]
        assert isinstance(block.ffn[0], Fp8Linear) and isinstance(block.self_attn.q, Fp8Linear)
    assert isinstance(model.text_embedding[0], nn.Linear) and isinstance(model.head.head, nn.Linear)
    assert quantize_dit(model) == 0  # nothing left to replace


def test_quantize_dit_moves_the_ffn_gelu_into_its_second_layer():
    """Row scaling: each FFN's tanh GELU becomes part of its second layer's input quantisation (one pass
    on the GPU, `gelu_quantize_rows`), the first layer adds its bias in the kernel; on the CPU the model
    computes exactly what the unfused layers do. Tensor scaling leaves the FFN as it is."""
    from wan.synthetic import TINY

    torch.manual_seed(0)
    model = TINY["dit"].build().eval()
    fused = copy.deepcopy(model)
    quantize_dit(fused)
    for block in fused.blocks:
        assert isinstance(block.ffn[1], nn.Identity) and block.ffn[2].input_gelu and block.ffn[0].bias is None
        assert block.ffn[2].input_bias is not None and block.ffn[2].bias is not None
        assert not block.ffn[0].input_gelu and not block.self_attn.q.input_gelu and block.self_attn.o.bias is not None
    assert "the previous layer's bias and tanh GELU of the input first" in repr(fused.blocks[0].ffn[2])
    tensor = copy.deepcopy(model)
    quantize_dit(tensor, scaling="tensor")
    assert isinstance(tensor.blocks[0].ffn[1], nn.GELU) and not tensor.blocks[0].ffn[2].input_gelu
    unfused = copy.deepcopy(fused)  # the bias and the GELU back in their places, the quantisation alone
    for block in unfused.blocks:
        block.ffn[0].bias, block.ffn[2].input_bias = block.ffn[2].input_bias, None
        block.ffn[1], block.ffn[2].input_gelu = nn.GELU(approximate="tanh"), False
    lat = 16
    xs = [torch.randn(16, 1, lat, lat) for _ in range(2)]
    contexts = [torch.randn(7, TINY["dit"].text_dim) for _ in range(2)]
    t = torch.tensor([900.0, 300.0])
    with torch.no_grad():
        out, ref = (m(xs, t, contexts, seq_len=(lat // 2) ** 2) for m in (fused, unfused))
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="input_gelu fuses the GELU with row-wise quantisation"):
        Fp8Linear(nn.Linear(32, 16), scaling="tensor", input_gelu=True)
    with pytest.raises(ValueError, match="input_bias is added in the pass of input_gelu"):
        Fp8Linear(nn.Linear(32, 16), input_bias=torch.zeros(32))


def test_gelu_quantize_rows_is_bias_gelu_then_quantize_rows_on_cpu():
    x, bias = torch.randn(9, 40) * 3, torch.randn(40)
    x[2] = -bias
    q, scale = gelu_quantize_rows(x, bias)
    q_ref, scale_ref = quantize_rows(nn.functional.gelu(x + bias, approximate="tanh"))
    assert torch.equal(q.float(), q_ref.float()) and torch.equal(scale, scale_ref)
    assert scale[2].item() == 1.0  # an all-zero row
    chex.assert_shape([q, scale], [(9, 40), (9, 1)])
    no_bias = quantize_rows(nn.functional.gelu(x, approximate="tanh"))[0]
    assert torch.equal(gelu_quantize_rows(x)[0].float(), no_bias.float())


def _cfg_pair(model, tensors, meta):
    """The golden case's first latent with its two contexts as a (cond, uncond) pair: outputs, target."""
    xs, contexts = case_inputs(tensors)
    t = tensors["inputs.t"][:1].repeat(2)
    with torch.no_grad():
        cond, uncond = model([xs[0], xs[0]], t, contexts[:2], seq_len=meta["call"]["seq_len"])
    return (cond, uncond), uncond + CFG_SCALE * (cond - uncond)


@pytest.mark.parametrize("scaling", ["row", "tensor"])
def test_fp8_dit_and_cfg_target_deviation_on_the_golden_tiny_model(scaling):
    """The golden tiny DiT (float32 on CPU) with FP8 block linears, either scaling: the output and the
    CFG target move by a few percent (README "Speed" quotes these numbers), while the unquantised
    model is still exact against upstream's golden output."""
    model, tensors, meta = golden_model("dit_t2v_1frame_b2")
    fp8 = copy.deepcopy(model)
    quantize_dit(fp8, scaling=scaling)
    assert fp8.blocks[0].ffn[0].scaling == scaling
    (cond, uncond), target = _cfg_pair(model, tensors, meta)
    (cond8, uncond8), target8 = _cfg_pair(fp8, tensors, meta)
    chex.assert_equal_shape([target, target8])
    errors = dict(cond=rel_l2(cond8, cond), uncond=rel_l2(uncond8, uncond), cfg_target=rel_l2(target8, target))
    print(f"FP8 ({scaling}) vs float32 on dit_t2v_1frame_b2: "
          + ", ".join(f"{k} rel L2 {v:.3e}" for k, v in errors.items()))
    for name, err in errors.items():
        assert 1e-4 < err < 0.1, (name, err)
    with torch.no_grad():
        xs, contexts = case_inputs(tensors)
        out = model(xs, tensors["inputs.t"], contexts, seq_len=meta["call"]["seq_len"])
    atol, rtol = golden.tolerance(meta)
    golden.assert_close(out[0], golden.listed(tensors, "outputs.out")[0], atol, rtol, "dit_t2v_1frame_b2", "out.0")


def test_pipeline_with_fp8_linears_on_the_tiny_release():
    """`WanT2V(fp8_linears=True)` (what --teacher.fp8 builds) quantises both experts' blocks; its
    latents stay near the bf16-free plain pipeline's (float32 on CPU) and upstream's recorded ones."""
    from safetensors.torch import load_file

    from wan.configs import load_config
    from wan.text2video import WanT2V

    release = golden.tiny_release_dir()
    config = load_config(release / "config_tiny_t2v.json")
    meta = json.loads((release / "golden_pipeline.json").read_text())
    tensors = load_file(str(release / "golden_pipeline.safetensors"))
    pipe = WanT2V(config, release, device="cpu", fp8_linears=True)
    for expert in (pipe.low_noise_model, pipe.high_noise_model):
        assert isinstance(expert.blocks[0].ffn[2], Fp8Linear) and isinstance(expert.blocks[-1].cross_attn.v, Fp8Linear)
        assert expert.blocks[0].ffn[2].scaling == "row" and expert.blocks[0].ffn[2].fast_accum  # the defaults
    run = meta["pipeline"]["runs"]["unipc"]
    args = dict(run["generate_arguments"], size=tuple(run["generate_arguments"]["size"]),
                guide_scale=tuple(run["generate_arguments"]["guide_scale"]))
    latents = pipe.generate(meta["pipeline"]["prompt"], progress=False, return_latents=True, **args)
    want = tensors["outputs.unipc.final_latent"]
    chex.assert_shape(latents, tuple(want.shape))
    err = rel_l2(latents, want)
    print(f"FP8 pipeline vs upstream's final latent: rel L2 {err:.3e}")
    assert 1e-4 < err < 0.1, err
    with pytest.raises(ValueError, match="fp8_linears quantises whole weight matrices and dit_fsdp shards them"):
        WanT2V(config, release, device="cpu", fp8_linears=True, dit_fsdp=True)
    with pytest.raises(ValueError, match="fp8_scaling must be 'row' or 'tensor', got 'rows'"):
        WanT2V(config, release, device="cpu", fp8_linears=True, fp8_scaling="rows")
    tensor = WanT2V(config, release, device="cpu", fp8_linears=True, fp8_scaling="tensor", fp8_fast_accum=False)
    layer = tensor.low_noise_model.blocks[0].self_attn.q
    assert layer.scaling == "tensor" and not layer.fast_accum
    assert not tensor.high_noise_model.blocks[-1].ffn[2].fast_accum


def test_teacher_flags_reach_the_pipeline():
    """--teacher.fp8_scaling / --teacher.no_fp8_fast_accum, through `distill.teacher.build_pipeline`
    (what train.py calls), set every block linear of both experts."""
    from types import SimpleNamespace

    from distill import config as config_lib
    from distill.teacher import build_pipeline
    from wan.configs import load_config

    release = golden.tiny_release_dir()
    cfg = config_lib.parse(["--teacher.fp8", "--teacher.fp8_scaling", "tensor", "--teacher.no_fp8_fast_accum"])
    rt = SimpleNamespace(torch_device=torch.device("cpu"), world_size=1)
    pipe = build_pipeline(release, load_config(release / "config_tiny_t2v.json"), cfg.teacher, rt)
    layers = [m for e in (pipe.low_noise_model, pipe.high_noise_model) for m in e.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == 2 * 10 * len(pipe.low_noise_model.blocks)
    assert {(m.scaling, m.fast_accum) for m in layers} == {("tensor", False)}


def test_fp8_flag_errors():
    from distill import config as config_lib

    with pytest.raises(SystemExit, match=r"--teacher.fp8 quantises whole weight matrices and "
                                         r"--teacher_device_strategy balanced shards them"):
        config_lib.parse(["--teacher.fp8", "--teacher_device_strategy", "balanced"])
    assert config_lib.parse(["--teacher.fp8"]).teacher.fp8 is True
    assert config_lib.parse([]).teacher.fp8 is False
    cfg = config_lib.parse(["--teacher.fp8", "--teacher.fp8_scaling", "tensor", "--teacher.fp8_fast_accum"])
    assert (cfg.teacher.fp8_scaling, cfg.teacher.fp8_fast_accum) == ("tensor", True)
    assert (config_lib.parse([]).teacher.fp8_scaling, config_lib.parse([]).teacher.fp8_fast_accum) == ("row", True)
    assert config_lib.parse(["--teacher.fp8", "--teacher.no_fp8_fast_accum"]).teacher.fp8_fast_accum is False
    with pytest.raises(SystemExit):
        config_lib.parse(["--teacher.fp8", "--teacher.fp8_scaling", "column"])


# ------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["row", "row+fast", "tensor", "tensor+fast"])
@pytest.mark.parametrize("rows", [4096, 77], ids=["aligned", "padded"])
def test_scaled_mm_matches_the_emulation(rows, recipe):
    """torch._scaled_mm (FP8 tensor cores, float32 accumulation) against the float32 product of the
    same quantised operands, at A14B width, for each scaling, with and without fast accumulation; 77 rows
    exercises the padding to a multiple of 16."""
    from wan.fp8 import has_fp8_matmul

    device = torch.device("cuda")
    assert has_fp8_matmul(device), "an FP8 GPU (compute capability >= 8.9) is expected here"
    torch.manual_seed(0)
    layer = nn.Linear(5120, 13824, device=device).to(torch.bfloat16)
    x = torch.randn(rows, 5120, device=device, dtype=torch.bfloat16)
    scaling, _, fast = recipe.partition("+")
    fp8 = Fp8Linear(layer, scaling=scaling, fast_accum=fast == "fast")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = fp8(x)
        compiled = torch.compile(fp8)(x)
        reference = fp8_linear_reference(*fp8.quantize(x), fp8.weight_fp8, fp8.weight_scale.t(), fp8.bias,
                                         torch.float32)
        bf16 = layer(x)
    assert out.dtype == torch.bfloat16
    chex.assert_shape(out, (rows, 13824))
    print(f"{recipe} scaled_mm vs emulation: {rel_l2(out, reference):.2e}; compiled {rel_l2(compiled, reference):.2e}; "
          f"vs bf16 {rel_l2(out, bf16):.2e}")
    assert rel_l2(out, reference) < 5e-3  # the output's bf16 rounding
    assert rel_l2(compiled, reference) < 5e-3
    assert rel_l2(out, bf16) < 5e-2


def _one_step_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Whether e4m3 codes a and b (as floats) are equal or neighbours: 3 mantissa bits, so a step is at
    most 1/8 of the larger magnitude, or 2^-9 among the subnormals."""
    return (a - b).abs() <= torch.maximum(a.abs(), b.abs()) / 8 + 2**-9


@pytest.mark.gpu
@pytest.mark.parametrize("rows, cols", [(8192, 13824), (77, 13824), (64, 96)])
def test_gelu_quantize_rows_kernel_matches_the_reference(rows, cols):
    """The Triton kernel (one pass per row) against the bias, GELU and `quantize_rows` in torch: the same
    scales, the codes equal but for 0.03-0.11% one step apart (tanh from exp, the reciprocal of the
    scale); with and without a bias, eager and inside torch.compile (an opaque op there)."""
    torch.manual_seed(0)
    x = (torch.randn(rows, cols, device="cuda") * 2).bfloat16()
    bias = torch.randn(cols, device="cuda").bfloat16()
    x[3] = -bias  # an all-zero row with the bias
    compiled = torch.compile(lambda v, b: gelu_quantize_rows(v, b))
    for b in (bias, None):
        q_ref, scale_ref = gelu_quantize_rows_reference(x, b)
        for q, scale in (gelu_quantize_rows(x, b), compiled(x, b)):
            assert q.dtype == FP8_DTYPE
            chex.assert_shape([q, scale], [(rows, cols), (rows, 1)])
            torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
            assert b is None or (scale[3].item() == 1.0 and q[3].float().abs().max().item() == 0.0)
            differ = (q.float() != q_ref.float()).float().mean().item()
            print(f"{rows}x{cols}, bias {b is not None}: {differ:.2e} of the codes differ from the reference")
            assert differ < 2e-3
            assert _one_step_apart(q.float(), q_ref.float()).all()


@pytest.mark.gpu
def test_fused_fp8_ffn_matches_the_unfused_layers():
    """An A14B-width FFN through `quantize_dit` (the first layer's bias and the GELU fused into the second
    layer's quantisation) against the same FP8 layers unfused (bias added after the first product, GELU
    and quantisation in torch): the same products, so only the fused pass's rare one-step codes differ."""
    torch.manual_seed(0)
    ffn = nn.Sequential(nn.Linear(5120, 13824), nn.GELU(approximate="tanh"), nn.Linear(13824, 5120))
    ffn = ffn.cuda().to(torch.bfloat16)
    model = nn.Module()
    model.blocks = nn.ModuleList([ffn])
    bf16 = copy.deepcopy(ffn)
    quantize_dit(model, fast_accum=True)
    assert ffn[2].input_gelu and ffn[2].input_bias is not None and ffn[0].bias is None
    unfused = copy.deepcopy(ffn)
    unfused[0].bias, unfused[2].input_bias = unfused[2].input_bias, None
    unfused[1], unfused[2].input_gelu = nn.GELU(approximate="tanh"), False
    x = torch.randn(2, 4096, 5120, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out, compiled, reference, exact = ffn(x), torch.compile(ffn)(x), unfused(x), bf16(x)
    print(f"fused FP8 FFN vs unfused: {rel_l2(out, reference):.2e}; compiled {rel_l2(compiled, reference):.2e}; "
          f"vs bf16 {rel_l2(out, exact):.2e}")
    # 0.31% on an H100 (2026-12-06): a twentieth of FP8's own deviation from bf16 (5.3%)
    assert rel_l2(out, reference) < 6e-3 and rel_l2(compiled, reference) < 6e-3
    assert rel_l2(out, exact) < 0.1
