"""The SRA view, as a measure (docs/metrics.md): how alike one model's blocks are at each noise level (block × block)
and how each block's features move with the noise level (t × t), as linear CKA between the pooled features of the
same images (metrics.similarity_matrix: biased CKA after the alignment metrics' preprocessing). SRA (Jiang et al.
2025, arXiv 2505.02831) aligns an early block at a higher t to a later block of the same model's EMA at a lower t:
the two views show how far apart those already are.

Its curves over t × block are entries of the two matrices:

    self_cka_prev   CKA(block b − 1, block b) at the same t, for b ≥ 1: what block b changes (1 = nothing)
    self_cka_tmin   CKA(block b at t, block b at the lowest t analysed), for the other t: how far the noise moves
                    block b (at the lowest t itself it is 1 by construction, so it is left out)

with intervals over the alignment measure's bootstrap subsamples of the images (the same draws: differences are
paired). The matrices ride on both curves (Curves.similarity), from which findings/similarity.py writes
self_similarity.csv and report/compose.py draws two pages. Only the checkpoint itself (kind "model") is measured,
and only when every block 0..depth is analysed; its baselines, its class token (kind "class-token"), the encoders
and the trainer's analysis (a few blocks) get no values.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from repa_probe import metrics as M
from repa_probe import stats
from repa_probe.curves import Curves, SelfSimilarity
from repa_probe.measures import Measure, Source, register_measure

METRIC = "cka"
METRICS = {"self_cka_prev": "linear CKA with the previous block, same t (SRA view)",
           "self_cka_tmin": "linear CKA with the same block at the lowest t (SRA view)"}


def self_similarity(feats, ts: list[float], blocks: list[int], device: torch.device | str | None = None,
                    clamp: bool = True) -> SelfSimilarity:
    """Both views of pooled features [T, B, N, D] (an array or the store's Stacked: one block at one t is read at a
    time), preprocessed as every alignment metric's input (metrics.prepare_features; clamp=False leaves out the
    clamp, which is scale invariant but not rotation invariant)."""
    at = [[feats[ti, bi] for bi in range(len(blocks))] for ti in range(len(ts))]
    by_t = np.stack([M.similarity_matrix(row, metric=METRIC, clamp=clamp, device=device) for row in at])
    by_block = np.stack([M.similarity_matrix([row[bi] for row in at], metric=METRIC, clamp=clamp, device=device)
                         for bi in range(len(blocks))])
    return SelfSimilarity(list(ts), list(blocks), by_t, by_block, METRIC)


def above_lowest(ts: list[float]) -> tuple[int, list[int]]:
    """(index of the lowest t, indices of the others, in the given order)."""
    low = int(np.argmin(ts))
    return low, [ti for ti in range(len(ts)) if ti != low]


def summaries(s: SelfSimilarity) -> dict[str, np.ndarray]:
    """The curves' values, read off the matrices: {self_cka_prev: [T, B − 1] (blocks 1..), self_cka_tmin: [T − 1, B]
    (every t but the lowest)}."""
    low, others = above_lowest(s.ts)
    return {"self_cka_prev": np.stack([np.diagonal(m, 1) for m in s.by_t]),
            "self_cka_tmin": s.by_block[:, others, low].T}


def subsample_summaries(feats, ts: list[float], draws: list[np.ndarray], device: torch.device | str | None = None
                        ) -> dict[str, np.ndarray]:
    """`summaries` on each subsample of the images in `draws` (row indices): {self_cka_prev: [R, T, B − 1],
    self_cka_tmin: [R, T − 1, B]}. Each block's kernels at every t are built once, and kept for the next block's."""
    (low, others), n_blocks = above_lowest(ts), feats.shape[1]
    prev, tmin = np.zeros((len(draws), len(ts), n_blocks - 1)), np.zeros((len(draws), len(others), n_blocks))
    before = None
    for bi in range(n_blocks):
        column = [M.FeatureKernel.build(feats[ti, bi], metrics=(METRIC,), device=device, what=f"block {bi} at t {t}")
                  for ti, t in enumerate(ts)]
        for r, rows in enumerate(draws):
            now = [kernel.subset(rows) for kernel in column]
            tmin[r, :, bi] = [_cka(now[ti], now[low]) for ti in others]
            if before is not None:
                prev[r, :, bi - 1] = [_cka(kernel.subset(rows), x) for kernel, x in zip(before, now)]
        before = column
    return {"self_cka_prev": prev, "self_cka_tmin": tmin}


def _cka(a: M.FeatureKernel, b: M.FeatureKernel) -> float:
    return M.pair_scores(a, b, (METRIC,))[METRIC]


def self_similarity_curves(pipe, src: Source) -> list[Curves]:
    """The measure (measures.py): both matrices of a model whose every block is analysed, and the two curves read
    off them, with their subsample intervals when the analysis has bootstrap replicates."""
    if src.kind != "model" or src.pooled is None or len(src.blocks) < 2 or \
            src.blocks != list(range(src.ckpt.anatomy.depth + 1)):
        return []
    cfg, start, n = pipe.cfg, time.perf_counter(), len(src.ids)
    s = self_similarity(src.pooled, src.ts, src.blocks, pipe.device)
    values = {m: v for m, v in summaries(s).items() if v.size}          # one t: no self_cka_tmin
    draws = stats.subsamples(n, cfg.bootstrap, cfg.seed) if cfg.bootstrap else []
    reps = subsample_summaries(src.pooled, src.ts, draws, pipe.device) if draws else {}
    scale = stats.subsample_scale([len(d) for d in draws], n) if draws else None
    pipe.timings["metrics"] += time.perf_counter() - start
    ts = {"self_cka_prev": src.ts, "self_cka_tmin": [src.ts[ti] for ti in above_lowest(src.ts)[1]]}
    blocks = {"self_cka_prev": src.blocks[1:], "self_cka_tmin": src.blocks}
    return [Curves(src.name, src.kind, m, "", ts[m], blocks[m], v,
                   stats.centred_interval(v, reps[m], scale) if draws else None, reps.get(m), scale, n=n, similarity=s)
            for m, v in values.items()]


register_measure(Measure("self-similarity", self_similarity_curves, lambda: METRICS, lambda cfg: cfg.self_similarity,
                         depends_on_n=True))
