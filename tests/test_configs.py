"""The Wan2.2 T2V-A14B task config against upstream's, field by field.

Compares (1) the EasyDict `wan.configs.t2v_A14B` (what a real release folder, which carries no task
JSON, runs with), (2) `load_config` of upstream's config written as JSON, and (3) the task JSON this
project writes for a release (`wan.synthetic.write_task_config`), read back raw and through
`load_config`, against the checkpoint manifest `config_t2v_A14B.json` (upstream's EasyDict with
torch dtypes as strings and tuples as lists). The sizes the JSON's `extensions` block records and
the experts' `config.json` are checked against the other manifests. The manifests come from
../shared/golden (or $WAN_GOLDEN_DIR), else from the copy in tests/golden_subset/.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests import golden
from wan.configs import WAN_CONFIGS, dit_config, load_config, parse_dtype, t5_config, vae_config
from wan.configs.wan_t2v_A14B import t2v_A14B
from wan.modules.model import DiTConfig
from wan.modules.t5 import T5Config
from wan.modules.vae2_1 import LATENTS_MEAN, LATENTS_STD, VAEConfig
from wan.synthetic import write_task_config

CONFIG_MANIFEST = "config_t2v_A14B.json"
DTYPE_FIELDS = ("t5_dtype", "param_dtype")


def _upstream() -> dict:
    """Upstream's fields (the manifest's own `_source` note dropped)."""
    return {k: v for k, v in golden.manifest(CONFIG_MANIFEST).items() if k != "_source"}


def _as_json(value):
    """A config value the way the manifest writes it: torch dtypes as 'torch.<name>', tuples as lists."""
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_as_json(v) for v in value]
    return value


def _same(a, b) -> bool:
    """Equal values of the same JSON type (12 != 12.0 here: a shift or a scale must stay a float)."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _assert_fields_equal(ours: dict, upstream: dict, what: str, skip=()) -> None:
    ours = {k: _as_json(v) for k, v in ours.items() if k not in skip}
    upstream = {k: v for k, v in upstream.items() if k not in skip}
    assert sorted(ours) == sorted(upstream), (
        f"{what}: fields only ours {sorted(set(ours) - set(upstream))}, only upstream's {sorted(set(upstream) - set(ours))}")
    wrong = {k: (ours[k], upstream[k]) for k in upstream if not _same(ours[k], upstream[k])}
    assert not wrong, f"{what}: fields differing from upstream's t2v-A14B config (ours, upstream): {wrong}"


def test_easydict_config_matches_upstream():
    upstream = _upstream()
    _assert_fields_equal(dict(t2v_A14B), upstream, "wan.configs.t2v_A14B")
    # the dtypes are real torch dtypes, not strings, in the EasyDict
    assert t2v_A14B.t5_dtype is torch.bfloat16 and t2v_A14B.param_dtype is torch.bfloat16
    # a release folder without a task JSON runs with exactly this object
    assert WAN_CONFIGS["t2v-A14B"] is t2v_A14B
    # the semantics the numbers carry, spelled out where a swap would still type-check
    assert t2v_A14B.sample_guide_scale == (3.0, 4.0), "order: (low-noise expert, high-noise expert)"
    assert t2v_A14B.boundary * t2v_A14B.num_train_timesteps == 875.0


def _manifest_file(name: str):
    """The manifest's path, looked up like tests/golden.py does (golden folder, then the subset)."""
    for folder in (golden.golden_dir(), golden.SUBSET):
        if (folder / "checkpoint_manifests" / name).is_file():
            return folder / "checkpoint_manifests" / name
    pytest.skip(f"checkpoint manifest {name!r} not found in {golden.golden_dir() / 'checkpoint_manifests'} "
                f"(set ${golden.GOLDEN_ENV})")


def test_load_config_of_upstream_json_equals_easydict():
    loaded = load_config(_manifest_file(CONFIG_MANIFEST))  # dtype strings parsed, lists made tuples
    assert set(loaded) == set(t2v_A14B)
    wrong = {k: (loaded[k], v) for k, v in t2v_A14B.items() if type(loaded[k]) is not type(v) or loaded[k] != v}
    assert not wrong, f"load_config(upstream json) differs from t2v_A14B (loaded, ours): {wrong}"


@pytest.fixture
def written(tmp_path):
    """The task JSON the project writes for a release of the real sizes."""
    path = write_task_config(tmp_path, dit_config(t2v_A14B), T5Config(), VAEConfig())
    return path, json.loads(path.read_text(encoding="utf-8"))


def test_written_task_json_matches_upstream(written):
    path, raw = written
    upstream = _upstream()
    # __name__ names the synthetic release; extensions are ours (checked below); dtypes are written
    # 'bfloat16' where upstream's manifest says 'torch.bfloat16': compare them as dtypes
    for key in DTYPE_FIELDS:
        assert parse_dtype(raw[key]) is parse_dtype(upstream[key]) is torch.bfloat16, (key, raw[key])
    _assert_fields_equal(raw, upstream, f"{path.name} as written", skip=("__name__", "extensions", *DTYPE_FIELDS))
    assert raw["sample_neg_prompt"] == upstream["sample_neg_prompt"]  # written with ensure_ascii=False, read back
    loaded = load_config(path)
    _assert_fields_equal(dict(loaded), upstream, f"load_config({path.name})", skip=("__name__", "extensions"))


def test_written_extensions_match_the_checkpoint_manifests(written):
    path, _ = written
    loaded = load_config(path)
    t5_manifest = golden.manifest("umt5_xxl_encoder.json")["constructor"]
    assert dataclasses.asdict(t5_config(loaded)) == t5_manifest
    vae_manifest = golden.manifest("wan2_1_vae.json")
    vae = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(vae_config(loaded)).items()}
    assert vae == vae_manifest["constructor"]
    assert list(LATENTS_MEAN) == vae_manifest["latents_mean"] and list(LATENTS_STD) == vae_manifest["latents_std"]
    dit = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(dit_config(loaded)).items()}
    assert dit == golden.manifest("wanmodel_t2v_A14B.json")["constructor"]


def test_expert_config_json_matches_upstream(tmp_path):
    """What high_noise_model/ and low_noise_model/config.json hold, and reading it back."""
    sample = golden.manifest("sample_subfolder_config_t2v_A14B.json")
    ours = dit_config(t2v_A14B).config_json()
    _assert_fields_equal(ours, sample, "expert config.json")
    (tmp_path / "config.json").write_text(json.dumps(sample))
    assert DiTConfig.from_folder(tmp_path) == dit_config(t2v_A14B)
