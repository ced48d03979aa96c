"""Trends over training steps (`repa-probe trajectory`, REPA Fig. 2b): each run's values at every step, and per
block group the change from the first step to the last, with a paired interval where both steps were analysed
here on the same images, noise and replicates (a training log holds values only: its change gets none).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from repa_probe import stats
from repa_probe.pipeline import COLUMNS, in_given_order


def block_groups(depth: int, n_groups: int = 4) -> list[list[int]]:
    """Blocks 1..depth in n_groups contiguous groups (e.g. 12 blocks → 1–3, 4–6, 7–9, 10–12)."""
    edges = np.linspace(0, depth, min(n_groups, depth) + 1).round().astype(int)
    return [list(range(a + 1, b + 1)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def steps_table(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The trajectory's results.csv: every run × step's rows (run, step, then pipeline.COLUMNS), runs in the
    order given, blocks ≥ 1. A training log carries no intervals: its ci_low / ci_high columns stay empty."""
    traj = pd.concat(frames, ignore_index=True).reindex(columns=["run", "step", *COLUMNS])
    traj = in_given_order(traj, "run", ["step", "metric", "t", "block"])
    return traj[traj["block"] >= 1]


def trajectory_summary(traj: pd.DataFrame, groups: list[list[int]], curves: dict | None = None,
                       seed: int = 0) -> pd.DataFrame:
    """First and last step's value per run × metric × encoder × t × block group (group mean), and, where the
    checkpoints were analysed here (`curves`: {(run, step): [Curves]}), the paired 95% interval of last −
    first: both steps saw the same images, noise and replicates, so the change is taken replicate by
    replicate. A training log holds values only: its change gets no interval."""
    rows = []
    for (run, metric, encoder, t), g in traj.groupby(["run", "metric", "encoder", "t"], sort=False):
        for group in groups:
            c = g[g["block"].isin(group)].groupby("step")["value"].mean()
            if not len(c):
                continue
            first, last = int(c.index[0]), int(c.index[-1])
            lo, hi = _change_interval(curves or {}, run, first, last, metric, encoder, t, group, seed)
            rows.append(dict(run=run, metric=metric, encoder=encoder, t=float(t), blocks=f"{group[0]}–{group[-1]}",
                             first_step=first, first=float(c.iloc[0]), last_step=last, last=float(c.iloc[-1]),
                             change=float(c.iloc[-1] - c.iloc[0]), change_ci_low=lo, change_ci_high=hi,
                             resolution=stats.resolution(c.to_numpy())))
    return pd.DataFrame(rows)


def _change_interval(curves: dict, run: str, first: int, last: int, metric: str, encoder: str, t: float,
                     group: list[int], seed: int) -> tuple[float, float]:
    def pick(step):
        found = [c for c in curves.get((run, step), []) if (c.metric, c.encoder or "") == (metric, encoder)]
        return found[0] if found else None

    a, b = pick(first), pick(last)
    if a is None or b is None or first == last:
        return float("nan"), float("nan")
    (ra, scale), (rb, _) = a.paired_replicates(seed), b.paired_replicates(seed)
    if ra is None or rb is None or ra.shape != rb.shape:
        return float("nan"), float("nan")
    ti, cols = a.ts.index(t), [a.blocks.index(blk) for blk in group]
    change = b.value[ti, cols].mean() - a.value[ti, cols].mean()
    lo, hi = stats.centred_interval(change, rb[:, ti, cols].mean(-1) - ra[:, ti, cols].mean(-1), scale)
    return float(lo), float(hi)
