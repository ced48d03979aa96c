"""Experiment 4 — the peak-then-drop on a deep SiT (issue 13 §2): a 28-block SiT trained on CIFAR-10 pixels,
vanilla and REPA (λ = 0.5 at block 8 against the bundled SimCLR teacher), identical but for the REPA term.

    python analyses/cifar_runs.py --preset deep      # trains both (one core each, resumable)
    python analyses/depth_peak.py                    # → reports/depth/ (+ reports/depth/knobs/)

1. compare the runs' final EMA weights as exported in float16 to reports/weights/cifar_<preset>/ (committed, so
   that the comparison can be re-made without training): all 10,000 cifar10/test images for CKNNA, probes fitted on 10,000 cifar10/train images and
   scored on the 10,000 test images, t ∈ {0, 0.1, 0.25, 0.5, 0.75}, the statistics of docs/statistics.md.
2. the training-length knob: every --knob-every steps, both runs' checkpoints analysed on --knob-n test
   images (probe on a 4/5 : 1/5 split of them): the held-out drop after the peak, with its paired interval,
   as a function of the training step (knobs.csv, knobs.png).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from cifar_runs import DATA, REPO, analysis_config, ensure_runs, experiment_args, experiment_parser, exported  # noqa: E402
from repa_probe.commands import compare  # noqa: E402
from repa_probe.families import load_checkpoint  # noqa: E402
from repa_probe.findings.summary import peak_summary  # noqa: E402
from repa_probe.pipeline import AnalyzeConfig, Pipeline, metric_label, run  # noqa: E402


def knobs(runs: dict[str, Path], n: int, every: int, out: Path) -> pd.DataFrame:
    """The held-out drop after the peak of every run at every `every`-th checkpoint."""
    cfg = AnalyzeConfig(data=str(DATA / "test"), n=n, encoders=["cifar-ssl-resnet"], baselines=False, bootstrap=20,
                        cache=os.path.relpath(REPO / "runs" / "cache"), quiet=True)
    pipeline = Pipeline(cfg)
    rows = []
    for name, folder in runs.items():
        steps = sorted(int(p.stem) for p in (folder / "checkpoints").glob("*.pt") if p.stem.isdigit())
        for step in [s for s in steps if s % every == 0]:
            start = time.perf_counter()
            ckpt = load_checkpoint(folder / "checkpoints" / f"{step:07d}.pt")
            peaks = peak_summary(run([ckpt], [f"{name}@{step}"], cfg, pipeline))
            rows += [dict(run=name, step=step, **r) for r in peaks.to_dict(orient="records")]
            print(f"{name} step {step}: {time.perf_counter() - start:.0f} s", flush=True)
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "knobs.csv", index=False)
    plot(table, out / "knobs.png")
    return table


def plot(table: pd.DataFrame, path: Path) -> None:
    panels = [(m, t) for m in ("probe_top1", "cknna") for t in (0.0, 0.25) if m in set(table["metric"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (metric, t) in zip(axes[0], panels):
        s = 100 if metric.startswith("probe") else 1
        for name, g in table[(table["metric"] == metric) & (table["t"] == t)].groupby("run", sort=False):
            g = g.sort_values("step")
            ax.errorbar(g["step"], g["drop_after"] * s, yerr=[(g["drop_after"] - g["drop_ci_low"]) * s,
                                                              (g["drop_ci_high"] - g["drop_after"]) * s],
                        marker="o", ms=3, capsize=2, label=name)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"{metric_label(metric)}, t = {t:g}", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out drop after the peak" + (" (points)" if s == 100 else ""))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("The drop after the peak over training (paired 95% intervals; peak chosen on the other half)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    parser = experiment_parser(__doc__)
    parser.set_defaults(preset="deep")
    parser.add_argument("--knob-n", type=int, default=2000, help="images per checkpoint for the knob (default 2000)")
    parser.add_argument("--knob-every", type=int, default=1000, help="every this many steps (default 1000)")
    parser.add_argument("--skip-compare", action="store_true", help="only the knob")
    a = experiment_args(__doc__, parser)
    runs, weights = ensure_runs(a.preset), exported(a.preset)
    report = REPO / "reports" / ("depth" if a.preset == "deep" else f"depth_{a.preset}")
    if not a.skip_compare:
        start = time.perf_counter()
        print(compare([os.path.relpath(w) for w in weights.values()], analysis_config(a.preset, a.n, bootstrap=20),
                      str(report)), f"{time.perf_counter() - start:.0f} s")
    print(knobs(runs, a.knob_n, a.knob_every, report / "knobs")[["run", "step", "metric", "t", "best_block",
                                                                  "selected_block", "drop_after", "drop_ci_low",
                                                                  "drop_ci_high", "peaks_then_drops"]])
