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
from repa_probe.pipeline import KINDS, Analysed, Results, display_scale, metric_label
from repa_probe.report import figures as F
from repa_probe.report import seeds as S
from repa_probe.report.baselines import baseline_gaps
from repa_probe.registry import Registry
from repa_probe.report.pdf import write_report
from repa_probe.report.summary import compare_summary, paired_deltas, peak_summary
from repa_probe.report.verdict import (detail_lines, gap_lines, interval, level, number, overview_sentences, paren,
                                       sample, seed_lines, what)

FigureBuilder = Callable[[Results, pd.DataFrame], list]
FIGURES: Registry[FigureBuilder] = Registry("figure")


def figure_name(builder: FigureBuilder) -> str:
    """A page builder's registry name: its module and qualified name."""
    return f"{builder.__module__}.{builder.__qualname__}"


def register_figure(builder: FigureBuilder, *, priority: int = 0, overwrite: bool = False) -> FigureBuilder:
    """Add a page builder (results, table) → [(name, Figure)]; pages appear by priority, then in registration
    order. A builder of a registered name (`figure_name`) is refused, as its pages would appear twice, unless
    overwrite replaces it."""
    return FIGURES.register(figure_name(builder), builder, priority=priority, overwrite=overwrite)


def _panels(table: pd.DataFrame, single_block: bool = False) -> list[tuple[str, str]]:
    """(metric, encoder) pairs measured on the models: at every block, or (single_block) at one block each."""
    models = table[(table["kind"] == "model") & (table["block"] >= 0)]
    blocks = models.groupby(["metric", "encoder", "checkpoint"])["block"].nunique()
    one = blocks.groupby(["metric", "encoder"]).max() == 1
    return sorted(pair for pair, single in one.items() if single == single_block)


def aligned_blocks(results: Results) -> dict[str, int]:
    """{model name: REPA's aligned block} for the models that have one."""
    return {a.name: a.ckpt.anatomy.aligned_block for a in results.models if a.ckpt.anatomy.aligned_block}


def _at_n(table: pd.DataFrame, metric: str, encoder: str) -> str:
    """' (n = 10,000, k = 10)' for a measure that depends on them, as the models measured it; '' otherwise."""
    rows = table[(table["metric"] == metric) & (table["encoder"] == encoder) & (table["kind"] == "model")]
    return paren(sample(metric, rows["n"].iloc[0], rows["k"].iloc[0])) if len(rows) else ""


@register_figure
def curve_pages(results: Results, table: pd.DataFrame) -> list:
    """Each measure per block, every checkpoint and baseline overlaid, with intervals and the null."""
    return [(f"curves {metric} {encoder}", F.curves(table, metric, encoder, f"{metric_label(metric)} per block"
                                                    f"{_at_n(table, metric, encoder)}", aligned_blocks(results)))
            for metric, encoder in _panels(table)] + \
        [(f"over t {metric} {encoder}", F.values_over_t(table, metric, encoder, f"{metric_label(metric)} vs t"
                                                                                f"{_at_n(table, metric, encoder)}"))
         for metric, encoder in _panels(table, single_block=True)]


@register_figure
def seed_pages(results: Results, table: pd.DataFrame) -> list:
    """With seed groups (report/seeds.py): each seed's curve thin, each recipe's mean over seeds on top."""
    groups = S.seed_groups(results)
    title = "{} per block: each seed (thin), the mean over seeds (band: 95% t-interval over seeds)"
    return [(f"seeds {metric} {encoder}", F.seed_curves(table, groups, S.mean_curves(table, groups, metric, encoder),
                                                        metric, encoder, title.format(metric_label(metric))))
            for metric, encoder in (_panels(table) if groups else [])]


@register_figure
def heatmap_pages(results: Results, table: pd.DataFrame) -> list:
    """Each checkpoint's measures over block × t."""
    figs = []
    for a in results.models:
        figs += [(f"heatmap {a.name}", fig) for fig in F.heatmaps(table, a.name, "block × t")]
        figs.append((f"profile over t {a.name}", F.curves_over_t(table, a.name, _panels(table),
                                                                 "layer-wise profile vs t")))
    return figs


@register_figure
def similarity_pages(results: Results, table: pd.DataFrame) -> list:
    """Each checkpoint's block × block linear CKA at t = 0."""
    return [(f"layer similarity {a.name}", F.similarity_matrix(
        M.similarity_matrix(a.block_feats_t0, metric="cka"),
        f"{a.name}: block × block linear CKA at t = 0 (block 0 = patch embedding)"))
        for a in results.models if a.block_feats_t0 is not None]


@register_figure
def delta_pages(results: Results, table: pd.DataFrame) -> list:
    """Each later checkpoint minus the first, per block, with paired intervals."""
    models = results.models
    figs = []
    for m in models[1:]:
        figs += [(f"deltas {m.name}", fig) for fig in F.delta_heatmaps(paired_deltas(results, models[0].name, m.name),
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
    """One line per checkpoint × metric × encoder at the lowest t: peak, its certainty, the drop after it."""
    lines = []
    if peaks.empty:
        return lines
    for (ckpt, metric, encoder), g in peaks.groupby(["checkpoint", "metric", "encoder"], sort=False):
        r = g.sort_values("t").iloc[0]
        lines.append(f"{ckpt}: {what(metric, encoder)} (t = {r.t:g}) " + _peak_phrase(r))
    return lines


def _peak_phrase(r) -> str:
    freq = f"the best block in {100 * r.best_frequency:.0f}% of bootstrap replicates" \
        if r.best_frequency == r.best_frequency else ""
    phrase = f"peaks at block {r.best_block}, " \
        f"{level(r.metric, r.best_value)}{paren(sample(r.metric, r.n, r.k), freq)}; "
    if r.selected_block is None or r.drop_after != r.drop_after:
        return phrase + f"last block {r.last_block}: {level(r.metric, r.last_value)} (no held-out drop: too few " \
                        f"blocks or no bootstrap)"
    if r.selected_block == r.last_block:
        return phrase + f"on the selection half the best block is the last ({r.last_block}): no drop after the peak"
    verdict = "it peaks, then drops" if r.peaks_then_drops else \
        ("it rises after the peak" if r.rises_after_peak else "no drop beyond the interval")
    return phrase + (f"block {int(r.selected_block)} (the peak on {r.n_select} selection images) − block "
                     f"{r.last_block} on the other {r.n_measure} images{_held_out_values(r)}: "
                     f"{interval(r.metric, r.drop_after, r.drop_ci_low, r.drop_ci_high)} (paired 95%) — {verdict}")


def _held_out_values(r) -> str:
    """For a measure that depends on n, the held-out drop's own two values, at its n (half the images) and k:
    ' (k = 10: 0.019 − 0.009)'; the drop is their difference, not one of the curve's (at all n images)."""
    if not sample(r.metric, r.n_measure, r.k) or r.measure_peak_value != r.measure_peak_value:
        return ""
    k = "" if pd.isna(r.k) else f"k = {int(r.k)}: "
    return f" ({k}{number(r.metric, r.measure_peak_value)} − {number(r.metric, r.measure_last_value)})"


def summary_table(peaks: pd.DataFrame) -> pd.DataFrame:
    if peaks.empty:
        return pd.DataFrame({"": ["no curves"]})
    rows = []
    for r in peaks.itertuples():
        rows.append({"checkpoint": r.checkpoint, "metric": metric_label(r.metric), "encoder": r.encoder or "-",
                     "t": f"{r.t:g}", "n, k": sample(r.metric, r.n, r.k) or "-",
                     "best block": f"{r.best_block}" + (f" ({100 * r.best_frequency:.0f}%)"
                                                        if r.best_frequency == r.best_frequency else ""),
                     "best [95%]": f"{number(r.metric, r.best_value)} [{number(r.metric, r.best_ci_low)}, "
                                   f"{number(r.metric, r.best_ci_high)}]",
                     "last block": r.last_block, "last": number(r.metric, r.last_value),
                     "held-out drop [paired 95%]": "-" if r.drop_after != r.drop_after else f"block "
                     f"{int(r.selected_block)} on n = {int(r.n_measure):,}{_held_out_values(r)}: "
                     f"{interval(r.metric, r.drop_after, r.drop_ci_low, r.drop_ci_high)}",
                     "peaks then drops": "yes" if r.peaks_then_drops else "no",
                     "above null": f"{r.blocks_above_null}/{r.blocks_with_null}" if r.blocks_with_null else "-"})
    return pd.DataFrame(rows)


def baseline_lines(table: pd.DataFrame) -> list[str]:
    lines = []
    for kind in ("untrained", "raw-input", "raw-thumbnail"):
        b = table[(table["kind"] == kind) & (table["t"] == table["t"].min())]
        for (name, metric, encoder), g in b.groupby(["checkpoint", "metric", "encoder"], sort=False):
            s = display_scale(metric)
            v = g["value"].to_numpy() * s
            span = f"{v.min():.3g}" if np.ptp(v) < 1e-9 * max(1, abs(v).max()) else f"{v.min():.3g}–{v.max():.3g}"
            lines.append(f"{name}: {metric_label(metric)}{' vs ' + encoder if encoder else ''}"
                         f"{paren(sample(metric, g['n'].iloc[0], g['k'].iloc[0]))} at t={g['t'].iloc[0]:g}: {span}")
    return lines


#################################################################################
#                                 The report                                    #
#################################################################################

def summarise(results: Results, timings: dict[str, float] | None = None,
              table: pd.DataFrame | None = None) -> tuple[dict, dict[str, pd.DataFrame]]:
    """summary.json's content (page-1 sentences, peaks with held-out drops, compare deltas, provenance) and the
    extra tables (compare, deltas), without drawing anything; `table`: results.table(), if already made."""
    cfg, table = results.config, results.table() if table is None else table
    peaks = peak_summary(results)
    models = results.models
    title = f"repa-probe {'analysis' if len(models) == 1 else 'comparison'}: " + " vs ".join(a.name for a in models)
    aligned = aligned_blocks(results)
    extra, tables, comp = {}, {}, None
    if len(models) > 1:
        ref = models[0].name
        comp = pd.concat([compare_summary(results, ref, m.name, aligned.get(m.name, aligned.get(ref)))
                          for m in models[1:]], ignore_index=True)
        extra["compare"] = comp.to_dict(orient="records")
        tables["compare"] = comp
        tables["deltas"] = pd.concat([paired_deltas(results, ref, m.name) for m in models[1:]], ignore_index=True)
    timings = {**results.timings, **(timings or {})}
    t0, computed = min(cfg.ts), set(table["kind"])
    tables["baseline_gaps"], (groups, seeds) = baseline_gaps(results), S.seed_table(results, peaks, aligned)
    if groups:
        tables["seeds"] = seeds
    summary = {"title": title, "config": asdict(cfg), "notes": cfg.notes,
               "overview": overview_sentences(peaks, comp, table, _page1_panels(table), t0, tables["baseline_gaps"],
                                              seeds),
               "details": detail_lines(peaks, comp, table, t0) + gap_lines(tables["baseline_gaps"], t0) +
               seed_lines(seeds, t0),
               "checkpoints": {a.name: a.ckpt.provenance.to_dict() for a in results.analysed},
               "aligned_blocks": aligned,
               "baseline_kinds": {k: v for k, v in KINDS.items() if k != "model" and k in computed},
               "images": results.images, "cache": {"chunks_computed": results.computed_chunks},
               "n_rows": len(table), "peaks": peaks.to_dict(orient="records"),
               "baselines": baseline_lines(table), "headline": headline(peaks),
               "baseline_gaps": tables["baseline_gaps"].to_dict(orient="records"),
               "seeds": {"groups": {r: {str(k): n for k, n in s.items()} for r, s in groups.items()},
                         "rows": seeds.to_dict(orient="records")},
               "timings_s": {k: round(v, 2) for k, v in timings.items()}, **extra}
    return summary, tables


def write(results: Results, out: str | Path, timings: dict[str, float] | None = None) -> Path:
    """results.csv, summary.json, figures/ and report.pdf (page 1 = the answer) in `out`."""
    import time
    start = time.perf_counter()
    cfg, table, models = results.config, results.table(), results.models
    summary, tables = summarise(results, timings, table)
    title, aligned, n = summary["title"], summary["aligned_blocks"], summary["images"]
    t0 = min(cfg.ts)
    figs = [("overview", F.overview_page(title, summary["overview"], table, _page1_panels(table), t0, aligned))]
    page2 = [("Checkpoints", [row for a in models for row in provenance_rows(a)]),
             ("Data", [("alignment images", f"{cfg.data} (n = {n.get('alignment', cfg.n)}, class-balanced, seed "
                                            f"{cfg.seed})"),
                       ("probe", f"train {cfg.probe_train or cfg.data + ' (4/5 of the n images)'} "
                                 f"(n = {n.get('probe train', '-')}); "
                                 f"test {cfg.probe_test or cfg.data + ' (the other 1/5)'} "
                                 f"(n = {n.get('probe test', '-')})" if "probe train" in n else "off"),
                       ("noise levels t", ", ".join(f"{t:g}" for t in cfg.ts) + "  (0 = clean data, 1 = pure noise; "
                                                                             "seeded noise, null class label)"),
                       ("statistics", f"{cfg.bootstrap} bootstrap replicates (alignment), {cfg.null} permutation "
                                      f"draws (null), paired across blocks and checkpoints; 'better at blocks' holds "
                                      f"jointly over blocks × t")] +
                      [(f"baseline: {k.replace('-', ' ')}", v) for k, v in summary["baseline_kinds"].items()] +
                      [(f"seeds: {r}", ", ".join(s.values()) + " (claims over seeds: mean, t-interval)")
                       for r, s in summary["seeds"]["groups"].items()]),
             ("Encoders", encoder_rows(results))] + ([("Notes", [f"! {n}" for n in cfg.notes])] if cfg.notes else [])
    page2 += [(f"Details (t = {t0:g}; paired 95% intervals)", summary["details"])] if summary["details"] else []
    pages = F.summary_pages(title, page2, summary_table(pd.DataFrame(summary["peaks"])),
                            "Where each curve peaks, and the drop after it",
                            "best block = highest value on all images (block 0 is not a candidate), with the share of "
                            "bootstrap replicates where it is best; n, k = the images and neighbours of the values "
                            "(CKNNA depends on both); held-out drop = that block − the last block on half the images "
                            "(its own n; for a measure that depends on n, its two values there in parentheses), the "
                            "block chosen on the other half; 'peaks then drops' = its paired "
                            "interval is above 0 (shaded); above null = blocks whose interval clears the permutation "
                            "null's 97.5% level.")
    figs += [(f"summary {i + 1}", page) for i, page in enumerate(pages)]
    for builder in FIGURES.values():
        figs += builder(results, table)
    return write_report(out, table, summary, figs, tables, started=start)


def _page1_panels(table: pd.DataFrame) -> list[tuple[str, str]]:
    """The first alignment metric of each encoder, then the probe's top-1 (at most three panels)."""
    panels = _panels(table) or _panels(table, single_block=True)
    align = list(dict.fromkeys((m, e) for m, e in panels if e))
    first = [next(p for p in align if p[1] == enc) for enc in dict.fromkeys(e for _, e in align)]
    probe = [p for p in panels if p[0] == "probe_top1"]
    return (first[:2] + probe)[:3] or panels[:1]
