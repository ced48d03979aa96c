"""Experiment 3 — alignment over training (REPA Fig. 2b): probe accuracy and CKNNA with the teacher at every
block, logged on 1,000 held-out images every few hundred steps of both runs, one curve per block group.

    python analyses/alignment_over_training.py --preset cpu   # → reports/alignment_over_training/
"""
from cifar_runs import REPO, analysis_config, ensure_runs, experiment_args
from repa_probe.commands import trajectory

if __name__ == "__main__":
    a = experiment_args(__doc__)
    runs = ensure_runs(a.preset)
    print(trajectory([str(runs["vanilla"]), str(runs["repa"])], analysis_config(a.preset, a.n),
                     str(REPO / "reports" / "alignment_over_training"), source="log"))
