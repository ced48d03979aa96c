"""Data: ImageFolder listing, seeded class-balanced subsets, ADM crop, bad files, pixels and VAE latents."""
from __future__ import annotations

import importlib.util
import shutil
import struct
import zlib
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


#################################################################################
#                     Image modes: the RGB a viewer shows                       #
#################################################################################

def write_png16(path: Path, values: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written here, not by PIL: greyscale (type 0, [H, W]) or RGB (type 2, [H, W, 3])."""
    h, w = values.shape[:2]
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in values)     # filter 0 before each row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Colours [H, W, 3] with alpha [H, W] (0–255) composited over white, as the docs say."""
    a = alpha[..., None] / 255
    return rgb * a + 255 * (1 - a)


def lab_d50_to_srgb(lab: np.ndarray) -> np.ndarray:
    """PIL's LAB bytes (L* · 255/100, a* and b* as signed bytes) → sRGB 0–255: CIE 1976 L*a*b* with a D50
    white → XYZ → Bradford adaptation to D65 → linear sRGB (IEC 61966-2-1 matrix) → sRGB curve, clipped."""
    L = lab[..., 0] / 255 * 100
    a, b = lab[..., 1].view(np.int8).astype(float), lab[..., 2].view(np.int8).astype(float)
    fy = (L + 16) / 116
    finv = lambda f: np.where(f ** 3 > 216 / 24389, f ** 3, (116 * f - 16) * 27 / 24389)
    xyz = np.stack([finv(fy + a / 500) * 0.96422, finv(fy), finv(fy - b / 200) * 0.82521], -1)
    bradford = np.array([[0.9555766, -0.0230393, 0.0631636], [-0.0282895, 1.0099416, 0.0210077],
                         [0.0122982, -0.0204830, 1.3299098]])
    to_srgb = np.array([[3.2404542, -1.5371385, -0.4985314], [-0.9692660, 1.8760108, 0.0415560],
                        [0.0556434, -0.2040259, 1.0572252]])
    lin = np.clip(xyz @ bradford.T @ to_srgb.T, 0, 1)
    return 255 * np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)


def mode_files(root: Path) -> dict[str, tuple[str, np.ndarray]]:
    """One 32×32 file per mode under root/<case>/: case → (the mode PIL opens it in, the RGB a viewer shows)."""
    rng = np.random.default_rng(0)
    size = (32, 32)
    v16 = rng.integers(0, 65536, size)
    v16[0, :2] = 0, 65535
    u8 = lambda *shape: rng.integers(0, 256, (*size, *shape), dtype=np.uint8)
    grey = lambda v: np.repeat(np.asarray(v, dtype=float)[..., None], 3, axis=-1)
    palette, index, alpha = u8(3).reshape(-1, 3)[:256], u8(), u8()
    index_alpha = alpha.flatten()[:256]                  # the palette's per-entry alpha (a PNG tRNS chunk)
    int32 = rng.integers(-70_000, 140_000, size).astype(np.int32)
    floats = rng.uniform(-0.25, 1.25, size).astype(np.float32)
    floats[0, 0] = np.nan
    rgb16, la, rgba, cmyk, ycc, lab, bits = rng.integers(0, 65536, (*size, 3)), u8(2), u8(4), u8(4), u8(3), u8(3), u8()
    cases = {}

    def save(case, ext, write, opened, reference):
        (root / case).mkdir(parents=True)
        path = root / case / f"image.{ext}"
        write(path)
        cases[case] = (opened, reference(path) if callable(reference) else reference)

    save("grey16_png", "png", lambda p: write_png16(p, v16, 0), "I;16", grey(v16 / 257))
    save("grey16_big_endian_tiff", "tif", lambda p: Image.frombytes("I;16B", size, v16.astype(">u2").tobytes())
         .save(p), "I;16B", grey(v16 / 257))
    save("grey16_pgm", "pgm", lambda p: p.write_bytes(b"P5\n32 32\n65535\n" + v16.astype(">u2").tobytes()), "I",
         grey(v16 / 257))
    save("int32_tiff", "tif", lambda p: Image.fromarray(int32, "I").save(p), "I", grey(np.clip(int32 / 257, 0, 255)))
    save("float_tiff", "tif", lambda p: Image.fromarray(floats, "F").save(p), "F",
         grey(np.clip(np.nan_to_num(floats) * 255, 0, 255)))
    save("rgb16_png", "png", lambda p: write_png16(p, rgb16, 2), "RGB", rgb16 / 257)
    save("bilevel_png", "png", lambda p: Image.fromarray(bits > 127).save(p), "1", grey(255 * (bits > 127)))
    save("grey_png", "png", lambda p: Image.fromarray(bits, "L").save(p), "L", grey(bits))

    def palette_image(mode, data):
        im = Image.frombytes(mode, size, data.tobytes())
        im.putpalette(palette.tobytes())
        return im
    save("palette_transparent_png", "png", lambda p: palette_image("P", index).save(p, transparency=index_alpha.tobytes()),
         "P", over_white(palette[index].astype(float), index_alpha[index]))
    save("grey_alpha_png", "png", lambda p: Image.fromarray(la, "LA").save(p), "LA", over_white(grey(la[..., 0]), la[..., 1]))
    save("palette_alpha_tiff", "tif", lambda p: palette_image("PA", np.stack([index, alpha], -1)).save(p), "PA",
         over_white(palette[index].astype(float), alpha))
    save("rgba_png", "png", lambda p: Image.fromarray(rgba, "RGBA").save(p), "RGBA",
         over_white(rgba[..., :3].astype(float), rgba[..., 3]))
    key = tuple(int(c) for c in rgba[0, 0, :3])                 # an RGB PNG's transparent colour (tRNS)
    save("rgb_colour_key_png", "png", lambda p: Image.fromarray(rgba[..., :3]).save(p, transparency=key), "RGB",
         over_white(rgba[..., :3].astype(float), 255 * (rgba[..., :3] != key).any(-1)))
    naive_cmyk = lambda c: (255 - c[..., :3].astype(float)) * (255 - c[..., 3:].astype(float)) / 255   # no ICC
    save("cmyk_tiff", "tif", lambda p: Image.fromarray(cmyk, "CMYK").save(p), "CMYK", naive_cmyk(cmyk))
    save("cmyk_jpeg", "jpg", lambda p: Image.fromarray(cmyk, "CMYK").save(p, quality=95), "CMYK",
         lambda p: naive_cmyk(np.asarray(Image.open(p))))       # lossy: the decoded CMYK values, converted here
    y, cb, cr = (ycc[..., i].astype(float) for i in range(3))   # JFIF's full-range YCbCr
    save("ycbcr_tiff", "tif", lambda p: Image.fromarray(ycc, "YCbCr").save(p), "YCbCr",
         np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)],
                  -1).clip(0, 255))
    save("lab_tiff", "tif", lambda p: Image.fromarray(lab, "LAB").save(p), "LAB", lab_d50_to_srgb(lab))
    return cases


def test_every_image_mode_decodes_to_the_rgb_a_viewer_shows(tmp_path):
    """Real files of every mode PIL opens and can write (and 16-bit PNG, PGM, written here) through the dataset
    path, against conversions derived here: 16-bit and 32-bit integer grey scaled from 0–65535 (v/257), float
    grey from 0–1, transparency over white, CMYK without a profile, JFIF YCbCr, D50 CIELAB → sRGB; within one
    level. (PIL's convert("RGB") makes 16-bit grey white, float grey black and transparent pixels black.)"""
    cases = mode_files(tmp_path / "data")
    for skip_bad in (False, True):
        dataset = ImageDataset(tmp_path / "data", 32, skip_bad=skip_bad)
        assert dataset.classes == sorted(cases) and not dataset.skipped
        for i, case in enumerate(dataset.classes):
            opened, reference = cases[case]
            assert Image.open(dataset.paths[i]).mode == opened, case
            x = dataset[i][0].permute(1, 2, 0).numpy().astype(float)
            worst = np.abs(x - np.rint(reference)).max()
            assert worst <= 1, f"{case} ({opened}): off by {worst} levels"
