"""Experiment 5 — vanilla, REPA and iREPA side by side (issue 17): the deep run trio of cifar_runs.py, identical
(SiT init, data order, t, noise) but for the alignment term: none; REPA (λ = 0.5 at block 8, MLP projector,
cosine to the teacher's tokens); iREPA (the same, with a 3×3 convolutional projector and the teacher's tokens
z-scored over the grid, α = 0.6).

    python analyses/cifar_runs.py --preset deep --irepa     # trains what is missing (one core each, resumable)
    python analyses/three_way.py --n 3000                    # → reports/three_way/

One analysis of the three final checkpoints on n cifar10/test images (probes fitted on n cifar10/train images,
scored on n test images), t ∈ {0, 0.1, 0.25, 0.5, 0.75}: pooled CKNNA and probe, iREPA's spatial measures of every
block (--spatial) and patch-level alignment (--tokens: token CKNNA on one seeded token per image, and the
cosine after each run's own projector at block 8), with the statistics of docs/statistics.md. The report
compares REPA and iREPA with vanilla; irepa_vs_repa.csv and irepa_vs_repa_deltas.csv hold iREPA − REPA, paired
the same way.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from cifar_runs import REPO, analysis_config, ensure_runs, experiment_args, experiment_parser
from repa_probe.families import load_checkpoint
from repa_probe.findings.summary import compare_summary, paired_deltas
from repa_probe.pipeline import Pipeline, run
from repa_probe.report import compose

NAMES = {"vanilla": "vanilla", "repa": "REPA", "irepa": "iREPA"}

if __name__ == "__main__":
    parser = experiment_parser(__doc__)
    parser.set_defaults(preset="deep")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step to compare (default: the last)")
    parser.add_argument("--out", default=str(REPO / "reports" / "three_way"), help="report folder")
    a = experiment_args(__doc__, parser)
    runs = ensure_runs(a.preset, irepa=True)
    step = a.step or max(int(p.stem) for p in (runs["irepa"] / "checkpoints").glob("*.pt") if p.stem.isdigit())
    start = time.perf_counter()
    cfg = analysis_config(a.preset, a.n, bootstrap=20, spatial=True, tokens=True,
                          notes=[f"preset {a.preset}: the vanilla / REPA / iREPA trio of analyses/cifar_runs.py, "
                                 f"step {step}"])
    pipeline = Pipeline(cfg)
    loaded = [load_checkpoint(os.path.relpath(runs[name] / "checkpoints" / f"{step:07d}.pt")) for name in NAMES]
    results = run(loaded, list(NAMES.values()), cfg, pipeline)
    out = compose.write(results, a.out, {"total": time.perf_counter() - start})
    aligned = loaded[1].anatomy.aligned_block
    compare_summary(results, "REPA", "iREPA", aligned).to_csv(Path(out) / "irepa_vs_repa.csv", index=False)
    paired_deltas(results, "REPA", "iREPA").to_csv(Path(out) / "irepa_vs_repa_deltas.csv", index=False)
    print(out, f"{time.perf_counter() - start:.0f} s")
