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

from typing import Any

import torch

from repa_probe.errors import UserError
from repa_probe.metrics import DISPERSIVE_VARIANTS as VARIANTS, dispersive_loss  # noqa: F401 (from here too)
from repa_probe.train.terms.base import TERMS, Context, Forward

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
