"""The SRA view of each model, as the self-similarity measure left it on the model's curves (self_similarity.py):
block × block linear CKA at each t and t × t at each block, for self_similarity.csv and two pages. Also the first
model's blocks against each later model's, at the first t, as `compare` draws them."""
from __future__ import annotations

import numpy as np
import pandas as pd

from repa_probe import metrics as M
from repa_probe.curves import SelfSimilarity
from repa_probe.pipeline import Analysed
from repa_probe.self_similarity import METRIC


def matrices(a: Analysed) -> SelfSimilarity | None:
    """The SRA view's matrices on a model's curves, or None when the measure did not run on it."""
    return next((c.similarity for c in a.curves if c.similarity is not None), None)


def self_similarities(models: list[Analysed]) -> dict[str, SelfSimilarity]:
    """{model: its SelfSimilarity}, for the models the measure ran on."""
    return {a.name: s for a in models if (s := matrices(a)) is not None}


def cross_similarity(models: list[Analysed], device: str | None = None) -> dict[str, np.ndarray]:
    """{later model: the first model's blocks (rows) × its blocks (columns) at the first t}, for the models whose
    features were kept (every block analysed)."""
    feats = {a.name: a.block_feats for a in models if a.block_feats is not None}
    first = models[0].name if models else None
    return {m.name: M.similarity_matrix([feats[first][0, b] for b in range(feats[first].shape[1])],
                                        [feats[m.name][0, b] for b in range(feats[m.name].shape[1])],
                                        metric=METRIC, device=device)
            for m in models[1:] if first in feats and m.name in feats}


def similarity_table(similarity: dict[str, SelfSimilarity]) -> pd.DataFrame:
    """self_similarity.csv: one row per model × pair of (t, block), of either view."""
    return pd.DataFrame([r for name, s in similarity.items() for r in s.rows(name)],
                        columns=["checkpoint", "t", "block", "t_other", "block_other", "metric", "value"])
