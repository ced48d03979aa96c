"""When does REPA's alignment term stop paying on the CIFAR-10 runs? (issue 29, item 4) The monitor of
repa_probe/findings/monitor.py over the committed training logs of the deep preset's seed pairs (28-block SiT,
REPA λ 0.5 at block 8): vanilla − REPA denoising loss on the same batches, REPA's projector cosine at block 8.

    python analyses/monitor_cifar.py                     # every seed with both logs → reports/monitor/

Writes summary.json (the monitor over the seeds, each seed's own where there are several, the series it fitted),
monitor.png and README.md, whose every number is read from summary.json (tests/test_monitor.py checks both).
Nothing is trained and nothing is analysed but the logs: a second or third seed is used as soon as its
<arm>-s<seed>.log.jsonl pair is in the weights folder.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from repa_probe.findings.monitor import PER, from_logs, number_text, paired_series, slope_text, train_rows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def seeds_in(folder: Path) -> list[int]:
    """The seeds whose vanilla and REPA training logs are both in `folder`."""
    names = (re.fullmatch(r"vanilla-s(\d+)\.log\.jsonl", p.name) for p in folder.glob("vanilla-s*.log.jsonl"))
    return sorted(int(m[1]) for m in names if m and (folder / f"repa-s{m[1]}.log.jsonl").is_file())


def monitor(folder: Path, seeds: list[int]) -> dict:
    """summary.json: the monitor over the seeds' logs (and each seed's alone when there are several), the logs'
    paths and sha256, and the paired series per seed."""
    logs = {s: [folder / f"{arm}-s{s}.log.jsonl" for arm in ("vanilla", "repa")] for s in seeds}
    every = json.loads((folder / f"repa-s{seeds[0]}.config.json").read_text())["ckpt_every"]
    both = from_logs([v for v, _ in logs.values()], [r for _, r in logs.values()], every=every)
    series = {}
    for s, (v, r) in logs.items():
        steps, benefit, alignment = paired_series(train_rows(v), train_rows(r), ("vanilla", "REPA"))
        series[str(s)] = {"steps": steps, "benefit": benefit, "alignment": alignment}
    return {"logs": {str(s): {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in pair}
                     for s, pair in logs.items()},
            "ckpt_every": every, "monitor": both.to_dict(),
            "per_seed": {str(s): from_logs(*logs[s], every=every).to_dict() for s in seeds} if len(seeds) > 1 else {},
            "series": series}


def figure(summary: dict, out: Path) -> None:
    """Benefit per logged step (each seed), the fitted two-piece line with its kink and interval, and REPA's
    alignment on the right axis."""
    m = summary["monitor"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    twin = ax.twinx()
    for seed, s in summary["series"].items():
        ax.plot(s["steps"], s["benefit"], lw=0.8, color="C0", alpha=0.7, label=f"vanilla − REPA, seed {seed}")
        twin.plot(s["steps"], s["alignment"], lw=0.8, color="C1", alpha=0.7, label=f"REPA cosine, seed {seed}")
    if m["step"] is not None:
        knot = m["benefit_start"] + m["slope_before"][0] * (m["step"] - m["start"])
        ax.plot([m["start"], m["step"], m["last"]],
                [m["benefit_start"], knot, knot + m["slope_after"][0] * (m["last"] - m["step"])],
                color="k", lw=1.5, label="two-piece fit")
        ax.axvspan(m["ci_low"], m["ci_high"], color="k", alpha=0.12, label="the fit's kink, 95% interval")
    ax.axhline(0, color="grey", lw=0.6)
    ax.set(xlabel="training step", ylabel="denoising loss, vanilla − REPA (higher: REPA better)")
    twin.set_ylabel("REPA: projector cosine at the aligned block")
    ax.set_title("turning point: " + ("step {:,.0f}".format(m["step"]) if m["claim"] else "none resolved"),
                 fontsize=10)
    lines = ax.get_legend_handles_labels()
    ax.legend(lines[0] + twin.get_legend_handles_labels()[0], lines[1] + twin.get_legend_handles_labels()[1],
              fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def readme(summary: dict) -> str:
    """README.md, every number read from summary.json."""
    m = summary["monitor"]
    per = [f"- seed {s}: {r['sentence']}" for s, r in summary["per_seed"].items()]
    later = "" if not m["slope_later"] else \
        f", and its slope from step {m['ci_high']:,.0f} on (the kink's interval's upper end) is " \
        f"{slope_text(m['slope_later'])} per {PER:,} steps"
    seeds = f"the mean of {m['n_seeds']} seeds' curves, each seed's own kink beside it" if m["n_seeds"] > 1 else \
        "one seed: another seed's run may turn elsewhere"
    found = f"the alignment term stops paying at step {m['step']:,.0f}" if m["claim"] else \
        "no step from which the alignment term stops paying"
    return "\n".join([
        "# When REPA's alignment term stops paying (issue 29, item 4)",
        "",
        "The monitor (`repa_probe/findings/monitor.py`; `docs/statistics.md`, \"When alignment stops paying\") over "
        f"the committed training logs of the deep preset (`reports/weights/cifar_deep/`, seed(s) "
        f"{', '.join(summary['logs'])}; their sha256 in `summary.json`). The benefit is vanilla − REPA denoising "
        "loss on the same batches (each logged value the mean over the steps since the previous row), the "
        "alignment REPA's projector cosine at the aligned block; `monitor.png` draws both with the fit.",
        "",
        "    python analyses/monitor_cifar.py",
        "",
        f"What it found: {m['sentence']}",
        "",
        *(per + [""] if per else []),
        f"In words: {found}. The fitted benefit goes from {number_text(m['benefit_start'])} at step {m['start']:,} to "
        f"{number_text(m['benefit_last'])} at step {m['last']:,} (a benefit below 0 means REPA's denoising loss is above "
        f"vanilla's){later}. "
        f"The intervals cover the logged values' noise around the fitted curve, by a bootstrap over steps "
        f"({seeds}).",
        "",
    ])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=REPO / "reports" / "weights" / "cifar_deep",
                        help="folder of the <arm>-s<seed>.log.jsonl and .config.json files")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "monitor")
    a = parser.parse_args()
    seeds = seeds_in(a.weights)
    if not seeds:
        raise SystemExit(f"no vanilla-sK.log.jsonl / repa-sK.log.jsonl pair in {a.weights}")
    a.out.mkdir(parents=True, exist_ok=True)
    summary = monitor(a.weights, seeds)
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    figure(summary, a.out / "monitor.png")
    (a.out / "README.md").write_text(readme(summary))
    print(summary["monitor"]["sentence"])
