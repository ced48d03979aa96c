"""Noise levels: the canonical interpolant and the adapters to each checkpoint family's own time.

Canonical time (every user-facing t): t ∈ [0, 1], 0 = clean data, 1 = pure noise (REPA's):

    x_t = (1 − t)·x + t·ε,    velocity target v = ε − x.

Conventions (DESIGN.md §2):
- ``repa``: the model is fed t itself.
- ``sit``:  official SiT checkpoints run time the other way (0 = noise, 1 = data); they are fed s = 1 − t.
  The interpolated input is the same x_t.
- ``dit``:  official DiT checkpoints are discrete VP diffusion, 1000 steps, linear β from 1e-4 to 0.02,
  x_k = √ᾱ_k·x + √(1 − ᾱ_k)·ε, fed the integer step k. A canonical t maps to the k whose
  log-SNR, log(ᾱ_k/(1 − ᾱ_k)), is closest to the target log((1 − t)/t)²; the input is built with
  DiT's own coefficients at that k.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

CONVENTIONS = ("repa", "sit", "dit")


def interpolate(x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − t)·x + t·ε, with t broadcast over all but the batch dimension."""
    t = _per_sample(t, x)
    return (1 - t) * x + t * noise


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / dt = ε − x for the linear interpolant."""
    return noise - x


@lru_cache(maxsize=None)
def dit_alphas_cumprod(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """ᾱ_k = ∏_{i≤k} (1 − β_i) for DiT's linear β schedule, in float64 (k = 0 … num_steps − 1)."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def dit_step_for_t(t: torch.Tensor) -> torch.Tensor:
    """The DiT step k whose log-SNR is closest to that of canonical t: log SNR(t) = 2·log((1 − t)/t).

    t = 0 (infinite SNR) gives k = 0, t = 1 (zero SNR) gives k = 999.
    """
    t = torch.as_tensor(t, dtype=torch.float64).clamp(0, 1)
    log_snr_k = torch.log(dit_alphas_cumprod() / (1 - dit_alphas_cumprod()))   # decreasing in k
    with torch.no_grad():
        target = 2 * (torch.log1p(-t) - torch.log(t))                         # ±inf at the ends
        target = target.clamp(log_snr_k[-1].item() - 1, log_snr_k[0].item() + 1)
        return (log_snr_k[None, :] - target.reshape(-1, 1)).abs().argmin(dim=1).reshape(t.shape)


@dataclass(frozen=True)
class Convention:
    """How a checkpoint family wants time: `timestep(t)` is what its t-embedder is fed, and
    `model_input(x, t, noise)` is the noisy input it expects, for canonical t."""
    name: str

    def __post_init__(self):
        if self.name not in CONVENTIONS:
            raise ValueError(f"unknown time convention {self.name!r}: use one of {', '.join(CONVENTIONS)}")

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32)
        if self.name == "repa":
            return t
        if self.name == "sit":
            return 1 - t
        return dit_step_for_t(t).to(torch.float32)

    def model_input(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.name != "dit":
            return interpolate(x, t, noise)
        abar = dit_alphas_cumprod().to(x.device)[dit_step_for_t(t).to(x.device)]   # float64
        abar = abar.reshape(-1, *([1] * (x.ndim - 1))) if abar.ndim else abar
        return (abar.sqrt() * x.double() + (1 - abar).sqrt() * noise.double()).to(x.dtype)

    def describe(self) -> str:
        return {"repa": "REPA: fed t (0 = data, 1 = noise)",
                "sit": "SiT: fed s = 1 − t (0 = noise, 1 = data)",
                "dit": "DiT: discrete VP, 1000 linear-β steps, fed the SNR-matched step k"}[self.name]


def seeded_noise(ids: torch.Tensor, shape: tuple[int, ...], seed: int, salt: int = 0) -> torch.Tensor:
    """One Gaussian ε per image id, reproducible and independent of batching, rank and checkpoint.

    Image `i` always gets the draw of a generator seeded with (seed, salt, i); `salt` separates the
    noise levels so each t gets its own ε. Two checkpoints analysed with the same seed therefore see
    exactly the same noisy inputs.
    """
    out = torch.empty((len(ids), *shape))
    g = torch.Generator()
    for row, i in enumerate(ids.tolist()):
        g.manual_seed(((seed * 1_000_003 + salt) * 2_000_003 + int(i)) % (1 << 63))
        out[row] = torch.randn(shape, generator=g)
    return out


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    if v.ndim == 0:
        return v
    return v.reshape(-1, *([1] * (like.ndim - 1)))
