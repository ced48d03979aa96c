"""Experiment 3 — alignment over training (REPA Fig. 2b): probe accuracy and CKNNA with the teacher at every
block, logged on 1,000 held-out images every few hundred steps of both runs, one curve per block group.

    python analyses/alignment_over_training.py --preset cpu   # → reports/alignment_over_training/
"""
from __future__ import annotations

import argparse

from cifar_runs import REPO, ensure_runs
from repa_probe.analyze import AnalyzeConfig, trajectory

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
    a = ap.parse_args()
    runs = ensure_runs(a.preset)
    out = trajectory([str(runs["vanilla"]), str(runs["repa"])], AnalyzeConfig(data="", quiet=True),
                     str(REPO / "reports" / "alignment_over_training"), source="log")
    print(out)
