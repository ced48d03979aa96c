"""Report composition: a report's Findings (findings/: the numbers) → summary.json, the pages, report.pdf.

Every report (analyze, compare, trajectory) is the pages of FIGURES, a registry of page builders: each takes the
report's Findings and its tidy table (the rows of results.csv) and returns (name, matplotlib Figure) pairs, none
when the numbers it draws are absent from that kind of report (`findings.kind`: analysis, comparison or
trajectory). Page 1 and the summary pages are builders too, placed first by their priority. A new figure is one
registered function (`register_figure`); it draws, it computes nothing the findings do not hold.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from repa_probe import metrics as M
from repa_probe.findings import Findings, analysis_findings, panels
from repa_probe.findings.generation import headline_correlation
from repa_probe.pipeline import BASELINES, KINDS, Analysed, Results, display_scale, metric_label
from repa_probe.registry import Registry
from repa_probe.report import figures as F
from repa_probe.report.pdf import write_report
from repa_probe.report.verdict import (correlation_lines, correlation_sentence, detail_lines, fd_sentence, gap_lines,
                                       interval, level, number, overview_sentences, paren, reach_lines, sample,
                                       seed_lines, trend_lines, trend_table, what)
from repa_probe.runtime import rank

FigureBuilder = Callable[[Findings, pd.DataFrame], list]
FIGURES: Registry[FigureBuilder] = Registry("figure")
FIRST = 2                  # the priority of page 1 (the answer); the summary pages come next, at FIRST − 1


def figure_name(builder: FigureBuilder) -> str:
    """A page builder's registry name: its module and qualified name."""
    return f"{builder.__module__}.{builder.__qualname__}"


def register_figure(builder: FigureBuilder | None = None, *, priority: int = 0, overwrite: bool = False):
    """Add a page builder (findings, table) → [(name, Figure)]; pages appear by priority, then in registration
    order. A builder of a registered name (`figure_name`) is refused, as its pages would appear twice, unless
    overwrite replaces it. Also a decorator, bare or with keywords: @register_figure(priority=1)."""
    if builder is None:
        return lambda b: register_figure(b, priority=priority, overwrite=overwrite)
    return FIGURES.register(figure_name(builder), builder, priority=priority, overwrite=overwrite)


def _at_n(table: pd.DataFrame, metric: str, encoder: str) -> str:
    """' (n = 10,000, k = 10)' for a measure that depends on them, as the models measured it; '' otherwise."""
    rows = table[(table["metric"] == metric) & (table["encoder"] == encoder) & (table["kind"] == "model")]
    return paren(sample(metric, rows["n"].iloc[0], rows["k"].iloc[0])) if len(rows) else ""


@register_figure(priority=FIRST)
def overview_page(f: Findings, table: pd.DataFrame) -> list:
    """Page 1: the answer in at most three sentences, beside the curves they speak of."""
    if f.peaks is None:
        return []
    return [("overview", F.overview_page(f.title, sentences(f)[0], table, _page1_panels(table), min(f.config.ts),
                                         f.aligned))]


@register_figure(priority=FIRST - 1)
def summary_pages(f: Findings, table: pd.DataFrame) -> list:
    """The checkpoints, data, encoders and details, then each curve's peak and the drop after it."""
    if f.peaks is None:
        return []
    pages = F.summary_pages(f.title, page2_sections(f), summary_table(f.peaks),
                            "Where each curve peaks, and the drop after it",
                            "best block = highest value on all images (block 0 is not a candidate), with the share of "
                            "bootstrap replicates where it is best; n, k = the images and neighbours of the values "
                            "(CKNNA depends on both); held-out drop = that block − the last block on half the images "
                            "(its own n; for a measure that depends on n, its two values there in parentheses), the "
                            "block chosen on the other half; 'peaks then drops' = its paired "
                            "interval is above 0 (shaded); above null = blocks whose interval clears the permutation "
                            "null's 97.5% level.")
    return [(f"summary {i + 1}", page) for i, page in enumerate(pages)]


@register_figure(priority=FIRST - 1)
def trend_pages(f: Findings, table: pd.DataFrame) -> list:
    """A trajectory's sources, and each run's change from the first step to the last per block group."""
    if f.trend is None:
        return []
    sections = [("Sources", [(k, v.get("path", "")) for k, v in f.provenance.items()][:12]),
                ("Trend (first → last step, mean over the block group)", trend_lines(f.trend)[:14])]
    if f.generation is not None:
        sections.insert(0, ("Sample quality and representation", generation_sentences(f)))
    if f.monitor:
        sections.insert(0, ("When alignment stops paying (REPA against vanilla, same batches)",
                            [m["sentence"] for m in f.monitor]))
    pages = F.summary_pages(f.title, sections, trend_table(f.trend), "Per run, metric, t and block group")
    return [(f"summary {i + 1}", p) for i, p in enumerate(pages)]


@register_figure
def curve_pages(f: Findings, table: pd.DataFrame) -> list:
    """Each measure per block, every checkpoint and baseline overlaid, with intervals and the null."""
    if f.results is None:
        return []
    return [(f"curves {metric} {encoder}", F.curves(table, metric, encoder, f"{metric_label(metric)} per block"
                                                    f"{_at_n(table, metric, encoder)}", f.aligned))
            for metric, encoder in panels(table)] + \
        [(f"over t {metric} {encoder}", F.values_over_t(table, metric, encoder, f"{metric_label(metric)} vs t"
                                                                                f"{_at_n(table, metric, encoder)}"))
         for metric, encoder in panels(table, single_block=True)]


@register_figure
def seed_pages(f: Findings, table: pd.DataFrame) -> list:
    """With seed groups (findings/seeds.py): each seed's curve thin, each recipe's mean over seeds on top."""
    title = "{} per block: each seed (thin), the mean over seeds (band: 95% t-interval over seeds)"
    return [(f"seeds {metric} {encoder}", F.seed_curves(table, f.seed_groups, means, metric, encoder,
                                                        title.format(metric_label(metric))))
            for (metric, encoder), means in f.seed_means.items()]


@register_figure
def heatmap_pages(f: Findings, table: pd.DataFrame) -> list:
    """Each checkpoint's measures over block × t."""
    figs = []
    for a in f.models:
        figs += [(f"heatmap {a.name}", fig) for fig in F.heatmaps(table, a.name, "block × t")]
        figs.append((f"profile over t {a.name}", F.curves_over_t(table, a.name, panels(table),
                                                                 "layer-wise profile vs t")))
    return figs


@register_figure
def similarity_pages(f: Findings, table: pd.DataFrame) -> list:
    """The SRA view of each checkpoint (the self-similarity measure's matrices, self_similarity.py): block × block
    linear CKA at each t, and t × t of each block."""
    pages = []
    for name, s in f.similarity.items():
        ts = [f"{t:g}" for t in s.ts]
        pages.append((f"layer similarity {name}", F.similarity_matrices(
            list(s.by_t), [f"t = {t}" for t in ts],
            f"{name}: block × block linear CKA (block 0 = patch embedding)")))
        if len(ts) > 1:
            pages.append((f"noise similarity {name}", F.similarity_matrices(
                list(s.by_block), [f"block {b}" for b in s.blocks], f"{name}: t × t linear CKA of each block",
                xlabel="t", ylabel="t", labels=ts, max_cols=math.ceil(math.sqrt(len(s.blocks) * 1.5)))))
    return pages


@register_figure
def delta_pages(f: Findings, table: pd.DataFrame) -> list:
    """Each later checkpoint minus the first, per block, with paired intervals."""
    figs, first = [], f.models[0].name if f.models else ""
    for name, deltas in f.deltas.items():
        figs += [(f"deltas {name}", fig) for fig in F.delta_heatmaps(deltas, first, name)]
        if name in f.cross_similarity:
            figs.append((f"cross similarity {name}", F.similarity_matrix(
                f.cross_similarity[name], f"linear CKA at t = {f.config.ts[0]:g}: {first} block (rows) × {name} "
                                          f"block (columns)",
                xlabel=f"{name} block", ylabel=f"{first} block")))
    return figs


@register_figure
def sample_pages(f: Findings, table: pd.DataFrame) -> list:
    """A grid of samples per model (Euler ODE, 50 steps, random classes, no guidance, seeded)."""
    cfg = f.config
    return [(f"samples {name}", F.image_grid(grid, f"{name}: {cfg.samples} samples (Euler ODE, 50 steps, random "
                                                   f"classes, no guidance, seed {cfg.seed})"))
            for name, grid in f.samples.items()]


@register_figure
def generation_pages(f: Findings, table: pd.DataFrame) -> list:
    """With --gen: sample quality (FD, beside its N) and each representation measure at its peak block, per
    checkpoint or over training steps, side by side, and their rank correlation with its interval."""
    if f.gen_points is None or f.gen_points.empty:
        return []
    title = "Sample quality beside representation" + (f" ({f.title.split(': ', 1)[-1]})" if f.title else "")
    lines = generation_sentences(f)[1:] + correlation_lines(f.gen_correlation)
    return [("generation and representation", F.generation_side_by_side(f.gen_points, f.kind == "trajectory", title,
                                                                         lines))]


@register_figure
def trajectory_pages(f: Findings, table: pd.DataFrame) -> list:
    """Each measure over training steps, one panel per block group, one line style per run (REPA Fig. 2b)."""
    if f.trend is None:
        return []
    filled = table.fillna({"encoder": ""})
    return [(f"trajectory {metric} {encoder}", F.trajectory(filled, metric, encoder,
                                                            f"{metric_label(metric)} over training", f.groups))
            for (metric, encoder), _ in filled.groupby(["metric", "encoder"])]


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

def sentences(f: Findings) -> tuple[list[str], list[str]]:
    """(page 1's sentences, page 2's details) of an analysis or comparison."""
    t0, gaps, table = min(f.config.ts), f.baseline_gaps, f.table
    overview = overview_sentences(f.peaks, f.compare, table, _page1_panels(table), t0, gaps, f.seeds)
    gen = generation_sentences(f)
    return overview + gen[:1], detail_lines(f.peaks, f.compare, table, t0) + gap_lines(gaps, t0) + \
        seed_lines(f.seeds, t0) + gen[1:]


def generation_sentences(f: Findings) -> list[str]:
    """With --gen, page 1's one sentence (the rank correlation's, else the FDs beside their N), then the FDs."""
    if f.generation is None:
        return []
    lines = [correlation_sentence(headline_correlation(f.gen_correlation)), fd_sentence(f.generation)]
    lines += reach_lines(f.gen_reach)
    return [line for line in lines if line]


def generation_summary(f: Findings) -> dict:
    """summary.json's "generation": page 1's sentence, gen.csv's rows, the rank correlations."""
    if f.generation is None:
        return {}
    lines = generation_sentences(f)
    return {"generation": {"sentence": lines[0] if lines else "", "rows": f.generation.to_dict(orient="records"),
                           "correlation": f.gen_correlation.to_dict(orient="records"),
                           "reach": [] if f.gen_reach is None else f.gen_reach.to_dict(orient="records")}}


def summarise(report: Results | Findings, timings: dict[str, float] | None = None,
              table: pd.DataFrame | None = None) -> tuple[dict, dict[str, pd.DataFrame]]:
    """summary.json's content and the report's other tables (compare, deltas, baseline gaps, seeds), without
    drawing anything; `table`: results.table(), if already made."""
    f = report if isinstance(report, Findings) else analysis_findings(report, table, pages=False)
    timings = {**(f.results.timings if f.results is not None else {}), **(timings or {})}
    timings_s = {k: round(v, 2) for k, v in timings.items()}
    if f.trend is not None:
        return {"title": f.title, "sources": f.sources, "source": f.source, "groups": f.groups,
                "trend": f.trend.to_dict(orient="records"), "monitor": f.monitor, "provenance": f.provenance,
                "config": asdict(f.config),
                "timings_s": timings_s} | generation_summary(f), f.tables()
    results, cfg, table, tables = f.results, f.config, f.table, f.tables()
    overview, details = sentences(f)
    summary = {"title": f.title, "config": asdict(cfg), "notes": cfg.notes, "overview": overview, "details": details,
               "checkpoints": {a.name: a.ckpt.provenance.to_dict() for a in results.analysed},
               "aligned_blocks": f.aligned,
               "baseline_kinds": _baseline_kinds(table),
               "images": results.images, "cache": {"chunks_computed": results.computed_chunks},
               "n_rows": len(table), "peaks": f.peaks.to_dict(orient="records"),
               "baselines": baseline_lines(table), "headline": headline(f.peaks),
               "baseline_gaps": f.baseline_gaps.to_dict(orient="records"),
               "seeds": {"groups": {r: {str(k): n for k, n in s.items()} for r, s in f.seed_groups.items()},
                         "rows": f.seeds.to_dict(orient="records")},
               "timings_s": timings_s}
    return summary | ({"compare": f.compare.to_dict(orient="records")} if f.compare is not None else {}) | \
        generation_summary(f), tables


def write(report: Results | Findings, out: str | Path, timings: dict[str, float] | None = None) -> Path:
    """results.csv, the other tables, summary.json, figures/ and report.pdf (page 1 = the answer) in `out`: the
    pages of every registered builder, in the registry's order."""
    start = time.perf_counter()
    f = report if isinstance(report, Findings) else analysis_findings(report)     # every rank: it may all-reduce
    if rank() != 0:                               # under torchrun rank 0 alone writes (and holds `out`)
        return Path(out)
    summary, tables = summarise(f, timings)
    figs = (page for build in FIGURES.values() for page in build(f, f.table))     # drawn as they are saved
    return write_report(out, f.table, summary, figs, tables, started=start)


def page2_sections(f: Findings) -> list[tuple[str, list[tuple[str, str]]]]:
    """Page 2: the checkpoints' provenance, the data and statistics, the encoders, notes and details."""
    cfg, n, models, t0 = f.config, f.results.images, f.models, min(f.config.ts)
    data = [("alignment images", f"{cfg.data} (n = {n.get('alignment', cfg.n)}, class-balanced, seed {cfg.seed})"),
            ("probe", f"train {cfg.probe_train or cfg.data + ' (4/5 of the n images)'} "
                      f"(n = {n.get('probe train', '-')}); "
                      f"test {cfg.probe_test or cfg.data + ' (the other 1/5)'} "
                      f"(n = {n.get('probe test', '-')})" if "probe train" in n else "off"),
            ("noise levels t", ", ".join(f"{t:g}" for t in cfg.ts) + "  (0 = clean data, 1 = pure noise; "
                                                                  "seeded noise, null class label)"),
            ("statistics", f"{cfg.bootstrap} bootstrap replicates (alignment), {cfg.null} permutation "
                           f"draws (null), paired across blocks and checkpoints; 'better at blocks' holds "
                           f"jointly over blocks × t")] + \
        [(f"baseline: {k.replace('-', ' ')}", v) for k, v in _baseline_kinds(f.table).items()] + \
        [(f"seeds: {r}", ", ".join(s.values()) + " (claims over seeds: mean, t-interval)")
         for r, s in f.seed_groups.items()]
    sections = [("Checkpoints", [row for a in models for row in provenance_rows(a)]), ("Data", data),
                ("Encoders", encoder_rows(f.results))] + ([("Notes", [f"! {x}" for x in cfg.notes])] if cfg.notes else [])
    details = sentences(f)[1]
    return sections + ([(f"Details (t = {t0:g}; paired 95% intervals)", details)] if details else [])


def _baseline_kinds(table: pd.DataFrame) -> dict[str, str]:
    """{baseline kind: what it is} for the baselines in the table."""
    return {k: v for k, v in KINDS.items() if k in BASELINES and k in set(table["kind"])}


def _page1_panels(table: pd.DataFrame) -> list[tuple[str, str]]:
    """The first alignment metric of each encoder (another measure against it where it has none), then the
    probe's top-1 (at most three panels)."""
    panels_ = panels(table) or panels(table, single_block=True)
    against = [(m, e) for m, e in panels_ if e]
    align = list(dict.fromkeys([p for p in against if p[0] in M.METRICS] + against))
    first = [next(p for p in align if p[1] == enc) for enc in dict.fromkeys(e for _, e in align)]
    probe = [p for p in panels_ if p[0] == "probe_top1"]
    return (first[:2] + probe)[:3] or panels_[:1]
