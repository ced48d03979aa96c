"""Experiment 2 — REPA vs vanilla: the same SiT trained with and without REPA (same init, data order, t and
noise; λ = 0.5 at block depth/3 against the bundled teacher), compared at every block × t on the same
held-out images and noise, with sample grids of both.

    python analyses/repa_vs_vanilla.py --preset cpu       # → reports/repa_vs_vanilla/
"""
from cifar_runs import REPO, analysis_config, ensure_runs, experiment_args
from repa_probe.commands import compare

if __name__ == "__main__":
    a = experiment_args(__doc__)
    runs = ensure_runs(a.preset)
    print(compare([str(runs["vanilla"]), str(runs["repa"])],
                  analysis_config(a.preset, a.n, samples=64), str(REPO / "reports" / "repa_vs_vanilla")))
