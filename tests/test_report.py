"""Page 1 reads at a glance: at most three short sentences, one precision per measure for a value and its
interval, no 'none', no fall that is not one; legends that cover no line. Checked on the committed reports'
real numbers (reports/*/summary.json, results.csv) and on real rendered figures."""
from __future__ import annotations

import json
import re

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from matplotlib.transforms import Bbox

from conftest import REPO
from repa_probe.report import figures as F
from repa_probe.report.compose import _page1_panels
from repa_probe.report.verdict import LIMIT, overview_sentences

NUMBER = r"[−+-]?\d+(?:\.\d+)?"
INTERVAL = re.compile(rf"({NUMBER}) \[({NUMBER}), ({NUMBER})\]( points)?")


def _decimals(x: str) -> int:
    return len(x.split(".")[1]) if "." in x else 0


def assert_plain(sentences: list[str], compare: bool) -> None:
    """Page 1's rules: peak, (comparison,) baselines; each one sentence of at most LIMIT = 160 characters; a value
    and its interval at one precision (probe points: one decimal, every other measure: three), percentages with
    one decimal, every other decimal number with three; no 'none'; a fall only with an interval above 0."""
    assert LIMIT == 160 and len(sentences) == (3 if compare else 2), sentences
    for s in sentences:
        assert len(s) <= LIMIT and s.endswith(".") and ". " not in s, s
        assert not re.search(r"\bnone\b", s, re.I) and "falls by" not in s, s
        for m in re.finditer(rf"falls ({NUMBER}) \[({NUMBER}),", s):
            assert float(m.group(2).replace("−", "-")) > 0, s
        rest = re.sub(r"t = [\d.]+", "", s)
        for m in INTERVAL.finditer(rest):
            assert [_decimals(x) for x in m.groups()[:3]] == [1 if m.group(4) else 3] * 3, (m.group(0), s)
        rest = INTERVAL.sub("", rest)
        assert all(_decimals(x) == 1 for x in re.findall(r"(\d+\.\d+)%", rest)), s
        assert all(_decimals(x) == 3 for x in re.findall(r"\d+\.\d+", re.sub(r"\d+\.\d+%", "", rest))), s


def committed(name: str) -> tuple[dict, pd.DataFrame]:
    """A committed report's summary.json and results.csv (the encoder column as the pipeline has it: '' for none).
    Reports rendered before n and k were recorded (issue 24) get them from their config: every value there was
    computed on all n images with the config's k."""
    folder = REPO / "reports" / name
    summary, table = json.loads((folder / "summary.json").read_text()), pd.read_csv(folder / "results.csv")
    n, k = summary["config"]["n"], summary["config"]["k"]
    for row in summary["peaks"] + summary.get("compare", []):
        row.setdefault("n", n), row.setdefault("k", k)
    return summary, table.fillna({"encoder": ""}).assign(**{c: table.get(c, v) for c, v in (("n", n), ("k", k))})


@pytest.mark.parametrize("name", ["demo", "three_way"])
def test_page_1_is_at_most_three_short_sentences_at_one_precision(name):
    """On the committed reports' numbers (two and three checkpoints, with spatial and token measures), and with
    the checkpoints renamed to 40-character names, which must not push a sentence past LIMIT."""
    summary, table = committed(name)
    peaks, comp, t = pd.DataFrame(summary["peaks"]), pd.DataFrame(summary["compare"]), min(summary["config"]["ts"])
    sentences = overview_sentences(peaks, comp, table, _page1_panels(table), t)
    assert_plain(sentences, compare=True)
    # without the held-out baseline gaps (gaps=None) page 1 states values only, no 'beats' (findings/baselines.py)
    assert "the raw thumbnail" in sentences[2] and "is at or above every block (no interval)" in sentences[2]
    assert "beats" not in sentences[2]
    long = {n: f"{n}-{'x' * (39 - len(n))}" for n in summary["checkpoints"]}
    renamed = overview_sentences(peaks.replace({"checkpoint": long}), comp.replace({"a": long, "b": long}),
                                 table.replace({"checkpoint": long}), _page1_panels(table), t)
    assert_plain(renamed, compare=True)


def test_the_committed_demo_sentences_say_what_its_numbers_say():
    """Page 1's sentences on the committed demo's numbers: no peak-then-drop where no held-out drop is beyond its
    interval, REPA − vanilla at the aligned block as summary.json has it, and the blocks that differ (the band's
    lists) or none."""
    from repa_probe.report.verdict import interval
    summary, table = committed("demo")
    peaks, comp = pd.DataFrame(summary["peaks"]), pd.DataFrame(summary["compare"])
    peak, compared, baselines = overview_sentences(peaks, comp, table, _page1_panels(table), 0.0)
    at0 = peaks[peaks["t"] == 0]
    if not at0["peaks_then_drops"].any():
        assert peak.startswith("At t = 0, no curve falls significantly after its peak")
    r = comp[(comp["metric"] == "cknna") & (comp["t"] == 0)].iloc[0]
    assert compared.startswith(f"At the aligned block {r.aligned_block}, repa − vanilla: CKNNA "
                               f"{interval('cknna', r.aligned_delta, r.aligned_ci_low, r.aligned_ci_high)} "
                               f"(n = {r.n:.0f}, k = {r.k:.0f})")
    shown = comp[comp["t"] == 0]
    if not any(len(b) for b in (*shown["b_better_blocks"], *shown["b_worse_blocks"])):
        assert compared.endswith("; no block of repa differs significantly from vanilla.")
    assert baselines.startswith("In CKNNA") and "(more on page 2)" in baselines


def test_page_1_names_the_curves_that_fall_when_their_drops_do_not_fit():
    """On the committed deep pair's numbers with chosen curves falling: one fall is said with its drop; two whose
    drops do not fit in the sentence are named, checkpoint by checkpoint; a single checkpoint's curves are named
    without it; only when the names do not fit either are the falls counted."""
    summary, table = committed("demo/shipped")
    peaks, comp, pairs = pd.DataFrame(summary["peaks"]), pd.DataFrame(summary["compare"]), _page1_panels(table)

    def first(falling: list[tuple[str, str]], rows: pd.DataFrame = peaks) -> str:
        rows = rows.assign(peaks_then_drops=[(r.checkpoint, r.metric) in falling and r.t == 0
                                             for r in rows.itertuples()])
        sentence = overview_sentences(rows, comp, table, pairs, 0.0)[0]
        assert len(sentence) <= LIMIT
        return sentence

    one = first([("repa", "cknna")])
    r = peaks[(peaks.t == 0) & (peaks.checkpoint == "repa") & (peaks.metric == "cknna")].iloc[0]
    assert one.startswith(f"At t = 0, after the peak repa's CKNNA falls {r.drop_after:.3f} [") and "significantly" not in one
    two = first([("vanilla", "probe_top1"), ("repa", "cknna")])
    assert two.startswith("At t = 0, vanilla's probe top-1 and repa's CKNNA fall significantly after their peaks; ")
    alone = first([("repa", "cknna"), ("repa", "probe_top1")], peaks[peaks.checkpoint == "repa"])
    assert alone.startswith("At t = 0, CKNNA and probe top-1 fall significantly after their peaks; ")
    three = first([("vanilla", "probe_top1"), ("repa", "cknna"), ("repa", "probe_top1")])
    assert three.startswith("At t = 0, 3 of 4 curves fall significantly after their peak; ")


def test_the_shipped_demo_page_1_names_what_falls_and_reads_at_a_glance():
    """reports/demo/shipped (the README's picture): page 1 as the rules want it, naming every curve whose held-out
    drop after its peak is beyond its interval, and only those."""
    summary = json.loads((REPO / "reports" / "demo" / "shipped" / "summary.json").read_text())
    assert_plain(summary["overview"], compare=True)
    peak = summary["overview"][0]
    at0 = [p for p in summary["peaks"] if p["t"] == 0]
    label = {"cknna": "CKNNA", "probe_top1": "probe top-1"}
    for p in at0:
        named = f"{p['checkpoint']}'s {label[p['metric']]}" in peak
        assert named == bool(p["peaks_then_drops"]), (p["checkpoint"], p["metric"], peak)
    assert any(p["peaks_then_drops"] for p in at0)


def covered_lines(fig) -> list[str]:
    """Labels of the lines that a legend of the drawn figure covers: each line's path in display coordinates
    against the part of the legend's box inside that line's axes (lines are clipped to their axes)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    hits = []
    for legend in [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]:
        box = legend.get_window_extent(renderer)
        assert fig.bbox.containsx(box.x0) and fig.bbox.containsx(box.x1) and fig.bbox.containsy(box.y0) and \
            fig.bbox.containsy(box.y1), "a legend outside the page"
        for ax in fig.axes:
            inside = Bbox.intersection(box, ax.bbox)
            hits += [line.get_label() for line in ax.get_lines() if inside is not None and
                     line.get_transform().transform_path(line.get_path()).intersects_bbox(inside, filled=False)]
    return hits


def test_legends_cover_no_line_on_page_1_and_the_curve_pages():
    """The committed demo's curves, drawn: the raw thumbnail's line runs along the top of the CKNNA panels (it
    beats every block), where a legend inside the axes would hide it."""
    _, table = committed("demo")
    panels = _page1_panels(table)
    figs = [F.overview_page("page 1", ["One sentence."], table, panels, 0.0, {"repa": 2}),
            F.curves(table, "cknna", "cifar-ssl-resnet", "CKNNA per block", {"repa": 2}),
            F.curves(table, "probe_top1", "", "probe per block", {"repa": 2})]
    try:
        for fig in figs:
            labels = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
            assert "raw input thumbnail (spatial)" in labels and (fig.legends or any(ax.get_legend() for ax in fig.axes))
            assert covered_lines(fig) == []
    finally:
        plt.close("all")


def test_a_long_title_is_shortened_to_the_page_width():
    """A comparison of six long checkpoint names made a page title that ran past the page's right edge."""
    names = " vs ".join(f"reports/weights/cifar_small/{arm}-s0.safetensors" for arm in
                        ("vanilla", "repa", "repa-stop", "sra", "dispersive", "reg"))
    for size, make in ((15, lambda t: F.overview_page(t, [], pd.DataFrame(columns=["kind", "checkpoint"]), [], 0.0,
                                                      {})),
                       (12, lambda t: F._page(t, 12))):
        fig = make("repa-probe comparison: " + names)
        text = fig.texts[0]
        box = text.get_window_extent(renderer=fig.canvas.get_renderer())
        assert text.get_text().endswith("…") and box.x1 <= fig.bbox.width, (box.x1, fig.bbox.width)
        plt.close(fig)
