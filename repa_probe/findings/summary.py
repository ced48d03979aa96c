"""What a reader wants first: where each curve peaks, whether it drops after, and where B beats A — each
claim resting on an interval that fits the design (docs/statistics.md):

  peak      the block with the highest value on all images, and how often it is the best across bootstrap
            replicates (a measure of how sure the peak's location is);
  drop      the drop after the peak, selection-aware: the peak chosen on half the images, the drop (peak −
            last block) measured on the other half with a paired interval; "peaks then drops" when that
            interval lies above 0 and the drop is beyond the measure's resolution (stats.resolution: half
            an image for the probe, 1e-6 of the scale for float measures), "rises after the peak" the mirror;
  null      for alignment metrics, the 97.5% level of the permutation null (images shuffled) at each block;
  B − A     per block × t, a paired interval (the same images, noise and replicates for both checkpoints)
            and a simultaneous band over every block ≥ 1 × t (stats.centred_interval with cells): "better"/
            "worse at blocks …" (b_better_blocks, b_worse_blocks) use the band, so that under no effect a false
            claim anywhere is rare; the pointwise lists stay beside them (…_pointwise). The aligned block
            (pre-specified by the REPA checkpoint, so no selection) gets its own line, with its pointwise interval.
  n, k      a measure that depends on the number of images (depends_on_n) is only compared at one n and k:
            every row carries them; checkpoints measured at different ones are refused. The held-out drop is
            at n_measure (half the images), with the two values it is the difference of at that n.
Blocks are numbered as in the paper: 0 = the tokens entering block 1, i = the output of block i.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from repa_probe import stats
from repa_probe.errors import UserError
from repa_probe.pipeline import Curves, Results, counts


def _model_curves(results: Results):
    """The models' curves over at least two blocks ≥ 1 (a peak needs a choice; the projector cosine has none)."""
    for a in results.models:
        for c in a.curves:
            if sum(b >= 1 for b in c.blocks) >= 2:
                yield a, c


def _above_null(c: Curves, ti: int) -> tuple[int, int]:
    """(blocks ≥ 1 whose lower interval end is above the null's 97.5% level, blocks ≥ 1 with a null)."""
    if c.null is None or not len(c.null) or c.ci is None:
        return 0, 0
    high = np.quantile(c.null[:, ti], 1 - (1 - stats.LEVEL) / 2, axis=0)
    eligible = np.array([b >= 1 for b in c.blocks])
    return int(((c.ci[ti, :, 0] > high) & eligible).sum()), int(eligible.sum())


def peak_summary(results: Results) -> pd.DataFrame:
    """One row per model × metric × encoder × t: best block (all images) with its value, interval and
    bootstrap frequency; last block; the full-sample drop best − last; the held-out (selection-aware) drop
    with its paired interval and the block chosen for it; the verdict (a drop, a rise after the peak, or
    neither); the measure's resolution; how many blocks beat the null; the images n and neighbours k of the
    curve's values; and the held-out drop's two values on half B (at n_measure images: an n-dependent
    measure's drop is their difference, not one of the curve's). Blocks equal but for rounding (within the
    resolution) tie, and a drop within it is no drop."""
    records = []
    for a, c in _model_curves(results):
        reps, scale = c.paired_replicates(results.config.seed)
        if reps is not None and scale is not None:      # subsamples: their spread, at n images, around the value
            reps = c.value + stats.deviations(reps, scale)
        floor = c.resolution()
        for ti, t in enumerate(c.ts):
            best = int(stats.argmax_blocks(c.value[ti], c.blocks, floor))
            lo, hi = c.ci[ti, best] if c.ci is not None else (math.nan, math.nan)
            freq = stats.peak_frequency(reps[:, ti], c.blocks, best, floor) if reps is not None else math.nan
            ho = c.held_out
            drop, (d_lo, d_hi) = (float(ho.drop[ti]), ho.ci[ti]) if ho is not None else (math.nan, (math.nan,) * 2)
            sign = stats.verdict(drop, d_lo, d_hi, c.resolution(ho.n_measure)) \
                if ho is not None and ho.peak[ti] != c.blocks[-1] else 0
            above, with_null = _above_null(c, ti)
            peak_b = float(ho.best[ti]) if ho is not None and ho.best is not None else math.nan    # on half B
            records.append(dict(
                checkpoint=c.checkpoint, metric=c.metric, encoder=c.encoder, t=float(t),
                best_block=c.blocks[best], best_value=float(c.value[ti, best]), best_ci_low=float(lo),
                best_ci_high=float(hi), best_frequency=freq, last_block=c.blocks[-1],
                last_value=float(c.value[ti, -1]), drop_all=float(c.value[ti, best] - c.value[ti, -1]),
                selected_block=ho.peak[ti] if ho is not None else None, drop_after=drop, drop_ci_low=float(d_lo),
                drop_ci_high=float(d_hi), n_select=ho.n_select if ho else 0, n_measure=ho.n_measure if ho else 0,
                peaks_then_drops=sign > 0, blocks_above_null=above, blocks_with_null=with_null,
                rises_after_peak=sign < 0, resolution=floor, n=c.n, k=c.k,
                measure_peak_value=peak_b, measure_last_value=peak_b - drop))
    return counts(pd.DataFrame.from_records(records))


def paired_deltas(results: Results, a: str, b: str) -> pd.DataFrame:
    """B − A per metric × encoder × t × block (blocks both have), with the paired 95% interval, the simultaneous
    band over the comparison's blocks ≥ 1 × t (sim_low, sim_high: all sim_cells of them cover at once with
    probability ≥ 95%), the images n and neighbours k both were measured at, and the measure's resolution (a
    difference within it is rounding). Curves measured at different n or k are not compared: refused."""
    seed, records = results.config.seed, []
    curves_a = {(c.metric, c.encoder): c for x in results.models if x.name == a for c in x.curves}
    for x in results.models:
        if x.name != b:
            continue
        for cb in x.curves:
            ca = curves_a.get((cb.metric, cb.encoder))
            if ca is None or list(ca.ts) != list(cb.ts):
                continue
            if (ca.n, ca.k) != (cb.n, cb.k):
                raise UserError(f"{a} and {b}: {cb.metric}{' vs ' + cb.encoder if cb.encoder else ''} was measured at "
                                f"n = {ca.n}, k = {ca.k} and at n = {cb.n}, k = {cb.k}; values at different n are not "
                                f"comparable: analyse both checkpoints in one compare")
            common = [blk for blk in cb.blocks if blk in ca.blocks]
            ia, ib = [ca.blocks.index(blk) for blk in common], [cb.blocks.index(blk) for blk in common]
            delta = cb.value[:, ib] - ca.value[:, ia]
            (ra, scale), (rb, _) = ca.paired_replicates(seed), cb.paired_replicates(seed)
            paired = ra is not None and rb is not None and ra.shape == rb.shape
            cells = max(1, sum(blk >= 1 for blk in common)) * len(cb.ts)
            ci, sim = (stats.centred_interval(delta, rb[..., ib] - ra[..., ia], scale, cells=c) if paired else None
                       for c in (1, cells))
            floor = max(ca.resolution(), cb.resolution())
            for ti, t in enumerate(cb.ts):
                for j, blk in enumerate(common):
                    (lo, hi), (s_lo, s_hi) = (x[ti, j] if x is not None else (math.nan,) * 2 for x in (ci, sim))
                    records.append(dict(a=a, b=b, metric=cb.metric, encoder=cb.encoder, t=float(t), block=blk,
                                        a_value=float(ca.value[ti, ia[j]]), b_value=float(cb.value[ti, ib[j]]),
                                        delta=float(delta[ti, j]), ci_low=float(lo), ci_high=float(hi),
                                        resolution=floor, n=cb.n, k=cb.k, sim_low=float(s_lo), sim_high=float(s_hi),
                                        sim_cells=cells))
    return counts(pd.DataFrame.from_records(records, columns=[
        "a", "b", "metric", "encoder", "t", "block", "a_value", "b_value", "delta", "ci_low", "ci_high", "resolution",
        "n", "k", "sim_low", "sim_high", "sim_cells"]))


def compare_summary(results: Results, a: str, b: str, aligned_block: int | None = None) -> pd.DataFrame:
    """Per metric × encoder × t: the largest and mean B − A over blocks ≥ 1, the blocks where B is better or
    worse (the simultaneous band over blocks ≥ 1 × t above or below 0 and the difference beyond the
    resolution; the pointwise lists, block by block, in …_pointwise), B − A at the aligned block (pointwise:
    one block fixed in advance), and the n and k of the values."""
    d = paired_deltas(results, a, b)
    records = []
    for (metric, encoder, t), g in d[d["block"] >= 1].groupby(["metric", "encoder", "t"], sort=True):
        i = int(np.argmax(g["delta"].to_numpy()))
        at = g[g["block"] == aligned_block]
        sign, pointwise = (stats.verdict(g["delta"], g[low], g[high], g["resolution"])
                           for low, high in (("sim_low", "sim_high"), ("ci_low", "ci_high")))
        records.append(dict(
            a=a, b=b, metric=metric, encoder=encoder, t=float(t), max_delta_block=int(g["block"].iloc[i]),
            max_delta=float(g["delta"].iloc[i]), mean_delta=float(g["delta"].mean()),
            b_better_blocks=g.loc[sign > 0, "block"].astype(int).tolist(),
            b_worse_blocks=g.loc[sign < 0, "block"].astype(int).tolist(),
            aligned_block=aligned_block, aligned_delta=float(at["delta"].iloc[0]) if len(at) else math.nan,
            aligned_ci_low=float(at["ci_low"].iloc[0]) if len(at) else math.nan,
            aligned_ci_high=float(at["ci_high"].iloc[0]) if len(at) else math.nan,
            b_better_blocks_pointwise=g.loc[pointwise > 0, "block"].astype(int).tolist(),
            b_worse_blocks_pointwise=g.loc[pointwise < 0, "block"].astype(int).tolist(),
            n=g["n"].iloc[0], k=g["k"].iloc[0]))
    return counts(pd.DataFrame.from_records(records))


def block_ranges(blocks: list[int]) -> str:
    """[4, 5, 6, 9] → '4–6, 9'; [] → 'none'."""
    if not blocks:
        return "none"
    parts, start = [], blocks[0]
    for prev, cur in zip(blocks, blocks[1:] + [None]):
        if cur != prev + 1 if cur is not None else True:
            parts.append(f"{start}" if start == prev else f"{start}–{prev}")
            start = cur
    return ", ".join(parts)
