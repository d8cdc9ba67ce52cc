"""Tests for bridge/: zero-copy DLPack exchange, batch layouts, global arrays, and the Runtime grid.

Zero-copy is asserted as pointer equality (torch ``data_ptr()`` vs JAX ``unsafe_buffer_pointer()``)
and, on CPU, by a write through one side showing in the other. Multi-process behaviour runs
under ``torchrun --nproc_per_node=2`` in a subprocess (tests/bridge_worker.py), because the JAX
device list and jax.distributed are fixed once JAX initialises; this pytest process only ever
uses JAX's default single-process backend and never changes JAX's configuration.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bridge import dlpack
from bridge.runtime import Runtime, read_launch_env
from tests.ports import free_port_pair

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = REPO_ROOT / "tests" / "bridge_worker.py"

# The dtypes the distillation moves (latents and teacher outputs) plus the text mask's.
FLOAT_DTYPES = [torch.float32, torch.bfloat16]
ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.bool]


def _tensor(shape, dtype, device="cpu"):
    values = torch.randn(*shape, device=device) * 10
    return (values > 0) if dtype == torch.bool else values.to(dtype)


def _assert_same_values(jax_array, torch_tensor):
    np.testing.assert_array_equal(
        np.asarray(jax_array.astype(jnp.float32)), torch_tensor.detach().cpu().to(torch.float32).numpy()
    )


# ---------------------------------------------------------------------------------------------
# torch <-> JAX, one tensor
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_torch_to_jax_is_zero_copy(dtype):
    tensor = _tensor((2, 16, 8, 8), dtype)
    assert dlpack.copy_reason(tensor) is None  # fresh torch CPU allocations are 64-byte aligned

    array = dlpack.torch_to_jax(tensor)

    chex.assert_shape(array, (2, 16, 8, 8))
    assert array.dtype == jnp.dtype(str(dtype).removeprefix("torch."))
    assert array.unsafe_buffer_pointer() == tensor.data_ptr()
    _assert_same_values(array, tensor)
    # Aliasing, not just an equal address: a write through torch shows in JAX (which is why the
    # bridge's contract says to treat the source as frozen).
    tensor[0, 0, 0, 0] = not bool(tensor[0, 0, 0, 0]) if dtype == torch.bool else 7
    assert bool(array[0, 0, 0, 0] == jnp.asarray(tensor[0, 0, 0, 0].item(), array.dtype))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_jax_to_torch_is_zero_copy(dtype):
    source = _tensor((3, 16, 4, 6), dtype)
    array = jnp.asarray(source.to(torch.float32).numpy()).astype(str(dtype).removeprefix("torch."))

    tensor = dlpack.jax_to_torch(array)

    chex.assert_shape(tensor, (3, 16, 4, 6))
    assert tensor.dtype == dtype
    assert tensor.is_contiguous()
    assert tensor.data_ptr() == array.unsafe_buffer_pointer()
    _assert_same_values(array, tensor)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_round_trips_keep_the_buffer_and_the_bits(dtype):
    tensor = _tensor((4, 16, 8, 8), dtype)
    back = dlpack.jax_to_torch(dlpack.torch_to_jax(tensor))
    chex.assert_shape(back, tensor.shape)
    assert back.data_ptr() == tensor.data_ptr()
    assert torch.equal(back, tensor)

    array = jnp.arange(4 * 16 * 8 * 8, dtype=jnp.float32).reshape(4, 16, 8, 8).astype(dtype_name(dtype))
    again = dlpack.torch_to_jax(dlpack.jax_to_torch(array))
    chex.assert_shape(again, array.shape)
    assert again.unsafe_buffer_pointer() == array.unsafe_buffer_pointer()
    assert bool((again == array).all())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def test_non_contiguous_input_is_copied_once_into_an_aliased_buffer():
    tensor = _tensor((2, 8, 8, 16), torch.float32).permute(0, 3, 1, 2)  # [B, C, H, W] channels-last view
    assert not tensor.is_contiguous()
    assert "non-contiguous" in dlpack.copy_reason(tensor)

    array = dlpack.torch_to_jax(tensor)

    chex.assert_shape(array, (2, 16, 8, 8))
    _assert_same_values(array, tensor)
    assert array.unsafe_buffer_pointer() != tensor.data_ptr()
    # The result uses JAX's default (row-major) layout, so jitted consumers see a plain array.
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: x[:, 3])(array)), tensor[:, 3].numpy())


def test_misaligned_cpu_view_is_cloned_because_jax_would_copy_it_anyway():
    base = torch.randn(1 + 2 * 16 * 4 * 4)
    view = base[1:].view(2, 16, 4, 4)  # contiguous, but 4 bytes past a 64-byte boundary
    assert view.is_contiguous() and view.data_ptr() % 64 != 0
    # The fact the bridge relies on: JAX's CPU client does not alias such a buffer.
    with pytest.raises(ValueError, match="not aligned"):
        jax.dlpack.from_dlpack(view, copy=False)
    assert "not 64-byte aligned" in dlpack.copy_reason(view)

    array = dlpack.torch_to_jax(view)

    chex.assert_shape(array, (2, 16, 4, 4))
    _assert_same_values(array, view)
    assert array.unsafe_buffer_pointer() % 64 == 0


def test_aligned_views_into_a_larger_buffer_stay_zero_copy():
    teacher_batch = torch.randn(4, 16, 8, 8)  # one sample = 4 KiB, a multiple of 64 bytes
    second_half = teacher_batch[2:]
    assert dlpack.copy_reason(second_half) is None
    assert dlpack.torch_to_jax(second_half).unsafe_buffer_pointer() == second_half.data_ptr()


def test_tensor_requiring_grad_is_shared_detached():
    weights = torch.randn(4, 4, requires_grad=True)
    array = dlpack.torch_to_jax(weights)
    assert array.unsafe_buffer_pointer() == weights.data_ptr()
    assert weights.requires_grad  # the caller's tensor is untouched


@pytest.mark.parametrize(
    "tensor, error, message",
    [
        (torch.zeros(2, dtype=torch.float64), TypeError, r"float64.*tensor\.float\(\)"),
        (torch.zeros(2, dtype=torch.int64), TypeError, r"int64.*torch\.int32"),
        (torch.zeros(2, dtype=torch.complex64), TypeError, "complex64"),
        (torch.zeros(2, device="meta"), ValueError, "meta.*only CPU and CUDA"),
        (np.zeros(2, np.float32), TypeError, "must be a torch.Tensor, got ndarray"),
    ],
    ids=["float64", "int64", "complex64", "meta", "numpy"],
)
def test_torch_to_jax_rejects_what_it_cannot_carry(tensor, error, message):
    with pytest.raises(error, match=message):
        dlpack.torch_to_jax(tensor)


def test_jax_to_torch_rejects_non_jax_and_unsupported_dtypes():
    with pytest.raises(TypeError, match="must be a jax.Array, got Tensor"):
        dlpack.jax_to_torch(torch.zeros(2))
    with pytest.raises(TypeError, match="uint32.*astype"):
        dlpack.jax_to_torch(jnp.zeros(2, jnp.uint32))


# ---------------------------------------------------------------------------------------------
# Teacher layouts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_teacher_output_list_is_stacked_into_one_batch(dtype):
    samples = [_tensor((16, 1, 6, 8), dtype) for _ in range(3)]

    batch = dlpack.teacher_outputs_to_jax(samples)

    chex.assert_shape(batch, (3, 16, 6, 8))
    assert batch.dtype == jnp.dtype(dtype_name(dtype))
    _assert_same_values(batch, torch.stack([s[:, 0] for s in samples]))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("with_frame_axis", [True, False], ids=["BC1HW", "BCHW"])
def test_teacher_output_tensor_is_zero_copy(dtype, with_frame_axis):
    outputs = _tensor((2, 16, 1, 6, 8) if with_frame_axis else (2, 16, 6, 8), dtype)

    batch = dlpack.teacher_outputs_to_jax(outputs)

    chex.assert_shape(batch, (2, 16, 6, 8))
    assert batch.unsafe_buffer_pointer() == outputs.data_ptr()
    _assert_same_values(batch, outputs.reshape(2, 16, 6, 8))


@pytest.mark.parametrize(
    "outputs, message",
    [
        ([], "list is empty"),
        ([torch.zeros(16, 1, 4, 4), torch.zeros(16, 1, 4, 6)], r"output 1 does not match output 0: shape"),
        ([torch.zeros(16, 1, 4, 4), torch.zeros(16, 1, 4, 4, dtype=torch.bfloat16)], r"output 1 .*dtype"),
        ([torch.zeros(16, 4, 4)], r"output 0 has shape \(16, 4, 4\); expected \[C, 1, H, W\]"),
        (torch.zeros(2, 16, 3, 4, 4), "3 frames"),
        (torch.zeros(2, 4, 4, 4), r"4 channels .* expected 16"),
        (torch.zeros(16, 4), r"expected \[B, C, 1, H, W\]"),
    ],
    ids=["empty", "shape-mismatch", "dtype-mismatch", "no-frame-axis", "video", "channels", "rank-2"],
)
def test_teacher_outputs_bad_input_names_the_problem(outputs, message):
    with pytest.raises(ValueError, match=message):
        dlpack.teacher_outputs_to_jax(outputs)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_jax_to_teacher_inputs_are_per_sample_views(dtype):
    latents = jnp.asarray(np.random.default_rng(0).normal(size=(3, 16, 6, 8)), dtype=dtype_name(dtype))

    inputs = dlpack.jax_to_teacher_inputs(latents)

    assert len(inputs) == 3
    sample_bytes = 16 * 6 * 8 * latents.dtype.itemsize
    for index, sample in enumerate(inputs):
        chex.assert_shape(sample, (16, 1, 6, 8))
        assert sample.dtype == dtype
        assert sample.data_ptr() == latents.unsafe_buffer_pointer() + index * sample_bytes
        _assert_same_values(latents[index][:, None], sample)


def test_teacher_round_trip_returns_the_latents():
    latents = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 4, 4)), jnp.float32)
    inputs = dlpack.jax_to_teacher_inputs(latents)
    outputs = [sample * 2 for sample in inputs]  # a stand-in teacher
    chex.assert_trees_all_equal(dlpack.teacher_outputs_to_jax(outputs), latents * 2)


def test_jax_to_teacher_inputs_bad_input():
    with pytest.raises(ValueError, match=r"4 channels .* takes 16: map student latents"):
        dlpack.jax_to_teacher_inputs(jnp.zeros((2, 4, 8, 8)))
    with pytest.raises(ValueError, match=r"expected a \[B, C, H, W\] latent batch, got shape \(2, 16, 1, 8, 8\)"):
        dlpack.jax_to_teacher_inputs(jnp.zeros((2, 16, 1, 8, 8)))
    assert len(dlpack.jax_to_teacher_inputs(jnp.zeros((2, 4, 8, 8)), channels=None)) == 2


# ---------------------------------------------------------------------------------------------
# Global arrays and the Runtime, single process (the multi-process versions run under torchrun)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def clean_launch_env(monkeypatch):
    """No launcher variables: whatever a test sets is undone afterwards."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def single_runtime(clean_launch_env):
    jax.devices()  # JAX is already running here, so from_env changes no JAX configuration
    runtime = Runtime.from_env(device="cpu")
    yield runtime
    runtime.shutdown()


def test_single_process_runtime(single_runtime):
    runtime = single_runtime
    assert (runtime.rank, runtime.world_size, runtime.local_rank, runtime.is_main) == (0, 1, 0, True)
    assert runtime.torch_device == torch.device("cpu")
    assert runtime.torch_backend is None
    assert runtime.jax_device in jax.local_devices(backend="cpu")
    assert runtime.mesh.axis_names == ("data",)
    assert runtime.batch_slice(5) == slice(0, 5)
    runtime.barrier()  # no process group: a no-op rather than an error


def test_local_to_global_and_back_in_one_process_is_zero_copy(single_runtime):
    mesh = single_runtime.mesh
    if mesh.size != 1:
        pytest.skip("this pytest process has several CPU devices; the torchrun test covers sharding")
    outputs = torch.randn(2, 16, 1, 4, 4)
    local = dlpack.teacher_outputs_to_jax(outputs)

    global_array = dlpack.local_to_global(local, mesh)

    chex.assert_shape(global_array, (2, 16, 4, 4))
    assert global_array.addressable_shards[0].data.unsafe_buffer_pointer() == outputs.data_ptr()
    np.testing.assert_allclose(float(jax.jit(jnp.sum)(global_array)), float(outputs.sum()), rtol=1e-5, atol=1e-5)  # a sum near 0
    assert dlpack.global_to_local(global_array).unsafe_buffer_pointer() == outputs.data_ptr()
    with pytest.raises(ValueError, match="no axis named 'model'"):
        dlpack.local_to_global(local, mesh, axis="model")
    with pytest.raises(ValueError, match="leading batch dimension"):
        dlpack.local_to_global(jnp.float32(1.0), mesh)


def test_batch_slice_splits_by_rank_and_rejects_uneven_batches(single_runtime):
    template = single_runtime
    ranks = [
        Runtime(
            rank=rank,
            world_size=4,
            local_rank=rank,
            torch_device=template.torch_device,
            jax_device=template.jax_device,
            mesh=template.mesh,
        )
        for rank in range(4)
    ]
    assert [r.batch_slice(8) for r in ranks] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert [r.is_main for r in ranks] == [True, False, False, False]
    with pytest.raises(ValueError, match="global batch 6 is not divisible by the world size 4"):
        ranks[1].batch_slice(6)
    with pytest.raises(ValueError, match="positive integer"):
        ranks[0].batch_slice(0)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "0"}, "RANK set but WORLD_SIZE, LOCAL_RANK not"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, r"RANK=2 is outside \[0, WORLD_SIZE=2\)"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "3"}, "LOCAL_RANK=3 is outside"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1"}, "LOCAL_RANK=1 is outside"),
        ({"RANK": "zero", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK='zero' is not an integer"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "needs MASTER_ADDR and MASTER_PORT"),
        (
            {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "65535"},
            "MASTER_PORT\\+1",
        ),
    ],
    ids=["partial", "rank", "local-rank", "local-world", "not-int", "no-master", "port"],
)
def test_inconsistent_launch_env_is_refused_before_anything_starts(clean_launch_env, env, message):
    for name, value in env.items():
        clean_launch_env.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        read_launch_env()
    with pytest.raises(ValueError, match=message):
        Runtime.from_env()
    assert not torch.distributed.is_initialized()


def test_launch_env_under_torchrun_variables(clean_launch_env):
    for name, value in {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "29500",
    }.items():
        clean_launch_env.setenv(name, value)
    launch = read_launch_env()
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.master_port) == (
        3,
        4,
        1,
        "h",
        29500,
    )


def test_runtime_argument_errors(clean_launch_env):
    with pytest.raises(ValueError, match=r"jax_memory_fraction must be in \(0, 1\], got 1.5"):
        Runtime.from_env(jax_memory_fraction=1.5)
    with pytest.raises(ValueError, match="device must be 'auto', 'cuda' or 'cpu', got 'tpu'"):
        Runtime.from_env(device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error(clean_launch_env):
    with pytest.raises(RuntimeError, match="CUDA was requested but torch.cuda.is_available"):
        Runtime.from_env(device="cuda")


# ---------------------------------------------------------------------------------------------
# Two processes under torchrun
# ---------------------------------------------------------------------------------------------


def _run_torchrun(device: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "XLA_FLAGS"):
        env.pop(name, None)  # each rank gets exactly one JAX device and torchrun's own variables
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port_pair()}",
        str(WORKER),
        device,
    ]
    return subprocess.run(command, env=env, cwd=REPO_ROOT, check=False, capture_output=True, text=True, timeout=180)


def _assert_workers_ok(result, platform, nproc=2):
    log = f"--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-6000:]}"
    assert result.returncode == 0, log
    for rank in range(nproc):
        assert f"BRIDGE_WORKER_OK rank={rank} platform={platform} world={nproc}" in result.stdout, log


def test_two_process_cpu_global_array_from_dlpacked_torch_tensors():
    _assert_workers_ok(_run_torchrun("cpu"), "cpu")


# ---------------------------------------------------------------------------------------------
# GPU (skipped without CUDA; see tests/conftest.py)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cuda_zero_copy_both_ways(dtype):
    tensor = _tensor((4, 16, 64, 64), dtype, device="cuda")
    array = dlpack.torch_to_jax(tensor)
    chex.assert_shape(array, tuple(tensor.shape))
    assert array.unsafe_buffer_pointer() == tensor.data_ptr()
    (device,) = array.devices()
    assert device.platform == "gpu" and device.local_hardware_id == tensor.device.index
    _assert_same_values(array, tensor)

    result = jax.jit(lambda x: x * 2)(array)
    back = dlpack.jax_to_torch(result)
    assert back.device == tensor.device
    assert back.data_ptr() == result.unsafe_buffer_pointer()
    assert torch.equal(back, tensor * 2)

    inputs = dlpack.jax_to_teacher_inputs(array)
    assert inputs[1].data_ptr() == tensor[1].data_ptr()
    outputs = dlpack.teacher_outputs_to_jax(tensor.unsqueeze(2))
    assert outputs.unsafe_buffer_pointer() == tensor.data_ptr()


@pytest.mark.gpu
def test_cuda_misaligned_view_is_cloned():
    base = torch.randn(1 + 16 * 8 * 8, device="cuda")
    view = base[1:].view(1, 16, 8, 8)
    assert "not 256-byte aligned" in dlpack.copy_reason(view)
    array = dlpack.torch_to_jax(view)
    assert array.unsafe_buffer_pointer() % 256 == 0
    _assert_same_values(array, view)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs visible in one process")
def test_export_works_whatever_torch_current_device_is():
    # Measured pitfall (DESIGN.md): JAX's start-up can move torch's current device; torch then
    # refuses to export a tensor of another GPU unless the export runs under the tensor's device.
    previous = torch.cuda.current_device()
    try:
        for tensor_gpu, current_gpu in ((0, 1), (1, 0)):
            tensor = torch.randn(2, 16, 8, 8, device=f"cuda:{tensor_gpu}")
            torch.cuda.set_device(current_gpu)
            array = dlpack.torch_to_jax(tensor)
            (device,) = array.devices()
            assert device.local_hardware_id == tensor_gpu
            assert array.unsafe_buffer_pointer() == tensor.data_ptr()
            back = dlpack.jax_to_torch(jax.jit(lambda x: x + 1)(array))
            assert back.device == tensor.device
            assert torch.equal(back, tensor + 1)
    finally:
        torch.cuda.set_device(previous)


@pytest.mark.gpu
def test_cuda_single_process_worker():
    # Own process: Runtime pins JAX to one GPU and sets its memory fraction before JAX starts.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(
        [sys.executable, str(WORKER), "cuda"],
        env=env,
        cwd=REPO_ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
    )
    _assert_workers_ok(result, "cuda", nproc=1)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_process_cuda_global_array_from_dlpacked_torch_tensors():
    _assert_workers_ok(_run_torchrun("cuda"), "cuda")
