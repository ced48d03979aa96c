"""Sample quality beside representation (issue 27): does the better-generating checkpoint also represent better?

Each checkpoint of a report (a model of `compare`, a run × step of `trajectory`) is one point: its sample quality,
−FD in the first FD score of gen.csv (lower FD = better samples), and each representation measure at its peak
over blocks (≥ 1) at the report's lowest t. Over those points, the rank correlation (Spearman ρ) between sample
quality and each measure, with a 95% percentile interval from a bootstrap that resamples the points: whole seeds
(every checkpoint of a seed together) where the report has three or more seeds, else single checkpoints; a
replicate that ranks nothing (one side flat) counts as ρ = 0. With
fewer than MIN_POINTS checkpoints no correlation is computed. The interval covers which checkpoints were
measured, not the images or samples each number rests on (those have intervals of their own).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from repa_probe.findings.seeds import SEED_NAME

MIN_POINTS = 4          # fewer checkpoints rank too few ways for an interval
CORR_BOOT = 2000        # replicates of the rank correlation's bootstrap (cheap: ranks of a few dozen numbers)
LEVEL = 0.95
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
