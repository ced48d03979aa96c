"""Experiment 1 — the layer-wise peak: where a vanilla SiT's linear-probe accuracy and CKNNA with the teacher
peak across blocks and noise levels, and how much they fall after the peak (with 95% intervals).

    python analyses/layerwise_peak.py --preset cpu        # → reports/layerwise_peak/

Reference (docs/probe.md, H100, 220 s of training, 12-block width-384 SiT/2, 10k/10k images): t = 0 probe
41% at block 1 → 57.7% at block 10 → 57.0% at block 12; untrained 27% everywhere.
"""
from cifar_runs import REPO, analysis_config, ensure_runs, experiment_args
from repa_probe.commands import analyze

if __name__ == "__main__":
    a = experiment_args(__doc__)
    runs = ensure_runs(a.preset)
    print(analyze(str(runs["vanilla"]), analysis_config(a.preset, a.n),
                  str(REPO / "reports" / "layerwise_peak")))
