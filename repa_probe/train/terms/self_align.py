"""SRA, self-representation alignment (Jiang et al. 2025, arXiv 2505.02831): no external encoder; an earlier
block of the model at a higher noise level is aligned to a later block of its own EMA at a lower one.

For x_t = (1 − t)·x + t·ε, the student is the head h_φ (Linear, SiLU, Linear; the model's `ap_head`) on block s's
tokens of the model being trained; the teacher is block u's tokens of the EMA model, without gradients, at
t' = clamp(t − Δ·r, 0, 1) with r ~ U(0, 1) and the same ε, x and fed labels (and, with REG, its class token
noised at t'):

    L_sra = mean_{n, d} [ 1 − cos_T( h_φ(h_s(x_t, t))[n, :, d], h_u^EMA(x_t', t')[n, :, d] ) ]

where cos_T is taken over the T tokens of each channel: the authors' default loss type "cos" is
F.cosine_similarity(a, b) on (N, T, D) tensors, whose default dim = 1 is the token axis. Their weight for it is
0.5, Δ (`--t-max`) 0.2, and for SiT-XL/2 (28 blocks) s = 8, u = 20; our defaults scale s and u with the depth
(2/7 and 5/7 of it, rounded). Only the loss type "cos" (their recommendation) is implemented.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from repa_probe.errors import UserError
from repa_probe.noise import interpolate
from repa_probe.train.terms.base import TERMS, Context, Forward


def self_align_blocks(cfg: Any, depth: int) -> tuple[int, int]:
    """(student block, teacher block), 1-based: --self-align-blocks, else 2/7 and 5/7 of the depth (8, 20 of 28)."""
    if cfg.self_align_blocks:
        return tuple(cfg.self_align_blocks)
    return max(1, round(depth * 2 / 7)), max(1, round(depth * 5 / 7))


def sra_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 − cosine over the token axis of (N, T, D) tensors, averaged over samples and channels, in float32."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=1)).mean()


class SelfAlign:
    name = "self_align"

    def enabled(self, cfg: Any) -> bool:
        return cfg.self_align > 0

    def weight(self, cfg: Any, step: int) -> float:
        return cfg.self_align

    def check(self, cfg: Any, depth: int) -> None:
        if cfg.self_align_blocks is not None:
            if len(cfg.self_align_blocks) != 2 or not all(1 <= b <= depth for b in cfg.self_align_blocks):
                raise UserError(f"--self-align-blocks {','.join(map(str, cfg.self_align_blocks))}: give two blocks "
                                f"STUDENT,TEACHER in 1..{depth}, e.g. 8,20 for 28 blocks")

    def __call__(self, forward: Forward, cfg: Any, context: Context) -> torch.Tensor:
        s, u = self_align_blocks(cfg, len(forward.hidden) - 1)
        student = context.model.ap_head(forward.hidden[s])                           # (N, T, D)
        t_teacher = (forward.t - cfg.self_align_offset * context.uniform("self_align")).clamp(0, 1)
        with torch.no_grad():
            x_teacher = interpolate(forward.x, t_teacher, forward.noise)
            cls = None if forward.cls is None else interpolate(forward.cls, t_teacher, forward.cls_noise)  # REG
            hidden = context.ema(x_teacher, t_teacher, forward.y, return_hidden=True, cls_token=cls)[2]
        return sra_loss(student, hidden[u])


TERMS.register("self_align", SelfAlign())
