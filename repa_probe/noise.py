"""Noise levels: the canonical interpolant and a registry of the time conventions checkpoints use.

Canonical time (every user-facing t): t ∈ [0, 1], 0 = clean data, 1 = pure noise (REPA's):

    x_t = (1 − t)·x + t·ε,    velocity target v = dx_t/dt = ε − x.

A `Convention` says, for canonical t, what a model family is fed and what it returns (docs/conventions.md):
    coefficients(t) → (α, σ)      its noisy input is α·x + σ·ε (float64 for exactness where it matters)
    timestep(t)                   what its time embedder is fed
    velocity(out, x_in, t)        its output as the canonical velocity ε − x (None: not a flow model)
Registered: ``repa`` (fed t), ``sit`` (official SiT: fed s = 1 − t, velocity sign flipped) and ``dit``
(official DiT: discrete VP, 1000 linear-β steps, fed the SNR-matched integer step k). A new convention is one
`register_convention(Convention(...))` (e.g. in its model family's file).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

from repa_probe.errors import UserError
from repa_probe.registry import Registry

Tensor = torch.Tensor


def interpolate(x: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """x_t = (1 − t)·x + t·ε, with t broadcast over all but the batch dimension."""
    t = _per_sample(t, x)
    return (1 - t) * x + t * noise


def velocity_target(x: Tensor, noise: Tensor) -> Tensor:
    """d x_t / dt = ε − x for the linear interpolant."""
    return noise - x


@dataclass(frozen=True)
class Convention:
    """How a checkpoint family wants time (see the module docstring)."""
    name: str
    display: str                                              # how reports spell the family: "SiT"
    description: str
    coefficients: Callable[[Tensor], tuple[Tensor, Tensor]]
    time_fn: Callable[[Tensor], Tensor]
    velocity: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None

    def timestep(self, t) -> Tensor:
        """What the model's time embedder is fed for canonical t (computed from float32 t)."""
        return self.time_fn(torch.as_tensor(t, dtype=torch.float32))

    def model_input(self, x: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """α(t)·x + σ(t)·ε, computed in the coefficients' dtype and returned in x's."""
        alpha, sigma = self.coefficients(_per_sample(t, x))
        alpha, sigma = alpha.to(x.device), sigma.to(x.device)
        return (alpha * x.to(alpha.dtype) + sigma * noise.to(alpha.dtype)).to(x.dtype)

    def describe(self) -> str:
        return f"{self.display}: {self.description}"


CONVENTIONS: Registry[Convention] = Registry("time convention")


def register_convention(convention: Convention, *, priority: int = 0, overwrite: bool = False) -> Convention:
    return CONVENTIONS.register(convention.name, convention, priority=priority, overwrite=overwrite)


def get_convention(name: str | Convention, flag: str = "--convention") -> Convention:
    if isinstance(name, Convention):
        return name
    if name not in CONVENTIONS:
        raise UserError(f"{flag} {name!r}: not a known time convention; use one of {', '.join(CONVENTIONS)}")
    return CONVENTIONS[name]


def _linear(t: Tensor) -> tuple[Tensor, Tensor]:
    return 1 - t, t


register_convention(Convention("repa", "REPA", "fed t (0 = data, 1 = noise)", _linear, lambda t: t,
                               velocity=lambda out, x, t: out))
register_convention(Convention("sit", "SiT", "fed s = 1 − t (0 = noise, 1 = data)", _linear, lambda t: 1 - t,
                               velocity=lambda out, x, t: -out))
# SD3 (diffusers): x_t = (1 − σ)·x + σ·ε fed 1000·σ, so canonical t is σ; the schedule's shift only decides
# which σ a sampler visits, not how a σ is fed
register_convention(Convention("flow1000", "rectified flow", "fed 1000·t (0 = data, 1 = noise; SD3)",
                               _linear, lambda t: 1000 * t, velocity=lambda out, x, t: out))


#################################################################################
#                   DiT: discrete VP diffusion, 1000 linear-β steps              #
#################################################################################

@lru_cache(maxsize=None)
def dit_alphas_cumprod(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """ᾱ_k = ∏_{i≤k} (1 − β_i) for DiT's linear β schedule, in float64 (k = 0 … num_steps − 1)."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def dit_step_for_t(t: Tensor) -> Tensor:
    """The DiT step k whose log-SNR, log(ᾱ_k/(1 − ᾱ_k)), is closest to that of canonical t:
    log SNR(t) = 2·log((1 − t)/t). t = 0 (infinite SNR) gives k = 0, t = 1 (zero SNR) gives k = 999."""
    t = torch.as_tensor(t, dtype=torch.float64).cpu().clamp(0, 1)
    log_snr_k = torch.log(dit_alphas_cumprod() / (1 - dit_alphas_cumprod()))   # decreasing in k
    with torch.no_grad():
        target = 2 * (torch.log1p(-t) - torch.log(t))                         # ±inf at the ends
        target = target.clamp(log_snr_k[-1].item() - 1, log_snr_k[0].item() + 1)
        return (log_snr_k[None, :] - target.reshape(-1, 1)).abs().argmin(dim=1).reshape(t.shape)


def _dit_coefficients(t: Tensor) -> tuple[Tensor, Tensor]:
    abar = dit_alphas_cumprod()[dit_step_for_t(t)]
    return abar.sqrt(), (1 - abar).sqrt()


register_convention(Convention("dit", "DiT", "discrete VP, 1000 linear-β steps, fed the SNR-matched step k",
                               _dit_coefficients, lambda t: dit_step_for_t(t).to(torch.float32)))


#################################################################################
#                                  Seeded noise                                 #
#################################################################################

def seeded_noise(ids: Tensor, shape: tuple[int, ...], seed: int, salt: int = 0) -> Tensor:
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


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    v = torch.as_tensor(v, dtype=like.dtype if like.dtype.is_floating_point else torch.float32)
    if v.ndim == 0:
        return v
    return v.reshape(-1, *([1] * (like.ndim - 1)))
