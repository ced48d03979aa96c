"""Experiment 5 — vanilla, REPA and iREPA side by side (issue 17): the deep run trio of cifar_runs.py, identical
(SiT init, data order, t, noise) but for the alignment term: none; REPA (λ = 0.5 at block 8, MLP projector,
cosine to the teacher's tokens); iREPA (the same, with a 3×3 convolutional projector and the teacher's tokens
z-scored over the grid, α = 0.6).

    python analyses/three_way.py --n 3000                    # → reports/three_way/

It reads the seed's final EMA weights as exported in float16 to reports/weights/cifar_<preset>/ (vanilla and REPA
are committed there for seeds 0–2; the iREPA run of the seed is trained first, resumably, if its export is
missing: hours of CPU for the deep preset). One analysis of the three final checkpoints on n cifar10/test images
(probes fitted on n cifar10/train images, scored on n test images), t ∈ {0, 0.1, 0.25, 0.5, 0.75}: pooled CKNNA
and probe, iREPA's spatial measures of every block (--spatial) and patch-level alignment (--tokens: token CKNNA
on one seeded token per image, and the cosine after each run's own projector at block 8), with the statistics of
docs/statistics.md. The report
compares REPA and iREPA with vanilla; irepa_vs_repa.csv and irepa_vs_repa_deltas.csv hold iREPA − REPA, paired
the same way. Its README.md is rendered from the report's own files (`readme`): no number in it is typed.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pandas as pd

from cifar_runs import REPO, RUNS, analysis_config, experiment_args, experiment_parser, exported
from repa_probe.families import load_checkpoint
from repa_probe.findings.summary import compare_summary, paired_deltas
from repa_probe.pipeline import PROJECTOR_COSINE, Pipeline, run
from repa_probe.report import compose
from repa_probe.report.verdict import at_blocks, interval, level, sample, what
from repa_probe.runtime import rank, shutdown_distributed

NAMES = {"vanilla": "vanilla", "repa": "REPA", "irepa": "iREPA"}
COLUMNS = [("untrained", "untrained"), ("raw-thumbnail", "raw thumbnail"), *(("model", n) for n in NAMES.values())]


def block_table(res: pd.DataFrame, deltas: pd.DataFrame, block: int, t: float) -> list[str]:
    """Every measure at `block` and t: the baselines', each run's value, and iREPA − REPA with its paired interval."""
    at = res[(res["t"] == t) & ((res["block"] == block) | (res["block"] < 0))]
    out = [f"| measure | {' | '.join(name for _, name in COLUMNS)} | iREPA − REPA [95%] |", "|---" * 7 + "|"]
    for (metric, encoder), rows in at.groupby(["metric", "encoder"], sort=False):
        cells = [rows[(rows["kind"] == kind) & (rows["checkpoint"] == name)]["value"] for kind, name in COLUMNS]
        d = deltas[(deltas["metric"] == metric) & (deltas["encoder"] == encoder) & (deltas["t"] == t)
                   & (deltas["block"] == block)]
        if metric == PROJECTOR_COSINE:
            diff = "not comparable (each run's own target)"
        else:
            diff = "–" if d.empty else interval(metric, *d.iloc[0][["delta", "ci_low", "ci_high"]])
        r = rows.iloc[0]
        where = sample(metric, r.get("n"), r.get("k"))
        out.append(f"| {what(metric, encoder, False)}{f' ({where})' if where else ''} | "
                   + " | ".join(level(metric, c.iloc[0]) if len(c) else "–" for c in cells) + f" | {diff} |")
    return out


def same_start(summary: dict) -> str:
    """What the runs' training logs (beside their weights) say of the trio's start: one SiT init and one first batch
    (the first step's denoising loss, before any alignment term acts on the weights), or that they differ."""
    first = []
    for name in NAMES.values():
        log = REPO / summary["checkpoints"][name]["path"].replace(".safetensors", ".log.jsonl")
        events = [json.loads(line) for line in log.read_text().splitlines()]
        start = next(e for e in events if e["event"] == "start")
        step1 = next(e for e in events if e["event"] == "train" and e["step"] == 1)
        first.append((start["sit_init_sha256"], step1["loss_denoise"]))
    if len(set(first)) == 1:
        return (f"Their training logs record one SiT init (sha256 `{first[0][0][:16]}…`) and one first-step "
                f"denoising loss ({first[0][1]!r}) for the three.")
    each = [f"{name}: init {init[:16]}…, first-step denoising loss {loss!r}"
            for name, (init, loss) in zip(NAMES.values(), first)]
    return "Their training logs record different starts: " + "; ".join(each) + "."


def readme(out: Path, command: str) -> str:
    """OUT/README.md from the report's own files (summary.json, results.csv, irepa_vs_repa*.csv): no number typed."""
    s = json.loads((out / "summary.json").read_text())
    cfg, block, t = s["config"], s["aligned_blocks"]["iREPA"], min(s["config"]["ts"])
    res = pd.read_csv(out / "results.csv").fillna({"encoder": ""})
    deltas = pd.read_csv(out / "irepa_vs_repa_deltas.csv").fillna({"encoder": ""})
    lists = pd.read_csv(out / "irepa_vs_repa.csv").fillna({"encoder": ""})
    flags = RUNS["irepa"][1]
    kernel, alpha = (flags[flags.index(f) + 1] for f in ("--projector-kernel", "--zscore-alpha"))
    lines = ["# Vanilla, REPA and iREPA on one training seed of the deep preset", "",
             "The `deep` preset of analyses/cifar_runs.py, three arms of one seed (the same SiT init, images, t and "
             f"noise): vanilla; REPA (λ {RUNS['repa'][0]:g} at block {block}, MLP projector, cosine to the teacher's "
             f"tokens); iREPA (the same with a {kernel}×{kernel} convolutional projector and the teacher's tokens "
             f"z-scored over the grid, α = {alpha}). Paired "
             "95% intervals over the test images (docs/statistics.md), over these three files, not over training "
             "seeds: they say how these checkpoints differ, not how the methods do.", "", "    " + command, "",
             f"n = {cfg['n']:,} images of `{cfg['data']}`, probes fitted on {cfg['probe_n_train'] or cfg['n']:,} "
             f"images of `{cfg['probe_train']}`, t ∈ {{{', '.join(f'{x:g}' for x in cfg['ts'])}}}; the final EMA "
             "weights in fp16 with their sha256 in `reports/weights/cifar_deep/` (SHA256SUMS). The untrained network is "
             "the same architecture at initialisation with its zero-initialised gates given a standard init "
             "(docs/statistics.md); the raw thumbnail is the noisy input average-pooled per patch. "
             + same_start(s), "", "## Page 1", ""]
    lines += [f"- {sentence}" for sentence in s["overview"]]
    lines += ["", f"## At the aligned block {block}, t = {t:g}", ""] + block_table(res, deltas, block, t)
    lines += ["", f"## iREPA − REPA block by block (t = {t:g}; the simultaneous band over blocks × t)", ""]
    for r in lists[(lists["t"] == t) & (lists["metric"] != PROJECTOR_COSINE)].itertuples():
        lines.append(f"- {what(r.metric, r.encoder, False)}: iREPA higher {at_blocks(json.loads(r.b_better_blocks))}, "
                     f"lower {at_blocks(json.loads(r.b_worse_blocks))}")
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    parser = experiment_parser(__doc__)
    parser.set_defaults(preset="deep")
    parser.add_argument("--seed", type=int, default=0, help="training seed of the trio (default 0)")
    parser.add_argument("--out", default=str(REPO / "reports" / "three_way"), help="report folder")
    a = experiment_args(__doc__, parser)
    weights = exported(a.preset, a.seed) | exported(a.preset, a.seed, ("irepa",))  # vanilla, REPA first: committed
    start = time.perf_counter()
    cfg = analysis_config(a.preset, a.n, bootstrap=20, spatial=True, tokens=True,
                          notes=[f"preset {a.preset}: the vanilla / REPA / iREPA trio of analyses/cifar_runs.py, "
                                 f"seed {a.seed}, final EMA weights in float16"])
    pipeline = Pipeline(cfg)
    loaded = [load_checkpoint(os.path.relpath(weights[f"{name}-s{a.seed}"])) for name in NAMES]
    results = run(loaded, list(NAMES.values()), cfg, pipeline)
    out = compose.write(results, a.out, {"total": time.perf_counter() - start})
    if rank() == 0:                      # under torchrun (`torchrun ... three_way.py -- --n 3000`) rank 0 writes
        aligned = loaded[1].anatomy.aligned_block
        compare_summary(results, "REPA", "iREPA", aligned).to_csv(Path(out) / "irepa_vs_repa.csv", index=False)
        paired_deltas(results, "REPA", "iREPA").to_csv(Path(out) / "irepa_vs_repa_deltas.csv", index=False)
        command = "python analyses/three_way.py " + " ".join(sys.argv[1:])
        (Path(out) / "README.md").write_text(readme(Path(out), command))
        print(out, f"{time.perf_counter() - start:.0f} s")
    shutdown_distributed()
