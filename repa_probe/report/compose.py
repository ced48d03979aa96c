"""Report composition: a pipeline.Results → summary tables, page 1, figures, summary.json, report.pdf.

Pages after the summary come from FIGURES, a list of builders: each takes the Results and the tidy table
and returns (name, matplotlib Figure) pairs. A new figure is one function appended to that list
(`register_figure`).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from repa_probe import metrics as M
from repa_probe.pipeline import Analysed, Results, display_scale, metric_label
from repa_probe.report import figures as F
from repa_probe.report.pdf import write_report
from repa_probe.report.summary import compare_summary, deltas, peak_summary

FigureBuilder = Callable[[Results, pd.DataFrame], list]
FIGURES: list[FigureBuilder] = []


def register_figure(builder: FigureBuilder) -> FigureBuilder:
    """Add a page builder (results, table) → [(name, Figure)]; pages appear in registration order."""
    FIGURES.append(builder)
    return builder


def _panels(table: pd.DataFrame) -> list[tuple[str, str]]:
    return sorted(table[table["kind"] == "model"].groupby(["metric", "encoder"]).groups)


@register_figure
def curve_pages(results: Results, table: pd.DataFrame) -> list:
    return [(f"curves {metric} {encoder}", F.curves(table, metric, encoder, f"{metric_label(metric)} per block"))
            for metric, encoder in _panels(table)]


@register_figure
def heatmap_pages(results: Results, table: pd.DataFrame) -> list:
    figs = []
    for a in results.models:
        figs += [(f"heatmap {a.name}", fig) for fig in F.heatmaps(table, a.name, "block × t")]
        figs.append((f"profile over t {a.name}", F.curves_over_t(table, a.name, _panels(table),
                                                                 "layer-wise profile vs t")))
    return figs


@register_figure
def similarity_pages(results: Results, table: pd.DataFrame) -> list:
    return [(f"layer similarity {a.name}", F.similarity_matrix(
        M.similarity_matrix(a.block_feats_t0, metric="cka"),
        f"{a.name}: block × block linear CKA at t = 0 (block 0 = patch embedding)"))
        for a in results.models if a.block_feats_t0 is not None]


@register_figure
def delta_pages(results: Results, table: pd.DataFrame) -> list:
    models = results.models
    figs = []
    for m in models[1:]:
        figs += [(f"deltas {m.name}", fig) for fig in F.delta_heatmaps(deltas(table, models[0].name, m.name),
                                                                         models[0].name, m.name)]
        if models[0].block_feats_t0 is not None and m.block_feats_t0 is not None:
            sim = M.similarity_matrix(models[0].block_feats_t0, m.block_feats_t0, metric="cka")
            figs.append((f"cross similarity {m.name}", F.similarity_matrix(
                sim, f"linear CKA at t = 0: {models[0].name} block (rows) × {m.name} block (columns)",
                xlabel=f"{m.name} block", ylabel=f"{models[0].name} block")))
    return figs


@register_figure
def sample_pages(results: Results, table: pd.DataFrame) -> list:
    """A grid of cfg.samples samples per model (Euler ODE, 50 steps, random classes, no guidance, seeded)."""
    from repa_probe.sampler import image_grid, sample_images
    cfg = results.config
    if not cfg.samples:
        return []
    return [(f"samples {a.name}", F.image_grid(
        image_grid(sample_images(a.ckpt, cfg.samples, vae=cfg.vae, seed=cfg.seed, cfg=1.0)),
        f"{a.name}: {cfg.samples} samples (Euler ODE, 50 steps, random classes, no guidance, seed {cfg.seed})"))
        for a in results.models if a.ckpt.convention.velocity is not None]


#################################################################################
#                                    Page 1                                     #
#################################################################################

def provenance_rows(a: Analysed) -> list[tuple[str, str]]:
    p, an = a.ckpt.provenance, a.ckpt.anatomy
    rows = [(f"{a.name}", f"{p.path}  [{p.format}, {p.weights} weights, sha256 {p.sha256[:12]}]"),
            ("  architecture", f"{an.name}: width {an.width}, {an.depth} blocks, {an.grid ** 2} tokens "
                               f"({an.input.channels}×{an.input.size}² input, patch {an.patch_size})"),
            ("  time convention", f"{p.convention} ({p.convention_source})"),
            ("  training step", "-" if p.step is None else f"{p.step:,}"),
            ("  REPA", f"depth {an.aligned_block}, λ = {p.repa_coeff}, encoders {', '.join(p.encoders) or '-'}"
             if an.aligned_block else "no projector (vanilla)")]
    rows += [("  WARNING", w) for w in p.warnings]
    return rows


def encoder_rows(results: Results) -> list[tuple[str, str]]:
    rows = []
    for enc in results.encoders:
        weights = "RANDOM WEIGHTS (--encoder-random-init): alignment numbers are meaningless" if enc.random_init \
            else f"{enc.weights_path} (sha256 {str(enc.weights_sha256)[:12]})"
        rows.append((enc.name, f"{enc.arch}, dim {enc.embed_dim}: {weights}"))
    return rows or [("(none)", "no --encoder given: alignment not measured, probes only")]


def headline(peaks: pd.DataFrame) -> list[str]:
    """One line per metric × encoder at the lowest t: the sentence a reader wants first."""
    lines = []
    if peaks.empty:
        return lines
    for (ckpt, metric, encoder), g in peaks.groupby(["checkpoint", "metric", "encoder"], sort=False):
        r = g.sort_values("t").iloc[0]
        s = display_scale(metric)
        unit = " points" if s == 100 else ""
        verdict = "peaks then drops (beyond the 95% intervals)" if r.peaks_then_drops else \
            ("drop within the intervals" if r.drop_abs > 0 else "no drop after the peak")
        lines.append(f"{ckpt}: {metric_label(metric)}{' vs ' + encoder if encoder else ''} at t={r.t:g} peaks at "
                     f"block {r.best_block} ({r.best_value * s:.3g}), last block {r.last_block}: "
                     f"{r.last_value * s:.3g}; drop {r.drop_abs * s:.2g}{unit} — {verdict}")
    return lines


def summary_table(peaks: pd.DataFrame) -> pd.DataFrame:
    if peaks.empty:
        return pd.DataFrame({"": ["no curves"]})
    rows = []
    for r in peaks.itertuples():
        s = display_scale(r.metric)
        rows.append({"checkpoint": r.checkpoint, "metric": metric_label(r.metric), "encoder": r.encoder or "-",
                     "t": f"{r.t:g}", "best block": r.best_block,
                     "best": f"{r.best_value * s:.3g} [{r.best_ci_low * s:.3g}, {r.best_ci_high * s:.3g}]",
                     "last block": r.last_block, "last": f"{r.last_value * s:.3g}",
                     "drop": f"{r.drop_abs * s:.2g} ({100 * r.drop_rel:.1f}%)" if r.drop_abs > 0 else "0",
                     "peaks then drops": "yes" if r.peaks_then_drops else "no"})
    return pd.DataFrame(rows)


def baseline_lines(table: pd.DataFrame) -> list[str]:
    lines = []
    for kind in ("raw-input", "untrained"):
        b = table[(table["kind"] == kind) & (table["t"] == table["t"].min())]
        for (name, metric, encoder), g in b.groupby(["checkpoint", "metric", "encoder"], sort=False):
            s = display_scale(metric)
            v = g["value"].to_numpy() * s
            span = f"{v.min():.3g}" if np.ptp(v) < 1e-9 * max(1, abs(v).max()) else f"{v.min():.3g}–{v.max():.3g}"
            lines.append(f"{name}: {metric_label(metric)}{' vs ' + encoder if encoder else ''} at "
                         f"t={g['t'].iloc[0]:g}: {span}")
    return lines


def compare_lines(comp: pd.DataFrame) -> list[str]:
    lines = []
    for r in comp.itertuples():
        s = display_scale(r.metric)
        if r.t == comp["t"].min():
            lines.append(f"{r.b} − {r.a}: {metric_label(r.metric)}{' vs ' + r.encoder if r.encoder else ''} at "
                         f"t={r.t:g}: largest gain {r.max_delta * s:+.3g} at block {r.max_delta_block}, mean "
                         f"{r.mean_delta * s:+.3g}; {r.b} better beyond the intervals at blocks "
                         f"{r.b_better_blocks or 'none'}")
    return lines


#################################################################################
#                                 The report                                    #
#################################################################################

def write(results: Results, out: str | Path, timings: dict[str, float] | None = None) -> Path:
    """results.csv, summary.json, figures/ and report.pdf (page 1 = the answer) in `out`."""
    import time
    start = time.perf_counter()
    cfg, table = results.config, results.table()
    peaks = peak_summary(table)
    models = results.models
    title = f"repa-probe {'analysis' if len(models) == 1 else 'comparison'}: " + " vs ".join(a.name for a in models)
    extra, tables, comp_lines = {}, {}, []
    if len(models) > 1:
        comp = pd.concat([compare_summary(table, models[0].name, m.name) for m in models[1:]], ignore_index=True)
        extra["compare"] = comp.to_dict(orient="records")
        tables["compare"] = comp
        comp_lines = compare_lines(comp)
    page1 = [("Checkpoints", [row for a in models for row in provenance_rows(a)]),
             ("Data", [("alignment images", f"{cfg.data} (n = {cfg.n}, class-balanced, seed {cfg.seed})"),
                       ("probe", f"train {cfg.probe_train or cfg.data + ' (4/5 of the n images)'}; "
                                 f"test {cfg.probe_test or cfg.data + ' (the other 1/5)'}" if cfg.probe else "off"),
                       ("noise levels t", ", ".join(f"{t:g}" for t in cfg.ts) + "  (0 = clean data, 1 = pure noise; "
                                                                             "seeded noise, null class label)")]),
             ("Encoders", encoder_rows(results)),
             ("Headline", [f"! {n}" for n in cfg.notes] + headline(peaks) + comp_lines + baseline_lines(table))]
    pages = F.summary_pages(title, page1, summary_table(peaks), "Where each curve peaks, and the drop after it",
                            "best = block with the highest value (block 0, the embedding, is not a candidate) "
                            "[95% interval]; drop = best − last block; 'peaks then drops' = the best block's "
                            "interval lies above the last block's (shaded rows).")
    figs = [(f"summary {i + 1}", page) for i, page in enumerate(pages)]
    for builder in FIGURES:
        figs += builder(results, table)
    timings = {**results.timings, **(timings or {}), "report": time.perf_counter() - start}
    summary = {"title": title, "config": asdict(cfg), "notes": cfg.notes,
               "checkpoints": {a.name: a.ckpt.provenance.to_dict() for a in results.analysed},
               "n_rows": len(table), "peaks": peaks.to_dict(orient="records"),
               "baselines": baseline_lines(table), "headline": headline(peaks),
               "timings_s": {k: round(v, 2) for k, v in timings.items()}, **extra}
    return write_report(out, table, summary, figs, tables)
