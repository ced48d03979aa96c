"""Does the best block beat a baseline? A paired, held-out difference per model × baseline × measure × t.

The best block of a curve is a maximum over its blocks: compared with a baseline's value on the same images, it
beats the baseline by chance alone in most analyses where no block is better (the maximum of noisy values is
biased up). So the choice and the measurement use different images, as for the drop after the peak
(docs/statistics.md): the model's best block and the untrained model's best block are chosen on half A of the
images (pipeline.HeldOut.peak; the raw input has one "block"), and best − baseline is measured on half B, where
both were scored on the same images and noise and the same resamples of B, so the difference is paired
replicate by replicate. "Beats" is claimed only when that interval lies above 0 and the difference exceeds the
measure's resolution.
"""
from __future__ import annotations

import pandas as pd

from repa_probe import stats
from repa_probe.pipeline import BASELINES, Curves, Results, arch_key

COLUMNS = ["checkpoint", "baseline", "kind", "metric", "encoder", "t", "block", "baseline_block", "n_select",
           "n_measure", "value", "baseline_value", "gap", "ci_low", "ci_high", "resolution", "verdict", "k"]


def _held_out(c: Curves) -> bool:
    return c.held_out is not None and c.held_out.best_replicates is not None


def _gap_rows(c: Curves, b: Curves, baseline: str) -> list[dict]:
    """Model curve c − baseline curve b on half B, per t: one row each (nothing when they are not paired)."""
    hc, hb = c.held_out, b.held_out
    if list(c.ts) != list(b.ts) or (hc.n_measure, c.k) != (hb.n_measure, b.k) or \
            hc.best_replicates.shape != hb.best_replicates.shape:       # values at different n or k: not compared
        return []
    gap = hc.best - hb.best
    ci = stats.centred_interval(gap, hc.best_replicates - hb.best_replicates, hc.scale)
    floor = max(c.resolution(hc.n_measure), b.resolution(hb.n_measure))
    return [dict(checkpoint=c.checkpoint, baseline=baseline, kind=b.kind, metric=c.metric, encoder=c.encoder,
                 t=float(t), block=int(hc.peak[ti]), baseline_block=int(hb.peak[ti]), n_select=hc.n_select,
                 n_measure=hc.n_measure, value=float(hc.best[ti]), baseline_value=float(hb.best[ti]),
                 gap=float(gap[ti]), ci_low=float(ci[ti, 0]), ci_high=float(ci[ti, 1]), resolution=floor,
                 verdict=stats.verdict(gap[ti], ci[ti, 0], ci[ti, 1], floor), k=c.k)
            for ti, t in enumerate(c.ts)]


def baseline_gaps(results: Results) -> pd.DataFrame:
    """One row per model × baseline (of its architecture) × metric × encoder × t: the model's best block and the
    baseline's (chosen on half A), their values on half B, best − baseline with its paired 95% interval, the
    resolution, and the verdict (+1 the model beats the baseline, −1 the baseline beats it, 0 neither)."""
    records = []
    for a in results.models:
        mine = [x for x in results.analysed if x.kind in BASELINES and arch_key(x.ckpt) == arch_key(a.ckpt)]
        for c in filter(_held_out, a.curves):
            for x in mine:
                for b in x.curves:
                    if (b.metric, b.encoder) == (c.metric, c.encoder) and _held_out(b):
                        records += _gap_rows(c, b, x.name)
    return pd.DataFrame.from_records(records, columns=COLUMNS)
