"""Experiment 5 — the finding across training seeds (issue 25): K seeds of the vanilla / REPA pair of a preset
(each seed shared by its two arms: same init, data order, t and noise; seeds differ in all of them), analysed
together at n images with the seed-level statistics of findings/seeds.py (each seed's curve thin with the mean on
top, per-seed drops and REPA − vanilla deltas, their mean with a t-interval over seeds, "drops in k of K").

    python analyses/cifar_runs.py --preset deep --seed 1     # and --seed 2: each pair resumable, hours of CPU
    python analyses/seed_report.py --seeds 0,1,2             # → reports/seeds/

The report reads the runs' final EMA weights as exported in float16 to reports/weights/cifar_<preset>/ (committed
with their training logs, so that the analysis can be re-made without training). Its README.md is rendered from
the report's own files (summary.json, seeds.csv; `readme`): per seed and over seeds, and a claim only where the
interval over seeds makes it.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pandas as pd

from cifar_runs import PRESETS, REPO, RUNS, analysis_config, experiment_args, experiment_parser, exported
from repa_probe.commands import compare
from repa_probe.report.verdict import interval, sample, what
from repa_probe.runtime import rank, shutdown_distributed


def _cell(metric: str, r, signed: bool) -> str:
    return interval(metric, r.value, r.ci_low, r.ci_high, signed=signed).removesuffix(" points")


def seed_table(seeds: pd.DataFrame, peaks: pd.DataFrame, cfg: dict, quantity: str) -> list[str]:
    """One markdown table of seeds.csv's rows of one quantity ('drop' or 'delta'): a row per recipe × measure × t,
    each seed's value with its own interval (over images), the mean with its t-interval over seeds, k of K."""
    rows = seeds[seeds["quantity"] == quantity]
    if not len(rows):
        return []
    labels = sorted({x for x in rows["seed"] if x != "mean"}, key=int)
    head = "held-out drop after the peak" if quantity == "drop" else "at the aligned block"
    out = [f"| recipe | measure ({head}) | t | {' | '.join(f's{k} [95%, images]' for k in labels)} | "
           f"mean [95%, seeds] | {'drops' if quantity == 'drop' else 'above 0'} in |", "|---" * (len(labels) + 5) + "|"]
    for _, g in rows.groupby(["recipe", "reference", "metric", "encoder", "t"], sort=False, dropna=False):
        mean, per = g[g["seed"] == "mean"].iloc[0], {r.seed: r for r in g[g["seed"] != "mean"].itertuples()}
        metric, signed = mean["metric"], quantity == "delta"
        if quantity == "drop":
            n = peaks[(peaks["checkpoint"].isin([r.checkpoint for r in per.values()])) & (peaks["metric"] == metric)
                      & (peaks["encoder"] == mean["encoder"]) & (peaks["t"] == mean["t"])]["n_measure"].unique()
            at = sample(metric, n[0] if len(n) == 1 else float("nan"), cfg["k"])
        else:
            at = sample(metric, cfg["n"], cfg["k"])
        who = mean["recipe"] if quantity == "drop" else f"{mean['recipe']} − {mean['reference']}"
        unit = " (points)" if metric.startswith("probe") else ""
        out.append(f"| {who} | {what(metric, mean['encoder'])}{unit}{f' ({at})' if at else ''} | {mean['t']:g} | "
                   + " | ".join(_cell(metric, per[k], signed) if k in per else "–" for k in labels)
                   + f" | **{_cell(metric, mean, signed)}** | {mean['seeds_positive']} of {mean['n_seeds']} |")
    return out


def readme(out: Path, command: str) -> str:
    """OUT/README.md from the report's own files (summary.json, seeds.csv): no number typed."""
    summary = json.loads((out / "summary.json").read_text())
    text = {"seed": str, "encoder": str, "reference": str}
    seeds = pd.read_csv(out / "seeds.csv", dtype=text).fillna({"encoder": "", "reference": ""})
    cfg, groups, peaks = summary["config"], summary["seeds"]["groups"], pd.DataFrame(summary["peaks"])
    preset = next((name for name, p in PRESETS.items() if f"preset {name}:" in " ".join(cfg["notes"])), "deep")
    p = PRESETS[preset]
    k = min(len(s) for s in groups.values())
    lines = [f"# The finding over {k} training seeds ({', '.join(groups)})", "",
             f"The `{preset}` preset of analyses/cifar_runs.py ({p['depth']} blocks of width {p['width']}, patch "
             f"{p['model'].rsplit('/', 1)[1]}, {p['steps']:,} steps of {p['batch']} CIFAR-10 images; REPA λ "
             f"{RUNS['repa'][0]:g} at block {p['repa_depth']} against the "
             "bundled teacher `cifar-ssl-resnet`), trained once per seed: within a seed both arms start from the same "
             "SiT and see the same images, t and noise; seeds differ in all of them. Each seed gives one estimate with "
             "its own interval over the test images; the claim about the recipe rests on the mean over seeds and its "
             f"Student-t interval ({k - 1} degrees of freedom), and is made only where that interval excludes 0 "
             "(docs/statistics.md).", "", "    " + command, "",
             f"n = {cfg['n']:,} images of `{cfg['data']}`, k = {cfg['k']} (CKNNA), probes fitted on "
             + (f"{cfg['probe_n_train'] or cfg['n']:,} images of `{cfg['probe_train']}`" if cfg["probe_train"] else
                "4/5 of them") + f", t ∈ {{{', '.join(f'{t:g}' for t in cfg['ts'])}}}. Weights: the final EMA "
             f"weights in fp16, `reports/weights/cifar_{preset}/` ({', '.join(n for s in groups.values() for n in s.values())}"
             "; sha256 in SHA256SUMS, training logs and configs beside them).", "", "## Page 1", ""]
    lines += [f"- {sentence}" for sentence in summary["overview"]]
    lines += ["", "## Peak, then drop: each seed and the mean over seeds", ""] + seed_table(seeds, peaks, cfg, "drop")
    lines += ["", "## REPA − vanilla at the aligned block, seed pair by seed pair", ""]
    lines += seed_table(seeds, peaks, cfg, "delta")
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    parser = experiment_parser(__doc__)
    parser.set_defaults(preset="deep")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated (default 0,1,2)")
    parser.add_argument("--out", default=None, help="report folder (default reports/seeds, or seeds_<preset>)")
    a = experiment_args(__doc__, parser)
    seeds = [int(s) for s in a.seeds.split(",")]
    weights = {}
    for seed in seeds:
        weights |= exported(a.preset, seed)
    order = [f"{arm}-s{s}" for arm in ("vanilla", "repa") for s in seeds]   # vanilla first: deltas against it
    out = a.out or REPO / "reports" / ("seeds" if a.preset == "deep" else f"seeds_{a.preset}")
    start = time.perf_counter()
    # the finding is the probe's and CKNNA's peak and REPA's lift; the SRA view's matrices would only cost time here
    config = analysis_config(a.preset, a.n, bootstrap=20, self_similarity=False)
    report = compare([os.path.relpath(weights[name]) for name in order], config, str(out))
    if rank() == 0:                      # under torchrun (`torchrun ... seed_report.py -- --seeds ...`) rank 0 writes
        (Path(out) / "README.md").write_text(readme(Path(out), "python analyses/seed_report.py "
                                                    + " ".join(sys.argv[1:])))
        print(report, f"{time.perf_counter() - start:.0f} s")
    shutdown_distributed()
