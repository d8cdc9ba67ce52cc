"""The image-folder data source (`--data.source images --data.image_dir DIR`) checked on its contents.

The data stage runs in-process on the shipped toy teacher (its VAE is trained on toy-world scenes,
so a decode of a latent is a faithful picture of what was encoded). Its cached x0 latents must
equal the VAE encoding of each image computed here independently, row by row in file order with the
right caption; images that need a centre crop (wider or taller than the target) must give exactly
the latent of their centre; an image twice the size must be scaled down (cover), not cropped; the
latents must decode back to the images; and a black image must give a latent of its own.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from distill import config as config_lib
from distill import toyworld
from distill.loop import train
from wan.modules.vae2_1 import Wan2_1_VAE

SIZE = 64  # --data.height / --data.width defaults
BORDER = (255, 0, 255)  # magenta: never a toy-world colour, so any of it left after cropping shows


def _pixels(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> the VAE's input video [3, 1, H, W] in [-1, 1]."""
    return torch.from_numpy(image.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[:, None]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two [-1, 1] images (peak-to-peak 2)."""
    return float(10 * torch.log10(4.0 / ((a - b) ** 2).mean()))


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """The image folder, the data stage's cached rows, and the teacher's VAE loaded separately."""
    root = tmp_path_factory.mktemp("image_source")
    folder = root / "images"
    folder.mkdir()
    scenes = toyworld.scenes("train", 5, seed=11)
    files = {}  # file name -> (caption, the 64 x 64 image the latent must show)

    def add(name, image, caption, expected):
        Image.fromarray(image).save(folder / name)
        (folder / name).with_suffix(".txt").write_text(caption + "\n")
        files[name] = (caption, expected)

    for i in range(2):  # already the target size: used as they are
        image = toyworld.render(scenes[i], SIZE)
        add(f"a{i}_exact.png", image, toyworld.caption(scenes[i]), image)
    centre = toyworld.render(scenes[2], SIZE)
    wide = np.empty((SIZE, SIZE + 32, 3), np.uint8)  # 64 x 96: covers at scale 1, then 16 px cut on each side
    wide[:] = BORDER
    wide[:, 16:16 + SIZE] = centre
    add("b_wide.png", wide, toyworld.caption(scenes[2]), centre)
    centre = toyworld.render(scenes[3], SIZE)
    tall = np.empty((SIZE + 32, SIZE, 3), np.uint8)  # 96 x 64: the crop must cut rows, not columns
    tall[:] = BORDER
    tall[16:16 + SIZE] = centre
    add("c_tall.png", tall, toyworld.caption(scenes[3]), centre)
    small = toyworld.render(scenes[4], SIZE)
    double = small.repeat(2, axis=0).repeat(2, axis=1)  # 128 x 128: must be scaled down to 64, not cropped
    add("d_double.png", double, toyworld.caption(scenes[4]), small)
    add("e_black.png", np.zeros((SIZE, SIZE, 3), np.uint8), "a black background", np.zeros((SIZE, SIZE, 3), np.uint8))

    eval_prompts = root / "eval.txt"
    eval_prompts.write_text(toyworld.caption(scenes[0]) + "\n")
    cache = root / "cache"
    summary = train(config_lib.parse([
        "--workdir", str(root / "run"), "--data.cache_dir", str(cache), "--stage", "data",
        "--data.source", "images", "--data.image_dir", str(folder), "--data.eval_prompts", str(eval_prompts),
        "--data.gen_steps", "2", "--data.samples_per_prompt", "1", "--data.shard_size", "4",
    ]))
    from safetensors.torch import load_file

    dataset = next((cache / "data").glob("images_*"))
    assert summary["train_data"] == str(dataset)
    shards = sorted((dataset / "shards").glob("*.safetensors"))
    assert len(shards) == 2  # 6 images, shard size 4
    rows = [load_file(str(s)) for s in shards]
    cached = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    release = next(cache.glob("toy_release_*"))
    vae = Wan2_1_VAE(vae_pth=str(release / "Wan2.1_VAE.pth"), device="cpu")
    return files, cached, vae


def test_rows_follow_the_files_and_their_captions(staged):
    files, cached, _ = staged
    names = sorted(files)
    captions = sorted({caption for caption, _ in files.values()})
    assert cached["latents"].shape == (len(names), 16, SIZE // 8, SIZE // 8)
    assert cached["latents"].dtype == torch.float32
    assert cached["sample_index"].tolist() == list(range(len(names)))
    assert [captions[i] for i in cached["prompt_index"].tolist()] == [files[n][0] for n in names]


def test_latents_equal_an_independent_vae_encoding(staged):
    """Exact-size files as they are, the wide / tall ones by their centre: the same numbers."""
    files, cached, vae = staged
    for row, name in enumerate(sorted(files)):
        if name.startswith("d_"):
            continue  # resampled: checked below
        _, expected_image = files[name]
        with torch.no_grad():
            expected = vae.encode([_pixels(expected_image)])[0][:, 0]  # [16, h, w]
        got = cached["latents"][row]
        assert got.shape == expected.shape
        err = (got - expected).abs().max().item()
        assert err <= 1e-5, f"{name}: cached latent differs from the VAE encoding of its image by {err:.3g}"


def test_a_larger_image_is_scaled_to_cover_not_cropped(staged):
    files, cached, vae = staged
    row = sorted(files).index("d_double.png")
    small = files["d_double.png"][1]
    double = small.repeat(2, axis=0).repeat(2, axis=1)
    cropped_only = double[SIZE // 2:SIZE // 2 + SIZE, SIZE // 2:SIZE // 2 + SIZE]  # what a crop without resize keeps
    with torch.no_grad():
        decoded = vae.decode([cached["latents"][row][:, None]])[0]
    assert _psnr(decoded, _pixels(small)) > _psnr(decoded, _pixels(cropped_only)) + 5, (
        "the 128 px image was cropped instead of scaled down")


def test_latents_decode_back_to_the_images(staged):
    files, cached, vae = staged
    for row, name in enumerate(sorted(files)):
        with torch.no_grad():
            decoded = vae.decode([cached["latents"][row][:, None]])[0]  # [3, 1, 64, 64]
        expected = _pixels(files[name][1])
        assert decoded.shape == expected.shape
        psnr = _psnr(decoded, expected)
        # the toy VAE reconstructs its world at ~30 dB; a wrong image, crop or channel order is far below
        assert psnr >= 22.0, f"{name}: decoded latent vs its image: {psnr:.1f} dB"
        if name.startswith(("b_", "c_")):
            magenta = (decoded[0] > 0.6) & (decoded[1] < -0.6) & (decoded[2] > 0.6)
            assert not magenta.any(), f"{name}: the border survived the centre crop"


def test_a_black_image_has_a_latent_of_its_own(staged):
    files, cached, vae = staged
    names = sorted(files)
    latents = cached["latents"]
    black = latents[names.index("e_black.png")]
    for row, name in enumerate(names):
        if name != "e_black.png":
            gap = (latents[row] - black).abs().mean().item()
            assert gap > 0.1, f"{name}: its latent is close to the black image's (mean abs gap {gap:.3g})"
    with torch.no_grad():
        decoded = vae.decode([black[:, None]])[0]
    # (0, 0, 0) is darker than the toy world's black background (15, 15, 15 = -0.88), which is as dark
    # as the toy VAE paints
    assert decoded.mean().item() < -0.8, "the black image's latent does not decode to a black image"
