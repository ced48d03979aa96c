"""Images in, model-space tensors out: ImageFolder listing, seeded subsets, ADM centre crop, VAE latents.

The stages, in order:

    list_images(root)          ImageFolder order: sorted class folders, sorted files; id = position in it
    select_subset(labels, n)   n images, class-balanced, seeded, deterministic
    ImageDataset               file → RGB as a viewer shows it → center_crop_arr(·, size) → uint8 [3, size, size]
    make_loader                a DataLoader (worker count configurable) whose errors stay one line
    to_model_space             uint8 → pixels in [−1, 1], or SD-VAE latents (posterior mean · 0.18215)

Which of the two a model sees is its family's business (families/, `InputSpace`): SiT/DiT latent models
(4 input channels) see SD-VAE latents of 8·input_size images; pixel models (3 channels) see the image
itself at input_size, scaled to [−1, 1].

Latents use the posterior **mean** by default: analysis wants one deterministic input per image. REPA's
trainer instead *samples* the posterior (mean + σ·ε) at every step; `to_model_space(..., generator=g)`
does that, seeded, for a trainer that wants REPA's behaviour.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from repa_probe.errors import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LATENT_SCALE = 0.18215        # SD-VAE latent scaling (Rombach et al. 2022), as in DiT, SiT and REPA
VAE_DOWNSAMPLE = 8            # SD-VAE: 256 px image → 32×32 latent
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
CROP = "adm-center-crop"      # recorded in fingerprints: changing the crop must invalidate cached features
DECODE = "viewer-rgb"         # and the decoding of other modes than RGB (to_rgb)
BACKGROUND = (255, 255, 255, 255)   # transparent pixels show white, as most viewers show them


#################################################################################
#                          Listing and subset selection                         #
#################################################################################

def list_images(root: str | os.PathLike) -> tuple[list[Path], list[int], list[str]]:
    """(paths, labels, classes) of an ImageFolder tree ``root/<class>/<image>``.

    Order is torchvision's ImageFolder order: class folders sorted by name (label = rank in that order),
    files sorted within each. The position of a file in this list is its stable image id. A folder of
    images without class subfolders is one unlabelled class "." (alignment runs, probes need labels).
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"'{root}' is not a folder: expected an ImageFolder tree DIR/<class>/<image>")

    def images_in(folder: Path) -> list[Path]:
        return sorted(f for f in folder.iterdir()
                      if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS and not f.name.startswith("."))

    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes and images_in(root):
        classes = ["."]
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = images_in(root / name)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise UserError(f"'{root}' holds no images ({', '.join(IMG_EXTENSIONS)}): expected an ImageFolder "
                        f"tree DIR/<class>/<image> (e.g. cifar10/test/airplane/0000.jpg) or a folder of images")
    return paths, labels, classes


def select_subset(labels, n: int | None, seed: int) -> np.ndarray:
    """Sorted indices of n images, as balanced over classes as the data allow, the same for the same seed.

    Each class's images are shuffled, the classes are put in a seeded order, and images are dealt
    round-robin (one per class per round) until n are taken; classes that run out drop out of the
    rounds. So every class gets ⌊n/K⌋ or ⌈n/K⌉ images when it has them, and the subset for n is
    contained in the subset for any larger n with the same seed. n=None takes every image.
    """
    labels = np.asarray(labels)
    if n is None:
        return np.arange(len(labels))
    if n <= 0 or n > len(labels):
        raise UserError(f"--n {n}: choose between 1 and the {len(labels)} images in the data folder")
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(labels))
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    longest = max(len(p) for p in pools)
    # Round r takes the r-th image of every class that still has one, in the seeded class order.
    dealt = [p[r] for r in range(longest) for p in pools if r < len(p)]
    return np.sort(np.array(dealt[:n], dtype=np.int64))


#################################################################################
#                                 Preprocessing                                 #
#################################################################################

def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's centre crop (Dhariwal & Nichol 2021; used by DiT, SiT and REPA).

    Halve the image with a BOX filter while its short side is at least 2·image_size (cheap anti-aliasing),
    resize with BICUBIC so the short side is image_size, then cut the central image_size² square.
    An image that already has the size passes through unchanged.
    """
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    left = (pil_image.size[0] - image_size) // 2
    top = (pil_image.size[1] - image_size) // 2
    return pil_image.crop((left, top, left + image_size, top + image_size))


def read_image(path: Path) -> Image.Image:
    """Decode a file fully and convert it to the RGB a viewer shows (to_rgb)."""
    try:
        with Image.open(path) as im:
            return to_rgb(im)          # converting forces the full decode, so truncated files fail here
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read image '{path}' ({type(e).__name__}: {e}); remove it or pass "
                        f"--skip-bad-images") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """An image of any mode PIL opens → the 8-bit RGB a viewer shows (docs/data-flow.md, "Images").

    PIL's own convert("RGB") clips 16- and 32-bit greyscale to 0–255 (a 16-bit PNG comes out white) and
    drops alpha (transparent pixels show whatever colour they hide). Here integer greyscale (I;16*, I) is
    scaled from 0–65535, the range PIL gives 16-bit PNG, TIFF and PGM files, float greyscale (F) from
    0–1, transparency is composited over white, and CIELAB goes through an exact colour transform."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        grey = np.nan_to_num(np.asarray(im, dtype=np.float64)) * (255 if im.mode == "F" else 255 / 65535)
        im = Image.fromarray(np.rint(np.clip(grey, 0, 255)).astype(np.uint8))
    if im.mode == "LAB":          # D50 CIELAB (TIFF's, ICC's) → sRGB; without NOOPTIMIZE lcms's LUT is off by up to 14
        from PIL import ImageCms
        return ImageCms.applyTransform(im, ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB",
            flags=ImageCms.Flags.NOOPTIMIZE))
    if im.has_transparency_data:  # an alpha band, or a transparent palette index or colour
        im = Image.alpha_composite(Image.new("RGBA", im.size, BACKGROUND), im.convert("RGBA"))
    return im.convert("RGB")


class ImageDataset(Dataset):
    """Images of an ImageFolder tree, centre-cropped to image_size.

    item i → (uint8 tensor [3, H, W], label, id), where id is the image's position in `list_images`
    order (stable across subsets). `indices` selects a subset (e.g. from `select_subset`); with
    `skip_bad=True` every selected file is decoded once up front and unreadable ones are dropped
    (listed in `.skipped`), otherwise the first unreadable file is a UserError naming it.
    """

    def __init__(self, root: str | os.PathLike, image_size: int, indices=None, skip_bad: bool = False):
        self.root = Path(root)
        self.image_size = int(image_size)
        self.paths, all_labels, self.classes = list_images(self.root)
        ids = np.arange(len(self.paths)) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self.paths)):
            raise UserError(f"image indices out of range for the {len(self.paths)} images in '{self.root}'")
        self.skipped: list[Path] = []
        if skip_bad:
            ok = np.array([_readable(self.paths[i]) for i in ids], dtype=bool)
            self.skipped = [self.paths[i] for i in ids[~ok]]
            ids = ids[ok]
        self.ids = ids
        self.labels = np.asarray(all_labels, dtype=np.int64)[ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image_id = int(self.ids[i])
        image = center_crop_arr(read_image(self.paths[image_id]), self.image_size)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)   # (3, H, W)
        return x, int(self.labels[i]), image_id

    def fingerprint(self) -> str:
        """Hash of what decides the pixels: root, file list, selected ids, size and crop."""
        rel = [str(p.relative_to(self.root)) for p in self.paths]
        h = hashlib.sha256(json.dumps({"root": os.path.realpath(self.root), "files": rel, "image_size": self.image_size,
                                       "crop": CROP, "decode": DECODE}).encode())
        h.update(self.ids.astype("<i8").tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        """Plain data for manifests and reports."""
        return {"root": os.path.realpath(self.root), "n": len(self), "n_files": len(self.paths),
                "classes": self.classes, "image_size": self.image_size, "crop": CROP, "decode": DECODE,
                "skipped": [str(p) for p in self.skipped], "fingerprint": self.fingerprint()}


def _readable(path: Path) -> bool:
    try:
        read_image(path)
        return True
    except UserError:
        return False


#################################################################################
#                                    Loading                                    #
#################################################################################

class _OneLineErrors(DataLoader):
    """A DataLoader whose UserErrors stay one line.

    A UserError raised in a worker process comes back re-created with the worker's traceback in its
    message; we re-raise it with the original one-line message, so the CLI prints one clear line.
    """

    def __iter__(self):
        it = super().__iter__()
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except UserError as e:
                lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
                last = lines[-1] if lines else ""
                prefix = f"{UserError.__module__}.{UserError.__name__}: "
                raise UserError(last.removeprefix(prefix) if "Traceback" in str(e) else str(e)) from None
            yield batch


def make_loader(dataset: Dataset, batch_size: int = 1, num_workers: int = 0, shuffle: bool = False, seed: int = 0,
                sampler: Sampler | None = None, drop_last: bool = False,
                batch_sampler: Sampler | None = None) -> DataLoader:
    """Batches of (images, labels, ids); shuffling is seeded; `sampler` (e.g. DistributedSampler) wins;
    `batch_sampler` yields whole batches of indices instead."""
    if batch_sampler is not None:
        return _OneLineErrors(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                              pin_memory=torch.cuda.is_available())
    generator = torch.Generator().manual_seed(seed) if shuffle and sampler is None else None
    return _OneLineErrors(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                          num_workers=num_workers, generator=generator, drop_last=drop_last,
                          pin_memory=torch.cuda.is_available(), persistent_workers=False)


#################################################################################
#                             Pixels and VAE latents                            #
#################################################################################

def to_model_space(images_uint8: torch.Tensor, mode: str, vae=None, generator: torch.Generator | None = None,
                   scale: float = LATENT_SCALE, shift: float = 0.0) -> torch.Tensor:
    """uint8 [N, 3, H, W] → what the model was trained on.

    pixels:  x = images / 127.5 − 1 ∈ [−1, 1]                                  (N, 3, H, W), float32
    latents: x = scale · (μ_φ(images / 127.5 − 1) − shift), the VAE posterior mean (N, C, H/f, W/f), float32
             (SD-VAE: scale 0.18215, shift 0; with `generator`: μ + σ·ε, a seeded posterior sample, as REPA
             trains)
    """
    x = images_uint8.float() / 127.5 - 1
    if mode == "pixels":
        return x
    if mode != "latents":
        raise ValueError(f"mode must be 'pixels' or 'latents', not {mode!r}")
    if vae is None:
        raise ValueError("latent mode needs a VAE (see load_vae)")
    param = next(vae.parameters())
    with torch.no_grad():
        posterior = vae.encode(x.to(param.device, param.dtype)).latent_dist
        z = posterior.mean
        if generator is not None:
            eps = torch.randn(z.shape, generator=generator, dtype=torch.float32).to(z.device, z.dtype)
            z = z + posterior.std * eps
    z = z.float()
    return (z - shift) * scale if shift else z * scale


def load_vae(path_or_name: str | os.PathLike | None, device: str | torch.device = "cpu"):
    """A diffusers AutoencoderKL (eval, frozen) from a local folder (``save_pretrained`` layout), or a hub
    name where the hub is reachable (the local hub cache is tried first). Any failure → UserError naming --vae."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UserError("latent models need diffusers to run the SD-VAE: pip install 'repa-probe[latent]' "
                        "(or use a pixel model / --mode pixels)") from None
    hint = (f"pass --vae PATH, a local folder holding an AutoencoderKL (config.json + weights), e.g. "
            f"a download of {DEFAULT_VAE}")
    if path_or_name is None:
        raise UserError(f"this is a latent model: {hint}")
    path = Path(path_or_name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"--vae '{path}' has no config.json: {hint}")
        try:
            vae = AutoencoderKL.from_pretrained(path)
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"--vae '{path}': cannot load its weights ({_first_line(e)}); {hint}") from None
    elif str(path_or_name).count("/") == 1 and not str(path_or_name).startswith((".", "/", "~")):
        vae = _vae_from_hub(AutoencoderKL, str(path_or_name), hint)
    else:
        raise UserError(f"--vae '{path}' does not exist: {hint}")
    vae.name_or_path = str(path_or_name)
    return vae.to(device).eval().requires_grad_(False)


def _vae_from_hub(cls, name: str, hint: str):
    for local_only in (True, False):
        try:
            return cls.from_pretrained(name, local_files_only=local_only)
        except Exception as e:  # no cache / no network / hub errors: every one means "not available here"
            err = e
    raise UserError(f"--vae {name}: weights not found locally and the hub is not reachable "
                    f"({_first_line(err)}); {hint}") from None


def vae_fingerprint(vae) -> str:
    """Hash of the VAE's config and weights: the latent cache key (any change in weights → new latents)."""
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
