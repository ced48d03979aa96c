"""The training objective: linear interpolant, v-prediction, and REPA's alignment term.

For a clean input x, noise ε ~ N(0, I) and t ∈ [0, 1] (canonical time: 0 = data, 1 = noise):

    x_t = (1 − t)·x + t·ε,   v = ε − x,   L_denoise = E‖v_θ(x_t, t, y) − v‖²   (mean over C·H·W)

REPA (Yu et al. 2024, arXiv 2410.06940, eq. 8) adds, for each target encoder f with patch tokens
y* = f(image) [N, T, D_f] and the SiT's hidden state h after block `encoder_depth` projected by that
encoder's MLP h_φ [N, T, D_f]:

    L_repa = −(1 / (E·N·T)) Σ_e Σ_n Σ_τ cos(h_φ(h)[n, τ], y*[n, τ]),   L = L_denoise + λ·L_repa

(mean over encoders, samples and tokens). The cosine is taken on features normalised in float32:
under fp16 autocast the squared norm of a 768-d vector overflows (REPA's notes say so too). The trainer's
further terms (Dispersive Loss, SRA, REG's class token, ...) live in train/terms/, one file each, and are added
with their weights.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from repa_probe.noise import interpolate, velocity_target
from repa_probe.train.terms import Forward
from repa_probe.tokens import ZSCORE_EPS, zscored

WEIGHTINGS = ("uniform", "lognormal")


def sample_t(n: int, generator: torch.Generator, weighting: str = "uniform",
             device: torch.device | str | None = None) -> torch.Tensor:
    """n noise levels t ∈ (0, 1): uniform, or EDM's log-normal σ (P_mean 0, P_std 1) mapped to the
    linear path by t = σ / (1 + σ), as REPA's loss.py does."""
    if weighting == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if weighting == "lognormal":
        sigma = torch.randn(n, generator=generator, device=device).exp()
        return sigma / (1 + sigma)
    raise ValueError(f"unknown t weighting {weighting!r}: use one of {', '.join(WEIGHTINGS)}")


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over all non-batch dimensions, in float32: (N,)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def repa_loss(projected: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample −cos(h_φ(h), y*) averaged over tokens and encoders, on float32-normalised features: (N,).

    projected[e], targets[e]: (N, T, D_e) for encoder e; the token grids must match.
    """
    if len(projected) != len(targets) or not targets:
        raise ValueError(f"{len(projected)} projector outputs for {len(targets)} encoder targets")
    total = 0
    for z_tilde, z in zip(projected, targets):
        if z_tilde.shape != z.shape:
            raise ValueError(f"projector output {tuple(z_tilde.shape)} does not match encoder tokens "
                             f"{tuple(z.shape)}: the encoder's token grid must equal the SiT's")
        cos = (F.normalize(z_tilde.float(), dim=-1) * F.normalize(z.float(), dim=-1)).sum(dim=-1)  # (N, T)
        total = total - cos.mean(dim=1)
    return total / len(targets)


def spatial_zscore(z: torch.Tensor, alpha: float = 0.6, eps: float = ZSCORE_EPS) -> torch.Tensor:
    """iREPA's spatial normalisation of target tokens z (N, T, D): z ← (z − α·mean_T z) / (std_T z + ε), mean and
    (unbiased) standard deviation over the T tokens of each image and channel. With α = 1 every channel is
    centred over the image, removing what all its tokens share (the global part) and keeping their contrasts."""
    return zscored(z, z.mean(dim=1, keepdim=True), z.std(dim=1, keepdim=True), alpha, eps)


def training_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                  targets: list[torch.Tensor] | None = None, repa_coeff: float = 0.0,
                  terms: dict[str, tuple[float, Callable[[Forward], torch.Tensor]]] | None = None,
                  cls_token: torch.Tensor | None = None, cls_noise: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(L, parts): L = L_denoise + λ·L_repa + Σ w·L_term, and parts {"denoise", "repa", term names...}, each a
    scalar batch mean.

    `model` is a SiT (or a DDP/compiled wrapper of one) fed canonical t; `y` already holds the dropped
    labels; `targets` are the encoders' patch tokens (None or [] for vanilla SiT, then L_repa = 0; with REG each
    has its class token first); `terms` maps a term's name to (weight, term): the trainer's registered terms
    (train/terms/), each given the forward's block outputs. REG: `cls_token` (N, D_c) is the encoder's class
    token, fed noised with ε = `cls_noise` at the image's t; its predicted velocity goes to the terms.
    """
    x_t = interpolate(x, t, noise)
    cls_t = None if cls_token is None else interpolate(cls_token, t, cls_noise)
    out, zs, hidden, c, cls_out = model(x_t, t, y, return_zs=bool(targets), return_hidden=True, cls_token=cls_t,
                                        return_cls=True)
    parts = {"denoise": denoising_loss(out, velocity_target(x, noise)).mean(),
             "repa": repa_loss(zs, targets).mean() if targets else torch.zeros((), device=x.device)}
    loss = parts["denoise"] + repa_coeff * parts["repa"]
    forward = Forward(hidden, c, x, noise, t, y, cls_token, cls_noise, cls_out)
    for name, (weight, term) in (terms or {}).items():
        parts[name] = term(forward)
        loss = loss + weight * parts[name]
    return loss, parts
