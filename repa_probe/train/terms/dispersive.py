"""Dispersive Loss (Wang & He 2025, "Diffuse and Disperse", arXiv 2506.09027): a contrastive term with no
positive pairs that spreads one block's representations of the batch apart, no encoder needed.

For the batch's tokens of block b flattened to z_i ∈ R^(T·D) (i = 1..B, the local batch of each process):

    infonce-l2:   L_disp = log( (1/B²) Σ_i Σ_j exp(−‖z_i − z_j‖² / (T·D) / τ) )
    infonce-cos:  L_disp = log( (1/B²) Σ_i Σ_j exp(cos(z_i, z_j) / τ) )

the mean taken over the full B × B matrix, diagonal included, as the authors' PyTorch code does (its
`disp_loss`, InfoNCE-L2, τ = 1, applied to the last block with λ = 0.25; their JAX runs used λ = 0.5,
τ = 0.5 at block depth/4). The cosine variant is the paper's InfoNCE with D = −cos (their code has only
the L2 one). Minimising it pushes samples apart: L_disp ≤ 0, and = 0 when all z_i coincide.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from repa_probe.errors import UserError
from repa_probe.train.terms.base import TERMS, Context, Forward

VARIANTS = ("infonce-l2", "infonce-cos")


def dispersive_loss(z: torch.Tensor, tau: float = 1.0, variant: str = "infonce-l2") -> torch.Tensor:
    """L_disp of tokens z (B, T, D) (or any (B, ...)): a float32 scalar. The B × B Gram matrix is taken in
    float64 (‖z_i‖² + ‖z_j‖² − 2 z_i·z_j cancels), with an exact zero diagonal (what the authors' pdist leaves
    out and pads back), whose gradient is then zero rather than sqrt's 0/0."""
    z = z.double().flatten(1)                                          # (B, T·D)
    gram = z @ z.T                                                     # (B, B)
    norms = gram.diagonal()
    if variant == "infonce-l2":
        off = ~torch.eye(len(z), dtype=torch.bool, device=z.device)
        squared = (norms[:, None] + norms[None, :] - 2 * gram).clamp_min(0) * off
        logits = -squared / z.shape[1]                                 # −‖z_i − z_j‖² / (T·D)
    elif variant == "infonce-cos":
        unit = norms.clamp_min(1e-24).rsqrt()
        logits = gram * unit[:, None] * unit[None, :]                  # cos(z_i, z_j)
    else:
        raise ValueError(f"unknown dispersive variant {variant!r}: use one of {', '.join(VARIANTS)}")
    return (torch.logsumexp(logits.flatten() / tau, dim=0) - math.log(logits.numel())).float()


class Dispersive:
    name = "dispersive"

    def enabled(self, cfg: Any) -> bool:
        return cfg.dispersive > 0

    def weight(self, cfg: Any, step: int) -> float:
        return cfg.dispersive

    def check(self, cfg: Any, depth: int) -> None:
        if cfg.dispersive_block is not None and not 1 <= cfg.dispersive_block <= depth:
            raise UserError(f"--dispersive-block {cfg.dispersive_block} is not a block of this {depth}-block "
                            f"model: pass 1..{depth} (default: the last)")

    def __call__(self, forward: Forward, cfg: Any, context: Context) -> torch.Tensor:
        block = cfg.dispersive_block or len(forward.hidden) - 1
        return dispersive_loss(forward.hidden[block], cfg.dispersive_tau, cfg.dispersive_variant)


TERMS.register("dispersive", Dispersive())
