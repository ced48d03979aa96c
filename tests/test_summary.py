"""Peak detection and comparison summaries on hand-built tidy tables with known answers."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from repa_probe.pipeline import COLUMNS, wilson_interval
from repa_probe.report.summary import compare_summary, deltas, peak_summary


def table(ckpt, metric, t, values, ci=None, encoder="", kind="model"):
    rows = []
    for block, v in enumerate(values):
        lo, hi = (v - ci, v + ci) if ci is not None else (math.nan, math.nan)
        rows.append(dict(checkpoint=ckpt, kind=kind, block=block, t=t, metric=metric, encoder=encoder, value=v,
                         ci_low=lo, ci_high=hi))
    return pd.DataFrame(rows, columns=COLUMNS)


def test_peak_is_the_argmax_over_blocks_and_drop_is_measured_to_the_last_block():
    #            block: 0     1     2     3     4     5
    res = table("m", "probe_top1", 0.0, [0.9, 0.41, 0.50, 0.577, 0.56, 0.50], ci=0.01)
    s = peak_summary(res).iloc[0]
    assert s["best_block"] == 3 and s["best_value"] == pytest.approx(0.577)   # block 0 is not a candidate
    assert s["last_block"] == 5 and s["last_value"] == pytest.approx(0.50)
    assert s["drop_abs"] == pytest.approx(0.077) and s["drop_rel"] == pytest.approx(0.077 / 0.577)
    assert s["peaks_then_drops"] and s["ci"]


def test_drop_inside_the_confidence_interval_is_not_called_a_drop():
    res = table("m", "cknna", 0.25, [0.1, 0.2, 0.30, 0.295], ci=0.02, encoder="dino")
    s = peak_summary(res).iloc[0]
    assert s["best_block"] == 2 and s["drop_abs"] == pytest.approx(0.005)
    assert not s["peaks_then_drops"]


def test_monotone_curve_peaks_at_the_last_block_without_a_drop():
    res = table("m", "cknna", 0.5, [0.0, 0.1, 0.2, 0.3], ci=0.001, encoder="dino")
    s = peak_summary(res).iloc[0]
    assert s["best_block"] == 3 and s["drop_abs"] == 0 and not s["peaks_then_drops"]


def test_baselines_are_not_summarised_and_curves_are_split_by_t_metric_encoder():
    res = pd.concat([
        table("m", "probe_top1", 0.0, [0, 1, 2, 1]),
        table("m", "probe_top1", 0.5, [0, 3, 2, 1]),
        table("m", "cknna", 0.0, [0, 1, 2, 3], encoder="dino"),
        table("untrained", "probe_top1", 0.0, [5, 5, 5, 5], kind="untrained"),
    ])
    s = peak_summary(res)
    assert len(s) == 3 and set(s["checkpoint"]) == {"m"}
    got = {(r.metric, r.t): r.best_block for r in s.itertuples()}
    assert got == {("probe_top1", 0.0): 2, ("probe_top1", 0.5): 1, ("cknna", 0.0): 3}
    assert not s["ci"].any()  # no intervals given: the flag says so


def test_compare_reports_where_b_beats_a():
    a = table("vanilla", "cknna", 0.0, [0.1, 0.2, 0.3, 0.3, 0.2], ci=0.01, encoder="dino")
    b = table("repa", "cknna", 0.0, [0.1, 0.5, 0.45, 0.31, 0.2], ci=0.01, encoder="dino")
    s = compare_summary(pd.concat([a, b]), "vanilla", "repa").iloc[0]
    assert s["max_delta_block"] == 1 and s["max_delta"] == pytest.approx(0.3)
    assert s["mean_delta"] == pytest.approx(np.mean([0.3, 0.15, 0.01, 0.0]))
    assert s["b_better_blocks"] == [1, 2]  # block 3's gain (0.01) is inside the intervals
    d = deltas(pd.concat([a, b]), "vanilla", "repa")
    assert d.set_index("block")["delta"].round(6).to_dict() == {0: 0.0, 1: 0.3, 2: 0.15, 3: 0.01, 4: 0.0}


def test_wilson_interval_matches_the_textbook_value():
    lo, hi = wilson_interval(50, 100)
    # Wilson 95% for p̂ = 0.5, n = 100: 0.5 ± 1.96·√(0.25/100 + 1.96²/40000)/(1 + 1.96²/100)
    z = 1.959964
    half = z * math.sqrt(0.25 / 100 + z * z / 40000) / (1 + z * z / 100)
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half))
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
