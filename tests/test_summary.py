"""Peak, drop and comparison summaries on hand-built curves with known answers."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

import repa_probe
from conftest import tiny_config
from repa_probe import stats
from repa_probe.findings.summary import block_ranges, compare_summary, paired_deltas, peak_summary
from repa_probe.models import SiT
from repa_probe.errors import UserError
from repa_probe.pipeline import AnalyzeConfig, Analysed, Curves, HeldOut, Results, probe_draws, wilson_interval
from repa_probe.report.compose import headline, summary_table
from repa_probe.report.verdict import compare_sentence, detail_lines


def curve(name, metric, values, replicates=None, held_out=None, kind="model", encoder="", null=None):
    values = np.asarray(values, dtype=float)[None]                       # one t
    ci = np.stack([values - 0.01, values + 0.01], axis=-1)
    return Curves(name, kind, metric, encoder, [0.0], list(range(values.shape[1])), values, ci,
                  None if replicates is None else np.asarray(replicates, dtype=float)[:, None], None, null=null,
                  held_out=held_out)


def results(*analysed) -> Results:
    return Results(AnalyzeConfig(data="unused"), list(analysed), [], {})


def test_peak_is_the_argmax_over_blocks_and_its_frequency_comes_from_the_replicates():
    #         block: 0    1     2     3      4     5
    values = [0.9, 0.41, 0.50, 0.577, 0.56, 0.50]
    reps = [values, [0.9, 0.41, 0.58, 0.577, 0.56, 0.50], [0.9, 0.41, 0.50, 0.577, 0.60, 0.50], values]
    ho = HeldOut([3], np.array([0.07]), np.array([[0.03, 0.11]]), 50, 50)
    s = peak_summary(results(Analysed("m", "model", None, [curve("m", "cknna", values, reps, ho)]))).iloc[0]
    assert s["best_block"] == 3 and s["best_value"] == pytest.approx(0.577)   # block 0 is not a candidate
    assert s["best_frequency"] == pytest.approx(0.5)
    assert s["last_block"] == 5 and s["drop_all"] == pytest.approx(0.077)
    assert s["selected_block"] == 3 and s["drop_after"] == pytest.approx(0.07) and s["peaks_then_drops"]


@pytest.mark.parametrize("ci, selected, verdict", [((-0.01, 0.05), 3, False), ((0.01, 0.05), 5, False),
                                                    ((0.01, 0.05), 3, True)])
def test_a_drop_is_claimed_only_when_its_held_out_interval_is_above_zero_after_a_peak_before_the_end(
        ci, selected, verdict):
    ho = HeldOut([selected], np.array([0.02]), np.array([ci]), 50, 50)
    s = peak_summary(results(Analysed("m", "model", None, [curve("m", "probe_top1", [0, .1, .2, .3, .25, .2],
                                                                 held_out=ho)]))).iloc[0]
    assert s["peaks_then_drops"] == verdict


def test_baselines_are_not_summarised_and_blocks_above_the_null_are_counted():
    null = np.zeros((20, 1, 4))
    null[:, 0, 2] = 0.5                            # block 2's null reaches above its interval
    res = results(Analysed("m", "model", None, [curve("m", "cknna", [0, .3, .3, .3], null=null, encoder="e")]),
                  Analysed("untrained", "untrained", None, [curve("untrained", "cknna", [.5] * 4, kind="untrained",
                                                                  encoder="e")]))
    s = peak_summary(res)
    assert len(s) == 1 and s["checkpoint"].iloc[0] == "m"
    assert (s["blocks_above_null"].iloc[0], s["blocks_with_null"].iloc[0]) == (2, 3)


def test_paired_deltas_take_the_difference_replicate_by_replicate():
    """B's replicates move with A's (the same images): their difference is nearly constant, so the paired
    interval is narrow although each curve's own replicates spread widely."""
    rng = np.random.default_rng(0)
    shared = rng.normal(scale=0.1, size=(200, 1))
    a_reps = 0.3 + shared + np.zeros((1, 5))
    b_reps = a_reps + np.array([0, 0.1, 0.05, 0.0, -0.04]) + rng.normal(scale=0.002, size=(200, 5))
    a = curve("vanilla", "cknna", a_reps.mean(0), a_reps, encoder="e")
    b = curve("repa", "cknna", b_reps.mean(0), b_reps, encoder="e")
    res = results(Analysed("vanilla", "model", None, [a]), Analysed("repa", "model", None, [b]))
    d = paired_deltas(res, "vanilla", "repa").set_index("block")
    assert d.loc[1, "delta"] == pytest.approx(0.1, abs=0.002)
    assert (d["ci_high"] - d["ci_low"]).max() < 0.02          # a marginal interval is ≈ 0.4 wide
    c = compare_summary(res, "vanilla", "repa", aligned_block=2).iloc[0]
    assert c["b_better_blocks"] == [1, 2] and c["b_worse_blocks"] == [4] and c["max_delta_block"] == 1
    assert c["aligned_delta"] == pytest.approx(0.05, abs=0.002) and c["aligned_ci_low"] > 0


def test_probe_deltas_are_paired_over_the_same_test_images():
    """Probe replicates draw the same test images for every checkpoint (pipeline.probe_draws): B − A is taken
    replicate by replicate."""
    hits_a = np.zeros((1, 3, 400), dtype=bool)
    hits_a[..., :200] = True
    hits_b = hits_a.copy()
    hits_b[0, 2, 200:240] = True                   # B gets 40 more images right at block 2, the others alike
    counts = probe_draws(400, 400, 200, 0)[1]

    def probe_curve(name, hits):
        reps = np.moveaxis(hits @ counts.T / 400, -1, 0)                        # [R, T, B]
        return Curves(name, "model", "probe_top1", "", [0.0], [0, 1, 2], hits.mean(-1), replicates=reps,
                      scale=np.ones(len(reps)), hits=hits)

    ca, cb = probe_curve("a", hits_a), probe_curve("b", hits_b)
    d = paired_deltas(results(Analysed("a", "model", None, [ca]), Analysed("b", "model", None, [cb])), "a", "b")
    d = d.set_index("block")
    assert d.loc[2, "delta"] == pytest.approx(0.1) and d.loc[2, "ci_low"] > 0.06
    assert d.loc[1, "ci_low"] == d.loc[1, "ci_high"] == 0.0  # identical hits: no difference in any resample


def test_block_ranges_read_like_a_sentence():
    assert block_ranges([4, 5, 6, 9]) == "4–6, 9" and block_ranges([]) == "none" and block_ranges([2]) == "2"


def test_wilson_interval_matches_the_textbook_value():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)


def inside(values, low, high) -> bool:
    values, low, high = (np.asarray(x, dtype=float) for x in (values, low, high))
    return bool(((low <= values) & (values <= high)).all())


def test_flat_and_rounding_noise_curves_make_no_peak_drop_or_difference():
    """Blocks and checkpoints equal (exactly, or but for 1e-9 of rounding noise, whose replicates move
    together): no drop after a peak, no better or worse block; the peak is the earliest of the tied blocks."""
    rng = np.random.default_rng(0)
    shared = rng.normal(scale=0.05, size=(200, 1))                  # the images' own spread, shared by all
    flat = 0.3 + shared + np.zeros((1, 5))
    noisy = flat + 1e-9 * np.array([0, 1, 3, 2, 0.5]) + rng.normal(scale=1e-11, size=(200, 5))
    for b_reps in (flat, noisy):
        drop = float(np.median(b_reps[:, 2] - b_reps[:, -1]))
        ho = HeldOut([2], np.array([drop]), stats.centred_interval(np.array([drop]), b_reps[:, 2:3] - b_reps[:, -1:]),
                     100, 100)
        a = curve("vanilla", "cknna", np.median(flat, 0), flat, encoder="e")
        b = curve("repa", "cknna", np.median(b_reps, 0), b_reps, held_out=ho, encoder="e")
        res = results(Analysed("vanilla", "model", None, [a]), Analysed("repa", "model", None, [b]))
        p = peak_summary(res).set_index("checkpoint").loc["repa"]
        assert p["best_block"] == 1 and not p["peaks_then_drops"] and not p["rises_after_peak"]
        assert inside(p["drop_after"], p["drop_ci_low"], p["drop_ci_high"])
        rises = peak_summary(res).assign(drop_ci_high=-1e-12)     # an interval below 0, by a rounding-sized rise
        assert not any("rises" in line or "drops" in line for line in headline(rises))
        c = compare_summary(res, "vanilla", "repa", aligned_block=2).iloc[0]
        assert c["b_better_blocks"] == [] and c["b_worse_blocks"] == []
        d = paired_deltas(res, "vanilla", "repa")
        assert inside(d["delta"], d["ci_low"], d["ci_high"]) and (d["resolution"] == stats.RTOL).all()


def test_a_real_analysis_of_blocks_equal_but_for_rounding_claims_nothing(cifar_dir, tmp_path):
    """Two untrained adaLN-Zero SiTs whose gates are ~1e-5 instead of 0: every block is its input but for a
    trace, and CKNNA agrees across blocks and checkpoints to ~1e-9. Before the resolution floor and the
    median-centred interval, this reported "peaks, then drops" on a 1e-9 drop that lay outside its interval."""
    cfg = tiny_config(z_dims=[], encoder_depth=0)

    def near_identity(seed: int) -> SiT:
        torch.manual_seed(0)
        model = SiT(cfg)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for block in model.blocks:
                bias = block.adaLN_modulation[-1].bias
                bias.copy_(1e-5 * torch.randn(bias.shape, generator=g))
        return model

    a = repa_probe.analyze([near_identity(1), near_identity(2)], data=str(cifar_dir / "test"),
                           encoders="cifar-ssl-resnet", ts=0, names=["a", "b"], blocks="blocks", convention="sit",
                           image_size=16, num_classes=10, n=300, k=5, bootstrap=20, null=2, baselines=False,
                           quiet=True, cache=str(tmp_path / "cache"))
    p = peak_summary(a.results)
    held = p[p["selected_block"].notna()]           # the curves with a held-out drop (the SRA view's have none)
    assert len(held) and (held["drop_after"].abs() < 1e-8).all()    # the blocks are equal but for rounding
    assert not p["peaks_then_drops"].any() and not p["rises_after_peak"].any()
    assert inside(held["drop_after"], held["drop_ci_low"], held["drop_ci_high"])
    assert inside(p["best_value"], p["best_ci_low"], p["best_ci_high"])
    c = compare_summary(a.results, "a", "b", aligned_block=1)
    assert all(blocks == [] for blocks in c["b_better_blocks"]) and all(blocks == [] for blocks in c["b_worse_blocks"])
    d = paired_deltas(a.results, "a", "b")
    assert inside(d["delta"], d["ci_low"], d["ci_high"])
    t = a.table
    assert inside(t["value"], t["ci_low"], t["ci_high"])


def test_a_training_trend_within_the_resolution_is_no_change():
    from repa_probe.findings.trends import trajectory_summary
    from repa_probe.report.verdict import trend_word
    rows = [dict(run="r", step=s, block=b, t=0.0, metric="cknna", encoder="e", value=0.4 + 1e-9 * s * b)
            for s in (100, 200) for b in (1, 2)]
    trend = trajectory_summary(pd.DataFrame(rows), [[1, 2]])
    assert trend_word(next(trend.itertuples())).startswith("unchanged")
    rows = [{**r, "value": r["value"] + 1e-3 * (r["step"] == 200)} for r in rows]
    assert trend_word(next(trajectory_summary(pd.DataFrame(rows), [[1, 2]]).itertuples())).startswith("higher")


def test_values_measured_at_different_n_are_not_compared():
    """CKNNA at 5,000 images is not CKNNA at 10,000 (about n^−0.5 at fixed k): B − A across them is refused."""
    a = dataclasses.replace(curve("a", "cknna", [0.0, 0.02, 0.01], encoder="e"), n=10_000, k=10)
    b = dataclasses.replace(a, checkpoint="b", n=5_000)
    res = results(Analysed("a", "model", None, [a]), Analysed("b", "model", None, [b]))
    with pytest.raises(UserError, match=r"a and b: cknna vs e was measured at n = 10000, k = 10 and at n = 5000"):
        paired_deltas(res, "a", "b")
    same = results(Analysed("a", "model", None, [a]),
                   Analysed("b", "model", None, [dataclasses.replace(b, n=10_000)]))
    assert set(paired_deltas(same, "a", "b")["n"]) == {10_000}


def test_the_held_out_drop_is_printed_with_its_own_n_and_the_two_values_it_is_the_difference_of():
    """The curve (all 10,000 images) peaks at 0.016 and its last block is 0.010: a fall of 0.006 at n = 10,000.
    The held-out drop is measured on the other 5,000 images, where the same blocks are 0.019 and 0.009: 0.010.
    Each number is printed beside its own n, the drop beside the two values it is the difference of."""
    ho = HeldOut([2], np.array([0.010]), np.array([[0.007, 0.013]]), 5000, 5000, best=np.array([0.019]))
    c = dataclasses.replace(curve("repa", "cknna", [0.005, 0.012, 0.016, 0.010], held_out=ho, encoder="e"),
                            n=10_000, k=10)
    p = peak_summary(results(Analysed("repa", "model", None, [c])))
    r = p.iloc[0]
    assert (r["n"], r["k"], r["n_measure"]) == (10_000, 10, 5000)
    assert (r["measure_peak_value"], r["measure_last_value"]) == pytest.approx((0.019, 0.009))
    (line,) = headline(p)
    assert "peaks at block 2, 0.016 (n = 10,000, k = 10; the best block in" not in line    # no replicates here
    assert "peaks at block 2, 0.016 (n = 10,000, k = 10); " in line
    assert "block 2 (the peak on 5000 selection images) − block 3 on the other 5000 images (k = 10: 0.019 − " \
           "0.009): +0.010 [0.007, 0.013] (paired 95%)" in line
    row = summary_table(p).iloc[0]
    assert row["n, k"] == "n = 10,000, k = 10" and row["held-out drop [paired 95%]"].startswith(
        "block 2 on n = 5,000 (k = 10: 0.019 − 0.009): +0.010")


def test_page_1_and_2_name_the_blocks_where_b_is_better_from_the_simultaneous_band():
    """Five blocks × one t, B − A = 0.02 at block 1 and 0.005 at block 3, its replicates' sd 0.002: pointwise
    (± t₁₉·0.002 = ± 0.0042) blocks 1 and 3 are better; over the five blocks at once (± 2.86·0.002 = ± 0.0057)
    only block 1."""
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(20, 6))
    noise = 0.002 * (noise - noise.mean(0)) / noise.std(0, ddof=1)
    delta = np.array([0, 0.02, 0, 0.005, 0, 0])
    a_reps = 0.3 + rng.normal(scale=0.05, size=(20, 1)) + np.zeros((1, 6))
    a = curve("vanilla", "cknna", np.full(6, 0.3), a_reps, encoder="e")
    b = curve("repa", "cknna", 0.3 + delta, a_reps + delta + noise, encoder="e")
    res = results(Analysed("vanilla", "model", None, [a]), Analysed("repa", "model", None, [b]))
    c = compare_summary(res, "vanilla", "repa", aligned_block=3)
    r = c.iloc[0]
    assert r["b_better_blocks_pointwise"] == [1, 3] and r["b_better_blocks"] == [1] and r["b_worse_blocks"] == []
    assert r["aligned_ci_low"] > 0                  # the aligned block alone: fixed in advance, pointwise
    d = paired_deltas(res, "vanilla", "repa")
    assert (d["sim_cells"] == 5).all() and (d["sim_high"] - d["sim_low"] > d["ci_high"] - d["ci_low"]).all()
    pairs = [("cknna", "e")]
    assert "repa is better at block 1 in CKNNA" in compare_sentence(c, pairs, 0.0)
    (line,) = detail_lines(pd.DataFrame(), c, pd.DataFrame(columns=["t", "metric", "encoder", "kind"]), 0.0)
    assert "better at block 1, worse at no block (jointly over blocks × t)" in line
