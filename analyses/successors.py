"""REPA's successors on the same seeds, analysed together (issue 29, item 5):

    python analyses/successors.py --n 2000          # the "small" preset on 2 CPU cores → reports/successors/
    python analyses/successors.py --preset deep      # the 28-block preset (hours of CPU)

Trains (or finishes) vanilla, REPA (λ 0.5), REPA switched off at half the steps (HASTE's --align-until), SRA
(--self-align 0.5), Dispersive Loss (--dispersive 0.25) and REG (REPA + the teacher's pooled feature as its class
token, --reg-cls 0.03) with analyses/cifar_runs.py: one seed, so every arm
starts from the same SiT and sees the same images, t and noise. Then one `compare` of their final EMA models on
the same n cifar10/test images and noise: CKNNA against the bundled teacher and the linear probe at every block,
paired intervals against vanilla, and sample quality (FD in the teacher's space, --gen samples each, the same
noise and labels for every arm). The compared files are the arms' fp16 EMA weights, exported with their training
logs, configs and SHA256SUMS into reports/weights/cifar_<preset>/ (cifar_runs.exported), so the report re-makes.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from cifar_runs import DATA, PRESETS, REPO, analysis_config, experiment_args, experiment_parser, exported

sys.path.insert(0, str(REPO))
from repa_probe.commands import compare  # noqa: E402

ARMS = ("vanilla", "repa", "repa-stop", "sra", "dispersive", "reg")


def fmt(x: float, digits: int = 3) -> str:
    return f"{x:+.{digits}f}".replace("-", "−")


def readme(out: Path, command: str) -> str:
    """reports/successors/README.md from what the report holds (summary.json, gen.csv, the weights' SHA256SUMS):
    every number below is read from those files, none typed."""
    import pandas as pd
    summary = json.loads((out / "summary.json").read_text())
    cfg = summary["config"]
    p = PRESETS["small"]
    lines = [f"# REPA's successors on one training seed (issue 29, item 5)", "",
             f"Arms of one seed of the `small` preset (the demo's {p['depth']}-block width-{p['width']} SiT, patch 4, "
             f"{p['steps']:,} steps of {p['batch']} CIFAR-10 images, REPA λ 0.5 at block {p['repa_depth']} against the "
             "bundled teacher `cifar-ssl-resnet`): every arm starts from the same SiT and sees the same images, t and "
             "noise; they differ by one flag (docs/training.md): `repa-stop` is REPA with `--align-until "
             f"{p['steps'] // 2}`, `sra` `--self-align 0.5`, `dispersive` `--dispersive 0.25`, `reg` REPA with "
             "`--reg-cls 0.03` (the teacher's pooled feature as its class token). "
             "The runs of this session were launched for twice the steps and stopped at this step's checkpoint "
             "(their logs cut there; the learning rate is constant, so nothing else depends on the total), "
             "`repa-stop` branched from its half-way checkpoint. "
             "Compared on the same images and noise; intervals are paired 95% intervals over the test images "
             "(docs/statistics.md), over two files, not over training seeds: they say how these checkpoints differ, "
             "not how the methods do.", "", "    " + command, "",
             f"n = {cfg['n']:,} cifar10/test images (probe fitted on as many train images), t ∈ "
             f"{{{', '.join(f'{t:g}' for t in cfg['ts'])}}}; weights (fp16 EMA) and their sha256 in "
             f"`reports/weights/cifar_small/` (SHA256SUMS), training logs beside them.", "", "## Page 1", ""]
    lines += [f"- {sentence}" for sentence in summary["overview"]]
    block = PRESETS["small"]["repa_depth"]
    deltas = pd.read_csv(out / "deltas.csv")
    lines += ["", f"## Each arm against vanilla at REPA's aligned block {block} (t = 0)", "",
              "| arm | measure | arm − vanilla [95%] | better at blocks (family-wise) | worse at blocks (family-wise) |",
              "|---|---|---|---|---|"]
    for row in summary["compare"]:
        if row["t"] != 0 or row["a"] != "vanilla-s0":
            continue
        d = deltas[(deltas.b == row["b"]) & (deltas.metric == row["metric"]) & (deltas.t == 0) &
                   (deltas.block == block)].iloc[0]
        scale, digits, unit = (100, 1, " pts") if row["metric"].startswith("probe") else (1, 4, "")
        where = f" (n = {int(d['n']):,}, k = {int(d['k'])})" if row["metric"] == "cknna" else ""
        lines.append(f"| {row['b']} | {row['metric']} | {fmt(scale * d['delta'], digits)}{unit} "
                     f"[{fmt(scale * d['ci_low'], digits)}, {fmt(scale * d['ci_high'], digits)}]{where} | "
                     f"{', '.join(map(str, row['b_better_blocks'])) or '–'} | "
                     f"{', '.join(map(str, row['b_worse_blocks'])) or '–'} |")
    gen = out / "gen.csv"
    if gen.exists():
        g = pd.read_csv(gen)
        g = g[g["score"].str.startswith("FD")]
        lines += ["", "## Sample quality", "", "| arm | score | N | value | arm − vanilla [95%] |", "|---|---|---|---|---|"]
        for _, r in g.iterrows():
            diff = "–" if pd.isna(r["difference"]) else \
                f"{fmt(r['difference'], 2)} [{fmt(r['ci_low'], 2)}, {fmt(r['ci_high'], 2)}]"
            lines.append(f"| {r['checkpoint']} | {r['score']} | {int(r['N']):,} | {r['value']:.2f} | {diff} |")
        lines += ["", "Lower FD is better. Each interval resamples the N samples, drawn with the same noise and labels "
                  "for every arm; it covers the sampling of these two files, not training seeds. This report's REG "
                  "model was sampled with its class-token input at 0, before the sampler denoised REG's class token "
                  "along with the image as REG's own sampler does: its FD is not REG's generation, and re-running "
                  "this script now samples it REG's way (a different FD for `reg` only)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = experiment_parser(__doc__)
    ap.set_defaults(preset="small")
    ap.add_argument("--gen", type=int, default=1000, help="samples per arm for FD (default 1000; 0 = none)")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "successors")
    a = experiment_args(__doc__, ap)
    weights = exported(a.preset, arms=ARMS)          # trains or finishes the arms first
    config = analysis_config(a.preset, a.n, ts=(0.0, 0.25, 0.5), baselines=False, gen=a.gen, gen_sampler="ode",
                             gen_steps=50, gen_reference=os.path.relpath(DATA / "test"),
                             gen_spaces=("cifar-ssl-resnet",),
                             notes=[f"preset {a.preset}: REPA's successors on one training seed (analyses/successors.py)"])
    start = time.perf_counter()
    print(compare([os.path.relpath(w) for w in weights.values()], config, os.path.relpath(a.out)),
          f"{time.perf_counter() - start:.0f} s")
    command = "python analyses/successors.py " + " ".join(sys.argv[1:])
    (a.out / "README.md").write_text(readme(a.out, command))


if __name__ == "__main__":
    main()
