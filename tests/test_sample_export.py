"""Using a trained run: `distill.sample` (images from the EMA student, only umT5 + VAE of the teacher),
`distill.export` / `student_jax.export` (a bitwise round trip, loadable without torch), and the
`wan-distill` console entry with its subcommands' help. One 4-step run on the fast random teacher."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from distill import cli, config as config_lib
from distill import export as export_cli
from distill import sample as sample_cli
from distill.loop import train
from student_jax.export import ExportError, flatten_params, load_student, read_export_config
from student_jax.model import Student, stack_blocks
from student_jax.projection import to_teacher
from student_jax.sampler import sample
from tests.tiny_random_release import EVAL_PROMPTS, PROMPTS, tiny_flags

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
# Not a training caption, so not in the embedding cache: umT5 must encode it (its words are in the
# tiny tokenizer's vocabulary, which is built from the training and held-out captions).
NEW_PROMPT = "A red cat on the moon at night."


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, final state) of a 4-step tiny run with its checkpoint at step 4."""
    root = tmp_path_factory.mktemp("sample_export")
    cache = root / "cache"
    cfg = config_lib.parse(["--workdir", str(root / "run"), "--data.cache_dir", str(cache), *tiny_flags(cache),
                            "--train.steps", str(STEPS), "--train.eval_every", str(STEPS), "--train.sample_every", "0",
                            "--ckpt.every", str(STEPS), "--ckpt.no_async_save", "--train.log_every", "1",
                            "--student.scan_blocks"])  # the scanned layout (every preset but tiny uses it)
    summary = train(cfg)
    assert summary["final_step"] == STEPS
    return root / "run", summary["state"]


def _host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _batch(cfg, text_len: int = 5):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, cfg.latent_channels, 8, 8)), jnp.float32)  # [B, C, h, w]
    t = jnp.asarray([10.0, 500.0, 990.0])
    text = jnp.asarray(rng.standard_normal((3, text_len, cfg.text_dim)), jnp.float32)  # [B, L, 4096]
    mask = jnp.asarray(np.arange(text_len)[None, :] < np.array([[5], [3], [1]]))  # [B, L]
    return x, t, text, mask


# ---------------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "student"
    assert export_cli.main(["--workdir", str(trained[0]), "--out", str(out)]) == 0
    return out


def test_export_round_trip_is_the_checkpoints_ema_bitwise(trained, exported):
    workdir, state = trained
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors"]
    model, params, cfg = load_student(exported)
    run_cfg = config_lib.from_dict(json.loads((workdir / "config.json").read_text()))
    assert cfg == run_cfg.student and cfg.scan_blocks  # stacked blocks, in the run and loaded
    loaded, ema = flatten_params(params), flatten_params(state.ema)
    assert list(loaded) == list(ema) and "blocks.self_attn.q.kernel" in loaded
    # the file names the blocks one by one, whatever the layout (exports from before scan_blocks read the same)
    stored = list(load_file(str(exported / "model.safetensors")))
    assert "blocks_0.self_attn.q.kernel" in stored and f"blocks_{cfg.depth - 1}.mlp.fc2.bias" in stored
    assert not any(name.startswith("blocks.") for name in stored)
    for name in ema:
        assert loaded[name].dtype == ema[name].dtype == np.float32, name
        assert loaded[name].shape == ema[name].shape, name
        np.testing.assert_array_equal(loaded[name], ema[name], err_msg=name)
    # the EMA, not the raw parameters (after 4 steps at ema_decay 0.99 they differ)
    raw = flatten_params(state.params)
    assert any(not np.array_equal(v, raw[k]) for k, v in ema.items())

    x, t, text, mask = _batch(cfg)
    # one compiled program for both (op-by-op eager applies compile every primitive: slow on 2 cores)
    reference = jax.jit(Student(run_cfg.student).apply)({"params": _host(state.ema)}, x, t, text, mask)
    out = jax.jit(model.apply)({"params": params}, x, t, text, mask)
    assert out.shape == reference.shape == x.shape
    np.testing.assert_array_equal(np.asarray(out), np.asarray(reference))

    info = read_export_config(exported)
    sampling, teacher = info["sampling"], info["teacher"]
    assert sampling["latent_channels"] == cfg.latent_channels and sampling["patch_size"] == cfg.patch_size
    assert sampling["shift"] > 0 and sampling["text_len"] >= 1 and sampling["vae_stride"] == 8
    assert (sampling["height"], sampling["width"]) == (run_cfg.data.height, run_cfg.data.width)
    assert teacher["path"] == str(Path(run_cfg.teacher.path).resolve()) and len(teacher["id"]) == 16
    assert teacher["fp8"] is False and "fp8_recipe" in teacher and teacher["fp8_recipe"] is None  # a bf16 teacher
    assert info["source"] == {"workdir": str(workdir.resolve()), "step": STEPS, "params": "ema",
                              "ema_decay": run_cfg.optim.ema_decay}
    assert info["param_count"] == sum(v.size for v in ema.values())


def test_export_loads_into_either_block_layout(exported, tmp_path):
    """The same weights file loads unrolled (scan_blocks false), or without the field at all (an export
    from before it existed: the default, scanned); both give the same parameters and velocities."""
    model, params, cfg = load_student(exported)
    x, t, text, mask = _batch(cfg)
    reference = jax.jit(model.apply)({"params": params}, x, t, text, mask)
    weights = flatten_params(params)
    for name, edit in (("unrolled", lambda student: {**student, "scan_blocks": False}),
                       ("before_scan_blocks", lambda student: {k: v for k, v in student.items() if k != "scan_blocks"})):
        folder = tmp_path / name
        shutil.copytree(exported, folder)
        config = json.loads((folder / "config.json").read_text())
        config["student"] = edit(config["student"])
        (folder / "config.json").write_text(json.dumps(config))
        other_model, other_params, other_cfg = load_student(folder)
        assert other_cfg.scan_blocks == (name != "unrolled")
        assert ("blocks" in other_params) == other_cfg.scan_blocks
        restacked = other_params if other_cfg.scan_blocks else stack_blocks(other_params, cfg.depth)
        for key, value in flatten_params(restacked).items():  # bitwise the same weights
            np.testing.assert_array_equal(value, weights[key], err_msg=f"{name}: {key}")
        out = jax.jit(other_model.apply)({"params": other_params}, x, t, text, mask)
        np.testing.assert_allclose(np.asarray(out), np.asarray(reference), atol=1e-6, rtol=1e-5, err_msg=name)


def test_load_student_needs_neither_torch_nor_distill(exported):
    """A fresh interpreter where importing torch, distill or bridge fails still loads and runs the student."""
    code = f"""
import sys
for name in ("torch", "distill", "bridge"):
    sys.modules[name] = None  # any import of them now raises ImportError
import jax.numpy as jnp
from student_jax.export import load_student
model, params, cfg = load_student({str(exported)!r})
v = model.apply({{"params": params}}, jnp.ones((1, cfg.latent_channels, 8, 8)), jnp.full((1,), 500.0),
                jnp.ones((1, 4, cfg.text_dim)), jnp.ones((1, 4), bool))
blocked = [m for m in sys.modules if m.split(".")[0] in ("torch", "distill", "bridge") and sys.modules[m] is not None]
assert not blocked, blocked
print("ok", v.shape)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok (1, 16, 8, 8)" in done.stdout


def test_load_student_names_what_does_not_fit(exported, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    config = json.loads((broken / "config.json").read_text())
    config["student"]["hidden_size"] = 2 * config["student"]["hidden_size"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"does not fit .* of another shape \(e.g. blocks_0"):
        load_student(broken)
    (broken / "config.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ExportError, match="not a wan-distill-student config"):
        load_student(broken)


# ---------------------------------------------------------------------------------------------- sample


def test_sampler_draws_the_ema_student_from_seeded_noise(trained, monkeypatch):
    """The sampler's latents are `student_jax.sampler.sample` of the EMA on the seeds' noise; umT5
    runs only for a prompt the cache lacks, gives the cached embeddings for one it holds, and no DiT
    expert is ever loaded."""
    from wan.modules.model import WanModel

    def no_expert(*args, **kwargs):
        raise AssertionError("distill.sample loaded a DiT expert")

    monkeypatch.setattr(WanModel, "from_pretrained", no_expert)
    workdir, state = trained
    sampler = sample_cli.RunSampler(workdir)
    assert sampler.step == STEPS
    cached = PROMPTS.read_text().splitlines()[0].strip()
    contexts = sampler.encode([cached, cached])
    assert sampler.encoder_loads == 0  # every training caption is in the run's cache
    fresh = sampler._load_text_encoder()([cached], torch.device("cpu"))[0]
    # built as the pipeline builds it: the same dtype and shape, and the same numbers up to bf16 rounding
    # (bitwise only for the same batch-mates: the data stage encodes 8 prompts at a time, and on some
    # CPUs oneDNN's bf16 kernels round differently for another batch shape)
    assert fresh.dtype == contexts[0].dtype and fresh.shape == contexts[0].shape
    torch.testing.assert_close(fresh.float(), contexts[0].float(), rtol=2e-2, atol=2e-2)
    contexts = sampler.encode([cached, NEW_PROMPT])
    assert sampler.encoder_loads == 2 and contexts[1].shape[-1] == 4096

    seeds = [3, 7]
    latents = sampler.latents(contexts, seeds, steps=2, solver="euler", batch=3)  # 4 rows: batches of 3 + 1 padded
    cfg = sampler.cfg
    h, w = cfg.data.height // 8, cfg.data.width // 8
    assert latents.shape == (2, 2, 16, h, w)
    from distill.data import pad_text

    text, mask = pad_text(contexts, sampler.wan_config.text_len)
    for s, seed in enumerate(seeds):
        noise = np.stack([sample_cli.seed_noise(seed, cfg.student.latent_channels, (h, w))] * 2)
        direct = to_teacher(sample(state.ema, Student(cfg.student), jnp.asarray(noise), jnp.asarray(text),
                                   jnp.asarray(mask), steps=2, shift=float(sampler.wan_config.sample_shift),
                                   solver="euler"), cfg.student)
        np.testing.assert_allclose(latents[:, s], np.asarray(direct), rtol=1e-5, atol=1e-5)
    assert not np.allclose(latents[:, 0], latents[:, 1])  # seeds differ
    images = sampler.decode(latents)
    assert images.shape == (2, 2, cfg.data.height, cfg.data.width, 3) and images.dtype == np.uint8


def test_sample_command_writes_images_and_grids(trained, tmp_path, capsys):
    workdir, _ = trained
    one = tmp_path / "one.png"
    assert sample_cli.main(["--workdir", str(workdir), "--prompt", NEW_PROMPT, "--steps", "2", "--out", str(one)]) == 0
    assert Image.open(one).size == (64, 64)
    assert f"wrote {one}" in capsys.readouterr().out

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(EVAL_PROMPTS.read_text().splitlines()[:2]) + "\n\n")
    args = ["--workdir", str(workdir), "--prompts", str(prompts), "--steps", "2", "--seed", "5", "--num-seeds", "2"]
    assert sample_cli.main(args + ["--out", str(tmp_path / "each.png")]) == 0
    written = sorted(p.name for p in tmp_path.glob("each_*.png"))
    assert written == ["each_p000_s5.png", "each_p000_s6.png", "each_p001_s5.png", "each_p001_s6.png"]
    assert sample_cli.main(args + ["--grid", "--solver", "euler", "--out", str(tmp_path / "grid.png")]) == 0
    pad = 2  # distill.metrics.save_grid: 2 rows (prompts) x 2 columns (seeds) of 64 x 64
    assert Image.open(tmp_path / "grid.png").size == (2 * (64 + pad) + pad, 2 * (64 + pad) + pad)
    # the same seed and prompt give the same image, in the grid as alone
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert sample_cli.main(args[:2] + ["--prompt", EVAL_PROMPTS.read_text().splitlines()[1].strip(), "--steps", "2",
                                       "--seed", "6", "--solver", "euler", "--out", str(tmp_path / "alone.png")]) == 0
    y = x = pad + (64 + pad)  # row 1 (the second prompt), column 1 (seed 6)
    np.testing.assert_array_equal(grid[y:y + 64, x:x + 64], np.asarray(Image.open(tmp_path / "alone.png")))


def _error(capsys, fn, argv, lines: int = 1) -> str:
    """`fn(argv)` reports a user error: status 2, `error: ...` on stderr in `lines` lines, no traceback."""
    capsys.readouterr()
    assert fn(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") < lines, err
    return err


def test_sample_and_export_errors_are_one_line(trained, tmp_path, capsys):
    workdir, _ = trained
    empty = tmp_path / "empty_run"
    empty.mkdir()
    shutil.copy(workdir / "config.json", empty / "config.json")
    ok = ["--workdir", str(workdir), "--out", str(tmp_path / "x.png")]
    sample_error = functools.partial(_error, capsys, sample_cli.main)
    assert "no checkpoint in" in sample_error(["--workdir", str(empty), "--prompt", "a cat"])
    assert not (empty / "checkpoints").exists()  # looking did not create it
    assert "no checkpoint in" in _error(capsys, export_cli.main, ["--workdir", str(empty), "--out", str(tmp_path / "e")])
    assert "not found" in sample_error(["--workdir", str(tmp_path), "--prompt", "a cat"])
    assert "--prompt is empty" in sample_error(ok + ["--prompt", "  "])
    assert "no prompt" in sample_error(ok)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n")
    assert "holds no prompts" in sample_error(ok + ["--prompts", str(blank)], lines=2)  # distill.data's what + hint
    assert "--steps must be >= 1, got 0" in sample_error(ok + ["--prompt", "a cat", "--steps", "0"])
    assert "invalid int value: 'four'" in sample_error(ok + ["--prompt", "a cat", "--steps", "four"])
    assert "--num-seeds must be >= 1" in sample_error(ok + ["--prompt", "a cat", "--num-seeds", "0"])
    assert "multiple of 16" in sample_error(ok + ["--prompt", "a cat", "--height", "40"])
    assert "must name a .png" in sample_error(["--workdir", str(workdir), "--prompt", "a cat", "--out", "x.jpg"])


# ---------------------------------------------------------------------------------------------- cli


@pytest.mark.parametrize("command, options", [
    (None, ["train", "sample", "evaluate", "export"]),
    ("train", ["--workdir", "--train.steps", "--student.hidden_size", "--preset"]),
    ("sample", ["--workdir", "--prompt", "--prompts", "--steps", "--seed", "--num-seeds", "--grid", "--solver", "--out"]),
    ("evaluate", ["--workdir", "--eval.student_steps"]),
    ("export", ["--workdir", "--out", "model.safetensors"]),
])
def test_cli_help_names_the_options(command, options, capsys):
    assert cli.main(["--help"] if command is None else [command, "--help"]) == 0
    text = capsys.readouterr().out
    for option in options:
        assert option in text, (command, option)


def test_cli_rejects_an_unknown_command_and_is_registered(capsys):
    assert cli.main(["smaple"]) == 2
    assert cli.main([]) == 2
    assert "did you mean 'sample'" in capsys.readouterr().err
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"wan-distill": "distill.cli:main"}
    for target, _ in cli.COMMANDS.values():
        module, function = target.split(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function)), target


def test_export_names_the_fp8_recipe(tmp_path):
    """An export records which FP8 recipe made its teacher's targets (each gives other numbers)."""
    cfg = config_lib.parse(["--data.cache_dir", str(tmp_path), "--teacher.fp8", "--teacher.no_fp8_fast_accum"])
    _, teacher = export_cli.release_info(cfg, export_cli.teacher_folder(cfg))
    assert teacher["fp8"] is True and teacher["fp8_recipe"] == {"scaling": "row", "fast_accum": False}
