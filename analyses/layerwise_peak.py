"""Experiment 1 — the layer-wise peak: where a vanilla SiT's linear-probe accuracy and CKNNA with the teacher
peak across blocks and noise levels, and how much they fall after the peak (with 95% intervals).

    python analyses/layerwise_peak.py --preset cpu        # → reports/layerwise_peak/

Reference (DESIGN.md §6, H100, 220 s of training, 12-block width-384 SiT/2, 10k/10k images): t = 0 probe
41% at block 1 → 57.7% at block 10 → 57.0% at block 12; untrained 27% everywhere.
"""
from __future__ import annotations

import argparse

from cifar_runs import DATA, REPO, ensure_runs, final_checkpoint
from repa_probe.analyze import AnalyzeConfig, analyze

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--n", type=int, default=None, help="images (default: 2000 on cpu, 10000 on gpu)")
    a = ap.parse_args()
    n = a.n or (2000 if a.preset == "cpu" else 10_000)
    runs = ensure_runs(a.preset)
    out = analyze(str(final_checkpoint(runs["vanilla"])),
                  AnalyzeConfig(data=str(DATA / "test"), n=n, encoders=["cifar-ssl-resnet"],
                                probe_train=str(DATA / "train"), probe_test=str(DATA / "test"),
                                probe_n_train=n, probe_n_test=n, bootstrap=50, cache=str(REPO / "runs" / "cache"),
                                quiet=True, notes=[f"preset {a.preset}: vanilla SiT of analyses/cifar_runs.py"]),
                  str(REPO / "reports" / "layerwise_peak"))
    print(out)
