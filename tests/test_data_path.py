"""The per-step data path of training: device-resident text, host-drawn noise levels, no round trips.

The GPU test at the end runs real training steps with torch's sync debugging set to raise and JAX's
device-to-host transfers disallowed: a step that waits for the device anywhere fails it.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from distill.data import DeviceText, pad_text
from student_jax.train_step import draw_noise_levels, make_noisy_batch


def _source(lengths, dim=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {i: torch.randn(n, dim, generator=gen) for i, n in enumerate(lengths)}


def test_device_text_pads_once_and_keeps_recent_prompts():
    source = _source([3, 7, 12, 1])  # prompt 2 is longer than text_len: truncated as pad_text does
    cache = DeviceText(source, text_len=8, device=torch.device("cpu"), dtype=torch.float32, capacity=2)
    text, mask, lengths = cache.get([0, 1, 0])
    chex.assert_shape([text, mask], [(3, 8, 6), (3, 8)])
    want_text, want_mask = pad_text([source[0], source[1], source[0]], 8)
    np.testing.assert_array_equal(text.numpy(), want_text)
    np.testing.assert_array_equal(mask.numpy(), want_mask)
    assert lengths == [3, 7, 3] and cache.uploads == 2  # the repeated prompt is not read again
    text, mask, lengths = cache.get([2])
    np.testing.assert_array_equal(text.numpy(), pad_text([source[2]], 8)[0])
    assert lengths == [8] and cache.uploads == 3
    cache.get([0])  # 1 was least recently used and went when 2 came in; 0 is still held
    assert cache.uploads == 3
    cache.get([1])
    assert cache.uploads == 4


def test_device_text_keeps_the_requested_dtype():
    cache = DeviceText(_source([4]), text_len=5, device=torch.device("cpu"), dtype=torch.bfloat16, capacity=1)
    text, _, _ = cache.get([0])
    assert text.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="at least one prompt"):
        DeviceText({}, 5, torch.device("cpu"), torch.float32, capacity=0)


@pytest.mark.parametrize("band", [None, np.array([0.4, 1.0, 0.875, 1.0], np.float32)])
def test_host_noise_levels_are_the_batch_noise_levels(band):
    """The noise levels the trainer draws on the host CPU device are the ones make_noisy_batch draws
    for the same (rng, step) (same keys; XLA may round the shift formula differently when it fuses
    it, so to the last bit only where both run the same graph), and given them, make_noisy_batch uses
    them exactly: the t the teacher routes by is bitwise the t the student sees."""
    rng = jax.random.key_data(jax.random.key(7))
    cpu = jax.local_devices(backend="cpu")[0]
    x0 = jax.random.normal(jax.random.key(1), (5, 4, 2, 2))
    for step in (0, 3, 1000):
        s = jax.jit(draw_noise_levels, static_argnums=(2, 3))(jax.device_put(rng, cpu), step, 5, 12.0, band)
        noisy = make_noisy_batch(rng, step, x0, 12.0, band)
        np.testing.assert_allclose(np.asarray(1000.0 * s), np.asarray(noisy["t"]), rtol=1e-6)
        given = make_noisy_batch(rng, step, x0, None, s=jnp.asarray(s))
        np.testing.assert_array_equal(np.asarray(given["t"]), np.asarray(1000.0 * s))
        chex.assert_trees_all_equal(given["eps"], noisy["eps"])
        np.testing.assert_allclose(np.asarray(given["x_t"]), np.asarray(noisy["x_t"]), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_training_steps_never_wait_for_the_device(tmp_path):
    """Distiller.step on the GPU: no synchronising torch call (sync debug mode 'error') and no JAX
    device-to-host transfer (transfer guard) in a step after the warm-up."""
    from distill.config import parse
    from distill.distiller import Distiller
    from distill.loop import _Stop, runtime
    from tests.tiny_random_release import tiny_flags

    cache = tmp_path / "cache"
    cfg = parse(["--workdir", str(tmp_path / "run"), "--data.cache_dir", str(cache), *tiny_flags(cache),
                 "--data.gen_steps", "2", "--data.samples_per_prompt", "1", "--train.steps", "6",
                 "--teacher.compile", "off"])
    rt = runtime(cfg)
    stop = _Stop()
    try:
        d = Distiller(cfg, rt, stop)
        d._build_training()
        for step in range(2):  # warm-up: compiles, first text uploads
            jax.block_until_ready(d.step(step, d._load_batch(step)))
        batches = [d._load_batch(step) for step in (2, 3)]
        jax.block_until_ready(batches)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with jax.transfer_guard_device_to_host("disallow"):
                metrics = [d.step(step, batch) for step, batch in zip((2, 3), batches)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert np.isfinite(float(jax.device_get(metrics[-1]["loss"])))
    finally:
        stop.restore()
        rt.shutdown()
