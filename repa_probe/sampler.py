"""Sampling a trained flow model: Euler ODE and Euler–Maruyama SDE, classifier-free guidance on an interval.

Same semantics as REPA's samplers.py (canonical time, t = 1 noise → t = 0 data, linear path):

- ODE (`euler_sampler`): t_i = linspace(1, 0, steps + 1); x ← x + (t_{i+1} − t_i)·v(x, t_i).
- SDE (`euler_maruyama_sampler`): t_i = linspace(1, 0.04, steps), then 0. The reverse SDE with diffusion
  g²(t) = 2t has drift d = v − ½·g²·s, with the score of the linear path recovered from the velocity,
  s = −((1 − t)·v + x) / t. Every step but the last is x ← x + d·Δt + √(2t)·√|Δt|·z; the last step
  (0.04 → 0) is the deterministic mean x + d·Δt.
- CFG: v = v_∅ + w·(v_y − v_∅) (the null class is `num_classes`), applied only where
  t_low ≤ t_i ≤ t_high; elsewhere the model is run once, conditionally. (REPA guides the drift d,
  which is affine in v for fixed x, so guiding v is the same map.)

The state is kept in float64 and the model is fed float32, as REPA does. The model is run through its
family (families/) and its output turned into the canonical velocity by its time convention (noise.py):
official SiT checkpoints, for instance, are fed s = 1 − t and their velocity is negated.

REG models (our SiT with a class token, config.cls_token_dim > 0) are sampled as REG's samplers.py does: the
class token c starts from N(0, I) and is denoised jointly with the image. The state is the image and c packed
into one row per sample (`pack`), which both integrators step elementwise: c gets the image's update (the same
score from its velocity, the same g² = 2t, its own Gaussian noise), with CFG at its own scale `cls_cfg` where the
image is guided (None: the image's `cfg`, as REG's eval.sh sets both; ≤ 0: the conditional velocity alone, as
REG's sampler does). The samples returned are the image part. REG's code has the SDE only; the joint ODE is
REPA's Euler sampler over the same packed state.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from repa_probe.checkpoints import LoadedCheckpoint, compiled_blocks
from repa_probe.errors import UserError
from repa_probe.runtime import autocast, stream_seed

SAMPLERS = ("ode", "sde")
DEFAULT_STEPS = {"ode": 50, "sde": 250}
VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]
NoiseFn = Callable[[tuple[int, ...]], torch.Tensor]
Noise = torch.Generator | list[torch.Generator] | NoiseFn | None


def class_token_dim(ckpt: LoadedCheckpoint) -> int:
    """The width of a REG model's class token (our SiT with config.cls_token_dim > 0); 0 for any other model."""
    return int(getattr(ckpt.config, "cls_token_dim", 0) or 0)


def image_shape(ckpt: LoadedCheckpoint) -> tuple[int, int, int]:
    """(C, H, W) of the model's input."""
    space = ckpt.anatomy.input
    return space.channels, space.size, space.size


def pack(x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """A REG model's joint state: the images (N, C, H, W) and their class tokens (N, D_c) as (N, C·H·W + D_c)."""
    return torch.cat([x.flatten(1), cls.to(x.dtype)], dim=1)


def unpack(state: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A joint state → (images (N, *shape), class tokens (N, D_c))."""
    size = math.prod(shape)
    return state[:, :size].unflatten(1, shape), state[:, size:]


def guide(v: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG of a doubled batch [conditional; unconditional]: v_∅ + scale·(v_y − v_∅); scale ≤ 0: v_y alone (REG)."""
    v_cond, v_uncond = v.chunk(2)
    return v_cond if scale <= 0 else v_uncond + scale * (v_cond - v_uncond)


def guided_velocity(ckpt: LoadedCheckpoint, y: torch.Tensor, cfg: float = 1.0,
                    cfg_interval: tuple[float, float] = (0.0, 1.0), cls_cfg: float | None = None) -> VelocityFn:
    """v(x, t) in canonical time for labels y, with CFG scale `cfg` applied for t inside `cfg_interval`.
    A REG model's x is the joint state (`pack`) and so is v: the class token's velocity is guided at `cls_cfg`
    (None: `cfg`) wherever the image's is."""
    conv, model, family = ckpt.convention, ckpt.model, ckpt.family
    if conv.velocity is None:
        raise UserError(f"the '{conv.name}' time convention ({conv.description}) is not a flow model: the samplers "
                        f"need a velocity model (convention 'repa' or 'sit')")
    dtype = next(model.parameters()).dtype
    y_null = torch.full_like(y, ckpt.anatomy.num_classes)
    low, high = cfg_interval
    cls_dim, shape = class_token_dim(ckpt), image_shape(ckpt)
    cls_cfg = cfg if cls_cfg is None else cls_cfg

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        if cls_dim and x.shape[1:] != (math.prod(shape) + cls_dim,):
            raise ValueError(f"a REG model's state is its images and class tokens packed (`pack`): "
                             f"(N, {math.prod(shape) + cls_dim}), not {tuple(x.shape)}")
        guided = cfg > 1.0 and low <= t <= high
        x, cls = unpack(x, shape) if cls_dim else (x, None)
        x_in, y_in = (torch.cat([x, x]), torch.cat([y, y_null])) if guided else (x, y)
        t_in = torch.full((x_in.shape[0],), t, dtype=torch.float64)
        timestep = conv.timestep(t_in).to(x.device, dtype)
        if cls_dim:                      # REG: our SiT is fed the class token and returns its velocity too
            cls_in = torch.cat([cls, cls]) if guided else cls
            out, cls_out = model(x_in.to(dtype), timestep, y_in, cls_token=cls_in.to(dtype), return_cls=True)
        else:
            out = family.forward(model, x_in.to(dtype), timestep, y_in)
        v = conv.velocity(out.to(torch.float64), x_in, t_in.to(x.device))
        v = guide(v, cfg) if guided else v
        if not cls_dim:
            return v
        v_cls = conv.velocity(cls_out.to(torch.float64), cls_in, t_in.to(x.device))
        return pack(v, guide(v_cls, cls_cfg) if guided else v_cls)

    return velocity


def euler_ode(velocity: VelocityFn, x1: torch.Tensor, steps: int = 50) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 to 0 with `steps` Euler steps (float64 state)."""
    ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
    x = x1.to(torch.float64)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t_cur) * velocity(x, t_cur)
    return x


def gaussian(shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Standard normal float64 noise; a list of generators draws row i from generator i (noise per sample)."""
    if isinstance(generator, list):
        return torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float64) for g in generator])
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def joint_noise(image: torch.Generator | list[torch.Generator], cls: torch.Generator | list[torch.Generator],
                shape: tuple[int, ...]) -> NoiseFn:
    """The SDE noise of a joint state (`pack`): the images' (N, *shape) drawn from `image`, then the class
    tokens' from `cls`, each as `gaussian` draws it."""
    def noise(state_shape: tuple[int, ...]) -> torch.Tensor:
        z = gaussian((state_shape[0], *shape), image).flatten(1)
        return torch.cat([z, gaussian((state_shape[0], state_shape[1] - z.shape[1]), cls)], dim=1)
    return noise


def euler_maruyama(velocity: VelocityFn, x1: torch.Tensor, steps: int = 250, generator: Noise = None,
                   t_last: float = 0.04) -> torch.Tensor:
    """Reverse SDE with g² = 2t from t = 1 to t_last in steps − 1 noisy steps, then one mean step to 0.
    `generator`: one for the batch, one per sample (`gaussian`), or a function of the state's shape that returns
    the noise (`joint_noise`)."""
    if steps < 2:
        raise ValueError("the SDE sampler needs at least 2 steps (the last one is deterministic)")
    ts = torch.cat([torch.linspace(1, t_last, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    ts = ts.tolist()
    x = x1.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        dt = t_next - t_cur
        v = velocity(x, t_cur)
        score = -((1 - t_cur) * v + x) / t_cur
        drift = v - t_cur * score                                   # v − ½·g²·s with g² = 2t
        x = x + drift * dt
        if i < steps - 1:
            shape = tuple(x.shape)
            z = (generator(shape) if callable(generator) else gaussian(shape, generator)).to(x.device)
            x = x + math.sqrt(2 * t_cur) * math.sqrt(abs(dt)) * z
    return x


def integrate(ckpt: LoadedCheckpoint, x1: torch.Tensor, labels: torch.Tensor, noise: Noise,
              cls1: torch.Tensor | None = None, cls_noise: Noise = None, *, sampler: str, steps: int | None,
              cfg: float, cfg_interval: tuple[float, float], cls_cfg: float | None,
              device: torch.device, precision: str = "fp32", compile: bool = False) -> torch.Tensor:
    """x₁ (and a REG model's class token c₁) → the images x₀ (N, C, H, W) float32 by `sampler`; the SDE's noise
    from `noise` (and the class token's from `cls_noise`, after the image's at every step). The model runs under
    `precision`'s autocast ("fp32": off; "bf16", "fp16") with its blocks torch.compile'd if `compile`, the trainer's
    and the capture's fast paths; the state stays float64."""
    velocity = guided_velocity(ckpt, labels.to(device), cfg, cfg_interval, cls_cfg)
    if cls1 is not None:
        noise = joint_noise(noise, cls_noise, image_shape(ckpt))
        x1 = pack(x1, cls1)
    steps = steps or DEFAULT_STEPS[sampler]
    with compiled_blocks(ckpt, compile), autocast(precision, device):
        if sampler == "ode":
            x0 = euler_ode(velocity, x1.to(device), steps)
        else:
            x0 = euler_maruyama(velocity, x1.to(device), steps, noise)
    return (x0 if cls1 is None else unpack(x0, image_shape(ckpt))[0]).float()


@torch.no_grad()
def sample(ckpt: LoadedCheckpoint, n: int = 16, *, labels: torch.Tensor | int | None = None, sampler: str = "ode",
           steps: int | None = None, cfg: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0),
           cls_cfg: float | None = None, generator: torch.Generator | None = None,
           device: torch.device | str | None = None) -> torch.Tensor:
    """Draw n samples x₀ in the model's space (pixels in [−1, 1] or scaled VAE latents): (n, C, H, W) float32.

    labels: a tensor of n class indices, one class for all, or None (drawn uniformly from `generator`).
    The starting noise and labels come from `generator` (a CPU torch.Generator), so a seed gives the same
    samples on any device. steps defaults to 50 (ODE) or 250 (SDE). A REG model's class token (guided at
    `cls_cfg`, None: `cfg`) starts from a draw after the labels and its SDE noise follows the image's at every
    step, the order of REG's generate.py and samplers.py.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    ckpt.model.eval()
    num_classes, cls_dim = ckpt.anatomy.num_classes, class_token_dim(ckpt)
    device = torch.device(device) if device is not None else next(ckpt.model.parameters()).device
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    x1 = torch.randn((n, *image_shape(ckpt)), generator=generator)
    if labels is None:
        labels = torch.randint(0, num_classes, (n,), generator=generator)
    elif isinstance(labels, int):
        labels = torch.full((n,), labels)
    if not (0 <= int(labels.min()) and int(labels.max()) <= num_classes):
        raise ValueError(f"class labels must lie in [0, {num_classes}] ({num_classes} = unconditional)")
    cls1 = torch.randn((n, cls_dim), generator=generator) if cls_dim else None
    return integrate(ckpt, x1, labels, generator, cls1, generator, sampler=sampler, steps=steps, cfg=cfg,
                     cfg_interval=cfg_interval, cls_cfg=cls_cfg, device=device)


def image_grid(images01: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] → one uint8 (rows·(H + p) + p, nrow·(W + p) + p, 3) array, black gutters;
    nrow defaults to round(√N) columns, as REPA's array2grid (torchvision's make_grid layout)."""
    n, _, h, w = images01.shape
    ncol = nrow or max(1, round(math.sqrt(n)))
    nrows = math.ceil(n / ncol)
    grid = torch.zeros(3, nrows * (h + padding) + padding, ncol * (w + padding) + padding)
    for i, img in enumerate(images01.float().clamp(0, 1).cpu()):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = img
    return grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def save_grid(images01: torch.Tensor, path: str, nrow: int | None = None) -> None:
    """Write `image_grid(images01)` as a PNG."""
    Image.fromarray(image_grid(images01, nrow)).save(path, format="PNG")


def sample_images(ckpt: LoadedCheckpoint, n: int, *, vae: str | None = None, seed: int = 0, batch_size: int = 64,
                  **kwargs) -> torch.Tensor:
    """n samples of a loaded checkpoint as images in [0, 1], (n, 3, H, W); latents decode through the VAE
    (`vae`, else the one its family names). kwargs go to `sample` (cfg, sampler, steps, ...)."""
    device = next(ckpt.model.parameters()).device
    autoencoder = load_autoencoder(ckpt, vae)
    generator = torch.Generator().manual_seed(seed)
    images = []
    for start in range(0, n, batch_size):
        x0 = sample(ckpt, min(batch_size, n - start), generator=generator, device=device, **kwargs)
        images.append(((decode(ckpt, x0, autoencoder) + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(images)


def load_autoencoder(ckpt: LoadedCheckpoint, vae: str | None = None):
    """The VAE that decodes a latent model's samples (`vae`, else the one its family names); None for pixels."""
    from repa_probe.data import load_vae
    space = ckpt.anatomy.input
    return load_vae(vae or space.vae, next(ckpt.model.parameters()).device) if space.kind == "latents" else None


def decode(ckpt: LoadedCheckpoint, x0: torch.Tensor, autoencoder=None) -> torch.Tensor:
    """Samples in the model's space → images in [−1, 1] (latents through the VAE)."""
    if autoencoder is None:
        return x0
    space = ckpt.anatomy.input
    with torch.no_grad():
        return autoencoder.decode(x0.to(next(ckpt.model.parameters()).device) / space.scale + space.shift).sample.float()


SEED_STRIDE = 0x9E3779B1      # odd (the golden ratio × 2³²): seeds' index ranges start far apart


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a seeded set: one generator per sample, so sample i does not depend on the
    batch, the rank or the other samples. A CPU torch.Generator keeps only the low 32 bits of its seed, so the
    set's seed moves the start of the index range within them (seed 0: sample i's generator is seeded with i);
    within a set no two samples share a generator."""
    return (int(index) + int(seed) * SEED_STRIDE) % (1 << 32)


def class_token_seed(seed: int, index: int) -> int:
    """The seed of sample `index`'s REG class token (its start and SDE noise): the stream "class_token" of
    sample_seed(seed, index) (runtime.stream_seed), apart from the image's generator so that the image's draws
    stay those of a model without a class token."""
    return stream_seed(sample_seed(seed, index), "class_token")


@torch.no_grad()
def sample_indexed(ckpt: LoadedCheckpoint, indices, *, seed: int = 0, sampler: str = "sde", steps: int | None = None,
                   cfg: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0), cls_cfg: float | None = None,
                   device: torch.device | str | None = None, precision: str = "fp32",
                   compile: bool = False) -> torch.Tensor:
    """Samples `indices` of the seeded set: x₁, the class label and the SDE's noise of sample i come from its own
    generator (`sample_seed`), so every checkpoint with the same input space and classes gets the same noise
    and labels for sample i (paired), whatever the batch size or the number of ranks. A REG model's class token
    (guided at `cls_cfg`, None: `cfg`) draws its start and noise from a second generator (`class_token_seed`),
    so its image draws are a plain model's. `precision` and `compile` as `integrate`. (n, C, H, W) float32."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    ckpt.model.eval()
    num_classes, cls_dim = ckpt.anatomy.num_classes, class_token_dim(ckpt)
    device = torch.device(device) if device is not None else next(ckpt.model.parameters()).device
    gens = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]
    x1 = torch.stack([torch.randn(image_shape(ckpt), generator=g) for g in gens])
    labels = torch.cat([torch.randint(0, num_classes, (1,), generator=g) for g in gens])
    cls_gens = [torch.Generator().manual_seed(class_token_seed(seed, i)) for i in indices] if cls_dim else None
    cls1 = torch.stack([torch.randn((cls_dim,), generator=g) for g in cls_gens]) if cls_dim else None
    return integrate(ckpt, x1, labels, gens, cls1, cls_gens, sampler=sampler, steps=steps, cfg=cfg,
                     cfg_interval=cfg_interval, cls_cfg=cls_cfg, device=device, precision=precision, compile=compile)


def sample_checkpoint(checkpoint: str, out: str, n: int = 64, *, cfg: float = 1.5,
                      cfg_interval: tuple[float, float] = (0.0, 1.0), sampler: str = "ode", steps: int | None = None,
                      seed: int = 0, class_label: int | None = None, vae: str | None = None,
                      weights: str = "ema", convention: str | None = None, heads: int | None = None,
                      device: str | None = None) -> torch.Tensor:
    """`repa-probe sample`: load a checkpoint, draw n samples, decode latents through the VAE, write a PNG grid.

    Returns the images in [0, 1], (n, 3, H, W). Defaults are REPA's generate.py (ODE, 50 steps, CFG 1.5).
    """
    from repa_probe.families import load_checkpoint
    from repa_probe.runtime import resolve_device

    out_path = Path(out)
    if out_path.suffix.lower() != ".png":
        raise UserError(f"--out '{out}' must be a .png file")
    if not out_path.parent.is_dir() or not os.access(out_path.parent, os.W_OK):
        raise UserError(f"--out '{out}': folder '{out_path.parent}' does not exist or is not writable")
    if n <= 0:
        raise UserError(f"--n {n} must be positive")
    if steps is not None and steps < (2 if sampler == "sde" else 1):
        raise UserError(f"--steps {steps}: the {sampler} sampler needs at least {2 if sampler == 'sde' else 1}")
    if sampler not in SAMPLERS:
        raise UserError(f"--sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if not 0 <= cfg_interval[0] <= cfg_interval[1] <= 1:
        raise UserError(f"--cfg-interval {cfg_interval}: expected LOW,HIGH with 0 ≤ LOW ≤ HIGH ≤ 1")
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint, convention=convention, weights=weights, device=dev, heads=heads)
    if ckpt.convention.velocity is None:
        raise UserError(f"'{checkpoint}' is a {ckpt.convention.display} model ({ckpt.convention.description}): the "
                        f"flow samplers need a velocity model (SiT or REPA)")
    num_classes = ckpt.anatomy.num_classes
    if class_label is not None and not 0 <= class_label <= num_classes:
        raise UserError(f"--class-label {class_label}: use 0..{num_classes - 1} ({num_classes} = unconditional)")
    images = sample_images(ckpt, n, vae=vae, seed=seed, labels=class_label, sampler=sampler, steps=steps, cfg=cfg,
                           cfg_interval=cfg_interval)
    save_grid(images, str(out_path))
    return images
