"""Experiment 5 — the finding across training seeds (issue 25): K seeds of the vanilla / REPA pair of a preset
(each seed shared by its two arms: same init, data order, t and noise; seeds differ in all of them), analysed
together at n images with the seed-level statistics of findings/seeds.py (each seed's curve thin with the mean on
top, per-seed drops and REPA − vanilla deltas, their mean with a t-interval over seeds, "drops in k of K").

    python analyses/cifar_runs.py --preset deep --seed 1     # and --seed 2: each pair resumable, hours of CPU
    python analyses/seed_report.py --seeds 0,1,2             # → reports/seeds/

The report reads the runs' final EMA weights as exported in float16 to reports/weights/cifar_<preset>/ (committed
with their training logs, so that the analysis can be re-made without training).
"""
from __future__ import annotations

import os
import time

from cifar_runs import REPO, analysis_config, experiment_args, experiment_parser, exported
from repa_probe.commands import compare

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
    print(compare([os.path.relpath(weights[name]) for name in order], analysis_config(a.preset, a.n, bootstrap=20),
                  str(out)), f"{time.perf_counter() - start:.0f} s")
