"""`python -m benchmarks` on CPU at tiny sizes: every figure prints its JSON line with its fields."""

import json

import pytest

from benchmarks.__main__ import FIGURES, dit_flops, main

FIELDS = {
    "teacher_forward": {"size", "batch", "tokens", "layers", "ms", "tflops", "compiled", "first_call_s"},
    "teacher_fp8": {"size", "batch", "recipe", "layers", "base_dtype", "base_ms", "ms", "fp8_over_base"},
    "teacher_sol": {"size", "batch", "tokens", "layers", "ms", "tflops", "teacher_eager_over_sol"},
    "fp8_linear": {"size", "rows", "layer", "recipe", "n_in", "n_out", "base_dtype", "base_ms", "base_tflops", "ms",
                   "fp8_over_base", "mm_ms", "mm_tflops", "mm_over_base"},
    "sdpa": {"size", "batch", "tokens", "backend", "ms", "tflops"},
    "t5_encode": {"batch", "text_len", "ms", "ms_per_prompt"},
    "vae_decode": {"size", "ms"},
    "student_step": {"preset", "size", "batch", "compile_s", "ms", "samples_per_s", "peak_gb", "attention",
                     "text_attention", "scan_blocks", "remat", "remat_policy", "xla_gb"},
    "bridge": {"size", "batch", "ms", "student_step_ms", "percent_of_student_step"},
    "distill_step": {"ms", "teacher_ms", "step_over_teacher", "samples_per_s_per_process", "processes",
                     "teacher_layers", "step_over_teacher_at_40_layers", "bridge_percent_of_step", "student_ms",
                     "rest_ms", "host_issue_ms"},
}


def test_every_figure_prints_a_json_line(capsys, tmp_path):
    assert main(["--iters", "2", "--warmup", "1", "--sizes", "64", "--", "--train.batch_size", "4"]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    by_figure = {}
    for line in lines:
        by_figure.setdefault(line["figure"], []).append(line)
    assert set(by_figure) == set(FIGURES)
    assert [(l["size"], l["batch"]) for l in by_figure["teacher_forward"]] == [(64, 1), (64, 2)]
    for figure, fields in FIELDS.items():
        for line in by_figure[figure]:
            assert fields <= set(line), (figure, fields - set(line))
            assert line["ms"] > 0
    assert [line["compiled"] for line in by_figure["teacher_forward"]] == [False, False]  # CPU: eager only
    sol = by_figure["teacher_sol"][0]
    forward = by_figure["teacher_forward"][0]
    assert sol["teacher_eager_over_sol"] == pytest.approx(forward["ms"] / sol["ms"], rel=1e-3)
    fp8 = {line["batch"]: line for line in by_figure["teacher_fp8"]}
    assert fp8[2]["base_dtype"] == "float32"  # CPU: FP8 emulated against the float32 teacher
    assert 0 < fp8[2]["cfg_target_rel_l2"] < 0.1, fp8[2]  # FP8 moves the target, by a few percent at most
    linears = by_figure["fp8_linear"]  # the block's three kinds of linear layer at 64x64: 2 x 16 rows
    assert [(l["layer"], l["rows"]) for l in linears] == [("attention", 32), ("ffn_in", 32), ("ffn_out", 32)]
    assert linears[1]["n_out"] == linears[2]["n_in"] > linears[1]["n_in"]
    # (ms are printed to 4 decimals: a few percent of a 0.01 ms product)
    assert linears[0]["mm_over_base"] == pytest.approx(linears[0]["mm_ms"] / linears[0]["base_ms"], rel=3e-2)
    step = by_figure["distill_step"][0]
    assert step["ms"] > 0 and step["teacher_ms"] > 0 and step["teacher_layers"] == 2
    assert step["student_ms"] > 0 and step["host_issue_ms"] > 0
    assert step["rest_ms"] == pytest.approx(step["ms"] - step["teacher_ms"] - step["student_ms"], rel=1e-3)
    # the step's time outside the teacher is added unscaled to 20x the teacher time
    outside = step["ms"] - step["teacher_ms"]
    assert step["step_over_teacher_at_40_layers"] == pytest.approx(
        (outside + 20 * step["teacher_ms"]) / (20 * step["teacher_ms"]), rel=1e-3)
    bridge = by_figure["bridge"][0]
    assert bridge["percent_of_student_step"] == pytest.approx(100 * bridge["ms"] / bridge["student_step_ms"], rel=1e-3)


def test_fp8_figures_run_each_recipe(capsys):
    """--fp8-recipes: teacher_fp8 and fp8_linear once per recipe against one base; the CPU kernel
    accumulates in float32 either way, so fast accumulation gives the same target there, while the
    tensor-wise scaling moves it differently from the row-wise one."""
    recipes = ["row", "row+fast", "tensor", "tensor+fast"]
    assert main(["--iters", "1", "--warmup", "0", "--sizes", "64", "--figures", "teacher_fp8", "fp8_linear",
                 "--fp8-recipes", *recipes]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    pair = {l["recipe"]: l for l in lines if l["figure"] == "teacher_fp8" and l["batch"] == 2}
    assert list(pair) == recipes
    assert len({l["base_ms"] for l in pair.values()}) == 1  # one base for every recipe
    assert pair["row+fast"]["cfg_target_rel_l2"] == pair["row"]["cfg_target_rel_l2"]
    assert pair["tensor+fast"]["cfg_target_rel_l2"] == pair["tensor"]["cfg_target_rel_l2"]
    assert pair["tensor"]["cfg_target_rel_l2"] != pair["row"]["cfg_target_rel_l2"]
    linears = [(l["layer"], l["recipe"]) for l in lines if l["figure"] == "fp8_linear"]
    assert linears == [(layer, r) for layer in ("attention", "ffn_in", "ffn_out") for r in recipes]


def test_dit_flops_counts_the_a14b_matmuls():
    """At A14B width one 1024^2 forward (4096 tokens, 512 text): 2 FLOPs per multiply-add of every matmul."""
    from wan.modules.model import DiTConfig

    dit = DiTConfig()
    tokens, text = 4096, 512
    linear = 2 * tokens * dit.num_layers * (4 * dit.dim ** 2 + 2 * dit.dim ** 2 + 2 * dit.dim * dit.ffn_dim)
    linear += 2 * text * dit.num_layers * 2 * dit.dim ** 2
    attention = 4 * dit.num_layers * dit.dim * tokens * (tokens + text)
    assert dit_flops(dit, tokens, text, 1) == linear + attention
    assert dit_flops(dit, tokens, text, 2) == 2 * (linear + attention)
    # 115.5 TFLOP: the issue measured 442 TFLOP/s at 261.3 ms for this case, i.e. the same count
    assert 1.15e14 < dit_flops(dit, tokens, text, 1) < 1.16e14


def test_bad_size_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--sizes", "100"])
    assert exit_info.value.code == 2
    assert "multiples of 16" in capsys.readouterr().err


def test_gpu_timeline_counts_overlaps_once_and_finds_the_gaps():
    from benchmarks.__main__ import gpu_timeline

    def kernel(name, ts, dur, stream):
        return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}

    events = [  # two steps of 10 ms wall (times in us): teacher on stream 7, student on stream 3
        kernel("void at::native::add_kernel", 0, 4000, 7), kernel("student_a", 3000, 2000, 3),  # overlap of 1 ms
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 20000},  # host events are not device time
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 5000, "dur": 500, "args": {"stream": 7}},
        kernel("teacher_b", 10000, 6000, 7), kernel("inside_b", 11000, 500, 3),  # within teacher_b
        kernel("student_b", 18000, 1000, 3),
    ]
    t = gpu_timeline(events, steps=2, wall_ms=10.0)
    # busy: [0, 5.5] + [10, 16] + [18, 19] = 12.5 ms over two steps
    assert t["gpu_busy_ms"] == pytest.approx(6.25) and t["gpu_idle_ms"] == pytest.approx(3.75)
    assert t["gpu_stream_ms"] == {"3": 1.75, "7": 5.25}
    assert t["gpu_gaps"] == [[4.5, "Memcpy HtoD", "teacher_b"], [2.0, "teacher_b", "student_b"]]
    # stream 7 ran an ATen kernel: torch's (the teacher), the rest JAX's
    assert t["gpu_torch_ms"] == pytest.approx(5.25) and t["gpu_jax_ms"] == pytest.approx(1.75)
    assert gpu_timeline([], steps=1, wall_ms=1.0) == {}


def test_kernel_kinds_sorts_kernels_by_name():
    from benchmarks.__main__ import kernel_kinds

    def kernel(name, dur):
        return {"cat": "kernel", "name": name, "ts": 0, "dur": dur}

    events = [  # two runs, times in us
        kernel("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NNT", 3000),  # cuBLAS bf16 GEMM
        kernel("void cutlass::device_kernel<f8f8bf16_rowwise>", 2000),  # FP8 row-wise product
        kernel("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>", 1500),
        kernel("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", 500),  # CUTLASS attention: attention, not matmul
        kernel("triton_per_fused_add_mul_native_layer_norm_0", 600),
        kernel("triton_poi_fused_gelu_1", 300), kernel("triton_per_fused_add_mul_native_layer_norm_0", 200),
        # Inductor's fused kernels are named after the ops they fuse: still elementwise, not a matmul / attention
        kernel("triton_red_fused__scaled_mm__to_copy_abs_amax_clamp_div_4", 100),
        kernel("triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy_transpose_2", 40),
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 0, "dur": 9999},  # not a kernel
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 9999},
    ]
    k = kernel_kinds(events, runs=2)
    assert k["matmul_kernel_ms"] == pytest.approx(2.5)
    assert k["attention_kernel_ms"] == pytest.approx(1.0)
    assert k["other_kernel_ms"] == pytest.approx(0.62)
    assert k["top_other_kernels"] == [["triton_per_fused_add_mul_native_layer_norm_0", 0.4],
                                      ["triton_poi_fused_gelu_1", 0.15],
                                      ["triton_red_fused__scaled_mm__to_copy_abs_amax_clamp_div_4", 0.05],
                                      ["triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy_transpose_2", 0.02]]


def test_loop_jax_env_is_the_runs_memory_fraction(tmp_path):
    """distill_step on a GPU after the JAX figures: JAX must start with the loop's fraction, not its 75%."""
    from benchmarks.__main__ import loop_jax_env

    env = loop_jax_env(["--preset", "a14b", "--teacher_path", str(tmp_path)])
    assert env == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.4"}
    assert loop_jax_env(["--train.jax_memory_fraction", "0.25"])["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.25"
    assert loop_jax_env(["--train.jax_memory_fraction", "2"]) == {}  # refused by the config: distill_step reports it
