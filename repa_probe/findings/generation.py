"""Sample quality beside representation (issue 27): does the better-generating checkpoint also represent better?

Each checkpoint of a report (a model of `compare`, a run × step of `trajectory`) is one point: its sample quality,
−FD in the first FD score of gen.csv (lower FD = better samples), and each representation measure at its peak
over blocks (≥ 1) at the report's lowest t. Over those points, the rank correlation (Spearman ρ) between sample
quality and each measure, with a 95% percentile interval from a bootstrap that resamples the points: whole seeds
(every checkpoint of a seed together) where the report has three or more seeds, else single checkpoints; a
replicate that ranks nothing (one side flat) counts as ρ = 0. With
fewer than MIN_POINTS checkpoints no correlation is computed. The interval covers which checkpoints were
measured, not the images or samples each number rests on (those have intervals of their own).

In a trajectory, "does a run reach a given FD in fewer steps?" (REPA's headline): the level is the first run's FD
at its last step, each run's step is the first at which its FD is at or below that level (linear between the
two checkpoints around the crossing), and each later run's step and its ratio to the first run's come with a
95% percentile interval from a bootstrap over sample indices shared by every checkpoint (the same noise and
labels: paired), the level recomputed in every replicate. It covers which samples were drawn, not training.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from repa_probe.findings.seeds import SEED_NAME

MIN_POINTS = 4          # fewer checkpoints rank too few ways for an interval
CORR_BOOT = 2000        # replicates of the rank correlation's bootstrap (cheap: ranks of a few dozen numbers)
LEVEL = 0.95
REACH_COLUMNS = ["run", "against", "score", "N", "level", "step_against", "step", "ci_low", "ci_high", "speedup",
                 "speedup_low", "speedup_high", "n_boot"]
CORR_COLUMNS = ["score", "N", "metric", "encoder", "t", "points", "rho", "ci_low", "ci_high", "over", "units",
                "n_boot"]


def quality_score(gen: pd.DataFrame) -> str | None:
    """The FD score the correlation uses: the first one in gen.csv (FD_<encoder>, FID or sFID)."""
    fds = [s for s in dict.fromkeys(gen["score"]) if s.startswith("FD_") or s in ("FID", "sFID")]
    return fds[0] if fds else None


def point_keys(df: pd.DataFrame, trajectory: bool) -> pd.Series:
    """A checkpoint's key: its name (compare), or RUN@STEP (trajectory, whose log rows name only the run)."""
    if trajectory:
        return df["run"].astype(str) + "@" + df["step"].astype("Int64").astype(str)
    return df["checkpoint"].astype(str)


def side_by_side(gen: pd.DataFrame, table: pd.DataFrame, trajectory: bool) -> pd.DataFrame:
    """One row per checkpoint and measure: key, run, step, the FD score and its value, and the measure's peak
    value over blocks at the lowest t (the points the page draws and the correlation ranks)."""
    score = quality_score(gen)
    if score is None:
        return pd.DataFrame()
    fd = gen[gen["score"] == score].assign(key=lambda d: point_keys(d, trajectory))
    models = table[(table["block"] >= 1) & (table["kind"] == "model") if "kind" in table else table["block"] >= 1]
    models = models[models["t"] == models["t"].min()].assign(key=lambda d: point_keys(d, trajectory))
    peak = models.fillna({"encoder": ""}).groupby(["key", "metric", "encoder"], sort=False)["value"].max()
    peak = peak.rename("measure").reset_index()
    out = fd[["key", "run", "step", "checkpoint", "score", "N", "value"]].rename(columns={"value": "fd"})
    return out.merge(peak, on="key").assign(t=float(models["t"].min()))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ: the Pearson correlation of the ranks (ties get their mean rank); nan when one side is flat."""
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if np.ptp(rx) == 0 or np.ptp(ry) == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def seed_of(key: str) -> str | None:
    """The seed a checkpoint belongs to, from its run's name RECIPE-sSEED (findings/seeds.py), else None."""
    m = SEED_NAME.match(key.split("@")[0].split("/")[0])
    return m["seed"] if m else None


def rank_correlation(quality: np.ndarray, measure: np.ndarray, units: np.ndarray, seed: int = 0,
                     n_boot: int = CORR_BOOT) -> tuple[float, float, float]:
    """ρ(quality, measure) and its percentile interval, resampling whole units (seeds, or single checkpoints)
    with replacement; a replicate where one side is flat (it ranks nothing) counts as ρ = 0, which widens the
    interval towards 0 rather than dropping the replicates that would."""
    rho = spearman(quality, measure)
    names = np.unique(units)
    rows = [np.flatnonzero(units == u) for u in names]
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        pick = np.concatenate([rows[i] for i in rng.integers(0, len(names), len(names))])
        reps.append(spearman(quality[pick], measure[pick]))
    reps = np.nan_to_num(np.array(reps), nan=0.0)
    low, high = np.quantile(reps, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return rho, float(low), float(high)


def correlations(points: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per representation measure: ρ(−FD, measure) over the checkpoints with its interval (module docstring)."""
    rows = []
    if points.empty:
        return pd.DataFrame(columns=CORR_COLUMNS)
    for (metric, encoder), g in points.groupby(["metric", "encoder"], sort=False):
        g = g.dropna(subset=["fd", "measure"])
        if len(g) < MIN_POINTS:
            continue
        seeds = g["key"].map(seed_of)
        by_seed = seeds.notna().all() and seeds.nunique() >= 3
        units = (seeds if by_seed else g["key"]).to_numpy()
        rho, low, high = rank_correlation(-g["fd"].to_numpy(), g["measure"].to_numpy(), units, seed)
        rows.append(dict(score=g["score"].iloc[0], N=int(g["N"].iloc[0]), metric=metric, encoder=encoder,
                         t=float(g["t"].iloc[0]), points=len(g), rho=rho, ci_low=low, ci_high=high,
                         over="seeds" if by_seed else "checkpoints", units=len(np.unique(units)), n_boot=CORR_BOOT))
    return pd.DataFrame(rows, columns=CORR_COLUMNS)


def headline_correlation(corr: pd.DataFrame | None) -> pd.Series | None:
    """The correlation page 1 speaks of: the first alignment measure's (an encoder's), else the first."""
    if corr is None or corr.empty:
        return None
    aligned = corr[corr["encoder"] != ""]
    return (aligned if len(aligned) else corr).iloc[0]


def first_reach(steps: np.ndarray, fds: np.ndarray, level: float) -> float:
    """The first step at which the FD curve is at or below `level`, linear between the checkpoints around the
    crossing (the first checkpoint's step if it starts there); inf if it never gets there."""
    below = np.flatnonzero(fds <= level)
    if not len(below):
        return float("inf")
    i = below[0]
    if i == 0:
        return float(steps[0])
    frac = (fds[i - 1] - level) / (fds[i - 1] - fds[i])
    return float(steps[i - 1] + frac * (steps[i] - steps[i - 1]))


def steps_to_reach(runs: dict[str, dict[int, tuple[float, np.ndarray]]], score: str, n: int,
                   n_boot: int) -> pd.DataFrame:
    """{run: {step: (FD, its replicates [n_boot] on the shared resamples of sample indices)}}, the first run
    first → per later run: the step at which it reaches the first run's last FD, with its interval, beside the
    first run's own step and their ratio (module docstring)."""
    names = list(runs)
    if len(names) < 2:
        return pd.DataFrame(columns=REACH_COLUMNS)
    steps = {r: np.array(sorted(runs[r])) for r in names}
    fds = {r: np.array([runs[r][s][0] for s in steps[r]]) for r in names}
    reps = {r: np.stack([runs[r][s][1] for s in steps[r]], axis=1) if n_boot else None for r in names}   # [B, S]

    def reach(curves: dict[str, np.ndarray]) -> dict[str, float]:
        level = curves[names[0]][-1]
        return {"level": level, **{r: first_reach(steps[r], curves[r], level) for r in names}}

    full = reach(fds)
    replicates = [reach({r: reps[r][b] for r in names}) for b in range(n_boot)]
    first, out = names[0], []
    for r in names[1:]:
        got = np.array([[x[r], x[first] / x[r]] for x in replicates]) if replicates else np.full((1, 2), np.nan)
        # order statistics, not interpolated: a replicate that never reaches the level is a step of inf
        low, s_low = np.quantile(got, (1 - LEVEL) / 2, axis=0, method="lower")
        high, s_high = np.quantile(got, (1 + LEVEL) / 2, axis=0, method="higher")
        out.append(dict(run=r, against=first, score=score, N=n, level=full["level"], step_against=full[first],
                        step=full[r], ci_low=low, ci_high=high, speedup=full[first] / full[r],
                        speedup_low=s_low, speedup_high=s_high, n_boot=n_boot))
    return pd.DataFrame(out, columns=REACH_COLUMNS)
