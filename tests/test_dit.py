"""Tests of the DiT (`wan.modules.model.WanModel`) and its attention (`wan.modules.attention`).

Golden parity for every dit_* case (per-sample and per-token t), intermediates, batch/seq_len
independence, the release state-dict layouts (built on the meta device), `from_pretrained` on the tiny
release folder (plus broken copies of it), per-step parity with the tiny release pipeline, input
errors, attention masking, and the bfloat16 autocast precision regions (CPU emulation; GPU tests
are marked `gpu`).
"""

from __future__ import annotations

import json
import math
import shutil

import chex
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests import golden
from wan.checkpoint import CheckpointError
from wan.modules.attention import attention, flash_attention
from wan.modules.model import WanModel, rope_apply, rope_tables

torch.set_default_dtype(torch.float32)

DIT_CASES = ["dit_t2v_1frame_b1", "dit_t2v_1frame_b2", "dit_t2v_multiframe_mixed_b2", "dit_t2v_per_token_t"]
# (case, timestep tensor): per-sample [B] t and the per-token form the reference actually received
GOLDEN_CALLS = [
    ("dit_t2v_1frame_b1", "inputs.t"),
    ("dit_t2v_1frame_b2", "inputs.t"),
    ("dit_t2v_1frame_b2", "inputs.t_expanded"),
    ("dit_t2v_multiframe_mixed_b2", "inputs.t"),
    ("dit_t2v_multiframe_mixed_b2", "inputs.t_expanded"),
    ("dit_t2v_per_token_t", "inputs.t"),
]

_MODELS: dict[str, tuple[WanModel, dict, dict]] = {}


def golden_model(case: str) -> tuple[WanModel, dict[str, torch.Tensor], dict]:
    """(model with the case's weights, tensors, meta); built once per case."""
    if case not in _MODELS:
        tensors, meta = golden.load_case(case)
        model = WanModel(**meta["constructor"]).eval().requires_grad_(False)
        model.load_state_dict(golden.weights(tensors), strict=True)
        _MODELS[case] = (model, tensors, meta)
    return _MODELS[case]


def case_inputs(tensors):
    return golden.listed(tensors, "inputs.x"), golden.listed(tensors, "inputs.context")


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


# ------------------------------------------------------------------------------------------------
# golden parity


@pytest.mark.parametrize("case,t_name", GOLDEN_CALLS)
def test_golden_outputs(case, t_name):
    model, tensors, meta = golden_model(case)
    atol, rtol = golden.tolerance(meta)
    xs, contexts = case_inputs(tensors)
    expected = golden.listed(tensors, "outputs.out")
    with torch.no_grad():
        out = model(xs, tensors[t_name], contexts, seq_len=meta["call"]["seq_len"])
    assert isinstance(out, list) and len(out) == len(expected)
    for i, (actual, want) in enumerate(zip(out, expected)):
        chex.assert_shape(actual, tuple(want.shape))
        assert actual.dtype == torch.float32
        golden.assert_close(actual, want, atol, rtol, case, f"out.{i} (t={t_name.split('.')[-1]})")


@pytest.mark.parametrize("case", ["dit_t2v_1frame_b1", "dit_t2v_multiframe_mixed_b2"])
def test_golden_intermediates(case):
    model, tensors, meta = golden_model(case)
    atol, rtol = golden.tolerance(meta)
    xs, contexts = case_inputs(tensors)
    seq_len = meta["call"]["seq_len"]
    # the reference saw per-token t; the b1 case passes [1], which it expanded to [1, seq_len]
    t = tensors["inputs.t_expanded"] if "inputs.t_expanded" in tensors else tensors["inputs.t"].expand(1, seq_len)
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
             for name in ("patch_embedding", "time_embedding", "time_projection", "text_embedding", "head")]
    hooks += [block.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(f"block{k}", o))
              for k, block in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            model(xs, t, contexts, seq_len=seq_len)
    finally:
        for h in hooks:
            h.remove()
    batch = len(xs)
    chex.assert_shape(seen["time_embedding"], (batch, seq_len, model.dim))
    chex.assert_shape(seen["time_projection"], (batch, seq_len, 6 * model.dim))
    chex.assert_shape(seen["text_embedding"], (batch, model.text_len, model.dim))
    chex.assert_shape(seen["head"], (batch, seq_len, model.out_dim * math.prod(model.patch_size)))
    # the reference hook kept the last sample's conv output; ours may have embedded the batch at once
    seen["patch_embedding.0"] = seen.pop("patch_embedding")[-1:]
    for name, actual in seen.items():
        golden.assert_close(actual, tensors[f"intermediates.{name}"], atol, rtol, case, f"intermediate {name}")


def test_per_sample_t_embeds_once_per_sample():
    """A [B] t is embedded once per sample and broadcast, equal to the per-token rows."""
    model, tensors, meta = golden_model("dit_t2v_multiframe_mixed_b2")
    atol, rtol = golden.tolerance(meta)
    with torch.no_grad():
        e, e0 = model.embed_time(tensors["inputs.t"], meta["call"]["seq_len"])
    chex.assert_shape(e, (2, 1, model.dim))
    chex.assert_shape(e0, (2, 1, 6, model.dim))
    assert e.dtype == e0.dtype == torch.float32
    expected = tensors["intermediates.time_embedding"][:, :1]
    golden.assert_close(e, expected, atol, rtol, "dit_t2v_multiframe_mixed_b2", "e from per-sample t")


def test_valid_tokens_independent_of_batch_and_seq_len():
    model, tensors, meta = golden_model("dit_t2v_multiframe_mixed_b2")
    atol, rtol = golden.tolerance(meta)
    xs, contexts = case_inputs(tensors)
    t = tensors["inputs.t"]
    expected = golden.listed(tensors, "outputs.out")
    tokens = [math.prod(s // p for s, p in zip(x.shape[1:], model.patch_size)) for x in xs]
    assert tokens == [72, 30]
    with torch.no_grad():
        alone_tight = model([xs[1]], t[1:], [contexts[1]], seq_len=tokens[1])[0]
        alone_loose = model([xs[1]], t[1:], [contexts[1]], seq_len=97)[0]
        swapped = model([xs[1], xs[0]], t.flip(0), contexts[::-1], seq_len=80)
    chex.assert_shape([alone_tight, alone_loose], tuple(expected[1].shape))
    case = "dit_t2v_multiframe_mixed_b2"
    golden.assert_close(alone_tight, expected[1], atol, rtol, case, "sample 1 alone, seq_len 30")
    golden.assert_close(alone_loose, expected[1], atol, rtol, case, "sample 1 alone, seq_len 97")
    golden.assert_close(swapped[0], expected[1], atol, rtol, case, "sample 1 first in batch, seq_len 80")
    golden.assert_close(swapped[1], expected[0], atol, rtol, case, "sample 0 second in batch, seq_len 80")


def test_i2v_concatenates_y_after_x():
    torch.manual_seed(3)
    kwargs = dict(patch_size=(1, 2, 2), text_len=8, in_dim=20, dim=48, ffn_dim=64, freq_dim=16, text_dim=12,
                  out_dim=16, num_heads=4, num_layers=1)
    i2v = WanModel(model_type="i2v", **kwargs).eval()
    t2v = WanModel(model_type="t2v", **kwargs).eval()
    t2v.load_state_dict(i2v.state_dict())
    x, y = torch.randn(16, 2, 4, 6), torch.randn(4, 2, 4, 6)
    context, t = [torch.randn(5, 12)], torch.tensor([500])
    with torch.no_grad():
        out_i2v = i2v([x], t, context, seq_len=12, y=[y])[0]
        out_t2v = t2v([torch.cat([x, y])], t, context, seq_len=12)[0]
    chex.assert_shape(out_i2v, (16, 2, 4, 6))
    assert torch.equal(out_i2v, out_t2v)
    with pytest.raises(ValueError, match="'i2v' needs y"):
        i2v([x], t, context, seq_len=12)


# ------------------------------------------------------------------------------------------------
# rope


def test_rope_matches_complex_rotation():
    """Adjacent pairs, three bands with their own frequency tables, padded tokens untouched."""
    head_dim, grid, seq_len = 24, (2, 3, 4), 30
    freqs = rope_tables([grid], seq_len, head_dim, torch.device("cpu"))
    chex.assert_shape(freqs, (1, seq_len, 1, head_dim // 2, 2))  # (cos, sin)
    assert freqs.dtype == torch.float32  # float32 tables: no float64 / complex kernels per block
    x = torch.randn(1, seq_len, 2, head_dim)
    out = rope_apply(x, freqs)
    chex.assert_shape(out, (1, seq_len, 2, head_dim))
    assert out.dtype == torch.float32

    # independent reference written from the semantics: complex pairs times exp(i * pos * freq)
    pairs = head_dim // 2
    band_pairs = [pairs - 2 * (pairs // 3), pairs // 3, pairs // 3]
    band_dims = [head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6)]
    f, h, w = grid
    expected = x.clone().double()
    xc = torch.view_as_complex(x.double().reshape(1, seq_len, 2, pairs, 2))  # [1, L, heads, pairs]
    for n in range(f * h * w):
        position = (n // (h * w), (n // w) % h, n % w)
        angles = []
        for pos, n_pairs, band_dim in zip(position, band_pairs, band_dims):
            k = torch.arange(n_pairs, dtype=torch.float64)
            angles.append(pos / 10000.0 ** (2 * k / band_dim))
        rotation = torch.polar(torch.ones(pairs, dtype=torch.float64), torch.cat(angles))
        expected[0, n] = torch.view_as_real(xc[0, n] * rotation).flatten(-2)
    torch.testing.assert_close(out, expected.float(), atol=1e-6, rtol=1e-6)
    assert torch.equal(out[0, f * h * w:], x[0, f * h * w:])


# ------------------------------------------------------------------------------------------------
# state-dict layouts


def manifest(name: str) -> dict:
    return golden.manifest(name)


@pytest.mark.parametrize("name", ["wanmodel_t2v_A14B.json", "wanmodel_i2v_A14B.json", "wanmodel_ti2v_5B.json"])
def test_full_size_layout_matches_manifest(name):
    spec = manifest(name)
    with torch.device("meta"):
        model = WanModel(**spec["constructor"])
    state = model.state_dict()
    assert set(state) == set(spec["tensors"]), sorted(set(state) ^ set(spec["tensors"]))[:10]
    for key, tensor in state.items():
        assert list(tensor.shape) == spec["tensors"][key]["shape"], key
    assert len(state) == spec["num_tensors"]
    assert sum(t.numel() for t in state.values()) == spec["num_parameters"]
    assert all(t.is_meta for t in state.values())


# ------------------------------------------------------------------------------------------------
# from_pretrained


def shard_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("diffusion_pytorch_model-*.safetensors")):
        out.update(load_file(str(shard)))
    return out


@pytest.mark.parametrize("subfolder", ["high_noise_model", "low_noise_model"])
def test_from_pretrained_tiny_release(subfolder):
    release = golden.tiny_release_dir()
    model = WanModel.from_pretrained(release, subfolder=subfolder)
    expected = shard_tensors(release / subfolder)
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, tensor in expected.items():
        assert state[key].dtype == tensor.dtype == torch.float32, key
        assert torch.equal(state[key], tensor), key
    assert model.text_len == 32 and model.dim == 64 and model.num_layers == 2
    assert model.text_dim == 4096 and model.patch_size == (1, 2, 2)  # defaults: never in config.json
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_from_pretrained_dtype_and_ignored_fields(tmp_path):
    release = golden.tiny_release_dir()
    folder = tmp_path / "dit"
    shutil.copytree(release / "high_noise_model", folder)
    config = json.loads((folder / "config.json").read_text())
    # constructor arguments the release never saves: ignored even when present
    config.update(patch_size=[1, 1, 1], text_dim=7, qk_norm=False, cross_attn_norm=False, window_size=[4, 4])
    (folder / "config.json").write_text(json.dumps(config))
    model = WanModel.from_pretrained(folder, torch_dtype="bfloat16")
    assert model.patch_size == (1, 2, 2) and model.text_dim == 4096 and model.window_size == (-1, -1)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_from_pretrained_single_file_keeps_file_dtype(tmp_path):
    release = golden.tiny_release_dir()
    folder = tmp_path / "dit"
    folder.mkdir()
    shutil.copy(release / "high_noise_model" / "config.json", folder / "config.json")
    expected = {k: v.bfloat16() for k, v in shard_tensors(release / "high_noise_model").items()}
    save_file(expected, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    model = WanModel.from_pretrained(folder)
    state = model.state_dict()
    assert all(state[k].dtype == torch.bfloat16 and torch.equal(state[k], v) for k, v in expected.items())


def test_tiny_release_pipeline_steps():
    """Each recorded sampling step: the chosen expert on the recorded latent gives the recorded predictions."""
    release = golden.tiny_release_dir()
    tensors = load_file(str(release / "golden_pipeline.safetensors"))
    meta = json.loads((release / "golden_pipeline.json").read_text())
    run = meta["pipeline"]["runs"]["unipc"]
    experts = {name: WanModel.from_pretrained(release, subfolder=name)
               for name in ("high_noise_model", "low_noise_model")}
    contexts = {
        "cond": [tensors["intermediates.pipeline.context_cond"].float()],
        "uncond": [tensors["intermediates.pipeline.context_uncond"].float()],
    }
    latent = tensors["inputs.unipc.noise"]
    for step in run["steps"]:
        i = step["step"]
        t = torch.tensor([step["timestep"]], dtype=torch.int64)
        for which in ("cond", "uncond"):
            with torch.no_grad():
                pred = experts[step["expert"]]([latent], t, contexts[which], seq_len=run["seq_len"])[0]
            want = tensors[f"intermediates.unipc.noise_pred_{which}.{i}"]
            chex.assert_shape(pred, tuple(want.shape))
            golden.assert_close(pred, want, 1e-4, 1e-4, "tiny_release unipc", f"step {i} {which}")
        latent = tensors[f"outputs.unipc.latents.{i}"]


@pytest.fixture
def broken_copy(tmp_path):
    release = golden.tiny_release_dir()
    folder = tmp_path / "high_noise_model"
    shutil.copytree(release / "high_noise_model", folder)
    return folder


SHARD2 = "diffusion_pytorch_model-00002-of-00002.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"


def _rewrite_shard(folder, edit):
    path = folder / SHARD2
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _rewrite_index(folder, edit):
    index = json.loads((folder / INDEX).read_text())
    edit(index["weight_map"])
    (folder / INDEX).write_text(json.dumps(index))


def test_from_pretrained_missing_config(broken_copy):
    (broken_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json not found: .*high_noise_model"):
        WanModel.from_pretrained(broken_copy)


def test_from_pretrained_corrupt_config(broken_copy):
    (broken_copy / "config.json").write_text('{"dim": 64,')
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        WanModel.from_pretrained(broken_copy)


def test_from_pretrained_bad_config_values(broken_copy):
    config = json.loads((broken_copy / "config.json").read_text())
    config["num_heads"] = 5  # 64 does not split into 5 heads
    (broken_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json has invalid values.*num_heads 5"):
        WanModel.from_pretrained(broken_copy)


def test_from_pretrained_missing_subfolder(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json not found.*folder does not exist"):
        WanModel.from_pretrained(tmp_path, subfolder="high_noise_model")


def test_from_pretrained_missing_shard(broken_copy):
    (broken_copy / SHARD2).unlink()
    with pytest.raises(CheckpointError, match=rf"shard not found: .*{SHARD2}"):
        WanModel.from_pretrained(broken_copy)


def test_from_pretrained_truncated_shard(broken_copy):
    data = (broken_copy / SHARD2).read_bytes()
    (broken_copy / SHARD2).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"could not read safetensors file .*{SHARD2}.*corrupt"):
        WanModel.from_pretrained(broken_copy)


def test_from_pretrained_index_outside_folder(broken_copy):
    _rewrite_index(broken_copy, lambda wm: wm.update({"head.head.bias": "../x.safetensors"}))
    with pytest.raises(CheckpointError, match=r"'\.\./x\.safetensors'.*points outside that folder"):
        WanModel.from_pretrained(broken_copy)


def test_from_pretrained_missing_key(broken_copy):
    _rewrite_shard(broken_copy, lambda t: t.pop("blocks.1.ffn.2.bias"))
    _rewrite_index(broken_copy, lambda wm: wm.pop("blocks.1.ffn.2.bias"))
    with pytest.raises(CheckpointError, match=rf"{INDEX}.*1 missing key\(s\).*blocks\.1\.ffn\.2\.bias"):
        WanModel.from_pretrained(broken_copy)


def test_from_pretrained_key_listed_but_absent(broken_copy):
    _rewrite_shard(broken_copy, lambda t: t.pop("blocks.1.ffn.2.bias"))
    with pytest.raises(CheckpointError, match=rf"{SHARD2} lacks 1 tensor.*blocks\.1\.ffn\.2\.bias"):
        WanModel.from_pretrained(broken_copy)


def test_from_pretrained_unexpected_key(broken_copy):
    _rewrite_shard(broken_copy, lambda t: t.update({"blocks.2.extra": torch.zeros(3)}))
    _rewrite_index(broken_copy, lambda wm: wm.update({"blocks.2.extra": SHARD2}))
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\).*blocks\.2\.extra"):
        WanModel.from_pretrained(broken_copy)


def test_from_pretrained_shape_mismatch(broken_copy):
    _rewrite_shard(broken_copy, lambda t: t.update({"head.head.bias": torch.zeros(32)}))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*head\.head\.bias: file \(32,\) vs model \(64,\)"):
        WanModel.from_pretrained(broken_copy)


# ------------------------------------------------------------------------------------------------
# input errors


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return WanModel(text_len=8, in_dim=16, dim=32, ffn_dim=32, freq_dim=16, text_dim=12, out_dim=16, num_heads=2,
                    num_layers=1).eval()


def _good_inputs():
    return [torch.randn(16, 1, 4, 4)], torch.tensor([10]), [torch.randn(3, 12)]


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda x, t, c, s: (x, t, c + c, s), r"x has 1 latents but context has 2"),
        (lambda x, t, c, s: (x, t, c, 3), r"x\[0\] has 4 tokens, more than seq_len=3"),
        (lambda x, t, c, s: ([torch.randn(16, 1, 5, 4)], t, c, s), r"not a positive multiple of patch_size"),
        (lambda x, t, c, s: ([torch.randn(8, 1, 4, 4)], t, c, s), r"sample 0 has 8 channels; .* in_dim=16"),
        (lambda x, t, c, s: ([torch.randn(16, 4, 4)], t, c, s), r"x\[0\] must be a tensor \[C, F, H, W\]"),
        (lambda x, t, c, s: (x, torch.tensor([1, 2]), c, s), r"t must be \[B\]=\[1\].*got \[2\]"),
        (lambda x, t, c, s: (x, torch.zeros(1, s + 1), c, s), r"\[B, seq_len\]=\[1, 4\].*got \[1, 5\]"),
        (lambda x, t, c, s: (x, t, [torch.randn(3, 10)], s), r"context\[0\] must be \[L, text_dim=12\]"),
        (lambda x, t, c, s: (x, t, [torch.randn(9, 12)], s), r"9 rows, more than text_len=8"),
        (lambda x, t, c, s: (x, t, c, 0), r"seq_len must be a positive int"),
        (lambda x, t, c, s: ([], t, [], s), r"x is empty"),
    ],
)
def test_forward_rejects_bad_input(small_model, change, message):
    x, t, context = _good_inputs()
    x, t, context, seq_len = change(x, t, context, 4)
    with pytest.raises(ValueError, match=message):
        small_model(x, t, context, seq_len)


def test_forward_rejects_batch_timestep_mismatch(small_model):
    x, _, context = _good_inputs()
    with pytest.raises(ValueError, match=r"t must be \[B\]=\[2\]"):
        small_model(x + x, torch.tensor([5]), context + context, 4)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="model_type must be one of"):
        WanModel(model_type="s2v")
    with pytest.raises(ValueError, match="heads of even size"):
        WanModel(dim=30, num_heads=4)


# ------------------------------------------------------------------------------------------------
# attention


def reference_attention(q, k, v, k_lens=None, q_lens=None, window=(-1, -1)):
    """float64 softmax attention with explicit loops (the meaning, not the speed)."""
    batch, lq, heads, dim = q.shape
    lk = k.shape[1]
    out = torch.zeros(batch, lq, heads, dim, dtype=torch.float64)
    for b in range(batch):
        n_k = lk if k_lens is None else int(k_lens[b])
        n_q = lq if q_lens is None else int(q_lens[b])
        for i in range(n_q):
            aligned = i + n_k - n_q  # flash-attn's bottom-right alignment of the band
            keys = [j for j in range(n_k)
                    if (window[0] < 0 or j >= aligned - window[0]) and (window[1] < 0 or j <= aligned + window[1])]
            scores = torch.einsum("hd,khd->hk", q[b, i].double(), k[b, keys].double()) / math.sqrt(dim)  # [heads, keys]
            out[b, i] = torch.einsum("hk,khd->hd", scores.softmax(-1), v[b, keys].double())
    return out


def test_attention_key_and_query_masks():
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 7, 2, 8), torch.randn(3, 9, 2, 8), torch.randn(3, 9, 2, 8)
    k_lens, q_lens = torch.tensor([9, 4, 1]), torch.tensor([7, 5, 2])
    out = attention(q, k, v, k_lens=k_lens)
    chex.assert_shape(out, (3, 7, 2, 8))
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, k_lens), atol=1e-5, rtol=1e-5)
    out = attention(q, k, v, q_lens=q_lens, k_lens=[9, 4, 1])
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, k_lens, q_lens), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[1, 5:], torch.zeros_like(out[1, 5:]))
    # full lengths are the unmasked call
    torch.testing.assert_close(attention(q, k, v, k_lens=[9, 9, 9]), attention(q, k, v), atol=0, rtol=0)


def test_attention_window():
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 6, 2, 4), torch.randn(2, 6, 2, 4), torch.randn(2, 6, 2, 4)
    k_lens = torch.tensor([6, 5])
    out = attention(q, k, v, k_lens=k_lens, window_size=(2, 1))
    expected = reference_attention(q, k, v, k_lens, window=(2, 1))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    # fewer keys than queries: the band is bottom-right aligned, early queries see no key -> zeros
    k_lens = torch.tensor([6, 2])
    out = attention(q, k, v, k_lens=k_lens, window_size=(1, 0))
    expected = reference_attention(q, k, v, k_lens, window=(1, 0))
    assert torch.equal(out[1, :3], torch.zeros_like(out[1, :3]))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention(q, k, v, causal=True).double(),
                               reference_attention(q, k, v, window=(-1, 0)), atol=1e-5, rtol=1e-5)


class FakeFlashAttn:
    """Stands in for the flash_attn module (absent on CPU) to test the packing around its calls."""

    calls: list[str] = []

    @classmethod
    def flash_attn_func(cls, q, k, v, dropout_p, softmax_scale, causal, window_size, deterministic):
        cls.calls.append("dense")
        window = (window_size[0], 0) if causal else window_size
        return reference_attention(q, k, v, window=window).to(q.dtype)

    @classmethod
    def flash_attn_varlen_func(cls, q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal,
                               window_size, deterministic):
        cls.calls.append("varlen")
        assert q.dim() == 3
        assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
        window = (window_size[0], 0) if causal else window_size
        outs = [reference_attention(q[None, cu_q[b]:cu_q[b + 1]], k[None, cu_k[b]:cu_k[b + 1]],
                                    v[None, cu_k[b]:cu_k[b + 1]], window=window)[0]
                for b in range(len(cu_q) - 1)]
        return torch.cat(outs).to(q.dtype)  # [sum(q_lens), heads, head_dim]


def test_attention_flash_path_packing(monkeypatch):
    from wan.modules import attention as attention_module

    monkeypatch.setattr(attention_module, "_fa2", FakeFlashAttn)
    monkeypatch.setattr(attention_module, "FLASH_ATTN_2_AVAILABLE", True)
    monkeypatch.setattr(attention_module, "FLASH_ATTN_3_AVAILABLE", False)
    monkeypatch.setattr(attention_module, "_flash_usable", lambda q, dtype, dropout: True)
    FakeFlashAttn.calls.clear()
    torch.manual_seed(6)
    q, k, v = torch.randn(3, 7, 2, 8), torch.randn(3, 9, 2, 8), torch.randn(3, 9, 2, 8)
    k_lens, q_lens = torch.tensor([9, 4, 1]), torch.tensor([7, 5, 2])
    for kwargs in (dict(), dict(k_lens=k_lens), dict(k_lens=k_lens, q_lens=q_lens),
                   dict(k_lens=k_lens, window_size=(2, 1))):
        out = attention(q, k, v, **kwargs)
        chex.assert_shape(out, (3, 7, 2, 8))
        expected = reference_attention(q, k, v, kwargs.get("k_lens"), kwargs.get("q_lens"),
                                       window=kwargs.get("window_size", (-1, -1)))
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert FakeFlashAttn.calls == ["dense", "varlen", "varlen", "varlen"]


def test_attention_bad_lengths_and_dtypes():
    q = torch.randn(2, 4, 2, 8)
    with pytest.raises(ValueError, match=r"k_lens must lie in \[1, 4\]"):
        attention(q, q, q, k_lens=[0, 4])
    with pytest.raises(ValueError, match=r"one length per sample, shape \[2\]"):
        attention(q, q, q, k_lens=[4])
    with pytest.raises(ValueError, match=r"\[B, L, heads, head_dim\]"):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        flash_attention(q, q, q, dtype=torch.float32)


def test_attention_precision_follows_autocast():
    torch.manual_seed(4)
    q, k, v = torch.randn(1, 16, 2, 8), torch.randn(1, 16, 2, 8), torch.randn(1, 16, 2, 8)
    exact = attention(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = attention(q, k, v)
    half = flash_attention(q, k, v)
    assert exact.dtype == autocast.dtype == half.dtype == torch.float32  # q's dtype comes back
    bf16 = attention(q.bfloat16(), k.bfloat16(), v.bfloat16()).float()
    assert torch.equal(autocast, bf16) and torch.equal(half, bf16)
    assert 0 < (autocast - exact).abs().max() < 3e-2


# ------------------------------------------------------------------------------------------------
# precision under bfloat16 autocast (CPU emulation of the GPU pipeline)


def test_bf16_autocast_precision_regions():
    model, tensors, meta = golden_model("dit_t2v_multiframe_mixed_b2")
    xs, contexts = case_inputs(tensors)
    dtypes: dict[str, torch.dtype] = {}
    names = ("patch_embedding", "text_embedding", "time_embedding", "time_projection", "blocks.0.self_attn.q",
             "blocks.0.self_attn.norm_q", "blocks.0.ffn", "blocks.0", "blocks.1", "head")
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: dtypes.__setitem__(n, o.dtype))
             for n in names]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(xs, tensors["inputs.t"], contexts, seq_len=meta["call"]["seq_len"])
    finally:
        for h in hooks:
            h.remove()
    assert dtypes == {
        "patch_embedding": torch.bfloat16, "text_embedding": torch.bfloat16, "blocks.0.self_attn.q": torch.bfloat16,
        "blocks.0.ffn": torch.bfloat16,
        # float32 regions: time embedding/projection, gated residual stream, head; RMSNorm weight is fp32
        "time_embedding": torch.float32, "time_projection": torch.float32, "blocks.0.self_attn.norm_q": torch.float32,
        "blocks.0": torch.float32, "blocks.1": torch.float32, "head": torch.float32,
    }
    for actual, expected in zip(out, golden.listed(tensors, "outputs.out")):
        chex.assert_shape(actual, tuple(expected.shape))
        assert actual.dtype == torch.float32
        error = rel_l2(actual, expected)
        assert 1e-5 < error < 2e-2, error  # bf16 matmuls: clearly not fp32, still close


# ------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("case,t_name", GOLDEN_CALLS)
def test_golden_outputs_cuda_float32(case, t_name):
    model, tensors, meta = golden_model(case)
    atol, rtol = golden.tolerance(meta)
    xs, contexts = case_inputs(tensors)
    matmul_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model.cuda()
        with torch.no_grad():
            out = model([x.cuda() for x in xs], tensors[t_name].cuda(), [c.cuda() for c in contexts],
                        seq_len=meta["call"]["seq_len"])
    finally:
        model.cpu()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32
    for i, (actual, want) in enumerate(zip(out, golden.listed(tensors, "outputs.out"))):
        chex.assert_shape(actual, tuple(want.shape))
        golden.assert_close(actual, want, atol, rtol, case + " (cuda fp32)", f"out.{i} (t={t_name.split('.')[-1]})")


@pytest.mark.gpu
def test_bf16_autocast_cuda():
    model, tensors, meta = golden_model("dit_t2v_multiframe_mixed_b2")
    xs, contexts = case_inputs(tensors)
    try:
        model.cuda()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = model([x.cuda() for x in xs], tensors["inputs.t"].cuda(), [c.cuda() for c in contexts],
                        seq_len=meta["call"]["seq_len"])
    finally:
        model.cpu()
    for actual, expected in zip(out, golden.listed(tensors, "outputs.out")):
        assert actual.dtype == torch.float32
        assert rel_l2(actual.cpu(), expected) < 2e-2


@pytest.mark.gpu
def test_attention_cuda_half_matches_reference():
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 40, 4, 64, device="cuda") for _ in range(3))
    k_lens = torch.tensor([40, 23])
    rounded = [x.cpu().bfloat16().float() for x in (q, k, v)]
    out = flash_attention(q, k, v, k_lens=k_lens)  # per-sample unmasked calls (or flash-attn varlen)
    chex.assert_shape(out, (2, 40, 4, 64))
    assert rel_l2(out.cpu(), reference_attention(*rounded, k_lens)) < 1e-2
    out = flash_attention(q, k, v, k_lens=k_lens, window_size=(5, 3))  # masked SDPA (or flash-attn)
    assert rel_l2(out.cpu(), reference_attention(*rounded, k_lens, window=(5, 3))) < 1e-2
    exact = attention(q, k, v, k_lens=k_lens)  # float32 stays float32 on CUDA
    assert exact.dtype == torch.float32
    assert rel_l2(exact.cpu(), reference_attention(q.cpu(), k.cpu(), v.cpu(), k_lens)) < 1e-5


# ------------------------------------------------------------------------------------------------
# torch.compile of the blocks (wan.compile)


def _tiny_experts(seed: int = 3) -> list[WanModel]:
    from wan.synthetic import TINY

    torch.manual_seed(seed)
    return [TINY["dit"].build().eval().requires_grad_(False) for _ in range(2)]


@pytest.mark.parametrize("fp8", [False, True], ids=["plain", "fp8"])
def test_compiled_blocks_trace_to_one_graph_without_breaks(fp8):
    """Every block of both experts traces to one graph, with no graph break when every sample fills
    seq_len (the distillation case: no key mask); a padded batch runs its masked attention eagerly
    (the `torch.compiler.disable`d length handling, nothing else breaks). Outputs equal eager. The
    same with FP8 linears (`--teacher.fp8`: activation scaling and `torch._scaled_mm` in the graph)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from wan.compile import compile_dit
    from wan.fp8 import quantize_dit

    experts = _tiny_experts()
    for model in experts if fp8 else ():
        quantize_dit(model)
    gen = torch.Generator().manual_seed(0)
    x = [torch.randn(16, 1, 8, 8, generator=gen) for _ in range(2)]
    ctx = [torch.randn(5, 4096, generator=gen), torch.randn(9, 4096, generator=gen)]
    t = torch.tensor([900.0, 300.0])
    with torch.no_grad():
        eager = [(m(x, t, ctx, seq_len=16), m(x, t, ctx, seq_len=20)) for m in experts]
    torch._dynamo.reset()
    counters.clear()
    try:
        for model in experts:
            compile_dit(model, backend="aot_eager")
        with torch.no_grad():
            full = [m(x, t, ctx, seq_len=16) for m in experts]
            assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
            assert not counters["graph_break"], dict(counters["graph_break"])
            padded = [m(x, t, ctx, seq_len=20) for m in experts]
        assert counters["graph_break"], "the masked path should leave the graph"
        assert all("_attention_with_lengths" in reason for reason in counters["graph_break"]), dict(counters["graph_break"])
        for (want_full, want_padded), got_full, got_padded in zip(eager, full, padded):
            for want, got in zip(want_full + want_padded, got_full + got_padded):
                chex.assert_shape(got, want.shape)
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()


def test_compile_setting():
    from wan.compile import resolve

    assert resolve("auto", torch.device("cuda", 0)) and not resolve("auto", torch.device("cpu"))
    assert resolve("on", torch.device("cpu")) and not resolve("off", torch.device("cuda", 0))
    with pytest.raises(ValueError, match="one of"):
        resolve("yes", torch.device("cpu"))


@pytest.mark.gpu
def test_compiled_bf16_matches_eager_cuda():
    """Inductor's fused kernels compute what eager does under bf16 autocast (within bf16 rounding),
    and both stay as close to upstream's float32 outputs as the eager bf16 test requires."""
    from wan.compile import compile_dit

    _, tensors, meta = golden_model("dit_t2v_1frame_b2")
    model = WanModel(**meta["constructor"]).eval().requires_grad_(False)
    model.load_state_dict(golden.weights(tensors), strict=True)
    model.cuda()
    xs, contexts = case_inputs(tensors)
    args = ([x.cuda() for x in xs], tensors["inputs.t"].cuda(), [c.cuda() for c in contexts])
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            eager = model(*args, seq_len=meta["call"]["seq_len"])
            compile_dit(model)
            compiled = model(*args, seq_len=meta["call"]["seq_len"])
    finally:
        torch._dynamo.reset()
    for e, c, expected in zip(eager, compiled, golden.listed(tensors, "outputs.out")):
        chex.assert_shape(c, e.shape)
        assert rel_l2(c.cpu(), e.cpu()) < 1e-2
        assert rel_l2(c.cpu(), expected) < 2e-2
