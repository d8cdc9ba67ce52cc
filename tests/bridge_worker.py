"""Worker for tests/test_bridge.py's multi-process test: one rank of `torchrun --nproc_per_node=N`.

Each rank builds ``Runtime.from_env``, hands a per-rank torch batch to JAX through DLPack
(zero-copy), assembles the global batch sharded over the mesh, and checks a jitted global
reduction against the exact expected value and against a torch.distributed all-reduce. Any
failed check raises (non-zero exit); success prints ``BRIDGE_WORKER_OK rank=<r>``.

Usage: python -m torch.distributed.run --nproc_per_node=2 --master_port=P tests/bridge_worker.py [cpu|cuda|auto]
Also runs as a plain single process (world 1).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bridge import Runtime


def main(device: str) -> None:
    runtime = Runtime.from_env(jax_memory_fraction=0.2, device=device)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from bridge import dlpack

    rank, world = runtime.rank, runtime.world_size
    assert world == int(os.environ.get("WORLD_SIZE", "1")), runtime
    assert runtime.is_main == (rank == 0)
    assert runtime.mesh.shape["data"] == world * len(jax.local_devices(backend=runtime.jax_device.platform))
    if runtime.platform == "cuda":
        assert runtime.torch_device == torch.device("cuda", runtime.local_rank), runtime
        assert torch.cuda.current_device() == runtime.local_rank, "torch's current device moved off LOCAL_RANK"
        assert runtime.jax_device.local_hardware_id == runtime.local_rank, runtime
        assert len(jax.local_devices()) == 1, f"JAX should see only its own GPU, sees {jax.local_devices()}"
        assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.2"

    local_batch, channels, height, width = 2, 16, 4, 4
    global_batch = local_batch * world
    rows = runtime.batch_slice(global_batch)
    assert rows == slice(rank * local_batch, (rank + 1) * local_batch), rows
    if world > 1:
        try:
            runtime.batch_slice(global_batch + 1)
        except ValueError as error:
            assert "not divisible by the world size" in str(error), error
        else:
            raise AssertionError("batch_slice accepted a batch not divisible by the world size")

    # The teacher's output layout [B, C, 1, H, W]; global row g holds the value g everywhere.
    values = torch.arange(rows.start, rows.stop, dtype=torch.float32, device=runtime.torch_device)
    teacher_out = values.view(-1, 1, 1, 1, 1).expand(-1, channels, 1, height, width).contiguous()
    local = dlpack.teacher_outputs_to_jax(teacher_out)  # [B_local, C, H, W]
    assert local.shape == (local_batch, channels, height, width), local.shape
    assert local.unsafe_buffer_pointer() == teacher_out.data_ptr(), "torch -> JAX copied"
    assert local.devices() == {runtime.jax_device}, (local.devices(), runtime.jax_device)

    global_array = dlpack.local_to_global(local, runtime.mesh)  # [B_global, C, H, W]
    assert global_array.shape == (global_batch, channels, height, width), global_array.shape
    assert global_array.sharding == NamedSharding(runtime.mesh, PartitionSpec("data"))
    (my_shard,) = global_array.addressable_shards
    assert my_shard.index[0].indices(global_batch)[:2] == (rows.start, rows.stop), (my_shard.index, rows)
    assert my_shard.data.unsafe_buffer_pointer() == teacher_out.data_ptr(), "local_to_global copied"

    # A jitted reduction across all processes' shards (a cross-process collective inside XLA).
    replicated = NamedSharding(runtime.mesh, PartitionSpec())
    total = jax.jit(jnp.sum, out_shardings=replicated)(global_array)
    expected = float(sum(range(global_batch))) * channels * height * width
    assert float(total) == expected, (float(total), expected)
    torch_total = teacher_out.sum()
    if world > 1:
        torch.distributed.all_reduce(torch_total)
    assert float(torch_total) == expected, (float(torch_total), expected)

    # Per-row result comes back to this rank's rows, and out to torch zero-copy.
    row_sums = jax.jit(
        lambda x: x.sum(axis=(1, 2, 3)), out_shardings=NamedSharding(runtime.mesh, PartitionSpec("data"))
    )(global_array)
    mine = dlpack.global_to_local(row_sums)  # [B_local]
    assert mine.shape == (local_batch,), mine.shape
    mine_torch = dlpack.jax_to_torch(mine)
    assert mine_torch.data_ptr() == mine.unsafe_buffer_pointer(), "JAX -> torch copied"
    assert mine_torch.device == runtime.torch_device, mine_torch.device
    np.testing.assert_array_equal(mine_torch.cpu().numpy(), (values * channels * height * width).cpu().numpy())

    if world > 1:
        try:
            dlpack.jax_to_torch(global_array)
        except ValueError as error:
            assert "global_to_local" in str(error), error
        else:
            raise AssertionError("jax_to_torch accepted a multi-process global array")

    # The teacher's input layout from this rank's part of the global batch, zero-copy.
    inputs = dlpack.jax_to_teacher_inputs(dlpack.global_to_local(global_array))
    assert [tuple(t.shape) for t in inputs] == [(channels, 1, height, width)] * local_batch
    assert inputs[0].data_ptr() == teacher_out.data_ptr(), "global -> teacher inputs copied"
    assert all(bool((t == v).all()) for t, v in zip(inputs, values.tolist()))

    if runtime.platform == "cuda":
        _check_cuda_stream_ordering(runtime)

    runtime.barrier()
    runtime.shutdown()
    runtime.shutdown()  # idempotent
    print(f"BRIDGE_WORKER_OK rank={rank} platform={runtime.platform} world={world}", flush=True)


def _check_cuda_stream_ordering(runtime) -> None:
    """A DLPack'd buffer read right after asynchronous producer work sees the finished values."""
    import jax
    import jax.numpy as jnp

    from bridge import dlpack

    # torch -> JAX: a spin kernel delays the fill; JAX must wait for it, not read zeros.
    produced = torch.zeros(1 << 22, device=runtime.torch_device)
    torch.cuda._sleep(50_000_000)  # ~25+ ms of GPU time queued before the fill
    produced.fill_(1.0)
    total = float(jnp.sum(dlpack.torch_to_jax(produced)))
    assert total == produced.numel(), f"JAX read the buffer before torch finished writing it: {total}"

    # JAX -> torch: a long JAX computation, read by torch straight away.
    def slow(x):
        return jax.lax.fori_loop(0, 2000, lambda i, v: v * 0.5 + 1.0, x)

    result = jax.jit(slow)(jnp.zeros((1 << 22,), jnp.float32))  # converges to 2.0
    as_torch = dlpack.jax_to_torch(result)
    assert bool((as_torch == 2.0).all()), "torch read the buffer before JAX finished writing it"


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "auto")
