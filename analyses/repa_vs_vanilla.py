"""Experiment 2 — REPA vs vanilla: the same SiT trained with and without REPA (same init, data order, t and
noise; λ = 0.5 at block depth/3 against the bundled teacher), compared at every block × t on the same
held-out images and noise, with sample grids of both.

    python analyses/repa_vs_vanilla.py --preset cpu       # → reports/repa_vs_vanilla/
"""
from __future__ import annotations

import argparse

from cifar_runs import DATA, REPO, ensure_runs, final_checkpoint
from repa_probe.analyze import AnalyzeConfig, compare

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--n", type=int, default=None, help="images (default: 2000 on cpu, 10000 on gpu)")
    a = ap.parse_args()
    n = a.n or (2000 if a.preset == "cpu" else 10_000)
    runs = ensure_runs(a.preset)
    out = compare([str(final_checkpoint(runs["vanilla"])), str(final_checkpoint(runs["repa"]))],
                  AnalyzeConfig(data=str(DATA / "test"), n=n, encoders=["cifar-ssl-resnet"],
                                probe_train=str(DATA / "train"), probe_test=str(DATA / "test"),
                                probe_n_train=n, probe_n_test=n, bootstrap=50, samples=64,
                                cache=str(REPO / "runs" / "cache"), quiet=True,
                                notes=[f"preset {a.preset}: the controlled pair of analyses/cifar_runs.py"]),
                  str(REPO / "reports" / "repa_vs_vanilla"))
    print(out)
