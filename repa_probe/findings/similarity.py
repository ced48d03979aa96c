"""The SRA view of one model: how alike its blocks are at each noise level (block × block) and how each block's
features move with the noise level (t × t), as linear CKA between the pooled features of the same images
(metrics.similarity_matrix; docs/metrics.md). SRA (Jiang et al. 2025, arXiv 2505.02831) aligns an early block at
a higher t to a later block of the same model at a lower t: the two views show how far apart those already are.
Also the first model's blocks against each later model's, at the first t, as `compare` draws them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from repa_probe import metrics as M
from repa_probe.pipeline import Analysed

METRIC = "cka"


@dataclass
class SelfSimilarity:
    """One model's similarity between (t, block) pairs of its pooled features: by_t[ti] = block × block at ts[ti],
    by_block[bi] = t × t of block blocks[bi] (index 0 = the patch embedding)."""
    ts: list[float]
    blocks: list[int]
    by_t: np.ndarray          # [T, B, B]
    by_block: np.ndarray      # [B, T, T]

    def rows(self, checkpoint: str) -> list[dict]:
        """Every (t, block) × (t', block') pair of either view once: t' = t (block × block) or block' = block
        (t × t); the diagonal (t, block) × (t, block) once."""
        rows = [(ti, bi, ti, bj, v) for ti, m in enumerate(self.by_t) for (bi, bj), v in np.ndenumerate(m)]
        rows += [(ti, bi, tj, bi, v) for bi, m in enumerate(self.by_block) for (ti, tj), v in np.ndenumerate(m)
                 if ti != tj]
        return [dict(checkpoint=checkpoint, t=self.ts[ti], block=self.blocks[bi], t_other=self.ts[tj],
                     block_other=self.blocks[bj], metric=METRIC, value=float(v)) for ti, bi, tj, bj, v in rows]


def self_similarity(feats, ts: list[float], blocks: list[int], device: str | None = None,
                    clamp: bool = True) -> SelfSimilarity:
    """Both views of pooled features [T, B, N, D] (an array or the store's Stacked: one block at one t is read at a
    time), preprocessed as every alignment metric's input (metrics.prepare_features; clamp=False leaves out the
    clamp, which is scale invariant but not rotation invariant)."""
    at = [[feats[ti, bi] for bi in range(len(blocks))] for ti in range(len(ts))]
    by_t = np.stack([M.similarity_matrix(row, metric=METRIC, clamp=clamp, device=device) for row in at])
    by_block = np.stack([M.similarity_matrix([row[bi] for row in at], metric=METRIC, clamp=clamp, device=device)
                         for bi in range(len(blocks))])
    return SelfSimilarity(list(ts), list(blocks), by_t, by_block)


def block_similarity(models: list[Analysed], ts: list[float], device: str | None = None
                     ) -> tuple[dict[str, SelfSimilarity], dict[str, np.ndarray]]:
    """({model: its SelfSimilarity}, {later model: the first model's blocks (rows) × its blocks (columns) at
    ts[0]}), for the models whose features were kept (every block analysed)."""
    feats = {a.name: a.block_feats for a in models if a.block_feats is not None}
    within = {name: self_similarity(x, ts, list(range(x.shape[1])), device) for name, x in feats.items()}
    first = models[0].name
    cross = {m.name: M.similarity_matrix([feats[first][0, b] for b in range(feats[first].shape[1])],
                                         [feats[m.name][0, b] for b in range(feats[m.name].shape[1])],
                                         metric=METRIC, device=device)
             for m in models[1:] if first in feats and m.name in feats}
    return within, cross


def similarity_table(similarity: dict[str, SelfSimilarity]) -> pd.DataFrame:
    """self_similarity.csv: one row per model × pair of (t, block), of either view."""
    return pd.DataFrame([r for name, s in similarity.items() for r in s.rows(name)],
                        columns=["checkpoint", "t", "block", "t_other", "block_other", "metric", "value"])
