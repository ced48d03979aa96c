"""HASTE's attention alignment (Wang et al. 2025, arXiv 2505.16792): the SiT's attention maps at a few blocks
distilled from a ViT encoder's at a few of its blocks, beside REPA's feature alignment, both switched off at a
step (--align-until).

For student blocks s_1..s_k and the first encoder's blocks u_1..u_k, with pre-softmax scores A^(s) (N, H_s, T, T) of
the SiT and A^(u) (N, H_u, T, T) of the encoder between its patch tokens (CLS and registers removed), the first
H_u heads of the SiT paired with the encoder's H_u heads one to one:

    L_attn = (1/k) Σ_i mean_{n, h, q} [ −Σ_j softmax(A^(u_i))[n, h, q, j] · log softmax(A^(s_i))[n, h, q, j] ]

the cross-entropy of the student's attention rows under the teacher's, as HASTE's loss.py computes it (their
SiT-XL/2 blocks 5–8 from DINOv2-B's blocks 9–12, weight 0.5 beside REPA's 0.5). Our defaults: the four blocks
ending at --repa-depth, from the encoder's last four.
"""
from __future__ import annotations

from typing import Any

import torch

from repa_probe.errors import UserError
from repa_probe.train.terms.base import TERMS, Context, Forward, past_alignment

PAIRS = 4


def student_blocks(cfg: Any, depth: int) -> tuple[int, ...]:
    """--attn-align-blocks, else the four blocks ending at the aligned block (5–8 for REPA's depth 8)."""
    if cfg.attn_align_blocks:
        return tuple(cfg.attn_align_blocks)
    last = cfg.repa_depth or depth
    return tuple(range(max(1, last - PAIRS + 1), last + 1))


def teacher_blocks(cfg: Any, encoder_depth: int, n: int) -> tuple[int, ...]:
    """--attn-align-teacher-blocks, else the encoder's last n blocks (9–12 of DINOv2-B's 12 for n = 4)."""
    return tuple(cfg.attn_align_teacher_blocks) if cfg.attn_align_teacher_blocks else \
        tuple(range(encoder_depth - n + 1, encoder_depth + 1))


def encoder_blocks(cfg: Any, encoder: Any, model_config: Any) -> tuple[int, ...]:
    """The first encoder's blocks that --attn-align distils, once it is loaded: a ViT with those blocks and at most
    as many heads as the SiT (else one UserError line, before training starts)."""
    blocks = teacher_blocks(cfg, len(getattr(encoder.model, "blocks", ())), len(student_blocks(cfg, model_config.depth)))
    with encoder.attention_logits(blocks):
        pass
    heads = encoder.model.blocks[0].attn.num_heads
    if heads > model_config.num_heads:
        raise UserError(f"--attn-align pairs the SiT's heads with {encoder.name}'s {heads} one to one: the SiT has "
                        f"{model_config.num_heads} (--heads {heads} or more)")
    return blocks


def attention_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student's attention rows (N, H_s, T, T) under the teacher's (N, H_u, T, T), over the
    first H_u student heads, averaged over samples, heads and query tokens (float32 log-softmax)."""
    heads = teacher.shape[1]
    if student.shape[1] < heads or student.shape[2:] != teacher.shape[2:]:
        raise UserError(f"--attn-align: the SiT's attention {tuple(student.shape[1:])} (heads, T, T) cannot take the "
                        f"encoder's {tuple(teacher.shape[1:])}: it needs at least as many heads and the same tokens")
    p = teacher.float().softmax(dim=-1)
    return -(p * student[:, :heads].float().log_softmax(dim=-1)).sum(dim=-1).mean()


class AttnAlign:
    name = "attn_align"

    def enabled(self, cfg: Any) -> bool:
        return cfg.attn_align > 0

    def weight(self, cfg: Any, step: int) -> float:
        return 0.0 if past_alignment(cfg, step) else cfg.attn_align

    def check(self, cfg: Any, depth: int) -> None:
        blocks = student_blocks(cfg, depth)
        if not all(1 <= b <= depth for b in blocks):
            raise UserError(f"--attn-align-blocks {','.join(map(str, blocks))}: blocks of this {depth}-block model "
                            f"are 1..{depth}")
        if cfg.attn_align_teacher_blocks and len(cfg.attn_align_teacher_blocks) != len(blocks):
            raise UserError(f"--attn-align-teacher-blocks pairs {len(cfg.attn_align_teacher_blocks)} encoder "
                            f"blocks with {len(blocks)} SiT blocks (--attn-align-blocks): give as many of each")
        if not cfg.encoders:
            raise UserError("--attn-align needs a ViT --encoder NAME[=WEIGHTS] whose attention maps it distils")
        if cfg.reg_cls > 0:
            raise UserError("--attn-align with --reg-cls: REG's class token would enter the attention maps HASTE "
                            "distils between image tokens; use one of the two")

    def __call__(self, forward: Forward, cfg: Any, context: Context) -> torch.Tensor:
        blocks = student_blocks(cfg, len(forward.hidden) - 1)
        losses = [attention_distillation(context.model.blocks[b - 1].attention_logits(forward.hidden[b - 1],
                                                                                     forward.c), teacher)
                  for b, teacher in zip(blocks, context.attention)]
        return torch.stack(losses).mean()


TERMS.register("attn_align", AttnAlign())
