"""What an analysis measures, as data: one measure of one model (or baseline) over blocks × t (`Curves`), with the
selection-aware drop after its peak (`HeldOut`) or the matrices its values are entries of (`SelfSimilarity`). Below
the measures (measures.py) and the pipeline, which make them, and the reports, which read them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repa_probe import stats


@dataclass
class HeldOut:
    """The selection-aware drop after the peak, per t: the peak block chosen on half A of the images (seeded,
    class-balanced), the drop (that block − the last block) measured on the other half B, and its paired 95%
    interval over resamples of B (docs/statistics.md). For the probe both its training and its test images are
    halved (held_out_probe); n_select and n_measure count its test images."""
    peak: list[int]                 # the block chosen on half A, per t
    drop: np.ndarray                # [T]
    ci: np.ndarray                  # [T, 2]
    n_select: int                   # images in half A
    n_measure: int                  # images in half B
    best: np.ndarray | None = None             # [T] the chosen block's value on half B
    best_replicates: np.ndarray | None = None  # [R, T] its value on each resample of B (the same for every source)
    scale: np.ndarray | None = None            # [R] stats.subsample_scale of those resamples (None: full-size)


@dataclass
class SelfSimilarity:
    """One model's similarity between (t, block) pairs of its pooled features (self_similarity.py): by_t[ti] = block
    × block at ts[ti], by_block[bi] = t × t of block blocks[bi] (index 0 = the patch embedding)."""
    ts: list[float]
    blocks: list[int]
    by_t: np.ndarray          # [T, B, B]
    by_block: np.ndarray      # [B, T, T]
    metric: str = "cka"

    def rows(self, checkpoint: str) -> list[dict]:
        """Every (t, block) × (t', block') pair of either view once: t' = t (block × block) or block' = block
        (t × t); the diagonal (t, block) × (t, block) once."""
        rows = [(ti, bi, ti, bj, v) for ti, m in enumerate(self.by_t) for (bi, bj), v in np.ndenumerate(m)]
        rows += [(ti, bi, tj, bi, v) for bi, m in enumerate(self.by_block) for (ti, tj), v in np.ndenumerate(m)
                 if ti != tj]
        return [dict(checkpoint=checkpoint, t=self.ts[ti], block=self.blocks[bi], t_other=self.ts[tj],
                     block_other=self.blocks[bj], metric=self.metric, value=float(v)) for ti, bi, tj, bj, v in rows]


@dataclass
class Curves:
    """One measure of one model (or baseline) over blocks × t.

    value [T, B] for blocks `blocks` (block −1 = the raw input); ci [T, B, 2] (95%) or None. For paired
    statistics: `replicates` [R, T, B], the measure on each bootstrap replicate, with `scale` [R] the factor
    that turns their spread into the spread at the full sample (stats.subsample_scale for alignment's
    subsamples; 1 for the probe, whose replicates refit on a full-size resample of its training images and
    score on one of its test images); alignment curves keep `null` [P, T, B], the metric with the images
    shuffled; probe curves keep `hits` [T, B, n_test], whether each test image was classified right; the
    self-similarity curves keep the `similarity` matrices they are entries of (one object for both). Every
    checkpoint of one analysis sees the same images and the same replicates, so differences are paired."""
    checkpoint: str
    kind: str
    metric: str
    encoder: str
    ts: list[float]
    blocks: list[int]
    value: np.ndarray
    ci: np.ndarray | None = None
    replicates: np.ndarray | None = None
    scale: np.ndarray | None = None
    hits: np.ndarray | None = None
    null: np.ndarray | None = None
    held_out: HeldOut | None = None
    n: int | None = None            # images each value was computed on (a probe's: its test images)
    k: int | None = None            # neighbours, for a kNN metric
    similarity: SelfSimilarity | None = None

    def paired_replicates(self, seed: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """([R, T, B] replicate values, [R] scale or None) from the same images for every checkpoint."""
        return self.replicates, self.scale

    def resolution(self, n_images: int | None = None) -> float:
        """The largest difference of this measure that is rounding (stats.resolution): half an image for the
        probe (of its n_test images, or of `n_images`, e.g. a held-out half), else 1e-6 of its scale."""
        counted = self.hits is not None
        return stats.resolution(self.value, (n_images or self.hits.shape[-1]) if counted else None)

    def rows(self) -> list[dict]:
        nan3 = np.full((3,) + self.value.shape, np.nan)
        alpha = (1 - stats.LEVEL) / 2
        null = np.stack([np.quantile(self.null, alpha, axis=0), self.null.mean(axis=0),
                         np.quantile(self.null, 1 - alpha, axis=0)]) if self.null is not None and len(self.null) \
            else nan3
        ci = self.ci if self.ci is not None else np.full(self.value.shape + (2,), np.nan)
        return [dict(checkpoint=self.checkpoint, kind=self.kind, block=block, t=t, metric=self.metric,
                     encoder=self.encoder, value=float(self.value[ti, bi]), ci_low=float(ci[ti, bi, 0]),
                     ci_high=float(ci[ti, bi, 1]), null_low=float(null[0, ti, bi]), null_mean=float(null[1, ti, bi]),
                     null_high=float(null[2, ti, bi]), n=self.n, k=self.k)
                for ti, t in enumerate(self.ts) for bi, block in enumerate(self.blocks)]


def per_image_curves(pipe, src, values, metrics: list[str], encoder: str = "",
                     blocks: list[int] | None = None) -> list[Curves]:
    """Measures taken per image, values [T, B, N, M] (M = len(metrics)), of source `src` (measures.Source) in
    pipeline `pipe`: the mean over images, with paired subsample replicates (the same draws for every checkpoint,
    from the pipeline's seed) and their rescaled interval."""
    values = np.asarray(values, dtype=np.float64)
    n, cfg, out = values.shape[2], pipe.cfg, []
    draws = stats.subsamples(n, cfg.bootstrap, cfg.seed) if cfg.bootstrap else []
    scale = stats.subsample_scale([len(d) for d in draws], n) if draws else None
    for mi, metric in enumerate(metrics):
        v = values[..., mi]
        mean = np.nanmean(v, axis=-1)
        reps = np.stack([np.nanmean(v[..., d], axis=-1) for d in draws]) if draws else None
        ci = stats.centred_interval(mean, reps, scale) if draws else None
        out.append(Curves(src.name, src.kind, metric, encoder, src.ts, blocks or src.blocks, mean, ci, reps, scale,
                          n=n))
    return out
