"""What a reader wants first: where each curve peaks, how much it drops after, and where B beats A.

Input is the tidy results table (pipeline.Results.table(): one row per checkpoint × block × t × metric ×
encoder):

    checkpoint  kind   block  t     metric  encoder        value   ci_low  ci_high
    sit-b2      model  7      0.25  cknna   dinov2-vit-b   0.412   0.398   0.427

Blocks are numbered as in the paper: 0 = the tokens entering block 1 (patch + position embedding),
i = output of block i. `kind` says what a row measures: "model", or a baseline ("untrained", "raw-input";
the raw input has block −1). Probe metrics have an empty encoder.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from repa_probe.pipeline import COLUMNS


def validate(results: pd.DataFrame) -> pd.DataFrame:
    """Check the tidy layout and return it with canonical dtypes."""
    missing = [c for c in COLUMNS if c not in results.columns]
    if missing:
        raise ValueError(f"results table lacks columns {missing}")
    out = results[COLUMNS].copy()
    out["block"] = out["block"].astype(int)
    out["kind"] = out["kind"].astype(str)
    out["encoder"] = out["encoder"].fillna("").astype(str)
    for c in ("t", "value", "ci_low", "ci_high"):
        out[c] = out[c].astype(float)
    return out


def _curves(results: pd.DataFrame):
    """Yield ((checkpoint, metric, encoder, t), curve) for every non-baseline curve over blocks ≥ 1."""
    rows = results[(results["kind"] == "model") & (results["block"] >= 1)]
    for key, curve in rows.groupby(["checkpoint", "metric", "encoder", "t"], sort=True):
        yield key, curve.sort_values("block")


def peak_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Per checkpoint × metric × encoder × t: best block, its value, the last block's value, the drop
    after the peak (absolute: best − last; relative: (best − last)/|best|), and whether the curve
    "peaks then drops": the best block is not the last and the drop exceeds the confidence intervals
    (best's ci_low > last's ci_high). Without intervals it is only "drop > 0" and `ci` is False.
    Ties go to the earliest block. Block 0 (the embedding) is not a candidate."""
    records = []
    for (ckpt, metric, encoder, t), curve in _curves(validate(results)):
        values = curve["value"].to_numpy()
        best = int(np.argmax(values))                   # argmax returns the first maximum
        b, last = curve.iloc[best], curve.iloc[-1]
        has_ci = not (math.isnan(b["ci_low"]) or math.isnan(last["ci_high"]))
        drop = float(b["value"] - last["value"])
        separated = b["ci_low"] > last["ci_high"] if has_ci else drop > 0
        records.append(dict(
            checkpoint=ckpt, metric=metric, encoder=encoder, t=float(t),
            best_block=int(b["block"]), best_value=float(b["value"]),
            best_ci_low=float(b["ci_low"]), best_ci_high=float(b["ci_high"]),
            last_block=int(last["block"]), last_value=float(last["value"]),
            drop_abs=drop, drop_rel=drop / abs(b["value"]) if b["value"] else float("nan"),
            peaks_then_drops=bool(int(b["block"]) < int(last["block"]) and separated), ci=has_ci))
    return pd.DataFrame.from_records(records)


def compare_summary(results: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """Where checkpoint B beats A: per metric × encoder × t, the block with the largest B − A, that
    delta, the mean delta over blocks ≥ 1, and the blocks where B's ci_low > A's ci_high."""
    res = validate(results)
    A = res[res["checkpoint"] == a].set_index(["metric", "encoder", "t", "block"])["value"]
    B = res[res["checkpoint"] == b].set_index(["metric", "encoder", "t", "block"])["value"]
    lo_b = res[res["checkpoint"] == b].set_index(["metric", "encoder", "t", "block"])["ci_low"]
    hi_a = res[res["checkpoint"] == a].set_index(["metric", "encoder", "t", "block"])["ci_high"]
    both = pd.DataFrame({"a": A, "b": B, "lo_b": lo_b, "hi_a": hi_a}).dropna(subset=["a", "b"]).reset_index()
    both = both[both["block"] >= 1]
    records = []
    for (metric, encoder, t), g in both.groupby(["metric", "encoder", "t"], sort=True):
        delta = (g["b"] - g["a"]).to_numpy()
        i = int(np.argmax(delta))
        wins = g.loc[g["lo_b"] > g["hi_a"], "block"].astype(int).tolist()
        records.append(dict(a=a, b=b, metric=metric, encoder=encoder, t=float(t),
                            max_delta_block=int(g["block"].iloc[i]), max_delta=float(delta[i]),
                            mean_delta=float(delta.mean()), b_better_blocks=wins))
    return pd.DataFrame.from_records(records)


def deltas(results: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """B − A per metric × encoder × t × block (the compare report's heatmaps)."""
    res = validate(results)
    key = ["metric", "encoder", "t", "block"]
    A = res[res["checkpoint"] == a].set_index(key)["value"]
    B = res[res["checkpoint"] == b].set_index(key)["value"]
    return (B - A).dropna().rename("delta").reset_index()
