"""The analysis commands: `analyze`, `compare` and `trajectory` (docs/analysis.md).

Each loads checkpoints (families/), runs the pipeline (pipeline.py: same images, same seeded noise for every
checkpoint, intervals, baselines) and writes a report (report/compose.py): results.csv (tidy, one row per
checkpoint × block × t × metric × encoder, with a `kind` column: model, untrained, raw-input),
summary.json, figures/ and report.pdf, whose first page has the answer.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from repa_probe import stats
from repa_probe.errors import UserError
from repa_probe.families import load_checkpoint
from repa_probe.pipeline import COLUMNS, AnalyzeConfig, Pipeline, display_scale, in_given_order, metric_label
from repa_probe.pipeline import run as run_pipeline
from repa_probe.report import compose
from repa_probe.report import figures as F
from repa_probe.report.pdf import check_writable, write_report
from repa_probe.runtime import find_checkpoints, hold_folder, latest_in_run
from repa_probe.stats import fmt_interval

ANALYSIS_LOG = "analysis.jsonl"   # the trainer's analysis-while-training rows (train/trainer.py)


def unique_names(paths: list[str]) -> list[str]:
    """Short distinct labels for checkpoints: file stems (run/stem for a training run's RUN/checkpoints/
    0002500.pt, whose stem alone says nothing); when they repeat, the run folder (the folder holding
    checkpoints/, or the file's folder), then run/stem, then numbered stems."""
    def run_of(p: Path) -> str:
        return p.parent.parent.name if p.parent.name == "checkpoints" else p.parent.name

    paths = [Path(p) for p in paths]
    stems = [f"{run_of(p)}/{p.stem}" if p.parent.name == "checkpoints" else p.stem for p in paths]
    for names in (stems, [run_of(p) for p in paths], [f"{run_of(p)}/{p.stem}" for p in paths]):
        if len(set(names)) == len(names) and all(names):
            return names
    return [f"{i + 1}:{p.stem}" for i, p in enumerate(paths)]


def resolve_checkpoint(arg: str, download: bool = False) -> str:
    """A checkpoint file, a run folder's latest checkpoint, or an official checkpoint by file name (from the
    download cache; fetched there with download=True)."""
    from repa_probe.download import CHECKPOINTS, cache_root, official_checkpoint
    path = latest_in_run(arg)
    if Path(path).is_file():
        return path
    name = Path(arg).name
    if name in CHECKPOINTS and (download or (cache_root() / "checkpoints" / name).is_file()):
        return str(official_checkpoint(name))
    hint = " (an official checkpoint: add --download to fetch it)" if name in CHECKPOINTS else ": check the path"
    raise UserError(f"checkpoint '{path}' does not exist{hint}")


def analyze(checkpoint: str, config: AnalyzeConfig, out: str) -> Path:
    """`repa-probe analyze`: one checkpoint → results.csv, summary.json, figures, report.pdf in `out`."""
    return compare([checkpoint], config, out)


def compare(checkpoints: list[str], config: AnalyzeConfig, out: str) -> Path:
    """`repa-probe compare A B [C ...]`: the same images and noise for all; deltas are (B − A) etc."""
    check_writable(out)
    with hold_folder(out):                 # a second analysis into `out` stops at once, naming this one
        return _compare(checkpoints, config, out)


def _compare(checkpoints: list[str], config: AnalyzeConfig, out: str) -> Path:
    start = time.perf_counter()
    paths = [resolve_checkpoint(p, config.download) for p in checkpoints]   # missing files fail before loading
    pipeline = Pipeline(config)
    cfg = pipeline.cfg
    loaded = [load_checkpoint(p, convention=cfg.convention, weights=cfg.weights, heads=cfg.heads,
                              text_embeddings=cfg.text_embeddings) for p in paths]
    results = run_pipeline(loaded, unique_names(checkpoints), cfg, pipeline)
    return compose.write(results, out, {"total": time.perf_counter() - start})


def block_groups(depth: int, n_groups: int = 4) -> list[list[int]]:
    """Blocks 1..depth in n_groups contiguous groups (e.g. 12 blocks → 1–3, 4–6, 7–9, 10–12)."""
    edges = np.linspace(0, depth, min(n_groups, depth) + 1).round().astype(int)
    return [list(range(a + 1, b + 1)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def trajectory(sources: list[str], config: AnalyzeConfig, out: str, source: str = "auto") -> Path:
    """`repa-probe trajectory RUN_DIR_OR_GLOB [...]`: metrics over training steps (REPA Fig. 2b).

    Each source is a run folder or a glob of checkpoints (one line style per source). source="log" reads
    the run's analysis-while-training file (analysis.jsonl: step, block, t, metric, encoder, value),
    "checkpoints" analyses every checkpoint (feature store: only new ones cost compute), "auto" uses the
    log where a run folder has one and the checkpoints otherwise."""
    check_writable(out)
    if source not in ("auto", "log", "checkpoints"):
        raise UserError(f"--source {source!r}: use auto, log or checkpoints")
    with hold_folder(out):
        return _trajectory(sources, config, out, source)


def _trajectory(sources: list[str], config: AnalyzeConfig, out: str, source: str) -> Path:
    start = time.perf_counter()
    frames, provenance, pipeline, depth, curves = [], {}, None, 1, {}
    for src in sources:
        run = Path(src).name if Path(src).is_dir() else src
        log = Path(src) / ANALYSIS_LOG
        if source != "checkpoints" and log.is_file():
            df = pd.read_json(log, lines=True)
            frames.append(df.assign(run=run, checkpoint=run, kind="model"))
            depth = max(depth, int(df["block"].max()))
            provenance[run] = {"path": str(log), "format": "analysis-while-training log"}
            continue
        if source == "log":
            raise UserError(f"'{src}' has no {ANALYSIS_LOG}: train with --analyze-every, or use --source checkpoints")
        files = find_checkpoints(src)
        if not files:
            raise UserError(f"no checkpoints (.pt/.safetensors) found for '{src}': pass a run folder or a glob")
        if not config.data:
            raise UserError(f"'{src}' has no {ANALYSIS_LOG} (train with --analyze-every for one), so its checkpoints "
                            f"are analysed: pass --data IMAGE_FOLDER (held-out images, e.g. cifar10/test)")
        pipeline = pipeline or Pipeline(config)
        for f in files:
            ckpt = load_checkpoint(f, convention=pipeline.cfg.convention, weights=pipeline.cfg.weights,
                                   heads=pipeline.cfg.heads)
            if ckpt.provenance.step is None:
                raise UserError(f"'{f}' records no training step: trajectory needs checkpoints from a training run")
            depth = max(depth, ckpt.anatomy.depth)
            for a in pipeline.analyse(ckpt, f"{run}@{ckpt.provenance.step}"):
                if a.kind != "model":
                    continue
                rows = [r for c in a.curves for r in c.rows()]
                frames.append(pd.DataFrame(rows).assign(run=run, step=ckpt.provenance.step))
                curves[(run, ckpt.provenance.step)] = a.curves
                provenance[a.name] = ckpt.provenance.to_dict()
    # a training log carries no intervals: its ci_low / ci_high columns stay empty
    traj = pd.concat(frames, ignore_index=True).reindex(columns=["run", "step", *COLUMNS])
    traj = in_given_order(traj, "run", ["step", "metric", "t", "block"])
    traj = traj[traj["block"] >= 1]
    groups = block_groups(depth)
    figs = []
    for (metric, encoder), _ in traj.fillna({"encoder": ""}).groupby(["metric", "encoder"]):
        figs.append((f"trajectory {metric} {encoder}",
                     F.trajectory(traj.fillna({"encoder": ""}), metric, encoder,
                                  f"{metric_label(metric)} over training", groups)))
    cfg = pipeline.cfg if pipeline else config
    trend = trajectory_summary(traj.fillna({"encoder": ""}), groups, curves, cfg.seed)
    title = "repa-probe trajectory: " + ", ".join(dict.fromkeys(traj["run"]))
    lines = [f"{r.run}: {metric_label(r.metric)}{' vs ' + r.encoder if r.encoder else ''}, t={r.t:g}, blocks "
             f"{r.blocks}: {r.first * display_scale(r.metric):.3g} at step {r.first_step:,} → "
             f"{r.last * display_scale(r.metric):.3g} at step {r.last_step:,}"
             + ("" if r.change_ci_low != r.change_ci_low else
                f", change {fmt_interval(r.change, r.change_ci_low, r.change_ci_high, display_scale(r.metric))} "
                f"(paired 95%)") + f" — {trend_word(r)}"
             for r in trend.itertuples() if r.t == trend["t"].min()]

    table = pd.DataFrame([{
        "run": r.run, "metric": metric_label(r.metric), "encoder": r.encoder or "-", "t": f"{r.t:g}",
        "blocks": r.blocks, "first step": r.first_step, "first": f"{r.first * display_scale(r.metric):.3g}",
        "last step": r.last_step, "last": f"{r.last * display_scale(r.metric):.3g}",
        "change [paired 95%]": "-" if r.change_ci_low != r.change_ci_low else
        fmt_interval(r.change, r.change_ci_low, r.change_ci_high, display_scale(r.metric)),
        "trend": trend_word(r).split(" (")[0]} for r in trend.itertuples()])
    pages = F.summary_pages(title, [("Sources", [(k, v.get("path", "")) for k, v in provenance.items()][:12]),
                                    ("Trend (first → last step, mean over the block group)", lines[:14])],
                            table, "Per run, metric, t and block group")
    figs = [(f"summary {i + 1}", p) for i, p in enumerate(pages)] + figs
    summary = {"title": title, "sources": sources, "source": source, "groups": groups,
               "trend": trend.to_dict(orient="records"), "provenance": provenance,
               "config": asdict(cfg), "timings_s": {"total": round(time.perf_counter() - start, 2)}}
    return write_report(out, traj, summary, figs)


def trajectory_summary(traj: pd.DataFrame, groups: list[list[int]], curves: dict | None = None,
                       seed: int = 0) -> pd.DataFrame:
    """First and last step's value per run × metric × encoder × t × block group (group mean), and, where the
    checkpoints were analysed here (`curves`: {(run, step): [Curves]}), the paired 95% interval of last −
    first: both steps saw the same images, noise and replicates, so the change is taken replicate by
    replicate. A training log holds values only: its change gets no interval."""
    rows = []
    for (run, metric, encoder, t), g in traj.groupby(["run", "metric", "encoder", "t"], sort=False):
        for group in groups:
            c = g[g["block"].isin(group)].groupby("step")["value"].mean()
            if not len(c):
                continue
            first, last = int(c.index[0]), int(c.index[-1])
            lo, hi = _change_interval(curves or {}, run, first, last, metric, encoder, t, group, seed)
            rows.append(dict(run=run, metric=metric, encoder=encoder, t=float(t), blocks=f"{group[0]}–{group[-1]}",
                             first_step=first, first=float(c.iloc[0]), last_step=last, last=float(c.iloc[-1]),
                             change=float(c.iloc[-1] - c.iloc[0]), change_ci_low=lo, change_ci_high=hi,
                             resolution=stats.resolution(c.to_numpy())))
    return pd.DataFrame(rows)


def _change_interval(curves: dict, run: str, first: int, last: int, metric: str, encoder: str, t: float,
                     group: list[int], seed: int) -> tuple[float, float]:
    def pick(step):
        found = [c for c in curves.get((run, step), []) if (c.metric, c.encoder or "") == (metric, encoder)]
        return found[0] if found else None

    a, b = pick(first), pick(last)
    if a is None or b is None or first == last:
        return float("nan"), float("nan")
    (ra, scale), (rb, _) = a.paired_replicates(seed), b.paired_replicates(seed)
    if ra is None or rb is None or ra.shape != rb.shape:
        return float("nan"), float("nan")
    ti, cols = a.ts.index(t), [a.blocks.index(blk) for blk in group]
    change = b.value[ti, cols].mean() - a.value[ti, cols].mean()
    lo, hi = stats.centred_interval(change, rb[:, ti, cols].mean(-1) - ra[:, ti, cols].mean(-1), scale)
    return float(lo), float(hi)


def trend_word(r) -> str:
    """'rises' / 'falls' when the paired interval of the change excludes 0 and the change is beyond the measure's
    resolution (stats.verdict), else 'no change beyond the interval'; without an interval, only which way the
    values moved (a change within the resolution is none)."""
    if r.change_ci_low == r.change_ci_low:
        return {1: "rises", -1: "falls", 0: "no change beyond the interval"}[
            stats.verdict(r.change, r.change_ci_low, r.change_ci_high, r.resolution)]
    moved = r.change if abs(r.change) > r.resolution else 0.0
    return ("higher" if moved > 0 else "lower" if moved < 0 else "unchanged") + " at the last step (values only, " \
                                                                                "no interval)"
