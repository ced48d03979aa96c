"""Claims about a training recipe, not about one checkpoint: statistics over training seeds.

Every other interval of a report is over images, given the checkpoints: "peaks, then drops" and "REPA − vanilla"
then describe two files. When a report holds several seeds of one recipe, each seed gives one paired estimate
(its held-out drop after the peak; its REPA − vanilla at the aligned block, seed K of each arm paired), and the
recipe's claim rests on their mean with a t-interval over seeds (K − 1 degrees of freedom): the seeds are the
replicates. The claim is made only when that interval excludes 0 (and the mean exceeds the resolution), however
many seeds' own intervals do; "drops in k of K seeds" counts the seeds whose own interval says so.

Seeds are grouped by name, RECIPE-sSEED (`vanilla-s0`, `repa-s1`; for a run's checkpoint named RUN/STEP, the
run's name: `vanilla-s0/0005000`), or explicitly (`seed_groups={"vanilla": ["a", "b", "c"], ...}` in the Python
API: the i-th name of each recipe is seed i). A recipe with fewer than two seeds, or with one seed named twice
(two steps of one run), is no group.
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from repa_probe import stats
from repa_probe.errors import UserError
from repa_probe.pipeline import Results
from repa_probe.findings.summary import compare_summary

SEED_NAME = re.compile(r"^(?P<recipe>.+)-s(?P<seed>\d+)$")
COLUMNS = ["quantity", "recipe", "reference", "metric", "encoder", "t", "seed", "checkpoint", "block", "value",
           "ci_low", "ci_high", "resolution", "verdict", "seeds_positive", "seeds_negative", "n_seeds"]
Groups = dict[str, dict[int, str]]            # recipe → {seed: checkpoint name}


def groups_by_name(names: Sequence[str]) -> Groups:
    """{recipe: {seed: name}} from names RECIPE-sSEED (or RECIPE-sSEED/STEP), for recipes with ≥ 2 distinct seeds."""
    found: dict[str, list[tuple[int, str]]] = {}
    for name in names:
        if m := SEED_NAME.match(name.split("/")[0]):
            found.setdefault(m["recipe"], []).append((int(m["seed"]), name))
    return {r: dict(sorted(s)) for r, s in found.items() if len(s) >= 2 and len({k for k, _ in s}) == len(s)}


def check_groups(groups: object, names: Sequence[str]) -> Groups:
    """An explicit grouping {recipe: [name of seed 0, name of seed 1, ...]} checked against the models' names."""
    arg = f"seed_groups={groups!r}"
    if not isinstance(groups, Mapping) or not all(isinstance(v, (list, tuple)) for v in groups.values()):
        raise UserError(f"{arg}: pass a dict {{recipe: [checkpoint name of seed 0, of seed 1, ...]}}")
    listed = [n for v in groups.values() for n in v]
    for name in listed:
        if name not in names:
            raise UserError(f"{arg}: '{name}' is not one of the models' names {list(names)}")
    if len(set(listed)) != len(listed):
        raise UserError(f"{arg}: a checkpoint is named twice; each belongs to one recipe, once")
    if any(len(v) < 2 for v in groups.values()):
        raise UserError(f"{arg}: a recipe needs at least two seeds for an interval over seeds")
    return {str(r): dict(enumerate(v)) for r, v in groups.items()}


def seed_groups(results: Results) -> Groups:
    """The report's seed groups: the config's explicit `seed_groups`, else by name (RECIPE-sSEED)."""
    names = [a.name for a in results.models]
    explicit = results.config.seed_groups
    return check_groups(explicit, names) if explicit is not None else groups_by_name(names)


def t_interval(values: Sequence[float], level: float = stats.LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): the mean of K values with its Student-t interval, K − 1 degrees of freedom
    (mean ± t_{K−1} · s/√K, s the sample standard deviation); NaN for fewer than two values or any NaN."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2 or not np.isfinite(v).all():
        return math.nan, math.nan, math.nan
    half = sps.t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def _seed_row(keys: dict, seed: int, checkpoint: str, block, value, low, high, floor: float, sign: int) -> dict:
    """One seed's estimate with its own interval (over images) and verdict; it counts as one seed."""
    return dict(keys, seed=str(seed), checkpoint=checkpoint, block=block, value=float(value), ci_low=float(low),
                ci_high=float(high), resolution=floor, verdict=sign, seeds_positive=int(sign > 0),
                seeds_negative=int(sign < 0), n_seeds=1)


def _mean_row(rows: list[dict], **keys) -> dict:
    """The seed-level row over per-seed rows: mean with its t-interval, the verdict on it (the resolution is the
    coarsest of the seeds'), and how many seeds' own verdicts are positive and negative."""
    mean, lo, hi = t_interval([r["value"] for r in rows])
    floor = max(r["resolution"] for r in rows)
    blocks = {r["block"] for r in rows}
    return dict(keys, seed="mean", checkpoint="", block=blocks.pop() if len(blocks) == 1 else math.nan, value=mean,
                ci_low=lo, ci_high=hi, resolution=floor, verdict=stats.verdict(mean, lo, hi, floor) if lo == lo else 0,
                seeds_positive=sum(r["seeds_positive"] for r in rows),
                seeds_negative=sum(r["seeds_negative"] for r in rows), n_seeds=len(rows))


def seed_drops(results: Results, peaks: pd.DataFrame, groups: Groups) -> list[dict]:
    """Per recipe × metric × encoder × t: each seed's held-out drop after its peak (peak_summary), then the mean;
    nothing for a measure without a held-out drop (the SRA view's curves)."""
    out = []
    for recipe, seeds in groups.items():
        mine = peaks[peaks["checkpoint"].isin(seeds.values())]
        for (metric, encoder, t), g in mine.groupby(["metric", "encoder", "t"], sort=False):
            by_name = {r.checkpoint: r for r in g.itertuples()}
            if set(by_name) != set(seeds.values()) or g["selected_block"].isna().all():
                continue
            keys = dict(quantity="drop", recipe=recipe, reference="", metric=metric, encoder=encoder, t=float(t))
            rows = []
            for seed, name in seeds.items():
                r, c = by_name[name], results.curves(name, metric, encoder)
                floor = c.resolution(int(r.n_measure) or None)
                sign = int(r.peaks_then_drops) - int(r.rises_after_peak)
                rows.append(_seed_row(keys, seed, name, r.selected_block, r.drop_after, r.drop_ci_low,
                                      r.drop_ci_high, floor, sign))
            out += rows + [_mean_row(rows, **keys)]
    return out


def seed_deltas(results: Results, groups: Groups, aligned: dict[str, int]) -> list[dict]:
    """Per recipe × metric × encoder × t: B − A at the aligned block for each seed K present in both the reference
    recipe A (the first model's, else the first group's) and recipe B, paired as A-sK / B-sK, then their mean."""
    first = results.models[0].name
    ref = next((r for r, s in groups.items() if first in s.values()), next(iter(groups), None))
    out = []
    for recipe, seeds in groups.items():
        common = [k for k in seeds if k in groups[ref]] if recipe != ref else []
        if len(common) < 2:
            continue
        per_seed = {}
        for k in common:
            a, b = groups[ref][k], seeds[k]
            block = aligned.get(b, aligned.get(a))
            if block is not None:
                per_seed[k] = compare_summary(results, a, b, block)
        if len(per_seed) < 2:
            continue
        out += _delta_rows(results, ref, recipe, groups, per_seed)
    return out


def _delta_rows(results: Results, ref: str, recipe: str, groups: Groups, per_seed: dict) -> list[dict]:
    """seed_deltas' rows for one pair of recipes, from each seed pair's compare_summary: per measure and t where
    every seed pair has a difference at the aligned block."""
    out = []
    first = next(iter(per_seed.values()))
    for (metric, encoder, t), _ in first.groupby(["metric", "encoder", "t"], sort=False):
        keys = dict(quantity="delta", recipe=recipe, reference=ref, metric=metric, encoder=encoder, t=float(t))
        found = {k: comp[(comp["metric"] == metric) & (comp["encoder"] == encoder) & (comp["t"] == t)]
                 for k, comp in per_seed.items()}
        if any(len(r) != 1 or r["aligned_delta"].isna().iloc[0] for r in found.values()):
            continue
        rows = []
        for k, r in ((k, r.iloc[0]) for k, r in found.items()):
            a, b = groups[ref][k], groups[recipe][k]
            floor = max(results.curves(n, metric, encoder).resolution() for n in (a, b))
            sign = stats.verdict(r["aligned_delta"], r["aligned_ci_low"], r["aligned_ci_high"], floor)
            rows.append(_seed_row(keys, k, f"{b} − {a}", int(r["aligned_block"]), r["aligned_delta"],
                                  r["aligned_ci_low"], r["aligned_ci_high"], floor, sign))
        out += rows + [_mean_row(rows, **keys)]
    return out


def seed_table(results: Results, peaks: pd.DataFrame, aligned: dict[str, int]) -> tuple[Groups, pd.DataFrame]:
    """(the seed groups, seeds.csv: per-seed drops and deltas, each followed by its seed-level 'mean' row)."""
    groups = seed_groups(results)
    rows = seed_drops(results, peaks, groups) + seed_deltas(results, groups, aligned) if groups else []
    return groups, pd.DataFrame.from_records(rows, columns=COLUMNS)


def mean_curves(table: pd.DataFrame, groups: Groups, metric: str, encoder: str) -> pd.DataFrame:
    """Each recipe's curve over blocks, the mean over its seeds with the t-interval over seeds, per t and block
    (results.csv rows of the seeds' checkpoints) → [recipe, t, block, value, ci_low, ci_high]."""
    rows = table[(table["metric"] == metric) & (table["encoder"] == encoder) & (table["kind"] == "model")]
    out = []
    for recipe, seeds in groups.items():
        mine = rows[rows["checkpoint"].isin(seeds.values())]
        for (t, block), g in mine.groupby(["t", "block"]):
            if len(g) == len(seeds):
                out.append((recipe, t, block, *t_interval(g["value"])))
    return pd.DataFrame(out, columns=["recipe", "t", "block", "value", "ci_low", "ci_high"])
