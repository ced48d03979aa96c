"""Patch-level alignment: a block's tokens against the target encoder's tokens of the same grid cells.

REPA's loss does not compare pooled images: it asks every patch token of the aligned block, passed
through the projector h_φ, to point like the target encoder's token of the same grid cell. The pooled
measures (CKNNA of mean-pooled features) cannot see that, so with ``--tokens`` an analysis adds two
token-level measures (docs/spatial.md defines them with an example):

token sample   one grid cell per image, drawn by ``sample_cells`` from a generator seeded by (seed, image
               id): the same cell for an image whatever the batch, the rank, t or the checkpoint, so two
               checkpoints (and the encoder) are read at the same cells. Capture keeps each block's token
               at that cell, [N, D] per block × t: the same storage as mean pooling, one row per image,
               so every interval that resamples images stays valid.
token CKNNA    (and any other alignment metric, e.g. token CKA) between the N sampled block tokens and the
               N encoder tokens of the same cells: projector-free, it asks whether tokens that are close for
               the encoder are close for the block, across images and positions at once.
projector      the checkpoint's own projector h_φ applied to the aligned block's tokens (all of them: iREPA's
cosine         convolution reads the neighbours), read at the sampled cell c_n of image n,

                   cos_proj = (1/N) Σ_n cos( h_φ(H_n)[c_n], z̃_n[c_n] ),

               where z̃ is the target the checkpoint was trained toward: the encoder's tokens z, or, for a
               run trained with iREPA's spatial normalisation, (z − α·mean_T z) / (std_T z + 1e-6) per channel
               over the image's tokens. Cells are uniform, so this estimates the mean cosine over all tokens,
               i.e. minus REPA's alignment loss at that t.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

ZSCORE_EPS = 1e-6          # iREPA's ε


def sample_cells(ids: Sequence[int] | torch.Tensor, n_tokens: int, seed: int) -> torch.Tensor:
    """(N,) long: the grid cell (row-major token index in 0..n_tokens−1) sampled for each image id."""
    ids = torch.as_tensor(ids).cpu().tolist()
    return torch.tensor([int(np.random.default_rng([seed, 0x7A0C, int(i)]).integers(n_tokens)) for i in ids],
                        dtype=torch.long)


def at_cells(tokens: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """(N, T, D) tokens → (N, D): each image's token at its cell, float32."""
    return tokens[torch.arange(len(tokens), device=tokens.device), cells.to(tokens.device)].float()


def target_cells(tokens: torch.Tensor, cells: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the token measures need of the encoder's tokens (N, T, E), [N, E] each: the token at each image's
    cell, and the per-channel mean and (unbiased) std over the image's tokens, so that the z-scored target
    of any α can be formed later (``zscored``)."""
    z = tokens.float()
    return {"token": at_cells(z, cells), "token_mean": z.mean(dim=1), "token_std": z.std(dim=1)}


def zscored(token, mean, std, alpha: float, eps: float = ZSCORE_EPS):
    """iREPA's spatial normalisation (z − α·mean) / (std + ε), given each image's channel mean and std over
    its tokens: for one token per image here, for every token in the trainer (loss.spatial_zscore). Arrays or
    tensors, broadcast."""
    return (token - alpha * mean) / (std + eps)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of (N, E) arrays, float64; 0 for a zero row."""
    a, b = torch.as_tensor(np.asarray(a, np.float64)), torch.as_tensor(np.asarray(b, np.float64))
    return F.cosine_similarity(a, b, dim=-1, eps=1e-12).numpy()
