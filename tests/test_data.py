"""Data: ImageFolder listing, seeded class-balanced subsets, ADM crop, bad files, pixels and VAE latents."""
from __future__ import annotations

import importlib.util
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import IMAGENETTE
from repa_probe.data import (ImageDataset, center_crop_arr, list_images, load_vae, make_loader, select_subset,
                             to_model_space, vae_fingerprint)
from repa_probe.errors import UserError


# The latent path needs the optional extra `latent` (diffusers); CI must install it for these to run.
needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                     reason="diffusers not installed: pip install 'repa-probe[latent]'")


def small_tree(src: Path, dst: Path, classes=("airplane", "cat"), per_class: int = 3) -> Path:
    """A copy of a few real images per class: an ImageFolder tree we may damage."""
    for c in classes:
        (dst / c).mkdir(parents=True)
        for f in sorted((src / c).iterdir())[:per_class]:
            shutil.copy(f, dst / c / f.name)
    return dst


def save_tiny_vae(path: Path, seed: int = 0) -> Path:
    """A randomly initialised 8×-downsampling AutoencoderKL (SD-VAE's shape, tiny widths), saved locally."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 8, 8), norm_num_groups=4, sample_size=64)
    vae.save_pretrained(path)
    return path


def test_listing_matches_torchvision_imagefolder_order(cifar_dir):
    paths, labels, classes = list_images(cifar_dir / "test")
    reference = torchvision.datasets.ImageFolder(str(cifar_dir / "test"))
    assert classes == reference.classes
    assert [str(p) for p in paths] == [p for p, _ in reference.samples]
    assert labels == reference.targets


def test_subset_is_class_balanced_deterministic_and_nested():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 5)
    a = select_subset(labels, 30, seed=1)
    counts = Counter(labels[a].tolist())
    assert len(a) == len(set(a.tolist())) == 30
    assert counts[2] == 5                                   # the small class gives all it has
    assert abs(counts[0] - counts[1]) <= 1                  # the others share the rest evenly
    assert np.array_equal(a, select_subset(labels, 30, seed=1))
    assert not np.array_equal(a, select_subset(labels, 30, seed=2))
    assert set(select_subset(labels, 12, seed=1)) <= set(a.tolist())
    even = select_subset(labels, 9, seed=3)
    assert Counter(labels[even].tolist()) == {0: 3, 1: 3, 2: 3}
    assert np.array_equal(select_subset(labels, None, seed=0), np.arange(len(labels)))
    with pytest.raises(UserError, match="--n 86"):
        select_subset(labels, 86, seed=0)


def test_center_crop_follows_adm_box_halving_then_bicubic_then_centre(cifar_dir):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))   # 300 wide, 200 high
    # short side 200 ≥ 2·64 → BOX-halve to 150×100; 100 < 128 → bicubic to 96×64; centre crop x 16..80
    expected = image.resize((150, 100), Image.BOX).resize((96, 64), Image.BICUBIC).crop((16, 0, 80, 64))
    assert np.array_equal(np.asarray(center_crop_arr(image, 64)), np.asarray(expected))
    cifar = Image.open(cifar_dir / "test" / "cat" / "0000.jpg").convert("RGB")
    assert np.array_equal(np.asarray(center_crop_arr(cifar, 32)), np.asarray(cifar))   # already 32: untouched


def test_items_are_uint8_rgb_with_label_and_stable_id(cifar_dir):
    indices = select_subset(list_images(cifar_dir / "test")[1], 20, seed=0)
    dataset = ImageDataset(cifar_dir / "test", 32, indices)
    x, label, image_id = dataset[3]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
    assert image_id == indices[3] and label == dataset.labels[3]
    assert dataset.paths[image_id].parent.name == dataset.classes[label]
    reference = np.asarray(Image.open(dataset.paths[image_id]).convert("RGB"))
    assert np.array_equal(x.permute(1, 2, 0).numpy(), reference)
    assert dataset.fingerprint() == ImageDataset(cifar_dir / "test", 32, indices).fingerprint()
    assert dataset.fingerprint() != ImageDataset(cifar_dir / "test", 32, indices[:-1]).fingerprint()
    assert dataset.fingerprint() != ImageDataset(cifar_dir / "test", 16, indices).fingerprint()


def test_greyscale_images_come_out_rgb(tmp_path, cifar_dir):
    root = small_tree(cifar_dir / "test", tmp_path / "data", per_class=1)
    grey = next((root / "cat").iterdir())
    Image.open(grey).convert("L").save(grey, quality=95)          # a real greyscale JPEG, like imagenette's
    assert Image.open(grey).mode == "L"
    dataset = ImageDataset(root, 32)
    x, _, _ = dataset[1]
    assert x.shape == (3, 32, 32)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


@pytest.mark.skipif(not (IMAGENETTE / "val").exists(), reason="imagenette not present")
def test_imagenette_images_are_cropped_to_the_latent_models_resolution():
    paths, labels, _ = list_images(IMAGENETTE / "val")
    dataset = ImageDataset(IMAGENETTE / "val", 256, select_subset(labels, 2, seed=0))
    assert dataset[0][0].shape == (3, 256, 256) and dataset[1][0].shape == (3, 256, 256)


def test_unreadable_file_is_a_user_error_naming_it_or_is_skipped_and_counted(tmp_path, cifar_dir):
    root = small_tree(cifar_dir / "test", tmp_path / "data")
    bad = sorted((root / "cat").iterdir())[1]
    bad.write_bytes(b"this is not a jpeg" * 10)
    dataset = ImageDataset(root, 32)
    with pytest.raises(UserError, match=str(bad)):
        dataset[4]
    # through DataLoader workers too, and still one line
    with pytest.raises(UserError) as err:
        list(make_loader(dataset, batch_size=2, num_workers=1))
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    skipping = ImageDataset(root, 32, skip_bad=True)
    assert skipping.skipped == [bad] and len(skipping) == 5
    assert bad not in [skipping.paths[i] for i in skipping.ids]
    assert len(torch.cat([x for x, _, _ in make_loader(skipping, batch_size=4)])) == 5


def test_flat_folder_is_one_unlabelled_class_and_an_empty_one_a_clear_error(tmp_path, cifar_dir):
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("0001.jpg", "0000.jpg"):
        shutil.copy(cifar_dir / "test" / "cat" / name, flat / name)
    (flat / "notes.txt").write_text("not an image")
    paths, labels, classes = list_images(flat)
    assert [p.name for p in paths] == ["0000.jpg", "0001.jpg"] and labels == [0, 0] and classes == ["."]
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="holds no images"):
        list_images(empty)
    with pytest.raises(UserError, match="not a folder"):
        ImageDataset(tmp_path / "missing", 32)


def test_pixels_are_scaled_to_minus_one_one():
    images = torch.tensor([0, 255, 128], dtype=torch.uint8).reshape(1, 3, 1, 1)
    x = to_model_space(images, "pixels")
    assert x.dtype == torch.float32
    assert x.flatten().tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)


@needs_diffusers
def test_latents_are_the_vae_posterior_mean_times_0_18215(tmp_path, cifar_dir):
    vae = load_vae(save_tiny_vae(tmp_path / "vae"), "cpu")
    dataset = ImageDataset(cifar_dir / "test", 64, select_subset(list_images(cifar_dir / "test")[1], 3, seed=0))
    images = torch.stack([dataset[i][0] for i in range(3)])
    z = to_model_space(images, "latents", vae)
    assert z.shape == (3, 4, 8, 8)
    with torch.no_grad():
        expected = vae.encode(images.float() / 127.5 - 1).latent_dist.mean * 0.18215
    torch.testing.assert_close(z, expected, rtol=0, atol=0)
    sample = to_model_space(images, "latents", vae, generator=torch.Generator().manual_seed(1))
    again = to_model_space(images, "latents", vae, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample, again) and not torch.equal(sample, z)
    other = load_vae(save_tiny_vae(tmp_path / "vae2", seed=1), "cpu")
    assert vae_fingerprint(vae) == vae_fingerprint(load_vae(tmp_path / "vae", "cpu"))
    assert vae_fingerprint(vae) != vae_fingerprint(other)


@needs_diffusers
def test_missing_vae_weights_name_the_flag(tmp_path):
    with pytest.raises(UserError, match="--vae"):
        load_vae(tmp_path / "no-such-vae", "cpu")
    with pytest.raises(UserError, match="--vae"):
        load_vae(None, "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="--vae .*config.json"):
        load_vae(tmp_path / "empty", "cpu")
