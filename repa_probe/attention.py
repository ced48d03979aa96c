"""Attention-map alignment (`--attention`; docs/metrics.md): how close each block's attention is to the target
encoder's, the quantity HASTE (Wang et al. 2025, arXiv 2505.16792) distils beside REPA's feature alignment.

For one image, block b's attention map is the row-softmax of q·kᵀ/√d_head of its self-attention, averaged over
heads: A_b ∈ R^(T×T), each row a distribution over the T tokens; the encoder's is that of its last block over its
patch tokens, its prefix tokens (CLS, registers) dropped from rows and columns before the softmax, as HASTE drops
DINOv2's class token. With P the encoder's map and Q the block's, on the same token grid (the encoder runs at
the model's grid, encoders.py):

    attention_kl   (1/T) Σ_i KL(P_i ‖ Q_i) = (1/T) Σ_i Σ_j P_ij (log P_ij − log Q_ij)   (0 = the same maps)
    attention_cos  (1/T) Σ_i cos(P_i, Q_i)                                             (1 = the same maps)

HASTE's loss is the cross-entropy (1/T) Σ_i −Σ_j P_ij log Q_ij = attention_kl + the encoder's mean row entropy,
per head (head h of the model against head h of the encoder) over SiT-XL's blocks 5–8 and DINOv2-B's 9–12; heads
are matched only by a model trained so, so the measure compares head-averaged maps, every block against the
encoder's last. Each is one number per image, averaged over images with paired bootstrap intervals.

The maps are not kept: each analysis runs the model (and the encoder) once more per batch and t with hooks on
the attention modules, which must be timm-style (`qkv`, `num_heads`, `q_norm`, `k_norm`: our SiT's and timm's
ViTs). A model or encoder without them gets no values, and a note.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from repa_probe.capture import capture_batch, input_space
from repa_probe.curves import per_image_curves
from repa_probe.data import load_vae, to_model_space
from repa_probe.measures import Measure, register_measure
from repa_probe.models import attention_hooks, attention_logits, has_attention
from repa_probe.runtime import AUTOCAST_DTYPES

METRICS = {"attention_kl": "attention-map KL, encoder ‖ block (0 = equal)",
           "attention_cos": "attention-map cosine with the encoder"}


def log_attention(attn: nn.Module, x: Tensor, prefix: int = 0) -> Tensor:
    """log of the head-averaged attention map (N, T', T') of a timm-style attention module on its input x (N, T, D),
    in float32, the first `prefix` tokens dropped from rows and columns before the softmax."""
    with torch.autocast(x.device.type, enabled=False):
        logits = attention_logits(attn, x.float(), prefix)                  # (N, heads, T', T')
        return torch.logsumexp(logits.log_softmax(-1), dim=1) - math.log(attn.num_heads)   # log mean_h softmax


def attention_scores(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per image (N, 2): the mean over rows of KL(P_i ‖ Q_i) and of cos(P_i, Q_i), from log-maps (N, T, T)."""
    p, q = log_p.double().exp(), log_q.double().exp()
    kl = (p * (log_p.double() - log_q.double())).sum(-1).mean(-1)
    cos = torch.nn.functional.cosine_similarity(p, q, dim=-1).mean(-1)
    return torch.stack([kl, cos], dim=-1)


def encoder_attention(encoder, images01: Tensor, grid: int) -> Tensor | None:
    """The encoder's last block's log attention map over its patch tokens (N, grid², grid²), or None when it has
    no timm-style attention."""
    blocks = getattr(encoder.model, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    if not has_attention(attn):
        return None
    with attention_hooks({"last": attn}, functools.partial(log_attention, prefix=encoder.num_prefix_tokens)) as maps:
        encoder.encode(images01, grid)
    return maps["last"]


def block_attention(ckpt, blocks: Sequence[int]) -> dict[int, nn.Module] | None:
    """{block b ≥ 1: block b's attention module} of a loaded checkpoint, or None if one is not timm-style."""
    modules = list(ckpt.family.blocks(ckpt.model))
    attn = {b: getattr(modules[b - 1], "attn", None) for b in blocks if b >= 1}
    return attn if attn and all(has_attention(m) for m in attn.values()) else None


def attention_values(pipe, src) -> list:
    """The measure (measures.py): per encoder, attention_kl and attention_cos of every block ≥ 1 per t, from one
    more pass of the model and the encoder per batch."""
    if src.kind not in ("model", "untrained") or not pipe.encoders:
        return []
    modules = block_attention(src.ckpt, src.blocks)
    if modules is None:
        _note(pipe.cfg, f"no attention maps of {src.name}: its blocks have no timm-style attention module")
        return []
    out = []
    for enc in pipe.encoders:
        values = _scores(pipe, src, enc, modules)                                    # [T, B, N, 2] or None
        out += [] if values is None else per_image_curves(pipe, src, values, list(METRICS), enc.name, list(modules))
    return out


def _scores(pipe, src, enc, modules: dict[int, nn.Module]) -> np.ndarray | None:
    """attention_scores of every block in `modules` against encoder `enc`, [T, B, N, 2], per batch of images; None
    (with a note) when the encoder has no attention maps or not the model's number of tokens."""
    cfg, device = pipe.cfg, next(src.ckpt.model.parameters()).device
    space = input_space(src.ckpt, cfg.mode)
    vae = load_vae(cfg.vae or space.vae, device) if space.kind == "latents" else None
    labels = torch.as_tensor(src.dataset.labels) if cfg.labels == "true" else None
    values = np.full((len(src.ts), len(modules), len(src.dataset), 2), np.nan)
    for start in range(0, len(src.dataset), cfg.batch_size):
        rows = list(range(start, min(start + cfg.batch_size, len(src.dataset))))
        images = torch.stack([src.dataset[i][0] for i in rows]).to(device)
        teacher = encoder_attention(enc, images.float().div(255), src.grid)
        if teacher is None:
            return _note(cfg, f"no attention alignment against {enc.name}: it has no timm-style attention")
        x0 = to_model_space(images, space.kind, vae, scale=space.scale, shift=space.shift)
        for ti, t in enumerate(src.ts):
            with attention_hooks(modules, log_attention) as maps:
                capture_batch(src.ckpt, x0, None if labels is None else labels[rows],
                              torch.as_tensor(src.dataset.ids[rows]), t, seed=cfg.seed, blocks=[max(modules)],
                              autocast_dtype=AUTOCAST_DTYPES[cfg.precision])
            for bi, b in enumerate(modules):
                if maps[b].shape != teacher.shape:
                    return _note(cfg, f"no attention alignment against {enc.name}: its {teacher.shape[-1]} tokens "
                                      f"are not {src.name}'s {maps[b].shape[-1]}")
                values[ti, bi, rows] = attention_scores(teacher, maps[b]).cpu().numpy()
    return values


def _note(cfg, note: str) -> None:
    cfg.notes += [] if note in cfg.notes else [note]


register_measure(Measure("attention", attention_values, lambda: METRICS, lambda cfg: cfg.attention))
