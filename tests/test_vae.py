"""Tests of the Wan2.1 VAE port (wan/modules/vae2_1.py): golden parity, release loading, causal cache, errors."""

from __future__ import annotations


import chex
import pytest
import torch
import torch.nn.functional as F

from tests import golden
from wan.checkpoint import CheckpointError, load_into
from wan.modules import vae2_1
from wan.modules.vae2_1 import CausalConv3d, TemporalCache, Wan2_1_VAE, WanVAE_, _video_vae

torch.set_default_dtype(torch.float32)

CASE = "vae"
FRAME_COUNTS = (1, 5, 9)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def vae_case():
    return golden.load_case(CASE)


@pytest.fixture(scope="module")
def vae_case_pth(vae_case, tmp_path_factory):
    """The golden case's weights written as a `.pth` state dict, like the release's Wan2.1_VAE.pth."""
    tensors, _ = vae_case
    path = tmp_path_factory.mktemp("vae") / "Wan2.1_VAE.pth"
    torch.save(golden.weights(tensors), path)
    return path


@pytest.fixture(scope="module")
def case_wrapper(vae_case_pth):
    return Wan2_1_VAE(vae_pth=vae_case_pth, device="cpu")


@pytest.fixture(scope="module")
def case_model(vae_case):
    tensors, meta = vae_case
    model = WanVAE_(**meta["constructor"]).eval()
    return load_into(model, golden.weights(tensors), CASE)


@pytest.fixture(scope="module")
def release():
    from safetensors.torch import load_file

    folder = golden.tiny_release_dir()
    return folder, load_file(str(folder / "golden_pipeline.safetensors"))


@pytest.fixture(scope="module")
def release_wrapper(release):
    folder, _ = release
    return Wan2_1_VAE(vae_pth=folder / "Wan2.1_VAE.pth", device="cpu")


# ------------------------------------------------------------------------------------ golden case `vae`


def test_wrapper_constants_match_golden(vae_case, case_wrapper):
    tensors, meta = vae_case
    assert case_wrapper.model.z_dim == 16
    assert case_wrapper.model.dim == meta["constructor"]["dim"]  # inferred from encoder.conv1.weight
    assert case_wrapper.dtype == torch.float32 and case_wrapper.device == torch.device("cpu")
    for got, name in ((case_wrapper.mean, "latents_mean"), (case_wrapper.std, "latents_std")):
        assert got.dtype == torch.float32
        assert torch.equal(got, tensors[f"inputs.{name}"]), name
    assert torch.equal(case_wrapper.scale[0], case_wrapper.mean)
    assert torch.equal(case_wrapper.scale[1], 1.0 / tensors["inputs.latents_std"])  # float32 reciprocal


@pytest.mark.parametrize("frames", FRAME_COUNTS)
def test_golden_encode_decode(vae_case, case_wrapper, frames):
    tensors, meta = vae_case
    atol, rtol = golden.tolerance(meta)
    video = tensors[f"inputs.video_{frames}f"]
    latent_frames = 1 + (frames - 1) // 4

    (latent,) = case_wrapper.encode([video])
    chex.assert_shape(latent, (16, latent_frames, 4, 4))
    assert latent.dtype == torch.float32
    golden.assert_close(latent, tensors[f"outputs.latent_{frames}f"], atol, rtol, CASE, f"latent_{frames}f")

    # Decode the stored latent, so a decode error is not masked by (or blamed on) the encoder.
    (decoded,) = case_wrapper.decode([tensors[f"outputs.latent_{frames}f"]])
    chex.assert_shape(decoded, (3, frames, 32, 32))
    assert decoded.dtype == torch.float32
    assert decoded.min() >= -1 and decoded.max() <= 1
    golden.assert_close(decoded, tensors[f"outputs.decoded_{frames}f"], atol, rtol, CASE, f"decoded_{frames}f")


@pytest.mark.parametrize("frames", FRAME_COUNTS)
def test_golden_intermediates(vae_case, case_model, frames):
    """Un-normalised latent (scale [0, 1]) and the decode before the clamp, through WanVAE_ directly."""
    tensors, meta = vae_case
    atol, rtol = golden.tolerance(meta)
    scale = [tensors["inputs.latents_mean"], 1.0 / tensors["inputs.latents_std"]]
    with torch.no_grad():
        raw = case_model.encode(tensors[f"inputs.video_{frames}f"][None], [0.0, 1.0])[0]
        unclamped = case_model.decode(tensors[f"outputs.latent_{frames}f"][None], scale)[0]
    chex.assert_shape(raw, (16, 1 + (frames - 1) // 4, 4, 4))
    chex.assert_shape(unclamped, (3, frames, 32, 32))
    golden.assert_close(raw, tensors[f"intermediates.latent_raw_{frames}f"], atol, rtol, CASE, f"latent_raw_{frames}f")
    golden.assert_close(unclamped, tensors[f"intermediates.decoded_unclamped_{frames}f"], atol, rtol, CASE,
                        f"decoded_unclamped_{frames}f")


def test_golden_decode_z_random(vae_case, case_wrapper, case_model):
    """Four latent frames: every phase of the decoder cache, the "Rep" marker quirk included."""
    tensors, meta = vae_case
    atol, rtol = golden.tolerance(meta)
    z = tensors["inputs.z_random"]
    (decoded,) = case_wrapper.decode([z])
    chex.assert_shape(decoded, (3, 13, 32, 32))
    golden.assert_close(decoded, tensors["outputs.decoded_z_random"], atol, rtol, CASE, "decoded_z_random")
    with torch.no_grad():
        unclamped = case_model.decode(z[None], case_wrapper.scale)[0]
    golden.assert_close(unclamped, tensors["intermediates.decoded_unclamped_z_random"], atol, rtol, CASE,
                        "decoded_unclamped_z_random")
    assert unclamped.abs().max() > 1, "this case is meant to exercise the clamp"


# ------------------------------------------------------------------------------------------ tiny release


def _formula_video(frames: int, size: int = 64) -> torch.Tensor:
    """value[c, t, y, x] = 0.9 sin(0.2 (c+1) x + 0.15 y + c + 0.5 t), float64 rounded to float32."""
    c, t, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in (3, frames, size, size)), indexing="ij")
    return (0.9 * torch.sin(0.2 * (c + 1) * x + 0.15 * y + c + 0.5 * t)).float()  # [3, T, H, W]


@pytest.mark.parametrize("name, frames", [("vae_1frame", 1), ("vae_5frame", 5)])
def test_tiny_release(release, release_wrapper, name, frames):
    _, tensors = release
    assert release_wrapper.model.dim == 16 and release_wrapper.model.z_dim == 16
    video = tensors[f"inputs.{name}.video"]
    chex.assert_shape(video, (3, frames, 64, 64))
    golden.assert_close(_formula_video(frames), video, 1e-7, 0.0, "tiny_release", f"{name}.video(formula)")

    (latent,) = release_wrapper.encode([video])
    chex.assert_shape(latent, (16, 1 + (frames - 1) // 4, 8, 8))
    golden.assert_close(latent, tensors[f"outputs.{name}.latent"], 1e-4, 1e-4, "tiny_release", f"{name}.latent")

    (decoded,) = release_wrapper.decode([tensors[f"outputs.{name}.latent"]])
    chex.assert_shape(decoded, (3, frames, 64, 64))
    golden.assert_close(decoded, tensors[f"outputs.{name}.decoded"], 1e-4, 1e-4, "tiny_release", f"{name}.decoded")


@pytest.mark.parametrize("run", ["unipc", "dpmpp", "unipc_w96_h64", "unipc_5frame"])
def test_tiny_release_pipeline_decode(release, release_wrapper, run):
    """The pipeline's last step: its final latent decodes to the video generate returned (W != H included)."""
    _, tensors = release
    latent = tensors[f"outputs.{run}.final_latent"]
    expected = tensors[f"outputs.{run}.video"]
    (video,) = release_wrapper.decode([latent])
    chex.assert_shape(video, tuple(expected.shape))
    golden.assert_close(video, expected, 1e-4, 1e-4, "tiny_release", f"{run}.video")


# ------------------------------------------------------------------------------------ structure / meta


def test_real_size_meta_build_matches_manifest():
    manifest = golden.manifest("wan2_1_vae.json")
    with torch.device("meta"):
        model = WanVAE_(**manifest["constructor"])
    state = model.state_dict()
    assert list(state) == list(manifest["tensors"]), "key names or order differ from the release"
    for key, info in manifest["tensors"].items():
        assert list(state[key].shape) == info["shape"], key
        assert str(state[key].dtype) == f"torch.{info['dtype']}", key
    assert len(state) == manifest["num_tensors"]
    assert sum(t.numel() for t in state.values()) == manifest["num_parameters"]
    assert all(t.is_meta for t in state.values())
    assert model.z_dim == 16 and model.encode_cache is not model.decode_cache


def test_constructor_defaults_are_upstreams():
    model = WanVAE_()
    assert (model.dim, model.z_dim, model.dim_mult, model.num_res_blocks) == (128, 4, [1, 2, 4, 4], 2)
    assert model.attn_scales == [] and model.temperal_downsample == [True, True, False]
    assert model.temperal_upsample == [False, True, True]
    chex.assert_shape(model.encoder.conv1.weight, (128, 3, 3, 3, 3))
    chex.assert_shape(model.conv1.weight, (8, 8, 1, 1, 1))


def test_video_vae_builds_real_config_and_loads(vae_case_pth, vae_case):
    tensors, _ = vae_case
    model = _video_vae(pretrained_path=vae_case_pth, z_dim=16, device="cpu", dim=16)
    assert model.dim == 16 and model.z_dim == 16 and model.temperal_downsample == [False, True, True]
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(model.state_dict()["decoder.head.2.weight"], tensors["weights.decoder.head.2.weight"])


# --------------------------------------------------------------------------------------- causal cache


def test_encode_decode_are_causal_and_stateless(vae_case, case_model):
    """A prefix of the video gives a prefix of the latent and vice versa; repeated calls agree exactly."""
    tensors, _ = vae_case
    video = tensors["inputs.video_9f"][None]
    z = tensors["inputs.z_random"][None]
    scale = [0.0, 1.0]
    with torch.no_grad():
        full = case_model.encode(video, scale)
        first = case_model.encode(video[:, :, :1], scale)
        five = case_model.encode(video[:, :, :5], scale)
        assert len(case_model.encode_cache) == 0, "clear_cache() must run after encode"
        again = case_model.encode(video, scale)
        decoded = case_model.decode(z, scale)
        decoded_prefix = case_model.decode(z[:, :, :3], scale)
        assert len(case_model.decode_cache) == 0, "clear_cache() must run after decode"
    chex.assert_shape(full, (1, 16, 3, 4, 4))
    chex.assert_shape(decoded_prefix, (1, 3, 9, 32, 32))
    assert torch.equal(full, again)
    torch.testing.assert_close(first, full[:, :, :1], atol=1e-6, rtol=0)
    torch.testing.assert_close(five, full[:, :, :2], atol=1e-6, rtol=0)
    torch.testing.assert_close(decoded_prefix, decoded[:, :, :9], atol=1e-6, rtol=0)


def test_temporal_upsample_rep_marker_quirk():
    """Upstream quirk: upsample3d's time_conv never sees the first chunk. Chunk 2 runs with zero padding and
    leaves [zero, frame 2] when it has one frame, so chunk 3 sees [0, f2, f3]; chunk 1 cannot matter."""
    torch.manual_seed(1)
    layer = vae2_1.Resample(4, "upsample3d").eval()
    f1a, f1b, f2, f3 = (torch.randn(1, 4, 1, 3, 3) for _ in range(4))
    outputs = []
    for first in (f1a, f1b):
        cache = TemporalCache()
        with torch.no_grad():
            cache.begin_chunk(last=False)
            out1 = layer(first, cache)
            assert cache.get(0) == vae2_1.REP_MARKER
            cache.begin_chunk(last=False)
            out2 = layer(f2, cache)
            assert torch.equal(cache.get(0), torch.cat([torch.zeros_like(f2), f2], dim=2))
            cache.begin_chunk(last=True)
            out3 = layer(f3, cache)
        chex.assert_shape(out1, (1, 2, 1, 6, 6))
        chex.assert_shape([out2, out3], (1, 2, 2, 6, 6))
        outputs.append((out2, out3))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    # chunk 3 by hand: time_conv over exactly [0, f2, f3], channel halves interleaved in time, then 2-D resample
    with torch.no_grad():
        doubled = F.conv3d(torch.cat([torch.zeros_like(f2), f2, f3], dim=2), layer.time_conv.weight,
                           layer.time_conv.bias)  # [1, 8, 1, 3, 3]
        frames = torch.cat([doubled[:, :4], doubled[:, 4:]], dim=2)  # [1, 4, 2, 3, 3]: even, odd frame
        expected = torch.stack([layer.resample(frames[:, :, i]) for i in range(2)], dim=2)  # [1, 2, 2, 6, 6]
    torch.testing.assert_close(outputs[0][1], expected, atol=1e-6, rtol=1e-6)


def test_temporal_cache_slots():
    cache = TemporalCache()
    cache.begin_chunk(last=False)
    first, second = cache.claim(), cache.claim()
    cache.set(first, "x")
    cache.begin_chunk(last=True)
    assert cache.claim() == first and cache.get(first) == "x" and cache.get(second) is None
    cache.set(first, "y")  # the last chunk saves nothing
    assert cache.get(first) == "x"
    cache.clear()
    assert len(cache) == 0


@pytest.mark.parametrize("cached_frames, frames", [(0, 1), (1, 1), (0, 3), (2, 4), (1, 5)])
def test_causal_conv_matches_explicit_padding(cached_frames, frames):
    """The one-output-frame shortcut (skipping taps that only see zero padding) equals the padded conv."""
    torch.manual_seed(2)
    conv = CausalConv3d(4, 5, 3, padding=1)
    x = torch.randn(1, 4, frames, 6, 7)
    previous = torch.randn(1, 4, cached_frames, 6, 7) if cached_frames else None
    full = x if previous is None else torch.cat([previous, x], dim=2)
    padded = F.pad(full, (1, 1, 1, 1, 2 - cached_frames, 0))  # [1, 4, 2 + frames, 8, 9]
    expected = F.conv3d(padded, conv.weight, conv.bias)
    with torch.no_grad():
        got = conv(x, previous)
    chex.assert_shape(got, (1, 5, frames, 6, 7))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- errors


def test_missing_checkpoint_names_file(tmp_path):
    missing = tmp_path / "nowhere" / "Wan2.1_VAE.pth"
    with pytest.raises(CheckpointError, match="Wan2.1_VAE.pth"):
        Wan2_1_VAE(vae_pth=missing, device="cpu")
    with pytest.raises(CheckpointError, match="Wan2.1_VAE.pth"):
        _video_vae(pretrained_path=missing)


def test_wrong_shapes_are_listed(vae_case, tmp_path):
    tensors, _ = vae_case
    state = golden.weights(tensors)
    state["decoder.head.2.weight"] = torch.zeros(3, 16, 3, 3, 1)
    del state["conv2.bias"]
    path = tmp_path / "broken_vae.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"broken_vae\.pth.*conv2\.bias.*decoder\.head\.2\.weight"):
        Wan2_1_VAE(vae_pth=path, device="cpu")


def test_explicit_dim_mismatch_is_reported(vae_case_pth):
    with pytest.raises(CheckpointError, match=r"shape mismatch.*encoder\.conv1\.weight"):
        Wan2_1_VAE(vae_pth=vae_case_pth, device="cpu", dim=32)


def test_not_a_vae_checkpoint(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"other\.pth.*encoder\.conv1\.weight"):
        Wan2_1_VAE(vae_pth=path, device="cpu")


def test_wrong_z_dim(vae_case_pth):
    with pytest.raises(ValueError, match="16 channels"):
        Wan2_1_VAE(z_dim=4, vae_pth=vae_case_pth, device="cpu")


@pytest.mark.parametrize(
    "shape, message",
    [
        ((4, 1, 32, 32), r"videos\[0\] must be an RGB video tensor \[3, F, H, W\].*\[4, 1, 32, 32\]"),
        ((3, 32, 32), r"videos\[0\] must be an RGB video tensor.*\[3, 32, 32\]"),
        ((1, 3, 1, 32, 32), r"videos\[0\] must be an RGB video tensor"),
        ((3, 1, 30, 32), r"multiples of 8, got H=30, W=32"),
        ((3, 1, 32, 36), r"multiples of 8, got H=32, W=36"),
        ((3, 4, 32, 32), r"4 frames: use 1 \+ 4k frames.*nearest shorter valid count is 1"),
        ((3, 8, 32, 32), r"8 frames: use 1 \+ 4k frames.*nearest shorter valid count is 5"),
        ((3, 0, 32, 32), r"0 frames"),
    ],
)
def test_bad_videos(case_wrapper, shape, message):
    with pytest.raises(ValueError, match=message):
        case_wrapper.encode([torch.zeros(shape)])


def test_bad_video_containers(case_wrapper):
    with pytest.raises(ValueError, match=r"list of \[3, F, H, W\] tensors, got a single tensor"):
        case_wrapper.encode(torch.zeros(3, 1, 32, 32))
    with pytest.raises(ValueError, match="videos is empty"):
        case_wrapper.encode([])
    with pytest.raises(ValueError, match=r"videos\[1\] must be an RGB video tensor.*a ndarray"):
        import numpy as np

        case_wrapper.encode([torch.zeros(3, 1, 8, 8), np.zeros((3, 1, 8, 8))])


@pytest.mark.parametrize("shape", [(8, 1, 4, 4), (16, 4, 4), (1, 16, 1, 4, 4)])
def test_bad_latents(case_wrapper, shape):
    with pytest.raises(ValueError, match=r"zs\[0\] must be a latent tensor \[16, F, h, w\]"):
        case_wrapper.decode([torch.zeros(shape)])


def test_model_level_errors(case_model):
    with pytest.raises(ValueError, match=r"6 frames: use 1 \+ 4k frames"):
        case_model.encode(torch.zeros(1, 3, 6, 32, 32), [0.0, 1.0])
    with pytest.raises(ValueError, match=r"\[B, 16, T, h, w\]"):
        case_model.decode(torch.zeros(1, 4, 1, 4, 4), [0.0, 1.0])


def test_module_has_no_global_cache():
    assert not any(isinstance(v, TemporalCache) for v in vars(vae2_1).values())
