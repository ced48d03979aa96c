"""'The best block beats the baseline', held out and paired (findings/baselines.py), on simulated probe hits with
known answers: no block better than the baseline, or one block planted better."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_config
from repa_probe.families.sit import as_checkpoint
from repa_probe.findings.baselines import baseline_gaps
from repa_probe.models import SiT
from repa_probe import stats
from repa_probe.pipeline import AnalyzeConfig, Analysed, Curves, HeldOut, Results
from repa_probe.report.compose import summarise

DEPTH, N = 8, 400


@pytest.fixture(scope="module")
def ckpt():
    return as_checkpoint(SiT(tiny_config(depth=DEPTH, z_dims=[], encoder_depth=0)))


def held_out(hits: np.ndarray, blocks: list[int], labels: np.ndarray) -> HeldOut:
    """A source's held-out best block from simulated per-image hits [T, B, n] of fixed probes: chosen on half A of
    the images, measured on half B with 1,000 resamples of B (the same for every source: paired)."""
    half_a, half_b = stats.halves(labels, 0)
    peaks = stats.argmax_blocks(hits[..., half_a].mean(axis=-1), blocks)
    t = np.arange(len(peaks))
    best, last = (hits[t, i][:, half_b].astype(np.float64) for i in (peaks, -1))          # [T, n_b]
    counts = stats.draw_counts(len(half_b), 1000, 0) / len(half_b)
    drop = (best - last).mean(axis=-1)
    return HeldOut([blocks[p] for p in peaks], drop, stats.centred_interval(drop, counts @ (best - last).T),
                   len(half_a), len(half_b), best.mean(axis=-1), counts @ best.T)


def probe(name: str, kind: str, hits: np.ndarray, blocks: list[int], labels: np.ndarray) -> Curves:
    return Curves(name, kind, "probe_top1", "", [0.0], blocks, hits.mean(-1), hits=hits,
                  held_out=held_out(hits, blocks, labels))


def simulated(ckpt, seed: int, lift: float = 0.0) -> Results:
    """A model whose DEPTH blocks each classify N test images right at rate 0.5 independently (the worst case for
    picking the best: nothing shared between blocks), and a raw thumbnail at the same rate; `lift` raises block 3."""
    rng = np.random.default_rng(seed)
    labels = np.arange(N) % 10
    hits = rng.random((1, DEPTH + 1, N)) < 0.5
    hits[0, 3] = rng.random(N) < 0.5 + lift
    thumb = rng.random((1, 1, N)) < 0.5
    model = probe("m", "model", hits, list(range(DEPTH + 1)), labels)
    baseline = probe("raw thumbnail", "raw-thumbnail", thumb, [-1], labels)
    return Results(AnalyzeConfig(data="unused"), [Analysed("m", "model", ckpt, [model]),
                                                  Analysed("raw thumbnail", "raw-thumbnail", ckpt, [baseline])], [], {})


def test_picking_the_best_block_does_not_make_it_beat_an_equal_baseline_beyond_the_nominal_rate(ckpt):
    """Under no effect the best of 8 blocks is above the baseline's value in ~8 of 9 analyses: page 1's old point
    comparison said 'the best block beats every baseline' that often. Chosen on half A and measured, paired, on
    half B, 'beats' is claimed at about the nominal one-sided 2.5% (≤ 5% of 200 seeds), and page 1 says so only
    then (its sentence read on the first 50 seeds)."""
    claimed, point, said = [], [], []
    for seed in range(200):
        res = simulated(ckpt, seed)
        claimed.append(baseline_gaps(res)["verdict"].iloc[0] > 0)
        model, thumbnail = (a.curves[0].value[0] for a in res.analysed)
        point.append(model[1:].max() > thumbnail.max())                      # blocks ≥ 1 vs the baseline's value
        if seed < 50:
            said.append("best block beats" in summarise(res)[0]["overview"][-1])
    assert np.mean(point) > 0.8                       # the point comparison: nearly always 'beats'
    assert np.mean(claimed) <= 0.05 and np.mean(said) <= 0.05 and said == claimed[:50]


def test_a_block_planted_better_beats_the_baseline_with_a_paired_interval_that_covers_the_lift(ckpt):
    hits, covered = [], []
    for seed in range(40):
        gap = baseline_gaps(simulated(ckpt, seed, lift=0.15)).iloc[0]
        hits.append(gap["verdict"] > 0 and gap["block"] == 3)
        covered.append(gap["ci_low"] <= 0.15 <= gap["ci_high"])
        assert gap["n_select"] == gap["n_measure"] == N // 2 and gap["baseline_block"] == -1
    assert np.mean(hits) >= 0.75 and np.mean(covered) >= 0.85
