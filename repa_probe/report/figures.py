"""Figures for the reports: one function per figure, each returning a matplotlib Figure.

Conventions across every figure: blocks numbered as in the paper (0 = patch embedding, i = output of
block i), one fixed colour per checkpoint (seaborn "colorblind"), one colour per t from viridis,
baselines drawn in grey (dashed: untrained model, dotted: raw input), axes labelled with units.
"""
from __future__ import annotations

import math
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from repa_probe.pipeline import CLASS_TOKEN, display_scale, metric_label  # noqa: E402

PAGE = (11.69, 8.27)  # A4 landscape, inches


def checkpoint_colours(names: list[str]) -> dict[str, tuple]:
    palette = sns.color_palette("colorblind", max(3, len(names)))
    return {n: palette[i] for i, n in enumerate(names)}


def t_colours(ts: list[float]) -> dict[float, tuple]:
    cmap = plt.get_cmap("viridis")
    return {t: cmap(i / max(1, len(ts) - 1) * 0.9) for i, t in enumerate(sorted(ts))}


def _panel_grid(n: int, max_cols: int = 3):
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=PAGE, squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes.flat


def _page(title: str, size: float = 12) -> plt.Figure:
    """A blank page with its title at the top."""
    fig = plt.figure(figsize=PAGE)
    _title(fig, title, size)
    return fig


def _title(fig: plt.Figure, title: str, size: float) -> None:
    """A page's title, shortened with "…" to what fits the page's width (a bold character is about 0.58 of the
    font size wide at most): a comparison of many checkpoints names them all."""
    fits = int(0.92 * PAGE[0] * 72 / (0.58 * size))
    fig.text(0.04, 0.965, textwrap.shorten(title, fits, placeholder=" …"), fontsize=size, weight="bold", va="top")


def _text_rows(sections):
    """(height, [(x, text, style)]) for each row of titled sections of (key, value) rows, bullet lines or
    paragraphs."""
    mono = dict(fontsize=7.5, va="top", family="monospace")
    for heading, body in sections:
        yield 0.03, [(0.04, heading, dict(fontsize=10.5, weight="bold", va="top"))]
        for line in textwrap.wrap(body, 170) if isinstance(body, str) else body:
            if isinstance(line, tuple):
                key, value = line
                warn = "RANDOM" in str(value) or "ASSUMED" in str(value) or key.strip() == "WARNING"
                yield 0.021, [(0.05, key, mono), (0.22, textwrap.shorten(str(value), 150),
                                                  dict(mono, color="firebrick" if warn else "black"))]
            else:
                for part in textwrap.wrap(line, 175, subsequent_indent="    "):   # wrapped within the page
                    yield 0.021, [(0.05, part, dict(mono, color="firebrick" if line.startswith("!") else "black"))]
        yield 0.01, []


def _text_lines(figs: list, y: float, sections, title: str) -> float:
    """Draw the sections from height y down on figs[-1], continuing on new pages ('title (continued)', appended
    to figs) when one is full, so that many checkpoints push nothing off the page; returns y on the last."""
    for height, texts in _text_rows(sections):
        if y - height < 0.03:
            figs.append(_page(f"{title} (continued)"))
            y = 0.91
        for x, text, style in texts:
            figs[-1].text(x, y, text, **style)
        y -= height
    return y


def _table(fig, rect, table: pd.DataFrame) -> None:
    ax = fig.add_axes(rect)
    ax.axis("off")
    tbl = ax.table(cellText=table.astype(str).values, colLabels=list(table.columns), loc="upper center",
                   cellLoc="center", colLoc="center")
    tbl.auto_set_font_size(False)
    tbl.set_fontsize(7)
    tbl.auto_set_column_width(list(range(table.shape[1])))
    tbl.scale(1, 1.15)
    for (row, _), cell in tbl.get_celld().items():
        if row == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#e8e8e8")
        elif str(table.iloc[row - 1].get("peaks then drops", "")) == "yes":
            cell.set_facecolor("#fdebd0")


def summary_pages(title: str, sections, table: pd.DataFrame, table_title: str, note: str = "",
                  rows_per_page: int = 34) -> list[plt.Figure]:
    """Page 1: title, text sections (provenance, headline) and as much of the summary table as fits; the rest of
    the text and of the table continues on further pages."""
    figs = [_page(title, 15)]
    y = _text_lines(figs, 0.91, sections, title)
    if y < 0.2:                                      # no room for the table's title and a few rows
        figs.append(_page(f"{title} (continued)"))
        y = 0.91
    fig = figs[-1]
    fig.text(0.04, y, table_title, fontsize=10.5, weight="bold", va="top")
    for line in textwrap.wrap(note, 210):
        fig.text(0.04, y - 0.026, line, fontsize=7, va="top", style="italic")
        y -= 0.018
    room = max(0, int((y - 0.09) / 0.0235) - 1)     # table rows that fit under the text
    if len(first := table.iloc[:room]):
        _table(fig, [0.03, 0.02, 0.94, y - 0.075], first)
    for start in range(room, len(table), rows_per_page):
        figs.append(_page(f"{table_title} (continued)"))
        _table(figs[-1], [0.03, 0.02, 0.94, 0.9], table.iloc[start:start + rows_per_page])
    return figs


def _annotation_format(values: np.ndarray) -> str:
    """Enough decimals for two significant digits of the largest |value| (CKNNA deltas are ~0.01), at least one."""
    top = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    return f".{max(1, 1 - math.floor(math.log10(top))) if top > 0 else 1}f"


def _block_t_heatmaps(df: pd.DataFrame, value: str, title: str, diverging: bool = False) -> list[plt.Figure]:
    """Block × t heatmap panels of column `value`, one per metric × encoder, four to a page."""
    panels = sorted(df.groupby(["metric", "encoder"]).groups)
    figs = []
    for start in range(0, len(panels), 4):
        chunk = panels[start:start + 4]
        fig, axes = _panel_grid(len(chunk), max_cols=2)
        for ax, (metric, encoder) in zip(axes, chunk):
            g = df[(df["metric"] == metric) & (df["encoder"] == encoder)]
            grid = g.pivot_table(index="t", columns="block", values=value) * display_scale(metric)
            colours = dict(cmap="mako")
            if diverging:
                lim = float(np.nanmax(np.abs(grid.values))) or 1.0
                colours = dict(cmap="vlag", center=0, vmin=-lim, vmax=lim)
            sns.heatmap(grid, ax=ax, annot=grid.shape[1] <= 16, fmt=_annotation_format(grid.values),
                        annot_kws={"fontsize": 6}, cbar_kws={"label": ("Δ " if diverging else "") + metric_label(metric)}, **colours)
            ax.set_xlabel("block (0 = patch embedding)")
            ax.set_ylabel("noise level t (0 = data, 1 = noise)")
            ax.set_title(metric_label(metric) + (f" vs {encoder}" if encoder else ""), fontsize=10)
        fig.suptitle(title, fontsize=12)
        fig.tight_layout()
        figs.append(fig)
    return figs


def heatmaps(results: pd.DataFrame, checkpoint: str, title: str) -> list[plt.Figure]:
    """Block × t heatmaps, one panel per metric × encoder, for one checkpoint."""
    rows = results[(results["checkpoint"] == checkpoint) & (results["block"] >= 0)]
    return _block_t_heatmaps(rows, "value", f"{title}: {checkpoint}")


BASELINE_STYLE = {"untrained": dict(ls="--", color="grey", label="untrained model"),
                  "raw-input": dict(ls=":", color="grey", label="raw input (patches, pooled like the blocks)"),
                  "raw-thumbnail": dict(ls="-.", color="silver", label="raw input thumbnail (spatial)"),
                  "encoder": dict(ls="--", color="black", lw=1, label="target encoder's tokens")}


def curve_panel(ax, rows: pd.DataFrame, metric: str, colours: dict, aligned: dict[str, int]):
    """One panel: metric vs block at one t; models with 95% bands, a REG model's class token dashed in its colour,
    the permutation null as a grey band, baselines in grey, REPA's aligned block(s) as vertical lines. Its legend
    goes outside (shared_legend)."""
    s = display_scale(metric)
    for name, colour in colours.items():
        c = rows[(rows["checkpoint"] == name) & (rows["block"] >= 0)].sort_values("block")
        ax.plot(c["block"], c["value"] * s, marker="o", ms=3, color=colour, label=name)
        if c["ci_low"].notna().any():
            ax.fill_between(c["block"], c["ci_low"] * s, c["ci_high"] * s, color=colour, alpha=0.2, lw=0)
        if c["null_high"].notna().any():
            ax.fill_between(c["block"], c["null_low"] * s, c["null_high"] * s, color="black", alpha=0.08, lw=0,
                            label="permutation null (95%)" if name == next(iter(colours)) else None)
    for name, c in rows[rows["kind"] == "class-token"].groupby("checkpoint", sort=False):
        c = c.sort_values("block")
        ax.plot(c["block"], c["value"] * s, marker="x", ms=3, ls="--", lw=1,
                color=colours.get(name.removesuffix(CLASS_TOKEN), "black"), label=name)
    for kind, style in BASELINE_STYLE.items():
        b = rows[rows["kind"] == kind].sort_values("block")
        for i, (name, g) in enumerate(b.groupby("checkpoint", sort=False)):
            kw = dict(style, label=style["label"] if i == 0 else name)
            if (g["block"] >= 0).any():
                ax.plot(g["block"], g["value"] * s, **kw)
            else:
                ax.axhline(g["value"].iloc[0] * s, **kw)
    for i, (name, block) in enumerate(aligned.items()):
        ax.axvline(block, color=colours.get(name, "black"), ls=(0, (1, 3)), lw=1.2,
                   label=f"aligned block {block} ({name})")
    ax.set_xlabel("block (0 = patch embedding)")
    ax.set_ylabel(metric_label(metric))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def shared_legend(fig, ax, y: float, loc: str) -> float:
    """ax's legend entries as one legend of the figure, centred at height y (figure fraction) and placed
    outside every panel, so that it covers no line (a baseline drawn along a panel's top, say); returns the
    height it takes, as a fraction of the figure's."""
    handles, labels = ax.get_legend_handles_labels()
    legend = fig.legend(handles, labels, loc=loc, bbox_to_anchor=(0.5, y), ncol=max(1, min(4, len(labels))),
                        fontsize=7.5, frameon=False)
    return legend.get_window_extent(fig.canvas.get_renderer()).height / fig.bbox.height


def curves(results: pd.DataFrame, metric: str, encoder: str, title: str,
           aligned: dict[str, int] | None = None) -> plt.Figure:
    """Metric vs block, one panel per t, one line (with CI band) per checkpoint; baselines in grey."""
    rows = results[(results["metric"] == metric) & (results["encoder"] == encoder)]
    ts = sorted(rows["t"].unique())
    colours = checkpoint_colours(list(dict.fromkeys(rows.loc[rows["kind"] == "model", "checkpoint"])))
    fig, axes = _panel_grid(len(ts))
    for ax, t in zip(axes, ts):
        curve_panel(ax, rows[rows["t"] == t], metric, colours, aligned or {})
        ax.set_title(f"t = {t:g}", fontsize=10)
    fig.suptitle(title + (f" — vs {encoder}" if encoder else ""), fontsize=12)
    fig.tight_layout(rect=(0, shared_legend(fig, axes[0], 0.005, "lower center") + 0.01, 1, 1))
    return fig


def seed_curves(table: pd.DataFrame, groups: dict[str, dict[int, str]], means: pd.DataFrame, metric: str,
                encoder: str, title: str) -> plt.Figure:
    """Metric vs block, one panel per t: each seed's curve thin, its recipe's mean over seeds on top with the
    t-interval over seeds as a band (`means`: seeds.mean_curves), one colour per recipe."""
    rows = table[(table["metric"] == metric) & (table["encoder"] == encoder) & (table["block"] >= 0)]
    ts, s = sorted(means["t"].unique()), display_scale(metric)
    colours = checkpoint_colours(list(groups))
    fig, axes = _panel_grid(len(ts))
    for ax, t in zip(axes, ts):
        for recipe, seeds in groups.items():
            for i, name in enumerate(seeds.values()):
                c = rows[(rows["checkpoint"] == name) & (rows["t"] == t)].sort_values("block")
                ax.plot(c["block"], c["value"] * s, color=colours[recipe], lw=0.8, alpha=0.45,
                        label=f"{recipe}: each seed" if i == 0 else None)
            m = means[(means["recipe"] == recipe) & (means["t"] == t)].sort_values("block")
            ax.plot(m["block"], m["value"] * s, color=colours[recipe], lw=2.4, marker="o", ms=3,
                    label=f"{recipe}: mean of {len(seeds)} seeds")
            ax.fill_between(m["block"], m["ci_low"] * s, m["ci_high"] * s, color=colours[recipe], alpha=0.15, lw=0)
        ax.set_title(f"t = {t:g}", fontsize=10)
        ax.set_xlabel("block (0 = patch embedding)")
        ax.set_ylabel(metric_label(metric))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(title + (f" — vs {encoder}" if encoder else ""), fontsize=12)
    fig.tight_layout(rect=(0, shared_legend(fig, axes[0], 0.005, "lower center") + 0.01, 1, 1))
    return fig


def values_over_t(results: pd.DataFrame, metric: str, encoder: str, title: str) -> plt.Figure:
    """A measure taken at one block per model (e.g. the projector cosine at REPA's aligned block): its value
    vs t, one line with 95% error bars per checkpoint, labelled with its block."""
    rows = results[(results["metric"] == metric) & (results["encoder"] == encoder) & (results["kind"] == "model")]
    colours = checkpoint_colours(list(dict.fromkeys(rows["checkpoint"])))
    s = display_scale(metric)
    fig, ax = plt.subplots(figsize=PAGE)
    for name, colour in colours.items():
        c = rows[rows["checkpoint"] == name].sort_values("t")
        err = np.abs(np.stack([c["ci_low"], c["ci_high"]]) - c["value"].to_numpy()) * s
        ax.errorbar(c["t"], c["value"] * s, yerr=err if np.isfinite(err).any() else None, marker="o", ms=4,
                    capsize=3, color=colour, label=f"{name} (block {', '.join(map(str, sorted(c['block'].unique())))})")
    ax.set_xlabel("noise level t (0 = data, 1 = noise)")
    ax.set_ylabel(metric_label(metric))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title + (f" — vs {encoder}" if encoder else ""), fontsize=12)
    fig.tight_layout()
    return fig


def overview_page(title: str, sentences: list[str], results: pd.DataFrame, panels: list[tuple[str, str]], t: float,
                  aligned: dict[str, int]) -> plt.Figure:
    """Page 1: the title, the curves over blocks at one t (one panel per metric), their legend under them and
    the verdict's (at most three) short sentences."""
    fig = plt.figure(figsize=PAGE)
    _title(fig, title, 15)
    colours = checkpoint_colours(list(dict.fromkeys(results.loc[results["kind"] == "model", "checkpoint"])))
    n = max(1, len(panels))
    axes = []
    for i, (metric, encoder) in enumerate(panels):
        ax = fig.add_axes([0.06 + i * 0.92 / n, 0.5, 0.92 / n - 0.07, 0.39])
        rows = results[(results["metric"] == metric) & (results["encoder"] == encoder) & (results["t"] == t) &
                       (results["kind"] != "class-token")]                   # page 1: the models and baselines
        curve_panel(ax, rows, metric, colours, aligned)
        ax.set_title(f"{metric_label(metric)}{' vs ' + encoder if encoder else ''}, t = {t:g}", fontsize=10)
        axes.append(ax)
    y = 0.42 - (shared_legend(fig, axes[0], 0.42, "upper center") if axes else 0) - 0.04
    for sentence in sentences:
        for line in textwrap.wrap(sentence, 135):
            fig.text(0.04, y, line, fontsize=10, va="top")
            y -= 0.032
        y -= 0.014
    return fig


def curves_over_t(results: pd.DataFrame, checkpoint: str, metrics: list[tuple[str, str]], title: str) -> plt.Figure:
    """One panel per metric × encoder, one line per t: how the layer-wise profile moves with noise."""
    rows = results[results["checkpoint"] == checkpoint]
    colours = t_colours(sorted(rows["t"].unique()))
    fig, axes = _panel_grid(len(metrics), max_cols=2)
    for ax, (metric, encoder) in zip(axes, metrics):
        g = rows[(rows["metric"] == metric) & (rows["encoder"] == encoder) & (rows["block"] >= 0)]
        for t, c in g.groupby("t"):
            c = c.sort_values("block")
            ax.plot(c["block"], c["value"] * display_scale(metric), marker="o", ms=3, color=colours[t],
                    label=f"t = {t:g}")
        ax.set_xlabel("block")
        ax.set_ylabel(metric_label(metric))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(metric_label(metric) + (f" vs {encoder}" if encoder else ""), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: {checkpoint}", fontsize=12)
    fig.tight_layout()
    return fig


def similarity_matrix(matrix: np.ndarray, title: str, xlabel: str = "block", ylabel: str = "block",
                      metric: str = "CKA") -> plt.Figure:
    """Layer × layer (or model A block × model B block) similarity heatmap."""
    return similarity_matrices([matrix], [""], title, xlabel, ylabel, metric)


def similarity_matrices(matrices: list[np.ndarray], titles: list[str], title: str, xlabel: str = "block",
                        ylabel: str = "block", metric: str = "CKA", labels: list[str] | None = None,
                        max_cols: int = 3) -> plt.Figure:
    """One page of similarity heatmaps on one colour scale, one panel each (`labels`: both axes' ticks)."""
    fig, axes = _panel_grid(len(matrices), max_cols)
    # the colour range follows the data: mean-pooled blocks of one residual stream are often all above 0.9
    vmin = float(np.floor(np.nanmin(np.stack(matrices)) * 20) / 20)
    ticks = labels if labels is not None else "auto"
    for ax, matrix, sub in zip(axes, matrices, titles):
        sns.heatmap(matrix, ax=ax, cmap="rocket", vmin=vmin, vmax=1, square=True, cbar=False,
                    xticklabels=ticks, yticklabels=ticks)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(sub, fontsize=9)
        ax.invert_yaxis()
    fig.colorbar(axes[0].collections[0], ax=list(axes), shrink=0.8, label=metric)
    fig.suptitle(title, fontsize=11)
    return fig


def delta_heatmaps(delta: pd.DataFrame, a: str, b: str) -> list[plt.Figure]:
    """(B − A) per block × t, one panel per metric × encoder, diverging colours centred on 0."""
    return _block_t_heatmaps(delta, "delta", f"{b} − {a}", diverging=True)


def trajectory(traj: pd.DataFrame, metric: str, encoder: str, title: str, groups: list[list[int]]) -> plt.Figure:
    """Metric over training steps, one panel per t, one curve per block group (mean over the group).

    `traj` is tidy with a `step` column and a `run` column (one line style per run)."""
    rows = traj[(traj["metric"] == metric) & (traj["encoder"] == encoder)]
    ts = sorted(rows["t"].unique())
    palette = sns.color_palette("flare", len(groups))
    styles = ["-", "--", ":", "-."]
    fig, axes = _panel_grid(len(ts))
    for ax, t in zip(axes, ts):
        at = rows[rows["t"] == t]
        for r, (run, rr) in enumerate(at.groupby("run", sort=False)):
            for gi, group in enumerate(groups):
                c = rr[rr["block"].isin(group)].groupby("step")["value"].mean()
                label = f"blocks {group[0]}–{group[-1]}" + (f" ({run})" if at["run"].nunique() > 1 else "")
                ax.plot(c.index, c.values * display_scale(metric), ls=styles[r % 4], marker="o", ms=2.5,
                        color=palette[gi], label=label)
        ax.set_title(f"t = {t:g}", fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel(metric_label(metric))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6.5)
    fig.suptitle(title + (f" — vs {encoder}" if encoder else ""), fontsize=12)
    fig.tight_layout()
    return fig


def image_grid(images: np.ndarray, title: str) -> plt.Figure:
    """A uint8 image grid [H, W, 3] on its own page."""
    fig, ax = plt.subplots(figsize=PAGE)
    ax.imshow(images)
    ax.axis("off")
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return fig


def generation_side_by_side(points: pd.DataFrame, trajectory: bool, title: str, lines: list[str]) -> plt.Figure:
    """Sample quality (FD, lower is better) and up to three representation measures (each at its peak block)
    side by side: over training steps, one line per run (trajectory), or one point per checkpoint (compare);
    the rank correlations below them."""
    fig = _page(title)
    measures = list(dict.fromkeys(zip(points["metric"], points["encoder"])))[:3]
    fd = points.drop_duplicates("key")
    panels = [("fd", "", fd)] + [(m, e, points[(points["metric"] == m) & (points["encoder"] == e)])
                                 for m, e in measures]
    width = 0.92 / len(panels)
    for i, (metric, encoder, rows) in enumerate(panels):
        ax = fig.add_axes([0.06 + i * width, 0.36, width - 0.06, 0.52])
        column = "fd" if metric == "fd" else "measure"
        scale = 1 if metric == "fd" else display_scale(metric)
        if trajectory:
            for run, r in rows.groupby("run", sort=False):
                r = r.sort_values("step")
                ax.plot(r["step"], r[column] * scale, marker="o", ms=3, label=run)
            ax.set_xlabel("training step")
        else:
            ax.plot(range(len(rows)), rows[column].to_numpy() * scale, marker="o", ls="-", color="0.3")
            ax.set_xticks(range(len(rows)), rows["checkpoint"], rotation=30, ha="right", fontsize=7)
        label = f"{fd['score'].iloc[0]} (N = {int(fd['N'].iloc[0]):,}; lower = better)" if metric == "fd" else \
            f"{metric_label(metric)}{' vs ' + encoder if encoder else ''} (peak block)"
        ax.set_title(label, fontsize=8.5)
        ax.grid(alpha=0.3)
    if trajectory and fd["run"].nunique() > 1:
        fig.axes[1].legend(fontsize=7)
    rows = [part for line in lines or ["fewer than 4 checkpoints: no rank correlation"]
            for part in textwrap.wrap(line, 170, subsequent_indent="    ")]      # wrapped within the page
    if len(rows) > 11:
        rows = rows[:10] + ["… (the rest in gen.csv and gen_correlation.csv)"]
    for j, part in enumerate(rows):
        fig.text(0.05, 0.26 - 0.021 * j, part, fontsize=7.5, family="monospace", va="top")
    return fig
